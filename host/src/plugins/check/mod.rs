//! `wasmgate plugin check FILE.wasm`: validate a component exactly as the
//! hot-swap loader does (same [`load`] function), then run the conformance
//! suite for its kind and report every case as pass or fail.
//!
//! Adapters get the provider-independent cases for each endpoint their
//! `info()` claims (see `adapter_cases.rs`), plus, with `--fixtures DIR`,
//! the provider's recorded examples. Routing policies get index validity,
//! determinism under a fixed seed and time per call (`router_cases.rs`).
//! Filters get every declared hook on the shapes clients send
//! (`filter_cases.rs`).

mod adapter_cases;
mod filter_cases;
mod router_cases;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{ArtifactCache, Compiler, LoadedPlugin, PluginEngine, WIT_PACKAGE, load};
use crate::config::PluginConfig;

/// One conformance case and its outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Case {
    /// What was checked.
    pub name: String,
    /// Whether the plugin passed.
    pub passed: bool,
    /// Why it failed, or a measurement.
    pub detail: String,
}

/// Everything `plugin check` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// The file checked.
    pub file: String,
    /// `adapter`, `router` or `filter`, once loaded.
    pub kind: Option<&'static str>,
    /// WIT version the component was built against.
    pub wit_version: String,
    /// `info()`: name and version.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Cases in the order they ran.
    pub cases: Vec<Case>,
    /// Timings worth printing, e.g. `build-request p50 40 µs`.
    pub timings: Vec<String>,
}

impl Report {
    /// Whether every case passed (and the plugin loaded at all).
    pub fn passed(&self) -> bool {
        self.kind.is_some() && self.cases.iter().all(|c| c.passed)
    }

    pub(crate) fn case(&mut self, name: impl Into<String>, result: Result<(), String>) {
        let (passed, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(detail) => (false, detail),
        };
        self.cases.push(Case { name: name.into(), passed, detail });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "wasmgate plugin check: {}", self.file)?;
        if let Some(kind) = self.kind {
            let sha = self.sha256.get(..12).unwrap_or(&self.sha256);
            writeln!(
                f,
                "  component  {WIT_PACKAGE}@{} {kind} `{}` {} (sha256 {sha}…)",
                self.wit_version, self.name, self.version
            )?;
        }
        for case in &self.cases {
            let mark = if case.passed { "PASS" } else { "FAIL" };
            if case.detail.is_empty() {
                writeln!(f, "  {mark}  {}", case.name)?;
            } else {
                writeln!(f, "  {mark}  {}: {}", case.name, case.detail)?;
            }
        }
        for t in &self.timings {
            writeln!(f, "  time  {t}")?;
        }
        let failed = self.cases.iter().filter(|c| !c.passed).count();
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "result: {verdict} ({} checks, {failed} failed)", self.cases.len())
    }
}

/// Check the component in `file`; `fixtures` optionally holds the provider's
/// recorded examples (`chat.json`, `stream.sse`/`stream.ndjson`, `error.json`);
/// `cache_dir`, a gateway's compiled-plugin cache to take the compiled code
/// from (and add it to), as the hot-swap path does.
pub async fn check_file(file: &Path, fixtures: Option<&Path>, cache_dir: Option<&Path>) -> Report {
    let mut report = Report { file: file.display().to_string(), ..Report::default() };
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            report.case("read the file", Err(e.to_string()));
            return report;
        }
    };
    let config = PluginConfig { watch: false, cache: false, max_instances: 64, ..PluginConfig::default() };
    let engine = match PluginEngine::new(&config) {
        Ok(e) => e,
        Err(e) => {
            report.case("start the plugin engine", Err(format!("{e:#}")));
            return report;
        }
    };
    let cache = match cache_dir {
        Some(dir) => ArtifactCache::new(Some(dir.to_path_buf()), false, std::env::temp_dir(), Compiler::InProcess),
        None => ArtifactCache::none(),
    };
    check_bytes(&engine, &Arc::new(cache), bytes, fixtures, report).await
}

async fn check_bytes(
    engine: &Arc<PluginEngine>,
    cache: &Arc<ArtifactCache>,
    bytes: Vec<u8>,
    fixtures: Option<&Path>,
    mut report: Report,
) -> Report {
    let name = Path::new(&report.file).file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_string();
    let loaded = match load(engine, cache, &name, bytes).await {
        Ok(l) => l,
        Err(e) => {
            report.case("load (same validation as hot swap)", Err(e));
            return report;
        }
    };
    report.wit_version = loaded.wit_version;
    report.case("load: compiles, matches its world and version, info() answers", Ok(()));
    conformance(&loaded.plugin, fixtures, report).await
}

/// Run the conformance suite of `plugin`'s kind on a plugin already
/// loaded (the hot-swap path checks what it has just published).
pub async fn conformance(plugin: &LoadedPlugin, fixtures: Option<&Path>, mut report: Report) -> Report {
    match plugin {
        LoadedPlugin::Adapter(adapter) => {
            report.kind = Some("adapter");
            report.name = adapter.info.name.clone();
            report.version = adapter.info.version.clone();
            report.sha256 = adapter.sha256.clone();
            adapter_cases::run(adapter, fixtures, &mut report).await;
        }
        LoadedPlugin::Router(router) => {
            report.kind = Some("router");
            report.name = router.info.name.clone();
            report.version = router.info.version.clone();
            report.sha256 = router.sha256.clone();
            router_cases::run(router, &mut report).await;
        }
        LoadedPlugin::Filter(filter) => {
            report.kind = Some("filter");
            report.name = filter.info.name.clone();
            report.version = filter.info.version.clone();
            report.sha256 = filter.sha256.clone();
            filter_cases::run(filter, fixtures, &mut report).await;
        }
    }
    report
}

/// p50 and p99 of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples.get(((samples.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    (at(0.5), at(0.99))
}
