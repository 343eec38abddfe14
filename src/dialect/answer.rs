//! The answer to a token request, the same for every dialect: one synchronous decision ([`decide`]) that
//! either answers (a cached token or a refusal) or says to wait for the identity provider, then the one
//! waiting continuation ([`answer_waiting`]). Every request to a token route is charged to its caller's
//! `access.rate_limit` — refused ones too, so a caller without rights gets 429 like anyone else — and
//! leaves one audit line, a client that went away before its answer included (`client_gone`).
//!
//! The server calls [`answer_now`] for each token GET before routing: a cached token (or a refusal)
//! costs no clone of anything shared, no future and no allocation but the answer's. A miss is routed
//! to the handler, whose [`answer`] decides again and waits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use super::refusals;
use super::{Dialect, RequestError, TokenQuery, token_body, whole_seconds};
use crate::audit::Record;
use crate::broker::Broker;
use crate::caller::{Caller, Unknown};
use crate::clock::unix_secs;
use crate::identity::Identity;
use crate::process::ProcessLookup;
use crate::resource::Resource;
use crate::snapshot::Snapshot;
use crate::token::{AccessToken, HeldToken, Served, TokenError};

/// The status an audit line gives a request whose client went away before its answer (nginx's).
const CLIENT_GONE: u16 = 499;

/// Who is asking: the connection's [`Caller`] and, when the audit log wants it, the lookup of its
/// process (started when the connection was accepted; never waited for here).
#[derive(Debug, Clone)]
pub(crate) struct Asker {
    caller: Caller,
    process: Option<Arc<ProcessLookup>>,
}

impl Asker {
    /// A connection's caller and, when the audit log wants it, the lookup of its process.
    pub(crate) fn new(caller: Caller, process: Option<Arc<ProcessLookup>>) -> Self {
        Self { caller, process }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Asker {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        // The accept loop sets it on every request; it is missing only in router unit tests: treat that
        // as a failed lookup.
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or(Self::new(Caller::Unknown(Unknown::LookupFailed), None)))
    }
}

/// What [`decide`] concluded.
enum Step<'s> {
    /// The answer, charged to the caller's rate limit.
    Answer(Result<Response, RequestError>),
    /// Allowed, not cached: charge the caller, then wait for the token. Nothing has been done yet.
    Wait(&'s Identity, Resource),
}

/// What the decision got to, for the audit line (borrowed: nothing is copied on the request path).
#[derive(Debug, Default)]
struct Seen<'s> {
    identity: Option<&'s str>,
    rule: Option<usize>,
    rate_limited: bool,
    cache_hit: Option<bool>,
    on_demand: bool,
    token: Option<HeldToken>,
}

/// Answers a checked query (or passes on why the request failed its dialect's checks) with a token or
/// an error, waiting for the identity provider when the token is not cached; either way one audit line.
pub(crate) async fn answer(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: Result<TokenQuery<'_>, RequestError>,
) -> Result<Response, RequestError> {
    // Boxed: the waiting path's state stays out of the handlers' futures.
    Box::pin(answer_waiting(broker, asker, dialect, &checked)).await.map(|mut resp| {
        resp.extensions_mut().insert(dialect);
        resp
    })
}

/// The answer to a checked query if it needs no waiting: a cached token, or an error. `None` when the
/// token is not cached, and then nothing has been done: no audit line, no metric, no rate-limit budget
/// taken.
pub(crate) fn answer_now(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: &Result<TokenQuery<'_>, RequestError>,
) -> Option<Result<Response, RequestError>> {
    let started = broker.audit().map(|_| Instant::now());
    let snapshot = broker.snapshot();
    let mut seen = Seen::default();
    match decide(broker, &snapshot, &asker.caller, dialect, checked, &mut seen) {
        Step::Answer(result) => Some(finish(broker, asker, dialect, checked, &seen, result, started)),
        Step::Wait(..) => None,
    }
}

