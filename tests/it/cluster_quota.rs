//! Replicas as one for the minute quota: three wxgates sharing a real `redis-server`, a
//! client spreading requests over them round robin, against a stand-in that enforces its own
//! quota over short windows and records every call.

use std::time::{Duration, Instant};

use crate::support::cluster::Replicas;
use crate::support::redis::RedisServer;
use crate::support::*;
use futures_util::future::join_all;
use wxgate_stand_in::{Delay, DelayRelay, StandIn};

const EXCHANGE: &str = "/sns/jscode2session";

/// A stand-in that answers 45011 past `upstream_quota` calls in a window of `window`, and
/// three replicas in front of it on `redis`, with `quota` as their TOML, all counting in
/// Redis.
async fn shared_replicas(
    redis: &RedisServer,
    upstream_quota: u32,
    window: Duration,
    quota: &str,
) -> (StandIn, Replicas) {
    shared_replicas_on(&redis.url(), upstream_quota, window, quota).await
}

/// [`shared_replicas`] on the Redis at `redis_url`.
async fn shared_replicas_on(
    redis_url: &str,
    upstream_quota: u32,
    window: Duration,
    quota: &str,
) -> (StandIn, Replicas) {
    let upstream = stand_in(|c| {
        c.quota_per_window = Some(upstream_quota);
        c.window = window;
    })
    .await;
    let replicas = Replicas::start(&upstream, redis_url, quota).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    (upstream, replicas)
}

/// `count` exchanges with fresh codes, all at once, spread over the replicas round robin.
async fn burst(replicas: &Replicas, prefix: &str, count: usize) -> Vec<(u16, i64)> {
    let client = client();
    join_all((0..count).map(|i| {
        let client = client.clone();
        let proxy = replicas.pick(i);
        async move { exchange(&client, proxy, &format!("{prefix}-{i}")).await }
    }))
    .await
}

/// Five times the quota at once over three replicas: every request succeeds, WeChat never
/// says 45011, no aligned window holds more than the quota (the replicas together admit
/// what one wxgate would), and the overloaded windows use at least 90 % of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_one_quota_between_them() {
    // Calls spaced 1/12 s apart (burst 1): a call admitted in Redis just before a window
    // boundary reaches the stand-in in the next window only if it takes longer than that
    // spacing to get there, which a loaded test machine stays well under. (wxgate's bound is
    // on calls leaving it; WeChat counts them arriving.)
    const QUOTA: u32 = 12;
    let window = Duration::from_secs(1);
    let Some(redis) = RedisServer::start_or_skip("three_replicas_keep_one_quota_between_them")
    else {
        return;
    };
    let (upstream, replicas) = shared_replicas(
        &redis,
        QUOTA,
        window,
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nburst = 1\nmax_wait_ms = 30000\n"
        ),
    )
    .await;

    let answers = burst(&replicas, "code-shared", 5 * QUOTA as usize).await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    assert_eq!(upstream.calls(EXCHANGE), u64::from(5 * QUOTA));
    let windows: Vec<u64> = calls_per_window(&upstream, window).into_values().collect();
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(QUOTA)),
        "a window held more than the quota: {windows:?}"
    );
    assert!(windows.len() >= 4, "{windows:?}");
    let middle = &windows[1..windows.len() - 1];
    let used = middle.iter().sum::<u64>() as f64 / (middle.len() as f64 * f64::from(QUOTA));
    assert!(
        used >= 0.9,
        "the middle windows used {used:.2}: {windows:?}"
    );

    // Each replica took part, and each counted its turns in Redis.
    for proxy in &replicas.proxies {
        let text = proxy.metrics().await;
        assert!(
            metric(
                &text,
                "wxgate_upstream_requests_total",
                &[("api", EXCHANGE)]
            ) > 0.0
        );
        assert!(
            metric(
                &text,
                "wxgate_redis_duration_seconds_count",
                &[("op", "quota")]
            ) > 0.0
        );
        assert_eq!(metric(&text, "wxgate_redis_errors_total", &[]), 0.0);
        assert_eq!(metric(&text, "wxgate_cluster_replicas", &[]), 3.0);
    }

    // Nothing in Redis names the appid.
    for (key, _) in redis.dump() {
        assert!(!String::from_utf8_lossy(&key).contains(APPID), "{key:?}");
    }
}

