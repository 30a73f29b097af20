//! `upstream.base_url` parsed once, at validation, into what the upstream client needs
//! ([`BaseUrl`]), and the mask that keeps a URL's password out of `check-config` and logs.

use std::fmt;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use http::uri::{Authority, Scheme};
use http::HeaderValue;

/// `upstream.base_url`, parsed once at validation into what the upstream client needs.
///
/// [`Display`](fmt::Display), [`as_str`](BaseUrl::as_str) and `Debug` show the URL with its
/// password masked (`https://user:***@host`); the password itself lives only in the
/// sensitive `Authorization` value.
#[derive(Clone, PartialEq, Eq)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    path_prefix: String,
    authorization: Option<HeaderValue>,
    shown: String,
}

/// Why a text is not a usable base URL (the text itself is never part of the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    /// The URL parser refused it.
    #[error("not a URL ({0})")]
    Unparsable(url::ParseError),
    /// A URL, but not one wxgate can forward to.
    #[error("must be an http:// or https:// URL with a host and no query or fragment, such as \"https://api.weixin.qq.com\"")]
    Unsupported,
    /// Its host or userinfo cannot be written in an HTTP header.
    #[error("its host or userinfo cannot be sent in an HTTP header")]
    Unsendable,
}

impl BaseUrl {
    /// Parses `scheme://[user[:password]@]host[:port][/prefix][/]`.
    pub fn parse(text: &str) -> Result<BaseUrl, BaseUrlError> {
        let url = url::Url::parse(text).map_err(BaseUrlError::Unparsable)?;
        let scheme = match url.scheme() {
            "https" => Scheme::HTTPS,
            "http" => Scheme::HTTP,
            _ => return Err(BaseUrlError::Unsupported),
        };
        let (Some(host), None, None) = (url.host_str(), url.query(), url.fragment()) else {
            return Err(BaseUrlError::Unsupported);
        };
        // The parser leaves out a port that is the scheme's default, so this is also the
        // `Host` header as a browser writes it.
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let authorization = match (url.username(), url.password()) {
            ("", None) => None,
            (user, None) => Some(basic_authorization(user)?),
            (user, Some(password)) => Some(basic_authorization(&format!("{user}:{password}"))?),
        };
        Ok(BaseUrl {
            scheme,
            host: HeaderValue::from_str(&authority).map_err(|_| BaseUrlError::Unsendable)?,
            authority: authority.parse().map_err(|_| BaseUrlError::Unsendable)?,
            path_prefix: url.path().trim_end_matches('/').to_owned(),
            authorization,
            shown: mask_userinfo(text.trim_end_matches('/')),
        })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// Host and port (only when not the scheme's default), without userinfo: what to connect to.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The `Host` header every call carries.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host
    }

    /// The path every request path is appended to, without a trailing slash (usually empty).
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
    }

    /// `Authorization: Basic …` for a URL with userinfo, marked sensitive.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// The URL as written, without a trailing slash, its password masked.
    pub fn as_str(&self) -> &str {
        &self.shown
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BaseUrl").field(&self.shown).finish()
    }
}

/// `Authorization: Basic …` for the userinfo of a base URL (percent-decoded first, as URL
/// userinfo is percent-encoded).
fn basic_authorization(userinfo: &str) -> Result<HeaderValue, BaseUrlError> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(userinfo).collect();
    let encoded = format!("Basic {}", BASE64_STANDARD.encode(decoded));
    let mut value = HeaderValue::from_str(&encoded).map_err(|_| BaseUrlError::Unsendable)?;
    value.set_sensitive(true);
    Ok(value)
}

/// `https://user:pass@host/x` → `https://user:***@host/x`. Only the authority is searched
/// for userinfo (it ends where the URL parser ends it), so an `@` in the path is left alone.
pub(super) fn mask_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '\\', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => {
            let user = authority[..at].split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_is_parsed_into_what_the_client_needs() {
        let url = BaseUrl::parse("https://ops:p%40ss@WeChat.Internal:8443/wx/prefix/").unwrap();
        assert_eq!(url.scheme(), &Scheme::HTTPS);
        assert_eq!(url.authority().as_str(), "wechat.internal:8443");
        assert_eq!(url.host_header(), "wechat.internal:8443");
        assert_eq!(url.path_prefix(), "/wx/prefix");
        let authorization = url.authorization().unwrap();
        // base64("ops:p@ss")
        assert_eq!(authorization, "Basic b3BzOnBAc3M=");
        assert!(authorization.is_sensitive());
        assert_eq!(
            url.as_str(),
            "https://ops:***@WeChat.Internal:8443/wx/prefix"
        );
        assert_eq!(url.to_string(), url.as_str());
        assert!(!format!("{url:?}").contains("p%40ss"));

        let plain = BaseUrl::parse("http://127.0.0.1:80").unwrap();
        assert_eq!(plain.scheme(), &Scheme::HTTP);
        assert_eq!(
            plain.host_header(),
            "127.0.0.1",
            "the default port is left out"
        );
        assert_eq!(plain.path_prefix(), "");
        assert!(plain.authorization().is_none());
        assert_eq!(
            BaseUrl::parse("http://[::1]:8080")
                .unwrap()
                .authority()
                .as_str(),
            "[::1]:8080"
        );

        for bad in ["ftp://x", "https://x/?a=1", "https://x/#f", "mailto:a@b"] {
            assert_eq!(BaseUrl::parse(bad), Err(BaseUrlError::Unsupported), "{bad}");
        }
        assert!(matches!(
            BaseUrl::parse("api.weixin.qq.com"),
            Err(BaseUrlError::Unparsable(_))
        ));
    }

    #[test]
    fn userinfo_becomes_basic_authorization() {
        // RFC 7617's example: Aladdin / open sesame.
        let value = basic_authorization("Aladdin:open%20sesame").unwrap();
        assert_eq!(value, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(value.is_sensitive());
        assert_eq!(basic_authorization("ab").unwrap(), "Basic YWI=");
        assert_eq!(basic_authorization("abc").unwrap(), "Basic YWJj");
    }

    #[test]
    fn only_the_authority_is_masked() {
        assert_eq!(mask_userinfo("https://u:p@h/x"), "https://u:***@h/x");
        assert_eq!(mask_userinfo("https://u@h"), "https://u:***@h");
        assert_eq!(mask_userinfo("https://h/a@b"), "https://h/a@b");
        assert_eq!(mask_userinfo("https://a:b@c@h"), "https://a:***@h");
        assert_eq!(mask_userinfo("not a url"), "not a url");
    }
}
