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
//! # The epochs
//! An *epoch* is a random value written into a key without expiry; a Redis that restarted
//! empty, was flushed, or failed over to a replica that had not received the key, has
//! another epoch (or none) than the one the replicas learned.
//!
//! - **The replicas' epoch** (`epoch:{replicas}`), written by the first [`Heartbeat`]: every
//!   heartbeat reads it, and a replica that finds it changed degrades and resumes shared
//!   counting at a window boundary agreed with the others. On one Redis this notices a
//!   restart within a heartbeat.
//! - **A bucket's epoch** (`qe:{tag}...`, one per quota bucket), which every quota turn
//!   reads in the bucket's own slot ([`TakeTurn`], and [`ClaimCode`] when a turn rides on
//!   the claim): on Redis Cluster one shard can fail over and lose its recent writes while
//!   the replicas' epoch, on another shard, lives on. A replica remembers each bucket's epoch
//!   it counted under; a turn that finds another (or none) tells it that Redis lost the
//!   bucket, whose theoretical arrival time is what the quota bound rests on (a bucket found
//!   empty hands out a fresh burst on top of the turns already spent in the window). The
//!   script then holds the bucket until the next window boundary, in Redis, for every
//!   replica: the window of the loss counts as spent, as a degraded replica counts the window
//!   it degraded in. What stays undetected: a loss that only replicas which never counted in
//!   that bucket meet (a replica that restarted meanwhile, say) takes fresh turns until a
//!   replica that knew the bucket takes one; and a failover that keeps the bucket's epoch
//!   but loses the bucket's last writes (asynchronous replication: those within the
//!   replication lag) hands those few turns out again. Either overshoots that key's window
//!   by at most the turns lost, which WeChat's 45011, held until its next window, absorbs.
//!
//! The other scripts need no epoch: [`PauseBucket`] only holds calls back; [`Resume`]
//! agrees on a time; a lost code claim or remembered answer costs what losing the store
//! costs (a replay then goes to WeChat, as on a replica without Redis), and checking an
//! epoch would not bring it back; a token entry carries its own issue time and tombstone,
//! and a replica holding a newer copy stores it again, so nothing there depends on
//! continuity.
//!
//! # What the scripts read back
//! Anybody who can write to Redis can write these keys, without the cluster secret. What
//! matters is sealed ([`super::sealing`]) or carries a MAC, checked by the replica after the
//! script (Lua has no HMAC): answers, token entries, heartbeats. What a script compares as
//! it is (a theoretical arrival time, a pause, a resumption, a lease, a claim) is bounded by
//! what a replica can have written, and what lies past that bound (or is not even a value of
//! the key's type) is dropped or clamped and reported back (`forged` in the replies,
//! [`Script::forged`]), so that a forged value holds a key for about a window at most. The
//! threat model in `docs/replicas.md` says, key by key, what a writer without the secret
//! can and cannot do.

use std::sync::LazyLock;
use std::time::Duration;

use super::{Cluster, Invocation, KeyKind, RedisOp, Tag};

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
    /// Appends the script's keys (all of one [`Tag`]: see [`Cluster::key`]) and arguments.
    fn write(&self, cluster: &Cluster, invocation: &mut Invocation);
    /// The reply, decoded.
    fn decode(&self, raw: Self::Raw) -> Self::Reply;
    /// For a script that counts quota turns: the key of its bucket's epoch (see "The
    /// epoch").
    fn epoch_key(&self, _cluster: &Cluster) -> Option<String> {
        None
    }
    /// The epoch the bucket is under now, as the reply says, and whether the replica's
    /// known one was lost (the script then held the bucket until the next window boundary).
    fn epoch_seen(_raw: &Self::Raw) -> Option<(String, bool)> {
        None
    }
    /// What the script found that no replica wrote, if anything (out of the range replicas
    /// write, or not even a value of the key's type): it has dropped or clamped it, and
    /// [`Cluster::eval`] counts it as forged.
    fn forged(_raw: &Self::Raw) -> Option<&'static str> {
        None
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

