//! A token fetch as wxgate reads it: which of WeChat's three token APIs, for which appid,
//! with which secret, and the request wxgate sends itself when it refreshes that token in
//! the background.
//!
//! Only well-formed fetches are cached. Anything else (a parameter missing or given twice,
//! another `grant_type`, a body that is not the documented JSON, another method) is not a
//! [`TokenRequest`] and goes upstream as it always did, so WeChat answers it as WeChat does.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use serde::Deserialize;

use crate::quota::QuotaKey;
use crate::wechat::Api;
use crate::wechat::{is_plausible_appid, WechatParams, JSON_CONTENT_TYPE};

/// The longest secret or ticket wxgate reads (WeChat's secrets are 32 hex digits; tickets a
/// few hundred characters): longer ones are forwarded uncached.
const MAX_CREDENTIAL_LEN: usize = 1024;

/// A well-formed token fetch. The secret lives here only while the request is answered (and
/// while a refresh it started runs): it is never stored, logged or shown by `Debug`.
#[derive(Clone)]
pub struct TokenRequest {
    key: TokenKey,
    secret: Vec<u8>,
    /// `force_refresh: true` (stable tokens).
    pub forced: bool,
    /// `component_verify_ticket` (platform tokens); not part of the key, it changes every
    /// ten minutes.
    ticket: Option<String>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("key", &self.key)
            .field("forced", &self.forced)
            .finish_non_exhaustive()
    }
}

impl TokenRequest {
    /// Reads a request of `api`; `None` when it is not a well-formed token fetch (it is then
    /// forwarded as any call is).
    pub fn read(api: Api, method: &Method, query: &str, body: &[u8]) -> Option<TokenRequest> {
        let kind = TokenKind::of(api)?;
        let (appid, secret, forced, ticket) = match kind {
            TokenKind::Token if method == Method::GET => {
                let params = WechatParams::parse(query);
                if params.repeated.is_some()
                    || params.grant_type.as_deref() != Some(&b"client_credential"[..])
                {
                    return None;
                }
                let appid = String::from_utf8(params.appid?.into_owned()).ok()?;
                (appid, params.secret?.into_owned(), false, None)
            }
            TokenKind::Stable if method == Method::POST => {
                let body: StableBody = serde_json::from_slice(body).ok()?;
                if body.grant_type != "client_credential" {
                    return None;
                }
                let forced = body.force_refresh.unwrap_or(false);
                (body.appid, body.secret.into_bytes(), forced, None)
            }
            TokenKind::Component if method == Method::POST => {
                let body: ComponentBody = serde_json::from_slice(body).ok()?;
                let ticket = Some(body.component_verify_ticket);
                let secret = body.component_appsecret.into_bytes();
                (body.component_appid, secret, false, ticket)
            }
            _ => return None,
        };
        let ticket_ok = ticket
            .as_ref()
            .is_none_or(|t| (1..=MAX_CREDENTIAL_LEN).contains(&t.len()));
        let well_formed = is_plausible_appid(&appid)
            && (1..=MAX_CREDENTIAL_LEN).contains(&secret.len())
            && ticket_ok;
        well_formed.then(|| TokenRequest {
            key: TokenKey {
                kind,
                appid: appid.into(),
            },
            secret,
            forced,
            ticket,
        })
    }

    /// What the token is cached under.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// The secret, for the credential fingerprint and nothing else.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The quota a fetch spends: the token API's, for this appid.
    pub fn quota_key(&self) -> Option<QuotaKey> {
        QuotaKey::new(self.key.kind.api(), self.key.appid.as_bytes())
    }

