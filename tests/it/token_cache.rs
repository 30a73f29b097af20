//! wxgate as the central access-token server, over real HTTP against the stand-in: one fetch
//! for many callers, secrets kept apart, lifetimes told honestly and tokens refreshed ahead
//! of expiry, stale tokens dropped once, forced refreshes spaced, SDK-style clients running
//! unchanged.

use std::sync::Arc;
use std::time::Duration;

use crate::support::sdk::{SdkClient, Style};
use crate::support::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::time::Instant;
use wxgate_stand_in::{
    StandIn, StandInConfig, CHECKED_API_PATH, COMPONENT_TOKEN_PATH, DEFAULT_COMPONENT_APPSECRET,
    STABLE_TOKEN_PATH, TOKEN_PATH,
};

/// A stand-in configured by `configure` and a wxgate in front of it with `extra` TOML.
async fn start(configure: impl FnOnce(&mut StandInConfig), extra: &str) -> (StandIn, TestProxy) {
    let upstream = stand_in(configure).await;
    let proxy = spawn_proxy(config(&config_text(&upstream.base_url(), extra))).await;
    (upstream, proxy)
}

fn token_path(secret: &str) -> String {
    format!("{TOKEN_PATH}?grant_type=client_credential&appid={APPID}&secret={secret}")
}

async fn get_json(client: &reqwest::Client, url: String) -> (Value, Option<String>) {
    let answer = client.get(url).send().await.expect("an answer");
    let cache = answer
        .headers()
        .get("x-wxgate-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    (answer.json().await.expect("JSON"), cache)
}

async fn post_json(client: &reqwest::Client, url: String, body: Value) -> Value {
    let answer = client
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("an answer");
    answer.json().await.expect("JSON")
}

async fn fetch(client: &reqwest::Client, proxy: &TestProxy, secret: &str) -> Value {
    get_json(client, proxy.url(&token_path(secret))).await.0
}

/// The checked API through wxgate with `token`: its errcode.
async fn use_token(client: &reqwest::Client, base: &str, token: &str) -> i64 {
    let url = format!("{base}{CHECKED_API_PATH}?access_token={token}");
    let (body, _) = get_json(client, url).await;
    body["errcode"].as_i64().unwrap_or(0)
}

fn token_of(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_owned()
}

/// 200 callers at once: one fetch reaches WeChat and every caller gets its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_fetches_make_one_upstream_fetch() {
    let (upstream, proxy) = start(|c| c.latency = Duration::from_millis(100), "").await;
    let client = client();
    let answers = join_all((0..200).map(|_| fetch(&client, &proxy, SECRET))).await;
    let first = token_of(&answers[0]);
    for answer in &answers {
        assert_eq!(token_of(answer), first);
        let expires_in = answer["expires_in"].as_u64().unwrap();
        assert!((7190..=7200).contains(&expires_in), "{answer}");
    }
    assert_eq!(upstream.calls(TOKEN_PATH), 1);
    let text = proxy.metrics().await;
    let api = ("api", TOKEN_PATH);
    assert_eq!(metric(&text, "wxgate_token_fetches_total", &[api]), 1.0);
    let requests = metric(&text, "wxgate_token_requests_total", &[api]);
    assert_eq!(requests, 200.0);
    assert_eq!(
        metric(
            &text,
            "wxgate_requests_total",
            &[api, ("outcome", "forwarded")]
        ),
        1.0
    );
    assert_eq!(metric(&text, "wxgate_token_fetches_today_max", &[api]), 1.0);
    assert!(
        metric(&text, "wxgate_token_expiry_seconds", &[]) > 0.0
            || text.contains("wxgate_token_expiry_seconds NaN")
    );
}

