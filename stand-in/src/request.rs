//! A call as the stand-in received it: which behaviour its path gets ([`Route`]), and the
//! parameters its endpoint reads, parsed here and nowhere else: queries with
//! `form_urlencoded`, JSON bodies with `serde_json`.
//!
//! This parser is deliberately not wxgate's. A test double that reused the proxy's query
//! reader would agree with every mistake that reader makes, and the tests would pass.

use std::borrow::Cow;
use std::time::SystemTime;

use bytes::Bytes;
use http::request::Parts;
use http::Method;

use crate::{
    AUTHORIZER_TOKEN_PATH, CHECKED_API_PATH, CLEAR_QUOTA_PATH, CLEAR_QUOTA_V2_PATH,
    COMPONENT_CLEAR_QUOTA_PATH, COMPONENT_JSCODE2SESSION_PATH, COMPONENT_TOKEN_PATH,
    JSCODE2SESSION_PATH, QUOTA_GET_PATH, STABLE_TOKEN_PATH, TOKEN_PATH,
};

/// One call as received, before the stand-in decides what to do with it.
pub(crate) struct ReceivedCall<'a> {
    /// When it arrived (its request head was read), on the stand-in's clock.
    pub(crate) at: SystemTime,
    pub(crate) parts: &'a Parts,
    pub(crate) body: &'a Bytes,
    /// The endpoint's parameters, or the errcode WeChat answers before reading them.
    pub(crate) params: Result<Params<'a>, i64>,
}

impl<'a> ReceivedCall<'a> {
    /// Reads the parameters `route` needs from the request.
    pub(crate) fn new(
        at: SystemTime,
        route: Route,
        parts: &'a Parts,
        body: &'a Bytes,
    ) -> ReceivedCall<'a> {
        let query = parts.uri.query().unwrap_or_default();
        let params = if route.reads_json_body() {
            if parts.method == Method::POST {
                Params::from_json_body(body).map(|params| params.with_tokens_of(query))
            } else {
                Err(43002)
            }
        } else {
            Ok(Params::from_query(query))
        };
        ReceivedCall {
            at,
            parts,
            body,
            params,
        }
    }

    /// The request path, without the query.
    pub(crate) fn path(&self) -> &'a str {
        self.parts.uri.path()
    }
}

/// The parameters WeChat's endpoints read. An empty value counts as missing, as it does for
/// WeChat; of a repeated query parameter the first non-empty value is kept. Other parameters
/// are ignored.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Params<'a> {
    pub(crate) appid: Option<Cow<'a, str>>,
    pub(crate) secret: Option<Cow<'a, str>>,
    pub(crate) js_code: Option<Cow<'a, str>>,
    pub(crate) grant_type: Option<Cow<'a, str>>,
    pub(crate) component_appid: Option<Cow<'a, str>>,
    pub(crate) component_access_token: Option<Cow<'a, str>>,
    /// The token an API call presents.
    pub(crate) access_token: Option<Cow<'a, str>>,
    /// `stable_token`'s `force_refresh`.
    pub(crate) force_refresh: bool,
    /// The component token's secret and ticket.
    pub(crate) component_appsecret: Option<Cow<'a, str>>,
    pub(crate) component_verify_ticket: Option<Cow<'a, str>>,
    /// `clear_quota/v2`'s secret (named `appsecret` there, not `secret`).
    pub(crate) appsecret: Option<Cow<'a, str>>,
    /// quota/get's API path.
    pub(crate) cgi_path: Option<Cow<'a, str>>,
    /// `api_authorizer_token`'s account and refresh token.
    pub(crate) authorizer_appid: Option<Cow<'a, str>>,
    pub(crate) authorizer_refresh_token: Option<Cow<'a, str>>,
}

impl<'a> Params<'a> {
    /// Reads a query string (without the `?`) as `application/x-www-form-urlencoded`: pairs
    /// split on `&`, name and value on the first `=`, `+` and `%XX` decoded.
    pub(crate) fn from_query(query: &'a str) -> Params<'a> {
        let mut params = Params::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match name.as_ref() {
                "appid" => &mut params.appid,
                "secret" => &mut params.secret,
                "js_code" => &mut params.js_code,
                "grant_type" => &mut params.grant_type,
                "component_appid" => &mut params.component_appid,
                "component_access_token" => &mut params.component_access_token,
                "access_token" => &mut params.access_token,
                _ => continue,
            };
            if slot.is_none() && !value.is_empty() {
                *slot = Some(value);
            }
        }
        params
    }

