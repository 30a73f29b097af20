//! Tokens over HTTP: lifetimes and the overlap as the checked API sees them, stable tokens,
//! platform tokens accepted by the platform's code exchange, fetches counted per appid.

use std::time::Duration;

use super::{advance_clock, Harness};
use crate::{
    StandInConfig, CHECKED_API_PATH, COMPONENT_TOKEN_PATH, DEFAULT_APPID, DEFAULT_APP_SECRET,
    DEFAULT_COMPONENT_APPID, DEFAULT_COMPONENT_APPSECRET, STABLE_TOKEN_PATH, TOKEN_PATH,
};

fn short_lived() -> StandInConfig {
    StandInConfig {
        token_lifetime: Duration::from_secs(100),
        token_overlap: Duration::from_secs(10),
        ..StandInConfig::default()
    }
}

#[tokio::test]
async fn a_token_works_until_the_overlap_after_the_next_fetch_or_its_expiry() {
    let h = Harness::start(short_lived()).await;
    let first = h.token().await;
    assert_eq!(h.use_token(&first).await, 0);
    advance_clock(&h.upstream, Duration::from_secs(50));
    let second = h.token().await;
    assert_ne!(first, second);
    assert_eq!(h.use_token(&first).await, 0, "within the overlap");
    advance_clock(&h.upstream, Duration::from_secs(10));
    assert_eq!(h.use_token(&first).await, 40001, "replaced");
    assert_eq!(h.use_token(&second).await, 0);
    advance_clock(&h.upstream, Duration::from_secs(90));
    assert_eq!(h.use_token(&second).await, 42001, "expired");
    assert_eq!(h.use_token("made-up").await, 40001);
    let missing = h.get(CHECKED_API_PATH).await;
    missing.assert_error(41001);
    assert_eq!(h.upstream.token_fetches(TOKEN_PATH, DEFAULT_APPID), 2);
}

#[tokio::test]
async fn stable_tokens_are_shared_and_forcing_is_spaced() {
    let h = Harness::start(short_lived()).await;
    let body = |force: bool| {
        serde_json::json!({
            "grant_type": "client_credential",
            "appid": DEFAULT_APPID,
            "secret": DEFAULT_APP_SECRET,
            "force_refresh": force,
        })
    };
    let first = h.post_json(STABLE_TOKEN_PATH, body(false)).await;
    let again = h.post_json(STABLE_TOKEN_PATH, body(false)).await;
    assert_eq!(first["access_token"], again["access_token"]);
    let forced = h.post_json(STABLE_TOKEN_PATH, body(true)).await;
    assert_ne!(forced["access_token"], first["access_token"]);
    let old = first["access_token"].as_str().unwrap();
    assert_eq!(
        h.use_token(old).await,
        40001,
        "forcing retires the previous token"
    );
    let spaced = h.post_json(STABLE_TOKEN_PATH, body(true)).await;
    assert_eq!(
        spaced["access_token"], forced["access_token"],
        "within 30 s"
    );
    assert_eq!(
        h.upstream.token_fetches(STABLE_TOKEN_PATH, DEFAULT_APPID),
        4
    );
}

#[tokio::test]
async fn a_platform_token_is_fetched_and_accepted_by_the_platform_exchange() {
    let h = Harness::start(short_lived()).await;
    let body = |secret: &str, ticket: &str| {
        serde_json::json!({
            "component_appid": DEFAULT_COMPONENT_APPID,
            "component_appsecret": secret,
            "component_verify_ticket": ticket,
        })
    };
    let wrong = h
        .post_json(COMPONENT_TOKEN_PATH, body("wrong", "ticket"))
        .await;
    assert_eq!(wrong["errcode"], 40125);
    let no_ticket = h
        .post_json(COMPONENT_TOKEN_PATH, body(DEFAULT_COMPONENT_APPSECRET, ""))
        .await;
    assert_eq!(no_ticket["errcode"], 61006);
    let fetched = h
        .post_json(
            COMPONENT_TOKEN_PATH,
            body(DEFAULT_COMPONENT_APPSECRET, "ticket"),
        )
        .await;
    assert_eq!(fetched["expires_in"], 100);
    let token = fetched["component_access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    h.component_exchange(DEFAULT_APPID, &token, "code-p")
        .await
        .assert_session();
    // A second fetch: the first token works for the overlap, then not.
    h.post_json(
        COMPONENT_TOKEN_PATH,
        body(DEFAULT_COMPONENT_APPSECRET, "ticket"),
    )
    .await;
    advance_clock(&h.upstream, Duration::from_secs(11));
    h.component_exchange(DEFAULT_APPID, &token, "code-q")
        .await
        .assert_error(40001);
    assert_eq!(
        h.upstream
            .token_fetches(COMPONENT_TOKEN_PATH, DEFAULT_COMPONENT_APPID),
        2
    );
}
