//! wxgate's pool of upstream connections, against a bare HTTP/1.1 server on loopback that
//! counts its connections and closes them the ways real servers do.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
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
}

/// A server answering every request with [`BODY`]; counts connections and requests.
struct Upstream {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn upstream(after: AfterAnswer) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (counted_connections, counted_requests) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted_connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream, after, counted_requests.clone()));
        }
    });
    Upstream {
        url,
        connections,
        requests,
    }
}

async fn serve(mut stream: TcpStream, after: AfterAnswer, requests: Arc<AtomicUsize>) {
    let mut buffer = Vec::new();
    loop {
        // Requests here are GETs without a body: a request ends with its blank line.
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buffer.drain(..end);
        requests.fetch_add(1, Ordering::SeqCst);
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
            AfterAnswer::KeepAlive => {}
            AfterAnswer::AnswerEarly => {
                // Holds the connection open, reading nothing.
                std::future::pending::<()>().await;
            }
            AfterAnswer::CloseSilently | AfterAnswer::AnnounceClose => return,
        }
    }
}

async fn get_ok(client: &reqwest::Client, proxy: &TestProxy, what: &str) {
    let response = client
        .get(proxy.url("/cgi-bin/anything?x=1"))
        .send()
        .await
        .unwrap();
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
    burst(16).await;
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
