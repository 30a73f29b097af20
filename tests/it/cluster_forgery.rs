//! A party that can write to the replicas' Redis but has no cluster secret, as an attacker
//! would: it lists the keys, rewrites values, removes expiries and adds members. What it
//! writes never costs more than losing Redis: no more upstream calls than the replicas would
//! make on their own, no key held back for more than about a window, no share shrunk by
//! replicas that do not exist; and wxgate says so (`wxgate_redis_errors_total{kind="forged"}`).

use std::time::Duration;

use crate::support::cluster::Replicas;
use crate::support::redis::RedisServer;
use crate::support::*;
use serde_json::Value;
use wxgate_stand_in::TOKEN_PATH;

/// An issue time in the year 5138, in µs: later than any token wxgate will ever fetch.
const FAR_FUTURE_MICROS: &str = "99999999999999999";

fn token_path() -> String {
    format!("{TOKEN_PATH}?grant_type=client_credential&appid={APPID}&secret={SECRET}")
}

async fn token_at(client: &reqwest::Client, proxy: &TestProxy) -> String {
    let body: Value = client
        .get(proxy.url(&token_path()))
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

/// `wxgate_redis_errors_total{kind="forged"}` over every replica.
async fn forged(replicas: &Replicas) -> f64 {
    replicas
        .metric_sum("wxgate_redis_errors_total", &[("kind", "forged")])
        .await
}

/// The token entries in Redis (`token:` hashes, not the index, the lease or the counters).
fn token_entries(redis: &RedisServer) -> Vec<String> {
    redis.keys("wxgate:token:*")
}

/// An attacker turns the shared token off: deletes an entry's sealed fields, sets its issue
/// time far in the future and removes its expiry. The replicas keep serving the tokens they
/// hold (no fetch: each has one, as it would without Redis), report the forgery, and put
/// their token back in Redis. Setting the issue time alone does not block stores either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_token_issue_time_costs_no_fetch_and_is_reported() {
    let Some(redis) =
        RedisServer::start_or_skip("a_forged_token_issue_time_costs_no_fetch_and_is_reported")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = Replicas::start(&upstream, &redis.url(), "[quota]\nwindow_secs = 1\n").await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let client = client();
    let mut tokens = Vec::new();
    for proxy in &replicas.proxies {
        tokens.push(token_at(&client, proxy).await);
    }
    assert!(tokens.iter().all(|token| *token == tokens[0]));
    assert_eq!(upstream.token_fetches(TOKEN_PATH, APPID), 1);
    let entries = token_entries(&redis);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];

    // The attack of the review: no sealed fields, an issue time in the future, no expiry.
    redis.command(&["HDEL", entry, "s", "t"]);
    redis.command(&["HSET", entry, "i", FAR_FUTURE_MICROS]);
    redis.command(&["PERSIST", entry]);
    let mut answers = Vec::new();
    for i in 0..210 {
        answers.push(token_at(&client, replicas.pick(i)).await);
    }
    let fetched = upstream.token_fetches(TOKEN_PATH, APPID) - 1;
    assert!(
        fetched <= replicas.proxies.len() as u64,
        "{fetched} fetches for 210 requests after the forgery"
    );
    assert!(
        answers.iter().all(|token| *token == tokens[0]),
        "a replica let its token go"
    );
    assert!(
        forged(&replicas).await >= 1.0,
        "the forgery went unreported"
    );
    let issued = redis.value(&["HGET", entry, "i"]);
    assert_ne!(
        issued.as_deref(),
        Some(FAR_FUTURE_MICROS),
        "the forged time stayed"
    );
    assert!(
        redis.value(&["HGET", entry, "s"]).is_some(),
        "the token is back in Redis"
    );

    // The issue time alone, the sealed token left in place: no store is blocked.
    let reported = forged(&replicas).await;
    redis.command(&["HSET", entry, "i", FAR_FUTURE_MICROS]);
    for i in 0..30 {
        assert_eq!(token_at(&client, replicas.pick(i)).await, tokens[0]);
    }
    assert!(upstream.token_fetches(TOKEN_PATH, APPID) - 1 <= fetched + 3);
    assert!(forged(&replicas).await > reported);
    let issued = redis.value(&["HGET", entry, "i"]);
    assert_ne!(
        issued.as_deref(),
        Some(FAR_FUTURE_MICROS),
        "the forged time stayed"
    );
}

