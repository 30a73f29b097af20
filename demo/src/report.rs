//! [`DemoReport`]: what the demo counted, from the clients, from wxgate's `/metrics` and from
//! the stand-in; whether the three agree and the identity holds; and the table it prints.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use wxgate_stand_in::JSCODE2SESSION_PATH;

use crate::client::ClientCounts;
use crate::metrics::MetricsCounts;
use crate::tokens::{TokenCounts, TOKEN_BACKENDS};
use wxgate_contract::{Outcome, RetryReason};

/// What the demo counted, from the clients, from wxgate's `/metrics` and from the stand-in.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// `--seconds`.
    pub requested: Duration,
    /// From the first request to the last answer (held requests answered after the load).
    pub load_time: Duration,
    /// The load was stopped early by a signal.
    pub interrupted: bool,
    /// The quota window.
    pub window: Duration,
    /// The stand-in's quota per window and (appid, API).
    pub upstream_quota: u32,
    /// wxgate's per_window for `/sns/jscode2session`.
    pub exchange_per_window: u32,
    /// wxgate's `max_wait_ms`.
    pub max_wait: Duration,
    /// wxgate's proxy address.
    pub proxy: SocketAddr,
    /// wxgate's admin address.
    pub admin: SocketAddr,
    /// What the clients counted.
    pub client: ClientCounts,
    /// What the token backends counted.
    pub tokens: TokenCounts,
    /// Token fetches that reached the stand-in (and succeeded).
    pub token_fetches_upstream: u64,
    /// wxgate's `/metrics` after the load.
    pub metrics: MetricsCounts,
    /// That `/metrics` text, as scraped.
    pub metrics_text: String,
    /// Calls the stand-in received.
    pub upstream_calls: u64,
    /// The limits in force at the end, from `GET /quota`.
    pub limits: Vec<LimitShown>,
}

/// One key's limit as wxgate's `GET /quota` showed it.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitShown {
    /// The API's path.
    pub api: String,
    /// Calls per window.
    pub limit: u32,
    /// The window, in seconds.
    pub window_secs: f64,
    /// `config`, `wechat`, `learned` or `default`.
    pub source: String,
}

impl LimitShown {
    /// Where the limit comes from, in words.
    fn source_in_words(&self) -> &'static str {
        match self.source.as_str() {
            "wechat" => "stated by WeChat (asked with quota/get)",
            "learned" => "learned from WeChat's 45011",
            "config" => "configured for this key",
            _ => "the configured default",
        }
    }
}

impl DemoReport {
    /// Requests answered without an upstream call of their own: cache hits and followers.
    pub fn saved(&self) -> u64 {
        self.metrics.outcome(Outcome::CacheHit) + self.metrics.outcome(Outcome::Coalesced)
    }

    /// Requests wxgate answered itself: local 45011s and refusals.
    pub fn answered_locally(&self) -> u64 {
        self.metrics.outcome(Outcome::LocalLimit) + self.metrics.outcome(Outcome::Rejected)
    }

    /// Requests whose call reached WeChat: forwarded answers and upstream failures.
    pub fn reached_upstream(&self) -> u64 {
        self.metrics.outcome(Outcome::Forwarded) + self.metrics.outcome(Outcome::UpstreamError)
    }

    /// Retries that reached WeChat.
    pub fn retries_sent(&self) -> u64 {
        self.metrics.all_retries()
    }

    /// WeChat's 45011 answers that no client saw: held, and sent again in a later window.
    pub fn absorbed_45011(&self) -> u64 {
        self.metrics.retries(RetryReason::MinuteQuota)
    }

    /// The left side of the identity: upstream calls − retries − token refreshes − limit
    /// queries + saved + answered locally.
    pub fn accounted(&self) -> i128 {
        i128::from(self.upstream_calls)
            - i128::from(self.retries_sent())
            - i128::from(self.metrics.token_refreshes)
            - i128::from(self.metrics.limit_queries)
            + i128::from(self.saved())
            + i128::from(self.answered_locally())
    }

    /// Whether upstream calls − retries − token refreshes − limit queries + saved + answered
    /// by wxgate = client requests.
    pub fn adds_up(&self) -> bool {
        self.accounted() == i128::from(self.client.requests)
    }

