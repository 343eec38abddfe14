//! The refresh policy and the retry delays: pure functions, table-tested without a runtime.
//!
//! A token of lifetime `L` is servable while more than `min_lifetime` (`m`) is left, i.e. for `L − m`.
//! It is refreshed at the earliest of `refresh_in`, `L/2` and `L − m − margin` (margin: a tenth of the
//! servable window, at most 30 s), pulled earlier by up to 10 % jitter so that many keys do not refresh
//! in step, and never sooner than [`MIN_REFRESH_AFTER`].
//!
//! When the IdP's tokens live less than `2m`, `L − m − margin` wins over `L/2`: each token is still
//! served with at least `m` left, and tokend calls upstream once per `L − m` instead of once per `L/2`.
//! When they live no longer than `m`, no token can ever be served: that is [`TooShortLived`], reported
//! to callers and in the log as a configuration problem (lower `tokens.min_lifetime`).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::FailureClass;

/// A refresh is never scheduled sooner than this after issuance (no hot loop, whatever the IdP says).
pub(super) const MIN_REFRESH_AFTER: Duration = Duration::from_secs(1);
/// Cap on the margin kept between the refresh and the end of the servable window.
const MAX_MARGIN: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The IdP's tokens do not outlive `tokens.min_lifetime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the identity provider issued a token that lives {}s, not more than tokens.min_lifetime ({}s), so it can never be served; lower tokens.min_lifetime",
    lifetime.as_secs(), min_lifetime.as_secs()
)]
pub(super) struct TooShortLived {
    /// The token's lifetime.
    pub lifetime: Duration,
    /// The configured floor.
    pub min_lifetime: Duration,
}

/// How long after issuance to refresh a token. `jitter` is uniform in `[0, 1)`.
pub(super) fn refresh_after(
    lifetime: Duration,
    refresh_in: Option<Duration>,
    min_lifetime: Duration,
    jitter: f64,
) -> Result<Duration, TooShortLived> {
    let servable = lifetime.saturating_sub(min_lifetime);
    if servable.is_zero() {
        return Err(TooShortLived { lifetime, min_lifetime });
    }
    let margin = (servable / 10).min(MAX_MARGIN);
    let mut target = (lifetime / 2).min(servable - margin);
    if let Some(hint) = refresh_in {
        target = target.min(hint);
    }
    let jittered = target.saturating_sub(target.mul_f64(0.1 * jitter.clamp(0.0, 1.0)));
    Ok(jittered.max(MIN_REFRESH_AFTER))
}

/// Delays between failed attempts for one cache key. Reset after a success.
#[derive(Debug)]
pub(super) struct RetryDelays {
    transient: ExponentialBackoff,
    permanent: ExponentialBackoff,
}

impl Default for RetryDelays {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryDelays {
    /// Transient failures: 1 s doubling to 15 s, plus up to 100 % jitter, so the first attempt after the
    /// IdP comes back is at most 30 s away. Everything else (bad credential, bad resource, refused):
    /// 30 s doubling to 5 min — no loop hammers the IdP, and a fix is still picked up within minutes.
    pub(super) fn new() -> Self {
        let transient = ExponentialBuilder::new()
            .with_min_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(15))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        let permanent = ExponentialBuilder::new()
            .with_min_delay(Duration::from_secs(30))
            .with_max_delay(Duration::from_secs(300))
            .with_factor(2.0)
            .without_max_times()
            .build();
        Self { transient, permanent }
    }

    /// The delay before the next attempt. A `Retry-After` from the IdP is honoured exactly (up to an hour).
    pub(super) fn next(&mut self, class: FailureClass, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            // Keep the exponential sequence advancing so a later failure without Retry-After backs off further.
            let _ = self.transient.next();
            return ra.min(MAX_RETRY_AFTER);
        }
        let next = match class {
            FailureClass::Transient => self.transient.next(),
            FailureClass::Credential | FailureClass::Resource | FailureClass::Rejected => self.permanent.next(),
        };
        next.unwrap_or(Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refresh_policy_table() {
        // (lifetime, refresh_in, min_lifetime, jitter, expected)
        let table = [
            (S(3600), None, S(300), 0.0, S(1800)),                  // half-life wins
            (S(3600), None, S(300), 0.999_999, S(1620)),            // up to 10 % earlier
            (S(3600), Some(S(1200)), S(300), 0.0, S(1200)),         // refresh_in wins
            (S(86_400), None, S(300), 0.0, S(43_200)),              // long tokens: half-life
            (S(600), None, S(300), 0.0, S(270)),                    // < 2×min: L − m − margin (margin 30 s)
            (S(20), None, S(15), 0.0, Duration::from_millis(4500)), // margin = a tenth of the 5 s window
            (S(16), None, S(15), 0.0, S(1)),                        // clamped to MIN_REFRESH_AFTER
            (S(60), None, S(0), 0.0, S(30)),                        // no floor: half-life
        ];
        for (lifetime, refresh_in, min, jitter, want) in table {
            let got = refresh_after(lifetime, refresh_in, min, jitter).expect("servable");
            let diff = got.abs_diff(want);
            assert!(
                diff < Duration::from_millis(2),
                "{lifetime:?} {refresh_in:?} {min:?} {jitter}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn refresh_always_before_the_floor_when_the_window_allows() {
        for lifetime in (20..7200).step_by(37) {
            for min in [0u64, 5, 60, 300] {
                let (l, m) = (S(lifetime), S(min));
                if let Ok(after) = refresh_after(l, None, m, 0.5) {
                    if l - m > MIN_REFRESH_AFTER {
                        assert!(after < l - m, "lifetime {lifetime} min {min}: refresh at {after:?} is past the floor");
                    }
                    assert!(after >= MIN_REFRESH_AFTER);
                }
            }
        }
    }

    #[test]
    fn tokens_that_never_clear_the_floor_are_reported() {
        let e = refresh_after(S(300), None, S(300), 0.0).expect_err("too short");
        assert_eq!(e, TooShortLived { lifetime: S(300), min_lifetime: S(300) });
        assert!(e.to_string().contains("tokens.min_lifetime"));
        assert!(refresh_after(S(60), None, S(300), 0.0).is_err());
    }

    #[test]
    fn transient_delays_grow_and_stay_under_thirty_seconds() {
        let mut d = RetryDelays::new();
        let delays: Vec<Duration> = (0..12).map(|_| d.next(FailureClass::Transient, None)).collect();
        assert!(delays[0] >= S(1) && delays[0] <= S(2), "{delays:?}");
        assert!(delays.iter().all(|x| *x <= S(30)), "{delays:?}");
        assert!(delays[11] >= S(15), "{delays:?}");
    }

    #[test]
    fn retry_after_is_honoured_exactly_and_capped() {
        let mut d = RetryDelays::new();
        assert_eq!(d.next(FailureClass::Transient, Some(S(7))), S(7));
        assert_eq!(d.next(FailureClass::Transient, Some(S(99_999))), MAX_RETRY_AFTER);
    }

    #[test]
    fn permanent_failures_wait_at_least_thirty_seconds() {
        let mut d = RetryDelays::new();
        let delays: Vec<Duration> = (0..6).map(|_| d.next(FailureClass::Credential, None)).collect();
        assert_eq!(delays[0], S(30));
        assert_eq!(delays[5], S(300));
    }
}