/// The whole answer: [`decide`], and when it says so, the caller charged and the token waited for.
async fn answer_waiting(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: &Result<TokenQuery<'_>, RequestError>,
) -> Result<Response, RequestError> {
    let started = broker.audit().map(|_| Instant::now());
    let snapshot = broker.snapshot();
    let mut seen = Seen::default();
    let result = match decide(broker, &snapshot, &asker.caller, dialect, checked, &mut seen) {
        Step::Answer(result) => result,
        Step::Wait(identity, resource) => match charge(broker, &asker.caller, &mut seen) {
            Err(limited) => Err(limited),
            Ok(()) => {
                // Until the token is there, a client that goes away leaves a `client_gone` line.
                let resource_asked = checked.as_ref().ok().and_then(|q| q.resource.as_deref());
                seen.on_demand = !broker.cache().has(identity, &resource);
                let on_demand = seen.on_demand;
                let gone = Gone {
                    broker,
                    asker,
                    dialect,
                    identity,
                    resource: resource_asked,
                    on_demand,
                    started,
                    armed: true,
                };
                let served = broker.cache().get(&snapshot, &asker.caller, identity, &resource).await;
                gone.disarm();
                served
                    .map_err(|e| {
                        if matches!(e, TokenError::TooManyResources { .. } | TokenError::AddingTooFast { .. }) {
                            crate::metrics::get().on_demand_refused();
                        }
                        RequestError::from(e)
                    })
                    .map(|served| {
                        let q = checked.as_ref().ok();
                        serve(served, &asker.caller, identity, q, &resource, dialect, &mut seen)
                    })
            }
        },
    };
    finish(broker, asker, dialect, checked, &seen, result, started)
}

/// Resolves the identity and resource of a checked query and decides: a refusal or a cached token
/// (either charged to the caller's rate limit), or wait.
fn decide<'s>(
    broker: &Broker,
    snapshot: &'s Snapshot,
    caller: &Caller,
    dialect: Dialect,
    checked: &Result<TokenQuery<'_>, RequestError>,
    seen: &mut Seen<'s>,
) -> Step<'s> {
    let asked = match checked {
        Ok(q) => prepare(snapshot, caller, q, seen),
        Err(e) => Err(e.clone()),
    };
    let (identity, resource) = match asked {
        // A refused request takes from the budget too; once it is spent the answer is 429.
        Err(refused) => return Step::Answer(charge(broker, caller, seen).and(Err(refused))),
        Ok(asked) => asked,
    };
    match broker.cache().hit(snapshot, identity, &resource) {
        Some(served) => Step::Answer(
            charge(broker, caller, seen)
                .map(|()| serve(served, caller, identity, checked.as_ref().ok(), &resource, dialect, seen)),
        ),
        None => Step::Wait(identity, resource),
    }
}

/// The resource and identity a query names, if the access policy lets the caller have them. Pure.
fn prepare<'s>(
    snapshot: &'s Snapshot,
    caller: &Caller,
    q: &TokenQuery<'_>,
    seen: &mut Seen<'s>,
) -> Result<(&'s Identity, Resource), RequestError> {
    let raw_resource =
        q.resource.as_deref().ok_or_else(|| RequestError::bad_request("query parameter resource is required"))?;
    let resource = Resource::parse(raw_resource)
        .map_err(|e| RequestError::bad_request(format!("query parameter resource: {e}")))?;
    let identity = snapshot
        .identities
        .select(q.selector.as_ref())
        .map_err(|e| RequestError::bad_request(format!("Identity not found: {e}")))?;
    seen.identity = Some(&identity.name);
    if let Some(access) = &snapshot.access {
        seen.rule = access.decide(caller, &identity.name, &resource).map_err(|denied| {
            crate::metrics::get().denied();
            RequestError::forbidden(denied.to_string())
        })?;
    }
    Ok((identity, resource))
}

/// Takes one request from the caller's `access.rate_limit` budget: `Err` is the 429 once it is spent.
fn charge(broker: &Broker, caller: &Caller, seen: &mut Seen<'_>) -> Result<(), RequestError> {
    let Err((rate, wait)) = broker.check_rate(caller) else { return Ok(()) };
    seen.rate_limited = true;
    crate::metrics::get().rate_limited();
    let secs = whole_seconds(wait);
    Err(RequestError::too_many_requests(format!("{caller} exceeds access.rate_limit ({rate}); retry in {secs}s"), secs))
}

/// A request refused before its query was read (IMDS's availability probe): charged like any other,
/// not audited.
pub(crate) fn refuse_unaudited(broker: &Broker, asker: &Asker, dialect: Dialect, refused: RequestError) -> Response {
    let e = charge(broker, &asker.caller, &mut Seen::default()).err().unwrap_or(refused);
    e.into_response(dialect)
}

