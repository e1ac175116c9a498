//! The web console: an operator's first session and a user's self-service
//! view driven in a real headless Chromium (Debian's `chromium`, through
//! Playwright; both installed by `cargo xtask test`), then what the browser
//! cannot show on its own — sign-in limits, expiry, CSRF refusals, asset
//! caching, cursor paging and the dashboard's sums — over plain HTTP.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::{COOKIE, HeaderMap, SET_COOKIE};
use serde_json::{Value, json};

use crate::support::accounts::{call, user_with_token};
use crate::support::{
    ADMIN, Gateway, MockUpstream, admin, artifact, channel, chat, client, eventually, root, run_python,
};

const SEED_SECRET: &str = "sk-upstream-secret-seed";
const BROWSER_SECRET: &str = "sk-upstream-typed-in-the-browser-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_runs_the_gateway_from_the_console_in_a_real_browser() {
    let mock = MockUpstream::start("mock").await;
    let gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &channel("seed", "openai", &mock.base_url(), &["seed-model"], ""),
    );
    // Another user's traffic, which the self-service view must never show.
    let (_, bob) = user_with_token(&gw, 1_000_000, json!({"name": "bob-key"})).await;
    let (status, body, _) = call(&gw, &bob, &chat("seed-model", "bob was here")).await;
    assert_eq!(status, 200, "{body}");

    let shots = root().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshots dir");
    let env = vec![
        ("WASMGATE_URL", gw.url("")),
        ("WASMGATE_ADMIN", ADMIN.to_string()),
        ("MOCK_URL", mock.base_url()),
        ("PLUGIN_FILE", artifact("round-robin.wasm").to_string_lossy().into_owned()),
        ("SHOTS_DIR", shots.to_string_lossy().into_owned()),
        ("OTHER_TOKEN_NAME", "bob-key".to_string()),
        ("UPSTREAM_SECRET", BROWSER_SECRET.to_string()),
    ];
    let stdout = run_python("console_check.py", env).await;
    assert!(stdout.contains("console: 18 passed, 0 failed"), "{stdout}");
    for page in ["dashboard", "channels", "plugins", "users", "tokens", "logs", "settings", "self-logs"] {
        assert!(shots.join(format!("{page}.png")).exists(), "no screenshot of {page}");
    }
    // What the browser did is what the API holds.
    let (_, channels) = admin(&gw, Method::GET, "/api/channels?q=browser-channel", None).await;
    assert_eq!(channels["data"][0]["status"]["state"], "manually_disabled", "{channels}");
    assert_eq!(channels["data"][0]["status"]["note"], "maintenance window", "{channels}");
    for secret in [SEED_SECRET, BROWSER_SECRET] {
        for path in ["/api/channels", "/api/dashboard", "/api/logs?limit=100", "/api/logs/export", "/api/status"] {
            let (_, body) = admin(&gw, Method::GET, path, None).await;
            assert!(!body.to_string().contains(secret), "{path} shows an upstream key");
        }
    }
}

/// A signed-in console session over plain HTTP: its cookie and CSRF token.
pub(crate) struct Session {
    cookie: String,
    pub(crate) csrf: String,
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    let set = headers.get(SET_COOKIE)?.to_str().ok()?;
    Some(set.split(';').next()?.to_string())
}

pub(crate) async fn sign_in(gw: &Gateway, token: &str) -> (u16, Value, Option<String>, HeaderMap) {
    let resp = client().post(gw.url("/api/session")).json(&json!({"token": token})).send().await.expect("send");
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, session_cookie(&headers), headers)
}