/// Two checks on keys replicas write with an expiry: `text(key)` reads a string key, and
/// returns it (false when absent) and 1 when the key held a value of another type, which it
/// then deletes; `lease_left(key, lease ms)` returns the key's PTTL, and 1 when it had no
/// expiry or one longer than twice `lease`, which no replica writes: it is then deleted (and
/// the PTTL is -2, absent).
macro_rules! kept_keys {
    () => {
        r"
local function text(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'string' then return value, 0 end
  if value then
    redis.call('DEL', key)
    return false, 1
  end
  return false, 0
end
local function lease_left(key, lease)
  local left = redis.call('PTTL', key)
  if left == -1 or left > 2 * tonumber(lease) then
    redis.call('DEL', key)
    return -2, 1
  end
  return left, 0
end
"
    };
}

/// Reads a time a replica stored (µs) in a string key: `stored_time(key)` returns the time
/// (nil when the key is absent) and whether the key held something no replica writes (not a
/// number, or a key of another type), which it then deletes.
macro_rules! stored_time {
    () => {
        r"
local function stored_time(key)
  local raw = redis.pcall('GET', key)
  if raw == false then return nil, false end
  local value = type(raw) == 'string' and tonumber(raw) or nil
  if value == nil then
    redis.call('DEL', key)
    return nil, true
  end
  return value, false
end
"
    };
}

/// The GCRA turn of [`TakeTurn`] as a Lua function, so that [`ClaimCode`] takes a turn the
/// same way: `turn(epoch key, bucket key, pause key, count key, expected epoch, fresh epoch,
/// interval µs, tolerance µs, window µs)` returns `1, 0` (admitted) or `0, µs` (not before
/// that long), then 1 when it found a state no replica wrote, the bucket's epoch, and 1 when
/// the expected epoch was lost. An admitted turn is also counted in the count key (a hash:
/// `w` the window's index, `n` its turns), what a learned limit rests on ([`ReadTurns`]); a
/// count key of another type is dropped and reported.
///
/// The bucket's epoch (see "The epochs"): written with `fresh` when there is none; when it
/// is not the `expected` one (empty: this replica knows none yet), Redis lost the bucket,
/// which is then held until the next window boundary.
///
/// What it reads is bounded by what a replica can have written: a pause ends at the next
/// window boundary, so one further than a window ahead is dropped; a theoretical arrival
/// time is at most `tolerance + interval` ahead (a window for any limit that gives a turn a
/// window), so one further than the larger of the two is clamped to it and written back. A
/// forged state holds a key for at most about a window.
macro_rules! gcra_turn {
    () => {
        concat!(
            stored_time!(),
            r"
local function turn(epoch_key, bucket_key, pause_key, count_key, expected, fresh, interval, tolerance, window)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  interval, tolerance, window = tonumber(interval), tonumber(tolerance), tonumber(window)
  local paused, forged = stored_time(pause_key)
  if paused and paused > now + window then
    redis.call('DEL', pause_key)
    paused, forged = nil, true
  end
  local epoch = redis.pcall('GET', epoch_key)
  if type(epoch) ~= 'string' then
    if epoch then
      redis.call('DEL', epoch_key)
      forged = true
    end
    epoch = fresh
    redis.call('SET', epoch_key, epoch)
  end
  if expected ~= '' and epoch ~= expected then
    local boundary = (math.floor(now / window) + 1) * window
    if paused == nil or paused < boundary then
      paused = boundary
      redis.call('SET', pause_key, string.format('%.0f', paused), 'PX', math.floor((paused - now) / 1000) + 1)
    end
    return 0, paused - now, forged and 1 or 0, epoch, 1
  end
  if paused and paused > now then return 0, paused - now, forged and 1 or 0, epoch, 0 end
  local tat, bad = stored_time(bucket_key)
  forged = forged or bad
  local reach = math.max(tolerance + interval, window)
  if tat and tat > now + reach then tat, forged = now + reach, true end
  if tat == nil or tat < now then tat = now end
  local flag = forged and 1 or 0
  local allowed_at = tat - tolerance
  if now < allowed_at then
    if forged then
      redis.call('SET', bucket_key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
    end
    return 0, allowed_at - now, flag, epoch, 0
  end
  tat = tat + interval
  redis.call('SET', bucket_key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  local w = string.format('%.0f', math.floor(now / window))
  local counted = redis.pcall('HGET', count_key, 'w')
  if type(counted) == 'table' then
    redis.call('DEL', count_key)
    counted, flag = false, 1
  end
  if counted == w then
    redis.call('HINCRBY', count_key, 'n', 1)
  else
    redis.call('HSET', count_key, 'w', w, 'n', 1)
  end
  redis.call('PEXPIRE', count_key, math.floor(2 * window / 1000) + 1)
  return 1, 0, flag, epoch, 0
end
"
        )
    };
}

// ---------------------------------------------------------------------------------------
// The replica: heartbeat and resumption.

/// A replica's heartbeat: it counts itself live, and learns the epoch and the live
/// replicas' heartbeats; unless its cluster secret differs from the live replicas' (their
/// secret check, a fingerprint under the secret, stands for as long as a heartbeat counts):
/// then it is not counted.
///
/// A heartbeat is a member of a sorted set, scored by Redis's clock, that carries its MAC
/// (see `mode.rs`): the script returns the members and the replica counts those whose MAC
/// is right. What no replica writes is dropped on the way and reported: a secret check
/// without expiry or with a longer one, keys of another type, members dated ahead of Redis's
/// clock.
///
/// `KEYS`: epoch, replicas (the sorted set), secret check.
/// `ARGV`: this replica's heartbeat, how long a heartbeat counts (ms), a fresh epoch to write
/// if there is none, this replica's secret check, its previous heartbeat (removed), the most
/// members to return.
/// Returns `{epoch, live members, check, members (newest first), Redis's time ms, forged}`
/// (`live members` is -1 when the checks differ).
const HEARTBEAT: &str = r"
local ttl = tonumber(ARGV[2])
local forged = 0
local function holds(key, kind)
  local held = redis.call('TYPE', key)['ok']
  if held ~= 'none' and held ~= kind then
    redis.call('DEL', key)
    forged = 1
  end
end
holds(KEYS[3], 'string')
local left = redis.call('PTTL', KEYS[3])
if left == -1 or left > ttl then
  redis.call('DEL', KEYS[3])
  forged = 1
end
redis.call('SET', KEYS[3], ARGV[4], 'NX', 'PX', ttl)
local check = redis.call('GET', KEYS[3])
if check ~= ARGV[4] then return {'', -1, check, {}, 0, forged} end
redis.call('PEXPIRE', KEYS[3], ttl)
holds(KEYS[1], 'string')
redis.call('SET', KEYS[1], ARGV[3], 'NX')
local epoch = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
holds(KEYS[2], 'zset')
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if redis.call('ZREMRANGEBYSCORE', KEYS[2], string.format('(%.0f', now), '+inf') > 0 then
  forged = 1
end
redis.call('PEXPIRE', KEYS[2], ttl * 2)
local members = redis.call('ZREVRANGEBYSCORE', KEYS[2], '+inf', '-inf', 'LIMIT', 0, tonumber(ARGV[6]))
return {epoch, redis.call('ZCARD', KEYS[2]), check, members, now, forged}
";

/// [`HEARTBEAT`].
pub(super) struct Heartbeat<'a> {
    /// This replica's heartbeat: its id, a time and their MAC.
    pub(super) member: &'a str,
    /// Its previous heartbeat, or empty.
    pub(super) previous: &'a str,
    pub(super) ttl: Duration,
    pub(super) fresh_epoch: &'a str,
    pub(super) secret_check: &'a str,
    /// The most heartbeats read back.
    pub(super) most: usize,
}

/// What a heartbeat learned.
pub(super) struct HeartbeatReply {
    /// The epoch the replicas count under.
    pub(super) epoch: String,
    /// The heartbeats in the set (at most [`Heartbeat::most`], newest first), still to be
    /// checked; `None` when the live replicas use another cluster secret (this one is not
    /// counted).
    pub(super) members: Option<Vec<String>>,
    /// How many heartbeats the set holds (more than `members` when some were left out).
    pub(super) held: u64,
    /// Redis's clock, ms since the epoch.
    pub(super) now_ms: u64,
}

impl Script for Heartbeat<'_> {
    type Reply = HeartbeatReply;
    type Raw = (String, i64, String, Vec<String>, u64, i64);
    const OP: RedisOp = RedisOp::Heartbeat;

    fn lua() -> &'static redis::Script {
        lua!(HEARTBEAT)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.replicas_key(KeyKind::Epoch))
            .key(cluster.replicas_key(KeyKind::Replicas))
            .key(cluster.replicas_key(KeyKind::SecretCheck))
            .arg(self.member)
            .arg(millis(self.ttl))
            .arg(self.fresh_epoch)
            .arg(self.secret_check)
            .arg(self.previous)
            .arg(self.most);
    }

    fn decode(&self, (epoch, held, _check, members, now_ms, _): Self::Raw) -> HeartbeatReply {
        HeartbeatReply {
            epoch,
            members: (held >= 0).then_some(members),
            held: held.max(0) as u64,
            now_ms,
        }
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.5 == 1).then_some("a secret check, epoch or heartbeat set no replica wrote")
    }
}

