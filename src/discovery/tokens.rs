//! The access tokens whose appid wxgate knows, so that a call carrying `access_token=T` to
//! an API that does not name its appid (`/wxa/…`) gets that appid's quota key, and so that
//! quota/get can be asked with a token of the appid.
//!
//! wxgate learns a token's appid where it sees it: the answer to a token fetch that passed
//! through it (from its token cache or forwarded) names the appid it was fetched for, and
//! the answer of `/cgi-bin/component/api_authorizer_token` the account a platform's token
//! acts for (its calls count against the API's `component_rate_limit`); such a token is
//! known until its `expires_in`. A call that names its appid and carries a token WeChat
//! accepted (wechatpy adds `access_token` to its code exchanges) ties the two for
//! [`PRESENTED_FOR`]. A token WeChat refuses (40001, 40014, 42001) is forgotten.
//!
//! Tokens live in memory only, never in a log, a metric or Redis. Recognising one needs only
//! a keyed hash of it (SipHash-1-3, 128 bits, its key drawn per process); the token itself
//! is kept only as the one to query quota/get with, one per appid. Both maps are bounded.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use siphasher::sip128::{Hasher128, SipHasher13};
use tokio::time::Instant;

use crate::quota::QuotaKey;
use crate::wechat::Api;

/// How long a token a caller presented with its appid is tied to that appid.
pub const PRESENTED_FOR: Duration = Duration::from_secs(300);

/// The longest lifetime believed (WeChat's tokens live at most 7200 s).
const LONGEST_LIFETIME: Duration = Duration::from_secs(7200);

/// At most this many tokens are recognised, and as many appids hold one to query with.
const MAX_TOKENS: usize = 10_000;

/// The longest token read (WeChat asks for 512 characters of storage).
const MAX_TOKEN_LEN: usize = 2048;

/// Whose a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenOwner {
    /// Its appid, as a key of no particular API ([`Api::Other`]).
    appid: QuotaKey,
    /// A platform's `authorizer_access_token`: its calls are made on the account's behalf.
    pub on_behalf: bool,
}

impl TokenOwner {
    /// The appid.
    pub fn appid(&self) -> &str {
        self.appid.appid()
    }
}

/// The tokens known.
pub struct TokenBook {
    salt: (u64, u64),
    owners: DashMap<TokenHash, (TokenOwner, Instant)>,
    /// Per appid, a token to ask quota/get with, and until when it works.
    held: Mutex<HashMap<Box<str>, Held>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TokenHash(u64, u64);

/// A token held for queries.
#[derive(Clone)]
struct Held {
    token: Arc<str>,
    on_behalf: bool,
    until: Instant,
}

impl Default for TokenBook {
    fn default() -> Self {
        TokenBook {
            salt: (
                RandomState::new().hash_one(0x746f_6b65_6e73_u64),
                RandomState::new().hash_one(0x626f_6f6b_u64),
            ),
            owners: DashMap::new(),
            held: Mutex::new(HashMap::new()),
        }
    }
}

impl TokenBook {
    fn hash(&self, token: &[u8]) -> TokenHash {
        let mut hasher = SipHasher13::new_with_keys(self.salt.0, self.salt.1);
        token.hash(&mut hasher);
        let hash = hasher.finish128();
        TokenHash(hash.h1, hash.h2)
    }

    /// A token fetch for `appid` answered `token`, working for `lifetime`.
    pub fn minted(&self, token: &[u8], appid: &str, on_behalf: bool, lifetime: Duration) {
        self.learn(token, appid, on_behalf, lifetime.min(LONGEST_LIFETIME));
    }

    /// A call naming `appid` carried `token`, and WeChat accepted it.
    pub fn presented(&self, token: &[u8], appid: &str) {
        let hash = self.hash(token);
        // A token already known keeps what it is known as (and for how long).
        if !self.owners.contains_key(&hash) {
            self.learn(token, appid, false, PRESENTED_FOR);
        }
    }

