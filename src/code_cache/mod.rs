//! Code exchanges made safe to repeat: identical exchanges in flight share one upstream call,
//! and definitive answers are remembered for a code's lifetime.
//!
//! *Identical* means the same API, appid, credential (`secret`, or `component_appid` +
//! `component_access_token`) and `js_code` (see [`key`] for how they become a key).
//!
//! The first caller drives the upstream call itself (no task, no hand-over on the common
//! path), but the call does not belong to it: if that caller goes away, the call moves to a
//! task of its own and carries on, so its answer is still remembered and given to anyone
//! waiting (see [`flight`]). Only while the call waits for quota, before anything is sent,
//! does it stop when every caller has gone.
//!
//! Remembered answers live in one map beside the calls in flight, so a lookup is one probe
//! (see [`store`] for what a slot holds and how answers expire).
//!
//! - [`request`]: the parameters of an exchange, checked before anything else.
//! - [`key`]: the keyed hash of an exchange.
//! - [`flight`]: a call in flight, its leader and its waiters.
//! - [`store`]: slots, remembered answers and their expiry.
//! - [`shared`]: with `[cluster]`, the exchange claimed and remembered in Redis.

mod flight;
mod key;
mod metrics;
mod request;
mod shared;
mod store;

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::time::Instant;

use self::flight::{Flight, Leader, Led};
use self::key::{KeyHasher, KeyMaker};
use self::metrics::{CodeCacheMetrics, Tier};
use self::store::{ExpiryQueue, Slot, Stored};
use crate::answer::LocalAnswer;
use crate::answer::WechatAnswer;
use crate::cluster::codes::SharedCodes;
use crate::cluster::Cluster;
use crate::config::CodeCacheConfig;
use crate::dispatch::{Call, Dispatcher, FirstTurn};
use crate::metrics::Metrics;
use crate::quota::QuotaKey;
use crate::wechat::Api;
use crate::wechat::WechatParams;
use wxgate_contract::CacheStatus;

pub use self::key::CodeKey;
use self::key::Credential;
pub use self::store::{is_definitive, Lookup, Remembered};

/// Shards of the map of slots (a power of two). Many small shards: a shard's table is
/// rehashed whole when it grows, and with a million answers in four shards that stalls the
/// runtime for milliseconds.
const SHARDS: usize = 256;

/// The code-exchange coalescer and its remembered answers.
pub struct CodeExchange {
    slots: DashMap<CodeKey, Slot, BuildHasherDefault<KeyHasher>>,
    /// (expiry, key) of every remembered answer, oldest first.
    expiry: Mutex<ExpiryQueue>,
    /// Expiries are whole seconds since this instant, so a stored answer keeps a `u32`.
    base: Instant,
    remembered: AtomicUsize,
    /// `code_cache.ttl_secs`; a reload may change it (answers already kept keep their expiry,
    /// so for a while the expiry queue is not in expiry order: an answer past its time is
    /// then never served, only freed a little later, and `max_entries` still bounds them).
    ttl_secs: AtomicU64,
    /// `code_cache.max_entries`; a reload may change it (a lower bound evicts the oldest at
    /// the next answer or housekeeping tick).
    max_entries: AtomicUsize,
    keys: KeyMaker,
    /// With `[cluster]`: exchanges looked up, claimed and remembered in Redis too.
    shared: Option<SharedCodes>,
    metrics: CodeCacheMetrics,
}

/// A checked code exchange: its key, and the quota it spends.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeRequest {
    /// Identifies identical exchanges.
    pub key: CodeKey,
    /// The (appid, API) whose quota the call spends.
    pub quota_key: QuotaKey,
}

/// The result of an exchange, shared by everyone who asked.
#[derive(Debug, Clone)]
pub enum ExchangeResult {
    /// WeChat's answer (all headers, for the caller and its coalesced followers).
    Upstream(Arc<WechatAnswer>),
    /// A remembered answer: status, Content-Type and body, byte for byte.
    Remembered(Remembered),
    /// The call ended without a WeChat answer.
    Local(LocalAnswer),
}

impl CodeExchange {
    /// An empty exchange with `[code_cache]` settings.
    pub fn new(config: &CodeCacheConfig, metrics: &Metrics) -> prometheus::Result<CodeExchange> {
        Ok(CodeExchange {
            slots: DashMap::with_hasher_and_shard_amount(Default::default(), SHARDS),
            expiry: Mutex::new(ExpiryQueue::default()),
            base: Instant::now(),
            remembered: AtomicUsize::new(0),
            ttl_secs: AtomicU64::new(config.ttl.as_secs()),
            max_entries: AtomicUsize::new(config.max_entries),
            keys: KeyMaker::new(),
            shared: None,
            metrics: CodeCacheMetrics::new(metrics)?,
        })
    }

    /// Shares exchanges with the other replicas of `cluster`; a claim's lease outlives an
    /// upstream call of `call_timeout`.
    pub fn shared_with(mut self, cluster: Arc<Cluster>, call_timeout: Duration) -> CodeExchange {
        self.shared = Some(SharedCodes::new(cluster, self.ttl(), call_timeout));
        self
    }

