//! The replica's mode ([`ReplicaMode`]: shared, degraded, resuming) and how it moves between
//! them: the heartbeat (and, while degraded, the probe) that learns the epoch and the live
//! replicas, a failure or a lost epoch that degrades, and the resumption agreed in Redis at
//! a window boundary (see the module documentation of [`crate::cluster`]).
//!
//! # Heartbeats
//! A heartbeat is `{replica id}.{time}.{MAC}`: the time is Redis's clock in seconds (as the
//! replica last learned it, moved on by its own monotonic clock since), the MAC is over both
//! under the cluster secret. A replica counts the distinct replicas whose heartbeats carry a
//! right MAC and a time no older than [`HEARTBEAT_FRESH`], itself always: a member written
//! without the secret is not counted (and is reported as forged), and one copied from a
//! replica that stopped counts for a few seconds at most.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use super::cause::try_connection;
use super::scripts::{Heartbeat, Resume};
use super::{owner_id, Cluster, KeyKind, RedisErrorKind, RedisOp};

/// How often a replica says it is alive, and learns how many replicas are.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How often a degraded replica tries Redis again.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// A heartbeat older than this no longer counts its replica as live.
const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

/// A heartbeat dated further back than this (by Redis's clock) no longer counts, whatever
/// its score in the set says: twice [`HEARTBEAT_TTL`], so that a live replica's last
/// heartbeat, dated from the one before, always counts.
const HEARTBEAT_FRESH: Duration = Duration::from_secs(10);

/// The most heartbeats read back: beyond, the set holds members no replica wrote, and the
/// count keeps what it knew (it never drops because of them).
const MOST_HEARTBEATS: usize = 1024;

/// Degraded replicas go back to shared counting at a window boundary at least this far
/// away, so that every replica (probing every [`PROBE_INTERVAL`]) has seen Redis by then.
const RESUME_MARGIN: Duration = Duration::from_secs(2);

/// Where a replica counts its quota turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaMode {
    /// In Redis, with the other replicas.
    Shared,
    /// On its own, with its share of the quota, since `since`.
    Degraded {
        /// When the replica degraded: the quota window it degraded in counts as spent.
        since: Instant,
    },
    /// Redis answers again; shared counting starts at `at`, a window boundary.
    Resuming {
        /// When the replica degraded.
        since: Instant,
        /// When it counts in Redis again.
        at: Instant,
    },
}

impl Cluster {
    /// The replica's mode now.
    pub fn mode(&self) -> ReplicaMode {
        *self.mode.borrow()
    }

    /// Whether quota turns are counted in Redis now. A resuming replica turns shared here,
    /// once its resumption time has come.
    pub fn counts_in_redis(&self) -> bool {
        match self.mode() {
            ReplicaMode::Shared => true,
            ReplicaMode::Degraded { .. } => false,
            ReplicaMode::Resuming { at, .. } => {
                if Instant::now() < at {
                    return false;
                }
                self.set_mode(ReplicaMode::Shared);
                true
            }
        }
    }

    /// Live replicas, as the heartbeats agreed (at least 1). It drops only after a lower
    /// count held for a while in shared counting (see `agree_on`), never on a restart of
    /// Redis, an epoch change or an outage.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// A degraded replica's share of `per_window`: divided by the live replicas the
    /// heartbeats agreed on, and by at least `cluster.expected_replicas` (all a replica that
    /// started without Redis, and so counted nobody, has to go by).
    pub fn share(&self, per_window: u32) -> u32 {
        let replicas = self.replicas.load(Ordering::Relaxed);
        per_window / replicas.max(self.expected_replicas).max(1)
    }

    /// Whether this replica has counted in Redis since it started. One that has not (it
    /// started without Redis) knows nothing any replica took in its first window, not even
    /// what it took itself before a restart: there it paces its share over the window.
    pub fn has_shared(&self) -> bool {
        self.has_shared.load(Ordering::Acquire)
    }

    /// Notes a call admitted out of this replica's own share while degraded: going back to
    /// shared counting must then wait for a window boundary agreed with the others.
    pub fn admitted_locally(&self) {
        self.resume_at_boundary.store(true, Ordering::Release);
    }

