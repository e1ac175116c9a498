//! Finding a compiler that can build wasm guests.
//!
//! In order: an installed rustup wasm target; `rustup target add` with a short
//! timeout; Debian's `rustc-web` with `-Zbuild-std` (installed with apt when
//! missing and we are root). See `../shared/WASM_TOOLCHAIN.md` and
//! `docs/plugins.md`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How guests get compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// rustup's toolchain with the target installed (a user's machine).
    Rustup,
    /// Debian's rustc-web + rust-web-src with build-std (machines without
    /// downloadable wasm targets).
    DebianBuildStd,
}

/// Core-module target used for the project's own plugins.
pub const CORE_TARGET: &str = "wasm32-unknown-unknown";
/// WASI preview 1 target (what `cargo component` uses).
pub const WASIP1_TARGET: &str = "wasm32-wasip1";

const DEBIAN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "lld-16", "wasi-libc"];

fn rustup_has_target(target: &str) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == target))
        .unwrap_or(false)
}

/// `rustup target add`, killed after `limit` (it hangs where the download
/// host is unreachable).
fn rustup_add_target(target: &str, limit: Duration) -> bool {
    let Ok(mut child) =
        Command::new("rustup").args(["target", "add", target]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
    else {
        return false;
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

fn debian_ready() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/lib/rustlib/src/rust/library/std").exists()
        && Path::new("/usr/bin/wasm-ld-16").exists()
        && Path::new("/usr/lib/wasm32-wasi").exists()
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn apt_install() -> Result<()> {
    eprintln!("xtask: installing Debian's wasm-capable Rust toolchain: {}", DEBIAN_PACKAGES.join(" "));
    crate::run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
    crate::run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(DEBIAN_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Whether rustup has `target`, adding it if it can within 20 s.
pub fn rustup_target(target: &str) -> bool {
    if std::env::var("WASMGATE_WASM_TOOLCHAIN").as_deref() == Ok("debian") {
        return false;
    }
    rustup_has_target(target) || rustup_add_target(target, Duration::from_secs(20))
}

/// Pick (and if needed install) a toolchain that can build `target`.
/// `WASMGATE_WASM_TOOLCHAIN=rustup|debian` skips the detection.
pub fn select(target: &str) -> Result<Toolchain> {
    match std::env::var("WASMGATE_WASM_TOOLCHAIN").as_deref() {
        Ok("rustup") => return Ok(Toolchain::Rustup),
        Ok("debian") => return ensure_debian(),
        _ => {}
    }
    if rustup_has_target(target) {
        return Ok(Toolchain::Rustup);
    }
    if debian_ready() {
        return Ok(Toolchain::DebianBuildStd);
    }
    eprintln!("xtask: wasm target {target} not installed; trying `rustup target add` (20 s limit)");
    if rustup_add_target(target, Duration::from_secs(20)) {
        return Ok(Toolchain::Rustup);
    }
    ensure_debian()
}

fn ensure_debian() -> Result<Toolchain> {
    if debian_ready() {
        return Ok(Toolchain::DebianBuildStd);
    }
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        apt_install()?;
        if debian_ready() {
            return Ok(Toolchain::DebianBuildStd);
        }
    }
    bail!(
        "no toolchain can build wasm plugins.\n  \
         On a normal machine: rustup target add {CORE_TARGET}\n  \
         On Debian 12 without rustup downloads (as root): apt-get install {}",
        DEBIAN_PACKAGES.join(" ")
    )
}

/// A `cargo build` command for `target` with the chosen toolchain.
pub fn cargo_build(toolchain: Toolchain, target: &str, plugins_dir: &Path) -> Command {
    let mut cmd = match toolchain {
        Toolchain::Rustup => {
            let mut c = Command::new("cargo");
            // Drop the host's toolchain pin that `cargo xtask` inherits.
            c.env_remove("RUSTC").env_remove("RUSTDOC");
            c
        }
        Toolchain::DebianBuildStd => {
            let mut c = Command::new("/usr/bin/cargo");
            let upper = target.to_uppercase().replace('-', "_");
            c.env("RUSTC", "/usr/bin/rustc")
                .env("RUSTDOC", "/usr/bin/rustdoc")
                .env("RUSTC_BOOTSTRAP", "1")
                .env(format!("CARGO_TARGET_{upper}_LINKER"), "wasm-ld-16")
                .env_remove("RUSTUP_TOOLCHAIN");
            if target == WASIP1_TARGET {
                c.env(format!("CARGO_TARGET_{upper}_RUSTFLAGS"), "-C link-self-contained=no -L /usr/lib/wasm32-wasi");
            }
            c
        }
    };
    cmd.current_dir(plugins_dir).env_remove("CARGO_TARGET_DIR").args([
        "build",
        "--release",
        "--workspace",
        "--target",
        target,
    ]);
    if toolchain == Toolchain::DebianBuildStd {
        cmd.arg("-Zbuild-std=std,panic_abort");
    }
    cmd
}
