//! The template adapter built by the real `cargo component build`, to prove
//! such components load and pass `plugin check`.
//!
//! Installing `cargo-component` from crates.io takes 14–24 minutes on two
//! cores, too long for every clean CI run, so the suite always tests the
//! golden build kept in `tests/fixtures/compat/acme-cargo-component.wasm`
//! (made with the recipe below), and rebuilds it fresh into
//! `target/wasm-fixtures/` whenever `cargo-component` is available: on PATH,
//! in `target/tools/bin`, or installed there when
//! `WASMGATE_CARGO_COMPONENT=install` is set.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::toolchain::{Toolchain, WASIP1_TARGET};

fn find(root: &Path) -> Option<PathBuf> {
    let local = root.join("target/tools/bin/cargo-component");
    if local.exists() {
        return Some(local);
    }
    let on_path = Command::new("cargo-component").arg("--version").output();
    on_path.is_ok_and(|o| o.status.success()).then(|| PathBuf::from("cargo-component"))
}

fn install(root: &Path) -> Result<PathBuf> {
    eprintln!("xtask: installing cargo-component into target/tools (takes 15-25 minutes on 2 cores)");
    let mut cmd = crate::host_cargo();
    cmd.args(["install", "--locked", "cargo-component", "--root"]).arg(root.join("target/tools"));
    crate::run_checked(&mut cmd)?;
    Ok(root.join("target/tools/bin/cargo-component"))
}

/// Build `plugins/template` with `cargo component build` when the tool is
/// available; returns the component's path, or `None` when skipped.
pub fn build_template(root: &Path, chain: Toolchain) -> Result<Option<PathBuf>> {
    let tool = match (find(root), std::env::var("WASMGATE_CARGO_COMPONENT").as_deref()) {
        (Some(tool), _) => tool,
        (None, Ok("install")) => install(root)?,
        (None, _) => {
            eprintln!("xtask: cargo-component not installed; the golden cargo-component build is tested instead");
            return Ok(None);
        }
    };
    let target_dir = root.join("target/cargo-component");
    let mut cmd = Command::new(tool);
    cmd.current_dir(root.join("plugins"))
        .args(["component", "build", "--release", "--package", "acme", "--target-dir"])
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR");
    if chain == Toolchain::DebianBuildStd {
        // WASM_TOOLCHAIN.md: cargo-component asks the rustc on PATH for its
        // sysroot and wants a wasm32-wasip1 directory there; build-std
        // supplies the standard library.
        std::fs::create_dir_all("/usr/lib/rustlib/wasm32-wasip1/lib").context("creating the wasip1 sysroot dir")?;
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        cmd.env("PATH", path)
            .env("RUSTC", "/usr/bin/rustc")
            .env("RUSTDOC", "/usr/bin/rustdoc")
            .env("CARGO", "/usr/bin/cargo")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_UNSTABLE_BUILD_STD", "std,panic_abort")
            .env("CARGO_TARGET_WASM32_WASIP1_LINKER", "wasm-ld-16")
            .env("CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS", "-C link-self-contained=no -L /usr/lib/wasm32-wasi");
    } else {
        cmd.env_remove("RUSTC").env_remove("RUSTDOC");
    }
    crate::run_checked(&mut cmd)?;
    let built = target_dir.join(WASIP1_TARGET).join("release/acme.wasm");
    let dest = root.join("target/wasm-fixtures/acme-cargo-component.wasm");
    std::fs::copy(&built, &dest).with_context(|| format!("copying {}", built.display()))?;
    eprintln!("xtask: built {} with cargo component", dest.display());
    Ok(Some(dest))
}
