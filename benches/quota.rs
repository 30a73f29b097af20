//! The quota check on the request path, with 1, 1,000 and 100,000 appids known to the gate.
//!
//! Every case first takes one token for each key, so the state of every appid exists (the
//! steady state of a busy gateway), and then cycles through the keys. The quota is set far
//! above what a benchmark can spend (100 million calls per one-second window), so every call
//! measures the admitting path, never a refusal.
//!
//! Baselines, per key count:
//! - `governor_keyed`: a bare governor keyed limiter on the same keys, which is the part of
//!   [`QuotaGate::try_take`] wxgate did not write (the difference is wxgate's class lookup and
//!   clock);
//! - `dashmap_counter`: a plain `DashMap` lookup and an atomic increment, the least a keyed
//!   count can cost.
//!
//! [`QuotaGate::acquire`] is measured beside them: the fast path a request takes (no lane for
//! the key, a token at hand), awaited inside a tokio runtime as the proxy does.
//!
//! Run: `cargo bench --bench quota`.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
use governor::{Quota, RateLimiter};
use wxgate::{Api, Config, QuotaGate, QuotaKey};

/// How many appids the gate knows in each case.
const APPID_COUNTS: [usize; 3] = [1, 1_000, 100_000];

/// A quota no benchmark can spend: the gate always admits.
const QUOTA_TOML: &str = "[quota]\nwindow_secs = 1\nper_window = 100000000\n";

fn config() -> Config {
    Config::from_toml_str(QUOTA_TOML).unwrap_or_else(|errors| panic!("{errors}"))
}

/// `count` distinct appids of the length WeChat issues (18 characters).
fn keys(count: usize) -> Vec<QuotaKey> {
    (0..count)
        .map(|i| QuotaKey::new(Api::JsCode2Session, format!("wx{i:016x}")).expect("an appid"))
        .collect()
}

/// Cycles through `keys` without a division on every call.
struct Cycle<'a, T> {
    items: &'a [T],
    next: usize,
}

impl<'a, T> Cycle<'a, T> {
    fn new(items: &'a [T]) -> Self {
        Cycle { items, next: 0 }
    }

    fn next_item(&mut self) -> &'a T {
        let item = &self.items[self.next];
        self.next += 1;
        if self.next == self.items.len() {
            self.next = 0;
        }
        item
    }
}

fn try_take(c: &mut Criterion) {
    let config = config();
    let mut group = c.benchmark_group("quota/try_take");
    group.throughput(Throughput::Elements(1));
    for count in APPID_COUNTS {
        let keys = keys(count);

        let gate = QuotaGate::new(&config.quota);
        for key in &keys {
            gate.try_take(key).expect("the quota never binds");
        }
        group.bench_with_input(BenchmarkId::new("wxgate", count), &keys, |b, keys| {
            let mut cycle = Cycle::new(keys);
            b.iter(|| black_box(gate.try_take(cycle.next_item())))
        });

        let per_second = NonZeroU32::new(100_000_000).expect("non-zero");
        let governor = RateLimiter::dashmap(Quota::per_second(per_second));
        for key in &keys {
            governor.check_key(key).expect("the quota never binds");
        }
        group.bench_with_input(
            BenchmarkId::new("governor_keyed", count),
            &keys,
            |b, keys| {
                let mut cycle = Cycle::new(keys);
                b.iter(|| black_box(governor.check_key(cycle.next_item()).is_ok()))
            },
        );

        let counters: DashMap<QuotaKey, AtomicU64> =
            keys.iter().map(|key| (*key, AtomicU64::new(0))).collect();
        group.bench_with_input(
            BenchmarkId::new("dashmap_counter", count),
            &keys,
            |b, keys| {
                let mut cycle = Cycle::new(keys);
                b.iter(|| {
                    let counter = counters.get(cycle.next_item()).expect("every key is there");
                    black_box(counter.fetch_add(1, Ordering::Relaxed))
                })
            },
        );
    }
    group.finish();
}

fn acquire(c: &mut Criterion) {
    let config = config();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("quota/acquire");
    group.throughput(Throughput::Elements(1));
    for count in APPID_COUNTS {
        let keys = keys(count);
        // Built inside the runtime: the gate's clock is tokio's.
        let gate = runtime.block_on(async { QuotaGate::new(&config.quota) });
        for key in &keys {
            gate.try_take(key).expect("the quota never binds");
        }
        group.bench_with_input(BenchmarkId::new("wxgate", count), &keys, |b, keys| {
            let mut cycle = Cycle::new(keys);
            b.to_async(&runtime).iter(|| {
                let key = cycle.next_item();
                let gate = &gate;
                async move {
                    // The proxy's deadline: now plus `quota.max_wait`.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                    black_box(gate.acquire(key, deadline).await)
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        // No HTML plots: drawing them took longer than measuring.
        .without_plots()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    targets = try_take, acquire
}
criterion_main!(benches);
