//! HTTPS to the upstream, as wxgate speaks it to api.weixin.qq.com: against an HTTPS stand-in
//! whose certificate a test CA signed, trusted through `upstream.ca_file`.

use crate::support::tls::TestCa;
use crate::support::*;
use wxgate_stand_in::{StandIn, StandInTls};

/// An HTTPS stand-in serving `tls`.
async fn https_stand_in(tls: StandInTls) -> StandIn {
    stand_in(|config| config.tls = Some(tls)).await
}

/// `https://HOST:PORT` of the stand-in, by a name its certificate may hold (the stand-in
/// listens on 127.0.0.1, which `localhost` is).
fn https_url(upstream: &StandIn, host: &str) -> String {
    format!("https://{host}:{}", upstream.addr().port())
}

/// A wxgate in front of `base_url`, trusting `ca` when given.
async fn proxy_to(base_url: &str, ca: Option<&TestCa>) -> TestProxy {
    let extra = ca.map(TestCa::ca_file_key).unwrap_or_default();
    spawn_proxy(config(&config_text(base_url, &extra))).await
}

#[tokio::test]
async fn https_with_the_ca_file_answers_and_sends_the_servers_name() {
    let ca = TestCa::new();
    let upstream = https_stand_in(ca.leaf(&["localhost"])).await;
    let proxy = proxy_to(&https_url(&upstream, "localhost"), Some(&ca)).await;
    let client = client();

    let answer = client
        .get(proxy.url(&jscode2session(APPID, SECRET, "code-over-tls")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(body["session_key"].is_string(), "{body}");
    assert_eq!(upstream.code_calls("code-over-tls"), 1);
    // The handshake named the base URL's host (SNI), and so does `Host`.
    assert_eq!(upstream.server_names(), [Some("localhost".to_owned())]);
    let echo: serde_json::Value = client
        .get(proxy.url("/echo"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["host"],
        format!("localhost:{}", upstream.addr().port())
    );
}

#[tokio::test]
async fn several_calls_share_one_tls_connection() {
    let ca = TestCa::new();
    let upstream = https_stand_in(ca.leaf(&["localhost"])).await;
    let proxy = proxy_to(&https_url(&upstream, "localhost"), Some(&ca)).await;
    let client = client();
    for n in 0..5 {
        let answer = client
            .get(proxy.url(&format!("/cgi-bin/anything?n={n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(upstream.total_calls(), 5);
    assert_eq!(upstream.connections(), 1);
    assert_eq!(
        upstream.tls_connections(),
        1,
        "one handshake for five calls"
    );
}

/// Asserts a 502 WeChat-shaped refusal of the certificate, with `problem` in its errmsg and
/// nothing of the certificate or its key; and that no request reached the stand-in, the call
/// counted as a certificate failure and was not retried.
async fn assert_refused(upstream: &StandIn, proxy: &TestProxy, tls: &StandInTls, problem: &str) {
    let answer = client()
        .get(proxy.url("/cgi-bin/anything?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 502);
    assert_eq!(
        answer.headers()["content-type"],
        "application/json; encoding=utf-8"
    );
    let text = answer.text().await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["errcode"], -1);
    assert_eq!(
        body["errmsg"],
        format!("system error (wxgate: upstream TLS certificate refused: {problem})")
    );
    for secret in [
        "BEGIN",
        tls.private_key_pem.lines().nth(1).unwrap(),
        tls.certificate_chain_pem.lines().nth(1).unwrap(),
    ] {
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(upstream.total_calls(), 0, "no request was sent");
    assert!(upstream.connections() >= 1, "the handshake was tried");
    assert_eq!(upstream.tls_connections(), 0, "and never completed");
    let metrics = proxy.metrics().await;
    let certificate = [("api", "other"), ("reason", "certificate")];
    assert_eq!(
        metric(
            &metrics,
            "wxgate_upstream_transport_errors_total",
            &certificate
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "wxgate_retries_total", &[]),
        0.0,
        "a refused certificate is refused again: not retried"
    );
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let ca = TestCa::new();
    let tls = ca.leaf(&["other.example"]);
    let upstream = https_stand_in(tls.clone()).await;
    let proxy = proxy_to(&https_url(&upstream, "localhost"), Some(&ca)).await;
    assert_refused(
        &upstream,
        &proxy,
        &tls,
        "not valid for the upstream's host name",
    )
    .await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = TestCa::new();
    let tls = ca.expired_leaf(&["localhost"]);
    let upstream = https_stand_in(tls.clone()).await;
    let proxy = proxy_to(&https_url(&upstream, "localhost"), Some(&ca)).await;
    assert_refused(&upstream, &proxy, &tls, "expired or not yet valid").await;
}

#[tokio::test]
async fn without_the_ca_file_the_test_ca_is_not_trusted() {
    let ca = TestCa::new();
    let tls = ca.leaf(&["localhost"]);
    let upstream = https_stand_in(tls.clone()).await;
    // The webpki roots alone: Mozilla's authorities, not this test's.
    let proxy = proxy_to(&https_url(&upstream, "localhost"), None).await;
    assert_refused(&upstream, &proxy, &tls, "not issued by a trusted authority").await;
}
