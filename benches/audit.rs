//! What an audit line costs (issue 20): the request thread's part (copying the record into an entry,
//! against building a `serde_json::Value` as before), the writer's part (rendering the JSON text,
//! against completing and serialising the value), and lines per second through queue and writer to
//! `/dev/null`, against the former pipeline. Before and after run in the same process, interleaved by
//! criterion: compare the ratios (this machine is shared and noisy).
//!
//! `cargo bench --bench audit`; under `cargo test --benches` each runs once.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tokend::bench::audit;

fn audit_line(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit/request_thread");
    g.bench_function("before: serde_json::Value", |b| b.iter(|| black_box(audit::request_before())));
    g.bench_function("now: entry copy", |b| b.iter(|| black_box(audit::request_now())));
    g.finish();

    let mut g = c.benchmark_group("audit/writer_render");
    g.bench_function("before: Value + to_string", |b| {
        b.iter_batched(audit::queued_before, |v| black_box(audit::render_before(v)), BatchSize::SmallInput);
    });
    let mut out = Vec::with_capacity(1024);
    g.bench_function("now: rendered into the buffer", |b| {
        b.iter_batched(audit::queued_now, |q| black_box(audit::render_now(&q, &mut out)), BatchSize::SmallInput);
    });
    g.finish();

    let mut g = c.benchmark_group("audit/record_to_written");
    g.throughput(criterion::Throughput::Elements(1));
    let before = audit::ThroughputBefore::new();
    g.bench_function("before: Value pipeline", |b| b.iter_custom(|n| before.lines(n)));
    let now = audit::Throughput::new();
    g.bench_function("now: entry + writer", |b| b.iter_custom(|n| now.lines(n)));
    g.finish();
}

criterion_group!(benches, audit_line);
criterion_main!(benches);
