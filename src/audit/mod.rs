//! The audit log (`[audit] path`): one JSON line per token decision — who asked (as the kernel says),
//! which identity and resource, the decision and the rule that made it, cache hit or fetch, status,
//! latency and the token's fingerprint, never the token.
//!
//! Written off the hot path. A request copies what it saw into one small [`Entry`] (one allocation for
//! its few strings, each already cut to [`FIELD_CAP`]) and puts it on a bounded queue ([`QUEUE`]); one
//! writer thread renders the JSON text, adds the caller's user name (an NSS lookup, which can block:
//! once per uid, never in a request) and what is known of the caller's process, and writes whatever is
//! queued in one `write` per batch (`writer.rs`).
//!
//! # The line
//!
//! Keys are written in alphabetical order; a field the request did not reach is `null` (the `caller`
//! fields, `count`, `first`, `last`, `on_demand` are left out instead).
//!
//! - `time`: when the line was queued (RFC 3339, milliseconds, UTC).
//! - `caller`: who asked, from the kernel — `uid`, `gid` and `pid` (the latter two over the unix socket
//!   only), `transport` (`"tcp"` or `"unix"`), or `unknown` (`"socket_gone"`, `"no_such_socket"`,
//!   `"lookup_failed"`) when the kernel could not say; `user` (the uid's name, when it has one); and
//!   from the process lookup, when there is one: `pid`, `exe`, `command`, `unit` (systemd), `container`
//!   — or `process`: `"not_looked_up"` (the lookup queue was full or the caller's budget spent, see
//!   `process`), `"late"` (not finished [`PROCESS_WAIT`] after the line was queued) or `"not_found"`.
//! - `dialect`: `"imds"`, `"app_service"`, `"azureml"` or `"cloud_shell"`.
//! - `identity`: the selected identity, when the request got that far.
//! - `resource`: the resource as the caller spelt it.
//! - `decision`: `"issued"`, `"denied"` (403/401), `"rate_limited"` (429 from `access.rate_limit`),
//!   `"error"` (anything else refused), or `"client_gone"` (the client went away before its answer).
//! - `rule`: the index of the `[[access.rule]]` that allowed it, if one did.
//! - `cache`: `"hit"` or `"fetch"` — for `client_gone` too, so that a fetch a vanished client caused shows.
//! - `on_demand`: `true` when the request added an on-demand resource (took one of its caller's
//!   on-demand slots); left out otherwise.
//! - `status`: the HTTP status answered (for `client_gone`: the one that would have been).
//! - `latency_ms`: time from the parsed request to the answer.
//! - `token`: the token's fingerprint (`sha256:` + 12 hex digits), for issued tokens.
//! - `reason`: why it was refused, for anything but issued (the description the caller got).
//! - `count`, `first`, `last`: a **rate-limit summary**. The first `rate_limited` request of a caller
//!   (uid, or all unknown callers together) is written at once; the caller's further `rate_limited`
//!   requests for [`SUMMARY_INTERVAL`] after it are counted, not written, and then written as one line
//!   (the first of them, with `count` requests from `first` to `last`; no process fields). A line
//!   without `count` stands for one request. Every other decision keeps its own line.
//!
//! Every string is JSON-escaped, and beyond JSON every C0 and C1 control, DEL, U+2028 and U+2029 is
//! written as `\uXXXX`, so that no line splitter or terminal sees a line end or a control sequence in a
//! caller's text. Every string a caller can influence (identity, resource, reason, the process's
//! executable, command, unit and container) is cut at [`FIELD_CAP`] bytes on a character boundary,
//! marked `…(+N bytes)` (before escaping: a cut string is at most six times as long escaped): a line
//! stays under about 2 KiB of printable text, under 16 KiB whatever the caller sends.
//!
//! # Nothing lost silently
//!
//! A line that cannot be queued (the writer cannot keep up) or written (the disk is full, the file
//! unwritable) is counted (`tokend_audit_lines_dropped_total{reason="queue_full"|"write_failed"}`, next to
//! `tokend_audit_lines_written_total`) and logged at the first, every power of two and every thousand,
//! and the totals at shutdown. A failed write is retried (the unwritten bytes are kept, up to
//! [`PENDING_CAP`]) until a write succeeds. [`AuditLog::record`] says when a line is not audited:
//! with `[audit] on_failure = "refuse"` the request path must then refuse the request (fail closed);
//! with `"drop"` (the default) it serves anyway.
//!
//! # Rotation
//!
//! [`AuditLog::reopen`] (on SIGHUP, i.e. `tokend reload`) makes the writer reopen the path between two
//! lines: logrotate's `create` + `postrotate` loses nothing (deploy/README.md).

mod entry;
pub(crate) mod render;
mod summary;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use crate::caller::Caller;
use crate::metrics::AuditLoss;
use crate::process::ProcessLookup;

pub(crate) use entry::Entry;

/// Lines queued for the writer at most.
pub(crate) const QUEUE: usize = 4096;

/// The most bytes kept of one caller-controlled string.
pub(crate) const FIELD_CAP: usize = 256;