/// When degraded replicas go back to shared counting: all at the same window boundary, at
/// least `margin` away, so that every replica has seen Redis again by then and no window
/// holds both a replica's local count and the shared one.
///
/// A resumption is at most a window and the margin away: one further ahead (or not a time)
/// no replica wrote, and is replaced.
///
/// `KEYS`: resume. `ARGV`: window µs, margin µs. Returns `{µs until the resumption,
/// forged}`.
const RESUME: &str = concat!(
    stored_time!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local current, forged = stored_time(KEYS[1])
if current and current > now + window + tonumber(ARGV[2]) then current, forged = nil, true end
local flag = forged and 1 or 0
if current and current > now then return {current - now, flag} end
local at = (math.floor(now / window) + 1) * window
if at - now < tonumber(ARGV[2]) then at = at + window end
redis.call('SET', KEYS[1], string.format('%.0f', at), 'PX', math.floor((at - now + window) / 1000) + 1)
return {at - now, flag}
"
);

/// [`RESUME`]; answers how long until shared counting resumes.
pub(super) struct Resume {
    pub(super) window: Duration,
    pub(super) margin: Duration,
}

impl Script for Resume {
    type Reply = Duration;
    type Raw = (u64, i64);
    const OP: RedisOp = RedisOp::Resume;

    fn lua() -> &'static redis::Script {
        lua!(RESUME)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.replicas_key(KeyKind::Resume))
            .arg(micros(self.window))
            .arg(micros(self.margin));
    }

    fn decode(&self, (micros, _): Self::Raw) -> Duration {
        Duration::from_micros(micros)
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.1 == 1).then_some("a resumption time no replica wrote")
    }
}

// ---------------------------------------------------------------------------------------
// Quota.

/// The shared GCRA of one (appid, API), and its 45011 pause.
///
/// `KEYS`: the bucket's epoch, bucket (the theoretical arrival time, TAT), pause (its end),
/// count (the turns of the current window).
/// `ARGV`: expected epoch, a fresh epoch, emission interval µs, burst tolerance µs
/// (`(burst − 1) × interval`), window µs.
/// Returns `{1, 0, forged, epoch, lost}` (admitted) or `{0, µs, forged, epoch, lost}` (not
/// before that long); `forged` is 1 when the bucket or its pause held a state no replica
/// wrote, `lost` 1 when the expected epoch was lost (see [`gcra_turn!`]).
///
/// GCRA: a call at `now` conforms if `now ≥ TAT − tolerance`; it then moves TAT to
/// `max(TAT, now) + interval`. This is governor's algorithm, so the single-process bound
/// carries over: at most `burst + L / interval − 1` calls in any span `L`, which the
/// interval wxgate picks makes `per_window` per window.
const QUOTA: &str = concat!(
    gcra_turn!(),
    r"
local admitted, wait, forged, epoch, lost = turn(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return {admitted, wait, forged, epoch, lost}
"
);

/// A GCRA bucket of the shared quota: the fingerprint its keys are named by (`q:` its
/// theoretical arrival time, `p:` its pause, `qe:` its epoch, `qn:` its turns this window),
/// in its appid's slot, its emission interval, its burst and its window.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// The appid's tag: the bucket's slot.
    pub tag: Tag,
    /// Names the bucket's keys; says nothing of the (appid, API) behind it.
    pub fingerprint: String,
    /// One turn every `interval` once the burst is spent.
    pub interval: Duration,
    /// Turns that may be taken at once.
    pub burst: u32,
    /// The quota's window: its turns are counted in it, and no replica holds the bucket back
    /// further than this (or its burst), so a state further ahead is forged (see
    /// [`gcra_turn!`]).
    pub window: Duration,
}

