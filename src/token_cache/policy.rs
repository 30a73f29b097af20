//! The token cache's decisions, as pure functions of what is cached and the time: serve or
//! fetch, refresh ahead or not, keep or drop, which of two tokens is newer. Nothing here
//! touches a socket, a lock or a clock, so every rule is unit-tested below.
//!
//! # Why tokens handed out stay valid until their `expires_in`
//! WeChat keeps a token valid for five minutes (its *overlap*) after the next fetch mints a
//! new one. wxgate refreshes a token at most [`Policy::refresh_ahead`] (< 300 s) before it
//! expires, and tells every caller the time that really remains (rounded down, counted from
//! when the fetch was *sent*, so never later than WeChat's own expiry). A token given out at
//! any time before its refresh is therefore valid until its expiry: the refresh that
//! replaces it happens less than five minutes before that expiry.

use std::time::{Duration, SystemTime};

/// WeChat refuses to force a new stable token more often than this (`force_refresh`
/// within 30 s of the previous forced one returns the current token).
pub const FORCE_SPACING: Duration = Duration::from_secs(30);

/// A token with less than this left is not handed out: its `expires_in` would read 0, and a
/// caller would come straight back for another.
pub const MIN_SERVABLE: Duration = Duration::from_secs(1);

/// The refresh window is at least this long (unless `refresh_ahead` is shorter): `expires_in`
/// counts whole seconds, so a caller holding a token told "1 s left" comes back up to two
/// seconds before its expiry, and must find the refresh window open then. Only short-lived
/// tokens (tests, the stand-in) get near it; WeChat's 7200 s tokens have a 240 s window.
pub const MIN_REFRESH_WINDOW: Duration = Duration::from_secs(2);

/// The errcodes that say "this access token is no longer good": invalid credential, invalid
/// token, token expired.
pub const STALE_TOKEN_ERRCODES: [i64; 3] = [40001, 40014, 42001];

/// The refresh rules of `[token_cache]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `refresh_ahead_secs`: the longest a token is refreshed before its expiry.
    pub refresh_ahead: Duration,
}

/// What a cached token is, for the decisions (the token itself is not needed to decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// When the fetch that minted it was sent: orders tokens (see [`supersedes`]).
    pub issued: SystemTime,
    /// `issued + expires_in`: never later than WeChat's own expiry.
    pub expires_at: SystemTime,
    /// The `expires_in` WeChat answered.
    pub lifetime: Duration,
    /// When a forced refresh (stable tokens) minted it, if one did.
    pub forced_at: Option<SystemTime>,
}

/// What the request in hand asks, besides its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// Its credential (secret) is the one that minted the cached token.
    pub credential_matches: bool,
    /// `force_refresh: true` (stable tokens only).
    pub forced: bool,
    /// No refresh of this key is running, and none failed too recently (see
    /// [`Policy::refresh_backoff`]).
    pub refresh_allowed: bool,
}

/// What to do with a token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Answer from the cache with `expires_in` seconds; with `refresh`, also start one
    /// refresh in the background.
    Serve {
        /// The remaining lifetime, whole seconds rounded down.
        expires_in: u64,
        /// Start the refresh ahead of expiry now.
        refresh: bool,
    },
    /// Fetch a token for the cache (one flight per key and credential; callers wait for it).
    Fetch {
        /// A forced refresh of a stable token.
        forced: bool,
    },
    /// Another credential than the cached token's: its own upstream call, WeChat's own
    /// answer, and never the cached token.
    Own,
}

impl Policy {
    /// How long before its expiry a token of `lifetime` is refreshed: a tenth of its
    /// lifetime, at least [`MIN_REFRESH_WINDOW`] (so that the refresh starts while the token
    /// is still handed out), at most `refresh_ahead`.
    pub fn refresh_window(&self, lifetime: Duration) -> Duration {
        (lifetime / 10)
            .max(MIN_REFRESH_WINDOW)
            .min(self.refresh_ahead)
    }

    /// After a refresh failed, the next one waits this long: a quarter of the refresh
    /// window, so a token gets a few tries before it expires and a failing WeChat is not
    /// asked on every request.
    pub fn refresh_backoff(&self, lifetime: Duration) -> Duration {
        self.refresh_window(lifetime) / 4
    }

