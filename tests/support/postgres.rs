//! A real PostgreSQL server for the multi-node tests: Debian's package
//! (installed by `cargo xtask test`), a fresh cluster in a temporary
//! directory, started as an unprivileged user on a loopback port and
//! stopped (SIGKILL of the postmaster's group) on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user the server runs as when the tests run as root (PostgreSQL
/// refuses to run as root); `cargo xtask test` creates it.
pub const PG_USER: &str = "wasmgate-pg";

/// A running server.
pub struct PgServer {
    /// The postmaster's pid.
    pid: u32,
    /// Closed when the postmaster has exited.
    exited: std::sync::mpsc::Receiver<()>,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub url: String,
    port: u16,
    dir: tempfile::TempDir,
}

/// The directory holding `initdb` and `postgres`.
fn bindir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    candidates.reverse();
    candidates.push(PathBuf::from("/usr/local/bin"));
    candidates.push(PathBuf::from("/usr/bin"));
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
        .expect("no PostgreSQL server binaries: run the suite with `cargo xtask test` (it installs postgresql)")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program args…`, as [`PG_USER`] when we are root (`setpriv` execs the
/// program, so the child is the server itself and signals reach it).
fn as_pg_user(program: &Path) -> Command {
    // The server stops when the test process ends, however it ends.
    let mut c = Command::new("setpriv");
    if is_root() {
        c.args([&format!("--reuid={PG_USER}"), &format!("--regid={PG_USER}"), "--clear-groups"]);
    }
    c.args(["--pdeathsig=TERM", "--"]).arg(program);
    c
}

/// Whether this run keeps the gateways' shared state in PostgreSQL.
pub fn suite_on_postgres() -> bool {
    std::env::var("WASMGATE_TEST_BACKEND").ok().as_deref() == Some("postgres")
}

/// Prefix of the suite-wide server's directory (in the temporary directory).
pub const SUITE_DIR_PREFIX: &str = "wasmgate-pg-suite-";

/// Delete what earlier runs' suite-wide servers left in `parent`.
fn remove_suite_dirs(parent: &Path) {
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(SUITE_DIR_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// With `WASMGATE_TEST_BACKEND=postgres`, every gateway the suite starts
/// keeps its channels, tables and plugins in a database of its own on one
/// server started for the whole run: the suite runs against PostgreSQL as
/// well as sled. Returns a fresh database's URL then, `None` otherwise.
pub fn database_for_gateway() -> Option<String> {
    static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if !suite_on_postgres() {
        return None;
    }
    let url = SERVER.get_or_init(|| {
        // Kept for the whole run (the server stops with the test process),
        // so never dropped: its directory, `wasmgate-pg-suite-*` in the
        // temporary directory (where the server's user can reach it), is
        // deleted by the next run and by `cargo xtask test`.
        let parent = std::env::temp_dir();
        remove_suite_dirs(&parent);
        let dir = tempfile::Builder::new().prefix(SUITE_DIR_PREFIX).tempdir_in(&parent).expect("tempdir");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let server = PgServer::start_in(dir);
            let _ = tx.send(server.url.clone());
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the suite's PostgreSQL server")
    });
    let name = format!("gw_{:016x}", rand::random::<u64>());
    let out = Command::new(psql())
        .args([url.as_str(), "-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql");
    assert!(out.status.success(), "CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    Some(format!("{base}/{name}"))
}

fn psql() -> PathBuf {
    let bundled = bindir().join("psql");
    if bundled.exists() { bundled } else { PathBuf::from("psql") }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

impl PgServer {
    /// A fresh cluster, started; returns once it accepts connections.
    pub fn start() -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"))
    }

    /// A fresh cluster in `dir` (removed when the server is dropped).
    fn start_in(dir: tempfile::TempDir) -> Self {
        let bin = bindir();
        let data = dir.path().join("data");
        if is_root() {
            let ok = Command::new("chown").args(["-R", PG_USER]).arg(dir.path()).status().is_ok_and(|s| s.success());
            assert!(ok, "chown to {PG_USER} failed: run the suite with `cargo xtask test` (it creates the user)");
        }
        let out = as_pg_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["--username=postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let (pid, exited) = launch(&dir, port);
        let server = Self { pid, exited, url: format!("postgres://postgres@127.0.0.1:{port}/postgres"), port, dir };
        server.wait_ready();
        server
    }

    /// The postmaster's process id (its backends are its children).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stop the server (fast shutdown: its sessions are ended), keeping its
    /// data; returns once it has exited.
    pub fn stop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.pid.to_string()]).status();
        let waited = self.exited.recv_timeout(Duration::from_secs(30));
        assert!(matches!(waited, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)), "PostgreSQL did not stop");
    }

    /// Freeze the server (SIGSTOP to the postmaster, then to every process
    /// it started): connections stay open and nothing answers, as in a
    /// network partition that drops packets.
    pub fn pause(&self) {
        self.signal_all("-STOP", true);
    }

    /// Thaw a [`Self::pause`]d server.
    pub fn resume(&self) {
        self.signal_all("-CONT", false);
    }

    /// Send `signal` to the postmaster and its children (the postmaster
    /// first when `postmaster_first`, else last).
    fn signal_all(&self, signal: &str, postmaster_first: bool) {
        let pid = self.pid.to_string();
        let send = |pid: &str| {
            let _ = Command::new("kill").args([signal, pid]).status();
        };
        if postmaster_first {
            send(&pid);
        }
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace() {
            send(child);
        }
        if !postmaster_first {
            send(&pid);
        }
    }

    /// Start the stopped server again on its data and port; returns once it
    /// answers queries.
    pub fn start_again(&mut self) {
        (self.pid, self.exited) = launch(&self.dir, self.port);
        self.wait_ready();
    }

    /// Wait until the server accepts sessions.
    fn wait_ready(&self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Accepting TCP is not yet accepting sessions: wait for a query.
        let started = Instant::now();
        loop {
            let ok =
                Command::new(psql()).args([&self.url, "-c", "SELECT 1"]).output().is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "PostgreSQL does not answer queries");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Start the postmaster on the cluster in `dir` and `port`: its pid, and a
/// receiver closed when it has exited.
fn launch(dir: &tempfile::TempDir, port: u16) -> (u32, std::sync::mpsc::Receiver<()>) {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("postgres.log")).expect("log");
    let mut command = as_pg_user(&bindir().join("postgres"));
    command
        .arg("-D")
        .arg(dir.path().join("data"))
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .arg("-k")
        .arg(dir.path())
        .args(["-c", "max_connections=200"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // The server's parent-death signal follows the thread that started
    // it (a pooled thread may end at any time): a thread of its own
    // starts it and waits for it.
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let (exited_tx, exited) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut child: Child = command.spawn().expect("start postgres");
        let _ = pid_tx.send(child.id());
        let _ = child.wait();
        drop(exited_tx);
    });
    (pid_rx.recv().expect("postgres pid"), exited)
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Thawed first (a test may fail while the server is paused: frozen
        // processes would outlive it), then the postmaster stops its
        // children on SIGINT (fast shutdown).
        self.resume();
        let _ = Command::new("kill").args(["-INT", &self.pid.to_string()]).status();
        if self.exited.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
        }
    }
}

/// The first column of the first row of `sql` on the database at `url`, as
/// an integer (`NULL` as 0): how the multi-node tests read what every node
/// wrote.
pub async fn query_i64(url: &str, sql: &str) -> i64 {
    let row = connect(url).await.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.get::<_, Option<i64>>(0).unwrap_or(0)
}

/// Every row of `sql`, whose one column is `jsonb`.
pub async fn query_json(url: &str, sql: &str) -> Vec<serde_json::Value> {
    let rows = connect(url).await.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|row| row.get::<_, serde_json::Value>(0)).collect()
}

/// A connection to the database at `url`, driven in the background.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}
