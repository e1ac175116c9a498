//! The shared database stopped or hung under load: gateway nodes on one
//! real PostgreSQL keep serving a paying token from the quota they leased,
//! a request that needs the database is answered 503 rather than held, and
//! once the database is back every answered request has exactly one usage
//! row and the balance adds up.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::multi_node::{
    PAYING_BALANCE, PayingCluster, assert_one_row_each_and_balanced, paying_cluster, quota_leases_taken,
};
use crate::support::load::Load;
use crate::support::{chat, eventually};

/// How long the database is down.
const OUTAGE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_stopped_for_ten_seconds_under_load_loses_nothing() {
    let PayingCluster { pg, mock: _mock, nodes, uid, key } = paying_cluster(2).await;
    let urls: Vec<String> = nodes.iter().map(|gw| gw.url("/v1/chat/completions")).collect();
    let load = Load::start(&urls, &key, &chat("per-call", "load"), 2);
    leases_cover(&pg.url, uid, &load, 2, 20.0).await;
    let pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.stop();
        pg
    })
    .await
    .expect("stop postgres");
    let before: Vec<usize> = (0..2).map(|i| load.answered(i)).collect();
    let stopped = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let during: Vec<usize> = (0..2).map(|i| load.answered(i) - before[i]).collect();
    let pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.start_again();
        pg
    })
    .await
    .expect("start postgres again");
    println!("the database was down for {:?}; answered meanwhile: {during:?}", stopped.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = load.stop().await;
    for (i, failures) in seen.failures.iter().enumerate() {
        let first: Vec<&String> = failures.iter().take(3).collect();
        assert!(failures.is_empty(), "node {i}: {} requests failed, first {first:?}", failures.len());
        assert!(during[i] > 20, "node {i} served {} requests while the database was down", during[i]);
    }
    // Nothing lost: the shared table and each node's own log hold every
    // answered request once, and the balance adds up. (What was journaled
    // during the outage is written when the database is back.)
    let all = seen.answered.concat();
    assert_one_row_each_and_balanced(&pg.url, uid, &all, PAYING_BALANCE).await;
    for (i, gw) in nodes.iter().enumerate() {
        let flushed = eventually(Duration::from_secs(20), || async {
            let page = crate::support::accounts::logs(gw, "type=consume").await;
            page["total"].as_u64().unwrap_or(0) as usize >= seen.answered[i].len()
        })
        .await;
        assert!(flushed.is_some(), "node {i}: its log misses answered requests");
        let rows = crate::billing::consume_rows(gw).await;
        let missing = seen.answered[i].iter().filter(|id| !rows.contains_key(*id)).count();
        assert_eq!(missing, 0, "node {i}: answered requests with no usage row in its log");
        same_rows_in_the_shared_table(&pg.url, &rows).await;
    }
    let leases: Vec<u64> = futures_util::future::join_all(nodes.iter().map(quota_leases_taken)).await;
    println!(
        "database stopped for 10 s under load on 2 nodes: {} requests answered ({:?} during the outage), 0 failed, \
         {} usage rows, one each; quota leases taken per node: {leases:?}",
        all.len(),
        during,
        all.len()
    );
}

