//! WeChat's answer format: reading the `errcode` of an upstream body and writing wxgate's own
//! answers in the shape WeChat clients parse.
//!
//! WeChat answers errors with HTTP 200 and `{"errcode":N,"errmsg":"…"}`; successes carry no
//! `errcode` (or `0`). Some documentation shows `errcode` as a string, so it is read leniently.

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;

/// The Content-Type WeChat uses for JSON, and that wxgate uses for its own answers.
pub const JSON_CONTENT_TYPE: &str = "application/json; encoding=utf-8";

/// `-1`: system busy; worth another try.
pub const SYSTEM_BUSY: i64 = -1;
/// `45011`: minute quota reached; the call was not executed.
pub const MINUTE_QUOTA: i64 = 45011;

/// `40097`: invalid arguments; wxgate's answer to a request it cannot read.
pub const INVALID_ARGS: i64 = 40097;
/// `47001`: data format error; wxgate's answer to a body it will not forward.
pub const DATA_FORMAT_ERROR: i64 = 47001;

/// The errmsg of wxgate's own 45011, worded like WeChat's so SDKs that match it still do.
pub const LOCAL_QUOTA_ERRMSG: &str =
    "api minute-quota reach limit, must slower, retry next minute (wxgate: local quota)";

/// What an upstream body says about the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errcode {
    /// A JSON object without `errcode`, or with `errcode` 0.
    Success,
    /// A JSON object with a non-zero `errcode`.
    Code(i64),
    /// Not a JSON object (or an `errcode` that is not a number).
    NotJson,
}

impl Errcode {
    /// Reads the `errcode` of a body; a success body has none.
    pub fn of(body: &[u8]) -> Errcode {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            errcode: Option<Lenient>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Lenient {
            Number(i64),
            Text(String),
        }
        // A success body is `{"session_key":…}` and most error bodies begin with `{"errcode"`,
        // so anything that does not start like an object is not parsed at all.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Errcode::NotJson;
        }
        match serde_json::from_slice::<Probe>(body) {
            Ok(Probe { errcode: None }) => Errcode::Success,
            Ok(Probe {
                errcode: Some(Lenient::Number(0)),
            }) => Errcode::Success,
            Ok(Probe {
                errcode: Some(Lenient::Number(code)),
            }) => Errcode::Code(code),
            Ok(Probe {
                errcode: Some(Lenient::Text(text)),
            }) => match text.trim().parse::<i64>() {
                Ok(0) => Errcode::Success,
                Ok(code) => Errcode::Code(code),
                Err(_) => Errcode::NotJson,
            },
            Err(_) => Errcode::NotJson,
        }
    }

    /// The numeric code, 0 for success, `None` for a body that is not JSON.
    pub fn code(self) -> Option<i64> {
        match self {
            Errcode::Success => Some(0),
            Errcode::Code(code) => Some(code),
            Errcode::NotJson => None,
        }
    }

    /// The bounded metric label: `0`, `none`, a code from [`KNOWN_ERRCODES`], or `other`.
    pub fn label(self) -> &'static str {
        match self.label_index() {
            0 => "0",
            1 => "none",
            2 => "other",
            known => KNOWN_ERRCODES[known - 3].1,
        }
    }

    /// Position of [`Errcode::label`] in [`errcode_labels`], for per-label tables.
    pub fn label_index(self) -> usize {
        match self {
            Errcode::Success => 0,
            Errcode::NotJson => 1,
            Errcode::Code(code) => KNOWN_ERRCODES
                .binary_search_by_key(&code, |(known, _)| *known)
                .map_or(2, |position| position + 3),
        }
    }
}

/// The errcodes that get a label of their own, sorted; any other folds into `other`.
pub const KNOWN_ERRCODES: [(i64, &str); 20] = [
    (-1, "-1"),
    (40001, "40001"),
    (40002, "40002"),
    (40013, "40013"),
    (40029, "40029"),
    (40097, "40097"),
    (40125, "40125"),
    (40163, "40163"),
    (40226, "40226"),
    (41002, "41002"),
    (41004, "41004"),
    (41008, "41008"),
    (41021, "41021"),
    (42001, "42001"),
    (45009, "45009"),
    (45011, "45011"),
    (47001, "47001"),
    (48001, "48001"),
    (61003, "61003"),
    (76022, "76022"),
];

