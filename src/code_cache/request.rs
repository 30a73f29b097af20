//! A code exchange's parameters, checked as WeChat would check them, so that a request that
//! cannot succeed spends neither quota nor a call.

use super::key::CodeCredential;
use crate::answer::LocalAnswer;
use crate::quota::QuotaKey;
use crate::wechat::Api;
use crate::wechat::{is_plausible_js_code, WechatParams};

/// The fields of a valid exchange, borrowed from its parameters.
pub(super) struct Checked<'p> {
    pub(super) appid: &'p [u8],
    pub(super) credential: CodeCredential<'p>,
    pub(super) js_code: &'p [u8],
    pub(super) quota_key: QuotaKey,
}

/// Checks the parameters of `api`'s exchange. Only WeChat's parameters are read; others
/// (wechatpy adds `access_token`) are forwarded as they are and are not part of the key.
pub(super) fn check<'p>(
    api: Api,
    params: &'p WechatParams<'_>,
) -> Result<Checked<'p>, LocalAnswer> {
    // A parameter given twice is refused: WeChat and wxgate could read different copies.
    if let Some(name) = params.repeated {
        return Err(LocalAnswer::RepeatedParameter(name));
    }
    let component = api == Api::ComponentJsCode2Session;
    if component && params.component_access_token.is_none() {
        return Err(LocalAnswer::MissingComponentAccessToken);
    }
    let appid = params.appid.as_deref().ok_or(LocalAnswer::MissingAppid)?;
    if !component && params.secret.is_none() {
        return Err(LocalAnswer::MissingSecret);
    }
    if component && params.component_appid.is_none() {
        return Err(LocalAnswer::MissingComponentAppid);
    }
    let js_code = params.js_code.as_deref().ok_or(LocalAnswer::MissingCode)?;
    if params.grant_type.as_deref() != Some(&b"authorization_code"[..]) {
        return Err(LocalAnswer::InvalidGrantType);
    }
    let quota_key = QuotaKey::new(api, appid).ok_or(LocalAnswer::ImplausibleAppid)?;
    if !is_plausible_js_code(js_code) {
        return Err(LocalAnswer::ImplausibleCode);
    }
    let credential = match (
        params.secret.as_deref(),
        params.component_appid.as_deref(),
        params.component_access_token.as_deref(),
    ) {
        (_, Some(appid), Some(access_token)) if component => CodeCredential::Component {
            appid,
            access_token,
        },
        (Some(secret), _, _) => CodeCredential::Secret(secret),
        _ => return Err(LocalAnswer::MissingSecret),
    };
    Ok(Checked {
        appid,
        credential,
        js_code,
        quota_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(api: Api, query: &str) -> Option<LocalAnswer> {
        check(api, &WechatParams::parse(query)).err()
    }

    #[test]
    fn each_missing_or_implausible_parameter_has_its_answer() {
        let ok = "appid=wx00000000000000a1&secret=s&js_code=c0de&grant_type=authorization_code";
        assert_eq!(refusal(Api::JsCode2Session, ok), None);
        let cases = [
            (
                "secret=s&js_code=c&grant_type=authorization_code",
                LocalAnswer::MissingAppid,
            ),
            (
                "appid=wxa&js_code=c&grant_type=authorization_code",
                LocalAnswer::MissingSecret,
            ),
            (
                "appid=wxa&secret=s&grant_type=authorization_code",
                LocalAnswer::MissingCode,
            ),
            (
                "appid=wxa&secret=s&js_code=c",
                LocalAnswer::InvalidGrantType,
            ),
            (
                "appid=wxa&secret=s&js_code=c&grant_type=client_credential",
                LocalAnswer::InvalidGrantType,
            ),
            (
                "appid=wx-a&secret=s&js_code=c&grant_type=authorization_code",
                LocalAnswer::ImplausibleAppid,
            ),
            (
                "appid=wxa&secret=s&js_code=c%20d&grant_type=authorization_code",
                LocalAnswer::ImplausibleCode,
            ),
            (
                &format!("{ok}&appid=wxb"),
                LocalAnswer::RepeatedParameter("appid"),
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(
                refusal(Api::JsCode2Session, query),
                Some(expected),
                "{query}"
            );
        }
        let component = "appid=wxa&js_code=c&grant_type=authorization_code";
        assert_eq!(
            refusal(Api::ComponentJsCode2Session, component),
            Some(LocalAnswer::MissingComponentAccessToken)
        );
        assert_eq!(
            refusal(
                Api::ComponentJsCode2Session,
                &format!("{component}&component_access_token=t")
            ),
            Some(LocalAnswer::MissingComponentAppid)
        );
        assert_eq!(
            refusal(
                Api::ComponentJsCode2Session,
                &format!("{component}&component_access_token=t&component_appid=wxc")
            ),
            None
        );
    }

    proptest::proptest! {
        /// Any query is either refused with one of wxgate's answers or checked the same way
        /// every time: the same fields, so the same key.
        #[test]
        fn any_query_is_refused_or_keyed_stably(
            query in "((appid|secret|js_code|grant_type|component_appid|component_access_token|x)=[a-zA-Z0-9_%+-]{0,8}&?){0,8}",
            component in proptest::bool::ANY,
        ) {
            let api = if component { Api::ComponentJsCode2Session } else { Api::JsCode2Session };
            let keys = super::super::key::KeyMaker::new();
            let key_of = |query: &str| {
                let params = WechatParams::parse(query);
                check(api, &params).map(|c| keys.key(api, c.appid, c.credential, c.js_code))
            };
            proptest::prop_assert_eq!(key_of(&query), key_of(&query));
        }
    }
}
