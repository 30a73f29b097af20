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

use super::{until_next_window, QuotaKey};
use crate::cluster::scripts::{Bucket, PauseBucket, TakeTurn, TurnReply};
use crate::cluster::{Cluster, ReplicaMode};
use crate::config::QuotaLimit;

/// The shared side of a quota gate.
pub struct SharedQuota {
    cluster: Arc<Cluster>,
    window: Duration,
    /// Calls admitted locally while degraded: (calendar window index, count) per key.
    local: DashMap<QuotaKey, (u64, u32)>,
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
    /// The shared quota of `cluster`, with windows of `window`.
    pub fn new(cluster: Arc<Cluster>, window: Duration) -> SharedQuota {
        SharedQuota {
            cluster,
            window,
            local: DashMap::new(),
        }
    }

    /// Whether turns are counted in Redis now (shared mode).
    pub fn counts_in_redis(&self) -> bool {
        self.cluster.counts_in_redis()
    }

    /// Takes a turn of `key` if one is there now; otherwise says how long until the next.
    pub async fn take(
        &self,
        key: &QuotaKey,
        limit: QuotaLimit,
        interval: Duration,
    ) -> Result<(), Duration> {
        if self.cluster.counts_in_redis() {
            let bucket = self.bucket(key, limit, interval);
            match self.cluster.eval(&TakeTurn(&bucket)).await {
                Some(TurnReply::Taken) => return Ok(()),
                Some(TurnReply::NotBefore(wait)) => return Err(wait),
                // Redis failed: the replica is degraded now.
                None => {}
            }
        }
        self.take_locally(key, limit)
    }

    /// The turn a code exchange's claim takes along (see the module documentation).
    pub fn turn(&self, key: &QuotaKey, limit: QuotaLimit, interval: Duration) -> Turn {
        Turn(self.bucket(key, limit, interval))
    }

    /// The Redis bucket of `key`: named by a fingerprint that names neither the appid nor
    /// the API, in the appid's slot.
    fn bucket(&self, key: &QuotaKey, limit: QuotaLimit, interval: Duration) -> Bucket {
        Bucket {
            tag: self.cluster.appid_tag(key.appid().as_bytes()),
            fingerprint: self.fingerprint(key),
            interval,
            burst: limit.burst,
            window: self.window,
        }
    }

    fn fingerprint(&self, key: &QuotaKey) -> String {
        self.cluster.sealing().fingerprint(
            "quota",
            &[key.api().label().as_bytes(), key.appid().as_bytes()],
        )
    }

    /// A turn out of this replica's share of the current calendar window.
    fn take_locally(&self, key: &QuotaKey, limit: QuotaLimit) -> Result<(), Duration> {
        let since = match self.cluster.mode() {
            ReplicaMode::Degraded { since } | ReplicaMode::Resuming { since, .. } => since,
            // Shared since the check above; the turn is counted locally all the same.
            ReplicaMode::Shared => Instant::now(),
        };
        let share = self.cluster.share(limit.per_window);
        let now = SystemTime::now();
        let window = window_index(now, self.window);
        let degraded_in = window_index(now - since.elapsed(), self.window);
        let allowed = if window != degraded_in {
            share
        } else if !self.cluster.has_shared() {
            // Started without Redis: its share, paced from its start (see the module
            // documentation).
            paced(share, since.elapsed(), self.window)
        } else {
            0
        };
        let mut entry = self.local.entry(*key).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        if entry.1 < allowed {
            entry.1 += 1;
            drop(entry);
            self.cluster.admitted_locally();
            return Ok(());
        }
        let next_window = until_next_window(now, self.window);
        if allowed < share {
            // Paced: the next turn comes with the pace, if this window has one left.
            return Err(next_window.min(self.window / share.max(1)));
        }
        Err(next_window)
    }

    /// Pauses `key` in Redis until WeChat's next window by Redis's clock (when counting
    /// there), so that every replica holds it.
    pub async fn pause(&self, key: &QuotaKey) {
        if !self.cluster.counts_in_redis() {
            return;
        }
        let fingerprint = self.fingerprint(key);
        let tag = self.cluster.appid_tag(key.appid().as_bytes());
        let pause = PauseBucket {
            tag: &tag,
            fingerprint: &fingerprint,
            window: self.window,
        };
        let _ = self.cluster.eval(&pause).await;
    }

    /// Forgets local counts of windows that are over.
    pub fn retain_recent(&self) {
        let window = window_index(SystemTime::now(), self.window);
        self.local.retain(|_, (index, _)| *index == window);
    }
}

/// The turns of `share` a replica may have taken `elapsed` after it started without Redis,
/// paced over `window`: one every `window / share`, none at once. However often a replica
/// restarts within a window, its lives together take at most its share of it.
fn paced(share: u32, elapsed: Duration, window: Duration) -> u32 {
    let paced = elapsed.as_nanos() * u128::from(share) / window.as_nanos().max(1);
    paced.min(u128::from(share)) as u32
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
}
