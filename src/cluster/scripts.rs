//! Every Lua script wxgate runs in Redis, each with what it is given (a struct naming its keys
//! and arguments) and what it answers (a named reply type, decoded once here). A feature
//! runs one with [`Cluster::eval`] and never sees a raw Redis reply.
//!
//! Each script is one atomic step on Redis's own clock (`TIME`), so clock skew between
//! replicas changes nothing. They are sent by hash (`EVALSHA`) and loaded again when Redis
//! has lost them (`redis::Script` does both). Times inside the scripts are microseconds since
//! the epoch, which a Lua number (a double) holds exactly; they are written back with `%.0f`,
//! since Lua's `tostring` would round them.
//!
//! # The epoch
//! The *epoch* is a random value the first replica writes (`SET NX`, in [`Heartbeat`]) into
//! a key without expiry. A Redis that restarted empty, or was flushed, has another epoch (or
//! none) than the one the replicas learned. Only the scripts that count quota turns check it
//! ([`TakeTurn`], and [`ClaimCode`] when a turn rides on the claim): their counters (a
//! bucket's theoretical arrival time, a pause) are what the quota bound rests on, and a
//! bucket found empty would hand out a fresh burst on top of the turns already spent in the
//! window. So they refuse to count under another epoch (`-1`), and the replica degrades, as
//! for an outage, until the replicas resume together at a window boundary. The other scripts
//! need no epoch: [`PauseBucket`] only holds calls back; [`Resume`] agrees on a time; a lost
//! code claim or remembered answer costs what losing the store costs (a replay then goes to
//! WeChat, as on a replica without Redis), and checking the epoch would not bring it back;
//! a token entry carries its own issue time and tombstone, and a replica holding a newer copy
//! stores it again, so nothing there depends on continuity.

use std::sync::LazyLock;
use std::time::Duration;

use redis::ScriptInvocation;

use super::{Cluster, KeyKind, RedisOp};

/// A script: its text, the operation it counts as, its keys and arguments in the order its
/// text reads them, and its reply decoded into a named type.
pub trait Script {
    /// What the script answers, decoded.
    type Reply;
    /// The reply as Redis sends it, read by redis-rs (a reply of another shape is an error
    /// of the operation, which degrades the replica).
    type Raw: redis::FromRedisValue;
    /// The `op` label of the Redis metrics.
    const OP: RedisOp;
    /// The script, loaded once per process.
    fn lua() -> &'static redis::Script;
    /// Appends the script's keys and arguments.
    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>);
    /// The reply, decoded.
    fn decode(&self, raw: Self::Raw) -> Self::Reply;
    /// Whether the reply says Redis lost the counters (another epoch): the replica then
    /// degrades.
    fn epoch_lost(_reply: &Self::Reply) -> bool {
        false
    }
}

/// The `redis::Script` of a text, made once.
macro_rules! lua {
    ($text:expr) => {{
        static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new($text));
        &SCRIPT
    }};
}