    /// The request wxgate sends to refresh this token in the background: the documented
    /// form of the fetch, never forced (a refresh must not invalidate a stable token).
    pub fn refresh_request(&self) -> crate::upstream::UpstreamRequest {
        let appid = &*self.key.appid;
        let secret = String::from_utf8_lossy(&self.secret);
        let (method, path_and_query, body) = match self.key.kind {
            TokenKind::Token => {
                let query = form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "client_credential")
                    .append_pair("appid", appid)
                    .finish();
                // The secret's raw bytes, percent-encoded (it came as bytes from a query).
                let secret: String = form_urlencoded::byte_serialize(&self.secret).collect();
                let path = format!("{}?{query}&secret={secret}", Api::Token.label());
                (Method::GET, path, Bytes::new())
            }
            TokenKind::Stable => {
                let body = serde_json::json!({
                    "grant_type": "client_credential",
                    "appid": appid,
                    "secret": secret,
                    "force_refresh": false,
                });
                let path = Api::StableToken.label().to_owned();
                (Method::POST, path, Bytes::from(body.to_string()))
            }
            TokenKind::Component => {
                let body = serde_json::json!({
                    "component_appid": appid,
                    "component_appsecret": secret,
                    "component_verify_ticket": self.ticket.as_deref().unwrap_or(""),
                });
                let path = Api::ComponentToken.label().to_owned();
                (Method::POST, path, Bytes::from(body.to_string()))
            }
        };
        let mut headers = HeaderMap::new();
        if method == Method::POST {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(JSON_CONTENT_TYPE),
            );
        }
        crate::upstream::UpstreamRequest {
            method,
            path_and_query: path_and_query
                .parse()
                .expect("an encoded query and a fixed path form a valid path and query"),
            headers,
            body,
        }
    }
}

/// One of WeChat's token APIs. Each keeps its own token per appid (WeChat isolates
/// `/cgi-bin/token` from `/cgi-bin/stable_token`), so each has its own cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    /// `GET /cgi-bin/token?grant_type=client_credential&appid&secret`.
    Token,
    /// `POST /cgi-bin/stable_token` with `{grant_type, appid, secret, force_refresh}`.
    Stable,
    /// `POST /cgi-bin/component/api_component_token` with `{component_appid,
    /// component_appsecret, component_verify_ticket}`.
    Component,
}

impl TokenKind {
    /// Every kind, in label order.
    pub const ALL: [TokenKind; 3] = [TokenKind::Token, TokenKind::Stable, TokenKind::Component];

    /// The kind of a known API, if it is a token API.
    pub fn of(api: Api) -> Option<TokenKind> {
        match api {
            Api::Token => Some(TokenKind::Token),
            Api::StableToken => Some(TokenKind::Stable),
            Api::ComponentToken => Some(TokenKind::Component),
            _ => None,
        }
    }

    /// The API (and metric label).
    pub fn api(self) -> Api {
        match self {
            TokenKind::Token => Api::Token,
            TokenKind::Stable => Api::StableToken,
            TokenKind::Component => Api::ComponentToken,
        }
    }

    /// Position in [`TokenKind::ALL`], for per-kind tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The field of the answer (and of the query of later API calls) that holds the token.
    pub fn token_field(self) -> &'static str {
        match self {
            TokenKind::Token | TokenKind::Stable => "access_token",
            TokenKind::Component => "component_access_token",
        }
    }
}

/// What a token is cached under: its kind and its appid (`component_appid` for a platform).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    /// Which API.
    pub kind: TokenKind,
    /// Whose token.
    pub appid: Box<str>,
}

#[derive(Deserialize)]
struct StableBody {
    grant_type: String,
    appid: String,
    secret: String,
    #[serde(default)]
    force_refresh: Option<bool>,
}

#[derive(Deserialize)]
struct ComponentBody {
    component_appid: String,
    component_appsecret: String,
    component_verify_ticket: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPID: &str = "wx00000000000000a1";

    fn read(api: Api, method: Method, query: &str, body: &str) -> Option<TokenRequest> {
        TokenRequest::read(api, &method, query, body.as_bytes())
    }

    #[test]
    fn well_formed_fetches_of_each_kind_are_read() {
        let query = format!("grant_type=client_credential&appid={APPID}&secret=s%2Bt");
        let token = read(Api::Token, Method::GET, &query, "").unwrap();
        assert_eq!(token.key().kind, TokenKind::Token);
        assert_eq!(&*token.key().appid, APPID);
        assert_eq!(token.secret(), b"s+t");
        assert!(!token.forced);

        let body = format!(
            r#"{{"grant_type":"client_credential","appid":"{APPID}","secret":"s","force_refresh":true}}"#
        );
        let stable = read(Api::StableToken, Method::POST, "", &body).unwrap();
        assert_eq!(stable.key().kind, TokenKind::Stable);
        assert!(stable.forced);

        let body = format!(
            r#"{{"component_appid":"{APPID}","component_appsecret":"cs","component_verify_ticket":"ticket@@@x"}}"#
        );
        let component = read(Api::ComponentToken, Method::POST, "", &body).unwrap();
        assert_eq!(component.key().kind, TokenKind::Component);
        assert_eq!(component.secret(), b"cs");
    }

