//! The service log's account of refused token requests, summarised per caller so that a flood of
//! refusals cannot flood the log: the first refusal of a caller in an [`INTERVAL`] is logged with its
//! reason (caller-controlled text capped at [`MAX_FIELD`] bytes), the rest are counted, and one summary
//! line per caller and interval gives the counts by status. The summary is written by the next refusal
//! after the interval (anyone's: all callers' windows are swept then), so a flood that stops is
//! reported at the next refusal at the latest.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Dialect, RequestError};
use crate::caller::Caller;

/// How long one caller's refusals are gathered into one summary.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// At most this many bytes of any caller-controlled text reach a log line.
pub(crate) const MAX_FIELD: usize = 256;

/// Refusals gathered for one caller (uid; unidentified callers share one window).
struct Window {
    opened: Instant,
    /// Refusals after the first, by status.
    counts: Vec<(u16, u64)>,
}

struct Windows {
    by_caller: HashMap<Option<u32>, Window>,
    swept: Instant,
}

static WINDOWS: LazyLock<Mutex<Windows>> =
    LazyLock::new(|| Mutex::new(Windows { by_caller: HashMap::new(), swept: Instant::now() }));

/// Notes one refused request: logged if it is the caller's first in its window, counted otherwise.
pub(crate) fn note(caller: &Caller, dialect: Dialect, identity: Option<&str>, e: &RequestError) {
    let now = Instant::now();
    let key = match caller {
        Caller::Known { uid, .. } => Some(*uid),
        Caller::Unknown(_) => None,
    };
    let first = {
        let mut w = WINDOWS.lock();
        if now.duration_since(w.swept) >= INTERVAL {
            w.swept = now;
            w.by_caller.retain(|uid, window| {
                let open = now.duration_since(window.opened) < INTERVAL;
                if !open {
                    summary(*uid, window);
                }
                open
            });
        }
        match w.by_caller.get_mut(&key) {
            Some(window) => {
                match window.counts.iter_mut().find(|(s, _)| *s == e.status.as_u16()) {
                    Some((_, n)) => *n += 1,
                    None => window.counts.push((e.status.as_u16(), 1)),
                }
                false
            }
            None => {
                w.by_caller.insert(key, Window { opened: now, counts: Vec::new() });
                true
            }
        }
    };
    if first {
        tracing::info!(
            %caller,
            identity = %identity.map_or("".into(), |i| capped(i, MAX_FIELD)),
            dialect = dialect.name(),
            status = e.status.as_u16(),
            reason = %capped(&e.description, MAX_FIELD),
            "token request refused (more from this caller within {}s are counted, not logged)",
            INTERVAL.as_secs()
        );
    }
}

fn summary(uid: Option<u32>, window: &Window) {
    if window.counts.is_empty() {
        return;
    }
    let total: u64 = window.counts.iter().map(|(_, n)| n).sum();
    let by_status: Vec<String> = window.counts.iter().map(|(s, n)| format!("{s}x{n}")).collect();
    match uid {
        Some(uid) => {
            tracing::info!(uid, refused = total, by_status = %by_status.join(" "), "more token requests refused for this caller")
        }
        None => {
            tracing::info!(caller = "unknown", refused = total, by_status = %by_status.join(" "), "more token requests refused for unidentified callers")
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, saying how much was cut.
pub(crate) fn capped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(+{} bytes)", &text[..end], text.len() - end).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_cuts_on_a_character_boundary_and_says_how_much() {
        assert_eq!(capped("short", 10), "short");
        let long = "é".repeat(200); // 400 bytes
        let c = capped(&long, 255);
        assert!(c.starts_with(&"é".repeat(127)) && c.ends_with("…(+146 bytes)"), "{c}");
        assert!(c.len() < 300);
    }
}
