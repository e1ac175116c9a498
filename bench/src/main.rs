//! `wasmgate-bench`: measures what the gateway adds on loopback.
//!
//! 1. plugin call overhead, in process: `build-request` + `parse-response`
//!    of the real `openai.wasm`, one stream chunk through its decoder, one
//!    `select` of each policy, and every shipped adapter on its provider's
//!    recorded examples;
//! 2. side by side (`peers.rs`): the mock directly, nginx, the bare
//!    axum + reqwest proxy and wasmgate on its full path, driven by the same
//!    `wrk` in interleaved rounds: c=1 latency, streamed c=1 latency,
//!    throughput at c=32, memory, and the ratios of issue 12;
//! 3. memory: idle with every shipped plugin, and after a minute at full load;
//! 4. with `--streams N`: N concurrent slow streams (16 chunks, 500 ms
//!    apart): errors, gateway memory per open stream, and the c=1 latency of
//!    other requests meanwhile.
//! 5. with `--log-rows N` (alone): the console's dashboard and logs queries
//!    on a store of N usage rows (`console_queries.rs`);
//! 6. with `--swaps N` (alone): N hot swaps of `openai.wasm` under load,
//!    timed from the file landing to the new version serving (`hot_swap.rs`);
//! 7. with `--nodes` (alone): one node on sled against one on PostgreSQL,
//!    and three nodes on one PostgreSQL against one (`nodes.rs`).
//!
//! Every process is its own (mock, nginx, proxy, gateway), traffic goes to
//! 127.0.0.1 only, and every run is bounded in time.

mod adapter_calls;
mod bare_proxy;
mod console_queries;
mod cpu;
mod hot_swap;
mod journal_appends;
#[path = "../../tests/support/mock.rs"]
#[allow(missing_docs)]
mod mock;
mod nodes;
mod peers;
mod plugin_calls;
#[path = "../../tests/support/postgres.rs"]
#[allow(dead_code, missing_docs)]
mod postgres;
mod stats;
mod streams;
mod translation;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

/// Benchmark options.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// The release `wasmgate` binary.
    #[arg(long, required_unless_present_any = ["bare_proxy", "serve_mock"])]
    gateway_bin: Option<PathBuf>,
    /// Directory holding the shipped plugins.
    #[arg(long, required_unless_present_any = ["bare_proxy", "serve_mock"])]
    plugins: Option<PathBuf>,
    /// Internal: run as the baseline pass-through proxy to this upstream.
    #[arg(long, hide = true)]
    bare_proxy: Option<String>,
    /// Internal: run as the mock upstream.
    #[arg(long, hide = true)]
    serve_mock: bool,
    /// Seconds of each `wrk` run in the side-by-side comparison.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Interleaved rounds of the side-by-side comparison (medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds at full load for the memory figure (0 skips it).
    #[arg(long, default_value_t = 60)]
    memory_secs: u64,
    /// Concurrent slow streams to hold open (0 skips it).
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// Plugin call iterations (0 skips the in-process tables).
    #[arg(long, default_value_t = 20000)]
    plugin_iterations: usize,
    /// Extra lines for the gateway's `[plugins]` table (A/B runs), e.g.
    /// `instance_reuse = 1`.
    #[arg(long, default_value = "")]
    plugin_options: String,
    /// Only time the console's queries on a store of this many usage rows.
    #[arg(long, default_value_t = 0)]
    log_rows: usize,
    /// Only time this many hot swaps of `openai.wasm` under load.
    #[arg(long, default_value_t = 0)]
    swaps: usize,
    /// Only compare one node on sled with one on PostgreSQL, and three
    /// nodes on one PostgreSQL with one.
    #[arg(long)]
    nodes: bool,
}

const TOKEN: &str = "sk-bench-0123456789abcdefghijklmnopqrstuv";
/// The benchmark request as a Responses API call (nothing stored).
const RESPONSES: (&str, &str) = (
    r#"{"model":"gpt-4o-mini","store":false,"input":"benchmark this request"}"#,
    r#"{"model":"gpt-4o-mini","store":false,"stream":true,"input":"benchmark this request"}"#,
);
/// The benchmark request as an Anthropic Messages call.
const MESSAGES: (&str, &str) = (
    r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"benchmark this request"}]}"#,
    r#"{"model":"gpt-4o-mini","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"benchmark this request"}]}"#,
);
const SHIPPED: &[&str] = &[
    "openai.wasm",
    "azure.wasm",
    "anthropic.wasm",
    "gemini.wasm",
    "baidu.wasm",
    "qwen.wasm",
    "ollama.wasm",
    "weighted.wasm",
    "round-robin.wasm",
    "latency.wasm",
    "affinity.wasm",
    "cheapest.wasm",
];

