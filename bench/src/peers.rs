//! Side by side in one run: the mock directly, nginx `proxy_pass` with
//! keep-alive, the bare axum + reqwest proxy, and wasmgate on its full path
//! (a billed token, the wasm adapter, a routing policy choosing between two
//! channels, a journaled usage row) — all driven by the same `wrk`, in
//! rounds whose order rotates, reporting medians over the rounds and the
//! ratios issue 12 sets targets for.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::ChildGuard;

/// One measured target.
pub struct Target {
    /// Row name.
    pub name: &'static str,
    /// URL of its chat completions endpoint.
    pub url: String,
    /// Process whose memory is reported (with its children).
    pub pid: Option<u32>,
    /// The (non-streamed, streamed) request bodies; `None`: chat completions.
    pub bodies: Option<(&'static str, &'static str)>,
    /// Its own bearer key (another gateway's); `None`: the shared one.
    pub key: Option<String>,
}

/// The chat completion bodies every target gets unless it names its own.
pub const CHAT: (&str, &str) = (
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"benchmark this request"}]}"#,
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"benchmark this request"}]}"#,
);

/// What one `wrk` run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Requests per second.
    pub rps: f64,
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (num, unit) = text.trim().split_at(text.trim().find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Run `wrk` with `connections` against `url`, posting `body` with `key`.
pub fn wrk(url: &str, body: &str, key: &str, connections: usize, secs: u64, scratch: &Path) -> Result<Run> {
    let script = scratch.join(format!("post-{connections}.lua"));
    let lua_body = body.replace('\\', "\\\\").replace('\'', "\\'");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{lua_body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer {key}\"\n"
        ),
    )?;
    let threads = connections.clamp(1, 2);
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        bail!("{url}: {}", line.trim());
    }
    if text.contains("Socket errors") && !text.contains("timeout 0") {
        eprintln!("wrk: {}", text.lines().find(|l| l.contains("Socket errors")).unwrap_or_default());
    }
    let percentile =
        |p: &str| text.lines().find_map(|l| l.trim().strip_prefix(p).and_then(parse_duration)).unwrap_or_default();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("wrk printed no rate:\n{text}"))?;
    Ok(Run { p50: percentile("50%"), p99: percentile("99%"), rps })
}

