//! Limits learned where WeChat states none: the code exchanges (`/sns/*`, which quota/get
//! cannot be asked about) and any key without a token to ask with.
//!
//! # Learning
//! When WeChat answers 45011 in a window where wxgate had sent `n` calls of a key and `r` of
//! them were refused, WeChat evidently accepted `n − r` and no more: the key's limit becomes
//! that, less the calls that fit in the arrival margin at that rate (some of them may have
//! reached WeChat in the next window), and never below the *floor*
//! (`quota.learned_floor_percent` of the configured figure). The key is paused to the next
//! window as for any 45011.
//!
//! # The per-user limit
//! `code2Session` also limits each WeChat user (100 a minute), with the same 45011 as the
//! appid's limit. Were a user's 45011 taken for the appid's, one user hammering logins would
//! lower the limit, and the pause stop everyone else's logins. So a 45011 of a code exchange
//! counts as the appid's only when [`CORROBORATING`] refusals come in a row in one window,
//! with no success between, or when the window before ended with its refusals unbroken (a
//! configured figure just above WeChat's overshoots by one or two calls a window): past the
//! appid's limit WeChat refuses every call of the window, while a user's limit leaves the
//! other users' calls through, and their successes break the row. Until then only the
//! refused call is held to the next window; the key is not paused. A window that ended so
//! teaches at the first answer of the next one, whatever it is ([`Learner::succeeded`]): a
//! success there is the new window's, and does not break the old window's row, and waiting
//! for that window's own refusal would send it past the limit too.
//! A user alone on the appid still forms a row: the floor bounds what that can teach, and the
//! climb undoes it.
//!
//! # The climb
//! A learned figure is held for `quota.learned_hold_secs`, then raised a step per window
//! ([`CLIMB`], at least one call) until it reaches the configured figure, where learning
//! ends; never above it. Any 45011 on the way learns again from that window. From a figure
//! `L` to `0.9 × C` takes [`climb_windows`] windows after the hold: seven from half.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use wxgate_contract::LimitSource;

use super::figures::Figure;
use super::{figure_burst, QuotaKey};
use crate::config::QuotaLimit;

/// Refusals of a code exchange in a row, in one window and with no success between, that
/// make them the appid's limit rather than a user's.
pub const CORROBORATING: u32 = 3;

/// Each step of the climb raises the figure by this share (at least one call).
pub const CLIMB: f64 = 0.10;

/// The most keys learning at once; beyond, 45011s are held and paused as they always were.
const MAX_LEARNING: usize = 100_000;

/// What a 45011 means for the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The appid's limit: pause the key to WeChat's next window.
    Pause,
    /// Perhaps one user's limit: hold the refused call only.
    Hold,
}

/// The settings of learning (`[quota]`).
#[derive(Debug, Clone, Copy)]
pub struct LearnSettings {
    /// How long a learned figure is held before it climbs.
    pub hold: Duration,
    /// The floor, as a percentage of the configured figure.
    pub floor_percent: u32,
    /// `quota.arrival_margin_ms`.
    pub margin: Duration,
}

/// The 45011s of the current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    window: u64,
    refused: u32,
    in_a_row: u32,
    /// What WeChat evidently accepted in the window, as of its last refusal.
    accepted: u32,
}

/// What the refusals of a key's window show, after one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Refusals in this window.
    pub refused: u32,
    /// Of them, the last ones with no success between.
    pub in_a_row: u32,
    /// What WeChat evidently accepted in this window: its turns less its refusals.
    pub accepted: u32,
    /// When this refusal is the first of a window right after one whose refusals no
    /// success followed: what WeChat accepted in that window. A window that ended so is
    /// the appid's limit too (one refusal or two a window never form a row).
    pub clean_before: Option<u32>,
}

