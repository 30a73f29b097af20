//! The metrics of a replica's shared state (`[cluster]`): its mode, the live replicas, and
//! every Redis operation's latency and errors, by operation and kind.

use prometheus::{Histogram, IntCounter, IntGauge};

use crate::metrics::{Label, Metrics, Series};

/// The metrics of a replica's shared state, registered only when `[cluster]` is set.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// `wxgate_cluster_state{state="shared"|"degraded"}`: 1 for the replica's mode.
    state: Series<IntGauge>,
    /// Live replicas, by the last heartbeat.
    pub replicas: IntGauge,
    duration: Series<Histogram>,
    errors: Series<IntCounter>,
}

/// A kind of Redis operation: the `op` label of the Redis metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    /// The heartbeat (and the probe of a degraded replica).
    Heartbeat,
    /// Agreeing on when degraded replicas count in Redis again.
    Resume,
    /// A quota turn.
    Quota,
    /// A 45011 pause.
    Pause,
    /// A code exchange looked up or claimed.
    CodeClaim,
    /// A waiting replica looking for the holder's result.
    CodePeek,
    /// A claim's lease extended.
    CodeRenew,
    /// A claim ended with its answer.
    CodeComplete,
    /// A pub/sub subscription for a waited result.
    Subscribe,
    /// Reading a shared token.
    TokenRead,
    /// Taking or giving back the lease of a token fetch.
    TokenLease,
    /// Storing a token (fetched, or a replica's own when Redis has none).
    TokenStore,
    /// Dropping a token WeChat refused (40001, 40014, 42001).
    TokenDrop,
    /// Counting a fetch in the day's budget.
    TokenCount,
    /// Reading a key's limit WeChat stated, or taking the lease to ask for it.
    LimitLease,
    /// Storing a key's limit (WeChat's answer, or a learned one), or reading a window's turns.
    LimitStore,
    /// Reading the learned limits of the keys with traffic.
    LimitRead,
}

impl RedisOp {
    /// Every value, in label order.
    pub const ALL: [RedisOp; 17] = [
        RedisOp::Heartbeat,
        RedisOp::Resume,
        RedisOp::Quota,
        RedisOp::Pause,
        RedisOp::CodeClaim,
        RedisOp::CodePeek,
        RedisOp::CodeRenew,
        RedisOp::CodeComplete,
        RedisOp::Subscribe,
        RedisOp::TokenRead,
        RedisOp::TokenLease,
        RedisOp::TokenStore,
        RedisOp::TokenDrop,
        RedisOp::TokenCount,
        RedisOp::LimitLease,
        RedisOp::LimitStore,
        RedisOp::LimitRead,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RedisOp::Heartbeat => "heartbeat",
            RedisOp::Resume => "resume",
            RedisOp::Quota => "quota",
            RedisOp::Pause => "pause",
            RedisOp::CodeClaim => "code_claim",
            RedisOp::CodePeek => "code_peek",
            RedisOp::CodeRenew => "code_renew",
            RedisOp::CodeComplete => "code_complete",
            RedisOp::Subscribe => "subscribe",
            RedisOp::TokenRead => "token_read",
            RedisOp::TokenLease => "token_lease",
            RedisOp::TokenStore => "token_store",
            RedisOp::TokenDrop => "token_drop",
            RedisOp::TokenCount => "token_count",
            RedisOp::LimitLease => "limit_lease",
            RedisOp::LimitStore => "limit_store",
            RedisOp::LimitRead => "limit_read",
        }
    }

    /// Position in [`RedisOp::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether `error` says a shard or a primary is failing over: Redis Cluster's `MOVED`,
/// `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, a slot whose node the client does not
/// know yet, a primary demoted to a replica (`READONLY`) or still loading its data, a
/// script missing on a newly promoted primary (`NOSCRIPT`), no primary named by the
/// sentinels.
///
/// `NOSCRIPT`: Redis 7 does not replicate its script cache, so a replica promoted by a
/// failover knows only the scripts loaded on it by hand. redis-rs loads a missing script
/// once (`SCRIPT LOAD` on the nodes its slot map knows) and runs it again; while the
/// topology changes, the second run can land on a node the load missed, and the
/// `NOSCRIPT` reaches the caller. The next run loads it again: nothing was refused (a user
/// without `SCRIPT LOAD` gets `NOPERM`, an answer).
fn failing_over(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::NoScript
            ) | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::NoValidReplicasFoundBySentinel
        )
}

/// Why a Redis operation failed: the `kind` label of `wxgate_redis_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisErrorKind {
    /// No answer within `cluster.timeout_ms`.
    Timeout,
    /// No connection (refused, reset, closed, reconnecting), or a shard or primary failing
    /// over.
    Connection,
    /// Redis answered with an error (a script error, out of memory, no permission...).
    Answer,
    /// The live replicas use another cluster secret.
    Secret,
    /// A value in Redis that no replica wrote: it failed its check under the cluster secret
    /// or is out of the range replicas write (see `docs/replicas.md`, the threat model).
    Forged,
}