impl Bucket {
    /// The four keys and five arguments of a turn ([`gcra_turn!`]), after any the
    /// invocation has.
    fn write_turn(&self, cluster: &Cluster, invocation: &mut Invocation) {
        let interval = micros(self.interval).max(1);
        let epoch_key = self.epoch_key(cluster);
        invocation
            .arg(cluster.known_epoch(&epoch_key))
            .arg(super::owner_id())
            .key(epoch_key)
            .key(cluster.key(KeyKind::QuotaBucket, &self.tag, &self.fingerprint))
            .key(cluster.key(KeyKind::QuotaPause, &self.tag, &self.fingerprint))
            .key(cluster.key(KeyKind::QuotaCount, &self.tag, &self.fingerprint))
            .arg(interval)
            .arg(interval * u64::from(self.burst.max(1) - 1))
            .arg(micros(self.window).max(1));
    }

    /// The key of the bucket's epoch.
    fn epoch_key(&self, cluster: &Cluster) -> String {
        cluster.key(KeyKind::QuotaEpoch, &self.tag, &self.fingerprint)
    }
}

/// What a quota turn came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnReply {
    /// The turn is taken: the call may go.
    Taken,
    /// No turn before this long (also when Redis lost the bucket: it is held until the
    /// next window boundary).
    NotBefore(Duration),
}

impl TurnReply {
    fn from_script(admitted: i64, wait: i64) -> TurnReply {
        match admitted {
            1 => TurnReply::Taken,
            _ => TurnReply::NotBefore(Duration::from_micros(wait.max(1) as u64)),
        }
    }
}

/// The epoch part of a turn's reply: the bucket's epoch and whether the expected one was
/// lost (`1`); none when no turn was taken (an empty epoch).
fn epoch_seen(epoch: &str, lost: i64) -> Option<(String, bool)> {
    (!epoch.is_empty()).then(|| (epoch.to_owned(), lost == 1))
}

/// [`QUOTA`]: one turn of a bucket.
pub struct TakeTurn<'a>(pub &'a Bucket);

impl Script for TakeTurn<'_> {
    type Reply = TurnReply;
    type Raw = (i64, i64, i64, String, i64);
    const OP: RedisOp = RedisOp::Quota;

    fn lua() -> &'static redis::Script {
        lua!(QUOTA)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        self.0.write_turn(cluster, invocation);
    }

    fn decode(&self, (admitted, wait, ..): Self::Raw) -> TurnReply {
        TurnReply::from_script(admitted, wait)
    }

    fn epoch_key(&self, cluster: &Cluster) -> Option<String> {
        Some(self.0.epoch_key(cluster))
    }

    fn epoch_seen(raw: &Self::Raw) -> Option<(String, bool)> {
        epoch_seen(&raw.3, raw.4)
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.2 == 1).then_some(FORGED_QUOTA)
    }
}

/// What a forged quota state is, for the log.
const FORGED_QUOTA: &str = "a quota bucket or pause further ahead than any replica holds one";

/// Pauses one (appid, API) until WeChat's next window, after a 45011. A pause further than
/// a window ahead no replica wrote: it is replaced.
///
/// `KEYS`: pause. `ARGV`: window µs. Returns `{µs until the pause ends, forged}`.
const PAUSE: &str = concat!(
    stored_time!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local resume = (math.floor(now / window) + 1) * window
local current, forged = stored_time(KEYS[1])
if current and current > now + window then current, forged = nil, true end
if resume > (current or 0) then
  redis.call('SET', KEYS[1], string.format('%.0f', resume), 'PX', math.floor((resume - now) / 1000) + 1)
else
  resume = current
end
return {resume - now, forged and 1 or 0}
"
);

/// [`PAUSE`] of the bucket named by `fingerprint`; answers how long the pause lasts.
pub struct PauseBucket<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
    /// The bucket's fingerprint.
    pub fingerprint: &'a str,
    /// WeChat's window: the pause ends at the next boundary.
    pub window: Duration,
}

impl Script for PauseBucket<'_> {
    type Reply = Duration;
    type Raw = (u64, i64);
    const OP: RedisOp = RedisOp::Pause;

    fn lua() -> &'static redis::Script {
        lua!(PAUSE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::QuotaPause, self.tag, self.fingerprint))
            .arg(micros(self.window));
    }

    fn decode(&self, (micros, _): Self::Raw) -> Duration {
        Duration::from_micros(micros)
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.1 == 1).then_some(FORGED_QUOTA)
    }
}

// ---------------------------------------------------------------------------------------
// Code exchanges. Per exchange, up to four keys named by its fingerprint, in its appid's
// slot: `ca:` the remembered answer, `cl:` the claim, `cw:` a flag that other replicas wait,
// `cr:` the holder's result for late waiters; and the channel `cn:` its result is published
// on (a sharded channel on Redis Cluster, in the same slot).