/// An attacker adds a thousand members to the heartbeat set, some as fresh as a live
/// replica's, some dated far ahead: the replicas still count three of them, and report the
/// forgery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_heartbeat_members_are_not_counted() {
    let Some(redis) = RedisServer::start_or_skip("fake_heartbeat_members_are_not_counted") else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    let replicas = Replicas::start(&upstream, &redis.url(), "[quota]\nwindow_secs = 1\n").await;
    replicas.wait_until_they_know_each_other().await;

    let now = redis.time_ms();
    let (fresh, ahead) = (now.to_string(), (now + 3_600_000).to_string());
    let members: Vec<String> = (0..1000).map(|i| format!("replica-{i:04}")).collect();
    let mut zadd = vec!["ZADD", "wxgate:replicas:{replicas}"];
    for (i, member) in members.iter().enumerate() {
        zadd.push(if i % 2 == 0 { &fresh } else { &ahead });
        zadd.push(member);
    }
    assert_eq!(redis.command(&zadd).as_deref(), Some(":1000"));

    // Two heartbeats of every replica after the members were added.
    let heartbeats = |text: &str| {
        metric(
            text,
            "wxgate_redis_duration_seconds_count",
            &[("op", "heartbeat")],
        )
    };
    for proxy in &replicas.proxies {
        let before = heartbeats(&proxy.metrics().await);
        let text = proxy
            .metrics_until("two heartbeats", |text| heartbeats(text) >= before + 2.0)
            .await;
        assert_eq!(
            metric(&text, "wxgate_cluster_replicas", &[]),
            3.0,
            "fake members were counted"
        );
        assert!(
            metric(
                &text,
                "wxgate_redis_errors_total",
                &[("op", "heartbeat"), ("kind", "forged")]
            ) >= 1.0,
            "the fake members went unreported"
        );
    }
}

/// An attacker sets a quota key's theoretical arrival time and its 45011 pause far in the
/// future, without expiry: the key is held for at most about a window, every call is
/// answered, and the forgery is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_quota_state_holds_a_key_at_most_a_window() {
    let Some(redis) =
        RedisServer::start_or_skip("a_forged_quota_state_holds_a_key_at_most_a_window")
    else {
        return;
    };
    let upstream = stand_in(|_| {}).await;
    // Windows of a second; a call waits up to three for its turn.
    let quota = "[quota]\nwindow_secs = 1\nper_window = 12\nburst = 1\nmax_wait_ms = 3000\n";
    let replicas = Replicas::start(&upstream, &redis.url(), quota).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let client = client();
    assert_eq!(
        exchange(&client, replicas.pick(0), "code-before").await,
        (200, 0)
    );
    let buckets = redis.keys("wxgate:q:*");
    assert_eq!(buckets.len(), 1, "{buckets:?}");
    let fingerprint = buckets[0].trim_start_matches("wxgate:q:");
    let pause = format!("wxgate:p:{fingerprint}");
    redis.command(&["SET", &buckets[0], FAR_FUTURE_MICROS]);
    redis.command(&["SET", &pause, FAR_FUTURE_MICROS]);

    for i in 0..6 {
        let answer = exchange(&client, replicas.pick(i), &format!("code-after-{i}")).await;
        assert_eq!(answer, (200, 0), "call {i} after the forgery");
    }
    assert!(
        forged(&replicas).await >= 1.0,
        "the forgery went unreported"
    );
    for key in [&buckets[0], &pause] {
        let value = redis.value(&["GET", key]);
        assert_ne!(
            value.as_deref(),
            Some(FAR_FUTURE_MICROS),
            "{key} kept its forged value"
        );
    }
}
