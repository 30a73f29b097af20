//! Access tokens shared by replicas: one token per (API, appid) in Redis, sealed, and a lease
//! so that exactly one replica fetches it.
//!
//! # Keys (every name a keyed fingerprint: no appid, secret or token readable)
//! - `{prefix}token:{fp}` with `fp` the fingerprint of (API, appid): a hash of
//!   - `s`: the entry (token, times, the credential's HMAC) as JSON, sealed with the key's
//!     fingerprint as associated data;
//!   - `i`: when the fetch that minted it was sent (µs since the epoch, the fetching
//!     replica's clock): a store only replaces an older entry ([`STORE`]);
//!   - `t`: the fingerprint of the token, so that a token WeChat refused can be dropped by
//!     comparing, without opening anything ([`DROP`]). A dropped entry keeps `i` (a
//!     tombstone), so that no replica can put the refused token or an older one back.
//! - `{prefix}token-of:{fingerprint of the token}`: the entry's `fp`, for a replica that
//!   sees a token refused without having served it.
//! - `{prefix}token-lease:{fp}`: the replica fetching this token now, `SET NX PX` with a
//!   random owner; released by its owner only ([`RELEASE`], compare-and-delete).
//! - `{prefix}token-day:{fp}:{day}`: fetches of the day (UTC+8), for the budget gauge.
//!
//! Every operation goes through [`Cluster::eval`] / [`Cluster::run_op`]: timed, bounded by
//! `cluster.timeout_ms`, and a failure degrades the replica, which then keeps its own cache
//! as a single process would until Redis answers again ([`SharedTokens::available`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::Script;

use super::RedisOp;
use super::{random_id, Cluster};
use crate::token_cache::{Entry, TokenKey};

/// An entry outlives its token by this much, so that its tombstone (or its issue time)
/// keeps older tokens out while any of them could still work.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(60);

/// The token side of a replica's shared state.
pub struct SharedTokens {
    cluster: Arc<Cluster>,
    /// How long a lease lasts: longer than a fetch can take (its quota wait and retries).
    lease_ttl: Duration,
    scripts: TokenScripts,
}

struct TokenScripts {
    lease: Script,
    release: Script,
    store: Script,
    drop: Script,
    count: Script,
}

/// What Redis holds for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// Nothing.
    Missing,
    /// A token WeChat refused, minted at `issued`: nothing as old may come back.
    Dropped {
        /// When the refused token's fetch was sent.
        issued: SystemTime,
    },
    /// A token.
    Present(Entry),
}

/// The outcome of trying to take a key's lease.
#[derive(Debug)]
pub struct Lease {
    /// This replica holds the lease now (and must give it back).
    pub taken: bool,
    /// What Redis held when the lease was tried.
    pub remote: Remote,
}

impl SharedTokens {
    /// The shared tokens of `cluster`, leases lasting `lease_ttl`.
    pub fn new(cluster: Arc<Cluster>, lease_ttl: Duration) -> SharedTokens {
        SharedTokens {
            cluster,
            lease_ttl,
            scripts: TokenScripts {
                lease: Script::new(LEASE),
                release: Script::new(RELEASE),
                store: Script::new(STORE),
                drop: Script::new(DROP),
                count: Script::new(COUNT),
            },
        }
    }

    /// Whether to ask Redis at all: not while degraded (the probe finds Redis again; no
    /// request waits on a Redis that just failed).
    pub fn available(&self) -> bool {
        self.cluster.reachable()
    }

    /// How long a lease lasts.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// A fresh owner id for a lease.
    pub fn owner() -> String {
        random_id()
    }

    fn fingerprint(&self, key: &TokenKey) -> String {
        let api = key.kind.api().label().as_bytes();
        self.cluster
            .sealing
            .fingerprint("token", &[api, key.appid.as_bytes()])
    }

    fn token_fingerprint(&self, token: &str) -> String {
        self.cluster
            .sealing
            .fingerprint("token-value", &[token.as_bytes()])
    }

    /// What Redis holds for `key`; `None` when Redis failed.
    pub async fn read(&self, key: &TokenKey) -> Option<Remote> {
        let fp = self.fingerprint(key);
        let mut read = redis::cmd("HMGET");
        read.arg(self.cluster.key("token", &fp)).arg("i").arg("s");
        let mut connection = self.cluster.connection.clone();
        let (issued, sealed): (Option<String>, Option<Vec<u8>>) = self
            .cluster
            .run_op(RedisOp::TokenRead, read.query_async(&mut connection))
            .await?;
        Some(self.remote(&fp, issued.as_deref(), sealed.as_deref()))
    }

    /// Tries to take `key`'s lease for `owner`; `None` when Redis failed.
    pub async fn lease(&self, key: &TokenKey, owner: &str) -> Option<Lease> {
        let fp = self.fingerprint(key);
        let mut invocation = self.scripts.lease.prepare_invoke();
        invocation
            .key(self.cluster.key("token-lease", &fp))
            .key(self.cluster.key("token", &fp))
            .arg(owner)
            .arg(self.lease_ttl.as_millis() as u64);
        let (taken, issued, sealed): (i64, String, Vec<u8>) =
            self.cluster.eval(RedisOp::TokenLease, invocation).await?;
        let issued = Some(issued.as_str()).filter(|issued| !issued.is_empty());
        let sealed = Some(sealed.as_slice()).filter(|sealed| !sealed.is_empty());
        Some(Lease {
            taken: taken == 1,
            remote: self.remote(&fp, issued, sealed),
        })
    }

