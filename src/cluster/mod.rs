//! The Redis layer: what several wxgate replicas share, and what a replica does when Redis
//! is gone. It knows connections, scripts, sealing and its own failure modes, never quotas,
//! codes or tokens: each feature keeps its shared state in its own `shared.rs` and calls
//! down through [`Cluster::eval`] with one of the [`scripts`].
//!
//! Without a `[cluster]` section none of this exists and wxgate is the single process it
//! always was. With one, [`Cluster`] owns the Redis connection (in the form `[cluster]`
//! names: one endpoint, Sentinel or Redis Cluster; see `connection.rs`) and the replica's
//! *mode* ([`ReplicaMode`]):
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
//! Keys are `{key_prefix}{kind}:{{tag}}{fingerprint}` ([`Cluster::key`], the one rule every
//! key follows), fingerprints keyed with the cluster secret ([`sealing`]), so nothing in a
//! key names an appid, a credential or a code. The `{tag}` is a Redis Cluster *hash tag*
//! ([`Tag`]): Redis hashes only what is between the braces to choose a key's slot, so every
//! key of one appid (its quota buckets and pauses, its code exchanges, its tokens) lands in
//! one slot, and the replicas' own keys (heartbeats, epoch, secret check, resumption) in
//! another. A script's keys then always share one slot, which Redis Cluster and the
//! cluster-mode proxies require of a script (else `CROSSSLOT`). Values are sealed, or carry a
//! MAC, or are bounded by what a replica writes: whatever is read back is untrusted input,
//! and a value no replica wrote is reported ([`Cluster::forged`]) and costs no more than
//! losing Redis.
//!
//! - [`scripts`]: every Lua script, what it is given and its reply type.
//! - `connection.rs`: the connection in each Redis form.
//! - `cause.rs`: why Redis cannot be used, for the log and `check-config --connect`.
//! - [`sealing`]: keyed fingerprints and sealed values.
//! - `mode.rs`: the replica's mode and how it moves: heartbeat, probe, degradation,
//!   resumption.
//! - `notices.rs`: pub/sub messages routed to the tasks waiting for them
//!   ([`Cluster::listen`]).
//! - `metrics.rs`: `wxgate_cluster_*` and `wxgate_redis_*`.

mod cause;
mod connection;
mod metrics;
mod mode;
mod notices;
pub mod scripts;
pub mod sealing;
#[cfg(test)]
mod slots;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use redis::RedisError;
use tokio::sync::watch;
use tokio::time::Instant;

pub use self::cause::{try_connection, RedisCause};
pub use self::metrics::{ClusterMetrics, RedisErrorKind, RedisOp};
pub use self::mode::ReplicaMode;
use crate::config::{ClusterConfig, RedisTarget};
use crate::metrics::Metrics;

use self::connection::RedisConnection;
use self::notices::Notices;
use self::scripts::Script;
use self::sealing::Sealing;

/// A replica's connection to the shared state, and its mode.
pub struct Cluster {
    redis: RedisConnection,
    /// Where Redis is, for a connection of its own that says why Redis cannot be used.
    target: RedisTarget,
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
    /// The replicas' epoch as this replica learned it (see [`scripts`]); empty until the
    /// first heartbeat.
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
    /// The epoch of every quota bucket this replica counted in, by the name of its epoch
    /// key: a bucket whose epoch changed was lost by Redis (see [`scripts`]).
    bucket_epochs: DashMap<String, String>,
    /// Pub/sub messages for this replica's waiting code exchanges.
    notices: Arc<Notices>,
    /// The operations ([`RedisOp::index`] as a bit) whose forged values were logged already:
    /// a forged value is counted every time, logged once per operation.
    forged_logged: AtomicU32,
    /// The operations ([`RedisOp::index`] as a bit) whose refusal by Redis was logged
    /// already.
    refused_logged: AtomicU32,
    /// Redis's push messages, until [`Cluster::start`] hands them to the router.
    pushes: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>>>,
    metrics: ClusterMetrics,
}

/// What a key holds: its name in Redis is `{key_prefix}{kind}:{{tag}}{fingerprint}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    /// The replicas' epoch (under [`Tag::replicas`]; see [`scripts`]).
    Epoch,
    /// The replicas' heartbeats.
    Replicas,
    /// The fingerprint of the cluster secret the live replicas use.
    SecretCheck,
    /// When degraded replicas count in Redis again.
    Resume,
    /// The epoch of a quota bucket: a random value that changes when Redis lost the bucket.
    QuotaEpoch,
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
            KeyKind::Epoch => "epoch",
            KeyKind::Replicas => "replicas",
            KeyKind::SecretCheck => "secret",
            KeyKind::Resume => "resume",
            KeyKind::QuotaEpoch => "qe",
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

/// A Redis Cluster hash tag: the part of a key's name between braces, which alone chooses
/// the key's slot, so that keys with one tag live on one shard and one script may use them
/// together. Everything of one appid has the appid's tag ([`Cluster::appid_tag`]); the
/// replicas' own keys have [`Tag::replicas`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// The tag of the replicas' own keys (heartbeats, epoch, secret check, resumption).
    fn replicas() -> Tag {
        Tag("replicas".into())
    }

    /// The tag of a key that no script uses with another (the token index): part of its own
    /// fingerprint, which spreads such keys over the slots.
    fn own(fingerprint: &str) -> Tag {
        Tag(fingerprint.chars().take(16).collect())
    }

    /// A tag as Redis held it (the token index): hex digits only, else `None` (written by
    /// no replica).
    fn read(text: &str) -> Option<Tag> {
        let plausible =
            (1..=32).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit());
        plausible.then(|| Tag(text.to_owned()))
    }
}

