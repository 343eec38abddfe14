//! Cache unit tests: paused tokio time and a scripted fake [`TokenSource`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use super::*;
use crate::caller::Caller;
use crate::config::TokensConfig;
use crate::credential::ClientCredential;
use crate::identity::{Identities, test_identity};
use crate::token::{BoxFuture, FetchError, IssuedToken};

/// A scripted IdP: each call pops the next answer (the last one repeats), after `delay`. It records
/// the credential fingerprint of every call.
struct Fake {
    calls: AtomicUsize,
    delay: Duration,
    answers: Mutex<Vec<Result<u64, FetchError>>>,
    credentials: Mutex<Vec<String>>,
}

impl Fake {
    fn new(delay: Duration, answers: Vec<Result<u64, FetchError>>) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            delay,
            answers: Mutex::new(answers),
            credentials: Mutex::default(),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TokenSource for Fake {
    fn fetch<'a>(&'a self, identity: &'a Identity, _: &'a Resource) -> BoxFuture<'a, Result<IssuedToken, FetchError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.credentials.lock().push(identity.credential.fingerprint());
            tokio::time::sleep(self.delay).await;
            let answer = {
                let mut a = self.answers.lock();
                if a.len() > 1 { a.remove(0) } else { a[0].clone() }
            };
            answer.map(|lifetime| IssuedToken {
                access_token: format!("token-{n}").into(),
                expires_in: Duration::from_secs(lifetime),
                ext_expires_in: None,
                refresh_in: None,
                requested_at: SystemTime::now(),
            })
        })
    }
}

fn policy(min_lifetime: u64) -> TokensConfig {
    TokensConfig {
        min_lifetime: Duration::from_secs(min_lifetime),
        max_wait: Duration::from_secs(8),
        idle_timeout: Duration::from_secs(600),
        max_on_demand_per_caller: 8,
        max_on_demand: 12,
        on_demand_rate: crate::access::Rate::parse("64/m").expect("rate"),
    }
}

fn secret_identity(secret: &str, pinned: &[Resource]) -> Identity {
    let mut id = test_identity("default", "cid");
    id.credential = ClientCredential::Secret { secret: secret.to_owned().into(), origin: "test".into() };
    id.resources = pinned.to_vec();
    id
}

fn snapshot(identity: Identity, min_lifetime: u64) -> Snapshot {
    Snapshot { identities: Identities::new(vec![identity]), tokens: policy(min_lifetime), access: None }
}

/// A cache over one identity, `default`, with `pinned` configured resources.
struct Harness {
    cache: TokenCache,
    live: Arc<Live>,
}

impl Harness {
    fn new(source: Arc<dyn TokenSource>, min_lifetime: u64, pinned: &[Resource]) -> Self {
        let live = Arc::new(Live::new(snapshot(secret_identity("s", pinned), min_lifetime)));
        let cache = TokenCache::new(source, live.clone(), TaskTracker::new(), CancellationToken::new());
        cache.apply(None);
        Self { cache, live }
    }

    /// What a request does: one snapshot, the default identity selected from it.
    async fn get(&self, resource: &Resource) -> Result<(Arc<AccessToken>, bool), TokenError> {
        let snap = self.live.load();
        let id = snap.identities.select(None).expect("default identity").clone();
        self.cache.get(&snap, &user(1000), &id, resource).await.map(|s| (s.token.into_arc(), s.cache_hit))
    }
}

fn user(uid: u32) -> Caller {
    Caller::Known { uid, gid: None, pid: None, transport: crate::caller::Transport::Tcp }
}

fn res() -> Resource {
    Resource::parse("https://storage.azure.com").expect("valid")
}

