//! The minute quota counted across replicas (`[cluster]`): one GCRA per (appid, API) in
//! Redis, and what a replica counts on its own while Redis is away.
//!
//! # Shared
//! Every turn is one run of the GCRA in Redis: its own round trip ([`TakeTurn`]), or, for
//! the first attempt of a code exchange whose key has no call queued on this replica, part
//! of the round trip that claims the code (the code cache asks [`SharedQuota::turn`] for the
//! [`Turn`] that rides on its claim, and settles the reply with
//! [`FirstTurn::after_claim`](super::FirstTurn::after_claim)). The same GCRA, burst and
//! emission interval as the single process (see [`crate::quota`]), kept in one Redis key per
//! (appid, API) and read on Redis's clock, so the single-process bound holds for all
//! replicas together: at most `per_window` calls in any span of `window_secs`, retries
//! included. A 45011 from WeChat pauses the key in Redis until WeChat's next window, so every
//! replica holds it.
//!
//! # Degraded
//! Without Redis, a replica admits at most its *share*, `per_window / live replicas` (the
//! count the heartbeats agreed on, [`Cluster::replicas`]: a Redis back empty does not lower
//! it), in each of WeChat's calendar windows, and nothing in the window
//! it degraded in: the shared count of that window is unknown to it, so it is taken as
//! spent. With Redis down for every replica, each calendar window then holds at most
//! `per_window` calls: the shared ones (before) or the shares (after), never both. Going
//! back, the replicas switch at one window boundary they agree on in Redis (see
//! [`ReplicaMode::Resuming`]).
//!
//! A replica that starts without Redis has counted nobody: its share divides by
//! `cluster.expected_replicas` ([`Cluster::share`]), and in the window it started in, where
//! it cannot know what was taken (by the others before Redis went, or by itself before a
//! restart), it paces that share from its start, one turn every `window / share` and none at
//! once: so it serves from its start, and however often it restarts within a window, its
//! lives together take at most its share of it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::time::Instant;

use super::{until_next_window, ApiPaths, QuotaKey};
use crate::cluster::scripts::{
    limit_record_key, Bucket, LimitRecord, PauseBucket, ReadLearned, ReadTurns, StoreLimit,
    TakeTurn, TurnReply,
};
use crate::cluster::{Cluster, ReplicaMode, Tag};
use crate::config::QuotaLimit;

/// The shared side of a quota gate.
pub struct SharedQuota {
    cluster: Arc<Cluster>,
    /// `quota.arrival_margin_ms`: a call admitted this close to a window's end may reach
    /// WeChat in the next one, so it counts against both.
    margin: Duration,
    /// Calls admitted locally while degraded, per key.
    local: DashMap<QuotaKey, LocalCount>,
    /// The paths of the keys' APIs outside `Api`, which their fingerprints name.
    paths: Arc<ApiPaths>,
    /// This replica's turns per key in its current window (counted in Redis, shown here).
    counted: DashMap<QuotaKey, (Duration, u64, u32)>,
}

/// A key's calls admitted locally in one calendar window, and those of them admitted in its
/// last `margin`, which count against the next window too.
#[derive(Debug, Clone, Copy)]
struct LocalCount {
    /// The window's length (the key's) and index.
    length: Duration,
    window: u64,
    admitted: u32,
    late: u32,
}

impl LocalCount {
    /// The count of `window`: the late calls of the window before it, if that is the one
    /// counted.
    fn roll(&mut self, window: u64) {
        if self.window != window {
            let carried = if self.window + 1 == window {
                self.late
            } else {
                0
            };
            *self = LocalCount {
                window,
                admitted: carried,
                late: 0,
                ..*self
            };
        }
    }
}

/// A quota turn to be taken in Redis along with another script's round trip (a code
/// exchange's claim): the key's bucket.
#[derive(Debug)]
pub struct Turn(Bucket);

impl Turn {
    /// The bucket the turn is taken from.
    pub fn bucket(&self) -> &Bucket {
        &self.0
    }
}

impl SharedQuota {
    /// The shared quota of `cluster`, with calls that may reach WeChat up to `margin` apart,
    /// and the paths its keys may name.
    pub fn new(cluster: Arc<Cluster>, margin: Duration, paths: Arc<ApiPaths>) -> SharedQuota {
        SharedQuota {
            cluster,
            margin,
            local: DashMap::new(),
            paths,
            counted: DashMap::new(),
        }
    }

    /// Whether turns are counted in Redis now (shared mode).
    pub fn counts_in_redis(&self) -> bool {
        self.cluster.counts_in_redis()
    }

