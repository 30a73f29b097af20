//! What a request can be answered with, in one place: WeChat's answer to a call
//! ([`WechatAnswer`]), and every answer wxgate gives itself ([`LocalAnswer`]).

mod local;

pub use self::local::LocalAnswer;

use crate::upstream::UpstreamResponse;
use crate::wechat::Errcode;

/// WeChat's answer to a call: the response, and the errcode read from its body.
#[derive(Debug, Clone)]
pub struct WechatAnswer {
    /// Passed back to the client as it is.
    pub response: UpstreamResponse,
    /// What the body says.
    pub errcode: Errcode,
}
