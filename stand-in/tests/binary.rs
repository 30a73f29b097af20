//! The `wxgate-stand-in` binary: it serves on the port it says, enforces the quota and the
//! limits it was given, injects the faults it was given, and its stats page counts the calls per window
//! and the faults; a bad command line exits 64.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use serde_json::Value;
use wxgate_stand_in::{DEFAULT_APPID, DEFAULT_APP_SECRET, JSCODE2SESSION_PATH, STATS_PATH};

/// The binary, killed when dropped.
struct Running {
    child: Child,
    base_url: String,
    /// Kept open: the binary's stdout is a pipe to this test.
    _stdout: BufReader<ChildStdout>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate-stand-in"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        stdout
            .read_line(&mut line)
            .expect("the binary writes its address");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line: {line:?}"))
            .trim();
        let base_url = format!("http://{addr}");
        Running {
            child,
            base_url,
            _stdout: stdout,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let answer = client.get(url).send().await.expect("the binary answers");
    assert_eq!(answer.status().as_u16(), 200);
    let text = answer.text().await.expect("the body reads");
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

#[tokio::test]
async fn serves_the_quota_it_was_given_and_counts_calls_per_window() {
    // A window of an hour: the three calls below cannot straddle a boundary by chance
    // unless they run across the turn of the hour, which the assertions tolerate.
    let running = Running::start(&["--quota-per-window", "2", "--window-secs", "3600"]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut errcodes = Vec::new();
    for code in ["bin-1", "bin-2", "bin-3"] {
        let url = format!(
            "{}{JSCODE2SESSION_PATH}?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={code}&grant_type=authorization_code",
            running.base_url
        );
        let body = get_json(&client, &url).await;
        errcodes.push(body["errcode"].as_i64().unwrap_or(0));
    }

    let stats = get_json(&client, &format!("{}{STATS_PATH}", running.base_url)).await;
    assert_eq!(stats["window_ms"], 3_600_000);
    assert_eq!(stats["quota_per_window"], 2);
    assert_eq!(
        stats["total_calls"], 3,
        "the stats page is not a call: {stats}"
    );
    let windows = stats["windows"].as_array().expect("windows");
    let calls: u64 = windows.iter().map(|w| w["calls"].as_u64().unwrap()).sum();
    let refused: u64 = windows
        .iter()
        .map(|w| w["answered_45011"].as_u64().unwrap())
        .sum();
    assert_eq!(calls, 3, "{stats}");
    assert_eq!(
        refused,
        errcodes.iter().filter(|errcode| **errcode == 45011).count() as u64
    );
    assert_eq!(stats["answers"]["45011"].as_u64().unwrap_or(0), refused);
    for window in windows {
        assert_eq!(window["appid"], DEFAULT_APPID);
        assert_eq!(window["path"], JSCODE2SESSION_PATH);
        assert_eq!(window["start_unix_ms"].as_u64().unwrap() % 3_600_000, 0);
        assert!(window["calls"].as_u64().unwrap() <= 3);
    }
    if windows.len() == 1 {
        // All in one window: two executed, the third over the quota.
        assert_eq!(errcodes, [0, 0, 45011]);
    }
}

#[tokio::test]
async fn serves_the_daily_and_per_api_limits_it_was_given() {
    let running = Running::start(&[
        "--daily-limit",
        &format!("{JSCODE2SESSION_PATH}@{DEFAULT_APPID}=1"),
        "--rate-limit=/wxa/business=20/3",
        "--user-rate-limit=off",
        "--day-secs",
        "86400",
    ]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut errcodes = Vec::new();
    for code in ["day-1", "day-2"] {
        let url = format!(
            "{}{JSCODE2SESSION_PATH}?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={code}&grant_type=authorization_code",
            running.base_url
        );
        let body = get_json(&client, &url).await;
        errcodes.push(body["errcode"].as_i64().unwrap_or(0));
    }
    // A day is 86,400 s: both calls fall in one unless they straddle midnight UTC+8, when
    // the second is served too.
    assert!(errcodes == [0, 45009] || errcodes == [0, 0], "{errcodes:?}");

    let stats = get_json(&client, &format!("{}{STATS_PATH}", running.base_url)).await;
    assert_eq!(stats["day_ms"], 86_400_000, "{stats}");
    assert_eq!(stats["user_rate_limit"], Value::Null, "{stats}");
    let limits = stats["api_limits"].as_array().expect("api_limits");
    assert_eq!(limits.len(), 2, "{stats}");
    assert_eq!(limits[0]["path"], JSCODE2SESSION_PATH);
    assert_eq!(limits[0]["appid"], DEFAULT_APPID);
    assert_eq!(limits[0]["daily_limit"], 1);
    assert_eq!(limits[1]["rate_limit"]["call_count"], 20);
    assert_eq!(limits[1]["rate_limit"]["refresh_second"], 3);
}

#[tokio::test]
async fn injects_the_faults_it_was_given_and_counts_them() {
    let running = Running::start(&["--faults", "busy=1", "--no-call-log"]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for code in ["fault-1", "fault-2"] {
        let url = format!(
            "{}{JSCODE2SESSION_PATH}?appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}&js_code={code}&grant_type=authorization_code",
            running.base_url
        );
        let body = get_json(&client, &url).await;
        assert_eq!(body["errcode"], -1, "{body}");
    }
    let stats = get_json(&client, &format!("{}{STATS_PATH}", running.base_url)).await;
    assert_eq!(stats["faults"]["busy"], 2, "{stats}");
    assert_eq!(stats["answers"]["-1"], 2, "{stats}");
    assert_eq!(stats["total_calls"], 2, "{stats}");
}

#[test]
fn a_bad_command_line_exits_64_with_the_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_wxgate-stand-in"))
        .args(["--quota-per-window", "none"])
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--quota-per-window"), "{stderr}");
    assert!(stderr.contains("usage: wxgate-stand-in"), "{stderr}");
}
