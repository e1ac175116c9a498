//! Several gateway nodes on one PostgreSQL (`database_url`): a real
//! server from Debian's package, three real gateway processes with their
//! own data directories, loopback mock upstreams. Channels are shared: the
//! configuration's channels are imported once whatever the number of nodes
//! starting, a channel created through one node serves on the others, and
//! a channel disabled on one is out of rotation on all.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::support::load::Load;
use crate::support::postgres::PgServer;
use crate::support::{Gateway, MockUpstream, admin, channel, chat, eventually, post};

const SECRETS: &str = "secrets_key = \"multi-node-test-secret-0123456789\"";

pub(crate) fn node(database_url: &str, extra: &str) -> Gateway {
    Gateway::start(&["openai.wasm", "weighted.wasm"], &format!("database_url = {database_url:?}\n{SECRETS}\n{extra}"))
}

/// Channel names node `gw` lists.
async fn names(gw: &Gateway) -> Vec<String> {
    let (status, list) = admin(gw, Method::GET, "/api/channels", None).await;
    assert_eq!(status, 200, "{list}");
    let mut names: Vec<String> = list["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_channels_through_postgresql() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let (m1, m2) = (MockUpstream::start("one").await, MockUpstream::start("two").await);
    let declared = channel("from-config", "openai", &m1.base_url(), &["shared-model"], "");
    // Three nodes starting with the same configuration import it once.
    let nodes: Vec<Gateway> = tokio::task::spawn_blocking({
        let (url, declared) = (pg.url.clone(), declared.clone());
        move || {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..3).map(|_| s.spawn(|| node(&url, &declared))).collect();
                handles.into_iter().map(|h| h.join().expect("node")).collect()
            })
        }
    })
    .await
    .expect("nodes");
    for gw in &nodes {
        assert_eq!(names(gw).await, ["from-config"], "one import for three nodes");
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // A channel created on A serves on B and C.
    let body = json!({"name": "created-on-a", "adapter": "openai", "base_url": m2.base_url(),
        "key": "sk-upstream-two", "models": ["new-model"]});
    let (status, created) = admin(a, Method::POST, "/api/channels", Some(&body)).await;
    assert_eq!(status, 201, "{created}");
    let created_at = Instant::now();
    for gw in [b, c] {
        let served = eventually(Duration::from_secs(10), || async {
            post(gw, "/v1/chat/completions", &chat("new-model", "hi")).await.0 == 200
        })
        .await;
        assert!(served.is_some(), "the channel created on A never served on another node");
    }
    println!("channel created on A served on B and C after {:?}", created_at.elapsed());
    let (_, answer) = post(c, "/v1/chat/completions", &chat("new-model", "from c")).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "echo: from c", "{answer}");

    // A response stored on A continues on B and reads on C.
    let (status, first) = post(a, "/v1/responses", &json!({"model": "new-model", "input": "first"})).await;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().expect("id").to_string();
    let next = json!({"model": "new-model", "input": "second", "previous_response_id": id});
    let (status, second) = post(b, "/v1/responses", &next).await;
    assert_eq!(status, 200, "{second}");
    let sent = m2.state.last_body.lock().await.clone().expect("upstream body");
    assert_eq!(sent["messages"][1], json!({"role": "assistant", "content": "echo: first"}), "{sent}");
    let got = crate::support::client()
        .get(c.url(&format!("/v1/responses/{id}")))
        .bearer_auth(crate::support::TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(got.status().as_u16(), 200, "a stored response unknown to another node");

    // Tables set through one node's API (filters, routing, pricing) reach the others.
    let rules = json!([{"plugin": "not-loaded-filter", "models": ["new-model"]}]);
    let (status, _) = admin(b, Method::PUT, "/api/filters", Some(&rules)).await;
    assert_eq!(status, 200);
    for gw in [a, c] {
        let shared = eventually(Duration::from_secs(10), || async {
            post(gw, "/v1/chat/completions", &chat("new-model", "filtered?")).await.0 == 503
        })
        .await;
        assert!(shared.is_some(), "filter rules set on B never applied on another node");
    }
    let (status, _) = admin(c, Method::DELETE, "/api/filters", None).await;
    assert_eq!(status, 200);
    for gw in [a, b] {
        let back = eventually(Duration::from_secs(10), || async {
            post(gw, "/v1/chat/completions", &chat("new-model", "back")).await.0 == 200
        })
        .await;
        assert!(back.is_some(), "the filter reset on C never reached another node");
    }
    let routing = json!({"policy": "round-robin", "rules": []});
    let (status, _) = admin(a, Method::PUT, "/api/routing", Some(&routing)).await;
    assert_eq!(status, 200);
    let (_, mut pricing) = admin(a, Method::GET, "/api/pricing", None).await;
    pricing["quota_per_dollar"] = json!(1234);
    let (status, body) = admin(a, Method::PUT, "/api/pricing", Some(&pricing)).await;
    assert_eq!(status, 200, "{body}");
    for gw in [b, c] {
        let shared = eventually(Duration::from_secs(10), || async {
            let (_, r) = admin(gw, Method::GET, "/api/routing", None).await;
            let (_, p) = admin(gw, Method::GET, "/api/pricing", None).await;
            r["policy"] == "round-robin" && r["source"] == "api" && p["quota_per_dollar"].as_f64() == Some(1234.0)
        })
        .await;
        let (_, r) = admin(gw, Method::GET, "/api/routing", None).await;
        let (_, p) = admin(gw, Method::GET, "/api/pricing", None).await;
        assert!(shared.is_some(), "routing or pricing set on A never reached another node: {r} {p}");
    }

    // A console session opened on A works on B and C; signed out on C, it
    // is refused everywhere.
    let session = crate::console::admin_session(a).await;
    for gw in [b, c] {
        let (status, _) = crate::console::with_session(gw, &session, Method::GET, "/api/users", None, &[]).await;
        assert_eq!(status, 200, "a console session from A refused on another node");
    }
    let csrf = [("x-csrf-token", session.csrf.as_str())];
    let (status, _) = crate::console::with_session(c, &session, Method::DELETE, "/api/session", None, &csrf).await;
    assert_eq!(status, 200);
    for gw in [a, b] {
        let out = eventually(Duration::from_secs(10), || async {
            crate::console::with_session(gw, &session, Method::GET, "/api/users", None, &[]).await.0 == 401
        })
        .await;
        assert!(out.is_some(), "a sign-out on C never reached another node");
    }

    // `shared-model` on both mocks; disabled on B, the first gets no traffic anywhere.
    let id = created["id"].as_u64().expect("id");
    let patch = json!({"models": ["new-model", "shared-model"]});
    let (status, _) = admin(a, Method::PATCH, &format!("/api/channels/{id}"), Some(&patch)).await;
    assert_eq!(status, 200);
    let (_, list) = admin(b, Method::GET, "/api/channels", None).await;
    let config_id = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|c| c["name"] == "from-config"))
        .and_then(|c| c["id"].as_u64())
        .expect("config channel");
    let disable = json!({"note": "maintenance"});
    let (status, body) = admin(b, Method::POST, &format!("/api/channels/{config_id}/disable"), Some(&disable)).await;
    assert_eq!(status, 200, "{body}");
    let disabled_at = Instant::now();
    for gw in [a, c] {
        let gone = eventually(Duration::from_secs(10), || async {
            let (_, ch) = admin(gw, Method::GET, &format!("/api/channels/{config_id}"), None).await;
            ch["status"]["state"] == "manually_disabled"
        })
        .await;
        assert!(gone.is_some(), "the disable on B never reached another node");
    }
    println!("channel disabled on B out of rotation on A and C after {:?}", disabled_at.elapsed());
    let before = m1.hits();
    for gw in [a, c] {
        for _ in 0..20 {
            let (status, body) = post(gw, "/v1/chat/completions", &chat("shared-model", "x")).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    assert_eq!(m1.hits(), before, "a channel disabled on B served on A or C");

    // Deleted on C: gone everywhere.
    let (status, _) = admin(c, Method::DELETE, &format!("/api/channels/{id}"), None).await;
    assert_eq!(status, 200);
    for gw in [a, b] {
        let gone = eventually(Duration::from_secs(10), || async { names(gw).await == ["from-config"] }).await;
        assert!(gone.is_some(), "the delete on C never reached another node");
    }

    // A channel one node's traffic disables (a rejected key) is out of
    // rotation on the others: health transitions are shared too.
    let (status, _) = admin(a, Method::POST, &format!("/api/channels/{config_id}/enable"), None).await;
    assert_eq!(status, 200);
    m1.set_mode(crate::support::mock::Mode::openai_error(401, "invalid_api_key", None));
    // A's own traffic disables it (the first rejected request does; more are
    // sent only if that one did not reach the channel).
    let answers = std::sync::Mutex::new(Vec::new());
    let disabled_on_a = eventually(Duration::from_secs(10), || async {
        let (status, answer) = post(a, "/v1/chat/completions", &chat("shared-model", "bad key")).await;
        answers.lock().expect("answers").push(format!("{status} {answer}"));
        let (_, ch) = admin(a, Method::GET, &format!("/api/channels/{config_id}"), None).await;
        ch["status"]["state"] == "auto_disabled"
    })
    .await;
    let (_, on_a) = admin(a, Method::GET, &format!("/api/channels/{config_id}"), None).await;
    let answers = answers.into_inner().expect("answers");
    assert!(disabled_on_a.is_some(), "A's rejected requests did not disable the channel on A: {answers:?}, {on_a}");
    if answers.len() > 1 {
        println!("A needed {} rejected requests to disable the channel: {answers:?}", answers.len());
    }
    for gw in [b, c] {
        let seen = eventually(Duration::from_secs(10), || async {
            let (_, ch) = admin(gw, Method::GET, &format!("/api/channels/{config_id}"), None).await;
            ch["status"]["state"] == "auto_disabled"
        })
        .await;
        let (_, there) = admin(gw, Method::GET, &format!("/api/channels/{config_id}"), None).await;
        assert!(
            seen.is_some(),
            "a channel disabled by A's traffic still serves on another node: A answered {answers:?}, A's channel \
             {}, the other's {}",
            on_a["status"],
            there["status"]
        );
    }
}

/// A plugin uploaded to node A serves on B and C, under load, with no
/// failed request; a corrupt upload is refused and every node keeps the
/// version it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_uploaded_to_one_node_serves_on_all_of_them() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let mock = MockUpstream::start("up").await;
    let declared = channel("c", "openai", &mock.base_url(), &["gpt-4o-mini"], "");
    let nodes: Vec<Arc<Gateway>> = tokio::task::spawn_blocking({
        let url = pg.url.clone();
        move || {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..3).map(|_| s.spawn(|| node(&url, &declared))).collect();
                handles.into_iter().map(|h| Arc::new(h.join().expect("node"))).collect()
            })
        }
    })
    .await
    .expect("nodes");

    // Load on B and C while A takes the new version.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for gw in [nodes[1].clone(), nodes[2].clone()] {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "load")).await;
                if status == 200 { &served } else { &failed }.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    eprintln!("failed under swap: {status} {body}");
                }
            }
        }));
    }
    let v2 = std::fs::read(crate::support::artifact("openai-v2.wasm")).expect("v2");
    let resp = crate::support::client()
        .put(nodes[0].url("/api/plugins/openai"))
        .bearer_auth(crate::support::ADMIN)
        .body(v2)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let uploaded = Instant::now();
    for gw in &nodes[1..] {
        let swapped = eventually(Duration::from_secs(30), || async {
            let (_, body) = post(gw, "/v1/chat/completions", &chat("gpt-4o-mini", "v2?")).await;
            body["system_fingerprint"] == "wasmgate-hotswap-v2"
        })
        .await;
        assert!(swapped.is_some(), "the plugin uploaded to A never served on another node");
    }
    println!("plugin uploaded to A served on B and C after {:?}", uploaded.elapsed());
    // Keep the load on a while after the swap (old instances draining).
    let _ = eventually(Duration::from_secs(10), || async { served.load(Ordering::Relaxed) >= 300 }).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load");
    }
    println!(
        "under load meanwhile: {} served, {} failed",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the shared hot swap");

    // A corrupt upload is refused on A and reaches no node.
    let resp = crate::support::client()
        .put(nodes[0].url("/api/plugins/openai"))
        .bearer_auth(crate::support::ADMIN)
        .body("not a component")
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for gw in &nodes {
        let (status, body) = post(gw, "/v1/chat/completions", &chat("gpt-4o-mini", "still v2")).await;
        assert_eq!((status, &body["system_fingerprint"]), (200, &json!("wasmgate-hotswap-v2")), "{body}");
    }

    // A delete is shared too, also with a node that was down when it happened.
    let mut nodes = nodes;
    Arc::get_mut(&mut nodes[2]).expect("no other handle").kill();
    let resp = crate::support::client()
        .delete(nodes[1].url("/api/plugins/openai"))
        .bearer_auth(crate::support::ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 204);
    let gone = |gw: Arc<Gateway>| async move {
        eventually(Duration::from_secs(10), || async {
            post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", "gone?")).await.0 == 503
        })
        .await
    };
    assert!(gone(nodes[0].clone()).await.is_some(), "a plugin deleted on B still serves on A");
    Arc::get_mut(&mut nodes[2]).expect("no other handle").try_start_again().expect("restart");
    let removed = gone(nodes[2].clone()).await;
    assert!(removed.is_some(), "a node that was down keeps a plugin deleted meanwhile:\n{}", nodes[2].log());
}

