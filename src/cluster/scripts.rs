//! The Lua scripts wxgate runs in Redis. Each is one atomic step on Redis's own clock
//! (`TIME`), so clock skew between replicas changes nothing. They are sent by hash
//! (`EVALSHA`) and loaded again when Redis has lost them (`redis::Script` does both).
//!
//! Times inside the scripts are microseconds since the epoch, which a Lua number (a double)
//! holds exactly; they are written back with `%.0f`, since Lua's `tostring` would round them.
//!
//! Every script checks the *epoch*: a random value a replica writes once (`SET NX`) into a
//! key without expiry. A Redis that restarted empty, or was flushed, has another epoch (or
//! none) than the one the replicas learned: its counters are gone, so the script refuses to
//! count (`-1`) and the replica degrades, as for an outage, until the replicas resume
//! together at a window boundary.

/// The GCRA turn of [`QUOTA`] as a Lua function, so that [`CODE_CLAIM`] takes a turn
/// the same way: `turn(epoch key, bucket key, pause key, expected epoch, interval µs,
/// tolerance µs)` returns `1, 0` (admitted), `0, µs` (not before that long), or `-1, 0`
/// (epoch lost).
macro_rules! gcra_turn {
    () => {
        r"
local function turn(epoch_key, bucket_key, pause_key, expected, interval, tolerance)
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
  return 1, 0
end
"
    };
}

/// The shared GCRA of one (appid, API), and its 45011 pause.
///
/// `KEYS`: epoch, bucket (the theoretical arrival time, TAT), pause (its end).
/// `ARGV`: expected epoch, emission interval µs, burst tolerance µs (`(burst − 1) ×
/// interval`).
/// Returns `{1, 0}` (admitted), `{0, µs}` (not before that long), or `{-1, 0}` (epoch lost).
///
/// GCRA: a call at `now` conforms if `now ≥ TAT − tolerance`; it then moves TAT to
/// `max(TAT, now) + interval`. This is governor's algorithm, so the single-process bound
/// carries over: at most `burst + L / interval − 1` calls in any span `L`, which the
/// interval wxgate picks makes `per_window` per window.
pub const QUOTA: &str = concat!(
    gcra_turn!(),
    r"
local admitted, wait = turn(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
return {admitted, wait}
"
);

/// Pauses one (appid, API) until WeChat's next window, after a 45011.
///
/// `KEYS`: pause. `ARGV`: window µs. Returns the µs until the pause ends.
pub const PAUSE: &str = r"
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

/// A replica's heartbeat: it counts itself live, and learns the epoch and how many replicas
/// are live; unless its cluster secret differs from the live replicas' (their secret check,
/// a fingerprint under the secret, stands for as long as a heartbeat counts): then it is not
/// counted, and learns the check that stands.
///
/// `KEYS`: epoch, replicas (a sorted set of replica ids by last heartbeat, ms), secret check.
/// `ARGV`: this replica's id, how long a heartbeat counts (ms), a fresh epoch to write if
/// there is none, this replica's secret check. Returns `{epoch, live replicas, check}`
/// (`live replicas` is -1 when the checks differ).
pub const HEARTBEAT: &str = r"
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

/// When degraded replicas go back to shared counting: all at the same window boundary, at
/// least `margin` away, so that every replica has seen Redis again by then and no window
/// holds both a replica's local count and the shared one.
///
/// `KEYS`: resume. `ARGV`: window µs, margin µs. Returns the µs until the resumption.
pub const RESUME: &str = r"
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

/// Looks for a remembered answer of a code exchange, or claims the exchange, in one round
/// trip; when the claim is won and the call's quota turn is given (keys 4 to 6), takes that
/// turn too ([`QUOTA`]'s GCRA), so that the leader of an exchange needs no round trip of its
/// own for its first turn.
///
/// `KEYS`: answer, claim, waiters, and optionally the quota's epoch, bucket and pause.
/// `ARGV`: this claim's owner, lease ms, and with the quota's keys its expected epoch,
/// interval µs and tolerance µs.
/// Returns `{found, sealed answer, admitted, wait µs}`: `{1, sealed, 0, 0}` (remembered),
/// `{2, '', admitted, wait}` (claimed: call WeChat; the turn as [`QUOTA`] returns it, or
/// `0, 0` when none was asked for), or `{3, '', 0, 0}` (another replica holds the claim;
/// this one is now noted as waiting, so that the holder publishes its answer).
pub const CODE_CLAIM: &str = concat!(
    gcra_turn!(),
    r"
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer, 0, 0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', KEYS[3], '1', 'PX', redis.call('PTTL', KEYS[2]) + 1000)
  return {3, '', 0, 0}
end
if #KEYS < 6 then return {2, '', 0, 0} end
local admitted, wait = turn(KEYS[4], KEYS[5], KEYS[6], ARGV[3], ARGV[4], ARGV[5])
return {2, '', admitted, wait}
"
);

/// What a waiting replica finds: a remembered answer, the result its holder left for
/// waiters, or whether the claim still stands.
///
/// `KEYS`: answer, claim, result. Returns `{1, sealed}` (remembered), `{4, sealed}` (the
/// holder's result, not remembered), `{3, ''}` (still claimed), or `{0, ''}` (nothing: the
/// holder went away).
pub const CODE_PEEK: &str = r"
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer} end
local result = redis.call('GET', KEYS[3])
if result then return {4, result} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {3, ''} end
return {0, ''}
";

/// Extends a claim while its holder still calls WeChat (only the owner can).
///
/// `KEYS`: claim. `ARGV`: owner, lease ms. Returns 1 if extended.
pub const CODE_RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Ends a claim with WeChat's answer: remembers it if it is definitive, releases the claim
/// (only the owner can), and, if other replicas wait, leaves the result for them a short
/// while and publishes it.
///
/// `KEYS`: answer, claim, waiters, result. `ARGV`: owner, sealed answer, remember ms (0:
/// not definitive), result ms, channel. Returns the waiting replicas notified.
pub const CODE_COMPLETE: &str = r"
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
