//! Rate-limit summaries: a flood of requests refused by `access.rate_limit` writes two lines per
//! caller and interval, not one per request. The first `rate_limited` entry of a caller (its uid, or all
//! unknown callers together) opens a window and is written at once; the caller's further ones until the
//! window closes are counted, and when it closes (or at shutdown) they become one line: the first of
//! them, with the count and the first and last times.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::entry::Entry;
use crate::caller::Caller;

/// The decision that is summarised.
pub(crate) const RATE_LIMITED: &str = "rate_limited";

/// One caller's open window.
#[derive(Debug)]
struct Window {
    closes: Instant,
    /// The first entry counted (without its process lookup), and how many since, when it was queued
    /// and the last one.
    counted: Option<(Entry, u64, Instant)>,
}

/// A closed window's line: its first counted entry, the count, the last one's queue time.
#[derive(Debug)]
pub(crate) struct Closed {
    pub(crate) entry: Entry,
    pub(crate) count: u64,
    pub(crate) last: Instant,
}

/// The open windows, one per caller.
#[derive(Debug)]
pub(crate) struct Summaries {
    interval: Duration,
    open: HashMap<Option<u32>, Window>,
}

impl Summaries {
    pub(crate) fn new(interval: Duration) -> Self {
        Self { interval, open: HashMap::new() }
    }

    /// `Some(entry)` when it is to be written now: it is not `rate_limited`, or it opens its caller's
    /// window (then a window of that caller it found closed goes to `closed`). `None`: counted.
    pub(crate) fn offer(&mut self, mut entry: Entry, closed: &mut Vec<Closed>) -> Option<Entry> {
        if entry.decision != RATE_LIMITED {
            return Some(entry);
        }
        let key = match entry.caller {
            Caller::Known { uid, .. } => Some(uid),
            Caller::Unknown(_) => None,
        };
        match self.open.get_mut(&key) {
            Some(w) if entry.queued < w.closes => {
                match &mut w.counted {
                    Some((_, count, last)) => {
                        *count += 1;
                        *last = entry.queued;
                    }
                    None => {
                        let queued = entry.queued;
                        entry.process = None;
                        w.counted = Some((entry, 1, queued));
                    }
                }
                None
            }
            _ => {
                let old = self.open.insert(key, Window { closes: entry.queued + self.interval, counted: None });
                if let Some((entry, count, last)) = old.and_then(|w| w.counted) {
                    closed.push(Closed { entry, count, last });
                }
                Some(entry)
            }
        }
    }

    /// The windows closed by `now`, removed.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Closed> {
        self.take(|w| w.closes <= now)
    }

    /// Every open window, at shutdown.
    pub(crate) fn all(&mut self) -> Vec<Closed> {
        self.take(|_| true)
    }

    fn take(&mut self, closed: impl Fn(&Window) -> bool) -> Vec<Closed> {
        if !self.open.values().any(&closed) {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.open.retain(|_, w| {
            if !closed(w) {
                return true;
            }
            if let Some((entry, count, last)) = w.counted.take() {
                out.push(Closed { entry, count, last });
            }
            false
        });
        out.sort_by_key(|c| c.entry.queued);
        out
    }

    /// When the next window closes.
    pub(crate) fn next_close(&self) -> Option<Instant> {
        self.open.values().map(|w| w.closes).min()
    }
}
