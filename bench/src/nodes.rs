//! `--nodes`: what the shared PostgreSQL store costs and what several nodes
//! give. A real PostgreSQL (Debian's package, a fresh cluster on loopback,
//! as the tests start it) holds the state of three gateway nodes; a fourth
//! gateway keeps its state in sled. Every gateway has the same two channels
//! on the same mock and a billed token with no limits of its own, so each
//! request reserves, settles and writes a usage row.
//!
//! 1. One node on sled against one node on PostgreSQL (and the mock
//!    directly), through [`peers::compare`]: c=1 latency, streamed c=1
//!    latency and throughput at c=32, in interleaved rounds; and on
//!    PostgreSQL a token with a `concurrency` of its own, which every node
//!    counts in the database (a transaction per request).
//!    Then the goals in adjacent pairs: sled and PostgreSQL back to back
//!    at c=1 and c=32 (which goes first alternating), the medians of the
//!    pairs' ratios, with each side's CPU per request at c=32 — the
//!    gateway's and the database's — read from `/proc` (this shared machine's
//!    throughput drifts by tens of percent over minutes; a pair's two runs
//!    see the same drift, and CPU per request barely moves).
//! 2. Three nodes against one: 32 connections on one node, then spread
//!    over the three (`wrk` on each at once), in alternating rounds.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::cpu;
use crate::peers::{self, Run, Target, median};
use crate::postgres::PgServer;
use crate::{Args, billed_key_with, start_gateway_on, two_channels};

const SECRETS: &str = "secrets_key = \"bench-nodes-secret-0123456789abcdef\"";
const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"benchmark this request"}]}"#;

/// Run `wrk` on each of `urls` at once, `connections` spread over them;
/// returns each run.
fn wrk_spread(urls: &[String], key: &str, connections: usize, secs: u64, scratch: &Path) -> Result<Vec<Run>> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let share = connections / urls.len() + usize::from(i < connections % urls.len());
                let dir = scratch.join(format!("spread-{i}"));
                scope.spawn(move || {
                    std::fs::create_dir_all(&dir)?;
                    peers::wrk(url, CHAT, key, share, secs, &dir)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().map_err(|_| anyhow::anyhow!("wrk thread panicked"))?).collect()
    })
}

/// One side of a pair: a gateway's endpoint, token and process.
struct Side<'a> {
    url: &'a str,
    key: &'a str,
    pid: u32,
}

/// What the adjacent pairs measured (medians).
struct Pairs {
    count: usize,
    /// PostgreSQL's req/s over sled's, the median of the pairs' ratios.
    ratio: f64,
    sled_rps: f64,
    pg_rps: f64,
    /// PostgreSQL's added c=1 p50 over sled's, the median of the pairs'
    /// ratios; and each side's added c=1 p50 (seconds).
    added_ratio: f64,
    sled_added: f64,
    pg_added: f64,
    /// CPU seconds per request: the sled gateway's, the PostgreSQL
    /// gateway's and the database's (all its processes).
    sled_cpu: f64,
    pg_gateway_cpu: f64,
    pg_database_cpu: f64,
}

/// One side's figures in one pair.
struct Measured {
    /// c=1 p50, seconds.
    c1_p50: f64,
    /// The c=32 run.
    c32: Run,
    /// CPU seconds per request at c=32: the gateway's and the database's
    /// (`postmaster`'s processes).
    gateway_cpu: f64,
    database_cpu: f64,
}

/// What the background work of the run before (a writer's backlog, the
/// database's autovacuum after a burst of inserts) is given to finish
/// before a c=1 run, so that it is not measured there.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// `wrk -c1` on `side` after [`SETTLE`]: its p50, seconds.
fn c1_p50(side: &Side<'_>, secs: u64, scratch: &Path) -> Result<f64> {
    std::thread::sleep(SETTLE);
    Ok(peers::wrk(side.url, CHAT, side.key, 1, secs, scratch)?.p50.as_secs_f64())
}

/// `wrk -c32` on `side` and the CPU it cost; `c1_p50` from [`c1_p50`].
fn measured(side: &Side<'_>, c1_p50: f64, postmaster: u32, secs: u64, scratch: &Path) -> Result<Measured> {
    let (gateway, database) = (cpu::seconds(side.pid), cpu::seconds_with_children(postmaster));
    let c32 = peers::wrk(side.url, CHAT, side.key, 32, secs, scratch)?;
    let requests = (c32.rps * secs as f64).max(1.0);
    let per_request = |before: f64, now: f64| (now - before) / requests;
    Ok(Measured {
        c1_p50,
        gateway_cpu: per_request(gateway, cpu::seconds(side.pid)),
        database_cpu: per_request(database, cpu::seconds_with_children(postmaster)),
        c32,
    })
}

