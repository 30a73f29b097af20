//! Limits over HTTP: per-API rate limits with their own windows (echoed APIs included),
//! changed while running, daily limits and 45009 across a short day, the per-user limit of
//! the code exchanges apart from the appid's, calls on an account's behalf, refused calls
//! uncounted, arrival spans, and the stats page.

use std::time::Duration;

use serde_json::json;

use super::{advance_clock, align_clock, query, Harness};
use crate::{
    ApiLimits, RateLimit, StandInConfig, AUTHORIZER_TOKEN_PATH, CHECKED_API_PATH,
    COMPONENT_JSCODE2SESSION_PATH, DEFAULT_APPID, DEFAULT_COMPONENT_ACCESS_TOKEN,
    DEFAULT_COMPONENT_APPID, JSCODE2SESSION_PATH, STATS_PATH,
};

const BUSINESS: &str = "/wxa/business/getuserphonenumber";

fn per(calls: u32, secs: u64) -> RateLimit {
    RateLimit::new(calls, Duration::from_secs(secs))
}

fn limited(api_limits: Vec<ApiLimits>) -> StandInConfig {
    StandInConfig {
        api_limits,
        ..StandInConfig::default()
    }
}

impl Harness {
    /// A call of [`BUSINESS`] with an `access_token`: its errcode, 0 for the echo.
    async fn business(&self, token: &str) -> i64 {
        let reply = self
            .get(&format!("{BUSINESS}?{}", query(&[("access_token", token)])))
            .await;
        reply.errcode().unwrap_or(0)
    }
}

#[tokio::test]
async fn a_named_echoed_api_checks_its_token_and_has_its_own_window() {
    // The default quota (one call a minute) is not the business API's: its own figure is.
    let mut config = limited(vec![ApiLimits::new(BUSINESS).with_rate_limit(per(2, 10))]);
    config.quota_per_window = Some(1);
    let h = Harness::start(config).await;
    let token = h.token().await;
    align_clock(&h.upstream, Duration::from_secs(60));

    assert_eq!(h.business(&token).await, 0);
    let echoed = h.get(&format!("{BUSINESS}?access_token={token}")).await;
    assert_eq!(
        echoed.json()["method"],
        "GET",
        "still the echo: {}",
        echoed.text
    );
    let refused = h.get(&format!("{BUSINESS}?access_token={token}")).await;
    refused.assert_error(45011);
    // The token is checked first, as WeChat's APIs do.
    h.get(BUSINESS).await.assert_error(41001);
    h.get(&format!("{BUSINESS}?access_token=made-up"))
        .await
        .assert_error(40001);
    // A path the configuration does not name is echoed whatever its token.
    assert_eq!(h.get("/wxa/other?access_token=made-up").await.status, 200);

    // The next 10 s window (still the same minute) serves it again.
    advance_clock(&h.upstream, Duration::from_secs(10));
    assert_eq!(h.business(&token).await, 0);
    assert_eq!(h.upstream.daily_used(BUSINESS, DEFAULT_APPID), 3);
    // Calls are logged under the token's appid (those without a known token under none).
    let windows = h.upstream.calls_per_window();
    let business = windows
        .iter()
        .find(|w| w.path == BUSINESS && w.appid.as_deref() == Some(DEFAULT_APPID))
        .expect("logged");
    assert_eq!((business.calls, business.answered_45011), (4, 1));
}

#[tokio::test]
async fn rate_limits_change_while_running_per_api_and_appid() {
    let h = Harness::start(StandInConfig::default()).await;
    align_clock(&h.upstream, Duration::from_secs(60));
    let limit = |calls| Some(per(calls, 60));

    h.upstream
        .set_rate_limit(JSCODE2SESSION_PATH, Some(DEFAULT_APPID), limit(1));
    h.exchange("code-c1").await.assert_session();
    h.exchange("code-c2").await.assert_error(45011);
    // Raised: the refused call was not counted, so two more fit under 3.
    h.upstream
        .set_rate_limit(JSCODE2SESSION_PATH, Some(DEFAULT_APPID), limit(3));
    h.exchange("code-c2").await.assert_session();
    h.exchange("code-c3").await.assert_session();
    h.exchange("code-c4").await.assert_error(45011);
    // The figure for every appid does not override the appid's own.
    h.upstream
        .set_rate_limit(JSCODE2SESSION_PATH, None, limit(100));
    h.exchange("code-c4").await.assert_error(45011);
    // Taken back, the appid inherits the figure for every appid.
    h.upstream
        .set_rate_limit(JSCODE2SESSION_PATH, Some(DEFAULT_APPID), None);
    h.exchange("code-c4").await.assert_session();
    // And with nothing left, the default (none here): unlimited.
    h.upstream.set_rate_limit(JSCODE2SESSION_PATH, None, None);
    for n in 5..10 {
        h.exchange(&format!("code-c{n}")).await.assert_session();
    }
    let stats = h.get(STATS_PATH).await.json();
    assert_eq!(stats["api_limits"], json!([]), "{stats}");
}

