//! The audit line's costs (issue 20): what a request does to queue its line, what the writer does to
//! render it, and lines per second through queue and writer — each next to the way it was done before
//! (a `serde_json::Value` built on the request thread, completed and serialised by the writer), kept
//! here as the baseline, so that one run compares both.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::audit::render::{self, ProcessSeen};
use crate::audit::{AuditLog, Entry, OnFailure, Record};
use crate::caller::{Caller, Transport};

/// The line of a typical served token.
fn record() -> Record<'static> {
    Record {
        dialect: "imds",
        identity: Some("default"),
        resource: Some("https://storage.azure.com"),
        decision: "issued",
        rule: Some(0),
        cache: Some("hit"),
        on_demand: false,
        status: 200,
        latency_ms: 0.042,
        token: Some("sha256:0123456789ab"),
        reason: None,
    }
}

const CALLER: Caller = Caller::Known { uid: 0, gid: None, pid: None, transport: Transport::Tcp };

/// The request thread's part, now: the record copied into an [`Entry`]; its size.
pub fn request_now() -> usize {
    let entry = Entry::new(&CALLER, None, &record(), Instant::now());
    std::hint::black_box(&entry);
    std::mem::size_of_val(&entry)
}

/// The request thread's part, before: the time formatted, the line built as a `serde_json::Value`.
pub fn request_before() -> usize {
    let value = before::value(&CALLER, &record());
    std::hint::black_box(&value);
    value.as_object().map_or(0, serde_json::Map::len)
}

/// An entry to render (setup, not measured).
#[derive(Debug)]
pub struct Queued(Entry);

/// A line as the request thread queues it now.
pub fn queued_now() -> Queued {
    Queued(Entry::new(&CALLER, None, &record(), Instant::now()))
}

/// A line as the request thread queued it before.
pub fn queued_before() -> serde_json::Value {
    before::value(&CALLER, &record())
}

/// The writer's part, now: the JSON text rendered into its buffer (`out`, cleared first); its length.
pub fn render_now(queued: &Queued, out: &mut Vec<u8>) -> usize {
    out.clear();
    render::line(out, &queued.0, SystemTime::now(), Some("root"), ProcessSeen::NotAsked, None);
    out.len()
}

/// The writer's part, before: the user name added to the value, the value serialised.
pub fn render_before(mut value: serde_json::Value) -> usize {
    before::finish(&mut value, Some("root")).len()
}

/// An audit log writing to `/dev/null`, to measure lines per second through queue and writer.
#[derive(Debug)]
pub struct Throughput(AuditLog);

impl Throughput {
    /// Opens it.
    pub fn new() -> Self {
        Self(AuditLog::open(std::path::Path::new("/dev/null"), OnFailure::Drop).expect("open /dev/null"))
    }

    /// Records `n` lines, never more than the queue holds ahead of the writer, and waits until all are
    /// written; the time it took.
    pub fn lines(&self, n: u64) -> Duration {
        let start = Instant::now();
        let (base, _, _) = self.0.counts();
        let mut sent = 0;
        while sent < n {
            let (written, _, _) = self.0.counts();
            if sent - (written - base) < 2048 {
                if self.0.record(&CALLER, None, &record()).is_ok() {
                    sent += 1;
                }
            } else {
                std::thread::yield_now();
            }
        }
        while self.0.counts().0 - base < n {
            std::thread::yield_now();
        }
        start.elapsed()
    }
}

impl Default for Throughput {
    fn default() -> Self {
        Self::new()
    }
}

/// The same through the former pipeline: values on a bounded queue, one writer thread that adds the
/// user name, serialises and writes through a `BufWriter` to `/dev/null`, flushing when the queue is empty.
#[derive(Debug)]
pub struct ThroughputBefore {
    tx: SyncSender<serde_json::Value>,
    written: Arc<std::sync::atomic::AtomicU64>,
}

impl ThroughputBefore {
    /// Starts its writer.
    pub fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<serde_json::Value>(crate::audit::QUEUE);
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = written.clone();
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().append(true).open("/dev/null").expect("open /dev/null");
            let mut out = std::io::BufWriter::new(file);
            while let Ok(mut line) = rx.recv() {
                let mut n = 1;
                let _ = out.write_all(before::finish(&mut line, Some("root")).as_bytes());
                for mut more in rx.try_iter() {
                    n += 1;
                    let _ = out.write_all(before::finish(&mut more, Some("root")).as_bytes());
                }
                let _ = out.flush();
                count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
        Self { tx, written }
    }

    /// As [`Throughput::lines`].
    pub fn lines(&self, n: u64) -> Duration {
        let written = || self.written.load(std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let base = written();
        let mut sent = 0;
        while sent < n {
            if sent - (written() - base) < 2048 {
                if self.tx.try_send(before::value(&CALLER, &record())).is_ok() {
                    sent += 1;
                }
            } else {
                std::thread::yield_now();
            }
        }
        while written() - base < n {
            std::thread::yield_now();
        }
        start.elapsed()
    }
}

impl Default for ThroughputBefore {
    fn default() -> Self {
        Self::new()
    }
}

/// The former line, as it was built (a copy of the code this change replaced, as the baseline).
mod before {
    use super::{Caller, Record, Serialize, SystemTime, Transport};

    #[derive(Serialize)]
    struct CallerRecord {
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        transport: Option<&'static str>,
    }

    #[derive(Serialize)]
    struct Fields<'a> {
        dialect: &'static str,
        identity: Option<&'a str>,
        resource: Option<&'a str>,
        decision: &'static str,
        rule: Option<usize>,
        cache: Option<&'static str>,
        status: u16,
        latency_ms: f64,
        token: Option<&'a str>,
        reason: Option<&'a str>,
    }

    #[derive(Serialize)]
    struct Line<'a> {
        time: String,
        caller: CallerRecord,
        #[serde(flatten)]
        record: Fields<'a>,
    }

    pub(super) fn value(caller: &Caller, r: &Record<'_>) -> serde_json::Value {
        let Caller::Known { uid, gid, pid, transport } = caller else { return serde_json::Value::Null };
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            caller: CallerRecord {
                uid: Some(*uid),
                gid: *gid,
                pid: *pid,
                transport: Some(match transport {
                    Transport::Tcp => "tcp",
                    Transport::Unix => "unix",
                }),
            },
            record: Fields {
                dialect: r.dialect,
                identity: r.identity,
                resource: r.resource,
                decision: r.decision,
                rule: r.rule,
                cache: r.cache,
                status: r.status,
                latency_ms: r.latency_ms,
                token: r.token,
                reason: r.reason,
            },
        };
        serde_json::to_value(&line).unwrap_or_default()
    }

    pub(super) fn finish(line: &mut serde_json::Value, user: Option<&str>) -> String {
        if let (Some(name), Some(caller)) = (user, line["caller"].as_object_mut()) {
            caller.insert("user".to_owned(), serde_json::Value::String(name.to_owned()));
        }
        let mut text = line.to_string();
        text.push('\n');
        text
    }
}