impl Evidence {
    /// One more 45011 in window `window`, which has had `turns` turns.
    pub fn refused(&mut self, window: u64, turns: u32) -> Row {
        let clean_before = self.enter(window);
        self.refused += 1;
        self.in_a_row += 1;
        self.accepted = turns.saturating_sub(self.refused);
        Row {
            refused: self.refused,
            in_a_row: self.in_a_row,
            accepted: self.accepted,
            clean_before,
        }
    }

    /// A call of the key succeeded, answered in window `window`: that window's row is
    /// broken. A success of a later window breaks nothing of the earlier one: when it is the
    /// first answer of the window right after one whose refusals no success followed, what
    /// WeChat accepted in that one comes back (as [`Row::clean_before`] does).
    pub fn succeeded(&mut self, window: u64) -> Option<u32> {
        if window < self.window {
            // A late answer of a window over: its row no longer matters.
            return None;
        }
        let clean_before = self.enter(window);
        self.in_a_row = 0;
        clean_before
    }

    /// Moves the evidence to `window` if it is a later one; what WeChat accepted in the
    /// window left, if it was the one right before and ended with its refusals unbroken.
    fn enter(&mut self, window: u64) -> Option<u32> {
        if self.window == window {
            return None;
        }
        let clean = self.refused > 0 && self.in_a_row == self.refused;
        let clean_before = (clean && self.window + 1 == window).then_some(self.accepted);
        *self = Evidence {
            window,
            ..Evidence::default()
        };
        clean_before
    }
}

/// A figure learned at `at`, from which the climb starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned {
    /// The figure learned.
    pub base: u32,
    /// When.
    pub at: Instant,
    /// The key's window.
    pub window: Duration,
}

/// The floor under a learned figure: `percent` of the configured figure, at least one.
pub fn floor(configured: u32, percent: u32) -> u32 {
    let floor = (u64::from(configured) * u64::from(percent)).div_ceil(100);
    u32::try_from(floor)
        .unwrap_or(u32::MAX)
        .clamp(1, configured.max(1))
}

/// What WeChat evidently accepted in a window, less the calls that fit in the margin at that
/// rate, within [floor, ceiling].
pub fn learned_figure(
    accepted: u32,
    window: Duration,
    margin: Duration,
    floor: u32,
    ceiling: u32,
) -> u32 {
    let in_margin = (u128::from(accepted) * margin.as_nanos()).div_ceil(window.as_nanos().max(1));
    let figure = accepted.saturating_sub(u32::try_from(in_margin).unwrap_or(u32::MAX));
    figure.max(floor).min(ceiling).max(1)
}

/// One step of the climb from `figure`.
fn step(figure: u32) -> u32 {
    let raised = (f64::from(figure) * (1.0 + CLIMB)).floor() as u32;
    raised.max(figure.saturating_add(1))
}

/// The figure of `learned` at `now`: its base during the hold, then one [`step`] per
/// window begun since, up to `ceiling`.
pub fn figure_at(learned: &Learned, now: Instant, hold: Duration, ceiling: u32) -> u32 {
    let since = now.saturating_duration_since(learned.at);
    let Some(climbing) = since.checked_sub(hold) else {
        return learned.base.min(ceiling);
    };
    let steps = climbing.as_nanos() / learned.window.as_nanos().max(1) + 1;
    let mut figure = learned.base;
    for _ in 0..steps {
        if figure >= ceiling {
            break;
        }
        figure = step(figure);
    }
    figure.min(ceiling)
}

/// How many windows of climb take a figure from `from` to at least `to`.
#[cfg(test)]
pub fn climb_windows(from: u32, to: u32) -> u32 {
    let mut figure = from;
    let mut windows = 0;
    while figure < to {
        figure = step(figure);
        windows += 1;
    }
    windows
}

/// What is known of one key's 45011s.
#[derive(Debug, Default)]
struct KeyLearning {
    evidence: Evidence,
    learned: Option<Learned>,
    /// The last 45011: a key with nothing learned is forgotten [`FORGET_AFTER`] later.
    refused_at: Option<Instant>,
}

