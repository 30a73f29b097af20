//! Requests that used to slip past their quota or their cache key, and upstream answers that
//! used to be remembered wrongly: each reproduced over real HTTP on loopback.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An upstream that answers its requests with the given answers in turn (the last one
/// again and again), and counts them.
struct Scripted {
    url: String,
    requests: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(answers: Vec<(&'static str, String)>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(answers));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answers, counted) = (answers.clone(), counted.clone());
                let service = service_fn(move |_request| {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    let answers = answers.lock().unwrap();
                    let (content_type, body) = answers[n.min(answers.len() - 1)].clone();
                    let response = http::Response::builder()
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Scripted { url, requests }
    }
}

const SESSION: &str = r#"{"session_key":"k","openid":"o"}"#;

async fn get(client: &reqwest::Client, url: String) -> (u16, String, String, Bytes) {
    let answer = client.get(url).send().await.unwrap();
    let header = |name: &str| {
        answer
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (cache, content_type) = (header("x-wxgate-cache"), header("content-type"));
    (
        answer.status().as_u16(),
        cache,
        content_type,
        answer.bytes().await.unwrap(),
    )
}

/// `200 {"message":"gateway busy"}` from a front end in the path is not WeChat's success: it is
/// passed through, not remembered (the retry goes upstream and gets the real answer), and
/// counted under the errcode label `unexpected`.
#[tokio::test]
async fn a_gateway_page_is_not_remembered_as_a_login() {
    let upstream = Scripted::start(vec![
        (
            "application/json",
            r#"{"message":"gateway busy, try again"}"#.into(),
        ),
        ("application/json; encoding=utf-8", SESSION.into()),
    ])
    .await;
    let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
    let client = client();
    let url = proxy.url(&jscode2session(APPID, SECRET, "code-gateway"));
    let (status, cache, _, body) = get(&client, url.clone()).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert!(String::from_utf8_lossy(&body).contains("gateway busy"));
    let (_, cache, _, body) = get(&client, url.clone()).await;
    assert_eq!(cache, "miss", "the gateway page was not remembered");
    assert_eq!(body, SESSION.as_bytes());
    let (_, cache, _, _) = get(&client, url).await;
    assert_eq!(cache, "hit", "the real success is");
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 2);
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_requests_total",
            &[("api", "/sns/jscode2session"), ("errcode", "unexpected")]
        ),
        1.0
    );
}

/// A success whose Content-Type is longer than 255 bytes is remembered, and replayed with it.
#[tokio::test]
async fn a_long_content_type_is_remembered_with_its_answer() {
    let content_type: &'static str =
        Box::leak(format!("application/json; {}x=y", "x=y; ".repeat(60)).into_boxed_str());
    let upstream = Scripted::start(vec![(content_type, SESSION.into())]).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
    let client = client();
    let url = proxy.url(&jscode2session(APPID, SECRET, "code-long-type"));
    let first = get(&client, url.clone()).await;
    let replay = get(&client, url).await;
    assert_eq!(replay.1, "hit");
    assert_eq!(replay.2, content_type);
    assert_eq!(replay.3, first.3);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}

/// The APIs that name their appid in a JSON body are limited by it: stable_token,
/// the platform's component token (by `component_appid`) and clear_quota.
#[tokio::test]
async fn appids_in_json_bodies_are_limited() {
    // The token cache off: token fetches are then calls like any other.
    let (upstream, proxy) = setup(
        "[quota]\nper_window = 3\nburst = 3\nmax_wait_ms = 50\n[token_cache]\nenabled = false\n",
    )
    .await;
    let client = client();
    let bodies = [
        (
            "/cgi-bin/stable_token",
            format!(
                r#"{{"grant_type":"client_credential","appid":"{APPID}","secret":"{SECRET}"}}"#
            ),
        ),
        (
            "/cgi-bin/component/api_component_token",
            format!(
                r#"{{"component_appid":"{COMPONENT_APPID}","component_appsecret":"s","component_verify_ticket":"t"}}"#
            ),
        ),
        ("/cgi-bin/clear_quota", format!(r#"{{"appid":"{APPID}"}}"#)),
    ];
    for (path, body) in bodies {
        let mut local = 0;
        for _ in 0..10 {
            let answer = client
                .post(proxy.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            if errcode(&answer.bytes().await.unwrap()) == 45011 {
                local += 1;
            }
        }
        assert_eq!(upstream.calls(path), 3, "{path}");
        assert_eq!(local, 7, "{path}");
    }
    // A body that names its appid twice, or is no JSON object, is refused.
    for body in [
        format!(r#"{{"appid":"{APPID}","appid":"wx00000000000000b2"}}"#),
        "appid=wx00000000000000a1".to_owned(),
    ] {
        let answer = client
            .post(proxy.url("/cgi-bin/stable_token"))
            .body(body)
            .send()
            .await
            .unwrap();
        let code = errcode(&answer.bytes().await.unwrap());
        assert!([40097, 47001].contains(&code), "{code}");
    }
    assert_eq!(upstream.calls("/cgi-bin/stable_token"), 3);
}

/// A parameter given twice is refused even when one copy is empty: `appid=&appid=A` could
/// otherwise be limited under no appid, and `js_code=&js_code=C` exchanged unchecked.
#[tokio::test]
async fn parameters_given_twice_are_refused_even_when_a_copy_is_empty() {
    let (upstream, proxy) = setup("").await;
    let client = client();
    for query in [
        format!("appid=&appid={APPID}&secret={SECRET}&js_code=c1&grant_type=authorization_code"),
        format!("appid={APPID}&secret={SECRET}&js_code=&js_code=c2&grant_type=authorization_code"),
    ] {
        let (status, _, _, body) =
            get(&client, proxy.url(&format!("/sns/jscode2session?{query}"))).await;
        assert_eq!((status, errcode(&body)), (200, 40097), "{query}");
    }
    let token =
        format!("/cgi-bin/token?grant_type=client_credential&appid=&appid={APPID}&secret={SECRET}");
    let (_, _, _, body) = get(&client, proxy.url(&token)).await;
    assert_eq!(errcode(&body), 40097);
    assert_eq!(upstream.total_calls(), 0);
}

/// A known API written with extra slashes or percent-encoding is that API: limited,
/// remembered, and forwarded under its documented path; a look-alike by case or `;`
/// parameters is refused.
#[tokio::test]
async fn path_variants_of_a_known_api_are_that_api() {
    let (upstream, proxy) = setup("[quota]\nper_window = 3\nburst = 3\nmax_wait_ms = 50\n").await;
    let client = client();
    let query = |code: &str| {
        format!("?appid={APPID}&secret={SECRET}&js_code={code}&grant_type=authorization_code")
    };
    let variants = [
        "//sns/jscode2session",
        "/sns/jscode2session/",
        "/sns//jscode2session",
        "/sns/jscode2sessio%6E",
    ];
    let mut limited = 0;
    for (i, variant) in variants.iter().cycle().take(10).enumerate() {
        let (_, _, _, body) = get(
            &client,
            proxy.url(&format!("{variant}{}", query(&format!("code-v{i}")))),
        )
        .await;
        if errcode(&body) == 45011 {
            limited += 1;
        }
    }
    assert_eq!(limited, 7, "the variants share the API's quota");
    assert_eq!(
        upstream.calls("/sns/jscode2session"),
        3,
        "forwarded under the documented path"
    );
    // Remembered under the API: a replay by another spelling is a hit.
    let (_, cache, _, body) = get(
        &client,
        proxy.url(&format!("/sns/jscode2session{}", query("code-v0"))),
    )
    .await;
    assert_eq!((cache.as_str(), errcode(&body)), ("hit", 0));
    for lookalike in ["/sns/jscode2session;x", "/SNS/jscode2session"] {
        let (status, _, _, body) = get(
            &client,
            proxy.url(&format!("{lookalike}{}", query("code-l"))),
        )
        .await;
        assert_eq!((status, errcode(&body)), (400, 40097), "{lookalike}");
    }
    assert_eq!(upstream.calls("/sns/jscode2session"), 3);
}

/// Secrets that differ only in bytes a lossy UTF-8 decoding would merge are different
/// secrets: they never share a code-exchange key.
#[tokio::test]
async fn secrets_differing_in_invalid_utf8_never_share_a_key() {
    let (upstream, proxy) = setup("").await;
    let client = client();
    for secret in ["X%ff", "X%fe", "X%EF%BF%BD"] {
        let path = format!(
            "/sns/jscode2session?appid={APPID}&secret={secret}&js_code=code-bytes&grant_type=authorization_code"
        );
        let (_, cache, _, body) = get(&client, proxy.url(&path)).await;
        assert_eq!(cache, "miss", "{secret}");
        assert_eq!(errcode(&body), 40125, "{secret}");
    }
    assert_eq!(upstream.code_calls("code-bytes"), 3);
}

/// wxgate answers the client's `Expect: 100-continue` itself (it reads the whole body before
/// forwarding); the header does not go upstream.
#[tokio::test]
async fn expect_100_continue_stays_local() {
    let (_upstream, proxy) = setup("").await;
    let answer = client()
        .post(proxy.url("/wxa/echo"))
        .header("expect", "100-continue")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echo: serde_json::Value = answer.json().await.unwrap();
    assert!(echo["headers"].get("expect").is_none(), "{echo}");
}