/// How long after a line is queued the writer waits for the caller's process lookup.
pub(crate) const PROCESS_WAIT: Duration = Duration::from_millis(250);

/// How long a caller's `rate_limited` requests are counted into one summary line.
pub(crate) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Rendered bytes kept for a retry while the file cannot be written; lines beyond are dropped.
pub(crate) const PENDING_CAP: usize = 8 << 20;

/// How long shutdown waits for the writer to write what is queued.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// `[audit] on_failure`: what a request whose line cannot be audited gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// Served anyway; the line is counted as dropped (the default).
    #[default]
    Drop,
    /// Refused (the request path answers 503): fail closed.
    Refuse,
}

impl OnFailure {
    /// The setting's spelling, `"drop"` or `"refuse"`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "drop" => Some(Self::Drop),
            "refuse" => Some(Self::Refuse),
            _ => None,
        }
    }
}

/// Why a decision is not (or may not be) in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotAudited {
    /// The queue is full: the writer cannot keep up. The line is dropped.
    #[error("the audit log's queue is full")]
    QueueFull,
    /// The last write to the file failed and none has succeeded since. With `on_failure = "refuse"`
    /// the line is dropped; with `"drop"` it is queued and written if the file becomes writable.
    #[error("the audit log cannot be written")]
    WriteFailing,
    /// The writer thread is gone (it cannot be, short of a bug). The line is dropped.
    #[error("the audit log's writer has stopped")]
    WriterGone,
}

/// One decision, as the request path saw it (borrowed: [`AuditLog::record`] copies what it keeps).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record<'a> {
    /// `"imds"`, `"app_service"`, `"azureml"` or `"cloud_shell"`.
    pub(crate) dialect: &'static str,
    /// The selected identity, when the request got that far.
    pub(crate) identity: Option<&'a str>,
    /// The resource as the caller spelt it.
    pub(crate) resource: Option<&'a str>,
    /// `"issued"`, `"denied"`, `"rate_limited"`, `"error"` or `"client_gone"`.
    pub(crate) decision: &'static str,
    /// The `[[access.rule]]` that allowed it, if one did.
    pub(crate) rule: Option<usize>,
    /// `"hit"` or `"fetch"`, for issued tokens (and for `client_gone`: whether a fetch was caused).
    pub(crate) cache: Option<&'static str>,
    /// Whether the request added an on-demand resource (took one of its caller's slots).
    pub(crate) on_demand: bool,
    /// The HTTP status answered (for `client_gone`, the one that would have been).
    pub(crate) status: u16,
    /// Time from the parsed request to the answer.
    pub(crate) latency_ms: f64,
    /// The token's fingerprint (`sha256:` + 12 hex digits), for issued tokens.
    pub(crate) token: Option<&'a str>,
    /// Why it was refused, for anything but issued (the description the caller got).
    pub(crate) reason: Option<&'a str>,
}

/// How an audit log behaves; [`Settings::new`] is the configured one, tests shorten the intervals.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// `[audit] on_failure`.
    pub(crate) on_failure: OnFailure,
    /// Lines queued at most ([`QUEUE`]).
    pub(crate) queue: usize,
    /// [`PROCESS_WAIT`].
    pub(crate) process_wait: Duration,
    /// [`SUMMARY_INTERVAL`].
    pub(crate) summary_interval: Duration,
    /// How often a failing write is retried.
    pub(crate) retry: Duration,
}

impl Settings {
    /// The settings of a configured log.
    pub(crate) fn new(on_failure: OnFailure) -> Self {
        Self {
            on_failure,
            queue: QUEUE,
            process_wait: PROCESS_WAIT,
            summary_interval: SUMMARY_INTERVAL,
            retry: Duration::from_secs(1),
        }
    }
}

/// What the request side and the writer share.
#[derive(Debug, Default)]
struct Shared {
    /// The last write failed and none has succeeded since.
    failing: AtomicBool,
    /// Reopens asked for, and done (the writer reopens when `reopen_done < reopen_asked`).
    reopen_asked: AtomicU64,
    reopen_done: AtomicU64,
    /// Lines written.
    written: AtomicU64,
    /// Lines dropped, by [`AuditLoss`].
    dropped: [AtomicU64; 2],
}

impl Shared {
    /// Counts a lost line, exports it and logs at the first, every power of two and every thousand.
    fn lost(&self, why: AuditLoss, lines: u64, path: &Path) {
        if lines == 0 {
            return;
        }
        crate::metrics::get().audit_dropped(why, lines);
        let before = self.dropped[why as usize].fetch_add(lines, Ordering::Relaxed);
        let n = before + lines;
        let crossed = (before + 1..=n).any(|k| k.is_power_of_two() || k.is_multiple_of(1000));
        if crossed {
            tracing::warn!(
                path = %path.display(),
                reason = why.label(),
                dropped_total = n,
                "audit log lines dropped: {}",
                match why {
                    AuditLoss::QueueFull => "the writer cannot keep up",
                    AuditLoss::WriteFailed => "the file cannot be written",
                }
            );
        }
    }
}