    /// The JSON body of a POST endpoint (`stable_token`, the component and authorizer token
    /// fetches, quota/get, the clear_quota calls); `Err(47001)` when it is not a JSON object
    /// whose known fields are strings (`force_refresh` a boolean), which WeChat refuses
    /// before looking at the fields.
    pub(crate) fn from_json_body(body: &'a [u8]) -> Result<Params<'a>, i64> {
        #[derive(serde::Deserialize)]
        struct JsonBody<'b> {
            #[serde(borrow)]
            grant_type: Option<Cow<'b, str>>,
            #[serde(borrow)]
            appid: Option<Cow<'b, str>>,
            #[serde(borrow)]
            secret: Option<Cow<'b, str>>,
            #[serde(default)]
            force_refresh: bool,
            #[serde(borrow)]
            component_appid: Option<Cow<'b, str>>,
            #[serde(borrow)]
            component_appsecret: Option<Cow<'b, str>>,
            #[serde(borrow)]
            component_verify_ticket: Option<Cow<'b, str>>,
            #[serde(borrow)]
            appsecret: Option<Cow<'b, str>>,
            #[serde(borrow)]
            cgi_path: Option<Cow<'b, str>>,
            #[serde(borrow)]
            authorizer_appid: Option<Cow<'b, str>>,
            #[serde(borrow)]
            authorizer_refresh_token: Option<Cow<'b, str>>,
        }
        let parsed: JsonBody<'a> = serde_json::from_slice(body).map_err(|_| 47001_i64)?;
        Ok(Params {
            grant_type: present(parsed.grant_type),
            appid: present(parsed.appid),
            secret: present(parsed.secret),
            force_refresh: parsed.force_refresh,
            component_appid: present(parsed.component_appid),
            component_appsecret: present(parsed.component_appsecret),
            component_verify_ticket: present(parsed.component_verify_ticket),
            appsecret: present(parsed.appsecret),
            cgi_path: present(parsed.cgi_path),
            authorizer_appid: present(parsed.authorizer_appid),
            authorizer_refresh_token: present(parsed.authorizer_refresh_token),
            ..Params::default()
        })
    }

    /// Adds the tokens of the query: a POST endpoint takes its `access_token` or
    /// `component_access_token` there, and everything else from its body.
    fn with_tokens_of(mut self, query: &'a str) -> Params<'a> {
        let query = Params::from_query(query);
        self.access_token = query.access_token;
        self.component_access_token = query.component_access_token;
        self
    }
}

/// A value, unless empty: WeChat reads an empty field as a missing one.
fn present(value: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    value.filter(|value| !value.is_empty())
}

/// Which behaviour a path gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    CodeSession,
    ComponentCodeSession,
    Token,
    StableToken,
    ComponentToken,
    AuthorizerToken,
    /// [`CHECKED_API_PATH`].
    CheckedApi,
    QuotaGet,
    ClearQuota,
    ClearQuotaV2,
    ComponentClearQuota,
    /// Any other path: echoed, and checked and counted when its limits are configured.
    Echo,
}

impl Route {
    /// The route of a request path (without its query).
    pub(crate) fn of(path: &str) -> Route {
        match path {
            JSCODE2SESSION_PATH => Route::CodeSession,
            COMPONENT_JSCODE2SESSION_PATH => Route::ComponentCodeSession,
            TOKEN_PATH => Route::Token,
            STABLE_TOKEN_PATH => Route::StableToken,
            COMPONENT_TOKEN_PATH => Route::ComponentToken,
            AUTHORIZER_TOKEN_PATH => Route::AuthorizerToken,
            CHECKED_API_PATH => Route::CheckedApi,
            QUOTA_GET_PATH => Route::QuotaGet,
            CLEAR_QUOTA_PATH => Route::ClearQuota,
            CLEAR_QUOTA_V2_PATH => Route::ClearQuotaV2,
            COMPONENT_CLEAR_QUOTA_PATH => Route::ComponentClearQuota,
            _ => Route::Echo,
        }
    }

    /// Whether [`StandInConfig::quota_per_window`](crate::StandInConfig::quota_per_window)
    /// applies: the code exchanges and token fetches, as before per-API limits existed.
    pub(crate) fn default_limited(self) -> bool {
        matches!(
            self,
            Route::CodeSession
                | Route::ComponentCodeSession
                | Route::Token
                | Route::StableToken
                | Route::ComponentToken
        )
    }

    /// Whether the endpoint is a POST with a JSON body.
    fn reads_json_body(self) -> bool {
        matches!(
            self,
            Route::StableToken
                | Route::ComponentToken
                | Route::AuthorizerToken
                | Route::QuotaGet
                | Route::ClearQuota
                | Route::ClearQuotaV2
                | Route::ComponentClearQuota
        )
    }

