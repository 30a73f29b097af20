//! Where each key's limit comes from, and what WeChat's answers teach the gate: the figures
//! of single keys (WeChat's, learned), the source of the limit in force, a 45011 as
//! evidence ([`super::learned`]), a 45009 as a daily block ([`super::daily`]), the doubt
//! on a stated figure that discovery reads, and the learned limits shared with replicas.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::Clock;
use tokio::time::Instant;

use super::learned::{self, KeyStanding, Refusal};
use super::metrics::LearnedChange;
use super::shared;
use super::{buckets, Figure, KeyLimit, LimitSource, QuotaGate, QuotaKey};
use crate::cluster::Tag;
use crate::config::QuotaLimit;
use crate::wechat::Api;

impl<C: Clock + Clone> QuotaGate<C> {
    /// Gives `key` a limit of its own (WeChat's, or a learned one), or takes it away
    /// (`None`); whether anything changed. Its bucket moves along: no fresh burst.
    pub fn set_figure(&self, key: &QuotaKey, figure: Option<Figure>) -> bool {
        self.figures
            .set(key, figure, &self.limits.load(), &self.clock)
    }

    /// `key`'s own limit, if it has one (whether or not the configuration names the key).
    pub fn figure(&self, key: &QuotaKey) -> Option<Figure> {
        self.figures.get(key)
    }

    /// Every key with a limit of its own.
    pub fn figures(&self) -> Vec<(QuotaKey, Figure)> {
        self.figures.all()
    }

    /// WeChat answered a call of `key` with `errcode`, not 45011 (see
    /// [`QuotaGate::refused`]). A 45009 puts the key's stated figure in doubt (see
    /// [`QuotaGate::take_refused`]) and blocks the key for the day. Any other answer but -1
    /// shows the call passed WeChat's limits, and may teach one (see [`learned`]).
    pub async fn answered(&self, key: &QuotaKey, errcode: crate::wechat::Errcode) {
        use crate::wechat::{Errcode, DAILY_QUOTA, MINUTE_QUOTA, SYSTEM_BUSY};
        match errcode {
            Errcode::Code(DAILY_QUOTA) => {
                self.doubt(key);
                let until = self.daily.block(key, SystemTime::now());
                tracing::warn!(
                    api = key.api().label(),
                    until = %crate::wechat::beijing_time(until),
                    "WeChat answered 45009: this API's daily quota is spent; wxgate answers its calls itself until WeChat's day ends"
                );
            }
            Errcode::Code(SYSTEM_BUSY | MINUTE_QUOTA) => {}
            _ => {
                let now = SystemTime::now();
                let settings = **self.learn_settings.load();
                let at = || self.standing(key, 0, now);
                if let Some(figure) = self.learner.succeeded(key, at, &settings) {
                    // Boxed: rare, and large with `[cluster]`.
                    Box::pin(self.apply_learned(key, figure, now, &settings)).await;
                }
            }
        }
    }

    /// Where `key` stands at `now`, having taken `turns` turns in its window.
    fn standing(&self, key: &QuotaKey, turns: u32, now: SystemTime) -> KeyStanding {
        let (limit, window, source) =
            self.resolve(key, |class, source| (class.limit, class.window, source));
        KeyStanding {
            source,
            limit,
            window: (buckets::window_index(now, window), window),
            turns,
            configured: self.configured_limit(key).0.per_window,
        }
    }

    /// WeChat answered a call of `key` 45011: evidence of the key's limit where WeChat
    /// states none (see [`learned`]), and a doubt on the figure where it does. What it means
    /// for the call comes back: pause the key, or hold this call only.
    pub async fn refused(&self, key: &QuotaKey) -> Refusal {
        self.doubt(key);
        let now = SystemTime::now();
        let mut turns = self.turns(key);
        if let Some(shared) = &self.shared {
            // Every replica's turns of the window, not this one's alone.
            if let Some(total) = shared.total_turns(key, self.window_of(key)).await {
                turns = turns.max(total);
            }
        }
        let standing = self.standing(key, turns, now);
        let settings = **self.learn_settings.load();
        let outcome = self.learner.refused(key, standing, &settings);
        if let Some(figure) = outcome.learned {
            self.apply_learned(key, figure, now, &settings).await;
        }
        outcome.refusal
    }