/// Microseconds, as the scripts count time (at least one for a positive duration).
fn micros(duration: Duration) -> u64 {
    duration.as_micros() as u64
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// The GCRA turn of [`TakeTurn`] as a Lua function, so that [`ClaimCode`] takes a turn the
/// same way: `turn(epoch key, bucket key, pause key, count key, expected epoch, interval µs,
/// tolerance µs, window µs)` returns `1, 0` (admitted), `0, µs` (not before that long), or
/// `-1, 0` (epoch lost). An admitted turn is also counted in the count key (a hash: `w` the
/// window's index, `n` its turns), what a learned limit rests on ([`ReadTurns`]).
macro_rules! gcra_turn {
    () => {
        r"
local function turn(epoch_key, bucket_key, pause_key, count_key, expected, interval, tolerance, window)
  local epoch = redis.call('GET', epoch_key)
  if epoch ~= expected then return -1, 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local paused = tonumber(redis.call('GET', pause_key) or '0')
  if paused > now then return 0, paused - now end
  local tat = tonumber(redis.call('GET', bucket_key) or '0')
  if tat < now then tat = now end
  local allowed_at = tat - tonumber(tolerance)
  if now < allowed_at then return 0, allowed_at - now end
  tat = tat + tonumber(interval)
  redis.call('SET', bucket_key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  local w = string.format('%.0f', math.floor(now / tonumber(window)))
  if redis.call('HGET', count_key, 'w') == w then
    redis.call('HINCRBY', count_key, 'n', 1)
  else
    redis.call('HSET', count_key, 'w', w, 'n', 1)
  end
  redis.call('PEXPIRE', count_key, math.floor(2 * tonumber(window) / 1000) + 1)
  return 1, 0
end
"
    };
}

// ---------------------------------------------------------------------------------------
// The replica: heartbeat and resumption.

/// A replica's heartbeat: it counts itself live, and learns the epoch and how many replicas
/// are live; unless its cluster secret differs from the live replicas' (their secret check,
/// a fingerprint under the secret, stands for as long as a heartbeat counts): then it is not
/// counted.
///
/// `KEYS`: epoch, replicas (a sorted set of replica ids by last heartbeat, ms), secret check.
/// `ARGV`: this replica's id, how long a heartbeat counts (ms), a fresh epoch to write if
/// there is none, this replica's secret check. Returns `{epoch, live replicas, check}`
/// (`live replicas` is -1 when the checks differ).
const HEARTBEAT: &str = r"
redis.call('SET', KEYS[3], ARGV[4], 'NX', 'PX', ARGV[2])
local check = redis.call('GET', KEYS[3])
if check ~= ARGV[4] then return {'', -1, check} end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('SET', KEYS[1], ARGV[3], 'NX')
local epoch = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return {epoch, redis.call('ZCARD', KEYS[2]), check}
";

/// [`HEARTBEAT`].
pub(super) struct Heartbeat<'a> {
    pub(super) replica: &'a str,
    pub(super) ttl: Duration,
    pub(super) fresh_epoch: &'a str,
    pub(super) secret_check: &'a str,
}

/// What a heartbeat learned.
pub(super) struct HeartbeatReply {
    /// The epoch the replicas count under.
    pub(super) epoch: String,
    /// Live replicas; `None` when they use another cluster secret (this one is not counted).
    pub(super) replicas: Option<u32>,
}

impl Script for Heartbeat<'_> {
    type Reply = HeartbeatReply;
    type Raw = (String, i64, String);
    const OP: RedisOp = RedisOp::Heartbeat;

    fn lua() -> &'static redis::Script {
        lua!(HEARTBEAT)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.named("epoch"))
            .key(cluster.named("replicas"))
            .key(cluster.named("secret"))
            .arg(self.replica)
            .arg(millis(self.ttl))
            .arg(self.fresh_epoch)
            .arg(self.secret_check);
    }

    fn decode(&self, (epoch, replicas, _check): Self::Raw) -> HeartbeatReply {
        HeartbeatReply {
            epoch,
            replicas: u32::try_from(replicas).ok(),
        }
    }
}

/// When degraded replicas go back to shared counting: all at the same window boundary, at
/// least `margin` away, so that every replica has seen Redis again by then and no window
/// holds both a replica's local count and the shared one.
///
/// `KEYS`: resume. `ARGV`: window µs, margin µs. Returns the µs until the resumption.
const RESUME: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current > now then return current - now end
local window = tonumber(ARGV[1])
local at = (math.floor(now / window) + 1) * window
if at - now < tonumber(ARGV[2]) then at = at + window end
redis.call('SET', KEYS[1], string.format('%.0f', at), 'PX', math.floor((at - now + window) / 1000) + 1)
return at - now
";

/// [`RESUME`]; answers how long until shared counting resumes.
pub(super) struct Resume {
    pub(super) window: Duration,
    pub(super) margin: Duration,
}

impl Script for Resume {
    type Reply = Duration;
    type Raw = u64;
    const OP: RedisOp = RedisOp::Resume;

    fn lua() -> &'static redis::Script {
        lua!(RESUME)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.named("resume"))
            .arg(micros(self.window))
            .arg(micros(self.margin));
    }

    fn decode(&self, micros: u64) -> Duration {
        Duration::from_micros(micros)
    }
}

// ---------------------------------------------------------------------------------------
// Quota.