/// A code exchange takes its first quota turn in the round trip that claims its code: no
/// quota round trip of its own while the bucket has turns, the same bucket all the same
/// (past the burst, exchanges wait for their turns, as long as the claim said, and no window
/// holds more than the quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_takes_its_first_turn_with_its_claim() {
    const QUOTA: u32 = 6;
    const BURST: u32 = 3;
    let window = Duration::from_secs(1);
    let Some(redis) = RedisServer::start_or_skip("an_exchange_takes_its_first_turn_with_its_claim")
    else {
        return;
    };
    let (upstream, replicas) = shared_replicas(
        &redis,
        QUOTA,
        window,
        &format!(
        "[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nburst = {BURST}\nmax_wait_ms = 30000\n"
    ),
    )
    .await;
    let proxy = replicas.pick(0);
    let client = client();
    let redis_ops =
        |text: &str, op: &str| metric(text, "wxgate_redis_duration_seconds_count", &[("op", op)]);

    // The burst: every turn taken along with the claim.
    for i in 0..BURST {
        let answer = exchange(&client, proxy, &format!("code-claimed-{i}")).await;
        assert_eq!(answer, (200, 0));
    }
    let text = proxy.metrics().await;
    assert_eq!(redis_ops(&text, "code_claim"), f64::from(BURST));
    assert_eq!(
        redis_ops(&text, "quota"),
        0.0,
        "no quota round trip of its own"
    );

    // Past the burst: the claim finds no turn, the exchange waits for one in its lane.
    for i in 0..2 * QUOTA {
        let answer = exchange(&client, proxy, &format!("code-waiting-{i}")).await;
        assert_eq!(answer, (200, 0));
    }
    let text = proxy.metrics().await;
    assert_eq!(redis_ops(&text, "code_claim"), f64::from(BURST + 2 * QUOTA));
    // Each exchange the claim found no turn for waits the time the claim's script named,
    // then asks once: about one quota round trip each, not one more to be refused at once.
    let waited_for = redis_ops(&text, "quota");
    assert!(waited_for > 0.0, "turns waited for in the lane");
    assert!(
        waited_for <= 1.5 * f64::from(2 * QUOTA),
        "{waited_for} quota round trips for {} exchanges past the burst",
        2 * QUOTA
    );
    assert!(
        metric(&text, "wxgate_quota_wait_seconds_count", &[]) > 0.0,
        "exchanges waited for their turns"
    );
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    let windows: Vec<u64> = calls_per_window(&upstream, window).into_values().collect();
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(QUOTA)),
        "a window held more than the quota: {windows:?}"
    );
}

/// WeChat's real quota below the configured one: the first replica to see 45011 pauses the
/// key in Redis, so the others hold their calls too; every request still succeeds, and
/// WeChat answers 45011 only a few times per window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_45011_seen_by_one_replica_holds_them_all() {
    const REAL: u32 = 10;
    let window = Duration::from_secs(1);
    let Some(redis) = RedisServer::start_or_skip("a_45011_seen_by_one_replica_holds_them_all")
    else {
        return;
    };
    let (upstream, replicas) = shared_replicas(
        &redis,
        REAL,
        window,
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {}\nburst = 3\nmax_wait_ms = 30000\n[retry]\nmax_hold_ms = 30000\n",
            3 * REAL
        ),
    )
    .await;

    let requests = 4 * REAL as usize;
    let answers = burst(&replicas, "code-paused", requests).await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    let refused = upstream.answers(45011);
    let windows = calls_per_window(&upstream, window).len() as u64;
    assert!(refused > 0, "the real quota was reached");
    assert!(
        refused <= 4 * windows,
        "{refused} answers 45011 over {windows} windows: not a few per window"
    );
    assert_eq!(upstream.answers(0), requests as u64);
    let mut paused = 0.0;
    for proxy in &replicas.proxies {
        let text = proxy.metrics().await;
        paused += metric(
            &text,
            "wxgate_redis_duration_seconds_count",
            &[("op", "pause")],
        );
    }
    assert!(paused >= 1.0, "a 45011 paused the key in Redis");
}

