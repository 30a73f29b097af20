//! What the stand-in remembers about the calls it received: the [`CallRecord`] log and the
//! counters (by path, by code, by errcode) that tests read through [`StandIn`](crate::StandIn).

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;

/// One call received by the stand-in, kept when [`StandInConfig::record_calls`](crate::StandInConfig::record_calls) is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// When the call arrived (its quota window is taken from this time).
    pub at: SystemTime,
    /// The request path, without the query.
    pub path: String,
    /// The `appid` the call named (query, or JSON body for `stable_token`), if any.
    pub appid: Option<String>,
    /// The errcode answered (0 for a success body); `None` when no WeChat JSON answer was
    /// given: echoes, 502, resets, hangs, lost answers.
    pub errcode: Option<i64>,
}

/// What the stand-in counts about every call. Sharded maps and atomics, so counting does not
/// serialize concurrent calls.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) total: AtomicU64,
    pub(crate) by_path: DashMap<String, AtomicU64>,
    pub(crate) by_code: DashMap<String, AtomicU64>,
    pub(crate) by_errcode: DashMap<i64, AtomicU64>,
    /// Successful token fetches, by `"{path} {appid}"`.
    pub(crate) token_fetches: DashMap<String, AtomicU64>,
}

/// Adds one to `map[key]`, inserting the key on its first count.
pub(crate) fn bump<K, Q>(map: &DashMap<K, AtomicU64>, key: &Q)
where
    K: Borrow<Q> + Eq + Hash,
    Q: ToOwned<Owned = K> + Eq + Hash + ?Sized,
{
    // The key is usually there already: a shared lock on one shard and no allocation.
    if let Some(counter) = map.get(key) {
        counter.fetch_add(1, Ordering::Relaxed);
        return;
    }
    map.entry(key.to_owned())
        .or_default()
        .fetch_add(1, Ordering::Relaxed);
}

/// `map[key]`, 0 for a key never counted.
pub(crate) fn read_counter<K, Q>(map: &DashMap<K, AtomicU64>, key: &Q) -> u64
where
    K: Borrow<Q> + Eq + Hash,
    Q: Eq + Hash + ?Sized,
{
    map.get(key)
        .map_or(0, |counter| counter.load(Ordering::Relaxed))
}
