//! What the translated routes (`/v1/responses`, `/v1/messages`) add over
//! chat completions, measured in adjacent runs against one gateway: each
//! round runs chat and every translated route at c=1 back to back (the
//! order rotating), and a route's figure is the median, over the rounds,
//! of its p50 minus chat's p50 in the same round. Comparing medians of
//! runs minutes apart (as the side-by-side table does) lets the VM's drift
//! between them pass for translation cost.

use std::path::Path;

use anyhow::Result;

use crate::peers::{self, CHAT};

/// A route measured against chat completions.
pub struct Route {
    /// Row name.
    pub name: &'static str,
    /// Its URL.
    pub url: String,
    /// The (non-streamed, streamed) request bodies.
    pub bodies: (&'static str, &'static str),
}

/// Measure `routes` against chat completions at `chat_url` and print the
/// table.
pub fn compare(chat_url: &str, routes: &[Route], key: &str, secs: u64, rounds: usize, scratch: &Path) -> Result<()> {
    let all: Vec<(&str, &(&str, &str))> =
        std::iter::once((chat_url, &CHAT)).chain(routes.iter().map(|r| (r.url.as_str(), &r.bodies))).collect();
    // over[route][mode]: the per-round differences, µs; chat[mode]: chat's p50s.
    let mut over = vec![[Vec::new(), Vec::new()]; routes.len()];
    let mut chat = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (mode, stream) in [false, true].into_iter().enumerate() {
            let mut p50 = vec![0.0; all.len()];
            for k in 0..all.len() {
                let i = (round + k) % all.len();
                let (url, bodies) = all[i];
                let body = if stream { bodies.1 } else { bodies.0 };
                p50[i] = peers::wrk(url, body, key, 1, secs, scratch)?.p50.as_secs_f64() * 1e6;
            }
            chat[mode].push(p50[0]);
            for (r, route_p50) in p50[1..].iter().enumerate() {
                over[r][mode].push(route_p50 - p50[0]);
            }
        }
        eprintln!("translation: round {} of {rounds} done", round + 1);
    }
    println!(
        "\n## translation over chat: c=1 p50 in adjacent runs, median of {rounds} rounds' differences \
         (range), {secs} s per run\n"
    );
    println!("| route | added, non-streamed | added, streamed | target |\n|---|---|---|---|");
    println!(
        "| chat completions (p50) | {:.0} µs | {:.0} µs | |",
        peers::median(chat[0].clone()),
        peers::median(chat[1].clone())
    );
    let cell = |d: &Vec<f64>| {
        let (lo, hi) = d.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{:+.0} µs ({:+.0} to {:+.0})", peers::median(d.clone()), lo, hi)
    };
    for (route, d) in routes.iter().zip(&over) {
        println!("| {} | {} | {} | ≤ 20 µs |", route.name, cell(&d[0]), cell(&d[1]));
    }
    Ok(())
}
