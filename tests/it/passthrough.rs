//! The foundation over real HTTP on loopback: pass-through byte for byte, no open relay,
//! body limit, upstream faults, admin endpoints and metrics, h2c, graceful shutdown.

use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wxgate_stand_in::Fault;

const JSON: &str = "application/json; encoding=utf-8";

/// Sends raw bytes and reads the whole answer (the request asks for `Connection: close`).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn get_and_post_pass_through_byte_for_byte() {
    let (upstream, proxy) = setup("").await;
    let client = client();

    let via_proxy = client
        .get(proxy.url("/wxa/some/api?a=1&b=x%20y&access_token=AT"))
        .header("x-custom", "kept")
        .header("x-echo-content-type", "text/plain")
        .header("x-echo-status", "201")
        .send()
        .await
        .unwrap();
    assert_eq!(via_proxy.status(), 201);
    assert_eq!(via_proxy.headers()["content-type"], "text/plain");
    assert_eq!(via_proxy.headers()["x-echo-custom"], "stand-in");
    let echo: serde_json::Value = via_proxy.json().await.unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["uri"], "/wxa/some/api?a=1&b=x%20y&access_token=AT");
    assert_eq!(echo["headers"]["x-custom"], "kept");
    assert_eq!(
        echo["headers"]["host"],
        upstream.addr().to_string(),
        "the upstream's Host, not the proxy's"
    );

    // A POST body, arbitrary bytes, arrives and comes back exactly; the answer's body is the
    // stand-in's, byte for byte (compared with the same request sent directly).
    let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let send = |url: String| {
        client
            .post(url)
            .header("content-type", "application/octet-stream")
            .header("x-echo-content-type", JSON)
            .body(body.clone())
            .send()
    };
    let through = send(proxy.url("/cgi-bin/message/custom/send?access_token=AT"))
        .await
        .unwrap();
    assert_eq!(through.status(), 200);
    assert_eq!(through.headers()["content-type"], JSON);
    let through: serde_json::Value = through.json().await.unwrap();
    let direct: serde_json::Value = send(format!(
        "{}/cgi-bin/message/custom/send?access_token=AT",
        upstream.base_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(through["method"], "POST");
    assert_eq!(through["body_len"], 10_000);
    assert_eq!(through["body"], direct["body"]);
    assert_eq!(through["headers"]["content-length"], "10000");
    assert_eq!(
        through["headers"]["content-type"],
        "application/octet-stream"
    );

    // Byte for byte, also for a body that is not JSON at all.
    let stand_in_body = client
        .get(format!("{}/x", upstream.base_url()))
        .header("x-echo-content-type", "text/html")
        .send()
        .await
        .unwrap();
    let proxy_body = client
        .get(proxy.url("/x"))
        .header("x-echo-content-type", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(proxy_body.headers()["content-type"], "text/html");
    let a = stand_in_body.bytes().await.unwrap();
    let b = proxy_body.bytes().await.unwrap();
    // The echo names the Host it saw, which differs; everything else is identical.
    assert_eq!(a.len(), b.len());
    assert_eq!(upstream.calls("/x"), 2);
}

#[tokio::test]
async fn the_proxy_is_no_open_relay() {
    let (upstream, proxy) = setup("").await;

    // Absolute-form request target naming another host: the configured upstream gets it.
    let answer = raw(
        proxy.addr,
        b"GET http://evil.example/steal?x=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"uri\":\"/steal?x=1\""), "{answer}");
    assert_eq!(upstream.calls("/steal"), 1);

    // A path that looks like a scheme-relative URL stays a path on the upstream.
    let answer = raw(
        proxy.addr,
        b"GET //evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("\"uri\":\"//evil.example/x\""), "{answer}");
    assert_eq!(upstream.calls("//evil.example/x"), 1);

    // CONNECT and dot segments are refused locally, WeChat-shaped.
    let before = upstream.total_calls();
    let answer = raw(
        proxy.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"errcode\":40097"), "{answer}");
    let answer = raw(
        proxy.addr,
        b"GET /sns/../cgi-bin/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        upstream.total_calls(),
        before,
        "nothing refused went upstream"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (upstream, proxy) = setup("[server]\nmax_body_bytes = 1024\n").await;
    let client = client();

    let answer = client
        .post(proxy.url("/cgi-bin/stable_token"))
        .body(vec![b'x'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    assert_eq!(answer.headers()["content-type"], JSON);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], 47001);

    // Without a Content-Length (chunked), the limit holds while reading.
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 200]))),
    );
    let answer = client
        .post(proxy.url("/cgi-bin/stable_token"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);

    // At the limit is fine.
    let answer = client
        .post(proxy.url("/echo"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        upstream.total_calls(),
        1,
        "oversize bodies never went upstream"
    );
}

async fn wechat_error(answer: reqwest::Response, status: u16, reason: &str) {
    assert_eq!(answer.status(), status);
    assert_eq!(answer.headers()["content-type"], JSON);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], -1);
    assert_eq!(body["errmsg"], format!("system error (wxgate: {reason})"));
}