    /// Decides what a token request gets, given what is cached (`held`) and `now`.
    pub fn plan(&self, held: Option<&Held>, asked: Asked, now: SystemTime) -> Plan {
        let Some(held) = held.filter(|held| remaining(held, now) >= MIN_SERVABLE) else {
            // Nothing usable cached: whoever asks first fetches for the cache.
            return Plan::Fetch {
                forced: asked.forced,
            };
        };
        if !asked.credential_matches {
            return Plan::Own;
        }
        if asked.forced && !recently_forced(held, now) {
            return Plan::Fetch { forced: true };
        }
        let left = remaining(held, now);
        Plan::Serve {
            expires_in: left.as_secs(),
            refresh: asked.refresh_allowed && left <= self.refresh_window(held.lifetime),
        }
    }

    /// Whether a fetch is still needed for `need`, given what the cache holds now (another
    /// replica may have fetched meanwhile): a token minted with the same secret
    /// (`same_credential`) that serves the purpose makes it unnecessary.
    pub fn fetch_needed(
        &self,
        held: Option<&Held>,
        same_credential: bool,
        need: Need,
        now: SystemTime,
    ) -> bool {
        let Some(held) = held.filter(|_| same_credential) else {
            return true;
        };
        let left = remaining(held, now);
        let usable = left >= MIN_SERVABLE;
        match need {
            Need::Usable => !usable,
            Need::Forced => !(usable && recently_forced(held, now)),
            Need::Refresh => left <= self.refresh_window(held.lifetime),
        }
    }
}

/// Whether a forced refresh minted `held` less than [`FORCE_SPACING`] ago.
fn recently_forced(held: &Held, now: SystemTime) -> bool {
    held.forced_at
        .is_some_and(|at| now.duration_since(at).unwrap_or_default() < FORCE_SPACING)
}

/// What a fetch that finds the lease taken by another replica waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A token that can be handed out.
    Usable,
    /// A token a forced refresh minted less than 30 s ago.
    Forced,
    /// A token outside its refresh window.
    Refresh,
}

/// What Redis holds for a key, as the decisions see it: the issue times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteView {
    /// Nothing.
    Missing,
    /// A tombstone: a token issued then was refused.
    Dropped(SystemTime),
    /// A token issued then.
    Present(SystemTime),
}

/// How a replica brings its own cache and Redis together when it reads Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconcile {
    /// Redis holds a newer token: cache it.
    TakeRemote,
    /// Redis says the cached token (or an older one) was refused: drop it.
    DropLocal,
    /// The cached token is newer than anything in Redis and still usable (fetched while
    /// Redis was away, or Redis restarted empty): store it in Redis, so that the replicas
    /// agree on it instead of one fetching a new token that would retire it.
    Seed,
    /// Nothing to do.
    Keep,
}

/// Compares the cached token (`local`, and the newest one dropped) with what Redis holds.
pub fn reconcile(
    local: Option<&Held>,
    local_dropped: Option<SystemTime>,
    remote: RemoteView,
    now: SystemTime,
) -> Reconcile {
    let local_issued = local.map(|held| held.issued);
    let usable = local.filter(|held| remaining(held, now) >= MIN_SERVABLE);
    let newer_here = |remote: SystemTime| usable.is_some_and(|held| held.issued > remote);
    match remote {
        RemoteView::Present(issued) if supersedes(issued, local_issued.max(local_dropped)) => {
            Reconcile::TakeRemote
        }
        RemoteView::Present(issued) if newer_here(issued) => Reconcile::Seed,
        RemoteView::Dropped(issued) if local_issued.is_some_and(|local| local <= issued) => {
            Reconcile::DropLocal
        }
        RemoteView::Dropped(issued) if newer_here(issued) => Reconcile::Seed,
        RemoteView::Missing if usable.is_some() => Reconcile::Seed,
        _ => Reconcile::Keep,
    }
}

/// How long `held` has left at `now` (zero once expired).
pub fn remaining(held: &Held, now: SystemTime) -> Duration {
    held.expires_at.duration_since(now).unwrap_or_default()
}

