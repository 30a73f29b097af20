//! Replicas as one for code exchanges: three wxgates sharing a real `redis-server`, against
//! a stand-in that spends each code once and records every code it is sent.

use std::time::{Duration, Instant};

use crate::support::child::ChildWxgate;
use crate::support::cluster::{cluster_config_text, Replicas};
use crate::support::redis::{command as redis_command, RedisServer};
use crate::support::*;
use futures_util::future::join_all;

/// An answer as a client sees it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: u16,
    cache: String,
    content_type: String,
    body: Vec<u8>,
}

impl Seen {
    fn errcode(&self) -> i64 {
        errcode(&self.body)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn get(client: &reqwest::Client, url: String) -> Seen {
    let answer = client.get(url).send().await.unwrap();
    let header = |name: &str| {
        answer
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Seen {
        status: answer.status().as_u16(),
        cache: header("x-wxgate-cache"),
        content_type: header("content-type"),
        body: answer.bytes().await.unwrap().to_vec(),
    }
}

/// Three replicas on `redis`. Quota windows of a second: a replica that loses Redis counts
/// the window it degraded in as spent, so its next turn is at most a second away.
async fn started(redis: &RedisServer, upstream: &wxgate_stand_in::StandIn) -> Replicas {
    let quota = "[quota]\nwindow_secs = 1\nper_window = 300\n";
    let replicas = Replicas::start(upstream, &redis.url(), quota).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    replicas
}

/// The same code sent to all three replicas at once: one upstream call, the same answer for
/// all; a replay on any replica gets it back as a hit, and the stand-in saw the code once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_on_three_replicas_is_one_upstream_call() {
    let Some(redis) = RedisServer::start_or_skip("one_code_on_three_replicas_is_one_upstream_call")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    upstream.set_latency(Duration::from_millis(400));
    let replicas = started(&redis, &upstream).await;
    let client = client();
    let path = jscode2session(APPID, SECRET, "code-everywhere");

    let answers = join_all((0..6).map(|i| get(&client, replicas.pick(i).url(&path)))).await;
    assert_eq!(
        upstream.code_calls("code-everywhere"),
        1,
        "one upstream call"
    );
    let first = &answers[0];
    assert_eq!(first.errcode(), 0);
    assert!(first.json()["session_key"].is_string());
    for answer in &answers {
        assert_eq!((answer.status, &answer.body), (first.status, &first.body));
        assert_eq!(answer.content_type, "application/json; encoding=utf-8");
    }
    let mut caches: Vec<&str> = answers.iter().map(|a| a.cache.as_str()).collect();
    caches.sort_unstable();
    assert_eq!(
        caches.iter().filter(|c| **c == "miss").count(),
        1,
        "{caches:?}"
    );
    assert!(
        caches
            .iter()
            .all(|c| ["miss", "coalesced", "hit"].contains(c)),
        "{caches:?}"
    );

    // Replays, on every replica: the first answer, byte for byte, as a hit.
    upstream.set_latency(Duration::ZERO);
    for i in 0..3 {
        let replay = get(&client, replicas.pick(i).url(&path)).await;
        assert_eq!(replay.cache, "hit", "replica {i}");
        assert_eq!(replay.body, first.body);
        assert_eq!(replay.content_type, first.content_type);
    }
    assert_eq!(upstream.code_calls("code-everywhere"), 1);
    let mut redis_hits = 0.0;
    let mut coalesced = 0.0;
    for proxy in &replicas.proxies {
        let text = proxy.metrics().await;
        redis_hits += metric(
            &text,
            "wxgate_code_cache_lookups_total",
            &[("tier", "redis"), ("result", "hit")],
        );
        coalesced += metric(&text, "wxgate_requests_total", &[("outcome", "coalesced")]);
    }
    assert!(redis_hits >= 1.0, "a replay was answered from Redis");
    assert!(
        coalesced >= 1.0,
        "cross-replica followers count as coalesced"
    );
}

/// A replay on another replica gets the first answer; another credential for the same code,
/// on any replica, in flight or remembered, gets its own upstream answer and never the
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_cross_replicas_but_credentials_never_do() {
    let Some(redis) = RedisServer::start_or_skip("replays_cross_replicas_but_credentials_never_do")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = started(&redis, &upstream).await;
    let client = client();

    let first = get(
        &client,
        replicas
            .pick(0)
            .url(&jscode2session(APPID, SECRET, "code-c1")),
    )
    .await;
    assert_eq!(
        (first.status, first.cache.as_str(), first.errcode()),
        (200, "miss", 0)
    );
    let replay = get(
        &client,
        replicas
            .pick(1)
            .url(&jscode2session(APPID, SECRET, "code-c1")),
    )
    .await;
    assert_eq!(replay.cache, "hit");
    assert_eq!(replay.body, first.body);
    assert_eq!(upstream.code_calls("code-c1"), 1);

    // A wrong secret for a remembered code, on a third replica.
    let wrong = get(
        &client,
        replicas
            .pick(2)
            .url(&jscode2session(APPID, "not-the-secret", "code-c1")),
    )
    .await;
    assert_eq!(wrong.cache, "miss");
    assert_eq!(wrong.errcode(), 40125);
    assert!(wrong.json().get("session_key").is_none());
    assert_eq!(upstream.code_calls("code-c1"), 2);

    // And while the right credential's exchange is in flight on another replica.
    upstream.set_latency(Duration::from_millis(500));
    let right = get(
        &client,
        replicas
            .pick(0)
            .url(&jscode2session(APPID, SECRET, "code-c2")),
    );
    let other = async {
        while upstream.code_calls("code-c2") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        get(
            &client,
            replicas
                .pick(1)
                .url(&jscode2session(APPID, "not-the-secret", "code-c2")),
        )
        .await
    };
    let (right, other) = tokio::join!(right, other);
    assert_eq!(right.errcode(), 0);
    assert_eq!(other.cache, "miss");
    assert_eq!(other.errcode(), 40125);
    assert!(other.json().get("session_key").is_none());
}

/// The replica leading an exchange is killed mid-call: the replicas waiting for it answer
/// `-1` saying so once its lease runs out (never later than the lease plus a look), and the
/// code is never sent twice while the claim was alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_call_leaves_its_waiters_answered() {
    let Some(redis) =
        RedisServer::start_or_skip("a_leader_killed_mid_call_leaves_its_waiters_answered")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = started(&redis, &upstream).await;
    // The leader: the binary, with a short upstream timeout so its lease is short.
    let mut leader = ChildWxgate::start(&cluster_config_text(
        &upstream,
        &redis.url(),
        &replicas.secret,
        "",
    ));
    upstream.set_latency(Duration::from_secs(30));
    let client = client();
    let path = jscode2session(APPID, SECRET, "code-orphan");
    let lead = tokio::spawn({
        let client = client.clone();
        let url = leader.url(&path);
        async move { client.get(url).send().await }
    });
    while upstream.code_calls("code-orphan") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Two replicas join the leader's exchange through Redis.
    let waiters = join_all((0..2).map(|i| get(&client, replicas.pick(i).url(&path))));
    let kill = async {
        // Both waiters are inside wxgate (counted in flight) before the leader dies.
        for proxy in &replicas.proxies[..2] {
            while metric(&proxy.metrics().await, "wxgate_inflight_requests", &[]) < 1.0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        leader.kill();
        Instant::now()
    };
    let (answers, killed_at) = tokio::join!(waiters, kill);
    let waited = killed_at.elapsed();
    for answer in &answers {
        assert_eq!(answer.status, 502, "{answer:?}");
        assert_eq!(answer.errcode(), -1);
        assert!(
            answer.json()["errmsg"]
                .as_str()
                .unwrap()
                .contains("went away"),
            "{answer:?}"
        );
    }
    // The lease is the upstream timeout (2 s in tests) plus 2 s; the waiters look every
    // half second at most.
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert_eq!(upstream.code_calls("code-orphan"), 1, "never sent twice");
    let _ = lead.await;
}

/// Redis stopped: every replica still exchanges codes on its own (coalescing and memory per
/// replica), a replay on the replica that answered is a hit, and only a replay crossing
/// replicas meets WeChat's 40163, as the README says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_exchanges_on_its_own() {
    let Some(mut redis) =
        RedisServer::start_or_skip("without_redis_each_replica_exchanges_on_its_own")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = started(&redis, &upstream).await;
    redis.stop();
    let client = client();
    let first = get(
        &client,
        replicas
            .pick(0)
            .url(&jscode2session(APPID, SECRET, "code-alone")),
    )
    .await;
    assert_eq!((first.status, first.errcode()), (200, 0));
    let same = get(
        &client,
        replicas
            .pick(0)
            .url(&jscode2session(APPID, SECRET, "code-alone")),
    )
    .await;
    assert_eq!(same.cache, "hit");
    assert_eq!(same.body, first.body);
    let crossing = get(
        &client,
        replicas
            .pick(1)
            .url(&jscode2session(APPID, SECRET, "code-alone")),
    )
    .await;
    assert_eq!(crossing.errcode(), 40163);
    replicas
        .wait_for_state("degraded", Duration::from_secs(5))
        .await;
}

/// After traffic carrying secrets, codes and session keys, nothing readable is in Redis:
/// keys are fingerprints, values are sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_readable_is_stored_in_redis() {
    let Some(redis) = RedisServer::start_or_skip("nothing_readable_is_stored_in_redis") else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = started(&redis, &upstream).await;
    let client = client();
    let mut secrets: Vec<String> = vec![APPID.into(), SECRET.into(), COMPONENT_TOKEN.into()];
    for i in 0..6 {
        let code = format!("code-secretive-{i}");
        let answer = get(
            &client,
            replicas.pick(i).url(&jscode2session(APPID, SECRET, &code)),
        )
        .await;
        assert_eq!(answer.errcode(), 0);
        secrets.push(answer.json()["session_key"].as_str().unwrap().to_owned());
        secrets.push(answer.json()["openid"].as_str().unwrap().to_owned());
        secrets.push(code);
        let component = format!("code-component-{i}");
        let path = component_jscode2session(APPID, COMPONENT_APPID, COMPONENT_TOKEN, &component);
        assert_eq!(
            get(&client, replicas.pick(i + 1).url(&path))
                .await
                .errcode(),
            0
        );
        secrets.push(component);
    }
    let dump = redis.dump();
    assert!(dump.len() >= 12, "answers were stored: {} keys", dump.len());
    for (key, value) in &dump {
        for secret in &secrets {
            let needle = secret.as_bytes();
            assert!(
                !key.windows(needle.len()).any(|w| w == needle),
                "a key names {secret}"
            );
            assert!(
                !value.windows(needle.len()).any(|w| w == needle),
                "a value holds {secret}"
            );
        }
        for readable in [&b"session_key"[..], b"openid", b"unionid"] {
            assert!(!value.windows(readable.len()).any(|w| w == readable));
        }
    }
}

