//! What the metrics cost on the request path (issue 11): counting one served token request (the
//! request counter by route, dialect and status, and the cache-hit counter) against a baseline of two
//! plain atomic adds, in interleaved batches of one run (compare the ratio, not the nanoseconds).
//!
//! `cargo bench --bench metrics` measures; under `cargo test` (no `--bench`) it runs a few iterations.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
    let baseline = || {
        black_box(&a).fetch_add(1, Ordering::Relaxed);
        black_box(&b).fetch_add(1, Ordering::Relaxed);
    };
    let counted = tokend::bench::count_served_request;
    if !measure {
        for _ in 0..100 {
            counted();
            baseline();
        }
        println!("metrics: ran (run `cargo bench --bench metrics` to measure)");
        return;
    }
    counted(); // the first call resolves the handles
    let per_op = |f: &dyn Fn(), n: u32| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed() / n
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut base, mut cost) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        base.push(per_op(&baseline, 1_000_000));
        cost.push(per_op(&counted, 1_000_000));
    }
    let (base, cost) = (median(base), median(cost));
    let ns = |d: Duration| d.as_secs_f64() * 1e9;
    println!("metrics on the request path, median of 21 interleaved batches of 1e6 (release):");
    println!("  baseline: two atomic adds        {:>7.1} ns", ns(base));
    println!("  one served request's counters    {:>7.1} ns  = {:.1}x baseline", ns(cost), ns(cost) / ns(base));
}
