//! The WeChat APIs wxgate knows by path.
//!
//! The `api` label of every metric comes from [`Api::label`], so its values are this bounded
//! set and never a path a client made up.

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

    /// Recognises a request path exactly (no prefix match: `/sns/jscode2session/x` is `Other`).
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_path_round_trips_through_its_label() {
        for api in Api::ALL {
            if api != Api::Other {
                assert_eq!(Api::from_path(api.label()), api);
            }
            assert_eq!(Api::ALL[api.index()], api);
        }
        assert_eq!(Api::from_path("/sns/jscode2session/"), Api::Other);
        assert_eq!(Api::from_path("//evil.example/x"), Api::Other);
    }
}
