//! Limits WeChat states and limits learned from it, over real HTTP on loopback: the arrival
//! margin, limits discovered with quota/get, limits learned from 45011 (and the per-user
//! limit that must not teach them), daily quotas answered locally, the same with replicas,
//! and `wxgate quota`. The stand-in's limits are never written into wxgate's configuration
//! unless a test says so.

use std::time::Duration;

use futures_util::future::join_all;

use crate::support::tls::TestCa;
use crate::support::*;

const EXCHANGE: &str = "/sns/jscode2session";

/// Done when 1: a burst of five times the quota, sent as a new user's first calls (wxgate
/// opens fresh TLS connections to WeChat for the first of them, and reuses them after), in
/// ten runs: no span of one window ever holds more than the quota at the stand-in, where
/// the calls arrive. Without the arrival margin (`arrival_margin_ms = 0`) the first call,
/// slowed by its handshakes, shares a window with the call one window after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_fresh_connections_never_exceeds_the_quota_where_wechat_counts() {
    const QUOTA: u32 = 20;
    let window = Duration::from_secs(1);
    let ca = TestCa::new();
    // Generous for loopback (a fresh handshake adds about a millisecond) so that a busy
    // machine's scheduling does not count as network.
    let margin = 100;
    for run in 0..10 {
        let upstream = stand_in(|c| {
            c.tls = Some(ca.leaf(&["localhost"]));
            c.quota_per_window = Some(QUOTA);
            c.window = window;
        })
        .await;
        let base_url = format!("https://localhost:{}", upstream.addr().port());
        let extra = format!(
            "{}[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nmax_wait_ms = 30000\narrival_margin_ms = {margin}\n[retry]\nmax_hold_ms = 30000\n",
            ca.ca_file_key()
        );
        let proxy = spawn_proxy(config(&config_text(&base_url, &extra))).await;
        let client = client();
        let answers = join_all((0..5 * QUOTA).map(|i| {
            let client = client.clone();
            let proxy = &proxy;
            async move { exchange(&client, proxy, &format!("code-fresh-{run}-{i}")).await }
        }))
        .await;
        assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
        assert!(upstream.tls_connections() >= 1);
        let most = upstream.max_calls_in_any_span(EXCHANGE, APPID, window);
        assert!(
            most <= QUOTA as usize,
            "run {run}: {most} calls arrived within one window"
        );
        assert_eq!(upstream.answers(45011), 0, "run {run}");
    }
}
