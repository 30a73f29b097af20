//! The quota classes of one configuration: a governor keyed limiter per distinct limit,
//! and how buckets move to the limiters of a new configuration on a reload.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use super::QuotaKey;
use crate::config::{QuotaConfig, QuotaLimit};
use crate::wechat::Api;

pub(super) type KeyedLimiter<C> =
    RateLimiter<QuotaKey, Buckets, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// All (appid, API) pairs that share one [`QuotaLimit`] share one keyed limiter.
pub(super) struct LimitClass<C: Clock> {
    pub(super) limit: QuotaLimit,
    pub(super) interval: Duration,
    pub(super) limiter: KeyedLimiter<C>,
    /// The limiter's buckets, kept to carry them over to the limiter of a new configuration.
    buckets: Buckets,
    /// The clock when the limiter was made: governor keeps each bucket's state relative to
    /// it, so a bucket moved to another limiter is shifted by the difference.
    origin: C::Instant,
}

/// The quota classes of one configuration, swapped whole on a reload.
pub(super) struct Limits<C: Clock> {
    pub(super) classes: Vec<LimitClass<C>>,
    class_of_api: [usize; Api::COUNT],
    class_of_appid: HashMap<Box<str>, usize>,
}

/// governor's dashmap store of bucket states, shared between a limiter and the gate (which
/// reads and moves them on a reload).
#[derive(Clone, Default)]
pub(super) struct Buckets(Arc<DashMapStateStore<QuotaKey>>);

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

impl<C: Clock + Clone> Limits<C> {
    /// One class per distinct limit of `config`, each with a limiter of its own.
    pub(super) fn new(config: &QuotaConfig, clock: &C) -> Limits<C> {
        let mut classes: Vec<LimitClass<C>> = Vec::new();
        let mut class_for = |limit: QuotaLimit| -> usize {
            if let Some(i) = classes.iter().position(|c| c.limit == limit) {
                return i;
            }
            let interval = emission_interval(config.window + config.arrival_margin, limit);
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

    pub(super) fn class(&self, key: &QuotaKey) -> &LimitClass<C> {
        let index = self
            .class_of_appid
            .get(key.appid())
            .copied()
            .unwrap_or(self.class_of_api[key.api().index()]);
        &self.classes[index]
    }

    /// Moves every bucket of `old` into the class its key has now. A bucket's state is its
    /// theoretical arrival time (TAT): how far ahead of now it lies is the bucket's debt, in
    /// turns of the old emission interval. The debt is carried in turns (a key that had
    /// spent 19 turns has spent 19 under the new quota too), rescaled to the new interval
    /// and written relative to the new limiter's origin; a bucket with no debt is full and
    /// needs no state. A bucket already in the new class keeps the later of the two states.
    pub(super) fn carry_over(&self, old: &Limits<C>, clock: &C) {
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

/// `span / (per_window − burst + 1)`, rounded up to the nanosecond so that a span never
/// holds one call too many. wxgate's span is the window plus the arrival margin (see
/// [`crate::quota`]).
pub fn emission_interval(span: Duration, limit: QuotaLimit) -> Duration {
    let spaced = u128::from(limit.per_window.saturating_sub(limit.burst)) + 1;
    let nanos = span.as_nanos().div_ceil(spaced).max(1);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}
