//! How wxgate reads upstream answers framed every way HTTP/1.1 allows, against a bare server on
//! loopback that writes each answer byte for byte as a test gives it: what reaches the client
//! (status, body, headers minus the hop-by-hop ones) and whether the connection is used again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server that answers the requests on each connection with `answers` in turn (one per
/// request, the last repeated), closes a connection after an answer that says so, and counts
/// connections.
struct ScriptedServer {
    url: String,
    connections: Arc<AtomicUsize>,
}

async fn scripted_server(answers: &[&'static str]) -> ScriptedServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let answers: Vec<&'static str> = answers.to_vec();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(answer_requests(stream, answers.clone()));
        }
    });
    ScriptedServer { url, connections }
}

async fn answer_requests(mut stream: TcpStream, answers: Vec<&'static str>) {
    let mut buffer = Vec::new();
    for n in 0.. {
        // Requests here are GETs without a body: a request ends with its blank line.
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
        let end = buffer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buffer.drain(..end);
        let answer = answers[n.min(answers.len() - 1)];
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let lower = answer.to_ascii_lowercase();
        if lower.contains("connection: close") || lower.starts_with("http/1.0") {
            return;
        }
    }
}

/// Sends two GETs through a fresh wxgate in front of a server answering `answers`; returns
/// both answers (status, headers, body) and the connections the server saw.
async fn two_calls(
    answers: &[&'static str],
) -> (Vec<(u16, reqwest::header::HeaderMap, String)>, usize) {
    let upstream = scripted_server(answers).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.url, ""))).await;
    let client = client();
    let mut got = Vec::new();
    for i in 0..2 {
        let response = client
            .get(proxy.url(&format!("/cgi-bin/anything?call={i}")))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        got.push((status, headers, response.text().await.unwrap()));
    }
    (got, upstream.connections.load(Ordering::SeqCst))
}

#[tokio::test]
async fn a_chunked_answer_is_passed_on_decoded_and_its_connection_kept() {
    let (got, connections) = two_calls(&[
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         a;ext=1\r\n{\"errcode\"\r\n6\r\n:0,\"a\"\r\n3\r\n:1}\r\n0\r\nx-trailer: t\r\n\r\n",
    ])
    .await;
    for (status, headers, body) in &got {
        assert_eq!(*status, 200);
        assert_eq!(body, r#"{"errcode":0,"a":1}"#);
        assert_eq!(headers["content-type"], "application/json");
        assert!(headers.get("x-trailer").is_none(), "{headers:?}");
    }
    assert_eq!(connections, 1, "the connection carried both calls");
}

#[tokio::test]
async fn informational_answers_are_skipped() {
    let (got, connections) = two_calls(&[
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    for (status, _, body) in &got {
        assert_eq!((*status, body.as_str()), (200, "ok"));
    }
    assert_eq!(connections, 1);
}

#[tokio::test]
async fn an_answer_without_a_body_keeps_the_connection() {
    let (got, connections) = two_calls(&["HTTP/1.1 204 No Content\r\nX-Kept: 1\r\n\r\n"]).await;
    for (status, headers, body) in &got {
        assert_eq!(*status, 204);
        assert_eq!(body, "");
        assert_eq!(headers["x-kept"], "1");
    }
    assert_eq!(connections, 1);
}

#[tokio::test]
async fn hop_by_hop_headers_of_an_answer_stay_with_wxgate() {
    let (got, _) = two_calls(&[
        "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\n\
         X-Hop: 1\r\nX-Kept: 2\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let (_, headers, _) = &got[0];
    assert_eq!(headers["x-kept"], "2");
    for hop in ["x-hop", "keep-alive"] {
        assert!(
            headers.get(hop).is_none(),
            "{hop} was passed on: {headers:?}"
        );
    }
}

#[tokio::test]
async fn connections_the_server_will_close_are_not_used_again() {
    for answer in [
        // HTTP/1.0 closes unless it says keep-alive.
        "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        // Ended by the close: nothing else tells where it ends.
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok",
    ] {
        let (got, connections) = two_calls(&[answer]).await;
        for (status, _, body) in &got {
            assert_eq!((*status, body.as_str()), (200, "ok"), "{answer}");
        }
        assert_eq!(connections, 2, "{answer}");
    }
}

#[tokio::test]
async fn a_malformed_answer_is_a_502_and_its_connection_is_dropped() {
    let (got, connections) =
        two_calls(&["HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok"]).await;
    for (status, _, body) in &got {
        assert_eq!(*status, 502);
        assert_eq!(errcode(body.as_bytes()), -1);
    }
    // Not pooled: the second call came on a connection of its own.
    assert_eq!(connections, 2);
}
