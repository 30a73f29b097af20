//! The stand-in as a server: injected faults, latency, the echo of other paths, HTTP/2, the
//! counters and the call log, and stopping on drop.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{code_session, raw_call, Harness};
use crate::{
    Fault, FaultMix, StandIn, StandInConfig, DEFAULT_APPID, DEFAULT_APP_SECRET,
    JSCODE2SESSION_PATH, JSON_CONTENT_TYPE, STATS_PATH,
};

#[tokio::test]
async fn json_faults_answer_in_order_and_spend_nothing() {
    let h = Harness::start(StandInConfig::default()).await;
    h.upstream
        .push_faults([Fault::Busy, Fault::MinuteQuota, Fault::DailyQuota]);
    h.upstream.push_faults([Fault::BadGateway]);
    assert_eq!(h.upstream.pending_faults(), 4);

    h.exchange("code-f").await.assert_error(-1);
    h.exchange("code-f").await.assert_error(45011);
    let daily = h.exchange("code-f").await;
    daily.assert_error(45009);
    assert!(daily.text.contains("daily quota"), "{}", daily.text);
    let bad_gateway = h.exchange("code-f").await;
    assert_eq!(bad_gateway.status, 502);
    assert_eq!(bad_gateway.header("content-type"), "text/html");
    assert!(bad_gateway.text.contains("502 Bad Gateway"));
    // The queue is empty and the code was never spent.
    assert_eq!(h.upstream.pending_faults(), 0);
    h.exchange("code-f").await.assert_session();

    let errcodes: Vec<Option<i64>> = h
        .upstream
        .call_log()
        .iter()
        .map(|record| record.errcode)
        .collect();
    assert_eq!(
        errcodes,
        [Some(-1), Some(45011), Some(45009), None, Some(0)]
    );
    assert_eq!(h.upstream.code_calls("code-f"), 5);
}

#[tokio::test]
async fn reset_closes_the_connection_without_spending_the_code() {
    let h = Harness::start(StandInConfig::default()).await;
    let path = code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, "code-r");

    h.upstream.push_faults([Fault::Reset]);
    let answer = raw_call(h.upstream.addr(), &path).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // The same raw call without a fault is answered, and the code was still unspent.
    let answer = raw_call(h.upstream.addr(), &path).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("session_key"), "{answer}");
    assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 2);
}

#[tokio::test]
async fn lost_answer_spends_the_code_but_answers_nothing() {
    let h = Harness::start(StandInConfig::default()).await;
    h.upstream.push_faults([Fault::LostAnswer]);
    let path = code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, "code-l");
    let answer = raw_call(h.upstream.addr(), &path).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    h.exchange("code-l").await.assert_error(40163);
    assert_eq!(h.upstream.answers(0), 0);
}

#[tokio::test]
async fn hang_keeps_the_call_pending_until_the_client_gives_up() {
    let h = Harness::start(StandInConfig::default()).await;
    h.upstream.push_faults([Fault::Hang]);
    let url = format!(
        "{}{}",
        h.upstream.base_url(),
        code_session(DEFAULT_APPID, DEFAULT_APP_SECRET, "code-h")
    );
    let error = h
        .client
        .get(url)
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .expect_err("a hung call is never answered");
    assert!(error.is_timeout(), "{error}");

    // Other calls are not held up, and the hung one spent nothing.
    h.exchange("code-h").await.assert_session();
    assert_eq!(h.upstream.code_calls("code-h"), 2);
}

