//! Prometheus metrics, served on `[metrics] listen` (its own listener, never a token listener) in the
//! Prometheus text format (0.0.4) that `promtool check metrics` accepts.
//!
//! One process-wide set ([`get`]). The request path only touches pre-resolved handles: an atomic add
//! per counter, no lock, no allocation once a label combination has been seen (a `OnceLock` per
//! combination resolves it the first time). Label values are all from small fixed sets — or, for the
//! per-token gauges and refresh failures, configured identity names and configured resources — so a
//! resource chosen by a caller never becomes a label value.
//!
//! Gauges that describe state (each configured token's remaining lifetime and servability, credential
//! expiry, on-demand entries) are set at scrape time by the caller of [`Metrics::encode`].

use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The route a request matched (declared in the order of `Route::ALL`: `route as usize` indexes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/metadata/identity/oauth2/token[/]`
    Imds,
    /// `/msi/token[/][/]`
    Msi,
    /// `/healthz`, `/readyz`
    Health,
    /// Anything else (404s).
    Other,
}

impl Route {
    const ALL: [Self; 4] = [Self::Imds, Self::Msi, Self::Health, Self::Other];

    fn label(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::Msi => "msi",
            Self::Health => "health",
            Self::Other => "other",
        }
    }
}

/// Dialect names as labels (`none` for routes that have none).
pub(crate) const DIALECTS: [&str; 5] = ["imds", "app_service", "azureml", "cloud_shell", "none"];

/// The statuses tokend answers with; anything else is counted as `other`.
const STATUSES: [u16; 16] = [200, 400, 401, 403, 404, 405, 408, 413, 414, 415, 429, 431, 500, 502, 503, 504];

/// Upstream failures by kind (the variants of `token::FetchError`).
pub(crate) const FAILURES: [&str; 8] = [
    "credential_rejected",
    "bad_resource",
    "rejected",
    "throttled",
    "server_error",
    "transport",
    "credential_unusable",
    "malformed",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    dialect: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Why an audit line was lost (the `reason` label of `tokend_audit_lines_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditLoss {
    /// The writer's queue was full (or the writer gone).
    QueueFull,
    /// The file could not be written.
    WriteFailed,
}

impl AuditLoss {
    /// Every reason, in discriminant order (`reason as usize` indexes it).
    pub(crate) const ALL: [Self; 2] = [Self::QueueFull, Self::WriteFailed];

    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::WriteFailed => "write_failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    identity: String,
    resource: String,
}

const COMBINATIONS: usize = Route::ALL.len() * DIALECTS.len() * (STATUSES.len() + 1);

/// Every metric tokend exports.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_handles: [OnceLock<Counter>; COMBINATIONS],
    cache: [Counter; 2],
    upstream_seconds: Histogram,
    upstream_errors: [Counter; FAILURES.len()],
    refresh_failures: Family<IdentityLabel, Counter>,
    reloads: [Counter; 2],
    denied: Counter,
    rate_limited: Counter,
    too_many_resources: Counter,
    audit_written: Counter,
    audit_dropped: [Counter; AuditLoss::ALL.len()],
    clock_skew: Gauge<f64, AtomicU64>,
    token_remaining: Family<TokenLabels, Gauge<f64, AtomicU64>>,
    token_servable: Family<TokenLabels, Gauge>,
    credential_expiry: Family<IdentityLabel, Gauge>,
    on_demand: Gauge,
    process_lookups_skipped: Counter,
    clients_gone: Counter,
    /// Serialises scrapes (they reset and refill the state gauges).
    scrape: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub(crate) fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("tokend");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Token and health requests answered, by route, dialect and status",
            requests.clone(),
        );
        let cache_family = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_requests",
            "Token requests answered from the cache without waiting (hit) or that waited for the identity provider (fetch)",
            cache_family.clone(),
        );
        let cache = ["hit", "fetch"].map(|result| cache_family.get_or_create(&ResultLabel { result }).clone());
        let upstream_seconds = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register(
            "upstream_request_duration_seconds",
            "Token requests to the identity provider, by time to the answer (any answer)",
            upstream_seconds.clone(),
        );
        let errors_family = Family::<KindLabel, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed token requests to the identity provider, by kind of failure",
            errors_family.clone(),
        );
        let upstream_errors = FAILURES.map(|kind| errors_family.get_or_create(&KindLabel { kind }).clone());
        let refresh_failures = Family::<IdentityLabel, Counter>::default();
        registry.register(
            "refresh_failures",
            "Failed attempts to fetch or refresh a token, by configured identity",
            refresh_failures.clone(),
        );
        let reloads_family = Family::<ResultLabel, Counter>::default();
        registry.register("reloads", "Configuration reloads, applied or rejected", reloads_family.clone());
        let reloads =
            ["applied", "rejected"].map(|result| reloads_family.get_or_create(&ResultLabel { result }).clone());
        let denied = Counter::default();
        registry.register("access_denied", "Token requests denied by [access] policy (403)", denied.clone());
        let rate_limited = Counter::default();
        registry.register("rate_limited", "Token requests refused by access.rate_limit (429)", rate_limited.clone());
        let too_many_resources = Counter::default();
        registry.register(
            "on_demand_refused",
            "Token requests for a new on-demand resource refused by the per-caller or total caps or the adding rate (429)",
            too_many_resources.clone(),
        );
        let audit_written = Counter::default();
        registry.register("audit_lines_written", "Lines written to the audit log", audit_written.clone());
        let audit_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "audit_lines_dropped",
            "Audit lines lost: the writer's queue was full (queue_full) or the file could not be written (write_failed)",
            audit_family.clone(),
        );
        let audit_dropped =
            AuditLoss::ALL.map(|why| audit_family.get_or_create(&ReasonLabel { reason: why.label() }).clone());
        let clock_skew = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "idp_clock_skew_seconds",
            "The identity provider's clock minus this host's, from its last answer's Date header",
            clock_skew.clone(),
        );
        let token_remaining = Family::<TokenLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_remaining_seconds",
            "Remaining lifetime of the cached token of each configured identity and resource",
            token_remaining.clone(),
        );
        let token_servable = Family::<TokenLabels, Gauge>::default();
        registry.register(
            "token_servable",
            "1 when the configured identity and resource has a token with more than tokens.min_lifetime left",
            token_servable.clone(),
        );
        let credential_expiry = Family::<IdentityLabel, Gauge>::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "When each certificate credential expires (notAfter), as Unix time",
            credential_expiry.clone(),
        );
        let on_demand = Gauge::default();
        registry.register(
            "on_demand_entries",
            "On-demand resources cached now, all callers together",
            on_demand.clone(),
        );
        let process_lookups_skipped = Counter::default();
        registry.register(
            "process_lookups_skipped",
            "Callers' process lookups for the audit log not done because the lookup queue was full or the caller's or everyone's lookup budget was spent",
            process_lookups_skipped.clone(),
        );
        let clients_gone = Counter::default();
        registry.register(
            "clients_gone",
            "Token requests whose client went away before its answer (audited as client_gone)",
            clients_gone.clone(),
        );
        Self {
            registry,
            requests,
            request_handles: std::array::from_fn(|_| OnceLock::new()),
            cache,
            upstream_seconds,
            upstream_errors,
            refresh_failures,
            reloads,
            denied,
            rate_limited,
            too_many_resources,
            audit_written,
            audit_dropped,
            clock_skew,
            token_remaining,
            token_servable,
            credential_expiry,
            on_demand,
            process_lookups_skipped,
            clients_gone,
            scrape: Mutex::new(()),
        }
    }

    /// One answered request. `dialect` is an index into [`DIALECTS`].
    pub(crate) fn request(&self, route: Route, dialect: usize, status: u16) {
        let r = route as usize;
        let d = dialect.min(DIALECTS.len() - 1);
        let s = STATUSES.iter().position(|x| *x == status).unwrap_or(STATUSES.len());
        let slot = &self.request_handles[(r * DIALECTS.len() + d) * (STATUSES.len() + 1) + s];
        slot.get_or_init(|| {
            let status = STATUSES.get(s).map_or("other", |code| status_label(*code));
            self.requests
                .get_or_create(&RequestLabels { route: Route::ALL[r].label(), dialect: DIALECTS[d], status })
                .clone()
        })
        .inc();
    }

    /// A token served from the cache (`true`) or after waiting for the identity provider.
    pub(crate) fn served(&self, cache_hit: bool) {
        self.cache[usize::from(!cache_hit)].inc();
    }

    /// One request to the identity provider took `took`; `failure` is an index into [`FAILURES`].
    pub(crate) fn upstream(&self, took: Duration, failure: Option<usize>) {
        self.upstream_seconds.observe(took.as_secs_f64());
        if let Some(f) = failure.and_then(|f| self.upstream_errors.get(f)) {
            f.inc();
        }
    }

    /// A failed fetch or refresh attempt for a configured `identity` (a configured name: bounded).
    pub(crate) fn refresh_failed(&self, identity: &str) {
        self.refresh_failures.get_or_create(&IdentityLabel { identity: identity.to_owned() }).inc();
    }

    /// A configuration reload.
    pub(crate) fn reloaded(&self, applied: bool) {
        self.reloads[usize::from(!applied)].inc();
    }

    /// A request denied by policy.
    pub(crate) fn denied(&self) {
        self.denied.inc();
    }

    /// A request refused by `access.rate_limit`.
    pub(crate) fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// A caller's process lookup not done (queue full or budget spent).
    pub(crate) fn process_lookup_skipped(&self) {
        self.process_lookups_skipped.inc();
    }

    /// A token request whose client went away before its answer.
    pub(crate) fn client_gone(&self) {
        self.clients_gone.inc();
    }

    /// A new on-demand resource refused (caps or adding rate).
    pub(crate) fn on_demand_refused(&self) {
        self.too_many_resources.inc();
    }

    /// `lines` written to the audit log.
    pub(crate) fn audit_written(&self, lines: u64) {
        self.audit_written.inc_by(lines);
    }

    /// `lines` audit lines lost, and why.
    pub(crate) fn audit_dropped(&self, why: AuditLoss, lines: u64) {
        self.audit_dropped[why as usize].inc_by(lines);
    }

    /// The identity provider's clock minus ours.
    pub(crate) fn clock_skew(&self, seconds: i64) {
        #[allow(clippy::cast_precision_loss)] // seconds of skew: far below 2^52
        self.clock_skew.set(seconds as f64);
    }

    /// The Prometheus text exposition, after `state` has set the state gauges through the [`Scrape`].
    pub(crate) fn encode(&self, state: impl FnOnce(&Scrape<'_>)) -> String {
        let _one_at_a_time = self.scrape.lock();
        self.token_remaining.clear();
        self.token_servable.clear();
        self.credential_expiry.clear();
        state(&Scrape(self));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// Sets the state gauges during [`Metrics::encode`].
#[derive(Debug)]
pub(crate) struct Scrape<'a>(&'a Metrics);

impl Scrape<'_> {
    /// A configured token's state.
    pub(crate) fn token(&self, identity: &str, resource: &str, remaining: Option<Duration>, servable: bool) {
        let labels = TokenLabels { identity: identity.to_owned(), resource: resource.to_owned() };
        self.0.token_remaining.get_or_create(&labels).set(remaining.map_or(0.0, |r| r.as_secs_f64()));
        self.0.token_servable.get_or_create(&labels).set(i64::from(servable));
    }

    /// A certificate credential's expiry (Unix seconds).
    pub(crate) fn credential_expiry(&self, identity: &str, unix_secs: u64) {
        let labels = IdentityLabel { identity: identity.to_owned() };
        self.0.credential_expiry.get_or_create(&labels).set(i64::try_from(unix_secs).unwrap_or(i64::MAX));
    }

    /// On-demand entries now.
    pub(crate) fn on_demand(&self, n: usize) {
        self.0.on_demand.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

fn status_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        414 => "414",
        415 => "415",
        429 => "429",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_state_gauges_appear_in_the_text_format() {
        let m = Metrics::new();
        m.request(Route::Imds, 0, 200);
        m.request(Route::Imds, 0, 200);
        m.request(Route::Msi, 2, 401);
        m.request(Route::Other, 4, 999);
        m.served(true);
        m.upstream(Duration::from_millis(30), Some(4));
        m.reloaded(false);
        m.audit_written(3);
        m.audit_dropped(AuditLoss::WriteFailed, 2);
        let text = m.encode(|s| {
            s.token("default", "https://storage.azure.com", Some(Duration::from_secs(3000)), true);
            s.on_demand(2);
        });
        for line in [
            "tokend_requests_total{route=\"imds\",dialect=\"imds\",status=\"200\"} 2",
            "tokend_requests_total{route=\"msi\",dialect=\"azureml\",status=\"401\"} 1",
            "tokend_requests_total{route=\"other\",dialect=\"none\",status=\"other\"} 1",
            "tokend_token_requests_total{result=\"hit\"} 1",
            "tokend_upstream_errors_total{kind=\"server_error\"} 1",
            "tokend_reloads_total{result=\"rejected\"} 1",
            "tokend_token_servable{identity=\"default\",resource=\"https://storage.azure.com\"} 1",
            "tokend_on_demand_entries 2",
            "tokend_upstream_request_duration_seconds_count 1",
            "tokend_audit_lines_written_total 3",
            "tokend_audit_lines_dropped_total{reason=\"queue_full\"} 0",
            "tokend_audit_lines_dropped_total{reason=\"write_failed\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // State gauges are rebuilt at each scrape: a token no longer configured disappears.
        let text = m.encode(|_| {});
        assert!(!text.contains("tokend_token_servable{"), "{text}");
    }
}