/// A claim that does not end (written by hand, or kept alive by somebody else): a retry of
/// its code on another replica is answered within the claim's lease (`upstream.timeout_ms` +
/// 2 s, four seconds here) whatever Redis says. A claim without expiry no replica wrote: it
/// is taken over (WeChat then says the code was used); one kept alive from outside makes
/// the waiter answer `-1`, as when the holder went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_never_ends_holds_a_retry_at_most_a_lease() {
    const LEASE: Duration = Duration::from_secs(4);
    let Some(redis) =
        RedisServer::start_or_skip("a_claim_that_never_ends_holds_a_retry_at_most_a_lease")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = started(&redis, &upstream).await;
    let client = client();
    let path = jscode2session(APPID, SECRET, "code-claimed-for-good");
    assert_eq!(get(&client, replicas.pick(0).url(&path)).await.errcode(), 0);
    let answers = redis.keys("wxgate:ca:*");
    assert_eq!(answers.len(), 1, "{answers:?}");
    let claim = answers[0].replace("wxgate:ca:", "wxgate:cl:");
    // The remembered answer goes; a claim without expiry takes its place.
    redis.command(&["DEL", &answers[0]]);
    redis.command(&["SET", &claim, "somebody"]);
    let retry = tokio::time::timeout(2 * LEASE, get(&client, replicas.pick(1).url(&path)))
        .await
        .expect("a retry waited for a claim without expiry for more than two leases");
    assert_eq!(
        retry.errcode(),
        40163,
        "taken over: WeChat says the code was used"
    );
    assert!(
        replicas
            .metric_sum("wxgate_redis_errors_total", &[("kind", "forged")])
            .await
            >= 1.0
    );

    // The remembered answer (40163 now) goes again, and somebody keeps a claim alive with a
    // short expiry, again and again.
    redis.command(&["DEL", &answers[0]]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let (stop, claim, addr) = (stop.clone(), claim.clone(), redis.addr());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                redis_command(addr, &["SET", &claim, "somebody", "PX", "1000"]);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // The keeper's first claim is in Redis before the retry is sent.
    while redis.value(&["GET", &claim]).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let retry = tokio::time::timeout(2 * LEASE, get(&client, replicas.pick(2).url(&path))).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    let retry = retry.expect("a retry waited for a claim kept alive for more than two leases");
    assert_eq!(
        (retry.status, retry.errcode()),
        (502, -1),
        "{:?}",
        retry.json()
    );
}
