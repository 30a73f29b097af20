//! Code exchanges through the whole request pipeline, without sockets on the client side:
//! in-memory `http::Request`s are handed to [`Proxy::handle`], whose upstream is an
//! in-process [`StandIn`] on loopback (calls not recorded).
//!
//! - `code_exchange/hit`: a remembered answer replayed. Baseline `plain_hashmap`: the same
//!   request read for its `js_code` and answered from a `HashMap` of the same bodies, with the
//!   same headers: what any cache must at least do.
//! - `code_exchange/fan_in`: `n` identical exchanges at once, one leader and `n − 1`
//!   followers, so one upstream call answers them all (`same_code`). Baseline
//!   `distinct_codes`: `n` exchanges of different codes at once, one upstream call each. The
//!   throughput is per request; `same_code/1` is one plain miss.
//!
//! Run: `cargo bench --bench code_exchange`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use wxgate::{Config, Metrics, Proxy, CACHE_HEADER};
use wxgate_stand_in::{StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET};

/// Codes remembered before the hit path is measured.
const HIT_CODES: usize = 1_000;

/// Requests per fan-in case.
const FAN_IN: [usize; 3] = [1, 16, 256];

/// The upstream keeps every code it has seen; told to forget them every this many codes.
const FORGET_EVERY: u64 = 20_000;

fn exchange_uri(js_code: &str) -> Uri {
    format!(
        "/sns/jscode2session?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={js_code}&grant_type=authorization_code"
    )
    .parse()
    .expect("a valid request target")
}

fn request(uri: &Uri) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = uri.clone();
    request
}

/// A stand-in, and a proxy in front of it whose quota never binds and whose cache keeps
/// everything the benchmark puts in it.
struct Bench {
    runtime: Runtime,
    upstream: StandIn,
    proxy: Arc<Proxy>,
    next_code: AtomicU64,
    tidied: AtomicU64,
}

impl Bench {
    fn new() -> Bench {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (upstream, proxy) = runtime.block_on(async {
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
            let metrics = Metrics::new(&prometheus::Registry::new()).expect("metrics");
            let proxy = Proxy::new(&config, metrics).expect("proxy");
            (upstream, Arc::new(proxy))
        });
        Bench {
            runtime,
            upstream,
            proxy,
            next_code: AtomicU64::new(0),
            tidied: AtomicU64::new(0),
        }
    }

    /// A code never used before.
    fn fresh_code(&self) -> String {
        let n = self.next_code.fetch_add(1, Ordering::Relaxed);
        format!("bench{n:08}")
    }

    /// Lets the upstream forget the codes it has seen, so that a long run does not grow it;
    /// called between samples, outside the measured time.
    fn tidy(&self) {
        let used = self.next_code.load(Ordering::Relaxed);
        if used - self.tidied.load(Ordering::Relaxed) >= FORGET_EVERY {
            self.upstream.forget_used_codes();
            self.upstream.reset_counters();
            self.tidied.store(used, Ordering::Relaxed);
        }
    }
}

/// The `X-Wxgate-Cache` value of a response.
fn cache_status(response: &Response<Full<Bytes>>) -> &str {
    response
        .headers()
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

async fn body(response: Response<Full<Bytes>>) -> Bytes {
    let collected: Result<_, Infallible> = response.into_body().collect().await;
    collected.expect("infallible").to_bytes()
}

/// The baseline cache: answers by `js_code`, nothing else.
struct PlainCache {
    answers: HashMap<String, Bytes>,
    content_type: HeaderValue,
}

impl PlainCache {
    fn answer(&self, request: &Request<Full<Bytes>>) -> Response<Full<Bytes>> {
        let query = request.uri().query().unwrap_or("");
        let code = form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "js_code")
            .map(|(_, value)| value)
            .unwrap_or_default();
        let mut response = match self.answers.get(code.as_ref()) {
            Some(body) => Response::new(Full::new(body.clone())),
            None => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::NOT_FOUND;
                response
            }
        };
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, self.content_type.clone());
        headers.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
        response
    }
}

fn hit(c: &mut Criterion) {
    let bench = Bench::new();
    let uris: Vec<Uri> = (0..HIT_CODES)
        .map(|_| exchange_uri(&bench.fresh_code()))
        .collect();
    let plain = bench.runtime.block_on(async {
        let mut answers = HashMap::new();
        let mut content_type = None;
        for uri in &uris {
            let response = bench.proxy.clone().handle(request(uri)).await.unwrap();
            assert_eq!(cache_status(&response), "miss");
            content_type = response.headers().get(header::CONTENT_TYPE).cloned();
            let code = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .find(|(name, _)| name == "js_code")
                .map(|(_, value)| value.into_owned())
                .expect("a js_code");
            answers.insert(code, body(response).await);
        }
        // What is measured below really is the hit path.
        let replay = bench.proxy.clone().handle(request(&uris[0])).await.unwrap();
        assert_eq!(cache_status(&replay), "hit");
        assert_eq!(body(replay).await, answers["bench00000000"]);
        PlainCache {
            answers,
            content_type: content_type.expect("a Content-Type"),
        }
    });

    let mut group = c.benchmark_group("code_exchange/hit");
    group.throughput(Throughput::Elements(1));
    let mut next = 0;
    group.bench_function("wxgate", |b| {
        b.to_async(&bench.runtime).iter(|| {
            next = (next + 1) % uris.len();
            let request = request(&uris[next]);
            let proxy = bench.proxy.clone();
            async move { black_box(proxy.handle(request).await) }
        })
    });
    group.bench_function("plain_hashmap", |b| {
        b.iter(|| {
            next = (next + 1) % uris.len();
            black_box(plain.answer(&request(&uris[next])))
        })
    });
    group.finish();
}

/// `n` exchanges at once, of one code (`same`) or of `n` codes; returns the cache statuses.
async fn burst(bench: &Bench, n: usize, same: bool) -> Vec<String> {
    let shared = exchange_uri(&bench.fresh_code());
    let uris: Vec<Uri> = (0..n)
        .map(|_| {
            if same {
                shared.clone()
            } else {
                exchange_uri(&bench.fresh_code())
            }
        })
        .collect();
    let responses = join_all(
        uris.iter()
            .map(|uri| bench.proxy.clone().handle(request(uri))),
    )
    .await;
    responses
        .into_iter()
        .map(|response| cache_status(&response.unwrap()).to_owned())
        .collect()
}

fn fan_in(c: &mut Criterion) {
    let bench = Bench::new();
    // One leader and followers, never several upstream calls for one code.
    bench.runtime.block_on(async {
        let before = bench.upstream.total_calls();
        let statuses = burst(&bench, 64, true).await;
        assert_eq!(bench.upstream.total_calls() - before, 1, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| *s == "miss").count(), 1);
    });

    let mut group = c.benchmark_group("code_exchange/fan_in");
    // A burst of 256 distinct codes takes milliseconds: fewer, longer samples.
    group.sample_size(30);
    for n in FAN_IN {
        group.throughput(Throughput::Elements(n as u64));
        for (name, same) in [("same_code", true), ("distinct_codes", false)] {
            if n == 1 && !same {
                continue;
            }
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.to_async(&bench.runtime).iter_custom(|iters| {
                    let bench = &bench;
                    async move {
                        bench.tidy();
                        let started = Instant::now();
                        for _ in 0..iters {
                            black_box(burst(bench, n, same).await);
                        }
                        started.elapsed()
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        // No HTML plots: drawing them took longer than measuring.
        .without_plots()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = hit, fan_in
}
criterion_main!(benches);
