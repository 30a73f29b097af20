//! The WeChat APIs wxgate knows by path, how a request path is classified as one of them,
//! and where each API names the appid whose quota it spends.
//!
//! The `api` label of every metric comes from [`Api::label`], so its values are this bounded
//! set and never a path a client made up.
//!
//! # Paths that are not written as WeChat documents them
//! WeChat's front end, like nginx's defaults (`merge_slashes on`, URIs decoded before they
//! are matched), reads `//sns/jscode2session`, `/sns/jscode2session/` and
//! `/sns/jscode2sessio%6E` as `/sns/jscode2session`. Were wxgate to forward such a path as
//! "some other API", it would skip that API's quota and code memory while WeChat served the
//! call all the same: an SDK whose base URL ends in `/` would silently lose wxgate's
//! protection. So a path that *normalises* to a known API (percent-decoded, repeated and
//! trailing slashes merged) is that API, and is forwarded under its documented path. A
//! path that matches a known API only up to letter case or `;` parameters is refused: no
//! client sends one by mistake, and what WeChat makes of it is not known.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use super::WechatParams;

/// A WeChat API that wxgate recognises; everything else is [`Api::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    /// `GET /sns/jscode2session`: a mini program's server exchanges a login code.
    JsCode2Session,
    /// `GET /sns/component/jscode2session`: a third-party platform exchanges a code.
    ComponentJsCode2Session,
    /// `GET /cgi-bin/token`: an access token (invalidates the previous one).
    Token,
    /// `POST /cgi-bin/stable_token`: an access token that does not invalidate others.
    StableToken,
    /// `POST /cgi-bin/component/api_component_token`: a third-party platform's token.
    ComponentToken,
    /// `POST /cgi-bin/openapi/quota/get`: how much of an API's daily quota is left.
    QuotaGet,
    /// `POST /cgi-bin/clear_quota`: reset an account's quotas (10 times a month).
    ClearQuota,
    /// Any other path: forwarded as it is, counted under `other`.
    Other,
}

/// Why the appid whose quota a call spends could not be read: the request is refused (as
/// `LocalAnswer::RepeatedParameter` or `LocalAnswer::BodyNotJson`), since WeChat could read
/// another appid than the one counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaAppidError {
    /// The query or the JSON body names this parameter twice.
    RepeatedParameter(&'static str),
    /// The API takes a JSON object naming its appid, and the body is not one.
    BodyNotJson,
}

/// How a request path reads to wxgate (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathClass {
    /// A known API, written as WeChat documents it (or any other path, as [`Api::Other`]):
    /// forwarded as it is.
    Exact(Api),
    /// A known API written another way that WeChat reads as the same: forwarded under its
    /// documented path.
    Variant(Api),
    /// A known API up to letter case or `;` parameters: refused.
    Ambiguous,
}

impl Api {
    /// Every value, in label order.
    pub const ALL: [Api; 8] = [
        Api::JsCode2Session,
        Api::ComponentJsCode2Session,
        Api::Token,
        Api::StableToken,
        Api::ComponentToken,
        Api::QuotaGet,
        Api::ClearQuota,
        Api::Other,
    ];

    /// How many values there are (the size of per-API tables).
    pub const COUNT: usize = Self::ALL.len();

    /// Recognises a path written exactly as WeChat documents it.
    pub fn from_path(path: &str) -> Api {
        match path {
            "/sns/jscode2session" => Api::JsCode2Session,
            "/sns/component/jscode2session" => Api::ComponentJsCode2Session,
            "/cgi-bin/token" => Api::Token,
            "/cgi-bin/stable_token" => Api::StableToken,
            "/cgi-bin/component/api_component_token" => Api::ComponentToken,
            "/cgi-bin/openapi/quota/get" => Api::QuotaGet,
            "/cgi-bin/clear_quota" => Api::ClearQuota,
            _ => Api::Other,
        }
    }

    /// Classifies a request path (see the module documentation).
    pub fn classify(path: &str) -> PathClass {
        let exact = Api::from_path(path);
        // Nearly every request: a documented path, or one with nothing to normalise.
        if exact != Api::Other
            || !path
                .bytes()
                .any(|b| matches!(b, b'%' | b';') || b.is_ascii_uppercase())
                && !path.contains("//")
                && !path.ends_with('/')
        {
            return PathClass::Exact(exact);
        }
        let normal = normalise(path);
        match Api::from_path(&normal) {
            Api::Other => {
                let stripped = strip_parameters(&normal).to_ascii_lowercase();
                if Api::from_path(&stripped) != Api::Other {
                    PathClass::Ambiguous
                } else {
                    PathClass::Exact(Api::Other)
                }
            }
            api => PathClass::Variant(api),
        }
    }