    /// Takes a turn of `key` (its limit counting in `window`) if one is there now;
    /// otherwise says how long until the next.
    pub async fn take(
        &self,
        key: &QuotaKey,
        limit: QuotaLimit,
        interval: Duration,
        window: Duration,
    ) -> Result<(), Duration> {
        if self.cluster.counts_in_redis() {
            let bucket = self.bucket(key, limit, interval, window);
            match self.cluster.eval(&TakeTurn(&bucket)).await {
                Some(TurnReply::Taken) => {
                    self.count(key, window);
                    return Ok(());
                }
                Some(TurnReply::NotBefore(wait)) => return Err(wait),
                // Redis failed: the replica is degraded now.
                None => {}
            }
        }
        let taken = self.take_locally(key, limit, window);
        if taken.is_ok() {
            self.count(key, window);
        }
        taken
    }

    /// Counts one of this replica's turns of `key`, in its window of `window`.
    fn count(&self, key: &QuotaKey, window: Duration) {
        let index = window_index(SystemTime::now(), window);
        let mut counted = self.counted.entry(*key).or_insert((window, index, 0));
        if counted.1 != index {
            *counted = (window, index, 0);
        }
        counted.2 += 1;
    }

    /// This replica's turns of `key` in its current window.
    pub fn turns(&self, key: &QuotaKey) -> u32 {
        self.counted.get(key).map_or(0, |counted| {
            let (window, index, turns) = *counted;
            if window_index(SystemTime::now(), window) == index {
                turns
            } else {
                0
            }
        })
    }

    /// The keys with turns in their current window.
    pub fn keys(&self) -> Vec<QuotaKey> {
        let now = SystemTime::now();
        self.counted
            .iter()
            .filter(|entry| window_index(now, entry.value().0) == entry.value().1)
            .map(|entry| *entry.key())
            .collect()
    }

    /// The turn a code exchange's claim takes along (see the module documentation).
    pub fn turn(
        &self,
        key: &QuotaKey,
        limit: QuotaLimit,
        interval: Duration,
        window: Duration,
    ) -> Turn {
        Turn(self.bucket(key, limit, interval, window))
    }

    /// The Redis bucket of `key`: named by a fingerprint that names neither the appid nor
    /// the API, in the appid's slot.
    fn bucket(
        &self,
        key: &QuotaKey,
        limit: QuotaLimit,
        interval: Duration,
        window: Duration,
    ) -> Bucket {
        Bucket {
            tag: self.tag(key),
            fingerprint: self.fingerprint(key),
            interval,
            burst: limit.burst,
            window,
        }
    }

    /// A known API's own calls are named by its label and the appid, as they always were
    /// (replicas of another version still count with them); an API outside `Api` by its
    /// path, and calls on an account's behalf apart.
    pub fn fingerprint(&self, key: &QuotaKey) -> String {
        let appid = key.appid().as_bytes();
        let path = self.paths.path(key.path());
        let api = path.as_deref().unwrap_or(key.api().label()).as_bytes();
        let sealing = self.cluster.sealing();
        if key.is_on_behalf() {
            sealing.fingerprint("quota", &[api, appid, b"on behalf"])
        } else {
            sealing.fingerprint("quota", &[api, appid])
        }
    }

    /// A turn out of this replica's share of the current calendar window of `window`.
    fn take_locally(
        &self,
        key: &QuotaKey,
        limit: QuotaLimit,
        window_length: Duration,
    ) -> Result<(), Duration> {
        let (since, resume_at) = match self.cluster.mode() {
            ReplicaMode::Degraded { since } => (since, None),
            ReplicaMode::Resuming { since, at } => (since, Some(at)),
            // Shared since the check above; the turn is counted locally all the same.
            ReplicaMode::Shared => (Instant::now(), None),
        };
        let share = self.cluster.share(limit.per_window);
        let now = SystemTime::now();
        let window = window_index(now, window_length);
        if let Some(at) = resume_at {
            // The window shared counting resumes in is Redis's alone. `at` runs late by the
            // way back of Redis's answer, so this replica's clock reaches that window first:
            // callers woken at the boundary wait for `at` instead of taking a local turn of
            // a window the others already count in Redis.
            let until = at.saturating_duration_since(Instant::now());
            if window >= nearest_boundary_window(now + until, window_length) {
                return Err(until.max(Duration::from_millis(1)));
            }
        }
        let degraded_in = window_index(now - since.elapsed(), window_length);
        let allowed = if window != degraded_in {
            share
        } else if !self.cluster.has_shared() {
            // Started without Redis: its share, paced from its start (see the module
            // documentation).
            paced(share, since.elapsed(), window_length)
        } else {
            0
        };
        let mut entry = self.local.entry(*key).or_insert(LocalCount {
            length: window_length,
            window,
            admitted: 0,
            late: 0,
        });
        entry.length = window_length;
        entry.roll(window);
        if entry.admitted < allowed {
            entry.admitted += 1;
            if until_next_window(now, window_length) <= self.margin {
                entry.late += 1;
            }
            drop(entry);
            self.cluster.admitted_locally();
            return Ok(());
        }
        let why = match (window == degraded_in, self.cluster.has_shared()) {
            (false, _) => NoLocalTurn::ShareTaken,
            (true, false) => NoLocalTurn::Paced,
            (true, true) => NoLocalTurn::Spent,
        };
        Err(why.wait(share, until_next_window(now, window_length), window_length))
    }

