//! Micro-benchmarks of the request path (issue 14), so that regressions show: query parsing, rendering
//! the answer, the cache lookup, and one whole request through tokend's routes and guards against the
//! same request through a bare axum router answering the same body (examples/baseline.rs in process).
//! The caller lookup has its own bench (`caller_lookup`). Compare ratios within one run: this machine
//! is shared and noisy.
//!
//! `cargo bench --bench hot_path`; under `cargo test --benches` each runs once.

use std::hint::black_box;

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use axum::response::IntoResponse;
use criterion::{Criterion, criterion_group, criterion_main};
use tokend::bench::{App, IMDS_QUERY, Token, parse_query};

fn request(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::HOST, "127.0.0.1:50342")
        .header("Metadata", "true")
        .header(header::USER_AGENT, "azsdk-python-identity/1.27.0 Python/3.13.5 (Linux)")
        .header(header::ACCEPT, "application/json")
        .body(Body::empty())
        .expect("request")
}

/// The baseline: a bare axum router that answers every request with a fixed body and the headers
/// tokend's answer has (what serving a cached token would cost if tokend did nothing).
fn baseline(body: &'static [u8]) -> axum::Router {
    axum::Router::new().fallback(move || async move {
        let mut resp = body.into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    })
}

fn hot_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let app = rt.block_on(App::new());
    let query = IMDS_QUERY.split_once('?').map_or("", |(_, q)| q);
    c.bench_function("query/parse", |b| b.iter(|| parse_query(black_box(query))));
    let encoded = "api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F&client_id=11111111-2222-3333-4444-555555555555";
    c.bench_function("query/parse_encoded", |b| b.iter(|| parse_query(black_box(encoded))));
    let token = Token::default();
    c.bench_function("body/render", |b| {
        b.iter(|| {
            token.render(black_box("11111111-2222-3333-4444-555555555555"), black_box("https://storage.azure.com"))
        })
    });
    c.bench_function("cache/lookup", |b| {
        b.to_async(&rt).iter(|| async { assert!(app.cache_lookup(black_box("https://storage.azure.com")).await) })
    });
    let (status, len) = rt.block_on(app.call(request(IMDS_QUERY)));
    assert_eq!(status, 200, "tokend answers the benchmark's request");
    let body: &'static [u8] = Box::leak(vec![b'x'; len].into_boxed_slice());
    let bare = baseline(body);
    let mut group = c.benchmark_group("request");
    group.bench_function("baseline", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = tower::ServiceExt::oneshot(bare.clone(), request(IMDS_QUERY)).await.expect("infallible");
            assert_eq!(resp.status(), 200);
        })
    });
    group.bench_function("tokend", |b| {
        b.to_async(&rt).iter(|| async { assert_eq!(app.call(request(IMDS_QUERY)).await.0, 200) })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
