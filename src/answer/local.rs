//! Every answer wxgate gives in WeChat's place, in one enum: its status, errcode and errmsg
//! are decided here and nowhere else.
//!
//! All of them are WeChat-shaped (`{"errcode":N,"errmsg":"… (wxgate: …)"}` with WeChat's
//! JSON Content-Type), so SDKs parse them as they parse WeChat's own, and the `(wxgate: …)`
//! part tells a human who answered. None holds a value from the request: no secret, code or
//! token can leak through an errmsg.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use wxgate_contract::Outcome;

use crate::upstream::TransportError;
use crate::wechat::{self, QuotaAppidError, JSON_CONTENT_TYPE};

/// An answer wxgate gives itself instead of forwarding WeChat's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAnswer {
    /// `CONNECT`, an absolute or dot-segment path: wxgate forwards only to its upstream.
    BadTarget,
    /// The request body is larger than `server.max_body_bytes`.
    BodyTooLarge {
        /// The configured limit, said in the errmsg.
        limit: usize,
    },
    /// The request body could not be read (the client broke it off or sent garbage).
    BodyUnreadable,
    /// The request body did not arrive whole within `server.body_timeout_ms` of its head.
    BodyTimeout {
        /// The configured deadline, said in the errmsg.
        after: Duration,
    },
    /// An API that takes a JSON body (and names its appid there) got something else.
    BodyNotJson,
    /// A request names one of WeChat's parameters twice (a code exchange's, an appid, a
    /// token): WeChat and wxgate could read different copies.
    RepeatedParameter(&'static str),
    /// A code exchange lacks `appid`.
    MissingAppid,
    /// A code exchange lacks `secret`.
    MissingSecret,
    /// A third-party code exchange lacks `component_appid`.
    MissingComponentAppid,
    /// A third-party code exchange lacks `component_access_token`.
    MissingComponentAccessToken,
    /// A code exchange lacks `js_code`.
    MissingCode,
    /// A code exchange's `grant_type` is not `authorization_code`.
    InvalidGrantType,
    /// An appid WeChat never issues (too long, or bytes outside `[A-Za-z0-9_]`).
    ImplausibleAppid,
    /// A `js_code` WeChat never issues.
    ImplausibleCode,
    /// No quota turn came before the request's deadline: wxgate's own 45011.
    LocalQuota {
        /// Sent as `Retry-After` (whole seconds, at least one).
        retry_after: Duration,
    },
    /// WeChat answered 45009 for this (appid, API): its daily quota is spent, and wxgate
    /// answers its calls itself, sending nothing, until WeChat's day ends.
    DailyQuota {
        /// When WeChat's day ends (midnight UTC+8), said in the errmsg.
        until: SystemTime,
    },
    /// WeChat gave no answer.
    Upstream(TransportError),
    /// The call ended without an answer (it was cancelled, or its task went away).
    CallAbandoned,
    /// With `[cluster]`: another replica was exchanging this code and went away before it
    /// answered, or held it for longer than its lease; it may have spent the code.
    ClaimHolderGone,
    /// With `[cluster]`: another replica is exchanging this code, and Redis stopped
    /// answering before its result could be read.
    ClaimUnreachable,
    /// wxgate is shutting down and `server.shutdown_grace_ms` ended before the answer did.
    ShuttingDown,
}

impl LocalAnswer {
    /// The HTTP status. WeChat answers its own errors with 200, so refusals of a request
    /// WeChat would also refuse do too; what WeChat would never say gets an HTTP error.
    pub fn status(self) -> StatusCode {
        match self {
            LocalAnswer::BadTarget | LocalAnswer::BodyUnreadable => StatusCode::BAD_REQUEST,
            LocalAnswer::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            LocalAnswer::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            LocalAnswer::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            LocalAnswer::Upstream(error) => error.status(),
            LocalAnswer::CallAbandoned
            | LocalAnswer::ClaimHolderGone
            | LocalAnswer::ClaimUnreachable => StatusCode::BAD_GATEWAY,
            LocalAnswer::RepeatedParameter(_)
            | LocalAnswer::BodyNotJson
            | LocalAnswer::MissingAppid
            | LocalAnswer::MissingSecret
            | LocalAnswer::MissingComponentAppid
            | LocalAnswer::MissingComponentAccessToken
            | LocalAnswer::MissingCode
            | LocalAnswer::InvalidGrantType
            | LocalAnswer::ImplausibleAppid
            | LocalAnswer::ImplausibleCode
            | LocalAnswer::LocalQuota { .. }
            | LocalAnswer::DailyQuota { .. } => StatusCode::OK,
        }
    }

