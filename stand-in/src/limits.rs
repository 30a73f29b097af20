//! WeChat's limits per (appid, API path), as the stand-in keeps them: the figures it is
//! configured with (changeable while it runs), the counts of executed calls per aligned
//! window and per day, the per-user minute limit of the code exchanges, and the monthly
//! budget of `clear_quota`.
//!
//! # What is counted, and when
//! - A call is counted when it is *executed*: it passed its endpoint's parameter and credential
//!   checks and every limit below. A call refused with 45011 or 45009 is not executed and not
//!   counted anywhere (WeChat counts executed calls; quota/get's `used` is what was served).
//! - Calls are counted only for a key that some limit applies to (a rate limit, a daily
//!   limit, or the per-user limit): a stand-in configured with no limits counts nothing here,
//!   so the benchmarks' path takes no lock. quota/get's `used` is thus the calls executed
//!   while the key had a limit.
//! - Windows are aligned to multiples of their length since the UNIX epoch, taken at the
//!   call's arrival. Days are aligned the same way after adding [`StandInConfig::day_offset`]
//!   (UTC+8 by default: days end at midnight Beijing time), and a month is the calendar
//!   month of the day's date counted from 1970-01-01, so with a short
//!   [`StandInConfig::day`] a month is 28 to 31 short days.
//! - The checks come in this order: the daily limit (45009), the rate limit of the appid
//!   (45011), the per-user limit (45011, the same answer as WeChat's).
//!
//! [`StandInConfig::day`]: crate::StandInConfig::day
//! [`StandInConfig::day_offset`]: crate::StandInConfig::day_offset

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use crate::calendar::month_of_day;
use crate::{ApiLimits, RateLimit, StandInConfig};

/// What quota/get reports for a figure the stand-in does not limit: the largest `u32`, so a
/// client that takes it as a limit never holds a call back for it.
pub const UNLIMITED_FIGURE: u32 = u32::MAX;

/// One call as the limits see it.
pub(crate) struct KeyCall<'a> {
    pub(crate) path: &'a str,
    /// The account the call is counted for.
    pub(crate) appid: &'a str,
    /// Made by a third-party platform on the account's behalf: `component_rate_limit`.
    pub(crate) via_component: bool,
    /// Whether [`StandInConfig::quota_per_window`] applies to this API.
    pub(crate) default_limited: bool,
    /// The WeChat user a code exchange is for, when known: the per-user limit.
    pub(crate) user: Option<&'a str>,
    pub(crate) at: SystemTime,
}

/// The figures in force for one (appid, path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) component_rate_limit: Option<RateLimit>,
    pub(crate) daily_limit: Option<u64>,
}

/// What quota/get answers for one (appid, path), unlimited figures as [`UNLIMITED_FIGURE`].
#[derive(Serialize)]
pub(crate) struct QuotaReport {
    pub(crate) quota: DailyQuota,
    pub(crate) rate_limit: RateLimit,
    pub(crate) component_rate_limit: RateLimit,
}

#[derive(Serialize)]
pub(crate) struct DailyQuota {
    pub(crate) daily_limit: u64,
    pub(crate) used: u64,
    pub(crate) remain: u64,
}

/// One (appid, path) that executed calls today, on the stats page.
#[derive(Serialize)]
pub(crate) struct DailyUse {
    pub(crate) appid: String,
    pub(crate) path: String,
    pub(crate) used: u64,
    /// `None`: no daily limit.
    pub(crate) daily_limit: Option<u64>,
}

/// `default_rate` value meaning "no default rate limit", so it fits in one atomic.
const UNLIMITED: u64 = u64::MAX;

/// The limits and the counts behind them, shared by every connection.
pub(crate) struct Limits {
    /// [`StandInConfig::quota_per_window`], or [`UNLIMITED`].
    default_rate: AtomicU64,
    /// [`StandInConfig::window`].
    pub(crate) default_window: Duration,
    /// Path -> its configured figures. Read by every call on a limited path, written by the
    /// setters only.
    configured: RwLock<HashMap<String, PathFigures>>,
    /// Whether `configured` has any entry: calls skip its lock when it has none.
    any_configured: AtomicBool,
    /// The per-user limit of the code exchanges.
    user_rate_limit: RwLock<Option<RateLimit>>,
    day: Duration,
    day_offset: Duration,
    clears_per_month: u32,
    /// appid -> path -> counts. Looked up by `&str` at both levels, so a known key costs no
    /// allocation.
    counts: DashMap<String, HashMap<String, KeyCounts>>,
    /// appid (or `component_appid`) -> the clears of its current month.
    clears: DashMap<String, MonthClears>,
}

