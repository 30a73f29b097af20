//! What the clients saw: each answer classified as wxgate must have counted it ([`Seen`]),
//! from the `X-Wxgate-Cache` header and the body alone, and the counts of the whole load.

use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::StatusCode;

use wxgate_contract::{CacheStatus, Outcome, MINUTE_QUOTA, SYSTEM_BUSY};

/// One answer as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// An answer: how wxgate must have answered it, and what it says.
    Answer {
        outcome: Outcome,
        status: StatusCode,
        errcode: Option<i64>,
    },
    /// No answer from wxgate at all.
    NoAnswer,
}

impl Seen {
    /// wxgate's own answers say `wxgate` in their errmsg; WeChat's never do. Among wxgate's
    /// own, 45011 is a local quota refusal and -1 an upstream failure; the rest are refusals
    /// of the request. WeChat's answers are hits, followers or forwarded by the cache header.
    pub(crate) fn classify(status: StatusCode, cache: Option<&str>, body: &[u8]) -> Seen {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let errcode = json
            .as_ref()
            .and_then(|v| v.get("errcode"))
            .and_then(|v| v.as_i64().or_else(|| v.as_str()?.trim().parse().ok()));
        let own = json
            .as_ref()
            .and_then(|v| v.get("errmsg"))
            .and_then(|v| v.as_str())
            .is_some_and(|errmsg| errmsg.contains("wxgate"));
        let outcome = if own {
            match errcode {
                Some(MINUTE_QUOTA) => Outcome::LocalLimit,
                Some(SYSTEM_BUSY) => Outcome::UpstreamError,
                _ => Outcome::Rejected,
            }
        } else {
            match cache.and_then(CacheStatus::from_header_value) {
                Some(CacheStatus::Hit) => Outcome::CacheHit,
                Some(CacheStatus::Coalesced) => Outcome::Coalesced,
                Some(CacheStatus::Miss) | None => Outcome::Forwarded,
            }
        };
        Seen::Answer {
            outcome,
            status,
            errcode,
        }
    }

    /// Which error a client saw, if any.
    fn error(&self) -> Option<ClientError> {
        let Seen::Answer {
            outcome,
            status,
            errcode,
        } = *self
        else {
            return Some(ClientError::NoAnswer);
        };
        Some(match outcome {
            Outcome::LocalLimit => ClientError::LocalQuota,
            Outcome::UpstreamError => ClientError::UpstreamFailed,
            Outcome::Rejected => ClientError::Refused,
            _ => match errcode {
                None | Some(0) if status == StatusCode::OK => return None,
                Some(MINUTE_QUOTA) => ClientError::WechatQuota,
                Some(40029) => ClientError::InvalidCode,
                Some(40125) => ClientError::WrongSecret,
                Some(40163) => ClientError::CodeUsed,
                Some(SYSTEM_BUSY) => ClientError::Busy,
                _ => ClientError::Other,
            },
        })
    }
}

/// The errors clients were given, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientError {
    LocalQuota,
    UpstreamFailed,
    Refused,
    WechatQuota,
    InvalidCode,
    WrongSecret,
    CodeUsed,
    Busy,
    Other,
    NoAnswer,
}

impl ClientError {
    const ALL: [ClientError; 10] = [
        ClientError::LocalQuota,
        ClientError::UpstreamFailed,
        ClientError::Refused,
        ClientError::WechatQuota,
        ClientError::InvalidCode,
        ClientError::WrongSecret,
        ClientError::CodeUsed,
        ClientError::Busy,
        ClientError::Other,
        ClientError::NoAnswer,
    ];
}

/// The client-side counts, updated by every task of the load.
#[derive(Default)]
pub(crate) struct Tally {
    requests: AtomicU64,
    outcomes: [AtomicU64; Outcome::ALL.len()],
    errors: [AtomicU64; ClientError::ALL.len()],
    wechat_45011_forwarded: AtomicU64,
}

