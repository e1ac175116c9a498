//! Test support: start the real `wasmgate` binary on 127.0.0.1:0 with real
//! compiled plugins copied into its own plugins directory.

#![allow(dead_code)]

pub mod accounts;
pub mod bare_upstream;
pub mod connect_proxy;
pub mod load;
pub mod mock;
pub mod postgres;
pub mod providers;
pub mod tls_mock;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use mock::MockUpstream;

/// Gateway token used by every test gateway.
pub const TOKEN: &str = "sk-test-0123456789abcdefghijklmnopqrstuv";
/// Admin token used by every test gateway.
pub const ADMIN: &str = "adm-test-0123456789abcdefghijklmnopqrstu";

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// A built plugin: shipped ones from `plugins/`, fixtures from
/// `target/wasm-fixtures/`.
pub fn artifact(file: &str) -> PathBuf {
    let candidates = [root().join("plugins").join(file), root().join("target/wasm-fixtures").join(file)];
    candidates.into_iter().find(|p| p.exists()).unwrap_or_else(|| {
        panic!("plugin artifact {file} not built: run `cargo xtask test` (or `cargo xtask plugins`) first")
    })
}

/// A TOML channel declaration.
pub fn channel(name: &str, adapter: &str, base_url: &str, models: &[&str], extra: &str) -> String {
    let models: Vec<String> = models.iter().map(|m| format!("{m:?}")).collect();
    format!(
        "[[channels]]\nname = {name:?}\nadapter = {adapter:?}\nbase_url = {base_url:?}\nkey = \"sk-upstream-secret-{name}\"\nmodels = [{}]\n{extra}\n",
        models.join(", ")
    )
}

/// A running gateway process, killed on drop.
pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Its plugins directory.
    pub plugins_dir: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Temporary directory holding everything.
    pub dir: tempfile::TempDir,
    config_path: PathBuf,
    launch: Launch,
}

/// How the process is started, besides its configuration.
#[derive(Clone, Default)]
struct Launch {
    /// Soft and hard limit on open files the process starts with.
    nofile: Option<u64>,
    /// Environment variables set for it.
    env: Vec<(String, String)>,
}

/// Proxy variables the gateway honours: removed from every gateway's
/// environment (tests set them explicitly), so that the suite tests the
/// same client whatever the machine's environment says.
const PROXY_VARS: [&str; 8] =
    ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];

/// Variables that add trusted authorities for upstream TLS: removed
/// unless a test sets them, like [`PROXY_VARS`].
const TLS_VARS: [&str; 1] = ["SSL_CERT_FILE"];

impl Gateway {
    /// Start with `plugins` (artifact file names, installed under the same
    /// name unless given as `src:dest`) and extra TOML (channels, options).
    pub fn start(plugins: &[&str], extra_toml: &str) -> Self {
        Self::start_with(plugins, "", extra_toml)
    }

    /// Like [`Gateway::start_with`], the process limited to `nofile` open
    /// files (soft and hard, as `ulimit -n` sets them).
    pub fn start_with_file_limit(plugins: &[&str], extra_toml: &str, nofile: u64) -> Self {
        let mut gw = Self::start_with(plugins, "", extra_toml);
        gw.launch.nofile = Some(nofile);
        gw.restart();
        gw
    }

    /// Like [`Gateway::start`], the process started with `env` added to
    /// its environment.
    pub fn start_with_env(plugins: &[&str], extra_toml: &str, env: &[(&str, &str)]) -> Self {
        let mut gw = Self::start_with(plugins, "", extra_toml);
        gw.launch.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        gw.restart();
        gw
    }

