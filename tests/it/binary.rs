//! The `wxgate` binary as an operator runs it: the command line and its exit codes,
//! `check-config`, serving from a config file, logs that never hold a secret, and SIGTERM
//! draining to exit 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use wxgate_stand_in::Fault;

const WXGATE: &str = env!("CARGO_BIN_EXE_wxgate");

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wxgate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `check-config` on `path`, which must be refused with exit 64; its stderr.
fn check_config_refuses(path: &std::path::Path) -> String {
    let output = Command::new(WXGATE)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn check_config_names_every_problem_and_exits_64() {
    let path = temp_config(
        "bad.toml",
        r#"
[server]
listen = "nowhere"
max_body_bytes = 0
[upstream]
base_url = "ftp://x"
timout_ms = 5
[quota]
per_window = 10
burst = 11
[surprise]
"#,
    );
    let stderr = check_config_refuses(&path);
    for needle in [
        "server.listen",
        "server.max_body_bytes",
        "upstream.base_url",
        "upstream.timout_ms: unknown key",
        "quota.burst",
        "surprise: unknown key",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }

    // Serving with the same file fails the same way, before binding anything.
    let output = Command::new(WXGATE)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));

    // A missing file is an invalid configuration too.
    let output = Command::new(WXGATE)
        .args(["check-config", "--config", "/nonexistent/wxgate.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_at_once_without_values() {
    let path = temp_config(
        "unknown.toml",
        r#"
colour = "blue"
[server]
lisen = "127.0.0.1:1"
max_body_bytes = "s3cr3t-in-a-number"
[upstream]
timout_ms = 5
base_url = 987654321
[quota]
per_windw = 10
[quota.appids.wx00000000000000a1]
brust = 1
[retry]
max_hold_ms = 1000
"#,
    );
    let stderr = check_config_refuses(&path);
    for needle in [
        "colour: unknown key",
        "server.lisen: unknown key",
        "upstream.timout_ms: unknown key",
        "quota.per_windw: unknown key",
        "quota.appids.wx00000000000000a1.brust: unknown key",
        "server.max_body_bytes: expected an integer, found string",
        "upstream.base_url: expected a string, found integer",
        "retry.max_hold_ms: 1000 is shorter than quota.window_secs (60 s)",
        "(8 problems)",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    assert!(!stderr.contains("s3cr3t"), "a value is echoed:\n{stderr}");
    assert!(
        !stderr.contains("987654321"),
        "a value is echoed:\n{stderr}"
    );
}

#[test]
fn help_and_version_exit_0_and_bad_usage_exits_64() {
    for flag in ["--help", "-h"] {
        let output = Command::new(WXGATE).arg(flag).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{flag}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        for needle in [
            "Usage: wxgate",
            "check-config",
            "--config <PATH>",
            "RUST_LOG",
        ] {
            assert!(
                stdout.contains(needle),
                "{flag}: {needle} missing:\n{stdout}"
            );
        }
    }
    let output = Command::new(WXGATE)
        .args(["check-config", "--help"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("Usage: wxgate check-config"));
    for flag in ["--version", "-V"] {
        let output = Command::new(WXGATE).arg(flag).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{flag}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("wxgate {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
    for args in [
        &["--surprise"][..],
        &["check-config", "--surprise"],
        &["check-config", "extra"],
        &["--config"],
        &["nonsense"],
    ] {
        let output = Command::new(WXGATE).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("error:") && stderr.contains("Usage: wxgate"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn config_is_accepted_before_or_after_the_subcommand() {
    let path = temp_config("where.toml", "[server]\nlisten = \"127.0.0.1:18080\"\n");
    let path = path.to_str().unwrap();
    for args in [
        ["check-config", "--config", path],
        ["--config", path, "check-config"],
        ["-c", path, "check-config"],
    ] {
        let output = Command::new(WXGATE).args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("listen = \"127.0.0.1:18080\""),
            "{args:?}: {stdout}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_configuration_masked() {
    let path = temp_config(
        "good.toml",
        "[upstream]\nbase_url = \"https://ops:s3cr3t-pass@wechat.internal\"\n",
    );
    let output = Command::new(WXGATE)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:8080\""), "{stdout}");
    assert!(stdout.contains("per_window = "), "{stdout}");
    assert!(stdout.contains("ops:***@wechat.internal"), "{stdout}");
    assert!(!stdout.contains("s3cr3t-pass"), "{stdout}");
}

#[test]
fn the_shipped_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let output = Command::new(WXGATE)
        .args(["check-config", "--config", shipped])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A full run of the binary: traffic carrying every kind of secret, upstream failures,
/// local refusals; then SIGTERM with a request in flight. The captured logs (at debug level,
/// for every crate) hold none of the secrets, one line per request, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_secret_and_sigterm_drains_to_exit_0() {
    logs_hold_no_secret(false).await;
}

/// The same with `log.format = "json"`: every line parses as JSON, the access lines carry
/// their fields and the request id the client saw, and no secret is in any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_no_secret_and_carry_the_request_id() {
    logs_hold_no_secret(true).await;
}

async fn logs_hold_no_secret(json: bool) {
    let upstream = stand_in(|_| {}).await;
    let path = temp_config(
        "serve.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 5000\n{}",
            config_text(
                &upstream.base_url(),
                if json { "[log]\nformat = \"json\"\n" } else { "" }
            )
        ),
    );
    let mut child = Command::new(WXGATE)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (serving_tx, serving_rx) = std::sync::mpsc::channel::<String>();
    let reader = {
        let lines = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("wxgate serving") {
                    let _ = serving_tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        })
    };
    let serving = serving_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("wxgate says where it serves");
    let field = |name: &str| -> String {
        if json {
            let line: serde_json::Value = serde_json::from_str(&serving).unwrap();
            return line[name].as_str().unwrap().to_owned();
        }
        log_field(&serving, name)
    };
    let base = format!("http://{}", field("proxy"));
    let admin = format!("http://{}", field("admin"));
    let client = client();

    let secrets = [
        SECRET,
        "code-with-secret-value-1",
        "wrong-secret-value-xyz",
        "access-token-value-abc",
        COMPONENT_TOKEN,
        "component-token-wrong-qrs",
    ];
    let mut requests = 0;
    // Successful exchanges; their session_keys must not be logged either.
    let mut session_keys = Vec::new();
    for path in [
        jscode2session(APPID, SECRET, "code-with-secret-value-1"),
        format!(
            "{}&access_token=access-token-value-abc",
            jscode2session(APPID, SECRET, "code-with-secret-value-2")
        ),
        component_jscode2session(
            APPID,
            COMPONENT_APPID,
            COMPONENT_TOKEN,
            "code-with-secret-value-3",
        ),
    ] {
        let body: serde_json::Value = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        session_keys.push(body["session_key"].as_str().expect("a session").to_owned());
        requests += 1;
    }
    // A replay (cache hit), a wrong secret, a wrong component token, a token fetch.
    for path in [
        jscode2session(APPID, SECRET, "code-with-secret-value-1"),
        jscode2session(APPID, "wrong-secret-value-xyz", "code-with-secret-value-4"),
        component_jscode2session(
            APPID,
            COMPONENT_APPID,
            "component-token-wrong-qrs",
            "code-with-secret-value-5",
        ),
        format!("/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}"),
    ] {
        let answer = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        requests += 1;
    }
    // A client's own request id comes back, and names its line in the log.
    let client_request_id = "client-chosen-id-42";
    let answer = client
        .get(format!(
            "{base}{}",
            jscode2session(APPID, SECRET, "code-with-secret-value-1")
        ))
        .header("x-request-id", client_request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["x-request-id"], client_request_id);
    requests += 1;

    // Local refusals and upstream failures, whose error paths must not leak either.
    let answer = client
        .get(format!(
            "{base}/sns/jscode2session?appid={APPID}&secret={SECRET}&grant_type=authorization_code"
        ))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], 41008);
    requests += 1;
    // Two resets: the first on the connection kept alive from the calls above, which wxgate
    // takes for a server closing an idle connection and sends again on a new one, which fails
    // too.
    upstream.push_faults([Fault::Reset, Fault::Reset]);
    let answer = client
        .get(format!(
            "{base}{}",
            jscode2session(APPID, SECRET, "code-with-secret-value-6")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 502);
    let body = answer.text().await.unwrap();
    assert!(
        !body.contains(SECRET) && !body.contains("code-with-secret-value-6"),
        "{body}"
    );
    requests += 1;

    // One request in flight when SIGTERM arrives: it still gets its answer.
    upstream.push_faults([Fault::Delay(Duration::from_millis(800))]);
    let slow = {
        let client = client.clone();
        let url = format!(
            "{base}{}",
            jscode2session(APPID, SECRET, "code-with-secret-value-7")
        );
        tokio::spawn(async move { client.get(url).send().await })
    };
    while upstream.code_calls("code-with-secret-value-7") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    requests += 1;
    let metrics = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The shell's builtin `kill`, so no procps package is needed.
    let status = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let answer = slow
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    session_keys.push(body["session_key"].as_str().unwrap().to_owned());

    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "SIGTERM drains and exits 0");
    reader.join().unwrap();

    let log = lines.lock().unwrap().join("\n");
    for secret in secrets.iter().map(|s| s.to_string()).chain(session_keys) {
        assert!(!log.contains(&secret), "the log holds {secret}:\n{log}");
        assert!(!metrics.contains(&secret), "the metrics hold {secret}");
    }
    let access_lines = log.lines().filter(|l| l.contains("wxgate::access")).count();
    assert_eq!(access_lines, requests, "one line per request:\n{log}");
    if json {
        check_json_log(&log, client_request_id);
        return;
    }
    let hit = log
        .lines()
        .find(|l| l.contains("outcome=cache_hit"))
        .unwrap_or_else(|| panic!("the replay is logged as a cache hit:\n{log}"));
    for field in [
        "method=GET",
        "api=/sns/jscode2session",
        "status=200",
        "duration_ms=",
    ] {
        assert!(hit.contains(field), "{field} missing from {hit}");
    }
    assert!(
        log.contains("errcode=40125"),
        "the wrong secret's errcode is logged"
    );
    assert!(log.contains("SIGTERM"), "{log}");
}

/// `[cluster]` in `check-config`: validated (URL form, a secret long enough), its Redis
/// password and its secret never printed, from the file or from the environment.
#[test]
fn check_config_validates_the_cluster_section_and_masks_its_secrets() {
    let secret = "cluster-secret-".repeat(4);
    let secret_path = temp_config("cluster.key", &format!("{secret}\n"));
    let path = temp_config(
        "cluster.toml",
        &format!(
            "[cluster]\nredis_url = \"redis://:hunter2@127.0.0.1:6379/0\"\nsecret_file = \"{}\"\n",
            secret_path.display()
        ),
    );
    let output = Command::new(WXGATE)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("redis_url = \"redis://:***@127.0.0.1:6379/0\""),
        "{stdout}"
    );
    assert!(
        !stdout.contains("hunter2") && !stdout.contains(&secret),
        "{stdout}"
    );

    // The password and the secret from the environment; a short secret refused unquoted.
    let path = temp_config(
        "cluster-env.toml",
        "[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\n",
    );
    let output = Command::new(WXGATE)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("WXGATE_REDIS_PASSWORD", "hunter3")
        .env("WXGATE_CLUSTER_SECRET", "too-short-a-secret")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cluster.secret_file: the cluster secret has 18 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("too-short-a-secret") && !stderr.contains("hunter3"));
    let output = Command::new(WXGATE)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("WXGATE_REDIS_PASSWORD", "hunter3")
        .env("WXGATE_CLUSTER_SECRET", &secret)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("hunter3") && !stdout.contains(&secret),
        "{stdout}"
    );

    let path = temp_config("cluster-bad.toml", "[cluster]\nredis_url = \"http://x\"\n");
    let stderr = check_config_refuses(&path);
    assert!(
        stderr.contains("cluster.redis_url: must be a redis:// or rediss:// URL"),
        "{stderr}"
    );
}

