//! The minute quota counted across replicas: one GCRA per (appid, API) in Redis, and what a
//! replica counts on its own while Redis is away.
//!
//! # Shared
//! Every turn is one run of the GCRA in Redis: its own `EVALSHA` of
//! [`super::scripts::QUOTA`], or, for the first attempt of a code exchange whose key has
//! no call queued on this replica, part of the round trip that claims the code
//! ([`super::scripts::CODE_CLAIM`]). The same GCRA, burst and
//! emission interval as the single process (see [`crate::quota`]), kept in one Redis key
//! per (appid, API) and read on Redis's clock, so the single-process bound holds for all
//! replicas together: at most `per_window` calls in any span of `window_secs`, retries
//! included. A 45011 from WeChat pauses the key in Redis until WeChat's next window, so
//! every replica holds it.
//!
//! # Degraded
//! Without Redis, a replica admits at most its *share*, `per_window / live replicas` (the
//! last count it learned), in each of WeChat's calendar windows, and nothing in the window
//! it degraded in: the shared count of that window is unknown to it, so it is taken as
//! spent. With Redis down for every replica, each calendar window then holds at most
//! `per_window` calls: the shared ones (before) or the shares (after), never both. Going
//! back, the replicas switch at one window boundary they agree on in Redis (see
//! [`super::Mode::Resuming`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio::time::Instant;

use super::RedisOp;
use super::{Cluster, Mode};
use crate::config::QuotaLimit;
use crate::quota::{until_next_window, QuotaKey};

/// The shared side of a quota gate.
pub struct SharedQuota {
    cluster: Arc<Cluster>,
    window: Duration,
    /// Calls admitted locally while degraded: (calendar window index, count) per key.
    local: DashMap<QuotaKey, (u64, u32)>,
}

/// A quota turn as a script takes it: its keys and arguments (see
/// [`super::scripts::QUOTA`]).
pub struct Turn {
    epoch_key: String,
    bucket_key: String,
    pause_key: String,
    epoch: String,
    interval_micros: u64,
    tolerance_micros: u64,
}

impl Turn {
    /// Appends the turn's three keys and three arguments to `invocation`, after any it has.
    pub fn add_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .key(&self.epoch_key)
            .key(&self.bucket_key)
            .key(&self.pause_key)
            .arg(&self.epoch)
            .arg(self.interval_micros)
            .arg(self.tolerance_micros);
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
            if let Some(turn) = self.take_in_redis(key, limit, interval).await {
                return turn;
            }
        }
        self.take_locally(key, limit)
    }

    /// One run of the GCRA script; `None` when Redis failed (the replica is degraded now).
    async fn take_in_redis(
        &self,
        key: &QuotaKey,
        limit: QuotaLimit,
        interval: Duration,
    ) -> Option<Result<(), Duration>> {
        let cluster = &self.cluster;
        let turn = self.turn(key, limit, interval);
        let mut invocation = cluster.scripts.quota.prepare_invoke();
        turn.add_to(&mut invocation);
        let reply: (i64, i64) = cluster.eval(RedisOp::Quota, invocation).await?;
        self.settle(reply)
    }

    /// What a script needs to take a turn of `key` in Redis (now, or along with a code
    /// exchange's claim: see [`super::codes::SharedCodes::claim`]).
    pub fn turn(&self, key: &QuotaKey, limit: QuotaLimit, interval: Duration) -> Turn {
        let cluster = &self.cluster;
        let fingerprint = fingerprint(cluster, key);
        let interval_micros = interval.as_micros().max(1) as u64;
        Turn {
            epoch_key: format!("{}epoch", cluster.prefix),
            bucket_key: cluster.key("q", &fingerprint),
            pause_key: cluster.key("p", &fingerprint),
            epoch: cluster.epoch(),
            interval_micros,
            tolerance_micros: interval_micros * u64::from(limit.burst.max(1) - 1),
        }
    }

    /// What the script's `(admitted, wait µs)` means: a turn, a wait, or `None` when Redis
    /// lost the counters (the replica is degraded now).
    pub fn settle(&self, (admitted, wait): (i64, i64)) -> Option<Result<(), Duration>> {
        match admitted {
            1 => Some(Ok(())),
            0 => Some(Err(Duration::from_micros(wait.max(1) as u64))),
            _ => {
                self.cluster.lost_data(RedisOp::Quota);
                None
            }
        }
    }

    /// A turn out of this replica's share of the current calendar window.
    fn take_locally(&self, key: &QuotaKey, limit: QuotaLimit) -> Result<(), Duration> {
        let since = match self.cluster.mode() {
            Mode::Degraded { since } | Mode::Resuming { since, .. } => since,
            // Shared since the check above; the turn is counted locally all the same.
            Mode::Shared => Instant::now(),
        };
        let share = limit.per_window / self.cluster.replicas();
        let now = SystemTime::now();
        let window = window_index(now, self.window);
        let degraded_in = window_index(now - since.elapsed(), self.window);
        let mut entry = self.local.entry(*key).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        if window != degraded_in && entry.1 < share {
            entry.1 += 1;
            drop(entry);
            self.cluster.admitted_locally();
            return Ok(());
        }
        Err(until_next_window(now, self.window))
    }

    /// Pauses `key` in Redis until WeChat's next window by Redis's clock (when counting
    /// there), so that every replica holds it.
    pub async fn pause(&self, key: &QuotaKey) {
        if !self.cluster.counts_in_redis() {
            return;
        }
        let cluster = &self.cluster;
        let mut invocation = cluster.scripts.pause.prepare_invoke();
        invocation
            .key(cluster.key("p", &fingerprint(cluster, key)))
            .arg(self.window.as_micros() as u64);
        let _: Option<u64> = cluster.eval(RedisOp::Pause, invocation).await;
    }

    /// Forgets local counts of windows that are over.
    pub fn retain_recent(&self) {
        let window = window_index(SystemTime::now(), self.window);
        self.local.retain(|_, (index, _)| *index == window);
    }
}

/// The key of a quota in Redis names neither the appid nor the API.
fn fingerprint(cluster: &Cluster, key: &QuotaKey) -> String {
    cluster.sealing.fingerprint(
        "quota",
        &[key.api().label().as_bytes(), key.appid().as_bytes()],
    )
}

/// The calendar window `at` falls in (windows aligned to the epoch, as WeChat's minutes).
fn window_index(at: SystemTime, window: Duration) -> u64 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since_epoch.as_nanos() / window.as_nanos().max(1)) as u64
}
