//! How much memory the quota state takes for 100,000 appids.
//!
//! Every appid (18 characters, as WeChat issues them) takes one token of
//! `/sns/jscode2session` through [`QuotaGate::acquire`], the path a request takes, so that
//! the gate holds the state of every one of them. The resident set size is read from
//! `/proc/self/status` before and after.
//!
//! Run: `cargo run --release --example quota_memory [-- APPIDS]` (default 100,000; the
//! target is at most 64 MB resident).

#[path = "support/rss.rs"]
mod rss;
use rss::{memory_kib, report};
use std::time::{Duration, Instant};

use wxgate::{Api, Config, QuotaGate, QuotaKey};

/// The target: at most this many MB (10^6 bytes) resident.
const TARGET_MB: f64 = 64.0;

fn main() {
    let appids: usize = match std::env::args().nth(1).map(|arg| arg.parse()) {
        None => 100_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: quota_memory [APPIDS]");
            std::process::exit(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(appids));
}

async fn run(appids: usize) {
    // The defaults (5,000 a minute, burst 500): one call per appid never waits.
    let config = Config::default();
    let gate = QuotaGate::new(&config.quota);
    let (rss_before, _) = memory_kib();

    let started = Instant::now();
    for i in 0..appids {
        let key = QuotaKey::new(Api::JsCode2Session, format!("wx{i:016x}")).expect("an appid");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let waited = gate.acquire(&key, deadline).await.expect("a token at hand");
        assert_eq!(waited, Duration::ZERO);
    }
    let elapsed = started.elapsed();
    let rss_after = memory_kib();
    assert_eq!(gate.len(), appids, "every appid has quota state");

    println!(
        "quota memory: {appids} appids through QuotaGate::acquire in {elapsed:.1?} ({:.0}/s)",
        appids as f64 / elapsed.as_secs_f64()
    );
    println!("  keys with state:     {}", gate.len());
    report(rss_before, rss_after, appids, "appid", TARGET_MB);
}