    /// The errcode, WeChat's own for the same situation where it has one.
    pub fn errcode(self) -> i64 {
        match self {
            LocalAnswer::BadTarget | LocalAnswer::RepeatedParameter(_) => wechat::INVALID_ARGS,
            LocalAnswer::BodyTooLarge { .. }
            | LocalAnswer::BodyUnreadable
            | LocalAnswer::BodyTimeout { .. }
            | LocalAnswer::BodyNotJson => wechat::DATA_FORMAT_ERROR,
            LocalAnswer::MissingAppid | LocalAnswer::MissingComponentAppid => 41002,
            LocalAnswer::MissingSecret => 41004,
            LocalAnswer::MissingComponentAccessToken => 41021,
            LocalAnswer::MissingCode => 41008,
            LocalAnswer::InvalidGrantType => 40002,
            LocalAnswer::ImplausibleAppid => 40013,
            LocalAnswer::ImplausibleCode => 40029,
            LocalAnswer::LocalQuota { .. } => wechat::MINUTE_QUOTA,
            LocalAnswer::DailyQuota { .. } => wechat::DAILY_QUOTA,
            // -1 tells SDKs to try again (another replica, or this one once restarted).
            LocalAnswer::Upstream(_)
            | LocalAnswer::CallAbandoned
            | LocalAnswer::ClaimHolderGone
            | LocalAnswer::ClaimUnreachable
            | LocalAnswer::ShuttingDown => wechat::SYSTEM_BUSY,
        }
    }