    /// Whether quota/get knows this API without configuration: the stand-in's own accounts'
    /// APIs (the platforms' are queried with their own tokens, which quota/get does not
    /// take here, and `/sns/*` cannot be queried at all).
    pub(crate) fn queryable(self) -> bool {
        matches!(
            self,
            Route::Token
                | Route::StableToken
                | Route::CheckedApi
                | Route::QuotaGet
                | Route::ClearQuota
                | Route::ClearQuotaV2
        )
    }

    /// Whether the call names its platform and no account: the platform's own API calls.
    pub(crate) fn names_a_platform(self) -> bool {
        matches!(
            self,
            Route::ComponentToken | Route::AuthorizerToken | Route::ComponentClearQuota
        )
    }

    /// Whether calls on this route spend a `js_code`.
    pub(crate) fn exchanges_codes(self) -> bool {
        matches!(self, Route::CodeSession | Route::ComponentCodeSession)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(value: &Option<Cow<'_, str>>) -> Option<String> {
        value.as_deref().map(str::to_owned)
    }

    #[test]
    fn a_query_is_decoded_and_the_first_non_empty_value_is_kept() {
        let params = Params::from_query(
            "appid=a&js_code=&x=1&appid=b&secret=s%20t+u&js_code=c%2Bd&grant_type",
        );
        assert_eq!(owned(&params.appid), Some("a".into()));
        assert_eq!(owned(&params.secret), Some("s t u".into()));
        // The empty js_code counts as missing, so the next one fills it.
        assert_eq!(owned(&params.js_code), Some("c+d".into()));
        // A name without `=` has an empty value: missing.
        assert_eq!(params.grant_type, None);
        assert_eq!(params.component_appid, None);
    }

    #[test]
    fn a_query_that_names_nothing_known_reads_as_empty() {
        for query in ["", "&", "&&", "token=T", "=x&appid", "APPID=wx1"] {
            assert_eq!(Params::from_query(query), Params::default(), "{query:?}");
        }
        // An encoded name is decoded before it is matched.
        assert_eq!(
            owned(&Params::from_query("app%69d=wx1").appid),
            Some("wx1".into())
        );
        assert_eq!(
            owned(&Params::from_query("access_token=T").access_token),
            Some("T".into())
        );
    }

    #[test]
    fn the_component_token_body_is_json_too() {
        let params = Params::from_json_body(
            br#"{"component_appid":"wxc","component_appsecret":"s","component_verify_ticket":""}"#,
        )
        .expect("a JSON object");
        assert_eq!(owned(&params.component_appid), Some("wxc".into()));
        assert_eq!(owned(&params.component_appsecret), Some("s".into()));
        assert_eq!(params.component_verify_ticket, None);
        assert_eq!(Params::from_json_body(b"x"), Err(47001));
    }

    #[test]
    fn the_stable_token_body_is_json_with_empty_strings_missing() {
        let params = Params::from_json_body(
            br#"{"grant_type":"client_credential","appid":"wx1","secret":"","force_refresh":true}"#,
        )
        .expect("a JSON object");
        assert_eq!(owned(&params.grant_type), Some("client_credential".into()));
        assert_eq!(owned(&params.appid), Some("wx1".into()));
        assert_eq!(params.secret, None);
        assert_eq!(
            owned(
                &Params::from_json_body(br#"{"appid":"w\u0078"}"#)
                    .unwrap()
                    .appid
            ),
            Some("wx".into())
        );
        for body in [&b"appid=wx1"[..], b"", b"[]", br#"{"appid":1}"#] {
            assert_eq!(Params::from_json_body(body), Err(47001), "{body:?}");
        }
    }

    #[test]
    fn a_post_endpoint_takes_its_tokens_from_the_query_and_the_rest_from_its_body() {
        let parts = |method: &str, uri: &str| {
            let (parts, ()) = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap()
                .into_parts();
            parts
        };
        let post = parts("POST", "/cgi-bin/clear_quota?access_token=T&appid=wx-query");
        let body = Bytes::from_static(br#"{"appid":"wx-body","access_token":"ignored"}"#);
        let call = ReceivedCall::new(SystemTime::UNIX_EPOCH, Route::ClearQuota, &post, &body);
        let params = call.params.expect("a JSON body");
        assert_eq!(owned(&params.access_token), Some("T".into()));
        assert_eq!(owned(&params.appid), Some("wx-body".into()));
        let get = parts("GET", "/cgi-bin/clear_quota?access_token=T");
        let call = ReceivedCall::new(SystemTime::UNIX_EPOCH, Route::ClearQuota, &get, &body);
        assert_eq!(call.params, Err(43002));
    }
}
