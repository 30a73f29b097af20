//! `wxgate demo`: a short run in-process whose numbers must add up and agree with wxgate's
//! `/metrics`, and the binary as a user runs it: the table, `--keep-running` until SIGTERM,
//! and a clear error for a port that is taken.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{client, jscode2session, metric, APPID, SECRET};
use wxgate::{DemoOptions, DemoReport};
use wxgate_demo::{Outcome, RetryReason, TokenOutcome};
use wxgate_stand_in::CHECKED_API_PATH;

const WXGATE: &str = env!("CARGO_BIN_EXE_wxgate");

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Six seconds over one-second windows: long enough for several full windows, so that
/// WeChat's 45011 happens whatever the phase of the run against the windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_adds_up_agrees_with_metrics_and_exercises_every_path() {
    let options = DemoOptions {
        duration: Duration::from_secs(6),
        keep_running: false,
        listen: any_port(),
        admin_listen: any_port(),
        window_secs: 1,
    };
    let report: DemoReport = wxgate::run_demo(options, std::future::pending())
        .await
        .expect("the demo runs");
    assert!(report.adds_up(), "{report}");
    assert!(
        report.disagreements().is_empty(),
        "{:?}\n{report}",
        report.disagreements()
    );

    // The identity, term by term from the raw /metrics text (parsed here independently of
    // the demo's own parser) and the stand-in's count.
    let text = &report.metrics_text;
    let outcome = |o: Outcome| metric(text, "wxgate_requests_total", &[("outcome", o.label())]);
    let requests: f64 = Outcome::ALL.iter().map(|&o| outcome(o)).sum();
    // wxgate counts a retry when it is sent; a token refresh ahead of expiry is a call that
    // no client request made.
    let retries = metric(text, "wxgate_retries_total", &[]);
    let refreshes = metric(
        text,
        "wxgate_token_requests_total",
        &[("outcome", TokenOutcome::Refreshed.label())],
    );
    // So is a quota/get wxgate sends to learn a limit WeChat states (those not sent, for
    // want of a quota turn, reached nobody).
    let limit_queries = metric(text, "wxgate_quota_discovery_queries_total", &[])
        - metric(
            text,
            "wxgate_quota_discovery_queries_total",
            &[("result", "not_sent")],
        );
    let own_calls = refreshes + limit_queries;
    let answered = metric(text, "wxgate_upstream_requests_total", &[]);
    let unanswered = metric(text, "wxgate_upstream_transport_errors_total", &[]);
    assert_eq!(requests as u64, report.client.requests, "{report}");
    assert_eq!(
        (answered + unanswered) as u64,
        report.upstream_calls,
        "{report}"
    );
    assert_eq!(
        report.upstream_calls as f64 - retries - own_calls
            + outcome(Outcome::CacheHit)
            + outcome(Outcome::Coalesced)
            + outcome(Outcome::LocalLimit)
            + outcome(Outcome::Rejected),
        requests,
        "{report}"
    );
    assert_eq!(
        report.upstream_calls as f64 - retries - own_calls,
        outcome(Outcome::Forwarded) + outcome(Outcome::UpstreamError),
        "every request that reached WeChat made one call plus its retries\n{report}"
    );

    // Everything the demo is there to show happened: one limit WeChat stated, one learned.
    let source = |api: &str| {
        report
            .limits
            .iter()
            .find(|limit| limit.api == api)
            .map(|limit| limit.source.as_str())
    };
    assert_eq!(source(CHECKED_API_PATH), Some("wechat"), "{report}");
    assert_eq!(source("/sns/jscode2session"), Some("learned"), "{report}");
    let m = &report.metrics;
    assert!(m.outcome(Outcome::CacheHit) > 0, "replays hit\n{report}");
    assert!(
        m.outcome(Outcome::Coalesced) > 0,
        "double submits coalesce\n{report}"
    );
    assert!(m.quota_waits > 0, "calls wait for quota\n{report}");
    assert!(
        m.retries(RetryReason::MinuteQuota) > 0 && m.upstream_45011 > 0,
        "WeChat's 45011 is absorbed\n{report}"
    );
    assert!(
        m.outcome(Outcome::LocalLimit) > 0,
        "the burst is limited\n{report}"
    );
    assert!(
        m.outcome(Outcome::Rejected) > 0,
        "the empty code is refused\n{report}"
    );
    assert!(
        m.retries(RetryReason::SystemBusy) > 0,
        "-1 is retried\n{report}"
    );
    assert!(m.transport_errors > 0, "a reset is seen\n{report}");
    assert_eq!(report.client.wrong_secret, 1, "{report}");
    assert!(report.client.invalid_code > 0, "{report}");
    assert_eq!(report.client.code_used, 0, "no code is burnt\n{report}");
    assert_eq!(report.client.no_answer, 0, "{report}");
    // The token backends share one token: few fetches reach WeChat, none is refused.
    let tokens = report.tokens;
    assert!(tokens.calls > 0, "{report}");
    assert_eq!(tokens.refused, 0, "{report}");
    assert!((1..=3).contains(&report.token_fetches_upstream), "{report}");
    assert!(tokens.fetches >= report.token_fetches_upstream, "{report}");
    let table = report.to_string();
    for needle in [
        "client requests",
        "upstream calls",
        "access-token fetches",
        "the numbers add up",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
}

