//! Minute quotas over real HTTP on loopback, against a stand-in that enforces its own quota
//! over short windows and records every call.

use std::time::Duration;

use crate::support::*;
use futures_util::future::join_all;
use tokio::io::AsyncWriteExt;
use wxgate_stand_in::Fault;

const EXCHANGE: &str = "/sns/jscode2session";

/// Five times the quota at once, all distinct codes: every request succeeds, WeChat never
/// says 45011, no window holds more than the quota, and the overloaded windows use at
/// least 90 % of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_five_times_the_quota_all_succeeds_within_the_quota() {
    const QUOTA: u32 = 50;
    let window = Duration::from_secs(1);
    let upstream = stand_in(|c| {
        c.quota_per_window = Some(QUOTA);
        c.window = window;
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nburst = 5\nmax_wait_ms = 20000\n"
        ),
    )))
    .await;
    let client = client();
    let answers = join_all((0..5 * QUOTA).map(|i| {
        let client = client.clone();
        let proxy = &proxy;
        async move { exchange(&client, proxy, &format!("code-burst-{i}")).await }
    }))
    .await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    assert_eq!(upstream.calls(EXCHANGE), u64::from(5 * QUOTA));
    assert!(upstream.max_calls_in_any_window(APPID, EXCHANGE) <= u64::from(QUOTA));

    // The windows in the middle of the overload (not the first and last, partly idle) use
    // at least 90 % of the quota.
    let windows: Vec<u64> = calls_per_window(&upstream, window).into_values().collect();
    assert!(windows.len() >= 4, "{windows:?}");
    let middle = &windows[1..windows.len() - 1];
    let used = middle.iter().sum::<u64>() as f64 / (middle.len() as f64 * f64::from(QUOTA));
    assert!(
        used >= 0.9,
        "overloaded windows used {used:.2} of the quota: {windows:?}"
    );

    let text = proxy.metrics().await;
    assert!(
        metric(
            &text,
            "wxgate_quota_wait_seconds_count",
            &[("api", EXCHANGE)]
        ) > 0.0
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_requests_total",
            &[("outcome", "local_limit")]
        ),
        0.0
    );
}

/// wxgate configured at three times WeChat's real quota: WeChat answers 45011, wxgate holds
/// the requests to the next window and pauses the key, so every request still succeeds and
/// WeChat answers 45011 only a few times per window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_real_quota_requests_are_held_and_still_succeed() {
    const REAL: u32 = 10;
    let window = Duration::from_secs(1);
    let upstream = stand_in(|c| {
        c.quota_per_window = Some(REAL);
        c.window = window;
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {}\nburst = 3\nmax_wait_ms = 20000\n[retry]\nmax_hold_ms = 20000\n",
            3 * REAL
        ),
    )))
    .await;
    let client = client();
    let requests = 4 * REAL;
    let answers = join_all((0..requests).map(|i| {
        let client = client.clone();
        let proxy = &proxy;
        async move { exchange(&client, proxy, &format!("code-held-{i}")).await }
    }))
    .await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    let refused = upstream.answers(45011);
    let windows = calls_per_window(&upstream, window).len() as u64;
    assert!(refused > 0, "the real quota was reached");
    assert!(
        refused <= 3 * windows,
        "{refused} answers 45011 over {windows} windows: not a few per window"
    );
    assert!(refused < u64::from(requests) / 2);
    assert_eq!(upstream.answers(0), u64::from(requests));
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_quota_exceeded_total",
            &[("api", EXCHANGE)]
        ),
        refused as f64
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_retries_total",
            &[("api", EXCHANGE), ("reason", "minute_quota")]
        ),
        refused as f64
    );
}

/// Past `max_wait_ms`, or the client's own shorter wait, wxgate answers 45011 itself with
/// Retry-After; cache hits spend no quota.
#[tokio::test]
async fn requests_past_their_wait_get_a_local_45011_with_retry_after() {
    // Token fetches stand for any pass-through call with an appid: not answered from the
    // token cache here.
    let (upstream, proxy) = setup(
        "[quota]\nper_window = 2\nburst = 2\nmax_wait_ms = 200\n[token_cache]\nenabled = false\n",
    )
    .await;
    let client = client();
    assert_eq!(exchange(&client, &proxy, "code-wait-1").await, (200, 0));
    assert_eq!(exchange(&client, &proxy, "code-wait-2").await, (200, 0));
    let answer = client
        .get(proxy.url(&jscode2session(APPID, SECRET, "code-wait-3")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"],
        "application/json; encoding=utf-8"
    );
    let retry_after: u64 = answer.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], 45011);
    assert_eq!(
        body["errmsg"],
        "api minute-quota reach limit, must slower, retry next minute (wxgate: local quota)"
    );
    assert_eq!(upstream.code_calls("code-wait-3"), 0);

    // A replay of an answered code is a hit even with the quota spent.
    let replay = client
        .get(proxy.url(&jscode2session(APPID, SECRET, "code-wait-1")))
        .header("x-wxgate-max-wait-ms", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.headers()["x-wxgate-cache"], "hit");

    // Pass-through calls with a known appid are limited too (their own key).
    let token =
        format!("/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}");
    for _ in 0..2 {
        let answer = client.get(proxy.url(&token)).send().await.unwrap();
        assert!(answer.text().await.unwrap().contains("access_token"));
    }
    let answer = client.get(proxy.url(&token)).send().await.unwrap();
    assert!(answer.headers().contains_key("retry-after"));
    assert_eq!(upstream.calls("/cgi-bin/token"), 2);

    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_requests_total",
            &[("outcome", "local_limit")]
        ),
        2.0
    );
}

