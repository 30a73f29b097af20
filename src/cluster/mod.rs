//! The Redis layer: what several wxgate replicas share, and what a replica does when Redis
//! is gone. It knows connections, scripts, sealing and its own failure modes, never quotas,
//! codes or tokens: each feature keeps its shared state in its own `shared.rs` and calls
//! down through [`Cluster::eval`] with one of the [`scripts`].
//!
//! Without a `[cluster]` section none of this exists and wxgate is the single process it
//! always was. With one, [`Cluster`] owns the Redis connection (one multiplexed connection,
//! redis-rs's `ConnectionManager`, which reconnects by itself with exponential backoff) and
//! the replica's *mode* ([`ReplicaMode`]):
//!
//! - **shared**: quota turns are counted in Redis;
//! - **degraded**: an operation failed, took longer than `cluster.timeout_ms`, or found Redis
//!   emptied (a restart, a flush: its epoch changed, see [`scripts`]). The replica limits on
//!   its own with its share of the quota, logs the change once, and stops sending Redis
//!   anything on the request path; a background probe (the heartbeat) tries Redis again
//!   every `PROBE_INTERVAL`, so no request waits on a dead Redis and no reconnection storm
//!   happens;
//! - **resuming**: Redis answers again; the replicas agreed (in Redis) on a window boundary
//!   at which they all go back to shared counting, so that no window holds both a local
//!   count and the shared one.
//!
//! A failure of Redis never fails a request: every operation gives `None`, and every caller
//! has a fallback.
//!
//! Keys are `{key_prefix}{kind}:{fingerprint}`, fingerprints keyed with the cluster secret
//! ([`sealing`]), so nothing in a key names an appid, a credential or a code; values are
//! sealed, or carry a MAC, or are bounded by what a replica writes: whatever is read back is
//! untrusted input, and a value no replica wrote is reported ([`Cluster::forged`]) and costs
//! no more than losing Redis.
//!
//! - [`scripts`]: every Lua script, what it is given and its reply type.
//! - `cause.rs`: why Redis cannot be used, for the log and `check-config --connect`.
//! - [`sealing`]: keyed fingerprints and sealed values.
//! - `mode.rs`: the replica's mode and how it moves: heartbeat, probe, degradation,
//!   resumption.
//! - `notices.rs`: pub/sub messages routed to the tasks waiting for them
//!   ([`Cluster::listen`]).
//! - `metrics.rs`: `wxgate_cluster_*` and `wxgate_redis_*`.

mod cause;
mod metrics;
mod mode;
mod notices;
pub mod scripts;
pub mod sealing;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;
use tokio::sync::watch;
use tokio::time::Instant;

pub use self::cause::{try_connection, RedisCause};
pub use self::metrics::{ClusterMetrics, RedisErrorKind, RedisOp};
pub use self::mode::ReplicaMode;
use crate::config::{ClusterConfig, RedisUrl};
use crate::metrics::Metrics;

use self::notices::Notices;
use self::scripts::Script;
use self::sealing::Sealing;

/// A replica's connection to the shared state, and its mode.
pub struct Cluster {
    connection: ConnectionManager,
    /// Where Redis is, for a connection of its own that says why Redis cannot be used.
    redis_url: RedisUrl,
    /// How long setting a connection up may take.
    connect_timeout: Duration,
    /// `{key_prefix}`, for every key.
    prefix: String,
    timeout: Duration,
    /// The quota window: replicas resume shared counting at one of its boundaries.
    window: Duration,
    sealing: Sealing,
    /// This replica's random id in its heartbeats.
    replica: String,
    /// Its last heartbeat in the set (replaced by the next one, removed when it stops).
    last_heartbeat: Mutex<String>,
    /// Redis's clock (ms since the epoch) by the last heartbeat, and when that was: what
    /// the next heartbeat is dated by.
    redis_clock: Mutex<Option<(u64, Instant)>>,
    /// A fingerprint of the cluster secret: replicas whose checks differ do not share.
    secret_check: String,
    /// The epoch this replica counts under (see [`scripts`]); empty until the first
    /// heartbeat.
    epoch: Mutex<String>,
    mode: watch::Sender<ReplicaMode>,
    /// Live replicas as the heartbeats agreed (kept while Redis is away; 0 before the
    /// first): see `Cluster::replicas`.
    replicas: AtomicU32,
    /// `cluster.expected_replicas`: the fewest replicas a share assumes.
    expected_replicas: u32,
    /// Whether this replica has counted in Redis since it started (one that never has
    /// limits its first window by pace: see `Cluster::has_shared`).
    has_shared: AtomicBool,
    /// Whether the cause of the current degradation was looked into and logged.
    diagnosed: AtomicBool,
    /// A count lower than `replicas` seen in shared counting, and since when: it becomes
    /// the agreed count once it has held for a heartbeat's lifetime.
    lower_count: Mutex<Option<(u32, Instant)>>,
    /// Whether going back to shared counting must wait for a window boundary agreed with the
    /// other replicas: this replica admitted calls on its own since it degraded, or Redis
    /// lost its counters. Otherwise (an idle replica, or one starting) it goes back at once.
    resume_at_boundary: AtomicBool,
    /// Pub/sub messages for this replica's waiting code exchanges.
    notices: Arc<Notices>,
    /// The operations ([`RedisOp::index`] as a bit) whose forged values were logged already:
    /// a forged value is counted every time, logged once per operation.
    forged_logged: AtomicU32,
    /// Redis's push messages, until [`Cluster::start`] hands them to the router.
    pushes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>>>,
    metrics: ClusterMetrics,
}