/// `wasmgate migrate` copies a single node's shared state into PostgreSQL,
/// twice with the same result, and a node on the database serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_copies_a_single_node_into_postgresql() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let mock = MockUpstream::start("m").await;
    let mut single = Gateway::start(&["openai.wasm", "weighted.wasm"], "# store: sled");
    let body = json!({"name": "migrated", "adapter": "openai", "base_url": mock.base_url(),
        "key": "sk-upstream-migrated-0123", "models": ["migrated-model"]});
    let (status, _) = admin(&single, Method::POST, "/api/channels", Some(&body)).await;
    assert_eq!(status, 201);
    let routing = json!({"policy": "weighted", "rules": [{"model": "migrated-model", "policy": "weighted"}]});
    assert_eq!(admin(&single, Method::PUT, "/api/routing", Some(&routing)).await.0, 200);
    let (uid, key) = crate::support::accounts::user_with_token(&single, 5_000, json!({})).await;
    let (status, _, _) = crate::support::accounts::call(&single, &key, &chat("migrated-model", "before")).await;
    assert_eq!(status, 200);
    let (_, before) = admin(&single, Method::GET, &format!("/api/users/{uid}"), None).await;
    let (status, stored) = post(&single, "/v1/responses", &json!({"model": "migrated-model", "input": "kept"})).await;
    assert_eq!(status, 200, "{stored}");
    crate::support::accounts::wait_rows(&single, "type=consume", 2).await;
    single.kill();

    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .args(["migrate", "--from"])
            .arg(&single.data_dir)
            .args(["--to", &pg.url, "--secrets-key", "multi-node-test-secret-0123456789", "--plugins"])
            .arg(&single.plugins_dir)
            .output()
            .expect("migrate");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let first = run();
    assert!(
        first.contains("1 channels, 1 options, 2 plugins, 1 users, 1 tokens, 2 usage rows, 1 stored responses"),
        "{first}"
    );
    assert_eq!(run(), first, "a second run changes nothing");

    let gw = tokio::task::spawn_blocking({
        let url = pg.url.clone();
        move || node(&url, "")
    })
    .await
    .expect("node");
    let (status, answer) = post(&gw, "/v1/chat/completions", &chat("migrated-model", "moved")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        mock.state.last_headers.lock().await.clone().expect("headers")["authorization"],
        "Bearer sk-upstream-migrated-0123"
    );
    let (_, table) = admin(&gw, Method::GET, "/api/routing", None).await;
    assert_eq!(table["source"], "api", "{table}");
    // The user, their balance and their token moved too.
    let (_, after) = admin(&gw, Method::GET, &format!("/api/users/{uid}"), None).await;
    assert_eq!((&after["quota"], &after["used_quota"]), (&before["quota"], &before["used_quota"]), "{after}");
    let (status, _, _) = crate::support::accounts::call(&gw, &key, &chat("migrated-model", "after")).await;
    assert_eq!(status, 200, "the migrated token serves");
    let id = stored["id"].as_str().expect("id");
    let got = crate::support::client()
        .get(gw.url(&format!("/v1/responses/{id}")))
        .bearer_auth(crate::support::TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(got.status().as_u16(), 200, "the stored response moved");
}

