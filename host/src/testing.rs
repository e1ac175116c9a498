//! Helpers shared by the unit tests.

use std::time::{Duration, Instant};

/// Poll `check` every 5 ms until it holds (true) or `limit` passes (false).
pub(crate) fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}
