//! The limit classes: a governor keyed limiter per distinct (limit, window), the classes of
//! one configuration ([`Limits`]), and how a bucket moves from one class to another when its
//! key's limit changes (a reload, a limit WeChat stated, a limit learned).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::{Quota, RateLimiter};

use super::buckets::Buckets;
use super::QuotaKey;
use crate::config::{QuotaConfig, QuotaLimit};
use crate::wechat::Api;

pub(super) type KeyedLimiter<C> =
    RateLimiter<QuotaKey, Buckets, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// All (appid, API) pairs under one [`QuotaLimit`] and window share one keyed limiter.
pub(super) struct LimitClass<C: Clock> {
    pub(super) limit: QuotaLimit,
    /// The window the limit counts in: `quota.window_secs`, or the window WeChat stated.
    pub(super) window: Duration,
    /// `(window + margin) / (per_window − burst + 1)` (see [`crate::quota`]).
    pub(super) interval: Duration,
    pub(super) limiter: KeyedLimiter<C>,
    /// The limiter's buckets, kept to read them and to move them to another class.
    pub(super) buckets: Buckets,
    /// The clock when the limiter was made: governor keeps each bucket's state relative to
    /// it, so a bucket moved to another limiter is shifted by the difference.
    origin: C::Instant,
}

impl<C: Clock + Clone> LimitClass<C> {
    /// A class of `limit` over `window`, its calls at least `window + margin` apart per
    /// `per_window`.
    pub(super) fn new(limit: QuotaLimit, window: Duration, margin: Duration, clock: &C) -> Self {
        let interval = emission_interval(window + margin, limit);
        let burst = NonZeroU32::new(limit.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval)
            .expect("the interval is at least one nanosecond")
            .allow_burst(burst);
        let buckets = Buckets::new(window);
        // Read just before governor reads it as the limiter's start: a bucket carried over
        // is then shifted by at most a few nanoseconds too little (so it is, if anything, a
        // little fuller than it was, never emptier).
        let origin = clock.now();
        LimitClass {
            limit,
            window,
            interval,
            limiter: RateLimiter::new(quota, buckets.clone(), clock.clone()),
            buckets,
            origin,
        }
    }

    /// Turns `key` took in this class in the calendar window `at` falls in.
    pub(super) fn turns(&self, key: &QuotaKey, at: SystemTime) -> u32 {
        self.buckets.turns(key, at)
    }
}

/// The classes of one configuration, swapped whole on a reload.
pub(super) struct Limits<C: Clock> {
    pub(super) classes: Vec<LimitClass<C>>,
    default_class: usize,
    /// The class of each API: `quota.apis`' when it names the API, else the default.
    class_of_api: [usize; Api::COUNT],
    class_of_appid: HashMap<Box<str>, usize>,
}

impl<C: Clock + Clone> Limits<C> {
    /// One class per distinct limit of `config`, each with a limiter of its own.
    pub(super) fn new(config: &QuotaConfig, clock: &C) -> Limits<C> {
        let mut classes: Vec<LimitClass<C>> = Vec::new();
        let mut class_for = |limit: QuotaLimit| -> usize {
            if let Some(i) = classes.iter().position(|c| c.limit == limit) {
                return i;
            }
            classes.push(LimitClass::new(
                limit,
                config.window,
                config.arrival_margin,
                clock,
            ));
            classes.len() - 1
        };
        let default_class = class_for(config.default);
        let mut class_of_api = [usize::MAX; Api::COUNT];
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
            default_class,
            class_of_api,
            class_of_appid,
        }
    }

    /// The class of `key` when the configuration names it (`quota.appids` its appid, or
    /// `quota.apis` its API): the configuration wins over any other source.
    pub(super) fn named(&self, key: &QuotaKey) -> Option<&LimitClass<C>> {
        let index = self.class_of_api[key.api().index()];
        let index = match self.class_of_appid.get(key.appid()) {
            Some(index) => *index,
            None if index != usize::MAX => index,
            None => return None,
        };
        Some(&self.classes[index])
    }

    /// The class of every key the configuration does not name: `quota.per_window`.
    pub(super) fn default_class(&self) -> &LimitClass<C> {
        &self.classes[self.default_class]
    }
}

/// Moves `key`'s bucket from `from` to `to`. A bucket's state is its theoretical arrival
/// time (TAT): how far ahead of now it lies is the bucket's debt, in turns of the old
/// emission interval. The debt is carried in turns (a key that had spent 19 turns has spent
/// 19 under the new limit too), rescaled to the new interval and written relative to the new
/// limiter's origin; a bucket with no debt is full and needs no state. A bucket already in
/// the new class keeps the later of the two states. The turns of the current window go with
/// it.
pub(super) fn carry<C: Clock>(key: &QuotaKey, from: &LimitClass<C>, to: &LimitClass<C>, clock: &C) {
    if std::ptr::eq(from, to) {
        return;
    }
    let now = SystemTime::now();
    let Some((state, turns)) = from.buckets.take(key, now) else {
        return;
    };
    let state = state.and_then(|state| rescaled(state, from, to, clock.now()));
    to.buckets.merge(key, state, turns, now);
}

/// A TAT of `from` as the TAT of `to` with the same debt in turns; `None` when there is no
/// debt (the bucket is full).
fn rescaled<C: Clock>(
    state: Nanos,
    from: &LimitClass<C>,
    to: &LimitClass<C>,
    now: C::Instant,
) -> Option<Nanos> {
    let old_now = now.duration_since(from.origin).as_u64();
    let debt = state.as_u64().saturating_sub(old_now);
    if debt == 0 {
        return None;
    }
    let turns = u128::from(debt) * to.interval.as_nanos() / from.interval.as_nanos().max(1);
    let new_now = now.duration_since(to.origin).as_u64();
    Some(Nanos::from(
        new_now.saturating_add(turns.min(u128::from(u64::MAX)) as u64),
    ))
}

/// `span / (per_window − burst + 1)`, rounded up to the nanosecond so that a span never
/// holds one call too many. wxgate's span is the window plus the arrival margin (see
/// [`crate::quota`]).
pub fn emission_interval(span: Duration, limit: QuotaLimit) -> Duration {
    let spaced = u128::from(limit.per_window.saturating_sub(limit.burst)) + 1;
    let nanos = span.as_nanos().div_ceil(spaced).max(1);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}