/// Logs a refusal (summarised per caller) and writes the audit line; with `audit.on_failure =
/// "refuse"`, a line that cannot be written turns the answer into a 503.
fn finish(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: &Result<TokenQuery<'_>, RequestError>,
    seen: &Seen<'_>,
    result: Result<Response, RequestError>,
    started: Option<Instant>,
) -> Result<Response, RequestError> {
    if let Err(e) = &result {
        refusals::note(&asker.caller, dialect, seen.identity, e);
    }
    let (Some(log), Some(started)) = (broker.audit(), started) else { return result };
    let resource = checked.as_ref().ok().and_then(|q| q.resource.as_deref());
    let record = audit_record(dialect, resource, seen, &result, started);
    match log.record(&asker.caller, asker.process.clone(), &record) {
        Err(why) if log.refuses() => {
            drop(result); // An unaudited token never leaves.
            Err(RequestError::unavailable(
                format!("the audit log cannot record this request ({why}) and audit.on_failure is \"refuse\""),
                1,
            ))
        }
        _ => result,
    }
}

/// The audit line of an answer.
fn audit_record<'r>(
    dialect: Dialect,
    resource: Option<&'r str>,
    seen: &'r Seen<'_>,
    result: &'r Result<Response, RequestError>,
    started: Instant,
) -> Record<'r> {
    let (decision, status, reason) = match result {
        Ok(_) => ("issued", 200, None),
        Err(e) if seen.rate_limited => ("rate_limited", e.status.as_u16(), Some(e.description.as_str())),
        Err(e) if matches!(e.status, StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED) => {
            ("denied", e.status.as_u16(), Some(e.description.as_str()))
        }
        Err(e) => ("error", e.status.as_u16(), Some(e.description.as_str())),
    };
    Record {
        dialect: dialect.name(),
        identity: seen.identity,
        resource,
        decision,
        rule: seen.rule,
        cache: seen.cache_hit.map(|hit| if hit { "hit" } else { "fetch" }),
        on_demand: seen.on_demand,
        status,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        token: seen.token.as_deref().map(AccessToken::fingerprint),
        reason,
    }
}

/// Armed while a request waits for its token: dropped armed (hyper drops the request's future when the
/// client goes away), it writes the `client_gone` audit line with the work the request caused.
struct Gone<'a> {
    broker: &'a Broker,
    asker: &'a Asker,
    dialect: Dialect,
    identity: &'a Identity,
    resource: Option<&'a str>,
    on_demand: bool,
    started: Option<Instant>,
    armed: bool,
}

impl Gone<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        crate::metrics::get().client_gone();
        let caller = &self.asker.caller;
        tracing::debug!(%caller, identity = %self.identity.name, dialect = self.dialect.name(), "the client went away before its token arrived");
        let (Some(log), Some(started)) = (self.broker.audit(), self.started) else { return };
        let record = Record {
            dialect: self.dialect.name(),
            identity: Some(&self.identity.name),
            resource: self.resource,
            decision: "client_gone",
            rule: None,
            // It was charged to the rate limit and woke (or created) the entry's refresher.
            cache: Some("fetch"),
            on_demand: self.on_demand,
            status: CLIENT_GONE,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            token: None,
            reason: Some("the client went away before its answer"),
        };
        let _ = log.record(caller, self.asker.process.clone(), &record);
    }
}

/// The token answer.
fn serve(
    Served { token, cache_hit }: Served,
    caller: &Caller,
    identity: &Identity,
    q: Option<&TokenQuery<'_>>,
    resource: &Resource,
    dialect: Dialect,
    seen: &mut Seen<'_>,
) -> Response {
    tracing::debug!(%caller, identity = %identity.name, %resource, ?dialect, cache_hit, token = token.fingerprint(), "token served");
    seen.cache_hit = Some(cache_hit);
    crate::metrics::get().served(cache_hit);
    let raw_resource = q.and_then(|q| q.resource.as_deref()).unwrap_or(resource.as_str());
    let body = token_body(&token, &identity.client_id, raw_resource, unix_secs(SystemTime::now()));
    seen.token = Some(token);
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
