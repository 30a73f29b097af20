//! What wxgate knows of WeChat's API, the ground floor every other module stands on: the
//! APIs it recognises by path and whose appid each one's quota is ([`api`]), its errcodes and
//! how an answer's body is read ([`errcode`]), how its query parameters are read ([`query`]),
//! its day ([`day`]), and what its identifiers look like. Nothing here knows wxgate's own modules.
//!
//! WeChat answers errors with HTTP 200 and `{"errcode":N,"errmsg":"…"}`; successes carry no
//! `errcode` (or `0`).

mod api;
mod day;
mod errcode;
mod query;

use bytes::Bytes;

pub use self::api::{Api, PathClass, QuotaAppidError};
pub use self::day::{beijing_time, day_end};
pub use self::errcode::{errcode_labels, Errcode};
pub use self::query::{query_pairs, WechatParams};

/// The Content-Type WeChat uses for JSON, and that wxgate uses for its own answers.
pub const JSON_CONTENT_TYPE: &str = "application/json; encoding=utf-8";

/// `45011`: minute quota reached; the call was not executed.
pub use wxgate_contract::MINUTE_QUOTA;
/// `-1`: system busy; worth another try.
pub use wxgate_contract::SYSTEM_BUSY;

/// `45009`: the day's quota of this API is spent; nothing helps before WeChat's midnight
/// (UTC+8) but `clear_quota`.
pub const DAILY_QUOTA: i64 = 45009;

/// `40097`: invalid arguments; wxgate's answer to a request it cannot read.
pub const INVALID_ARGS: i64 = 40097;
/// `47001`: data format error; wxgate's answer to a body it will not forward.
pub const DATA_FORMAT_ERROR: i64 = 47001;

/// A WeChat-shaped body, `{"errcode":N,"errmsg":"…"}`.
pub fn error_body(errcode: i64, errmsg: &str) -> Bytes {
    let body = serde_json::json!({ "errcode": errcode, "errmsg": errmsg });
    Bytes::from(body.to_string())
}

/// The longest appid wxgate accepts (WeChat's are 18 bytes).
pub const MAX_APPID_LEN: usize = 32;

/// Whether `appid` looks like something WeChat issues: `wx` and 16 hex digits in practice;
/// wxgate accepts up to [`MAX_APPID_LEN`] ASCII letters, digits and `_` so that test and
/// future ids pass, and refuses the rest before it reaches upstream or a quota key.
pub fn is_plausible_appid(appid: impl AsRef<[u8]>) -> bool {
    let appid = appid.as_ref();
    (1..=MAX_APPID_LEN).contains(&appid.len())
        && appid
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

/// Whether `code` looks like a `wx.login()` code: 32 URL-safe characters in practice;
/// wxgate accepts up to 128 of `[A-Za-z0-9_-]`.
pub fn is_plausible_js_code(code: impl AsRef<[u8]>) -> bool {
    let code = code.as_ref();
    (1..=128).contains(&code.len())
        && code
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
}

/// A whole number as WeChat may write it: a JSON number, or a string holding one (some of
/// its documentation shows `errcode` and `expires_in` as strings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum LenientNumber {
    /// `7200`.
    Number(i64),
    /// `"7200"`, blanks around it allowed.
    Text(String),
}

impl LenientNumber {
    /// The number; `None` for a string that does not hold one.
    pub fn value(&self) -> Option<i64> {
        match self {
            LenientNumber::Number(number) => Some(*number),
            LenientNumber::Text(text) => text.trim().parse().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_escapes() {
        let body = error_body(-1, "system error (wxgate: \"quoted\")");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["errcode"], -1);
        assert_eq!(value["errmsg"], "system error (wxgate: \"quoted\")");
    }

    #[test]
    fn plausibility_checks() {
        assert!(is_plausible_appid("wx1234567890abcdef"));
        assert!(!is_plausible_appid(""));
        assert!(!is_plausible_appid("wx 1"));
        assert!(!is_plausible_appid("a".repeat(33)));
        assert!(!is_plausible_appid(b"wx\xff"));
        assert!(is_plausible_js_code("081Xyz0w3GRiTZ2r1I1w3Qw1mA1Xyz0K"));
        assert!(!is_plausible_js_code("a".repeat(129)));
        assert!(!is_plausible_js_code("abc\u{0}def"));
        assert!(!is_plausible_js_code("abc def"));
    }
}
