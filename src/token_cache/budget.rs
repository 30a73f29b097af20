//! The daily fetch budget: how many tokens wxgate fetched for each appid today, reported as
//! the highest count of any appid per API (`wxgate_token_fetches_today_max{api}`), never
//! with an appid label.
//!
//! WeChat allows 2000 `/cgi-bin/token` fetches a day per appid (then 45009) and counts per
//! calendar day in China: the day here begins at midnight UTC+8 (Beijing time), whatever the
//! host's time zone. With `[cluster]`, the count of each appid is kept in Redis, so every
//! replica reports the count of all of them.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::request::{TokenKey, TokenKind};

/// Beijing time is UTC+8 all year.
const BEIJING_OFFSET_SECS: u64 = 8 * 3600;

/// Fetches per key in the current day.
#[derive(Debug, Default)]
pub struct FetchBudget {
    day: u64,
    counts: HashMap<TokenKey, u64>,
}

/// The day `at` falls in, counted from the epoch, days beginning at midnight UTC+8.
pub fn beijing_day(at: SystemTime) -> u64 {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    (secs + BEIJING_OFFSET_SECS) / 86_400
}

impl FetchBudget {
    /// Counts one fetch of `key` at `now`. `shared` is the count of all replicas when Redis
    /// answered (it includes this fetch). Returns the key's count today.
    pub fn record(&mut self, key: &TokenKey, now: SystemTime, shared: Option<u64>) -> u64 {
        self.roll(now);
        let count = self.counts.entry(key.clone()).or_default();
        *count = match shared {
            Some(shared) => shared.max(*count + 1),
            None => *count + 1,
        };
        *count
    }

    /// The highest count of any appid of `kind` today (0 after midnight).
    pub fn max(&mut self, kind: TokenKind, now: SystemTime) -> u64 {
        self.roll(now);
        self.counts
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, count)| *count)
            .max()
            .unwrap_or(0)
    }

    /// Starts the counts over when the day changes.
    fn roll(&mut self, now: SystemTime) {
        let today = beijing_day(now);
        if today != self.day {
            self.day = today;
            self.counts.clear();
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
}