    /// The metric label: the API's path, or `other`.
    pub fn label(self) -> &'static str {
        match self {
            Api::JsCode2Session => "/sns/jscode2session",
            Api::ComponentJsCode2Session => "/sns/component/jscode2session",
            Api::Token => "/cgi-bin/token",
            Api::StableToken => "/cgi-bin/stable_token",
            Api::ComponentToken => "/cgi-bin/component/api_component_token",
            Api::QuotaGet => "/cgi-bin/openapi/quota/get",
            Api::ClearQuota => "/cgi-bin/clear_quota",
            Api::Other => "other",
        }
    }

    /// Position in [`Api::ALL`], for per-API tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether this API exchanges a single-use `js_code`.
    pub fn is_code_exchange(self) -> bool {
        matches!(self, Api::JsCode2Session | Api::ComponentJsCode2Session)
    }

    /// The appid whose quota a call of this API spends: from the query's `appid`, or, for
    /// the APIs that take a JSON body, from its `appid` (`component_appid` for a platform's
    /// token). `None` when the API names none (then the call is not limited; WeChat refuses a
    /// call without its appid anyway). A query naming `appid` twice, or a body that is not a
    /// JSON object or names its appid twice, is refused: WeChat could read another appid than
    /// the one whose quota is counted.
    pub fn quota_appid<'a>(
        self,
        query: &'a str,
        body: &'a [u8],
    ) -> Result<Option<Cow<'a, [u8]>>, QuotaAppidError> {
        let body_field = match self {
            Api::Other => return Ok(None),
            Api::StableToken | Api::ClearQuota => Some("appid"),
            Api::ComponentToken => Some("component_appid"),
            _ => None,
        };
        let params = WechatParams::parse(query);
        if params.repeated == Some("appid") {
            return Err(QuotaAppidError::RepeatedParameter("appid"));
        }
        if let Some(appid) = params.appid {
            return Ok(Some(appid));
        }
        let Some(field) = body_field else {
            return Ok(None);
        };
        json_field(body, field).map(|appid| appid.map(|appid| Cow::Owned(appid.into_bytes())))
    }
}

/// A string field of a JSON object body, `None` when absent or empty.
fn json_field(body: &[u8], field: &'static str) -> Result<Option<String>, QuotaAppidError> {
    use serde::de::{IgnoredAny, MapAccess, Visitor};
    use std::fmt;

    /// Reads one field, refusing the object if it holds that field twice (serde_json would
    /// otherwise keep the last copy, while WeChat might read the first).
    struct Field(&'static str);

    impl<'de> Visitor<'de> for Field {
        type Value = Result<Option<String>, QuotaAppidError>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut found: Option<String> = None;
            let mut copies = 0;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == self.0 && copies == 0 {
                    found = map.next_value::<Option<String>>()?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                copies += usize::from(key == self.0);
            }
            if copies > 1 {
                return Ok(Err(QuotaAppidError::RepeatedParameter(self.0)));
            }
            Ok(Ok(found.filter(|value| !value.is_empty())))
        }
    }

    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let read = serde::Deserializer::deserialize_map(&mut deserializer, Field(field))
        .and_then(|read| deserializer.end().map(|()| read));
    read.unwrap_or(Err(QuotaAppidError::BodyNotJson))
}

/// `path` percent-decoded (lossily: only a known API's ASCII spelling can match), with
/// repeated slashes merged and a trailing slash dropped.
fn normalise(path: &str) -> String {
    let decoded = percent_decode_str(path).decode_utf8_lossy();
    let mut normal = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|segment| !segment.is_empty()) {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    normal
}