/// How long the refusals of a key that learned nothing are kept.
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl KeyLearning {
    /// Learns from a window where WeChat accepted `accepted` calls, if the key's limit is one
    /// that learns (nobody states it) and it has not learned in this window already.
    fn learn(
        &mut self,
        accepted: u32,
        at: &KeyStanding,
        settings: &LearnSettings,
    ) -> Option<Figure> {
        let learns = matches!(at.source, LimitSource::Default | LimitSource::Learned);
        // Learned once per window: the row goes on growing, the evidence does not.
        let already = self.learned.is_some_and(|learned| {
            learned.at.elapsed() < at.window.1 && at.source == LimitSource::Learned
        });
        if !learns || already {
            return None;
        }
        let floor = floor(at.configured, settings.floor_percent);
        let figure = learned_figure(
            accepted,
            at.window.1,
            settings.margin,
            floor,
            at.limit.per_window.min(at.configured),
        );
        self.learned = Some(Learned {
            base: figure,
            at: Instant::now(),
            window: at.window.1,
        });
        Some(learned(figure, at.window.1))
    }
}

/// What a refusal came to: how to treat the call, and the key's new figure if one was
/// learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Pause the key, or hold the call only.
    pub refusal: Refusal,
    /// The figure learned, if this refusal taught one.
    pub learned: Option<Figure>,
}

/// The learning of every key.
#[derive(Default)]
pub(super) struct Learner {
    keys: Mutex<HashMap<QuotaKey, KeyLearning>>,
    /// How many keys are watched: while none, a success does not look.
    count: AtomicUsize,
}

/// What the gate knows of a key when WeChat refuses one of its calls.
pub(super) struct KeyStanding {
    /// Where its limit comes from now.
    pub(super) source: LimitSource,
    /// The limit in force.
    pub(super) limit: QuotaLimit,
    /// Its window's index and length.
    pub(super) window: (u64, Duration),
    /// Turns taken in that window.
    pub(super) turns: u32,
    /// The configured figure (named or default): the ceiling.
    pub(super) configured: u32,
}

impl Learner {
    /// WeChat answered a call of `key` 45011.
    pub(super) fn refused(
        &self,
        key: &QuotaKey,
        at: KeyStanding,
        settings: &LearnSettings,
    ) -> Outcome {
        let mut keys = self.keys.lock();
        if !keys.contains_key(key) {
            if keys.len() >= MAX_LEARNING {
                return Outcome {
                    refusal: Refusal::Pause,
                    learned: None,
                };
            }
            keys.insert(*key, KeyLearning::default());
            self.count.store(keys.len(), Ordering::Release);
        }
        let learning = keys.get_mut(key).expect("inserted above");
        learning.refused_at = Some(Instant::now());
        let row = learning.evidence.refused(at.window.0, at.turns);
        let needed = if key.api().is_code_exchange() {
            CORROBORATING
        } else {
            1
        };
        let accepted = match (row.in_a_row >= needed, row.clean_before) {
            (true, _) => row.accepted,
            (false, Some(accepted)) => accepted,
            (false, None) => {
                return Outcome {
                    refusal: Refusal::Hold,
                    learned: None,
                }
            }
        };
        Outcome {
            refusal: Refusal::Pause,
            learned: learning.learn(accepted, &at, settings),
        }
    }

    /// Whether some key is watched: while none is, a success has nothing to tell.
    #[inline]
    pub(super) fn watching(&self) -> bool {
        self.count.load(Ordering::Acquire) != 0
    }

