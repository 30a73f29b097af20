//! Limits WeChat states and limits learned from it, over real HTTP on loopback: the arrival
//! margin, limits discovered with quota/get, limits learned from 45011 (and the per-user
//! limit that must not teach them), daily quotas answered locally, the same with replicas,
//! and `wxgate quota`. The stand-in's limits are never written into wxgate's configuration
//! unless a test says so.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use wxgate_stand_in::{ApiLimits, RateLimit, StandIn};

use crate::support::tls::TestCa;
use crate::support::*;

const EXCHANGE: &str = "/sns/jscode2session";

/// An API the stand-in limits and checks the token of, unknown to wxgate's `Api`.
const WXA: &str = "/wxa/msg_sec_check";

/// Calls of `path` the stand-in received per aligned window of `window`, in window order.
fn path_calls_per_window(upstream: &StandIn, path: &str, window: Duration) -> Vec<u64> {
    let mut windows: BTreeMap<u128, u64> = BTreeMap::new();
    for call in upstream.call_log().iter().filter(|call| call.path == path) {
        let at = call.at.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        *windows.entry(at / window.as_nanos()).or_default() += 1;
    }
    windows.into_values().collect()
}

/// The share of `limit` the windows of an overload used: the windows between the first and
/// the last (partly idle).
fn middle_use(windows: &[u64], limit: u32) -> f64 {
    assert!(windows.len() >= 4, "too few windows: {windows:?}");
    let middle = &windows[1..windows.len() - 1];
    middle.iter().sum::<u64>() as f64 / (middle.len() as f64 * f64::from(limit))
}

/// An access token of the stand-in's app, fetched through `proxy` (wxgate's token cache
/// answers it, so wxgate knows whose it is).
async fn token_through(client: &reqwest::Client, proxy: &TestProxy) -> String {
    let answer: serde_json::Value = client
        .get(proxy.url(&format!(
            "/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"].as_str().unwrap().to_owned()
}

/// `n` calls of `path` with `token` at once: their statuses and errcodes.
async fn calls_with_token(
    client: &reqwest::Client,
    proxy: &TestProxy,
    path: &str,
    token: &str,
    n: u32,
) -> Vec<(u16, i64)> {
    join_all((0..n).map(|i| {
        let client = client.clone();
        let url = proxy.url(&format!("{path}?access_token={token}&n={i}"));
        async move {
            let answer = client.post(url).body("{}").send().await.unwrap();
            let status = answer.status().as_u16();
            (status, errcode(&answer.bytes().await.unwrap()))
        }
    }))
    .await
}

/// Done when 1: a burst of five times the quota, sent as a new user's first calls (wxgate
/// opens fresh TLS connections to WeChat for the first of them, and reuses them after), in
/// ten runs: no span of one window ever holds more than the quota at the stand-in, where
/// the calls arrive. Without the arrival margin (`arrival_margin_ms = 0`) the first call,
/// slowed by its handshakes, shares a window with the call one window after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_fresh_connections_never_exceeds_the_quota_where_wechat_counts() {
    const QUOTA: u32 = 20;
    let window = Duration::from_secs(1);
    let ca = TestCa::new();
    // Generous for loopback (a fresh handshake adds about a millisecond) so that a busy
    // machine's scheduling does not count as network.
    let margin = 100;
    for run in 0..10 {
        let upstream = stand_in(|c| {
            c.tls = Some(ca.leaf(&["localhost"]));
            c.quota_per_window = Some(QUOTA);
            c.window = window;
        })
        .await;
        let base_url = format!("https://localhost:{}", upstream.addr().port());
        let extra = format!(
            "{}[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nmax_wait_ms = 30000\narrival_margin_ms = {margin}\n[retry]\nmax_hold_ms = 30000\n",
            ca.ca_file_key()
        );
        let proxy = spawn_proxy(config(&config_text(&base_url, &extra))).await;
        let client = client();
        let answers = join_all((0..5 * QUOTA).map(|i| {
            let client = client.clone();
            let proxy = &proxy;
            async move { exchange(&client, proxy, &format!("code-fresh-{run}-{i}")).await }
        }))
        .await;
        assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
        assert!(upstream.tls_connections() >= 1);
        let most = upstream.max_calls_in_any_span(EXCHANGE, APPID, window);
        assert!(
            most <= QUOTA as usize,
            "run {run}: {most} calls arrived within one window"
        );
        assert_eq!(upstream.answers(45011), 0, "run {run}");
    }
}

/// Done when 2: an API whose limit at WeChat (the stand-in: 20 per 2 s) is far below wxgate's
/// configured figure (200): once wxgate holds a token of the appid, it asks quota/get before
/// the first call goes, so a burst of five times the limit meets no 45011 at all, and the
/// windows of the overload use at least 90 % of WeChat's figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_wechat_states_is_used_before_any_45011() {
    const LIMIT: u32 = 20;
    let window = Duration::from_secs(2);
    let upstream = stand_in(|c| {
        c.api_limits = vec![ApiLimits::new(WXA).with_rate_limit(RateLimit::new(LIMIT, window))];
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        "[quota]\nwindow_secs = 2\nper_window = 200\narrival_margin_ms = 50\nmax_wait_ms = 30000\n",
    )))
    .await;
    let client = client();
    let token = token_through(&client, &proxy).await;
    let answers = calls_with_token(&client, &proxy, WXA, &token, 5 * LIMIT).await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    assert!(upstream.quota_queries(WXA, APPID) >= 1);
    let used = middle_use(&path_calls_per_window(&upstream, WXA, window), LIMIT);
    assert!(
        used >= 0.9,
        "the overloaded windows used {used:.2} of WeChat's figure"
    );
    let text = proxy.metrics().await;
    assert!(
        metric(
            &text,
            "wxgate_quota_discovery_queries_total",
            &[("result", "ok")]
        ) >= 1.0
    );
}

