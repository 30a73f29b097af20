//! WeChat's endpoints as the stand-in plays them: single-use codes, parameter checks in
//! WeChat's order, third-party platforms, quotas over aligned windows, tokens.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::{
    advance_clock, align_clock_to_window, code_session, config_with_quota, query, Harness,
};
use crate::{
    StandInApp, StandInConfig, COMPONENT_JSCODE2SESSION_PATH, DEFAULT_APPID, DEFAULT_APP_SECRET,
    DEFAULT_COMPONENT_ACCESS_TOKEN, JSCODE2SESSION_PATH, JSON_CONTENT_TYPE, STABLE_TOKEN_PATH,
    STATS_PATH, TOKEN_PATH,
};

#[tokio::test]
async fn a_code_can_be_exchanged_once() {
    let h = Harness::start(StandInConfig::default()).await;

    let first = h.exchange("code-once").await;
    first.assert_session();
    assert!(first.json()["unionid"].is_string(), "{}", first.text);

    let second = h.exchange("code-once").await;
    second.assert_error(40163);
    assert!(second.text.contains("code been used"), "{}", second.text);

    assert_eq!(h.upstream.code_calls("code-once"), 2);
    assert_eq!(h.upstream.answers(0), 1);
    assert_eq!(h.upstream.answers(40163), 1);
}

#[tokio::test]
async fn concurrent_exchanges_of_one_code_succeed_once() {
    let h = Arc::new(Harness::start(StandInConfig::default()).await);
    let mut exchanges = JoinSet::new();
    for _ in 0..16 {
        let h = Arc::clone(&h);
        exchanges.spawn(async move { h.exchange("code-raced").await.errcode() });
    }
    let mut successes = 0;
    while let Some(errcode) = exchanges.join_next().await {
        match errcode.expect("exchange task") {
            None => successes += 1,
            Some(errcode) => assert_eq!(errcode, 40163),
        }
    }
    assert_eq!(successes, 1);
    assert_eq!(h.upstream.code_calls("code-raced"), 16);
}

#[tokio::test]
async fn openid_is_derived_from_the_code_and_session_key_is_fresh() {
    let h = Harness::start(StandInConfig::default()).await;
    let first = h.exchange("code-same-user").await.json();
    h.upstream.forget_used_codes();
    let again = h.exchange("code-same-user").await.json();
    let other = h.exchange("code-other-user").await.json();

    assert_eq!(first["openid"], again["openid"]);
    assert_eq!(first["unionid"], again["unionid"]);
    assert_ne!(first["session_key"], again["session_key"]);
    assert_ne!(first["openid"], other["openid"]);
}

#[tokio::test]
async fn invalid_and_risky_codes_are_refused() {
    let h = Harness::start(StandInConfig::default()).await;
    h.exchange("invalid-123").await.assert_error(40029);
    h.exchange("risky-123").await.assert_error(40226);
    assert_eq!(h.upstream.answers(0), 0);
}

#[tokio::test]
async fn code_session_checks_its_parameters_in_order() {
    let h = Harness::start(StandInConfig::default()).await;
    let grant = ("grant_type", "authorization_code");
    let cases: [(&[(&str, &str)], i64); 7] = [
        (&[("secret", "s"), ("js_code", "c"), grant], 41002),
        (
            &[("appid", ""), ("secret", "s"), ("js_code", "c"), grant],
            41002,
        ),
        (&[("appid", DEFAULT_APPID), ("js_code", "c"), grant], 41004),
        (&[("appid", DEFAULT_APPID), ("secret", "s"), grant], 41008),
        (
            &[("appid", DEFAULT_APPID), ("secret", "s"), ("js_code", "c")],
            40002,
        ),
        (
            &[
                ("appid", "wx-unknown"),
                ("secret", "s"),
                ("js_code", "c"),
                grant,
            ],
            40013,
        ),
        (
            &[
                ("appid", DEFAULT_APPID),
                ("secret", "wrong"),
                ("js_code", "c"),
                grant,
            ],
            40125,
        ),
    ];
    for (pairs, errcode) in cases {
        let reply = h
            .get(&format!("{JSCODE2SESSION_PATH}?{}", query(pairs)))
            .await;
        reply.assert_error(errcode);
    }
    // None of those spent the code.
    h.exchange("c").await.assert_session();
}