/// An API path's figures for every appid, and per appid.
#[derive(Default)]
struct PathFigures {
    every_appid: Figures,
    by_appid: HashMap<String, Figures>,
}

/// What one (appid, path) executed.
#[derive(Default)]
struct KeyCounts {
    own: WindowCount,
    component: WindowCount,
    /// The day `used` counts.
    day: u128,
    used: u64,
    /// Code exchanges per user (only for codes that name their user).
    users: HashMap<String, WindowCount>,
}

/// Executed calls in the window starting at `start` (nanoseconds since the epoch).
#[derive(Clone, Copy, Default)]
struct WindowCount {
    start: u128,
    executed: u64,
}

impl WindowCount {
    /// Moves to the window starting at `start`, if it is a new one: a fixed window, the count
    /// starts over at each boundary as WeChat's minute does.
    fn roll(&mut self, start: u128) {
        if self.start != start {
            self.start = start;
            self.executed = 0;
        }
    }
}

#[derive(Default)]
struct MonthClears {
    month: i64,
    clears: u32,
}

impl Limits {
    pub(crate) fn new(config: &StandInConfig) -> Limits {
        let limits = Limits {
            default_rate: AtomicU64::new(config.quota_per_window.map_or(UNLIMITED, u64::from)),
            default_window: config.window,
            configured: RwLock::new(HashMap::new()),
            any_configured: AtomicBool::new(false),
            user_rate_limit: RwLock::new(config.user_rate_limit),
            day: config.day,
            day_offset: config.day_offset,
            clears_per_month: config.clear_quota_per_month,
            counts: DashMap::new(),
            clears: DashMap::new(),
        };
        for entry in &config.api_limits {
            limits.set(&entry.path, entry.appid.as_deref(), |figures| {
                *figures = Figures {
                    rate_limit: entry.rate_limit,
                    component_rate_limit: entry.component_rate_limit,
                    daily_limit: entry.daily_limit,
                };
            });
        }
        limits
    }

    pub(crate) fn set_default_rate(&self, per_window: Option<u32>) {
        self.default_rate
            .store(per_window.map_or(UNLIMITED, u64::from), Ordering::Relaxed);
    }

    /// [`StandInConfig::quota_per_window`] in force.
    pub(crate) fn default_rate(&self) -> Option<u64> {
        let rate = self.default_rate.load(Ordering::Relaxed);
        (rate != UNLIMITED).then_some(rate)
    }

    pub(crate) fn set_user_rate_limit(&self, limit: Option<RateLimit>) {
        *write(&self.user_rate_limit) = limit;
    }

    pub(crate) fn user_rate_limit(&self) -> Option<RateLimit> {
        *read(&self.user_rate_limit)
    }

    /// Changes the figures of `path` for `appid` (every appid: `None`).
    pub(crate) fn set(&self, path: &str, appid: Option<&str>, change: impl FnOnce(&mut Figures)) {
        let mut configured = write(&self.configured);
        let entry = configured.entry(path.to_owned()).or_default();
        let figures = match appid {
            None => &mut entry.every_appid,
            Some(appid) => entry.by_appid.entry(appid.to_owned()).or_default(),
        };
        change(figures);
        // A path is named while it has a figure: one whose figures are all taken back is
        // echoed again, unchecked.
        if appid.is_some_and(|appid| entry.by_appid.get(appid) == Some(&Figures::default())) {
            entry.by_appid.remove(appid.unwrap_or_default());
        }
        if entry.every_appid == Figures::default() && entry.by_appid.is_empty() {
            configured.remove(path);
        }
        self.any_configured
            .store(!configured.is_empty(), Ordering::Release);
    }

    /// Whether the configuration names `path` (for any appid) with some figure.
    pub(crate) fn names(&self, path: &str) -> bool {
        self.any_configured.load(Ordering::Acquire) && read(&self.configured).contains_key(path)
    }

