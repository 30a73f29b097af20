//! What the stand-in remembers about the calls it received: the [`CallRecord`] log, the
//! counters (by path, by code, by errcode, by fault; connections and TLS handshakes) that tests read
//! through [`StandIn`](crate::StandIn), and what is read from the log: the calls per aligned
//! window ([`WindowCalls`]) and the most calls within any sliding span.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use crate::limits::DailyUse;
use crate::upstream::window_index;
use crate::{ApiLimits, RateLimit};

/// One call received by the stand-in, kept when [`StandInConfig::record_calls`](crate::StandInConfig::record_calls) is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// When the call arrived: when the stand-in read its request head (its quota window and
    /// day are taken from this time).
    pub at: SystemTime,
    /// The request path, without the query.
    pub path: String,
    /// The `appid` the call named (query, or JSON body), else the `component_appid` of a
    /// platform's own call, else the appid the stand-in minted the call's `access_token` (or
    /// `component_access_token`) for, if any.
    pub appid: Option<String>,
    /// The errcode answered (0 for a success body); `None` when no WeChat JSON answer was
    /// given: echoes, 502, resets, hangs, lost answers.
    pub errcode: Option<i64>,
}

/// The calls one (appid, path) made in one aligned quota window: what a proxy's quota gate let
/// through in that window, as WeChat would count it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowCalls {
    /// Start of the window, in milliseconds since the UNIX epoch (windows are aligned to
    /// multiples of their length since the epoch).
    pub start_unix_ms: u64,
    /// The `appid` the calls named, if any.
    pub appid: Option<String>,
    /// The request path, without the query.
    pub path: String,
    /// Calls received, whatever their answer: faults and 45011 included.
    pub calls: u64,
    /// Of those, the ones answered 45011 (the stand-in's quota, or an injected fault).
    pub answered_45011: u64,
}

/// Groups `log` by aligned window of length `window`, then appid, then path; in window
/// order.
pub(crate) fn calls_per_window(log: &[CallRecord], window: Duration) -> Vec<WindowCalls> {
    let window_nanos = window.as_nanos().max(1);
    let mut grouped: BTreeMap<(u128, Option<&str>, &str), (u64, u64)> = BTreeMap::new();
    for record in log {
        let key = (
            window_index(record.at, window),
            record.appid.as_deref(),
            record.path.as_str(),
        );
        let (calls, refused) = grouped.entry(key).or_default();
        *calls += 1;
        *refused += u64::from(record.errcode == Some(45011));
    }
    grouped
        .into_iter()
        .map(
            |((index, appid, path), (calls, answered_45011))| WindowCalls {
                start_unix_ms: u64::try_from(index * window_nanos / 1_000_000).unwrap_or(u64::MAX),
                appid: appid.map(str::to_owned),
                path: path.to_owned(),
                calls,
                answered_45011,
            },
        )
        .collect()
}

/// The most calls of (`appid`, `path`) in `log` whose arrival times lie within `span` of each
/// other (see [`StandIn::max_calls_in_any_span`](crate::StandIn::max_calls_in_any_span)).
pub(crate) fn max_calls_in_any_span(
    log: &[CallRecord],
    path: &str,
    appid: &str,
    span: Duration,
) -> usize {
    let mut arrivals: Vec<SystemTime> = log
        .iter()
        .filter(|record| record.path == path && record.appid.as_deref() == Some(appid))
        .map(|record| record.at)
        .collect();
    // The log is in the order calls were answered, nearly but not exactly that of arrival.
    arrivals.sort_unstable();
    let mut most = 0;
    let mut first = 0;
    for (last, at) in arrivals.iter().enumerate() {
        while at.duration_since(arrivals[first]).unwrap_or_default() >= span {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    most
}

/// What `GET /__stand_in/stats` answers (see the crate documentation).
#[derive(Serialize)]
pub(crate) struct Stats {
    /// The stand-in's clock when it answered: the window holding it is still going on.
    pub(crate) now_unix_ms: u64,
    /// The quota window's length.
    pub(crate) window_ms: u64,
    /// The default rate limit per (appid, API) and window; `None`: unlimited.
    pub(crate) quota_per_window: Option<u64>,
    /// The limits configured per API (and appid).
    pub(crate) api_limits: Vec<ApiLimits>,
    /// The per-user limit of the code exchanges.
    pub(crate) user_rate_limit: Option<RateLimit>,
    pub(crate) day_ms: u64,
    pub(crate) day_offset_ms: u64,
    /// Calls executed today per (appid, API), where counted.
    pub(crate) daily_used: Vec<DailyUse>,
    /// Every call received (the stats requests themselves are not calls).
    pub(crate) total_calls: u64,
    /// Answers given, by errcode (0: success bodies).
    pub(crate) answers: BTreeMap<i64, u64>,
    /// Faults injected (queued or drawn), by name.
    pub(crate) faults: BTreeMap<&'static str, u64>,
    /// Whether the call log is kept; without it `windows` is empty.
    pub(crate) record_calls: bool,
    pub(crate) windows: Vec<WindowCalls>,
}

/// Milliseconds since the UNIX epoch of `at`.
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// What the stand-in counts about every call. Sharded maps and atomics, so counting does not
/// serialize concurrent calls.
#[derive(Default)]
pub(crate) struct Counters {
    /// Connections accepted.
    pub(crate) connections: AtomicU64,
    /// TLS handshakes completed.
    pub(crate) tls_connections: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) by_path: DashMap<String, AtomicU64>,
    pub(crate) by_code: DashMap<String, AtomicU64>,
    pub(crate) by_errcode: DashMap<i64, AtomicU64>,
    /// Successful token fetches, by `"{path} {appid}"`.
    pub(crate) token_fetches: DashMap<String, AtomicU64>,
    /// quota/get calls with a working token and a `cgi_path`, by `"{cgi_path} {appid}"`.
    pub(crate) quota_queries: DashMap<String, AtomicU64>,
    /// Faults injected, by [`Fault::name`](crate::Fault::name).
    pub(crate) by_fault: DashMap<&'static str, AtomicU64>,
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

/// Every counter of `map`, in key order.
pub(crate) fn read_all<K>(map: &DashMap<K, AtomicU64>) -> BTreeMap<K, u64>
where
    K: Copy + Ord + Hash,
{
    map.iter()
        .map(|entry| (*entry.key(), entry.value().load(Ordering::Relaxed)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(millis: u64, appid: &str) -> CallRecord {
        CallRecord {
            at: UNIX_EPOCH + Duration::from_millis(millis),
            path: "/p".to_owned(),
            appid: Some(appid.to_owned()),
            errcode: None,
        }
    }

    #[test]
    fn spans_slide_over_arrivals_in_any_order() {
        // Logged in answer order, not quite arrival order.
        let log = [
            record(1_000, "a"),
            record(1_900, "a"),
            record(1_600, "a"),
            record(1_650, "b"),
            record(2_100, "a"),
            record(2_500, "a"),
        ];
        let max = |span_ms| max_calls_in_any_span(&log, "/p", "a", Duration::from_millis(span_ms));
        assert_eq!(max(1_000), 4, "1.6, 1.9, 2.1, 2.5 are within a second");
        // Half-open: 1.6 and 2.5 are not within 0.9 s of each other.
        assert_eq!(max(900), 3);
        assert_eq!(max(1), 1);
        assert_eq!(
            max_calls_in_any_span(&log, "/q", "a", Duration::from_secs(9)),
            0
        );
        assert_eq!(
            max_calls_in_any_span(&[], "/p", "a", Duration::from_secs(9)),
            0
        );
    }
}