/// Create a user with ample quota and a token for them: requests then take
/// the full path (admission, reservation, settlement, a usage row).
pub(crate) async fn billed_key(base: &str) -> Result<String> {
    billed_key_with(base, json!({"streams": 100_000, "concurrency": 100_000})).await
}

/// [`billed_key`] with the token's own `limits` (`{}`: none of its own).
pub(crate) async fn billed_key_with(base: &str, limits: serde_json::Value) -> Result<String> {
    let mut fields = json!({"name": "bench"});
    for (k, v) in limits.as_object().cloned().unwrap_or_default() {
        fields[k] = v;
    }
    let http = reqwest::Client::new();
    let user: serde_json::Value = http
        .post(format!("{base}/api/users"))
        .bearer_auth("adm-bench")
        .json(&json!({"name": "bench", "quota": 1_000_000_000_000i64}))
        .send()
        .await?
        .json()
        .await?;
    let token: serde_json::Value = http
        .post(format!("{base}/api/tokens"))
        .bearer_auth("adm-bench")
        .json(&{
            fields["user_id"] = user["id"].clone();
            fields
        })
        .send()
        .await?
        .json()
        .await?;
    token["key"].as_str().map(str::to_string).context("no key in the token answer")
}

/// Raise this process's open-file limit as far as allowed (the harness
/// holds many connections).
fn raise_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = 1 << 17;
    let limit = getrlimit(Resource::Nofile);
    let target = Rlimit { current: Some(want), maximum: Some(limit.maximum.unwrap_or(want).max(want)) };
    if setrlimit(Resource::Nofile, target).is_err()
        && let Some(hard) = limit.maximum
    {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) });
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    raise_file_limit();
    if let Some(upstream) = args.bare_proxy {
        return bare_proxy::serve(upstream);
    }
    if args.serve_mock {
        return serve_mock();
    }
    let plugins = args.plugins.clone().context("--plugins")?;
    println!("# wasmgate loopback benchmark\n");
    println!("machine: {} cores; {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), cpu_model());
    if args.log_rows > 0 {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(console_queries::run(&args, args.log_rows));
    }
    if args.swaps > 0 {
        let (_mock, mock_url) = start_mock()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(hot_swap::run(&args, &mock_url, args.swaps));
    }
    if args.nodes {
        let (_mock, mock_url) = start_mock()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(nodes::run(&args, &mock_url));
    }
    if args.plugin_iterations > 0 {
        let plugin_rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        plugin_rt.block_on(plugin_calls::run(&plugins, args.plugin_iterations))?;
        plugin_rt.block_on(adapter_calls::run(&plugins, args.plugin_iterations))?;
        journal_appends::run(args.plugin_iterations * 10)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(http(&args))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A child process (gateway, mock or bare proxy), killed on drop.
pub struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a gateway in `dir` with `plugins` and `channels` (TOML) in front
/// of the mock; returns it and its base URL.
pub(crate) fn start_gateway(args: &Args, dir: &Path, plugins: &[&str], channels: &str) -> Result<(ChildGuard, String)> {
    start_gateway_with(args, dir, plugins, channels, "")
}

/// [`start_gateway`] with `server` TOML lines in its `[server]` table.
fn start_gateway_with(
    args: &Args,
    dir: &Path,
    plugins: &[&str],
    channels: &str,
    server: &str,
) -> Result<(ChildGuard, String)> {
    start_gateway_on(args, dir, plugins, channels, server, "")
}

/// [`start_gateway_with`] with `top` TOML lines at the top level (e.g.
/// `database_url`).
pub(crate) fn start_gateway_on(
    args: &Args,
    dir: &Path,
    plugins: &[&str],
    channels: &str,
    server: &str,
    top: &str,
) -> Result<(ChildGuard, String)> {
    let plugins_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugins_dir)?;
    for f in plugins {
        let src = args.plugins.as_ref().context("--plugins")?.join(f);
        std::fs::copy(src, plugins_dir.join(f)).with_context(|| format!("copy {f}"))?;
    }
    let config = format!(
        "{top}\ntokens = [{TOKEN:?}]\nadmin_token = \"adm-bench\"\ndata_dir = {:?}\nplugins_dir = {:?}\n\
         [plugins]\n{}\n[server]\nmax_connections = 100000\n{server}\n\
         [limits]\ntoken_concurrency = 0\ntoken_streams = 0\nuser_concurrency = 0\n{channels}\n\
         [pricing.models.gpt-4o-mini]\nratio = 0.075\ncompletion_ratio = 4\ncached_ratio = 0.5\n\
         [pricing.models.drip-mini]\nratio = 0.075\ncompletion_ratio = 4\ncached_ratio = 0.5\n",
        dir.join("data"),
        plugins_dir,
        args.plugin_options
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, config)?;
    let bin = args.gateway_bin.as_ref().context("--gateway-bin")?;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 131072 2>/dev/null; exec \"$0\" \"$@\""])
        .arg(bin)
        .arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let (child, addr) = spawn_listening(cmd, "wasmgate listening on ")?;
    Ok((ChildGuard(child), addr))
}