impl Tally {
    pub(crate) fn add(&self, seen: &Seen) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Seen::Answer { outcome, .. } = seen {
            self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(error) = seen.error() {
            if let (ClientError::WechatQuota, Seen::Answer { outcome, .. }) = (error, seen) {
                if *outcome == Outcome::Forwarded {
                    self.wechat_45011_forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
            let index = ClientError::ALL
                .iter()
                .position(|e| *e == error)
                .unwrap_or(ClientError::ALL.len() - 1);
            self.errors[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }

    fn error(&self, error: ClientError) -> u64 {
        let index = ClientError::ALL
            .iter()
            .position(|e| *e == error)
            .unwrap_or(ClientError::ALL.len() - 1);
        self.errors[index].load(Ordering::Relaxed)
    }

    pub(crate) fn counts(&self) -> ClientCounts {
        ClientCounts {
            requests: self.requests.load(Ordering::Relaxed),
            forwarded: self.outcome(Outcome::Forwarded),
            cache_hit: self.outcome(Outcome::CacheHit),
            coalesced: self.outcome(Outcome::Coalesced),
            local_limit: self.outcome(Outcome::LocalLimit),
            rejected: self.outcome(Outcome::Rejected),
            upstream_error: self.outcome(Outcome::UpstreamError),
            no_answer: self.error(ClientError::NoAnswer),
            wechat_45011: self.error(ClientError::WechatQuota),
            wechat_45011_forwarded: self.wechat_45011_forwarded.load(Ordering::Relaxed),
            invalid_code: self.error(ClientError::InvalidCode),
            wrong_secret: self.error(ClientError::WrongSecret),
            code_used: self.error(ClientError::CodeUsed),
            busy: self.error(ClientError::Busy),
            other_errors: self.error(ClientError::Other),
        }
    }
}

/// What the clients of the load counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCounts {
    /// Requests sent to wxgate.
    pub requests: u64,
    /// Answered by WeChat through wxgate (`X-Wxgate-Cache: miss`, or no header).
    pub forwarded: u64,
    /// `X-Wxgate-Cache: hit`.
    pub cache_hit: u64,
    /// `X-Wxgate-Cache: coalesced`, with WeChat's answer.
    pub coalesced: u64,
    /// wxgate's own 45011.
    pub local_limit: u64,
    /// wxgate's own refusal of the request.
    pub rejected: u64,
    /// wxgate's 502/504: WeChat gave no answer.
    pub upstream_error: u64,
    /// No answer from wxgate at all (should be 0).
    pub no_answer: u64,
    /// WeChat's 45011 passed on (held as long as allowed).
    pub wechat_45011: u64,
    /// Of those, answers to the request that made the call (not to followers).
    pub wechat_45011_forwarded: u64,
    /// 40029 invalid code, first answers and replays.
    pub invalid_code: u64,
    /// 40125 invalid app secret.
    pub wrong_secret: u64,
    /// 40163 code been used: a code burnt by a repeat (wxgate should prevent every one).
    pub code_used: u64,
    /// -1 passed on after wxgate's retries.
    pub busy: u64,
    /// Any other error answer.
    pub other_errors: u64,
}

impl ClientCounts {
    /// The count of one outcome, as the clients classified their answers.
    pub(crate) fn outcome(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Forwarded => self.forwarded,
            Outcome::CacheHit => self.cache_hit,
            Outcome::Coalesced => self.coalesced,
            Outcome::LocalLimit => self.local_limit,
            Outcome::Rejected => self.rejected,
            Outcome::UpstreamError => self.upstream_error,
        }
    }

    /// Every error answer (and missing answer) clients got.
    pub fn errors(&self) -> u64 {
        self.local_limit
            + self.rejected
            + self.upstream_error
            + self.no_answer
            + self.wechat_45011
            + self.invalid_code
            + self.wrong_secret
            + self.code_used
            + self.busy
            + self.other_errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_wxgate_counts_them() {
        let ok = StatusCode::OK;
        let session = br#"{"session_key":"k","openid":"o"}"#;
        let seen = |status, cache, body: &[u8]| match Seen::classify(status, cache, body) {
            Seen::Answer { outcome, .. } => Some(outcome),
            Seen::NoAnswer => None,
        };
        assert_eq!(seen(ok, Some("miss"), session), Some(Outcome::Forwarded));
        assert_eq!(seen(ok, None, session), Some(Outcome::Forwarded));
        assert_eq!(seen(ok, Some("hit"), session), Some(Outcome::CacheHit));
        assert_eq!(
            seen(ok, Some("coalesced"), session),
            Some(Outcome::Coalesced)
        );
        // wxgate's own answers, byte for byte as it writes them.
        let local_quota = br#"{"errcode":45011,"errmsg":"api minute-quota reach limit, must slower, retry next minute (wxgate: local quota)"}"#;
        assert_eq!(
            seen(ok, Some("coalesced"), local_quota),
            Some(Outcome::LocalLimit)
        );
        let failed = br#"{"errcode":-1,"errmsg":"system error (wxgate: upstream timed out)"}"#;
        assert_eq!(
            seen(StatusCode::GATEWAY_TIMEOUT, Some("miss"), failed),
            Some(Outcome::UpstreamError)
        );
        let refused = br#"{"errcode":41008,"errmsg":"missing code (wxgate)"}"#;
        assert_eq!(seen(ok, None, refused), Some(Outcome::Rejected));
        let wechat_quota = br#"{"errcode":45011,"errmsg":"api minute-quota reach limit rid: x"}"#;
        let answer = Seen::classify(ok, Some("miss"), wechat_quota);
        assert_eq!(answer.error(), Some(ClientError::WechatQuota));
        assert_eq!(
            Seen::classify(
                ok,
                Some("hit"),
                br#"{"errcode":"40029","errmsg":"invalid code"}"#
            )
            .error(),
            Some(ClientError::InvalidCode)
        );
        assert_eq!(Seen::classify(ok, Some("miss"), session).error(), None);
        assert_eq!(Seen::NoAnswer.error(), Some(ClientError::NoAnswer));
    }
}
