//! HTTPS on the proxy port (`[server.tls]`), with a certificate a test CA signs at test time:
//! real clients that verify it (curl with `--cacert`, reqwest with the CA added) reach wxgate
//! over HTTP/1.1 and HTTP/2; clients that do not trust the CA, and plain HTTP, are refused by
//! the handshake; a rotated certificate is served after a reload while connections opened
//! before it keep working; a handshake never finished is closed at the head deadline; and a
//! client outside `server.allow` is closed before any handshake.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use crate::support::tls::{TestCa, TestDir};
use crate::support::*;
use http::Version;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use wxgate_stand_in::StandIn;

/// A wxgate serving HTTPS from certificate files a test CA signed, in front of a stand-in.
struct HttpsProxy {
    ca: TestCa,
    dir: TestDir,
    upstream: StandIn,
    proxy: TestProxy,
    /// The leaf certificate served at start (DER).
    leaf: Vec<u8>,
}

impl HttpsProxy {
    /// A leaf for `names` in `cert.pem` / `key.pem`, and wxgate started from `wxgate.toml`
    /// with `[server.tls]` on them and `extra` (a `[server]` table, say).
    async fn start(names: &[&str], extra: &str) -> HttpsProxy {
        let ca = TestCa::new();
        let dir = TestDir::new("server-tls");
        let leaf = ca.write_leaf(names, &dir.path("cert.pem"), &dir.path("key.pem"));
        let upstream = stand_in(|_| {}).await;
        let https = HttpsProxy::write_config(&dir, &upstream, extra, true);
        let proxy = spawn_proxy_from_file(&https).await;
        HttpsProxy {
            ca,
            dir,
            upstream,
            proxy,
            leaf,
        }
    }

    /// Writes `wxgate.toml`: the upstream, `extra`, and `[server.tls]` when `tls`.
    fn write_config(dir: &TestDir, upstream: &StandIn, extra: &str, tls: bool) -> PathBuf {
        let path = dir.path("wxgate.toml");
        let mut text = config_text(&upstream.base_url(), extra);
        if tls {
            text.push_str(&format!(
                "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                dir.path("cert.pem").display().to_string(),
                dir.path("key.pem").display().to_string(),
            ));
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `https://127.0.0.1:PORT` + `path_and_query`.
    fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{}", self.proxy.addr, path_and_query)
    }

    /// A reqwest client that trusts the test CA (and nothing else).
    fn trusting_client(&self) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .add_root_certificate(ca)
    }

    /// curl with the CA file as its only trust (`--cacert`), and `args`.
    async fn curl(&self, args: &[&str]) -> Output {
        let mut all = vec![
            "--cacert".to_owned(),
            self.ca.ca_file().display().to_string(),
        ];
        all.extend(args.iter().map(|arg| (*arg).to_owned()));
        curl(all).await
    }

    /// A TLS connection that trusts the test CA, asking for `server_name` and offering
    /// `alpn`; and the certificate it was shown (DER).
    async fn connect(&self, server_name: &str, alpn: &[u8]) -> (TlsStream<TcpStream>, Vec<u8>) {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.pem().as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.proxy.addr).await.unwrap();
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let stream = connector.connect(name, tcp).await.expect("handshake");
        let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        (stream, shown)
    }
}

/// Whether curl is here to be a client; outside CI (`CI=true`, where `.ci/run` installs it)
/// a machine without it skips the test with a message, as `cargo test` must pass on a fresh
/// machine.
fn curl_or_skip(test: &str) -> bool {
    use std::io::Write;
    let installed = std::process::Command::new("curl")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok();
    if !installed && std::env::var("CI").is_err() {
        // Past the test harness's capture, so that it shows in `cargo test`.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: curl is not installed (apt-get install curl); CI runs it"
        );
        return false;
    }
    true
}

/// curl with `args`, no proxy from the environment, and a bound on its time; run on a
/// blocking thread, as wxgate serves on this runtime.
async fn curl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--noproxy",
                "*",
                "--max-time",
                "20",
            ])
            .args(&args)
            .output()
            .expect("curl runs (.ci/run installs it)")
    })
    .await
    .unwrap()
}

