//! Reloading the configuration of a running wxgate (the binary): `SIGHUP` and `wxgate
//! reload` apply new quotas to the buckets in use with queued requests all answered, refuse a
//! broken file whole while traffic goes on, and name what needs a restart.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::child::ChildWxgate;
use crate::support::*;
use futures_util::future::join_all;

const WXGATE: &str = env!("CARGO_BIN_EXE_wxgate");

/// A quota lowered by `SIGHUP` while requests wait for their turn: every queued request is
/// answered, and from the reload on no window holds more than the new quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_lowers_the_quota_with_queued_requests_answered() {
    let upstream = stand_in(|_| {}).await;
    let quota = |per_window: u32, burst: u32| {
        config_text(
            &upstream.base_url(),
            &format!("[quota]\nwindow_secs = 1\nper_window = {per_window}\nburst = {burst}\nmax_wait_ms = 30000\n"),
        )
    };
    let wxgate = ChildWxgate::start(&quota(20, 20));
    let client = client();
    let exchange = |code: String| {
        let client = client.clone();
        let url = wxgate.url(&jscode2session(APPID, SECRET, &code));
        async move {
            let answer = client.get(url).send().await.unwrap();
            (
                answer.status().as_u16(),
                errcode(&answer.bytes().await.unwrap()),
            )
        }
    };
    // The burst is spent; 24 more queue behind it.
    for i in 0..20 {
        assert_eq!(exchange(format!("code-before-{i}")).await, (200, 0));
    }
    let queued = join_all((0..24).map(|i| exchange(format!("code-queued-{i}"))));
    let reload = async {
        while upstream.calls("/sns/jscode2session") < 21 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        wxgate.rewrite(&quota(6, 1));
        wxgate.hangup();
        wxgate.wait_for_log_count("configuration reloaded", 1, Duration::from_secs(10));
        SystemTime::now()
    };
    let (answers, reloaded_at) = tokio::join!(queued, reload);
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    // Windows that began after the reload hold at most the new quota.
    let first_new_window = reloaded_at.duration_since(UNIX_EPOCH).unwrap().as_secs() + 1;
    let mut windows: BTreeMap<u64, u64> = BTreeMap::new();
    for call in upstream.call_log() {
        let second = call.at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        *windows.entry(second).or_default() += 1;
    }
    let after: Vec<u64> = windows.range(first_new_window..).map(|(_, n)| *n).collect();
    assert!(!after.is_empty(), "{windows:?}");
    assert!(after.iter().all(|n| *n <= 6), "{windows:?}");
    let text = reqwest::get(format!("http://{}/metrics", wxgate.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            "wxgate_config_reloads_total",
            &[("result", "success")]
        ),
        2.0
    );
    assert!(
        metric(
            &text,
            "wxgate_config_last_reload_success_timestamp_seconds",
            &[]
        ) > 1e9
    );
}

/// A broken file is refused whole, every problem logged, the running configuration kept and
/// traffic unaffected; `wxgate reload` says so and exits 1, then applies a good file and
/// names what needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_is_refused_and_wxgate_reload_reports() {
    let upstream = stand_in(|_| {}).await;
    let good = config_text(&upstream.base_url(), "[quota]\nper_window = 100\n");
    let wxgate = ChildWxgate::start(&good);
    let client = client();
    wxgate.rewrite("[quota]\nper_window = \"many\"\nburts = 3\n");
    wxgate.hangup();
    wxgate.wait_for_log_count("reload refused", 2, Duration::from_secs(10));
    // Counted just after the problems are logged: read until it shows.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(format!("http://{}/metrics", wxgate.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&text, "wxgate_config_last_reload_successful", &[]) == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = wxgate.log().join("\n");
    assert!(log.contains("quota.per_window"), "{log}");
    assert!(log.contains("quota.burts: unknown key"), "{log}");
    let answer = client
        .get(wxgate.url(&jscode2session(APPID, SECRET, "code-after-refusal")))
        .send()
        .await
        .unwrap();
    assert_eq!(errcode(&answer.bytes().await.unwrap()), 0);

    // `wxgate reload` with the admin port from the file; a file that does not even parse is
    // refused before anything is sent.
    let reload = || {
        Command::new(WXGATE)
            .args(["reload", "--config"])
            .arg(&wxgate.config_path)
            .output()
            .unwrap()
    };
    let refused = reload();
    assert_eq!(refused.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("quota.burts: unknown key"));

    // A good file with a change that needs a restart: applied but for that key.
    wxgate.rewrite(
        &format!("{good}[code_cache]\nttl_secs = 30\n")
            .replace("timeout_ms = 2000", "timeout_ms = 3000"),
    );
    let applied = reload();
    assert_eq!(applied.status.code(), Some(0), "{applied:?}");
    let stdout = String::from_utf8_lossy(&applied.stdout);
    assert!(
        stdout.contains("kept until a restart: upstream"),
        "{stdout}"
    );
    let text = reqwest::get(format!("http://{}/metrics", wxgate.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            "wxgate_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
    // The last reload succeeded again: the failure before it no longer counts as the last.
    assert_eq!(
        metric(&text, "wxgate_config_last_reload_successful", &[]),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "wxgate_config_reloads_total",
            &[("result", "success")]
        ),
        2.0
    );
}