    /// The figures in force for (`appid`, `path`), inherited as [`ApiLimits`] says.
    pub(crate) fn figures(&self, path: &str, appid: &str, default_limited: bool) -> Figures {
        let default_rate = self.default_rate().filter(|_| default_limited).map(|rate| {
            RateLimit::new(u32::try_from(rate).unwrap_or(u32::MAX), self.default_window)
        });
        let mut figures = Figures {
            rate_limit: default_rate,
            ..Figures::default()
        };
        let mut component_rate_limit = None;
        if self.any_configured.load(Ordering::Acquire) {
            let configured = read(&self.configured);
            if let Some(entry) = configured.get(path) {
                for scope in [Some(&entry.every_appid), entry.by_appid.get(appid)]
                    .into_iter()
                    .flatten()
                {
                    figures.rate_limit = scope.rate_limit.or(figures.rate_limit);
                    component_rate_limit = scope.component_rate_limit.or(component_rate_limit);
                    figures.daily_limit = scope.daily_limit.or(figures.daily_limit);
                }
            }
        }
        figures.component_rate_limit = component_rate_limit.or(figures.rate_limit);
        figures
    }

    /// Counts one call if every limit on it admits it; otherwise the errcode WeChat answers
    /// (45009, 45011) and nothing is counted.
    pub(crate) fn admit(&self, call: &KeyCall<'_>) -> Result<(), i64> {
        let figures = self.figures(call.path, call.appid, call.default_limited);
        let rate_limit = if call.via_component {
            figures.component_rate_limit
        } else {
            figures.rate_limit
        };
        let user_limit = call
            .user
            .and_then(|user| Some((user, self.user_rate_limit()?)));
        if rate_limit.is_none() && figures.daily_limit.is_none() && user_limit.is_none() {
            // Nothing limits this key: nothing to count (the benchmarks' path).
            return Ok(());
        }
        let day = self.day_index(call.at);
        let mut counts = self.key_counts(call.appid, call.path);
        let counts = counts
            .get_mut(call.path)
            .expect("key_counts inserted the path");
        if counts.day != day {
            counts.day = day;
            counts.used = 0;
        }
        if figures
            .daily_limit
            .is_some_and(|limit| counts.used >= limit)
        {
            return Err(45009);
        }
        let window = if call.via_component {
            &mut counts.component
        } else {
            &mut counts.own
        };
        if let Some(limit) = rate_limit {
            window.roll(window_start(call.at, limit.window));
            if window.executed >= u64::from(limit.call_count) {
                return Err(45011);
            }
        }
        if let Some((user, limit)) = user_limit {
            let start = window_start(call.at, limit.window);
            let users = &mut counts.users;
            if !users.contains_key(user) {
                // Users of past windows count for nothing: forget them now and then, so a
                // long run with many users does not grow without bound.
                if users.len() >= 4096 {
                    users.retain(|_, count| count.start == start);
                }
                users.insert(user.to_owned(), WindowCount::default());
            }
            let count = users.get_mut(user).expect("inserted above");
            count.roll(start);
            if count.executed >= u64::from(limit.call_count) {
                return Err(45011);
            }
            count.executed += 1;
        }
        window.executed += 1;
        counts.used += 1;
        Ok(())
    }