/// Messages to the writer.
// Not boxed: the queue's slots are allocated once, a box would be one more allocation per line.
#[allow(clippy::large_enum_variant)]
enum Message {
    /// A line.
    Line(Entry),
    /// Nothing: look at [`Shared::reopen_asked`] now.
    Wake,
}

/// An open audit log.
#[derive(Debug)]
pub(crate) struct AuditLog {
    /// `None` once dropping: the writer then drains the queue and stops.
    tx: Option<SyncSender<Message>>,
    shared: Arc<Shared>,
    refuse: bool,
    /// Hangs up when the writer thread ends (in a mutex for `Sync`: only `drop` looks at it).
    done: parking_lot::Mutex<Receiver<()>>,
    path: PathBuf,
}

/// Opens `path` for appending, created with mode 0640.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

impl AuditLog {
    /// Opens `path` for appending (created with mode 0640) and starts the writer thread.
    pub(crate) fn open(path: &Path, on_failure: OnFailure) -> io::Result<Self> {
        Self::with(path, Settings::new(on_failure))
    }

    /// [`AuditLog::open`] with `settings`.
    pub(crate) fn with(path: &Path, settings: Settings) -> io::Result<Self> {
        let file = open_append(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Message>(settings.queue);
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let shared = Arc::new(Shared::default());
        let refuse = settings.on_failure == OnFailure::Refuse;
        let writer = writer::Writer::new(path.to_path_buf(), file, shared.clone(), settings);
        std::thread::Builder::new().name("tokend-audit".into()).spawn(move || {
            writer.run(&rx);
            drop(done_tx);
        })?;
        Ok(Self { tx: Some(tx), shared, refuse, done: parking_lot::Mutex::new(done), path: path.to_path_buf() })
    }

    /// Queues the line for one decision; never blocks. With `process`, the writer adds the caller's
    /// pid, executable, unit and container if the lookup has finished [`PROCESS_WAIT`] after now.
    ///
    /// `Err` says why the line is not (or may not be) audited; with [`AuditLog::refuses`] the caller
    /// must then refuse the request, and the line was not queued. Without, it serves anyway: on
    /// [`NotAudited::WriteFailing`] the line was queued and is written if the file recovers.
    pub(crate) fn record(
        &self,
        caller: &Caller,
        process: Option<Arc<ProcessLookup>>,
        record: &Record<'_>,
    ) -> Result<(), NotAudited> {
        let failing = self.shared.failing.load(Ordering::Relaxed);
        if failing && self.refuse {
            self.shared.lost(AuditLoss::WriteFailed, 1, &self.path);
            return Err(NotAudited::WriteFailing);
        }
        let Some(tx) = &self.tx else { return Err(NotAudited::WriterGone) };
        match tx.try_send(Message::Line(Entry::new(caller, process, record, Instant::now()))) {
            Ok(()) if failing => Err(NotAudited::WriteFailing),
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.shared.lost(AuditLoss::QueueFull, 1, &self.path);
                Err(NotAudited::QueueFull)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.shared.lost(AuditLoss::WriteFailed, 1, &self.path);
                Err(NotAudited::WriterGone)
            }
        }
    }

    /// Whether a request whose line is not audited must be refused (`on_failure = "refuse"`).
    pub(crate) fn refuses(&self) -> bool {
        self.refuse
    }

    /// Makes the writer reopen the path between two lines, as soon as it has written what is queued
    /// now (after a rotation moved the file away), creating it with mode 0640 if it is missing. The
    /// ticket tells [`AuditLog::reopened`] when it is done.
    pub(crate) fn reopen(&self) -> u64 {
        let ticket = self.shared.reopen_asked.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(tx) = &self.tx {
            // A full queue wakes the writer anyway.
            let _ = tx.try_send(Message::Wake);
        }
        ticket
    }

    /// Whether the reopen of `ticket` (or a later one) is done: lines queued after this go to the
    /// reopened file.
    pub(crate) fn reopened(&self, ticket: u64) -> bool {
        self.shared.reopen_done.load(Ordering::Acquire) >= ticket
    }

    /// Lines written, dropped because the queue was full, dropped because they could not be written.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        let [full, failed] = &self.shared.dropped;
        (self.shared.written.load(Ordering::Relaxed), full.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    }
}

impl Drop for AuditLog {
    /// Lets the writer write what is queued (and the open summaries), for at most [`SHUTDOWN_WAIT`],
    /// then logs what was lost in all.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = self.done.get_mut().recv_timeout(SHUTDOWN_WAIT) {
            tracing::warn!(path = %self.path.display(), "the audit log's writer did not finish in time");
        }
        let [full, failed] = &self.shared.dropped;
        let (full, failed) = (full.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        if full + failed > 0 {
            tracing::warn!(
                path = %self.path.display(),
                queue_full = full,
                write_failed = failed,
                written = self.shared.written.load(Ordering::Relaxed),
                "audit log lines were dropped"
            );
        }
    }
}
