//! How much memory the code cache takes with 1,000,000 remembered answers.
//!
//! Real exchanges go through the whole pipeline: in-memory requests handed to
//! [`Proxy::handle`], whose upstream is the in-process stand-in over loopback (calls not
//! recorded; the codes it has seen are forgotten as the run goes, so that the stand-in's own
//! memory stays small). Every answer is a realistic success body of about 110 bytes
//! (`session_key`, `openid`, `unionid`) with WeChat's Content-Type, and every one of them is
//! remembered. The resident set size is read from `/proc/self/status` before and after.
//!
//! Run: `cargo run --release --example code_cache_memory [-- ANSWERS]` (default 1,000,000;
//! the target is at most 400 MB resident).

#[path = "support/rss.rs"]
mod rss;
use rss::{memory_kib, report};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use wxgate::{Config, Metrics, Proxy, CACHE_HEADER};
use wxgate_stand_in::{StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET};

/// The target: at most this many MB (10^6 bytes) resident.
const TARGET_MB: f64 = 400.0;

/// Exchanges in flight at once.
const CONCURRENCY: usize = 256;

/// The stand-in forgets the codes it has seen every this many exchanges.
const FORGET_EVERY: usize = 10_000;

fn request(js_code: &str) -> Request<Full<Bytes>> {
    Request::get(format!(
        "/sns/jscode2session?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={js_code}&grant_type=authorization_code"
    ))
    .body(Full::new(Bytes::new()))
    .expect("a valid request")
}

/// A `wx.login()`-like code: 32 characters.
fn code(i: usize) -> String {
    format!("0{i:031}")
}

fn main() {
    let answers: usize = match std::env::args().nth(1).map(|arg| arg.parse()) {
        None => 1_000_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: code_cache_memory [ANSWERS]");
            std::process::exit(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(answers));
}

async fn run(answers: usize) {
    let upstream = StandIn::start(StandInConfig {
        record_calls: false,
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in starts");
    // Everything is remembered (the TTL outlasts the run); the quota never binds.
    let config = Config::from_toml_str(&format!(
        "[upstream]\nbase_url = \"{}\"\n\
         [code_cache]\nttl_secs = 3600\nmax_entries = {answers}\n\
         [quota]\nwindow_secs = 1\nper_window = 100000000\n",
        upstream.base_url()
    ))
    .unwrap_or_else(|errors| panic!("{errors}"));
    let registry = prometheus::Registry::new();
    let proxy =
        Arc::new(Proxy::new(&config, Metrics::new(&registry).expect("metrics")).expect("proxy"));

    // One exchange first, so the baseline includes warmed-up connections and buffers.
    let first = proxy
        .clone()
        .handle(request("warmup"))
        .await
        .expect("infallible");
    let sample = first
        .into_body()
        .collect()
        .await
        .expect("infallible")
        .to_bytes();
    let (rss_before, _) = memory_kib();

    let started = Instant::now();
    let mut done = 0;
    let mut responses = stream::iter(0..answers)
        .map(|i| {
            let proxy = proxy.clone();
            async move { proxy.handle(request(&code(i))).await.expect("infallible") }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(response) = responses.next().await {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CACHE_HEADER], "miss");
        done += 1;
        if done % FORGET_EVERY == 0 {
            upstream.forget_used_codes();
            upstream.reset_counters();
        }
    }
    drop(responses);
    let elapsed = started.elapsed();
    upstream.forget_used_codes();
    upstream.reset_counters();

    let remembered = gauge(&registry, "wxgate_code_cache_entries");
    let rss_after = memory_kib();
    // Still answered from memory, byte for byte.
    let replay = proxy
        .clone()
        .handle(request(&code(0)))
        .await
        .expect("infallible");
    assert_eq!(replay.headers()[CACHE_HEADER], "hit");

    println!(
        "code cache memory: {answers} exchanges through Proxy::handle in {elapsed:.1?} ({:.0}/s)",
        answers as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  answer body:         {} bytes, e.g. {}",
        sample.len(),
        String::from_utf8_lossy(&sample)
    );
    println!("  answers remembered:  {remembered}");
    report(
        rss_before,
        rss_after,
        answers,
        "remembered answer",
        TARGET_MB,
    );
}

/// The value of a gauge without labels.
fn gauge(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .find(|family| family.name() == name)
        .and_then(|family| {
            family
                .get_metric()
                .first()
                .map(|m| m.get_gauge().get_value())
        })
        .unwrap_or(0.0)
}
