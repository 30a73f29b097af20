//! A Redis that can never be used: a wrong password, a server that is not Redis, one that
//! never answers, a closed port, `rediss://` to a Redis without TLS. The replica says why in
//! its log (at start and when it degrades), `check-config --connect` says why and exits 1,
//! and the replica serves its calls from a conservative share from its very first window.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::Command;

use crate::support::child::ChildWxgate;
use crate::support::cluster::{cluster_config_text, SecretFile};
use crate::support::redis::RedisServer;
use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WXGATE: &str = env!("CARGO_BIN_EXE_wxgate");

/// One way a Redis cannot be used: its URL, and the word the log must name its cause by.
struct Unusable {
    what: &'static str,
    url: String,
    cause: &'static str,
}

/// A listener that answers whatever it is sent with `answer` (nothing at all when empty),
/// and keeps the connection open.
async fn impostor(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0; 4096];
                while let Ok(read) = stream.read(&mut buffer).await {
                    if read == 0 {
                        return;
                    }
                    if !answer.is_empty() && stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
}

/// The five ways, against `plain` (a Redis without TLS) and `guarded` (one with a password).
async fn unusable(plain: &RedisServer, guarded: &RedisServer) -> Vec<Unusable> {
    let garbage = impostor(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
    let silent = impostor(b"").await;
    vec![
        Unusable {
            what: "a wrong password",
            url: format!("redis://:not-the-password@{}", guarded.addr()),
            cause: "authentication",
        },
        Unusable {
            what: "a server that is not Redis",
            url: format!("redis://{garbage}"),
            cause: "protocol",
        },
        Unusable {
            what: "a server that never answers",
            url: format!("redis://{silent}"),
            cause: "timeout",
        },
        Unusable {
            what: "a closed port",
            url: format!("redis://{}", closed_port()),
            cause: "refused",
        },
        Unusable {
            what: "rediss:// to a Redis without TLS",
            url: format!("rediss://{}", plain.addr()),
            cause: "TLS",
        },
    ]
}

/// Each way: the replica logs its cause at start, and serves calls from its first window
/// (a share of the quota: `per_window` over `cluster.expected_replicas`, paced over the
/// window) instead of refusing them until the next minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_redis_is_named_and_the_replica_still_serves() {
    let Some(plain) =
        RedisServer::start_or_skip("an_unusable_redis_is_named_and_the_replica_still_serves")
    else {
        return;
    };
    let guarded = RedisServer::start_with(&["--requirepass", "the-password"]);
    let upstream = stand_in(|_| {}).await;
    let secret = SecretFile::new();
    let client = client();
    // WeChat's minute: a start without Redis used to refuse every call until the next one.
    let quota = "[quota]\nper_window = 600\nmax_wait_ms = 1000\n";
    for case in unusable(&plain, &guarded).await {
        let wxgate = ChildWxgate::start(&cluster_config_text(&upstream, &case.url, &secret, quota));
        for i in 0..3 {
            let code = format!("code-unusable-{}-{i}", case.cause);
            let answer = client
                .get(wxgate.url(&jscode2session(APPID, SECRET, &code)))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            let body = answer.bytes().await.unwrap();
            assert_eq!(
                (status, errcode(&body)),
                (200, 0),
                "call {i} with {}: {}",
                case.what,
                String::from_utf8_lossy(&body)
            );
        }
        let log = wxgate.log();
        let start = log
            .iter()
            .find(|line| line.contains("Redis unavailable at start"))
            .unwrap_or_else(|| panic!("{}: no start line in\n{}", case.what, log.join("\n")));
        assert!(
            start.contains(case.cause),
            "{}: the cause ({}) is not named: {start}",
            case.what,
            case.cause
        );
        assert!(!start.contains("the-password") && !start.contains("not-the-password"));
    }
}

/// `check-config --connect` tries the connection: 0 and what answered for a usable Redis;
/// 1 and the cause for each unusable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_says_why_redis_cannot_be_used() {
    let Some(plain) =
        RedisServer::start_or_skip("check_config_connect_says_why_redis_cannot_be_used")
    else {
        return;
    };
    let guarded = RedisServer::start_with(&["--requirepass", "the-password"]);
    let upstream = stand_in(|_| {}).await;
    let secret = SecretFile::new();
    let cases = unusable(&plain, &guarded).await;
    let mut urls = vec![
        plain.url(),
        format!("redis://:the-password@{}", guarded.addr()),
    ];
    urls.extend(cases.iter().map(|case| case.url.clone()));
    let configs: Vec<String> = urls
        .iter()
        .map(|url| cluster_config_text(&upstream, url, &secret, ""))
        .collect();
    let outputs = tokio::task::spawn_blocking(move || {
        configs
            .iter()
            .map(|config| check_config_connect(config))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (code, text) in &outputs[..2] {
        assert_eq!(*code, Some(0), "{text}");
        assert!(text.contains("Redis answered"), "{text}");
        assert!(!text.contains("the-password"), "{text}");
    }
    for ((code, text), case) in outputs[2..].iter().zip(&cases) {
        assert_eq!(*code, Some(1), "{}: {text}", case.what);
        assert!(
            text.contains(case.cause),
            "{}: the cause ({}) is not named: {text}",
            case.what,
            case.cause
        );
        assert!(!text.contains("the-password"), "{text}");
    }
}

/// Runs `wxgate check-config --connect` on `config`: its exit code and what it printed.
fn check_config_connect(config: &str) -> (Option<i32>, String) {
    let path = std::env::temp_dir().join(format!(
        "wxgate-connect-{}-{}.toml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, config).unwrap();
    let output = Command::new(WXGATE)
        .args(["check-config", "--connect", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code(), text)
}
