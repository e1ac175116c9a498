//! Plugins written in other languages, built with their own toolchains from
//! their registries: the Python adapter (`examples/python-adapter`, with
//! componentize-py from PyPI) and the JavaScript filter
//! (`examples/js-filter`, with componentize-js from npm). Both land in
//! `target/wasm-fixtures/`, rebuilt only when a source is newer.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};

/// The componentize-py the Python example is built and tested with.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";

/// Newest modification time of the files directly in `dir` with one of `exts`.
fn newest_source(dir: &Path, exts: &[&str]) -> Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e)) {
            newest = newest.max(fs::metadata(&path)?.modified()?);
        }
    }
    Ok(newest)
}

/// Whether `out` exists and is newer than the sources and the contract.
fn fresh(out: &Path, sources: SystemTime, wit: SystemTime) -> bool {
    fs::metadata(out).and_then(|m| m.modified()).is_ok_and(|t| t > sources && t > wit)
}

/// Build both examples with the test venv's `python`; returns their paths.
pub fn build_all(root: &Path, python: &Path) -> Result<Vec<PathBuf>> {
    let fixtures = root.join("target/wasm-fixtures");
    fs::create_dir_all(&fixtures)?;
    let wit = newest_source(&root.join("wit"), &["wit"])?;
    Ok(vec![python_adapter(root, python, &fixtures, wit)?, js_filter(root, &fixtures, wit)?])
}

fn python_adapter(root: &Path, python: &Path, fixtures: &Path, wit: SystemTime) -> Result<PathBuf> {
    let dir = root.join("examples/python-adapter");
    let out = fixtures.join("py-openai.wasm");
    if fresh(&out, newest_source(&dir, &["py"])?, wit) {
        return Ok(out);
    }
    let bin = python.with_file_name("componentize-py");
    if !bin.exists() {
        crate::run_checked(Command::new(python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            COMPONENTIZE_PY,
        ]))?;
    }
    eprintln!("xtask: building examples/python-adapter with componentize-py");
    crate::run_checked(
        Command::new(&bin)
            .current_dir(&dir)
            .arg("-d")
            .arg(root.join("wit"))
            .args(["-w", "adapter-plugin", "componentize", "app", "-o"])
            .arg(&out),
    )?;
    Ok(out)
}

fn js_filter(root: &Path, fixtures: &Path, wit: SystemTime) -> Result<PathBuf> {
    let dir = root.join("examples/js-filter");
    let out = fixtures.join("js-clamp.wasm");
    if fresh(&out, newest_source(&dir, &["js", "mjs", "json"])?, wit) {
        return Ok(out);
    }
    if !has("node") || !has("npm") {
        crate::ensure_packages("Node.js and npm", &[("node", "nodejs"), ("npm", "npm")])?;
    }
    if !dir.join("node_modules/@bytecodealliance/componentize-js").exists() {
        eprintln!("xtask: installing componentize-js (npm ci)");
        crate::run_checked(Command::new("npm").current_dir(&dir).args(["ci", "--no-audit", "--no-fund"]))?;
    }
    eprintln!("xtask: building examples/js-filter with componentize-js");
    crate::run_checked(Command::new("node").current_dir(&dir).arg("build.mjs").arg(&out))?;
    Ok(out)
}

fn has(bin: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success())
}
