//! Per-(appid, API) minute quotas: governor's keyed GCRA limiter behind a first-come,
//! first-served wait queue, and a pause that follows WeChat's own 45011.
//!
//! # The bound
//! governor's GCRA with emission interval `T` and burst `b` admits at most `b + L/T − 1`
//! calls in any half-open span of length `L` (`b` at once, then one every `T`). wxgate picks
//! `T = window / (per_window − b + 1)` (rounded up to the nanosecond), so any span of one
//! window, calendar-aligned or not, admits at most `per_window` calls: retries go through the
//! same limiter, so they are included. (`Quota::per_minute(N)` alone would admit `2N − 1`.)
//! Under sustained overload a window admits `per_window − b + 1` calls, 91 % of the quota with
//! the default burst of 10 %.
//!
//! # The queue
//! A call that finds no token joins its key's *lane*, a fair (FIFO) `tokio::sync::Mutex`:
//! only the lane's head sleeps until governor's next token, so a returning token wakes one
//! waiter, not all of them. A waiter whose client goes away is dropped from the lane by
//! tokio and never reaches upstream. While a key has a lane, newcomers queue behind it
//! rather than overtaking the waiters.
//!
//! # The pause
//! When WeChat answers 45011 anyway, the key is paused until the start of WeChat's next
//! window (see [`next_window_start`]); the lane's head sleeps through the pause, so the calls
//! behind it do not reach upstream either.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::Clock;
use governor::clock::Reference;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::api::Api;
use crate::cluster::quota::SharedQuota;
use crate::cluster::Cluster;
use crate::config::{QuotaConfig, QuotaLimit};
use crate::wechat::{is_plausible_appid, MAX_APPID_LEN};

/// What a quota is kept for: one API of one appid. `Copy`, with the appid inline, so that
/// the limiter's map, which clones its key on every check, never allocates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct QuotaKey {
    api: Api,
    len: u8,
    appid: [u8; MAX_APPID_LEN],
}

impl QuotaKey {
    /// A key for `appid` calling `api`; `None` for an appid WeChat never issues (see
    /// `wechat::is_plausible_appid`), so that every key names a real-looking appid in at
    /// most `MAX_APPID_LEN` bytes.
    pub fn new(api: Api, appid: impl AsRef<[u8]>) -> Option<QuotaKey> {
        let bytes = appid.as_ref();
        if !is_plausible_appid(bytes) {
            return None;
        }
        let mut inline = [0; MAX_APPID_LEN];
        inline.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(QuotaKey {
            api,
            len: bytes.len() as u8,
            appid: inline,
        })
    }

    /// The API.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The appid.
    pub fn appid(&self) -> &str {
        std::str::from_utf8(&self.appid[..usize::from(self.len)]).unwrap_or("")
    }
}

impl Hash for QuotaKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The appid's own bytes, not the whole inline array: the limiter's map hashes the key
        // with SipHash on every check, and the bytes past `len` are always zero (so keys
        // equal as a whole still hash alike).
        self.api.hash(state);
        state.write(&self.appid[..usize::from(self.len)]);
    }
}

impl std::fmt::Debug for QuotaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuotaKey({}, {})", self.api.label(), self.appid())
    }
}

/// A call could not get its turn before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// When trying again has a chance: the `Retry-After` of the local 45011.
    pub retry_after: Duration,
}

type KeyedLimiter<C> = RateLimiter<QuotaKey, Buckets, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// All (appid, API) pairs that share one [`QuotaLimit`] share one keyed limiter.
struct LimitClass<C: Clock> {
    limit: QuotaLimit,
    interval: Duration,
    limiter: KeyedLimiter<C>,
    /// The limiter's buckets, kept to carry them over to the limiter of a new configuration.
    buckets: Buckets,
    /// The clock when the limiter was made: governor keeps each bucket's state relative to
    /// it, so a bucket moved to another limiter is shifted by the difference.
    origin: C::Instant,
}

/// The quota classes of one configuration, swapped whole on a reload.
struct Limits<C: Clock> {
    classes: Vec<LimitClass<C>>,
    class_of_api: [usize; Api::COUNT],
    class_of_appid: HashMap<Box<str>, usize>,
}