    /// The counts of `appid`, with an entry for `path`, locked.
    fn key_counts(
        &self,
        appid: &str,
        path: &str,
    ) -> dashmap::mapref::one::RefMut<'_, String, HashMap<String, KeyCounts>> {
        // By &str first: the key is almost always there, and this avoids allocating.
        let mut counts = match self.counts.get_mut(appid) {
            Some(counts) => counts,
            None => self.counts.entry(appid.to_owned()).or_default(),
        };
        if !counts.contains_key(path) {
            counts.insert(path.to_owned(), KeyCounts::default());
        }
        counts
    }

    /// Calls of (`appid`, `path`) executed today (`at`'s day).
    pub(crate) fn daily_used(&self, path: &str, appid: &str, at: SystemTime) -> u64 {
        let day = self.day_index(at);
        self.counts
            .get(appid)
            .and_then(|counts| {
                let count = counts.get(path)?;
                (count.day == day).then_some(count.used)
            })
            .unwrap_or(0)
    }

    /// What quota/get answers for (`appid`, `path`).
    pub(crate) fn report(
        &self,
        path: &str,
        appid: &str,
        default_limited: bool,
        at: SystemTime,
    ) -> QuotaReport {
        let figures = self.figures(path, appid, default_limited);
        let used = self.daily_used(path, appid, at);
        let daily_limit = figures.daily_limit.unwrap_or(u64::from(UNLIMITED_FIGURE));
        let unlimited = RateLimit::new(UNLIMITED_FIGURE, self.default_window);
        QuotaReport {
            quota: DailyQuota {
                daily_limit,
                used,
                remain: daily_limit.saturating_sub(used),
            },
            rate_limit: figures.rate_limit.unwrap_or(unlimited),
            component_rate_limit: figures.component_rate_limit.unwrap_or(unlimited),
        }
    }

    /// `clear_quota` for `account`: its daily counts of every API start over, if its month
    /// has a clear left (else `Err(48006)`).
    pub(crate) fn clear(&self, account: &str, at: SystemTime) -> Result<(), i64> {
        let day = self.day_index(at);
        let month = month_of_day(day);
        {
            let mut clears = self.clears.entry(account.to_owned()).or_default();
            if clears.month != month {
                clears.month = month;
                clears.clears = 0;
            }
            if clears.clears >= self.clears_per_month {
                return Err(48006);
            }
            clears.clears += 1;
        }
        if let Some(mut counts) = self.counts.get_mut(account) {
            for count in counts.values_mut() {
                count.day = day;
                count.used = 0;
            }
        }
        Ok(())
    }

    /// The clears `account` made this month (`at`'s).
    pub(crate) fn clears_this_month(&self, account: &str, at: SystemTime) -> u32 {
        let month = month_of_day(self.day_index(at));
        self.clears
            .get(account)
            .filter(|clears| clears.month == month)
            .map_or(0, |clears| clears.clears)
    }

    /// Every configured entry, by path then appid, for the stats page.
    pub(crate) fn configured(&self) -> Vec<ApiLimits> {
        let configured = read(&self.configured);
        let mut entries = Vec::new();
        for (path, entry) in configured.iter() {
            let scopes = std::iter::once((None, &entry.every_appid)).chain(
                entry
                    .by_appid
                    .iter()
                    .map(|(appid, figures)| (Some(appid.clone()), figures)),
            );
            for (appid, figures) in scopes {
                if *figures == Figures::default() {
                    continue;
                }
                entries.push(ApiLimits {
                    path: path.clone(),
                    appid,
                    rate_limit: figures.rate_limit,
                    component_rate_limit: figures.component_rate_limit,
                    daily_limit: figures.daily_limit,
                });
            }
        }
        entries.sort_by(|a, b| (&a.path, &a.appid).cmp(&(&b.path, &b.appid)));
        entries
    }

    /// Every (appid, path) that executed calls today, for the stats page.
    pub(crate) fn used_today(
        &self,
        at: SystemTime,
        default_limited: impl Fn(&str) -> bool,
    ) -> Vec<DailyUse> {
        let day = self.day_index(at);
        let mut uses = Vec::new();
        for counts in &self.counts {
            for (path, count) in counts.value() {
                if count.day != day || count.used == 0 {
                    continue;
                }
                let appid = counts.key();
                uses.push(DailyUse {
                    appid: appid.clone(),
                    path: path.clone(),
                    used: count.used,
                    daily_limit: self.figures(path, appid, default_limited(path)).daily_limit,
                });
            }
        }
        uses.sort_by(|a, b| (&a.appid, &a.path).cmp(&(&b.appid, &b.path)));
        uses
    }

    /// The day length and offset, for the stats page.
    pub(crate) fn day(&self) -> (Duration, Duration) {
        (self.day, self.day_offset)
    }

    /// Index of the day `at` falls in: days start at multiples of [`StandInConfig::day`]
    /// since the epoch, on a clock [`StandInConfig::day_offset`] ahead of UTC.
    pub(crate) fn day_index(&self, at: SystemTime) -> u128 {
        let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default() + self.day_offset;
        since_epoch.as_nanos() / self.day.as_nanos().max(1)
    }
}

