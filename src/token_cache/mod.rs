//! wxgate as the central access-token server WeChat recommends (中控服务器): one token per
//! appid and API, fetched once, refreshed ahead of expiry, handed to every backend whose
//! secret minted it.
//!
//! Every fetch of `/cgi-bin/token` invalidates the previous token five minutes later, so
//! backends that each fetch their own overwrite each other's tokens and their calls fail with
//! 40001; and WeChat allows 2000 fetches a day per appid. Behind wxgate:
//!
//! - a fetch is answered from the cache when the presented secret is the one that minted the
//!   cached token (keyed fingerprints, compared in constant time: [`entry`]); any other
//!   secret makes its own upstream call and gets WeChat's answer, never the cached token;
//! - one fetch per appid and secret at a time: concurrent callers wait for it (its flight,
//!   [`crate::flight`]'s single-flight);
//! - a cached answer carries the lifetime that remains, never the original; a token is
//!   refreshed in the background shortly before it expires, while it is still served
//!   ([`policy`] says when, and why every token handed out stays valid until its
//!   `expires_in`);
//! - `force_refresh` of a stable token goes upstream at most once per 30 s per appid;
//! - when WeChat answers 40001, 40014 or 42001 to a call that carried a cached token (alone,
//!   once: [`carried`]), that token is dropped (once: a second failure of the same token
//!   drops nothing more), so the next fetch refreshes it; a token can never be replaced by
//!   an older one.
//!
//! The three token APIs (`/cgi-bin/token`, `/cgi-bin/stable_token`,
//! `/cgi-bin/component/api_component_token`) have separate entries ([`request`]). Fetches
//! count against the quota like any call, and against the day's budget ([`budget`]).
//!
//! # Layout
//! - this file: [`TokenCache`], the request path (decide, then serve, join or start a fetch);
//! - `slots.rs`: what is kept per key, at most `max_entries` keys, with the index that finds
//!   a refused token in one lookup and the order that evicts the oldest first;
//! - `fetch.rs`: one fetch, in a task of its own, the flight its callers wait on, and how
//!   its result settles in the cache;
//! - `shared.rs`: with `[cluster]`, one token per key for all replicas (Redis, a lease);
//! - `policy.rs`: the decisions, as pure functions;
//! - `request.rs`: reading a token fetch, and the request of a background refresh;
//! - `carried.rs`: the token an API call carries (refused when repeated);
//! - `entry.rs`: a cached token, credentials, the JSON of token answers;
//! - `budget.rs`: fetches per appid and day;
//! - `metrics.rs`: requests by outcome, fetches, the day's budget, the lowest lifetime.

mod budget;
mod carried;
mod entry;
mod fetch;
mod metrics;
mod policy;
mod request;
mod shared;
mod slots;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::Method;
use parking_lot::Mutex;
use wxgate_contract::CacheStatus;

use self::budget::FetchBudget;
use self::entry::{TokenCredential, TokenCredentialKey};
use self::fetch::{FetchMode, FetchPurpose, Fetched, Job, TokenFlight, TokenWaiter};
use self::metrics::{TokenMetrics, TokenOutcome};
use self::policy::{Asked, Plan, Policy};
use self::shared::SharedTokens;
use self::slots::{TokenSlot, TokenSlots};
use crate::answer::{Answer, LocalAnswer};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::dispatch::{Call, Dispatcher};
use crate::metrics::Metrics;
use crate::wechat::Api;

pub use self::carried::{carried_token, Carried, RepeatedToken};
pub use self::policy::is_stale_token_errcode;
pub use self::request::{TokenKey, TokenKind, TokenRequest};

/// How many times a request decides again after a fetch that found nothing to do (a forced
/// and an unforced fetch crossing). Each round waits for a fetch, so this is a bound, not a
/// spin.
const MAX_ROUNDS: usize = 3;

