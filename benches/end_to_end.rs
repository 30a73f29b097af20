//! A code exchange end to end over loopback HTTP: a keep-alive client, wxgate (started with
//! [`wxgate::run`] as the tests start it) and the in-process WeChat stand-in, beside the same
//! request sent to the stand-in directly. The proxy's own cost is the difference between
//! `wxgate_miss` and `direct`; `wxgate_hit` is a replay wxgate answers without upstream.
//!
//! - `end_to_end/sequential`: one request at a time, so the time is one request's latency.
//! - `end_to_end/concurrent_32`: 32 requests at once on their own connections, so the
//!   throughput is what the two cores do when client, wxgate and stand-in share them.
//!
//! No log subscriber is installed, so wxgate's per-request log line costs only its level check.
//!
//! Run: `cargo bench --bench end_to_end`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use wxgate::{Config, Listeners};
use wxgate_stand_in::{StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET};

/// Requests in flight in the concurrent group.
const CONCURRENCY: usize = 32;

/// Codes replayed by `wxgate_hit`.
const HIT_CODES: u64 = 1_000;

/// The upstream keeps every code it has seen; told to forget them every this many codes.
const FORGET_EVERY: u64 = 20_000;

struct Bench {
    runtime: Runtime,
    upstream: StandIn,
    proxy: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    client: reqwest::Client,
    next_code: AtomicU64,
    next_hit: AtomicU64,
    tidied: AtomicU64,
}

/// Where a request goes.
#[derive(Clone, Copy)]
enum Target {
    /// The stand-in, a new code every time.
    Direct,
    /// wxgate, a new code every time: always a miss, always upstream.
    WxgateMiss,
    /// wxgate, one of [`HIT_CODES`] codes it has answered before.
    WxgateHit,
}

impl Bench {
    fn new() -> Bench {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (upstream, proxy, stop) = runtime.block_on(async {
            let upstream = StandIn::start(StandInConfig {
                record_calls: false,
                ..StandInConfig::default()
            })
            .await
            .expect("stand-in starts");
            let config = Config::from_toml_str(&format!(
                "[upstream]\nbase_url = \"{}\"\n\
                 [code_cache]\nttl_secs = 3600\nmax_entries = 10000000\n\
                 [quota]\nwindow_secs = 1\nper_window = 100000000\n",
                upstream.base_url()
            ))
            .unwrap_or_else(|errors| panic!("{errors}"));
            let listeners = Listeners::bind_local().await.expect("bind loopback");
            let proxy = listeners.proxy_addr();
            let (stop, stopped) = oneshot::channel::<()>();
            tokio::spawn(async move {
                wxgate::run(listeners, config, async {
                    let _ = stopped.await;
                })
                .await
                .expect("wxgate runs");
            });
            (upstream, proxy, stop)
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(CONCURRENCY * 2)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let bench = Bench {
            runtime,
            upstream,
            proxy,
            stop: Some(stop),
            client,
            next_code: AtomicU64::new(HIT_CODES),
            next_hit: AtomicU64::new(0),
            tidied: AtomicU64::new(0),
        };
        bench.runtime.block_on(async {
            for code in 0..HIT_CODES {
                let url = bench.url(bench.proxy, &format!("e2e{code:08}"));
                let cache = bench.get(&url).await;
                assert_eq!(cache.as_deref(), Some("miss"));
            }
            assert_eq!(
                bench.send(Target::WxgateHit).await.as_deref(),
                Some("hit"),
                "a replay is a hit"
            );
            assert_eq!(
                bench.send(Target::WxgateMiss).await.as_deref(),
                Some("miss")
            );
            assert_eq!(bench.send(Target::Direct).await, None);
        });
        bench
    }

    fn url(&self, to: SocketAddr, js_code: &str) -> String {
        format!(
            "http://{to}/sns/jscode2session?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={js_code}&grant_type=authorization_code"
        )
    }

    fn fresh_code(&self) -> String {
        format!("e2e{:08}", self.next_code.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends one exchange; panics unless it succeeded. Returns `X-Wxgate-Cache`.
    async fn send(&self, target: Target) -> Option<String> {
        let url = match target {
            Target::Direct => self.url(self.upstream.addr(), &self.fresh_code()),
            Target::WxgateMiss => self.url(self.proxy, &self.fresh_code()),
            Target::WxgateHit => {
                let code = self.next_hit.fetch_add(1, Ordering::Relaxed) % HIT_CODES;
                self.url(self.proxy, &format!("e2e{code:08}"))
            }
        };
        self.get(&url).await
    }

    async fn get(&self, url: &str) -> Option<String> {
        let response = self.client.get(url).send().await.expect("an answer");
        assert!(response.status().is_success());
        let cache = response
            .headers()
            .get("x-wxgate-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.expect("a body");
        assert!(body.starts_with(b"{\"session_key\""), "{body:?}");
        cache
    }

    /// Lets the upstream forget the codes it has seen; between samples, not measured.
    fn tidy(&self) {
        let used = self.next_code.load(Ordering::Relaxed);
        if used - self.tidied.load(Ordering::Relaxed) >= FORGET_EVERY {
            self.upstream.forget_used_codes();
            self.upstream.reset_counters();
            self.tidied.store(used, Ordering::Relaxed);
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

const TARGETS: [(&str, Target); 3] = [
    ("direct", Target::Direct),
    ("wxgate_miss", Target::WxgateMiss),
    ("wxgate_hit", Target::WxgateHit),
];

fn sequential(c: &mut Criterion) {
    let bench = Bench::new();
    let mut group = c.benchmark_group("end_to_end/sequential");
    group.throughput(Throughput::Elements(1));
    for (name, target) in TARGETS {
        group.bench_function(name, |b| {
            b.to_async(&bench.runtime).iter_custom(|iters| {
                let bench = &bench;
                async move {
                    bench.tidy();
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(bench.send(target).await);
                    }
                    started.elapsed()
                }
            })
        });
    }
    group.finish();
}

fn concurrent(c: &mut Criterion) {
    let bench = Bench::new();
    let mut group = c.benchmark_group(format!("end_to_end/concurrent_{CONCURRENCY}"));
    group.throughput(Throughput::Elements(CONCURRENCY as u64));
    for (name, target) in TARGETS {
        group.bench_with_input(BenchmarkId::from_parameter(name), &target, |b, &target| {
            b.to_async(&bench.runtime).iter_custom(|iters| {
                let bench = &bench;
                async move {
                    bench.tidy();
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(join_all((0..CONCURRENCY).map(|_| bench.send(target))).await);
                    }
                    started.elapsed()
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
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = sequential, concurrent
}
criterion_main!(benches);