    /// Gives `key` the figure it learned at `now`, and shares it with the replicas.
    async fn apply_learned(
        &self,
        key: &QuotaKey,
        figure: Figure,
        now: SystemTime,
        settings: &learned::LearnSettings,
    ) {
        if !self.set_figure(key, Some(figure)) {
            return;
        }
        self.count_learned(LearnedChange::Lowered);
        tracing::warn!(
            api = key.api().label(),
            per_window = figure.limit.per_window,
            window_secs = figure.window.as_secs_f64(),
            "WeChat answered 45011 under the configured limit: a lower limit learned"
        );
        if let (Some(shared), Some(learned)) = (&self.shared, self.learner.learned(key)) {
            shared
                .publish_learned(key, learned.base, now, figure.window, settings.hold)
                .await;
        }
    }

    /// With `[cluster]`: takes the limits other replicas learned for this replica's keys with
    /// traffic (those whose limit nobody states), [`shared::READ_AT_ONCE`] keys a round.
    pub async fn sync_learned(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut keys: Vec<QuotaKey> = self
            .keys()
            .into_iter()
            .filter(|key| {
                matches!(
                    self.key_limit(key).source,
                    LimitSource::Default | LimitSource::Learned
                )
            })
            .collect();
        if keys.len() > shared::READ_AT_ONCE {
            // A different slice each round.
            let start = fastrand::usize(..keys.len());
            keys.rotate_left(start);
        }
        let now = SystemTime::now();
        for (key, record) in shared.read_learned(&keys).await {
            let age = now
                .duration_since(UNIX_EPOCH + Duration::from_millis(record.at_ms))
                .unwrap_or_default();
            let learned = learned::Learned {
                base: record.base,
                at: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                window: Duration::from_millis(record.window_ms.max(1)),
            };
            if self.learner.adopt(&key, learned) {
                tracing::info!(
                    api = key.api().label(),
                    "a limit another replica learned from 45011 adopted"
                );
                continue;
            }
            // This replica learned later than what Redis holds (another replica's store
            // landed after its own): it stores its own again, so that all come to one figure.
            if let Some(own) = self.learner.learned(&key) {
                if own.base != record.base && own.at > learned.at + Duration::from_millis(1) {
                    let hold = self.learn_settings.load().hold;
                    let at = now - own.at.elapsed();
                    shared
                        .publish_learned(&key, own.base, at, own.window, hold)
                        .await;
                }
            }
        }
    }

    fn count_learned(&self, change: LearnedChange) {
        if let Some(metrics) = &self.metrics {
            metrics.learned(change);
        }
    }

    /// Until when `key`'s calls are answered 45009 by wxgate itself (WeChat said its daily
    /// quota is spent), if they are now; such a call is counted as answered locally.
    #[inline]
    pub fn daily_block(&self, key: &QuotaKey) -> Option<SystemTime> {
        if !self.daily.any() {
            return None;
        }
        let until = self.daily.until(key, SystemTime::now())?;
        if let Some(metrics) = &self.metrics {
            metrics.local_daily(key.api());
        }
        Some(until)
    }

    /// Lifts `key`'s daily block (quota/get says some of its quota remains).
    pub fn lift_daily(&self, key: &QuotaKey) {
        if self.daily.lift(key) {
            tracing::info!(
                api = key.api().label(),
                "quota/get reports daily quota left: the 45009 block lifted"
            );
        }
    }

    /// Lifts the daily blocks of every key of `appid` (a `clear_quota` of it went through).
    pub fn lift_daily_appid(&self, appid: &str) {
        let lifted = self.daily.lift_appid(appid);
        if lifted > 0 {
            tracing::info!(
                keys = lifted,
                "clear_quota went through: 45009 blocks lifted"
            );
        }
    }

    /// Every key blocked for the day, and until when.
    pub fn daily_blocks(&self) -> Vec<(QuotaKey, SystemTime)> {
        self.daily.all()
    }

