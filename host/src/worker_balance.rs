//! Spreading client connections evenly over the worker threads.
//!
//! Every worker runs its own accept loop on the one listening socket, and
//! a new connection wakes all of them; but a worker already awake takes a
//! burst of connections (a load balancer opening its pool, `wrk -c32`) in
//! one tight loop before the others wake, and a connection stays on the
//! worker that accepted it. So a worker serving more connections than
//! another holds back for at most [`HOLD_BACK`], leaving the connection to
//! the less loaded worker the same arrival woke. Measured on 2 workers
//! under `wrk -c32`: all 32 connections on one thread in about one run of
//! three, at 19–21k req/s against 24–25k when split.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Longest a busier worker waits for another one to take a connection
/// (when that one is stuck, the busier takes it after all).
pub const HOLD_BACK: Duration = Duration::from_millis(1);

/// Open connections per worker.
pub struct Balance {
    open: Vec<AtomicUsize>,
    accepted: Notify,
}

impl Balance {
    /// The counts of `workers` workers (at least one).
    pub fn new(workers: usize) -> Self {
        Self { open: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(), accepted: Notify::new() }
    }

    /// Whether worker `me` serves more than one connection more than the
    /// least loaded other worker.
    fn busier(&self, me: usize) -> bool {
        let mine = self.open[me].load(Ordering::Relaxed);
        let least =
            self.open.iter().enumerate().filter(|(i, _)| *i != me).map(|(_, n)| n.load(Ordering::Relaxed)).min();
        least.is_some_and(|least| mine > least + 1)
    }

    /// Wait, at most [`HOLD_BACK`], until worker `me` is not busier than
    /// the others (another worker accepting wakes it to check again).
    pub async fn turn(&self, me: usize) {
        let deadline = tokio::time::Instant::now() + HOLD_BACK;
        loop {
            let accepted = self.accepted.notified();
            if !self.busier(me) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                () = accepted => {}
            }
        }
    }

    /// Count a connection worker `me` accepted, until the guard drops.
    pub fn opened(self: &Arc<Self>, me: usize) -> Opened {
        self.open[me].fetch_add(1, Ordering::Relaxed);
        self.accepted.notify_waiters();
        Opened { balance: self.clone(), me }
    }
}

/// A connection counted on its worker.
pub struct Opened {
    balance: Arc<Balance>,
    me: usize,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.balance.open[self.me].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_busier_worker_waits_its_turn_and_a_lone_one_never_does() {
        let balance = Arc::new(Balance::new(2));
        let held: Vec<Opened> = (0..3).map(|_| balance.opened(0)).collect();
        assert!(balance.busier(0) && !balance.busier(1));
        let start = tokio::time::Instant::now();
        balance.turn(1).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the less loaded worker accepts at once");
        balance.turn(0).await;
        assert_eq!(start.elapsed(), HOLD_BACK, "the busier one holds back, then accepts after all");
        let _other = (balance.opened(1), balance.opened(1));
        assert!(!balance.busier(0), "within one of the others");
        drop(held);
        assert!(balance.busier(1) && !balance.busier(0));
        let lone = Arc::new(Balance::new(1));
        let _many: Vec<Opened> = (0..5).map(|_| lone.opened(0)).collect();
        assert!(!lone.busier(0));
    }
}
