//! Replicas as one: the state several wxgate replicas share through Redis, and what a
//! replica does when Redis is gone.
//!
//! Without a `[cluster]` section none of this exists and wxgate is the single process it
//! always was. With one, [`Cluster`] owns the Redis connection (one multiplexed connection,
//! redis-rs's `ConnectionManager`, which reconnects by itself with exponential backoff) and
//! the replica's *mode*:
//!
//! - **shared**: quota turns are counted in Redis ([`quota`]);
//! - **degraded**: an operation failed, took longer than `cluster.timeout_ms`, or found Redis
//!   emptied (a restart, a flush: its epoch changed). The replica limits on its own with its
//!   share of the quota, logs the change once, and stops sending Redis anything on the
//!   request path; a background probe (the heartbeat) tries Redis again every
//!   [`PROBE_INTERVAL`], so no request waits on a dead Redis and no reconnection storm
//!   happens;
//! - **resuming**: Redis answers again; the replicas agreed (in Redis) on a window boundary
//!   at which they all go back to shared counting, so that no window holds both a local
//!   count and the shared one.
//!
//! A failure of Redis never fails a request: every operation has a fallback.
//!
//! Keys are `{key_prefix}{kind}:{fingerprint}`, fingerprints keyed with the cluster secret
//! ([`sealing`]), so nothing in a key names an appid, a credential or a code.
//!
//! Access tokens are shared too ([`tokens`]): one sealed token per (API, appid), refreshed
//! by the one replica that holds its lease.

pub mod codes;
mod metrics;
mod notices;
pub mod quota;
mod scripts;
pub mod sealing;
pub mod tokens;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::watch;
use tokio::time::Instant;

pub use self::metrics::{ClusterMetrics, RedisErrorKind, RedisOp};
use crate::config::ClusterConfig;
use crate::metrics::Metrics;

use self::notices::Notices;
use self::sealing::Sealing;

/// How often a replica says it is alive, and learns how many replicas are.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How often a degraded replica tries Redis again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// A heartbeat older than this no longer counts its replica as live.
const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

/// Degraded replicas go back to shared counting at a window boundary at least this far
/// away, so that every replica (probing every [`PROBE_INTERVAL`]) has seen Redis by then.
const RESUME_MARGIN: Duration = Duration::from_secs(2);

/// A replica's connection to the shared state, and its mode.
pub struct Cluster {
    connection: ConnectionManager,
    /// `{key_prefix}`, for every key.
    prefix: String,
    timeout: Duration,
    /// The quota window: replicas resume shared counting at one of its boundaries.
    window: Duration,
    sealing: Sealing,
    /// This replica's random id in the heartbeat set.
    replica: String,
    /// A fingerprint of the cluster secret: replicas whose checks differ do not share.
    secret_check: String,
    /// The epoch this replica counts under (see [`scripts`]); empty until the first
    /// heartbeat.
    epoch: Mutex<String>,
    mode: watch::Sender<Mode>,
    /// Live replicas by the last heartbeat Redis answered (kept while Redis is away).
    replicas: AtomicU32,
    /// Whether going back to shared counting must wait for a window boundary agreed with the
    /// other replicas: this replica admitted calls on its own since it degraded, or Redis
    /// lost its counters. Otherwise (an idle replica, or one starting) it goes back at once.
    resume_at_boundary: AtomicBool,
    scripts: Scripts,
    /// Pub/sub messages for this replica's waiting code exchanges.
    notices: Arc<Notices>,
    /// Redis's push messages, until [`Cluster::start`] hands them to the router.
    pushes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>>>,
    metrics: ClusterMetrics,
}

/// Where a replica counts its quota turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
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

struct Scripts {
    quota: Script,
    pause: Script,
    heartbeat: Script,
    resume: Script,
    code_claim: Script,
    code_peek: Script,
    code_renew: Script,
    code_complete: Script,
}

