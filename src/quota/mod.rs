//! Per-(appid, API) minute quotas: governor's keyed GCRA limiter behind a first-come,
//! first-served wait queue, and a pause that follows WeChat's own 45011.
//!
//! # The bound
//! governor's GCRA with emission interval `T` and burst `b` admits at most `b + L/T − 1`
//! calls in any half-open span of length `L` (`b` at once, then one every `T`). wxgate picks
//! `T = (window + margin) / (per_window − b + 1)` (rounded up to the nanosecond), so any
//! span of one window plus the *arrival margin* (`quota.arrival_margin_ms`) admits at most
//! `per_window` calls: retries go through the same limiter, so they are included.
//! (`Quota::per_minute(N)` alone would admit `2N − 1`.) Under sustained overload a window
//! admits `(per_window − b + 1) · window / (window + margin)` calls.
//!
//! # The margin
//! WeChat counts calls where they *arrive*, and a call that opens a fresh connection (TCP and
//! TLS handshakes) arrives later after leaving than one on a kept-alive connection. If the
//! delays of any two calls differ by at most the margin, two calls that arrive less than a
//! window apart left less than a window plus the margin apart, and no such span holds more
//! than `per_window` departures: the bound holds at WeChat's door. Without the margin, a
//! burst whose first call opened a connection puts `per_window + 1` calls into one window
//! where WeChat counts. The cost is `margin / window` of the quota (0.42 % with the default
//! 250 ms on WeChat's minute).
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
//!
//! # Shared with replicas
//! With `[cluster]`, turns are counted in Redis instead ([`shared`]); the lanes still queue
//! this replica's callers, so that only the head of a lane talks to Redis.
//!
//! # Limits per key
//! Each key's limit has a *source* ([`LimitSource`]); the first of these that has a figure
//! for it gives it: the configuration when it names the key (`quota.appids`, `quota.apis`),
//! WeChat's own figure (quota/get), a limit learned from WeChat's 45011, the default
//! (`quota.per_window`). A figure from WeChat or a learned one comes with its own window
//! ([`Figure`]); keys with the same limit and window share a class (one governor keyed
//! limiter), and a key whose limit changes takes its bucket to its new class.
//!
//! - [`key`]: the (appid, API) key; [`paths`]: the numbers of API paths outside `Api`.
//! - [`limits`]: a class, the classes of one configuration, and how a bucket moves between
//!   classes; [`buckets`]: a class's bucket states and the turns of the current window.
//! - [`figures`]: the figures of single keys (WeChat's, learned) and their classes;
//!   [`learned`]: limits learned from WeChat's 45011, the per-user limit, the climb back.
//! - [`daily`]: keys WeChat's 45009 blocked until its day ends.
//! - [`sources`]: the gate's side of all this: figures, sources, what a 45011 or a 45009
//!   teaches, the learned limits shared with replicas.
//! - [`metrics`]: keys by source, learned changes, daily blocks; [`table`]: the keys with
//!   recent traffic as `GET /quota` shows them.
//! - [`shared`]: with `[cluster]`, the turns counted in Redis, and the share counted while
//!   Redis is away.

mod buckets;
mod daily;
mod figures;
mod key;
mod learned;
mod limits;
mod metrics;
mod paths;
mod shared;
mod sources;
mod table;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::Clock;
use parking_lot::Mutex;
use tokio::time::Instant;

use self::daily::DailyBlocks;
pub use self::figures::Figure;
use self::figures::KeyFigures;
pub use self::key::QuotaKey;
pub use self::learned::Refusal;
use self::learned::{LearnSettings, Learner};
use self::limits::{carry, LimitClass, Limits};
pub use self::metrics::QuotaMetrics;
pub use self::paths::ApiPaths;
use self::shared::SharedQuota;
pub use self::shared::Turn;
pub use self::table::{DailyRow, KeyRow};
use crate::cluster::scripts::TurnReply;
use crate::cluster::Cluster;
use crate::config::{QuotaConfig, QuotaLimit};
pub use wxgate_contract::LimitSource;