    /// Starts routing pub/sub messages, then the first heartbeat: shared if Redis answers,
    /// degraded otherwise.
    pub async fn start(&self) {
        tracing::info!(redis = %self.target.describe(), "sharing with the other replicas through Redis");
        if let Some(pushes) = self.pushes.lock().take() {
            let notices = self.notices.clone();
            tokio::spawn(async move { notices.route(pushes).await });
        }
        self.heartbeat().await;
        if let ReplicaMode::Degraded { .. } = self.mode() {
            let cause = self.diagnose().await;
            tracing::warn!(
                cause,
                expected_replicas = self.expected_replicas,
                "Redis unavailable at start: limiting locally with this replica's share of each quota (per_window / expected_replicas, paced over the first window) until it answers"
            );
        }
    }

    /// Why Redis cannot be used, learned on a connection of its own (the replica's own
    /// connection retries by itself and often says only "timeout"); marks the current
    /// degradation as looked into.
    async fn diagnose(&self) -> &'static str {
        self.diagnosed.store(true, Ordering::Release);
        match try_connection(&self.target, self.connect_timeout).await {
            Ok(_) => "Redis answers a connection of its own now: the replica's will follow",
            Err(cause) => cause.describe(),
        }
    }

    /// Whether Redis answered the last time it was asked (a resuming replica's quota still
    /// counts locally, but it can share code exchanges and tokens).
    pub fn reachable(&self) -> bool {
        !matches!(self.mode(), ReplicaMode::Degraded { .. })
    }

    /// Runs the heartbeat (and, while degraded, the probe) until `stop` turns true, then
    /// takes this replica out of the live set.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.heartbeat().await;
            if matches!(self.mode(), ReplicaMode::Degraded { .. })
                && !self.diagnosed.load(Ordering::Acquire)
            {
                let cause = self.diagnose().await;
                tracing::warn!(cause, "Redis still unavailable");
            }
            let pause = match self.mode() {
                ReplicaMode::Shared => HEARTBEAT_INTERVAL,
                // Wake at the resumption, so the mode (and its metric) turns shared on time
                // even with no request to notice it.
                ReplicaMode::Resuming { at, .. } => {
                    HEARTBEAT_INTERVAL.min(at.saturating_duration_since(Instant::now()))
                }
                ReplicaMode::Degraded { .. } => PROBE_INTERVAL,
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        let key = self.replicas_key(KeyKind::Replicas);
        let mut leave = redis::cmd("ZREM");
        leave.arg(&key).arg(self.last_heartbeat.lock().clone());
        let _ = tokio::time::timeout(self.timeout, self.redis.exec(&leave)).await;
    }

    /// One heartbeat: counts this replica live, learns the epoch and the live count, and
    /// moves between modes.
    async fn heartbeat(&self) {
        if self.redis.refresh().await {
            // Another primary (Sentinel): what this replica waits on is subscribed there.
            self.notices.resubscribe(self).await;
        }
        let fresh_epoch = owner_id();
        let member = self.heartbeat_member();
        let previous = std::mem::replace(&mut *self.last_heartbeat.lock(), member.clone());
        let heartbeat = Heartbeat {
            member: &member,
            previous: &previous,
            ttl: HEARTBEAT_TTL,
            fresh_epoch: &fresh_epoch,
            secret_check: &self.secret_check,
            most: MOST_HEARTBEATS,
        };
        let Some(reply) = self.eval(&heartbeat).await else {
            return;
        };
        let Some(members) = reply.members else {
            // Another cluster secret: sharing would mix counts this replica cannot read.
            self.metrics
                .error(RedisOp::Heartbeat, RedisErrorKind::Secret);
            self.degrade(
                RedisOp::Heartbeat,
                "the live replicas use another cluster secret: not sharing with them",
            );
            return;
        };
        *self.redis_clock.lock() = Some((reply.now_ms, Instant::now()));
        let mut counted = self.count_live(&members, reply.now_ms);
        if reply.held > members.len() as u64 {
            // Members were left out: the ones read do not tell how many replicas live.
            counted = counted.max(self.replicas());
        }
        let epoch = reply.epoch;
        let known = std::mem::replace(&mut *self.epoch.lock(), epoch.clone());
        let settled = known == epoch && self.mode() == ReplicaMode::Shared;
        self.agree_on(counted, settled);
        if !known.is_empty() && known != epoch {
            self.lost_data(RedisOp::Heartbeat);
        }
        match self.mode() {
            ReplicaMode::Shared => {}
            ReplicaMode::Resuming { .. } => {
                self.counts_in_redis();
            }
            ReplicaMode::Degraded { .. } if !self.resume_at_boundary.load(Ordering::Acquire) => {
                self.set_mode(ReplicaMode::Shared);
            }
            ReplicaMode::Degraded { since } => self.resume(since).await,
        }
    }

    /// Takes in the live replicas a heartbeat `counted`: the count shares divide by rises at
    /// once, and drops only to a lower count that held for [`HEARTBEAT_TTL`] of heartbeats
    /// while `settled` (shared counting, the epoch unchanged). A Redis that restarted empty,
    /// a flushed or deleted heartbeat set, or an outage shows fewer replicas than live for
    /// a while (each is counted again at its next heartbeat): the share a degraded replica
    /// takes must not grow because of it.
    fn agree_on(&self, counted: u32, settled: bool) {
        let mut lower = self.lower_count.lock();
        let agreed = self.replicas.load(Ordering::Relaxed);
        let (replicas, still_lower) =
            agreed_count(agreed, *lower, counted, settled, Instant::now());
        *lower = still_lower;
        self.replicas.store(replicas, Ordering::Relaxed);
        drop(lower);
        self.metrics.replicas.set(i64::from(replicas));
    }

    /// This replica's heartbeat now: its id, Redis's clock in seconds (as last learned,
    /// moved on since; the local clock before Redis ever answered) and their MAC.
    fn heartbeat_member(&self) -> String {
        let now_ms = match *self.redis_clock.lock() {
            Some((then_ms, at)) => then_ms + at.elapsed().as_millis() as u64,
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        };
        let seconds = (now_ms / 1000).to_string();
        let mac = self
            .sealing
            .mac("heartbeat", &[self.replica.as_bytes(), seconds.as_bytes()]);
        format!("{}.{seconds}.{mac}", self.replica)
    }

    /// The replicas whose heartbeats in `members` carry a right MAC and are fresh by Redis's
    /// clock (`now_ms`), this one included. Members with a wrong MAC are reported as forged.
    fn count_live(&self, members: &[String], now_ms: u64) -> u32 {
        let now = now_ms / 1000;
        let mut live = HashSet::from([self.replica.as_str()]);
        let mut forged = 0;
        for member in members {
            let mut parts = member.splitn(3, '.');
            let (Some(replica), Some(seconds), Some(mac)) =
                (parts.next(), parts.next(), parts.next())
            else {
                forged += 1;
                continue;
            };
            let fields = [replica.as_bytes(), seconds.as_bytes()];
            if !self.sealing.verify("heartbeat", &fields, mac.as_bytes()) {
                forged += 1;
                continue;
            }
            let fresh = seconds.parse::<u64>().is_ok_and(|at| {
                at <= now + 1 && now.saturating_sub(at) <= HEARTBEAT_FRESH.as_secs()
            });
            if fresh {
                live.insert(replica);
            }
        }
        if forged > 0 {
            self.forged(
                RedisOp::Heartbeat,
                "heartbeats without the cluster secret's MAC",
            );
        }
        live.len() as u32
    }

    /// Agrees with the other replicas on when to count in Redis again.
    async fn resume(&self, since: Instant) {
        let resume = Resume {
            window: self.window,
            margin: RESUME_MARGIN,
        };
        if let Some(until) = self.eval(&resume).await {
            let at = Instant::now() + until;
            tracing::info!(
                in_ms = until.as_millis() as u64,
                "Redis answers again: shared counting resumes at the next window boundary"
            );
            self.set_mode(ReplicaMode::Resuming { since, at });
        }
    }

    /// Redis no longer holds the counters this replica counted under: degrade, and resume
    /// only at a window boundary agreed with the others.
    pub(super) fn lost_data(&self, op: RedisOp) {
        self.resume_at_boundary.store(true, Ordering::Release);
        // Every bucket is lost with the rest, and is counted afresh from the agreed window
        // boundary: no bucket's epoch is to be compared with the old one any more.
        self.bucket_epochs.clear();
        self.degrade(op, "Redis lost its data (restarted or flushed)");
    }

    /// Enters degraded mode (once: an already degraded replica stays as it is).
    pub(super) fn degrade(&self, op: RedisOp, why: &str) {
        let changed = self.mode.send_if_modified(|mode| match mode {
            ReplicaMode::Degraded { .. } => false,
            ReplicaMode::Resuming { since, .. } => {
                *mode = ReplicaMode::Degraded { since: *since };
                true
            }
            ReplicaMode::Shared => {
                *mode = ReplicaMode::Degraded {
                    since: Instant::now(),
                };
                true
            }
        });
        if changed {
            self.metrics.set_mode(false);
            self.diagnosed.store(false, Ordering::Release);
            tracing::warn!(
                op = op.label(),
                cause = why,
                replicas = self.replicas(),
                "Redis unavailable: limiting locally with this replica's share of each quota"
            );
        }
    }

    fn set_mode(&self, mode: ReplicaMode) {
        let shared = mode == ReplicaMode::Shared;
        let changed = self.mode.send_if_modified(|current| {
            let changed = *current != mode;
            *current = mode;
            changed
        });
        if changed {
            self.metrics.set_mode(shared);
            if shared {
                self.has_shared.store(true, Ordering::Release);
                self.resume_at_boundary.store(false, Ordering::Release);
                tracing::info!(
                    replicas = self.replicas(),
                    "Redis available: quotas are counted with the other replicas again"
                );
            }
        }
    }
}