    /// Pauses `key` in Redis until WeChat's next window (of `window`) by Redis's clock (when
    /// counting there), so that every replica holds it.
    pub async fn pause(&self, key: &QuotaKey, window: Duration) {
        if !self.cluster.counts_in_redis() {
            return;
        }
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let pause = PauseBucket {
            tag: &tag,
            fingerprint: &fingerprint,
            window,
        };
        let _ = self.cluster.eval(&pause).await;
    }

    /// Forgets local counts of windows that are over.
    pub fn retain_recent(&self) {
        let now = SystemTime::now();
        // A window's late calls still count against the next one.
        self.local
            .retain(|_, count| count.window + 1 >= window_index(now, count.length));
        self.counted
            .retain(|_, (window, index, _)| *index == window_index(now, *window));
    }
}

/// A limit learned from 45011 as the replicas share it: the figure, when it was learned
/// (wall clock, so that every replica climbs alike), and its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnedRecord {
    /// The figure learned.
    pub base: u32,
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    /// The key's window, in milliseconds.
    pub window_ms: u64,
}

/// The most keys whose learned limits one read asks for.
pub const READ_AT_ONCE: usize = 256;

impl SharedQuota {
    /// The turns every replica took of `key` in its current window (its limit counting in
    /// `window`); `None` when Redis does not answer.
    pub async fn total_turns(&self, key: &QuotaKey, window: Duration) -> Option<u32> {
        if !self.cluster.counts_in_redis() {
            return None;
        }
        let fingerprint = self.fingerprint(key);
        self.cluster
            .eval(&ReadTurns {
                tag: &self.tag(key),
                fingerprint: &fingerprint,
                window,
            })
            .await
    }

    /// Stores the limit this replica learned for `key` (its figure `base`, learned `at`, in
    /// windows of `window`), sealed, kept for the `hold` and a climb from the lowest floor.
    pub async fn publish_learned(
        &self,
        key: &QuotaKey,
        base: u32,
        at: SystemTime,
        window: Duration,
        hold: Duration,
    ) {
        let record = LearnedRecord {
            base,
            at_ms: super::unix_ms(at),
            window_ms: window.as_millis() as u64,
        };
        let keep = hold + window * 64;
        let Ok(plain) = serde_json::to_vec(&record) else {
            return;
        };
        let fingerprint = self.fingerprint(key);
        let tag = self.tag(key);
        let sealed_for = limit_record_key(&self.cluster, LimitRecord::Learned, &tag, &fingerprint);
        let sealed = self.cluster.sealing().seal(&sealed_for, &plain);
        let store = StoreLimit {
            record: LimitRecord::Learned,
            tag: &tag,
            fingerprint: &fingerprint,
            sealed: &sealed,
            keep,
        };
        let _ = self.cluster.eval(&store).await;
    }