/// The quota of every (appid, API) pair.
pub struct QuotaGate<C: Clock = TokioClock> {
    window: Duration,
    /// `quota.arrival_margin_ms`.
    margin: Duration,
    /// The classes of the configuration in force; a reload swaps them (see
    /// [`QuotaGate::reconfigure`]).
    limits: ArcSwap<Limits<C>>,
    /// The limits of single keys the configuration does not name.
    figures: KeyFigures<C>,
    /// The numbers of the API paths outside [`Api`] that keys name.
    paths: Arc<ApiPaths>,
    lanes: DashMap<QuotaKey, Arc<Lane>>,
    /// How many lanes exist: while there are none (the common case), the fast path does not
    /// look a key up in `lanes` at all.
    lane_count: AtomicUsize,
    clock: C,
    /// With `[cluster]`: turns are counted in Redis (see [`shared`]); the local limiters
    /// above are then unused, while the lanes still queue this replica's callers, so that
    /// only the head of a lane talks to Redis.
    shared: Option<SharedQuota>,
    /// Keys WeChat answered 45011 or 45009 since discovery last looked: their stated figure
    /// is in doubt.
    refused: Mutex<std::collections::HashSet<QuotaKey>>,
    /// How many keys `refused` holds: while none, a call does not look.
    refused_count: AtomicUsize,
    /// Limits learned from WeChat's 45011.
    learner: Learner,
    learn_settings: ArcSwap<LearnSettings>,
    /// Keys whose daily quota WeChat said is spent.
    daily: DailyBlocks,
    metrics: Option<QuotaMetrics>,
}

fn learn_settings(config: &QuotaConfig) -> LearnSettings {
    LearnSettings {
        hold: config.learned_hold,
        floor_percent: config.learned_floor_percent,
        margin: config.arrival_margin,
    }
}

/// Whether a call's first attempt still needs its quota turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstTurn {
    /// It waits for its turn, as every retry does.
    Acquire,
    /// Its turn was taken already (with `[cluster]`, along with its code exchange's claim).
    Taken,
    /// It was told a moment ago (with its code exchange's claim) that its turn is not before
    /// then: it waits in its quota lane without asking again first.
    NotBefore(Instant),
}

impl FirstTurn {
    /// What the turn a claim took along ([`QuotaGate::turn_to_claim`]) came to: taken, so
    /// the call goes upstream without [`QuotaGate::acquire`]; not before a while, so the
    /// call queues at once ([`QuotaGate::acquire_not_before`]) instead of asking Redis
    /// again first (also when Redis lost the bucket: it is held until the next window
    /// boundary); or not counted (no turn rode on the claim), so the call takes its turn as
    /// any call does.
    pub fn after_claim(turn: Option<TurnReply>) -> FirstTurn {
        match turn {
            Some(TurnReply::Taken) => FirstTurn::Taken,
            Some(TurnReply::NotBefore(wait)) => FirstTurn::NotBefore(Instant::now() + wait),
            None => FirstTurn::Acquire,
        }
    }
}

/// The burst of a limit WeChat stated or wxgate learned: 2 % of it, at least one. Small, so
/// that under sustained load a window uses `(per_window − burst + 1) / per_window` ≥ 98 % of
/// the figure (less the margin's share): these figures are WeChat's own, with no room above
/// them.
pub fn figure_burst(per_window: u32) -> u32 {
    (per_window / 50).max(1)
}

/// The limit in force for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimit {
    /// Calls per window, and how many may leave at once.
    pub limit: QuotaLimit,
    /// The window it counts in.
    pub window: Duration,
    /// Where it comes from.
    pub source: LimitSource,
}