    fn learn(&self, token: &[u8], appid: &str, on_behalf: bool, lifetime: Duration) {
        let (Some(key), Ok(text)) = (QuotaKey::new(Api::Other, appid), std::str::from_utf8(token))
        else {
            return;
        };
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return;
        }
        let until = Instant::now() + lifetime;
        let owner = TokenOwner {
            appid: key,
            on_behalf,
        };
        if self.owners.len() >= MAX_TOKENS {
            self.forget_expired();
        }
        if self.owners.len() < MAX_TOKENS {
            self.owners.insert(self.hash(token), (owner, until));
        }
        let mut held = self.held.lock();
        if held.len() >= MAX_TOKENS && !held.contains_key(appid) {
            let now = Instant::now();
            held.retain(|_, held| held.until > now);
            if held.len() >= MAX_TOKENS {
                return;
            }
        }
        // An account's own token is preferred to a platform's for it: quota/get answers both
        // figures to either.
        let replace = held.get(appid).is_none_or(|current| {
            current.on_behalf >= on_behalf || current.until <= Instant::now()
        });
        if replace {
            held.insert(
                appid.into(),
                Held {
                    token: text.into(),
                    on_behalf,
                    until,
                },
            );
        }
    }

    /// Whose `token` is, if known and not expired.
    pub fn owner(&self, token: &[u8]) -> Option<TokenOwner> {
        if self.owners.is_empty() {
            return None;
        }
        let entry = self.owners.get(&self.hash(token))?;
        let (owner, until) = *entry;
        (until > Instant::now()).then_some(owner)
    }

    /// A token of `appid` to ask quota/get with, and whether it is a platform's for it.
    pub fn token_for(&self, appid: &str) -> Option<(Arc<str>, bool)> {
        let held = self.held.lock();
        let held = held.get(appid)?;
        (held.until > Instant::now()).then(|| (held.token.clone(), held.on_behalf))
    }

    /// WeChat refused `token`: it is forgotten.
    pub fn refused(&self, token: &[u8]) {
        if let Some((_, (owner, _))) = self.owners.remove(&self.hash(token)) {
            let mut held = self.held.lock();
            if held
                .get(owner.appid())
                .is_some_and(|held| held.token.as_bytes() == token)
            {
                held.remove(owner.appid());
            }
        }
    }

    /// Forgets the tokens that expired.
    pub fn forget_expired(&self) {
        let now = Instant::now();
        self.owners.retain(|_, (_, until)| *until > now);
        self.held.lock().retain(|_, held| held.until > now);
    }
}

impl std::fmt::Debug for TokenBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens.
        f.debug_struct("TokenBook")
            .field("known", &self.owners.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokens_are_known_until_they_expire_or_are_refused() {
        let book = TokenBook::default();
        assert_eq!(book.owner(b"t1"), None);
        book.minted(b"t1", "wx00000000000000a1", false, Duration::from_secs(10));
        let owner = book.owner(b"t1").unwrap();
        assert_eq!(
            (owner.appid(), owner.on_behalf),
            ("wx00000000000000a1", false)
        );
        assert_eq!(
            book.token_for("wx00000000000000a1")
                .map(|(t, b)| (t.to_string(), b)),
            Some(("t1".into(), false))
        );
        // A platform's token for the account does not replace the account's own.
        book.minted(b"p1", "wx00000000000000a1", true, Duration::from_secs(10));
        assert!(book.owner(b"p1").unwrap().on_behalf);
        assert!(!book.token_for("wx00000000000000a1").unwrap().1);
        // A presented token does not change what a minted one is known as.
        book.presented(b"p1", "wx00000000000000b2");
        assert_eq!(book.owner(b"p1").unwrap().appid(), "wx00000000000000a1");
        book.presented(b"t2", "wx00000000000000b2");
        assert_eq!(book.owner(b"t2").unwrap().appid(), "wx00000000000000b2");
        book.refused(b"t1");
        assert_eq!(book.owner(b"t1"), None);
        assert!(book.token_for("wx00000000000000a1").is_none());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(book.owner(b"p1"), None, "expired");
        assert!(book.owner(b"t2").is_some(), "presented: five minutes");
        book.forget_expired();
        assert_eq!(book.owners.len(), 1);
        book.minted(b"x", "not an appid!", false, Duration::from_secs(10));
        assert_eq!(book.owner(b"x"), None);
    }
}
