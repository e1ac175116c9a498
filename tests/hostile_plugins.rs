//! Hostile plugins: a trap, an endless loop, a memory hog and garbage output
//! each fail only their own request, within the deadline, with a 502
//! `plugin_error`, while the gateway keeps serving everyone else.

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
            assert!(elapsed < Duration::from_secs(2), "{model}: took {elapsed:?}");
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
    assert!(log.contains("exceeded its time limit"), "the endless loop must be reported as a timeout");
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
}
