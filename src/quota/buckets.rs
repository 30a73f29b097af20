//! The bucket states of one limit class, as governor's keyed limiter keeps them, and with
//! each the turns taken in the current calendar window of the class: what a window of a key
//! held when WeChat answered 45011 (the evidence a learned limit rests on), and the `calls`
//! of `GET /quota`. Counting rides on the lookup the limiter makes anyway: no second map.
//!
//! A bucket that is full again is dropped (every second, governor's `retain_recent`); if it
//! took turns in the current window, its count is kept aside until the window ends, so that
//! `GET /quota` still shows the key's calls (at most [`MAX_RECENT`] keys per class).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use parking_lot::Mutex;

use super::QuotaKey;

/// The most keys per class whose dropped buckets' counts are kept for the window.
const MAX_RECENT: usize = 10_000;

/// The bucket states of one class, shared between its limiter and the gate (which reads,
/// moves and counts them).
#[derive(Clone)]
pub(super) struct Buckets {
    map: Arc<DashMap<QuotaKey, Bucket>>,
    /// The class's window: turns are counted per calendar window of this length.
    window: Duration,
    /// Keys whose full bucket was dropped, with their turns of the window then current.
    recent: Arc<Mutex<HashMap<QuotaKey, (u64, u32)>>>,
}

/// One key's GCRA state (its theoretical arrival time) and its turns this window.
#[derive(Default)]
pub(super) struct Bucket {
    state: InMemoryState,
    turns: WindowTurns,
}

/// Turns taken in one calendar window, packed in one atomic: the window's index (high 40
/// bits, enough for 1 s windows until the year 36,000) and the count (low 24 bits,
/// saturating).
#[derive(Default)]
pub(super) struct WindowTurns(AtomicU64);

const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl WindowTurns {
    /// Counts one turn in `window`.
    pub(super) fn count(&self, window: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
                Some(if packed >> COUNT_BITS == window {
                    packed + u64::from(packed & COUNT_MASK < COUNT_MASK)
                } else {
                    (window << COUNT_BITS) | 1
                })
            });
    }

    /// Turns taken in `window`.
    pub(super) fn in_window(&self, window: u64) -> u32 {
        let packed = self.0.load(Ordering::Relaxed);
        if packed >> COUNT_BITS == window {
            (packed & COUNT_MASK) as u32
        } else {
            0
        }
    }

    /// Adds `turns` to `window`'s count (a key moved to another class keeps its count).
    fn add(&self, window: u64, turns: u32) {
        for _ in 0..turns.min(COUNT_MASK as u32) {
            self.count(window);
        }
    }
}

impl Buckets {
    /// No buckets yet, for a class with windows of `window`.
    pub(super) fn new(window: Duration) -> Buckets {
        Buckets {
            map: Arc::default(),
            window,
            recent: Arc::default(),
        }
    }

    /// The calendar window `at` falls in (windows aligned to the epoch, as WeChat's).
    pub(super) fn window_at(&self, at: SystemTime) -> u64 {
        window_index(at, self.window)
    }

    /// Turns `key` took in the calendar window `at` falls in.
    pub(super) fn turns(&self, key: &QuotaKey, at: SystemTime) -> u32 {
        let window = self.window_at(at);
        if let Some(bucket) = self.map.get(key) {
            return bucket.turns.in_window(window);
        }
        match self.recent.lock().get(key) {
            Some((counted, turns)) if *counted == window => *turns,
            _ => 0,
        }
    }

    /// Every key with a bucket, or with turns in the window `at` falls in.
    pub(super) fn keys(&self, at: SystemTime) -> Vec<QuotaKey> {
        let window = self.window_at(at);
        let mut keys: Vec<QuotaKey> = self.map.iter().map(|entry| *entry.key()).collect();
        let recent = self.recent.lock();
        keys.extend(
            recent
                .iter()
                .filter(|(key, (counted, _))| *counted == window && !self.map.contains_key(*key))
                .map(|(key, _)| *key),
        );
        keys
    }

    /// Every key with a bucket, and its state (its TAT, relative to the limiter's start).
    pub(super) fn states(&self) -> Vec<(QuotaKey, Nanos)> {
        self.map
            .iter()
            .filter_map(|entry| Some((*entry.key(), read_state(&entry.value().state)?)))
            .collect()
    }

    /// Sets `key`'s state to the later of `state` and its own, and adds `turns` to the
    /// window `at` falls in.
    pub(super) fn merge(&self, key: &QuotaKey, state: Option<Nanos>, turns: u32, at: SystemTime) {
        let bucket = self.map.entry(*key).or_default();
        if let Some(state) = state {
            let _ = bucket
                .state
                .measure_and_replace(&NotKeyed::NonKey, |current| {
                    Ok::<_, ()>(((), current.map_or(state, |current| current.max(state))))
                });
        }
        bucket.turns.add(self.window_at(at), turns);
    }

    /// `key`'s state, and its turns of the window `at` falls in, moved out. The state
    /// stays: a call that looked its class up before the key moved still finds it, never a
    /// fresh bucket.
    pub(super) fn take(&self, key: &QuotaKey, at: SystemTime) -> Option<(Option<Nanos>, u32)> {
        let bucket = self.map.get(key)?;
        let packed = bucket.turns.0.swap(0, Ordering::Relaxed);
        let turns = WindowTurns(AtomicU64::new(packed)).in_window(self.window_at(at));
        Some((read_state(&bucket.state), turns))
    }
}

/// The TAT of a state (`None`: never used).
fn read_state(state: &InMemoryState) -> Option<Nanos> {
    match state.measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>) {
        Err(state) => state,
        Ok(()) => None,
    }
}

/// The calendar window `at` falls in, for windows of `window`.
pub(super) fn window_index(at: SystemTime, window: Duration) -> u64 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let nanos = u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX);
    nanos / u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl StateStore for Buckets {
    type Key = QuotaKey;

    fn measure_and_replace<T, F, E>(&self, key: &QuotaKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let bucket = match self.map.get(key) {
            Some(bucket) => bucket,
            None => self.map.entry(*key).or_default().downgrade(),
        };
        let result = bucket.state.measure_and_replace(&NotKeyed::NonKey, f);
        if result.is_ok() {
            // A turn was taken: one clock read and one atomic add on the entry in hand.
            bucket.turns.count(self.window_at(SystemTime::now()));
        }
        result
    }
}

impl ShrinkableKeyedStateStore<QuotaKey> for Buckets {
    fn retain_recent(&self, drop_below: Nanos) {
        let window = self.window_at(SystemTime::now());
        let mut recent = self.recent.lock();
        recent.retain(|_, (counted, _)| *counted == window);
        self.map.retain(|key, bucket| {
            let keep = read_state(&bucket.state).is_some_and(|tat| tat > drop_below);
            let turns = bucket.turns.in_window(window);
            if !keep && turns > 0 && recent.len() < MAX_RECENT {
                recent.insert(*key, (window, turns));
            }
            keep
        });
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_counted_per_window_and_saturate() {
        let turns = WindowTurns::default();
        turns.count(7);
        turns.count(7);
        assert_eq!(turns.in_window(7), 2);
        assert_eq!(turns.in_window(8), 0);
        turns.count(8);
        assert_eq!(turns.in_window(8), 1);
        assert_eq!(turns.in_window(7), 0, "a new window starts from one");
        turns
            .0
            .store((9 << COUNT_BITS) | COUNT_MASK, Ordering::Relaxed);
        turns.count(9);
        assert_eq!(turns.in_window(9), COUNT_MASK as u32);
    }
}
