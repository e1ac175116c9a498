//! `cargo xtask`: wasmgate's project automation.
//!
//! - `cargo xtask plugins`   build the wasm plugins into `plugins/*.wasm`
//!   (and the test fixtures into `target/wasm-fixtures/`)
//! - `cargo xtask examples`  build the Python adapter and JavaScript filter
//!   in `examples/` (componentize-py, componentize-js) into `target/wasm-fixtures/`
//! - `cargo xtask test`      set everything up and run the whole test suite
//! - `cargo xtask run [ARGS]` build the plugins and run the gateway (release)
//! - `cargo xtask bench`     run the loopback benchmark harness (installs wrk
//!   and nginx, its peers, when missing)

mod cargo_component;
mod componentize;
mod examples;
mod plugins;
mod python;
mod standalone;
mod test_report;
mod toolchain;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Errors end in one line saying why (no backtrace: a log that keeps only
/// its tail must still show the reason).
fn main() {
    if let Err(error) = dispatch() {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn dispatch() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("plugins") => plugins::build_all(&root),
        Some("examples") => examples::build_all(&root, &python::ensure_venv(&root)?).map(|built| {
            built.iter().for_each(|p| eprintln!("xtask: built {}", p.display()));
        }),
        Some("test") => test(&root, &args[1..]),
        Some("run") => run(&root, forwarded(&args[1..])),
        Some("bench") => bench(&root, forwarded(&args[1..])),
        // Build a standalone plugin crate (e.g. one `wasmgate plugin new` made) into a component.
        Some("component") if args.len() == 3 => {
            standalone::build_crate(&root, std::path::Path::new(&args[1]), std::path::Path::new(&args[2]))
        }
        _ => {
            eprintln!("usage: cargo xtask <plugins|examples|test|run|bench|component CRATE_DIR OUT.wasm> [args]");
            std::process::exit(2);
        }
    }
}

/// Arguments for a program xtask starts after its own `--`: the alias
/// `cargo xtask` already ends in `--`, so `cargo xtask run -- --config X`
/// hands us a literal `--` that must not reach the program.
fn forwarded(args: &[String]) -> &[String] {
    match args.first() {
        Some(first) if first == "--" => &args[1..],
        _ => args,
    }
}

/// The repository root (this crate lives in `<root>/xtask`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Run a command, failing with its description when it fails.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// The host-side cargo (rustup's), never the Debian one used for guests.
fn host_cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn step(name: &str) {
    eprintln!("\n==> xtask test: {name}");
}

/// The whole suite: formatting, lints, the plugin build, the guest crates'
/// unit tests (natively), then every host unit and integration test.
fn test(root: &Path, extra: &[String]) -> Result<()> {
    step("formatting");
    let has_fmt = host_cargo().args(["fmt", "--version"]).output().is_ok_and(|o| o.status.success());
    if has_fmt {
        run_checked(host_cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
        run_checked(host_cargo().current_dir(root.join("plugins")).args(["fmt", "--all", "--check"]))?;
    } else {
        eprintln!("xtask: rustfmt not installed; skipping the format check");
    }
    step("building plugins");
    plugins::build_all(root)?;
    step("guest crates' unit tests (native)");
    run_checked(
        host_cargo()
            .current_dir(root.join("plugins"))
            .args(["test", "--package", "wasmgate-pdk", "--package", "weighted", "--package", "round-robin"])
            .args(["--package", "latency", "--package", "ollama", "--package", "affinity", "--package", "cheapest"])
            .args(["--package", "wasmgate-pdk-filter", "--package", "block-list", "--package", "pii-redact"])
            .args(["--package", "prompt-cap"])
            .arg("--target-dir")
            .arg(root.join("target/guest-native")),
    )?;
    step("clippy");
    let clippy = ["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"];
    run_checked(host_cargo().current_dir(root).args(clippy))?;
    // The plugins' workspace too (natively, as its unit tests build).
    run_checked(
        host_cargo()
            .current_dir(root.join("plugins"))
            .env("CARGO_TARGET_DIR", root.join("target/guest-native"))
            .args(clippy),
    )?;
    step("python SDKs (openai, anthropic, google-genai) and playwright");
    let python = python::ensure_venv(root)?;
    step("plugins in other languages (componentize-py, componentize-js)");
    examples::build_all(root, &python)?;
    step("prometheus and chromium");
    // The observability test scrapes the gateway with a real Prometheus;
    // the console test drives a real headless Chromium.
    ensure_packages("Prometheus and Chromium", &[("prometheus", "prometheus"), ("chromium", "chromium")])?;
    step("postgresql (the multi-node tests)");
    ensure_postgres()?;
    step("host tests");
    let mut cmd = host_cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .env("WASMGATE_TEST_PYTHON", &python);
    test_report::run_tests(&mut cmd)?;
    step("the integration suite again, every gateway on PostgreSQL");
    let mut cmd = host_cargo();
    cmd.current_dir(root)
        .args(["test", "--package", "wasmgate", "--test", "integration", "--no-fail-fast"])
        .args(extra)
        .env("WASMGATE_TEST_PYTHON", &python)
        .env("WASMGATE_TEST_BACKEND", "postgres");
    let result = test_report::run_tests(&mut cmd);
    // The suite-wide server's cluster outlives its process: delete it.
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("wasmgate-pg-suite-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    result
}

fn run(root: &Path, extra: &[String]) -> Result<()> {
    plugins::build_all(root)?;
    let mut cmd = host_cargo();
    cmd.current_dir(root).args(["run", "--release", "--package", "wasmgate", "--bin", "wasmgate", "--"]).args(extra);
    run_checked(&mut cmd)
}

/// Install, from Debian's packages, every `(binary, package)` whose binary
/// is not on the PATH (`what` names them in the log).
pub(crate) fn ensure_packages(what: &str, wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| {
            !Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {what}: {}", missing.join(" "));
    let install = || {
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    install().or_else(|_| {
        run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
        install()
    })
}

/// Debian's PostgreSQL server (its binaries are not on the PATH), and,
/// when we run as root, the unprivileged user the tests start it as
/// (PostgreSQL refuses to run as root).
fn ensure_postgres() -> Result<()> {
    let installed = |dir: &Path| dir.join("initdb").exists() && dir.join("postgres").exists();
    let versioned = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).any(|e| installed(&e.path().join("bin"))))
        .unwrap_or(false);
    if !versioned && !installed(Path::new("/usr/local/bin")) && !installed(Path::new("/usr/bin")) {
        eprintln!("xtask: installing PostgreSQL (Debian package postgresql)");
        let install = || {
            run_checked(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends", "postgresql"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        install().or_else(|_| {
            run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
            install()
        })?;
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let user = "wasmgate-pg";
    if root && !Command::new("id").arg(user).output().is_ok_and(|o| o.status.success()) {
        run_checked(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            user,
        ]))?;
    }
    Ok(())
}

fn bench(root: &Path, extra: &[String]) -> Result<()> {
    // The peers the benchmark measures against: `wrk` (the load generator) and nginx.
    ensure_packages("the benchmark's peers", &[("wrk", "wrk"), ("nginx", "nginx-light")])?;
    if extra.iter().any(|a| a == "--nodes") {
        ensure_postgres()?;
    }
    plugins::build_all(root)?;
    let mut build = host_cargo();
    build.current_dir(root).args(["build", "--release", "--package", "wasmgate", "--package", "wasmgate-bench"]);
    run_checked(&mut build)?;
    let mut cmd = Command::new(root.join("target/release/wasmgate-bench"));
    cmd.current_dir(root)
        .arg("--gateway-bin")
        .arg(root.join("target/release/wasmgate"))
        .arg("--plugins")
        .arg(root.join("plugins"))
        .args(extra);
    run_checked(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::forwarded;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_leading_double_dash_is_not_forwarded() {
        assert_eq!(forwarded(&strings(&["--", "--config", "x.toml"])), strings(&["--config", "x.toml"]));
        assert_eq!(forwarded(&strings(&["--config", "x.toml"])), strings(&["--config", "x.toml"]));
        assert_eq!(forwarded(&strings(&["--", "--", "x"])), strings(&["--", "x"]));
        assert!(forwarded(&[]).is_empty());
    }
}
