//! `wasmgate-bench`: measures what the gateway adds on loopback.
//!
//! 1. plugin call overhead, in process: instantiate + `build-request` +
//!    `parse-response` of the real `openai.wasm`, one stream chunk through
//!    the decoder, and one `select` of `weighted.wasm`;
//! 2. added latency at concurrency 1: each iteration sends the request to the
//!    mock upstream directly, through the gateway and through a bare
//!    pass-through proxy (the baseline), in rotating order; the mock, the
//!    gateway and the proxy each run in their own process;
//! 3. added time to first token for streams, the same way;
//! 4. throughput at a fixed concurrency for a fixed time.
//!
//! Traffic goes to 127.0.0.1 only and every loop is bounded.

mod adapter_calls;
mod bare_proxy;
#[path = "../../tests/support/mock.rs"]
#[allow(missing_docs)]
mod mock;
mod plugin_calls;
mod stats;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;

use stats::Summary;

/// Benchmark options.
#[derive(Parser, Debug)]
struct Args {
    /// The release `wasmgate` binary.
    #[arg(long, required_unless_present_any = ["bare_proxy", "serve_mock"])]
    gateway_bin: Option<PathBuf>,
    /// Directory holding `openai.wasm` and `weighted.wasm`.
    #[arg(long, required_unless_present_any = ["bare_proxy", "serve_mock"])]
    plugins: Option<PathBuf>,
    /// Internal: run as the baseline pass-through proxy to this upstream.
    #[arg(long, hide = true)]
    bare_proxy: Option<String>,
    /// Internal: run as the mock upstream.
    #[arg(long, hide = true)]
    serve_mock: bool,
    /// Measured requests per latency series (after a warm-up of 10 %).
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrency of the throughput run.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Plugin call iterations.
    #[arg(long, default_value_t = 20000)]
    plugin_iterations: usize,
}

const TOKEN: &str = "sk-bench-0123456789abcdefghijklmnopqrstuv";

/// The key requests use: a billed user's token created through the admin
/// API, so the measured path includes admission, the quota reservation,
/// settlement and the usage log.
static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn key() -> &'static str {
    KEY.get().map_or(TOKEN, String::as_str)
}

/// Create a user with ample quota and a token for them.
async fn billed_key(base: &str) -> Result<String> {
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
        .json(&json!({"name": "bench", "user_id": user["id"]}))
        .send()
        .await?
        .json()
        .await?;
    token["key"].as_str().map(str::to_string).context("no key in the token answer")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(upstream) = args.bare_proxy {
        return bare_proxy::serve(upstream);
    }
    if args.serve_mock {
        return serve_mock();
    }
    let plugins = args.plugins.clone().context("--plugins")?;
    println!("# wasmgate loopback benchmark\n");
    println!("machine: {} cores; {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), cpu_model());
    let plugin_rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    plugin_rt.block_on(plugin_calls::run(&plugins, args.plugin_iterations))?;
    plugin_rt.block_on(adapter_calls::run(&plugins, args.plugin_iterations))?;
    drop(plugin_rt);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
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

fn start_gateway(args: &Args, dir: &std::path::Path, upstream: &str) -> Result<(ChildGuard, String)> {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    for f in ["openai.wasm", "weighted.wasm"] {
        let src = args.plugins.as_ref().context("--plugins")?.join(f);
        std::fs::copy(src, plugins.join(f)).with_context(|| format!("copy {f}"))?;
    }
    let config = format!(
        "tokens = [{TOKEN:?}]\nadmin_token = \"adm-bench\"\ndata_dir = {:?}\nplugins_dir = {:?}\n\
         [[channels]]\nname = \"mock\"\nadapter = \"openai\"\nbase_url = \"{upstream}\"\nkey = \"sk-up\"\nmodels = [\"gpt-4o-mini\"]\n\
         [pricing.models.gpt-4o-mini]\nratio = 0.075\ncompletion_ratio = 4\ncached_ratio = 0.5\n",
        dir.join("data"),
        plugins
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(args.gateway_bin.as_ref().context("--gateway-bin")?);
    cmd.arg("--config").arg(&path).args(["--listen", "127.0.0.1:0"]).env("RUST_LOG", "warn");
    let (child, addr) = spawn_listening(cmd, "wasmgate listening on ")?;
    Ok((ChildGuard(child), addr))
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

async fn http(args: &Args) -> Result<()> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--serve-mock");
    let (mock_child, mock_url) = spawn_listening(cmd, "mock listening on ")?;
    let _mock = ChildGuard(mock_child);
    let dir = tempfile::tempdir()?;
    let (_gateway, base) = start_gateway(args, dir.path(), &mock_url)?;
    let _ = KEY.set(billed_key(&base).await?);
    let (_bare, bare_base) = bare_proxy::start(&mock_url)?;
    let bare = format!("{bare_base}/v1/chat/completions");
    let client = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(256).build()?;
    let direct = format!("{mock_url}/chat/completions");
    let via = format!("{base}/v1/chat/completions");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "benchmark this request"}]});
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);

    // Added latency, c=1: direct, wasmgate and the bare proxy interleaved in
    // one loop (rotating order), so all three series see the same machine.
    let targets = [direct.as_str(), via.as_str(), bare.as_str()];
    let series = interleaved(&client, &targets, &body, args.requests, false).await?;
    report("non-streaming request, c=1", &series);
    let series = interleaved(&client, &targets, &stream_body, args.requests, true).await?;
    report("streaming, time to first chunk, c=1", &series);

    // Throughput.
    let duration = Duration::from_secs(args.seconds);
    let direct_rps = throughput(&client, &direct, &body, args.concurrency, duration).await?;
    let gateway_rps = throughput(&client, &via, &body, args.concurrency, duration).await?;
    let bare_rps = throughput(&client, &bare, &body, args.concurrency, duration).await?;
    println!("\n## throughput, non-streaming, c={}, {}s each\n", args.concurrency, args.seconds);
    println!("| target | requests/s |\n|---|---|");
    println!(
        "| mock upstream directly | {direct_rps:.0} |\n| through a bare axum+reqwest proxy | {bare_rps:.0} |\n| through wasmgate | {gateway_rps:.0} |"
    );
    println!(
        "\n(the load generator, the mock and the gateway share the same {} cores)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    Ok(())
}

