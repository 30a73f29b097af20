//! Access tokens as WeChat keeps them, with lifetimes short enough for tests.
//!
//! - `/cgi-bin/token` and `/cgi-bin/component/api_component_token` mint a new token on every
//!   successful fetch, valid for [`StandInConfig::token_lifetime`]; the previous token of the
//!   same (API, appid) stops working [`StandInConfig::token_overlap`] after the new one is
//!   minted (WeChat: five minutes), or at its own expiry if that comes first.
//! - `/cgi-bin/stable_token` is isolated from `/cgi-bin/token` (its own tokens). Without
//!   `force_refresh` it returns the current token while more than the overlap remains, and
//!   mints the next one once less does (both then work until their own expiry), so its
//!   `expires_in` is the time that remains. With `force_refresh: true` it mints a new token and
//!   the previous one stops working at once; a forced call less than 30 s after the previous
//!   forced one returns the current token instead ("否则不会刷新").
//! - `/cgi-bin/component/api_authorizer_token` mints an `authorizer_access_token`: a
//!   platform's token for calling an account's APIs on its behalf, retired like
//!   `/cgi-bin/token`'s. Calls made with it count against the API's `component_rate_limit`.
//! - A token presented to a checked API (see [`crate::CHECKED_API_PATH`] and the component
//!   code exchange) is answered 40001 when unknown or replaced, 42001 when expired.
//!
//! [`StandInConfig::token_lifetime`]: crate::StandInConfig::token_lifetime
//! [`StandInConfig::token_overlap`]: crate::StandInConfig::token_overlap

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::ids::random_chars;
use crate::lock;

/// WeChat ignores a forced stable refresh this soon after the previous one.
const FORCE_SPACING: Duration = Duration::from_secs(30);

/// Every token the stand-in minted, and which is current for each (API, appid).
pub(crate) struct Tokens {
    lifetime: Duration,
    overlap: Duration,
    state: Mutex<State>,
}

/// Which token API minted a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum TokenKind {
    Token,
    Stable,
    Component,
    /// A platform's token for one account (`authorizer_access_token`).
    Authorizer,
}

impl TokenKind {
    /// The tokens an account's API takes as `access_token`.
    pub(crate) const ACCESS: [TokenKind; 3] =
        [TokenKind::Token, TokenKind::Stable, TokenKind::Authorizer];
}

/// A token handed out: `(token, expires_in)`.
pub(crate) type Issued = (String, u64);

/// Long-dead tokens are forgotten once `minted` has grown to twice what the last sweep
/// left, and at least this many.
const SWEEP_AT_LEAST: usize = 1024;

#[derive(Default)]
struct State {
    minted: HashMap<String, Minted>,
    current: HashMap<(TokenKind, String), String>,
    forced_at: HashMap<String, SystemTime>,
    /// The size of `minted` at which long-dead tokens are next forgotten.
    sweep_at: usize,
}

struct Minted {
    kind: TokenKind,
    appid: String,
    expires_at: SystemTime,
    /// Set when a newer token of the same (API, appid) replaced it.
    invalid_from: Option<SystemTime>,
}

impl Minted {
    fn valid_until(&self) -> SystemTime {
        self.invalid_from
            .map_or(self.expires_at, |from| from.min(self.expires_at))
    }
}

impl Tokens {
    pub(crate) fn new(lifetime: Duration, overlap: Duration) -> Tokens {
        Tokens {
            lifetime: lifetime.max(Duration::from_secs(1)),
            overlap,
            state: Mutex::new(State::default()),
        }
    }

    /// `/cgi-bin/token` and the component token: a new token; the previous one works for the
    /// overlap.
    pub(crate) fn mint(&self, kind: TokenKind, appid: &str, now: SystemTime) -> Issued {
        let mut state = lock(&self.state);
        self.mint_locked(&mut state, kind, appid, now, now + self.overlap)
    }

    /// `/cgi-bin/stable_token`.
    pub(crate) fn stable(&self, appid: &str, forced: bool, now: SystemTime) -> Issued {
        let mut state = lock(&self.state);
        let current = state
            .current
            .get(&(TokenKind::Stable, appid.to_owned()))
            .and_then(|token| Some((token.clone(), state.minted.get(token)?.valid_until())));
        let left = current
            .as_ref()
            .map(|(_, until)| until.duration_since(now).unwrap_or_default());
        if forced {
            let spaced = state
                .forced_at
                .get(appid)
                .is_none_or(|at| now.duration_since(*at).unwrap_or_default() >= FORCE_SPACING);
            if let (false, Some((token, _)), Some(left)) = (spaced, &current, left) {
                if !left.is_zero() {
                    return (token.clone(), left.as_secs());
                }
            }
            state.forced_at.insert(appid.to_owned(), now);
            // Forced: the previous token stops working at once.
            return self.mint_locked(&mut state, TokenKind::Stable, appid, now, now);
        }
        match (current, left) {
            (Some((token, _)), Some(left)) if left > self.overlap => (token, left.as_secs()),
            // Renewed early: the previous one still works until its own expiry.
            _ => {
                let never = now + self.lifetime + self.overlap;
                self.mint_locked(&mut state, TokenKind::Stable, appid, now, never)
            }
        }
    }