    /// Gives `key`'s lease back, if `owner` still holds it.
    pub async fn release(&self, key: &TokenKey, owner: &str) {
        let fp = self.fingerprint(key);
        let mut invocation = self.scripts.release.prepare_invoke();
        invocation
            .key(self.cluster.key("token-lease", &fp))
            .arg(owner);
        let _: Option<i64> = self.cluster.eval(RedisOp::TokenLease, invocation).await;
    }

    /// Stores `entry` unless Redis holds a newer one: `Some(true)` stored, `Some(false)` kept
    /// the newer, `None` Redis failed.
    pub async fn store(&self, key: &TokenKey, entry: &Entry) -> Option<bool> {
        let fp = self.fingerprint(key);
        let token_fp = self.token_fingerprint(&entry.token);
        let sealed = self.cluster.sealing.seal(&fp, &entry.to_stored());
        let left = entry
            .held
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let keep = (left + KEEP_AFTER_EXPIRY).as_millis() as u64;
        let mut invocation = self.scripts.store.prepare_invoke();
        invocation
            .key(self.cluster.key("token", &fp))
            .key(self.cluster.key("token-of", &token_fp))
            .arg(crate::token_cache::micros(entry.held.issued))
            .arg(&token_fp)
            .arg(sealed)
            .arg(keep)
            .arg(&fp);
        let stored: i64 = self.cluster.eval(RedisOp::TokenStore, invocation).await?;
        Some(stored == 1)
    }

    /// Drops `token` (refused by WeChat) wherever Redis holds it: under `key` when the
    /// replica knows it, else where the token index says. `Some(true)` if dropped.
    pub async fn drop_token(&self, key: Option<&TokenKey>, token: &str) -> Option<bool> {
        let token_fp = self.token_fingerprint(token);
        let fp = match key {
            Some(key) => self.fingerprint(key),
            None => {
                let mut find = redis::cmd("GET");
                find.arg(self.cluster.key("token-of", &token_fp));
                let mut connection = self.cluster.connection.clone();
                let fp: Option<String> = self
                    .cluster
                    .run_op(RedisOp::TokenDrop, find.query_async(&mut connection))
                    .await?;
                fp?
            }
        };
        let mut invocation = self.scripts.drop.prepare_invoke();
        invocation
            .key(self.cluster.key("token", &fp))
            .arg(&token_fp);
        let dropped: i64 = self.cluster.eval(RedisOp::TokenDrop, invocation).await?;
        Some(dropped == 1)
    }

    /// Counts a fetch of `key` on `day`; the count of all replicas, `None` when Redis failed.
    pub async fn count_fetch(&self, key: &TokenKey, day: u64) -> Option<u64> {
        let fp = self.fingerprint(key);
        let mut invocation = self.scripts.count.prepare_invoke();
        invocation
            .key(self.cluster.key("token-day", &format!("{fp}:{day}")))
            .arg(2 * 86_400_000_u64);
        self.cluster.eval(RedisOp::TokenCount, invocation).await
    }

    /// Reads what Redis answered for the entry whose fingerprint is `fp`.
    fn remote(&self, fp: &str, issued: Option<&str>, sealed: Option<&[u8]>) -> Remote {
        let Some(issued) = issued.and_then(|issued| issued.parse::<u64>().ok()) else {
            return Remote::Missing;
        };
        let Some(sealed) = sealed else {
            return Remote::Dropped {
                issued: crate::token_cache::from_micros(issued),
            };
        };
        let entry = self
            .cluster
            .sealing
            .open(fp, sealed)
            .ok()
            .and_then(|plain| Entry::from_stored(&plain));
        match entry {
            Some(entry) => Remote::Present(entry),
            None => {
                // Another cluster secret, or tampering: unusable, so as good as absent.
                tracing::warn!("a shared token did not open with this cluster secret: ignored (do all replicas share one cluster secret?)");
                Remote::Missing
            }
        }
    }
}

/// Takes the lease if free, and reads the entry in the same step, so that a replica that
/// takes the lease right after another stored a token sees that token.
///
/// `KEYS`: lease, entry. `ARGV`: owner, lease ms. Returns `{1 taken | 0 busy, i, s}` (empty
/// strings for what the entry lacks).
const LEASE: &str = r"
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local entry = redis.call('HMGET', KEYS[2], 'i', 's')
return {taken and 1 or 0, entry[1] or '', entry[2] or ''}
";

/// Gives the lease back, if this replica still holds it (it may have expired and been taken
/// by another).
///
/// `KEYS`: lease. `ARGV`: owner. Returns 1 if released.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Stores an entry unless Redis holds one as new or newer (or a newer tombstone).
///
/// `KEYS`: entry, token index. `ARGV`: issued µs, token fingerprint, sealed entry, ms to
/// keep, entry fingerprint. Returns 1 if stored.
const STORE: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'i') or '0')
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'i', ARGV[1], 't', ARGV[2], 's', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
return 1
";

/// Drops the entry if it still holds the refused token; keeps `i` as a tombstone.
///
/// `KEYS`: entry. `ARGV`: token fingerprint. Returns 1 if dropped.
const DROP: &str = r"
if redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 's', 't')
  return 1
end
return 0
";

/// Counts a fetch of the day.
///
/// `KEYS`: counter. `ARGV`: ms to keep. Returns the count.
const COUNT: &str = r"
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
";