#[tokio::test]
async fn wrong_secret_is_40125_and_spends_nothing() {
    let h = Harness::start(StandInConfig::default()).await;
    h.get(&code_session(DEFAULT_APPID, "not-the-secret", "code-w"))
        .await
        .assert_error(40125);
    h.exchange("code-w").await.assert_session();
}

#[tokio::test]
async fn an_app_without_unionid_gets_none() {
    let mut config = StandInConfig::default();
    config.apps.push(StandInApp {
        appid: "wx-plain".to_owned(),
        secret: "plain-secret".to_owned(),
        unionid: false,
    });
    let h = Harness::start(config).await;
    let reply = h
        .get(&code_session("wx-plain", "plain-secret", "code-p"))
        .await;
    reply.assert_session();
    assert!(reply.json().get("unionid").is_none(), "{}", reply.text);
}

#[tokio::test]
async fn component_exchange_checks_the_platform_and_its_authorization() {
    let mut config = StandInConfig::default();
    config.apps.push(StandInApp {
        appid: "wx-not-authorized".to_owned(),
        secret: "secret".to_owned(),
        unionid: false,
    });
    let h = Harness::start(config).await;
    let token = DEFAULT_COMPONENT_ACCESS_TOKEN;

    h.component_exchange(DEFAULT_APPID, "", "code-c")
        .await
        .assert_error(41021);
    h.component_exchange(DEFAULT_APPID, "stale-token", "code-c")
        .await
        .assert_error(40001);
    h.component_exchange("wx-not-authorized", token, "code-c")
        .await
        .assert_error(61003);
    let unknown_platform = query(&[
        ("appid", DEFAULT_APPID),
        ("js_code", "code-c"),
        ("grant_type", "authorization_code"),
        ("component_appid", "wx-unknown-platform"),
        ("component_access_token", token),
    ]);
    h.get(&format!(
        "{COMPONENT_JSCODE2SESSION_PATH}?{unknown_platform}"
    ))
    .await
    .assert_error(40001);

    let reply = h.component_exchange(DEFAULT_APPID, token, "code-c").await;
    reply.assert_session();
    assert!(reply.json()["unionid"].is_string(), "{}", reply.text);
    // Both endpoints share the app's spent codes.
    h.exchange("code-c").await.assert_error(40163);
    assert_eq!(h.upstream.code_calls("code-c"), 6);
}

#[tokio::test]
async fn quota_refuses_with_45011_without_spending_the_code() {
    let h = Harness::start(config_with_quota(2)).await;
    align_clock_to_window(&h.upstream);

    h.exchange("code-q1").await.assert_session();
    h.exchange("code-q2").await.assert_session();
    let refused = h.exchange("code-q3").await;
    refused.assert_error(45011);
    assert!(refused.text.contains("minute-quota"), "{}", refused.text);

    // The quota is per path: the token endpoint of the same app still has its own.
    let token = query(&[
        ("grant_type", "client_credential"),
        ("appid", DEFAULT_APPID),
        ("secret", DEFAULT_APP_SECRET),
    ]);
    let token = h.get(&format!("{TOKEN_PATH}?{token}")).await;
    assert!(token.json()["access_token"].is_string(), "{}", token.text);

    // Raising the quota lets the refused code through: 45011 did not spend it.
    h.upstream.set_quota(Some(3));
    h.exchange("code-q3").await.assert_session();
    h.exchange("code-q4").await.assert_error(45011);
}

#[tokio::test]
async fn quota_starts_over_in_the_next_aligned_window() {
    let h = Harness::start(config_with_quota(1)).await;
    align_clock_to_window(&h.upstream);

    h.exchange("code-w1").await.assert_session();
    h.exchange("code-w2").await.assert_error(45011);
    advance_clock(&h.upstream, h.upstream.shared.limits.default_window);
    h.exchange("code-w2").await.assert_session();

    // Two calls arrived in the first window (one refused), one in the second.
    let max = h
        .upstream
        .max_calls_in_any_window(DEFAULT_APPID, JSCODE2SESSION_PATH);
    assert_eq!(max, 2);
    assert_eq!(
        h.upstream
            .max_calls_in_any_window("wx-other", JSCODE2SESSION_PATH),
        0
    );
}