/// An HTTP/1.1 client over `stream`; its connection runs in a task of its own.
async fn http1_over(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<String> {
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// An HTTP/2 client over `stream`; its connection runs in a task of its own.
async fn http2_over(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<String> {
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// The status of a GET of `path` on an HTTP/1.1 connection, its body read whole so that the
/// connection is ready for the next request.
async fn h1_status(
    sender: &mut hyper::client::conn::http1::SendRequest<String>,
    path: &str,
) -> u16 {
    sender.ready().await.expect("the connection is still open");
    let answer = sender
        .send_request(get(path, Version::HTTP_11))
        .await
        .unwrap();
    let status = answer.status().as_u16();
    http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap();
    status
}

fn get(uri: &str, version: Version) -> http::Request<String> {
    http::Request::get(uri)
        .version(version)
        .header("host", "wxgate")
        .body(String::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_trust_the_ca_are_served_over_http1_and_http2() {
    if !curl_or_skip("clients_that_trust_the_ca_are_served_over_http1_and_http2") {
        return;
    }
    let https = HttpsProxy::start(&["localhost", "127.0.0.1"], "").await;

    // reqwest, HTTP/1.1 only, then offering both by ALPN: wxgate picks HTTP/2.
    for (code, client, version) in [
        (
            "code-reqwest-h1",
            https.trusting_client().http1_only().build().unwrap(),
            Version::HTTP_11,
        ),
        (
            "code-reqwest-h2",
            https.trusting_client().build().unwrap(),
            Version::HTTP_2,
        ),
    ] {
        let answer = client
            .get(https.url(&jscode2session(APPID, SECRET, code)))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.version(), version, "{code}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert!(body["session_key"].is_string(), "{body}");
    }

    // curl, verifying against the CA file alone, by IP address and by name.
    for (code, version_flag, host, shown) in [
        ("code-curl-h1", "--http1.1", "127.0.0.1", "1.1"),
        ("code-curl-h2", "--http2", "localhost", "2"),
    ] {
        let url = format!(
            "https://{host}:{}{}",
            https.proxy.addr.port(),
            jscode2session(APPID, SECRET, code)
        );
        let output = https
            .curl(&[version_flag, "--write-out", "\n%{http_version}", &url])
            .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{output:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (body, version) = stdout.rsplit_once('\n').unwrap();
        assert_eq!(version, shown, "{code}");
        assert!(body.contains("\"session_key\""), "{body}");
    }
    for code in [
        "code-reqwest-h1",
        "code-reqwest-h2",
        "code-curl-h1",
        "code-curl-h2",
    ] {
        assert_eq!(https.upstream.code_calls(code), 1, "{code}");
    }
    let text = https.proxy.metrics().await;
    assert_eq!(connections_closed(&text, "tls_handshake"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_trust_the_ca_and_plain_http_are_refused_by_the_handshake() {
    if !curl_or_skip("clients_that_do_not_trust_the_ca_and_plain_http_are_refused_by_the_handshake")
    {
        return;
    }
    let https = HttpsProxy::start(&["localhost", "127.0.0.1"], "").await;

    // reqwest with no authority at all: the handshake fails on the certificate.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let refused = untrusting
        .get(https.url("/cgi-bin/untrusted"))
        .send()
        .await
        .unwrap_err();
    assert!(refused.is_connect(), "{refused:?}");
    assert!(
        format!("{refused:?}").contains("UnknownIssuer"),
        "{refused:?}"
    );

    // curl with the system's authorities, which do not hold the test CA.
    let url = https.url("/cgi-bin/untrusted-curl");
    let output = curl(vec![url]).await;
    assert_eq!(
        output.status.code(),
        Some(60),
        "curl: peer certificate cannot be verified: {output:?}"
    );

    // Plain HTTP to the HTTPS port.
    let plain = client()
        .get(format!("http://{}/cgi-bin/plain", https.proxy.addr))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    https
        .proxy
        .metrics_until(
            "three failed handshakes, their connections closed",
            |text| {
                connections_closed(text, "tls_handshake") == 3.0 && connections_open(text) == 0.0
            },
        )
        .await;

    // A connection closed before it sent anything (a load balancer's TCP check) is no
    // failed handshake.
    let check = TcpStream::connect(https.proxy.addr).await.unwrap();
    https
        .proxy
        .metrics_until("the check is accepted", |text| {
            connections_open(text) == 1.0
        })
        .await;
    drop(check);
    let text = https
        .proxy
        .metrics_until("the check is closed", |text| connections_open(text) == 0.0)
        .await;
    assert_eq!(connections_closed(&text, "tls_handshake"), 3.0);
    assert_eq!(https.upstream.total_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_after_a_reload_and_open_connections_keep_working() {
    if !curl_or_skip(
        "a_rotated_certificate_is_served_after_a_reload_and_open_connections_keep_working",
    ) {
        return;
    }
    let https = HttpsProxy::start(&["127.0.0.1"], "").await;
    let port = https.proxy.addr.port();
    let by_name = format!("https://wxgate.test:{port}/cgi-bin/by-name");
    let resolve = format!("wxgate.test:{port}:127.0.0.1");

    // Connections opened before the reload, HTTP/1.1 and HTTP/2, on the first certificate.
    let (stream, shown) = https.connect("127.0.0.1", b"http/1.1").await;
    assert_eq!(shown, https.leaf);
    let mut old_h1 = http1_over(stream).await;
    let (stream, _) = https.connect("127.0.0.1", b"h2").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut old_h2 = http2_over(stream).await;
    let h2_uri = https.url("/cgi-bin/old-h2");
    assert_eq!(h1_status(&mut old_h1, "/cgi-bin/old-h1").await, 200);
    assert_eq!(
        old_h2
            .send_request(get(&h2_uri, Version::HTTP_2))
            .await
            .unwrap()
            .status(),
        200
    );
    // The first certificate does not hold the name wxgate.test.
    let before = https.curl(&["--resolve", &resolve, &by_name]).await;
    assert_eq!(before.status.code(), Some(60), "{before:?}");

    // A new leaf from the same CA, for another set of names, over the same files.
    let rotated = https.ca.write_leaf(
        &["wxgate.test", "127.0.0.1"],
        &https.dir.path("cert.pem"),
        &https.dir.path("key.pem"),
    );
    assert_eq!(https.proxy.reload().await, (200, "reloaded\n".to_owned()));

    let (_, shown) = https.connect("127.0.0.1", b"http/1.1").await;
    assert_eq!(shown, rotated, "new connections get the new certificate");
    let after = https.curl(&["--resolve", &resolve, &by_name]).await;
    assert!(after.status.success(), "{after:?}");
    assert_eq!(https.upstream.calls("/cgi-bin/by-name"), 1);
    // The connections opened before the reload carry requests still.
    for _ in 0..2 {
        assert_eq!(h1_status(&mut old_h1, "/cgi-bin/old-h1").await, 200);
        assert_eq!(
            old_h2
                .send_request(get(&h2_uri, Version::HTTP_2))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(https.upstream.calls("/cgi-bin/old-h1"), 3);
    assert_eq!(https.upstream.calls("/cgi-bin/old-h2"), 3);

    // A key that is not the certificate's: the reload is refused whole, naming the key and
    // nothing of the file, and the rotated certificate stays.
    let other = TestCa::new();
    other.write_leaf(
        &["127.0.0.1"],
        &https.dir.path("other-cert.pem"),
        &https.dir.path("key.pem"),
    );
    let (status, text) = https.proxy.reload().await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("server.tls.key_file: is not the private key"),
        "{text}"
    );
    assert!(!text.contains("PRIVATE KEY-----"), "{text}");
    let (_, shown) = https.connect("127.0.0.1", b"http/1.1").await;
    assert_eq!(shown, rotated);

    // TLS turned off in the file: a restart is needed; HTTPS goes on meanwhile.
    HttpsProxy::write_config(&https.dir, &https.upstream, "", false);
    assert_eq!(
        https.proxy.reload().await,
        (
            200,
            "reloaded; kept until a restart: server.tls\n".to_owned()
        )
    );
    let (_, shown) = https.connect("127.0.0.1", b"http/1.1").await;
    assert_eq!(shown, rotated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_never_finished_is_closed_at_the_head_deadline() {
    let https =
        HttpsProxy::start(&["127.0.0.1"], "[server]\nrequest_head_timeout_ms = 300\n").await;
    // A silent socket, and one that sends the start of a ClientHello (a handshake record
    // announcing 512 bytes) and no more.
    let mut silent = TcpStream::connect(https.proxy.addr).await.unwrap();
    let mut partial = TcpStream::connect(https.proxy.addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    for stream in [&mut silent, &mut partial] {
        let mut sink = Vec::new();
        tokio::time::timeout(EVENTUALLY, stream.read_to_end(&mut sink))
            .await
            .expect("wxgate closes the connection")
            .ok();
    }
    let text = https
        .proxy
        .metrics_until("two head timeouts", |text| {
            connections_closed(text, "head_timeout") == 2.0
        })
        .await;
    assert_eq!(connections_closed(&text, "tls_handshake"), 0.0);
    // wxgate still serves.
    let client = https.trusting_client().build().unwrap();
    let answer = client.get(https.url("/after")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_allow_list_is_closed_before_any_handshake() {
    // wxgate listens on 127.0.0.1; the test connects from there, and from 127.0.0.2, which
    // Linux routes over the loopback too.
    let https = HttpsProxy::start(
        &["127.0.0.1"],
        "[server]\nallow = [\"127.0.0.2\", \"::1\"]\n",
    )
    .await;
    let client = https.trusting_client();
    let outside = client.build().unwrap();
    let refused = outside.get(https.url("/cgi-bin/outside")).send().await;
    assert!(refused.is_err(), "{refused:?}");
    let inside = https
        .trusting_client()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let answer = inside
        .get(https.url("/cgi-bin/inside"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let text = https.proxy.metrics().await;
    assert_eq!(connections_closed(&text, "not_allowed"), 1.0);
    assert_eq!(
        connections_closed(&text, "tls_handshake"),
        0.0,
        "no handshake was begun"
    );
    assert_eq!(https.upstream.calls("/cgi-bin/outside"), 0);
}
