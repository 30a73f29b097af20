//! Replicas as one central token server: three wxgates sharing a real `redis-server`, SDK-
//! style backends spread over them, against a stand-in whose tokens live seconds. One fetch
//! per lifetime for all of them, a Redis outage that callers never notice, a token refused
//! through one replica dropped for all, and nothing readable in Redis.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::cluster::Replicas;
use crate::support::redis::RedisServer;
use crate::support::sdk::{SdkClient, Style};
use crate::support::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use wxgate_stand_in::{
    StandIn, CHECKED_API_PATH, COMPONENT_TOKEN_PATH, DEFAULT_COMPONENT_APPSECRET,
    STABLE_TOKEN_PATH, TOKEN_PATH,
};

/// Quota windows of a second, so that replicas back from an outage resume within one.
const EXTRA: &str = "[quota]\nwindow_secs = 1\n";

fn token_path(secret: &str) -> String {
    format!("{TOKEN_PATH}?grant_type=client_credential&appid={APPID}&secret={secret}")
}

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

async fn post_json(client: &reqwest::Client, url: String, body: Value) -> Value {
    client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn token_of(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_owned()
}

/// Backends calling through the replicas until stopped; the errcodes of calls that failed
/// even after their SDK's retry.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Vec<i64>>,
}

impl Load {
    /// Two callers for each of `clients`, calling every few milliseconds.
    fn start(clients: &[Arc<SdkClient>]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for sdk in clients.iter().flat_map(|sdk| [sdk.clone(), sdk.clone()]) {
            let stop = stop.clone();
            tasks.spawn(async move {
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let errcode = sdk.call(CHECKED_API_PATH).await;
                    if errcode != 0 {
                        failed.push(errcode);
                    }
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(2..8))).await;
                }
                failed
            });
        }
        Load { stop, tasks }
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.join_all().await.into_iter().flatten().collect()
    }
}

/// Waits until WeChat has seen more than `fetches` token fetches, then until every replica
/// hands out the token of the last one (each reads it from Redis).
async fn wait_for_a_refresh_everywhere(upstream: &StandIn, replicas: &Replicas, fetches: u64) {
    while upstream.token_fetches(TOKEN_PATH, APPID) <= fetches {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = client();
    'again: loop {
        let first = token_of(&get_json(&client, replicas.pick(0).url(&token_path(SECRET))).await);
        for proxy in &replicas.proxies[1..] {
            if token_of(&get_json(&client, proxy.url(&token_path(SECRET))).await) != first {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue 'again;
            }
        }
        return;
    }
}

/// Six backends (wechatpy and WxJava style) over three replicas for several lifetimes: one
/// fetch per lifetime for all the replicas, and no call ever refused. Redis stopped right
/// after a refresh changes nothing for the callers (each replica serves the token it has);
/// back, empty, it gets that token from the replicas instead of a new fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_once_per_lifetime_and_ride_out_redis_stopping() {
    const LIFETIME: Duration = Duration::from_secs(5);
    let Some(mut redis) = RedisServer::start_or_skip(
        "three_replicas_refresh_once_per_lifetime_and_ride_out_redis_stopping",
    ) else {
        return;
    };
    let upstream = stand_in(|c| {
        c.token_lifetime = LIFETIME;
        c.token_overlap = Duration::from_secs(3);
        // quota/get states its figures per second too (it says "no limit" for the API the
        // backends call), so that the key's window, which the replicas take from it, is a
        // second as `EXTRA`'s: the window a replica degrades in counts as spent.
        c.window = Duration::from_secs(1);
    })
    .await;
    let replicas = Replicas::start(&upstream, &redis.url(), EXTRA).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let clients: Vec<Arc<SdkClient>> = (0..6)
        .map(|i| {
            let style = [Style::Wechatpy, Style::WxJava][i % 2];
            let base = replicas.pick(i).url("");
            Arc::new(SdkClient::new(client(), &base, APPID, SECRET, style))
        })
        .collect();
    let load = Load::start(&clients);

    // Two lifetimes with Redis: time passing is the behaviour.
    tokio::time::sleep(2 * LIFETIME).await;
    let with_redis = upstream.token_fetches(TOKEN_PATH, APPID);
    assert!(
        (2..=4).contains(&with_redis),
        "{with_redis} fetches in two lifetimes over three replicas"
    );

    // Redis stops right after a refresh that every replica has taken up, for less than what
    // remains of that token before its refresh window.
    wait_for_a_refresh_everywhere(&upstream, &replicas, with_redis).await;
    let before_outage = upstream.token_fetches(TOKEN_PATH, APPID);
    redis.stop();
    replicas
        .wait_for_state("degraded", Duration::from_secs(5))
        .await;
    // Callers keep calling through the outage (time passing is the behaviour); the token
    // enters its refresh window three seconds after it was minted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        upstream.token_fetches(TOKEN_PATH, APPID),
        before_outage,
        "no replica fetched on its own"
    );

    // Back, empty: the replicas seed it with the token they hold, then refresh it once per
    // lifetime again.
    redis.restart();
    replicas
        .wait_for_state("shared", Duration::from_secs(10))
        .await;
    let back = upstream.token_fetches(TOKEN_PATH, APPID);
    tokio::time::sleep(2 * LIFETIME).await;
    let failed = load.finish().await;
    let after = upstream.token_fetches(TOKEN_PATH, APPID) - back;
    assert!(
        (1..=3).contains(&after),
        "{after} fetches in two lifetimes after the outage"
    );

    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert_eq!(
        upstream.answers(40001),
        0,
        "a token from wxgate was refused"
    );
    let calls: u64 = clients
        .iter()
        .map(|c| c.calls.load(Ordering::Relaxed))
        .sum();
    assert!(calls > 1000, "{calls} calls");
    let counted = replicas
        .metric_sum("wxgate_token_fetches_total", &[("api", TOKEN_PATH)])
        .await;
    assert_eq!(counted as u64, upstream.token_fetches(TOKEN_PATH, APPID));
    assert!(
        replicas
            .metric_sum(
                "wxgate_redis_duration_seconds_count",
                &[("op", "token_lease")]
            )
            .await
            > 0.0
    );
}