/// A usage batch written to the database again (a retry whose first commit
/// went through, a journal replayed after a crash) is inserted and charged
/// once: the writer inserts a batch as new, and only when one of its rows
/// is already there, keeping those — also for a batch half new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_batch_written_twice_is_inserted_and_charged_once() {
    use wasmgate::billing::journal::Change;
    use wasmgate::billing::logs::{LogKind, LogRow};
    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let q = |sql: &'static str| crate::support::postgres::query_i64(&pg.url, sql);
    let written = tokio::task::spawn_blocking({
        let url = pg.url.clone();
        move || {
            let db = wasmgate::store::postgres::Postgres::start(&url).expect("schema");
            let me = db.clone();
            db.block(async move {
                let c = me.pooled().await?;
                c.execute("INSERT INTO users (id, record, quota) VALUES (1, '{}', 1000)", &[]).await?;
                Ok(())
            })
            .expect("a user");
            let sink = wasmgate::billing::writer_pg::PgSink::new(&db, "node-a");
            let row = |id: u64| {
                let row = LogRow {
                    id,
                    kind: LogKind::Consume,
                    request_id: format!("req-{id}"),
                    user_id: Some(1),
                    quota: 5,
                    prompt_tokens: id,
                    ..LogRow::default()
                };
                (id, Change::Row(Box::new(row)))
            };
            let first = [row(1), row(2)];
            sink.write(&first).expect("a new batch");
            sink.write(&first).expect("the same batch again");
            sink.write(&[row(2), row(3)]).expect("a batch half new");
        }
    })
    .await;
    assert!(written.is_ok(), "the writes failed");
    assert_eq!(q("SELECT count(*) FROM usage_logs").await, 3, "each row once");
    assert_eq!(q("SELECT sum(prompt_tokens)::bigint FROM usage_logs").await, 6, "each row as first written");
    assert_eq!(q("SELECT used_quota FROM users WHERE id = 1").await, 15, "each row charged once");
    assert_eq!(q("SELECT request_count FROM users WHERE id = 1").await, 3);
    let total = q("SELECT u.quota + u.used_quota
                          + (SELECT COALESCE(sum(amount), 0) FROM quota_leases WHERE kind = 'u' AND id = 1)::bigint
                   FROM users u WHERE u.id = 1");
    assert_eq!(total.await, 1000, "balance + leases + used = what the user was given");
}