/// A wrong secret gets WeChat's 40125 and never the token: while the right secret's fetch is
/// in flight, and once its token is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_gets_40125_and_no_token_also_during_a_fetch() {
    let (upstream, proxy) = start(|c| c.latency = Duration::from_millis(300), "").await;
    let client = client();
    let right = tokio::spawn({
        let client = client.clone();
        let url = proxy.url(&token_path(SECRET));
        async move { get_json(&client, url).await.0 }
    });
    // The right secret's fetch has reached WeChat and waits for its answer.
    while upstream.calls(TOKEN_PATH) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = fetch(&client, &proxy, "wrong-secret").await;
    let token = token_of(&right.await.unwrap());
    let after = fetch(&client, &proxy, "wrong-secret").await;
    for wrong in [&during, &after] {
        assert_eq!(wrong["errcode"], 40125, "{wrong}");
        assert!(wrong.get("access_token").is_none(), "{wrong}");
        assert!(!wrong.to_string().contains(&token));
    }
    // Each wrong secret made its own call; the right one's token is still served.
    assert_eq!(upstream.calls(TOKEN_PATH), 3);
    let (again, cache) = get_json(&client, proxy.url(&token_path(SECRET))).await;
    assert_eq!(token_of(&again), token);
    assert_eq!(cache.as_deref(), Some("hit"));
    assert_eq!(upstream.token_fetches(TOKEN_PATH, APPID), 1);
    let text = proxy.metrics().await;
    assert!(
        metric(
            &text,
            "wxgate_token_requests_total",
            &[("outcome", "rejected")]
        ) >= 1.0
    );
    assert!(!text.contains(SECRET) && !text.contains("wrong-secret") && !text.contains(&token));
}

/// Across several short lifetimes, backends calling every few milliseconds with wechatpy-
/// and WxJava-style clients never see a token refused, and WeChat sees about one fetch per
/// lifetime: the refresh happens ahead of expiry while the current token is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stay_valid_across_lifetimes_with_one_fetch_per_lifetime() {
    const LIFETIME: Duration = Duration::from_secs(5);
    const RUN: Duration = Duration::from_secs(15);
    let (upstream, proxy) = start(
        |c| {
            c.token_lifetime = LIFETIME;
            c.token_overlap = Duration::from_secs(3);
        },
        "",
    )
    .await;
    let base = proxy.url("");
    let clients: Vec<Arc<SdkClient>> = [Style::Wechatpy, Style::WxJava]
        .iter()
        .flat_map(|style| std::iter::repeat_n(*style, 3))
        .map(|style| Arc::new(SdkClient::new(client(), &base, APPID, SECRET, style)))
        .collect();
    let deadline = Instant::now() + RUN;
    let callers = clients.iter().flat_map(|sdk| {
        (0..2).map(move |_| {
            let sdk = sdk.clone();
            async move {
                let mut failed = Vec::new();
                while Instant::now() < deadline {
                    let errcode = sdk.call(CHECKED_API_PATH).await;
                    if errcode != 0 {
                        failed.push(errcode);
                    }
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(2..8))).await;
                }
                failed
            }
        })
    });
    let failed: Vec<i64> = join_all(callers).await.into_iter().flatten().collect();
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert_eq!(
        upstream.answers(40001),
        0,
        "a token from wxgate was refused"
    );
    let stale: u64 = clients
        .iter()
        .map(|c| c.stale.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let calls: u64 = clients
        .iter()
        .map(|c| c.calls.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(calls > 500, "{calls} calls");
    // A refresh every lifetime minus its two-second window (WeChat's 7200 s tokens: every
    // 6960 s): 15 s / 3 s, plus the first.
    let fetches = upstream.token_fetches(TOKEN_PATH, APPID);
    assert!(
        (3..=7).contains(&fetches),
        "{fetches} fetches in {} lifetimes ({stale} stale answers)",
        RUN.as_secs() / LIFETIME.as_secs()
    );
    let text = proxy.metrics().await;
    let outcome = |o: &str| metric(&text, "wxgate_token_requests_total", &[("outcome", o)]);
    // The refreshes happened ahead of expiry, started by hits (not by callers left waiting).
    assert!(
        outcome("refreshed") >= 2.0,
        "{} refreshes ahead, {} fetches waited for",
        outcome("refreshed"),
        outcome("fetched")
    );
    assert!(metric(&text, "wxgate_token_requests_total", &[("outcome", "hit")]) > 0.0);
}

/// WeChat refuses the cached token (another server fetched one behind wxgate's back): a
/// burst of 40001s drops it once, and the fetches that follow make one refresh. The same
/// stale token failing again later drops nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_40001s_drops_the_token_once_and_causes_one_refresh() {
    let overlap = Duration::from_millis(300);
    let (upstream, proxy) = start(|c| c.token_overlap = overlap, "").await;
    let client = client();
    let stale = token_of(&fetch(&client, &proxy, SECRET).await);
    // Another server fetches straight from WeChat: wxgate's token stops working after the
    // overlap (waited for by asking WeChat itself).
    let direct = upstream.base_url();
    get_json(&client, format!("{direct}{}", token_path(SECRET))).await;
    while use_token(&client, &direct, &stale).await != 40001 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = proxy.url("");
    let burst = join_all((0..20).map(|_| use_token(&client, &base, &stale))).await;
    assert!(burst.iter().all(|errcode| *errcode == 40001), "{burst:?}");
    let fetches_before = upstream.token_fetches(TOKEN_PATH, APPID);
    let refreshed = join_all((0..20).map(|_| fetch(&client, &proxy, SECRET))).await;
    let fresh = token_of(&refreshed[0]);
    assert_ne!(fresh, stale);
    assert!(refreshed.iter().all(|answer| token_of(answer) == fresh));
    assert_eq!(
        upstream.token_fetches(TOKEN_PATH, APPID),
        fetches_before + 1
    );
    assert_eq!(use_token(&client, &base, &fresh).await, 0);
    // The stale token again: refused, and the fresh one stays cached.
    assert_eq!(use_token(&client, &base, &stale).await, 40001);
    assert_eq!(token_of(&fetch(&client, &proxy, SECRET).await), fresh);
    assert_eq!(
        upstream.token_fetches(TOKEN_PATH, APPID),
        fetches_before + 1
    );
}

