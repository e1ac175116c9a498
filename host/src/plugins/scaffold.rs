//! `wasmgate plugin new adapter|router|filter NAME`: a standalone plugin crate to
//! start from — a `Cargo.toml` with the size-optimised release profile and
//! its own `[workspace]`, a working `src/lib.rs` (for an adapter, the
//! repository's template crate renamed), and a README with the build
//! commands. It depends on the kits by path (`--kits DIR`, the
//! directory holding `pdk/`, `pdk-router/` and `pdk-filter/`) or, by
//! default, from git.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// What to scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A provider adapter (`wasmgate-pdk`).
    Adapter,
    /// A routing policy (`wasmgate-pdk-router`).
    Router,
    /// A traffic filter (`wasmgate-pdk-filter`).
    Filter,
}

const GIT: &str = "https://github.com/wasmgate/wasmgate";

/// The adapter template: the repository's template crate (built and
/// checked by the suite as the `acme` fixture), renamed.
const ADAPTER_LIB: &str = include_str!("../../../plugins/template/src/lib.rs");

const ROUTER_LIB: &str = r#"//! `{name}`: a routing policy. Highest priority tier first; inside a tier
//! the channel with the fewest requests in flight, then the lowest latency.

use wasmgate_pdk_router::{Candidate, RequestMeta, Router, RouterInfo};

struct Plugin;

impl Router for Plugin {
    fn info() -> RouterInfo {
        RouterInfo {
            name: "{name}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "fewest in flight, then lowest latency, inside priority tiers".into(),
        }
    }

    fn select(_meta: &RequestMeta, candidates: &[Candidate]) -> Vec<u32> {
        let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&candidates[a as usize], &candidates[b as usize]);
            b.priority.cmp(&a.priority).then(a.in_flight.cmp(&b.in_flight)).then(a.latency_ms.total_cmp(&b.latency_ms))
        });
        order
    }
}

wasmgate_pdk_router::export_router!(Plugin);
"#;

const FILTER_LIB: &str = r#"//! `{name}`: a traffic filter. It refuses requests whose prompt is empty
//! and tags answers; settings of the rule: `{"tag": "…"}`.

use wasmgate_pdk_filter::serde_json::{self, Value};
use wasmgate_pdk_filter::{
    Filter, FilterContext, FilterInfo, Hook, RequestVerdict, ResponseVerdict, prompt_text, refuse, settings,
};

struct Plugin;

impl Filter for Plugin {
    fn info() -> FilterInfo {
        FilterInfo {
            name: "{name}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "refuses empty prompts; tags answers".into(),
            hooks: vec![Hook::Request, Hook::Response],
        }
    }

    fn on_request(_ctx: &FilterContext, body: Vec<u8>) -> RequestVerdict {
        let Ok(value) = serde_json::from_slice::<Value>(&body) else { return RequestVerdict::Pass };
        if prompt_text(&value).trim().is_empty() {
            return RequestVerdict::Refuse(refuse(400, "empty_prompt", "The prompt is empty."));
        }
        RequestVerdict::Pass
    }

    fn on_response(ctx: &FilterContext, body: Vec<u8>) -> ResponseVerdict {
        let Some(tag) = settings(ctx).get("tag").and_then(Value::as_str).map(str::to_owned) else {
            return ResponseVerdict::Pass;
        };
        let Ok(mut answer) = serde_json::from_slice::<Value>(&body) else { return ResponseVerdict::Pass };
        answer["x_filter_tag"] = Value::String(tag);
        ResponseVerdict::Rewrite(serde_json::to_vec(&answer).unwrap_or(body))
    }
}

wasmgate_pdk_filter::export_filter!(Plugin);
"#;

fn cargo_toml(name: &str, kit: &str, dependency: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\n{kit} = {dependency}\n\n\
         # Size-optimised: plugins are I/O-bound, and a third of the size loads faster.\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\npanic = \"abort\"\nstrip = true\n\n\
         # A workspace of its own, wherever it is copied.\n[workspace]\n"
    )
}