/// Why the cluster connection could not be set up at all (a Redis that is down is not one
/// of these: wxgate then starts degraded).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The Redis client refused the settings.
    #[error("[cluster]'s Redis cannot be used: {0}")]
    Client(String),
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
        // RESP3 (set by every form): published messages arrive as pushes on the same
        // connection, and subscriptions come back by themselves after a reconnection.
        let (push_sender, pushes) = tokio::sync::mpsc::unbounded_channel();
        let connect_timeout = config.timeout.max(Duration::from_millis(500));
        let redis = RedisConnection::new(&config.redis, push_sender, connect_timeout)
            .map_err(|error| ClusterError::Client(format!("{:?}", error.kind())))?;
        metrics.set_mode(false);
        let sealing = Sealing::new(config.secret.expose());
        Ok(Cluster {
            redis,
            target: config.redis.clone(),
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
            bucket_epochs: DashMap::new(),
            notices: Arc::default(),
            forged_logged: AtomicU32::new(0),
            refused_logged: AtomicU32::new(0),
            pushes: Mutex::new(Some(pushes)),
            metrics,
        })
    }

    /// Fingerprints and sealing under the cluster secret.
    pub fn sealing(&self) -> &Sealing {
        &self.sealing
    }

    /// Runs `script` (by hash; loaded again if Redis lost it) as one Redis operation, and
    /// decodes its reply. `None` when Redis failed (the replica is degraded now). A script
    /// that counts under an epoch teaches the replica the epoch its counters are under now
    /// (see [`scripts`]).
    pub async fn eval<S: Script>(&self, script: &S) -> Option<S::Reply> {
        let mut keys_and_args = Invocation::default();
        script.write(self, &mut keys_and_args);
        let mut invocation = S::lua().prepare_invoke();
        for key in &keys_and_args.keys {
            invocation.key(key);
        }
        for arg in &keys_and_args.args {
            invocation.arg(arg.as_slice());
        }
        let raw: S::Raw = self.run_op(S::OP, self.redis.invoke(&invocation)).await?;
        if let Some(what) = S::forged(&raw) {
            self.forged(S::OP, what);
        }
        if let (Some(key), Some((epoch, lost))) = (script.epoch_key(self), S::epoch_seen(&raw)) {
            if lost {
                tracing::warn!(
                    op = S::OP.label(),
                    "Redis lost a quota bucket (a shard restarted empty or failed over to a replica that had not received it): the bucket is held until the next window boundary"
                );
            }
            self.bucket_epochs.insert(key, epoch);
        }
        Some(script.decode(raw))
    }

    /// The epoch this replica last saw in the epoch key `key` (empty: none yet).
    fn known_epoch(&self, key: &str) -> String {
        self.bucket_epochs
            .get(key)
            .map(|epoch| epoch.clone())
            .unwrap_or_default()
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

    /// The tag of every key of `appid` (its quota buckets, code exchanges and tokens): a
    /// keyed fingerprint, so that the tag names no appid either. 64 bits are plenty: two
    /// appids with one tag only share a slot.
    pub fn appid_tag(&self, appid: &[u8]) -> Tag {
        let mut tag = self.sealing.fingerprint("tag", &[appid]);
        tag.truncate(16);
        Tag(tag)
    }

    /// The Redis key of `kind` for `fingerprint`, in the slot of `tag`: the one rule every
    /// key follows. A script's keys must share one tag (see [`Tag`]).
    fn key(&self, kind: KeyKind, tag: &Tag, fingerprint: &str) -> String {
        format!("{}{}:{{{}}}{fingerprint}", self.prefix, kind.name(), tag.0)
    }

    /// The Redis key of the replicas' own `kind` (epoch, heartbeats, secret check,
    /// resumption), all in the slot of [`Tag::replicas`].
    fn replicas_key(&self, kind: KeyKind) -> String {
        self.key(kind, &Tag::replicas(), "")
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
            Ok(Err(error)) => {
                let kind = RedisErrorKind::of(&error);
                if kind == RedisErrorKind::Answer {
                    self.refused(op, &error);
                }
                (kind, RedisCause::of(&error))
            }
            Err(_) => (RedisErrorKind::Timeout, RedisCause::Timeout),
        };
        self.metrics.error(op, kind);
        self.degrade(op, cause.describe());
        None
    }

    /// Logs what Redis refused an operation with, the first time for each operation: the
    /// error's kind and code (`NOPERM`, `CROSSSLOT`...), never its text, which can quote a
    /// script's keys.
    fn refused(&self, op: RedisOp, error: &RedisError) {
        let bit = 1 << op.index();
        if self.refused_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                op = op.label(),
                error = ?error.kind(),
                code = error.code().unwrap_or("-"),
                "Redis refused an operation; logged once, counted in wxgate_redis_errors_total{{kind=\"answer\"}}"
            );
        }
    }

    /// Whether results of code exchanges are published on sharded channels (Redis
    /// Cluster).
    fn sharded_notices(&self) -> bool {
        self.redis.sharded()
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

/// The keys and arguments of one run of a script, in the order its text reads them.
#[derive(Debug, Default)]
pub struct Invocation {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Invocation {
    /// Appends a key.
    fn key(&mut self, key: String) -> &mut Self {
        self.keys.push(key);
        self
    }

    /// Appends an argument, as Redis receives it.
    fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }
}

/// A fresh random id (128 bits as hex): the owner of a claim or a lease, a replica's id, an
/// epoch.
pub fn owner_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