/// Looks for a remembered answer of a code exchange, or claims the exchange, in one round
/// trip; when the claim is won and the call's quota turn is given (keys 4 to 6), takes that
/// turn too ([`QUOTA`]'s GCRA), so that the leader of an exchange needs no round trip of its
/// own for its first turn. A claim without expiry, or longer than twice a lease (replicas
/// may differ in `upstream.timeout_ms`), no replica wrote: it is taken over and reported.
///
/// `KEYS`: answer, claim, waiters, and optionally the bucket's epoch, bucket, pause and count
/// (the code exchange and the quota are of one appid: one slot).
/// `ARGV`: this claim's owner, lease ms, and with the quota's keys its expected epoch, a
/// fresh epoch, interval µs, tolerance µs and window µs.
/// Returns `{found, sealed answer, admitted, wait µs, forged, epoch, lost}`: `{1, sealed, 0,
/// 0, 0, '', 0}` (remembered), `{2, '', admitted, wait, forged, epoch, lost}` (claimed: call
/// WeChat; the turn as [`QUOTA`] returns it, or `0, 0, .., '', 0` when none was asked for),
/// or `{3, '', 0, 0, forged, '', 0}` (another replica holds the claim; this one is now noted
/// as waiting, so that the holder publishes its answer).
const CODE_CLAIM: &str = concat!(
    gcra_turn!(),
    kept_keys!(),
    r"
local answer, forged = text(KEYS[1])
if answer then return {1, answer, 0, 0, 0, '', 0} end
local _, overheld = lease_left(KEYS[2], ARGV[2])
forged = math.max(forged, overheld)
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', KEYS[3], '1', 'PX', redis.call('PTTL', KEYS[2]) + 1000)
  return {3, '', 0, 0, forged, '', 0}
end
if #KEYS < 7 then return {2, '', 0, 0, forged, '', 0} end
local admitted, wait, turn_forged, epoch, lost = turn(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return {2, '', admitted, wait, math.max(forged, turn_forged), epoch, lost}
"
);

/// [`CODE_CLAIM`].
pub struct ClaimCode<'a> {
    /// The appid's tag (the bucket's too).
    pub tag: &'a Tag,
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
    type Raw = (i64, Vec<u8>, i64, i64, i64, String, i64);
    const OP: RedisOp = RedisOp::CodeClaim;

    fn lua() -> &'static redis::Script {
        lua!(CODE_CLAIM)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::CodeAnswer, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeClaim, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeWaiters, self.tag, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.lease));
        if let Some(bucket) = self.turn {
            // Keys 4 to 7 and arguments 3 to 7.
            bucket.write_turn(cluster, invocation);
        }
    }

    fn decode(&self, (found, sealed, admitted, wait, ..): Self::Raw) -> ClaimReply {
        match found {
            1 => ClaimReply::Remembered(sealed),
            // Without a turn given, the script says `0, 0`, which means nothing.
            2 => ClaimReply::Claimed {
                turn: self.turn.map(|_| TurnReply::from_script(admitted, wait)),
            },
            _ => ClaimReply::HeldElsewhere,
        }
    }

    fn epoch_key(&self, cluster: &Cluster) -> Option<String> {
        self.turn.map(|bucket| bucket.epoch_key(cluster))
    }

    fn epoch_seen(raw: &Self::Raw) -> Option<(String, bool)> {
        epoch_seen(&raw.5, raw.6)
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.4 == 1).then_some("a claim, remembered answer or quota state no replica wrote")
    }
}

/// What a waiting replica finds: a remembered answer, the result its holder left for
/// waiters, or whether the claim still stands. A claim without expiry, or longer than
/// twice a lease, no replica wrote: it counts as gone (and is reported).
///
/// `KEYS`: answer, claim, result. `ARGV`: lease ms. Returns `{1, sealed, forged}`
/// (remembered), `{4, sealed, forged}` (the holder's result, not remembered), `{3, '',
/// forged}` (still claimed), or `{0, '', forged}` (nothing: the holder went away).
const CODE_PEEK: &str = concat!(
    kept_keys!(),
    r"
local answer, forged = text(KEYS[1])
if answer then return {1, answer, 0} end
local result, bad = text(KEYS[3])
forged = math.max(forged, bad)
if result then return {4, result, forged} end
local left, overheld = lease_left(KEYS[2], ARGV[1])
if overheld == 1 then return {0, '', 1} end
if left > 0 then return {3, '', forged} end
return {0, '', forged}
"
);

/// [`CODE_PEEK`].
pub struct PeekCode<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
    /// The exchange's fingerprint.
    pub fingerprint: &'a str,
    /// A claim's lease.
    pub lease: Duration,
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
    type Raw = (i64, Vec<u8>, i64);
    const OP: RedisOp = RedisOp::CodePeek;

    fn lua() -> &'static redis::Script {
        lua!(CODE_PEEK)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::CodeAnswer, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeClaim, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeResult, self.tag, self.fingerprint))
            .arg(millis(self.lease));
    }

    fn decode(&self, (found, sealed, _): Self::Raw) -> PeekReply {
        match found {
            1 | 4 => PeekReply::Answer(sealed),
            3 => PeekReply::Claimed,
            _ => PeekReply::Gone,
        }
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.2 == 1).then_some("a claim or code-exchange answer no replica wrote")
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
    /// The appid's tag.
    pub tag: &'a Tag,
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

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::CodeClaim, self.tag, self.fingerprint))
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
/// The channel is published on with `SPUBLISH` (sharded pub/sub, Redis 7) when `ARGV[6]` is
/// `1` (Redis Cluster: the channel is in the keys' slot, and only that shard carries the
/// message), else with `PUBLISH`; a Redis without `SPUBLISH` (6) gets `PUBLISH`, which a
/// Redis 6 cluster carries to every node.
///
/// `KEYS`: answer, claim, waiters, result. `ARGV`: owner, sealed answer, remember ms (0:
/// not definitive), result ms, channel, sharded (`1` or `0`). Returns the waiting replicas
/// notified.
const CODE_COMPLETE: &str = r"
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[4])
  if ARGV[6] == '1' then
    local told = redis.pcall('SPUBLISH', ARGV[5], ARGV[2])
    if type(told) == 'number' then return told end
  end
  return redis.call('PUBLISH', ARGV[5], ARGV[2])
end
return 0
";

/// [`CODE_COMPLETE`]; answers how many replicas were told.
pub struct CompleteClaim<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
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

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::CodeAnswer, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeClaim, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeWaiters, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::CodeResult, self.tag, self.fingerprint))
            .arg(self.owner)
            .arg(self.sealed)
            .arg(millis(self.remember))
            .arg(millis(self.for_waiters))
            .arg(cluster.key(KeyKind::CodeChannel, self.tag, self.fingerprint))
            .arg(if cluster.sharded_notices() { "1" } else { "0" });
    }

    fn decode(&self, notified: u64) -> u64 {
        notified
    }
}

