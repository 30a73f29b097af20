//! Limits WeChat states: for each (appid, API) with traffic that quota/get covers, wxgate
//! asks WeChat (`POST /cgi-bin/openapi/quota/get` with `{"cgi_path"}` and an access token of
//! the appid) and uses the answer as that key's limit, in WeChat's own window: `rate_limit`
//! for the account's own calls, `component_rate_limit` for a platform's calls on its behalf
//! (see [`crate::quota`] for how a key's limit is chosen; the configuration still wins).
//!
//! - **Which keys**: those of an account's API calls, the calls made with its access token
//!   (token fetches carry none, and the token cache watches their budget), but the code
//!   exchanges (`/sns/*`: WeChat answers 76022), once a token of the appid is known
//!   ([`tokens`]). The first call of a new key waits for
//!   the first answer, at most `quota.discovery_wait_ms`, so that it does not go out under a
//!   default higher than WeChat's figure; then it goes on under the default.
//! - **How often**: an answer, or an error (76021, 76022, a refused token, no answer), stands
//!   for `quota.discovery_interval_secs`: a key is asked about at most once per interval, and
//!   only when it has traffic. After WeChat answers a call of the key 45011 or 45009 the
//!   figure is in doubt: one query may then go out before the interval ends, one key window
//!   after the last at the earliest. Nothing is retried in a loop.
//! - **Through the quota**: a query is a call of quota/get like any other, under that API's
//!   quota for the appid, with the dispatcher's retries.
//! - **Daily quotas**: the answer's `quota {daily_limit, used, remain}` feeds the metrics,
//!   and `remain > 0` lifts a 45009 block early ([`crate::quota`]).
//!
//! - **Replicas** (`[cluster]`): one query per key per interval for all of them, its answer
//!   shared in Redis ([`shared`]); the early query after a 45011 waits for that lease too.
//!
//! Files: [`tokens`] (the tokens whose appid wxgate knows), [`answer`] (quota/get's answer,
//! read), [`shared`], [`metrics`].

mod answer;
mod metrics;
mod shared;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use http::{header, HeaderMap, HeaderValue, Method};
use tokio::sync::watch;
use tokio::time::Instant;
use wxgate_contract::LimitSource;

use self::answer::Rate;
pub use self::answer::{Daily, Stated, Unstated};
use self::metrics::DiscoveryMetrics;
use self::shared::{Found, SharedDiscovery};
pub use self::tokens::TokenBook;
use crate::cluster::Cluster;
use crate::config::{QuotaConfig, QuotaLimit};
use crate::dispatch::{Call, Dispatcher};
use crate::metrics::Metrics;
use crate::quota::{figure_burst, Figure, QuotaKey};
use crate::upstream::UpstreamRequest;
use crate::wechat::Api;

/// Asks WeChat for the limits of the keys with traffic.
pub struct Discovery {
    dispatcher: Arc<Dispatcher>,
    book: TokenBook,
    /// What is known of each key asked about (by its own calls' key).
    keys: DashMap<QuotaKey, KeyState>,
    settings: ArcSwap<Settings>,
    metrics: DiscoveryMetrics,
    /// With `[cluster]`: one query per key per interval for all replicas.
    shared: Option<SharedDiscovery>,
}

/// How soon a replica looks again for an answer another replica is asking for.
const LOOK_AGAIN: Duration = Duration::from_millis(50);

/// `[quota]`'s discovery settings.
struct Settings {
    enabled: bool,
    interval: Duration,
    wait: Duration,
    /// How long a query may wait for its quota turn (`quota.max_wait_ms`).
    max_wait: Duration,
}

impl Settings {
    fn of(config: &QuotaConfig) -> Settings {
        Settings {
            enabled: config.discover,
            interval: config.discovery_interval,
            wait: config.discovery_wait,
            max_wait: config.max_wait,
        }
    }
}

/// What discovery knows of one key.
struct KeyState {
    /// When the last query went out.
    asked: Option<Instant>,
    /// The query in flight: `true` once its answer is applied.
    flight: Option<watch::Receiver<bool>>,
    /// The last answer.
    answer: Option<Result<Stated, Unstated>>,
    /// The key's last call: a key idle for two intervals is forgotten.
    used: Instant,
    /// WeChat answered a call of the key 45011 or 45009 since the last query.
    doubted: bool,
}

impl Discovery {
    /// Discovery for `[quota]`, asking through `dispatcher`, sharing its answers with the
    /// other replicas of `cluster` when there is one.
    pub fn new(
        config: &QuotaConfig,
        dispatcher: Arc<Dispatcher>,
        metrics: &Metrics,
        cluster: Option<Arc<Cluster>>,
    ) -> prometheus::Result<Discovery> {
        Ok(Discovery {
            dispatcher,
            book: TokenBook::default(),
            keys: DashMap::new(),
            settings: ArcSwap::from_pointee(Settings::of(config)),
            metrics: DiscoveryMetrics::new(metrics)?,
            shared: cluster.map(SharedDiscovery::new),
        })
    }