/// A call could not get its turn before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// When trying again has a chance: the `Retry-After` of the local 45011.
    pub retry_after: Duration,
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

    /// Whether the lane in the map (`lane`, the map's own reference) can go: no call holds it
    /// (the map's is the only reference) and no pause lasts past `now`.
    fn idle(lane: &Arc<Lane>, now: Instant) -> bool {
        Arc::strong_count(lane) == 1 && lane.pause_end().is_none_or(|until| until <= now)
    }
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
            margin: config.arrival_margin,
            limits: ArcSwap::from_pointee(Limits::new(config, &clock)),
            figures: KeyFigures::new(config.arrival_margin),
            paths: Arc::default(),
            lanes: DashMap::new(),
            lane_count: AtomicUsize::new(0),
            clock,
            shared: None,
            refused: Mutex::default(),
            refused_count: AtomicUsize::new(0),
            learner: Learner::default(),
            learn_settings: ArcSwap::from_pointee(learn_settings(config)),
            daily: DailyBlocks::new(config.day),
            metrics: None,
        }
    }

    /// Applies the quotas of a new configuration (same window) to the buckets already in
    /// use: each key keeps its state, so a lowered quota slows it from where it stands and
    /// nothing starts a fresh burst. Calls already waiting keep their place.
    pub fn reconfigure(&self, config: &QuotaConfig) {
        self.learn_settings.store(Arc::new(learn_settings(config)));
        self.daily.set_day(config.day);
        let new = Arc::new(Limits::new(config, &self.clock));
        let old = self.limits.swap(new);
        let old_figures = self.figures.remake(config.arrival_margin, &self.clock);
        // Twice: turns taken from the old buckets while the first pass ran are carried too
        // (a bucket's state only moves forward, so the later of two readings is kept).
        for _ in 0..2 {
            for class in &old.classes {
                self.carry_from(class);
            }
            for class in &old_figures {
                self.carry_from(class);
            }
        }
    }

    /// Moves every bucket of `old` to the class its key has now.
    fn carry_from(&self, old: &LimitClass<C>) {
        for (key, _) in old.buckets.states() {
            self.resolve(&key, |to, _| carry(&key, old, to, &self.clock));
        }
    }

    /// Calls `f` with the class of `key` and where its limit comes from: the configuration
    /// when it names the key, else the key's figure (WeChat's, learned), else the default.
    #[inline]
    fn resolve<R>(&self, key: &QuotaKey, f: impl FnOnce(&LimitClass<C>, LimitSource) -> R) -> R {
        let limits = self.limits.load();
        if let Some(class) = limits.named(key) {
            return f(class, LimitSource::Config);
        }
        self.figures.with(key, |figured| match figured {
            Some(figured) => f(&figured.class, figured.figure.source),
            None => f(limits.default_class(), LimitSource::Default),
        })
    }

    /// Registers the quota's metrics in `metrics`' registry.
    pub fn with_metrics(mut self, metrics: &crate::metrics::Metrics) -> prometheus::Result<Self> {
        self.metrics = Some(QuotaMetrics::new(metrics)?);
        Ok(self)
    }

    /// Counts turns in Redis with the other replicas of `cluster`.
    pub fn shared_with(mut self, cluster: Arc<Cluster>) -> QuotaGate<C> {
        self.shared = Some(SharedQuota::new(cluster, self.margin, self.paths.clone()));
        self
    }

    /// The quota that applies to `key`.
    pub fn limit(&self, key: &QuotaKey) -> QuotaLimit {
        self.resolve(key, |class, _| class.limit)
    }

    /// Takes a token if one is there now; otherwise says how long until the next one.
    /// Ignores the queue and the pause: [`QuotaGate::acquire`] is what calls use.
    pub fn try_take(&self, key: &QuotaKey) -> Result<(), Duration> {
        self.resolve(key, |class, _| {
            class
                .limiter
                .check_key(key)
                .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
        })
    }

    /// Takes a turn, in Redis when shared, if one is there now; otherwise says how long
    /// until the next one.
    async fn take(&self, key: &QuotaKey) -> Result<(), Duration> {
        match &self.shared {
            None => self.try_take(key),
            Some(shared) => {
                let (limit, interval, window) =
                    self.resolve(key, |class, _| (class.limit, class.interval, class.window));
                // Boxed: a Redis round trip is a large future, which every caller of
                // `acquire` would otherwise carry (and copy) even without `[cluster]`.
                Box::pin(shared.take(key, limit, interval, window)).await
            }
        }
    }

    /// With `[cluster]` counting in Redis and no call of this replica queued for `key`: the
    /// turn a code exchange's claim takes along, in the same round trip; what it came to is
    /// settled by `FirstTurn::after_claim`. `None` otherwise: the call takes its turn
    /// through [`QuotaGate::acquire`], as any other.
    pub fn turn_to_claim(&self, key: &QuotaKey) -> Option<Turn> {
        let shared = self.shared.as_ref()?;
        let queued = self.lane_count.load(Ordering::Acquire) != 0 && self.lanes.contains_key(key);
        if queued || !shared.counts_in_redis() {
            return None;
        }
        Some(self.resolve(key, |class, _| {
            shared.turn(key, class.limit, class.interval, class.window)
        }))
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
        self.queue(key, deadline, None).await
    }

    /// [`QuotaGate::acquire`] for a call that has just been told its turn is not before
    /// `not_before`: it joins its lane at once, and as the lane's head waits until then
    /// before asking for the turn.
    pub async fn acquire_not_before(
        &self,
        key: &QuotaKey,
        deadline: Instant,
        not_before: Instant,
    ) -> Result<Duration, Refused> {
        self.queue(key, deadline, Some(not_before)).await
    }

    /// Waits in `key`'s lane for a turn.
    async fn queue(
        &self,
        key: &QuotaKey,
        deadline: Instant,
        not_before: Option<Instant>,
    ) -> Result<Duration, Refused> {
        let started = Instant::now();
        let lane = self.lane(key);
        lane.waiting.fetch_add(1, Ordering::Relaxed);
        // Boxed: waiting is the exception, and its future is large.
        let result = Box::pin(self.wait_in_lane(key, &lane, deadline, not_before)).await;
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
        not_before: Option<Instant>,
    ) -> Result<(), Refused> {
        let refused = || Refused {
            retry_after: self.retry_after(key, lane),
        };
        let Ok(_turn) = tokio::time::timeout_at(deadline, lane.turn.lock()).await else {
            return Err(refused());
        };
        // This call is the head of the lane now.
        if let Some(at) = not_before {
            if at > deadline {
                return Err(refused());
            }
            tokio::time::sleep_until(at).await;
        }
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
        let (interval, window) = self.resolve(key, |class, _| (class.interval, class.window));
        let mut wait = interval.saturating_mul(queued.max(1));
        if let Some(until) = lane.pause_end() {
            wait = wait.max(until.saturating_duration_since(Instant::now()));
        }
        wait.clamp(Duration::from_secs(1), window.max(Duration::from_secs(1)))
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
            shared.pause(key, self.window_of(key)).await;
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
        let removed = self.lanes.remove_if(key, |_, lane| Lane::idle(lane, now));
        if removed.is_some() {
            self.lane_count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Drops the state of keys that have been idle long enough to have a full bucket again,
    /// and lanes whose pause is over; run on a timer so that many appids stay cheap.
    pub fn retain_recent(&self) {
        self.climb();
        self.count_sources();
        let blocked = self.daily.expire(SystemTime::now());
        if let Some(metrics) = &self.metrics {
            metrics.set_daily_blocked(blocked);
        }
        if let Some(shared) = &self.shared {
            shared.retain_recent();
        }
        for class in &self.limits.load().classes {
            class.limiter.retain_recent();
            class.limiter.shrink_to_fit();
        }
        for class in self.figures.classes() {
            class.limiter.retain_recent();
            class.limiter.shrink_to_fit();
        }
        {
            // Doubts discovery never takes (it is off, or the keys went quiet) go in bulk.
            let mut refused = self.refused.lock();
            if refused.len() > 1_000 {
                refused.clear();
                self.refused_count.store(0, Ordering::Release);
            }
        }
        let now = Instant::now();
        self.lanes.retain(|_, lane| {
            let idle = Lane::idle(lane, now);
            if idle {
                self.lane_count.fetch_sub(1, Ordering::AcqRel);
            }
            !idle
        });
    }

    /// Keys with quota state (an estimate while calls are running).
    pub fn len(&self) -> usize {
        let configured: usize = self
            .limits
            .load()
            .classes
            .iter()
            .map(|c| c.limiter.len())
            .sum();
        let figured: usize = self.figures.classes().iter().map(|c| c.limiter.len()).sum();
        configured + figured
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

/// How long until WeChat's next window begins: windows are aligned to multiples of the
/// window length since the UNIX epoch, as WeChat counts calendar minutes.
pub fn next_window_start(window: Duration) -> Duration {
    until_next_window(SystemTime::now(), window)
}

/// Milliseconds since the epoch (0 before it), as limits records and the quota table carry
/// times.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

/// How long from `now` until the next calendar window begins (see [`next_window_start`]).
pub fn until_next_window(now: SystemTime, window: Duration) -> Duration {
    let since_epoch = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let window = window.as_nanos().max(1);
    let next = (since_epoch / window + 1) * window;
    Duration::from_nanos(u64::try_from(next - since_epoch).unwrap_or(u64::MAX))
}