    #[test]
    fn anything_else_is_not_cached_and_goes_upstream_as_it_is() {
        let ok = format!("grant_type=client_credential&appid={APPID}&secret=s");
        for (api, method, query, body) in [
            (Api::Token, Method::POST, ok.clone(), String::new()),
            (
                Api::Token,
                Method::GET,
                format!("appid={APPID}&secret=s"),
                String::new(),
            ),
            (
                Api::Token,
                Method::GET,
                format!("grant_type=authorization_code&appid={APPID}&secret=s"),
                String::new(),
            ),
            (
                Api::Token,
                Method::GET,
                "grant_type=client_credential&secret=s".into(),
                String::new(),
            ),
            (
                Api::Token,
                Method::GET,
                format!("grant_type=client_credential&appid={APPID}"),
                String::new(),
            ),
            (
                Api::Token,
                Method::GET,
                format!("{ok}&secret=t"),
                String::new(),
            ),
            (
                Api::Token,
                Method::GET,
                "grant_type=client_credential&appid=wx-1&secret=s".into(),
                String::new(),
            ),
            (Api::JsCode2Session, Method::GET, ok.clone(), String::new()),
            (Api::StableToken, Method::GET, String::new(), "{}".into()),
            (
                Api::StableToken,
                Method::POST,
                String::new(),
                format!(r#"{{"appid":"{APPID}","secret":"s"}}"#),
            ),
            (
                Api::StableToken,
                Method::POST,
                String::new(),
                format!(
                    r#"{{"grant_type":"client_credential","appid":"{APPID}","appid":"wxb","secret":"s"}}"#
                ),
            ),
            (
                Api::StableToken,
                Method::POST,
                String::new(),
                format!(
                    r#"{{"grant_type":"client_credential","appid":"{APPID}","secret":"","force_refresh":false}}"#
                ),
            ),
            (
                Api::StableToken,
                Method::POST,
                String::new(),
                format!(
                    r#"{{"grant_type":"client_credential","appid":"{APPID}","secret":"s","force_refresh":"yes"}}"#
                ),
            ),
            (
                Api::ComponentToken,
                Method::POST,
                String::new(),
                format!(
                    r#"{{"component_appid":"{APPID}","component_appsecret":"cs","component_verify_ticket":""}}"#
                ),
            ),
        ] {
            assert!(
                read(api, method, &query, &body).is_none(),
                "{api:?} {query} {body}"
            );
        }
    }

    #[test]
    fn the_refresh_request_is_the_documented_fetch_never_forced() {
        let query = format!("grant_type=client_credential&appid={APPID}&secret=a%26b%FF");
        let token = read(Api::Token, Method::GET, &query, "").unwrap();
        let refresh = token.refresh_request();
        assert_eq!(refresh.method, Method::GET);
        let params = WechatParams::parse(refresh.path_and_query.query().unwrap());
        assert_eq!(params.secret.as_deref(), Some(&b"a&b\xff"[..]));
        assert_eq!(params.appid.as_deref(), Some(APPID.as_bytes()));

        let body = format!(
            r#"{{"grant_type":"client_credential","appid":"{APPID}","secret":"s","force_refresh":true}}"#
        );
        let stable = read(Api::StableToken, Method::POST, "", &body).unwrap();
        let refresh = stable.refresh_request();
        let sent: serde_json::Value = serde_json::from_slice(&refresh.body).unwrap();
        assert_eq!(sent["force_refresh"], false);
        assert_eq!(sent["secret"], "s");
        assert_eq!(refresh.path_and_query.path(), "/cgi-bin/stable_token");
        assert_eq!(refresh.headers[header::CONTENT_TYPE], JSON_CONTENT_TYPE);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let query = format!("grant_type=client_credential&appid={APPID}&secret=hunter2");
        let token = read(Api::Token, Method::GET, &query, "").unwrap();
        assert!(!format!("{token:?}").contains("hunter2"));
    }
}
