//! Who may use the proxy (`server.allow`): a client from an address outside the list is
//! closed as it is accepted, unanswered and counted, while one inside is served; a reload
//! that changes the list applies to the connections accepted after it.
//!
//! wxgate listens on 127.0.0.1 and the tests connect from 127.0.0.1 and from 127.0.0.2, which
//! Linux routes over the loopback like all of 127/8.

use std::net::{IpAddr, SocketAddr};

use crate::support::tls::TestDir;
use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A connection to `to` from the local address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket
        .connect(to)
        .await
        .expect("the connection is accepted")
}

/// Sends one request on a new connection from `from` and reads what comes back until the
/// connection closes: the whole answer, or nothing for a connection closed unanswered.
async fn request_from(from: IpAddr, to: SocketAddr, path: &str) -> String {
    let mut stream = connect_from(from, to).await;
    // wxgate may have closed it already, which can fail the write: what counts is what
    // comes back.
    let _ = stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: wxgate\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(EVENTUALLY, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the connection ends");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status of a GET of `path` on a kept-alive connection, its body read whole so that
/// the connection is ready for the next request.
async fn status_on(
    sender: &mut hyper::client::conn::http1::SendRequest<String>,
    path: &str,
) -> u16 {
    sender.ready().await.expect("the connection is still open");
    let request = http::Request::get(path)
        .header("host", "wxgate")
        .body(String::new())
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    let status = answer.status().as_u16();
    http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap();
    status
}

fn not_allowed(text: &str) -> f64 {
    metric(
        text,
        "wxgate_connections_closed_total",
        &[("reason", "not_allowed")],
    )
}

#[tokio::test]
async fn a_client_outside_the_list_is_closed_at_accept_and_one_inside_is_served() {
    let (upstream, proxy) = setup("[server]\nallow = [\"127.0.0.2/32\", \"::1\"]\n").await;

    let refused = request_from(ip("127.0.0.1"), proxy.addr, "/cgi-bin/outside").await;
    assert_eq!(refused, "", "closed without a byte of answer");
    let served = request_from(ip("127.0.0.2"), proxy.addr, "/cgi-bin/inside").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");

    let text = proxy.metrics().await;
    assert_eq!(not_allowed(&text), 1.0);
    assert_eq!(upstream.calls("/cgi-bin/outside"), 0);
    assert_eq!(upstream.calls("/cgi-bin/inside"), 1);
    // The refused connection never counted as open, nor took a place under the cap.
    assert_eq!(
        metric(
            &text,
            "wxgate_connections_closed_total",
            &[("reason", "cap")]
        ),
        0.0
    );
}

#[tokio::test]
async fn a_reload_that_changes_the_list_applies_to_new_connections() {
    let upstream = stand_in(|_| {}).await;
    let dir = TestDir::new("allow");
    let path = dir.path("wxgate.toml");
    let write = |allow: &str| {
        let extra = format!("[server]\nallow = {allow}\n");
        std::fs::write(&path, config_text(&upstream.base_url(), &extra)).unwrap();
    };
    write("[\"127.0.0.2\"]");
    let proxy = spawn_proxy_from_file(&path).await;

    // A keep-alive connection from 127.0.0.2, opened before the reload.
    let (mut kept, connection) = hyper::client::conn::http1::handshake::<_, String>(
        hyper_util::rt::TokioIo::new(connect_from(ip("127.0.0.2"), proxy.addr).await),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    assert_eq!(status_on(&mut kept, "/kept").await, 200);
    assert_eq!(
        request_from(ip("127.0.0.1"), proxy.addr, "/before").await,
        ""
    );

    write("[\"127.0.0.1\"]");
    assert_eq!(proxy.reload().await, (200, "reloaded\n".to_owned()));
    let served = request_from(ip("127.0.0.1"), proxy.addr, "/after").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert_eq!(
        request_from(ip("127.0.0.2"), proxy.addr, "/after-outside").await,
        ""
    );
    // The list is read at accept: the connection admitted before the reload goes on until
    // it closes (at the idle deadline at the latest).
    assert_eq!(status_on(&mut kept, "/kept").await, 200);

    // A list with a bad entry is refused whole, by the entry's index; the list stays.
    write("[\"127.0.0.2\", \"not-an-address\"]");
    let (status, text) = proxy.reload().await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("server.allow[1]: not an IP address"),
        "{text}"
    );
    assert!(!text.contains("not-an-address"), "{text}");
    let served = request_from(ip("127.0.0.1"), proxy.addr, "/after-refusal").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");

    let text = proxy.metrics().await;
    assert_eq!(not_allowed(&text), 2.0);
    assert_eq!(upstream.calls("/before"), 0);
    assert_eq!(upstream.calls("/after-outside"), 0);
    assert_eq!(upstream.calls("/kept"), 2);
}