/// Every line of a JSON log is a JSON object; the access lines carry their fields, and the
/// one the client named carries its id.
fn check_json_log(log: &str, client_request_id: &str) {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["target"] == "wxgate::access")
        .collect();
    for line in &access {
        for field in [
            "request_id",
            "method",
            "api",
            "status",
            "errcode",
            "duration_ms",
            "outcome",
        ] {
            assert!(!line[field].is_null(), "{field} missing from {line}");
        }
    }
    let named = access
        .iter()
        .find(|line| line["request_id"] == client_request_id)
        .unwrap_or_else(|| panic!("no line carries the client's id:\n{log}"));
    assert_eq!(named["outcome"], "cache_hit");
    assert_eq!(named["api"], "/sns/jscode2session");
    assert!(access.iter().any(|line| line["errcode"] == "40125"));
}

/// A file larger than wxgate reads (a sparse file of 64 MiB, then `/dev/zero`, which never
/// ends) where the configuration names a file is refused by `check-config`, and at start,
/// with the key named and nothing of the file quoted; the configuration file itself too.
#[test]
fn files_larger_than_the_limit_are_refused_by_their_key() {
    let large = temp_config("large.pem", "");
    std::fs::File::options()
        .write(true)
        .open(&large)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cases = |file: &std::path::Path| {
        let file = file.display();
        [
            (
                "upstream.ca_file",
                format!("[upstream]\nca_file = \"{file}\"\n"),
            ),
            (
                "server.tls.cert_file",
                format!("[server.tls]\ncert_file = \"{file}\"\nkey_file = \"{file}\"\n"),
            ),
            (
                "cluster.secret_file",
                format!(
                    "[cluster]\nredis_url = \"redis://127.0.0.1:1\"\nsecret_file = \"{file}\"\n"
                ),
            ),
        ]
    };
    for file in [large.as_path(), std::path::Path::new("/dev/zero")] {
        for (key, text) in cases(file) {
            let path = temp_config("names-a-large-file.toml", &text);
            let stderr = check_config_refuses(&path);
            assert!(
                stderr.contains(&format!("{key}: is larger than 4 MiB")),
                "{key}: {stderr}"
            );
            let start = Command::new(WXGATE)
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert_eq!(start.status.code(), Some(64), "{key}");
            let stderr = String::from_utf8_lossy(&start.stderr);
            assert!(stderr.contains(key), "{key}: {stderr}");
        }
        let stderr = check_config_refuses(file);
        assert!(stderr.contains("is larger than 4 MiB"), "{stderr}");
    }
    let _ = std::fs::remove_file(&large);
}