fn stable_body(force: bool) -> Value {
    json!({"grant_type": "client_credential", "appid": APPID, "secret": SECRET, "force_refresh": force})
}

/// Stable tokens are cached apart from `/cgi-bin/token`'s, and `force_refresh` goes upstream
/// at most once per 30 s: the other forced requests get the token it just minted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_refresh_goes_upstream_at_most_once_per_30_seconds() {
    let (upstream, proxy) = start(|c| c.latency = Duration::from_millis(50), "").await;
    let client = client();
    let url = proxy.url(STABLE_TOKEN_PATH);
    let plain = token_of(&fetch(&client, &proxy, SECRET).await);
    let stable = token_of(&post_json(&client, url.clone(), stable_body(false)).await);
    assert_ne!(plain, stable, "the two kinds are cached apart");
    let again = token_of(&post_json(&client, url.clone(), stable_body(false)).await);
    assert_eq!(again, stable);
    assert_eq!(upstream.token_fetches(STABLE_TOKEN_PATH, APPID), 1);

    let forced =
        join_all((0..10).map(|_| post_json(&client, url.clone(), stable_body(true)))).await;
    let minted = token_of(&forced[0]);
    assert_ne!(minted, stable);
    assert!(forced.iter().all(|answer| token_of(answer) == minted));
    assert_eq!(upstream.token_fetches(STABLE_TOKEN_PATH, APPID), 2);
    // Within 30 s: forced or not, the token just minted, and nothing goes upstream.
    for force in [true, false, true] {
        let answer = post_json(&client, url.clone(), stable_body(force)).await;
        assert_eq!(token_of(&answer), minted);
    }
    assert_eq!(upstream.token_fetches(STABLE_TOKEN_PATH, APPID), 2);
    assert_eq!(token_of(&fetch(&client, &proxy, SECRET).await), plain);
}

/// A platform's token is cached per component appid (the ticket, which changes every ten
/// minutes, is not part of the key); when the platform's code exchange says it is stale, it
/// is dropped and the next fetch refreshes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_tokens_are_cached_per_component_appid() {
    let (upstream, proxy) = start(|c| c.token_overlap = Duration::from_millis(200), "").await;
    let client = client();
    let url = proxy.url(COMPONENT_TOKEN_PATH);
    let body = |ticket: &str| json!({"component_appid": COMPONENT_APPID, "component_appsecret": DEFAULT_COMPONENT_APPSECRET, "component_verify_ticket": ticket});
    let answers =
        join_all((0..10).map(|i| post_json(&client, url.clone(), body(&format!("ticket-{i}")))))
            .await;
    let token = answers[0]["component_access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(answers
        .iter()
        .all(|a| a["component_access_token"] == token.as_str()));
    assert_eq!(
        upstream.token_fetches(COMPONENT_TOKEN_PATH, COMPONENT_APPID),
        1
    );
    let exchange = proxy.url(&component_jscode2session(
        APPID,
        COMPONENT_APPID,
        &token,
        "code-1",
    ));
    assert!(get_json(&client, exchange).await.0.get("openid").is_some());

    // The platform fetched a token elsewhere: the cached one stops working.
    let direct = format!("{}{COMPONENT_TOKEN_PATH}", upstream.base_url());
    post_json(&client, direct, body("ticket-x")).await;
    let mut code = 2;
    loop {
        let path =
            component_jscode2session(APPID, COMPONENT_APPID, &token, &format!("code-{code}"));
        code += 1;
        if get_json(&client, proxy.url(&path)).await.0["errcode"] == 40001 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh = post_json(&client, url, body("ticket-y")).await;
    assert_ne!(fresh["component_access_token"], token.as_str());
    assert_eq!(
        upstream.token_fetches(COMPONENT_TOKEN_PATH, COMPONENT_APPID),
        3
    );
}