/// The agreed count of live replicas after a heartbeat `counted` them (see
/// `Cluster::agree_on`): `agreed` so far (0: none yet), `lower` a lower count seen in shared
/// counting and since when. Returns the agreed count and the lower count still pending.
fn agreed_count(
    agreed: u32,
    lower: Option<(u32, Instant)>,
    counted: u32,
    settled: bool,
    now: Instant,
) -> (u32, Option<(u32, Instant)>) {
    if agreed == 0 || counted >= agreed {
        return (counted, None);
    }
    if !settled {
        return (agreed, None);
    }
    let (most, since) = lower.map_or((counted, now), |(most, since)| (most.max(counted), since));
    if now.duration_since(since) >= HEARTBEAT_TTL {
        (most, None)
    } else {
        (agreed, Some((most, since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_rises_at_once_and_drops_only_after_holding_in_shared_counting() {
        let start = Instant::now();
        let later = |secs| start + Duration::from_secs(secs);
        assert_eq!(
            agreed_count(0, None, 2, false, start),
            (2, None),
            "the first count"
        );
        assert_eq!(
            agreed_count(2, None, 3, false, start),
            (3, None),
            "rises at once"
        );
        // Redis back empty, or an epoch change, or degraded: a lower count is not taken.
        assert_eq!(agreed_count(3, None, 1, false, start), (3, None));
        // In shared counting: taken once it has held for a heartbeat's lifetime, at the
        // highest it was meanwhile.
        let (agreed, lower) = agreed_count(3, None, 1, true, start);
        assert_eq!((agreed, lower), (3, Some((1, start))));
        let (agreed, lower) = agreed_count(agreed, lower, 2, true, later(2));
        assert_eq!((agreed, lower), (3, Some((2, start))));
        assert_eq!(agreed_count(agreed, lower, 2, true, later(5)), (2, None));
        // Back to the agreed count (a set emptied for a moment): nothing pending any more.
        assert_eq!(agreed_count(3, lower, 3, true, later(3)), (3, None));
        // Degraded meanwhile: the pending lower count is forgotten.
        assert_eq!(agreed_count(3, lower, 2, false, later(6)), (3, None));
    }
}
