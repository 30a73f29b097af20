//! What bounds wxgate's use of its upstream: the size of an answer it reads
//! (`upstream.max_body_bytes`) and the number of connections it opens
//! (`upstream.max_connections`), against bare HTTP/1.1 servers on loopback that misbehave on
//! purpose.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The cap the body tests set: 1 MiB.
const CAP: usize = 1 << 20;

/// What the oversized answers would weigh if read whole: 256 MiB, far past the cap.
const HUGE: usize = 256 << 20;

/// How a server frames the answer body it sends.
#[derive(Clone, Copy, Debug)]
enum Framing {
    /// `Content-Length: N`.
    Declared,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body ends when the server closes the connection.
    UntilClose,
}

/// How sending one answer ended, as the server saw it.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Every byte was written.
    Whole,
    /// The peer closed or reset the connection after this many body bytes were written.
    BrokenAfter(usize),
}

/// A server answering every request with a body of `len` bytes framed as `framing`; reports
/// how each answer's sending ended, and counts connections.
struct BodyServer {
    url: String,
    connections: Arc<AtomicUsize>,
    sent: mpsc::UnboundedReceiver<Sent>,
}

async fn body_server(framing: Framing, len: usize) -> BodyServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let (report, sent) = mpsc::unbounded_channel();
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(send_bodies(stream, framing, len, report.clone()));
        }
    });
    BodyServer {
        url,
        connections,
        sent,
    }
}

async fn send_bodies(
    mut stream: TcpStream,
    framing: Framing,
    len: usize,
    report: mpsc::UnboundedSender<Sent>,
) {
    loop {
        if !read_head(&mut stream).await {
            return;
        }
        let framing_header = match framing {
            Framing::Declared => format!("Content-Length: {len}\r\n"),
            Framing::Chunked => "Transfer-Encoding: chunked\r\n".to_owned(),
            Framing::UntilClose => "Connection: close\r\n".to_owned(),
        };
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing_header}\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            let _ = report.send(Sent::BrokenAfter(0));
            return;
        }
        let chunk = vec![b'x'; 64 << 10];
        let mut written = 0;
        while written < len {
            let n = chunk.len().min(len - written);
            let ok = match framing {
                Framing::Chunked => {
                    let size = format!("{n:x}\r\n");
                    stream.write_all(size.as_bytes()).await.is_ok()
                        && stream.write_all(&chunk[..n]).await.is_ok()
                        && stream.write_all(b"\r\n").await.is_ok()
                }
                Framing::Declared | Framing::UntilClose => {
                    stream.write_all(&chunk[..n]).await.is_ok()
                }
            };
            if !ok {
                let _ = report.send(Sent::BrokenAfter(written));
                return;
            }
            written += n;
        }
        if let Framing::Chunked = framing {
            if stream.write_all(b"0\r\n\r\n").await.is_err() {
                let _ = report.send(Sent::BrokenAfter(written));
                return;
            }
        }
        let _ = report.send(Sent::Whole);
        if let Framing::UntilClose = framing {
            return;
        }
    }
}