    /// The tokens whose appid wxgate knows.
    pub fn tokens(&self) -> &TokenBook {
        &self.book
    }

    /// Applies `[quota]` of a new configuration.
    pub fn reconfigure(&self, config: &QuotaConfig) {
        self.settings.store(Arc::new(Settings::of(config)));
    }

    /// Before a call of `key`: starts a query if one is due and a token of the appid is
    /// known, and waits (at most `quota.discovery_wait_ms`) while the key has no answer yet.
    pub async fn prepare(self: &Arc<Self>, key: QuotaKey) {
        let settings = self.settings.load();
        if !settings.enabled || key.api().is_code_exchange() {
            return;
        }
        let own = key.own();
        let gate = self.dispatcher.quota();
        let doubted = gate.take_refused(&own);
        let now = Instant::now();
        let (wait, start) = {
            let mut state = self.keys.entry(own).or_insert_with(|| KeyState {
                asked: None,
                flight: None,
                answer: None,
                used: now,
                doubted: false,
            });
            state.used = now;
            state.doubted |= doubted;
            if let Some(flight) = &state.flight {
                (state.answer.is_none().then(|| flight.clone()), None)
            } else if self.due(&state, &own, &settings, now) {
                let token = self.book.token_for(own.appid());
                // Alone, a replica asks only with a token; with others, it may find their
                // answer without one.
                if token.is_none() && self.shared.is_none() {
                    return;
                }
                let (done, flight) = watch::channel(false);
                state.flight = Some(flight.clone());
                state.asked = Some(now);
                state.doubted = false;
                let wait = state.answer.is_none().then_some(flight);
                (wait, Some((token, done)))
            } else {
                (None, None)
            }
        };
        if let Some((token, done)) = start {
            tokio::spawn(self.clone().discover(own, token, done));
        }
        if let Some(mut flight) = wait {
            let _ = tokio::time::timeout(settings.wait, flight.wait_for(|done| *done)).await;
        }
    }

    /// Whether `key` is to be asked about now.
    fn due(&self, state: &KeyState, key: &QuotaKey, settings: &Settings, now: Instant) -> bool {
        let Some(asked) = state.asked else {
            return true;
        };
        let since = now.saturating_duration_since(asked);
        since >= settings.interval
            || state.doubted && since >= self.dispatcher.quota().window_of(key)
    }

    /// Learns `key`'s limits: from the other replicas' answer, or by asking WeChat with
    /// `token`; applies them, and lets the waiters go.
    async fn discover(
        self: Arc<Self>,
        key: QuotaKey,
        token: Option<(Arc<str>, bool)>,
        done: watch::Sender<bool>,
    ) {
        let found = self.find(&key, token.is_some()).await;
        let (result, age) = match found {
            Some((Some(result), age)) => (Some(result), age),
            Some((None, _)) => match &token {
                Some((token, on_behalf)) => {
                    let result = self.ask(&key, token, *on_behalf).await;
                    self.share(&key, &result).await;
                    (Some(result), Duration::ZERO)
                }
                None => (None, Duration::ZERO),
            },
            None => (None, Duration::ZERO),
        };
        if let Some(result) = &result {
            let token = token.as_ref().map(|(token, _)| &**token);
            self.apply(&key, result, token);
        }
        if let Some(mut state) = self.keys.get_mut(&key) {
            match result {
                Some(result) => {
                    state.answer = Some(result);
                    // Asked this long ago by another replica: the interval ends for all.
                    state.asked = Some(Instant::now() - age);
                }
                // Nobody could answer: look again on a call a moment from now.
                None => {
                    let interval = self.settings.load().interval;
                    state.asked = Some(Instant::now() + LOOK_AGAIN * 20 - interval);
                }
            }
            state.flight = None;
        }
        let _ = done.send(true);
    }

    /// With `[cluster]`: what the other replicas found about `key`, as `Some((Some(answer),
    /// age))`; `Some((None, _))` when this replica is to ask (it holds the lease, or Redis is
    /// gone); `None` when another replica asks and its answer did not come within
    /// `quota.discovery_wait_ms`. Without `[cluster]`: `Some((None, _))`.
    async fn find(
        &self,
        key: &QuotaKey,
        can_ask: bool,
    ) -> Option<(Option<Result<Stated, Unstated>>, Duration)> {
        let (Some(shared), Some(fingerprint)) = (
            &self.shared,
            self.dispatcher.quota().shared_fingerprint(key),
        ) else {
            return Some((None, Duration::ZERO));
        };
        let settings = self.settings.load();
        let deadline = Instant::now() + settings.wait.max(LOOK_AGAIN);
        loop {
            match shared
                .find(&fingerprint.0, &fingerprint.1, can_ask, settings.interval)
                .await
            {
                Found::Answer(answer, age) => return Some((Some(answer), age)),
                Found::Ask | Found::Alone if can_ask => return Some((None, Duration::ZERO)),
                Found::Ask | Found::Alone | Found::Busy => {}
            }
            if Instant::now() + LOOK_AGAIN > deadline {
                return None;
            }
            tokio::time::sleep(LOOK_AGAIN).await;
        }
    }