impl RedisErrorKind {
    /// Every value, in label order.
    pub const ALL: [RedisErrorKind; 5] = [
        RedisErrorKind::Timeout,
        RedisErrorKind::Connection,
        RedisErrorKind::Answer,
        RedisErrorKind::Secret,
        RedisErrorKind::Forged,
    ];

    /// The kind of a client error.
    pub fn of(error: &redis::RedisError) -> RedisErrorKind {
        if error.is_timeout() {
            RedisErrorKind::Timeout
        } else if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_unrecoverable_error()
            || failing_over(error)
        {
            RedisErrorKind::Connection
        } else {
            RedisErrorKind::Answer
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RedisErrorKind::Timeout => "timeout",
            RedisErrorKind::Connection => "connection",
            RedisErrorKind::Answer => "answer",
            RedisErrorKind::Secret => "secret",
            RedisErrorKind::Forged => "forged",
        }
    }

    /// Position in [`RedisErrorKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Redis latency buckets in seconds: a loopback or same-zone Redis answers in 0.1–1 ms; the
/// top buckets see operations that ran into `cluster.timeout_ms` (50 ms by default).
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

impl ClusterMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<ClusterMetrics> {
        let op = || Label::new("op", RedisOp::ALL.map(RedisOp::label));
        Ok(ClusterMetrics {
            state: metrics.gauges(
                "wxgate_cluster_state",
                "1 for the replica's mode: shared (quotas counted in Redis with the other replicas) or degraded (Redis unavailable: limiting locally with this replica's share).",
                &[Label::new("state", ["shared", "degraded"])],
            )?,
            replicas: metrics.gauge(
                "wxgate_cluster_replicas",
                "Live replicas, by the last heartbeat Redis answered.",
            )?,
            duration: metrics.histograms(
                "wxgate_redis_duration_seconds",
                "Time of one Redis operation, timeouts included.",
                REDIS_BUCKETS,
                &[op()],
            )?,
            errors: metrics.counters(
                "wxgate_redis_errors_total",
                "Redis operations that failed, by operation and kind.",
                &[op(), Label::new("kind", RedisErrorKind::ALL.map(RedisErrorKind::label))],
            )?,
        })
    }

    /// The replica is in shared mode (`true`) or degraded.
    pub fn set_mode(&self, shared: bool) {
        self.state.get(0).set(i64::from(shared));
        self.state.get(1).set(i64::from(!shared));
    }

    /// A Redis operation took this long.
    pub fn observe(&self, op: RedisOp, seconds: f64) {
        self.duration.get(op.index()).observe(seconds);
    }

    /// A Redis operation failed.
    pub fn error(&self, op: RedisOp, kind: RedisErrorKind) {
        self.errors.get2(op.index(), kind.index()).inc();
    }
}

#[cfg(test)]
mod tests {
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    use super::RedisErrorKind;

    #[test]
    fn a_failover_is_a_connection_error_and_a_refusal_an_answer() {
        let kind = |kind: ErrorKind| RedisErrorKind::of(&RedisError::from((kind, "detail")));
        for failing_over in [
            ErrorKind::Server(ServerErrorKind::Moved),
            ErrorKind::Server(ServerErrorKind::ClusterDown),
            ErrorKind::Server(ServerErrorKind::TryAgain),
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            ErrorKind::Server(ServerErrorKind::MasterDown),
            ErrorKind::Server(ServerErrorKind::BusyLoading),
            ErrorKind::Server(ServerErrorKind::NoScript),
            ErrorKind::ClusterConnectionNotFound,
            ErrorKind::MasterNameNotFoundBySentinel,
        ] {
            assert_eq!(
                kind(failing_over),
                RedisErrorKind::Connection,
                "{failing_over:?}"
            );
        }
        for refused in [
            ErrorKind::Server(ServerErrorKind::CrossSlot),
            ErrorKind::Server(ServerErrorKind::NoPerm),
            ErrorKind::Server(ServerErrorKind::ResponseError),
            ErrorKind::UnexpectedReturnType,
        ] {
            assert_eq!(kind(refused), RedisErrorKind::Answer, "{refused:?}");
        }
    }

    /// Replies as Redis sends them to a script run during a failover, and to scripts it
    /// refuses.
    #[test]
    fn a_script_missing_on_a_promoted_primary_is_a_connection_error() {
        let kind = |reply: &str| {
            let error = redis::parse_redis_value(format!("-{reply}\r\n").as_bytes())
                .and_then(redis::Value::extract_error)
                .expect_err("an error reply");
            RedisErrorKind::of(&error)
        };
        for failing_over in [
            "NOSCRIPT No matching script. Please use EVAL.",
            "READONLY You can't write against a read only replica. script: 9a1f, on @user_script:3.",
        ] {
            assert_eq!(kind(failing_over), RedisErrorKind::Connection, "{failing_over}");
        }
        for refused in [
            "NOPERM User wxgate has no permissions to run the 'script|load' command",
            "WRONGTYPE Operation against a key holding the wrong kind of value script: 9a1f, on @user_script:2.",
            "ERR user_script:1: Script attempted to access nonexistent global variable 'x' script: 9a1f, on @user_script:1.",
        ] {
            assert_eq!(kind(refused), RedisErrorKind::Answer, "{refused}");
        }
    }
}