/// The token cache of one wxgate.
pub struct TokenCache {
    slots: Mutex<TokenSlots>,
    /// `[token_cache]`; a reload swaps it.
    settings: ArcSwap<Settings>,
    credentials: TokenCredentialKey,
    dispatcher: Arc<Dispatcher>,
    budget: Mutex<FetchBudget>,
    metrics: TokenMetrics,
    /// With `[cluster]`: the tokens all replicas share.
    shared: Option<SharedTokens>,
}

/// The settings of `[token_cache]` in force.
struct Settings {
    policy: Policy,
    enabled: bool,
    exclude: BTreeSet<String>,
}

impl Settings {
    fn of(config: &crate::config::TokenCacheConfig) -> Settings {
        Settings {
            policy: Policy {
                refresh_ahead: config.refresh_ahead,
            },
            enabled: config.enabled,
            exclude: config.exclude_appids.clone(),
        }
    }
}

/// What one round of a request's decision came to.
enum Round {
    /// Answered from the cache.
    Served(Answer),
    /// Waits for a fetch; `created` when this request started it.
    Wait { waiter: TokenWaiter, created: bool },
}

impl TokenCache {
    /// The cache of `[token_cache]`, fetching through `dispatcher` (under quota and retry),
    /// sharing its tokens with the other replicas of `cluster` when there is one.
    pub fn new(
        config: &Config,
        dispatcher: Arc<Dispatcher>,
        metrics: &Metrics,
        cluster: Option<Arc<Cluster>>,
    ) -> prometheus::Result<TokenCache> {
        let credentials = match &config.cluster {
            Some(cluster) => TokenCredentialKey::from_cluster_secret(cluster.secret.expose()),
            None => TokenCredentialKey::random(),
        };
        // A lease outlives the longest fetch: its quota wait, and every attempt with its
        // retries' timeouts.
        let attempts = config.retry.busy_attempts + 1;
        let lease_ttl = config.quota.max_wait + config.upstream.timeout * attempts;
        let lease_ttl = lease_ttl + Duration::from_secs(1);
        let metrics = TokenMetrics::new(metrics)?;
        let slots = TokenSlots::new(config.token_cache.max_entries, metrics.entries.clone());
        Ok(TokenCache {
            slots: Mutex::new(slots),
            settings: ArcSwap::from_pointee(Settings::of(&config.token_cache)),
            credentials,
            dispatcher,
            budget: Mutex::new(FetchBudget::default()),
            metrics,
            shared: cluster.map(|cluster| SharedTokens::new(cluster, lease_ttl)),
        })
    }

    /// Reads the token fetch a request makes, if the cache answers it: a well-formed fetch of
    /// a token API, the cache on, the appid not excluded.
    pub fn read_request(
        &self,
        api: Api,
        method: &Method,
        query: &str,
        body: &[u8],
    ) -> Option<TokenRequest> {
        let settings = self.settings.load();
        if !settings.enabled || TokenKind::of(api).is_none() {
            return None;
        }
        let request = TokenRequest::read(api, method, query, body)?;
        (!settings.exclude.contains(&*request.key().appid)).then_some(request)
    }

    /// Answers a token request: from the cache, by waiting for a fetch in flight, or by
    /// starting one (`call` is the request as it would go upstream). A token, or WeChat's
    /// answer to the fetch, and how it was found; or one of wxgate's own answers (no answer
    /// from WeChat, no quota turn in time).
    pub async fn answer(
        self: &Arc<Self>,
        request: TokenRequest,
        call: Call,
    ) -> Result<(Answer, CacheStatus), LocalAnswer> {
        let credential = self.credentials.credential(&request);
        let kind = request.key().kind;
        self.sync(request.key()).await;
        for _ in 0..MAX_ROUNDS {
            let (round, outcome) = self.round(&request, &credential, &call);
            let answer = match round {
                Round::Served(answer) => Some(Ok((answer, CacheStatus::Hit))),
                Round::Wait { waiter, created } => {
                    let result = waiter.result().await;
                    self.waited(kind, result, created)
                }
            };
            if let Some(answer) = answer {
                self.metrics.answered(kind, outcome);
                return answer;
            }
        }
        // Fetches kept finding nothing to do: a token another replica was refreshing never
        // came. WeChat's own busy answer, so that the caller tries again.
        Err(LocalAnswer::CallAbandoned)
    }