/// Start nginx in front of `upstream` (`host:port`), as a reverse proxy
/// with keep-alive to it and no buffering; returns it and its base URL.
pub fn start_nginx(upstream: &str, dir: &Path) -> Result<(Nginx, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = format!(
        "worker_processes auto;\nerror_log {p}/logs/error.log;\npid {p}/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           upstream mock {{ server {upstream}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://mock;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        p = prefix.display()
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .spawn()
        .context("starting nginx (apt-get install nginx)")?;
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((Nginx(ChildGuard(child)), base));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nginx did not start listening on {port}")
}

/// nginx's master process, stopped with SIGTERM (a fast shutdown that
/// ends its workers too): a SIGKILL would leave the workers serving after
/// the benchmark.
pub struct Nginx(ChildGuard);

impl Nginx {
    /// The master's process id.
    pub fn id(&self) -> u32 {
        self.0.0.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let child = &mut self.0.0;
        let _ = rustix::process::kill_process(rustix::process::Pid::from_child(child), rustix::process::Signal::TERM);
        // Then the guard's SIGKILL, if it has not exited within 2 s.
        for _ in 0..100 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Resident memory of `pid` and its children, in bytes.
pub fn rss_tree(pid: u32) -> u64 {
    let rss = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(str::to_string))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    rss(pid) + children.into_iter().map(rss).sum::<u64>()
}

/// The median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A target's medians over the rounds of [`compare`].
#[derive(Debug, Clone, Copy)]
pub struct Medians {
    /// c=1 p50, seconds.
    pub c1_p50: f64,
    /// Streamed c=1 p50, seconds.
    pub stream_p50: f64,
    /// Requests per second at c=32.
    pub c32_rps: f64,
}

/// Measure every target in `rounds` rotating rounds, print the table and
/// the ratios, and return each target's medians.
pub fn compare(targets: &[Target], key: &str, secs: u64, rounds: usize, scratch: &Path) -> Result<Vec<Medians>> {
    let n = targets.len();
    let (mut c1, mut s1, mut c32) = (vec![Vec::new(); n], vec![Vec::new(); n], vec![Vec::new(); n]);
    let mut rss_after = vec![0u64; n];
    let rss_idle: Vec<u64> = targets.iter().map(|t| t.pid.map_or(0, rss_tree)).collect();
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            let t = &targets[i];
            let (body, stream) = t.bodies.unwrap_or(CHAT);
            let key = t.key.as_deref().unwrap_or(key);
            c1[i].push(wrk(&t.url, body, key, 1, secs, scratch)?);
            s1[i].push(wrk(&t.url, stream, key, 1, secs, scratch)?);
            c32[i].push(wrk(&t.url, body, key, 32, secs, scratch)?);
            if let Some(pid) = t.pid {
                rss_after[i] = rss_after[i].max(rss_tree(pid));
            }
        }
        eprintln!("peers: round {} of {rounds} done", round + 1);
    }
    let us = |d: f64| format!("{:.0} µs", d * 1e6);
    let p50 = |runs: &[Run]| median(runs.iter().map(|r| r.p50.as_secs_f64()).collect());
    let p99 = |runs: &[Run]| median(runs.iter().map(|r| r.p99.as_secs_f64()).collect());
    let rps = |runs: &[Run]| median(runs.iter().map(|r| r.rps).collect());
    println!("\n## side by side: wrk, medians of {rounds} interleaved rounds, {secs} s per run\n");
    println!("| target | c=1 p50 | c=1 p99 | stream c=1 p50 | req/s c=32 | c=32 p50 | RSS idle | RSS after load |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, t) in targets.iter().enumerate() {
        let mem = |b: u64| if b == 0 { "—".to_string() } else { format!("{} MB", b >> 20) };
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            t.name,
            us(p50(&c1[i])),
            us(p99(&c1[i])),
            us(p50(&s1[i])),
            rps(&c32[i]),
            us(p50(&c32[i])),
            mem(rss_idle[i]),
            mem(rss_after[i])
        );
    }
    let find = |name: &str| targets.iter().position(|t| t.name.starts_with(name));
    if let (Some(d), Some(ng), Some(w)) = (find("mock"), find("nginx"), find("wasmgate")) {
        let added = |x: usize, runs: &[Vec<Run>]| p50(&runs[x]) - p50(&runs[d]);
        println!("\n| ratio | value | target |\n|---|---|---|");
        println!("| throughput c=32, wasmgate / nginx | {:.2}× | ≥ 0.5× |", rps(&c32[w]) / rps(&c32[ng]));
        println!(
            "| added c=1 p50, wasmgate / nginx | {:.2}× ({} vs {}) | ≤ 2× |",
            added(w, &c1) / added(ng, &c1),
            us(added(w, &c1)),
            us(added(ng, &c1))
        );
        println!(
            "| added stream c=1 p50, wasmgate / nginx | {:.2}× ({} vs {}) | ≤ 2× |",
            added(w, &s1) / added(ng, &s1),
            us(added(w, &s1)),
            us(added(ng, &s1))
        );
        if let Some(b) = find("bare") {
            println!("| throughput c=32, wasmgate / bare proxy | {:.2}× | |", rps(&c32[w]) / rps(&c32[b]));
        }
        if let Some(off) = find("wasmgate, metrics off") {
            println!(
                "| metrics on vs off: req/s c=32 | {:.0} vs {:.0} ({:+.1} %) | within 3 % |",
                rps(&c32[w]),
                rps(&c32[off]),
                (rps(&c32[w]) / rps(&c32[off]) - 1.0) * 100.0
            );
            println!("| metrics on vs off: c=1 p50 | {} vs {} | within 3 % |", us(p50(&c1[w])), us(p50(&c1[off])));
        }
    }
    Ok((0..n).map(|i| Medians { c1_p50: p50(&c1[i]), stream_p50: p50(&s1[i]), c32_rps: rps(&c32[i]) }).collect())
}
