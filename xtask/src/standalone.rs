//! Building a standalone plugin crate — one made by `wasmgate plugin new`,
//! anywhere, with no workspace of ours above it — the way its author would:
//! `cargo build --release --target wasm32-wasip2` where that target is (or
//! can be) installed, else with the project's own fallback (core module +
//! `wit-component`). `cargo xtask component CRATE_DIR OUT.wasm` runs it;
//! `tests/pdk.rs` uses it on freshly scaffolded crates.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::toolchain::{self, CORE_TARGET};

const WASIP2_TARGET: &str = "wasm32-wasip2";

/// Build the standalone plugin crate in `dir` into the component `dest`.
pub fn build_crate(root: &Path, dir: &Path, dest: &Path) -> Result<()> {
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).context("the crate's Cargo.toml")?;
    let package = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("name = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("no package name")?;
    let artifact = format!("{}.wasm", package.replace('-', "_"));
    let target_dir = root.join("target/standalone-plugins");
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if toolchain::rustup_target(WASIP2_TARGET) {
        eprintln!("xtask: building {} with cargo build --target {WASIP2_TARGET}", dir.display());
        let mut cmd = std::process::Command::new("cargo");
        cmd.env_remove("RUSTC").env_remove("RUSTDOC").current_dir(dir);
        cmd.args(["build", "--release", "--target", WASIP2_TARGET, "--target-dir"]).arg(&target_dir);
        crate::run_checked(&mut cmd)?;
        let built = target_dir.join(WASIP2_TARGET).join("release").join(&artifact);
        let bytes = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        return crate::plugins::write_if_changed(dest, &bytes);
    }
    let chain = toolchain::select(CORE_TARGET)?;
    eprintln!("xtask: no {WASIP2_TARGET} target here; building {} with {chain:?}", dir.display());
    let mut cmd = toolchain::cargo_build(chain, CORE_TARGET, dir);
    cmd.arg("--target-dir").arg(&target_dir);
    crate::run_checked(&mut cmd)?;
    let core = target_dir.join(CORE_TARGET).join("release").join(&artifact);
    let bytes = fs::read(&core).with_context(|| format!("reading {}", core.display()))?;
    let component = crate::componentize::componentize(&bytes, false)?;
    crate::plugins::write_if_changed(dest, &component)
}