    /// The fingerprint under which the replicas share this exchange (with `[cluster]` only):
    /// a keyed HMAC of what makes exchanges identical, the same on every replica.
    fn fingerprint(&self, api: Api, query: &str) -> Option<String> {
        let shared = self.shared.as_ref()?;
        let params = WechatParams::parse(query);
        let checked = request::check(api, &params).ok()?;
        let (kind, first, second): (&[u8], &[u8], &[u8]) = match checked.credential {
            Credential::Secret(secret) => (b"secret", secret, b""),
            Credential::Component {
                appid,
                access_token,
            } => (b"component", appid, access_token),
        };
        let label = api.label().as_bytes();
        Some(shared.fingerprint(&[label, checked.appid, kind, first, second, checked.js_code]))
    }

    /// Checks a code exchange's query (see [`request`]) and keys it.
    pub fn request(&self, api: Api, query: &str) -> Result<ExchangeRequest, LocalAnswer> {
        let params = WechatParams::parse(query);
        let checked = request::check(api, &params)?;
        Ok(ExchangeRequest {
            key: self
                .keys
                .key(api, checked.appid, checked.credential, checked.js_code),
            quota_key: checked.quota_key,
        })
    }

    /// What the map holds for `key`: one probe under a shard's read lock.
    pub fn lookup(&self, key: CodeKey) -> Lookup {
        let lookup = match self.slots.get(&key) {
            Some(slot) => slot.lookup(self.seconds(Instant::now())),
            None => Lookup::Absent,
        };
        let found = match &lookup {
            Lookup::Remembered(_) => CacheStatus::Hit,
            Lookup::InFlight(_) => CacheStatus::Coalesced,
            Lookup::Absent => CacheStatus::Miss,
        };
        self.metrics.lookup(Tier::Local, found);
        lookup
    }

    /// Answers an exchange: from memory, by joining an identical call in flight, or by
    /// making the call (see the module documentation for who drives it).
    pub async fn exchange(
        self: &Arc<Self>,
        key: CodeKey,
        call: Call,
        dispatcher: &Arc<Dispatcher>,
    ) -> (ExchangeResult, CacheStatus) {
        let now = self.seconds(Instant::now());
        let (flight, receiver) = match self.slots.entry(key) {
            // Filled since the caller's `lookup`: the same reading, now under the write lock.
            Entry::Occupied(mut occupied) => match occupied.get().lookup(now) {
                Lookup::Remembered(remembered) => {
                    return (ExchangeResult::Remembered(remembered), CacheStatus::Hit)
                }
                Lookup::InFlight(waiter) => {
                    drop(occupied);
                    return (waiter.result().await, CacheStatus::Coalesced);
                }
                Lookup::Absent => {
                    // Expired and not yet swept: the expiry queue's record will find the key
                    // holding something else and leave it alone.
                    self.remembered.fetch_sub(1, Ordering::Relaxed);
                    let (flight, receiver) = Flight::new();
                    occupied.insert(Slot::InFlight(flight.clone()));
                    (flight, receiver)
                }
            },
            Entry::Vacant(vacant) => {
                let (flight, receiver) = Flight::new();
                vacant.insert(Slot::InFlight(flight.clone()));
                (flight, receiver)
            }
        };
        self.update_gauge();
        let call = Box::pin(
            self.clone()
                .lead(key, flight.clone(), call, dispatcher.clone()),
        );
        Leader::new(call, flight, receiver).await
    }

    /// Makes the call of `flight`, settles its slot and hands the result to any follower.
    /// With `[cluster]` (and Redis reachable), the exchange is first looked up and claimed
    /// in Redis under its fingerprint: a remembered answer or another replica's call
    /// answers it without a call of this replica's own.
    async fn lead(
        self: Arc<Self>,
        key: CodeKey,
        flight: Arc<Flight>,
        call: Call,
        dispatcher: Arc<Dispatcher>,
    ) -> Led {
        // If this future is dropped before it ends (its task cancelled at shutdown, no runtime
        // to move to, a panic), the slot is freed and the followers are answered.
        let mut guard = SlotGuard {
            exchange: &self,
            key,
            flight: &flight,
            armed: true,
        };
        // The fingerprint only when Redis will be asked: a leader's, with Redis reachable.
        let shared = self
            .shared
            .as_ref()
            .filter(|shared| shared.available())
            .and_then(|shared| {
                let query = call.request.path_and_query.query().unwrap_or("");
                Some((shared, self.fingerprint(call.api, query)?))
            });
        let (result, status) = match shared {
            // Boxed: the Redis round trips make a large future, which the common path (no
            // `[cluster]`) would otherwise carry and copy on every exchange.
            Some((shared, fingerprint)) => {
                Box::pin(self.lead_shared(shared, fingerprint, key, &flight, &call, &dispatcher))
                    .await
            }
            None => (
                self.call(key, &flight, &call, &dispatcher, FirstTurn::Acquire)
                    .await,
                CacheStatus::Miss,
            ),
        };
        // The slot no longer holds this flight, so nobody subscribes from now on (and a call
        // abandoned by everyone has nobody left to answer).
        guard.armed = false;
        flight.publish(&result);
        (result, status)
    }