fn readme(name: &str, kind: Kind) -> String {
    let what = match kind {
        Kind::Adapter => "provider adapter",
        Kind::Router => "routing policy",
        Kind::Filter => "traffic filter",
    };
    format!(
        "# {name}\n\nA wasmgate {what}.\n\n```sh\nrustup target add wasm32-wasip2\n\
         cargo build --release --target wasm32-wasip2\n\
         wasmgate plugin check target/wasm32-wasip2/release/{file}.wasm\n\
         cp target/wasm32-wasip2/release/{file}.wasm /path/to/plugins/{name}.wasm   # hot-swapped in\n```\n\n\
         `cargo component build --release` works too. The contract: `wit/` of the kit you depend on.\n",
        file = name.replace('-', "_")
    )
}

/// A valid plugin name: the file stem channels and policies refer to.
fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0].is_ascii_lowercase()
}

/// Write the crate `name` of `kind` into `dir/name` (or `dir` itself when
/// it is empty or missing); `kits`: the directory holding `pdk/`,
/// `pdk-router/` and `pdk-filter/`. Returns the crate's directory.
pub fn scaffold(kind: Kind, name: &str, dir: &Path, kits: Option<&Path>) -> Result<PathBuf> {
    if !valid(name) {
        bail!("`{name}` is not a plugin name: lower-case letters, digits and `-`, starting with a letter");
    }
    let root = dir.join(name);
    if root.join("Cargo.toml").exists() {
        bail!("{} already holds a crate", root.display());
    }
    let (kit, subdir, lib) = match kind {
        Kind::Adapter => ("wasmgate-pdk", "pdk", ADAPTER_LIB.replace("Acme", "Plugin").replace("acme", name)),
        Kind::Router => ("wasmgate-pdk-router", "pdk-router", ROUTER_LIB.replace("{name}", name)),
        Kind::Filter => ("wasmgate-pdk-filter", "pdk-filter", FILTER_LIB.replace("{name}", name)),
    };
    let dependency = match kits {
        Some(kits) => {
            let path = kits.join(subdir);
            let path = path.canonicalize().with_context(|| format!("no kit at {}", path.display()))?;
            format!("{{ path = {:?} }}", path.display().to_string())
        }
        None => format!("{{ git = \"{GIT}\", package = \"{kit}\" }}"),
    };
    std::fs::create_dir_all(root.join("src"))?;
    std::fs::write(root.join("Cargo.toml"), cargo_toml(name, kit, &dependency))?;
    std::fs::write(root.join("src/lib.rs"), lib)?;
    std::fs::write(root.join("README.md"), readme(name, kind))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(scaffold(Kind::Adapter, "Bad Name", dir.path(), None).is_err());
        let made = scaffold(Kind::Router, "my-policy", dir.path(), None).expect("scaffold");
        let manifest = std::fs::read_to_string(made.join("Cargo.toml")).expect("manifest");
        assert!(manifest.contains("wasmgate-pdk-router = { git = ") && manifest.contains("opt-level = \"s\""));
        assert!(std::fs::read_to_string(made.join("src/lib.rs")).expect("lib").contains("name: \"my-policy\""));
        assert!(scaffold(Kind::Router, "my-policy", dir.path(), None).is_err(), "never overwrites");
        let adapter = scaffold(Kind::Adapter, "my-provider", dir.path(), None).expect("scaffold");
        let lib = std::fs::read_to_string(adapter.join("src/lib.rs")).expect("lib");
        assert!(lib.contains("name: \"my-provider\"") && lib.contains("x-my-provider-tenant") && !lib.contains("acme"));
        let filter = scaffold(Kind::Filter, "my-filter", dir.path(), None).expect("scaffold");
        let lib = std::fs::read_to_string(filter.join("src/lib.rs")).expect("lib");
        assert!(lib.contains("name: \"my-filter\"") && lib.contains("export_filter!"));
    }
}