/// Two channels of the `openai` adapter on the mock: every request goes
/// through the routing policy.
pub(crate) fn two_channels(upstream: &str) -> String {
    two_channels_with(upstream, "")
}

/// [`two_channels`] with `extra` TOML lines in each channel.
fn two_channels_with(upstream: &str, extra: &str) -> String {
    (1..=2)
        .map(|i| {
            format!(
                "[[channels]]\nname = \"mock-{i}\"\nadapter = \"openai\"\nbase_url = \"{upstream}\"\nkey = \"sk-up-{i}\"\n\
                 models = [\"gpt-4o-mini\", \"drip-mini\"]\n{extra}"
            )
        })
        .collect()
}

/// Streams a gateway can hold from HTTP/1.1 clients under this process's
/// file limit (two sockets each, plus headroom).
fn http1_stream_limit() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(u64::MAX);
    usize::try_from(limit.saturating_sub(1024) / 2).unwrap_or(usize::MAX)
}

/// Start `cmd` and wait for the stdout line `prefix ADDR`; the child is
/// killed if it never comes.
pub fn spawn_listening(mut cmd: Command, prefix: &str) -> Result<(std::process::Child, String)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("spawn")?;
    let stdout = child.stdout.take().context("stdout")?;
    use std::io::BufRead;
    for line in std::io::BufReader::new(stdout).lines() {
        if let Some(addr) = line?.strip_prefix(prefix) {
            return Ok((child, addr.to_string()));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!("{cmd:?} exited before printing {prefix:?}")
}

/// Serve the mock upstream in this process until killed (its own process,
/// as a real upstream would be: never on the load generator's thread).
fn serve_mock() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mock = mock::MockUpstream::start("bench").await;
        println!("mock listening on {}", mock.base_url());
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// The mock upstream in a process of its own (this binary, `--serve-mock`);
/// returns it and its base URL.
fn start_mock() -> Result<(ChildGuard, String)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--serve-mock");
    let (child, url) = spawn_listening(cmd, "mock listening on ")?;
    Ok((ChildGuard(child), url))
}

