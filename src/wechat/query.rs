//! Reading WeChat's query parameters.
//!
//! Values are percent-decoded to *bytes* (`+` as a space), never through a lossy UTF-8
//! conversion: `secret=X%ff` and `secret=X%fe` are different secrets, and must never share a
//! code-exchange key. A parameter given more than once, even once empty, is reported, since
//! WeChat and wxgate could read different copies.

use std::borrow::Cow;

use percent_encoding::percent_decode;

/// The parameters WeChat's code-exchange and token endpoints read from a query. An empty
/// value counts as missing, as it does for WeChat. Other parameters are not kept.
#[derive(Debug, Default)]
pub struct WechatParams<'a> {
    /// `appid`.
    pub appid: Option<Cow<'a, [u8]>>,
    /// `secret`.
    pub secret: Option<Cow<'a, [u8]>>,
    /// `js_code`.
    pub js_code: Option<Cow<'a, [u8]>>,
    /// `grant_type`.
    pub grant_type: Option<Cow<'a, [u8]>>,
    /// `component_appid`.
    pub component_appid: Option<Cow<'a, [u8]>>,
    /// `component_access_token`.
    pub component_access_token: Option<Cow<'a, [u8]>>,
    /// The first of these parameters found more than once, if any.
    pub repeated: Option<&'static str>,
}

impl<'a> WechatParams<'a> {
    /// Reads a query string (without the `?`).
    pub fn parse(query: &'a str) -> WechatParams<'a> {
        let mut params = WechatParams::default();
        // Which names were seen, empty or not, by position in the match below.
        let mut seen = 0u8;
        for (name, value) in query_pairs(query) {
            let (bit, name, slot): (u8, &'static str, _) = match &*name {
                b"appid" => (0, "appid", &mut params.appid),
                b"secret" => (1, "secret", &mut params.secret),
                b"js_code" => (2, "js_code", &mut params.js_code),
                b"grant_type" => (3, "grant_type", &mut params.grant_type),
                b"component_appid" => (4, "component_appid", &mut params.component_appid),
                b"component_access_token" => (
                    5,
                    "component_access_token",
                    &mut params.component_access_token,
                ),
                _ => continue,
            };
            if seen & (1 << bit) != 0 {
                params.repeated.get_or_insert(name);
            } else if !value.is_empty() {
                *slot = Some(value);
            }
            seen |= 1 << bit;
        }
        params
    }
}

/// The pairs of a query as `form_urlencoded::parse` splits them, each name and value
/// percent-decoded to bytes. Pairs with nothing to decode are borrowed, not copied.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, [u8]>, Cow<'_, [u8]>)> {
    let bytes = query.as_bytes();
    // Most queries have nothing to decode: one vectorised scan of the whole query says so
    // for every pair, instead of a byte-by-byte look at each name and value.
    let encoded = memchr::memchr2(b'%', b'+', bytes).is_some();
    let decode = move |raw| {
        if encoded {
            decode(raw)
        } else {
            Cow::Borrowed(raw)
        }
    };
    Pairs(Some(bytes))
        .filter(|pair| !pair.is_empty())
        .map(move |pair| match memchr::memchr(b'=', pair) {
            Some(at) => (decode(&pair[..at]), decode(&pair[at + 1..])),
            None => (decode(pair), Cow::Borrowed(&[][..])),
        })
}

/// The `&`-separated pieces of a query, empty ones included (as `split` gives them), found
/// with `memchr`; `None` once the piece after the last `&` was given.
struct Pairs<'a>(Option<&'a [u8]>);

impl<'a> Iterator for Pairs<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.0?;
        match memchr::memchr(b'&', rest) {
            Some(at) => {
                self.0 = Some(&rest[at + 1..]);
                Some(&rest[..at])
            }
            None => {
                self.0 = None;
                Some(rest)
            }
        }
    }
}

/// `+` as a space, then `%XX` escapes; invalid escapes are kept as they are.
fn decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr2(b'%', b'+', raw).is_none() {
        return Cow::Borrowed(raw);
    }
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    Cow::Owned(percent_decode(&spaced).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_read_as_form_urlencoded_does_on_utf8() {
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
            let ours: Vec<(Vec<u8>, Vec<u8>)> = query_pairs(query)
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect();
            let reference: Vec<(Vec<u8>, Vec<u8>)> = form_urlencoded::parse(query.as_bytes())
                .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
                .collect();
            assert_eq!(ours, reference, "{query:?}");
        }
    }

    #[test]
    fn invalid_utf8_stays_distinct() {
        let values: Vec<Vec<u8>> = ["secret=X%ff", "secret=X%fe", "secret=X%EF%BF%BD"]
            .iter()
            .map(|query| WechatParams::parse(query).secret.unwrap().into_owned())
            .collect();
        assert_eq!(values[0], b"X\xff");
        assert_ne!(values[0], values[1]);
        assert_ne!(values[0], values[2]);
        assert_ne!(values[1], values[2]);
    }

    #[test]
    fn params_keep_the_first_value_and_note_repeats_even_empty_ones() {
        let params = WechatParams::parse("appid=a&js_code=&x=1&appid=b&secret=s%20t");
        assert_eq!(params.appid.as_deref(), Some(&b"a"[..]));
        assert_eq!(params.secret.as_deref(), Some(&b"s t"[..]));
        assert!(params.js_code.is_none());
        assert_eq!(params.repeated, Some("appid"));
        assert_eq!(
            WechatParams::parse("appid=a&access_token=x&access_token=y").repeated,
            None
        );
        // An empty first copy is a copy all the same.
        assert_eq!(
            WechatParams::parse("appid=&appid=A").repeated,
            Some("appid")
        );
        let params = WechatParams::parse("js_code=&js_code=C");
        assert_eq!(params.repeated, Some("js_code"));
    }

    proptest::proptest! {
        /// Any query is read without panicking, and reads the same twice; a reader that
        /// agreed with form_urlencoded on every valid UTF-8 pair stays agreeing.
        #[test]
        fn any_query_is_read_and_read_stably(query in "[a-z_=&%+0-9A-F\\x{80}-\\x{10FFFF}]{0,64}") {
            let pairs: Vec<_> = query_pairs(&query).collect();
            let again: Vec<_> = query_pairs(&query).collect();
            proptest::prop_assert_eq!(&pairs, &again);
            let reference: Vec<(Vec<u8>, Vec<u8>)> = form_urlencoded::parse(query.as_bytes())
                .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
                .collect();
            proptest::prop_assert_eq!(pairs.len(), reference.len());
            for ((name, value), (reference_name, reference_value)) in pairs.iter().zip(&reference) {
                if std::str::from_utf8(name).is_ok() {
                    proptest::prop_assert_eq!(&name[..], &reference_name[..]);
                }
                if std::str::from_utf8(value).is_ok() {
                    proptest::prop_assert_eq!(&value[..], &reference_value[..]);
                }
            }
            let _ = WechatParams::parse(&query);
        }
    }
}