/// What a key holds: its name in Redis is `{key_prefix}{kind}:{fingerprint}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// A quota bucket's theoretical arrival time.
    QuotaBucket,
    /// The end of a quota bucket's 45011 pause.
    QuotaPause,
    /// A code exchange's remembered answer.
    CodeAnswer,
    /// A code exchange's claim.
    CodeClaim,
    /// Whether replicas wait for a code exchange's result.
    CodeWaiters,
    /// A code exchange's result, left a few seconds for late waiters.
    CodeResult,
    /// The pub/sub channel a code exchange's result is published on.
    CodeChannel,
    /// A token entry.
    Token,
    /// The token entry holding a token, by the token's fingerprint.
    TokenOf,
    /// The lease of a token fetch.
    TokenLease,
    /// The fetches of a token key on one day.
    TokenDay,
    /// A quota bucket's turns in its current window.
    QuotaCount,
    /// WeChat's answer to quota/get about one key, sealed.
    LimitStated,
    /// The lease of the one replica asking quota/get about a key.
    LimitLease,
    /// A limit learned from 45011 for one key, sealed.
    LimitLearned,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::QuotaBucket => "q",
            KeyKind::QuotaPause => "p",
            KeyKind::CodeAnswer => "ca",
            KeyKind::CodeClaim => "cl",
            KeyKind::CodeWaiters => "cw",
            KeyKind::CodeResult => "cr",
            KeyKind::CodeChannel => "cn",
            KeyKind::Token => "token",
            KeyKind::TokenOf => "token-of",
            KeyKind::TokenLease => "token-lease",
            KeyKind::TokenDay => "token-day",
            KeyKind::QuotaCount => "qn",
            KeyKind::LimitStated => "ls",
            KeyKind::LimitLease => "ll",
            KeyKind::LimitLearned => "lr",
        }
    }
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
        let connect_timeout = config.timeout.max(Duration::from_millis(500));
        let manager_config = ConnectionManagerConfig::new()
            .set_push_sender(push_sender)
            .set_automatic_resubscription()
            .set_connection_timeout(Some(connect_timeout))
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
            redis_url: config.redis_url.clone(),
            connect_timeout,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            window,
            secret_check: sealing.fingerprint("secret check", &[]),
            sealing,
            replica: owner_id(),
            last_heartbeat: Mutex::new(String::new()),
            redis_clock: Mutex::new(None),
            epoch: Mutex::new(String::new()),
            mode: watch::Sender::new(ReplicaMode::Degraded {
                since: Instant::now(),
            }),
            replicas: AtomicU32::new(0),
            expected_replicas: config.expected_replicas,
            has_shared: AtomicBool::new(false),
            diagnosed: AtomicBool::new(false),
            lower_count: Mutex::new(None),
            resume_at_boundary: AtomicBool::new(false),
            notices: Arc::default(),
            forged_logged: AtomicU32::new(0),
            pushes: Mutex::new(Some(pushes)),
            metrics,
        })
    }

    /// Fingerprints and sealing under the cluster secret.
    pub fn sealing(&self) -> &Sealing {
        &self.sealing
    }

    /// Runs `script` (by hash; loaded again if Redis lost it) as one Redis operation, and
    /// decodes its reply. `None` when Redis failed (the replica is degraded now); a reply
    /// that says Redis lost the counters degrades the replica too (see [`scripts`]).
    pub async fn eval<S: Script>(&self, script: &S) -> Option<S::Reply> {
        let mut invocation = S::lua().prepare_invoke();
        script.write(self, &mut invocation);
        let mut connection = self.connection.clone();
        let raw: S::Raw = self
            .run_op(S::OP, async move {
                invocation.invoke_async(&mut connection).await
            })
            .await?;
        if let Some(what) = S::forged(&raw) {
            self.forged(S::OP, what);
        }
        let reply = script.decode(raw);
        if S::epoch_lost(&reply) {
            self.lost_data(S::OP);
        }
        Some(reply)
    }

    /// A value read from Redis that no replica wrote (see the threat model in
    /// `docs/replicas.md`): counted in `wxgate_redis_errors_total{kind="forged"}` every time,
    /// logged the first time for each operation. The caller goes on as if the value were not
    /// there, which costs no more than losing Redis.
    pub fn forged(&self, op: RedisOp, what: &str) {
        self.metrics.error(op, RedisErrorKind::Forged);
        let bit = 1 << op.index();
        if self.forged_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                op = op.label(),
                value = what,
                "a value in Redis was not written by a replica (forged, or written by hand): ignored and replaced; logged once, counted in wxgate_redis_errors_total{{kind=\"forged\"}}"
            );
        }
    }

    /// The Redis key of `kind` for `fingerprint`.
    fn key(&self, kind: KeyKind, fingerprint: &str) -> String {
        format!("{}{}:{fingerprint}", self.prefix, kind.name())
    }

    /// The Redis key of the replicas' own `name` (`epoch`, `replicas`, `secret`, `resume`).
    fn named(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
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
        let (kind, cause) = match result {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(error)) => (RedisErrorKind::of(&error), RedisCause::of(&error)),
            Err(_) => (RedisErrorKind::Timeout, RedisCause::Timeout),
        };
        self.metrics.error(op, kind);
        self.degrade(op, cause.describe());
        None
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

/// A fresh random id (128 bits as hex): the owner of a claim or a lease, a replica's id, an
/// epoch.
pub fn owner_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