/// Every value [`Errcode::label`] can return, for pre-registering metric series.
pub fn errcode_labels() -> impl Iterator<Item = &'static str> {
    ["0", "none", "other"]
        .into_iter()
        .chain(KNOWN_ERRCODES.iter().map(|(_, label)| *label))
}

/// A WeChat-shaped body, `{"errcode":N,"errmsg":"…"}`.
pub fn error_body(errcode: i64, errmsg: &str) -> Bytes {
    let body = serde_json::json!({ "errcode": errcode, "errmsg": errmsg });
    Bytes::from(body.to_string())
}

/// wxgate's own answer: a WeChat-shaped body with WeChat's JSON Content-Type.
pub fn error_response(status: StatusCode, errcode: i64, errmsg: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(error_body(errcode, errmsg)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    response
}

/// The longest appid wxgate accepts (WeChat's are 18 bytes).
pub const MAX_APPID_LEN: usize = 32;

/// Whether `appid` looks like something WeChat issues: `wx` and 16 hex digits in practice;
/// wxgate accepts up to [`MAX_APPID_LEN`] ASCII letters, digits and `_` so that test and
/// future ids pass, and refuses the rest before it reaches upstream or a quota key.
pub fn is_plausible_appid(appid: &str) -> bool {
    (1..=MAX_APPID_LEN).contains(&appid.len())
        && appid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `js_code` looks like a `wx.login()` code: 32 URL-safe characters in practice;
/// wxgate accepts up to 128 of `[A-Za-z0-9_-]`.
pub fn is_plausible_js_code(code: &str) -> bool {
    (1..=128).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The parameters WeChat's code-exchange and token endpoints read from a query. An empty
/// value counts as missing, as it does for WeChat; of a repeated parameter the first value is
/// kept and the name noted in `repeated`. Other parameters are not kept.
#[derive(Debug, Default)]
pub struct WechatParams<'a> {
    /// `appid`.
    pub appid: Option<Cow<'a, str>>,
    /// `secret`.
    pub secret: Option<Cow<'a, str>>,
    /// `js_code`.
    pub js_code: Option<Cow<'a, str>>,
    /// `grant_type`.
    pub grant_type: Option<Cow<'a, str>>,
    /// `component_appid`.
    pub component_appid: Option<Cow<'a, str>>,
    /// `component_access_token`.
    pub component_access_token: Option<Cow<'a, str>>,
    /// The first parameter found more than once, if any.
    pub repeated: Option<&'static str>,
}

impl<'a> WechatParams<'a> {
    /// Reads a query string (without the `?`).
    pub fn parse(query: &'a str) -> WechatParams<'a> {
        let mut params = WechatParams::default();
        for (name, value) in query_pairs(query) {
            let (name, slot): (&'static str, _) = match name.as_ref() {
                "appid" => ("appid", &mut params.appid),
                "secret" => ("secret", &mut params.secret),
                "js_code" => ("js_code", &mut params.js_code),
                "grant_type" => ("grant_type", &mut params.grant_type),
                "component_appid" => ("component_appid", &mut params.component_appid),
                "component_access_token" => {
                    ("component_access_token", &mut params.component_access_token)
                }
                _ => continue,
            };
            if slot.is_some() {
                params.repeated.get_or_insert(name);
            } else if !value.is_empty() {
                *slot = Some(value);
            }
        }
        params
    }
}

/// The first value of `name` in a query, decoded.
pub fn first_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query_pairs(query)
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// The pairs of a query as `form_urlencoded::parse` reads them, without decoding (or
/// allocating) the pairs that have nothing to decode: one pass over the bytes finds each
/// pair's end, its `=` and whether it has anything to decode.
fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let bytes = query.as_bytes();
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < bytes.len() {
            let (mut end, mut equals, mut encoded) = (start, None, false);
            while let Some(&byte) = bytes.get(end) {
                match byte {
                    b'&' => break,
                    b'=' if equals.is_none() => equals = Some(end),
                    b'%' | b'+' => encoded = true,
                    _ => {}
                }
                end += 1;
            }
            // Every split is at an ASCII byte, so on a character boundary.
            let pair = &query[start..end];
            let equals = equals.map(|at| at - start);
            start = end + 1;
            if pair.is_empty() {
                continue;
            }
            if encoded {
                let (name, value) = form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .unwrap_or_default();
                return Some((
                    Cow::Owned(name.into_owned()),
                    Cow::Owned(value.into_owned()),
                ));
            }
            return Some(match equals {
                Some(at) => (Cow::Borrowed(&pair[..at]), Cow::Borrowed(&pair[at + 1..])),
                None => (Cow::Borrowed(pair), Cow::Borrowed("")),
            });
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_read_as_form_urlencoded_does() {
        for query in [
            "",
            "&",
            "a",
            "a=",
            "=b",
            "a=b&c=d",
            "a=b=c",
            "&&a=1&&b=2&",
            "js_code=0a1%2B2&secret=x+y",
            "appid=wx%31&appid=wx1",
            "a%3Db=c&d",
            "caf\u{e9}=th\u{e9}&x=%E4%BD%A0",
            "%zz=%4&k=%",
        ] {
            let ours: Vec<(String, String)> = query_pairs(query)
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect();
            let reference: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect();
            assert_eq!(ours, reference, "{query:?}");
        }
    }

    #[test]
    fn errcode_is_read_leniently() {
        assert_eq!(
            Errcode::of(br#"{"session_key":"k","openid":"o"}"#),
            Errcode::Success
        );
        assert_eq!(
            Errcode::of(br#"{"errcode":0,"errmsg":"ok"}"#),
            Errcode::Success
        );
        assert_eq!(
            Errcode::of(br#"{"errcode":45011,"errmsg":"x rid: 1"}"#),
            Errcode::Code(45011)
        );
        assert_eq!(
            Errcode::of(br#" {"errcode":"40029","errmsg":"invalid code"}"#),
            Errcode::Code(40029)
        );
        assert_eq!(Errcode::of(br#"{"errcode":-1}"#), Errcode::Code(-1));
        assert_eq!(Errcode::of(b"<html>502</html>"), Errcode::NotJson);
        assert_eq!(Errcode::of(b"{not json"), Errcode::NotJson);
        assert_eq!(Errcode::of(b""), Errcode::NotJson);
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(Errcode::Code(45011).label(), "45011");
        assert_eq!(Errcode::Code(12345678).label(), "other");
        assert_eq!(Errcode::Success.label(), "0");
        assert_eq!(Errcode::NotJson.label(), "none");
        assert_eq!(errcode_labels().count(), KNOWN_ERRCODES.len() + 3);
        assert!(KNOWN_ERRCODES.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        for (index, label) in errcode_labels().enumerate() {
            let errcode = match label {
                "0" => Errcode::Success,
                "none" => Errcode::NotJson,
                "other" => Errcode::Code(99_999_999),
                code => Errcode::Code(code.parse().unwrap()),
            };
            assert_eq!(errcode.label_index(), index);
            assert_eq!(errcode.label(), label);
        }
    }

    #[test]
    fn error_body_escapes() {
        let body = error_body(-1, "system error (wxgate: \"quoted\")");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["errcode"], -1);
        assert_eq!(value["errmsg"], "system error (wxgate: \"quoted\")");
    }

    #[test]
    fn params_keep_the_first_value_and_note_repeats() {
        let params = WechatParams::parse("appid=a&js_code=&x=1&appid=b&secret=s%20t");
        assert_eq!(params.appid.as_deref(), Some("a"));
        assert_eq!(params.secret.as_deref(), Some("s t"));
        assert!(params.js_code.is_none());
        assert_eq!(params.repeated, Some("appid"));
        assert_eq!(
            WechatParams::parse("appid=a&access_token=x&access_token=y").repeated,
            None
        );
    }

    #[test]
    fn plausibility_checks() {
        assert!(is_plausible_appid("wx1234567890abcdef"));
        assert!(!is_plausible_appid(""));
        assert!(!is_plausible_appid("wx 1"));
        assert!(!is_plausible_appid(&"a".repeat(33)));
        assert!(is_plausible_js_code("081Xyz0w3GRiTZ2r1I1w3Qw1mA1Xyz0K"));
        assert!(!is_plausible_js_code(&"a".repeat(129)));
        assert!(!is_plausible_js_code("abc\u{0}def"));
        assert!(!is_plausible_js_code("abc def"));
    }
}
