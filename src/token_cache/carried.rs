//! The token an API call carries in its query (`access_token`, or a platform's
//! `component_access_token`), read for two decisions: the proxy refuses a call that names a
//! token twice, and when WeChat refuses a call's token, the cache drops it only if the call
//! carried that token alone.
//!
//! Why: WeChat reads one copy of a repeated parameter, and its 40001 does not say which. A
//! call with `access_token=bogus&access_token=T` would be refused for `bogus`, and dropping
//! the cached `T` for it would let anyone who knows `T` force a fetch per call (each one
//! spending the appid's daily budget and retiring `T` for its other holders five minutes
//! later). The same goes for a call carrying a token under each name.

use std::borrow::Cow;

use crate::wechat::query_pairs;

/// The names a call carries a token under.
const TOKEN_NAMES: [&str; 2] = ["access_token", "component_access_token"];

/// The tokens a call's query carries, each name at most once.
#[derive(Debug, PartialEq, Eq)]
pub enum Carried<'a> {
    /// No token (or only empty ones).
    Nothing,
    /// Exactly one token, under one of the names: the one WeChat's refusal is about.
    One(Cow<'a, [u8]>),
    /// A token under each name: WeChat's refusal does not say which it read.
    Two,
}

/// A token name given more than once in a query; the name, for wxgate's 40097.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepeatedToken(pub &'static str);

/// Reads the tokens `query` carries (one pass of the query reader, which decodes nothing
/// that needs no decoding); a name given twice, even once empty, is an error.
pub fn carried_token(query: &str) -> Result<Carried<'_>, RepeatedToken> {
    let mut found: [Option<Cow<'_, [u8]>>; 2] = [None, None];
    for (name, value) in query_pairs(query) {
        let Some(at) = TOKEN_NAMES
            .iter()
            .position(|token| *name == *token.as_bytes())
        else {
            continue;
        };
        if found[at].is_some() {
            return Err(RepeatedToken(TOKEN_NAMES[at]));
        }
        found[at] = Some(value);
    }
    let [access, component] = found.map(|value| value.filter(|value| !value.is_empty()));
    Ok(match (access, component) {
        (None, None) => Carried::Nothing,
        (Some(token), None) | (None, Some(token)) => Carried::One(token),
        (Some(_), Some(_)) => Carried::Two,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(token: &str) -> Result<Carried<'_>, RepeatedToken> {
        Ok(Carried::One(Cow::Borrowed(token.as_bytes())))
    }

    #[test]
    fn a_token_is_carried_once_or_the_call_is_refused() {
        assert_eq!(carried_token("access_token=T&appid=wx1"), one("T"));
        assert_eq!(carried_token("component_access_token=C"), one("C"));
        assert_eq!(
            carried_token("access_token=a%2Bb"),
            Ok(Carried::One(Cow::Owned(b"a+b".to_vec())))
        );
        assert_eq!(carried_token("appid=wx1"), Ok(Carried::Nothing));
        assert_eq!(carried_token("access_token="), Ok(Carried::Nothing));
        assert_eq!(
            carried_token("access_tokens=T&x_access_token=T"),
            Ok(Carried::Nothing)
        );
        assert_eq!(
            carried_token("access_token=A&component_access_token=C"),
            Ok(Carried::Two)
        );
        for (query, name) in [
            ("access_token=bogus&access_token=T", "access_token"),
            ("access_token=T&access_token=", "access_token"),
            ("access_token=&access_token=T", "access_token"),
            ("acc%65ss_token=T&access_token=bogus", "access_token"),
            (
                "component_access_token=C&appid=x&component_access_token=D",
                "component_access_token",
            ),
        ] {
            assert_eq!(carried_token(query), Err(RepeatedToken(name)), "{query}");
        }
    }
}
