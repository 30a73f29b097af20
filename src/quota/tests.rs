//! The quota's tests: the bound proved on a fake clock, keys and overrides, the queue, the
//! pause, the carry-over of buckets on a reload, idle keys dropped.

use super::limits::emission_interval;
use super::*;
use crate::wechat::Api;
use governor::clock::FakeRelativeClock;

/// A `[quota]` without an arrival margin: the GCRA's own bound, window for window.
fn config(window_secs: u64, per_window: u32, burst: u32) -> QuotaConfig {
    let text = format!(
        "[quota]\nwindow_secs = {window_secs}\nper_window = {per_window}\nburst = {burst}\narrival_margin_ms = 0\n"
    );
    crate::Config::from_toml_str(&text).unwrap().quota
}

/// Most calls admitted in any half-open span `[t, t + window)`, by a sliding scan.
fn max_in_any_window(admitted_ms: &[u64], window_ms: u64) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..admitted_ms.len() {
        while admitted_ms[end] - admitted_ms[start] >= window_ms {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// The bound, proved on a fake clock: a client that tries every millisecond for several
/// windows never gets more than `per_window` into any window, and still gets at least
/// 90 % of the quota of every whole window.
#[test]
fn no_window_ever_holds_more_than_per_window() {
    for (per_window, burst) in [(100, 10), (100, 1), (100, 100), (7, 3), (60, 6), (1, 1)] {
        let window_ms = 60_000;
        let clock = FakeRelativeClock::default();
        let gate = QuotaGate::with_clock(&config(60, per_window, burst), clock.clone());
        let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
        let mut admitted = Vec::new();
        for ms in 0..(5 * window_ms) {
            if gate.try_take(&key).is_ok() {
                admitted.push(ms);
            }
            clock.advance(Duration::from_millis(1));
        }
        let most = max_in_any_window(&admitted, window_ms);
        assert!(
            most <= per_window as usize,
            "per_window {per_window} burst {burst}: {most} calls in one window"
        );
        // Every aligned window after the first uses the quota.
        for w in 1..5 {
            let in_window = admitted
                .iter()
                .filter(|&&ms| ms >= w * window_ms && ms < (w + 1) * window_ms)
                .count();
            let expected = per_window - burst + 1;
            assert!(
                in_window + 1 >= expected as usize,
                "per_window {per_window} burst {burst}: window {w} admitted {in_window}"
            );
        }
        if burst * 10 <= per_window {
            let steady = (per_window - burst + 1) as f64 / per_window as f64;
            assert!(steady >= 0.9, "{steady}");
        }
    }
}

#[test]
fn keys_are_independent_and_overrides_apply() {
    let mut quota = config(60, 10, 10);
    quota.appids.insert(
        "wx00000000000000b2".into(),
        QuotaLimit {
            per_window: 2,
            burst: 2,
        },
    );
    let gate = QuotaGate::with_clock(&quota, FakeRelativeClock::default());
    let a = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
    let a_token = QuotaKey::new(Api::Token, "wx00000000000000a1").unwrap();
    let b = QuotaKey::new(Api::JsCode2Session, "wx00000000000000b2").unwrap();
    for _ in 0..10 {
        assert!(gate.try_take(&a).is_ok());
    }
    assert!(gate.try_take(&a).is_err());
    assert!(gate.try_take(&a_token).is_ok());
    assert!(gate.try_take(&b).is_ok());
    assert!(gate.try_take(&b).is_ok());
    assert!(gate.try_take(&b).is_err());
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_order_and_refused_after_their_deadline() {
    // 2 per 2 s, no burst: one token every second.
    let gate = Arc::new(QuotaGate::new(&config(2, 2, 1)));
    let key = QuotaKey::new(Api::Token, "wx00000000000000a1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    assert_eq!(gate.acquire(&key, deadline).await, Ok(Duration::ZERO));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        let gate = gate.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            gate.acquire(&key, deadline).await.unwrap();
            tx.send(i).unwrap();
        });
        tokio::task::yield_now().await;
    }
    for expected in 0..3 {
        assert_eq!(rx.recv().await, Some(expected));
    }
    let refused = gate
        .acquire(&key, Instant::now() + Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(refused.retry_after >= Duration::from_secs(1));
    gate.retain_recent();
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_the_key() {
    let gate = QuotaGate::new(&config(60, 100, 10));
    let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    gate.pause(&key, until).await;
    let waited = gate
        .acquire(&key, Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    assert!(gate
        .acquire(&key, Instant::now() + Duration::from_secs(1))
        .await
        .is_ok());
    gate.pause(&key, Instant::now() + Duration::from_secs(30))
        .await;
    assert!(gate
        .acquire(&key, Instant::now() + Duration::from_secs(1))
        .await
        .is_err());
}

/// A reload applies new quotas to the buckets in use: a spent key stays spent (no fresh
/// burst), whether its class changed or it moved to an override, and runs at the new rate.
#[test]
fn a_reload_keeps_every_bucket_where_it_stands() {
    let clock = FakeRelativeClock::default();
    let gate = QuotaGate::with_clock(&config(60, 100, 10), clock.clone());
    let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
    let other = QuotaKey::new(Api::JsCode2Session, "wx00000000000000b2").unwrap();
    for _ in 0..10 {
        assert!(gate.try_take(&key).is_ok());
    }
    assert!(gate.try_take(&key).is_err(), "the burst is spent");
    clock.advance(Duration::from_secs(7));

    // Lower the default and give `other`'s appid an override of its own.
    let mut lower = config(60, 10, 2);
    lower.appids.insert(
        "wx00000000000000b2".into(),
        QuotaLimit {
            per_window: 5,
            burst: 5,
        },
    );
    gate.reconfigure(&lower);
    assert_eq!(gate.limit(&key).per_window, 10);
    assert_eq!(gate.limit(&other).per_window, 5);
    // 7 s after spending 10 at 100/min (one every 0.66 s), the old bucket had refilled
    // about 10: carried over, the key may take what the new burst allows (2), no more.
    let taken = (0..10).filter(|_| gate.try_take(&key).is_ok()).count();
    assert_eq!(taken, 2, "no fresh burst beyond the new limit");
    // From there, one token every 60 / (10 − 2 + 1) s.
    let interval = emission_interval(Duration::from_secs(60), gate.limit(&key));
    clock.advance(interval);
    assert!(gate.try_take(&key).is_ok());
    assert!(gate.try_take(&key).is_err());

    // A key spent under one class and moved to another keeps its state.
    for _ in 0..5 {
        assert!(gate.try_take(&other).is_ok());
    }
    let mut back = config(60, 10, 2);
    back.appids.insert(
        "wx00000000000000b2".into(),
        QuotaLimit {
            per_window: 6,
            burst: 6,
        },
    );
    gate.reconfigure(&back);
    // Five of the new six spent: one left, not a new window's worth.
    assert!(gate.try_take(&other).is_ok());
    assert!(gate.try_take(&other).is_err(), "moved, its state kept");
}

#[test]
fn idle_keys_are_dropped() {
    let clock = FakeRelativeClock::default();
    let gate = QuotaGate::with_clock(&config(60, 100, 10), clock.clone());
    for i in 0..100_000 {
        let key = QuotaKey::new(Api::JsCode2Session, format!("wx{i:016x}")).unwrap();
        assert!(gate.try_take(&key).is_ok());
    }
    assert_eq!(gate.len(), 100_000);
    gate.retain_recent();
    assert_eq!(gate.len(), 100_000, "recently used keys stay");
    // A few emission intervals later every bucket is full again: the state is redundant.
    let interval = emission_interval(
        Duration::from_secs(60),
        gate.limit(&QuotaKey::new(Api::Token, "wx").unwrap()),
    );
    clock.advance(interval * 3);
    gate.retain_recent();
    assert!(gate.is_empty(), "{} keys left", gate.len());
}

#[test]
fn next_window_start_is_within_a_window() {
    let until = next_window_start(Duration::from_secs(60));
    assert!(until > Duration::ZERO && until <= Duration::from_secs(60));
}

/// Most arrivals in any half-open span of `window_ms`, calls admitted at `admitted_ms` and
/// each delayed on its way by `delay_ms(i)`.
fn most_arrivals(admitted_ms: &[u64], delay_ms: impl Fn(usize) -> u64, window_ms: u64) -> usize {
    let mut arrivals: Vec<u64> = admitted_ms
        .iter()
        .enumerate()
        .map(|(i, at)| at + delay_ms(i))
        .collect();
    arrivals.sort_unstable();
    max_in_any_window(&arrivals, window_ms)
}

/// Admissions of a client trying every millisecond for `windows` windows.
fn admitted_every_ms(quota: &QuotaConfig, windows: u64) -> Vec<u64> {
    let clock = FakeRelativeClock::default();
    let gate = QuotaGate::with_clock(quota, clock.clone());
    let key = QuotaKey::new(Api::JsCode2Session, "wx00000000000000a1").unwrap();
    let window_ms = quota.window.as_millis() as u64;
    let mut admitted = Vec::new();
    for ms in 0..windows * window_ms {
        if gate.try_take(&key).is_ok() {
            admitted.push(ms);
        }
        clock.advance(Duration::from_millis(1));
    }
    admitted
}

/// The margin, proved on a fake clock: calls that reach WeChat up to `arrival_margin_ms`
/// later than others still never put more than `per_window` into one window where they
/// arrive, however the delays fall; without the margin, one slow first call is enough for
/// `per_window + 1` (the fresh connection of a burst's first call).
#[test]
fn the_margin_keeps_the_bound_where_calls_arrive() {
    let window_ms = 3_000;
    let mut quota = config(3, 20, 2);
    quota.arrival_margin = Duration::from_millis(100);
    let admitted = admitted_every_ms(&quota, 5);
    let first_slow = |i: usize| if i < 2 { 100 } else { 0 };
    let alternating = |i: usize| if i.is_multiple_of(2) { 100 } else { 0 };
    let scattered = |i: usize| (i as u64 * 37) % 101;
    for (name, most) in [
        (
            "first slow",
            most_arrivals(&admitted, first_slow, window_ms),
        ),
        (
            "alternating",
            most_arrivals(&admitted, alternating, window_ms),
        ),
        ("scattered", most_arrivals(&admitted, scattered, window_ms)),
    ] {
        assert!(most <= 20, "{name}: {most} arrivals in one window");
    }
    // Its cost: the spacing grows by margin / window, 3.3 % here.
    let in_window_two = admitted
        .iter()
        .filter(|&&ms| (2 * window_ms..3 * window_ms).contains(&ms))
        .count();
    assert!(in_window_two >= 18, "{in_window_two}");

    let without = admitted_every_ms(&config(3, 20, 2), 5);
    // The burst's two calls each open a connection.
    let slow_first = |i: usize| if i < 2 { 10 } else { 0 };
    assert_eq!(most_arrivals(&without, slow_first, window_ms), 21);
}

/// A key's own limit (WeChat's, learned) applies in its own window, the configuration still
/// wins where it names the key, and a key that changes limits keeps its bucket: spent stays
/// spent.
#[test]
fn figures_give_keys_limits_of_their_own_and_keep_their_buckets() {
    let clock = FakeRelativeClock::default();
    let mut quota = config(60, 100, 10);
    quota.appids.insert(
        "wx00000000000000b2".into(),
        QuotaLimit {
            per_window: 7,
            burst: 7,
        },
    );
    let gate = QuotaGate::with_clock(&quota, clock.clone());
    let key = QuotaKey::new(Api::Token, "wx00000000000000a1").unwrap();
    let named = QuotaKey::new(Api::Token, "wx00000000000000b2").unwrap();
    assert_eq!(gate.key_limit(&key).source, LimitSource::Default);
    for _ in 0..4 {
        assert!(gate.try_take(&key).is_ok());
    }
    assert_eq!(gate.turns(&key), 4);
    let stated = Figure {
        limit: QuotaLimit {
            per_window: 5,
            burst: 5,
        },
        window: Duration::from_secs(2),
        source: LimitSource::Wechat,
    };
    assert!(gate.set_figure(&key, Some(stated)));
    assert!(!gate.set_figure(&key, Some(stated)), "unchanged");
    let limit = gate.key_limit(&key);
    assert_eq!(
        (limit.limit, limit.window, limit.source),
        (stated.limit, stated.window, LimitSource::Wechat)
    );
    assert_eq!(gate.window_of(&key), Duration::from_secs(2));
    // Four spent at the old rate are four of the new five: one left, not a fresh five.
    assert!(gate.try_take(&key).is_ok());
    assert!(gate.try_take(&key).is_err(), "moved with its bucket");
    assert_eq!(gate.turns(&key), 5, "its turns moved along");
    // The configuration names `named`: its figure is kept, but the configuration's applies.
    assert!(gate.set_figure(&named, Some(stated)));
    assert_eq!(gate.key_limit(&named).source, LimitSource::Config);
    assert_eq!(gate.limit(&named).per_window, 7);
    // Back to the default: the key keeps its debt, in turns of the default's spacing.
    assert!(gate.set_figure(&key, None));
    assert_eq!(gate.key_limit(&key).source, LimitSource::Default);
    let taken = (0..20).filter(|_| gate.try_take(&key).is_ok()).count();
    assert_eq!(taken, 5, "ten of the burst, five of them spent");
    gate.retain_recent();
    assert!(!gate.is_empty());
}

#[test]
fn paths_outside_the_known_apis_get_keys_of_their_own() {
    let gate = QuotaGate::with_clock(&config(60, 100, 10), FakeRelativeClock::default());
    let a = gate
        .key_for_path("/wxa/getwxacode", "wx00000000000000a1")
        .unwrap();
    let b = gate
        .key_for_path("/wxa/msg_sec_check", "wx00000000000000a1")
        .unwrap();
    assert_ne!(a, b);
    assert_eq!(&*gate.api_path(&a), "/wxa/getwxacode");
    assert_eq!(a.api(), Api::Other);
    assert_ne!(a, a.on_behalf());
    assert_eq!(a.on_behalf().own(), a);
    assert!(gate.key_for_path("/sns/x", "wx00000000000000a1").is_none());
    assert!(gate.key_for_path("/wxa/x", "not an appid").is_none());
}