// ---------------------------------------------------------------------------------------
// Access tokens. Per (API, appid), named by its fingerprint in the appid's slot: `token:` a
// hash of `i` (when
// the fetch that minted the token was sent, µs), `t` (the token's own fingerprint), `m` (the
// MAC of the key's fingerprint, `i` and `t`), `s` (the entry, sealed) and, once the token
// was refused, `d` (the MAC that says so, in place of `s`); `token-lease:` the replica
// fetching it now; `token-day:` the day's fetches. And `token-of:` (by the token's
// fingerprint, in a slot of its own: a replica that looks a refused token up knows no appid)
// the entry's fingerprint and tag, written by its own operation ([`IndexToken`]).
//
// The scripts compare `i` and `t` as they are (Lua has no HMAC); the replica checks the MACs
// and the seal of what they read back ([`TokenRecord`]), and tells [`StoreToken`] to
// replace an entry it found forged.

/// What Redis holds for one token key, as read: nothing is checked yet (the token cache
/// checks the MACs and opens the seal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRecord {
    /// Nothing.
    Missing,
    /// An entry's fields (empty where the entry lacks one).
    Stored(TokenFields),
}

/// The fields of a token entry, as Redis holds them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenFields {
    /// `i`: when the token's fetch was sent, µs since the epoch, in decimal.
    pub issued: String,
    /// `s`: the entry, sealed; empty once the token was refused (a tombstone).
    pub sealed: Vec<u8>,
    /// `t`: the token's own fingerprint.
    pub token_fingerprint: String,
    /// `m`: the MAC of (key fingerprint, `i`, `t`).
    pub mac: String,
    /// `d`: the MAC of (key fingerprint, `t`) that says the token was refused.
    pub dropped: String,
}

/// The raw fields of an entry, as the scripts return them: `i`, `s`, `t`, `m`, `d`.
type RawFields = (String, Vec<u8>, String, String, String);

impl TokenRecord {
    fn from_fields((issued, sealed, token_fingerprint, mac, dropped): RawFields) -> TokenRecord {
        let fields = TokenFields {
            issued,
            sealed,
            token_fingerprint,
            mac,
            dropped,
        };
        if fields == TokenFields::default() {
            TokenRecord::Missing
        } else {
            TokenRecord::Stored(fields)
        }
    }
}

/// `entry(key)` returns an entry's fields `i`, `s`, `t`, `m`, `d` (empty strings for what
/// it lacks) and 1 when the key held something else than a hash, which it then deletes.
macro_rules! token_entry {
    () => {
        r"
local function entry(key)
  local fields = redis.pcall('HMGET', key, 'i', 's', 't', 'm', 'd')
  if fields.err then
    redis.call('DEL', key)
    return {'', '', '', '', ''}, 1
  end
  for n = 1, 5 do fields[n] = fields[n] or '' end
  return fields, 0
end
"
    };
}

/// What a forged token entry is, for the log.
const FORGED_TOKEN: &str = "a token entry or lease no replica wrote";

/// Reads a token entry.
///
/// `KEYS`: entry. Returns `{i, s, t, m, d, forged}`.
const TOKEN_READ: &str = concat!(
    token_entry!(),
    r"
local fields, forged = entry(KEYS[1])
return {fields[1], fields[2], fields[3], fields[4], fields[5], forged}
"
);

/// [`TOKEN_READ`].
pub struct ReadToken<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
}

impl Script for ReadToken<'_> {
    type Reply = TokenRecord;
    type Raw = (String, Vec<u8>, String, String, String, i64);
    const OP: RedisOp = RedisOp::TokenRead;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_READ)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation.key(cluster.key(KeyKind::Token, self.tag, self.fingerprint));
    }

    fn decode(&self, (i, s, t, m, d, _): Self::Raw) -> TokenRecord {
        TokenRecord::from_fields((i, s, t, m, d))
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.5 == 1).then_some(FORGED_TOKEN)
    }
}

/// Takes the lease if free, and reads the entry in the same step, so that a replica that
/// takes the lease right after another stored a token sees that token. A lease without
/// expiry, or longer than twice what replicas set (they may differ in their settings), no
/// replica wrote: it is taken over.
///
/// `KEYS`: lease, entry. `ARGV`: owner, lease ms. Returns `{1 taken | 0 busy, i, s, t, m, d,
/// forged}`.
const TOKEN_LEASE: &str = concat!(
    token_entry!(),
    kept_keys!(),
    r"
local _, forged = lease_left(KEYS[1], ARGV[2])
local taken = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
local fields, bad = entry(KEYS[2])
return {taken and 1 or 0, fields[1], fields[2], fields[3], fields[4], fields[5], math.max(forged, bad)}
"
);

/// [`TOKEN_LEASE`].
pub struct TakeLease<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
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
    type Raw = (i64, String, Vec<u8>, String, String, String, i64);
    const OP: RedisOp = RedisOp::TokenLease;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_LEASE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::TokenLease, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::Token, self.tag, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.ttl));
    }

    fn decode(&self, (taken, i, s, t, m, d, _): Self::Raw) -> LeaseReply {
        LeaseReply {
            taken: taken == 1,
            record: TokenRecord::from_fields((i, s, t, m, d)),
        }
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.6 == 1).then_some(FORGED_TOKEN)
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
    /// The appid's tag.
    pub tag: &'a Tag,
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

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::TokenLease, self.tag, self.fingerprint))
            .arg(self.owner);
    }

    fn decode(&self, released: i64) -> bool {
        released == 1
    }
}