/// Sled and PostgreSQL back to back, `args.rounds * 2` times (which goes
/// first alternating), c=1 on both then c=32 on both; `mock_p50` is the mock's own
/// c=1 p50 (what the added latency is over). Prints each pair.
fn paired(
    sled: &Side<'_>,
    pg: &Side<'_>,
    postmaster: u32,
    mock_p50: f64,
    args: &Args,
    scratch: &Path,
) -> Result<Pairs> {
    let count = (args.rounds * 2).max(2);
    let mut pairs: Vec<(Measured, Measured)> = Vec::new();
    println!(
        "\n| pair | sled req/s | PostgreSQL req/s | ratio | sled added c=1 p50 | PostgreSQL added c=1 p50 | ratio |\n\
         |---|---|---|---|---|---|---|"
    );
    for pair in 0..count {
        let pg_first = pair % 2 == 1;
        let (a, b) = if pg_first { (pg, sled) } else { (sled, pg) };
        // Both c=1 runs, then both c=32 runs: a c=1 run never follows a
        // c=32 run of the other side directly.
        let (a_c1, b_c1) = (c1_p50(a, args.secs, scratch)?, c1_p50(b, args.secs, scratch)?);
        let first = measured(a, a_c1, postmaster, args.secs, scratch)?;
        let second = measured(b, b_c1, postmaster, args.secs, scratch)?;
        let (s, p) = if pg_first { (second, first) } else { (first, second) };
        let (s_added, p_added) = (s.c1_p50 - mock_p50, p.c1_p50 - mock_p50);
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.0} µs | {:.0} µs | {:.3} |",
            pair + 1,
            s.c32.rps,
            p.c32.rps,
            p.c32.rps / s.c32.rps,
            s_added * 1e6,
            p_added * 1e6,
            p_added / s_added
        );
        pairs.push((s, p));
    }
    let of = |f: &dyn Fn(&(Measured, Measured)) -> f64| median(pairs.iter().map(f).collect());
    Ok(Pairs {
        count,
        ratio: of(&|(s, p)| p.c32.rps / s.c32.rps),
        sled_rps: of(&|(s, _)| s.c32.rps),
        pg_rps: of(&|(_, p)| p.c32.rps),
        added_ratio: of(&|(s, p)| (p.c1_p50 - mock_p50) / (s.c1_p50 - mock_p50)),
        sled_added: of(&|(s, _)| s.c1_p50 - mock_p50),
        pg_added: of(&|(_, p)| p.c1_p50 - mock_p50),
        sled_cpu: of(&|(s, _)| s.gateway_cpu),
        pg_gateway_cpu: of(&|(_, p)| p.gateway_cpu),
        pg_database_cpu: of(&|(_, p)| p.database_cpu),
    })
}

