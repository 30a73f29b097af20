//! The demo's backends that call WeChat's APIs with access tokens: each fetches its token
//! through wxgate, keeps it for its `expires_in`, calls an API with it every few hundred
//! milliseconds, and fetches again when it expires or when WeChat refuses it (40001, 40014,
//! 42001), as wechatpy does. Without wxgate, every one of those fetches would mint a new
//! token and retire the others' five minutes later; behind it, they share one, and the table
//! says how many fetches reached WeChat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wxgate_stand_in::{CHECKED_API_PATH, DEFAULT_APPID, DEFAULT_APP_SECRET, TOKEN_PATH};

use crate::client::Seen;
use crate::load::Load;

/// Backends fetching tokens, each with its own cache (as separate servers would have).
pub(crate) const TOKEN_BACKENDS: usize = 3;

/// What the token backends counted.
#[derive(Default)]
pub(crate) struct TokenTally {
    /// Token fetches sent to wxgate.
    fetches: AtomicU64,
    /// API calls made with a fetched token.
    calls: AtomicU64,
    /// API calls WeChat refused as made with a stale token.
    refused: AtomicU64,
}

/// The token backends' counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Token fetches the backends sent to wxgate.
    pub fetches: u64,
    /// API calls made with the tokens.
    pub calls: u64,
    /// Of those, refused by WeChat as stale (40001, 40014, 42001): 0 behind wxgate.
    pub refused: u64,
}

impl TokenTally {
    pub(crate) fn counts(&self) -> TokenCounts {
        TokenCounts {
            fetches: self.fetches.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// One backend: fetch a token when it has none, call an API with it, now and then.
pub(crate) async fn token_backend(load: Arc<Load>, backend: usize) {
    // The backends do not start in the same millisecond (they still share one fetch).
    tokio::time::sleep(Duration::from_millis(20 * backend as u64)).await;
    let mut token: Option<(String, Instant)> = None;
    while load.running() {
        // Kept until a second before its expiry, as SDKs keep theirs a little short.
        let usable = token
            .as_ref()
            .filter(|(_, expires)| Instant::now() + Duration::from_secs(1) < *expires);
        let current = match usable {
            Some((current, _)) => current.clone(),
            None => match fetch(&load).await {
                Some(fetched) => {
                    token = Some(fetched.clone());
                    fetched.0
                }
                None => {
                    let retry = Instant::now() + Duration::from_millis(500);
                    if !load.sleep_until(retry).await {
                        return;
                    }
                    continue;
                }
            },
        };
        load.tokens.calls.fetch_add(1, Ordering::Relaxed);
        let path = format!("{CHECKED_API_PATH}?access_token={current}");
        if let (
            Seen::Answer {
                errcode: Some(code),
                ..
            },
            _,
        ) = load.get_json(&path).await
        {
            if matches!(code, 40001 | 40014 | 42001) {
                load.tokens.refused.fetch_add(1, Ordering::Relaxed);
                token = None;
            }
        }
        let next = Instant::now() + Duration::from_millis(fastrand::u64(150..400));
        if !load.sleep_until(next).await {
            return;
        }
    }
}

/// A token fetch through wxgate: the token and when it expires.
async fn fetch(load: &Load) -> Option<(String, Instant)> {
    load.tokens.fetches.fetch_add(1, Ordering::Relaxed);
    let path = format!(
        "{TOKEN_PATH}?grant_type=client_credential&appid={DEFAULT_APPID}&secret={DEFAULT_APP_SECRET}"
    );
    let (_, body) = load.get_json(&path).await;
    let body = body?;
    let token = body.get("access_token")?.as_str()?.to_owned();
    let expires_in = body.get("expires_in")?.as_u64()?;
    Some((token, Instant::now() + Duration::from_secs(expires_in)))
}