    /// With `[cluster]`: stores this replica's answer about `key` for the others.
    async fn share(&self, key: &QuotaKey, result: &Result<Stated, Unstated>) {
        let (Some(shared), Some(fingerprint)) = (
            &self.shared,
            self.dispatcher.quota().shared_fingerprint(key),
        ) else {
            return;
        };
        shared
            .store(
                &fingerprint.0,
                &fingerprint.1,
                result,
                self.settings.load().interval,
            )
            .await;
    }

    /// One call of quota/get about `key`.
    async fn ask(&self, key: &QuotaKey, token: &str, on_behalf: bool) -> Result<Stated, Unstated> {
        let gate = self.dispatcher.quota();
        let cgi_path = gate.api_path(key);
        let body = serde_json::json!({ "cgi_path": &*cgi_path }).to_string();
        let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
        let path_and_query = format!("{}?access_token={token}", Api::QuotaGet.label())
            .parse()
            .map_err(|_| Unstated::Other)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let quota_key = QuotaKey::new(Api::QuotaGet, key.appid()).map(|own| {
            if on_behalf {
                own.on_behalf()
            } else {
                own
            }
        });
        let call = Call {
            api: Api::QuotaGet,
            quota_key,
            request: UpstreamRequest {
                method: Method::POST,
                path_and_query,
                headers,
                body: Bytes::from(body),
            },
            max_wait: self.settings.load().max_wait,
        };
        let result = self.dispatcher.call(&call, std::future::pending).await;
        answer::read(&result)
    }

    /// Uses an answer: WeChat's figures become the limits of `key` and of its calls on the
    /// account's behalf; a refused token is forgotten.
    fn apply(&self, key: &QuotaKey, result: &Result<Stated, Unstated>, token: Option<&str>) {
        self.metrics.queried(result.map(|_| ()));
        let gate = self.dispatcher.quota();
        match result {
            Ok(stated) => {
                if let Some(rate) = stated.rate {
                    gate.set_figure(key, Some(stated_figure(rate)));
                }
                if let Some(rate) = stated.component_rate {
                    gate.set_figure(&key.on_behalf(), Some(stated_figure(rate)));
                }
                if stated.daily.is_some_and(|daily| daily.remain > 0) {
                    gate.lift_daily(key);
                }
            }
            Err(Unstated::Token) => {
                if let Some(token) = token {
                    self.book.refused(token.as_bytes());
                }
            }
            Err(_) => {}
        }
    }

    /// What WeChat last stated of `key`'s daily quota, where it stated a limit.
    pub fn daily(&self, key: &QuotaKey) -> Option<Daily> {
        let state = self.keys.get(&key.own())?;
        match state.answer {
            Some(Ok(Stated {
                daily: Some(daily), ..
            })) if daily.limit < u64::from(u32::MAX) => Some(daily),
            _ => None,
        }
    }

    /// Once a second: forgets keys idle for two intervals (and the figures WeChat stated for
    /// them) and expired tokens, and updates the daily gauge.
    pub fn housekeeping(&self) {
        let settings = self.settings.load();
        let idle_after = (settings.interval * 2).max(Duration::from_secs(60));
        let now = Instant::now();
        let gate = self.dispatcher.quota();
        let mut forgotten = Vec::new();
        let mut used_max: f64 = 0.0;
        self.keys.retain(|key, state| {
            let keep = state.flight.is_some() || now.duration_since(state.used) < idle_after;
            if !keep {
                forgotten.push(*key);
            } else if let Some(Ok(Stated {
                daily: Some(daily), ..
            })) = state.answer
            {
                if daily.limit < u64::from(u32::MAX) {
                    used_max = used_max.max(daily.used_share());
                }
            }
            keep
        });
        for key in forgotten {
            for key in [key, key.on_behalf()] {
                if gate
                    .figure(&key)
                    .is_some_and(|figure| figure.source == LimitSource::Wechat)
                {
                    gate.set_figure(&key, None);
                }
            }
        }
        self.metrics.daily_used_max.set(used_max);
        self.book.forget_expired();
    }
}

/// A rate WeChat stated, as a key's limit.
fn stated_figure(rate: Rate) -> Figure {
    Figure {
        limit: QuotaLimit {
            per_window: rate.per_window,
            burst: figure_burst(rate.per_window),
        },
        window: rate.window,
        source: LimitSource::Wechat,
    }
}
