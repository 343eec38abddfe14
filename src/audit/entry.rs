//! [`Entry`]: what a request hands the writer — the few fields of its [`Record`] copied, its strings cut
//! to [`FIELD_CAP`] and packed into one buffer (one allocation, none when it has no strings). Nothing
//! is rendered here: that is the writer's work.

use std::sync::Arc;
use std::time::Instant;

use super::{FIELD_CAP, Record};
use crate::caller::Caller;
use crate::process::ProcessLookup;

/// The strings of an entry, in the order they are packed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Text {
    Identity,
    Resource,
    Token,
    Reason,
}

/// Where one string ends in [`Entry::text`] and how many bytes were cut off it.
#[derive(Debug, Clone, Copy)]
struct Span {
    end: usize,
    cut: usize,
}

/// One queued line.
#[derive(Debug)]
pub(crate) struct Entry {
    /// When it was queued (the line's `time`; the process lookup's deadline counts from it).
    pub(crate) queued: Instant,
    pub(crate) caller: Caller,
    /// The lookup of the caller's process, if the line is to name it.
    pub(crate) process: Option<Arc<ProcessLookup>>,
    pub(crate) dialect: &'static str,
    pub(crate) decision: &'static str,
    pub(crate) cache: Option<&'static str>,
    pub(crate) rule: Option<usize>,
    pub(crate) on_demand: bool,
    pub(crate) status: u16,
    pub(crate) latency_ms: f64,
    text: String,
    spans: [Option<Span>; 4],
}

/// `s` cut to at most `cap` bytes on a character boundary, and how many bytes were cut.
pub(crate) fn capped(s: &str, cap: usize) -> (&str, usize) {
    let kept = &s[..s.floor_char_boundary(cap)];
    (kept, s.len() - kept.len())
}

impl Entry {
    /// Copies what the line needs of `record`.
    pub(crate) fn new(
        caller: &Caller,
        process: Option<Arc<ProcessLookup>>,
        record: &Record<'_>,
        queued: Instant,
    ) -> Self {
        let strings = [record.identity, record.resource, record.token, record.reason];
        let size = strings.iter().flatten().map(|s| s.len().min(FIELD_CAP)).sum();
        let mut text = String::with_capacity(size);
        let mut spans = [None; 4];
        for (span, s) in spans.iter_mut().zip(strings) {
            if let Some(s) = s {
                let (kept, cut) = capped(s, FIELD_CAP);
                text.push_str(kept);
                *span = Some(Span { end: text.len(), cut });
            }
        }
        Self {
            queued,
            caller: *caller,
            process,
            dialect: record.dialect,
            decision: record.decision,
            cache: record.cache,
            rule: record.rule,
            on_demand: record.on_demand,
            status: record.status,
            latency_ms: record.latency_ms,
            text,
            spans,
        }
    }

    /// One of the strings, as kept, and how many bytes were cut off it.
    pub(crate) fn text(&self, which: Text) -> Option<(&str, usize)> {
        let i = which as usize;
        let span = self.spans[i]?;
        let start = self.spans[..i].iter().rev().flatten().next().map_or(0, |s| s.end);
        Some((self.text.get(start..span.end).unwrap_or_default(), span.cut))
    }
}
