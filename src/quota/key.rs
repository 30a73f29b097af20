//! The key a quota is kept under: one API of one appid.

use std::hash::Hash;

use crate::wechat::Api;
use crate::wechat::{is_plausible_appid, MAX_APPID_LEN};

/// What a quota is kept for: one API of one appid. `Copy`, with the appid inline, so that
/// the limiter's map, which clones its key on every check, never allocates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct QuotaKey {
    api: Api,
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
            len: bytes.len() as u8,
            appid: inline,
        })
    }

    /// The API.
    pub fn api(&self) -> Api {
        self.api
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
        state.write(&self.appid[..usize::from(self.len)]);
    }
}

impl std::fmt::Debug for QuotaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuotaKey({}, {})", self.api.label(), self.appid())
    }
}
