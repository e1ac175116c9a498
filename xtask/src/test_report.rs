//! Running `cargo test` so that a failure's reason is the last thing
//! printed: libtest prints each failing test's panic in a `failures:`
//! section in the middle of a workspace run, and a log that keeps only its
//! tail (CI's) would otherwise show the later crates' results instead.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// At most this many lines are repeated per failing test.
const LINES_PER_FAILURE: usize = 12;

/// Run `cmd` (a `cargo test`), passing its output through; when it fails,
/// print again, at the end, why each failing test failed.
pub fn run_tests(cmd: &mut Command) -> Result<()> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("test output")?;
    let mut report = Report::default();
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the test output")?;
        let _ = writeln!(out, "{line}");
        report.see(line);
    }
    drop(out);
    let status = child.wait().context("waiting for the tests")?;
    if !status.success() {
        report.print();
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// The failing tests' panic messages, collected from libtest's output.
#[derive(Default)]
struct Report {
    /// `(test, lines from its panic on)`, in the order they were printed.
    failures: Vec<(String, Vec<String>)>,
    /// Inside a `---- name stdout ----` block, after its panic line.
    in_panic: bool,
}

impl Report {
    fn see(&mut self, line: String) {
        if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
            self.failures.push((name.to_string(), Vec::new()));
            self.in_panic = false;
            return;
        }
        if line == "failures:" || line.starts_with("stack backtrace:") {
            self.in_panic = false;
            return;
        }
        let Some((_, lines)) = self.failures.last_mut() else { return };
        self.in_panic |= line.contains("panicked at");
        if self.in_panic && lines.len() < LINES_PER_FAILURE {
            lines.push(line);
        }
    }

    fn print(&self) {
        if self.failures.is_empty() {
            return;
        }
        eprintln!("\n==> xtask test: why {} test(s) failed", self.failures.len());
        for (name, lines) in &self.failures {
            eprintln!("---- {name}");
            for line in lines {
                eprintln!("  {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn keeps_each_failures_panic_and_not_its_backtrace_or_output() {
        let mut report = Report::default();
        let output = "running 2 tests\ntest a ... FAILED\nfailures:\n\n---- m::a stdout ----\nsome print\n\
                      thread 'm::a' panicked at tests/m.rs:3:5:\nleft != right\nstack backtrace:\n   0: frame\n\n\
                      ---- m::b stdout ----\nthread 'm::b' panicked at tests/m.rs:9:5:\nno row\n\nfailures:\n    m::a\n";
        output.lines().for_each(|l| report.see(l.to_string()));
        let seen: Vec<(&str, Vec<&str>)> =
            report.failures.iter().map(|(n, l)| (n.as_str(), l.iter().map(String::as_str).collect())).collect();
        assert_eq!(
            seen,
            vec![
                ("m::a", vec!["thread 'm::a' panicked at tests/m.rs:3:5:", "left != right"]),
                ("m::b", vec!["thread 'm::b' panicked at tests/m.rs:9:5:", "no row", ""]),
            ]
        );
    }
}
