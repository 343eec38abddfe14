//! A bounded soak: many resources with short-lived tokens, continuous callers for 90 s. No failed
//! request, and resident memory flat (the last third no higher than the first third plus slack).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn soak_many_resources_short_lifetimes_flat_memory_no_failures() {
    const RESOURCES: usize = 25;
    let idp = Idp::start(10).await;
    let resources: Vec<String> = (0..RESOURCES).map(|i| format!("https://soak{i}.example")).collect();
    let pinned: Vec<&str> = resources.iter().take(10).map(String::as_str).collect();
    let mut o = Opts::new(&idp).resources(&pinned);
    o.min_lifetime = "3s".into();
    let t = Arc::new(Tokend::start(&o).await);
    t.wait_ready(Duration::from_secs(15)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut callers = Vec::new();
    for w in 0..4 {
        let (t, stop, ok, failed, resources) = (t.clone(), stop.clone(), ok.clone(), failed.clone(), resources.clone());
        callers.push(tokio::spawn(async move {
            let client = http();
            let mut i = w;
            while !stop.load(Ordering::SeqCst) {
                let url = t.imds_url(&resources[i % RESOURCES]);
                let r = client.get(url).header("Metadata", "true").send().await;
                match r {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                i += 7;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        samples.push(rss_kib(t.pid()));
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.expect("join");
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let third = samples.len() / 3;
    let avg = |s: &[u64]| s.iter().sum::<u64>() / s.len().max(1) as u64;
    let (first, last) = (avg(&samples[..third]), avg(&samples[samples.len() - third..]));
    let calls = idp.token_requests().await;
    eprintln!(
        "soak: {ok} ok, {failed} failed, {calls} upstream calls, RSS KiB first third {first}, last third {last}, samples {samples:?}"
    );
    assert_eq!(failed, 0, "no failed request");
    assert!(ok > 1000, "{ok}");
    assert!(last <= first + first / 5 + 2048, "memory grew: {first} KiB -> {last} KiB ({samples:?})");
    // 25 resources, 10 s tokens, 3 s floor: ~90/5 refreshes each; far below one call per request.
    assert!(calls < (ok / 10) as u64, "{calls} upstream calls for {ok} requests");
}
