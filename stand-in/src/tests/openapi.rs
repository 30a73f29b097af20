//! quota/get and the `clear_quota` calls over HTTP: what quota/get reports and refuses,
//! clears restoring a day's service, their monthly budget, and their credential checks.

use std::time::Duration;

use serde_json::{json, Value};

use super::{advance_clock, align_clock, Harness};
use crate::{
    ApiLimits, RateLimit, StandInConfig, CHECKED_API_PATH, CLEAR_QUOTA_PATH, CLEAR_QUOTA_V2_PATH,
    COMPONENT_CLEAR_QUOTA_PATH, COMPONENT_TOKEN_PATH, DEFAULT_APPID, DEFAULT_APP_SECRET,
    DEFAULT_COMPONENT_ACCESS_TOKEN, DEFAULT_COMPONENT_APPID, DEFAULT_COMPONENT_APPSECRET,
    QUOTA_GET_PATH, TOKEN_PATH, UNLIMITED_FIGURE,
};

const BUSINESS: &str = "/wxa/business/getuserphonenumber";

impl Harness {
    async fn quota_get(&self, token: &str, body: Value) -> super::Reply {
        self.post(&format!("{QUOTA_GET_PATH}?access_token={token}"), &body)
            .await
    }

    async fn clear_quota(&self, token: &str) -> super::Reply {
        let body = json!({ "appid": DEFAULT_APPID });
        self.post(&format!("{CLEAR_QUOTA_PATH}?access_token={token}"), &body)
            .await
    }
}