/// Reads one request head (GETs without a body); false when the connection ended.
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn an_answer_over_max_body_bytes_is_refused_without_being_read() {
    for framing in [Framing::Declared, Framing::Chunked, Framing::UntilClose] {
        let mut upstream = body_server(framing, HUGE).await;
        let extra = format!("max_body_bytes = {CAP}\n");
        let proxy = spawn_proxy(config(&config_text(&upstream.url, &extra))).await;
        let client = client();
        let response = client
            .get(proxy.url("/cgi-bin/media/get?x=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502, "{framing:?}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json; encoding=utf-8"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["errcode"], -1, "{framing:?}");
        assert_eq!(
            body["errmsg"],
            "system error (wxgate: upstream answer larger than upstream.max_body_bytes)",
            "{framing:?}"
        );
        // wxgate stopped reading and closed the connection: the server could not send the
        // rest (it would block on a full socket forever if wxgate had merely paused).
        let sent = tokio::time::timeout(Duration::from_secs(20), upstream.sent.recv())
            .await
            .expect("the server's sending ends")
            .unwrap();
        match sent {
            Sent::BrokenAfter(written) => assert!(written < HUGE / 4, "{framing:?}: {written}"),
            Sent::Whole => panic!("{framing:?}: wxgate read the whole oversized answer"),
        }
        // The connection was not pooled: the next call opens a new one.
        let again = client
            .get(proxy.url("/cgi-bin/media/get?x=2"))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 502, "{framing:?}");
        assert_eq!(
            upstream.connections.load(Ordering::SeqCst),
            2,
            "{framing:?}"
        );
        let text = proxy.metrics().await;
        let too_large = [("api", "other"), ("reason", "too_large")];
        assert_eq!(
            metric(&text, "wxgate_upstream_transport_errors_total", &too_large),
            2.0,
            "{framing:?}"
        );
        assert_eq!(
            metric(&text, "wxgate_retries_total", &[]),
            0.0,
            "the call was executed: not sent again"
        );
    }
}

#[tokio::test]
async fn an_answer_of_exactly_max_body_bytes_passes_and_its_connection_is_kept() {
    for framing in [Framing::Declared, Framing::Chunked] {
        let upstream = body_server(framing, CAP).await;
        let extra = format!("max_body_bytes = {CAP}\n");
        let proxy = spawn_proxy(config(&config_text(&upstream.url, &extra))).await;
        let client = client();
        for _ in 0..2 {
            let response = client
                .get(proxy.url("/cgi-bin/media/get?x=1"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{framing:?}");
            assert_eq!(response.bytes().await.unwrap().len(), CAP, "{framing:?}");
        }
        assert_eq!(
            upstream.connections.load(Ordering::SeqCst),
            1,
            "{framing:?}"
        );
    }
}

/// A server that accepts connections, reads what comes and never answers; logs when it
/// accepted each connection.
struct HangingServer {
    url: String,
    accepted: Arc<std::sync::Mutex<Vec<Instant>>>,
}

async fn hanging_server() -> HangingServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            log.lock().unwrap().push(Instant::now());
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    HangingServer { url, accepted }
}

#[tokio::test]
async fn calls_beyond_max_connections_wait_for_one_and_never_open_more() {
    const CAP: usize = 3;
    const CALLS: usize = 12;
    let upstream = hanging_server().await;
    let extra = format!("max_connections = {CAP}\n");
    // config_text's upstream.timeout_ms: 2 s.
    let timeout = Duration::from_secs(2);
    let proxy = spawn_proxy(config(&config_text(&upstream.url, &extra))).await;
    let client = client();
    let started = Instant::now();
    let calls = (0..CALLS).map(|n| {
        let request = client.get(proxy.url(&format!("/cgi-bin/anything?n={n}")));
        async move {
            let response = request.send().await.unwrap();
            let answered = Instant::now();
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body, answered)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let accepted = upstream.accepted.lock().unwrap().clone();
    // No call's time ran out before `started + timeout`, so until then no connection was
    // freed: exactly the cap was opened. (After it, a call still waiting may take the place
    // of one that timed out.)
    let in_time = accepted
        .iter()
        .filter(|at| **at < started + timeout)
        .count();
    assert_eq!(in_time, CAP, "{accepted:?}");
    let mut waited = 0;
    for (status, body, answered) in &answers {
        assert_eq!(*status, 504);
        assert_eq!(body["errcode"], -1);
        let errmsg = body["errmsg"].as_str().unwrap();
        assert!(errmsg.contains("upstream timed out"), "{errmsg}");
        waited += usize::from(errmsg.contains("all upstream.max_connections busy"));
        // Every call ends within its own timeout (plus scheduling on a busy machine).
        assert!(
            *answered - started < timeout + Duration::from_millis(1500),
            "{:?}",
            *answered - started
        );
    }
    assert!(waited > 0, "some calls waited for a connection and said so");
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_upstream_transport_errors_total",
            &[("reason", "connection_limit")]
        ),
        waited as f64
    );
}

/// A server that answers every request after `delay`, keeping connections alive; counts
/// connections.
async fn slow_server(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                const BODY: &str = r#"{"errcode":0,"errmsg":"ok"}"#;
                while read_head(&mut stream).await {
                    tokio::time::sleep(delay).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
                        BODY.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, connections)
}

#[tokio::test]
async fn calls_beyond_max_connections_take_the_connections_others_return() {
    const CAP: usize = 2;
    const CALLS: usize = 20;
    // 20 calls of 50 ms over 2 connections: about half a second, well within the timeout.
    let (url, connections) = slow_server(Duration::from_millis(50)).await;
    let extra = format!("max_connections = {CAP}\n");
    let proxy = spawn_proxy(config(&config_text(&url, &extra))).await;
    let client = client();
    let calls = (0..CALLS).map(|n| {
        let request = client.get(proxy.url(&format!("/cgi-bin/anything?n={n}")));
        async move { request.send().await.unwrap().status() }
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
    }
    assert_eq!(connections.load(Ordering::SeqCst), CAP);
}
