//! The code cache (`[code_cache]`, `wxgate_code_cache_*`): code exchanges (WeChat's
//! `jscode2session` calls) made safe to repeat. Identical exchanges in flight share one
//! upstream call, and definitive answers are remembered for a code's lifetime: each is a
//! *remembered answer*, an entry of the cache, replayed byte for byte.
//!
//! *Identical* means the same API, appid, credential (`secret`, or `component_appid` +
//! `component_access_token`) and `js_code` (see [`key`] for how they become a key).
//!
//! The first caller drives the upstream call itself (no task, no hand-over on the common
//! path), but the call does not belong to it: if that caller goes away, the call moves to a
//! task of its own and carries on, so its answer is still remembered and given to anyone
//! waiting (see [`leader`]). Only while the call waits for quota, before anything is sent,
//! does it stop when every caller has gone.
//!
//! Remembered answers live in one map beside the calls in flight, so a lookup is one probe
//! (see [`slots`] for what a slot holds and how answers expire).
//!
//! - [`request`]: the parameters of an exchange, checked before anything else.
//! - [`key`]: the keyed hash of an exchange.
//! - [`leader`]: the leader of a call in flight (the flight itself is [`crate::flight`]'s).
//! - [`slots`]: what the map holds, which answers are remembered, and their expiry.
//! - [`shared`]: with `[cluster]`, the exchange claimed and remembered in Redis.
//! - `metrics.rs`: look-ups and remembered answers.

mod key;
mod leader;
mod metrics;
mod request;
mod shared;
mod slots;

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use http::header;
use parking_lot::Mutex;
use tokio::time::Instant;
use wxgate_contract::CacheStatus;

pub use self::key::CodeKey;
use self::key::{KeyHasher, KeyMaker};
use self::leader::{CodeFlight, Leader, LeaderState};
use self::metrics::{CodeCacheMetrics, Tier};
use self::shared::SharedCodes;
pub use self::slots::Lookup;
use self::slots::{is_definitive, CodeSlot, ExpiryQueue};
use crate::answer::{Answer, LocalAnswer, RememberedAnswer, WechatAnswer};
use crate::cluster::Cluster;
use crate::config::CodeCacheConfig;
use crate::dispatch::{Call, Dispatcher};
use crate::metrics::Metrics;
use crate::quota::{FirstTurn, QuotaKey};
use crate::wechat::{Api, WechatParams};

/// Shards of the map of slots (a power of two). Many small shards: a shard's table is
/// rehashed whole when it grows, and with a million answers in four shards that stalls the
/// runtime for milliseconds.
const SHARDS: usize = 256;