/// Start the database and the gateways, measure, print.
pub async fn run(args: &Args, mock_url: &str) -> Result<()> {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.context("postgres")?;
    let scratch = tempfile::tempdir()?;
    let channels = two_channels(mock_url);
    let plugins = ["openai.wasm", "weighted.wasm"];
    let sled_dir = tempfile::tempdir()?;
    let (sled_node, sled_base) = start_gateway_on(args, sled_dir.path(), &plugins, &channels, "", "")?;
    let sled_key = billed_key_with(&sled_base, json!({})).await?;
    let shared = format!("database_url = {:?}\n{SECRETS}", pg.url);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(start_gateway_on(args, dir.path(), &plugins, &channels, "", &shared)?);
    }
    // One user and token for the cluster, created on the first node; the
    // others learn of it through the database.
    let pg_key = billed_key_with(&nodes[0].1, json!({})).await?;
    let limited_key = billed_key_with(&nodes[0].1, json!({"concurrency": 100_000})).await?;
    let http = reqwest::Client::new();
    for (_, base) in &nodes[1..] {
        let mut known = false;
        for _ in 0..100 {
            let resp = http.get(format!("{base}/v1/models")).bearer_auth(&pg_key).send().await?;
            if resp.status() == 200 {
                known = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::ensure!(known, "the token created on node 1 never reached {base}");
    }

    println!("\n## One node: sled against PostgreSQL (billed token, 2 channels + policy)\n");
    let targets = [
        Target {
            name: "mock directly",
            url: format!("{mock_url}/chat/completions"),
            pid: None,
            bodies: None,
            key: None,
        },
        Target {
            name: "one node on sled",
            url: format!("{sled_base}/v1/chat/completions"),
            pid: Some(sled_node.0.id()),
            bodies: None,
            key: Some(sled_key),
        },
        Target {
            name: "one node on PostgreSQL",
            url: format!("{}/v1/chat/completions", nodes[0].1),
            pid: Some(nodes[0].0.0.id()),
            bodies: None,
            key: Some(pg_key.clone()),
        },
        Target {
            name: "one node on PostgreSQL, token with its own concurrency",
            url: format!("{}/v1/chat/completions", nodes[0].1),
            pid: None,
            bodies: None,
            key: Some(limited_key),
        },
    ];
    let m = peers::compare(&targets, &pg_key, args.secs, args.rounds, scratch.path())?;
    let sled_side =
        Side { url: &targets[1].url, key: targets[1].key.as_deref().unwrap_or(&pg_key), pid: sled_node.0.id() };
    let pg_side = Side { url: &targets[2].url, key: &pg_key, pid: nodes[0].0.0.id() };
    let pairs = paired(&sled_side, &pg_side, pg.pid(), m[0].c1_p50, args, scratch.path())?;
    drop(sled_node);
    let us = |s: f64| format!("{:.0} µs", s * 1e6);
    let (mock, on_sled, on_pg, limited) = (m[0], m[1], m[2], m[3]);
    println!("\n| PostgreSQL against sled | sled | PostgreSQL | difference | goal |\n|---|---|---|---|---|");
    println!(
        "| throughput c=32, interleaved rounds | {:.0} | {:.0} | {:+.1} % | |",
        on_sled.c32_rps,
        on_pg.c32_rps,
        (on_pg.c32_rps / on_sled.c32_rps - 1.0) * 100.0
    );
    println!(
        "| throughput c=32, median of {} adjacent pairs | {:.0} | {:.0} | {:+.1} % | within 10 % |",
        pairs.count,
        pairs.sled_rps,
        pairs.pg_rps,
        (pairs.ratio - 1.0) * 100.0
    );
    println!(
        "| CPU per request at c=32 (gateway + database) | {:.1} µs | {:.1} + {:.1} µs | {:+.1} % | |",
        pairs.sled_cpu * 1e6,
        pairs.pg_gateway_cpu * 1e6,
        pairs.pg_database_cpu * 1e6,
        ((pairs.pg_gateway_cpu + pairs.pg_database_cpu) / pairs.sled_cpu - 1.0) * 100.0
    );
    let added = |label: &str, pick: fn(&peers::Medians) -> f64, goal: &str| {
        let (sled, pg) = (pick(&on_sled) - pick(&mock), pick(&on_pg) - pick(&mock));
        println!("| {label} | {} | {} | {:+.1} % | {goal} |", us(sled), us(pg), (pg / sled - 1.0) * 100.0);
    };
    added("added c=1 p50, interleaved rounds", |m| m.c1_p50, "");
    println!(
        "| added c=1 p50, median of {} adjacent pairs | {} | {} | {:+.1} % | within 10 % |",
        pairs.count,
        us(pairs.sled_added),
        us(pairs.pg_added),
        (pairs.added_ratio - 1.0) * 100.0
    );
    added("added stream c=1 p50", |m| m.stream_p50, "");
    println!(
        "| a token with its own concurrency, on PostgreSQL | | {:.0} req/s, added c=1 p50 {} | {:+.1} % req/s | |",
        limited.c32_rps,
        us(limited.c1_p50 - mock.c1_p50),
        (limited.c32_rps / on_sled.c32_rps - 1.0) * 100.0
    );

    println!("\n## Three nodes on one PostgreSQL against one (32 connections in all)\n");
    let urls: Vec<String> = nodes.iter().map(|(_, base)| format!("{base}/v1/chat/completions")).collect();
    let (mut one, mut three, mut three_p50) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                one.push(peers::wrk(&urls[0], CHAT, &pg_key, 32, args.secs, scratch.path())?.rps);
            } else {
                let runs = wrk_spread(&urls, &pg_key, 32, args.secs, scratch.path())?;
                three.push(runs.iter().map(|r| r.rps).sum::<f64>());
                three_p50.push(median(runs.iter().map(|r| r.p50.as_secs_f64()).collect()));
            }
        }
        eprintln!("nodes: round {} of {} done", round + 1, args.rounds);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("| setup | req/s (median of {} rounds) | c=32 p50 |\n|---|---|---|", args.rounds);
    println!("| one node | {:.0} | — |", median(one.clone()));
    println!(
        "| three nodes, wrk on each at once | {:.0} | {} per node |",
        median(three.clone()),
        us(median(three_p50))
    );
    println!(
        "\nthree nodes / one: {:.2}× — all on this machine's {cores} cores with the database and the mock, so \
         this shows what sharing costs, not what more machines add",
        median(three) / median(one)
    );
    drop(nodes);
    drop(pg);
    Ok(())
}