    /// One round: decides under the lock, and serves, joins a fetch or starts one.
    fn round(
        self: &Arc<Self>,
        request: &TokenRequest,
        credential: &TokenCredential,
        call: &Call,
    ) -> (Round, TokenOutcome) {
        let now = SystemTime::now();
        let key = request.key();
        let mut slots = self.slots.lock();
        let mut slot = slots.slot(key);
        let slot = &mut *slot;
        let plan = self.settings.load().policy.plan(
            slot.entry.as_ref().map(|entry| &entry.held),
            self.asked(slot, request, credential, now),
            now,
        );
        match plan {
            Plan::Serve {
                expires_in,
                refresh,
            } => {
                let entry = slot
                    .entry
                    .as_ref()
                    .expect("a plan serves only a cached entry");
                let body = entry.answer_body(key.kind, expires_in);
                let mut outcome = TokenOutcome::Hit;
                if refresh {
                    let refresh = Call {
                        request: request.refresh_request(),
                        ..call.clone()
                    };
                    self.start(
                        slot,
                        key,
                        credential.clone(),
                        refresh,
                        FetchMode::Background,
                    );
                    outcome = TokenOutcome::Refreshed;
                }
                (Round::Served(Answer::Token(body)), outcome)
            }
            Plan::Fetch { forced } => {
                let round = self.join_or_start(
                    slot,
                    request,
                    credential,
                    call,
                    FetchMode::Fetch { forced },
                );
                (round, TokenOutcome::Fetched)
            }
            Plan::Own => {
                let round = self.join_or_start(slot, request, credential, call, FetchMode::Own);
                (round, TokenOutcome::Rejected)
            }
        }
    }

    /// What `request` asks of `slot`, for [`Policy::plan`].
    fn asked(
        &self,
        slot: &TokenSlot,
        request: &TokenRequest,
        credential: &TokenCredential,
        now: SystemTime,
    ) -> Asked {
        let entry = slot.entry.as_ref();
        let credential_matches = entry.is_some_and(|entry| credential.same_as(&entry.credential));
        let refreshing = slot
            .flights
            .iter()
            .any(|flight| flight.tag().mode == FetchMode::Background);
        let rested = match (slot.refresh_failed_at, entry) {
            (Some(failed), Some(entry)) => {
                let backoff = self
                    .settings
                    .load()
                    .policy
                    .refresh_backoff(entry.held.lifetime);
                now.duration_since(failed).unwrap_or_default() >= backoff
            }
            _ => true,
        };
        Asked {
            credential_matches,
            forced: request.forced,
            refresh_allowed: !refreshing && rested,
        }
    }

    /// Joins the fetch in flight for the request's secret, or starts one.
    fn join_or_start(
        self: &Arc<Self>,
        slot: &mut TokenSlot,
        request: &TokenRequest,
        credential: &TokenCredential,
        call: &Call,
        mode: FetchMode,
    ) -> Round {
        let forced = mode == FetchMode::Fetch { forced: true };
        let joinable = slot.flights.iter().find(|flight| {
            let purpose = flight.tag();
            !flight.is_done()
                && (purpose.forced() || !forced)
                && credential.same_as(&purpose.credential)
        });
        if let Some(flight) = joinable {
            return Round::Wait {
                waiter: flight.join(),
                created: false,
            };
        }
        let waiter = self.start(slot, request.key(), credential.clone(), call.clone(), mode);
        Round::Wait {
            waiter,
            created: true,
        }
    }