    /// The upstream call of a flight, and its slot settled by the answer.
    async fn call(
        &self,
        key: CodeKey,
        flight: &Arc<Flight>,
        call: &Call,
        dispatcher: &Dispatcher,
        first_turn: FirstTurn,
    ) -> ExchangeResult {
        let gone = || self.everyone_gone(key, flight);
        match dispatcher.call_with(call, gone, first_turn).await {
            Ok(answer) => {
                self.settle(key, flight, &answer);
                ExchangeResult::Upstream(Arc::new(answer))
            }
            // The slot is already gone (see `everyone_gone`).
            Err(LocalAnswer::CallAbandoned) => ExchangeResult::Local(LocalAnswer::CallAbandoned),
            Err(local) => {
                self.forget_flight(key, flight);
                ExchangeResult::Local(local)
            }
        }
    }

    /// Completes when no caller waits for `flight` any more and its slot has been removed.
    async fn everyone_gone(&self, key: CodeKey, flight: &Arc<Flight>) {
        loop {
            flight.everyone_left().await;
            // A follower subscribes under the shard's read lock; this removal takes the write
            // lock, so either the follower is counted here or it finds no flight.
            let removed = self.slots.remove_if(&key, |_, slot| {
                matches!(slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight) && f.waiting() == 0)
            });
            if removed.is_some() {
                self.update_gauge();
                return;
            }
            // Somebody joined meanwhile; wait for them to go too.
            tokio::task::yield_now().await;
        }
    }

    /// Replaces the flight with its answer if the answer is definitive, or frees the slot.
    fn settle(&self, key: CodeKey, flight: &Arc<Flight>, answer: &WechatAnswer) {
        // Rounded up to the second: an answer is never forgotten early.
        let now = self.seconds(Instant::now());
        let expires = now + self.ttl().as_secs() as u32 + 1;
        let stored = is_definitive(answer.response.status, answer.errcode)
            .then(|| Stored::new(&answer.response, expires))
            .flatten();
        match stored {
            Some(stored) => self.keep(key, stored, now),
            None => self.forget_flight(key, flight),
        }
        self.update_gauge();
    }

    /// Puts a remembered answer in `key`'s slot, and in the expiry queue.
    fn keep(&self, key: CodeKey, stored: Stored, now: u32) {
        let expires = stored.expires;
        self.slots.insert(key, Slot::Ready(stored));
        self.remembered.fetch_add(1, Ordering::Relaxed);
        let mut expiry = self.expiry.lock();
        expiry.push_back((expires, key));
        self.evict(&mut expiry, now);
    }

    fn forget_flight(&self, key: CodeKey, flight: &Arc<Flight>) {
        self.slots.remove_if(
            &key,
            |_, slot| matches!(slot, Slot::InFlight(f) if Arc::ptr_eq(f, flight)),
        );
        self.update_gauge();
    }

    /// Drops expired answers, and the oldest ones while there are more than `max_entries`.
    fn evict(&self, expiry: &mut ExpiryQueue, now: u32) {
        while let Some((expires, key)) = expiry.front() {
            let over =
                self.remembered.load(Ordering::Relaxed) > self.max_entries.load(Ordering::Relaxed);
            if !over && expires > now {
                break;
            }
            expiry.pop_front();
            let removed = self.slots.remove_if(
                &key,
                |_, slot| matches!(slot, Slot::Ready(stored) if stored.expires == expires),
            );
            if removed.is_some() {
                self.remembered.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops expired answers; run on a timer so that answers nobody reads again still go.
    pub fn expire(&self) {
        let mut expiry = self.expiry.lock();
        self.evict(&mut expiry, self.seconds(Instant::now()));
        drop(expiry);
        self.update_gauge();
    }

    /// Applies `[code_cache]` of a new configuration.
    pub fn reconfigure(&self, config: &CodeCacheConfig) {
        self.ttl_secs.store(config.ttl.as_secs(), Ordering::Relaxed);
        self.max_entries
            .store(config.max_entries, Ordering::Relaxed);
        if let Some(shared) = &self.shared {
            shared.set_ttl(config.ttl);
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs.load(Ordering::Relaxed))
    }

    /// Answers remembered right now.
    pub fn len(&self) -> usize {
        self.remembered.load(Ordering::Relaxed)
    }

    /// Whole seconds from the exchange's base to `at`.
    fn seconds(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.base).as_secs() as u32
    }

    fn update_gauge(&self) {
        self.metrics.entries.set(self.len() as i64);
    }
}

/// Frees a call's slot and answers its followers when the call ends unfinished.
struct SlotGuard<'a> {
    exchange: &'a CodeExchange,
    key: CodeKey,
    flight: &'a Arc<Flight>,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.exchange.forget_flight(self.key, self.flight);
            self.flight.abandon();
        }
    }
}