/// A platform's calls on an account's behalf (with the `authorizer_access_token` a call
/// through wxgate minted) are held to WeChat's `component_rate_limit`, apart from the
/// account's own calls and their `rate_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_an_accounts_behalf_use_the_component_rate_limit() {
    const OWN: u32 = 40;
    const ON_BEHALF: u32 = 10;
    let window = Duration::from_secs(2);
    let upstream = stand_in(|c| {
        c.api_limits = vec![ApiLimits::new(WXA)
            .with_rate_limit(RateLimit::new(OWN, window))
            .with_component_rate_limit(RateLimit::new(ON_BEHALF, window))];
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        "[quota]\nwindow_secs = 2\nper_window = 200\narrival_margin_ms = 50\nmax_wait_ms = 30000\n",
    )))
    .await;
    let client = client();
    let answer: serde_json::Value = client
        .post(proxy.url(&format!(
            "/cgi-bin/component/api_authorizer_token?component_access_token={COMPONENT_TOKEN}"
        )))
        .body(
            serde_json::json!({
                "component_appid": COMPONENT_APPID,
                "authorizer_appid": APPID,
                "authorizer_refresh_token": "refresh",
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["authorizer_access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let answers = calls_with_token(&client, &proxy, WXA, &token, 3 * ON_BEHALF).await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    let windows = path_calls_per_window(&upstream, WXA, window);
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(ON_BEHALF)),
        "{windows:?}"
    );
}

/// Exchanges with fresh codes from `workers` clients, back to back, until `stop`: the
/// answers, all of which the test checks.
fn sustained_exchanges(
    proxy: &TestProxy,
    workers: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tag: &'static str,
) -> tokio::task::JoinSet<Vec<(u16, i64)>> {
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let client = client();
        let url = proxy.url("");
        let stop = stop.clone();
        set.spawn(async move {
            let mut answers = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let code = format!("code-{tag}-{worker}-{n}");
                n += 1;
                let answer = client
                    .get(format!("{url}{}", jscode2session(APPID, SECRET, &code)))
                    .send()
                    .await
                    .unwrap();
                let status = answer.status().as_u16();
                answers.push((status, errcode(&answer.bytes().await.unwrap())));
            }
            answers
        });
    }
    set
}

