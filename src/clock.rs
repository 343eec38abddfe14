//! Wall-clock time for the wire. Decisions use the monotonic `tokio::time::Instant` instead.

use std::time::SystemTime;

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