#[tokio::test]
async fn quota_get_reports_the_configured_figures_and_todays_use() {
    let config = StandInConfig {
        quota_per_window: Some(50),
        api_limits: vec![ApiLimits::new(BUSINESS)
            .with_rate_limit(RateLimit::new(20, Duration::from_secs(3)))
            .with_component_rate_limit(RateLimit::new(5, Duration::from_secs(1)))
            .with_daily_limit(100)],
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    let token = h.token().await;
    for _ in 0..3 {
        let reply = h.get(&format!("{BUSINESS}?access_token={token}")).await;
        assert_eq!(reply.status, 200);
    }

    let reply = h.quota_get(&token, json!({ "cgi_path": BUSINESS })).await;
    assert_eq!(
        reply.json(),
        json!({
            "errcode": 0, "errmsg": "ok",
            "quota": {"daily_limit": 100, "used": 3, "remain": 97},
            "rate_limit": {"call_count": 20, "refresh_second": 3},
            "component_rate_limit": {"call_count": 5, "refresh_second": 1},
        })
    );
    assert_eq!(h.upstream.daily_used(BUSINESS, DEFAULT_APPID), 3);

    // One of the stand-in's own APIs: the default quota and no daily limit.
    let token_quota = h
        .quota_get(&token, json!({ "cgi_path": TOKEN_PATH }))
        .await
        .json();
    assert_eq!(
        token_quota["rate_limit"],
        json!({"call_count": 50, "refresh_second": 60})
    );
    assert_eq!(
        token_quota["component_rate_limit"],
        token_quota["rate_limit"]
    );
    assert_eq!(token_quota["quota"]["daily_limit"], UNLIMITED_FIGURE);
    assert_eq!(token_quota["quota"]["used"], 1, "the fetch above");
    // An API of its own that nothing limits.
    let unlimited = h
        .quota_get(&token, json!({ "cgi_path": CHECKED_API_PATH }))
        .await
        .json();
    assert_eq!(unlimited["rate_limit"]["call_count"], UNLIMITED_FIGURE);
    assert_eq!(unlimited["quota"]["remain"], UNLIMITED_FIGURE);
}

#[tokio::test]
async fn quota_get_refuses_sns_unknown_and_malformed_paths_and_bad_tokens() {
    let h = Harness::start(StandInConfig {
        token_lifetime: Duration::from_secs(100),
        ..StandInConfig::default()
    })
    .await;
    let token = h.token().await;
    let cases = [
        ("/sns/jscode2session", 76022),
        ("/sns/component/jscode2session", 76022),
        ("/sns/anything", 76022),
        ("/wxa/unknown", 76021),
        ("wxa/business", 76003),
        ("https://api.weixin.qq.com/cgi-bin/token", 76003),
    ];
    for (cgi_path, errcode) in cases {
        let reply = h.quota_get(&token, json!({ "cgi_path": cgi_path })).await;
        reply.assert_error(errcode);
    }
    let sns = h
        .quota_get(&token, json!({ "cgi_path": "/sns/jscode2session" }))
        .await;
    assert!(sns.text.contains("no permission"), "{}", sns.text);

    let url = format!(
        "{}{QUOTA_GET_PATH}?access_token={token}",
        h.upstream.base_url()
    );
    for body in ["", "cgi_path=/wxa/x", "[]", r#"{"cgi_path":1}"#, "{}"] {
        let reply = h.send(h.client.post(&url).body(body)).await;
        reply.assert_error(47001);
    }
    h.send(h.client.get(&url)).await.assert_error(43002);

    let body = json!({ "cgi_path": TOKEN_PATH });
    h.post(QUOTA_GET_PATH, &body).await.assert_error(41001);
    h.quota_get("made-up", body.clone())
        .await
        .assert_error(40001);
    // A platform's own token is not an account's.
    h.quota_get(DEFAULT_COMPONENT_ACCESS_TOKEN, body.clone())
        .await
        .assert_error(40001);
    advance_clock(&h.upstream, Duration::from_secs(100));
    h.quota_get(&token, body).await.assert_error(42001);
}

#[tokio::test]
async fn quota_get_is_an_api_with_its_own_limits() {
    let config = StandInConfig {
        api_limits: vec![ApiLimits::new(QUOTA_GET_PATH)
            .with_rate_limit(RateLimit::new(2, Duration::from_secs(60)))],
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    let token = h.token().await;
    align_clock(&h.upstream, Duration::from_secs(60));
    let body = json!({ "cgi_path": QUOTA_GET_PATH });
    assert_eq!(h.quota_get(&token, body.clone()).await.errcode(), Some(0));
    let second = h.quota_get(&token, body.clone()).await.json();
    // It reports itself, the call asking included.
    assert_eq!(second["quota"]["used"], 2, "{second}");
    assert_eq!(second["rate_limit"]["call_count"], 2, "{second}");
    h.quota_get(&token, body).await.assert_error(45011);
    h.quota_get(&token, json!({ "cgi_path": "/sns/jscode2session" }))
        .await
        .assert_error(45011);
    // Every query that reached it with a working token, refused or not, per key.
    assert_eq!(h.upstream.quota_queries(QUOTA_GET_PATH, DEFAULT_APPID), 3);
    assert_eq!(
        h.upstream
            .quota_queries("/sns/jscode2session", DEFAULT_APPID),
        1
    );
    h.quota_get("made-up", json!({ "cgi_path": QUOTA_GET_PATH }))
        .await
        .assert_error(40001);
    assert_eq!(h.upstream.quota_queries(QUOTA_GET_PATH, DEFAULT_APPID), 3);
}

#[tokio::test]
async fn clear_quota_restores_the_day_ten_times_a_month() {
    let day = Duration::from_secs(60);
    let config = StandInConfig {
        day,
        api_limits: vec![ApiLimits::new(CHECKED_API_PATH).with_daily_limit(1)],
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    let token = h.token().await;
    align_clock(&h.upstream, day);

    for clear in 1..=10 {
        assert_eq!(h.use_token(&token).await, 0);
        assert_eq!(h.use_token(&token).await, 45009);
        let cleared = h.clear_quota(&token).await;
        assert_eq!(cleared.json(), json!({"errcode": 0, "errmsg": "ok"}));
        assert_eq!(h.upstream.clears_this_month(DEFAULT_APPID), clear);
    }
    assert_eq!(h.use_token(&token).await, 0);
    let refused = h.clear_quota(&token).await;
    refused.assert_error(48006);
    assert!(
        refused.text.contains("forbid to clear quota"),
        "{}",
        refused.text
    );
    // Nor with the secret: the month's clears are the account's, whichever the endpoint.
    let v2 = json!({ "appid": DEFAULT_APPID, "appsecret": DEFAULT_APP_SECRET });
    h.post(CLEAR_QUOTA_V2_PATH, &v2).await.assert_error(48006);
    assert_eq!(h.use_token(&token).await, 45009);

    // Any date plus 31 days is in a later month. (The token outlives it: 7200 s.)
    advance_clock(&h.upstream, day * 31);
    assert_eq!(h.upstream.clears_this_month(DEFAULT_APPID), 0);
    assert_eq!(h.use_token(&token).await, 0);
    assert_eq!(h.use_token(&token).await, 45009);
    let v2_reply = h.post(CLEAR_QUOTA_V2_PATH, &v2).await;
    assert_eq!(v2_reply.errcode(), Some(0), "{}", v2_reply.text);
    assert_eq!(h.use_token(&token).await, 0);
}

#[tokio::test]
async fn clear_quota_checks_its_credentials() {
    let h = Harness::start(StandInConfig::default()).await;
    let token = h.token().await;
    let with_token = format!("{CLEAR_QUOTA_PATH}?access_token={token}");
    h.post(&with_token, &json!({})).await.assert_error(41002);
    h.post(&with_token, &json!({ "appid": "wx-other" }))
        .await
        .assert_error(40013);
    h.post(CLEAR_QUOTA_PATH, &json!({ "appid": DEFAULT_APPID }))
        .await
        .assert_error(41001);
    let url = format!("{}{with_token}", h.upstream.base_url());
    h.send(h.client.post(&url).body("appid=wx"))
        .await
        .assert_error(47001);
    h.send(h.client.get(&url)).await.assert_error(43002);

    let v2 = |appid: &str, secret: &str| json!({ "appid": appid, "appsecret": secret });
    let cases = [
        (json!({ "appsecret": DEFAULT_APP_SECRET }), 41002),
        (json!({ "appid": DEFAULT_APPID }), 41004),
        (v2("wx-unknown", DEFAULT_APP_SECRET), 40013),
        (v2(DEFAULT_APPID, "wrong"), 40125),
    ];
    for (body, errcode) in cases {
        h.post(CLEAR_QUOTA_V2_PATH, &body)
            .await
            .assert_error(errcode);
    }
    // None of the refused calls used a clear.
    assert_eq!(h.upstream.clears_this_month(DEFAULT_APPID), 0);
}

#[tokio::test]
async fn a_platform_clears_its_own_quota_with_its_token() {
    let config = StandInConfig {
        api_limits: vec![ApiLimits::new(COMPONENT_TOKEN_PATH).with_daily_limit(1)],
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    let fetch = json!({
        "component_appid": DEFAULT_COMPONENT_APPID,
        "component_appsecret": DEFAULT_COMPONENT_APPSECRET,
        "component_verify_ticket": "ticket",
    });
    let fetched = h.post_json(COMPONENT_TOKEN_PATH, fetch.clone()).await;
    let minted = fetched["component_access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        h.post_json(COMPONENT_TOKEN_PATH, fetch.clone()).await["errcode"],
        45009
    );

    let clear = json!({ "component_appid": DEFAULT_COMPONENT_APPID });
    let with = |token: &str| format!("{COMPONENT_CLEAR_QUOTA_PATH}?component_access_token={token}");
    h.post(&with("made-up"), &clear).await.assert_error(40001);
    h.post(COMPONENT_CLEAR_QUOTA_PATH, &clear)
        .await
        .assert_error(41021);
    h.post(&with(&minted), &json!({})).await.assert_error(41002);
    // A minted token and the configured one both work.
    let cleared = h.post(&with(&minted), &clear).await;
    assert_eq!(cleared.errcode(), Some(0), "{}", cleared.text);
    assert!(
        h.post_json(COMPONENT_TOKEN_PATH, fetch.clone()).await["component_access_token"]
            .is_string()
    );
    let cleared = h.post(&with(DEFAULT_COMPONENT_ACCESS_TOKEN), &clear).await;
    assert_eq!(cleared.errcode(), Some(0), "{}", cleared.text);
    assert_eq!(h.upstream.clears_this_month(DEFAULT_COMPONENT_APPID), 2);
    assert_eq!(h.upstream.clears_this_month(DEFAULT_APPID), 0);
}