/// Recovery probes of a channel come from one node at a time; when that
/// node dies, another takes over once its lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_at_a_time_probes_a_disabled_channel() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let mock = MockUpstream::start("m").await;
    mock.set_mode(crate::support::mock::Mode::openai_error(401, "invalid_api_key", None));
    let extra = format!(
        "{}[health]\nprobe_interval_ms = 100\nmax_recovery_attempts = 100000\n",
        channel("probed", "openai", &mock.base_url(), &["probed-model"], "")
    );
    let mut nodes: Vec<Gateway> = tokio::task::spawn_blocking({
        let url = pg.url.clone();
        move || (0..3).map(|_| node(&url, &extra)).collect()
    })
    .await
    .expect("nodes");
    // A rejected key disables the channel (through node A's traffic).
    let (status, _) = post(&nodes[0], "/v1/chat/completions", &chat("probed-model", "x")).await;
    assert!(status >= 400);
    let probes = |gw: &Gateway| {
        let url = gw.url("/metrics");
        async move {
            let text = crate::support::client()
                .get(url)
                .bearer_auth(crate::support::ADMIN)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            text.lines()
                .filter(|l| l.starts_with("wasmgate_recovery_probes_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| v as u64)
                .sum::<u64>()
        }
    };
    let enough = eventually(Duration::from_secs(20), || async {
        let mut total = 0;
        for gw in &nodes {
            total += probes(gw).await;
        }
        total >= 10
    })
    .await;
    assert!(enough.is_some(), "no recovery probes");
    let mut counts = Vec::new();
    for gw in &nodes {
        counts.push(probes(gw).await);
    }
    let probing: Vec<usize> = (0..3).filter(|&i| counts[i] > 0).collect();
    assert_eq!(probing.len(), 1, "more than one node probes the channel: {counts:?}");
    println!("probes per node: {counts:?}");

    // The prober dies; another node takes over.
    let dead = probing[0];
    nodes[dead].kill();
    let others: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for &i in &others {
            v.push(probes(&nodes[i]).await);
        }
        v
    };
    let took_over = eventually(Duration::from_secs(20), || async {
        let mut grown = 0;
        for (k, &i) in others.iter().enumerate() {
            if probes(&nodes[i]).await > before[k] {
                grown += 1;
            }
        }
        grown >= 1
    })
    .await;
    assert!(took_over.is_some(), "no node took over the probes of the node that died");
}

