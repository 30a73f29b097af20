//! Replicas on the Redis that production runs: Sentinel with a primary failing over in the
//! middle of a burst, Redis Cluster with keys spread over its shards and a primary killed,
//! and a Redis with TLS and an ACL user limited to wxgate's keys. Every topology is started
//! by the test from Debian's packages on free loopback ports.

use std::time::{Duration, Instant};

use crate::support::cluster::{section_config_text, Replicas};
use crate::support::redis::{command_as, RedisServer};
use crate::support::tls::TestCa;
use crate::support::topology::{
    binaries_or_skip, free_port, wait_until, RedisCluster, Sentinels, MASTER,
};
use crate::support::*;
use futures_util::future::join_all;
use wxgate_stand_in::{StandIn, StandInApp, TOKEN_PATH};

const EXCHANGE: &str = "/sns/jscode2session";

/// Calls spaced 1/6 s apart (burst 1) in windows of a second: a call admitted just before a
/// window boundary reaches the stand-in in the next window only if it takes longer than
/// that spacing to get there, which this suite (a dozen Redis servers, three wxgates and the
/// rest of the tests on two cores) stays under. (wxgate's bound is on calls leaving it;
/// WeChat counts them arriving.)
const QUOTA: u32 = 6;

fn quota_toml() -> String {
    format!("[quota]\nwindow_secs = 1\nper_window = {QUOTA}\nburst = 1\nmax_wait_ms = 60000\n[retry]\nmax_hold_ms = 60000\n")
}

/// Appids of their own, so that their keys land on several shards of a cluster.
const APPIDS: [&str; 4] = [
    "wx00000000000000b1",
    "wx00000000000000b2",
    "wx00000000000000b3",
    "wx00000000000000b4",
];