    /// The limits the replicas learned for `keys` (at most [`READ_AT_ONCE`]); a record that
    /// does not open is ignored. One operation per appid (its keys share its slot), all at
    /// once.
    pub async fn read_learned(&self, keys: &[QuotaKey]) -> Vec<(QuotaKey, LearnedRecord)> {
        if !self.cluster.counts_in_redis() || keys.is_empty() {
            return Vec::new();
        }
        let keys = &keys[..keys.len().min(READ_AT_ONCE)];
        let mut by_appid: Vec<(Tag, Vec<QuotaKey>, Vec<String>)> = Vec::new();
        for key in keys {
            let tag = self.tag(key);
            let fingerprint = self.fingerprint(key);
            match by_appid.iter_mut().find(|(of, _, _)| *of == tag) {
                Some((_, keys, fingerprints)) => {
                    keys.push(*key);
                    fingerprints.push(fingerprint);
                }
                None => by_appid.push((tag, vec![*key], vec![fingerprint])),
            }
        }
        let reads = by_appid.iter().map(|(tag, keys, fingerprints)| async move {
            let records = self
                .cluster
                .eval(&ReadLearned { tag, fingerprints })
                .await
                .unwrap_or_default();
            let sealing = self.cluster.sealing();
            keys.iter()
                .zip(fingerprints)
                .zip(records)
                .filter_map(|((key, fingerprint), sealed)| {
                    let sealed_for =
                        limit_record_key(&self.cluster, LimitRecord::Learned, tag, fingerprint);
                    let plain = sealing.open(&sealed_for, &sealed?).ok()?;
                    Some((*key, serde_json::from_slice(&plain).ok()?))
                })
                .collect::<Vec<_>>()
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The slot of `key`'s Redis keys: its appid's tag.
    pub fn tag(&self, key: &QuotaKey) -> Tag {
        self.cluster.appid_tag(key.appid().as_bytes())
    }
}

/// How often a call waiting out the window its replica degraded in looks again: a replica
/// that admitted nothing on its own counts in Redis again at its next good heartbeat (a blip),
/// which ends the wait before the window does. As often as a degraded replica probes Redis.
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// Why a replica counting on its own has no turn for a call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoLocalTurn {
    /// Started without Redis, in its first window: the share comes with a pace.
    Paced,
    /// The window it degraded in: taken as spent.
    Spent,
    /// Its share of this window is taken.
    ShareTaken,
}

impl NoLocalTurn {
    /// How long the call waits before asking again, `until_next` being the time to the
    /// next window, which brings a new share. Never the pace of a share the window does not
    /// give: the head of a lane waking at a large figure's pace (microseconds) through a
    /// spent window would spin until it ends.
    fn wait(self, share: u32, until_next: Duration, window: Duration) -> Duration {
        match self {
            NoLocalTurn::Paced => until_next.min(window / share.max(1)),
            NoLocalTurn::Spent => until_next.min(LOOK_AGAIN),
            NoLocalTurn::ShareTaken => until_next,
        }
    }
}

/// The turns of `share` a replica may have taken `elapsed` after it started without Redis,
/// paced over `window`: one every `window / share`, none at once. However often a replica
/// restarts within a window, its lives together take at most its share of it.
fn paced(share: u32, elapsed: Duration, window: Duration) -> u32 {
    let paced = elapsed.as_nanos() * u128::from(share) / window.as_nanos().max(1);
    paced.min(u128::from(share)) as u32
}

/// The window that starts at the window boundary nearest to `at`.
fn nearest_boundary_window(at: SystemTime, window: Duration) -> u64 {
    window_index(at + window / 2, window)
}

/// The calendar window `at` falls in (windows aligned to the epoch, as WeChat's minutes).
fn window_index(at: SystemTime, window: Duration) -> u64 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since_epoch.as_nanos() / window.as_nanos().max(1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_paced_over_the_window_starts_with_nothing_and_ends_with_the_share() {
        let window = Duration::from_secs(60);
        let at = |secs| paced(6, Duration::from_secs(secs), window);
        assert_eq!(at(0), 0, "none at once");
        assert_eq!(at(9), 0);
        assert_eq!(at(10), 1, "one every window / share");
        assert_eq!(at(59), 5);
        assert_eq!(at(600), 6, "never more than the share");
        // Lives of 25 s and 35 s in one window: five turns together, within the share.
        assert!(at(25) + at(35) <= 6);
        assert_eq!(paced(0, Duration::from_secs(30), window), 0);
    }

    #[test]
    fn the_resumption_window_is_the_one_at_the_nearest_boundary() {
        let window = Duration::from_secs(2);
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        // A resumption agreed for the boundary at 10 s, learned a little late or early.
        assert_eq!(nearest_boundary_window(at(10_000), window), 5);
        assert_eq!(nearest_boundary_window(at(10_006), window), 5);
        assert_eq!(nearest_boundary_window(at(10_999), window), 5);
        assert_eq!(nearest_boundary_window(at(9_001), window), 5);
        assert_eq!(
            window_index(at(9_999), window),
            4,
            "the window before it is local"
        );
    }

    #[test]
    fn a_spent_window_is_waited_out_looking_again_not_at_the_pace_of_its_share() {
        let minute = Duration::from_secs(60);
        let until_next = Duration::from_secs(40);
        // WeChat's "no limit" over three replicas: a pace of 1.8 µs.
        let share = 100_000_000 / 3;
        let spent = NoLocalTurn::Spent;
        assert_eq!(spent.wait(share, until_next, minute), LOOK_AGAIN);
        let soon = Duration::from_millis(30);
        assert_eq!(
            spent.wait(share, soon, minute),
            soon,
            "the next window first"
        );
        let paced = NoLocalTurn::Paced;
        assert_eq!(paced.wait(6, until_next, minute), Duration::from_secs(10));
        assert_eq!(paced.wait(6, soon, minute), soon);
        assert_eq!(
            NoLocalTurn::ShareTaken.wait(share, until_next, minute),
            until_next
        );
    }
}