/// A cached answer tells the lifetime that remains, not the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_carries_the_remaining_lifetime() {
    let (_upstream, proxy) = start(|_| {}, "").await;
    let client = client();
    let first = fetch(&client, &proxy, SECRET).await;
    // Time passing is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (later, cache) = get_json(&client, proxy.url(&token_path(SECRET))).await;
    assert_eq!(cache.as_deref(), Some("hit"));
    assert_eq!(later["access_token"], first["access_token"]);
    let (first, later) = (
        first["expires_in"].as_u64().unwrap(),
        later["expires_in"].as_u64().unwrap(),
    );
    assert!(first <= 7200 && later < first, "{first} then {later}");
}

/// Without the cache, or for an excluded appid, every fetch goes upstream as it always did;
/// malformed fetches are forwarded and answered by WeChat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_excluded_and_malformed_fetches_go_upstream_as_they_are() {
    for extra in [
        "[token_cache]\nenabled = false\n".to_owned(),
        format!("[token_cache]\nexclude_appids = [\"{APPID}\"]\n"),
    ] {
        let (upstream, proxy) = start(|_| {}, &extra).await;
        let client = client();
        let a = token_of(&fetch(&client, &proxy, SECRET).await);
        let b = token_of(&fetch(&client, &proxy, SECRET).await);
        assert_ne!(a, b, "{extra}");
        assert_eq!(upstream.token_fetches(TOKEN_PATH, APPID), 2);
    }
    let (upstream, proxy) = start(|_| {}, "").await;
    let client = client();
    for (query, errcode) in [
        (format!("grant_type=client_credential&appid={APPID}"), 41004),
        (
            format!("grant_type=authorization_code&appid={APPID}&secret={SECRET}"),
            40002,
        ),
    ] {
        let (body, cache) = get_json(&client, proxy.url(&format!("{TOKEN_PATH}?{query}"))).await;
        assert_eq!(body["errcode"], errcode, "{query}");
        assert_eq!(cache, None);
    }
    assert_eq!(upstream.calls(TOKEN_PATH), 2);
}