/// Time one request: to the complete body, or to the first SSE chunk.
async fn once(client: &reqwest::Client, url: &str, body: &serde_json::Value, first_chunk: bool) -> Result<Duration> {
    let start = Instant::now();
    let resp = client.post(url).bearer_auth(key()).json(body).send().await?;
    anyhow::ensure!(resp.status().is_success(), "{url}: HTTP {}", resp.status());
    if first_chunk {
        let mut stream = resp.bytes_stream();
        let mut seen = Vec::new();
        while let Some(chunk) = stream.next().await {
            seen.extend_from_slice(&chunk?);
            if seen.windows(2).any(|w| w == b"\n\n") {
                break;
            }
        }
        let elapsed = start.elapsed();
        while stream.next().await.is_some() {}
        Ok(elapsed)
    } else {
        let _ = resp.bytes().await?;
        Ok(start.elapsed())
    }
}

async fn interleaved(
    client: &reqwest::Client,
    targets: &[&str; 3],
    body: &serde_json::Value,
    n: usize,
    first_chunk: bool,
) -> Result<[Vec<Duration>; 3]> {
    for _ in 0..n / 10 {
        for url in targets {
            once(client, url, body, first_chunk).await?;
        }
    }
    let mut out: [Vec<Duration>; 3] = Default::default();
    for i in 0..n {
        // Rotate which target goes first so none always runs warm.
        for k in 0..3 {
            let t = (i + k) % 3;
            out[t].push(once(client, targets[t], body, first_chunk).await?);
        }
    }
    Ok(out)
}

fn report(title: &str, series: &[Vec<Duration>; 3]) {
    let [d, g, b] = [Summary::of(&series[0]), Summary::of(&series[1]), Summary::of(&series[2])];
    println!("\n## {title} ({} requests each, interleaved)\n", series[0].len());
    println!("| | p50 | p90 | p99 | mean |\n|---|---|---|---|---|");
    println!("| mock directly | {} |", d.cells());
    println!("| through a bare axum+reqwest proxy | {} |", b.cells());
    println!("| through wasmgate | {} |", g.cells());
    let added = |x: &Summary| {
        [stats::diff(x.p50, d.p50), stats::diff(x.p90, d.p90), stats::diff(x.p99, d.p99), stats::diff(x.mean, d.mean)]
    };
    let [b50, b90, b99, bm] = added(&b);
    let [g50, g90, g99, gm] = added(&g);
    println!("| added by the bare proxy | {b50} | {b90} | {b99} | {bm} |");
    println!("| **added by wasmgate** | **{g50}** | **{g90}** | **{g99}** | **{gm}** |");
}

async fn throughput(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    concurrency: usize,
    duration: Duration,
) -> Result<f64> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                if once(&client, &url, &body, false).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
