//! Per-store data: an empty WASI context (no preopens, environment or
//! network; stderr captured into the gateway's log), the memory limit, and
//! what the host imports answer during the current call.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{
    ChannelContextHost, ClockHost, CredentialsHost, LogHost, LogLevel, RoutingContextHost, TypesHost,
};

/// What `routing-context` answers during one `select` call.
#[derive(Debug, Clone, Default)]
pub struct RoutingFacts {
    /// Requests routed for this group and model before this one.
    pub sequence: u64,
    /// EWMA time to first token per candidate, in ms (0 = unknown).
    pub ttft_ms: Vec<f64>,
    /// The calling user's id.
    pub user_id: Option<u64>,
    /// The calling token's id.
    pub token_id: Option<u64>,
    /// Who is calling and in which session, for `affinity-key` (hashed only
    /// when a policy asks).
    pub affinity: Option<Affinity>,
    /// Each candidate's price ratio.
    pub price_ratios: Vec<f64>,
    /// Each candidate's tags.
    pub tags: Vec<Arc<[String]>>,
}

/// The calling token, as an affinity key names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AffinityCaller {
    /// A token created through the API, by id.
    Token(u64),
    /// The configuration file's token at this position.
    Config(usize),
    /// Nobody known (never on a routed request).
    #[default]
    Unknown,
}

/// The inputs of a routing affinity key (hashed only when a policy asks).
#[derive(Debug, Clone, Default)]
pub struct Affinity {
    /// The calling token.
    pub caller: AffinityCaller,
    /// The client's session, when it named one.
    pub session: Option<Arc<str>>,
}