    /// A call of `key` got an answer other than 45011, with the key standing as `at` says
    /// (read only when the key is watched). The figure learned, when this is the first
    /// answer of a window right after one that ended with its refusals unbroken: WeChat's
    /// limit, learned before this window goes past it in turn. The key is not paused: its
    /// window has just begun.
    pub(super) fn succeeded(
        &self,
        key: &QuotaKey,
        at: impl FnOnce() -> KeyStanding,
        settings: &LearnSettings,
    ) -> Option<Figure> {
        if !self.watching() {
            return None;
        }
        let mut keys = self.keys.lock();
        let learning = keys.get_mut(key)?;
        let at = at();
        let accepted = learning.evidence.succeeded(at.window.0)?;
        learning.learn(accepted, &at, settings)
    }

    /// The learned figures as they stand at `now`: for each key learning, its figure
    /// (`None`: learning ended, back to the configured figure). Keys with nothing learned and
    /// no refusal this window are forgotten.
    pub(super) fn climb(
        &self,
        now: Instant,
        hold: Duration,
        ceiling: impl Fn(&QuotaKey) -> u32,
    ) -> Vec<(QuotaKey, Option<Figure>)> {
        let mut changes = Vec::new();
        let mut keys = self.keys.lock();
        keys.retain(|key, learning| {
            let Some(learned) = learning.learned else {
                // Refusals of a window long over teach nothing more.
                return learning
                    .refused_at
                    .is_some_and(|at| now.saturating_duration_since(at) < FORGET_AFTER);
            };
            let ceiling = ceiling(key);
            let figure = figure_at(&learned, now, hold, ceiling);
            if figure >= ceiling {
                changes.push((*key, None));
                return false;
            }
            changes.push((*key, Some(self::learned(figure, learned.window))));
            true
        });
        self.count.store(keys.len(), Ordering::Release);
        changes
    }

    /// The figure learned for `key` and when, if any.
    pub(super) fn learned(&self, key: &QuotaKey) -> Option<Learned> {
        self.keys.lock().get(key)?.learned
    }
}

impl Learner {
    /// Takes what another replica learned for `key`, if it is newer than what this one
    /// knows; whether it did.
    pub(super) fn adopt(&self, key: &QuotaKey, learned: Learned) -> bool {
        let mut keys = self.keys.lock();
        if keys.len() >= MAX_LEARNING && !keys.contains_key(key) {
            return false;
        }
        let learning = keys.entry(*key).or_default();
        let newer = learning
            .learned
            .is_none_or(|current| current.at + Duration::from_millis(1) < learned.at);
        if newer {
            learning.learned = Some(learned);
        }
        self.count.store(keys.len(), Ordering::Release);
        newer
    }
}

