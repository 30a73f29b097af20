//! No client can exhaust wxgate: over real sockets on loopback, with short configured
//! deadlines, each way of holding a connection or a request open without finishing it is cut
//! (silent sockets, a bare HTTP/2 preface, a head or a body trickled a byte at a time, a body
//! declared and never sent, an idle keep-alive), a request that takes long is not, the
//! connection cap makes room for a new client, and requests past the shutdown grace get
//! wxgate's own answer.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// The HTTP/2 connection preface a prior-knowledge client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn silent_sockets_and_a_trickled_head_are_closed_at_the_head_deadline() {
    let (_upstream, proxy) = setup("[server]\nrequest_head_timeout_ms = 300\n").await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(connect(proxy.addr).await);
    }
    // A head sent a byte every 50 ms for as long as wxgate listens: the bytes never push
    // the deadline back.
    let mut trickled = connect(proxy.addr).await;
    let (mut trickled_reader, mut writer) = trickled.split();
    let trickle = async {
        for byte in b"GET /cgi-bin/token HTTP/1.1\r\nHost: wxgate\r\nX-Slow: "
            .iter()
            .cycle()
            .take(600)
        {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut sink = [0u8; 64];
    tokio::select! {
        () = trickle => panic!("the trickled head outlived its deadline"),
        _ = tokio::time::timeout(EVENTUALLY, trickled_reader.read(&mut sink)) => {}
    }
    for stream in &mut silent {
        closed_by_wxgate(stream).await;
    }
    let text = proxy
        .metrics_until("21 head timeouts", |text| {
            connections_closed(text, "head_timeout") == 21.0 && connections_open(text) == 0.0
        })
        .await;
    assert_eq!(connections_closed(&text, "idle"), 0.0);
    // wxgate still serves.
    let answer = client().get(proxy.url("/after")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn an_http2_preface_and_nothing_more_is_closed_at_the_head_deadline() {
    let (_upstream, proxy) = setup("[server]\nrequest_head_timeout_ms = 300\n").await;
    let mut preface_only = connect(proxy.addr).await;
    preface_only.write_all(H2_PREFACE).await.unwrap();
    // A preface and an empty SETTINGS frame: a real HTTP/2 session that never opens a stream.
    let mut settings_only = connect(proxy.addr).await;
    settings_only.write_all(H2_PREFACE).await.unwrap();
    settings_only
        .write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    closed_by_wxgate(&mut preface_only).await;
    closed_by_wxgate(&mut settings_only).await;
    proxy
        .metrics_until("2 head timeouts", |text| {
            connections_closed(text, "head_timeout") == 2.0
        })
        .await;
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout_but_a_long_request_is_not_cut() {
    let (upstream, proxy) =
        setup("[server]\nrequest_head_timeout_ms = 400\nidle_timeout_ms = 400\n").await;
    // HTTP/1.1 keep-alive and HTTP/2: one request each, then nothing. hyper's client
    // connection future ends when the server closes the connection.
    let (mut h1, h1_connection) = hyper::client::conn::http1::handshake::<_, String>(
        hyper_util::rt::TokioIo::new(connect(proxy.addr).await),
    )
    .await
    .unwrap();
    let h1_connection = tokio::spawn(h1_connection);
    let (mut h2, h2_connection) = hyper::client::conn::http2::handshake::<_, _, String>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(connect(proxy.addr).await),
    )
    .await
    .unwrap();
    let h2_connection = tokio::spawn(h2_connection);
    let get = |version| {
        let uri = match version {
            // HTTP/2 requests name their scheme and authority.
            http::Version::HTTP_2 => proxy.url("/idle"),
            _ => "/idle".to_owned(),
        };
        http::Request::get(uri)
            .version(version)
            .header("host", "wxgate")
            .body(String::new())
            .unwrap()
    };
    assert_eq!(
        h1.send_request(get(http::Version::HTTP_11))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        h2.send_request(get(http::Version::HTTP_2))
            .await
            .unwrap()
            .status(),
        200
    );

    // Meanwhile a request held upstream for three idle timeouts, on a keep-alive
    // connection that has carried a request before, is answered, not cut.
    let client = client();
    assert_eq!(
        client
            .get(proxy.url("/fast"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    upstream.push_faults([wxgate_stand_in::Fault::Delay(Duration::from_millis(1200))]);
    let slow = client.get(proxy.url("/slow")).send().await.unwrap();
    assert_eq!(slow.status(), 200);
    assert!(slow.text().await.unwrap().contains("/slow"));

    for connection in [h1_connection, h2_connection] {
        tokio::time::timeout(EVENTUALLY, connection)
            .await
            .expect("the idle connection is closed")
            .unwrap()
            .expect("closed cleanly");
    }
    let text = proxy
        .metrics_until("2 idle closes", |text| {
            connections_closed(text, "idle") >= 2.0
        })
        .await;
    assert_eq!(connections_closed(&text, "head_timeout"), 0.0);
}

#[tokio::test]
async fn at_the_cap_the_longest_idle_connection_makes_room_for_a_new_client() {
    let (_upstream, proxy) = setup("[server]\nmax_connections = 3\n").await;
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "wxgate_connections_limit", &[]), 3.0);
    let mut silent = Vec::new();
    for count in 1..=3 {
        silent.push(connect(proxy.addr).await);
        proxy
            .metrics_until("the connection is open", |text| {
                connections_open(text) == f64::from(count)
            })
            .await;
    }
    // A client at the cap: the oldest silent socket is closed for it, and only that one.
    let answer = client().get(proxy.url("/new-client")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    closed_by_wxgate(&mut silent[0]).await;
    let text = proxy.metrics().await;
    assert_eq!(connections_closed(&text, "cap"), 1.0);
    assert_eq!(connections_closed(&text, "refused"), 0.0);
    for stream in &silent[1..] {
        let mut byte = [0u8; 1];
        assert!(
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a younger silent socket is still open"
        );
    }
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_new_one_is_refused() {
    let (upstream, proxy) = setup("[server]\nmax_connections = 2\n").await;
    let hold = Duration::from_millis(1500);
    upstream.push_faults([
        wxgate_stand_in::Fault::Delay(hold),
        wxgate_stand_in::Fault::Delay(hold),
    ]);
    // Two clients, two connections, each with a request held upstream.
    let busy: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client().get(proxy.url("/busy")).send()))
        .collect();
    while upstream.calls("/busy") < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut refused = connect(proxy.addr).await;
    // wxgate may have closed it already, which can fail the write: what counts is what comes
    // back.
    let _ = refused
        .write_all(b"GET /refused HTTP/1.1\r\nHost: wxgate\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(EVENTUALLY, refused.read_to_end(&mut answer))
        .await
        .expect("the refused connection is closed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    for request in busy {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    let text = proxy.metrics().await;
    assert_eq!(connections_closed(&text, "refused"), 1.0);
    assert_eq!(connections_closed(&text, "cap"), 0.0);
    assert_eq!(upstream.calls("/refused"), 0);
}

#[tokio::test]
async fn requests_past_the_shutdown_grace_are_answered_503_minus_1() {
    let (upstream, proxy) = setup("[server]\nshutdown_grace_ms = 300\n").await;
    upstream.push_faults([wxgate_stand_in::Fault::Hang, wxgate_stand_in::Fault::Hang]);
    let h1 = client();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let requests = [
        tokio::spawn(
            h1.get(proxy.url(&jscode2session(APPID, SECRET, "cut-code")))
                .send(),
        ),
        tokio::spawn(h2.get(proxy.url("/cgi-bin/hung")).send()),
    ];
    while upstream.code_calls("cut-code") == 0 || upstream.calls("/cgi-bin/hung") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shutdown = tokio::spawn(proxy.shutdown());
    for request in requests {
        let answer = tokio::time::timeout(EVENTUALLY, request)
            .await
            .expect("answered after the grace")
            .unwrap()
            .expect("an answer, not a closed connection");
        assert_eq!(answer.status(), 503);
        assert_eq!(
            answer.headers()["content-type"],
            "application/json; encoding=utf-8"
        );
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["errcode"], -1);
        let errmsg = body["errmsg"].as_str().unwrap();
        assert!(errmsg.contains("shutting down"), "{errmsg}");
        assert!(
            !errmsg.contains("cut-code") && !errmsg.contains(SECRET),
            "{errmsg}"
        );
    }
    tokio::time::timeout(EVENTUALLY, shutdown)
        .await
        .expect("wxgate stops after writing the answers")
        .unwrap();
}

/// The real binary under an open-files limit it cannot raise (`ulimit -n` lowers the soft and
/// the hard limit): a client holding more silent sockets than the limit does not keep a
/// normal client out, and the silent sockets are closed by the cap and the head deadline.
/// Before the cap and the deadline, `accept` failed with "Too many open files" for every new
/// client for as long as the silent sockets were held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_beyond_the_open_files_limit_do_not_keep_a_client_out() {
    const OPEN_FILES: u64 = 256;
    const SILENT: usize = 300;
    // The test's own limit must hold the silent sockets.
    let own = rlimit::increase_nofile_limit(4096).unwrap();
    assert!(
        own > SILENT as u64 + 64,
        "this test needs {SILENT} sockets, the limit is {own}"
    );
    let upstream = stand_in(|_| {}).await;
    let dir = std::env::temp_dir().join(format!("wxgate-connections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("limited.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_head_timeout_ms = 2000\n{}",
            config_text(&upstream.base_url(), "")
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("ulimit -n {OPEN_FILES} && exec \"$0\" --config \"$1\""),
            env!("CARGO_BIN_EXE_wxgate"),
        ])
        .arg(&config_path)
        .env("RUST_LOG", "info,wxgate::access=off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let serving = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("wxgate says where it serves:\n{}", log.join("\n")));
        log.push(line.clone());
        if line.contains("wxgate serving") {
            break line;
        }
    };
    let (proxy, admin) = (log_field(&serving, "proxy"), log_field(&serving, "admin"));
    let proxy_addr: SocketAddr = proxy.parse().unwrap();
    let metrics = || async {
        reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // A new connection for every request: a client that was refused before.
    let fresh = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let keep_alive = client();

    let mut silent = Vec::new();
    for round in 0..3 {
        for _ in 0..SILENT / 3 {
            silent.push(connect(proxy_addr).await);
        }
        for i in 0..5 {
            for client in [&fresh, &keep_alive] {
                let url = format!("http://{proxy}/round-{round}-{i}");
                let answer = client.get(url).send().await.expect("the client is served");
                assert_eq!(answer.status(), 200);
            }
        }
    }
    let text = metrics().await;
    assert!(
        metric(&text, "wxgate_connections_open", &[]) <= 96.0,
        "{text}"
    );
    assert!(connections_closed(&text, "cap") > 0.0, "{text}");
    // The silent sockets are all closed: by the cap, then by the head deadline.
    for stream in &mut silent {
        closed_by_wxgate(stream).await;
    }
    let text = metrics().await;
    assert!(connections_closed(&text, "head_timeout") > 0.0, "{text}");
    assert!(
        connections_closed(&text, "head_timeout") + connections_closed(&text, "cap")
            >= SILENT as f64,
        "{text}"
    );
    let answer = fresh
        .get(format!("http://{proxy}/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let log = log.join("\n");
    assert!(log.contains(&format!("limit={OPEN_FILES}")), "{log}");
    // wxgate found the limit and kept its cap below it: (256 - 64 reserved) / 2, the
    // other half free for upstream connections.
    assert_eq!(log_field(&serving, "max_connections"), "96", "{serving}");

    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.0.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    drop(lines_rx);
    reader.join().unwrap();
}

/// A child process killed if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Harmless on a process that has exited already.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
