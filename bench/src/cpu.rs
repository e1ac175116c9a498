//! CPU time of processes, read from `/proc` (Linux), for CPU-per-request
//! figures that a busy machine's throughput swings do not blur.

/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`: 100 on Linux,
/// whatever the kernel's own tick rate).
const TICKS_PER_SECOND: f64 = 100.0;

/// The user + system CPU time `pid` has used (all its threads), in
/// seconds; 0 when it is gone.
pub fn seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count the
    // fields after it (the state is field 3; utime and stime 14 and 15).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND
}

/// [`seconds`] of `pid` and of each process it started (a PostgreSQL
/// postmaster and its backends; children that already exited are not
/// counted).
pub fn seconds_with_children(pid: u32) -> f64 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    seconds(pid) + children.split_whitespace().filter_map(|c| c.parse().ok()).map(seconds).sum::<f64>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_used_some_cpu() {
        let start = super::seconds(std::process::id());
        let mut x = 0u64;
        let begun = std::time::Instant::now();
        while begun.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(super::seconds(std::process::id()) > start, "{x}");
    }
}
