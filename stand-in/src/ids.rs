//! Identifiers shaped like WeChat's: fresh session keys, tokens and request ids, and openids
//! and unionids derived from the code (or from the user a code names) so that tests can
//! predict them; and the codes that name their user.

use std::time::{SystemTime, UNIX_EPOCH};

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A fresh `session_key` shaped like WeChat's: 16 random bytes in padded base64 (24 chars).
pub(crate) fn random_session_key() -> String {
    let bytes = fastrand::u128(..).to_le_bytes();
    let mut key = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let sextets = [
            b0 >> 2,
            (b0 & 0x03) << 4 | b1 >> 4,
            (b1 & 0x0f) << 2 | b2 >> 6,
            b2 & 0x3f,
        ];
        // A chunk of n bytes carries n + 1 sextets; the rest is padding.
        for (index, sextet) in sextets.iter().enumerate() {
            if index <= chunk.len() {
                key.push(char::from(BASE64[usize::from(*sextet)]));
            } else {
                key.push('=');
            }
        }
    }
    key
}

/// `len` random characters from the base64url alphabet.
pub(crate) fn random_chars(len: usize) -> String {
    (0..len)
        .map(|_| char::from(BASE64_URL[fastrand::usize(..BASE64_URL.len())]))
        .collect()
}

/// A request id like WeChat's `rid`: different for every answer.
pub(crate) fn request_id() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Truncated on purpose: the first group only has to look like a timestamp.
    format!(
        "{:08x}-{:08x}-{:08x}",
        seconds as u32,
        fastrand::u32(..),
        fastrand::u32(..)
    )
}

/// `o` followed by 26 base64url characters, the same for the same (`scope`, `js_code`) in
/// every run and process, so tests can predict an openid. `salt` keeps openids and unionids of
/// one code apart.
pub(crate) fn derived_id(salt: u8, scope: &str, js_code: &str) -> String {
    // FNV-1a, then SplitMix64 to spread it over 156 bits: both fixed algorithms, unlike
    // std's hasher whose output may change between Rust releases.
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in [salt, 0xff]
        .iter()
        .chain(scope.as_bytes())
        .chain(&[0xff])
        .chain(js_code.as_bytes())
    {
        state ^= u64::from(*byte);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut id = String::with_capacity(27);
    id.push('o');
    let mut bits = 0_u64;
    let mut available = 0;
    for _ in 0..26 {
        if available < 6 {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut mixed = state;
            mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bits = mixed ^ (mixed >> 31);
            available = 64;
        }
        id.push(char::from(BASE64_URL[(bits & 0x3f) as usize]));
        bits >>= 6;
        available -= 6;
    }
    id
}

/// The WeChat user a `js_code` names, for codes shaped `u<user>_<anything>` (`user` not empty,
/// without `_`); `None` for any other code, which is then its own user's only code.
///
/// WeChat knows whose code it is from the code; the stand-in needs codes to say it, so that
/// tests can drive one user's logins apart from another's.
pub(crate) fn code_user(js_code: &str) -> Option<&str> {
    let (user, _) = js_code.strip_prefix('u')?.split_once('_')?;
    (!user.is_empty()).then_some(user)
}

/// A fresh code of `user` (see [`code_user`]).
pub(crate) fn user_code(user: &str) -> String {
    format!("u{user}_{}", random_chars(16))
}

/// The openid of `user` in `appid`: the same for every code of the user.
pub(crate) fn user_openid(appid: &str, user: &str) -> String {
    derived_id(b'O', appid, user)
}

/// The unionid of `user`: the same in every app.
pub(crate) fn user_unionid(user: &str) -> String {
    derived_id(b'U', "", user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_name_their_user_when_shaped_so() {
        assert_eq!(code_user("u42_abc"), Some("42"));
        assert_eq!(code_user("ualice_"), Some("alice"));
        assert_eq!(code_user("ualice_x_y"), Some("alice"));
        for other in ["u_abc", "unique", "code-1", "", "U42_abc"] {
            assert_eq!(code_user(other), None, "{other}");
        }
        let code = user_code("bob");
        assert_eq!(code_user(&code), Some("bob"));
        assert_ne!(user_code("bob"), code);
        assert_ne!(user_openid("wx1", "bob"), user_openid("wx2", "bob"));
        assert_ne!(user_openid("wx1", "bob"), derived_id(b'o', "wx1", "bob"));
    }
}