/// Whether a token issued at `new` may replace one issued at `old`: only a newer one.
/// WeChat invalidates every token older than the last one it minted, so an older token
/// arriving late (a slow fetch, a replica back from an outage) must never overwrite a newer.
pub fn supersedes(new: SystemTime, old: Option<SystemTime>) -> bool {
    old.is_none_or(|old| new > old)
}

/// Whether an answer's errcode says the access token it carried is stale.
pub fn is_stale_token_errcode(errcode: i64) -> bool {
    STALE_TOKEN_ERRCODES.contains(&errcode)
}

/// Whether a stale-token answer for the token `presented` drops the `cached` one: only if
/// the cache still holds the token that failed (compared in constant time). A second
/// failure of the same stale token, after the cache moved on, drops nothing: a burst of
/// 40001s causes one refresh, not one each (WxJava's compare-before-expire).
pub fn drops_cached(cached: Option<&str>, presented: &str) -> bool {
    cached.is_some_and(|cached| {
        let (a, b) = (cached.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        refresh_ahead: Duration::from_secs(240),
    };

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn held(issued: u64, lifetime: u64) -> Held {
        Held {
            issued: at(issued),
            expires_at: at(issued + lifetime),
            lifetime: Duration::from_secs(lifetime),
            forced_at: None,
        }
    }

    fn asked(credential_matches: bool) -> Asked {
        Asked {
            credential_matches,
            forced: false,
            refresh_allowed: true,
        }
    }

    #[test]
    fn the_refresh_window_is_a_tenth_of_the_lifetime_within_bounds() {
        let window = |secs| POLICY.refresh_window(Duration::from_secs(secs));
        assert_eq!(window(7200), Duration::from_secs(240), "capped");
        assert_eq!(window(1200), Duration::from_secs(120));
        assert_eq!(window(4), MIN_REFRESH_WINDOW, "at least two seconds");
        let short = Policy {
            refresh_ahead: Duration::from_secs(1),
        };
        assert_eq!(short.refresh_window(Duration::from_secs(4)).as_secs(), 1);
        assert!(
            window(7200) < Duration::from_secs(300),
            "inside the overlap"
        );
        assert_eq!(
            POLICY.refresh_backoff(Duration::from_secs(7200)).as_secs(),
            60
        );
    }

    #[test]
    fn a_fresh_token_is_served_with_the_time_that_really_remains() {
        let token = held(0, 7200);
        assert_eq!(
            POLICY.plan(Some(&token), asked(true), at(1000)),
            Plan::Serve {
                expires_in: 6200,
                refresh: false
            }
        );
        // Rounded down: never more than remains.
        let later = at(1000) + Duration::from_millis(999);
        assert_eq!(
            POLICY.plan(Some(&token), asked(true), later),
            Plan::Serve {
                expires_in: 6199,
                refresh: false
            }
        );
    }

    #[test]
    fn inside_the_refresh_window_one_refresh_starts_while_the_token_is_served() {
        let token = held(0, 7200);
        let in_window = at(7200 - 200);
        assert_eq!(
            POLICY.plan(Some(&token), asked(true), in_window),
            Plan::Serve {
                expires_in: 200,
                refresh: true
            }
        );
        // A refresh is already running (or failed a moment ago): served, no second one.
        let busy = Asked {
            refresh_allowed: false,
            ..asked(true)
        };
        assert_eq!(
            POLICY.plan(Some(&token), busy, in_window),
            Plan::Serve {
                expires_in: 200,
                refresh: false
            }
        );
    }

    #[test]
    fn nothing_usable_cached_means_a_fetch_for_whoever_asks() {
        assert_eq!(
            POLICY.plan(None, asked(true), at(0)),
            Plan::Fetch { forced: false }
        );
        let token = held(0, 10);
        // Expired, or less than a second left: fetched, whatever the credential.
        for now in [at(10), at(20), at(9) + Duration::from_millis(500)] {
            assert_eq!(
                POLICY.plan(Some(&token), asked(false), now),
                Plan::Fetch { forced: false }
            );
        }
    }

    #[test]
    fn another_credential_never_gets_the_cached_token() {
        let token = held(0, 7200);
        assert_eq!(POLICY.plan(Some(&token), asked(false), at(10)), Plan::Own);
        let forced = Asked {
            forced: true,
            ..asked(false)
        };
        assert_eq!(POLICY.plan(Some(&token), forced, at(10)), Plan::Own);
    }

    #[test]
    fn force_refresh_goes_upstream_at_most_once_per_30_seconds() {
        let forced = Asked {
            forced: true,
            ..asked(true)
        };
        let mut token = held(0, 7200);
        assert_eq!(
            POLICY.plan(Some(&token), forced, at(10)),
            Plan::Fetch { forced: true }
        );
        token.forced_at = Some(at(10));
        // Within 30 s of the forced fetch: the token it just minted.
        assert_eq!(
            POLICY.plan(Some(&token), forced, at(39)),
            Plan::Serve {
                expires_in: 7161,
                refresh: false
            }
        );
        assert_eq!(
            POLICY.plan(Some(&token), forced, at(40)),
            Plan::Fetch { forced: true }
        );
    }

    #[test]
    fn a_fetch_waiting_for_another_replica_stops_once_that_one_did_the_work() {
        let mut token = held(0, 7200);
        let needed =
            |token: Option<&Held>, same, need, now| POLICY.fetch_needed(token, same, need, now);
        assert!(needed(None, true, Need::Usable, at(10)));
        assert!(!needed(Some(&token), true, Need::Usable, at(10)));
        assert!(
            needed(Some(&token), false, Need::Usable, at(10)),
            "another secret's"
        );
        assert!(
            needed(Some(&token), true, Need::Usable, at(7200)),
            "expired"
        );
        assert!(
            needed(Some(&token), true, Need::Refresh, at(7000)),
            "in its window"
        );
        assert!(!needed(Some(&token), true, Need::Refresh, at(100)));
        assert!(needed(Some(&token), true, Need::Forced, at(100)));
        token.forced_at = Some(at(90));
        assert!(!needed(Some(&token), true, Need::Forced, at(100)));
        assert!(needed(Some(&token), true, Need::Forced, at(120)));
    }

    #[test]
    fn a_replica_takes_newer_tokens_from_redis_and_seeds_its_own_when_newer() {
        use Reconcile::*;
        use RemoteView::*;
        let now = at(100);
        let local = held(50, 7200);
        let cases = [
            (Some(&local), None, Present(at(60)), TakeRemote),
            (None, None, Present(at(60)), TakeRemote),
            (Some(&local), None, Present(at(50)), Keep),
            (Some(&local), None, Present(at(40)), Seed),
            (Some(&local), Some(at(70)), Present(at(60)), Keep),
            (Some(&local), None, Dropped(at(50)), DropLocal),
            (Some(&local), None, Dropped(at(40)), Seed),
            (None, None, Dropped(at(40)), Keep),
            (Some(&local), None, Missing, Seed),
            (None, None, Missing, Keep),
        ];
        for (held, dropped, remote, expected) in cases {
            assert_eq!(
                reconcile(held, dropped, remote, now),
                expected,
                "{remote:?}"
            );
        }
        // An expired token is never put back into Redis.
        let expired = held(0, 10);
        assert_eq!(reconcile(Some(&expired), None, Missing, now), Keep);
        assert_eq!(
            reconcile(
                Some(&expired),
                None,
                Present(at(0) - Duration::from_secs(1)),
                now
            ),
            Keep
        );
    }

    #[test]
    fn only_a_newer_token_replaces_a_cached_one() {
        assert!(supersedes(at(10), None));
        assert!(supersedes(at(10), Some(at(9))));
        assert!(!supersedes(at(10), Some(at(10))));
        assert!(
            !supersedes(at(9), Some(at(10))),
            "an old token arriving late"
        );
    }

    #[test]
    fn stale_token_answers_drop_the_cached_token_once() {
        for errcode in [40001, 40014, 42001] {
            assert!(is_stale_token_errcode(errcode));
        }
        for errcode in [0, -1, 40125, 45009, 40013] {
            assert!(!is_stale_token_errcode(errcode));
        }
        assert!(drops_cached(Some("T1"), "T1"));
        assert!(!drops_cached(Some("T2"), "T1"), "the cache moved on");
        assert!(!drops_cached(None, "T1"), "already dropped: nothing more");
        assert!(!drops_cached(Some("T1x"), "T1"));
    }
}