/// `POST /-/reload` on the admin port: its status and text (`within` bounds the wait: a
/// reload that never answers fails the test instead of hanging it).
async fn post_reload(admin: std::net::SocketAddr, within: Duration) -> (u16, String) {
    let answer = reqwest::Client::builder()
        .timeout(within)
        .build()
        .unwrap()
        .post(format!("http://{admin}/-/reload"))
        .send()
        .await
        .expect("the reload is answered");
    (answer.status().as_u16(), answer.text().await.unwrap())
}

/// The configuration file replaced by a FIFO that nobody writes (a read that hangs, as on a
/// hung NFS or FUSE mount): the reload reads it off the runtime, so meanwhile requests,
/// `/healthz` and a second reload are answered, the reload itself is answered "timed out" at
/// its deadline and counted as a failure, a reload of a good file applies although the first
/// read still hangs, and SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_file_hangs_stops_nothing() {
    let upstream = stand_in(|_| {}).await;
    let good = config_text(&upstream.base_url(), "");
    let mut wxgate = ChildWxgate::start(&good);
    std::fs::remove_file(&wxgate.config_path).unwrap();
    let made = Command::new("mkfifo")
        .arg(&wxgate.config_path)
        .status()
        .unwrap();
    assert!(made.success());
    // Two reloads at once: one reads the FIFO and waits, the other is answered at once.
    let admin = wxgate.admin;
    let reloads =
        [0, 1].map(|_| tokio::spawn(post_reload(admin, EVENTUALLY + Duration::from_secs(10))));
    let (done, _, pending) = futures_util::future::select_all(reloads).await;
    let second = done.unwrap();
    assert_eq!(second.0, 409, "{second:?}");
    assert!(second.1.contains("a reload is in progress"), "{second:?}");
    let first = pending.into_iter().next().unwrap();
    let client = reqwest::Client::builder()
        .timeout(EVENTUALLY)
        .build()
        .unwrap();
    for i in 0..3 {
        let answer = client
            .get(wxgate.url(&jscode2session(APPID, SECRET, &format!("code-hung-{i}"))))
            .send()
            .await
            .expect("a request is answered while a reload hangs");
        assert_eq!(errcode(&answer.bytes().await.unwrap()), 0);
    }
    let health = client
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .expect("/healthz answers while a reload hangs");
    assert_eq!(health.status(), 200);

    let (status, text) = first.await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("timed out"), "{text}");
    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wxgate_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "wxgate_config_last_reload_successful", &[]),
        0.0
    );

    // The path holds a file again: a reload applies, though the first read still hangs.
    std::fs::remove_file(&wxgate.config_path).unwrap();
    wxgate.rewrite(&good);
    let third = post_reload(admin, EVENTUALLY).await;
    assert_eq!(third, (200, "reloaded\n".to_owned()));

    assert_eq!(wxgate.terminate(EVENTUALLY), Some(0));
}

/// A reload pending on a hung file when SIGTERM arrives: wxgate drains and exits 0 without
/// waiting for the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hung_reload_exits_0() {
    let upstream = stand_in(|_| {}).await;
    let mut wxgate = ChildWxgate::start(&config_text(&upstream.base_url(), ""));
    std::fs::remove_file(&wxgate.config_path).unwrap();
    let made = Command::new("mkfifo")
        .arg(&wxgate.config_path)
        .status()
        .unwrap();
    assert!(made.success());
    wxgate.hangup();
    wxgate.wait_for_log_count("SIGHUP received", 1, EVENTUALLY);
    assert_eq!(wxgate.terminate(EVENTUALLY), Some(0));
}

/// A reload of a file that names a file larger than wxgate reads (a sparse file of 64 MiB,
/// then `/dev/zero`, which never ends) is refused with the key named, and the running
/// configuration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_naming_a_file_too_large_is_refused_by_its_key() {
    let upstream = stand_in(|_| {}).await;
    let good = config_text(&upstream.base_url(), "");
    let wxgate = ChildWxgate::start(&good);
    let large = wxgate.config_path.with_extension("large.pem");
    std::fs::File::create(&large)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let files = [large.display().to_string(), "/dev/zero".to_owned()];
    for (i, file) in files.into_iter().enumerate() {
        wxgate.rewrite(&good.replace(
            "[upstream]\n",
            &format!("[upstream]\nca_file = \"{file}\"\n"),
        ));
        let (status, text) = post_reload(wxgate.admin, EVENTUALLY).await;
        assert_eq!(status, 400, "{text}");
        assert!(
            text.contains("upstream.ca_file: is larger than 4 MiB"),
            "{text}"
        );
        let answer = client()
            .get(wxgate.url(&jscode2session(APPID, SECRET, &format!("code-after-{i}"))))
            .send()
            .await
            .unwrap();
        assert_eq!(errcode(&answer.bytes().await.unwrap()), 0);
    }
    let _ = std::fs::remove_file(&large);
}