/// The shared GCRA of one (appid, API), and its 45011 pause.
///
/// `KEYS`: epoch, bucket (the theoretical arrival time, TAT), pause (its end), count (the
/// turns of the current window).
/// `ARGV`: expected epoch, emission interval µs, burst tolerance µs (`(burst − 1) ×
/// interval`), window µs.
/// Returns `{1, 0}` (admitted), `{0, µs}` (not before that long), or `{-1, 0}` (epoch lost).
///
/// GCRA: a call at `now` conforms if `now ≥ TAT − tolerance`; it then moves TAT to
/// `max(TAT, now) + interval`. This is governor's algorithm, so the single-process bound
/// carries over: at most `burst + L / interval − 1` calls in any span `L`, which the
/// interval wxgate picks makes `per_window` per window.
const QUOTA: &str = concat!(
    gcra_turn!(),
    r"
local admitted, wait = turn(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return {admitted, wait}
"
);

/// A GCRA bucket of the shared quota: the fingerprint its keys are named by (`q:` its
/// theoretical arrival time, `p:` its pause, `qn:` its turns this window), its emission
/// interval, its burst and its window.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// Names the bucket's keys; says nothing of the (appid, API) behind it.
    pub fingerprint: String,
    /// One turn every `interval` once the burst is spent.
    pub interval: Duration,
    /// Turns that may be taken at once.
    pub burst: u32,
    /// The window its turns are counted in.
    pub window: Duration,
}

impl Bucket {
    /// The four keys and four arguments of a turn ([`gcra_turn!`]), after any the
    /// invocation has.
    fn write_turn(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        let interval = micros(self.interval).max(1);
        invocation
            .key(cluster.named("epoch"))
            .key(cluster.key(KeyKind::QuotaBucket, &self.fingerprint))
            .key(cluster.key(KeyKind::QuotaPause, &self.fingerprint))
            .key(cluster.key(KeyKind::QuotaCount, &self.fingerprint))
            .arg(cluster.epoch())
            .arg(interval)
            .arg(interval * u64::from(self.burst.max(1) - 1))
            .arg(micros(self.window).max(1));
    }
}

/// What a quota turn came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnReply {
    /// The turn is taken: the call may go.
    Taken,
    /// No turn before this long.
    NotBefore(Duration),
    /// Redis lost the counters (another epoch): nothing was counted, and the replica is
    /// degraded now.
    EpochLost,
}

impl TurnReply {
    fn from_script(admitted: i64, wait: i64) -> TurnReply {
        match admitted {
            1 => TurnReply::Taken,
            0 => TurnReply::NotBefore(Duration::from_micros(wait.max(1) as u64)),
            _ => TurnReply::EpochLost,
        }
    }
}

/// [`QUOTA`]: one turn of a bucket.
pub struct TakeTurn<'a>(pub &'a Bucket);

impl Script for TakeTurn<'_> {
    type Reply = TurnReply;
    type Raw = (i64, i64);
    const OP: RedisOp = RedisOp::Quota;

    fn lua() -> &'static redis::Script {
        lua!(QUOTA)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        self.0.write_turn(cluster, invocation);
    }

    fn decode(&self, (admitted, wait): Self::Raw) -> TurnReply {
        TurnReply::from_script(admitted, wait)
    }

    fn epoch_lost(reply: &TurnReply) -> bool {
        *reply == TurnReply::EpochLost
    }
}

/// Pauses one (appid, API) until WeChat's next window, after a 45011.
///
/// `KEYS`: pause. `ARGV`: window µs. Returns the µs until the pause ends.
const PAUSE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local resume = (math.floor(now / window) + 1) * window
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if resume > current then
  redis.call('SET', KEYS[1], string.format('%.0f', resume), 'PX', math.floor((resume - now) / 1000) + 1)
else
  resume = current
end
return resume - now
";

/// [`PAUSE`] of the bucket named by `fingerprint`; answers how long the pause lasts.
pub struct PauseBucket<'a> {
    /// The bucket's fingerprint.
    pub fingerprint: &'a str,
    /// WeChat's window: the pause ends at the next boundary.
    pub window: Duration,
}

impl Script for PauseBucket<'_> {
    type Reply = Duration;
    type Raw = u64;
    const OP: RedisOp = RedisOp::Pause;

    fn lua() -> &'static redis::Script {
        lua!(PAUSE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::QuotaPause, self.fingerprint))
            .arg(micros(self.window));
    }

    fn decode(&self, micros: u64) -> Duration {
        Duration::from_micros(micros)
    }
}

// ---------------------------------------------------------------------------------------
// Code exchanges. Per exchange, up to four keys named by its fingerprint: `ca:` the
// remembered answer, `cl:` the claim, `cw:` a flag that other replicas wait, `cr:` the
// holder's result for late waiters; and the channel `cn:` its result is published on.