/// `kill -9` of one node under load: the other nodes keep serving every
/// request, and after its restart every request the killed node answered
/// has exactly one usage row (its own journal, per node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_fails_no_request_elsewhere_and_loses_no_usage_row() {
    let PayingCluster { pg, mock: _mock, mut nodes, uid, key } = paying_cluster(3).await;
    let urls: Vec<String> = nodes.iter().map(|gw| gw.url("/v1/chat/completions")).collect();
    let load = Load::start(&urls, &key, &chat("per-call", "load"), 3);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    nodes[1].kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen = load.stop().await;
    for i in [0, 2] {
        let n = seen.answered[i].len();
        assert!(n > 20, "node {i} served under load: {n}");
        assert_eq!(seen.failures[i], Vec::<String>::new(), "node {i} failed requests while another node was killed");
    }
    nodes[1].try_start_again().expect("restart");
    let served = &seen.answered[1];
    let rows = crate::billing::consume_rows(&nodes[1]).await;
    let lost: Vec<&String> = served.iter().filter(|id| !rows.contains_key(*id)).collect();
    assert!(lost.is_empty(), "{} of {} answered requests have no usage row", lost.len(), served.len());
    let all: Vec<String> = seen.answered.concat();
    assert_one_row_each_and_balanced(&pg.url, uid, &all, PAYING_BALANCE).await;
    // The database is not on the request path: node A leased quota a few
    // times for all it answered.
    let leases = quota_leases_taken(&nodes[0]).await;
    let answered_a = seen.answered[0].len();
    println!("node A answered {answered_a} paying requests with {leases} quota leases taken from the database");
    assert!(leases > 0 && (leases as usize) < answered_a / 4, "{leases} leases for {answered_a} requests");
    println!(
        "kill -9 of one node of three: {} / {} answered by the others with 0 failures; the killed node answered {}, \
         {} usage rows after restart, none lost or duplicated",
        seen.answered[0].len(),
        seen.answered[2].len(),
        served.len(),
        rows.len()
    );
}

