//! The writer thread: takes whatever is queued, renders it into one buffer, writes the buffer with one
//! `write` (retrying what a failed write left, up to [`PENDING_CAP`]), reopens the path when asked,
//! closes rate-limit summaries when they are due, and at shutdown writes what is left.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use super::render::{self, ProcessSeen};
use super::summary::{Closed, Summaries};
use super::{Entry, Message, PENDING_CAP, Settings, Shared, open_append};
use crate::caller::Caller;
use crate::metrics::AuditLoss;
use crate::process::Outcome;

/// How long the writer sleeps at most when nothing comes (it then looks at the reopen flag).
const IDLE: Duration = Duration::from_secs(1);

/// The writer thread's state.
pub(super) struct Writer {
    path: PathBuf,
    file: File,
    shared: Arc<Shared>,
    settings: Settings,
    /// User names by uid, resolved here and kept for the process's life.
    users: HashMap<u32, Option<String>>,
    summaries: Summaries,
    /// Rendered, not yet written.
    pending: Vec<u8>,
    /// Write failures in a row, for the log.
    failures: u64,
    /// Wall-clock time of an instant (`queued` is an `Instant`: one clock read per request).
    clock: (Instant, SystemTime),
}

impl Writer {
    pub(super) fn new(path: PathBuf, file: File, shared: Arc<Shared>, settings: Settings) -> Self {
        Self {
            path,
            file,
            shared,
            summaries: Summaries::new(settings.summary_interval),
            settings,
            users: HashMap::new(),
            pending: Vec::with_capacity(64 << 10),
            failures: 0,
            clock: (Instant::now(), SystemTime::now()),
        }
    }

    /// Runs until every sender is gone, then writes what is left.
    pub(super) fn run(mut self, rx: &Receiver<Message>) {
        loop {
            let now = Instant::now();
            let mut wait = if self.pending.is_empty() { IDLE } else { self.settings.retry };
            if let Some(close) = self.summaries.next_close() {
                wait = wait.min(close.saturating_duration_since(now));
            }
            let first = match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            self.clock = (Instant::now(), SystemTime::now());
            let mut closed = self.summaries.due(self.clock.0);
            self.render_closed(&mut closed);
            // A bounded batch, so that a steady stream still gets written.
            for message in first.into_iter().chain(rx.try_iter().take(self.settings.queue)) {
                if let Message::Line(entry) = message {
                    self.take(entry, &mut closed);
                }
            }
            self.flush();
            let asked = self.shared.reopen_asked.load(Ordering::Acquire);
            if asked > self.shared.reopen_done.load(Ordering::Relaxed) {
                self.reopen();
                self.flush();
                self.shared.reopen_done.store(asked, Ordering::Release);
            }
        }
        self.clock = (Instant::now(), SystemTime::now());
        let mut closed = self.summaries.all();
        self.render_closed(&mut closed);
        self.flush();
        let left = lines_in(&self.pending);
        self.shared.lost(AuditLoss::WriteFailed, left, &self.path);
    }

    /// Renders one entry (or counts it into its caller's summary).
    fn take(&mut self, entry: Entry, closed: &mut Vec<Closed>) {
        let entry = self.summaries.offer(entry, closed);
        self.render_closed(closed);
        let Some(entry) = entry else { return };
        if self.pending.len() >= PENDING_CAP {
            self.shared.lost(AuditLoss::WriteFailed, 1, &self.path);
            return;
        }
        let process = match &entry.process {
            None => ProcessSeen::NotAsked,
            Some(p) => match p.wait_until(entry.queued + self.settings.process_wait) {
                Some(found) => ProcessSeen::Found(found),
                None => ProcessSeen::Unavailable(match p.outcome() {
                    Outcome::NotLookedUp => "not_looked_up",
                    // Found just after the deadline: late all the same.
                    Outcome::Pending | Outcome::Found(_) => "late",
                    Outcome::NotFound => "not_found",
                }),
            },
        };
        let time = self.wall(entry.queued);
        let user = user_name(&mut self.users, &entry.caller);
        render::line(&mut self.pending, &entry, time, user, process, None);
    }

    /// Renders closed summaries.
    fn render_closed(&mut self, closed: &mut Vec<Closed>) {
        for Closed { entry, count, last } in closed.drain(..) {
            if self.pending.len() >= PENDING_CAP {
                self.shared.lost(AuditLoss::WriteFailed, 1, &self.path);
                continue;
            }
            let (first, last) = (self.wall(entry.queued), self.wall(last));
            let summary = render::Summary { count, first, last };
            let user = user_name(&mut self.users, &entry.caller);
            render::line(&mut self.pending, &entry, first, user, ProcessSeen::NotAsked, Some(&summary));
        }
    }

    /// The wall-clock time of `at`.
    fn wall(&self, at: Instant) -> SystemTime {
        let (now, wall) = self.clock;
        wall.checked_sub(now.saturating_duration_since(at)).unwrap_or(wall)
    }

    /// Writes what is pending; keeps what a failure left, for the next try.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut done = 0;
        let result = loop {
            if done == self.pending.len() {
                break Ok(());
            }
            match self.file.write(&self.pending[done..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let lines = lines_in(&self.pending[..done]);
        self.pending.drain(..done);
        if lines > 0 {
            self.shared.written.fetch_add(lines, Ordering::Relaxed);
            crate::metrics::get().audit_written(lines);
        }
        match result {
            Ok(()) => {
                if self.shared.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), failures = self.failures, "the audit log is writable again");
                }
                self.failures = 0;
            }
            Err(e) => {
                self.shared.failing.store(true, Ordering::Relaxed);
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        failures = self.failures,
                        pending_lines = lines_in(&self.pending),
                        "cannot write the audit log; retrying"
                    );
                }
            }
        }
    }

    /// Opens the path again (a rotation moved the file away), keeping the old file if it cannot.
    fn reopen(&mut self) {
        match open_append(&self.path) {
            Ok(file) => {
                self.file = file;
                tracing::info!(path = %self.path.display(), "audit log reopened");
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the audit log; still writing to the file it had open");
            }
        }
    }
}

/// Complete lines in rendered text (a rendered line holds no raw newline but its end).
fn lines_in(text: &[u8]) -> u64 {
    text.iter().filter(|b| **b == b'\n').count() as u64
}

/// The name of a known caller's uid, looked up once per uid.
fn user_name<'a>(users: &'a mut HashMap<u32, Option<String>>, caller: &Caller) -> Option<&'a str> {
    let Caller::Known { uid, .. } = caller else { return None };
    users
        .entry(*uid)
        .or_insert_with(|| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid)).ok().flatten().map(|u| u.name))
        .as_deref()
}