/// A stand-in with a quota of [`QUOTA`] in windows of a second, and the apps of [`APPIDS`].
async fn upstream() -> StandIn {
    stand_in(|c| {
        c.quota_per_window = Some(QUOTA);
        c.window = Duration::from_secs(1);
        for appid in APPIDS {
            c.apps.push(StandInApp {
                appid: appid.to_owned(),
                secret: SECRET.to_owned(),
                unionid: false,
            });
        }
    })
    .await
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

/// The body and `X-Wxgate-Cache` of one exchange of `appid` through `proxy`.
async fn exchange_of(proxy: &TestProxy, appid: &str, code: &str) -> (Vec<u8>, String) {
    let answer = client()
        .get(proxy.url(&jscode2session(appid, SECRET, code)))
        .send()
        .await
        .unwrap();
    let cache = answer
        .headers()
        .get("x-wxgate-cache")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (answer.bytes().await.unwrap().to_vec(), cache)
}

/// The token of `appid` through `proxy`.
async fn token_of(proxy: &TestProxy, appid: &str) -> String {
    let path = format!("{TOKEN_PATH}?grant_type=client_credential&appid={appid}&secret={SECRET}");
    let body: serde_json::Value = client()
        .get(proxy.url(&path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_owned()
}

/// `wxgate check-config --connect` with the replicas' configuration: its exit code and
/// what it printed.
fn check_connect(upstream: &StandIn, redis: &str, replicas: &Replicas) -> (Option<i32>, String) {
    let text = section_config_text(upstream, redis, &replicas.secret, "");
    let path = std::env::temp_dir().join(format!(
        "wxgate-topology-{}-{}.toml",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&path, text).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wxgate"))
        .args(["check-config", "--connect", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code(), printed)
}

/// Every request of a burst answered with success; the stand-in's calls per window of a
/// second.
fn answered_windows(answers: &[(u16, i64)], upstream: &StandIn) -> Vec<u64> {
    assert!(answers.iter().all(|a| *a == (200, 0)), "{answers:?}");
    calls_per_window(upstream, Duration::from_secs(1))
        .into_values()
        .collect()
}

/// What a burst at five times the quota gets while one shard of a Redis Cluster fails over:
/// every request answered; the replicas' own keys live on another shard, so a replica may
/// count in Redis for some keys while it counts the failing shard's on its own, as in a
/// partition (docs/replicas.md, "Failover"): a window holds at most the quota plus every
/// replica's share, and WeChat's 45011 past the quota is held and retried, never seen.
fn assert_within_a_partitions_bound(answers: &[(u16, i64)], upstream: &StandIn, replicas: u32) {
    let windows = answered_windows(answers, upstream);
    let bound = u64::from(QUOTA + replicas * (QUOTA / replicas));
    assert!(
        windows.iter().all(|calls| *calls <= bound),
        "a window held more than the quota and the shares ({bound}): {windows:?}"
    );
}

/// The guarantees of a burst at five times the quota while Redis fails over: every request
/// answered, WeChat never says 45011, no window holds more than the quota.
fn assert_within_the_quota(answers: &[(u16, i64)], upstream: &StandIn) {
    let windows = answered_windows(answers, upstream);
    assert_eq!(
        upstream.answers(45011),
        0,
        "WeChat never said 45011: calls per window {windows:?}"
    );
    assert!(
        windows.iter().all(|calls| *calls <= u64::from(QUOTA)),
        "a window held more than the quota: {windows:?}"
    );
}

/// No Redis error but the ones a failover causes (no `CROSSSLOT`, no permission refused):
/// `kind="answer"` counts errors Redis answered with.
async fn assert_no_refusal(replicas: &Replicas) {
    let refused = replicas
        .metric_sum("wxgate_redis_errors_total", &[("kind", "answer")])
        .await;
    if refused > 0.0 {
        let mut series = Vec::new();
        for proxy in &replicas.proxies {
            let text = proxy.metrics().await;
            series.extend(
                text.lines()
                    .filter(|line| {
                        line.starts_with("wxgate_redis_errors_total") && !line.ends_with(" 0")
                    })
                    .map(str::to_owned),
            );
        }
        panic!("Redis refused {refused} operations: {series:#?}");
    }
}

/// Sentinel: a primary, its replica and three sentinels. The primary is killed in the middle
/// of a burst at five times the quota: every request is answered, no window holds more than
/// the quota, the replicas are degraded while the failover lasts and count in Redis again on
/// the new primary by themselves, and a code remembered before the failover (which reached
/// the Redis replica) is still remembered after it, on a replica that never saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_mid_burst_keeps_the_quota_and_the_codes() {
    let test = "sentinel_failover_mid_burst_keeps_the_quota_and_the_codes";
    if !binaries_or_skip(test, &["redis-server", "redis-cli"]) {
        return;
    }
    let mut set = Sentinels::start();
    let upstream = upstream().await;
    let redis = format!(
        "sentinels = {:?}\nsentinel_master = \"{MASTER}\"\n",
        set.addresses()
    );
    let replicas = Replicas::start_on(&upstream, &redis, &quota_toml()).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(10))
        .await;
    replicas.wait_until_they_know_each_other().await;
    let (code, printed) = check_connect(&upstream, &redis, &replicas);
    assert_eq!(code, Some(0), "{printed}");
    assert!(
        printed.contains("# [cluster]: Redis Sentinel: the primary of")
            && printed.contains("# Redis answered: Redis Sentinel"),
        "{printed}"
    );

    // A code answered before the failover, its answer replicated.
    let (before, cache) = exchange_of(replicas.pick(0), APPID, "code-before-failover").await;
    assert_eq!((errcode(&before), cache.as_str()), (0, "miss"));
    wait_until("the answer on the Redis replica", || {
        !set.replica.keys("wxgate:ca:*").is_empty()
    });

    let load = burst(&replicas, "code-failover", 5 * QUOTA as usize);
    let failover = async {
        while upstream.calls(EXCHANGE) < u64::from(QUOTA / 2 + 1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        set.primary.stop();
        let killed = Instant::now();
        replicas
            .wait_for_state("degraded", Duration::from_secs(10))
            .await;
        replicas
            .wait_for_state("shared", Duration::from_secs(30))
            .await;
        killed.elapsed()
    };
    let (answers, back_after) = tokio::join!(load, failover);
    eprintln!(
        "sentinel: the replicas counted in Redis again {back_after:?} after the primary was killed"
    );
    assert_within_the_quota(&answers, &upstream);
    assert_eq!(
        set.primary_port(),
        set.replica.port(),
        "the replica took over"
    );
    assert_no_refusal(&replicas).await;

    // The code is replayed on a replica that never saw it: from the new primary.
    let calls = upstream.calls(EXCHANGE);
    let (after, cache) = exchange_of(replicas.pick(2), APPID, "code-before-failover").await;
    assert_eq!(cache, "hit");
    assert_eq!(after, before, "the first answer, byte for byte");
    assert_eq!(
        upstream.calls(EXCHANGE),
        calls,
        "no upstream call for the replay"
    );

    // Shared counting on the new primary: a burst keeps the quota again.
    upstream.reset_counters();
    let answers = burst(&replicas, "code-after-failover", 2 * QUOTA as usize).await;
    assert_within_the_quota(&answers, &upstream);
    assert!(
        !set.replica.keys("wxgate:q:*").is_empty(),
        "counted on the new primary"
    );
}

/// Redis Cluster, three primaries with a replica each: quota, codes and tokens of several
/// appids work with their keys spread over the shards (no `CROSSSLOT`: every script runs),
/// and a primary killed in the middle of a burst at five times the quota costs what a
/// Sentinel failover costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_spreads_the_keys_and_survives_a_primary_killed() {
    let test = "redis_cluster_spreads_the_keys_and_survives_a_primary_killed";
    if !binaries_or_skip(test, &["redis-server", "redis-cli"]) {
        return;
    }
    let mut cluster = RedisCluster::start();
    let upstream = upstream().await;
    let redis = format!("cluster_nodes = {:?}\n", cluster.seeds());
    let replicas = Replicas::start_on(&upstream, &redis, &quota_toml()).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(10))
        .await;
    replicas.wait_until_they_know_each_other().await;
    let (code, printed) = check_connect(&upstream, &redis, &replicas);
    assert_eq!(code, Some(0), "{printed}");
    assert!(
        printed.contains("# Redis answered: Redis Cluster: 6 seed node(s)"),
        "{printed}"
    );

    // The default app first: its bucket's epoch (a key without expiry) is the only one, and
    // names its shard.
    assert_eq!(
        exchange(&client(), replicas.pick(0), "code-first").await,
        (200, 0)
    );
    let buckets: Vec<String> = cluster
        .primaries()
        .iter()
        .flat_map(|node| node.keys("wxgate:qe:*"))
        .collect();
    assert_eq!(buckets.len(), 1, "{buckets:?}");
    let shard = cluster.primary_of(&buckets[0]);

    // Codes (coalesced, then replayed on other replicas) and tokens (one fetch for all
    // replicas) of every appid.
    for appid in APPIDS {
        let code = format!("code-of-{appid}");
        let (first, cache) = exchange_of(replicas.pick(0), appid, &code).await;
        assert_eq!((errcode(&first), cache.as_str()), (0, "miss"), "{appid}");
        for i in 1..3 {
            let (again, cache) = exchange_of(replicas.pick(i), appid, &code).await;
            assert_eq!(
                (again.as_slice(), cache.as_str()),
                (first.as_slice(), "hit")
            );
        }
        let token = token_of(replicas.pick(0), appid).await;
        for i in 1..3 {
            assert_eq!(token_of(replicas.pick(i), appid).await, token, "{appid}");
        }
    }
    assert_eq!(
        upstream.calls(TOKEN_PATH),
        APPIDS.len() as u64,
        "one token fetch per appid for every replica"
    );
    // One code sent to the three replicas at once, WeChat slow: the two that find the claim
    // wait on the code's sharded channel, on the shard of its keys, and get the holder's
    // answer.
    upstream.set_latency(Duration::from_millis(1500));
    let path = jscode2session(APPIDS[0], SECRET, "code-waited-for");
    let client = client();
    let answers = join_all((0..3).map(|i| {
        let (client, url) = (client.clone(), replicas.pick(i).url(&path));
        async move { client.get(url).send().await.unwrap().bytes().await.unwrap() }
    }));
    let ports: Vec<u16> = cluster.primaries().iter().map(|node| node.port()).collect();
    let subscribed = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            for port in &ports {
                let channels = crate::support::topology::cli(
                    *port,
                    &["PUBSUB", "SHARDCHANNELS", "wxgate:cn:*"],
                );
                if channels.contains("wxgate:cn:{") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let (answers, subscribed) = tokio::join!(answers, subscribed);
    upstream.set_latency(Duration::ZERO);
    assert!(
        subscribed.unwrap(),
        "no replica waited on a sharded channel"
    );
    assert!(answers
        .iter()
        .all(|answer| *answer == answers[0] && errcode(answer) == 0));
    assert_eq!(
        replicas
            .metric_sum("wxgate_redis_errors_total", &[("op", "subscribe")])
            .await,
        0.0
    );

    let spread = cluster.keys_per_primary();
    assert!(
        spread.iter().filter(|keys| **keys > 0).count() >= 2,
        "the keys are on one shard only: {spread:?}"
    );
    assert_no_refusal(&replicas).await;

    // The default app's primary killed mid-burst.
    upstream.reset_counters();
    let load = burst(&replicas, "code-cluster-failover", 5 * QUOTA as usize);
    let failover = async {
        while upstream.calls(EXCHANGE) < u64::from(QUOTA / 2 + 1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let errors_before = replicas
            .metric_sum("wxgate_redis_errors_total", &[("kind", "connection")])
            .await;
        cluster.nodes[shard].stop();
        let killed = Instant::now();
        // The replicas meet the shard's failure (only the operations of its slots fail: a
        // replica degrades at one and may count in Redis again at its next probe while the
        // failover goes on), then count in Redis once the replica took over.
        while replicas
            .metric_sum("wxgate_redis_errors_total", &[("kind", "connection")])
            .await
            <= errors_before
        {
            assert!(killed.elapsed() < Duration::from_secs(10), "nobody noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::block_in_place(|| cluster.wait_until_ok());
        replicas
            .wait_for_state("shared", Duration::from_secs(30))
            .await;
        killed.elapsed()
    };
    let (answers, back_after) = tokio::join!(load, failover);
    eprintln!(
        "cluster: the replicas counted in Redis again {back_after:?} after the primary was killed"
    );
    assert_within_a_partitions_bound(&answers, &upstream, replicas.proxies.len() as u32);
    assert_eq!(cluster.primaries().len(), 3, "a replica took over");

    // Shared counting again, on the promoted replica.
    upstream.reset_counters();
    let answers = burst(&replicas, "code-cluster-after", 2 * QUOTA as usize).await;
    assert_within_the_quota(&answers, &upstream);
    assert_no_refusal(&replicas).await;
}

/// What the ACL user of [`tls_and_an_acl_user_limited_to_the_prefix_share`] may do: its
/// keys and channels under `wxgate:`, and exactly the commands wxgate sends (those around
/// the connection, the scripts' own, and those the scripts call).
const ACL_USER: &[&str] = &[
    "--user",
    "wxgate",
    "on",
    ">wxgate-password",
    "resetkeys",
    "~wxgate:*",
    "resetchannels",
    "&wxgate:*",
    "-@all",
    // The connection and wxgate's own commands.
    "+hello",
    "+ping",
    "+evalsha",
    "+eval",
    "+script|load",
    "+subscribe",
    "+unsubscribe",
    "+ssubscribe",
    "+sunsubscribe",
    "+zrem",
    // What the scripts call.
    "+time",
    "+type",
    "+get",
    "+mget",
    "+set",
    "+del",
    "+pttl",
    "+pexpire",
    "+incr",
    "+hget",
    "+hmget",
    "+hset",
    "+hincrby",
    "+hdel",
    "+zadd",
    "+zcard",
    "+zremrangebyscore",
    "+zrevrangebyscore",
    "+publish",
    "+spublish",
];

/// A Redis that speaks TLS only to wxgate (a certificate of a private CA, given in
/// `cluster.ca_file`) and an ACL user limited to the key prefix and to the commands wxgate
/// needs: the replicas share through it (one upstream call for a code sent to all three,
/// quota turns counted in Redis, no Redis error), and the user can do nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_an_acl_user_limited_to_the_prefix_share() {
    let test = "tls_and_an_acl_user_limited_to_the_prefix_share";
    if !binaries_or_skip(test, &["redis-server"]) {
        return;
    }
    let ca = TestCa::new();
    let dir = std::env::temp_dir().join(format!("wxgate-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("redis.pem"), dir.join("redis.key"));
    ca.write_leaf(&["localhost"], &cert, &key);
    let tls_port = free_port().to_string();
    let mut arguments = vec![
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.ca_file().to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ];
    arguments.extend_from_slice(ACL_USER);
    let redis = RedisServer::start_with(&arguments);
    let upstream = stand_in(|_| {}).await;
    let section = format!(
        "redis_url = \"rediss://wxgate:wxgate-password@localhost:{tls_port}\"\nca_file = \"{}\"\n",
        ca.ca_file().display()
    );
    let replicas = Replicas::start_on(&upstream, &section, "[quota]\nwindow_secs = 1\n").await;
    replicas
        .wait_for_state("shared", Duration::from_secs(10))
        .await;
    replicas.wait_until_they_know_each_other().await;

    let client = client();
    let path = jscode2session(APPID, SECRET, "code-over-tls");
    let answers = join_all((0..3).map(|i| {
        let (client, url) = (client.clone(), replicas.pick(i).url(&path));
        async move { errcode(&client.get(url).send().await.unwrap().bytes().await.unwrap()) }
    }))
    .await;
    assert_eq!(answers, [0, 0, 0]);
    assert_eq!(
        upstream.calls(EXCHANGE),
        1,
        "one upstream call for the three"
    );
    for i in 0..3 {
        assert_eq!(
            exchange(&client, replicas.pick(i), &format!("code-tls-{i}")).await,
            (200, 0)
        );
    }
    assert!(
        replicas
            .metric_sum(
                "wxgate_redis_duration_seconds_count",
                &[("op", "code_claim")]
            )
            .await
            >= 4.0
    );
    assert_eq!(
        replicas.metric_sum("wxgate_redis_errors_total", &[]).await,
        0.0,
        "no Redis error"
    );
    assert!(!redis.keys("wxgate:*").is_empty());

    // The user can touch nothing else.
    for refused in [
        vec!["SET", "other:key", "1"],
        vec!["GET", "other:key"],
        vec!["KEYS", "*"],
        vec!["FLUSHALL"],
        vec!["CONFIG", "GET", "*"],
        vec!["PUBLISH", "other-channel", "x"],
    ] {
        let answer = command_as(redis.addr(), "wxgate", "wxgate-password", &refused);
        assert!(
            answer
                .as_deref()
                .is_some_and(|line| line.starts_with("-NOPERM")),
            "{refused:?} answered {answer:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