    /// Like [`Gateway::start`], with extra lines for the `[plugins]` table.
    pub fn start_with(plugins: &[&str], plugin_options: &str, extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins_dir).expect("plugins dir");
        for spec in plugins {
            let (src, dest) = spec.split_once(':').unwrap_or((spec, spec));
            std::fs::copy(artifact(src), plugins_dir.join(dest)).expect("copy plugin");
        }
        let data_dir = dir.path().join("data");
        let cache_dir = root().join("target/test-plugin-cache");
        // `extra_toml` may declare its own `tokens` line (with groups) and
        // other top-level keys; they must come before the first table.
        const TOP_LEVEL: [&str; 3] = ["tokens = ", "database_url = ", "secrets_key = "];
        let (top, rest): (Vec<&str>, Vec<&str>) =
            extra_toml.lines().partition(|l| TOP_LEVEL.iter().any(|k| l.starts_with(k)));
        let mut tokens = match top.iter().find(|l| l.starts_with("tokens = ")) {
            Some(line) => format!("{line}\n"),
            None => format!("tokens = [{TOKEN:?}]\n"),
        };
        for line in top.iter().filter(|l| !l.starts_with("tokens = ")) {
            tokens.push_str(line);
            tokens.push('\n');
        }
        // The suite's PostgreSQL pass (see `postgres::database_for_gateway`).
        // `# store: sled` in `extra_toml` keeps a gateway on sled in that pass.
        if !top.iter().any(|l| l.starts_with("database_url = "))
            && !extra_toml.contains("# store: sled")
            && let Some(url) = postgres::database_for_gateway()
        {
            tokens.push_str(&format!("database_url = {url:?}\n"));
            if !top.iter().any(|l| l.starts_with("secrets_key = ")) {
                tokens.push_str("secrets_key = \"suite-on-postgresql-0123456789\"\n");
            }
        }
        let mut extra_toml = rest.join("\n");
        // Tests that are not about prices serve every model for free.
        if !extra_toml.contains("[pricing]") {
            extra_toml.push_str("\n[pricing]\nunpriced = \"free\"\n");
        }
        // Gateways share one compiled-plugin cache (never pruned, being
        // configured) unless a test asks for its own with `# own cache`.
        let cache_line =
            if plugin_options.contains("# own cache") { String::new() } else { format!("cache_dir = {cache_dir:?}\n") };
        let config = format!(
            "{tokens}admin_token = {ADMIN:?}\ndata_dir = {:?}\nplugins_dir = {:?}\n\
             [plugins]\n{cache_line}debounce_ms = 100\n{plugin_options}\n\n{extra_toml}\n",
            data_dir, plugins_dir
        );
        let config_path = dir.path().join("wasmgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let launch = Launch::default();
        let (child, base) = Self::spawn(dir.path(), &config_path, &launch);
        Self { child, base, plugins_dir, data_dir, dir, config_path, launch }
    }