/// `?access_token=bogus&access_token=T`: WeChat could read the bogus copy and answer 40001,
/// and the cached T would be dropped for it. A repeated token is refused (40097, WeChat-
/// shaped) before anything goes upstream, so twenty rounds of that call cost no fetch and T
/// stays cached; a call carrying two different tokens under the two names drops neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_access_token_is_refused_and_drops_nothing() {
    let (upstream, proxy) = start(|c| c.token_overlap = Duration::from_millis(200), "").await;
    let client = client();
    let token = token_of(&fetch(&client, &proxy, SECRET).await);
    let fetches_before = upstream.token_fetches(TOKEN_PATH, APPID);
    for round in 0..20 {
        let query = match round % 4 {
            0 => format!("access_token=bogus&access_token={token}"),
            1 => format!("access_token={token}&access_token=bogus"),
            2 => format!("access_token=bogus&access_token={token}&component_access_token=x"),
            _ => format!("component_access_token=bogus&component_access_token={token}"),
        };
        let answer = client
            .get(proxy.url(&format!("{CHECKED_API_PATH}?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["errcode"], 40097, "{query}: {body}");
        let errmsg = body["errmsg"].as_str().unwrap();
        assert!(errmsg.contains("access_token given twice"), "{errmsg}");
        assert!(!errmsg.contains(&token), "{errmsg}");
        assert_eq!(token_of(&fetch(&client, &proxy, SECRET).await), token);
    }
    assert_eq!(upstream.calls(CHECKED_API_PATH), 0);
    // Two tokens under the two names, WeChat refuses one: which one is not said, so neither
    // is dropped.
    let both = format!("{CHECKED_API_PATH}?access_token=bogus&component_access_token={token}");
    let (body, _) = get_json(&client, proxy.url(&both)).await;
    assert_eq!(body["errcode"], 40001, "{body}");
    assert_eq!(token_of(&fetch(&client, &proxy, SECRET).await), token);
    assert_eq!(upstream.token_fetches(TOKEN_PATH, APPID), fetches_before);
    // The token alone, refused: dropped, and the next fetch refreshes it (as before).
    get_json(
        &client,
        format!("{}{}", upstream.base_url(), token_path(SECRET)),
    )
    .await;
    while use_token(&client, &upstream.base_url(), &token).await != 40001 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(use_token(&client, &proxy.url(""), &token).await, 40001);
    assert_ne!(token_of(&fetch(&client, &proxy, SECRET).await), token);
}

/// Fetches for thousands of appids WeChat does not know (40013) or with a wrong secret
/// (40125) mint no token: they leave nothing cached and count nothing against the day's
/// budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_that_mint_no_token_leave_nothing_behind() {
    let (upstream, proxy) = start(|_| {}, "").await;
    let client = client();
    // Hexadecimal then `u`: never the stand-in's own appid.
    let appids: Vec<String> = (0..2_000).map(|i| format!("wx{i:015x}u")).collect();
    for chunk in appids.chunks(200) {
        let answers = join_all(chunk.iter().map(|appid| {
            let path = format!("{TOKEN_PATH}?grant_type=client_credential&appid={appid}&secret=s");
            get_json(&client, proxy.url(&path))
        }))
        .await;
        for (body, _) in &answers {
            assert_eq!(body["errcode"], 40013, "{body}");
        }
    }
    assert_eq!(
        fetch(&client, &proxy, "wrong-secret").await["errcode"],
        40125
    );
    assert_eq!(upstream.calls(TOKEN_PATH), 2_001);
    let text = proxy
        .metrics_until("the cache emptied", |text| {
            metric(text, "wxgate_token_cache_entries", &[]) == 0.0
        })
        .await;
    let today = |api| metric(&text, "wxgate_token_fetches_today_max", &[("api", api)]);
    assert_eq!(today(TOKEN_PATH), 0.0, "{text}");
    // A token minted: counted.
    token_of(&fetch(&client, &proxy, SECRET).await);
    proxy
        .metrics_until("the fetch counted", |text| {
            metric(
                text,
                "wxgate_token_fetches_today_max",
                &[("api", TOKEN_PATH)],
            ) == 1.0
                && metric(text, "wxgate_token_cache_entries", &[]) == 1.0
        })
        .await;
}

/// `token_cache.max_entries`: past it the oldest token goes first (its next fetch goes
/// upstream again), the newest stay; and calls carrying garbage tokens, each refused with
/// 40001, drop none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_holds_at_most_max_entries_the_oldest_going_first() {
    let apps: Vec<(String, String)> = (0..30)
        .map(|i| (format!("wx{i:016x}"), format!("secret-{i}")))
        .collect();
    let registered = apps.clone();
    let (upstream, proxy) = start(
        move |c| {
            c.apps.extend(registered.into_iter().map(|(appid, secret)| {
                wxgate_stand_in::StandInApp {
                    appid,
                    secret,
                    unionid: false,
                }
            }))
        },
        "[token_cache]\nmax_entries = 10\n",
    )
    .await;
    let client = client();
    let path = |(appid, secret): &(String, String)| {
        format!("{TOKEN_PATH}?grant_type=client_credential&appid={appid}&secret={secret}")
    };
    let mut tokens = Vec::new();
    for app in &apps {
        tokens.push(token_of(&get_json(&client, proxy.url(&path(app))).await.0));
    }
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "wxgate_token_cache_entries", &[]), 10.0);
    // Garbage tokens: refused by WeChat, and nothing is dropped.
    let base = proxy.url("");
    for i in 0..200 {
        assert_eq!(
            use_token(&client, &base, &format!("garbage-{i}")).await,
            40001
        );
    }
    // The ten newest are still cached; the oldest went first.
    for (app, token) in apps.iter().zip(&tokens).skip(20) {
        let (body, cache) = get_json(&client, proxy.url(&path(app))).await;
        assert_eq!(
            (token_of(&body), cache.as_deref()),
            (token.clone(), Some("hit"))
        );
    }
    let (body, cache) = get_json(&client, proxy.url(&path(&apps[0]))).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    assert_ne!(token_of(&body), tokens[0]);
    assert_eq!(upstream.token_fetches(TOKEN_PATH, &apps[0].0), 2);
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "wxgate_token_cache_entries", &[]), 10.0);
}