/// Why the cluster connection could not be set up at all (a Redis that is down is not one
/// of these: wxgate then starts degraded).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis URL was refused by the client.
    #[error("cluster.redis_url cannot be used: {0}")]
    Url(String),
    /// The cluster's metrics could not be registered.
    #[error("cannot register the cluster's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Cluster {
    /// Sets the connection up without waiting for Redis: the replica starts degraded and
    /// turns shared once the first heartbeat is answered.
    pub fn new(
        config: &ClusterConfig,
        window: Duration,
        metrics: &Metrics,
    ) -> Result<Cluster, ClusterError> {
        let metrics = ClusterMetrics::new(metrics)?;
        let client = redis::Client::open(config.redis_url.connection_info())
            .map_err(|error| ClusterError::Url(format!("{:?}", error.kind())))?;
        // RESP3 (set by the URL's parsing): published messages arrive as pushes on the same
        // connection, and subscriptions come back by themselves after a reconnection.
        let (push_sender, pushes) = tokio::sync::mpsc::unbounded_channel();
        let manager_config = ConnectionManagerConfig::new()
            .set_push_sender(push_sender)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(None)
            // Reconnection backs off from 100 ms to at most 2 s: a Redis that comes back
            // is found quickly, and a dead one is not hammered.
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|error| ClusterError::Url(format!("{:?}", error.kind())))?;
        metrics.set_mode(false);
        let sealing = Sealing::new(config.secret.expose());
        Ok(Cluster {
            connection,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            window,
            secret_check: sealing.fingerprint("secret check", &[]),
            sealing,
            replica: random_id(),
            epoch: Mutex::new(String::new()),
            mode: watch::Sender::new(Mode::Degraded {
                since: Instant::now(),
            }),
            replicas: AtomicU32::new(1),
            resume_at_boundary: AtomicBool::new(false),
            scripts: Scripts {
                quota: Script::new(scripts::QUOTA),
                pause: Script::new(scripts::PAUSE),
                heartbeat: Script::new(scripts::HEARTBEAT),
                resume: Script::new(scripts::RESUME),
                code_claim: Script::new(scripts::CODE_CLAIM),
                code_peek: Script::new(scripts::CODE_PEEK),
                code_renew: Script::new(scripts::CODE_RENEW),
                code_complete: Script::new(scripts::CODE_COMPLETE),
            },
            notices: Arc::default(),
            pushes: Mutex::new(Some(pushes)),
            metrics,
        })
    }

    /// The replica's mode now.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Whether quota turns are counted in Redis now. A resuming replica turns shared here,
    /// once its resumption time has come.
    pub fn counts_in_redis(&self) -> bool {
        match self.mode() {
            Mode::Shared => true,
            Mode::Degraded { .. } => false,
            Mode::Resuming { at, .. } => {
                if Instant::now() < at {
                    return false;
                }
                self.set_mode(Mode::Shared);
                true
            }
        }
    }

    /// Live replicas, by the last heartbeat (at least 1).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Fingerprints and sealing under the cluster secret.
    pub fn sealing(&self) -> &Sealing {
        &self.sealing
    }

    /// The Redis key of `kind` for `fingerprint`.
    pub fn key(&self, kind: &str, fingerprint: &str) -> String {
        format!("{}{kind}:{fingerprint}", self.prefix)
    }

    /// Starts routing pub/sub messages, then the first heartbeat: shared if Redis answers,
    /// degraded otherwise.
    pub async fn start(&self) {
        if let Some(pushes) = self.pushes.lock().take() {
            let notices = self.notices.clone();
            tokio::spawn(async move { notices.route(pushes).await });
        }
        self.heartbeat().await;
        if let Mode::Degraded { .. } = self.mode() {
            tracing::warn!(
                replicas = self.replicas(),
                "Redis unavailable at start: limiting locally with this replica's share of each quota until it answers"
            );
        }
    }

    /// Whether Redis answered the last time it was asked (a resuming replica's quota still
    /// counts locally, but it can share code exchanges and tokens).
    pub fn reachable(&self) -> bool {
        !matches!(self.mode(), Mode::Degraded { .. })
    }

    /// Subscribes to `channel`; `false` if Redis did not take it.
    async fn subscribe(&self, channel: &str) -> bool {
        let mut connection = self.connection.clone();
        self.run_op(RedisOp::Subscribe, async move {
            connection.subscribe(channel).await
        })
        .await
        .is_some()
    }

    /// Unsubscribes from `channel` (a failure only leaves a subscription nobody reads).
    async fn unsubscribe(&self, channel: &str) {
        let mut connection = self.connection.clone();
        let _ = tokio::time::timeout(self.timeout, connection.unsubscribe(channel)).await;
    }

    /// Runs the heartbeat (and, while degraded, the probe) until `stop` turns true, then
    /// takes this replica out of the live set.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.heartbeat().await;
            let pause = match self.mode() {
                Mode::Shared => HEARTBEAT_INTERVAL,
                // Wake at the resumption, so the mode (and its metric) turns shared on time
                // even with no request to notice it.
                Mode::Resuming { at, .. } => {
                    HEARTBEAT_INTERVAL.min(at.saturating_duration_since(Instant::now()))
                }
                Mode::Degraded { .. } => PROBE_INTERVAL,
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        let key = format!("{}replicas", self.prefix);
        let mut connection = self.connection.clone();
        let mut leave = redis::cmd("ZREM");
        leave.arg(&key).arg(&self.replica);
        let _ = tokio::time::timeout(self.timeout, leave.exec_async(&mut connection)).await;
    }

    /// One heartbeat: counts this replica live, learns the epoch and the live count, and
    /// moves between modes.
    async fn heartbeat(&self) {
        let mut invocation = self.scripts.heartbeat.prepare_invoke();
        invocation
            .key(format!("{}epoch", self.prefix))
            .key(format!("{}replicas", self.prefix))
            .key(format!("{}secret", self.prefix))
            .arg(&self.replica)
            .arg(HEARTBEAT_TTL.as_millis() as u64)
            .arg(random_id())
            .arg(&self.secret_check);
        let answer: Option<(String, i64, String)> = self.eval(RedisOp::Heartbeat, invocation).await;
        let Some((epoch, replicas, _)) = answer else {
            return;
        };
        let Ok(replicas) = u32::try_from(replicas) else {
            // Another cluster secret: sharing would mix counts this replica cannot read.
            self.metrics
                .error(RedisOp::Heartbeat, RedisErrorKind::Secret);
            self.degrade(
                RedisOp::Heartbeat,
                "the live replicas use another cluster secret: not sharing with them",
            );
            return;
        };
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
        self.metrics.replicas.set(i64::from(replicas.max(1)));
        let known = std::mem::replace(&mut *self.epoch.lock(), epoch.clone());
        if !known.is_empty() && known != epoch {
            self.lost_data(RedisOp::Heartbeat);
        }
        match self.mode() {
            Mode::Shared => {}
            Mode::Resuming { .. } => {
                self.counts_in_redis();
            }
            Mode::Degraded { .. } if !self.resume_at_boundary.load(Ordering::Acquire) => {
                self.set_mode(Mode::Shared);
            }
            Mode::Degraded { since } => self.resume(since).await,
        }
    }

    /// Agrees with the other replicas on when to count in Redis again.
    async fn resume(&self, since: Instant) {
        let mut invocation = self.scripts.resume.prepare_invoke();
        invocation
            .key(format!("{}resume", self.prefix))
            .arg(self.window.as_micros() as u64)
            .arg(RESUME_MARGIN.as_micros() as u64);
        let answer: Option<u64> = self.eval(RedisOp::Resume, invocation).await;
        if let Some(micros) = answer {
            let at = Instant::now() + Duration::from_micros(micros);
            tracing::info!(
                in_ms = micros / 1000,
                "Redis answers again: shared counting resumes at the next window boundary"
            );
            self.set_mode(Mode::Resuming { since, at });
        }
    }

    /// Runs a script (by hash; loaded again if Redis lost it) as one Redis operation.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        op: RedisOp,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut connection = self.connection.clone();
        self.run_op(
            op,
            async move { invocation.invoke_async(&mut connection).await },
        )
        .await
    }

    /// Runs one Redis operation within `cluster.timeout_ms`, timing it; a failure degrades
    /// the replica and gives `None`.
    async fn run_op<T>(
        &self,
        op: RedisOp,
        operation: impl Future<Output = Result<T, RedisError>>,
    ) -> Option<T> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, operation).await;
        self.metrics.observe(op, started.elapsed().as_secs_f64());
        let kind = match result {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(error)) => RedisErrorKind::of(&error),
            Err(_) => RedisErrorKind::Timeout,
        };
        self.metrics.error(op, kind);
        self.degrade(op, kind.describe());
        None
    }

    /// Redis no longer holds the counters this replica counted under: degrade, and resume
    /// only at a window boundary agreed with the others.
    fn lost_data(&self, op: RedisOp) {
        self.resume_at_boundary.store(true, Ordering::Release);
        self.degrade(op, "Redis lost its data (restarted or flushed)");
    }

    /// Notes a call admitted out of this replica's own share while degraded.
    fn admitted_locally(&self) {
        self.resume_at_boundary.store(true, Ordering::Release);
    }

    /// Enters degraded mode (once: an already degraded replica stays as it is).
    fn degrade(&self, op: RedisOp, why: &str) {
        let changed = self.mode.send_if_modified(|mode| match mode {
            Mode::Degraded { .. } => false,
            Mode::Resuming { since, .. } => {
                *mode = Mode::Degraded { since: *since };
                true
            }
            Mode::Shared => {
                *mode = Mode::Degraded {
                    since: Instant::now(),
                };
                true
            }
        });
        if changed {
            self.metrics.set_mode(false);
            tracing::warn!(
                op = op.label(),
                reason = why,
                replicas = self.replicas(),
                "Redis unavailable: limiting locally with this replica's share of each quota"
            );
        }
    }

    fn set_mode(&self, mode: Mode) {
        let shared = mode == Mode::Shared;
        let changed = self.mode.send_if_modified(|current| {
            let changed = *current != mode;
            *current = mode;
            changed
        });
        if changed {
            self.metrics.set_mode(shared);
            if shared {
                self.resume_at_boundary.store(false, Ordering::Release);
                tracing::info!(
                    replicas = self.replicas(),
                    "Redis available: quotas are counted with the other replicas again"
                );
            }
        }
    }

    /// The epoch to count under (empty before the first heartbeat: then counting fails
    /// over to local, as it must until the replicas agree).
    fn epoch(&self) -> String {
        self.epoch.lock().clone()
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

/// 128 random bits as hex: replica ids, epochs, claim owners.
fn random_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
