//! Data safety (issue 11, items 10, 11 and 13): a full disk makes the
//! gateway refuse billed work with a clear 503 (nothing is served unbilled)
//! and it recovers without a restart; a damaged or rolled-back store, or a
//! damaged billing journal, refuses to start with the recovery steps;
//! secrets are not kept in plain text and the data directory is private.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::accounts::{call, logs, user_with_token};
use crate::support::mock::Mode;
use crate::support::{Gateway, MockUpstream, admin, channel, client, eventually};

const PLUGINS: &[&str] = &["openai.wasm", "weighted.wasm"];
const PRICING: &str = "[pricing]\n[pricing.models.m]\nratio = 1\n";

/// A small filesystem of its own (tmpfs, else an ext4 loop device),
/// unmounted on drop. Mounting needs root, as the CI runs.
struct SmallDisk {
    dir: PathBuf,
    image: Option<PathBuf>,
}

impl SmallDisk {
    fn mount(parent: &Path, mib: u64) -> Self {
        let dir = parent.join("small-disk");
        std::fs::create_dir_all(&dir).expect("mount point");
        let tmpfs = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(&dir)
            .status();
        if tmpfs.is_ok_and(|s| s.success()) {
            return Self { dir, image: None };
        }
        let image = parent.join("small-disk.img");
        let made =
            Command::new("truncate").args(["-s", &format!("{mib}M")]).arg(&image).status().is_ok_and(|s| s.success())
                && Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).status().is_ok_and(|s| s.success())
                && Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir).status().is_ok_and(|s| s.success());
        assert!(made, "this test needs root to mount a small filesystem (tmpfs or a loop device)");
        Self { dir, image: Some(image) }
    }

    /// Fill it up; returns the filler file.
    fn fill(&self) -> PathBuf {
        let filler = self.dir.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none"])
            .arg(format!("of={}", filler.display()))
            .status();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

async fn health(gw: &Gateway) -> (u16, Value) {
    let resp = client().get(gw.url("/health")).send().await.expect("health");
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

fn body(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_billed_work_and_recovers_without_a_restart() {
    let outer = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(outer.path(), 48);
    let mock = MockUpstream::start("up").await;
    let data_dir = disk.dir.join("data");
    let toml = format!(
        "data_dir = {data_dir:?}\n[storage]\nmin_free_mb = 4\ncheck_interval_ms = 100\n{PRICING}\n{}",
        channel("up", "openai", &mock.base_url(), &["m"], "")
    );
    let mut gw = Gateway::start(PLUGINS, &toml.replace("data_dir = ", "#data_dir = "));
    // The support writes its own data_dir line; point it at the small disk.
    let config = std::fs::read_to_string(gw.dir.path().join("wasmgate.toml")).expect("config");
    let config = config.replacen(&format!("data_dir = {:?}", gw.data_dir), &format!("data_dir = {data_dir:?}"), 1);
    std::fs::write(gw.dir.path().join("wasmgate.toml"), config).expect("config");
    gw.restart();
    let (_, key) = user_with_token(&gw, 1_000_000_000, json!({})).await;
    let mut served = Vec::new();
    for i in 0..10 {
        let (status, out, id) = call(&gw, &key, &body(&format!("before {i}"))).await;
        assert_eq!(status, 200, "{out}");
        served.push(id);
    }

    // The disk fills up (while requests keep coming).
    let load = tokio::spawn({
        let (url, key) = (gw.url("/v1/chat/completions"), key.clone());
        async move {
            let mut answered = Vec::new();
            for i in 0..300 {
                let resp = client().post(&url).bearer_auth(&key).json(&body(&format!("during {i}"))).send().await;
                if let Ok(r) = resp {
                    let id =
                        r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    answered.push((status, id, v));
                }
            }
            answered
        }
    });
    let filler = disk.fill();
    let refused = eventually(Duration::from_secs(10), || async { health(&gw).await.0 == 503 }).await;
    assert!(refused.is_some(), "health reports the storage failure");
    let (status, report) = health(&gw).await;
    assert_eq!((status, report["status"].as_str()), (503, Some("degraded")), "{report}");
    let (status, err, _) = call(&gw, &key, &body("while full")).await;
    assert_eq!((status, err["error"]["code"].as_str()), (503, Some("storage_unavailable")), "{err}");
    let (status, err) = admin(&gw, Method::POST, "/api/users", Some(&json!({"name": "bob", "quota": 1}))).await;
    if crate::support::postgres::suite_on_postgres() {
        // Accounts live in the database, not on this disk.
        assert_eq!(status, 201, "{err}");
    } else {
        assert_eq!((status, err["error"]["code"].as_str()), (503, Some("storage_unavailable")), "{err}");
    }
    let during = load.await.expect("load");
    assert!(
        during.iter().all(|(s, _, _)| *s == 200 || *s == 503),
        "only served or refused: {:?}",
        during.iter().map(|d| d.0).collect::<Vec<_>>()
    );
    served.extend(during.iter().filter(|(s, _, _)| *s == 200).map(|(_, id, _)| id.clone()));

    // Space returns: the gateway recovers by itself.
    std::fs::remove_file(&filler).expect("free the space");
    let back = eventually(Duration::from_secs(15), || async { health(&gw).await.0 == 200 }).await;
    assert!(back.is_some(), "health recovers without a restart: {}", health(&gw).await.1);
    let (status, out, id) = call(&gw, &key, &body("after")).await;
    assert_eq!(status, 200, "{out}");
    served.push(id);
    let (status, _) = admin(&gw, Method::POST, "/api/users", Some(&json!({"name": "carol", "quota": 1}))).await;
    assert_eq!(status, 201, "admin writes work again");

    // Every answered request is billed exactly once, across a crash too.
    gw.restart();
    let rows = logs(&gw, "type=consume&per_page=100").await;
    let total = rows["total"].as_u64().unwrap_or(0) as usize;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut page = 1;
    while seen.values().sum::<usize>() < total {
        let rows = logs(&gw, &format!("type=consume&per_page=100&page={page}")).await;
        for r in rows["data"].as_array().expect("rows") {
            *seen.entry(r["request_id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
        page += 1;
        assert!(page < 100);
    }
    for id in &served {
        assert_eq!(seen.get(id), Some(&1), "served request {id} is billed exactly once");
    }
    let reopened = gw.log().contains("the store was reopened");
    eprintln!(
        "disk full: {} served, {} refused while full, {} rows; store reopened after a sled failure: {reopened}",
        served.len(),
        during.iter().filter(|d| d.0 == 503).count(),
        total
    );
    drop(gw);
}

/// A gateway with some history: a user, a token, a channel, 5 billed
/// calls; stopped cleanly and started again. With its mock upstream and the
/// token's key.
async fn gateway_with_history() -> (MockUpstream, Gateway, String) {
    let mock = MockUpstream::start("up").await;
    let mut gw =
        Gateway::start(PLUGINS, &format!("{PRICING}\n{}", channel("up", "openai", &mock.base_url(), &["m"], "")));
    let (_, key) = user_with_token(&gw, 1_000_000, json!({})).await;
    for i in 0..5 {
        assert_eq!(call(&gw, &key, &body(&format!("history {i}"))).await.0, 200);
    }
    gw.restart_gracefully();
    (mock, gw, key)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_or_rolled_back_store_refuses_to_start_with_the_recovery_steps() {
    let (_mock, mut gw, _) = gateway_with_history().await;
    gw.kill();
    let db = gw.data_dir.join("db");
    let backup = gw.dir.path().join("db-backup");
    copy_dir(&db, &backup);

    // More history after the "backup", then the old db is put back.
    gw.try_start_again().expect("starts");
    let (status, _) = admin(&gw, Method::POST, "/api/users", Some(&json!({"name": "later", "quota": 5}))).await;
    assert_eq!(status, 201);
    // (and usage, which the store records whatever keeps the accounts)
    let (status, _) = crate::support::post(&gw, "/v1/chat/completions", &body("later")).await;
    assert_eq!(status, 200);
    gw.restart_gracefully();
    gw.kill();
    std::fs::remove_dir_all(&db).expect("rm db");
    copy_dir(&backup, &db);
    let err = gw.try_start_again().expect_err("a rolled-back store must not start");
    assert!(err.contains("behind its manifest") && err.contains("store.manifest"), "{err}");

    // An emptied store (sled's files gone) is refused, not started empty.
    std::fs::remove_dir_all(&db).expect("rm db");
    let err = gw.try_start_again().expect_err("an empty store must not start");
    assert!(err.contains("its data is gone"), "{err}");

    // A truncated sled file is refused too.
    copy_dir(&backup, &db);
    let file = db.join("db");
    let len = std::fs::metadata(&file).expect("db file").len();
    std::fs::OpenOptions::new().write(true).open(&file).expect("open").set_len(len / 3).expect("truncate");
    let err = gw.try_start_again().expect_err("a truncated store must not start");
    assert!(err.contains("store.manifest"), "{err}");

    // The documented recovery: restore the backup and drop the manifest.
    std::fs::remove_dir_all(&db).expect("rm db");
    copy_dir(&backup, &db);
    std::fs::remove_file(gw.data_dir.join("store.manifest")).expect("rm manifest");
    gw.try_start_again().expect("starts from the restored store");
    let (status, users) = admin(&gw, Method::GET, "/api/users", None).await;
    // On PostgreSQL the users are the database's, which no local restore rolls back.
    let kept = if crate::support::postgres::suite_on_postgres() { 2 } else { 1 };
    assert_eq!((status, users["total"].as_u64()), (200, Some(kept)), "{users}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_journal_line_is_an_error_not_a_skipped_charge() {
    let (_mock, mut gw, _) = gateway_with_history().await;
    gw.kill();
    let journal = gw.data_dir.join("billing.journal");
    let good = r#"{"seq":999999,"op":"adjust","user":1,"token":null,"delta":-5}"#;
    std::fs::write(&journal, format!("{{\"seq\":999998,\"op\":\"row\",\"kind\":\"consu\n{good}\n")).expect("damage");
    let err = gw.try_start_again().expect_err("a damaged journal must not be skipped");
    assert!(err.contains("billing journal is damaged") && err.contains("line 1"), "{err}");
    // A torn last line (a write cut by a power loss, never acknowledged) is fine.
    std::fs::write(&journal, format!("{good}\n{{\"seq\":1000000,\"op\":\"ro")).expect("torn");
    gw.try_start_again().expect("a torn last line is tolerated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_are_not_kept_in_plain_text_and_the_data_is_private() {
    let mock = MockUpstream::start("up").await;
    mock.set_mode(Mode::EchoHost);
    let mut gw = Gateway::start(PLUGINS, &channel("leaky", "openai", &mock.base_url(), &["gpt-4o-mini"], ""));
    // An upstream that echoes its Host and an upper-cased key leaks neither.
    let (status, err) =
        crate::support::post(&gw, "/v1/chat/completions", &crate::support::chat("gpt-4o-mini", "x")).await;
    assert_eq!(status, 400, "{err}");
    let text = err.to_string();
    let port = mock.addr.port().to_string();
    assert!(
        !text.contains("127.0.0.1") && !text.contains(&port) && !text.to_uppercase().contains("SK-UPSTREAM"),
        "{text}"
    );
    gw.restart_gracefully();
    // The channel's key (sk-upstream-secret-leaky) is nowhere on disk in clear.
    let mut files = Vec::new();
    walk(&gw.data_dir, &mut files);
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_default();
        assert!(!contains(&bytes, b"sk-upstream-secret-leaky"), "{} holds the upstream key", f.display());
        let mode = std::fs::metadata(f).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is readable by others: {mode:o}", f.display());
    }
    let dir_mode = std::fs::metadata(&gw.data_dir).expect("meta").permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);

    // Generated tokens are printed once and stored only as hashes.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--plugins-dir")
        .arg(dir.path().join("plugins"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut child = out;
    let stdout = child.stdout.take().expect("stdout");
    let mut printed = Vec::new();
    use std::io::BufRead;
    for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.starts_with("wasmgate listening") {
            break;
        }
        if let Some(token) = line.rsplit(": ").next().filter(|t| t.starts_with("sk-") || t.starts_with("adm-")) {
            printed.push(token.to_string());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(printed.len(), 2, "both generated tokens are shown once");
    let mut files = Vec::new();
    walk(&dir.path().join("data"), &mut files);
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for token in &printed {
            assert!(!contains(&bytes, token.as_bytes()), "{} holds a generated token", f.display());
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Turn the store in `data_dir` (no gateway running) into one written
/// before blocks of 32: schema 4, no recorded boundary, its usage rows in
/// blocks of 8. Returns the rows' ids, oldest first.
fn as_a_schema_4_store(data_dir: &Path) -> Vec<u64> {
    use wasmgate::billing::log_blocks::{self, Layout};
    let store = wasmgate::store::Store::open(data_dir).expect("store");
    let (logs, state) = (store.tree("logs").expect("logs"), store.tree("billing_state").expect("state"));
    let rows: Vec<wasmgate::billing::logs::LogRow> = log_blocks::oldest_first(&logs)
        .map(|raw| serde_json::from_slice(raw.expect("row").bytes()).expect("a stored row"))
        .collect();
    logs.clear().expect("clear");
    state.remove(log_blocks::WIDE_FROM).expect("forget the boundary");
    store.tree("options").expect("options").insert("schema_version", &4u32.to_be_bytes()).expect("schema 4");
    let layout = Layout::read(&state).expect("layout");
    assert_ne!(layout, Layout::WIDE, "no boundary: blocks of 8");
    layout.insert(&logs, &rows).expect("rows in blocks of 8");
    store.flush().expect("flush");
    rows.iter().map(|r| r.id).collect()
}

/// The first byte of each key of the `logs` tree (`B`: a block of 8, `C`:
/// a block of 32) and the schema version of the store in `data_dir`.
fn log_key_tags_and_schema(data_dir: &Path) -> (Vec<u8>, u32) {
    let store = wasmgate::store::Store::open(data_dir).expect("store");
    let tags = store.tree("logs").expect("logs").iter().keys().map(|k| k.expect("key")[0]).collect();
    let version = store.tree("options").expect("options").get("schema_version").expect("get").expect("a version");
    (tags, u32::from_be_bytes(version.as_ref().try_into().expect("u32")))
}

/// A store written before blocks of 32 (schema 4) is migrated when this
/// build opens it: its rows stay where they are and read with the new ones
/// as one log, and the new ones go to blocks of 32.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_from_before_blocks_of_32_keeps_its_rows_and_logs_new_ones_in_blocks_of_32() {
    let (_mock, mut gw, key) = gateway_with_history().await;
    gw.kill();
    let old = as_a_schema_4_store(&gw.data_dir);
    assert_eq!(old.len(), 5);

    gw.try_start_again().expect("a schema-4 store starts, migrated");
    for i in 0..2 {
        assert_eq!(call(&gw, &key, &body(&format!("after {i}"))).await.0, 200);
    }
    let rows = crate::support::accounts::wait_rows(&gw, "type=consume", 7).await;
    let ids: Vec<u64> = rows["data"].as_array().expect("rows").iter().map(|r| r["id"].as_u64().expect("id")).collect();
    assert_eq!(&ids[2..], old.iter().rev().copied().collect::<Vec<_>>(), "the old rows, newest first, after the new");
    assert!(ids[0] > ids[1] && ids[1] > old[4], "the new rows come after the old: {ids:?}");

    gw.restart_gracefully();
    gw.kill();
    let (tags, version) = log_key_tags_and_schema(&gw.data_dir);
    assert_eq!(version, wasmgate::store::SCHEMA_VERSION);
    assert_eq!(tags.first(), Some(&b'B'), "the old rows stay in blocks of 8: {tags:?}");
    assert_eq!(tags.last(), Some(&b'C'), "new rows go to blocks of 32: {tags:?}");
    assert!(tags.windows(2).all(|w| w[0] <= w[1]), "{tags:?}");
}