/// Looks for a remembered answer of a code exchange, or claims the exchange, in one round
/// trip; when the claim is won and the call's quota turn is given (keys 4 to 6), takes that
/// turn too ([`QUOTA`]'s GCRA), so that the leader of an exchange needs no round trip of its
/// own for its first turn.
///
/// `KEYS`: answer, claim, waiters, and optionally the quota's epoch, bucket, pause and count.
/// `ARGV`: this claim's owner, lease ms, and with the quota's keys its expected epoch,
/// interval µs, tolerance µs and window µs.
/// Returns `{found, sealed answer, admitted, wait µs}`: `{1, sealed, 0, 0}` (remembered),
/// `{2, '', admitted, wait}` (claimed: call WeChat; the turn as [`QUOTA`] returns it, or
/// `0, 0` when none was asked for), or `{3, '', 0, 0}` (another replica holds the claim;
/// this one is now noted as waiting, so that the holder publishes its answer).
const CODE_CLAIM: &str = concat!(
    gcra_turn!(),
    r"
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer, 0, 0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', KEYS[3], '1', 'PX', redis.call('PTTL', KEYS[2]) + 1000)
  return {3, '', 0, 0}
end
if #KEYS < 7 then return {2, '', 0, 0} end
local admitted, wait = turn(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return {2, '', admitted, wait}
"
);

/// [`CODE_CLAIM`].
pub struct ClaimCode<'a> {
    /// The exchange's fingerprint.
    pub fingerprint: &'a str,
    /// Who claims (a fresh [`super::owner_id`]).
    pub owner: &'a str,
    /// How long the claim holds unless renewed.
    pub lease: Duration,
    /// The bucket whose turn the claim takes along when it is won.
    pub turn: Option<&'a Bucket>,
}

/// What a claim found.
#[derive(Debug)]
pub enum ClaimReply {
    /// A definitive answer another replica remembered, sealed.
    Remembered(Vec<u8>),
    /// The claim is this replica's: it calls WeChat, then completes it. With the turn taken
    /// along, when one was given.
    Claimed {
        /// What the turn came to; `None` when no turn was given.
        turn: Option<TurnReply>,
    },
    /// Another replica holds the claim; this one is noted as waiting for its result.
    HeldElsewhere,
}

impl Script for ClaimCode<'_> {
    type Reply = ClaimReply;
    type Raw = (i64, Vec<u8>, i64, i64);
    const OP: RedisOp = RedisOp::CodeClaim;

    fn lua() -> &'static redis::Script {
        lua!(CODE_CLAIM)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::CodeAnswer, self.fingerprint))
            .key(cluster.key(KeyKind::CodeClaim, self.fingerprint))
            .key(cluster.key(KeyKind::CodeWaiters, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.lease));
        if let Some(bucket) = self.turn {
            // Keys 4 to 7 and arguments 3 to 6.
            bucket.write_turn(cluster, invocation);
        }
    }

    fn decode(&self, (found, sealed, admitted, wait): Self::Raw) -> ClaimReply {
        match found {
            1 => ClaimReply::Remembered(sealed),
            // Without a turn given, the script says `0, 0`, which means nothing.
            2 => ClaimReply::Claimed {
                turn: self.turn.map(|_| TurnReply::from_script(admitted, wait)),
            },
            _ => ClaimReply::HeldElsewhere,
        }
    }

    fn epoch_lost(reply: &ClaimReply) -> bool {
        matches!(
            reply,
            ClaimReply::Claimed {
                turn: Some(TurnReply::EpochLost)
            }
        )
    }
}

/// What a waiting replica finds: a remembered answer, the result its holder left for
/// waiters, or whether the claim still stands.
///
/// `KEYS`: answer, claim, result. Returns `{1, sealed}` (remembered), `{4, sealed}` (the
/// holder's result, not remembered), `{3, ''}` (still claimed), or `{0, ''}` (nothing: the
/// holder went away).
const CODE_PEEK: &str = r"
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer} end
local result = redis.call('GET', KEYS[3])
if result then return {4, result} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {3, ''} end
return {0, ''}
";

/// [`CODE_PEEK`].
pub struct PeekCode<'a> {
    /// The exchange's fingerprint.
    pub fingerprint: &'a str,
}

/// What a waiting replica found.
#[derive(Debug)]
pub enum PeekReply {
    /// The exchange's answer, sealed: remembered, or the holder's result for its waiters.
    Answer(Vec<u8>),
    /// Still claimed: the holder is calling.
    Claimed,
    /// Neither an answer nor a claim: the holder went away.
    Gone,
}

