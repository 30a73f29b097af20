//! The respond phase: what goes back to the client, with what its log line and metrics say
//! of it.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use wxgate_contract::{CacheStatus, Outcome};

use super::CACHE_HEADER;
use crate::answer::{Answer, LocalAnswer, RememberedAnswer, WechatAnswer};
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

    /// A remembered answer replayed: its status, Content-Type and body.
    fn remembered(answer: RememberedAnswer) -> Reply {
        let mut response = Response::new(Full::new(answer.body));
        *response.status_mut() = answer.status;
        if let Some(content_type) = answer.content_type {
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

    /// A token written by wxgate; fetched by this request (`miss`), it counts as WeChat's
    /// success.
    fn token(body: Bytes, status: CacheStatus) -> Reply {
        let mut response = Response::new(Full::new(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(JSON_CONTENT_TYPE),
        );
        Reply {
            response,
            outcome: Outcome::Forwarded,
            errcode: (status == CacheStatus::Miss).then_some(Errcode::Success),
        }
    }

    /// An answer of the code cache or the token cache, with its `X-Wxgate-Cache` header:
    /// a hit counts as one, a follower of a call (here or on another replica) as coalesced.
    pub(super) fn cached(answer: Answer, status: CacheStatus) -> Reply {
        let mut reply = match answer {
            // The leader alone usually holds WeChat's answer: no copy then.
            Answer::Wechat(answer) => Reply::forwarded(Arc::unwrap_or_clone(answer)),
            Answer::Remembered(remembered) => Reply::remembered(remembered),
            Answer::Token(body) => Reply::token(body, status),
            Answer::Local(local) => Reply::local(local),
        };
        if matches!(reply.outcome, Outcome::Forwarded | Outcome::CacheHit) {
            match status {
                CacheStatus::Hit => reply.outcome = Outcome::CacheHit,
                CacheStatus::Coalesced => reply.outcome = Outcome::Coalesced,
                CacheStatus::Miss => {}
            }
        }
        reply.response.headers_mut().insert(
            CACHE_HEADER,
            HeaderValue::from_static(status.header_value()),
        );
        reply
    }
}
