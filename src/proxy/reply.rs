//! The respond phase: what goes back to the client, with what its log line and metrics say
//! of it.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use wxgate_contract::{CacheStatus, Outcome};

use super::CACHE_HEADER;
use crate::answer::{LocalAnswer, WechatAnswer};
use crate::code_cache::ExchangeResult;
use crate::token_cache::TokenAnswer;
use crate::wechat::{Errcode, JSON_CONTENT_TYPE};

/// What goes back to the client, with what its log line and metrics say of it.
pub(super) struct Reply {
    pub(super) response: Response<Full<Bytes>>,
    pub(super) outcome: Outcome,
    /// The errcode of WeChat's answer, when this reply is one.
    pub(super) errcode: Option<Errcode>,
}

impl Reply {
    /// One of wxgate's own answers.
    pub(super) fn local(answer: LocalAnswer) -> Reply {
        Reply {
            response: answer.response(),
            outcome: answer.outcome(),
            errcode: None,
        }
    }

    /// WeChat's answer, as it came.
    pub(super) fn forwarded(answer: WechatAnswer) -> Reply {
        let upstream = answer.response;
        let mut response = Response::new(Full::new(upstream.body));
        *response.status_mut() = upstream.status;
        *response.headers_mut() = upstream.headers;
        Reply {
            response,
            outcome: Outcome::Forwarded,
            errcode: Some(answer.errcode),
        }
    }

    /// The answer of the token cache, with its `X-Wxgate-Cache` header.
    pub(super) fn token(answer: TokenAnswer) -> Reply {
        let (mut reply, status) = match answer {
            TokenAnswer::Token { body, status } => {
                let mut response = Response::new(Full::new(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(JSON_CONTENT_TYPE),
                );
                let errcode = (status == CacheStatus::Miss).then_some(Errcode::Success);
                let outcome = Outcome::Forwarded;
                (
                    Reply {
                        response,
                        outcome,
                        errcode,
                    },
                    status,
                )
            }
            TokenAnswer::Wechat { answer, status } => {
                (Reply::forwarded(Arc::unwrap_or_clone(answer)), status)
            }
            TokenAnswer::Local(local) => return Reply::local(local),
        };
        reply.outcome = match status {
            CacheStatus::Hit => Outcome::CacheHit,
            CacheStatus::Coalesced => Outcome::Coalesced,
            CacheStatus::Miss => Outcome::Forwarded,
        };
        reply.response.headers_mut().insert(
            CACHE_HEADER,
            HeaderValue::from_static(status.header_value()),
        );
        reply
    }

    /// The result of a code exchange, with its `X-Wxgate-Cache` header.
    pub(super) fn exchanged(result: ExchangeResult, status: CacheStatus) -> Reply {
        let mut reply = match result {
            // The leader alone usually holds the answer: no copy then.
            ExchangeResult::Upstream(answer) => Reply::forwarded(Arc::unwrap_or_clone(answer)),
            ExchangeResult::Remembered(remembered) => {
                let mut response = Response::new(Full::new(remembered.body()));
                *response.status_mut() = remembered.status();
                if let Some(content_type) = remembered.content_type() {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type);
                }
                Reply {
                    response,
                    outcome: Outcome::CacheHit,
                    errcode: None,
                }
            }
            ExchangeResult::Local(answer) => Reply::local(answer),
        };
        // A follower of a call, here or on another replica, is counted as coalesced.
        if status == CacheStatus::Coalesced
            && matches!(reply.outcome, Outcome::Forwarded | Outcome::CacheHit)
        {
            reply.outcome = Outcome::Coalesced;
        }
        reply.response.headers_mut().insert(
            CACHE_HEADER,
            HeaderValue::from_static(status.header_value()),
        );
        reply
    }
}
