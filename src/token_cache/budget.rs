//! The daily fetch budget: how many tokens wxgate fetched for each appid today, reported as
//! the highest count of any appid per API (`wxgate_token_fetches_today_max{api}`), never
//! with an appid label.
//!
//! WeChat allows 2000 `/cgi-bin/token` fetches a day per appid (then 45009) and counts per
//! calendar day in China: the day here begins at midnight UTC+8 (Beijing time), whatever the
//! host's time zone. With `[cluster]`, the count of each appid is kept in Redis, so every
//! replica reports the count of all of them.
//!
//! Only fetches that minted a token count: an appid WeChat does not know (40013) or a wrong
//! secret (40125) spends nothing of a budget wxgate could watch, and would let anyone fill
//! the map with made-up appids. The map is bounded all the same ([`MAX_COUNTED_KEYS`]), and
//! each count costs O(1) whatever its size: counts only grow within a day, so the highest of
//! each API is kept as they grow instead of looked for.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::request::{TokenKey, TokenKind};

/// Beijing time is UTC+8 all year.
const BEIJING_OFFSET_SECS: u64 = 8 * 3600;

/// The most keys counted in a day. Each needs a real appid and its secret (only minted
/// tokens count), so this is far beyond what one wxgate serves; past it a key not yet
/// counted today is counted alone, from Redis's count or 1, and not kept.
pub const MAX_COUNTED_KEYS: usize = 100_000;

/// Fetches per key in the current day.
#[derive(Debug, Default)]
pub struct FetchBudget {
    day: u64,
    counts: HashMap<TokenKey, u64>,
    /// The highest count of each kind today, by [`TokenKind::index`].
    highest: [u64; 3],
}

/// The day `at` falls in, counted from the epoch, days beginning at midnight UTC+8.
pub fn beijing_day(at: SystemTime) -> u64 {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    (secs + BEIJING_OFFSET_SECS) / 86_400
}

impl FetchBudget {
    /// Counts one fetch of `key` that minted a token at `now`. `shared` is the count of all
    /// replicas when Redis answered (it includes this fetch). Returns the key's count today.
    pub fn record(&mut self, key: &TokenKey, now: SystemTime, shared: Option<u64>) -> u64 {
        self.roll(now);
        let counted = |before: u64| match shared {
            Some(shared) => shared.max(before + 1),
            None => before + 1,
        };
        let room = self.counts.len() < MAX_COUNTED_KEYS;
        let count = match self.counts.get_mut(key) {
            Some(count) => {
                *count = counted(*count);
                *count
            }
            None if room => *self.counts.entry(key.clone()).or_insert(counted(0)),
            None => counted(0),
        };
        let highest = &mut self.highest[key.kind.index()];
        *highest = (*highest).max(count);
        count
    }

    /// The highest count of any appid of `kind` today (0 after midnight).
    pub fn max(&mut self, kind: TokenKind, now: SystemTime) -> u64 {
        self.roll(now);
        self.highest[kind.index()]
    }

    /// Starts the counts over when the day changes.
    fn roll(&mut self, now: SystemTime) {
        let today = beijing_day(now);
        if today != self.day {
            self.day = today;
            self.counts = HashMap::new();
            self.highest = [0; 3];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(kind: TokenKind, appid: &str) -> TokenKey {
        TokenKey {
            kind,
            appid: appid.into(),
        }
    }

    #[test]
    fn the_day_begins_at_midnight_beijing_time() {
        // 2024-01-01T15:59:59Z is 23:59:59 in Beijing; a second later it is the next day.
        let before = UNIX_EPOCH + Duration::from_secs(1_704_124_799);
        assert_eq!(
            beijing_day(before) + 1,
            beijing_day(before + Duration::from_secs(1))
        );
        assert_eq!(
            beijing_day(before - Duration::from_secs(3600)),
            beijing_day(before)
        );
    }

    #[test]
    fn the_highest_count_of_any_appid_is_reported_per_api_and_resets_daily() {
        let mut budget = FetchBudget::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_704_100_000);
        let a = key(TokenKind::Token, "wxa");
        let b = key(TokenKind::Token, "wxb");
        budget.record(&a, now, None);
        budget.record(&a, now, None);
        budget.record(&b, now, None);
        budget.record(&key(TokenKind::Stable, "wxa"), now, None);
        assert_eq!(budget.max(TokenKind::Token, now), 2);
        assert_eq!(budget.max(TokenKind::Stable, now), 1);
        assert_eq!(budget.max(TokenKind::Component, now), 0);
        // Another replica's fetches, counted in Redis.
        assert_eq!(budget.record(&b, now, Some(7)), 7);
        assert_eq!(budget.max(TokenKind::Token, now), 7);
        let tomorrow = now + Duration::from_secs(86_400);
        assert_eq!(budget.max(TokenKind::Token, tomorrow), 0);
    }

    /// 200,000 appids minting a token each: the map stops at its bound, the highest count
    /// stays right, and counting the next appid costs the same as the first.
    #[test]
    fn two_hundred_thousand_appids_stay_bounded() {
        let mut budget = FetchBudget::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_704_100_000);
        for i in 0..200_000 {
            budget.record(&key(TokenKind::Token, &format!("wx{i:016x}")), now, None);
        }
        assert_eq!(budget.counts.len(), MAX_COUNTED_KEYS);
        assert_eq!(budget.max(TokenKind::Token, now), 1);
        let busy = key(TokenKind::Token, "wx0000000000000007");
        for _ in 0..4 {
            budget.record(&busy, now, None);
        }
        assert_eq!(budget.max(TokenKind::Token, now), 5);
        // Past the bound, a new key is counted alone: from Redis when it answered.
        let late = key(TokenKind::Token, "wxffffffffffffffff");
        assert_eq!(budget.record(&late, now, Some(9)), 9);
        assert_eq!(budget.max(TokenKind::Token, now), 9);
        assert_eq!(budget.counts.len(), MAX_COUNTED_KEYS);
        let tomorrow = now + Duration::from_secs(86_400);
        assert_eq!(budget.max(TokenKind::Token, tomorrow), 0);
        assert!(budget.counts.is_empty());
    }
}