    fn command(dir: &Path, config_path: &Path, launch: &Launch) -> Command {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gateway.log")).expect("log file");
        let mut cmd = match launch.nofile {
            None => Command::new(env!("CARGO_BIN_EXE_wasmgate")),
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_wasmgate")]);
                c
            }
        };
        cmd.arg("--config")
            .arg(config_path)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info,wasmgate=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for var in PROXY_VARS.iter().chain(&TLS_VARS) {
            cmd.env_remove(var);
        }
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn spawn(dir: &Path, config_path: &Path, launch: &Launch) -> (Child, String) {
        let mut child = Self::command(dir, config_path, launch).spawn().expect("spawn wasmgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("wasmgate listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        // A failsafe only: the debug build compiling a 12–18 MB Python or
        // JavaScript component on a fresh, busy CI machine has taken minutes.
        let base = rx.recv_timeout(Duration::from_secs(900)).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
            panic!("gateway did not start; its log:\n{log}")
        });
        (child, base)
    }

    /// Stop (SIGKILL) and start again on the same directories.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, base) = Self::spawn(self.dir.path(), &self.config_path, &self.launch);
        self.child = child;
        self.base = base;
    }

    /// Stop with SIGTERM (a clean stop: the gateway drains and flushes),
    /// then start again on the same directories.
    pub fn restart_gracefully(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, base) = Self::spawn(self.dir.path(), &self.config_path, &self.launch);
        self.child = child;
        self.base = base;
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process, in bytes (Linux).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Stop (SIGKILL) without starting again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the binary again on the same directories; `Err` with its log
    /// when it refuses to start.
    pub fn try_start_again(&mut self) -> Result<(), String> {
        self.kill();
        let mut child =
            Self::command(self.dir.path(), &self.config_path, &self.launch).spawn().expect("spawn wasmgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("wasmgate listening on ") {
                    let _ = tx.send(Some(addr.to_string()));
                    return;
                }
            }
            let _ = tx.send(None);
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Some(base)) => {
                self.child = child;
                self.base = base;
                Ok(())
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(self.log())
            }
        }
    }

    /// Replace (or add) a plugin file atomically, as an operator would with
    /// `cp new.wasm dir/.x.tmp && mv`.
    pub fn install_plugin(&self, artifact_file: &str, as_name: &str) {
        let tmp = self.plugins_dir.join(format!(".{as_name}.tmp"));
        std::fs::copy(artifact(artifact_file), &tmp).expect("copy");
        std::fs::rename(&tmp, self.plugins_dir.join(as_name)).expect("rename");
    }

    /// Write raw bytes as a plugin file.
    pub fn write_plugin(&self, as_name: &str, bytes: &[u8]) {
        let tmp = self.plugins_dir.join(format!(".{as_name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, self.plugins_dir.join(as_name)).expect("rename");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

/// POST JSON with the gateway token; returns (status, body).
pub async fn post(gw: &Gateway, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let resp = client().post(gw.url(path)).bearer_auth(TOKEN).json(body).send().await.expect("send");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// Poll `f` until it returns true or `limit` passes; returns the time taken.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Assert `body` is an OpenAI error object and return its `type`.
pub fn assert_openai_error(body: &serde_json::Value) -> String {
    let err = body.get("error").unwrap_or_else(|| panic!("not an OpenAI error: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(err.get(key).is_some(), "error lacks `{key}`: {body}");
    }
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "empty message: {body}");
    err["type"].as_str().unwrap_or_default().to_string()
}

/// Send `n` copies of `body` to `path`, `concurrency` at a time, over one
/// pooled client; returns every (status, body).
pub async fn load(
    gw: &Gateway,
    path: &str,
    body: &serde_json::Value,
    n: usize,
    concurrency: usize,
) -> Vec<(u16, serde_json::Value)> {
    use futures_util::StreamExt;
    let http = client();
    let url = gw.url(path);
    futures_util::stream::iter(0..n)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let resp = http.post(url).bearer_auth(TOKEN).json(body).send().await.expect("send");
                let status = resp.status().as_u16();
                let text = resp.text().await.expect("body");
                (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// An admin request; returns (status, body).
pub async fn admin(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = client().request(method, gw.url(path)).bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// The text a chat completion stream (its SSE body) delivered: the
/// `delta.content` of its chunks, joined.
pub fn stream_text(sse: &str) -> String {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

/// A chat completion request body.
pub fn chat(model: &str, text: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// POST JSON with the gateway token; the raw response (status, headers, stream).
pub async fn send(gw: &Gateway, path: &str, body: &serde_json::Value) -> reqwest::Response {
    client().post(gw.url(path)).bearer_auth(TOKEN).json(body).send().await.expect("send")
}

/// The Python with the SDKs and Playwright (`cargo xtask test` installs
/// them and sets WASMGATE_TEST_PYTHON).
pub fn python() -> String {
    match std::env::var("WASMGATE_TEST_PYTHON") {
        Ok(p) => p,
        Err(_) => {
            let venv = root().join("target/py-venv/bin/python");
            assert!(venv.exists(), "no Python with the SDKs: run the suite with `cargo xtask test`");
            venv.to_string_lossy().into_owned()
        }
    }
}

/// Run `tests/python/SCRIPT` with `env`; returns its output, which must
/// end in success.
pub async fn run_python(script: &str, env: Vec<(&'static str, String)>) -> String {
    let script = root().join("tests/python").join(script);
    let output =
        tokio::task::spawn_blocking(move || Command::new(python()).arg(script).envs(env).output().expect("run python"))
            .await
            .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "Python checks failed:\n{stdout}");
    stdout
}