/// The stand-in's calls of `path` per aligned window of `window`: (window start in ns since
/// the epoch, calls, of which answered 45011).
fn windows_of(upstream: &StandIn, path: &str, window: Duration) -> Vec<(u128, u64, u64)> {
    let mut windows: BTreeMap<u128, (u64, u64)> = BTreeMap::new();
    for call in upstream.call_log().iter().filter(|call| call.path == path) {
        let at = call.at.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let entry = windows.entry(at / window.as_nanos()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(call.errcode == Some(45011));
    }
    windows
        .into_iter()
        .map(|(index, (calls, refused))| (index * window.as_nanos(), calls, refused))
        .collect()
}

/// Done when 3: code exchanges, which WeChat states no limit for, with the stand-in's limit
/// (20 a second) at half wxgate's configured figure (40). WeChat answers 45011 in one window
/// at most, wxgate learns what it accepted there and none comes after, and the windows from
/// then on use at least 85 % of the real limit. With the stand-in's limit raised back to 40,
/// wxgate climbs back once the learned figure's hold ends, a step per window: 19 to 36 (90 %)
/// takes 8 windows, as docs/guarantees.md says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_learned_from_45011_holds_then_climbs_back() {
    const REAL: u32 = 20;
    const CONFIGURED: u32 = 40;
    const HOLD_SECS: u64 = 6;
    let window = Duration::from_secs(1);
    let upstream = stand_in(|c| {
        c.quota_per_window = Some(REAL);
        c.window = window;
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {CONFIGURED}\nmax_wait_ms = 60000\nlearned_hold_secs = {HOLD_SECS}\n[retry]\nmax_hold_ms = 60000\n"
        ),
    )))
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = sustained_exchanges(&proxy, 60, stop.clone(), "learn");

    // Phase one: WeChat's 45011 comes, and five windows pass after it (within the hold).
    let text = proxy
        .metrics_until("a limit learned", |text| {
            metric(
                text,
                "wxgate_quota_learned_changes_total",
                &[("direction", "lowered")],
            ) >= 1.0
        })
        .await;
    assert!(
        metric(
            &text,
            "wxgate_quota_keys_by_source",
            &[("source", "learned")]
        ) <= 1.0
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let phase_one = windows_of(&upstream, EXCHANGE, window);
    let refused: Vec<_> = phase_one.iter().filter(|w| w.2 > 0).collect();
    assert_eq!(refused.len(), 1, "45011 in one window only: {phase_one:?}");
    let learned_at = refused[0].0;
    let after: Vec<u64> = phase_one
        .iter()
        .filter(|w| w.0 > learned_at)
        .map(|w| w.1)
        .collect();
    // The last window is still filling.
    let whole = &after[..after.len() - 1];
    assert!(whole.len() >= 3, "{phase_one:?}");
    for calls in whole {
        assert!(
            *calls as f64 >= 0.85 * f64::from(REAL),
            "a window used {calls} of {REAL}: {phase_one:?}"
        );
    }

    // Phase two: WeChat's limit back at 40. After the hold, a step per window up to 36.
    upstream.set_quota(Some(CONFIGURED));
    let bound = Duration::from_secs(HOLD_SECS) + window * (8 + 2);
    let deadline = UNIX_EPOCH + Duration::from_nanos(learned_at as u64) + bound;
    loop {
        let reached = windows_of(&upstream, EXCHANGE, window)
            .iter()
            .any(|w| w.1 as f64 >= 0.9 * f64::from(CONFIGURED));
        if reached {
            break;
        }
        assert!(
            std::time::SystemTime::now() < deadline,
            "no window reached 90 % of {CONFIGURED} within {bound:?}: {:?}",
            windows_of(&upstream, EXCHANGE, window)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(answers) = load.join_next().await {
        let answers = answers.unwrap();
        assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    }
    let windows = windows_of(&upstream, EXCHANGE, window);
    assert_eq!(
        windows.iter().filter(|w| w.2 > 0).count(),
        1,
        "no 45011 on the climb: {windows:?}"
    );
}

/// Done when 5: after WeChat's 45009, wxgate answers the key's calls itself, sending
/// nothing, for the rest of WeChat's day (six seconds here, as the stand-in's); a
/// `clear_quota` through wxgate lifts that at once, and the next day does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_quota_is_answered_locally_until_the_day_ends_or_a_clear() {
    const DAILY: u64 = 4;
    let day = Duration::from_secs(6);
    let upstream = stand_in(|c| {
        c.api_limits = vec![ApiLimits::new(WXA).with_daily_limit(DAILY)];
        c.day = day;
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        "[quota]\nday_secs = 6\n",
    )))
    .await;
    let client = client();
    let token = token_through(&client, &proxy).await;
    let call = |n: usize| {
        let client = client.clone();
        let url = proxy.url(&format!("{WXA}?access_token={token}&n={n}"));
        async move {
            let answer = client.post(url).body("{}").send().await.unwrap();
            let body: serde_json::Value = answer.json().await.unwrap();
            (
                body["errcode"].as_i64().unwrap_or(0),
                body["errmsg"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    // Days are aligned to multiples of six seconds since the epoch (as midnight UTC+8 is):
    // start with most of a day ahead.
    let into_day = || {
        std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            % day.as_millis() as u64
    };
    if into_day() > 1_000 {
        tokio::time::sleep(Duration::from_millis(
            day.as_millis() as u64 - into_day() + 50,
        ))
        .await;
    }
    let spend = |first: usize| {
        let call = &call;
        async move {
            for n in first..first + DAILY as usize {
                assert_eq!(call(n).await.0, 0, "call {n} within the day's quota");
            }
            let (errcode, errmsg) = call(first + 100).await;
            assert_eq!(errcode, 45009, "{errmsg}");
            assert!(!errmsg.contains("wxgate"), "WeChat's own: {errmsg}");
        }
    };
    spend(0).await;
    let upstream_calls = upstream.calls(WXA);
    for n in 0..3 {
        let (errcode, errmsg) = call(200 + n).await;
        assert_eq!(errcode, 45009);
        assert!(
            errmsg.contains("answered by wxgate") && errmsg.contains("+08:00"),
            "{errmsg}"
        );
    }
    assert_eq!(
        upstream.calls(WXA),
        upstream_calls,
        "nothing sent while blocked"
    );
    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wxgate_quota_local_daily_answers_total",
            &[("api", "other")]
        ),
        3.0
    );
    proxy
        .metrics_until("the key counted as blocked", |text| {
            metric(text, "wxgate_quota_daily_blocked_keys", &[]) == 1.0
        })
        .await;

    // clear_quota through wxgate: WeChat's day starts over for the appid, and so does wxgate.
    let cleared: serde_json::Value = client
        .post(proxy.url(&format!("/cgi-bin/clear_quota?access_token={token}")))
        .body(serde_json::json!({ "appid": APPID }).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["errcode"], 0, "{cleared}");
    spend(300).await;
    assert_eq!(call(400).await.0, 45009);
    let blocked_calls = upstream.calls(WXA);

    // The next day (the stand-in's, and wxgate's): calls go to WeChat again.
    let next_day = day.as_millis() as u64 - into_day() + 50;
    tokio::time::sleep(Duration::from_millis(next_day)).await;
    assert_eq!(call(500).await.0, 0);
    assert_eq!(upstream.calls(WXA), blocked_calls + 1);
}

/// The quota table of `proxy` (`GET /quota` on its admin port).
async fn quota_table(proxy: &TestProxy) -> serde_json::Value {
    reqwest::get(format!("http://{}/quota", proxy.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The row of (`appid`, `api`) in `table`.
fn row<'a>(table: &'a serde_json::Value, appid: &str, api: &str) -> &'a serde_json::Value {
    table["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["appid"] == appid && row["api"] == api && row["on_behalf"] == false)
        .unwrap_or_else(|| panic!("no row for {appid} {api}: {table}"))
}

/// Logins of `codes`, all at once: their statuses and errcodes.
async fn logins(proxy: &TestProxy, codes: &[String]) -> Vec<(u16, i64)> {
    let client = client();
    join_all(codes.iter().map(|code| exchange(&client, proxy, code))).await
}

/// Done when 4: code2Session's per-user limit (here 5 a second) answers the same 45011 as
/// the appid's. One user hammering logins alone forms a row of 45011s that looks like the
/// appid's limit: what it teaches stops at the floor (half the configured 40). With the
/// other users' logins mixed in, their successes break the rows: they all go on, and the
/// limit never goes under the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_past_the_per_user_limit_teaches_no_less_than_the_floor() {
    const CONFIGURED: u32 = 40;
    let upstream = stand_in(|c| {
        c.user_rate_limit = Some(RateLimit::new(5, Duration::from_secs(1)));
    })
    .await;
    let proxy = spawn_proxy(config(&config_text(
        &upstream.base_url(),
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {CONFIGURED}\nlearned_floor_percent = 50\nmax_wait_ms = 30000\n[retry]\nmax_hold_ms = 30000\n"
        ),
    )))
    .await;
    let floor = f64::from(CONFIGURED / 2);

    // Alone: the hammering user's refusals form rows, and a limit is learned, at the floor.
    let hammer: Vec<String> = (0..30).map(|_| upstream.issue_code("hammer")).collect();
    let answers = logins(&proxy, &hammer).await;
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    assert!(upstream.answers(45011) >= 3, "the user's limit was reached");
    let table = quota_table(&proxy).await;
    let exchange_row = row(&table, APPID, EXCHANGE);
    assert!(
        exchange_row["limit"].as_f64().unwrap() >= floor,
        "under the floor: {exchange_row}"
    );
    assert_eq!(exchange_row["source"], "learned", "{exchange_row}");
    assert_eq!(
        exchange_row["limit"].as_f64().unwrap(),
        floor,
        "{exchange_row}"
    );

    // Mixed: the others' logins go on while the same user hammers on.
    let mut codes: Vec<String> = (0..30).map(|_| upstream.issue_code("hammer")).collect();
    let others: Vec<String> = (0..20)
        .map(|i| upstream.issue_code(&format!("user{i}")))
        .collect();
    codes.extend(others.iter().cloned());
    fastrand::shuffle(&mut codes);
    let answers = logins(&proxy, &codes).await;
    for (code, answer) in codes.iter().zip(&answers) {
        if others.contains(code) {
            assert_eq!(*answer, (200, 0), "another user's login");
        }
    }
    let table = quota_table(&proxy).await;
    let exchange_row = row(&table, APPID, EXCHANGE);
    assert!(
        exchange_row["limit"].as_f64().unwrap() >= floor,
        "under the floor: {exchange_row}"
    );
}

/// Done when 7: `wxgate quota`, with the admin port from the configuration file, prints the
/// table: the limit WeChat stated for an API and its source, the calls of the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wxgate_quota_prints_the_table() {
    let window = Duration::from_secs(60);
    let upstream = stand_in(|c| {
        c.api_limits = vec![ApiLimits::new(WXA).with_rate_limit(RateLimit::new(50, window))];
    })
    .await;
    let text = config_text(&upstream.base_url(), "");
    let proxy = spawn_proxy(config(&text)).await;
    let client = client();
    let token = token_through(&client, &proxy).await;
    // The three calls and the table within one of WeChat's minutes: none starts in the last
    // ten seconds of one (a busy machine may take seconds between the first call and the
    // table).
    let into_minute = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60;
    if into_minute >= 50 {
        tokio::time::sleep(Duration::from_secs(61 - into_minute)).await;
    }
    let answers = calls_with_token(&client, &proxy, WXA, &token, 3).await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");

    let dir = crate::support::tls::TestDir::new("quota-command");
    let file = dir.path("wxgate.toml");
    std::fs::write(
        &file,
        format!("[server]\nadmin_listen = \"{}\"\n{text}", proxy.admin),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["quota", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("APPID") && lines[0].contains("SOURCE"),
        "{stdout}"
    );
    let wxa = lines
        .iter()
        .find(|line| line.contains(WXA))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(wxa.contains(APPID), "{stdout}");
    assert!(
        wxa.contains("50/60 s") && wxa.contains("wechat"),
        "{stdout}"
    );
    let cells: Vec<&str> = wxa.split_whitespace().collect();
    assert!(cells.contains(&"3"), "three calls this window: {stdout}");

    // Nobody at the admin port: exit 1, saying so.
    drop(proxy);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["quota", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the admin port"));
}

/// Done when 6: three replicas sharing a real Redis ask quota/get once for the key between
/// them, all three use WeChat's figure, and a burst spread over them meets no 45011.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_use_one_discovered_limit_asked_once() {
    use crate::support::cluster::Replicas;
    use crate::support::redis::RedisServer;
    const LIMIT: u32 = 20;
    let window = Duration::from_secs(2);
    let Some(redis) =
        RedisServer::start_or_skip("three_replicas_use_one_discovered_limit_asked_once")
    else {
        return;
    };
    let upstream = stand_in(|c| {
        c.api_limits = vec![ApiLimits::new(WXA).with_rate_limit(RateLimit::new(LIMIT, window))];
    })
    .await;
    let replicas = Replicas::start(
        &upstream,
        &redis.url(),
        "[quota]\nwindow_secs = 2\nper_window = 200\narrival_margin_ms = 50\nmax_wait_ms = 30000\n",
    )
    .await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let client = client();
    // Each replica hands out the one shared token, and so knows whose it is.
    let mut token = String::new();
    for proxy in &replicas.proxies {
        token = token_through(&client, proxy).await;
    }
    let answers = join_all((0..5 * LIMIT as usize).map(|i| {
        let client = client.clone();
        let url = replicas
            .pick(i)
            .url(&format!("{WXA}?access_token={token}&n={i}"));
        async move {
            let answer = client.post(url).body("{}").send().await.unwrap();
            (
                answer.status().as_u16(),
                errcode(&answer.bytes().await.unwrap()),
            )
        }
    }))
    .await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    assert_eq!(
        upstream.quota_queries(WXA, APPID),
        1,
        "one query for all three"
    );
    for proxy in &replicas.proxies {
        let table = quota_table(proxy).await;
        let wxa = row(&table, APPID, WXA);
        assert_eq!(wxa["source"], "wechat", "{wxa}");
        assert_eq!(wxa["limit"], LIMIT, "{wxa}");
    }
    let used = middle_use(&path_calls_per_window(&upstream, WXA, window), LIMIT);
    assert!(
        used >= 0.9,
        "the overloaded windows used {used:.2} of WeChat's figure"
    );
}

/// With `[cluster]`, a limit one replica learned from WeChat's 45011 is applied by all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_apply_a_limit_one_learned() {
    use crate::support::cluster::Replicas;
    use crate::support::redis::RedisServer;
    const REAL: u32 = 10;
    let window = Duration::from_secs(1);
    let Some(redis) = RedisServer::start_or_skip("three_replicas_apply_a_limit_one_learned") else {
        return;
    };
    let upstream = stand_in(|c| {
        c.quota_per_window = Some(REAL);
        c.window = window;
    })
    .await;
    let replicas = Replicas::start(
        &upstream,
        &redis.url(),
        "[quota]\nwindow_secs = 1\nper_window = 20\nmax_wait_ms = 30000\nlearned_hold_secs = 600\n[retry]\nmax_hold_ms = 30000\n",
    )
    .await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let client = client();
    let answers = join_all((0..40).map(|i| {
        let client = client.clone();
        let proxy = replicas.pick(i);
        async move { exchange(&client, proxy, &format!("code-shared-learn-{i}")).await }
    }))
    .await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert!(
        replicas
            .metric_sum(
                "wxgate_quota_learned_changes_total",
                &[("direction", "lowered")]
            )
            .await
            >= 1.0
    );
    // Every replica comes to apply the learned figure (read from Redis within a second or so).
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        let mut limits = Vec::new();
        for proxy in &replicas.proxies {
            let table = quota_table(proxy).await;
            let learned = table["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|row| row["api"] == EXCHANGE && row["source"] == "learned")
                .map(|row| row["limit"].as_u64().unwrap());
            limits.push(learned);
        }
        // Two replicas may each learn from a 45011 of their own: the figure stored last is
        // the one they all come to.
        if limits.iter().all(|limit| limit.is_some_and(|l| l < 20))
            && limits.windows(2).all(|pair| pair[0] == pair[1])
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every replica applies the one learned limit: {limits:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