async fn http(args: &Args) -> Result<()> {
    let (_mock, mock_url) = start_mock()?;
    let scratch = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let (gateway, base) = start_gateway(args, dir.path(), &["openai.wasm", "weighted.wasm"], &two_channels(&mock_url))?;
    let key = billed_key(&base).await?;
    let off_dir = tempfile::tempdir()?;
    let off_config = format!("{}[metrics]\nenabled = false\n", two_channels(&mock_url));
    let (gateway_off, base_off) = start_gateway(args, off_dir.path(), &["openai.wasm", "weighted.wasm"], &off_config)?;
    let key_off = billed_key(&base_off).await?;
    let (_bare, bare_base) = bare_proxy::start(&mock_url)?;
    let mock_addr = mock_url.trim_start_matches("http://").trim_end_matches("/v1");
    let (nginx, nginx_base) = peers::start_nginx(mock_addr, scratch.path())?;
    let targets = [
        peers::Target {
            name: "mock directly",
            url: format!("{mock_url}/chat/completions"),
            pid: None,
            bodies: None,
            key: None,
        },
        peers::Target {
            name: "nginx proxy_pass (keepalive)",
            url: format!("{nginx_base}/v1/chat/completions"),
            pid: Some(nginx.id()),
            bodies: None,
            key: None,
        },
        peers::Target {
            name: "bare axum + reqwest proxy",
            url: format!("{bare_base}/v1/chat/completions"),
            pid: None,
            bodies: None,
            key: None,
        },
        peers::Target {
            name: "wasmgate (billed, 2 channels + policy)",
            url: format!("{base}/v1/chat/completions"),
            pid: Some(gateway.0.id()),
            bodies: None,
            key: None,
        },
        peers::Target {
            name: "wasmgate, metrics off",
            url: format!("{base_off}/v1/chat/completions"),
            pid: Some(gateway_off.0.id()),
            bodies: None,
            key: Some(key_off),
        },
        peers::Target {
            name: "wasmgate /v1/responses (translated, store off)",
            url: format!("{base}/v1/responses"),
            pid: None,
            bodies: Some(RESPONSES),
            key: None,
        },
        peers::Target {
            name: "wasmgate /v1/messages (translated)",
            url: format!("{base}/v1/messages"),
            pid: None,
            bodies: Some(MESSAGES),
            key: None,
        },
    ];
    peers::compare(&targets, &key, args.secs, args.rounds, scratch.path())?;
    drop((gateway_off, nginx));
    let routes = [
        translation::Route {
            name: "`/v1/responses` (translated, store off)",
            url: format!("{base}/v1/responses"),
            bodies: RESPONSES,
        },
        translation::Route {
            name: "`/v1/messages` (translated)",
            url: format!("{base}/v1/messages"),
            bodies: MESSAGES,
        },
    ];
    let chat_url = format!("{base}/v1/chat/completions");
    translation::compare(&chat_url, &routes, &key, args.secs, args.rounds.max(5), scratch.path())?;
    drop(gateway);

    if args.memory_secs > 0 {
        let dir = tempfile::tempdir()?;
        let (gateway, base) = start_gateway(args, dir.path(), SHIPPED, &two_channels(&mock_url))?;
        let key = billed_key(&base).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = peers::rss_tree(gateway.0.id());
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"benchmark this request"}]}"#;
        let run = peers::wrk(&format!("{base}/v1/chat/completions"), body, &key, 32, args.memory_secs, scratch.path())?;
        let loaded = peers::rss_tree(gateway.0.id());
        // The same data directory, its usage log now full: what a node
        // holds at rest for what it has logged.
        drop(gateway);
        let (gateway, _) = start_gateway(args, dir.path(), SHIPPED, &two_channels(&mock_url))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let restarted = peers::rss_tree(gateway.0.id());
        drop(gateway);
        println!("\n## memory, every shipped plugin loaded\n");
        println!(
            "| idle RSS | RSS after {} s at c=32 ({:.0} req/s) | ratio | idle RSS after a restart on that log (~{:.1} M rows) |\n\
             |---|---|---|---|",
            args.memory_secs,
            run.rps,
            run.rps * args.memory_secs as f64 / 1e6
        );
        println!(
            "| {} MB | {} MB | {:.2}× | {} MB |",
            idle >> 20,
            loaded >> 20,
            loaded as f64 / idle.max(1) as f64,
            restarted >> 20
        );
    }

    if args.streams > 0 {
        // Over HTTP/1.1 every open stream holds two sockets (client and
        // upstream); over HTTP/2 the upstream side is a few multiplexed
        // connections, as with any HTTPS provider (ALPN), and so is the
        // client side when the gateway serves h2c (`server.http2`) to a
        // client or TLS terminator that multiplexes.
        const H2: &str = "settings = { http2 = true }\n";
        for (sides, extra, client) in [
            (streams::Sides { client: "HTTP/2 (h2c)", upstream: "HTTP/2 (h2c)" }, H2, streams::Client::Http2),
            (streams::Sides { client: "HTTP/1.1", upstream: "HTTP/2 (h2c)" }, H2, streams::Client::Http1),
            (streams::Sides { client: "HTTP/1.1", upstream: "HTTP/1.1" }, "", streams::Client::Http1),
        ] {
            let dir = tempfile::tempdir()?;
            let channels = two_channels_with(&mock_url, extra);
            let server = if client == streams::Client::Http2 { "http2 = true\nhttp2_max_streams = 256" } else { "" };
            let (gateway, base) =
                start_gateway_with(args, dir.path(), &["openai.wasm", "weighted.wasm"], &channels, server)?;
            let key = billed_key(&base).await?;
            // A client connection per stream: the file limit caps them.
            let n =
                if client == streams::Client::Http1 { args.streams.min(http1_stream_limit()) } else { args.streams };
            streams::run(&base, &key, n, gateway.0.id(), &mock_url, &sides, client).await?;
        }
    }
    Ok(())
}