impl Script for PeekCode<'_> {
    type Reply = PeekReply;
    type Raw = (i64, Vec<u8>);
    const OP: RedisOp = RedisOp::CodePeek;

    fn lua() -> &'static redis::Script {
        lua!(CODE_PEEK)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::CodeAnswer, self.fingerprint))
            .key(cluster.key(KeyKind::CodeClaim, self.fingerprint))
            .key(cluster.key(KeyKind::CodeResult, self.fingerprint));
    }

    fn decode(&self, (found, sealed): Self::Raw) -> PeekReply {
        match found {
            1 | 4 => PeekReply::Answer(sealed),
            3 => PeekReply::Claimed,
            _ => PeekReply::Gone,
        }
    }
}

/// Extends a claim while its holder still calls WeChat (only the owner can).
///
/// `KEYS`: claim. `ARGV`: owner, lease ms. Returns 1 if extended.
const CODE_RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// [`CODE_RENEW`]; answers whether the claim was extended.
pub struct RenewClaim<'a> {
    /// The exchange's fingerprint.
    pub fingerprint: &'a str,
    /// The claim's owner.
    pub owner: &'a str,
    /// The lease from now.
    pub lease: Duration,
}

impl Script for RenewClaim<'_> {
    type Reply = bool;
    type Raw = i64;
    const OP: RedisOp = RedisOp::CodeRenew;

    fn lua() -> &'static redis::Script {
        lua!(CODE_RENEW)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::CodeClaim, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.lease));
    }

    fn decode(&self, extended: i64) -> bool {
        extended == 1
    }
}

/// Ends a claim with WeChat's answer: remembers it if it is definitive, releases the claim
/// (only the owner can), and, if other replicas wait, leaves the result for them a short
/// while and publishes it.
///
/// `KEYS`: answer, claim, waiters, result. `ARGV`: owner, sealed answer, remember ms (0:
/// not definitive), result ms, channel. Returns the waiting replicas notified.
const CODE_COMPLETE: &str = r"
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[4])
  return redis.call('PUBLISH', ARGV[5], ARGV[2])
end
return 0
";

/// [`CODE_COMPLETE`]; answers how many replicas were told.
pub struct CompleteClaim<'a> {
    /// The exchange's fingerprint.
    pub fingerprint: &'a str,
    /// The claim's owner.
    pub owner: &'a str,
    /// The answer, sealed.
    pub sealed: &'a [u8],
    /// How long it is remembered; zero: not at all (it was not definitive).
    pub remember: Duration,
    /// How long it is left for waiters that look late.
    pub for_waiters: Duration,
}

impl Script for CompleteClaim<'_> {
    type Reply = u64;
    type Raw = u64;
    const OP: RedisOp = RedisOp::CodeComplete;

    fn lua() -> &'static redis::Script {
        lua!(CODE_COMPLETE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::CodeAnswer, self.fingerprint))
            .key(cluster.key(KeyKind::CodeClaim, self.fingerprint))
            .key(cluster.key(KeyKind::CodeWaiters, self.fingerprint))
            .key(cluster.key(KeyKind::CodeResult, self.fingerprint))
            .arg(self.owner)
            .arg(self.sealed)
            .arg(millis(self.remember))
            .arg(millis(self.for_waiters))
            .arg(cluster.key(KeyKind::CodeChannel, self.fingerprint));
    }

    fn decode(&self, notified: u64) -> u64 {
        notified
    }
}

// ---------------------------------------------------------------------------------------
// Access tokens. Per (API, appid), named by its fingerprint: `token:` a hash of `i` (when
// the fetch that minted the token was sent, µs), `t` (the token's own fingerprint) and `s`
// (the entry, sealed); `token-lease:` the replica fetching it now; `token-day:` the day's
// fetches. And `token-of:` (by the token's fingerprint) the entry's fingerprint.

/// What Redis holds for one token key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRecord {
    /// Nothing.
    Missing,
    /// A tombstone: a token minted then was refused, and dropped.
    Dropped {
        /// When the refused token's fetch was sent, µs since the epoch.
        issued_micros: u64,
    },
    /// A token entry.
    Sealed {
        /// When its fetch was sent, µs since the epoch.
        issued_micros: u64,
        /// The entry, sealed.
        sealed: Vec<u8>,
    },
}

impl TokenRecord {
    /// From the hash's `i` and `s` (absent or empty: not there).
    fn from_hash(issued: Option<String>, sealed: Option<Vec<u8>>) -> TokenRecord {
        let Some(issued_micros) = issued.and_then(|issued| issued.parse().ok()) else {
            return TokenRecord::Missing;
        };
        match sealed.filter(|sealed| !sealed.is_empty()) {
            None => TokenRecord::Dropped { issued_micros },
            Some(sealed) => TokenRecord::Sealed {
                issued_micros,
                sealed,
            },
        }
    }
}