/// A database that hangs (every PostgreSQL process stopped with SIGSTOP:
/// connections stay open, nothing answers) for about 8 s under load: the paying
/// token keeps being served from its lease, a token that needs a lease is
/// answered 503 `storage_unavailable` instead of waiting on the database,
/// and after the thaw that token is served and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_database_holds_no_request_and_loses_nothing() {
    let PayingCluster { pg, mock: _mock, nodes, uid, key } = paying_cluster(1).await;
    let gw = &nodes[0];
    // A second paying user, who has not spent anything yet: their first
    // request needs a lease from the database.
    let (_, fresh) = crate::support::accounts::user_with_token(gw, PAYING_BALANCE, json!({})).await;

    let load = Load::start(&[gw.url("/v1/chat/completions")], &key, &chat("per-call", "load"), 2);
    leases_cover(&pg.url, uid, &load, 1, 20.0).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.pause();
        pg
    })
    .await
    .expect("pause");
    let (before, paused) = (load.answered(0), Instant::now());
    let (status, answer, _) = crate::support::accounts::call(gw, &fresh, &chat("per-call", "needs a lease")).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("storage_unavailable")), "{answer}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (during, hung) = (load.answered(0) - before, paused.elapsed());
    let pg = tokio::task::spawn_blocking(move || {
        pg.resume();
        pg
    })
    .await
    .expect("resume");
    let served = eventually(Duration::from_secs(30), || async {
        crate::support::accounts::call(gw, &fresh, &chat("per-call", "after")).await.0 == 200
    })
    .await;
    assert!(served.is_some(), "the token needing a lease was not served after the database came back");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = load.stop().await;
    let first: Vec<&String> = seen.failures[0].iter().take(3).collect();
    assert!(seen.failures[0].is_empty(), "{} requests failed, first {first:?}", seen.failures[0].len());
    assert!(during > 20, "{during} requests served while the database hung");
    assert_one_row_each_and_balanced(&pg.url, uid, &seen.answered[0], PAYING_BALANCE).await;
    println!(
        "database hung for {hung:?} under load: {during} requests answered meanwhile, 0 failed; a request needing \
         a lease got 503 storage_unavailable; {} answered in all, one usage row each",
        seen.answered[0].len()
    );
}

/// What each answered `per-call` request costs: $0.01 at 1,000 quota per
/// dollar (see `multi_node::PER_CALL`).
const QUOTA_PER_CALL: f64 = 10.0;

/// Wait until the quota lease each of the first `nodes` nodes holds for
/// user `uid` covers `secs` of the rate it serves `load` at now. A node
/// sizes its lease to about a minute of the account's recent spend (see
/// `billing::leases`), so this holds within seconds of a steady load; but
/// a load still speeding up (a cold debug build on a busy machine) can
/// outrun the estimate, and an outage begun then would test the ramp,
/// not the outage.
async fn leases_cover(url: &str, uid: u64, load: &Load, nodes: usize, secs: f64) {
    for i in 0..nodes {
        let start = Instant::now();
        loop {
            let (count, since) = (load.answered(i), Instant::now());
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rate = (load.answered(i) - count) as f64 / since.elapsed().as_secs_f64();
            // The node's id is on the usage row of a request it answered
            // (the first: the last one's row may not be written yet).
            let held = match load.first_answered(i) {
                Some(id) => {
                    let sql = format!(
                        "SELECT COALESCE(max(l.amount), 0)::bigint FROM quota_leases l
                         JOIN usage_logs u ON u.node = l.node AND u.request_id = '{id}'
                         WHERE l.kind = 'u' AND l.id = {uid}"
                    );
                    crate::support::postgres::query_i64(url, &sql).await
                }
                None => 0,
            };
            if rate > 0.0 && held as f64 >= rate * QUOTA_PER_CALL * secs {
                println!("node {i}: serving {rate:.0} requests/s, it holds a lease of {held} quota");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node {i}'s lease ({held} quota) never covered {secs} s of the {rate:.0} requests/s it serves"
            );
        }
    }
}

/// Every field of each of `rows` (a node's own log) is what the shared
/// table's columns hold for it.
async fn same_rows_in_the_shared_table(url: &str, rows: &std::collections::HashMap<String, serde_json::Value>) {
    let shared = crate::support::postgres::query_json(
        url,
        "SELECT to_jsonb(u) - 'node' FROM usage_logs u WHERE kind = 'consume' ORDER BY at_ms DESC LIMIT 500",
    )
    .await;
    let mut compared = 0;
    for row in &shared {
        let Some(own) = row["request_id"].as_str().and_then(|id| rows.get(id)) else { continue };
        for (field, value) in row.as_object().expect("an object") {
            assert_eq!(&own[field], value, "field {field}: the node's log has {own}, the shared table {row}");
        }
        compared += 1;
    }
    assert!(compared > 0, "no row of this node among the shared table's latest");
}