/// Waits for the child at most `limit`, killing it after that.
fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn the_binary_prints_real_ports_and_a_table_that_adds_up() {
    let child = Command::new(WXGATE)
        .args([
            "demo",
            "--seconds",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wxgate starts");
    let output = wait_with_limit(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    for needle in [
        "wxgate metrics  http://127.0.0.1:",
        "client requests",
        "saved by coalescing",
        "saved by the cache",
        "waited for a quota turn",
        "WeChat 45011 absorbed",
        "errors surfaced to clients",
        "the numbers add up",
        "agree on every outcome",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    assert!(
        !stdout.contains("127.0.0.1:0/") && !stdout.contains("127.0.0.1:0 "),
        "the real ports are printed:\n{stdout}"
    );
    assert!(
        !stderr.contains("wxgate::access"),
        "no per-request log lines:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_running_serves_until_sigterm_then_exits_0() {
    let mut child = Command::new(WXGATE)
        .args([
            "demo",
            "--seconds",
            "2",
            "--keep-running",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wxgate starts");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut all = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            line.clear();
        }
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        all + &rest
    });
    // The table, then where to reach the proxy, then the curl examples.
    let mut proxy = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo says it keeps running");
        if let Some(rest) = line.trim().strip_prefix("proxy    http://") {
            proxy = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("curl -s http://") && line.contains("/metrics") {
            break;
        }
    }
    let proxy = proxy.expect("the proxy address is printed");
    let client = client();
    let url = format!(
        "http://{proxy}{}",
        jscode2session(APPID, SECRET, "after-the-demo-1")
    );
    let first = client.get(&url).send().await.expect("the proxy answers");
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-wxgate-cache"], "miss");
    let body: serde_json::Value = first.json().await.expect("json");
    assert!(body["session_key"].is_string(), "{body}");
    let again = client.get(&url).send().await.expect("the proxy answers");
    assert_eq!(again.headers()["x-wxgate-cache"], "hit");

    let status = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || wait_with_limit(child, Duration::from_secs(20)))
        .await
        .expect("wait");
    let stdout = reader.join().expect("reader");
    assert_eq!(exit.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("the numbers add up"), "{stdout}");
}

#[test]
fn a_taken_port_is_a_clear_error_and_bad_arguments_exit_64() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let child = Command::new(WXGATE)
        .args(["demo", "--seconds", "1", "--admin-listen", "127.0.0.1:0"])
        .arg(format!("--listen={addr}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wxgate starts");
    let output = wait_with_limit(child, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("--listen"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    for args in [
        &["demo", "--seconds", "soon"][..],
        &["demo", "--listen", "localhost"][..],
        &["demo", "--surprise"][..],
    ] {
        let output = Command::new(WXGATE).args(args).output().expect("runs");
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("Usage: wxgate demo"), "{args:?}: {stderr}");
    }
    drop(taken);
}