/// What the failure tests run against: a fresh PostgreSQL, a mock, nodes
/// with one channel of the `per-call` model, and a paying user's token
/// (balance [`PAYING_BALANCE`]) known on every node, so that every answer
/// moves the shared balance.
pub(crate) struct PayingCluster {
    pub pg: PgServer,
    pub mock: MockUpstream,
    pub nodes: Vec<Gateway>,
    pub uid: u64,
    pub key: String,
}

/// The paying user's balance in a [`PayingCluster`].
pub(crate) const PAYING_BALANCE: i64 = 10_000_000;

/// A [`PayingCluster`] of `n` nodes.
pub(crate) async fn paying_cluster(n: usize) -> PayingCluster {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let mock = MockUpstream::start("m").await;
    let declared = format!("{PER_CALL}\n{}", channel("c", "openai", &mock.base_url(), &["per-call"], ""));
    let nodes: Vec<Gateway> = tokio::task::spawn_blocking({
        let url = pg.url.clone();
        move || (0..n).map(|_| node(&url, &declared)).collect()
    })
    .await
    .expect("nodes");
    let (uid, key) = crate::support::accounts::user_with_token(&nodes[0], PAYING_BALANCE, json!({})).await;
    known_everywhere(&nodes, &key).await;
    PayingCluster { pg, mock, nodes, uid, key }
}