#[tokio::test]
async fn a_client_may_shorten_its_wait_and_the_header_stays_local() {
    let (upstream, proxy) =
        setup("[quota]\nper_window = 1\nburst = 1\nmax_wait_ms = 60000\n").await;
    let client = client();
    assert_eq!(exchange(&client, &proxy, "code-short-1").await, (200, 0));
    // Without the header this would wait up to a minute (and the client time out).
    let answer = client
        .get(proxy.url(&jscode2session(APPID, SECRET, "code-short-2")))
        .header("x-wxgate-max-wait-ms", "100")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], 45011);
    // Never forwarded upstream.
    let echo: serde_json::Value = client
        .get(proxy.url("/echo"))
        .header("x-wxgate-max-wait-ms", "100")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        echo["headers"].get("x-wxgate-max-wait-ms").is_none(),
        "{echo}"
    );
    assert_eq!(upstream.code_calls("code-short-2"), 0);
}

/// Waiting clients that hang up leave the queue: their requests never reach upstream, and
/// the queue keeps serving those who stay.
#[tokio::test]
async fn clients_that_go_away_while_waiting_cost_no_upstream_call() {
    // One call per 2 s window: the next token comes 2 s after the first call.
    let (upstream, proxy) =
        setup("[quota]\nwindow_secs = 2\nper_window = 1\nburst = 1\nmax_wait_ms = 30000\n[retry]\nmax_hold_ms = 30000\n[token_cache]\nenabled = false\n").await;
    let client = client();
    assert_eq!(exchange(&client, &proxy, "code-gone-0").await, (200, 0));
    let token =
        format!("/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}");
    let answer = client.get(proxy.url(&token)).send().await.unwrap();
    assert!(answer.text().await.unwrap().contains("access_token"));
    // Both keys have spent their one call of the window; everyone below waits.
    let mut waiting = Vec::new();
    for i in 1..=4 {
        for path in [
            jscode2session(APPID, SECRET, &format!("code-gone-{i}")),
            token.clone(),
        ] {
            let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: wxgate\r\n\r\n").as_bytes())
                .await
                .unwrap();
            waiting.push(stream);
        }
    }
    // Wait until all eight are inside wxgate, then hang up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(&proxy.metrics().await, "wxgate_inflight_requests", &[]) < 8.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(waiting);
    // Once no request is in flight, none of those who left can still reach upstream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&proxy.metrics().await, "wxgate_inflight_requests", &[]) > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "waiters never left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        upstream.total_calls(),
        2,
        "nobody who left reached upstream"
    );
    // The queue is not stuck behind the departed: the next caller gets through.
    assert_eq!(exchange(&client, &proxy, "code-gone-5").await, (200, 0));
    assert_eq!(upstream.total_calls(), 3);
    assert_eq!(
        metric(&proxy.metrics().await, "wxgate_inflight_requests", &[]),
        0.0
    );
}

#[tokio::test]
async fn busy_answers_are_retried_and_daily_quota_is_not() {
    let (upstream, proxy) = setup("[retry]\nbusy_attempts = 2\n").await;
    let client = client();
    upstream.push_faults([Fault::Busy, Fault::Busy]);
    assert_eq!(exchange(&client, &proxy, "code-busy").await, (200, 0));
    assert_eq!(upstream.code_calls("code-busy"), 3);

    upstream.push_faults([Fault::Busy, Fault::Busy, Fault::Busy]);
    assert_eq!(exchange(&client, &proxy, "code-busy-3").await, (200, -1));
    assert_eq!(
        upstream.code_calls("code-busy-3"),
        3,
        "two retries, then -1 to the client"
    );

    upstream.push_faults([Fault::DailyQuota]);
    assert_eq!(exchange(&client, &proxy, "code-daily").await, (200, 45009));
    assert_eq!(
        upstream.code_calls("code-daily"),
        1,
        "45009 is never retried"
    );

    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_retries_total",
            &[("api", EXCHANGE), ("reason", "system_busy")]
        ),
        4.0
    );
}