#[tokio::test]
async fn a_daily_limit_answers_45009_until_the_next_short_day_without_executing() {
    let day = Duration::from_secs(100);
    let config = StandInConfig {
        day,
        // Ten times the day's limit per minute: the rate limit never binds here.
        quota_per_window: Some(20),
        api_limits: vec![ApiLimits::new(JSCODE2SESSION_PATH).with_daily_limit(2)],
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    // 8 h is a whole number of 100 s days, so days start at multiples of 100 s.
    align_clock(&h.upstream, day);

    h.exchange("code-d1").await.assert_session();
    h.exchange("code-d2").await.assert_session();
    let refused = h.exchange("code-d3").await;
    refused.assert_error(45009);
    assert!(
        refused.text.contains("reach max api daily quota limit"),
        "{}",
        refused.text
    );
    h.exchange("code-d3").await.assert_error(45009);
    assert_eq!(h.upstream.daily_used(JSCODE2SESSION_PATH, DEFAULT_APPID), 2);

    advance_clock(&h.upstream, day);
    assert_eq!(h.upstream.daily_used(JSCODE2SESSION_PATH, DEFAULT_APPID), 0);
    // The refused code was never spent.
    h.exchange("code-d3").await.assert_session();
    assert_eq!(h.upstream.daily_used(JSCODE2SESSION_PATH, DEFAULT_APPID), 1);
    // Lowered at run time below what today used: refused at once.
    h.upstream
        .set_daily_limit(JSCODE2SESSION_PATH, Some(DEFAULT_APPID), Some(1));
    h.exchange("code-d4").await.assert_error(45009);

    let stats = h.get(STATS_PATH).await.json();
    assert_eq!(stats["day_ms"], 100_000, "{stats}");
    assert_eq!(stats["day_offset_ms"], 8 * 3_600_000, "{stats}");
    assert_eq!(
        stats["daily_used"],
        json!([{"appid": DEFAULT_APPID, "path": JSCODE2SESSION_PATH, "used": 1, "daily_limit": 1}]),
        "{stats}"
    );
}

#[tokio::test]
async fn refused_calls_are_not_counted_toward_the_day() {
    let config = limited(vec![ApiLimits::new(BUSINESS)
        .with_rate_limit(per(1, 60))
        .with_daily_limit(10)]);
    let h = Harness::start(config).await;
    let token = h.token().await;
    align_clock(&h.upstream, Duration::from_secs(60));
    assert_eq!(h.business(&token).await, 0);
    for _ in 0..3 {
        assert_eq!(h.business(&token).await, 45011);
    }
    assert_eq!(h.upstream.daily_used(BUSINESS, DEFAULT_APPID), 1);
    // Every call arrived, refused or not.
    let span = Duration::from_secs(60);
    assert_eq!(
        h.upstream
            .max_calls_in_any_span(BUSINESS, DEFAULT_APPID, span),
        4
    );
}

#[tokio::test]
async fn one_user_past_the_per_user_limit_leaves_the_appid_and_other_users_alone() {
    let config = StandInConfig {
        quota_per_window: Some(4),
        user_rate_limit: Some(per(2, 60)),
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    align_clock(&h.upstream, Duration::from_secs(60));
    let alice = [0, 1, 2].map(|_| h.upstream.issue_code("alice"));

    let first = h.exchange(&alice[0]).await;
    first.assert_session();
    let second = h.exchange(&alice[1]).await;
    second.assert_session();
    let refused = h.exchange(&alice[2]).await;
    refused.assert_error(45011);
    assert!(refused.text.contains("minute-quota"), "{}", refused.text);
    // One user, one openid and unionid; predictable.
    let openid = h.upstream.openid_of(DEFAULT_APPID, "alice");
    assert_eq!(first.json()["openid"], openid.as_str());
    assert_eq!(second.json()["openid"], openid.as_str());
    assert_eq!(
        first.json()["unionid"],
        h.upstream.unionid_of("alice").as_str()
    );

    // Alice's refused call did not count for the appid: two more calls fit in its 4.
    let bob = h.exchange(&h.upstream.issue_code("bob")).await;
    bob.assert_session();
    assert_ne!(bob.json()["openid"], openid.as_str());
    // A code that names no user is its own user's.
    h.exchange("code-anonymous").await.assert_session();
    // Now the appid's limit binds, for everyone.
    h.exchange(&h.upstream.issue_code("carol"))
        .await
        .assert_error(45011);

    // The next window serves alice again; with no per-user limit, any number.
    advance_clock(&h.upstream, Duration::from_secs(60));
    h.upstream.set_quota(None);
    h.exchange(&alice[2]).await.assert_session();
    h.upstream.set_user_rate_limit(None);
    for _ in 0..5 {
        let code = h.upstream.issue_code("alice");
        h.exchange(&code).await.assert_session();
    }
}

#[tokio::test]
async fn the_per_user_limit_defaults_to_wechats_100_a_minute() {
    let h = Harness::start(StandInConfig::default()).await;
    align_clock(&h.upstream, Duration::from_secs(60));
    for n in 0..100 {
        h.exchange(&format!("u7_{n}")).await.assert_session();
    }
    h.exchange("u7_100").await.assert_error(45011);
    h.exchange("u8_100").await.assert_session();
    let stats = h.get(STATS_PATH).await.json();
    assert_eq!(
        stats["user_rate_limit"],
        json!({"call_count": 100, "refresh_second": 60})
    );
}

#[tokio::test]
async fn calls_on_an_accounts_behalf_have_their_own_rate_limit_and_share_the_day() {
    let config = limited(vec![ApiLimits::new(BUSINESS)
        .with_rate_limit(per(1, 60))
        .with_component_rate_limit(per(2, 60))]);
    let h = Harness::start(config).await;
    let own = h.token().await;
    let on_behalf = h.authorizer_token().await;
    assert_ne!(own, on_behalf);
    align_clock(&h.upstream, Duration::from_secs(60));

    assert_eq!(h.business(&own).await, 0);
    assert_eq!(h.business(&own).await, 45011);
    assert_eq!(h.business(&on_behalf).await, 0);
    assert_eq!(h.business(&on_behalf).await, 0);
    assert_eq!(h.business(&on_behalf).await, 45011);
    assert_eq!(h.upstream.daily_used(BUSINESS, DEFAULT_APPID), 3);
    let log = h.upstream.call_log();
    assert!(log
        .iter()
        .filter(|record| record.path == BUSINESS)
        .all(|record| record.appid.as_deref() == Some(DEFAULT_APPID)));

    // A platform's own token on the account's API is the platform's own call.
    let platform_call = h
        .get(&format!(
            "{BUSINESS}?component_access_token={DEFAULT_COMPONENT_ACCESS_TOKEN}"
        ))
        .await;
    assert_eq!(platform_call.status, 200, "{}", platform_call.text);
    assert_eq!(h.upstream.daily_used(BUSINESS, DEFAULT_COMPONENT_APPID), 1);

    // The platform's code exchange is made on the account's behalf too.
    h.upstream
        .set_component_rate_limit(COMPONENT_JSCODE2SESSION_PATH, None, Some(per(1, 60)));
    let token = DEFAULT_COMPONENT_ACCESS_TOKEN;
    h.component_exchange(DEFAULT_APPID, token, "code-p1")
        .await
        .assert_session();
    h.component_exchange(DEFAULT_APPID, token, "code-p2")
        .await
        .assert_error(45011);
    // ... and the account's own exchange is not limited by it.
    h.exchange("code-p2").await.assert_session();
}

#[tokio::test]
async fn authorizer_tokens_need_an_authorized_account_and_a_platform_token() {
    let h = Harness::start(StandInConfig::default()).await;
    let body = |appid: &str, refresh: &str| {
        json!({
            "component_appid": DEFAULT_COMPONENT_APPID,
            "authorizer_appid": appid,
            "authorizer_refresh_token": refresh,
        })
    };
    let with = |token: &str| format!("{AUTHORIZER_TOKEN_PATH}?component_access_token={token}");
    let ok = h
        .post(
            &with(DEFAULT_COMPONENT_ACCESS_TOKEN),
            &body(DEFAULT_APPID, "r1"),
        )
        .await
        .json();
    assert_eq!(ok["authorizer_refresh_token"], "r1", "{ok}");
    assert_eq!(ok["expires_in"], 7200, "{ok}");
    let token = ok["authorizer_access_token"].as_str().unwrap();
    // It works where an account's token does.
    assert_eq!(h.use_token(token).await, 0);

    let cases = [
        (with("made-up"), body(DEFAULT_APPID, "r1"), 40001),
        (
            AUTHORIZER_TOKEN_PATH.to_owned(),
            body(DEFAULT_APPID, "r1"),
            41021,
        ),
        (
            with(DEFAULT_COMPONENT_ACCESS_TOKEN),
            body("wx-elsewhere", "r1"),
            61003,
        ),
        (
            with(DEFAULT_COMPONENT_ACCESS_TOKEN),
            body(DEFAULT_APPID, ""),
            61023,
        ),
    ];
    for (path, body, errcode) in cases {
        h.post(&path, &body).await.assert_error(errcode);
    }
    assert_eq!(
        h.upstream
            .token_fetches(AUTHORIZER_TOKEN_PATH, DEFAULT_APPID),
        1
    );
    assert_eq!(
        h.get(&with(DEFAULT_COMPONENT_ACCESS_TOKEN)).await.errcode(),
        Some(43002)
    );
}

#[tokio::test]
async fn the_span_helper_slides_where_aligned_windows_do_not() {
    let window = Duration::from_secs(10);
    let h = Harness::start(StandInConfig {
        window,
        ..StandInConfig::default()
    })
    .await;
    align_clock(&h.upstream, window);
    // Arrivals at 0, 6, 9 | 11, 14 s (a window boundary at 10 s), each a little later by
    // the time the calls take, which only widens the gaps.
    for (n, step) in [0, 6, 3, 2, 3].into_iter().enumerate() {
        advance_clock(&h.upstream, Duration::from_secs(step));
        h.exchange(&format!("code-s{n}")).await.assert_session();
    }
    assert_eq!(
        h.upstream
            .max_calls_in_any_window(DEFAULT_APPID, JSCODE2SESSION_PATH),
        3
    );
    let max = |span| {
        h.upstream
            .max_calls_in_any_span(JSCODE2SESSION_PATH, DEFAULT_APPID, span)
    };
    // 6 .. 14 s lies within one window's length, across the boundary.
    assert_eq!(max(window), 4);
    // 9 and 14 s are 5 s apart: not within a 5 s span.
    assert_eq!(max(Duration::from_secs(5)), 2);
    assert_eq!(max(window * 2), 5);
    let other = h
        .upstream
        .max_calls_in_any_span(JSCODE2SESSION_PATH, "wx-other", window);
    assert_eq!(other, 0);
    let other_path = h
        .upstream
        .max_calls_in_any_span(CHECKED_API_PATH, DEFAULT_APPID, window);
    assert_eq!(other_path, 0);
}

#[tokio::test]
async fn the_stats_page_lists_the_configured_limits() {
    let config = StandInConfig {
        api_limits: vec![
            ApiLimits::new(BUSINESS)
                .with_rate_limit(per(20, 3))
                .with_daily_limit(1000),
            ApiLimits::new(BUSINESS)
                .for_appid(DEFAULT_APPID)
                .with_component_rate_limit(per(5, 1)),
        ],
        user_rate_limit: None,
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    let stats = h.get(STATS_PATH).await.json();
    assert_eq!(
        stats["api_limits"],
        json!([
            {"path": BUSINESS, "appid": null, "rate_limit": {"call_count": 20, "refresh_second": 3},
             "component_rate_limit": null, "daily_limit": 1000},
            {"path": BUSINESS, "appid": DEFAULT_APPID, "rate_limit": null,
             "component_rate_limit": {"call_count": 5, "refresh_second": 1}, "daily_limit": null},
        ]),
        "{stats}"
    );
    assert_eq!(stats["user_rate_limit"], json!(null));
    assert_eq!(stats["quota_per_window"], json!(null));
    // Counts are kept only where a limit applies: not for the unlimited code exchange.
    h.exchange("code-x").await.assert_session();
    assert_eq!(h.get(STATS_PATH).await.json()["daily_used"], json!([]));
    assert_eq!(h.upstream.daily_used(JSCODE2SESSION_PATH, DEFAULT_APPID), 0);
}