#[tokio::test]
async fn calls_per_window_and_the_stats_page_count_what_each_window_received() {
    let h = Harness::start(config_with_quota(1)).await;
    align_clock_to_window(&h.upstream);
    h.exchange("code-s1").await.assert_session();
    h.exchange("code-s2").await.assert_error(45011);
    h.get("/echo?appid=wx-echo").await;
    advance_clock(&h.upstream, h.upstream.shared.limits.default_window);
    h.exchange("code-s2").await.assert_session();

    let windows = h.upstream.calls_per_window();
    let seen: Vec<(Option<&str>, &str, u64, u64)> = windows
        .iter()
        .map(|w| {
            (
                w.appid.as_deref(),
                w.path.as_str(),
                w.calls,
                w.answered_45011,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            // Within a window, by appid then path.
            (Some("wx-echo"), "/echo", 1, 0),
            (Some(DEFAULT_APPID), JSCODE2SESSION_PATH, 2, 1),
            (Some(DEFAULT_APPID), JSCODE2SESSION_PATH, 1, 0),
        ]
    );
    let window_ms = h.upstream.shared.limits.default_window.as_millis() as u64;
    assert_eq!(windows[0].start_unix_ms % window_ms, 0);
    assert_eq!(windows[0].start_unix_ms, windows[1].start_unix_ms);
    assert_eq!(
        windows[2].start_unix_ms,
        windows[0].start_unix_ms + window_ms
    );

    let stats = h.get(STATS_PATH).await;
    assert_eq!(stats.header("content-type"), JSON_CONTENT_TYPE);
    let stats = stats.json();
    assert_eq!(stats["quota_per_window"], 1);
    assert_eq!(stats["window_ms"], window_ms);
    assert_eq!(stats["total_calls"], 4, "the page itself is not counted");
    assert_eq!(stats["answers"]["0"], 2);
    assert_eq!(stats["answers"]["45011"], 1);
    assert_eq!(stats["windows"][2]["calls"], 1);
    assert_eq!(stats["windows"][1]["answered_45011"], 1);
    let now = stats["now_unix_ms"].as_u64().unwrap();
    assert!(now >= windows[2].start_unix_ms && now < windows[2].start_unix_ms + window_ms);
    assert_eq!(h.upstream.total_calls(), 4);
}

#[tokio::test]
async fn tokens_are_issued_and_checked() {
    let h = Harness::start(StandInConfig::default()).await;
    let credentials = |grant_type: &str, secret: &str| {
        let query = query(&[
            ("grant_type", grant_type),
            ("appid", DEFAULT_APPID),
            ("secret", secret),
        ]);
        format!("{TOKEN_PATH}?{query}")
    };
    let token = h
        .get(&credentials("client_credential", DEFAULT_APP_SECRET))
        .await;
    assert_eq!(token.header("content-type"), JSON_CONTENT_TYPE);
    assert_eq!(token.json()["expires_in"], 7200);
    let first = token.json()["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!first.is_empty(), "{}", token.text);
    let again = h
        .get(&credentials("client_credential", DEFAULT_APP_SECRET))
        .await;
    assert_ne!(again.json()["access_token"].as_str(), Some(first.as_str()));

    h.get(&credentials("authorization_code", DEFAULT_APP_SECRET))
        .await
        .assert_error(40002);
    h.get(&credentials("client_credential", "wrong"))
        .await
        .assert_error(40125);
    h.get(&format!(
        "{TOKEN_PATH}?grant_type=client_credential&secret=s"
    ))
    .await
    .assert_error(41002);
}

#[tokio::test]
async fn stable_token_reads_a_json_body() {
    let h = Harness::start(StandInConfig::default()).await;
    let url = format!("{}{STABLE_TOKEN_PATH}", h.upstream.base_url());
    let body = |secret: &str| {
        serde_json::json!({
            "grant_type": "client_credential",
            "appid": DEFAULT_APPID,
            "secret": secret,
            "force_refresh": false,
        })
        .to_string()
    };

    let token = h
        .send(h.client.post(&url).body(body(DEFAULT_APP_SECRET)))
        .await;
    assert!(token.json()["access_token"].is_string(), "{}", token.text);
    assert_eq!(token.json()["expires_in"], 7200);

    h.send(h.client.post(&url).body(body("wrong")))
        .await
        .assert_error(40125);
    h.send(h.client.post(&url).body("appid=not-json"))
        .await
        .assert_error(47001);
    h.send(h.client.get(&url)).await.assert_error(43002);

    let appids: Vec<Option<String>> = h
        .upstream
        .call_log()
        .into_iter()
        .map(|record| record.appid)
        .collect();
    let named = Some(DEFAULT_APPID.to_owned());
    assert_eq!(appids, [named.clone(), named, None, None]);
}