/// Reads a token entry's issue time and sealed value.
///
/// `KEYS`: entry. Returns `{i, s}` (nil for what the entry lacks).
const TOKEN_READ: &str = r"
return redis.call('HMGET', KEYS[1], 'i', 's')
";

/// [`TOKEN_READ`].
pub struct ReadToken<'a> {
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
}

impl Script for ReadToken<'_> {
    type Reply = TokenRecord;
    type Raw = (Option<String>, Option<Vec<u8>>);
    const OP: RedisOp = RedisOp::TokenRead;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_READ)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation.key(cluster.key(KeyKind::Token, self.fingerprint));
    }

    fn decode(&self, (issued, sealed): Self::Raw) -> TokenRecord {
        TokenRecord::from_hash(issued, sealed)
    }
}

/// Takes the lease if free, and reads the entry in the same step, so that a replica that
/// takes the lease right after another stored a token sees that token.
///
/// `KEYS`: lease, entry. `ARGV`: owner, lease ms. Returns `{1 taken | 0 busy, i, s}` (empty
/// strings for what the entry lacks).
const TOKEN_LEASE: &str = r"
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local entry = redis.call('HMGET', KEYS[2], 'i', 's')
return {taken and 1 or 0, entry[1] or '', entry[2] or ''}
";

/// [`TOKEN_LEASE`].
pub struct TakeLease<'a> {
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// Who takes it (a fresh [`super::owner_id`]).
    pub owner: &'a str,
    /// How long it lasts.
    pub ttl: Duration,
}

/// What trying a lease found.
#[derive(Debug)]
pub struct LeaseReply {
    /// This replica holds the lease now (and must give it back).
    pub taken: bool,
    /// What Redis held when the lease was tried.
    pub record: TokenRecord,
}

impl Script for TakeLease<'_> {
    type Reply = LeaseReply;
    type Raw = (i64, String, Vec<u8>);
    const OP: RedisOp = RedisOp::TokenLease;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_LEASE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::TokenLease, self.fingerprint))
            .key(cluster.key(KeyKind::Token, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.ttl));
    }

    fn decode(&self, (taken, issued, sealed): Self::Raw) -> LeaseReply {
        LeaseReply {
            taken: taken == 1,
            record: TokenRecord::from_hash(Some(issued), Some(sealed)),
        }
    }
}

/// Gives the lease back, if this replica still holds it (it may have expired and been taken
/// by another).
///
/// `KEYS`: lease. `ARGV`: owner. Returns 1 if released.
const TOKEN_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// [`TOKEN_RELEASE`]; answers whether the lease was released.
pub struct ReleaseLease<'a> {
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// The lease's owner.
    pub owner: &'a str,
}

impl Script for ReleaseLease<'_> {
    type Reply = bool;
    type Raw = i64;
    const OP: RedisOp = RedisOp::TokenLease;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_RELEASE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::TokenLease, self.fingerprint))
            .arg(self.owner);
    }

    fn decode(&self, released: i64) -> bool {
        released == 1
    }
}

/// Stores an entry unless Redis holds one as new or newer (or a newer tombstone).
///
/// `KEYS`: entry, token index. `ARGV`: issued µs, token fingerprint, sealed entry, ms to
/// keep, entry fingerprint. Returns 1 if stored.
const TOKEN_STORE: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'i') or '0')
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'i', ARGV[1], 't', ARGV[2], 's', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
return 1
";

/// [`TOKEN_STORE`]; answers whether the entry was stored (`false`: Redis holds a newer one).
pub struct StoreToken<'a> {
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// The token's own fingerprint.
    pub token_fingerprint: &'a str,
    /// When the token's fetch was sent, µs since the epoch.
    pub issued_micros: u64,
    /// The entry, sealed.
    pub sealed: &'a [u8],
    /// How long Redis keeps the entry and its index.
    pub keep: Duration,
}

impl Script for StoreToken<'_> {
    type Reply = bool;
    type Raw = i64;
    const OP: RedisOp = RedisOp::TokenStore;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_STORE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::Token, self.fingerprint))
            .key(cluster.key(KeyKind::TokenOf, self.token_fingerprint))
            .arg(self.issued_micros)
            .arg(self.token_fingerprint)
            .arg(self.sealed)
            .arg(millis(self.keep))
            .arg(self.fingerprint);
    }

    fn decode(&self, stored: i64) -> bool {
        stored == 1
    }
}

