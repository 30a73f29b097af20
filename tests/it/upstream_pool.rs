//! wxgate's pool of upstream connections, against a bare HTTP/1.1 server on loopback that
//! counts its connections, logs the requests it reads, and closes connections the ways real
//! servers do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BODY: &str = r#"{"errcode":0,"errmsg":"ok"}"#;

/// How the server treats a connection after answering on it.
#[derive(Clone, Copy)]
enum AfterAnswer {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Closes it without saying so beforehand, as a server does with an idle connection.
    CloseSilently,
    /// Answers with `Connection: close`, then closes it.
    AnnounceClose,
    /// Answers a request as soon as its head has arrived and reads nothing more (a body is
    /// left unread), keeping the connection open.
    AnswerEarly,
    /// Keeps it open until the next request arrives, then closes it without reading that
    /// request: the server's keep-alive timeout ran out just as the request came (the race
    /// below made certain).
    CloseWhenNextArrives,
    /// Keeps it open, and closes it once it has been idle this long, as servers do with their
    /// keep-alive timeout.
    CloseWhenIdle(Duration),
}

/// A server answering every request with [`BODY`]; counts connections and requests, and logs
/// the request line of every request it read.
struct Upstream {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    /// The request lines read so far (`GET /path?query`), in order.
    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

async fn upstream(after: AfterAnswer) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = Upstream {
        url,
        connections: Arc::default(),
        requests: Arc::default(),
        received: Arc::default(),
    };
    let (connections, requests, received) = (
        upstream.connections.clone(),
        upstream.requests.clone(),
        upstream.received.clone(),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, after, requests.clone(), received.clone()));
        }
    });
    upstream
}