pub(crate) async fn admin_session(gw: &Gateway) -> Session {
    let (status, body, cookie, headers) = sign_in(gw, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    let set = headers[SET_COOKIE].to_str().expect("cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(attr), "cookie lacks {attr}: {set}");
    }
    assert!(!set.contains("Secure"), "Secure over plain HTTP: {set}");
    Session { cookie: cookie.expect("cookie"), csrf: body["csrf_token"].as_str().expect("csrf").to_string() }
}

pub(crate) async fn with_session(
    gw: &Gateway,
    s: &Session,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = client().request(method, gw.url(path)).header(COOKIE, &s.cookie);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_refuse_cross_site_posts_expired_sessions_and_guessing() {
    let gw =
        Gateway::start(&["openai.wasm", "weighted.wasm"], "[console]\nsession_secs = 2\nmax_failed_sign_ins = 3\n");
    let s = admin_session(&gw).await;
    let host = gw.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let own_origin = format!("http://{host}");

    // Reads need only the cookie; the admin API keeps taking bearer tokens.
    assert_eq!(with_session(&gw, &s, Method::GET, "/api/users", None, &[]).await.0, 200);
    assert_eq!(admin(&gw, Method::GET, "/api/users", None).await.0, 200);
    // A state-changing call without the CSRF token, or from another origin, is refused.
    let user = json!({"name": "mallory"});
    let (status, body) = with_session(&gw, &s, Method::POST, "/api/users", Some(user.clone()), &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("csrf_failed")), "{body}");
    let cross = [("x-csrf-token", s.csrf.as_str()), ("origin", "http://evil.example")];
    let (status, body) = with_session(&gw, &s, Method::POST, "/api/users", Some(user.clone()), &cross).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("csrf_failed")), "{body}");
    let resp = client()
        .post(gw.url("/api/session"))
        .header("origin", "http://evil.example")
        .json(&json!({"token": ADMIN}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 403, "a sign-in posted from another site was accepted");
    let same = [("x-csrf-token", s.csrf.as_str()), ("origin", own_origin.as_str())];
    let (status, body) = with_session(&gw, &s, Method::POST, "/api/users", Some(user), &same).await;
    assert_eq!(status, 201, "{body}");

    // The session expires by itself; then every call says so.
    let expired = eventually(Duration::from_secs(10), || async {
        let (status, body) = with_session(&gw, &s, Method::GET, "/api/session", None, &[]).await;
        status == 401 && body["error"]["code"] == "session_expired"
    })
    .await;
    assert!(expired.is_some(), "the session never expired");
    let (status, body) = with_session(&gw, &s, Method::GET, "/api/users", None, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("session_expired")), "{body}");

    // Signing out ends the session at once.
    let s = admin_session(&gw).await;
    let (status, _) = with_session(&gw, &s, Method::DELETE, "/api/session", None, &[("x-csrf-token", &s.csrf)]).await;
    assert_eq!(status, 200);
    assert_eq!(with_session(&gw, &s, Method::GET, "/api/users", None, &[]).await.0, 401);

    // Guessing: a clear refusal, then 429 with Retry-After, even for the right token.
    for _ in 0..3 {
        let (status, body, cookie, _) = sign_in(&gw, "adm-guess").await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_credentials")), "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("Wrong token")));
        assert!(cookie.is_none());
    }
    let (status, body, _, headers) = sign_in(&gw, ADMIN).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("too_many_sign_in_attempts")), "{body}");
    assert!(headers.get("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_assets_are_embedded_versioned_compressed_and_locked_down() {
    let gw = Gateway::start(&["openai.wasm", "weighted.wasm"], "");
    let page = client().get(gw.url("/")).send().await.expect("page");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let csp = page.headers()["content-security-policy"].to_str().expect("csp").to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.expect("html");
    let script = html.split("src=\"").nth(1).and_then(|s| s.split('"').next()).expect("script tag").to_string();
    assert!(script.starts_with("/assets/") && script.contains("?v="), "{script}");
    assert!(!html.contains("http://") && !html.contains("https://"), "the page loads something from elsewhere");

    let js = client().get(gw.url(&script)).header("accept-encoding", "gzip").send().await.expect("js");
    assert_eq!(js.headers()["content-encoding"], "gzip");
    assert_eq!(js.headers()["cache-control"], "public, max-age=31536000, immutable");
    let etag = js.headers()["etag"].clone();
    let again = client().get(gw.url(&script)).header("if-none-match", etag).send().await.expect("js");
    assert_eq!(again.status(), 304);
    let missing = client().get(gw.url("/assets/nope.js")).send().await.expect("404");
    assert_eq!(missing.status(), 404);
    assert!(missing.json::<Value>().await.expect("json")["error"]["message"].is_string());

    let off = Gateway::start(&["openai.wasm", "weighted.wasm"], "[console]\nenabled = false\n");
    assert_eq!(client().get(off.url("/")).send().await.expect("page").status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_page_by_cursor_and_the_dashboard_sums_them_also_after_a_restart() {
    let mock = MockUpstream::start("mock").await;
    let mut gw = Gateway::start(
        &["openai.wasm", "weighted.wasm"],
        &channel("a", "openai", &mock.base_url(), &["gpt-4o-mini", "gpt-4o"], ""),
    );
    let (alice, alice_key) = user_with_token(&gw, 10_000_000, json!({"name": "alice-key"})).await;
    let (_, bob_key) = user_with_token(&gw, 10_000_000, json!({"name": "bob-key"})).await;
    for i in 0..5 {
        let model = if i % 2 == 0 { "gpt-4o-mini" } else { "gpt-4o" };
        assert_eq!(call(&gw, &alice_key, &chat(model, "hi")).await.0, 200);
    }
    assert_eq!(call(&gw, &bob_key, &chat("gpt-4o", "hi")).await.0, 200);
    let (status, topped) =
        admin(&gw, Method::POST, &format!("/api/users/{alice}/topup"), Some(&json!({"amount": 500, "note": "bonus"})))
            .await;
    assert_eq!(status, 200, "{topped}");

    let all_rows = || async {
        let (_, page) = admin(&gw, Method::GET, "/api/logs?limit=100", None).await;
        page["data"].as_array().map_or(0, Vec::len)
    };
    assert!(eventually(Duration::from_secs(10), || async { all_rows().await == 7 }).await.is_some());

    check_logs_and_dashboard(&gw, alice).await;
    // A user's own dashboard counts only their requests.
    let own = get_json_as(&gw, &bob_key, "/api/self/dashboard?range=hour").await;
    assert_eq!(own["totals"]["requests"], 1, "{own}");
    assert_eq!(own["top_users"], json!([]), "{own}");
    // Indexes and rollups are in the store: the same answers after a restart.
    gw.restart();
    check_logs_and_dashboard(&gw, alice).await;
}

/// GET `path` with `key` as the bearer token; the JSON answer.
async fn get_json_as(gw: &Gateway, key: &str, path: &str) -> Value {
    client().get(gw.url(path)).bearer_auth(key).send().await.expect("send").json().await.expect("json")
}

async fn get_json(gw: &Gateway, path: &str) -> Value {
    get_json_as(gw, ADMIN, path).await
}

/// What the logs and dashboard endpoints say about the traffic of
/// `logs_page_by_cursor_and_the_dashboard_sums_them_also_after_a_restart`.
async fn check_logs_and_dashboard(gw: &Gateway, alice: u64) {
    // Two rows at a time, newest first, no row twice, down to the end.
    let (mut ids, mut before) = (Vec::new(), None::<u64>);
    loop {
        let cursor = before.map(|b| format!("&before_id={b}")).unwrap_or_default();
        let page = get_json(gw, &format!("/api/logs?limit=2&user_id={alice}{cursor}")).await;
        ids.extend(page["data"].as_array().expect("rows").iter().map(|r| r["id"].as_u64().expect("id")));
        if page["has_more"] != true {
            break;
        }
        before = page["next_before_id"].as_u64();
    }
    assert_eq!(ids.len(), 6, "alice has 5 requests and a top-up: {ids:?}");
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "not newest first: {ids:?}");
    let topup = get_json(gw, &format!("/api/logs?limit=10&type=topup&user_id={alice}")).await;
    assert_eq!(topup["data"][0]["note"], "bonus", "{topup}");
    assert_eq!(topup["data"][0]["quota"], 500, "{topup}");
    let models = get_json(gw, "/api/logs?limit=10&model=gpt-4o").await;
    assert_eq!(models["data"].as_array().map(Vec::len), Some(3), "{models}");

    let dash = get_json(gw, "/api/dashboard?range=hour").await;
    assert_eq!(dash["series"].as_array().map(Vec::len), Some(60));
    assert_eq!(dash["totals"]["requests"], 6, "top-ups are not requests: {dash}");
    assert_eq!(dash["top_models"][0]["key"], "gpt-4o", "{dash}");
    assert_eq!(dash["top_models"][0]["requests"], 3, "{dash}");
    assert!(dash["totals"]["p50_ms"].is_u64(), "{dash}");
    let week = get_json(gw, "/api/dashboard?range=week").await;
    assert_eq!((week["series"].as_array().map(Vec::len), &week["totals"]["requests"]), (Some(168), &json!(6)));
    let csv = client().get(gw.url("/api/logs/export?type=topup")).bearer_auth(ADMIN).send().await.expect("csv");
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.expect("csv");
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).is_some_and(|l| l.contains(",topup,") && l.ends_with(",bonus")), "{csv}");
}
