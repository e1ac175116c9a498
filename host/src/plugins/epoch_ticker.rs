//! The epoch ticker: the thread that advances the engine's epoch, at whose
//! ticks running guest code yields to the tokio scheduler (so a long call
//! never holds a request worker). It sleeps while no instance is in use.
//!
//! Every instance lent out holds a [`Running`] token from before its
//! instantiation until it goes back to the idle set or is dropped; guest
//! code only runs on an instance lent out. The ticker parks once no token
//! was held or taken for [`QUIET_BEFORE_PARK`], and the next token taken
//! wakes it. Under load it never parks; an idle gateway no longer wakes
//! every tick.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

/// How often the epoch advances while guest code may run.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Quiet ticks (nothing in use, nothing taken) before the ticker parks.
const QUIET_BEFORE_PARK: u32 = 200;

/// What the ticker thread and the instances share.
#[derive(Default)]
struct Shared {
    /// Tokens taken, ever.
    taken: AtomicU64,
    /// Tokens given back, ever (never more than taken).
    returned: AtomicU64,
    /// The ticker is parked, or about to park: a new token must wake it.
    parked: AtomicBool,
    /// The engine is gone: the thread ends.
    stopped: AtomicBool,
    thread: OnceLock<Thread>,
}

/// The handle of a running ticker thread; dropping it ends the thread.
pub(crate) struct EpochTicker(Arc<Shared>);

/// An instance's token: started while the instance is in use, stopped
/// while it is idle (see the module's docs). Dropped, it stops.
pub(crate) struct Running {
    shared: Arc<Shared>,
    started: bool,
}

impl EpochTicker {
    /// Start ticking `engine`'s epoch (the thread also ends when the engine
    /// is dropped).
    pub(crate) fn start(engine: wasmtime::EngineWeak) -> Self {
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        match std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || tick(&engine, &state)) {
            Ok(handle) => {
                let _ = shared.thread.set(handle.thread().clone());
            }
            Err(error) => tracing::error!(%error, "the wasm epoch ticker could not start"),
        }
        Self(shared)
    }

    /// A token for a new instance, not started.
    pub(crate) fn token(&self) -> Running {
        Running { shared: self.0.clone(), started: false }
    }

    /// Whether the ticker is parked now.
    #[cfg(test)]
    pub(crate) fn parked(&self) -> bool {
        self.0.parked.load(SeqCst)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.0.stopped.store(true, SeqCst);
        wake(&self.0);
    }
}

impl Running {
    /// The instance is about to be used: wakes the ticker if it is parked.
    pub(crate) fn start(&mut self) {
        debug_assert!(!self.started, "an instance lent out twice");
        self.started = true;
        self.shared.taken.fetch_add(1, SeqCst);
        if self.shared.parked.load(SeqCst) {
            wake(&self.shared);
        }
    }

    /// The instance is idle again.
    pub(crate) fn stop(&mut self) {
        if std::mem::take(&mut self.started) {
            self.shared.returned.fetch_add(1, SeqCst);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wake(shared: &Shared) {
    if let Some(thread) = shared.thread.get() {
        thread.unpark();
    }
}

/// The thread: a tick every [`EPOCH_TICK`], parked while quiet.
fn tick(engine: &wasmtime::EngineWeak, shared: &Shared) {
    let mut seen = shared.taken.load(SeqCst);
    let mut quiet = 0;
    loop {
        std::thread::sleep(EPOCH_TICK);
        if shared.stopped.load(SeqCst) {
            return;
        }
        let Some(engine) = engine.upgrade() else { return };
        engine.increment_epoch();
        drop(engine);
        // Returned first: if it then equals taken, nothing was in use at
        // the moment it was read.
        let returned = shared.returned.load(SeqCst);
        let taken = shared.taken.load(SeqCst);
        if taken != seen || returned != taken {
            seen = taken;
            quiet = 0;
            continue;
        }
        quiet += 1;
        if quiet < QUIET_BEFORE_PARK {
            continue;
        }
        // Flag first, then look again: a token taken before the flag was
        // set is seen here, one taken after it sees the flag and wakes us.
        shared.parked.store(true, SeqCst);
        while shared.taken.load(SeqCst) == seen && !shared.stopped.load(SeqCst) {
            std::thread::park();
        }
        shared.parked.store(false, SeqCst);
        quiet = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::until;

    /// Wait (bounded) until `ticker` is parked or not, as `want` says.
    fn wait_parked(ticker: &EpochTicker, want: bool) -> bool {
        until(Duration::from_secs(30), || ticker.parked() == want)
    }

    /// A module whose `spin` export loops forever.
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type: () -> ()
        0x03, 0x02, 0x01, 0x00, // one function of that type
        0x07, 0x08, 0x01, 0x04, b's', b'p', b'i', b'n', 0x00, 0x00, // export "spin"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop br 0 end end
    ];

    /// Whether guest code spinning on `engine` meets its epoch deadline
    /// (the epoch moved) before it spends a few seconds' worth of fuel.
    fn epoch_advances(engine: &wasmtime::Engine) -> bool {
        let mut store = wasmtime::Store::new(engine, ());
        let moved = Arc::new(AtomicBool::new(false));
        let flag = moved.clone();
        // At the deadline: note it, and end the call (no fuel left).
        store.epoch_deadline_callback(move |mut ctx| {
            flag.store(true, SeqCst);
            ctx.set_fuel(0)?;
            Ok(wasmtime::UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);
        store.set_fuel(5_000_000_000).expect("fuel");
        let module = wasmtime::Module::new(engine, SPIN).expect("module");
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
        let spin = instance.get_typed_func::<(), ()>(&mut store, "spin").expect("spin");
        assert!(spin.call(&mut store, ()).is_err(), "the loop ends by running out of fuel");
        moved.load(SeqCst)
    }

    fn engine() -> wasmtime::Engine {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true).consume_fuel(true);
        wasmtime::Engine::new(&config).expect("engine")
    }

    #[test]
    fn parks_when_quiet_and_wakes_for_a_call() {
        let engine = engine();
        let ticker = EpochTicker::start(engine.weak());
        assert!(wait_parked(&ticker, true), "an unused ticker parks");
        // A token wakes it, and guest code that spins meets the deadline.
        let mut running = ticker.token();
        running.start();
        assert!(wait_parked(&ticker, false), "a token wakes the ticker");
        assert!(epoch_advances(&engine), "the epoch moves while a token is held");
        // It does not park while the token is held, however long.
        std::thread::sleep(EPOCH_TICK * (QUIET_BEFORE_PARK + 20));
        assert!(!ticker.parked(), "parked while an instance was in use");
        running.stop();
        assert!(wait_parked(&ticker, true), "quiet again, it parks again");
        running.start();
        assert!(wait_parked(&ticker, false), "a token started again wakes it again");
        drop(running);
        assert!(wait_parked(&ticker, true), "a token dropped is stopped");
    }

    #[test]
    fn ends_with_its_handle() {
        let engine = engine();
        let ticker = EpochTicker::start(engine.weak());
        assert!(wait_parked(&ticker, true));
        let shared = ticker.0.clone();
        drop(ticker);
        // The thread's own reference goes when it ends.
        until(Duration::from_secs(30), || Arc::strong_count(&shared) == 1);
        assert_eq!(Arc::strong_count(&shared), 1, "the ticker thread ended");
    }
}
