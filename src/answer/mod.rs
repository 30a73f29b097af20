//! The vocabulary of answers, in one place: what a request is answered with ([`Answer`]),
//! and its kinds: WeChat's answer to a call ([`WechatAnswer`], an [`UpstreamResponse`] read
//! for its errcode), a remembered code-exchange answer ([`RememberedAnswer`], the same in
//! memory and in Redis), and every answer wxgate gives itself ([`LocalAnswer`]).
//!
//! The code cache and the token cache answer with an [`Answer`] and a
//! [`CacheStatus`](wxgate_contract::CacheStatus); the proxy turns it into the HTTP response.

mod local;
mod remembered;

use std::sync::Arc;

use bytes::Bytes;

pub use self::local::LocalAnswer;
pub use self::remembered::RememberedAnswer;
use crate::upstream::UpstreamResponse;
use crate::wechat::Errcode;

/// What a request is answered with, before it is an HTTP response.
#[derive(Debug, Clone)]
pub enum Answer {
    /// WeChat's answer to this request's call, or to the identical call it waited for
    /// (shared, so that followers copy nothing but what they send).
    Wechat(Arc<WechatAnswer>),
    /// A remembered code-exchange answer, replayed byte for byte.
    Remembered(RememberedAnswer),
    /// An access token written by wxgate with the lifetime that remains:
    /// `{"access_token":…,"expires_in":…}` (or `component_access_token`).
    Token(Bytes),
    /// One of wxgate's own.
    Local(LocalAnswer),
}

/// WeChat's answer to a call: the response, and the errcode read from its body.
#[derive(Debug, Clone)]
pub struct WechatAnswer {
    /// Passed back to the client as it is.
    pub response: UpstreamResponse,
    /// What the body says.
    pub errcode: Errcode,
}