fn server_error() -> FetchError {
    FetchError::ServerError { status: 503, retry_after: None }
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_misses_make_one_call() {
    let fake = Fake::new(Duration::from_millis(300), vec![Ok(3600)]);
    let h = Arc::new(Harness::new(fake.clone(), 300, &[]));
    let waits: Vec<_> = (0..50)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get(&res()).await })
        })
        .collect();
    for w in waits {
        let (t, _) = w.await.expect("join").expect("token");
        assert_eq!(t.secret(), "token-0");
    }
    assert_eq!(fake.calls(), 1);
    let (_, hit) = h.get(&res()).await.expect("token");
    assert!(hit, "a warm key is a cache hit");
    assert_eq!(fake.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn refreshes_in_the_background_and_serves_meanwhile() {
    let fake = Fake::new(Duration::from_secs(2), vec![Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[res()]);
    let (t0, _) = h.get(&res()).await.expect("token");
    assert_eq!(t0.secret(), "token-0");
    // Just after the refresh is due, the old token is still served at once while the new one is fetched.
    tokio::time::sleep_until(t0.refresh_due() + Duration::from_millis(500)).await;
    let (t, hit) = h.get(&res()).await.expect("token");
    assert!(hit);
    assert_eq!(t.secret(), "token-0");
    assert_eq!(fake.calls(), 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (t, hit) = h.get(&res()).await.expect("token");
    assert!(hit);
    assert_eq!(t.secret(), "token-1");
    assert!(h.cache.pinned()[0].ready);
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_through_an_outage_until_the_floor_then_503_then_recovers() {
    // 600 s tokens, 300 s floor: refresh at ~270 s; the IdP then fails for a long while.
    let mut answers = vec![Ok(600)];
    answers.extend(std::iter::repeat_n(Err(server_error()), 40));
    answers.push(Ok(600));
    let fake = Fake::new(Duration::from_millis(10), answers);
    // A configured resource: refreshed however long nobody asks.
    let h = Harness::new(fake.clone(), 300, &[res()]);
    let (t0, _) = h.get(&res()).await.expect("token");
    tokio::time::sleep(Duration::from_secs(290)).await;
    let (t, hit) = h.get(&res()).await.expect("still served above the floor");
    assert!(hit && t.secret() == "token-0");
    tokio::time::sleep_until(t0.refresh_due() + Duration::from_secs(40)).await;
    // Past the floor (300 s left at 300 s): 503 with the time of the next attempt, answered at once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let started = Instant::now();
    match h.get(&res()).await {
        Err(TokenError::Unavailable { retry_after, .. }) => {
            assert!(retry_after <= Duration::from_secs(30), "{retry_after:?}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() <= Duration::from_secs(8));
    let calls_during_outage = fake.calls();
    // 40 failures with delays ≤ 30 s: recovered within 40 × 30 s, and never a hot loop.
    tokio::time::sleep(Duration::from_secs(1300)).await;
    let (t, _) = h.get(&res()).await.expect("recovered");
    assert_eq!(t.secret(), format!("token-{}", fake.calls() - 1));
    assert!(calls_during_outage < 40, "no hot loop: {calls_during_outage} calls");
}

#[tokio::test(start_paused = true)]
async fn credential_rejection_is_remembered_across_resources() {
    let rejected = FetchError::CredentialRejected { status: 401, error: "invalid_client".into() };
    let fake = Fake::new(Duration::from_millis(10), vec![Err(rejected)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    for i in 0..20 {
        let r = Resource::parse(&format!("https://r{}.example", i % 4)).expect("valid");
        match h.get(&r).await {
            Err(TokenError::CredentialRejected { error, .. }) => assert_eq!(error, "invalid_client"),
            other => panic!("expected CredentialRejected, got {other:?}"),
        }
    }
    assert_eq!(fake.calls(), 1, "one upstream call however many callers and resources");
}

#[tokio::test(start_paused = true)]
async fn too_short_lived_tokens_are_a_clear_error() {
    let fake = Fake::new(Duration::from_millis(10), vec![Ok(200)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    match h.get(&res()).await {
        Err(TokenError::Failed { cause, .. }) => assert!(cause.contains("tokens.min_lifetime"), "{cause}"),
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn short_tokens_below_twice_the_floor_are_served_and_refreshed_before_the_floor() {
    // 20 s tokens, 15 s floor: servable for 5 s each, refreshed at ~4.5 s; callers always served.
    let fake = Fake::new(Duration::from_millis(50), vec![Ok(20)]);
    let h = Harness::new(fake.clone(), 15, &[res()]);
    h.get(&res()).await.expect("token");
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (t, hit) = h.get(&res()).await.expect("always served");
        assert!(hit);
        assert!(t.remaining(Instant::now()) > Duration::from_secs(15));
    }
    let calls = fake.calls();
    assert!((6..=9).contains(&calls), "about one call per 4–5 s over 30 s: {calls}");
}

#[tokio::test(start_paused = true)]
async fn idle_on_demand_entries_are_dropped_and_pinned_ones_kept() {
    let fake = Fake::new(Duration::from_millis(10), vec![Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[res()]);
    let on_demand = Resource::parse("https://on-demand.example").expect("valid");
    h.get(&on_demand).await.expect("token");
    assert_eq!(h.cache.len(), 2);
    tokio::time::sleep(Duration::from_secs(601)).await;
    tokio::task::yield_now().await;
    assert_eq!(h.cache.len(), 1, "the idle on-demand entry is gone");
    h.get(&on_demand).await.expect("fetched again");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_idp_answers_callers_within_max_wait() {
    let fake = Fake::new(Duration::from_secs(3600), vec![Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    let started = Instant::now();
    match h.get(&res()).await {
        Err(TokenError::Unavailable { retry_after, .. }) => assert!(retry_after >= Duration::from_secs(1)),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::from_secs(8));
}

/// Panics on its first call, then behaves.
struct Panicky(AtomicUsize);

impl TokenSource for Panicky {
    fn fetch<'a>(&'a self, _: &'a Identity, _: &'a Resource) -> BoxFuture<'a, Result<IssuedToken, FetchError>> {
        Box::pin(async move {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("simulated bug in the IdP client");
            }
            Ok(IssuedToken {
                access_token: "after-panic".to_owned().into(),
                expires_in: Duration::from_secs(3600),
                ext_expires_in: None,
                refresh_in: None,
                requested_at: SystemTime::now(),
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_an_attempt_does_not_kill_the_refresher() {
    let h = Harness::new(Arc::new(Panicky(AtomicUsize::new(0))), 300, &[]);
    let (t, _) = h.get(&res()).await.expect("the retry after the panic succeeds within max_wait");
    assert_eq!(t.secret(), "after-panic");
}

#[tokio::test(start_paused = true)]
async fn bad_resource_is_the_callers_error() {
    let fake = Fake::new(
        Duration::from_millis(10),
        vec![Err(FetchError::BadResource { status: 400, error: "invalid_target".into() })],
    );
    let h = Harness::new(fake.clone(), 300, &[]);
    for _ in 0..5 {
        assert!(matches!(h.get(&res()).await, Err(TokenError::BadResource { .. })));
    }
    assert_eq!(fake.calls(), 1);
}

/// The race of issue 8: a request selects its identity from the snapshot current when it arrives; a
/// reload then rotates that identity's credential; the request then creates a new entry. Before the
/// one live snapshot, that entry kept the request's superseded identity (and so the old credential)
/// until the next reload or until it idled out, which never happens while it is used.
#[tokio::test(start_paused = true)]
async fn no_entry_keeps_a_superseded_credential() {
    let fake = Fake::new(Duration::from_millis(10), vec![Ok(600)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    let old_fp = h.live.load().identities.select(None).expect("default").credential.fingerprint();
    // A request arrives and selects the identity (old credential) ...
    let before = h.live.load();
    let selected = before.identities.select(None).expect("default").clone();
    // ... a reload rotates the credential (one swap, then the cache follows) ...
    let old = h.live.swap(snapshot(secret_identity("rotated", &[]), 300));
    h.cache.apply(Some(&old));
    let new_fp = h.live.load().identities.select(None).expect("default").credential.fingerprint();
    assert_ne!(old_fp, new_fp);
    // ... and only then creates the entry of a resource nobody asked for yet.
    let Served { token, .. } = h.cache.get(&before, &user(1000), &selected, &res()).await.expect("token");
    assert_eq!(token.secret(), "token-0");
    // Keep using it across several refreshes (600 s tokens refresh about every 270 s).
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(300)).await;
        h.get(&res()).await.expect("token");
    }
    let used = fake.credentials.lock().clone();
    assert!(used.len() >= 4, "refreshed repeatedly: {used:?}");
    assert!(used.iter().all(|fp| *fp == new_fp), "every request used the rotated credential: {used:?}");
}

/// A credential rejection is remembered for the credential that was rejected, not for the identity's
/// next one: a rotation right after a rejection is tried at once.
#[tokio::test(start_paused = true)]
async fn a_rotated_credential_is_not_failed_by_the_old_ones_rejection() {
    let rejected = FetchError::CredentialRejected { status: 401, error: "invalid_client".into() };
    let fake = Fake::new(Duration::from_millis(10), vec![Err(rejected), Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    assert!(matches!(h.get(&res()).await, Err(TokenError::CredentialRejected { .. })));
    let old = h.live.swap(snapshot(secret_identity("rotated", &[]), 300));
    h.cache.apply(Some(&old));
    let other = Resource::parse("https://vault.azure.net").expect("valid");
    h.get(&other).await.expect("the new credential is tried, not failed fast");
    h.get(&res()).await.expect("the rejected entry retried at once with the new credential");
    assert_eq!(fake.calls(), 3, "one rejection, then one call per resource");
}

/// An identity removed by a reload stops its entries; a request that had selected it is answered.
#[tokio::test(start_paused = true)]
async fn removing_an_identity_stops_its_entries() {
    let fake = Fake::new(Duration::from_millis(10), vec![Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[res()]);
    h.get(&res()).await.expect("token");
    let before = h.live.load();
    let selected = before.identities.select(None).expect("default").clone();
    let mut renamed = secret_identity("s", &[]);
    renamed.name = "other".into();
    let old = h.live.swap(snapshot(renamed, 300));
    h.cache.apply(Some(&old));
    assert_eq!(h.cache.len(), 0);
    let other = Resource::parse("https://vault.azure.net").expect("valid");
    assert!(matches!(h.cache.get(&before, &user(1000), &selected, &other).await, Err(TokenError::Unavailable { .. })));
    assert_eq!(fake.calls(), 1);
}

/// Bounded work: one caller cannot make tokend cache (and fetch) more than its share of on-demand
/// resources; another caller is still served; configured resources do not count.
#[tokio::test(start_paused = true)]
async fn on_demand_resources_are_capped_per_caller_and_in_all() {
    let fake = Fake::new(Duration::from_millis(10), vec![Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[res()]);
    let snap = h.live.load();
    let id = snap.identities.select(None).expect("default").clone();
    let r = |i: usize| Resource::parse(&format!("https://r{i}.example")).expect("valid");
    let mut refused = 0;
    for i in 0..20 {
        match h.cache.get(&snap, &user(1001), &id, &r(i)).await {
            Ok(_) => {}
            Err(TokenError::TooManyResources { limit: 8, key: "max_on_demand_per_caller", retry_after, .. }) => {
                assert!(retry_after >= Duration::from_secs(1));
                refused += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(refused, 12, "8 per caller");
    assert_eq!(fake.calls(), 1 + 8, "the configured resource and 8 on-demand ones");
    // A resource it already has is still served; another caller is served; the total cap holds.
    h.cache.get(&snap, &user(1001), &id, &r(0)).await.expect("cached");
    for i in 100..104 {
        h.cache.get(&snap, &user(1002), &id, &r(i)).await.expect("another caller is served");
    }
    match h.cache.get(&snap, &user(1003), &id, &r(200)).await {
        Err(TokenError::TooManyResources { limit: 12, key: "max_on_demand", .. }) => {}
        other => panic!("expected the total cap, got {other:?}"),
    }
    // Idle entries free their owner's share.
    tokio::time::sleep(Duration::from_secs(601)).await;
    tokio::task::yield_now().await;
    h.cache.get(&snap, &user(1001), &id, &r(300)).await.expect("room again after idling out");
}

/// A failed on-demand entry is not retried when nobody asks: no IdP traffic without callers. Asked again
/// after its backoff, it is retried.
#[tokio::test(start_paused = true)]
async fn failed_on_demand_entries_nobody_asks_for_are_not_retried() {
    let rejected = FetchError::BadResource { status: 400, error: "invalid_scope".into() };
    let busy = FetchError::ServerError { status: 503, retry_after: Some(Duration::from_secs(30)) };
    let fake = Fake::new(Duration::from_millis(10), vec![Err(rejected), Err(busy), Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    let r = |i: usize| Resource::parse(&format!("https://bad{i}.example")).expect("valid");
    assert!(matches!(h.get(&r(0)).await, Err(TokenError::BadResource { .. })));
    // A transient failure whose next attempt is further away than max_wait: answered at once.
    assert!(matches!(h.get(&r(1)).await, Err(TokenError::Unavailable { .. })));
    assert_eq!(fake.calls(), 2);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(fake.calls(), 2, "no retries without callers");
    // Asked again after the backoff: retried once, and served.
    h.get(&r(1)).await.expect("retried when asked");
    assert_eq!(fake.calls(), 3);
}

/// Bounded work: one caller cannot add new on-demand resources faster than `tokens.on_demand_rate`
/// (the caps bound how many it holds, this how fast it churns through them); what it has is still
/// served, another caller has its own budget, and a changed rate starts with full buckets.
#[tokio::test(start_paused = true)]
async fn adding_on_demand_resources_is_rate_limited_per_caller() {
    let fake = Fake::new(Duration::from_millis(10), vec![Ok(3600)]);
    let h = Harness::new(fake.clone(), 300, &[]);
    let with_rate = |rate: &str| {
        let mut s = snapshot(secret_identity("s", &[]), 300);
        s.tokens.on_demand_rate = crate::access::Rate::parse(rate).expect("rate");
        s
    };
    let old = h.live.swap(with_rate("3/m"));
    h.cache.apply(Some(&old));
    let snap = h.live.load();
    let id = snap.identities.select(None).expect("default").clone();
    let r = |i: usize| Resource::parse(&format!("https://r{i}.example")).expect("valid");
    for i in 0..3 {
        h.cache.get(&snap, &user(1001), &id, &r(i)).await.expect("within the burst");
    }
    match h.cache.get(&snap, &user(1001), &id, &r(3)).await {
        Err(e @ TokenError::AddingTooFast { .. }) => {
            let TokenError::AddingTooFast { ref rate, retry_after } = e else { unreachable!() };
            assert_eq!(rate, "3/m");
            assert!(retry_after > Duration::from_secs(10) && retry_after <= Duration::from_secs(20), "{retry_after:?}");
            assert!(e.to_string().contains("tokens.on_demand_rate (3/m)"), "{e}");
        }
        other => panic!("expected the adding rate, got {other:?}"),
    }
    assert_eq!(fake.calls(), 3, "the refused resource cost no IdP call");
    h.cache.get(&snap, &user(1001), &id, &r(0)).await.expect("a resource it has is served");
    h.cache.get(&snap, &user(1002), &id, &r(10)).await.expect("another caller has its own budget");
    // A reload that changes the rate starts with full buckets.
    let old = h.live.swap(with_rate("4/m"));
    h.cache.apply(Some(&old));
    let snap = h.live.load();
    h.cache.get(&snap, &user(1001), &id, &r(3)).await.expect("new rate, new budget");
}