    /// Puts `key`'s stated figure in doubt.
    fn doubt(&self, key: &QuotaKey) {
        if key.api().is_code_exchange() {
            // Never stated: quota/get cannot be asked about them.
            return;
        }
        let mut refused = self.refused.lock();
        // Bounded by the keys with traffic; discovery takes them out.
        if refused.len() < 100_000 && refused.insert(key.own()) {
            self.refused_count.fetch_add(1, Ordering::Release);
        }
    }

    /// Moves the learned limits along their climb (once a second).
    pub(super) fn climb(&self) {
        let hold = self.learn_settings.load().hold;
        let changes = self.learner.climb(Instant::now(), hold, |key| {
            self.configured_limit(key).0.per_window
        });
        for (key, figure) in changes {
            // WeChat's own figure, stated since, wins over a learned one.
            if self
                .figure(&key)
                .is_some_and(|current| current.source == LimitSource::Wechat)
            {
                continue;
            }
            if self.set_figure(&key, figure) {
                let change = match figure {
                    Some(_) => LearnedChange::Raised,
                    None => LearnedChange::Ended,
                };
                self.count_learned(change);
            }
        }
    }

    /// The keys with recent traffic, counted by the source of their limit, into the gauge.
    pub(super) fn count_sources(&self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let mut counts = [0i64; LimitSource::ALL.len()];
        for key in self.keys() {
            counts[self.resolve(&key, |_, source| source).index()] += 1;
        }
        metrics.set_keys_by_source(counts);
    }

    /// Whether WeChat answered a call of `key` (its own calls or on its behalf) 45011 or
    /// 45009 since this was last asked.
    pub fn take_refused(&self, key: &QuotaKey) -> bool {
        if self.refused_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let removed = self.refused.lock().remove(&key.own());
        if removed {
            self.refused_count.fetch_sub(1, Ordering::Release);
        }
        removed
    }

    /// Whether turns are counted with other replicas (`[cluster]`).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// With `[cluster]`: the keyed fingerprint `key`'s state is kept under in Redis.
    pub fn shared_fingerprint(&self, key: &QuotaKey) -> Option<(Tag, String)> {
        let shared = self.shared.as_ref()?;
        Some((shared.tag(key), shared.fingerprint(key)))
    }

    /// The limit in force for `key`, its window and its source.
    pub fn key_limit(&self, key: &QuotaKey) -> KeyLimit {
        self.resolve(key, |class, source| KeyLimit {
            limit: class.limit,
            window: class.window,
            source,
        })
    }

    /// The limit the configuration gives `key` (named, or the default): what a learned limit
    /// climbs back to.
    pub fn configured_limit(&self, key: &QuotaKey) -> (QuotaLimit, LimitSource) {
        let limits = self.limits.load();
        match limits.named(key) {
            Some(class) => (class.limit, LimitSource::Config),
            None => (limits.default_class().limit, LimitSource::Default),
        }
    }

    /// The window `key`'s limit counts in.
    pub fn window_of(&self, key: &QuotaKey) -> Duration {
        self.resolve(key, |class, _| class.window)
    }

    /// Turns `key` took in its current calendar window, on this replica.
    pub fn turns(&self, key: &QuotaKey) -> u32 {
        if let Some(shared) = &self.shared {
            return shared.turns(key);
        }
        self.resolve(key, |class, _| class.turns(key, SystemTime::now()))
    }

    /// The key of `appid` calling `path`, an API outside [`Api`]: `None` for a path that is
    /// not shaped like WeChat's, or past the most paths wxgate numbers (see [`ApiPaths`]).
    pub fn key_for_path(&self, path: &str, appid: &str) -> Option<QuotaKey> {
        let number = self.paths.number(path)?;
        Some(QuotaKey::new(Api::Other, appid)?.with_path(number))
    }

    /// The path of `key`'s API: its documented path, or the path numbered in the key.
    pub fn api_path(&self, key: &QuotaKey) -> Arc<str> {
        match key.api() {
            Api::Other => self
                .paths
                .path(key.path())
                .unwrap_or_else(|| Arc::from("other")),
            api => Arc::from(api.label()),
        }
    }
}