#[tokio::test]
async fn upstream_faults_get_the_documented_answers() {
    let (upstream, proxy) = setup("").await;
    let client = client();

    // An upstream 5xx passes through as it is.
    upstream.push_faults([Fault::BadGateway]);
    let answer = client.get(proxy.url("/any")).send().await.unwrap();
    assert_eq!(answer.status(), 502);
    let content_type = answer.headers()["content-type"].clone();
    assert!(content_type.to_str().unwrap().starts_with("text/html"));
    assert!(!answer.text().await.unwrap().contains("wxgate"));

    // A connection closed without an answer: 502, WeChat-shaped. The first reset is on the
    // connection kept alive from the call above: a GET may be sent twice, so it goes once
    // more on a new connection (the server may have been closing an idle connection), and
    // the reset there is final.
    upstream.push_faults([Fault::Reset, Fault::Reset]);
    let before = upstream.calls("/any");
    wechat_error(
        client.get(proxy.url("/any")).send().await.unwrap(),
        502,
        "upstream connection reset",
    )
    .await;
    assert_eq!(upstream.calls("/any"), before + 2);
    // A POST, which may not be sent twice, is not sent again.
    let answer = client.get(proxy.url("/any")).send().await.unwrap();
    assert_eq!(answer.status(), 200, "a connection to keep alive");
    upstream.push_faults([Fault::Reset]);
    wechat_error(
        client.post(proxy.url("/any")).send().await.unwrap(),
        502,
        "upstream closed a reused connection without answering",
    )
    .await;
    assert_eq!(upstream.calls("/any"), before + 4);

    // No answer within timeout_ms: 504.
    upstream.push_faults([Fault::Hang]);
    wechat_error(
        client.get(proxy.url("/any")).send().await.unwrap(),
        504,
        "upstream timed out",
    )
    .await;

    // Nothing listening upstream: 502 after the connect retries.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let proxy_to_nowhere =
        spawn_proxy(config(&config_text(&dead, "[retry]\nbusy_attempts = 1\n"))).await;
    wechat_error(
        client
            .get(proxy_to_nowhere.url("/any"))
            .send()
            .await
            .unwrap(),
        502,
        "upstream connection failed",
    )
    .await;
    let text = proxy_to_nowhere.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_transport_errors_total",
            &[("reason", "connect")]
        ),
        2.0,
        "one retry of a connection that could not be opened"
    );
    assert_eq!(
        metric(&text, "wxgate_retries_total", &[("reason", "transport")]),
        1.0
    );
}

#[tokio::test]
async fn admin_endpoints_and_metrics_match_the_traffic() {
    let (upstream, proxy) = setup("").await;
    let client = client();
    for _ in 0..3 {
        let answer = client
            .get(proxy.url("/some/other/api"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    for code in ["c1", "c2"] {
        let answer = client
            .get(proxy.url(&jscode2session(APPID, SECRET, code)))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let answer = client
        .get(proxy.url(&jscode2session(APPID, SECRET, "invalid-code")))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], 40029);
    // The first reset is on a kept-alive connection (sent again), the second final.
    upstream.push_faults([Fault::Reset, Fault::Reset]);
    client.get(proxy.url("/other")).send().await.unwrap();

    let health = client
        .get(format!("http://{}/healthz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = client
        .get(format!("http://{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let missing = client
        .get(format!("http://{}/nope", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // The proxy port does not serve metrics: /metrics there is just another upstream path.
    let on_proxy = client.get(proxy.url("/metrics")).send().await.unwrap();
    assert!(on_proxy.headers().contains_key("x-echo-custom"));

    let text = proxy.metrics().await;
    // Every sample line parses as `series value`.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (_, value) = line.rsplit_once(' ').expect("series and value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad sample {line}"));
    }
    let other_forwarded = [("api", "other"), ("outcome", "forwarded")];
    assert_eq!(
        metric(&text, "wxgate_requests_total", &other_forwarded),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_requests_total",
            &[("api", "other"), ("outcome", "upstream_error")]
        ),
        1.0
    );
    let exchanges = [("api", "/sns/jscode2session"), ("outcome", "forwarded")];
    assert_eq!(metric(&text, "wxgate_requests_total", &exchanges), 3.0);
    let api = [("api", "/sns/jscode2session")];
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_requests_total",
            &[api[0], ("errcode", "0")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_requests_total",
            &[api[0], ("errcode", "40029")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_requests_total",
            &[("api", "other"), ("errcode", "none")]
        ),
        0.0,
        "the echo answers JSON"
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_transport_errors_total",
            &[("reason", "reset")]
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "wxgate_request_duration_seconds_count", &api),
        3.0
    );
    assert_eq!(
        metric(&text, "wxgate_upstream_duration_seconds_count", &api),
        3.0
    );
    assert_eq!(metric(&text, "wxgate_inflight_requests", &[]), 0.0);
    assert_eq!(metric(&text, "wxgate_build_info", &[]), 1.0);
    assert!(metric(&text, "process_resident_memory_bytes", &[]) > 0.0);
    // No raw path ever becomes a label value.
    assert!(!text.contains("/some/other/api"));
    assert_eq!(upstream.calls("/some/other/api"), 3);
}

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let (_upstream, proxy) = setup("").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let answer = h2
        .get(proxy.url(&jscode2session(APPID, SECRET, "h2code")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(body["session_key"].is_string());
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let (upstream, proxy) = setup("[server]\nshutdown_grace_ms = 5000\n").await;
    upstream.push_faults([Fault::Delay(Duration::from_millis(700))]);
    let client = client();
    let url = proxy.url("/slow");
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    // Wait until the request has reached upstream, then ask wxgate to stop.
    while upstream.calls("/slow") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shutdown = tokio::spawn(proxy.shutdown());
    let answer = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains("/slow"));
    shutdown.await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}