#[tokio::test]
async fn calls_that_find_no_queued_fault_draw_one_from_the_mix() {
    let config = StandInConfig {
        random_faults: "busy=1".parse().expect("a mix"),
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    // A queued fault comes first; the mix faults every other call.
    h.upstream.push_faults([Fault::BadGateway]);
    assert_eq!(h.exchange("code-m").await.status, 502);
    h.exchange("code-m").await.assert_error(-1);
    h.exchange("code-m").await.assert_error(-1);
    assert_eq!(h.upstream.code_calls("code-m"), 3);

    let injected = h.upstream.injected_faults();
    assert_eq!(injected.get("bad-gateway"), Some(&1));
    assert_eq!(injected.get("busy"), Some(&2));
    // The stats page is not a call, so it is not faulted, and it counts the faults.
    let stats = h.get(STATS_PATH).await.json();
    assert_eq!(stats["faults"]["busy"], 2, "{stats}");
    assert_eq!(stats["faults"]["bad-gateway"], 1, "{stats}");
    assert_eq!(stats["answers"]["-1"], 2, "{stats}");

    h.upstream.reset_counters();
    assert!(h.upstream.injected_faults().is_empty());
}

#[test]
fn a_fault_mix_reads_as_the_command_line_writes_it() {
    let mix: FaultMix = "busy=0.02, reset=0.005,hang=0.001,delay:1500=0.003,lost-answer=0.001,\
                         minute-quota=0.0002,daily-quota=0.001,bad-gateway=0.004"
        .parse()
        .expect("a mix");
    let expected = FaultMix::new([
        (Fault::Busy, 0.02),
        (Fault::Reset, 0.005),
        (Fault::Hang, 0.001),
        (Fault::Delay(Duration::from_millis(1500)), 0.003),
        (Fault::LostAnswer, 0.001),
        (Fault::MinuteQuota, 0.0002),
        (Fault::DailyQuota, 0.001),
        (Fault::BadGateway, 0.004),
    ])
    .expect("a mix");
    assert_eq!(mix, expected);
    assert_eq!(mix.to_string().parse::<FaultMix>(), Ok(expected));
    assert!("".parse::<FaultMix>().expect("no faults").is_empty());
    assert_eq!(FaultMix::default().to_string(), "none");
    assert!(FaultMix::new([(Fault::Busy, 0.7), (Fault::Reset, 0.4)]).is_err());
    assert!(FaultMix::new([(Fault::Busy, f64::NAN)]).is_err());
}

#[test]
fn a_fault_mix_faults_calls_in_its_proportions() {
    let mix = FaultMix::new([(Fault::Busy, 0.3), (Fault::Reset, 0.1)]).expect("a mix");
    let draws = 20_000;
    let (mut busy, mut reset, mut none) = (0, 0, 0);
    for _ in 0..draws {
        match mix.draw() {
            Some(Fault::Busy) => busy += 1,
            Some(Fault::Reset) => reset += 1,
            None => none += 1,
            Some(other) => panic!("{other:?} is not in the mix"),
        }
    }
    // Binomial: a deviation of 0.03 is more than 9 standard deviations at 20,000 draws.
    let share = |count: i32| f64::from(count) / f64::from(draws);
    assert!((share(busy) - 0.3).abs() < 0.03, "busy {busy}");
    assert!((share(reset) - 0.1).abs() < 0.03, "reset {reset}");
    assert!((share(none) - 0.6).abs() < 0.03, "none {none}");
    assert_eq!(FaultMix::default().draw(), None);
}

#[tokio::test]
async fn delay_and_latency_hold_the_answer_back() {
    let h = Harness::start(StandInConfig::default()).await;

    h.upstream
        .push_faults([Fault::Delay(Duration::from_millis(150))]);
    let started = Instant::now();
    h.exchange("code-d1").await.assert_session();
    assert!(started.elapsed() >= Duration::from_millis(150));

    h.upstream.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    h.exchange("code-d2").await.assert_session();
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn other_paths_are_echoed() {
    let h = Harness::start(StandInConfig::default()).await;
    let path_and_query = "/wxa/getwxacode?access_token=T&b=%2F+x&a=1&a=2";
    let request = h
        .client
        .post(format!("{}{path_and_query}", h.upstream.base_url()))
        .header("x-echo-status", "201")
        .header("x-echo-content-type", "text/plain")
        .header("x-custom", "one")
        .header("X-Repeated", "a")
        .header("x-repeated", "b")
        .body(&b"h\xc3\xa9llo \xff"[..]);
    let reply = h.send(request).await;

    assert_eq!(reply.status, 201);
    assert_eq!(reply.header("content-type"), "text/plain");
    assert_eq!(reply.header("x-echo-custom"), "stand-in");
    assert_eq!(reply.header("x-echo-method"), "POST");
    let echoed = reply.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["uri"], path_and_query);
    assert_eq!(echoed["headers"]["x-custom"], "one");
    assert_eq!(echoed["headers"]["x-repeated"], "a, b");
    assert_eq!(echoed["body"], "héllo \u{fffd}");
    assert_eq!(echoed["body_len"], 8);

    let plain_get = h.get("/anything").await;
    assert_eq!(plain_get.status, 200);
    assert_eq!(plain_get.header("content-type"), JSON_CONTENT_TYPE);
    assert_eq!(plain_get.json()["method"], "GET");
    assert_eq!(plain_get.json()["body_len"], 0);

    let bad_status = h
        .send(
            h.client
                .get(format!("{}/anything", h.upstream.base_url()))
                .header("x-echo-status", "abc"),
        )
        .await;
    assert_eq!(bad_status.status, 400);

    assert_eq!(h.upstream.calls("/wxa/getwxacode"), 1);
    assert_eq!(h.upstream.calls("/anything"), 2);
    assert_eq!(h.upstream.total_calls(), 3);
}

#[tokio::test]
async fn faults_and_latency_apply_to_the_echo() {
    let h = Harness::start(StandInConfig::default()).await;
    h.upstream.push_faults([Fault::Busy, Fault::BadGateway]);
    h.get("/echo").await.assert_error(-1);
    assert_eq!(h.get("/echo").await.status, 502);

    h.upstream.set_latency(Duration::from_millis(50));
    let started = Instant::now();
    let echoed = h.get("/echo").await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(echoed.json()["uri"], "/echo");
}

#[tokio::test]
async fn http2_is_served_too() {
    let h = Harness::start(StandInConfig::default()).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client builds");
    let response = client
        .get(format!("{}/h2", h.upstream.base_url()))
        .send()
        .await
        .expect("stand-in answers");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn counters_log_and_reset() {
    let h = Harness::start(StandInConfig::default()).await;
    h.exchange("code-k").await.assert_session();
    h.exchange("code-k").await.assert_error(40163);
    h.get("/echo?appid=wx-echo").await;

    assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 2);
    assert_eq!(h.upstream.total_calls(), 3);
    let log = h.upstream.call_log();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].path, JSCODE2SESSION_PATH);
    assert_eq!(log[0].appid.as_deref(), Some(DEFAULT_APPID));
    assert_eq!(log[1].errcode, Some(40163));
    assert_eq!(log[2].appid.as_deref(), Some("wx-echo"));
    assert_eq!(log[2].errcode, None);
    assert!(log[0].at <= log[1].at && log[1].at <= log[2].at);

    h.upstream.reset_counters();
    assert_eq!(h.upstream.total_calls(), 0);
    assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 0);
    assert_eq!(h.upstream.code_calls("code-k"), 0);
    assert_eq!(h.upstream.answers(0), 0);
    assert!(h.upstream.call_log().is_empty());
    // Spent codes are upstream state, not counters.
    h.exchange("code-k").await.assert_error(40163);
}

#[tokio::test]
async fn without_record_calls_the_counters_still_count() {
    let config = StandInConfig {
        record_calls: false,
        ..StandInConfig::default()
    };
    let h = Harness::start(config).await;
    h.exchange("code-n").await.assert_session();
    assert!(h.upstream.call_log().is_empty());
    assert_eq!(h.upstream.calls(JSCODE2SESSION_PATH), 1);
    assert_eq!(h.upstream.answers(0), 1);
}

#[tokio::test]
async fn dropping_the_stand_in_stops_the_server() {
    let upstream = StandIn::start(StandInConfig::default())
        .await
        .expect("stand-in starts");
    let addr = upstream.addr();
    let answer = raw_call(addr, "/before-drop").await;
    assert!(answer.starts_with(b"HTTP/1.1 200"));

    drop(upstream);
    // The abort takes effect when the runtime next polls the accept task; give it turns
    // rather than wall-clock time.
    let mut refused = false;
    for _ in 0..100 {
        tokio::task::yield_now().await;
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the listener still accepts after drop");
}
