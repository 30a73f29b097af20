//! The key a quota is kept under: one API of one appid, and whether the account calls it
//! itself or a third-party platform calls it on the account's behalf (WeChat counts the two
//! apart).

use std::hash::Hash;

use crate::wechat::Api;
use crate::wechat::{is_plausible_appid, MAX_APPID_LEN};

/// What a quota is kept for: one API of one appid. `Copy`, with the appid inline, so that
/// the limiter's map, which clones its key on every check, never allocates.
///
/// An API outside [`Api`] (a `/wxa/…` call whose appid wxgate knows from its access token)
/// is named by a number its [`QuotaGate`](super::QuotaGate)'s table of paths gives it
/// ([`ApiPaths`](super::ApiPaths)); the known APIs have none.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct QuotaKey {
    api: Api,
    /// For [`Api::Other`]: the path's number in the gate's table (0 for the known APIs).
    path: u16,
    /// Calls a platform makes with an `authorizer_access_token`: WeChat counts them against
    /// the API's `component_rate_limit`, apart from the account's own calls.
    on_behalf: bool,
    len: u8,
    appid: [u8; MAX_APPID_LEN],
}

impl QuotaKey {
    /// A key for `appid` calling `api`; `None` for an appid WeChat never issues (see
    /// `wechat::is_plausible_appid`), so that every key names a real-looking appid in at
    /// most `MAX_APPID_LEN` bytes.
    pub fn new(api: Api, appid: impl AsRef<[u8]>) -> Option<QuotaKey> {
        let bytes = appid.as_ref();
        if !is_plausible_appid(bytes) {
            return None;
        }
        let mut inline = [0; MAX_APPID_LEN];
        inline.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(QuotaKey {
            api,
            path: 0,
            on_behalf: false,
            len: bytes.len() as u8,
            appid: inline,
        })
    }

    /// The key of a path outside [`Api`], by its number in the gate's table of paths.
    pub(super) fn with_path(self, path: u16) -> QuotaKey {
        QuotaKey { path, ..self }
    }

    /// The same API of the same appid, called by a platform on the account's behalf.
    pub fn on_behalf(self) -> QuotaKey {
        QuotaKey {
            on_behalf: true,
            ..self
        }
    }

    /// The account's own calls of the same API (this key without `on_behalf`).
    pub fn own(self) -> QuotaKey {
        QuotaKey {
            on_behalf: false,
            ..self
        }
    }

    /// The API.
    pub fn api(&self) -> Api {
        self.api
    }

    /// The path's number in the gate's table (0 for the known APIs).
    pub(super) fn path(&self) -> u16 {
        self.path
    }

    /// Whether a platform makes these calls on the account's behalf.
    pub fn is_on_behalf(&self) -> bool {
        self.on_behalf
    }

    /// The appid.
    pub fn appid(&self) -> &str {
        std::str::from_utf8(&self.appid[..usize::from(self.len)]).unwrap_or("")
    }
}

impl Hash for QuotaKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The appid's own bytes, not the whole inline array: the limiter's map hashes the key
        // with SipHash on every check, and the bytes past `len` are always zero (so keys
        // equal as a whole still hash alike).
        self.api.hash(state);
        state.write_u16(self.path);
        state.write_u8(u8::from(self.on_behalf));
        state.write(&self.appid[..usize::from(self.len)]);
    }
}

impl std::fmt::Debug for QuotaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuotaKey({}", self.api.label())?;
        if self.path != 0 {
            write!(f, "#{}", self.path)?;
        }
        if self.on_behalf {
            f.write_str(" on behalf")?;
        }
        write!(f, ", {})", self.appid())
    }
}
