//! No client can exhaust wxgate: over real sockets on loopback, with short configured
//! deadlines, each way of holding a connection or a request open without finishing it is cut
//! (silent sockets, a bare HTTP/2 preface, a head or a body trickled a byte at a time, a body
//! declared and never sent, an idle keep-alive), a request that takes long is not, the
//! connection cap makes room for a new client, and requests past the shutdown grace get
//! wxgate's own answer.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for anything that should happen within a configured deadline of a few
/// hundred milliseconds: a failure means "never", not "slow".
const EVENTUALLY: Duration = Duration::from_secs(15);

/// One HTTP/1.1 answer read off a raw socket: status line, headers, and a body of its
/// `Content-Length`. Reading stops there, so an answer followed by a close (even a reset, as
/// when wxgate closes with unread bytes from the client) is read whole.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = find(&answer, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                if answer.len() >= end + 4 + length {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, read)
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&answer).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Waits until wxgate has closed `stream` (end of file or a reset), discarding whatever it
/// sends before; panics if that takes longer than [`EVENTUALLY`].
async fn closed_by_wxgate(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, closed)
        .await
        .expect("wxgate closes the connection");
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

#[tokio::test]
async fn a_declared_body_that_never_arrives_is_answered_408_at_the_body_deadline() {
    let (upstream, proxy) = setup("[server]\nbody_timeout_ms = 300\n").await;
    let mut stream = connect(proxy.addr).await;
    stream
        .write_all(
            b"POST /cgi-bin/message/custom/send?access_token=never-echoed-token HTTP/1.1\r\n\
              Host: wxgate\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"to",
        )
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"errcode\":47001"), "{answer}");
    assert!(answer.contains("within 300 ms"), "{answer}");
    assert!(!answer.contains("never-echoed-token"), "{answer}");
    assert!(
        answer.contains("application/json; encoding=utf-8"),
        "{answer}"
    );
    closed_by_wxgate(&mut stream).await;
    assert_eq!(upstream.calls("/cgi-bin/message/custom/send"), 0);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wxgate_requests_total",
            &[("api", "other"), ("outcome", "rejected")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_chunked_body_trickled_a_byte_at_a_time_is_cut_at_the_body_deadline() {
    let (upstream, proxy) = setup("[server]\nbody_timeout_ms = 500\n").await;
    let stream = connect(proxy.addr).await;
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /cgi-bin/message/custom/send HTTP/1.1\r\nHost: wxgate\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    // One byte every 100 ms for as long as wxgate takes them: time passing is the behaviour.
    let trickle = tokio::spawn(async move {
        for _ in 0..300 {
            if writer.write_all(b"1\r\nx\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(EVENTUALLY, async {
        while find(&answer, b"\"errmsg\"").is_none() {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("an answer before the trickle ends");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"errcode\":47001"), "{answer}");
    assert!(
        !trickle.is_finished(),
        "answered while the body was still coming"
    );
    trickle.abort();
    assert_eq!(upstream.calls("/cgi-bin/message/custom/send"), 0);
}
