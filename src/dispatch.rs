//! One logical upstream call: wait for the quota turn, send, hold across 45011, retry -1.
//!
//! Every attempt, first or retry, takes its own quota token, so the bound of [`crate::quota`]
//! covers retries. A 45011 from WeChat means the call was not executed, so sending it again
//! is safe for any method; the key is paused until WeChat's next window and the call is
//! sent again then, for as long as `retry.max_hold_ms` allows. A `-1` is retried with
//! exponential backoff and jitter up to `retry.busy_attempts` times, and so is a connection
//! that could not be opened (nothing was sent). A timeout or a reset is never retried: the
//! call may have been executed (a code exchange may have spent its code).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::Api;
use crate::config::RetryConfig;
use crate::metrics::{Metrics, RetryReason};
use crate::quota::{next_window_start, QuotaGate, QuotaKey};
use crate::upstream::{TransportError, UpstreamClient, UpstreamRequest, UpstreamResponse};
use crate::wechat::{Errcode, MINUTE_QUOTA, SYSTEM_BUSY};

/// The first backoff after a `-1`; doubled for every further attempt, with ±50 % jitter.
const BUSY_BACKOFF: Duration = Duration::from_millis(200);

/// How a logical call ended.
#[derive(Debug, Clone)]
pub enum CallOutcome {
    /// WeChat answered (the last answer, when there were retries).
    Answered(UpstreamResponse, Errcode),
    /// The quota turn did not come before the caller's deadline; nothing was sent.
    LocalLimit {
        /// The `Retry-After` to give the client.
        retry_after: Duration,
    },
    /// WeChat gave no answer.
    Failed(TransportError),
    /// Everybody waiting for the call went away before it was sent; nothing was sent.
    Abandoned,
}

/// What one call is.
#[derive(Debug, Clone)]
pub struct Call {
    /// For metrics and for the quota key.
    pub api: Api,
    /// The quota this call spends, when its appid is known.
    pub quota_key: Option<QuotaKey>,
    /// What to send.
    pub request: UpstreamRequest,
    /// How long the call may wait for its first quota turn.
    pub max_wait: Duration,
}

/// Sends calls upstream under quota and retry policy.
pub struct Dispatcher {
    upstream: UpstreamClient,
    quota: QuotaGate,
    retry: RetryConfig,
    metrics: Metrics,
}

impl Dispatcher {
    /// A dispatcher over `upstream`, `quota` and `[retry]`.
    pub fn new(
        upstream: UpstreamClient,
        quota: QuotaGate,
        retry: RetryConfig,
        metrics: Metrics,
    ) -> Dispatcher {
        Dispatcher {
            upstream,
            quota,
            retry,
            metrics,
        }
    }

    /// The quota gate (for housekeeping and gauges).
    pub fn quota(&self) -> &QuotaGate {
        &self.quota
    }

    /// The upstream client (for housekeeping).
    pub fn upstream(&self) -> &UpstreamClient {
        &self.upstream
    }

    /// Runs `call` to its end. `gone` is asked, while the call waits for quota, for a future
    /// that completes when nobody wants the answer any more; the call is then dropped before
    /// anything is sent. Pass `std::future::pending` when the caller's own cancellation
    /// suffices.
    pub async fn call<G, F>(&self, call: &Call, mut gone: G) -> CallOutcome
    where
        G: FnMut() -> F,
        F: Future<Output = ()>,
    {
        let started = Instant::now();
        let hold_deadline = started + self.retry.max_hold;
        let mut quota_deadline = started + call.max_wait;
        let mut busy_retries = 0;
        // What the client gets if a retry finds no quota turn in time: WeChat's last answer
        // (the 45011 held as long as allowed, or the -1), or the last failure.
        let mut last: Option<CallOutcome> = None;
        // Counted when the retry is sent: a hold that runs out sends nothing.
        let mut retrying: Option<RetryReason> = None;
        // When the first attempt goes out at once, it is sent at `started` (one clock read less).
        let mut sent_at_start = true;
        loop {
            if let Some(key) = &call.quota_key {
                let turn = tokio::select! {
                    // The turn first: usually it is there at once, and `gone` is not needed.
                    biased;
                    turn = self.quota.acquire(key, quota_deadline) => turn,
                    () = gone() => return CallOutcome::Abandoned,
                };
                match turn {
                    Ok(waited) if waited > Duration::ZERO => {
                        sent_at_start = false;
                        self.metrics.quota_wait(call.api, waited.as_secs_f64())
                    }
                    Ok(_) => {}
                    Err(refused) => {
                        return last.unwrap_or(CallOutcome::LocalLimit {
                            retry_after: refused.retry_after,
                        });
                    }
                }
            }

            if let Some(reason) = retrying.take() {
                self.metrics.retry(call.api, reason);
            }
            let sent = if std::mem::take(&mut sent_at_start) {
                started
            } else {
                Instant::now()
            };
            let result = self.upstream.send(&call.request).await;
            let seconds = sent.elapsed().as_secs_f64();
            retrying = Some(match result {
                Ok(response) => {
                    let errcode = Errcode::of(&response.body);
                    self.metrics.upstream_answer(call.api, errcode, seconds);
                    match errcode {
                        Errcode::Code(MINUTE_QUOTA) => {
                            let next = Instant::now()
                                + next_window_start(self.quota.window())
                                + window_jitter(self.quota.window());
                            if next > hold_deadline {
                                return CallOutcome::Answered(response, errcode);
                            }
                            if let Some(key) = &call.quota_key {
                                self.quota.pause(key, next);
                            } else {
                                tokio::time::sleep_until(next).await;
                            }
                            // The held call may wait for its turn until the hold ends.
                            quota_deadline = hold_deadline;
                            last = Some(CallOutcome::Answered(response, errcode));
                            RetryReason::MinuteQuota
                        }
                        Errcode::Code(SYSTEM_BUSY) if busy_retries < self.retry.busy_attempts => {
                            busy_retries += 1;
                            tokio::time::sleep(busy_backoff(busy_retries)).await;
                            last = Some(CallOutcome::Answered(response, errcode));
                            RetryReason::SystemBusy
                        }
                        _ => return CallOutcome::Answered(response, errcode),
                    }
                }
                Err(error) => {
                    self.metrics.upstream_failure(call.api, error, seconds);
                    if !(error.nothing_was_sent() && busy_retries < self.retry.busy_attempts) {
                        return CallOutcome::Failed(error);
                    }
                    busy_retries += 1;
                    tokio::time::sleep(busy_backoff(busy_retries)).await;
                    last = Some(CallOutcome::Failed(error));
                    RetryReason::Transport
                }
            });
        }
    }
}

/// `BUSY_BACKOFF × 2^(attempt−1)`, times a random factor in [0.5, 1.5).
fn busy_backoff(attempt: u32) -> Duration {
    let base = BUSY_BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    base.mul_f64(0.5 + fastrand::f64())
}

/// Up to 2 % of the window (at most one second), so that held calls of many keys and many
/// wxgate instances do not all arrive in the window's first millisecond.
fn window_jitter(window: Duration) -> Duration {
    let most = (window / 50).min(Duration::from_secs(1));
    most.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_jitters() {
        for attempt in 1..5 {
            let base = BUSY_BACKOFF * (1 << (attempt - 1));
            let got = busy_backoff(attempt);
            assert!(got >= base / 2 && got < base * 3 / 2, "{attempt}: {got:?}");
        }
        assert!(window_jitter(Duration::from_secs(60)) <= Duration::from_secs(1));
        assert!(window_jitter(Duration::from_secs(2)) <= Duration::from_millis(40));
    }
}