    /// Where the clients' counts, the stand-in's and wxgate's `/metrics` differ; empty when
    /// they agree.
    pub fn disagreements(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.client.requests != self.metrics.client_requests() {
            problems.push(format!(
                "client requests: clients counted {}, /metrics {}",
                self.client.requests,
                self.metrics.client_requests()
            ));
        }
        for outcome in Outcome::ALL {
            let (seen, counted) = (self.client.outcome(outcome), self.metrics.outcome(outcome));
            if seen != counted {
                problems.push(format!(
                    "outcome {}: clients saw {seen}, /metrics {counted}",
                    outcome.label()
                ));
            }
        }
        if self.upstream_calls != self.metrics.upstream_calls() {
            problems.push(format!(
                "upstream calls: the stand-in received {}, /metrics {}",
                self.upstream_calls,
                self.metrics.upstream_calls()
            ));
        }
        if self.client.no_answer > 0 {
            problems.push(format!(
                "{} requests got no answer from wxgate",
                self.client.no_answer
            ));
        }
        problems
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.metrics;
        let c = &self.client;
        let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        let ended = if self.interrupted {
            format!("stopped early after {}", secs(self.load_time))
        } else if self.load_time > self.requested + Duration::from_millis(100) {
            format!(
                "{} of load (the last held requests answered at {})",
                secs(self.requested),
                secs(self.load_time)
            )
        } else {
            format!("{} of load", secs(self.load_time))
        };
        writeln!(f, "wxgate demo: {ended}")?;
        writeln!(
            f,
            "WeChat's quota (the stand-in): {} calls per {} window; wxgate allows {} on {JSCODE2SESSION_PATH}",
            self.upstream_quota,
            secs(self.window),
            self.exchange_per_window,
        )?;
        writeln!(f)?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, value: u64, note: &str| {
            writeln!(f, "  {name:<32}{value:>7}  {note}")
        };
        row(
            f,
            "client requests",
            c.requests,
            &format!("/metrics: {}", m.client_requests()),
        )?;
        row(
            f,
            "  reached WeChat",
            self.reached_upstream(),
            "one upstream call each, plus any retries",
        )?;
        row(
            f,
            "  saved by coalescing",
            m.outcome(Outcome::Coalesced),
            "joined an identical exchange in flight (double submits)",
        )?;
        row(
            f,
            "  saved by the cache",
            m.outcome(Outcome::CacheHit),
            "a repeated code got its remembered answer (SDK retries)",
        )?;
        row(
            f,
            "  answered by wxgate itself",
            self.answered_locally(),
            &format!(
                "{} local 45011 (no quota turn within {}), {} refused (bad parameters)",
                m.outcome(Outcome::LocalLimit),
                secs(self.max_wait),
                m.outcome(Outcome::Rejected)
            ),
        )?;
        row(
            f,
            "upstream calls",
            self.upstream_calls,
            &format!(
                "received by the stand-in; /metrics: {} answered + {} without answer",
                m.upstream_answers,
                m.transport_errors - m.connect_errors.min(m.transport_errors)
            ),
        )?;
        row(
            f,
            "  retries",
            self.retries_sent(),
            &format!(
                "{} after WeChat's 45011, {} after -1 system busy, {} after a failed connect",
                self.absorbed_45011(),
                m.retries(RetryReason::SystemBusy),
                m.retries(RetryReason::Transport)
            ),
        )?;
        let within = m
            .quota_wait_within
            .map_or(String::new(), |le| format!(", each within {le} s"));
        let mean_ms = if m.quota_waits > 0 {
            m.quota_wait_seconds * 1000.0 / m.quota_waits as f64
        } else {
            0.0
        };
        row(
            f,
            "waited for a quota turn",
            m.quota_waits,
            &format!(
                "calls, {:.1} s in all, {mean_ms:.0} ms on average{within}",
                m.quota_wait_seconds
            ),
        )?;
        row(
            f,
            "WeChat 45011 absorbed",
            self.absorbed_45011(),
            &format!(
                "held to WeChat's next window and sent again ({} received, {} passed on)",
                m.upstream_45011, c.wechat_45011
            ),
        )?;
        let mut kinds = Vec::new();
        for (count, what) in [
            (c.local_limit, "local 45011"),
            (c.wechat_45011, "WeChat 45011"),
            (c.invalid_code, "invalid code (40029)"),
            (c.wrong_secret, "wrong secret (40125)"),
            (c.code_used, "code used (40163)"),
            (c.busy, "system busy (-1)"),
            (c.upstream_error, "no answer from WeChat (502)"),
            (c.rejected, "refused by wxgate"),
            (c.other_errors, "other"),
            (c.no_answer, "no answer from wxgate"),
        ] {
            if count > 0 {
                kinds.push(format!("{count} {what}"));
            }
        }
        row(
            f,
            "errors surfaced to clients",
            c.errors(),
            &kinds.join(", "),
        )?;
        row(
            f,
            "codes burnt by a repeat (40163)",
            c.code_used,
            "every repeat of a code got the first answer instead",
        )?;
        let t = &self.tokens;
        row(
            f,
            "access-token fetches",
            t.fetches,
            &format!(
                "by {TOKEN_BACKENDS} backends, each with its own cache; {} reached WeChat \
                 ({} of them refreshes ahead of expiry)",
                self.token_fetches_upstream, m.token_refreshes
            ),
        )?;
        row(
            f,
            "  API calls with those tokens",
            t.calls,
            &format!(
                "{} refused as stale (40001): without wxgate every fetch would retire the others' token",
                t.refused
            ),
        )?;
        if !self.limits.is_empty() {
            writeln!(f)?;
            writeln!(f, "Limits in force (GET /quota):")?;
            for limit in &self.limits {
                writeln!(
                    f,
                    "  {:<40}{:>5} per {} s  {}",
                    limit.api,
                    limit.limit,
                    limit.window_secs,
                    limit.source_in_words()
                )?;
            }
        }
        writeln!(f)?;

        // The identity, each number under its name.
        let terms: [(&str, &str, i128); 8] = [
            ("", "upstream calls", i128::from(self.upstream_calls)),
            (" − ", "retries", i128::from(self.retries_sent())),
            (" − ", "refreshes", i128::from(m.token_refreshes)),
            (" − ", "limit queries", i128::from(m.limit_queries)),
            (
                " + ",
                "coalesced",
                i128::from(m.outcome(Outcome::Coalesced)),
            ),
            (
                " + ",
                "cache hits",
                i128::from(m.outcome(Outcome::CacheHit)),
            ),
            (
                " + ",
                "answered by wxgate",
                i128::from(self.answered_locally()),
            ),
            (" = ", "client requests", i128::from(c.requests)),
        ];
        let (mut names, mut numbers) = (String::from("  "), String::from("  "));
        for (op, name, value) in terms {
            names.push_str(&format!("{op}{name}"));
            numbers.push_str(&format!("{op}{value:>width$}", width = name.len()));
        }
        writeln!(f, "{names}")?;
        if self.adds_up() {
            writeln!(f, "{numbers}   ✓ the numbers add up")?;
        } else {
            writeln!(
                f,
                "{numbers}   ✗ the numbers do NOT add up: the left side makes {}",
                self.accounted()
            )?;
        }
        let disagreements = self.disagreements();
        if disagreements.is_empty() {
            writeln!(
                f,
                "  ✓ the clients' counts, the stand-in's and wxgate's /metrics agree on every outcome"
            )?;
        } else {
            writeln!(f, "  ✗ the counts disagree:")?;
            for problem in disagreements {
                writeln!(f, "    - {problem}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::MAX_WAIT;

    fn report(upstream_calls: u64, client: ClientCounts, metrics: MetricsCounts) -> DemoReport {
        DemoReport {
            requested: Duration::from_secs(1),
            load_time: Duration::from_secs(1),
            interrupted: false,
            window: Duration::from_secs(5),
            upstream_quota: 40,
            exchange_per_window: 50,
            max_wait: MAX_WAIT,
            proxy: SocketAddr::from(([127, 0, 0, 1], 1)),
            admin: SocketAddr::from(([127, 0, 0, 1], 2)),
            client,
            tokens: TokenCounts::default(),
            token_fetches_upstream: 0,
            metrics,
            metrics_text: String::new(),
            upstream_calls,
            limits: Vec::new(),
        }
    }

    /// Three requests reach WeChat: one is answered at once; one gets 45011, is held and
    /// sent again; one gets 45011, is held, and its hold runs out (no retry sent: WeChat's
    /// 45011 is passed on). One more is a cache hit.
    #[test]
    fn a_hold_that_ran_out_sends_no_retry_and_the_numbers_add_up() {
        let mut requests = [0; Outcome::ALL.len()];
        requests[Outcome::Forwarded.index()] = 3;
        requests[Outcome::CacheHit.index()] = 1;
        let mut retries = [0; RetryReason::ALL.len()];
        retries[0] = 1; // minute_quota: the one sent
        let metrics = MetricsCounts {
            requests,
            upstream_answers: 4,
            upstream_45011: 2,
            retries,
            ..MetricsCounts::default()
        };
        let client = ClientCounts {
            requests: 4,
            forwarded: 3,
            cache_hit: 1,
            wechat_45011: 1,
            wechat_45011_forwarded: 1,
            ..ClientCounts::default()
        };
        // Calls: 1 + (1 + 1) + 1 = 4 at the stand-in.
        let report = report(4, client, metrics);
        assert_eq!(report.retries_sent(), 1);
        assert_eq!(report.absorbed_45011(), 1);
        assert!(report.adds_up(), "{report}");
        assert!(report.disagreements().is_empty(), "{report}");
        let table = report.to_string();
        assert!(table.contains("the numbers add up"), "{table}");

        // The same, with one call the stand-in never counted: the check says so.
        let short = self::report(3, client, metrics);
        assert!(!short.adds_up());
        assert!(short.to_string().contains("do NOT add up"), "{short}");
        assert!(!short.disagreements().is_empty());
    }
}