/// How many quota leases `gw` took from the database (its metrics).
pub(crate) async fn quota_leases_taken(gw: &Gateway) -> u64 {
    let scrape = crate::support::client().get(gw.url("/metrics")).send().await.expect("scrape");
    let text = scrape.text().await.expect("metrics");
    text.lines()
        .find(|l| l.starts_with("wasmgate_quota_leases_total{kind=\"acquired\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// In the shared table, eventually: exactly one consume row per request id
/// in `answered` (all nodes together), Σ logged charges = the user's used
/// quota, and balance + leases + used = `given`.
pub(crate) async fn assert_one_row_each_and_balanced(url: &str, uid: u64, answered: &[String], given: i64) {
    let q = |sql: String| async move { crate::support::postgres::query_i64(url, &sql).await };
    let ids = answered.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
    let rows_of_answered =
        || q(format!("SELECT count(*) FROM usage_logs WHERE kind = 'consume' AND request_id IN ({ids})"));
    // Waits for these requests' rows: other users' rows (a token that
    // needed a lease, say) must not stand in for one still being written.
    let written =
        eventually(Duration::from_secs(20), || async { rows_of_answered().await as usize >= answered.len() }).await;
    assert!(written.is_some(), "the shared usage table misses answered requests");
    let rows_for_answered = rows_of_answered().await;
    let distinct = q(format!(
        "SELECT count(DISTINCT request_id) FROM usage_logs WHERE kind = 'consume' AND request_id IN ({ids})"
    ))
    .await;
    let n = answered.len() as i64;
    assert_eq!((rows_for_answered, distinct), (n, n), "one row per answered request");
    // Each equation read in one statement (one snapshot): idle nodes keep
    // returning leases meanwhile.
    let unlogged = q(format!(
        "SELECT u.used_quota - (SELECT COALESCE(sum(quota), 0) FROM usage_logs WHERE user_id = u.id)::bigint
         FROM users u WHERE u.id = {uid}"
    ))
    .await;
    assert_eq!(unlogged, 0, "Σ logged charges = used quota");
    let total = q(format!(
        "SELECT u.quota + u.used_quota
                + (SELECT COALESCE(sum(amount), 0) FROM quota_leases WHERE kind = 'u' AND id = u.id)::bigint
         FROM users u WHERE u.id = {uid}"
    ))
    .await;
    assert_eq!(total, given, "balance + leases + used = what the user was given");
}

/// Wait until `key` authenticates on every one of `nodes` (a token created
/// on one node reaches the others through the database).
pub(crate) async fn known_everywhere(nodes: &[impl std::borrow::Borrow<Gateway>], key: &str) {
    for gw in nodes.iter().map(std::borrow::Borrow::borrow) {
        let known = eventually(Duration::from_secs(10), || async {
            let resp = crate::support::client().get(gw.url("/v1/models")).bearer_auth(key).send().await;
            resp.is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(known.is_some(), "a token never reached {}", gw.url(""));
    }
}

/// One request's price on the quota test's model: its estimate is its
/// charge, so a balance of 1,000 covers exactly 100 requests.
pub(crate) const PER_CALL: &str = "[pricing]\nquota_per_dollar = 1000\nunpriced = \"refuse\"\n\
[pricing.models.per-call]\nprice = 0.01\n[pricing.models.hold-call]\nprice = 0.01\n";

/// A user created on A spends one balance through three nodes: 300
/// concurrent requests against quota for 100 never overdraw it, every
/// charge is a usage row in the shared table, nothing stays leased, and a
/// requests-per-minute limit holds across the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_one_balance_and_one_rate_limit() {
    use crate::support::accounts::{call, concurrent_calls, user_with_token};
    use crate::support::postgres::query_i64;
    use std::sync::Arc;

    let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("postgres");
    let mock = MockUpstream::start("m").await;
    let config = format!("{PER_CALL}\n{}", channel("c", "openai", &mock.base_url(), &["per-call", "hold-call"], ""));
    let nodes: Vec<Arc<Gateway>> = tokio::task::spawn_blocking({
        let url = pg.url.clone();
        move || (0..3).map(|_| Arc::new(node(&url, &config))).collect()
    })
    .await
    .expect("nodes");
    let body = json!({"model": "per-call", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});

    // A user and token created on A authenticate on B and C.
    let (uid, key) = user_with_token(&nodes[0], 1_000, json!({})).await;
    let created = Instant::now();
    known_everywhere(&nodes[1..], &key).await;
    println!("a token created on A authenticated on B and C after {:?}", created.elapsed());

    // 300 concurrent requests, round robin over the nodes, quota for 100.
    let burst_ok = concurrent_calls(&nodes, &key, &body, 300, "insufficient_quota").await;
    assert!(burst_ok <= 100, "{burst_ok} of 300 succeeded against quota for 100");
    // What the burst left unspent is returned by idle nodes, so the rest
    // of the balance is spendable from any node: exactly 100 in all.
    let (mut later_ok, mut refused) = (0, 0);
    for i in 0.. {
        let (status, answer, _) = call(&nodes[i % 3], &key, &body).await;
        match status {
            200 => (later_ok, refused) = (later_ok + 1, 0),
            429 if answer["error"]["code"] == "insufficient_quota" => {
                // Perhaps only leased by another node: idle leases return
                // within a second or two. Refused on every node: spent.
                refused += 1;
                if refused > 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
        assert!(burst_ok + later_ok <= 100, "more than 100 requests charged");
    }
    println!("300 concurrent requests over 3 nodes, quota for 100: {burst_ok} succeeded; then {later_ok} more");
    assert_eq!(burst_ok + later_ok, 100, "the balance covers exactly 100 requests");
    let settled = eventually(Duration::from_secs(10), || async {
        let leased = query_i64(&pg.url, "SELECT sum(amount)::bigint FROM quota_leases WHERE kind = 'u'").await;
        let used = query_i64(&pg.url, &format!("SELECT used_quota FROM users WHERE id = {uid}")).await;
        leased == 0 && used == 1_000
    })
    .await;
    let (quota, used, rows, charged) = (
        query_i64(&pg.url, &format!("SELECT quota FROM users WHERE id = {uid}")).await,
        query_i64(&pg.url, &format!("SELECT used_quota FROM users WHERE id = {uid}")).await,
        query_i64(&pg.url, &format!("SELECT count(*) FROM usage_logs WHERE user_id = {uid} AND kind = 'consume'"))
            .await,
        query_i64(&pg.url, &format!("SELECT sum(quota)::bigint FROM usage_logs WHERE user_id = {uid}")).await,
    );
    assert!(settled.is_some(), "leases not returned or usage not written: quota {quota}, used {used}");
    assert_eq!((quota, used, rows, charged), (0, 1_000, 100, 1_000), "balance, used, rows, Σ charges");
    for gw in &nodes {
        let (_, u) = admin(gw, Method::GET, &format!("/api/users/{uid}"), None).await;
        assert_eq!((u["quota"].as_i64(), u["used_quota"].as_i64()), (Some(0), Some(1_000)), "{u}");
    }

    // A requests-per-minute limit of 60 holds over the three nodes.
    let (_, limited) = user_with_token(&nodes[1], 1_000_000, json!({"rpm": 60})).await;
    known_everywhere(&nodes, &limited).await;
    let ok = concurrent_calls(&nodes, &limited, &body, 90, "rate_limit_exceeded").await;
    println!("90 requests over 3 nodes with rpm = 60: {ok} succeeded");
    assert!((59..=61).contains(&ok), "rpm 60 across nodes let {ok} through");

    // What a shared per-minute window costs a request (a figure, not a
    // bound): sequential requests on one node, a token with an rpm of its
    // own against one without.
    let (_, plain) = user_with_token(&nodes[0], 1_000_000, json!({})).await;
    let (_, windowed) = user_with_token(&nodes[0], 1_000_000, json!({"rpm": 100_000})).await;
    let mut p50 = Vec::new();
    for k in [&plain, &windowed] {
        let mut times = Vec::new();
        for _ in 0..40 {
            let started = Instant::now();
            assert_eq!(call(&nodes[0], k, &body).await.0, 200);
            times.push(started.elapsed());
        }
        times.sort();
        p50.push(times[times.len() / 2]);
    }
    println!("one node, sequential: p50 {:?} without a shared rpm window, {:?} with one", p50[0], p50[1]);

    // A token's own concurrency of 2 holds over the nodes: two streams held
    // open on A and B, a third request on C is refused until one ends.
    let (_, two) = user_with_token(&nodes[2], 1_000_000, json!({"concurrency": 2})).await;
    // Known on A and B first: a stream refused there with a 401 would hold
    // no slot (CI saw C admit the third request so).
    known_everywhere(&nodes, &two).await;
    let held = json!({"model": "hold-call", "stream": true, "messages": [{"role": "user", "content": "hold"}]});
    let (_, mut first) = crate::support::accounts::open_stream(&nodes[0], &two, &held).await;
    let (_, mut second) = crate::support::accounts::open_stream(&nodes[1], &two, &held).await;
    use futures_util::StreamExt;
    assert!(first.next().await.is_some_and(|c| c.is_ok()) && second.next().await.is_some_and(|c| c.is_ok()));
    let (status, answer, _) = call(&nodes[2], &two, &body).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")), "{answer}");
    mock.release();
    while first.next().await.is_some() {}
    while second.next().await.is_some() {}
    let freed = eventually(Duration::from_secs(10), || async { call(&nodes[2], &two, &body).await.0 == 200 }).await;
    assert!(freed.is_some(), "the shared in-flight slots were not given back");

    // A larger limit, where nodes keep spare slots (1/32 of it): 48 held
    // streams over the three nodes never get more than 32 in, and every
    // slot is back in the database once they end and the nodes idle.
    let (_, wide) = user_with_token(&nodes[0], 1_000_000, json!({"concurrency": 32})).await;
    // Known on every node first: a node that has not heard of the token yet
    // answers 401 (CI saw a third of the 48 refused so).
    known_everywhere(&nodes, &wide).await;
    // `release` above left a wake-up for the next held stream: take it.
    let _ = tokio::time::timeout(Duration::from_millis(10), mock.state.release.notified()).await;
    let opened: Vec<_> = futures_util::future::join_all((0..48).map(|i| {
        let (gw, key, held) = (nodes[i % 3].clone(), wide.clone(), held.clone());
        async move { crate::support::accounts::send_chat(&gw, &key, &held).await }
    }))
    .await;
    let admitted = opened.iter().filter(|r| r.status() == 200).count();
    let refused = opened.iter().filter(|r| r.status() == 429).count();
    let counted = query_i64(&pg.url, "SELECT sum(count)::bigint FROM in_flight").await;
    println!("48 held streams over 3 nodes with concurrency 32: {admitted} admitted, {refused} refused");
    let statuses: Vec<u16> = opened.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(admitted + refused, 48, "only 200 or 429: {statuses:?}");
    assert!(admitted <= 32 && counted <= 32, "concurrency 32 let {admitted} in ({counted} slots held)");
    assert!(admitted >= 32 - 3, "spare slots kept by the nodes refused too many: {admitted}");
    mock.release();
    for resp in opened {
        let _ = resp.bytes().await;
    }
    let returned = eventually(Duration::from_secs(10), || async {
        query_i64(&pg.url, "SELECT COALESCE(sum(count), 0)::bigint FROM in_flight").await == 0
    })
    .await;
    assert!(returned.is_some(), "idle nodes kept in-flight slots");
}