/// governor's dashmap store of bucket states, shared between a limiter and the gate (which
/// reads and moves them on a reload).
#[derive(Clone, Default)]
struct Buckets(Arc<DashMapStateStore<QuotaKey>>);

impl StateStore for Buckets {
    type Key = QuotaKey;

    fn measure_and_replace<T, F, E>(&self, key: &QuotaKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<QuotaKey> for Buckets {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0);
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

/// The waiters of one key, and the pause WeChat asked for. Exists only while a key has
/// waiters or a pause, so the fast path of an uncontended key is one map miss.
#[derive(Default)]
struct Lane {
    turn: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    paused_until: Mutex<Option<Instant>>,
}

impl Lane {
    fn pause_end(&self) -> Option<Instant> {
        *self.paused_until.lock()
    }
}

/// The quota of every (appid, API) pair.
pub struct QuotaGate<C: Clock = TokioClock> {
    window: Duration,
    /// The classes of the configuration in force; a reload swaps them (see
    /// [`QuotaGate::reconfigure`]).
    limits: ArcSwap<Limits<C>>,
    lanes: DashMap<QuotaKey, Arc<Lane>>,
    /// How many lanes exist: while there are none (the common case), the fast path does not
    /// look a key up in `lanes` at all.
    lane_count: AtomicUsize,
    clock: C,
    /// With `[cluster]`: turns are counted in Redis (see [`crate::cluster::quota`]); the
    /// local limiters above are then unused, while the lanes still queue this replica's
    /// callers, so that only the head of a lane talks to Redis.
    shared: Option<SharedQuota>,
}

/// governor's clock read from tokio's, so that the limiter and the sleeps of the queue agree
/// (and tests that pause tokio's clock pause the limiter's too).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            start: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

impl QuotaGate<TokioClock> {
    /// A gate on tokio's clock.
    pub fn new(config: &QuotaConfig) -> QuotaGate<TokioClock> {
        QuotaGate::with_clock(config, TokioClock::default())
    }
}

impl<C: Clock + Clone> QuotaGate<C> {
    /// A gate on any governor clock (tests use `FakeRelativeClock`).
    pub fn with_clock(config: &QuotaConfig, clock: C) -> QuotaGate<C> {
        QuotaGate {
            window: config.window,
            limits: ArcSwap::from_pointee(Limits::new(config, &clock)),
            lanes: DashMap::new(),
            lane_count: AtomicUsize::new(0),
            clock,
            shared: None,
        }
    }

    /// Applies the quotas of a new configuration (same window) to the buckets already in
    /// use: each key keeps its state, so a lowered quota slows it from where it stands and
    /// nothing starts a fresh burst. Calls already waiting keep their place.
    pub fn reconfigure(&self, config: &QuotaConfig) {
        let new = Arc::new(Limits::new(config, &self.clock));
        let old = self.limits.swap(new.clone());
        // Twice: turns taken from the old buckets while the first pass ran are carried too
        // (a bucket's state only moves forward, so the later of two readings is kept).
        new.carry_over(&old, &self.clock);
        new.carry_over(&old, &self.clock);
    }

    /// Counts turns in Redis with the other replicas of `cluster`.
    pub fn shared_with(mut self, cluster: Arc<Cluster>) -> QuotaGate<C> {
        self.shared = Some(SharedQuota::new(cluster, self.window));
        self
    }

    /// The quota that applies to `key`, and its emission interval.
    pub fn limit(&self, key: &QuotaKey) -> QuotaLimit {
        self.limits.load().class(key).limit
    }

    /// Takes a token if one is there now; otherwise says how long until the next one.
    /// Ignores the queue and the pause: [`QuotaGate::acquire`] is what calls use.
    pub fn try_take(&self, key: &QuotaKey) -> Result<(), Duration> {
        self.limits
            .load()
            .class(key)
            .limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes a turn, in Redis when shared, if one is there now; otherwise says how long
    /// until the next one.
    async fn take(&self, key: &QuotaKey) -> Result<(), Duration> {
        match &self.shared {
            None => self.try_take(key),
            Some(shared) => {
                let (limit, interval) = {
                    let limits = self.limits.load();
                    let class = limits.class(key);
                    (class.limit, class.interval)
                };
                // Boxed: a Redis round trip is a large future, which every caller of
                // `acquire` would otherwise carry (and copy) even without `[cluster]`.
                Box::pin(shared.take(key, limit, interval)).await
            }
        }
    }

    /// Waits for `key`'s turn, at most until `deadline`. Returns how long it waited.
    ///
    /// Cancel-safe: dropping the future leaves the queue and spends no token (when shared, a
    /// caller that leaves while its turn is being taken in Redis may spend that one turn).
    pub async fn acquire(&self, key: &QuotaKey, deadline: Instant) -> Result<Duration, Refused> {
        // Fast path: nobody waiting, no pause, a token at hand.
        let no_lane = self.lane_count.load(Ordering::Acquire) == 0 || !self.lanes.contains_key(key);
        if no_lane && self.take(key).await.is_ok() {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let lane = self.lane(key);
        lane.waiting.fetch_add(1, Ordering::Relaxed);
        // Boxed: waiting is the exception, and its future is large.
        let result = Box::pin(self.wait_in_lane(key, &lane, deadline)).await;
        lane.waiting.fetch_sub(1, Ordering::Relaxed);
        drop(lane);
        self.forget_lane_if_idle(key);
        result.map(|()| started.elapsed())
    }

    async fn wait_in_lane(
        &self,
        key: &QuotaKey,
        lane: &Lane,
        deadline: Instant,
    ) -> Result<(), Refused> {
        let refused = || Refused {
            retry_after: self.retry_after(key, lane),
        };
        let Ok(_turn) = tokio::time::timeout_at(deadline, lane.turn.lock()).await else {
            return Err(refused());
        };
        // This call is the head of the lane now.
        loop {
            if let Some(until) = lane.pause_end() {
                if until > Instant::now() {
                    if until > deadline {
                        return Err(refused());
                    }
                    tokio::time::sleep_until(until).await;
                    continue;
                }
            }
            match self.take(key).await {
                Ok(()) => return Ok(()),
                Err(wait) => {
                    let ready_at = Instant::now() + wait;
                    if ready_at > deadline {
                        return Err(refused());
                    }
                    tokio::time::sleep_until(ready_at).await;
                }
            }
        }
    }

    /// A guess for `Retry-After`: the time for everyone queued ahead to get a token, or the
    /// pause, whichever is later; at least a second, at most a window.
    fn retry_after(&self, key: &QuotaKey, lane: &Lane) -> Duration {
        let queued = lane.waiting.load(Ordering::Relaxed) as u32;
        let interval = self.limits.load().class(key).interval;
        let mut wait = interval.saturating_mul(queued.max(1));
        if let Some(until) = lane.pause_end() {
            wait = wait.max(until.saturating_duration_since(Instant::now()));
        }
        wait.clamp(
            Duration::from_secs(1),
            self.window.max(Duration::from_secs(1)),
        )
    }

    /// Holds every call of `key` until `until` (WeChat said 45011: its window is spent).
    ///
    /// When shared, the pause is also written to Redis, so that every replica holds the key
    /// until WeChat's next window by Redis's clock.
    pub async fn pause(&self, key: &QuotaKey, until: Instant) {
        {
            let lane = self.lane(key);
            let mut paused = lane.paused_until.lock();
            if paused.is_none_or(|current| current < until) {
                *paused = Some(until);
            }
        }
        if let Some(shared) = &self.shared {
            shared.pause(key, Duration::ZERO).await;
        }
    }

    /// The lane of `key`, made if there is none.
    fn lane(&self, key: &QuotaKey) -> Arc<Lane> {
        match self.lanes.entry(*key) {
            Entry::Occupied(occupied) => occupied.get().clone(),
            Entry::Vacant(vacant) => {
                self.lane_count.fetch_add(1, Ordering::AcqRel);
                vacant.insert(Arc::default()).clone()
            }
        }
    }

    fn forget_lane_if_idle(&self, key: &QuotaKey) {
        let now = Instant::now();
        // The map holds one reference; any other belongs to a call still using the lane. The
        // check runs under the shard's write lock, so no call can pick the lane up meanwhile.
        let removed = self.lanes.remove_if(key, |_, lane| {
            Arc::strong_count(lane) == 1 && lane.pause_end().is_none_or(|until| until <= now)
        });
        if removed.is_some() {
            self.lane_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Drops the state of keys that have been idle long enough to have a full bucket again,
    /// and lanes whose pause is over; run on a timer so that many appids stay cheap.
    pub fn retain_recent(&self) {
        if let Some(shared) = &self.shared {
            shared.retain_recent();
        }
        for class in &self.limits.load().classes {
            class.limiter.retain_recent();
            class.limiter.shrink_to_fit();
        }
        let now = Instant::now();
        self.lanes.retain(|_, lane| {
            let keep =
                Arc::strong_count(lane) > 1 || lane.pause_end().is_some_and(|until| until > now);
            if !keep {
                self.lane_count.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }

    /// Keys with quota state (an estimate while calls are running).
    pub fn len(&self) -> usize {
        self.limits
            .load()
            .classes
            .iter()
            .map(|c| c.limiter.len())
            .sum()
    }

    /// Whether no key has quota state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// One class per distinct limit of `config`, each with a limiter of its own.
    fn new(config: &QuotaConfig, clock: &C) -> Limits<C> {
        let mut classes: Vec<LimitClass<C>> = Vec::new();
        let mut class_for = |limit: QuotaLimit| -> usize {
            if let Some(i) = classes.iter().position(|c| c.limit == limit) {
                return i;
            }
            let interval = emission_interval(config.window, limit);
            let burst = NonZeroU32::new(limit.burst.max(1)).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::with_period(interval)
                .expect("the interval is at least one nanosecond")
                .allow_burst(burst);
            let buckets = Buckets::default();
            // Read just before governor reads it as the limiter's start: a bucket carried
            // over is then shifted by at most a few nanoseconds too little (so it is, if
            // anything, a little fuller than it was, never emptier).
            let origin = clock.now();
            classes.push(LimitClass {
                limit,
                interval,
                limiter: RateLimiter::new(quota, buckets.clone(), clock.clone()),
                buckets,
                origin,
            });
            classes.len() - 1
        };
        let default_class = class_for(config.default);
        let mut class_of_api = [default_class; Api::COUNT];
        for (api, limit) in &config.apis {
            class_of_api[api.index()] = class_for(*limit);
        }
        let class_of_appid = config
            .appids
            .iter()
            .map(|(appid, limit)| (appid.as_str().into(), class_for(*limit)))
            .collect();
        Limits {
            classes,
            class_of_api,
            class_of_appid,
        }
    }

    fn class(&self, key: &QuotaKey) -> &LimitClass<C> {
        let index = self
            .class_of_appid
            .get(key.appid())
            .copied()
            .unwrap_or(self.class_of_api[key.api.index()]);
        &self.classes[index]
    }

    /// Moves every bucket of `old` into the class its key has now. A bucket's state is its
    /// theoretical arrival time (TAT): how far ahead of now it lies is the bucket's debt, in
    /// turns of the old emission interval. The debt is carried in turns (a key that had
    /// spent 19 turns has spent 19 under the new quota too), rescaled to the new interval
    /// and written relative to the new limiter's origin; a bucket with no debt is full and
    /// needs no state. A bucket already in the new class keeps the later of the two states.
    fn carry_over(&self, old: &Limits<C>, clock: &C) {
        let now = clock.now();
        for class in &old.classes {
            let old_now = now.duration_since(class.origin).as_u64();
            for entry in class.buckets.0.iter() {
                let Err(Some(state)) = entry
                    .value()
                    .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
                else {
                    continue;
                };
                let debt = state.as_u64().saturating_sub(old_now);
                if debt == 0 {
                    continue;
                }
                let target = self.class(entry.key());
                let turns = u128::from(debt) * target.interval.as_nanos()
                    / class.interval.as_nanos().max(1);
                let new_now = now.duration_since(target.origin).as_u64();
                let state =
                    Nanos::from(new_now.saturating_add(turns.min(u128::from(u64::MAX)) as u64));
                let _ = target.buckets.measure_and_replace(entry.key(), |current| {
                    Ok::<_, ()>(((), current.map_or(state, |current| current.max(state))))
                });
            }
        }
    }
}

/// `window / (per_window − burst + 1)`, rounded up to the nanosecond so that a window never
/// holds one call too many.
pub fn emission_interval(window: Duration, limit: QuotaLimit) -> Duration {
    let spaced = u128::from(limit.per_window.saturating_sub(limit.burst)) + 1;
    let nanos = window.as_nanos().div_ceil(spaced).max(1);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// How long until WeChat's next window begins: windows are aligned to multiples of the
/// window length since the UNIX epoch, as WeChat counts calendar minutes.
pub fn next_window_start(window: Duration) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let window = window.as_nanos().max(1);
    let next = (now / window + 1) * window;
    Duration::from_nanos(u64::try_from(next - now).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn config(window_secs: u64, per_window: u32, burst: u32) -> QuotaConfig {
        let text = format!(
            "[quota]\nwindow_secs = {window_secs}\nper_window = {per_window}\nburst = {burst}\n"
        );
        crate::Config::from_toml_str(&text).unwrap().quota
    }

    /// Most calls admitted in any half-open span `[t, t + window)`, by a sliding scan.
    fn max_in_any_window(admitted_ms: &[u64], window_ms: u64) -> usize {
        let mut best = 0;
        let mut start = 0;
        for end in 0..admitted_ms.len() {
            while admitted_ms[end] - admitted_ms[start] >= window_ms {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    /// The bound, proved on a fake clock: a client that tries every millisecond for several
    /// windows never gets more than `per_window` into any window, and still gets at least
    /// 90 % of the quota of every whole window.
    #[test]
    fn no_window_ever_holds_more_than_per_window() {
        for (per_window, burst) in [(100, 10), (100, 1), (100, 100), (7, 3), (60, 6), (1, 1)] {
            let window_ms = 60_000;
            let clock = FakeRelativeClock::default();
            let gate = QuotaGate::with_clock(&config(60, per_window, burst), clock.clone());
            let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
            let mut admitted = Vec::new();
            for ms in 0..(5 * window_ms) {
                if gate.try_take(&key).is_ok() {
                    admitted.push(ms);
                }
                clock.advance(Duration::from_millis(1));
            }
            let most = max_in_any_window(&admitted, window_ms);
            assert!(
                most <= per_window as usize,
                "per_window {per_window} burst {burst}: {most} calls in one window"
            );
            // Every aligned window after the first uses the quota.
            for w in 1..5 {
                let in_window = admitted
                    .iter()
                    .filter(|&&ms| ms >= w * window_ms && ms < (w + 1) * window_ms)
                    .count();
                let expected = per_window - burst + 1;
                assert!(
                    in_window + 1 >= expected as usize,
                    "per_window {per_window} burst {burst}: window {w} admitted {in_window}"
                );
            }
            if burst * 10 <= per_window {
                let steady = (per_window - burst + 1) as f64 / per_window as f64;
                assert!(steady >= 0.9, "{steady}");
            }
        }
    }

    #[test]
    fn keys_are_independent_and_overrides_apply() {
        let mut quota = config(60, 10, 10);
        quota.appids.insert(
            "wx00000000000000b2".into(),
            QuotaLimit {
                per_window: 2,
                burst: 2,
            },
        );
        let gate = QuotaGate::with_clock(&quota, FakeRelativeClock::default());
        let a = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
        let a_token = QuotaKey::new(Api::Token, "wx00000000000000a1").unwrap();
        let b = QuotaKey::new(Api::JsCode2Session, "wx00000000000000b2").unwrap();
        for _ in 0..10 {
            assert!(gate.try_take(&a).is_ok());
        }
        assert!(gate.try_take(&a).is_err());
        assert!(gate.try_take(&a_token).is_ok());
        assert!(gate.try_take(&b).is_ok());
        assert!(gate.try_take(&b).is_ok());
        assert!(gate.try_take(&b).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_and_refused_after_their_deadline() {
        // 2 per 2 s, no burst: one token every second.
        let gate = Arc::new(QuotaGate::new(&config(2, 2, 1)));
        let key = QuotaKey::new(Api::Token, "wx00000000000000a1").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        assert_eq!(gate.acquire(&key, deadline).await, Ok(Duration::ZERO));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let gate = gate.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                gate.acquire(&key, deadline).await.unwrap();
                tx.send(i).unwrap();
            });
            tokio::task::yield_now().await;
        }
        for expected in 0..3 {
            assert_eq!(rx.recv().await, Some(expected));
        }
        let refused = gate
            .acquire(&key, Instant::now() + Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(refused.retry_after >= Duration::from_secs(1));
        gate.retain_recent();
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_the_key() {
        let gate = QuotaGate::new(&config(60, 100, 10));
        let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        gate.pause(&key, until).await;
        let waited = gate
            .acquire(&key, Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        assert!(waited >= Duration::from_secs(5), "{waited:?}");
        assert!(gate
            .acquire(&key, Instant::now() + Duration::from_secs(1))
            .await
            .is_ok());
        gate.pause(&key, Instant::now() + Duration::from_secs(30))
            .await;
        assert!(gate
            .acquire(&key, Instant::now() + Duration::from_secs(1))
            .await
            .is_err());
    }

    /// A reload applies new quotas to the buckets in use: a spent key stays spent (no fresh
    /// burst), whether its class changed or it moved to an override, and runs at the new rate.
    #[test]
    fn a_reload_keeps_every_bucket_where_it_stands() {
        let clock = FakeRelativeClock::default();
        let gate = QuotaGate::with_clock(&config(60, 100, 10), clock.clone());
        let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
        let other = QuotaKey::new(Api::JsCode2Session, "wx00000000000000b2").unwrap();
        for _ in 0..10 {
            assert!(gate.try_take(&key).is_ok());
        }
        assert!(gate.try_take(&key).is_err(), "the burst is spent");
        clock.advance(Duration::from_secs(7));

        // Lower the default and give `other`'s appid an override of its own.
        let mut lower = config(60, 10, 2);
        lower.appids.insert(
            "wx00000000000000b2".into(),
            QuotaLimit {
                per_window: 5,
                burst: 5,
            },
        );
        gate.reconfigure(&lower);
        assert_eq!(gate.limit(&key).per_window, 10);
        assert_eq!(gate.limit(&other).per_window, 5);
        // 7 s after spending 10 at 100/min (one every 0.66 s), the old bucket had refilled
        // about 10: carried over, the key may take what the new burst allows (2), no more.
        let taken = (0..10).filter(|_| gate.try_take(&key).is_ok()).count();
        assert_eq!(taken, 2, "no fresh burst beyond the new limit");
        // From there, one token every 60 / (10 − 2 + 1) s.
        let interval = emission_interval(Duration::from_secs(60), gate.limit(&key));
        clock.advance(interval);
        assert!(gate.try_take(&key).is_ok());
        assert!(gate.try_take(&key).is_err());

        // A key spent under one class and moved to another keeps its state.
        for _ in 0..5 {
            assert!(gate.try_take(&other).is_ok());
        }
        let mut back = config(60, 10, 2);
        back.appids.insert(
            "wx00000000000000b2".into(),
            QuotaLimit {
                per_window: 6,
                burst: 6,
            },
        );
        gate.reconfigure(&back);
        // Five of the new six spent: one left, not a new window's worth.
        assert!(gate.try_take(&other).is_ok());
        assert!(gate.try_take(&other).is_err(), "moved, its state kept");
    }

    #[test]
    fn idle_keys_are_dropped() {
        let clock = FakeRelativeClock::default();
        let gate = QuotaGate::with_clock(&config(60, 100, 10), clock.clone());
        for i in 0..100_000 {
            let key = QuotaKey::new(Api::JsCode2Session, format!("wx{i:016x}")).unwrap();
            assert!(gate.try_take(&key).is_ok());
        }
        assert_eq!(gate.len(), 100_000);
        gate.retain_recent();
        assert_eq!(gate.len(), 100_000, "recently used keys stay");
        // A few emission intervals later every bucket is full again: the state is redundant.
        let interval = emission_interval(
            Duration::from_secs(60),
            gate.limit(&QuotaKey::new(Api::Token, "wx").unwrap()),
        );
        clock.advance(interval * 3);
        gate.retain_recent();
        assert!(gate.is_empty(), "{} keys left", gate.len());
    }

    #[test]
    fn next_window_start_is_within_a_window() {
        let until = next_window_start(Duration::from_secs(60));
        assert!(until > Duration::ZERO && until <= Duration::from_secs(60));
    }
}
