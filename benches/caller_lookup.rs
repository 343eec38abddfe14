//! What it costs to know who is asking, per connection (issue 9):
//! - the `sock_diag` exact lookup of a loopback TCP client (every TCP connection), and
//! - finding the client's process from its socket inode (only with `[audit]`, once per connection),
//!
//! each against a `getsockname` baseline measured in the same run, in interleaved batches (the machine
//! is shared and noisy: compare the ratios, not the microseconds, across runs).
//!
//! `cargo bench --bench caller_lookup` measures; under `cargo test` (no `--bench`) it runs a few
//! iterations and checks the answers only.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use tokend::bench::{TcpLookup, process_of_socket};

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, peer) = listener.accept().expect("accept");
    let local = server.local_addr().expect("local");
    let uid = nix_free_euid();
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", client.as_raw_fd())).expect("fd").ino();
    let inode = u32::try_from(inode).expect("inode");

    let lookup = TcpLookup::default();
    assert_eq!(lookup.lookup(peer, local), Some((uid, inode)), "sock_diag names this process's socket");
    let pid = i32::try_from(std::process::id()).expect("pid");
    assert_eq!(process_of_socket(uid, inode), Some(pid), "the socket's process is this one");
    if !measure {
        println!("caller_lookup: answers checked (run `cargo bench --bench caller_lookup` to measure)");
        return;
    }

    let baseline = || {
        std::hint::black_box(server.local_addr().expect("getsockname"));
    };
    let diag = || {
        std::hint::black_box(lookup.lookup(peer, local));
    };
    let process = || {
        std::hint::black_box(process_of_socket(uid, inode));
    };
    let processes = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit())))
        .count();
    let (base, diag, base2, proc) = {
        let mut b = Vec::new();
        let mut d = Vec::new();
        let mut b2 = Vec::new();
        let mut p = Vec::new();
        for _ in 0..15 {
            b.push(per_op(&baseline, 2000));
            d.push(per_op(&diag, 2000));
            b2.push(per_op(&baseline, 2000));
            p.push(per_op(&process, 20));
        }
        (median(b), median(d), median(b2), median(p))
    };
    let base = (base + base2) / 2;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("per-connection caller lookup, median of 15 interleaved batches (release):");
    println!("  baseline getsockname          {:>9.2} µs", us(base));
    println!("  sock_diag exact lookup (TCP)  {:>9.2} µs  = {:>6.1}× baseline", us(diag), us(diag) / us(base));
    println!(
        "  process from socket inode     {:>9.2} µs  = {:>6.0}× baseline  ({processes} processes in /proc; [audit] only)",
        us(proc),
        us(proc) / us(base)
    );
}

fn per_op(f: &dyn Fn(), n: u32) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// This process's effective uid, from `/proc/self` (the bench needs no crate for it).
fn nix_free_euid() -> u32 {
    std::fs::metadata("/proc/self").expect("/proc/self").uid()
}