/// Stores an entry unless Redis holds one as new or newer (or a newer tombstone), by the
/// issue times as they are: the replica checks the entry it is shown, and when it was
/// forged stores again, replacing the entry if its issue time is still the forged one (so
/// that a newer entry another replica stored meanwhile stays).
///
/// `KEYS`: entry. `ARGV`: issued µs, token fingerprint, sealed entry, ms to keep, MAC, the
/// issue time of a forged entry to replace (or empty).
/// Returns `{1, '', '', '', '', ''}` if stored, else `{0, i, s, t, m, d}`: what Redis
/// holds.
const TOKEN_STORE: &str = concat!(
    token_entry!(),
    r"
local fields = entry(KEYS[1])
local current = tonumber(fields[1])
if current and current >= tonumber(ARGV[1]) and fields[1] ~= ARGV[6] then
  return {0, fields[1], fields[2], fields[3], fields[4], fields[5]}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'i', ARGV[1], 't', ARGV[2], 's', ARGV[3], 'm', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, '', '', '', '', ''}
"
);

/// [`TOKEN_STORE`].
pub struct StoreToken<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// The token's own fingerprint.
    pub token_fingerprint: &'a str,
    /// When the token's fetch was sent, µs since the epoch.
    pub issued_micros: u64,
    /// The entry, sealed.
    pub sealed: &'a [u8],
    /// The MAC of (fingerprint, issue time, token fingerprint).
    pub mac: &'a str,
    /// How long Redis keeps the entry.
    pub keep: Duration,
    /// The issue time (`i`, as stored) of a forged entry this store replaces.
    pub replacing: Option<&'a str>,
}

/// What a store came to.
#[derive(Debug)]
pub enum StoreReply {
    /// The entry is stored.
    Stored,
    /// Redis holds an entry as new or newer (by its issue time as it is, unchecked).
    Kept(TokenRecord),
}

impl Script for StoreToken<'_> {
    type Reply = StoreReply;
    type Raw = (i64, String, Vec<u8>, String, String, String);
    const OP: RedisOp = RedisOp::TokenStore;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_STORE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::Token, self.tag, self.fingerprint))
            .arg(self.issued_micros)
            .arg(self.token_fingerprint)
            .arg(self.sealed)
            .arg(millis(self.keep))
            .arg(self.mac)
            .arg(self.replacing.unwrap_or(""));
    }

    fn decode(&self, (stored, i, s, t, m, d): Self::Raw) -> StoreReply {
        if stored == 1 {
            StoreReply::Stored
        } else {
            StoreReply::Kept(TokenRecord::from_fields((i, s, t, m, d)))
        }
    }
}

/// Notes which entry holds a token, by the token's fingerprint, for a replica that meets the
/// token refused without knowing its appid ([`FindToken`]). Its own operation: the index is
/// in the token's slot, not the appid's.
///
/// `KEYS`: token index. `ARGV`: the entry's tag and fingerprint (`{tag}.{fingerprint}`), ms
/// to keep. Returns `OK`.
const TOKEN_INDEX: &str = r"
return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
";

/// [`TOKEN_INDEX`].
pub struct IndexToken<'a> {
    /// The token's own fingerprint.
    pub token_fingerprint: &'a str,
    /// The appid's tag of the entry holding the token.
    pub tag: &'a Tag,
    /// That entry's fingerprint.
    pub fingerprint: &'a str,
    /// How long Redis keeps the index (as long as the entry).
    pub keep: Duration,
}

impl Script for IndexToken<'_> {
    type Reply = ();
    type Raw = ();
    const OP: RedisOp = RedisOp::TokenStore;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_INDEX)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        let own = Tag::own(self.token_fingerprint);
        invocation
            .key(cluster.key(KeyKind::TokenOf, &own, self.token_fingerprint))
            .arg(format!("{}.{}", self.tag.0, self.fingerprint))
            .arg(millis(self.keep));
    }

    fn decode(&self, (): ()) {}
}

/// Finds the entry that holds a token, by the token's fingerprint.
///
/// `KEYS`: token index. Returns the entry's tag and fingerprint (`{tag}.{fingerprint}`), or
/// nil.
const TOKEN_FIND: &str = r"
local found = redis.pcall('GET', KEYS[1])
if type(found) == 'string' then return found end
return false
";

/// [`TOKEN_FIND`]; answers the tag and fingerprint of the entry holding the token, if any
/// (the index is plain text: a wrong one only makes [`DropToken`] compare and find nothing).
pub struct FindToken<'a> {
    /// The token's own fingerprint.
    pub token_fingerprint: &'a str,
}

impl Script for FindToken<'_> {
    type Reply = Option<(Tag, String)>;
    type Raw = Option<String>;
    const OP: RedisOp = RedisOp::TokenDrop;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_FIND)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        let own = Tag::own(self.token_fingerprint);
        invocation.key(cluster.key(KeyKind::TokenOf, &own, self.token_fingerprint));
    }

    fn decode(&self, found: Option<String>) -> Option<(Tag, String)> {
        let (tag, fingerprint) = found?
            .split_once('.')
            .map(|(tag, fingerprint)| (Tag::read(tag), fingerprint.to_owned()))?;
        Some((tag?, fingerprint))
    }
}

/// Drops the entry if it still holds the refused token: its sealed token goes, its issue
/// time, token fingerprint and MAC stay as a tombstone, with the MAC that says the token was
/// refused.
///
/// `KEYS`: entry. `ARGV`: token fingerprint, its refusal's MAC. Returns 1 if dropped.
const TOKEN_DROP: &str = r"
if redis.pcall('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 's')
  redis.call('HSET', KEYS[1], 'd', ARGV[2])
  return 1
end
return 0
";

/// [`TOKEN_DROP`]; answers whether the entry held the token and was dropped.
pub struct DropToken<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
    /// The token key's fingerprint.
    pub fingerprint: &'a str,
    /// The refused token's own fingerprint.
    pub token_fingerprint: &'a str,
    /// The MAC of (fingerprint, token fingerprint) that says the token was refused.
    pub mac: &'a str,
}

