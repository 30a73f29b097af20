//! What wxgate promises the outside world, spelled once: the response header that tells how a
//! code exchange (or a token fetch) was answered and its values, the label values of its
//! request and retry metrics, and the errcodes of its own answers (README, "Metrics" and
//! "Answers wxgate gives itself").
//!
//! wxgate writes these; the demo, which must not link wxgate (wxgate's binary runs it), reads
//! them. A crate of its own so that neither spells them again.

/// The response header by which wxgate says how a code exchange or a token fetch was
/// answered: `miss`, `coalesced` or `hit`.
pub const CACHE_HEADER: &str = "x-wxgate-cache";

/// How a code exchange or a token fetch was answered: from memory, by joining an identical
/// call in flight, or by a call of its own. Written in the [`CACHE_HEADER`] of every answer
/// of the code cache and the token cache ([`CacheStatus::header_value`]), and, for a look-up
/// of the code cache, the `result` label of `wxgate_code_cache_lookups_total`
/// ([`CacheStatus::lookup_label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Nothing remembered or in flight: this request made the call (or, in Redis, claimed it).
    Miss,
    /// This request waited for an identical call in flight, here or on another replica.
    Coalesced,
    /// This request got a remembered answer (or a cached token).
    Hit,
}

impl CacheStatus {
    /// Every value, in wxgate's label order.
    pub const ALL: [CacheStatus; 3] = [CacheStatus::Miss, CacheStatus::Coalesced, CacheStatus::Hit];

    /// The value of the [`CACHE_HEADER`]: `miss`, `coalesced` or `hit`.
    pub fn header_value(self) -> &'static str {
        match self {
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Hit => "hit",
        }
    }

    /// The status a [`CACHE_HEADER`] value says, if it is one.
    pub fn from_header_value(value: &str) -> Option<CacheStatus> {
        CacheStatus::ALL
            .into_iter()
            .find(|status| status.header_value() == value)
    }

    /// The `result` label of `wxgate_code_cache_lookups_total`: `miss`, `joined` or `hit`.
    /// The metric says `joined` where the header says `coalesced` (its name since it was
    /// first published: dashboards and alerts read it).
    pub fn lookup_label(self) -> &'static str {
        match self {
            CacheStatus::Coalesced => "joined",
            status => status.header_value(),
        }
    }

    /// Position in [`CacheStatus::ALL`], for per-status arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `45011`: minute quota reached; in an answer of wxgate's own, no quota turn in time.
pub const MINUTE_QUOTA: i64 = 45011;

/// `-1`: system busy; in an answer of wxgate's own, WeChat gave no answer.
pub const SYSTEM_BUSY: i64 = -1;

/// How wxgate answered a client request: the `outcome` label of `wxgate_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// WeChat answered (any status, any errcode).
    Forwarded,
    /// A remembered code-exchange answer was replayed.
    CacheHit,
    /// The request waited for an identical exchange in flight and got its answer.
    Coalesced,
    /// wxgate answered 45011 itself: the request could not get its quota turn in time.
    LocalLimit,
    /// wxgate refused the request itself (bad parameters, oversize body, unroutable target).
    Rejected,
    /// WeChat gave no answer: wxgate answered 502 or 504.
    UpstreamError,
}

impl Outcome {
    /// Every value, in wxgate's label order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::CacheHit,
        Outcome::Coalesced,
        Outcome::LocalLimit,
        Outcome::Rejected,
        Outcome::UpstreamError,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::CacheHit => "cache_hit",
            Outcome::Coalesced => "coalesced",
            Outcome::LocalLimit => "local_limit",
            Outcome::Rejected => "rejected",
            Outcome::UpstreamError => "upstream_error",
        }
    }

    /// Position in [`Outcome::ALL`], for per-outcome arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why wxgate sent an upstream call again: the `reason` label of `wxgate_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// WeChat answered 45011; the call was held to the next window.
    MinuteQuota,
    /// WeChat answered -1.
    SystemBusy,
    /// The connection could not be opened (nothing was sent), or a kept-alive one closed under
    /// an idempotent call before any answer (sent again once, on a new connection).
    Transport,
}

impl RetryReason {
    /// Every value, in wxgate's label order.
    pub const ALL: [RetryReason; 3] = [
        RetryReason::MinuteQuota,
        RetryReason::SystemBusy,
        RetryReason::Transport,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::MinuteQuota => "minute_quota",
            RetryReason::SystemBusy => "system_busy",
            RetryReason::Transport => "transport",
        }
    }

    /// Position in [`RetryReason::ALL`], for per-reason arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How wxgate's token cache answered a token request: the `outcome` label of
/// `wxgate_token_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOutcome {
    /// From the cache.
    Hit,
    /// From an upstream fetch this request made or waited for (nothing usable was cached).
    Fetched,
    /// From the cache, and this request started the refresh ahead of expiry: one upstream
    /// fetch that no client request made.
    Refreshed,
    /// Another secret than the cached token's: its own upstream call and WeChat's answer.
    Rejected,
}

impl TokenOutcome {
    /// Every value, in wxgate's label order.
    pub const ALL: [TokenOutcome; 4] = [
        TokenOutcome::Hit,
        TokenOutcome::Fetched,
        TokenOutcome::Refreshed,
        TokenOutcome::Rejected,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            TokenOutcome::Hit => "hit",
            TokenOutcome::Fetched => "fetched",
            TokenOutcome::Refreshed => "refreshed",
            TokenOutcome::Rejected => "rejected",
        }
    }

    /// Position in [`TokenOutcome::ALL`], for per-outcome arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where the minute limit in force for an (appid, API) came from: the `source` label of
/// `wxgate_quota_keys_by_source`, and the `source` of `GET /quota`. In this order, the first
/// that has a figure for a key gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitSource {
    /// `quota.appids` or `quota.apis` names the key.
    Config,
    /// WeChat stated it (quota/get's `rate_limit`, or `component_rate_limit` for calls a
    /// platform makes on an account's behalf).
    Wechat,
    /// Learned from WeChat's 45011 where it states nothing.
    Learned,
    /// `quota.per_window`.
    Default,
}

impl LimitSource {
    /// Every value, in wxgate's label order.
    pub const ALL: [LimitSource; 4] = [
        LimitSource::Config,
        LimitSource::Wechat,
        LimitSource::Learned,
        LimitSource::Default,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            LimitSource::Config => "config",
            LimitSource::Wechat => "wechat",
            LimitSource::Learned => "learned",
            LimitSource::Default => "default",
        }
    }

    /// Position in [`LimitSource::ALL`], for per-source arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_statuses_read_back_from_their_header_values() {
        for status in CacheStatus::ALL {
            assert_eq!(
                CacheStatus::from_header_value(status.header_value()),
                Some(status)
            );
            assert_eq!(CacheStatus::ALL[status.index()], status);
        }
        assert_eq!(CacheStatus::from_header_value("joined"), None);
        assert_eq!(CacheStatus::Coalesced.lookup_label(), "joined");
    }
}
