//! Daily quotas: after WeChat answers 45009 for a key ("reach max api daily quota limit"),
//! nothing but `clear_quota` helps before WeChat's day ends, at midnight Beijing time (UTC+8).
//! So wxgate answers that key's calls itself with a WeChat-shaped 45009 until then, sending
//! nothing. The block lifts earlier when quota/get reports `remain > 0` for the key, or when
//! a `clear_quota` of its appid passes through wxgate and WeChat accepts it.
//!
//! A key's own calls and those a platform makes on the account's behalf share one daily
//! quota: both are blocked together.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::QuotaKey;
use crate::wechat::day_end;

/// The most keys blocked at once (a 45009 beyond is answered by WeChat, as always).
const MAX_BLOCKED: usize = 100_000;

/// The keys blocked until WeChat's day ends.
pub(super) struct DailyBlocks {
    /// By the key's own calls; until when.
    blocked: Mutex<HashMap<QuotaKey, SystemTime>>,
    /// How many: while none, a call does not look.
    count: AtomicUsize,
    /// WeChat's day in nanoseconds (`quota.day_secs`; a day, but for tests).
    day: AtomicU64,
}

impl DailyBlocks {
    /// No key blocked; days of `day`.
    pub(super) fn new(day: Duration) -> DailyBlocks {
        DailyBlocks {
            blocked: Mutex::default(),
            count: AtomicUsize::new(0),
            day: AtomicU64::new(nanos(day)),
        }
    }

    /// Days of `day` from now on.
    pub(super) fn set_day(&self, day: Duration) {
        self.day.store(nanos(day), Ordering::Relaxed);
    }

    /// WeChat answered 45009 for `key` at `now`: blocked until its day ends.
    pub(super) fn block(&self, key: &QuotaKey, now: SystemTime) -> SystemTime {
        let until = day_end(now, Duration::from_nanos(self.day.load(Ordering::Relaxed)));
        let mut blocked = self.blocked.lock();
        if blocked.len() < MAX_BLOCKED || blocked.contains_key(&key.own()) {
            blocked.insert(key.own(), until);
        }
        self.count.store(blocked.len(), Ordering::Release);
        until
    }

    /// Whether any key is blocked: while none, a call looks no further (not even at the
    /// clock).
    #[inline]
    pub(super) fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) != 0
    }

    /// Until when `key` is blocked, if it is at `now`.
    pub(super) fn until(&self, key: &QuotaKey, now: SystemTime) -> Option<SystemTime> {
        if !self.any() {
            return None;
        }
        let until = *self.blocked.lock().get(&key.own())?;
        (until > now).then_some(until)
    }

    /// Lifts `key`'s block.
    pub(super) fn lift(&self, key: &QuotaKey) -> bool {
        let mut blocked = self.blocked.lock();
        let lifted = blocked.remove(&key.own()).is_some();
        self.count.store(blocked.len(), Ordering::Release);
        lifted
    }

    /// Lifts the blocks of every key of `appid` (its `clear_quota` went through).
    pub(super) fn lift_appid(&self, appid: &str) -> usize {
        let mut blocked = self.blocked.lock();
        let before = blocked.len();
        blocked.retain(|key, _| key.appid() != appid);
        self.count.store(blocked.len(), Ordering::Release);
        before - blocked.len()
    }

    /// Forgets blocks whose day is over; how many keys stay blocked.
    pub(super) fn expire(&self, now: SystemTime) -> usize {
        let mut blocked = self.blocked.lock();
        blocked.retain(|_, until| *until > now);
        self.count.store(blocked.len(), Ordering::Release);
        blocked.len()
    }

    /// Every blocked key and until when.
    pub(super) fn all(&self) -> Vec<(QuotaKey, SystemTime)> {
        self.blocked.lock().iter().map(|(k, u)| (*k, *u)).collect()
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::Api;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(secs: u64) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_block_lasts_the_day_and_lifts_early() {
        let blocks = DailyBlocks::new(DAY);
        let key = QuotaKey::new(Api::Token, "wx00000000000000a1").unwrap();
        let other = QuotaKey::new(Api::StableToken, "wx00000000000000b2").unwrap();
        let now = at(1_735_700_000);
        assert_eq!(blocks.until(&key, now), None);
        let until = blocks.block(&key, now);
        assert_eq!(until, at(1_735_747_200));
        assert_eq!(blocks.until(&key.on_behalf(), now), Some(until), "shared");
        assert_eq!(blocks.until(&key, until), None, "the next day");
        blocks.block(&other, now);
        assert_eq!(blocks.lift_appid("wx00000000000000a1"), 1);
        assert_eq!(blocks.until(&key, now), None);
        assert!(blocks.lift(&other));
        assert_eq!(blocks.expire(now), 0);
    }
}