/// The code cache: calls in flight coalesced, definitive answers remembered.
pub struct CodeCache {
    slots: DashMap<CodeKey, CodeSlot, BuildHasherDefault<KeyHasher>>,
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
pub struct CodeRequest {
    /// Identifies identical exchanges.
    pub key: CodeKey,
    /// The (appid, API) whose quota the call spends.
    pub quota_key: QuotaKey,
}

impl CodeCache {
    /// An empty cache with `[code_cache]` settings, its metrics registered in `metrics`'
    /// registry.
    pub fn new(config: &CodeCacheConfig, metrics: &Metrics) -> prometheus::Result<CodeCache> {
        Ok(CodeCache {
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
    pub fn shared_with(mut self, cluster: Arc<Cluster>, call_timeout: Duration) -> CodeCache {
        self.shared = Some(SharedCodes::new(cluster, self.ttl(), call_timeout));
        self
    }

    /// Reads a code exchange's query: checked (see [`request`]) and keyed.
    pub fn read_request(&self, api: Api, query: &str) -> Result<CodeRequest, LocalAnswer> {
        let params = WechatParams::parse(query);
        let checked = request::check(api, &params)?;
        Ok(CodeRequest {
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
    ) -> (Answer, CacheStatus) {
        let now = self.seconds(Instant::now());
        let (flight, leader) = match self.slots.entry(key) {
            // Filled since the caller's `lookup`: the same reading, now under the write lock.
            Entry::Occupied(mut occupied) => match occupied.get().lookup(now) {
                Lookup::Remembered(remembered) => {
                    return (Answer::Remembered(remembered), CacheStatus::Hit)
                }
                Lookup::InFlight(waiter) => {
                    drop(occupied);
                    return (waiter.result().await, CacheStatus::Coalesced);
                }
                Lookup::Absent => {
                    // Expired and not yet swept: the expiry queue's record will find the key
                    // holding something else and leave it alone.
                    self.remembered.fetch_sub(1, Ordering::Relaxed);
                    let flight = CodeFlight::new(LeaderState::default());
                    let leader = flight.join();
                    occupied.insert(CodeSlot::InFlight(flight.clone()));
                    (flight, leader)
                }
            },
            Entry::Vacant(vacant) => {
                let flight = CodeFlight::new(LeaderState::default());
                let leader = flight.join();
                vacant.insert(CodeSlot::InFlight(flight.clone()));
                (flight, leader)
            }
        };
        self.update_gauge();
        let call = Box::pin(
            self.clone()
                .lead(key, flight.clone(), call, dispatcher.clone()),
        );
        Leader::new(call, flight, leader).await
    }

    /// Makes the call of `flight`, settles its slot and hands the result to any follower.
    /// With `[cluster]` (and Redis reachable), the exchange is first looked up and claimed
    /// in Redis under its fingerprint: a remembered answer or another replica's call
    /// answers it without a call of this replica's own.
    async fn lead(
        self: Arc<Self>,
        key: CodeKey,
        flight: Arc<CodeFlight>,
        call: Call,
        dispatcher: Arc<Dispatcher>,
    ) -> (Answer, CacheStatus) {
        // If this future is dropped before it ends (its task cancelled at shutdown, no runtime
        // to move to, a panic), the slot is freed and the followers are answered.
        let mut guard = SlotGuard {
            cache: &self,
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
                Some((shared, shared.name(call.api, query)?))
            });
        let (answer, status) = match shared {
            // Boxed: the Redis round trips make a large future, which the common path (no
            // `[cluster]`) would otherwise carry and copy on every exchange.
            Some((shared, name)) => {
                Box::pin(self.lead_shared(shared, name, key, &flight, &call, &dispatcher)).await
            }
            None => self.call_alone(key, &flight, &call, &dispatcher).await,
        };
        // The slot no longer holds this flight, so nobody subscribes from now on (and a call
        // abandoned by everyone has nobody left to answer).
        guard.armed = false;
        leader::publish(&flight, &answer);
        (answer, status)
    }

    /// The call of a flight made by this replica alone (without `[cluster]`, or with Redis
    /// away): its own quota turn, WeChat's answer.
    async fn call_alone(
        &self,
        key: CodeKey,
        flight: &Arc<CodeFlight>,
        call: &Call,
        dispatcher: &Dispatcher,
    ) -> (Answer, CacheStatus) {
        let answer = self
            .call(key, flight, call, dispatcher, FirstTurn::Acquire)
            .await;
        (answer, CacheStatus::Miss)
    }

    /// The upstream call of a flight, and its slot settled by the answer.
    async fn call(
        &self,
        key: CodeKey,
        flight: &Arc<CodeFlight>,
        call: &Call,
        dispatcher: &Dispatcher,
        first_turn: FirstTurn,
    ) -> Answer {
        let gone = || self.everyone_gone(key, flight);
        match dispatcher.call_with(call, gone, first_turn).await {
            Ok(answer) => {
                self.settle(key, flight, &answer);
                Answer::Wechat(Arc::new(answer))
            }
            // The slot is already gone (see `everyone_gone`).
            Err(LocalAnswer::CallAbandoned) => Answer::Local(LocalAnswer::CallAbandoned),
            Err(local) => {
                self.forget_flight(key, flight);
                Answer::Local(local)
            }
        }
    }

    /// Completes when no caller waits for `flight` any more and its slot has been removed.
    async fn everyone_gone(&self, key: CodeKey, flight: &Arc<CodeFlight>) {
        loop {
            flight.everyone_left().await;
            // A follower subscribes under the shard's read lock; this removal takes the write
            // lock, so either the follower is counted here or it finds no flight.
            let removed = self.slots.remove_if(&key, |_, slot| {
                matches!(slot, CodeSlot::InFlight(f) if Arc::ptr_eq(f, flight) && f.waiting() == 0)
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
    fn settle(&self, key: CodeKey, flight: &Arc<CodeFlight>, answer: &WechatAnswer) {
        let now = self.seconds(Instant::now());
        let response = &answer.response;
        let slot = is_definitive(response.status, answer.errcode)
            .then(|| {
                let content_type = response.headers.get(header::CONTENT_TYPE);
                let encoded =
                    RememberedAnswer::encode_parts(response.status, content_type, &response.body);
                CodeSlot::remembered(encoded, self.expiry_from(now))
            })
            .flatten();
        match slot {
            Some(slot) => self.keep(key, slot, now),
            None => self.forget_flight(key, flight),
        }
        self.update_gauge();
    }

    /// When an answer remembered at `now` expires: rounded up to the second, so that an
    /// answer is never forgotten early.
    fn expiry_from(&self, now: u32) -> u32 {
        now + self.ttl().as_secs() as u32 + 1
    }

    /// Puts a remembered answer in `key`'s slot, and in the expiry queue.
    fn keep(&self, key: CodeKey, slot: CodeSlot, now: u32) {
        let Some(expires) = slot.expires() else {
            return;
        };
        self.slots.insert(key, slot);
        self.remembered.fetch_add(1, Ordering::Relaxed);
        let mut expiry = self.expiry.lock();
        expiry.push_back((expires, key));
        self.evict(&mut expiry, now);
    }

    fn forget_flight(&self, key: CodeKey, flight: &Arc<CodeFlight>) {
        self.slots.remove_if(
            &key,
            |_, slot| matches!(slot, CodeSlot::InFlight(f) if Arc::ptr_eq(f, flight)),
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
            let removed = self
                .slots
                .remove_if(&key, |_, slot| slot.expires() == Some(expires));
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

    /// Whole seconds from the cache's base to `at`.
    fn seconds(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.base).as_secs() as u32
    }

    fn update_gauge(&self) {
        self.metrics.entries.set(self.len() as i64);
    }
}

/// Frees a call's slot and answers its followers when the call ends unfinished.
struct SlotGuard<'a> {
    cache: &'a CodeCache,
    key: CodeKey,
    flight: &'a Arc<CodeFlight>,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cache.forget_flight(self.key, self.flight);
            leader::abandon(self.flight);
        }
    }
}