    /// Starts a fetch in a task of its own; the caller's subscription to it.
    fn start(
        self: &Arc<Self>,
        slot: &mut TokenSlot,
        key: &TokenKey,
        credential: TokenCredential,
        call: Call,
        mode: FetchMode,
    ) -> TokenWaiter {
        let flight = TokenFlight::new(FetchPurpose { credential, mode });
        slot.flights.push(flight.clone());
        let waiter = flight.join();
        let job = Job {
            key: key.clone(),
            call,
            flight,
        };
        tokio::spawn(fetch::run(self.clone(), job));
        waiter
    }

    /// The answer a waiter gets from a fetch's result; `None` to decide again.
    fn waited(
        &self,
        kind: TokenKind,
        result: Fetched,
        created: bool,
    ) -> Option<Result<(Answer, CacheStatus), LocalAnswer>> {
        let status = if created {
            CacheStatus::Miss
        } else {
            CacheStatus::Coalesced
        };
        Some(match result {
            Fetched::Token {
                entry,
                fetched_here,
            } => {
                let left = policy::remaining(&entry.held, SystemTime::now());
                let status = if fetched_here {
                    status
                } else {
                    CacheStatus::Coalesced
                };
                let body = entry.answer_body(kind, left.as_secs());
                Ok((Answer::Token(body), status))
            }
            Fetched::Wechat(answer) => Ok((Answer::Wechat(answer), status)),
            Fetched::Local(local) => Err(local),
            Fetched::DecideAgain => return None,
        })
    }

    /// WeChat answered 40001, 40014 or 42001 to a call whose query was `query`: the cached
    /// token it carried (`access_token` or `component_access_token`) is dropped, if the cache
    /// still holds it, so that the next fetch refreshes it. Only a call that carried one
    /// token, once, drops it: of two, WeChat's answer does not say which it refused (see
    /// [`carried`]).
    pub async fn forget_stale(&self, query: &str) {
        let Ok(Carried::One(token)) = carried_token(query) else {
            return;
        };
        let Ok(token) = std::str::from_utf8(&token) else {
            return;
        };
        if (1..=entry::MAX_TOKEN_LEN).contains(&token.len()) {
            let key = self.drop_local(token);
            self.drop_shared(key.as_slice(), token).await;
        }
    }

    /// Drops the cached token equal to `token`, wherever it is (one lookup in the token
    /// index, not a look at every key); the key it was cached under.
    fn drop_local(&self, token: &str) -> Option<TokenKey> {
        let mut slots = self.slots.lock();
        let key = slots.key_of(token)?;
        let mut slot = slots.slot(&key);
        let cached = slot.entry.as_ref().map(|entry| &*entry.token);
        if !policy::drops_cached(cached, token) {
            return None;
        }
        slot.dropped = slot.entry.take().map(|entry| entry.held);
        tracing::info!(
            api = key.kind.api().label(),
            "WeChat refused a cached token (40001, 40014 or 42001): dropped, the next fetch refreshes it"
        );
        drop(slot);
        Some(key)
    }

    /// Applies `[token_cache]` of a new configuration: from now on tokens are refreshed by
    /// the new `refresh_ahead_secs`, and `enabled` and `exclude_appids` decide which fetches
    /// the cache answers (tokens already cached stay until they expire or are refused); a
    /// lower `max_entries` evicts the oldest at once.
    pub fn reconfigure(&self, config: &crate::config::TokenCacheConfig) {
        self.settings.store(Arc::new(Settings::of(config)));
        self.slots.lock().set_max_entries(config.max_entries);
    }

    /// Once a second: forgets what has expired, and updates the gauges.
    pub fn housekeeping(&self) {
        let now = SystemTime::now();
        let lowest = self.slots.lock().expire(now);
        let lowest = lowest.map_or(f64::NAN, |left| left.as_secs_f64());
        self.metrics.expiry.set(lowest);
        let mut budget = self.budget.lock();
        for kind in TokenKind::ALL {
            self.metrics
                .set_fetches_today_max(kind, budget.max(kind, now));
        }
    }
}
