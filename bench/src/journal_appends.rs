//! In-process: what journaling a usage row costs (`Journal::append`, the
//! step every billed request takes before its answer is sent), from two
//! threads at once as the gateway's two serving threads do, while a third
//! marks everything committed every 50 ms as the billing writer does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use wasmgate::billing::journal::{Change, Journal};
use wasmgate::billing::logs::{LogKind, LogRow};

const THREADS: usize = 2;

/// A row as the benchmark's chat request leaves it.
fn row(id: u64) -> Change {
    Change::Row(Box::new(LogRow {
        id,
        at_ms: 1_765_000_000_000 + id,
        kind: LogKind::Consume,
        request_id: format!("req-{id:016x}"),
        user_id: Some(1),
        token_id: Some(1),
        token_name: "bench".into(),
        group: "default".into(),
        channel_id: 1 + id % 2,
        model: "gpt-4o-mini".into(),
        upstream_model: "gpt-4o-mini".into(),
        prompt_tokens: 12,
        completion_tokens: 9,
        quota: 4,
        latency_ms: 1,
        ..LogRow::default()
    }))
}

/// Append `per_thread` rows from each of [`THREADS`] threads and print
/// the time and CPU per append.
pub fn run(per_thread: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (journal, _) = Journal::open(dir.path(), 0)?;
    let last = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let pid = std::process::id();
    let (cpu0, started) = (crate::cpu::seconds(pid), Instant::now());
    std::thread::scope(|s| {
        let committer = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                journal.committed(last.load(Ordering::Relaxed));
            }
        });
        let appenders: Vec<_> = (0..THREADS)
            .map(|t| {
                let (journal, last) = (&journal, &last);
                s.spawn(move || {
                    for i in 0..per_thread {
                        let seq = journal.append(row((t * per_thread + i) as u64), |seq, _, _, written| {
                            written.map(|()| seq).map_err(|e| anyhow::anyhow!(e.0))
                        })?;
                        last.fetch_max(seq, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        let result: Result<()> = appenders.into_iter().try_for_each(|a| a.join().expect("appender"));
        done.store(true, Ordering::Relaxed);
        committer.join().expect("committer");
        result
    })?;
    let (wall, cpu) = (started.elapsed().as_secs_f64(), crate::cpu::seconds(pid) - cpu0);
    let n = (THREADS * per_thread) as f64;
    println!("\n## journaling a usage row (in-process, {THREADS} threads, emptied every 50 ms)\n");
    println!("| appends | time per append, each thread | CPU per append |\n|---|---|---|");
    println!("| {n:.0} | {:.0} ns | {:.0} ns |", wall * 1e9 / per_thread as f64, cpu * 1e9 / n);
    Ok(())
}