/// Finds the entry that holds a token, by the token's fingerprint.
///
/// `KEYS`: token index. Returns the entry's fingerprint, or nil.
const TOKEN_FIND: &str = r"
return redis.call('GET', KEYS[1])
";

/// [`TOKEN_FIND`]; answers the fingerprint of the entry holding the token, if any.
pub struct FindToken<'a> {
    /// The token's own fingerprint.
    pub token_fingerprint: &'a str,
}

impl Script for FindToken<'_> {
    type Reply = Option<String>;
    type Raw = Option<String>;
    const OP: RedisOp = RedisOp::TokenDrop;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_FIND)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation.key(cluster.key(KeyKind::TokenOf, self.token_fingerprint));
    }

    fn decode(&self, fingerprint: Option<String>) -> Option<String> {
        fingerprint
    }
}

/// Drops the entry if it still holds the refused token; keeps `i` as a tombstone.
///
/// `KEYS`: entry. `ARGV`: token fingerprint. Returns 1 if dropped.
const TOKEN_DROP: &str = r"
if redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 's', 't')
  return 1
end
return 0
";

/// [`TOKEN_DROP`]; answers whether the entry held the token and was dropped.
pub struct DropToken<'a> {
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// The refused token's own fingerprint.
    pub token_fingerprint: &'a str,
}

impl Script for DropToken<'_> {
    type Reply = bool;
    type Raw = i64;
    const OP: RedisOp = RedisOp::TokenDrop;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_DROP)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::Token, self.fingerprint))
            .arg(self.token_fingerprint);
    }

    fn decode(&self, dropped: i64) -> bool {
        dropped == 1
    }
}

/// Counts a fetch of the day.
///
/// `KEYS`: counter. `ARGV`: ms to keep. Returns the count.
const TOKEN_COUNT: &str = r"
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
";

/// [`TOKEN_COUNT`]; answers the count of all replicas' fetches that day.
pub struct CountFetch<'a> {
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// The day (days since the epoch, in WeChat's time zone).
    pub day: u64,
}

impl Script for CountFetch<'_> {
    type Reply = u64;
    type Raw = u64;
    const OP: RedisOp = RedisOp::TokenCount;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_COUNT)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        let day = format!("{}:{}", self.fingerprint, self.day);
        invocation
            .key(cluster.key(KeyKind::TokenDay, &day))
            .arg(2 * 86_400_000_u64);
    }

    fn decode(&self, count: u64) -> u64 {
        count
    }
}

// ---------------------------------------------------------------------------------------
// Limits per key. Per (appid, API), named by its quota fingerprint: `ls:` WeChat's answer to
// quota/get about it, sealed; `ll:` the lease of the one replica asking; `lr:` a limit
// learned from 45011, sealed; and `qn:` the turns of its current window (above).

/// Reads WeChat's answer about a key, or, when asked to, takes the lease to ask for it: the
/// lease lasts the discovery interval and is never given back, so that one query per key per
/// interval goes out across the replicas.
///
/// `KEYS`: answer, lease. `ARGV`: owner, lease ms, `1` to take the lease (else `0`).
/// Returns `{1, sealed}` (an answer), `{2, ''}` (the lease taken: ask), `{3, ''}` (neither:
/// another replica asks now, or the lease was not to be taken).
const LIMIT_LEASE: &str = r"
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer} end
if ARGV[3] == '1' and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, ''}
end
return {3, ''}
";

/// [`LIMIT_LEASE`].
pub struct LeaseLimit<'a> {
    /// The key's quota fingerprint.
    pub fingerprint: &'a str,
    /// Who takes the lease (a fresh [`super::owner_id`]).
    pub owner: &'a str,
    /// How long it lasts: the discovery interval.
    pub lease: Duration,
    /// Whether to take it (this replica holds a token to ask with).
    pub take: bool,
}

/// What [`LeaseLimit`] found.
#[derive(Debug)]
pub enum LimitLeaseReply {
    /// Another replica's answer of WeChat's, sealed.
    Stated(Vec<u8>),
    /// The lease is this replica's: it asks WeChat, then stores the answer.
    Taken,
    /// No answer yet, and the lease is not this replica's.
    Busy,
}

