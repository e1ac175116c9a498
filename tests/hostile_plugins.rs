//! Hostile plugins: a trap, an endless loop, a memory hog and garbage output
//! each fail only their own request with a 502 `plugin_error`, reported as
//! what it was (work budget, memory limit, trap), while the gateway keeps
//! serving everyone else. The same misbehaviour from a WASI component (whose
//! panic handler writes to stderr, and which can block in a WASI sleep)
//! fails its request the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Gateway, MockUpstream, TOKEN, assert_openai_error, channel, client, post};
use serde_json::{Value, json};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "misbehave"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_misbehaviour_fails_only_its_own_request() {
    let mock = MockUpstream::start("ok").await;
    let hostile_models = ["trap", "spin", "hog", "garbage-body", "garbage-url", "garbage-stream"];
    let channels = channel("hostile", "hostile", &mock.base_url(), &hostile_models, "")
        + &channel("good", "openai", &mock.base_url(), &["gpt-4o-mini"], "");
    let mut gw = Gateway::start(&["openai.wasm", "weighted.wasm", "hostile.wasm"], &channels);
    let gw_url = gw.url("/v1/chat/completions");

    // Well-behaved traffic runs the whole time on another plugin.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut background = Vec::new();
    for _ in 0..4 {
        let (stop, ok, bad, url) = (stop.clone(), ok.clone(), bad.clone(), gw_url.clone());
        background.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let resp = c.post(&url).bearer_auth(TOKEN).json(&chat("gpt-4o-mini", false)).send().await;
                match resp {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => bad.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }

    for model in hostile_models {
        let stream = model == "garbage-stream";
        // Several rounds, including concurrent ones, per misbehaviour.
        let mut rounds = Vec::new();
        for _ in 0..4 {
            let url = gw_url.clone();
            rounds.push(tokio::spawn(async move {
                let start = Instant::now();
                let resp =
                    client().post(&url).bearer_auth(TOKEN).json(&chat(model, stream)).send().await.expect("send");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("OpenAI error JSON");
                (status, body, start.elapsed())
            }));
        }
        for round in rounds {
            let (status, body, elapsed) = round.await.expect("round");
            assert_eq!(status, 502, "{model}: {body}");
            assert_eq!(assert_openai_error(&body), "plugin_error", "{model}: {body}");
            let text = body.to_string();
            assert!(
                !text.contains("127.0.0.1") && !text.contains("sk-upstream") && !text.contains("wasm"),
                "{model} leaks: {text}"
            );
            println!("{model}: 502 plugin_error in {elapsed:?}");
        }
        assert!(gw.alive(), "gateway died on {model}");
    }
    stop.store(true, Ordering::SeqCst);
    for b in background {
        b.await.expect("background");
    }
    let (ok, bad) = (ok.load(Ordering::SeqCst), bad.load(Ordering::SeqCst));
    println!("background traffic during the hostile calls: {ok} ok, {bad} failed");
    assert!(ok > 0, "background traffic never ran");
    assert_eq!(bad, 0, "well-behaved requests failed while hostile plugins ran");

    let log = gw.log();
    assert!(log.contains("exceeded its work budget"), "the endless loop must be reported as out of fuel");
    assert!(log.contains("reached its memory limit"), "the memory hog must be reported as such");
    assert!(log.contains("outside the channel's origin"), "the foreign URL must be reported");
    // The hostile plugin is still loaded and still serves well-formed requests.
    let (code, body) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(gw.alive());
    // Every failure was counted against the plugin (and none against the channel).
    let (_, plugins) = crate::support::admin(&gw, reqwest::Method::GET, "/api/plugins/hostile", None).await;
    assert!(plugins["call_failures"].as_u64().is_some_and(|n| n >= 20), "{plugins}");
    let (_, channel) = crate::support::admin(&gw, reqwest::Method::GET, "/api/channels/1", None).await;
    assert_eq!(channel["status"]["state"], "enabled", "{channel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wasi_plugin_may_write_to_stderr_and_block_without_harming_anyone() {
    let mock = MockUpstream::start("ok").await;
    let models = ["trap", "stderr", "sleep"];
    let channels = channel("hostile", "hostile", &mock.base_url(), &models, "")
        + &channel("good", "openai", &mock.base_url(), &["gpt-4o-mini"], "");
    let mut gw = Gateway::start_with(
        &["openai.wasm", "weighted.wasm", "hostile-wasip1.wasm:hostile.wasm"],
        "call_timeout_ms = 1500",
        &channels,
    );
    // Its stderr works: the call succeeds and the line reaches the log.
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("stderr", false)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        crate::support::eventually(Duration::from_secs(5), || async { gw.log().contains("a line on stderr") })
            .await
            .is_some(),
        "the plugin's stderr is logged"
    );
    // A panic (whose handler writes to stderr) is a 502 for that request only.
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("trap", false)).await;
    assert_eq!((status, assert_openai_error(&body)), (502, "plugin_error".to_string()), "{body}");
    assert!(gw.log().contains("deliberate trap"), "the panic message is kept for the operator");
    // A call blocked in WASI meets the wall-clock safety net; others go on.
    let sleeper = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            let resp = client().post(url).bearer_auth(TOKEN).json(&chat("sleep", false)).send().await.expect("send");
            (resp.status().as_u16(), resp.json::<Value>().await.expect("json"))
        }
    });
    for _ in 0..10 {
        let (status, body) = post(&gw, "/v1/chat/completions", &chat("gpt-4o-mini", false)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = sleeper.await.expect("sleeper");
    assert_eq!((status, assert_openai_error(&body)), (502, "plugin_error".to_string()), "{body}");
    assert!(gw.log().contains("exceeded its time limit"), "reported as the time limit");
    assert!(!gw.log().contains("Cannot start a runtime"), "no worker panicked");
    assert!(gw.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decoder_state_past_the_limit_ends_its_stream_with_an_error() {
    let mock = MockUpstream::start("ok").await;
    let gw = Gateway::start(
        &["hostile.wasm", "weighted.wasm"],
        &channel("h", "hostile", &mock.base_url(), &["big-state"], ""),
    );
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&chat("big-state", true))
        .send()
        .await
        .expect("send");
    let text = resp.text().await.expect("body");
    assert!(text.contains("plugin_error"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(gw.log().contains("stream decoder state of"), "the cause is logged");
}

/// WIT 0.1.4's `channel-context`: an adapter sees its channel's settings in
/// `parse-response`, which gets no channel argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_sees_its_channels_settings_while_parsing_the_answer() {
    let mock = MockUpstream::start("mock").await;
    let channels = channel("h", "hostile", &mock.base_url(), &["echo-settings"], "settings = { region = \"eu-west\" }");
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm", "hostile.wasm"], &channels);
    let (status, body) = post(&gw, "/v1/chat/completions", &chat("echo-settings", false)).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().expect("content");
    let settings: serde_json::Value = serde_json::from_str(content).expect("settings JSON");
    assert_eq!(settings["region"], "eu-west", "{content}");
}

/// Context switches so far of the thread named `name` in process `pid`.
fn thread_switches(pid: u32, name: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim() != name {
            return None;
        }
        let status = std::fs::read_to_string(task.path().join("status")).ok()?;
        let count = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        Some(count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:"))
    })
}

/// Whether the thread `name` of `pid` comes to a spell of 200 ms without
/// waking once (within 30 s). A thread on a timer of a few ms never does.
async fn goes_quiet(pid: u32, name: &str) -> bool {
    crate::support::eventually(Duration::from_secs(30), || async {
        let before = thread_switches(pid, name);
        tokio::time::sleep(Duration::from_millis(200)).await;
        before.is_some() && thread_switches(pid, name) == before
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_idle_spell_a_spinning_call_still_yields_its_only_worker() {
    let mock = MockUpstream::start("ok").await;
    // One request worker: a call that held it would stall every other.
    let channels = String::from("[server]\nworkers = 1\n")
        + &channel("hostile", "hostile", &mock.base_url(), &["spin"], "")
        + &channel("good", "openai", &mock.base_url(), &["gpt-4o-mini"], "");
    // Enough fuel for the loop to run a second or more.
    let gw =
        Gateway::start_with(&["openai.wasm", "weighted.wasm", "hostile.wasm"], "fuel_per_call = 4000000000", &channels);
    let ok = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]});
    let (status, body) = post(&gw, "/v1/chat/completions", &ok).await;
    assert_eq!(status, 200, "{body}");

    // Idle, the epoch ticker and the billing writer stop waking.
    let pid = gw.pid();
    assert!(goes_quiet(pid, "wasm-epoch").await, "an idle gateway's epoch ticker sleeps");
    assert!(goes_quiet(pid, "billing-writer").await, "an idle gateway's billing writer sleeps");
    let asleep = thread_switches(pid, "wasm-epoch").expect("ticker thread");

    // The spinning call wakes the ticker, and yields at its ticks: the one
    // worker serves other requests while the loop runs.
    let spinner = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            let resp = client().post(url).bearer_auth(TOKEN).json(&chat("spin", false)).send().await.expect("send");
            (resp.status().as_u16(), resp.json::<Value>().await.expect("json"))
        }
    });
    let woken = crate::support::eventually(Duration::from_secs(30), || async {
        thread_switches(pid, "wasm-epoch").is_some_and(|n| n > asleep)
    })
    .await;
    assert!(woken.is_some(), "a call wakes the epoch ticker");
    for _ in 0..5 {
        let (status, body) = post(&gw, "/v1/chat/completions", &ok).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(!spinner.is_finished(), "the others were served while the loop ran, not after it");
    let (status, body) = spinner.await.expect("spinner");
    assert_eq!((status, assert_openai_error(&body)), (502, "plugin_error".to_string()), "{body}");
    assert!(gw.log().contains("exceeded its work budget"), "the loop ended by its fuel");
}