/// 200 fetches spread over three replicas make one fetch; the three kinds of token are kept
/// apart; and a dump of Redis holds no token, secret or appid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_fetch_and_redis_holds_nothing_readable() {
    let Some(redis) =
        RedisServer::start_or_skip("replicas_share_one_fetch_and_redis_holds_nothing_readable")
    else {
        return;
    };
    let upstream = stand_in(|c| c.latency = Duration::from_millis(50)).await;
    let replicas = Replicas::start(&upstream, &redis.url(), EXTRA).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let client = client();
    let answers =
        join_all((0..200).map(|i| get_json(&client, replicas.pick(i).url(&token_path(SECRET)))))
            .await;
    let token = token_of(&answers[0]);
    assert!(answers.iter().all(|answer| token_of(answer) == token));
    assert_eq!(upstream.token_fetches(TOKEN_PATH, APPID), 1);

    let stable_body = json!({"grant_type": "client_credential", "appid": APPID, "secret": SECRET});
    let stable = join_all((0..30).map(|i| {
        post_json(
            &client,
            replicas.pick(i).url(STABLE_TOKEN_PATH),
            stable_body.clone(),
        )
    }))
    .await;
    assert!(stable
        .iter()
        .all(|answer| answer["access_token"] == stable[0]["access_token"]));
    assert_eq!(upstream.token_fetches(STABLE_TOKEN_PATH, APPID), 1);
    let component_body = json!({
        "component_appid": COMPONENT_APPID,
        "component_appsecret": DEFAULT_COMPONENT_APPSECRET,
        "component_verify_ticket": "ticket",
    });
    let component = join_all((0..30).map(|i| {
        post_json(
            &client,
            replicas.pick(i).url(COMPONENT_TOKEN_PATH),
            component_body.clone(),
        )
    }))
    .await;
    assert_eq!(
        upstream.token_fetches(COMPONENT_TOKEN_PATH, COMPONENT_APPID),
        1
    );
    // A wrong secret at every replica: WeChat's 40125, never the shared token.
    for proxy in &replicas.proxies {
        let wrong = get_json(&client, proxy.url(&token_path("wrong-secret"))).await;
        assert_eq!(wrong["errcode"], 40125, "{wrong}");
    }

    let secrets = [
        APPID.to_owned(),
        SECRET.to_owned(),
        COMPONENT_APPID.to_owned(),
        DEFAULT_COMPONENT_APPSECRET.to_owned(),
        token,
        token_of(&stable[0]),
        component[0]["component_access_token"]
            .as_str()
            .unwrap()
            .to_owned(),
    ];
    let dump = redis.dump();
    assert!(dump.len() >= 6, "{} keys", dump.len());
    for (key, value) in dump {
        for secret in &secrets {
            let found = |bytes: &[u8]| bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(
                !found(&key) && !found(&value),
                "Redis holds a secret under {}",
                String::from_utf8_lossy(&key)
            );
        }
    }
}

/// A token refused by WeChat through a replica that never handed it out is dropped for all
/// (found through Redis), and the next fetch at a third replica refreshes it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_through_one_replica_is_dropped_for_all() {
    let Some(redis) =
        RedisServer::start_or_skip("a_token_refused_through_one_replica_is_dropped_for_all")
    else {
        return;
    };
    let upstream = stand_in(|c| c.token_overlap = Duration::from_millis(300)).await;
    let replicas = Replicas::start(&upstream, &redis.url(), EXTRA).await;
    replicas
        .wait_for_state("shared", Duration::from_secs(5))
        .await;
    let client = client();
    let stale = token_of(&get_json(&client, replicas.pick(0).url(&token_path(SECRET))).await);
    // Another server fetches straight from WeChat; wxgate's token stops working after the
    // overlap.
    let direct = upstream.base_url();
    get_json(&client, format!("{direct}{}", token_path(SECRET))).await;
    let check = |base: String| {
        let client = client.clone();
        let stale = stale.clone();
        async move {
            let url = format!("{base}{CHECKED_API_PATH}?access_token={stale}");
            get_json(&client, url).await["errcode"]
                .as_i64()
                .unwrap_or(0)
        }
    };
    while check(direct.clone()).await != 40001 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = join_all((0..10).map(|_| check(replicas.pick(1).url("")))).await;
    assert!(refused.iter().all(|errcode| *errcode == 40001));
    let fetches = upstream.token_fetches(TOKEN_PATH, APPID);
    let fresh =
        join_all((0..10).map(|_| get_json(&client, replicas.pick(2).url(&token_path(SECRET)))))
            .await;
    assert!(fresh
        .iter()
        .all(|answer| token_of(answer) == token_of(&fresh[0])));
    assert_ne!(token_of(&fresh[0]), stale);
    assert_eq!(upstream.token_fetches(TOKEN_PATH, APPID), fetches + 1);
    // Replica 0, which handed the stale token out, now hands out the fresh one.
    let again = get_json(&client, replicas.pick(0).url(&token_path(SECRET))).await;
    assert_eq!(token_of(&again), token_of(&fresh[0]));
}
