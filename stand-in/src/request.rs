//! A call as the stand-in received it, and the parameters its endpoint reads, parsed here and
//! nowhere else: queries with `form_urlencoded`, the `stable_token` body with `serde_json`.
//!
//! This parser is deliberately not wxgate's. A test double that reused the proxy's query
//! reader would agree with every mistake that reader makes, and the tests would pass.

use std::borrow::Cow;
use std::time::SystemTime;

use bytes::Bytes;
use http::request::Parts;
use http::Method;

use crate::upstream::Route;

/// One call as received, before the stand-in decides what to do with it.
pub(crate) struct ReceivedCall<'a> {
    /// When it arrived, on the stand-in's clock.
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
        let params = match route {
            Route::StableToken | Route::ComponentToken if parts.method != Method::POST => {
                Err(43002)
            }
            Route::StableToken => Params::from_stable_token_body(body),
            Route::ComponentToken => Params::from_component_token_body(body),
            _ => Ok(Params::from_query(parts.uri.query().unwrap_or_default())),
        };
        ReceivedCall {
            at,
            parts,
            body,
            params,
        }
    }
}

/// The parameters WeChat's code-exchange and token endpoints read. An empty value counts as
/// missing, as it does for WeChat; of a repeated parameter the first non-empty value is kept.
/// Other parameters are ignored.
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

    /// The JSON body of `/cgi-bin/stable_token`; `Err(47001)` when it is not a JSON object
    /// with string fields, which WeChat refuses before looking at the fields.
    pub(crate) fn from_stable_token_body(body: &'a [u8]) -> Result<Params<'a>, i64> {
        #[derive(serde::Deserialize)]
        struct StableTokenBody<'b> {
            #[serde(borrow)]
            grant_type: Option<Cow<'b, str>>,
            #[serde(borrow)]
            appid: Option<Cow<'b, str>>,
            #[serde(borrow)]
            secret: Option<Cow<'b, str>>,
            #[serde(default)]
            force_refresh: bool,
        }
        let parsed: StableTokenBody<'a> = serde_json::from_slice(body).map_err(|_| 47001_i64)?;
        Ok(Params {
            grant_type: present(parsed.grant_type),
            appid: present(parsed.appid),
            secret: present(parsed.secret),
            force_refresh: parsed.force_refresh,
            ..Params::default()
        })
    }

    /// The JSON body of `/cgi-bin/component/api_component_token`; `Err(47001)` when it is not
    /// a JSON object with string fields.
    pub(crate) fn from_component_token_body(body: &'a [u8]) -> Result<Params<'a>, i64> {
        #[derive(serde::Deserialize)]
        struct ComponentTokenBody<'b> {
            #[serde(borrow)]
            component_appid: Option<Cow<'b, str>>,
            #[serde(borrow)]
            component_appsecret: Option<Cow<'b, str>>,
            #[serde(borrow)]
            component_verify_ticket: Option<Cow<'b, str>>,
        }
        let parsed: ComponentTokenBody<'a> = serde_json::from_slice(body).map_err(|_| 47001_i64)?;
        Ok(Params {
            component_appid: present(parsed.component_appid),
            component_appsecret: present(parsed.component_appsecret),
            component_verify_ticket: present(parsed.component_verify_ticket),
            ..Params::default()
        })
    }
}

/// A value, unless empty: WeChat reads an empty field as a missing one.
fn present(value: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    value.filter(|value| !value.is_empty())
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
        let params = Params::from_component_token_body(
            br#"{"component_appid":"wxc","component_appsecret":"s","component_verify_ticket":""}"#,
        )
        .expect("a JSON object");
        assert_eq!(owned(&params.component_appid), Some("wxc".into()));
        assert_eq!(owned(&params.component_appsecret), Some("s".into()));
        assert_eq!(params.component_verify_ticket, None);
        assert_eq!(Params::from_component_token_body(b"x"), Err(47001));
    }

    #[test]
    fn the_stable_token_body_is_json_with_empty_strings_missing() {
        let params = Params::from_stable_token_body(
            br#"{"grant_type":"client_credential","appid":"wx1","secret":"","force_refresh":true}"#,
        )
        .expect("a JSON object");
        assert_eq!(owned(&params.grant_type), Some("client_credential".into()));
        assert_eq!(owned(&params.appid), Some("wx1".into()));
        assert_eq!(params.secret, None);
        assert_eq!(
            owned(
                &Params::from_stable_token_body(br#"{"appid":"w\u0078"}"#)
                    .unwrap()
                    .appid
            ),
            Some("wx".into())
        );
        for body in [&b"appid=wx1"[..], b"", b"[]", br#"{"appid":1}"#] {
            assert_eq!(Params::from_stable_token_body(body), Err(47001), "{body:?}");
        }
    }
}