/// Redis stopped in the middle of a burst: every request is still answered, no window holds
/// more than the quota (each replica limits itself to its share, and not in the window it
/// degraded in), the replicas say they are degraded, and once Redis is back they return to
/// shared counting by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_mid_burst_degrades_safely_and_recovers() {
    // Calls spaced 1/12 s apart (burst 1): a call admitted in Redis just before a window
    // boundary reaches the stand-in in the next window only if it takes longer than that
    // spacing to get there, which a loaded test machine stays well under. (wxgate's bound is
    // on calls leaving it; WeChat counts them arriving.)
    const QUOTA: u32 = 12;
    let window = Duration::from_secs(1);
    let Some(mut redis) =
        RedisServer::start_or_skip("redis_gone_mid_burst_degrades_safely_and_recovers")
    else {
        return;
    };
    let (upstream, replicas) = shared_replicas(
        &redis,
        QUOTA,
        window,
        &format!(
            "[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nburst = 1\nmax_wait_ms = 30000\n"
        ),
    )
    .await;
    replicas.wait_until_they_know_each_other().await;

    let load = burst(&replicas, "code-outage", 4 * QUOTA as usize);
    let outage = async {
        // Some calls have gone out in shared mode; then Redis goes away.
        while upstream.calls(EXCHANGE) < u64::from(QUOTA / 2) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        redis.stop();
    };
    let (answers, ()) = tokio::join!(load, outage);
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
    let windows: Vec<u64> = calls_per_window(&upstream, window).into_values().collect();
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(QUOTA)),
        "a window held more than the quota: {windows:?}"
    );
    replicas
        .wait_for_state("degraded", Duration::from_secs(5))
        .await;
    for proxy in &replicas.proxies {
        let ready = client()
            .get(format!("http://{}/readyz", proxy.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "a degraded replica still serves");
        assert!(ready.text().await.unwrap().contains("degraded"));
    }

    // Redis back (empty, on the same port): the replicas agree on a window boundary and
    // count in Redis again, by themselves.
    redis.restart();
    replicas
        .wait_for_state("shared", Duration::from_secs(10))
        .await;
    upstream.reset_counters();
    let answers = burst(&replicas, "code-recovered", 2 * QUOTA as usize).await;
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    assert_eq!(upstream.answers(45011), 0);
    let windows: Vec<u64> = calls_per_window(&upstream, window).into_values().collect();
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(QUOTA)),
        "{windows:?}"
    );
}

/// A Redis that answers slowly: the replica gives up on it after `cluster.timeout_ms`,
/// degrades and serves from its share, instead of making requests wait for Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_degrades_within_the_timeout_instead_of_stalling() {
    let Some(redis) =
        RedisServer::start_or_skip("a_slow_redis_degrades_within_the_timeout_instead_of_stalling")
    else {
        return;
    };
    // A relay without delay to begin with: Redis made slow at will.
    let relay = DelayRelay::start("127.0.0.1:0", redis.addr(), Delay::NONE, Delay::NONE)
        .expect("a relay on a free port");
    let upstream = stand_in(|_| {}).await;
    // A roomy quota: each replica's share is plenty for the few requests below.
    let replicas = Replicas::start(
        &upstream,
        &format!("redis://{}", relay.addr()),
        "[quota]\nwindow_secs = 1\nper_window = 300\nmax_wait_ms = 3000\n",
    )
    .await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;

    // From now on Redis takes five seconds to answer anything.
    relay.set_delay(Duration::from_secs(5));
    let client = client();
    let started = Instant::now();
    for i in 0..6 {
        let answer = exchange(&client, replicas.pick(i), &format!("code-slow-{i}")).await;
        assert_eq!(answer, (200, 0), "request {i}");
    }
    // Had the requests waited for Redis, six of them would have taken half a minute.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests waited for the slow Redis: {:?}",
        started.elapsed()
    );
    replicas
        .wait_for_state("degraded", Duration::from_secs(5))
        .await;
    let mut timeouts = 0.0;
    for proxy in &replicas.proxies {
        let text = proxy.metrics().await;
        timeouts += metric(&text, "wxgate_redis_errors_total", &[("kind", "timeout")]);
    }
    assert!(
        timeouts >= 1.0,
        "the slow operations were counted as timeouts"
    );
}

