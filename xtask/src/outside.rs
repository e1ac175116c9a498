//! An adapter written outside this repository, as a third-party author
//! would write it: a standalone crate in the system's temp directory that
//! depends on the PDK by path (no workspace of ours above it), with the
//! size-optimised release profile its README gives, built the documented
//! way — `cargo build --release --target wasm32-wasip2` — when that target
//! installs, else with the project's own fallback (core module +
//! `wit-component`). The component lands in
//! `target/wasm-fixtures/outside-author.wasm` for the integration test that
//! checks and serves it.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::toolchain::{self, CORE_TARGET};

const WASIP2_TARGET: &str = "wasm32-wasip2";

const LIB_RS: &str = r#"//! An OpenAI-compatible adapter that stamps every upstream request with a
//! header, written against the published PDK only.

use wasmgate_pdk::openai_compat::{self, OpenAiCompat, OpenAiSseDecoder};
use wasmgate_pdk::serde_json::{self, json, Value};
use wasmgate_pdk::{
    header, Adapter, AdapterInfo, Channel, HttpRequest, HttpResponse, ParsedResponse, Probe, RequestContext,
    UpstreamError,
};

struct Stamped;

impl Adapter for Stamped {
    type Decoder = OpenAiSseDecoder;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "outside-author".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: json!({"by": "a third party"}).to_string(),
            ..OpenAiCompat::info()
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        let mut request = openai_compat::build_request(ctx, channel, body)?;
        request.headers.push(header("x-built-outside", "yes"));
        Ok(request)
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        // The re-exported serde_json is the kit's own.
        let _: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        openai_compat::parse_response(ctx, response)
    }

    fn classify_error(ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        openai_compat::classify_error(ctx, response)
    }

    fn health_probe(channel: &Channel) -> Probe {
        openai_compat::health_probe(channel)
    }
}

wasmgate_pdk::export_adapter!(Stamped);
"#;

fn cargo_toml(pdk: &Path) -> String {
    format!(
        "[package]\nname = \"outside-author\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\nwasmgate-pdk = {{ path = {:?} }}\n\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\npanic = \"abort\"\nstrip = true\n\n\
         # Its own workspace: nothing of the wasmgate repository is above it.\n[workspace]\n",
        pdk.display()
    )
}

/// Scaffold, build and install the outside author's adapter.
pub fn build(root: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join("wasmgate-outside-author");
    fs::create_dir_all(dir.join("src"))?;
    write_if_changed(&dir.join("Cargo.toml"), &cargo_toml(&root.join("plugins/pdk")))?;
    write_if_changed(&dir.join("src/lib.rs"), LIB_RS)?;
    build_crate(root, &dir, &root.join("target/wasm-fixtures/outside-author.wasm"))
}

/// Build the standalone plugin crate in `dir` into the component `dest`:
/// with `cargo build --release --target wasm32-wasip2` where that target
/// is (or can be) installed, else as a core module made a component with
/// `wit-component`. `cargo xtask component DIR OUT` runs this.
pub fn build_crate(root: &Path, dir: &Path, dest: &Path) -> Result<()> {
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).context("the crate's Cargo.toml")?;
    let package = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("name = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("no package name")?;
    let artifact = format!("{}.wasm", package.replace('-', "_"));
    let target_dir = root.join("target/outside-author");
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

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    Ok(fs::write(path, text)?)
}