/// A learned figure as a key's limit.
fn learned(per_window: u32, window: Duration) -> Figure {
    Figure {
        limit: QuotaLimit {
            per_window,
            burst: figure_burst(per_window),
        },
        window,
        source: LimitSource::Learned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_learned_figure_is_what_was_accepted_less_the_margin_within_floor_and_ceiling() {
        // 100 accepted in a minute, 250 ms margin: one call fits in the margin.
        assert_eq!(
            learned_figure(100, MINUTE, Duration::from_millis(250), 1, 5000),
            99
        );
        // 20 in a second with 100 ms: two.
        let second = Duration::from_secs(1);
        assert_eq!(
            learned_figure(20, second, Duration::from_millis(100), 1, 5000),
            18
        );
        // Never under the floor, never above the ceiling, never zero.
        assert_eq!(learned_figure(10, MINUTE, Duration::ZERO, 2500, 5000), 2500);
        assert_eq!(learned_figure(900, MINUTE, Duration::ZERO, 1, 500), 500);
        assert_eq!(learned_figure(0, MINUTE, Duration::ZERO, 0, 500), 1);
        assert_eq!(floor(5000, 50), 2500);
        assert_eq!(floor(3, 50), 2);
        assert_eq!(floor(10, 0), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_learned_figure_is_held_then_climbs_a_step_per_window_to_the_ceiling() {
        let hold = Duration::from_secs(600);
        let learned = Learned {
            base: 50,
            at: Instant::now(),
            window: MINUTE,
        };
        let at = |secs: u64| learned.at + Duration::from_secs(secs);
        assert_eq!(figure_at(&learned, at(0), hold, 100), 50);
        assert_eq!(figure_at(&learned, at(599), hold, 100), 50, "held");
        assert_eq!(figure_at(&learned, at(600), hold, 100), 55, "first step");
        assert_eq!(figure_at(&learned, at(659), hold, 100), 55);
        assert_eq!(figure_at(&learned, at(660), hold, 100), 60);
        assert_eq!(figure_at(&learned, at(6000), hold, 100), 100, "never above");
        // Small figures climb by one at least.
        let small = Learned { base: 1, ..learned };
        assert_eq!(figure_at(&small, at(660), hold, 100), 3);
        // The bound the documentation gives: from half to 90 %, seven windows.
        assert_eq!(climb_windows(50, 90), 7);
        assert_eq!(climb_windows(2500, 4500), 7);
        assert_eq!(climb_windows(90, 90), 0);
    }

    #[test]
    fn a_row_of_refusals_is_broken_by_a_success_and_by_a_new_window() {
        let mut evidence = Evidence::default();
        let counts = |row: Row| (row.refused, row.in_a_row, row.clean_before);
        assert_eq!(counts(evidence.refused(1, 9)), (1, 1, None));
        assert_eq!(
            evidence.refused(1, 10).accepted,
            8,
            "ten turns, two refused"
        );
        assert_eq!(evidence.succeeded(1), None);
        assert_eq!(counts(evidence.refused(1, 11)), (3, 1, None));
        // A new window starts over; the one before was broken by a success.
        assert_eq!(counts(evidence.refused(2, 5)), (1, 1, None));
        // Window 2 ended with its refusals unbroken: the first of window 3 says so.
        assert_eq!(evidence.refused(3, 6).clean_before, Some(4));
        // Not when a window lies between.
        assert_eq!(evidence.refused(5, 6).clean_before, None);
        // The successes a new window starts with are its own: they do not break the row the
        // window before ended with, and the first of them says what that window accepted.
        assert_eq!(evidence.refused(5, 21).clean_before, None);
        assert_eq!(evidence.succeeded(6), Some(19));
        assert_eq!(evidence.succeeded(6), None, "said once");
        assert_eq!(counts(evidence.refused(6, 21)), (1, 1, None));
        // A late answer of a window over changes nothing.
        assert_eq!(evidence.succeeded(5), None);
        assert_eq!(counts(evidence.refused(6, 22)), (2, 2, None));
        // A window that ended with a success after its refusals is not clean.
        evidence.succeeded(6);
        assert_eq!(evidence.succeeded(7), None);
        assert_eq!(evidence.refused(8, 3).clean_before, None);
    }

    fn refused(source: LimitSource, turns: u32) -> KeyStanding {
        in_window(7, source, turns)
    }

    fn in_window(window: u64, source: LimitSource, turns: u32) -> KeyStanding {
        KeyStanding {
            source,
            limit: QuotaLimit {
                per_window: 100,
                burst: 10,
            },
            window: (window, MINUTE),
            turns,
            configured: 100,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn code_exchanges_learn_only_from_a_row_and_other_keys_from_one_refusal() {
        let settings = LearnSettings {
            hold: Duration::from_secs(600),
            floor_percent: 50,
            margin: Duration::ZERO,
        };
        let learner = Learner::default();
        let exchange =
            QuotaKey::new(crate::wechat::Api::JsCode2Session, "wx00000000000000a1").unwrap();
        // A user's limit: refusals with successes between never teach, never pause.
        for _ in 0..10 {
            let outcome = learner.refused(&exchange, refused(LimitSource::Default, 80), &settings);
            assert_eq!(
                outcome,
                Outcome {
                    refusal: Refusal::Hold,
                    learned: None
                }
            );
            let learned =
                learner.succeeded(&exchange, || refused(LimitSource::Default, 80), &settings);
            assert_eq!(learned, None);
        }
        // The appid's limit: three in a row.
        learner.refused(&exchange, refused(LimitSource::Default, 80), &settings);
        learner.refused(&exchange, refused(LimitSource::Default, 80), &settings);
        let outcome = learner.refused(&exchange, refused(LimitSource::Default, 80), &settings);
        assert_eq!(outcome.refusal, Refusal::Pause);
        // 80 turns, 13 of them refused: 67 accepted.
        assert_eq!(outcome.learned.unwrap().limit.per_window, 67);
        assert_eq!(outcome.learned.unwrap().source, LimitSource::Learned);
        // A user alone forming a row teaches no less than the floor.
        let lonely =
            QuotaKey::new(crate::wechat::Api::JsCode2Session, "wx00000000000000b2").unwrap();
        let mut last = None;
        for _ in 0..3 {
            last = learner
                .refused(&lonely, refused(LimitSource::Default, 10), &settings)
                .learned;
        }
        assert_eq!(last.unwrap().limit.per_window, 50);
        // Another API learns from its first refusal; a stated or configured figure never.
        let token = QuotaKey::new(crate::wechat::Api::Token, "wx00000000000000a1").unwrap();
        let outcome = learner.refused(&token, refused(LimitSource::Default, 60), &settings);
        assert_eq!(outcome.learned.unwrap().limit.per_window, 59);
        let stated = QuotaKey::new(crate::wechat::Api::StableToken, "wx00000000000000a1").unwrap();
        for source in [LimitSource::Wechat, LimitSource::Config] {
            let outcome = learner.refused(&stated, refused(source, 60), &settings);
            assert_eq!(
                outcome,
                Outcome {
                    refusal: Refusal::Pause,
                    learned: None
                }
            );
        }
        // The climb: held, then up a step per window, then back to the configured figure.
        let now = Instant::now();
        let changes = learner.climb(now, settings.hold, |_| 100);
        assert!(changes.contains(&(token, Some(learned(59, MINUTE)))));
        let later = now + settings.hold + MINUTE * 10;
        let changes = learner.climb(later, settings.hold, |_| 100);
        assert!(changes.contains(&(token, None)), "{changes:?}");
        assert!(learner.learned(&token).is_none());
    }

    /// A burst that began late in a window: WeChat refuses the last call or two of it, too
    /// few for a row. The next window's first answer, a success, teaches what that window
    /// accepted, before this window sends past the limit in its turn.
    #[tokio::test(start_paused = true)]
    async fn a_window_that_ended_with_its_refusals_teaches_at_the_next_windows_first_answer() {
        let settings = LearnSettings {
            hold: Duration::from_secs(600),
            floor_percent: 10,
            margin: Duration::ZERO,
        };
        let learner = Learner::default();
        let exchange =
            QuotaKey::new(crate::wechat::Api::JsCode2Session, "wx00000000000000a1").unwrap();
        let at = |window, turns| in_window(window, LimitSource::Default, turns);
        let outcome = learner.refused(&exchange, at(7, 21), &settings);
        assert_eq!(outcome.refusal, Refusal::Hold, "one refusal: no row yet");
        let success = |window| learner.succeeded(&exchange, || at(window, 0), &settings);
        let figure = success(8).expect("learned at the next window's first answer");
        assert_eq!(figure.limit.per_window, 20);
        assert_eq!(figure.source, LimitSource::Learned);
        assert_eq!(success(8), None, "once");

        // A refusal broken by a success in its own window teaches nothing at the next one.
        let other =
            QuotaKey::new(crate::wechat::Api::JsCode2Session, "wx00000000000000b2").unwrap();
        learner.refused(&other, at(7, 21), &settings);
        assert_eq!(learner.succeeded(&other, || at(7, 0), &settings), None);
        assert_eq!(learner.succeeded(&other, || at(8, 0), &settings), None);
    }
}
