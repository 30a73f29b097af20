//! What the gate shows of itself (`GET /quota`, `wxgate quota`, the keys-by-source gauge):
//! every (appid, API) with recent traffic, the limit in force and its source, its window,
//! its calls this window, its callers waiting, its pause and its daily block.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use governor::clock::Clock;
use serde::Serialize;
use tokio::time::Instant;

use super::unix_ms;
use super::{QuotaGate, QuotaKey};
use crate::wechat::beijing_time;

/// One key as the gate shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRow {
    /// The appid (the admin port is the operator's: appids are shown as they are).
    pub appid: String,
    /// The API's path.
    pub api: String,
    /// Calls a platform makes on the account's behalf (they have their own limit).
    pub on_behalf: bool,
    /// Calls per window in force.
    pub limit: u32,
    /// Calls that may leave at once.
    pub burst: u32,
    /// The window, in seconds.
    pub window_secs: f64,
    /// `config`, `wechat`, `learned` or `default`.
    pub source: &'static str,
    /// Calls sent this window (this replica's).
    pub calls: u32,
    /// Callers waiting for a turn.
    pub waiting: usize,
    /// Until when a 45011 paused the key, if it does now (Unix milliseconds).
    pub paused_until_ms: Option<u64>,
    /// Until when wxgate answers the key 45009 itself (WeChat's day end, Beijing time).
    pub daily_blocked_until: Option<String>,
    /// What WeChat last stated of the key's daily quota, where it stated a limit (filled in
    /// by discovery).
    pub daily: Option<DailyRow>,
}

/// A daily quota as quota/get last reported it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DailyRow {
    /// Calls used today.
    pub used: u64,
    /// Calls a day.
    pub limit: u64,
}

impl<C: Clock + Clone> QuotaGate<C> {
    /// Every key with recent traffic: a bucket, turns this window, a limit of its own, a
    /// lane, or a daily block.
    pub fn keys(&self) -> Vec<QuotaKey> {
        let now = SystemTime::now();
        let mut keys: HashSet<QuotaKey> = HashSet::new();
        for class in &self.limits.load().classes {
            keys.extend(class.buckets.keys(now));
        }
        for class in self.figures.classes() {
            keys.extend(class.buckets.keys(now));
        }
        keys.extend(self.figures.all().into_iter().map(|(key, _)| key));
        if self.lane_count.load(Ordering::Acquire) != 0 {
            keys.extend(self.lanes.iter().map(|lane| *lane.key()));
        }
        keys.extend(self.daily.all().into_iter().map(|(key, _)| key));
        if let Some(shared) = &self.shared {
            keys.extend(shared.keys());
        }
        keys.into_iter().collect()
    }

    /// `key` as the gate shows it.
    pub fn row(&self, key: &QuotaKey) -> KeyRow {
        let now = SystemTime::now();
        let limit = self.key_limit(key);
        let (waiting, paused_until) = match self.lanes.get(key) {
            Some(lane) => (
                lane.waiting.load(Ordering::Relaxed),
                lane.pause_end().filter(|until| *until > Instant::now()),
            ),
            None => (0, None),
        };
        KeyRow {
            appid: key.appid().to_owned(),
            api: self.api_path(key).to_string(),
            on_behalf: key.is_on_behalf(),
            limit: limit.limit.per_window,
            burst: limit.limit.burst,
            window_secs: limit.window.as_secs_f64(),
            source: limit.source.label(),
            calls: self.turns(key),
            waiting,
            paused_until_ms: paused_until
                .map(|until| unix_ms(now + until.saturating_duration_since(Instant::now()))),
            daily_blocked_until: self.daily.until(key, now).map(beijing_time),
            daily: None,
        }
    }
}
