//! What the pipeline reads in the requests and answers passing through, for the quota: the
//! access token a call carries, the tokens token fetches answer (so that a later call
//! carrying one gets its appid's quota key), and the account a platform's token acts for.
//! Nothing read here is logged, and tokens go nowhere but the discovery's token book.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;

use crate::wechat::{query_pairs, LenientNumber};

/// Path of a platform's token for one account: its answer's `authorizer_access_token` makes
/// calls on the account's behalf (`authorizer_appid` in the request's body).
pub(super) const AUTHORIZER_TOKEN_PATH: &str = "/cgi-bin/component/api_authorizer_token";

/// The account whose daily counts a successful `clear_quota` call at `path` with `body`
/// started over: `appid` (`/cgi-bin/clear_quota`, `/v2`), or the platform's
/// `component_appid` (`/cgi-bin/component/clear_quota`).
pub(super) fn cleared_appid(path: &str, body: &[u8]) -> Option<String> {
    let field = match path {
        "/cgi-bin/clear_quota" | "/cgi-bin/clear_quota/v2" => "appid",
        "/cgi-bin/component/clear_quota" => "component_appid",
        _ => return None,
    };
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(value.get(field)?.as_str()?.to_owned())
}

/// The `access_token` a query carries, percent-decoded; `None` without one, or when it is
/// given twice (WeChat could read the other copy).
pub(super) fn access_token(query: &str) -> Option<Cow<'_, [u8]>> {
    let mut found = None;
    for (name, value) in query_pairs(query) {
        if &*name == b"access_token" {
            if found.is_some() {
                return None;
            }
            found = Some(value);
        }
    }
    found.filter(|token| !token.is_empty())
}

/// A token answer: the token in `field` and its lifetime.
pub(super) fn minted_token(body: &[u8], field: &str) -> Option<(String, Duration)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let token = value.get(field)?.as_str()?.to_owned();
    let expires_in: LenientNumber =
        serde_json::from_value(value.get("expires_in")?.clone()).ok()?;
    let secs = u64::try_from(expires_in.value()?).ok()?;
    Some((token, Duration::from_secs(secs)))
}

/// The account of an authorizer-token request (`{"authorizer_appid": …}`).
pub(super) fn authorizer_appid(request_body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Request {
        authorizer_appid: String,
    }
    serde_json::from_slice::<Request>(request_body)
        .ok()
        .map(|request| request.authorizer_appid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_where_they_are() {
        assert_eq!(
            access_token("a=1&access_token=T%2Bx").as_deref(),
            Some(&b"T+x"[..])
        );
        assert_eq!(access_token("access_token=a&access_token=b"), None);
        assert_eq!(access_token("access_token="), None);
        assert_eq!(access_token("component_access_token=c"), None);
        assert_eq!(
            minted_token(
                br#"{"access_token":"T","expires_in":"7200"}"#,
                "access_token"
            ),
            Some(("T".into(), Duration::from_secs(7200)))
        );
        assert_eq!(minted_token(br#"{"errcode":40001}"#, "access_token"), None);
        assert_eq!(
            cleared_appid(
                "/cgi-bin/clear_quota/v2",
                br#"{"appid":"wxa","appsecret":"s"}"#
            )
            .as_deref(),
            Some("wxa")
        );
        assert_eq!(
            cleared_appid(
                "/cgi-bin/component/clear_quota",
                br#"{"component_appid":"wxc"}"#
            )
            .as_deref(),
            Some("wxc")
        );
        assert_eq!(cleared_appid("/cgi-bin/other", br#"{"appid":"wxa"}"#), None);
        assert_eq!(
            authorizer_appid(br#"{"component_appid":"c","authorizer_appid":"wxa"}"#).as_deref(),
            Some("wxa")
        );
    }
}