    /// The errmsg: WeChat's wording where SDKs may match it, then who answered and why.
    pub fn errmsg(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            LocalAnswer::BadTarget => "invalid args (wxgate: the request target must be a plain path; wxgate forwards only to its configured upstream)",
            LocalAnswer::BodyTooLarge { limit } => {
                return Cow::Owned(format!(
                    "data format error (wxgate: request body larger than {limit} bytes)"
                ))
            }
            LocalAnswer::BodyUnreadable => {
                "data format error (wxgate: the request body could not be read)"
            }
            LocalAnswer::BodyTimeout { after } => {
                return Cow::Owned(format!(
                    "data format error (wxgate: the request body did not arrive within {} ms)",
                    after.as_millis()
                ))
            }
            LocalAnswer::BodyNotJson => {
                "data format error (wxgate: this API takes a JSON object naming its appid once)"
            }
            LocalAnswer::RepeatedParameter(name) => {
                return Cow::Owned(format!("invalid args (wxgate: parameter {name} given twice)"))
            }
            LocalAnswer::MissingAppid => "appid missing (wxgate)",
            LocalAnswer::MissingSecret => "appsecret missing (wxgate)",
            LocalAnswer::MissingComponentAppid => "component_appid missing (wxgate)",
            LocalAnswer::MissingComponentAccessToken => "missing component_access_token (wxgate)",
            LocalAnswer::MissingCode => "missing code (wxgate)",
            LocalAnswer::InvalidGrantType => {
                "invalid grant_type (wxgate: must be authorization_code)"
            }
            LocalAnswer::ImplausibleAppid => {
                "invalid appid (wxgate: not an appid WeChat issues)"
            }
            LocalAnswer::ImplausibleCode => "invalid code (wxgate: not a code WeChat issues)",
            // Worded like WeChat's, so SDKs that match the text still do.
            LocalAnswer::LocalQuota { .. } => {
                "api minute-quota reach limit, must slower, retry next minute (wxgate: local quota)"
            }
            // Worded like WeChat's, then who answered and until when.
            LocalAnswer::DailyQuota { until } => {
                return Cow::Owned(format!(
                    "reach max api daily quota limit (wxgate: WeChat said this API's daily quota is spent; answered by wxgate without calling WeChat until {})",
                    wechat::beijing_time(until)
                ))
            }
            LocalAnswer::Upstream(error) => {
                return Cow::Owned(format!("system error (wxgate: {error})"))
            }
            LocalAnswer::CallAbandoned => {
                "system error (wxgate: the upstream call ended without an answer)"
            }
            LocalAnswer::ClaimHolderGone => {
                "system error (wxgate: the replica exchanging this code went away, or held it longer than its lease, before it answered; the code may have been spent)"
            }
            LocalAnswer::ClaimUnreachable => {
                "system error (wxgate: another replica is exchanging this code and its answer could not be read)"
            }
            LocalAnswer::ShuttingDown => {
                "system error (wxgate: shutting down; the request was cut off before its answer)"
            }
        })
    }

    /// How the request counts in `wxgate_requests_total`.
    pub fn outcome(self) -> Outcome {
        match self {
            LocalAnswer::LocalQuota { .. } | LocalAnswer::DailyQuota { .. } => Outcome::LocalLimit,
            LocalAnswer::Upstream(_)
            | LocalAnswer::CallAbandoned
            | LocalAnswer::ClaimHolderGone
            | LocalAnswer::ClaimUnreachable => Outcome::UpstreamError,
            _ => Outcome::Rejected,
        }
    }

    /// The WeChat-shaped body: `{"errcode":..,"errmsg":..}`.
    pub fn body(self) -> Bytes {
        wechat::error_body(self.errcode(), &self.errmsg())
    }

    /// The HTTP response: [`LocalAnswer::status`], [`LocalAnswer::body`] as JSON, and
    /// `Retry-After` for a local 45011.
    pub fn response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(JSON_CONTENT_TYPE),
        );
        if let LocalAnswer::LocalQuota { retry_after } = self {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

impl From<QuotaAppidError> for LocalAnswer {
    fn from(error: QuotaAppidError) -> LocalAnswer {
        match error {
            QuotaAppidError::RepeatedParameter(name) => LocalAnswer::RepeatedParameter(name),
            QuotaAppidError::BodyNotJson => LocalAnswer::BodyNotJson,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::CertificateProblem;

    #[test]
    fn every_answer_is_wechat_shaped() {
        let all = [
            LocalAnswer::BadTarget,
            LocalAnswer::BodyTooLarge { limit: 10 },
            LocalAnswer::BodyUnreadable,
            LocalAnswer::BodyNotJson,
            LocalAnswer::RepeatedParameter("appid"),
            LocalAnswer::MissingAppid,
            LocalAnswer::MissingSecret,
            LocalAnswer::MissingComponentAppid,
            LocalAnswer::MissingComponentAccessToken,
            LocalAnswer::MissingCode,
            LocalAnswer::InvalidGrantType,
            LocalAnswer::ImplausibleAppid,
            LocalAnswer::ImplausibleCode,
            LocalAnswer::LocalQuota {
                retry_after: Duration::from_millis(1500),
            },
            LocalAnswer::Upstream(TransportError::Timeout),
            LocalAnswer::Upstream(TransportError::TooLarge),
            LocalAnswer::Upstream(TransportError::ConnectionLimit),
            LocalAnswer::Upstream(TransportError::Certificate(CertificateProblem::WrongHost)),
            LocalAnswer::CallAbandoned,
            LocalAnswer::ClaimHolderGone,
            LocalAnswer::ClaimUnreachable,
            LocalAnswer::BodyTimeout {
                after: Duration::from_millis(250),
            },
            LocalAnswer::ShuttingDown,
            LocalAnswer::DailyQuota {
                until: std::time::UNIX_EPOCH + Duration::from_secs(1_735_747_200),
            },
        ];
        for answer in all {
            let response = answer.response();
            assert_eq!(response.status(), answer.status());
            assert_eq!(response.headers()[header::CONTENT_TYPE], JSON_CONTENT_TYPE);
            let errmsg = answer.errmsg();
            assert!(errmsg.contains("wxgate"), "{errmsg}");
            assert_ne!(answer.errcode(), 0);
        }
        let quota = LocalAnswer::LocalQuota {
            retry_after: Duration::from_millis(1500),
        }
        .response();
        assert_eq!(quota.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            LocalAnswer::Upstream(TransportError::Timeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let daily = LocalAnswer::DailyQuota {
            until: std::time::UNIX_EPOCH + Duration::from_secs(1_735_747_200),
        };
        assert_eq!((daily.status(), daily.errcode()), (StatusCode::OK, 45009));
        assert!(
            daily.errmsg().contains("until 2025-01-02T00:00:00+08:00"),
            "{}",
            daily.errmsg()
        );
        let slow = LocalAnswer::BodyTimeout {
            after: Duration::from_millis(250),
        };
        assert_eq!(
            (slow.status(), slow.errcode()),
            (StatusCode::REQUEST_TIMEOUT, 47001)
        );
        assert!(slow.errmsg().contains("within 250 ms"), "{}", slow.errmsg());
        let cut = LocalAnswer::ShuttingDown;
        assert_eq!(
            (cut.status(), cut.errcode()),
            (StatusCode::SERVICE_UNAVAILABLE, -1)
        );
        assert!(cut.errmsg().contains("shutting down"), "{}", cut.errmsg());
        assert_eq!(
            LocalAnswer::Upstream(TransportError::Certificate(CertificateProblem::WrongHost))
                .errmsg(),
            "system error (wxgate: upstream TLS certificate refused: not valid for the upstream's host name)"
        );
    }
}