async fn serve(
    mut stream: TcpStream,
    after: AfterAnswer,
    requests: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<String>>>,
) {
    let mut buffer = Vec::new();
    let mut answered = false;
    loop {
        if answered && buffer.is_empty() {
            match after {
                AfterAnswer::CloseWhenNextArrives => {
                    // Dropped with the request unread: the kernel resets the connection.
                    let _ = stream.readable().await;
                    return;
                }
                AfterAnswer::CloseWhenIdle(idle)
                    if tokio::time::timeout(idle, stream.readable()).await.is_err() =>
                {
                    return;
                }
                _ => {}
            }
        }
        // Requests here are GETs without a body: a request ends with its blank line.
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        buffer.drain(..end);
        let line = head.lines().next().unwrap_or("");
        let line = line.trim_end_matches(" HTTP/1.1").to_owned();
        received.lock().unwrap().push(line);
        requests.fetch_add(1, Ordering::SeqCst);
        answered = true;
        let connection = match after {
            AfterAnswer::AnnounceClose => "Connection: close\r\n",
            _ => "",
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n{BODY}",
            BODY.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        match after {
            AfterAnswer::KeepAlive
            | AfterAnswer::CloseWhenNextArrives
            | AfterAnswer::CloseWhenIdle(_) => {}
            AfterAnswer::AnswerEarly => {
                // Holds the connection open, reading nothing.
                std::future::pending::<()>().await;
            }
            AfterAnswer::CloseSilently | AfterAnswer::AnnounceClose => return,
        }
    }
}

async fn get_ok(client: &reqwest::Client, proxy: &TestProxy, what: &str) {
    get_path_ok(client, proxy, "/cgi-bin/anything?x=1", what).await;
}

async fn get_path_ok(client: &reqwest::Client, proxy: &TestProxy, path: &str, what: &str) {
    let response = client.get(proxy.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 200, "{what}");
    assert_eq!(response.text().await.unwrap(), BODY, "{what}");
}

#[tokio::test]
async fn sequential_calls_share_one_connection() {
    let upstream = upstream(AfterAnswer::KeepAlive).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
    let client = client();
    for i in 0..20 {
        get_ok(&client, &proxy, &format!("call {i}")).await;
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 20);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    // Concurrent calls open more connections; once idle, they are used again.
    let burst = |n: usize| {
        let client = client.clone();
        let url = proxy.url("/cgi-bin/anything?x=2");
        async move {
            let calls = (0..n).map(|_| {
                let (client, url) = (client.clone(), url.clone());
                async move { client.get(url).send().await.unwrap().status() }
            });
            for status in futures_util::future::join_all(calls).await {
                assert_eq!(status, 200);
            }
        }
    };
    burst(16).await;
    let after_first_burst = upstream.connections.load(Ordering::SeqCst);
    assert!(after_first_burst <= 17, "{after_first_burst} connections");
    // As many calls at once as there are idle connections (fewer than 16 when a call of the
    // first burst took a connection another had returned).
    burst(after_first_burst).await;
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        after_first_burst,
        "the second burst reuses the idle connections"
    );
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_not_used_again() {
    for (after, what) in [
        (AfterAnswer::CloseSilently, "closed silently"),
        (AfterAnswer::AnnounceClose, "Connection: close"),
    ] {
        let upstream = upstream(after).await;
        let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
        let client = client();
        for i in 0..5 {
            get_ok(&client, &proxy, &format!("{what}, call {i}")).await;
            // The server's close reaches wxgate while the connection is idle.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(upstream.requests.load(Ordering::SeqCst), 5, "{what}");
        assert_eq!(upstream.connections.load(Ordering::SeqCst), 5, "{what}");
        let text = proxy.metrics().await;
        assert_eq!(
            metric(&text, "wxgate_upstream_transport_errors_total", &[]),
            0.0,
            "{what}"
        );
    }
}

#[tokio::test]
async fn a_connection_still_writing_an_unread_body_is_passed_over() {
    // The server answers a large POST before reading its body and never reads it: the
    // connection cannot take another request until that body is written, which never happens.
    let upstream = upstream(AfterAnswer::AnswerEarly).await;
    let extra = "[server]\nmax_body_bytes = 67108864\n";
    let proxy = spawn_proxy(config(&config_text(&upstream.url, extra))).await;
    let client = client();
    let body = vec![b'x'; 48 << 20];
    let first = client
        .post(proxy.url("/cgi-bin/upload?x=1"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    // The next call does not wait on that connection until its own timeout (2 s here, then
    // a 504): it goes on a new one.
    get_ok(&client, &proxy, "after the early answer").await;
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_lost_on_a_connection_the_server_was_closing_is_sent_again_once() {
    // Every request after the first is written to a pooled connection whose server closes it,
    // unread, as it arrives: its keep-alive timeout ran out at that moment.
    let upstream = upstream(AfterAnswer::CloseWhenNextArrives).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
    let client = client();
    let calls = 10;
    for n in 0..calls {
        let path = format!("/cgi-bin/anything?n={n}");
        get_path_ok(&client, &proxy, &path, &format!("call {n}")).await;
    }
    let expected: Vec<String> = (0..calls)
        .map(|n| format!("GET /cgi-bin/anything?n={n}"))
        .collect();
    assert_eq!(
        upstream.received(),
        expected,
        "each request reached upstream once"
    );
    assert_eq!(upstream.connections.load(Ordering::SeqCst), calls);
    // Each loss is counted, and so is each sending again.
    let text = proxy.metrics().await;
    let lost = [("reason", "reused_connection_closed")];
    assert_eq!(
        metric(&text, "wxgate_upstream_transport_errors_total", &lost),
        (calls - 1) as f64
    );
    assert_eq!(
        metric(&text, "wxgate_retries_total", &[("reason", "transport")]),
        (calls - 1) as f64
    );

    // A POST may not be idempotent (a message sent, a quota reset spent): written once, it is
    // never sent again, and the client hears of the failure.
    let response = client
        .post(proxy.url("/cgi-bin/message/custom/send?n=post"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["errmsg"],
        "system error (wxgate: upstream closed a reused connection without answering)"
    );
    assert_eq!(upstream.received().len(), calls, "the POST was never read");
    get_path_ok(
        &client,
        &proxy,
        "/cgi-bin/anything?n=after",
        "after the POST",
    )
    .await;
}

#[tokio::test]
async fn requests_spaced_by_the_servers_keep_alive_timeout_all_succeed_once() {
    // The race in its natural form: the server closes connections idle for `IDLE`, and
    // requests come about `IDLE` apart (the issue's 300 ms, shortened to keep the test quick).
    // Where a request lands against the server's close depends on timings the test cannot
    // see (the proxy's own latency), so the spacing sweeps `IDLE` ± 2 ms in steps of ~27 µs:
    // some requests are certainly written within the microseconds in which the server has
    // closed the connection and wxgate has not yet seen it.
    const IDLE: Duration = Duration::from_millis(50);
    let upstream = upstream(AfterAnswer::CloseWhenIdle(IDLE)).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
    let client = client();
    let calls = 150;
    let sweep = Duration::from_millis(4);
    for n in 0..calls {
        let path = format!("/cgi-bin/anything?n={n}");
        get_path_ok(&client, &proxy, &path, &format!("call {n}")).await;
        let gap = IDLE - sweep / 2 + sweep * n as u32 / calls as u32;
        pause_precisely(gap).await;
    }
    let expected: Vec<String> = (0..calls)
        .map(|n| format!("GET /cgi-bin/anything?n={n}"))
        .collect();
    assert_eq!(
        upstream.received(),
        expected,
        "each request reached upstream once"
    );
}

#[tokio::test]
async fn a_connection_idle_longer_than_the_pool_idle_timeout_is_not_used() {
    let upstream = upstream(AfterAnswer::KeepAlive).await;
    let extra = "pool_idle_timeout_ms = 100\n";
    let proxy = spawn_proxy(config(&config_text(&upstream.url, extra))).await;
    let client = client();
    get_ok(&client, &proxy, "first").await;
    get_ok(&client, &proxy, "at once, on the same connection").await;
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    get_ok(&client, &proxy, "after the idle timeout").await;
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        2,
        "the idle connection was closed, a new one opened"
    );
}

/// Waits `gap` to within microseconds: tokio's timer has a resolution of a millisecond, so the
/// last millisecond is spent yielding.
async fn pause_precisely(gap: Duration) {
    let deadline = std::time::Instant::now() + gap;
    tokio::time::sleep(gap.saturating_sub(Duration::from_millis(1))).await;
    while std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}
