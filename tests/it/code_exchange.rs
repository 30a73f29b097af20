//! Code exchanges over real HTTP on loopback: coalescing, remembered answers, credential
//! isolation, a leader that goes away, transient answers, the bound, expiry, local
//! validation, for both code-exchange endpoints.

use std::time::Duration;

use crate::support::*;
use futures_util::future::join_all;
use tokio::io::AsyncWriteExt;
use wxgate_stand_in::Fault;

const JSON: &str = "application/json; encoding=utf-8";

/// The two endpoints, as (name, path for a code with the right credential, path with a
/// wrong credential, errcode WeChat gives the wrong one). Each gets its own code: WeChat's
/// codes are single-use across both.
fn endpoints(code: &str) -> [(&'static str, String, String, i64); 2] {
    let component_code = format!("{code}-component");
    let code_for_component = component_code.as_str();
    [
        (
            "/sns/jscode2session",
            jscode2session(APPID, SECRET, code),
            jscode2session(APPID, "wrong-secret", code),
            40125,
        ),
        (
            "/sns/component/jscode2session",
            component_jscode2session(APPID, COMPONENT_APPID, COMPONENT_TOKEN, code_for_component),
            component_jscode2session(APPID, COMPONENT_APPID, "wrong-token", code_for_component),
            40001,
        ),
    ]
}

struct Got {
    status: u16,
    cache: String,
    content_type: String,
    body: bytes::Bytes,
}

async fn get(client: &reqwest::Client, url: String) -> Got {
    let answer = client.get(url).send().await.unwrap();
    Got {
        status: answer.status().as_u16(),
        cache: answer
            .headers()
            .get("x-wxgate-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        content_type: answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned(),
        body: answer.bytes().await.unwrap(),
    }
}

#[tokio::test]
async fn fifty_identical_exchanges_make_one_upstream_call_and_replays_hit() {
    let (upstream, proxy) = setup("").await;
    upstream.set_latency(Duration::from_millis(300));
    let client = client();
    for (api, path, _, _) in endpoints("code-fifty") {
        let answers = join_all((0..50).map(|_| get(&client, proxy.url(&path)))).await;
        assert_eq!(
            upstream.calls(api),
            1,
            "{api}: one upstream call for 50 requests"
        );
        let first = &answers[0];
        assert_eq!(first.status, 200);
        assert!(std::str::from_utf8(&first.body)
            .unwrap()
            .contains("session_key"));
        for answer in &answers {
            assert_eq!(answer.body, first.body, "{api}: identical bodies");
            assert_eq!(answer.content_type, JSON);
        }
        let count = |label: &str| answers.iter().filter(|a| a.cache == label).count();
        assert_eq!(count("miss"), 1, "{api}");
        assert_eq!(count("coalesced") + count("hit"), 49, "{api}");
        assert!(
            count("coalesced") >= 1,
            "{api}: requests overlapped the call"
        );

        // A replay after completion: a hit, the same bytes, no upstream call.
        let replay = get(&client, proxy.url(&path)).await;
        assert_eq!(replay.cache, "hit");
        assert_eq!(replay.body, first.body);
        assert_eq!(replay.content_type, JSON);
        assert_eq!(upstream.calls(api), 1);
    }
    let text = proxy.metrics().await;
    assert!(metric(&text, "wxgate_requests_total", &[("outcome", "coalesced")]) >= 2.0);
    assert!(metric(&text, "wxgate_requests_total", &[("outcome", "cache_hit")]) >= 2.0);
    assert_eq!(metric(&text, "wxgate_requests_total", &[]), 102.0);
    assert_eq!(metric(&text, "wxgate_upstream_requests_total", &[]), 2.0);
    assert_eq!(metric(&text, "wxgate_code_cache_entries", &[]), 2.0);
}

#[tokio::test]
async fn another_credential_never_gets_the_remembered_session() {
    let (upstream, proxy) = setup("").await;
    let client = client();
    for (api, right, wrong, wrong_errcode) in endpoints("code-isolated") {
        let first = get(&client, proxy.url(&right)).await;
        assert_eq!(errcode(&first.body), 0);
        let other = get(&client, proxy.url(&wrong)).await;
        assert_eq!(
            other.cache, "miss",
            "{api}: a wrong credential goes upstream"
        );
        assert_eq!(
            errcode(&other.body),
            wrong_errcode,
            "{api}: WeChat's own answer"
        );
        assert!(!std::str::from_utf8(&other.body)
            .unwrap()
            .contains("session_key"));
        assert_eq!(upstream.calls(api), 2);
    }

    // Also while the right credential's exchange is in flight.
    upstream.set_latency(Duration::from_millis(300));
    for (api, right, wrong, wrong_errcode) in endpoints("code-isolated-in-flight") {
        let calls_before = upstream.calls(api);
        let (first, other) = tokio::join!(get(&client, proxy.url(&right)), async {
            // Sent once the right credential's call has reached upstream.
            while upstream.calls(api) == calls_before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            get(&client, proxy.url(&wrong)).await
        });
        assert_eq!(errcode(&first.body), 0, "{api}");
        assert_eq!(other.cache, "miss", "{api}");
        assert_eq!(errcode(&other.body), wrong_errcode, "{api}");
    }
}

#[tokio::test]
async fn the_first_caller_going_away_does_not_stop_the_call() {
    let (upstream, proxy) = setup("").await;
    upstream.set_latency(Duration::from_millis(400));
    let client = client();
    for (api, path, _, _) in endpoints("code-leader-gone") {
        // The first caller sends its request and hangs up at once.
        let mut leader = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        leader
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: wxgate\r\n\r\n").as_bytes())
            .await
            .unwrap();
        while upstream.calls(api) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(leader);
        // A second caller joins the call in flight and gets its answer.
        let follower = get(&client, proxy.url(&path)).await;
        assert_eq!(follower.cache, "coalesced", "{api}");
        assert_eq!(errcode(&follower.body), 0, "{api}");
        // And the answer is remembered.
        let replay = get(&client, proxy.url(&path)).await;
        assert_eq!(replay.cache, "hit", "{api}");
        assert_eq!(replay.body, follower.body);
        assert_eq!(upstream.calls(api), 1, "{api}");
    }

    // With nobody joining, the answer is remembered all the same.
    let path = jscode2session(APPID, SECRET, "code-leader-alone");
    let mut leader = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    leader
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: wxgate\r\n\r\n").as_bytes())
        .await
        .unwrap();
    while upstream.code_calls("code-leader-alone") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(leader);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = proxy.metrics().await;
        if metric(&text, "wxgate_code_cache_entries", &[]) == 3.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never remembered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replay = get(&client, proxy.url(&path)).await;
    assert_eq!(replay.cache, "hit");
    assert_eq!(errcode(&replay.body), 0);
    assert_eq!(upstream.code_calls("code-leader-alone"), 1);
}

#[tokio::test]
async fn transient_answers_are_not_remembered() {
    let (upstream, proxy) = setup("[retry]\nbusy_attempts = 0\n").await;
    let client = client();
    // A reset on the connection kept alive from the previous exchange is taken for a server
    // closing an idle connection: the exchange goes once more on a new connection, where the
    // second reset is final.
    for (faults, expected_status, expected_errcode) in [
        (&[Fault::Busy][..], 200, Some(-1)),
        (&[Fault::BadGateway], 502, None),
        (&[Fault::Reset, Fault::Reset], 502, Some(-1)),
        // Last: it blocks the key for the rest of WeChat's day.
        (&[Fault::DailyQuota], 200, Some(45009)),
    ] {
        let fault = faults[0];
        let code = format!("code-transient-{fault:?}");
        let path = jscode2session(APPID, SECRET, &code);
        upstream.push_faults(faults.iter().copied());
        let first = get(&client, proxy.url(&path)).await;
        assert_eq!(first.status, expected_status, "{fault:?}");
        if let Some(expected) = expected_errcode {
            assert_eq!(errcode(&first.body), expected, "{fault:?}");
        }
        let retry = get(&client, proxy.url(&path)).await;
        assert_eq!(retry.cache, "miss", "{fault:?}: not remembered");
        if fault == Fault::DailyQuota {
            // A spent daily quota: wxgate answers the key's calls itself until WeChat's day
            // ends (docs/guarantees.md, "Daily quotas"), without spending the code.
            assert_eq!(errcode(&retry.body), 45009, "{fault:?}");
            assert_eq!(upstream.code_calls(&code), 1, "{fault:?}");
            continue;
        }
        // The retry goes upstream and succeeds (the fault did not spend the code).
        assert_eq!(errcode(&retry.body), 0, "{fault:?}");
        assert_eq!(
            upstream.code_calls(&code),
            faults.len() as u64 + 1,
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn minute_quota_answers_are_not_remembered() {
    // A 45011 is held to the next (2 s) window and sent again, or, when the hold cannot
    // reach it, returned as it is; either way it is never replayed.
    let (upstream, proxy) =
        setup("[quota]\nwindow_secs = 2\n[retry]\nmax_hold_ms = 2000\nbusy_attempts = 0\n").await;
    let client = client();
    let path = jscode2session(APPID, SECRET, "code-45011");
    upstream.push_faults([Fault::MinuteQuota]);
    let first = get(&client, proxy.url(&path)).await;
    let final_answer = if errcode(&first.body) == 45011 {
        assert_eq!(upstream.code_calls("code-45011"), 1);
        let retry = get(&client, proxy.url(&path)).await;
        assert_eq!(retry.cache, "miss", "the 45011 was not remembered");
        retry
    } else {
        first
    };
    assert_eq!(errcode(&final_answer.body), 0);
    assert_eq!(upstream.code_calls("code-45011"), 2);
    let replay = get(&client, proxy.url(&path)).await;
    assert_eq!(replay.cache, "hit");
    assert_eq!(replay.body, final_answer.body);
}

#[tokio::test]
async fn the_bound_evicts_the_oldest_and_entries_expire() {
    let (upstream, proxy) = setup("[code_cache]\nmax_entries = 3\nttl_secs = 1\n").await;
    let client = client();
    let codes: Vec<String> = (1..=5).map(|i| format!("code-bound-{i}")).collect();
    for code in &codes {
        let answer = get(&client, proxy.url(&jscode2session(APPID, SECRET, code))).await;
        assert_eq!(errcode(&answer.body), 0);
    }
    assert_eq!(
        metric(&proxy.metrics().await, "wxgate_code_cache_entries", &[]),
        3.0,
        "the bound holds"
    );
    // The newest is remembered; the oldest was evicted, so its replay reaches WeChat, which
    // says the code was used.
    let newest = get(
        &client,
        proxy.url(&jscode2session(APPID, SECRET, &codes[4])),
    )
    .await;
    assert_eq!(newest.cache, "hit");
    let oldest = get(
        &client,
        proxy.url(&jscode2session(APPID, SECRET, &codes[0])),
    )
    .await;
    assert_eq!(oldest.cache, "miss");
    assert_eq!(errcode(&oldest.body), 40163);
    // The 40163 is definitive and remembered too.
    let again = get(
        &client,
        proxy.url(&jscode2session(APPID, SECRET, &codes[0])),
    )
    .await;
    assert_eq!(again.cache, "hit");
    assert_eq!(errcode(&again.body), 40163);

    // Entries expire on time even when never read again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(&proxy.metrics().await, "wxgate_code_cache_entries", &[]) > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "entries never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = get(
        &client,
        proxy.url(&jscode2session(APPID, SECRET, &codes[4])),
    )
    .await;
    assert_eq!(expired.cache, "miss");
    assert_eq!(errcode(&expired.body), 40163);
    assert_eq!(upstream.code_calls(&codes[4]), 2);
}

#[tokio::test]
async fn extra_parameters_are_forwarded_and_not_part_of_the_key() {
    let (upstream, proxy) = setup("").await;
    let client = client();
    let path = jscode2session(APPID, SECRET, "code-extra");
    let first = get(&client, proxy.url(&format!("{path}&access_token=one"))).await;
    assert_eq!(errcode(&first.body), 0);
    let second = get(&client, proxy.url(&format!("{path}&access_token=two"))).await;
    assert_eq!(second.cache, "hit");
    assert_eq!(second.body, first.body);
    assert_eq!(upstream.code_calls("code-extra"), 1);
}

#[tokio::test]
async fn requests_that_cannot_succeed_are_answered_locally() {
    let (upstream, proxy) = setup("").await;
    let client = client();
    let long_code = "a".repeat(200);
    let cases: Vec<(String, i64)> = vec![
        ("/sns/jscode2session?secret=s&js_code=c&grant_type=authorization_code".into(), 41002),
        (format!("/sns/jscode2session?appid={APPID}&js_code=c&grant_type=authorization_code"), 41004),
        (format!("/sns/jscode2session?appid={APPID}&secret=s&grant_type=authorization_code"), 41008),
        (format!("/sns/jscode2session?appid={APPID}&secret=s&js_code=&grant_type=authorization_code"), 41008),
        (format!("/sns/jscode2session?appid={APPID}&secret=s&js_code=c"), 40002),
        (format!("/sns/jscode2session?appid={APPID}&secret=s&js_code=c&grant_type=client_credential"), 40002),
        (jscode2session(APPID, "s", &long_code), 40029),
        (jscode2session(APPID, "s", "bad%00byte"), 40029),
        (jscode2session("wx%20evil", "s", "c"), 40013),
        (jscode2session(&"w".repeat(100), "s", "c"), 40013),
        (format!("{}&appid=again", jscode2session(APPID, "s", "c")), 40097),
        (
            format!("/sns/component/jscode2session?appid={APPID}&js_code=c&grant_type=authorization_code&component_appid={COMPONENT_APPID}"),
            41021,
        ),
        (
            format!("/sns/component/jscode2session?appid={APPID}&js_code=c&grant_type=authorization_code&component_access_token=t"),
            41002,
        ),
    ];
    for (path, expected) in &cases {
        let answer = get(&client, proxy.url(path)).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.content_type, JSON, "{path}");
        assert_eq!(errcode(&answer.body), *expected, "{path}");
        let text = std::str::from_utf8(&answer.body).unwrap();
        assert!(text.contains("wxgate"), "{path}: says who answered: {text}");
        assert!(!text.contains(&long_code));
    }
    assert_eq!(upstream.total_calls(), 0, "nothing was forwarded");
    let text = proxy.metrics().await;
    assert_eq!(
        metric(&text, "wxgate_requests_total", &[("outcome", "rejected")]),
        cases.len() as f64
    );
}

/// A call that is dropped before it ends (here: its runtime shuts down under it) frees its
/// slot and answers whoever waits for it, instead of leaving them waiting for ever.
#[tokio::test]
async fn a_call_dropped_unfinished_answers_its_followers_and_frees_the_code() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use std::sync::Arc;
    use wxgate::{Proxy, CACHE_HEADER};

    let upstream = stand_in(|_| {}).await;
    upstream.set_latency(Duration::from_millis(1500));
    let config = config(&config_text(&upstream.base_url(), ""));
    let registry = prometheus::Registry::new();
    let metrics = wxgate::Metrics::new(&registry).unwrap();
    let proxy = Arc::new(Proxy::new(&config, metrics).unwrap());
    let path = jscode2session(APPID, SECRET, "code-dropped");
    let request = || {
        http::Request::get(path.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // The leader runs on a runtime of its own, which is then shut down mid-call.
    let leader_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    leader_runtime.spawn(proxy.clone().handle(request()));
    while upstream.code_calls("code-dropped") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let follower = tokio::spawn(proxy.clone().handle(request()));
    // The follower has joined once it counts among the requests in flight.
    let inflight = || {
        registry
            .gather()
            .iter()
            .find(|family| family.name() == "wxgate_inflight_requests")
            .map_or(0.0, |family| family.get_metric()[0].get_gauge().get_value())
    };
    while inflight() < 2.0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    leader_runtime.shutdown_background();

    let answer = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the follower is answered, not left waiting")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.headers()[CACHE_HEADER], "coalesced");
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(errcode(&body), -1);

    // The code is not stuck "in flight": the next caller makes a call of its own.
    upstream.set_latency(Duration::ZERO);
    let again = proxy.clone().handle(request()).await.unwrap();
    assert_eq!(again.headers()[CACHE_HEADER], "miss");
    assert_eq!(upstream.code_calls("code-dropped"), 2);
}
