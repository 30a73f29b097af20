//! Talking to the admin port of a running wxgate, with hyper's HTTP/1.1 client (the one the
//! upstream client is built on): what `wxgate reload` and `wxgate quota` send.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long opening the connection to the admin port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an answer may take (a reload reads and checks the file again).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The address to connect to: a wildcard listen address is reached on the loopback.
pub fn reachable(admin: SocketAddr) -> SocketAddr {
    match admin.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port())
        }
        ip if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin.port()),
        _ => admin,
    }
}

/// One request without a body to `path` on the admin port at `target`: the answer's status
/// and body.
pub async fn request(
    target: SocketAddr,
    method: Method,
    path: &str,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| "connection timed out")??;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "wxgate")
        .header(header::CONTENT_LENGTH, 0)
        .body(Empty::<Bytes>::new())?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| "no answer in time")??;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_admin_address_is_reached_on_the_loopback() {
        let at = |text: &str| reachable(text.parse().unwrap());
        assert_eq!(at("0.0.0.0:9090"), "127.0.0.1:9090".parse().unwrap());
        assert_eq!(at("[::]:9090"), "[::1]:9090".parse().unwrap());
        assert_eq!(at("10.1.2.3:9090"), "10.1.2.3:9090".parse().unwrap());
    }
}