impl Script for LeaseLimit<'_> {
    type Reply = LimitLeaseReply;
    type Raw = (i64, Vec<u8>);
    const OP: RedisOp = RedisOp::LimitLease;

    fn lua() -> &'static redis::Script {
        lua!(LIMIT_LEASE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::LimitStated, self.fingerprint))
            .key(cluster.key(KeyKind::LimitLease, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.lease).max(1))
            .arg(if self.take { "1" } else { "0" });
    }

    fn decode(&self, (found, sealed): Self::Raw) -> LimitLeaseReply {
        match found {
            1 => LimitLeaseReply::Stated(sealed),
            2 => LimitLeaseReply::Taken,
            _ => LimitLeaseReply::Busy,
        }
    }
}

/// Which record of a key's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitRecord {
    /// WeChat's answer to quota/get.
    Stated,
    /// A limit learned from 45011.
    Learned,
}

impl LimitRecord {
    fn kind(self) -> KeyKind {
        match self {
            LimitRecord::Stated => KeyKind::LimitStated,
            LimitRecord::Learned => KeyKind::LimitLearned,
        }
    }
}

/// Stores a key's record, sealed, for a while.
///
/// `KEYS`: record. `ARGV`: sealed record, ms to keep. Returns 1.
const LIMIT_STORE: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// [`LIMIT_STORE`].
pub struct StoreLimit<'a> {
    /// Which record.
    pub record: LimitRecord,
    /// The key's quota fingerprint.
    pub fingerprint: &'a str,
    /// The record, sealed for `record`'s Redis key.
    pub sealed: &'a [u8],
    /// How long Redis keeps it.
    pub keep: Duration,
}

impl Script for StoreLimit<'_> {
    type Reply = ();
    type Raw = i64;
    const OP: RedisOp = RedisOp::LimitStore;

    fn lua() -> &'static redis::Script {
        lua!(LIMIT_STORE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(self.record.kind(), self.fingerprint))
            .arg(self.sealed)
            .arg(millis(self.keep).max(1));
    }

    fn decode(&self, _stored: i64) {}
}

/// The Redis key a record is sealed for (its associated data, so that a record moved to
/// another key does not open).
pub fn limit_record_key(cluster: &Cluster, record: LimitRecord, fingerprint: &str) -> String {
    cluster.key(record.kind(), fingerprint)
}

/// Reads the learned limits of several keys at once.
///
/// `KEYS`: records. Returns their values (`false` for none).
const LIMIT_READ: &str = r"
return redis.call('MGET', unpack(KEYS))
";

/// [`LIMIT_READ`], for at most a few hundred keys (Lua's `unpack` takes a few thousand).
pub struct ReadLearned<'a> {
    /// The keys' quota fingerprints.
    pub fingerprints: &'a [String],
}

impl Script for ReadLearned<'_> {
    type Reply = Vec<Option<Vec<u8>>>;
    type Raw = Vec<Option<Vec<u8>>>;
    const OP: RedisOp = RedisOp::LimitRead;

    fn lua() -> &'static redis::Script {
        lua!(LIMIT_READ)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        for fingerprint in self.fingerprints {
            invocation.key(cluster.key(KeyKind::LimitLearned, fingerprint));
        }
    }

    fn decode(&self, records: Self::Raw) -> Self::Reply {
        records
    }
}

/// The turns all replicas took of a bucket in its current window (its count key, written by
/// every turn: [`gcra_turn!`]).
///
/// `KEYS`: count. `ARGV`: window µs. Returns the turns.
const QUOTA_COUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local w = string.format('%.0f', math.floor(now / tonumber(ARGV[1])))
if redis.call('HGET', KEYS[1], 'w') == w then
  return tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
end
return 0
";

/// [`QUOTA_COUNT`]. The count is plain: tampered with, it can only move a learned limit
/// between its floor and the configured figure, as losing Redis would.
pub struct ReadTurns<'a> {
    /// The bucket's fingerprint.
    pub fingerprint: &'a str,
    /// Its window.
    pub window: Duration,
}

impl Script for ReadTurns<'_> {
    type Reply = u32;
    type Raw = i64;
    const OP: RedisOp = RedisOp::LimitStore;

    fn lua() -> &'static redis::Script {
        lua!(QUOTA_COUNT)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .key(cluster.key(KeyKind::QuotaCount, self.fingerprint))
            .arg(micros(self.window).max(1));
    }

    fn decode(&self, turns: i64) -> u32 {
        u32::try_from(turns).unwrap_or(0)
    }
}