    fn mint_locked(
        &self,
        state: &mut State,
        kind: TokenKind,
        appid: &str,
        now: SystemTime,
        previous_until: SystemTime,
    ) -> Issued {
        // Forget tokens long dead, so a long run does not grow without bound; only once the
        // map has doubled since the last time, so that a mint costs the same with two
        // hundred thousand appids as with one (a sweep looks at every token).
        if state.minted.len() >= state.sweep_at {
            state
                .minted
                .retain(|_, minted| minted.valid_until() + self.overlap > now);
            state.sweep_at = (2 * state.minted.len()).max(SWEEP_AT_LEAST);
        }
        let token = random_chars(128);
        state.minted.insert(
            token.clone(),
            Minted {
                kind,
                appid: appid.to_owned(),
                expires_at: now + self.lifetime,
                invalid_from: None,
            },
        );
        let previous = state
            .current
            .insert((kind, appid.to_owned()), token.clone());
        if let Some(minted) = previous.and_then(|previous| state.minted.get_mut(&previous)) {
            minted.invalid_from = Some(previous_until);
        }
        (token, self.lifetime.as_secs())
    }

    /// Whether `token`, minted by one of `kinds` (for `appid`, when given), works at `now`:
    /// `Err(40001)` when unknown or replaced, `Err(42001)` when expired.
    pub(crate) fn check(
        &self,
        token: &str,
        kinds: &[TokenKind],
        appid: Option<&str>,
        now: SystemTime,
    ) -> Result<(), i64> {
        let state = lock(&self.state);
        let minted = state
            .minted
            .get(token)
            .filter(|minted| appid.is_none_or(|appid| minted.appid == appid));
        works(minted, kinds, now).map(|_| ())
    }

    /// Whose `token` is, if it was minted by one of `kinds` and works at `now`: its kind and
    /// appid (`component_appid` for a platform's own token); errors as [`Tokens::check`].
    pub(crate) fn owner(
        &self,
        token: &str,
        kinds: &[TokenKind],
        now: SystemTime,
    ) -> Result<(TokenKind, String), i64> {
        let state = lock(&self.state);
        works(state.minted.get(token), kinds, now).map(|minted| (minted.kind, minted.appid.clone()))
    }

    /// The appid `token` was minted for, whether or not it still works: what the call log
    /// names for a call that presented it.
    pub(crate) fn minted_for(&self, token: &str) -> Option<String> {
        let state = lock(&self.state);
        state.minted.get(token).map(|minted| minted.appid.clone())
    }
}

/// `minted` if it is one of `kinds` and works at `now`.
fn works<'m>(
    minted: Option<&'m Minted>,
    kinds: &[TokenKind],
    now: SystemTime,
) -> Result<&'m Minted, i64> {
    let Some(minted) = minted.filter(|minted| kinds.contains(&minted.kind)) else {
        return Err(40001);
    };
    if minted
        .invalid_from
        .is_some_and(|from| now >= from && from < minted.expires_at)
    {
        return Err(40001);
    }
    if now >= minted.expires_at {
        return Err(42001);
    }
    Ok(minted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    const BOTH: [TokenKind; 2] = [TokenKind::Token, TokenKind::Stable];

    #[test]
    fn a_new_token_retires_the_previous_one_after_the_overlap() {
        let tokens = Tokens::new(Duration::from_secs(100), Duration::from_secs(10));
        let (first, expires_in) = tokens.mint(TokenKind::Token, "wxa", at(0));
        assert_eq!(expires_in, 100);
        assert_eq!(tokens.check(&first, &BOTH, None, at(50)), Ok(()));
        let (second, _) = tokens.mint(TokenKind::Token, "wxa", at(50));
        assert_eq!(tokens.check(&first, &BOTH, None, at(59)), Ok(()), "overlap");
        assert_eq!(tokens.check(&first, &BOTH, None, at(60)), Err(40001));
        assert_eq!(tokens.check(&second, &BOTH, None, at(149)), Ok(()));
        assert_eq!(tokens.check(&second, &BOTH, None, at(150)), Err(42001));
        assert_eq!(tokens.check("made-up", &BOTH, None, at(1)), Err(40001));
        // Another appid's fetch retires nothing of this one's.
        tokens.mint(TokenKind::Token, "wxb", at(60));
        assert_eq!(tokens.check(&second, &BOTH, None, at(100)), Ok(()));
        // A component token is no access token.
        let (component, _) = tokens.mint(TokenKind::Component, "wxc", at(0));
        assert_eq!(tokens.check(&component, &BOTH, None, at(1)), Err(40001));
        let own = [TokenKind::Component];
        assert_eq!(tokens.check(&component, &own, Some("wxc"), at(1)), Ok(()));
        assert_eq!(
            tokens.check(&component, &own, Some("wxd"), at(1)),
            Err(40001)
        );
    }

    #[test]
    fn stable_tokens_are_shared_renewed_early_and_forced_at_most_every_30_seconds() {
        let tokens = Tokens::new(Duration::from_secs(100), Duration::from_secs(10));
        let (first, _) = tokens.stable("wxa", false, at(0));
        assert_eq!(tokens.stable("wxa", false, at(40)), (first.clone(), 60));
        // Isolated from /cgi-bin/token.
        tokens.mint(TokenKind::Token, "wxa", at(41));
        assert_eq!(tokens.check(&first, &BOTH, None, at(60)), Ok(()));
        // Less than the overlap left: the next one, and the first still works.
        let (renewed, expires_in) = tokens.stable("wxa", false, at(95));
        assert_ne!(renewed, first);
        assert_eq!(expires_in, 100);
        assert_eq!(tokens.check(&first, &BOTH, None, at(99)), Ok(()));
        // Forced: a new token, the previous one dead at once; forced again within 30 s: the
        // same.
        let (forced, _) = tokens.stable("wxa", true, at(96));
        assert_eq!(tokens.check(&renewed, &BOTH, None, at(96)), Err(40001));
        assert_eq!(tokens.stable("wxa", true, at(125)).0, forced);
        assert_ne!(tokens.stable("wxa", true, at(126)).0, forced);
    }
}