impl Affinity {
    /// The key: SHA-256 of the caller (`ID`, or `config:N`) and the
    /// session, 16 bytes in hex.
    pub fn key(&self) -> String {
        use sha2::{Digest, Sha256};
        let caller = match self.caller {
            AffinityCaller::Token(id) => id.to_string(),
            AffinityCaller::Config(i) => format!("config:{i}"),
            AffinityCaller::Unknown => String::new(),
        };
        let mut h = Sha256::new();
        h.update(caller.as_bytes());
        h.update([0]);
        h.update(self.session.as_deref().unwrap_or("").as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// The session's 64-bit hash (caller and session), for choosing among a
    /// channel's keys; `None` without a session: requests of a caller that
    /// names no session spread over the keys.
    pub fn session_hash(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let session = self.session.as_deref()?;
        // SipHash with fixed keys: the same on every run and every node.
        let mut h = std::hash::DefaultHasher::new();
        match self.caller {
            AffinityCaller::Token(id) => (0u8, id).hash(&mut h),
            AffinityCaller::Config(i) => (1u8, i as u64).hash(&mut h),
            AffinityCaller::Unknown => 2u8.hash(&mut h),
        }
        session.hash(&mut h);
        Some(h.finish())
    }
}

/// Bytes of a call's stderr kept for the log; the rest is counted, not kept.
const STDERR_KEPT: usize = 2048;

/// A plugin's stderr: never fails a write (a Rust guest's `eprintln!` and
/// panic handler abort on a failed write), keeps the first bytes of each
/// call for the log.
#[derive(Clone, Default)]
pub(crate) struct Stderr(Arc<(Mutex<Captured>, std::sync::atomic::AtomicBool)>);

/// The first bytes written during a call, and how many were written.
type Captured = (Vec<u8>, usize);

impl Stderr {
    /// What the current call wrote (its start, lossily decoded), and reset.
    pub(crate) fn take(&self) -> Option<String> {
        // Nearly every call writes nothing: skip the lock then.
        if !self.0.1.swap(false, std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut guard = self.0.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (kept, total) = std::mem::take(&mut *guard);
        if total == 0 {
            return None;
        }
        let mut text = String::from_utf8_lossy(&kept).trim_end().to_string();
        if total > kept.len() {
            text.push_str(&format!(" […{} more bytes]", total - kept.len()));
        }
        Some(text)
    }
}

impl tokio::io::AsyncWrite for Stderr {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut guard = self.0.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (kept, total) = &mut *guard;
        let room = STDERR_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..buf.len().min(room)]);
        *total += buf.len();
        self.0.1.store(true, std::sync::atomic::Ordering::Release);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Stderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Stderr {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Caps an instance's memories and remembers when it refused to grow one,
/// so that the trap that usually follows is reported as what it is.
pub(crate) struct MemoryCap {
    max_bytes: usize,
    /// A growth past the cap was refused during the current call.
    pub(crate) hit: bool,
    /// Largest memory size granted so far, in bytes.
    pub(crate) peak: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired <= self.max_bytes;
        self.hit |= !ok;
        if ok {
            self.peak = self.peak.max(desired);
        }
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// What a plugin's `Store` holds.
pub struct PluginState {
    plugin: Arc<str>,
    /// Built on first use: most plugins import no WASI at all, and building
    /// a context (RNG seeding, clocks) costs more than a whole plugin call.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    pub(crate) stderr: Stderr,
    pub(crate) limits: MemoryCap,
    /// Facts for the `select` call in progress (routers only).
    pub(crate) routing: RoutingFacts,
    /// What `credentials.current` answers (adapters with an exchange only).
    pub(crate) credential: Option<Arc<str>>,
    /// What `channel-context.settings` answers.
    pub(crate) settings: Option<Arc<str>>,
}

/// What a call may ask the host besides its arguments.
#[derive(Debug, Clone, Default)]
pub struct CallInputs {
    /// The channel key's exchanged credential.
    pub credential: Option<Arc<str>>,
    /// The channel's settings (a JSON object).
    pub settings: Option<Arc<str>>,
}

impl PluginState {
    /// Fresh state for `plugin`, capped at `memory_bytes`.
    pub fn new(plugin: Arc<str>, memory_bytes: usize) -> Self {
        Self {
            plugin,
            wasi: None,
            table: ResourceTable::new(),
            stderr: Stderr::default(),
            limits: MemoryCap { max_bytes: memory_bytes, hit: false, peak: 0 },
            routing: RoutingFacts::default(),
            credential: None,
            settings: None,
        }
    }

    /// Forget what the previous call left (before a call on a reused store).
    pub(crate) fn reset(&mut self) {
        self.limits.hit = false;
        self.routing = RoutingFacts::default();
        self.credential = None;
        self.settings = None;
        let _ = self.stderr.take();
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let stderr = self.stderr.clone();
        let ctx = self.wasi.get_or_insert_with(|| WasiCtx::builder().stderr(stderr).build());
        WasiCtxView { ctx, table: &mut self.table }
    }
}

impl TypesHost for PluginState {}

impl LogHost for PluginState {
    fn log(&mut self, level: LogLevel, message: String) {
        // Bound what a plugin can push into the log.
        let message: String = message.chars().take(2048).collect();
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "wasmgate::plugin", plugin, "{message}"),
            LogLevel::Error => tracing::error!(target: "wasmgate::plugin", plugin, "{message}"),
        }
    }
}

impl RoutingContextHost for PluginState {
    fn sequence(&mut self) -> u64 {
        self.routing.sequence
    }

    fn ttft_ms(&mut self) -> Vec<f64> {
        self.routing.ttft_ms.clone()
    }

    fn user_id(&mut self) -> Option<u64> {
        self.routing.user_id
    }

    fn token_id(&mut self) -> Option<u64> {
        self.routing.token_id
    }

    fn affinity_key(&mut self) -> Option<String> {
        self.routing.affinity.as_ref().map(Affinity::key)
    }

    fn price_ratios(&mut self) -> Vec<f64> {
        self.routing.price_ratios.clone()
    }

    fn tags(&mut self) -> Vec<Vec<String>> {
        self.routing.tags.iter().map(|t| t.to_vec()).collect()
    }
}

impl ChannelContextHost for PluginState {
    fn settings(&mut self) -> String {
        self.settings.as_deref().unwrap_or("{}").to_string()
    }
}

impl CredentialsHost for PluginState {
    fn current(&mut self) -> Option<String> {
        self.credential.as_deref().map(str::to_string)
    }
}

impl ClockHost for PluginState {
    fn now_unix_secs(&mut self) -> u64 {
        crate::store::unix_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn an_affinity_key_hashes_the_caller_and_the_session() {
        let expect = |text: &[u8]| hex::encode(&Sha256::digest(text)[..16]);
        let token = Affinity { caller: AffinityCaller::Token(42), session: Some("s-1".into()) };
        assert_eq!(token.key(), expect(b"42\0s-1"));
        let config = Affinity { caller: AffinityCaller::Config(0), session: None };
        assert_eq!(config.key(), expect(b"config:0\0"));
        assert_ne!(token.key(), Affinity { session: Some("s-2".into()), ..token.clone() }.key());
    }
}
