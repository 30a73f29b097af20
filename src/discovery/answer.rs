//! quota/get's answer, read: the figures WeChat states for one API of one appid, or why
//! there are none. A pure function of the answer, tested without a socket.

use std::time::Duration;

use serde::Deserialize;

use crate::answer::{LocalAnswer, WechatAnswer};
use crate::wechat::{Errcode, LenientNumber};

/// The largest limit believed (the configuration's own range): WeChat writes "no limit" as a
/// very large figure.
const LARGEST_LIMIT: u64 = 100_000_000;

/// What WeChat stated for one API of one appid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stated {
    /// The account's own calls: `call_count` per window.
    pub rate: Option<Rate>,
    /// Calls a platform makes on the account's behalf.
    pub component_rate: Option<Rate>,
    /// Today's quota.
    pub daily: Option<Daily>,
}

/// `call_count` calls per `refresh_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Calls per window (at most [`LARGEST_LIMIT`]).
    pub per_window: u32,
    /// The window.
    pub window: Duration,
}

/// `quota {daily_limit, used, remain}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Daily {
    /// Calls a day.
    pub limit: u64,
    /// Calls today (WeChat's count lags about 1 %).
    pub used: u64,
    /// What is left today.
    pub remain: u64,
}

impl Daily {
    /// The share of the day's quota used, 0 to 1.
    pub fn used_share(&self) -> f64 {
        if self.limit == 0 {
            return 1.0;
        }
        (self.used as f64 / self.limit as f64).min(1.0)
    }
}

/// Why quota/get stated nothing: the `result` label of
/// `wxgate_quota_discovery_queries_total` (with `ok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstated {
    /// 76021: WeChat does not know this API.
    UnknownApi,
    /// 76022: this API cannot be asked about.
    NotQueryable,
    /// 40001, 40014, 42001, 41001: the token was refused.
    Token,
    /// Another errcode (-1, 45011, 45009…), or an answer that is not quota/get's.
    Other,
    /// Sent, and no answer from WeChat.
    NoAnswer,
    /// Not sent: no quota turn in time for quota/get itself, or its daily quota is spent.
    NotSent,
}

impl Unstated {
    /// Every value, in label order.
    pub const ALL: [Unstated; 6] = [
        Unstated::UnknownApi,
        Unstated::NotQueryable,
        Unstated::Token,
        Unstated::Other,
        Unstated::NoAnswer,
        Unstated::NotSent,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Unstated::UnknownApi => "unknown_api",
            Unstated::NotQueryable => "not_queryable",
            Unstated::Token => "token",
            Unstated::Other => "other",
            Unstated::NoAnswer => "no_answer",
            Unstated::NotSent => "not_sent",
        }
    }
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    quota: Option<DailyBody>,
    #[serde(default)]
    rate_limit: Option<RateBody>,
    #[serde(default)]
    component_rate_limit: Option<RateBody>,
}

#[derive(Deserialize)]
struct DailyBody {
    daily_limit: LenientNumber,
    used: LenientNumber,
    remain: LenientNumber,
}

#[derive(Deserialize)]
struct RateBody {
    call_count: LenientNumber,
    refresh_second: LenientNumber,
}

/// Reads what a call of quota/get came to.
pub fn read(result: &Result<WechatAnswer, LocalAnswer>) -> Result<Stated, Unstated> {
    let answer = result.as_ref().map_err(|local| match local {
        LocalAnswer::Upstream(_) => Unstated::NoAnswer,
        _ => Unstated::NotSent,
    })?;
    match answer.errcode {
        Errcode::Success | Errcode::Unexpected => {}
        Errcode::Code(76021) => return Err(Unstated::UnknownApi),
        Errcode::Code(76022) => return Err(Unstated::NotQueryable),
        Errcode::Code(40001 | 40014 | 42001 | 41001) => return Err(Unstated::Token),
        Errcode::Code(_) | Errcode::NotJson => return Err(Unstated::Other),
    }
    read_body(&answer.response.body)
}

/// Reads a successful answer's body.
fn read_body(body: &[u8]) -> Result<Stated, Unstated> {
    let body: Body = serde_json::from_slice(body).map_err(|_| Unstated::Other)?;
    let stated = Stated {
        rate: body.rate_limit.and_then(rate),
        component_rate: body.component_rate_limit.and_then(rate),
        daily: body.quota.and_then(|daily| {
            let number = |n: LenientNumber| n.value().and_then(|n| u64::try_from(n).ok());
            Some(Daily {
                limit: number(daily.daily_limit)?,
                used: number(daily.used)?,
                remain: number(daily.remain)?,
            })
        }),
    };
    if stated.rate.is_none() && stated.component_rate.is_none() && stated.daily.is_none() {
        return Err(Unstated::Other);
    }
    Ok(stated)
}

/// A rate limit as wxgate can keep it: at least one call per window of 1 s to a day.
fn rate(body: RateBody) -> Option<Rate> {
    let calls = u64::try_from(body.call_count.value()?).ok()?;
    let secs = u64::try_from(body.refresh_second.value()?).ok()?;
    if calls == 0 || !(1..=86_400).contains(&secs) {
        return None;
    }
    Some(Rate {
        per_window: calls.min(LARGEST_LIMIT) as u32,
        window: Duration::from_secs(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_get_answer_reads_as_its_figures() {
        let body =
            br#"{"errcode":0,"errmsg":"ok","quota":{"daily_limit":1000,"used":900,"remain":100},
            "rate_limit":{"call_count":20,"refresh_second":3},
            "component_rate_limit":{"call_count":"10","refresh_second":60}}"#;
        let stated = read_body(body).unwrap();
        assert_eq!(
            stated.rate,
            Some(Rate {
                per_window: 20,
                window: Duration::from_secs(3)
            })
        );
        assert_eq!(stated.component_rate.unwrap().per_window, 10);
        let daily = stated.daily.unwrap();
        assert_eq!((daily.limit, daily.used, daily.remain), (1000, 900, 100));
        assert!((daily.used_share() - 0.9).abs() < 1e-9);
        // "No limit" is a huge figure: kept within the configuration's range.
        let huge = br#"{"rate_limit":{"call_count":4294967295,"refresh_second":60}}"#;
        assert_eq!(
            read_body(huge).unwrap().rate.unwrap().per_window,
            100_000_000
        );
        // Nothing usable: not a statement.
        for bad in [
            &br#"{"rate_limit":{"call_count":0,"refresh_second":60}}"#[..],
            br#"{"rate_limit":{"call_count":5,"refresh_second":0}}"#,
            br#"{}"#,
            b"not json",
        ] {
            assert_eq!(read_body(bad), Err(Unstated::Other));
        }
    }
}