impl Script for DropToken<'_> {
    type Reply = bool;
    type Raw = i64;
    const OP: RedisOp = RedisOp::TokenDrop;

    fn lua() -> &'static redis::Script {
        lua!(TOKEN_DROP)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::Token, self.tag, self.fingerprint))
            .arg(self.token_fingerprint)
            .arg(self.mac);
    }

    fn decode(&self, dropped: i64) -> bool {
        dropped == 1
    }
}

/// Counts a fetch of the day.
///
/// `KEYS`: counter. `ARGV`: ms to keep. Returns the count.
const TOKEN_COUNT: &str = r"
local count = redis.pcall('INCR', KEYS[1])
if type(count) ~= 'number' then
  redis.call('DEL', KEYS[1])
  count = redis.call('INCR', KEYS[1])
end
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
";

/// [`TOKEN_COUNT`]; answers the count of all replicas' fetches that day.
pub struct CountFetch<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
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

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        let day = format!("{}:{}", self.fingerprint, self.day);
        invocation
            .key(cluster.key(KeyKind::TokenDay, self.tag, &day))
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
/// A lease or an answer without expiry or kept longer than twice the interval, and an answer
/// key of another type, no replica wrote: they are dropped and reported, so a writer without the secret
/// holds a key's discovery back for at most an interval per write.
///
/// `KEYS`: answer, lease. `ARGV`: owner, lease ms, `1` to take the lease (else `0`).
/// Returns `{1, sealed, forged}` (an answer), `{2, '', forged}` (the lease taken: ask),
/// `{3, '', forged}` (neither: another replica asks now, or the lease was not to be taken).
const LIMIT_LEASE: &str = concat!(
    kept_keys!(),
    r"
local _, forged = lease_left(KEYS[1], ARGV[2])
local answer, bad = text(KEYS[1])
if answer then return {1, answer, forged} end
local _, overheld = lease_left(KEYS[2], ARGV[2])
forged = math.max(forged, bad, overheld)
if ARGV[3] == '1' and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, '', forged}
end
return {3, '', forged}
"
);

/// [`LIMIT_LEASE`].
pub struct LeaseLimit<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
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
    type Raw = (i64, Vec<u8>, i64);
    const OP: RedisOp = RedisOp::LimitLease;

    fn lua() -> &'static redis::Script {
        lua!(LIMIT_LEASE)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::LimitStated, self.tag, self.fingerprint))
            .key(cluster.key(KeyKind::LimitLease, self.tag, self.fingerprint))
            .arg(self.owner)
            .arg(millis(self.lease).max(1))
            .arg(if self.take { "1" } else { "0" });
    }

    fn decode(&self, (found, sealed, _): Self::Raw) -> LimitLeaseReply {
        match found {
            1 => LimitLeaseReply::Stated(sealed),
            2 => LimitLeaseReply::Taken,
            _ => LimitLeaseReply::Busy,
        }
    }

    fn forged(raw: &Self::Raw) -> Option<&'static str> {
        (raw.2 == 1).then_some(
            "a limit's answer or discovery lease without expiry, or a key of another type",
        )
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
    /// The appid's tag.
    pub tag: &'a Tag,
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

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(self.record.kind(), self.tag, self.fingerprint))
            .arg(self.sealed)
            .arg(millis(self.keep).max(1));
    }

    fn decode(&self, _stored: i64) {}
}

/// The Redis key a record is sealed for (its associated data, so that a record moved to
/// another key does not open).
pub fn limit_record_key(
    cluster: &Cluster,
    record: LimitRecord,
    tag: &Tag,
    fingerprint: &str,
) -> String {
    cluster.key(record.kind(), tag, fingerprint)
}

/// Reads the learned limits of several keys of one appid at once (one slot).
///
/// `KEYS`: records. Returns their values (`false` for none).
const LIMIT_READ: &str = r"
return redis.call('MGET', unpack(KEYS))
";

/// [`LIMIT_READ`], for at most a few hundred keys (Lua's `unpack` takes a few thousand).
pub struct ReadLearned<'a> {
    /// The appid's tag, that of every key.
    pub tag: &'a Tag,
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

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        for fingerprint in self.fingerprints {
            invocation.key(cluster.key(KeyKind::LimitLearned, self.tag, fingerprint));
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
local counted = redis.pcall('HMGET', KEYS[1], 'w', 'n')
if type(counted) == 'table' and counted.err == nil and counted[1] == w then
  return math.floor(tonumber(counted[2] or '0') or 0)
end
return 0
";

/// [`QUOTA_COUNT`]. The count is plain: tampered with, it can only move a learned limit
/// between its floor and the configured figure, as losing Redis would.
pub struct ReadTurns<'a> {
    /// The appid's tag.
    pub tag: &'a Tag,
    /// The bucket's fingerprint.
    pub fingerprint: &'a str,
    /// Its window.
    pub window: Duration,
}

impl Script for ReadTurns<'_> {
    type Reply = u32;
    type Raw = i64;
    const OP: RedisOp = RedisOp::LimitRead;

    fn lua() -> &'static redis::Script {
        lua!(QUOTA_COUNT)
    }

    fn write(&self, cluster: &Cluster, invocation: &mut Invocation) {
        invocation
            .key(cluster.key(KeyKind::QuotaCount, self.tag, self.fingerprint))
            .arg(micros(self.window).max(1));
    }

    fn decode(&self, turns: i64) -> u32 {
        u32::try_from(turns).unwrap_or(0)
    }
}