/// A replica with another cluster secret on the same Redis does not share with the others
/// (it could not read what they store, and they would count its calls under keys it cannot
/// name): it degrades, says why in its metrics, and is not counted among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_secret_does_not_share() {
    let Some(redis) = RedisServer::start_or_skip("a_replica_with_another_secret_does_not_share")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    // Windows of a second: the stranger, degraded from the start, counts its first window
    // as spent.
    let quota = "[quota]\nwindow_secs = 1\nper_window = 300\n";
    let replicas = Replicas::start(&upstream, &redis.url(), quota).await;
    replicas.wait_until_they_know_each_other().await;
    let other_secret = crate::support::cluster::SecretFile::new();
    let stranger = spawn_proxy(config(&crate::support::cluster::cluster_config_text(
        &upstream,
        &redis.url(),
        &other_secret,
        quota,
    )))
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = stranger.metrics().await;
        let refused = metric(&text, "wxgate_redis_errors_total", &[("kind", "secret")]);
        if refused >= 1.0 {
            assert_eq!(
                metric(&text, "wxgate_cluster_state", &[("state", "degraded")]),
                1.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "the other secret went unnoticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It still serves, on its own.
    let answer = client()
        .get(stranger.url(&jscode2session(APPID, SECRET, "code-stranger")))
        .send()
        .await
        .unwrap();
    assert_eq!(errcode(&answer.bytes().await.unwrap()), 0);
    // The others still count three.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for proxy in &replicas.proxies {
        assert_eq!(
            metric(&proxy.metrics().await, "wxgate_cluster_replicas", &[]),
            3.0
        );
    }
}

/// Redis down for a while, then back empty, while callers keep calling every replica: a
/// replica whose first heartbeat lands in the emptied Redis sees itself alone there, but the
/// share it limits itself to stays a third of the quota until the replicas count in Redis
/// again, so no window holds more than the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_empty_keeps_every_window_within_the_quota() {
    let Some(redis) =
        RedisServer::start_or_skip("redis_back_empty_keeps_every_window_within_the_quota")
    else {
        return;
    };
    back_empty_within_the_quota(redis, None).await;
}

/// The same with Redis 20 ms away each way: a replica learns the boundary it resumes at
/// 20 ms late, and its callers woken at that boundary must not take a turn of its share in
/// a window the others already count in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_empty_at_a_distance_keeps_every_window_within_the_quota() {
    let Some(redis) = RedisServer::start_or_skip(
        "redis_back_empty_at_a_distance_keeps_every_window_within_the_quota",
    ) else {
        return;
    };
    let away = Delay::fixed(Duration::from_millis(20));
    let relay =
        DelayRelay::start("127.0.0.1:0", redis.addr(), away, away).expect("a relay on a free port");
    back_empty_within_the_quota(redis, Some(&relay)).await;
}

/// Redis stopped while callers keep calling every replica, then started again empty; the
/// replicas talk to it through `relay` if there is one.
async fn back_empty_within_the_quota(mut redis: RedisServer, relay: Option<&DelayRelay>) {
    const QUOTA: u32 = 12;
    let window = Duration::from_secs(1);
    let redis_url = relay.map_or_else(|| redis.url(), |relay| format!("redis://{}", relay.addr()));
    // Calls that find no turn within 200 ms are refused (a local 45011): the callers keep
    // coming at every replica, as a busy front end's do.
    let (upstream, replicas) = shared_replicas_on(
        &redis_url,
        QUOTA,
        window,
        &format!("[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nburst = 1\nmax_wait_ms = 200\n"),
    )
    .await;
    replicas.wait_until_they_know_each_other().await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers = (0..6).map(|caller| {
        let (client, stop) = (client(), stop.clone());
        let proxy = replicas.pick(caller);
        async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let code = format!("code-back-{caller}-{i}");
                let (status, _) = exchange(&client, proxy, &code).await;
                assert_eq!(status, 200);
                i += 1;
            }
        }
    });
    let window_of = |at: std::time::SystemTime| {
        at.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() / window.as_nanos()
    };
    let outage = async {
        while upstream.calls(EXCHANGE) < u64::from(QUOTA) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        redis.stop();
        replicas
            .wait_for_state("degraded", Duration::from_secs(5))
            .await;
        // The replicas limit themselves to their shares: calls reach WeChat two windows
        // after the one they degraded in.
        let stopped = window_of(std::time::SystemTime::now());
        while !upstream
            .call_log()
            .iter()
            .any(|call| window_of(call.at) > stopped + 1)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        redis.restart();
        replicas
            .wait_for_state("shared", Duration::from_secs(10))
            .await;
        // The window the replicas resumed in, whole, under the same load: the one where a
        // replica's own share and the shared count could meet.
        let resumed = window_of(std::time::SystemTime::now());
        while !upstream
            .call_log()
            .iter()
            .any(|call| window_of(call.at) > resumed)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::join!(join_all(callers), outage);
    let windows: Vec<u64> = calls_per_window(&upstream, window).into_values().collect();
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(QUOTA)),
        "a window held more than the quota: {windows:?}"
    );
    assert_eq!(upstream.answers(45011), 0, "WeChat never said 45011");
}
