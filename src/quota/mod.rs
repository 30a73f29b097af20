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
//!
//! # Shared with replicas
//! With `[cluster]`, turns are counted in Redis instead ([`shared`]); the lanes still queue
//! this replica's callers, so that only the head of a lane talks to Redis.
//!
//! - [`key`]: the (appid, API) key.
//! - [`limits`]: the keyed limiters of one configuration, and the carry-over on a reload.
//! - [`shared`]: with `[cluster]`, the turns counted in Redis, and the share counted while
//!   Redis is away.

mod key;
mod limits;
mod shared;
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

pub use self::key::QuotaKey;
use self::limits::Limits;
use self::shared::SharedQuota;
pub use self::shared::Turn;
use crate::cluster::scripts::TurnReply;
use crate::cluster::Cluster;
use crate::config::{QuotaConfig, QuotaLimit};

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
    /// With `[cluster]`: turns are counted in Redis (see [`shared`]); the local limiters
    /// above are then unused, while the lanes still queue this replica's callers, so that
    /// only the head of a lane talks to Redis.
    shared: Option<SharedQuota>,
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
        let limits = self.limits.load();
        let class = limits.class(key);
        Some(shared.turn(key, class.limit, class.interval))
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
            shared.pause(key).await;
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
        if let Some(shared) = &self.shared {
            shared.retain_recent();
        }
        for class in &self.limits.load().classes {
            class.limiter.retain_recent();
            class.limiter.shrink_to_fit();
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

/// How long until WeChat's next window begins: windows are aligned to multiples of the
/// window length since the UNIX epoch, as WeChat counts calendar minutes.
pub fn next_window_start(window: Duration) -> Duration {
    until_next_window(SystemTime::now(), window)
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