/// Start, in nanoseconds since the epoch, of the aligned window of length `window` that `at`
/// falls in.
fn window_start(at: SystemTime, window: Duration) -> u128 {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let window = window.as_nanos().max(1);
    since_epoch - since_epoch % window
}

/// Reads a lock even if a panicking thread poisoned it (see [`crate::lock`]).
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn config(api_limits: Vec<ApiLimits>) -> StandInConfig {
        StandInConfig {
            api_limits,
            ..StandInConfig::default()
        }
    }

    fn call<'a>(path: &'a str, appid: &'a str, at: SystemTime) -> KeyCall<'a> {
        KeyCall {
            path,
            appid,
            via_component: false,
            default_limited: false,
            user: None,
            at,
        }
    }

    #[test]
    fn days_end_at_midnight_utc_plus_8() {
        let limits = Limits::new(&StandInConfig::default());
        // 2025-01-01T15:59:59Z is 23:59:59 in Beijing; a second later it is the next day.
        let before = 1_735_747_199;
        assert_eq!(
            limits.day_index(at(before)) + 1,
            limits.day_index(at(before + 1))
        );
        assert_eq!(
            limits.day_index(at(before)),
            limits.day_index(at(before - 86_399))
        );
    }

    #[test]
    fn figures_are_inherited_field_by_field() {
        let limits = Limits::new(&config(vec![
            ApiLimits::new("/wxa/a")
                .with_rate_limit(RateLimit::new(10, Duration::from_secs(60)))
                .with_daily_limit(100),
            ApiLimits::new("/wxa/a")
                .for_appid("wx1")
                .with_rate_limit(RateLimit::new(5, Duration::from_secs(2))),
            ApiLimits::new("/wxa/a")
                .for_appid("wx2")
                .with_component_rate_limit(RateLimit::new(3, Duration::from_secs(1))),
        ]));
        let every = limits.figures("/wxa/a", "wx0", false);
        assert_eq!(
            every.rate_limit,
            Some(RateLimit::new(10, Duration::from_secs(60)))
        );
        assert_eq!(every.component_rate_limit, every.rate_limit);
        assert_eq!(every.daily_limit, Some(100));
        let wx1 = limits.figures("/wxa/a", "wx1", false);
        assert_eq!(
            wx1.rate_limit,
            Some(RateLimit::new(5, Duration::from_secs(2)))
        );
        assert_eq!(wx1.component_rate_limit, wx1.rate_limit);
        assert_eq!(wx1.daily_limit, Some(100));
        let wx2 = limits.figures("/wxa/a", "wx2", false);
        assert_eq!(wx2.rate_limit, every.rate_limit);
        assert_eq!(
            wx2.component_rate_limit,
            Some(RateLimit::new(3, Duration::from_secs(1)))
        );
        assert_eq!(limits.figures("/wxa/b", "wx1", false), Figures::default());

        limits.set_default_rate(Some(7));
        let default = limits.figures("/sns/jscode2session", "wx1", true);
        assert_eq!(
            default.rate_limit,
            Some(RateLimit::new(7, Duration::from_secs(60)))
        );
        assert_eq!(limits.figures("/wxa/b", "wx1", false).rate_limit, None);
    }

    #[test]
    fn refused_calls_count_for_nothing() {
        let limits = Limits::new(&config(vec![ApiLimits::new("/wxa/a")
            .with_rate_limit(RateLimit::new(2, Duration::from_secs(10)))
            .with_daily_limit(3)]));
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(100))), Ok(()));
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(101))), Ok(()));
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(109))), Err(45011));
        assert_eq!(limits.daily_used("/wxa/a", "wx1", at(109)), 2);
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(110))), Ok(()));
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(111))), Err(45009));
        assert_eq!(limits.daily_used("/wxa/a", "wx1", at(111)), 3);
        // Another appid has its own counts.
        assert_eq!(limits.admit(&call("/wxa/a", "wx2", at(111))), Ok(()));
        // A clear restores the day, not the window.
        assert_eq!(limits.clear("wx1", at(112)), Ok(()));
        assert_eq!(limits.daily_used("/wxa/a", "wx1", at(112)), 0);
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(112))), Ok(()));
        assert_eq!(limits.admit(&call("/wxa/a", "wx1", at(113))), Err(45011));
        assert_eq!(limits.clears_this_month("wx1", at(113)), 1);
    }
}