/// `path` without the `;parameters` of its segments.
fn strip_parameters(path: &str) -> String {
    path.split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_path_round_trips_through_its_label() {
        for api in Api::ALL {
            if api != Api::Other {
                assert_eq!(Api::from_path(api.label()), api);
                assert_eq!(Api::classify(api.label()), PathClass::Exact(api));
            }
            assert_eq!(Api::ALL[api.index()], api);
        }
        assert_eq!(Api::from_path("/sns/jscode2session/"), Api::Other);
        assert_eq!(Api::from_path("//evil.example/x"), Api::Other);
    }

    #[test]
    fn variants_of_a_known_path_are_that_api_and_lookalikes_are_refused() {
        for variant in [
            "//sns/jscode2session",
            "/sns//jscode2session",
            "/sns/jscode2session/",
            "///sns/jscode2session//",
            "/sns/jscode2sessio%6E",
            "/%73ns/jscode2session",
            "/sns%2Fjscode2session",
        ] {
            assert_eq!(
                Api::classify(variant),
                PathClass::Variant(Api::JsCode2Session),
                "{variant}"
            );
        }
        for lookalike in [
            "/sns/jscode2session;x",
            "/sns;a=b/jscode2session",
            "/SNS/jscode2session",
            "/sns/JsCode2Session/",
            "/sns/jscode2session%3Bx",
        ] {
            assert_eq!(
                Api::classify(lookalike),
                PathClass::Ambiguous,
                "{lookalike}"
            );
        }
        for other in ["/", "/wxa/getwxacode", "//evil.example/x", "/A/b/", "/x;y"] {
            assert_eq!(
                Api::classify(other),
                PathClass::Exact(Api::Other),
                "{other}"
            );
        }
    }

    #[test]
    fn the_quota_appid_comes_from_the_query_or_the_json_body() {
        use QuotaAppidError::{BodyNotJson, RepeatedParameter};
        type Case = (
            Api,
            &'static str,
            &'static str,
            Result<Option<&'static str>, QuotaAppidError>,
        );
        let cases: [Case; 10] = [
            (Api::Token, "appid=wxa&secret=s", "", Ok(Some("wxa"))),
            (Api::Other, "appid=wxa", "", Ok(None)),
            (
                Api::Token,
                "appid=&appid=wxa",
                "",
                Err(RepeatedParameter("appid")),
            ),
            (
                Api::StableToken,
                "",
                r#"{"grant_type":"client_credential","appid":"wxa"}"#,
                Ok(Some("wxa")),
            ),
            (Api::ClearQuota, "", r#"{"appid":"wxb"}"#, Ok(Some("wxb"))),
            (
                Api::ComponentToken,
                "",
                r#"{"component_appid":"wxc","appid":"x"}"#,
                Ok(Some("wxc")),
            ),
            (
                Api::StableToken,
                "",
                r#"{"appid":"wxa","appid":"wxb"}"#,
                Err(RepeatedParameter("appid")),
            ),
            (Api::StableToken, "", "appid=wxa", Err(BodyNotJson)),
            (Api::StableToken, "", r#"{"appid":""}"#, Ok(None)),
            (
                Api::QuotaGet,
                "access_token=t",
                r#"{"cgi_path":"/x"}"#,
                Ok(None),
            ),
        ];
        for (api, query, body, expected) in cases {
            let got = api.quota_appid(query, body.as_bytes());
            let got = got.map(|appid| appid.map(|appid| appid.into_owned()));
            let expected = expected.map(|appid| appid.map(|appid| appid.as_bytes().to_vec()));
            assert_eq!(got, expected, "{api:?} {query} {body}");
        }
    }

    proptest::proptest! {
        /// Any path is classified without panicking and the same way every time; a variant
        /// of a known API names an API whose documented path is that API exactly.
        #[test]
        fn any_path_is_classified_stably(path in "/[a-zA-Z0-9_/;%.-]{0,40}") {
            let class = Api::classify(&path);
            proptest::prop_assert_eq!(class, Api::classify(&path));
            if let PathClass::Variant(api) = class {
                proptest::prop_assert_ne!(api, Api::Other);
                proptest::prop_assert_eq!(Api::classify(api.label()), PathClass::Exact(api));
            }
        }

        /// Known paths with slashes doubled or added at the end are always their API.
        #[test]
        fn slash_variants_of_known_paths_are_their_api(index in 0..Api::COUNT - 1, doubled in 0usize..4) {
            let api = Api::ALL[index];
            let mut path = api.label().replacen('/', "//", doubled.min(1));
            if doubled >= 2 {
                path.push('/');
            }
            let expected = if path == api.label() { PathClass::Exact(api) } else { PathClass::Variant(api) };
            proptest::prop_assert_eq!(Api::classify(&path), expected);
        }
    }
}
