//! One logical upstream call: acquire a quota turn → send → record → decide, until the
//! [`RetryPolicy`] says done.
//!
//! Every attempt, first or retry, takes its own quota turn, so the bound of [`crate::quota`]
//! covers retries. What happens after an attempt is decided in [`crate::retry`]; this loop
//! only carries it out: a 45011 pauses the call's quota key until WeChat's next window (the
//! call then waits for its turn behind the pause, for as long as the hold allows), a backoff
//! sleeps, and a call lost on a reused connection goes on a new one. A call of a key whose
//! daily quota WeChat said is spent (45009) is answered at once, sending nothing.

mod metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use wxgate_contract::RetryReason;

pub use self::metrics::CallMetrics;
use crate::answer::{LocalAnswer, WechatAnswer};
use crate::config::RetryConfig;
use crate::quota::{next_window_start, FirstTurn, QuotaGate, QuotaKey, Refusal};
use crate::retry::{Attempt, Decision, Progress, RetryPolicy};
use crate::upstream::{ConnectionChoice, UpstreamClient, UpstreamRequest};
use crate::wechat::{Api, Errcode, MINUTE_QUOTA};

/// Sends calls upstream under quota and retry policy.
pub struct Dispatcher {
    upstream: UpstreamClient,
    quota: QuotaGate,
    /// `[retry]`; a reload swaps it (a call in progress keeps the policy it started with).
    policy: ArcSwap<RetryPolicy>,
    metrics: CallMetrics,
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

impl Dispatcher {
    /// A dispatcher over `upstream`, `quota` and `[retry]`.
    pub fn new(
        upstream: UpstreamClient,
        quota: QuotaGate,
        retry: &RetryConfig,
        metrics: CallMetrics,
    ) -> Dispatcher {
        Dispatcher {
            policy: ArcSwap::from_pointee(RetryPolicy::new(retry, quota.window())),
            upstream,
            quota,
            metrics,
        }
    }

    /// Applies `[retry]` of a new configuration to the calls that start from now on.
    pub fn reconfigure(&self, retry: &RetryConfig) {
        self.policy
            .store(Arc::new(RetryPolicy::new(retry, self.quota.window())));
    }

    /// The quota gate (for housekeeping, gauges and reloads).
    pub fn quota(&self) -> &QuotaGate {
        &self.quota
    }

    /// Once a second: drops idle quota keys and upstream connections, and updates the
    /// gauge of quota keys.
    pub fn housekeeping(&self) {
        self.quota.retain_recent();
        self.upstream.close_idle();
        self.metrics.quota_keys.set(self.quota.len() as i64);
    }

    /// Runs `call` to its end: WeChat's answer (the last one, when there were retries), or
    /// one of wxgate's own when WeChat gave none or no quota turn came in time. `gone` is asked, while the call waits for quota, for a future
    /// that completes when nobody wants the answer any more; the call then ends with
    /// [`LocalAnswer::CallAbandoned`] before anything is sent. Pass `std::future::pending`
    /// when the caller's own cancellation suffices.
    pub async fn call<G, F>(&self, call: &Call, gone: G) -> Result<WechatAnswer, LocalAnswer>
    where
        G: FnMut() -> F,
        F: Future<Output = ()>,
    {
        self.call_with(call, gone, FirstTurn::Acquire).await
    }

    /// [`Dispatcher::call`], for a call whose first turn may have been taken already.
    pub async fn call_with<G, F>(
        &self,
        call: &Call,
        mut gone: G,
        first: FirstTurn,
    ) -> Result<WechatAnswer, LocalAnswer>
    where
        G: FnMut() -> F,
        F: Future<Output = ()>,
    {
        if let Some(until) = call
            .quota_key
            .as_ref()
            .and_then(|key| self.quota.daily_block(key))
        {
            return Err(LocalAnswer::DailyQuota { until });
        }
        let policy = self.policy.load_full();
        let mut state = CallState::new(call, &policy);
        // What the client gets if a retry finds no quota turn in time: WeChat's last answer
        // (the 45011 held as long as allowed, or the -1), or the last failure.
        let mut last: Option<Result<WechatAnswer, LocalAnswer>> = None;
        // Counted when the retry is sent: a hold that runs out sends nothing.
        let mut retrying: Option<RetryReason> = None;
        let mut first = first;
        loop {
            let turn = std::mem::replace(&mut first, FirstTurn::Acquire);
            if turn != FirstTurn::Taken {
                let deadline = state.quota_deadline;
                if let Err(refused) = self.acquire(call, deadline, turn, &mut gone).await {
                    return last.unwrap_or(Err(refused));
                }
            }
            if let Some(reason) = retrying.take() {
                self.metrics.retry(call.api, reason);
            }
            let (result, attempt) = self.send(call, state.connection).await;
            let refusal = match (&call.quota_key, attempt) {
                (Some(key), Attempt::Answered(Errcode::Code(MINUTE_QUOTA))) => {
                    // Boxed: rare, and large with `[cluster]`.
                    Some(Box::pin(self.quota.refused(key)).await)
                }
                (Some(key), Attempt::Answered(errcode)) => {
                    self.quota.answered(key, errcode).await;
                    None
                }
                _ => None,
            };
            // Nearly every answer is final: no clock or random number is needed for it.
            if !attempt.may_be_retried() {
                return result;
            }
            // WeChat's next window for this key: its own, when WeChat stated one.
            let window = call
                .quota_key
                .map_or(self.quota.window(), |key| self.quota.window_of(&key));
            let progress = state.progress(window);
            let Decision::Retry {
                reason,
                after,
                connection,
            } = policy.decide(attempt, progress)
            else {
                return result;
            };
            state.connection = connection;
            self.before_retry(call, &mut state, reason, Instant::now() + after, refusal)
                .await;
            last = Some(result);
            retrying = Some(reason);
        }
    }

    /// Waits for a retry: a 45011 pauses the call's quota key until `resume` (the call then
    /// waits for its turn behind the pause, as long as the hold allows), unless it may be
    /// one user's limit (`refusal`: then only this call is held); a backoff sleeps.
    async fn before_retry(
        &self,
        call: &Call,
        state: &mut CallState,
        reason: RetryReason,
        resume: Instant,
        refusal: Option<Refusal>,
    ) {
        match (reason, &call.quota_key) {
            (RetryReason::MinuteQuota, Some(key)) => {
                if refusal == Some(Refusal::Hold) {
                    tokio::time::sleep_until(resume).await;
                } else {
                    // Boxed: rare, and large with `[cluster]`.
                    Box::pin(self.quota.pause(key, resume)).await;
                }
                state.quota_deadline = state.hold_deadline;
            }
            (RetryReason::MinuteQuota, None) => tokio::time::sleep_until(resume).await,
            (RetryReason::SystemBusy | RetryReason::Transport, _) => {
                match state.connection {
                    // Sent again after a reused connection closed under it: once, and not one
                    // of the busy retries.
                    ConnectionChoice::New => state.resent_after_reuse = true,
                    ConnectionChoice::Any => state.busy_retries += 1,
                }
                tokio::time::sleep_until(resume).await;
            }
        }
    }

    /// Waits for the call's quota turn (if it has a key) until `deadline`; not before the
    /// time `turn` may name.
    async fn acquire<G, F>(
        &self,
        call: &Call,
        deadline: Instant,
        turn: FirstTurn,
        gone: &mut G,
    ) -> Result<(), LocalAnswer>
    where
        G: FnMut() -> F,
        F: Future<Output = ()>,
    {
        let Some(key) = &call.quota_key else {
            return Ok(());
        };
        let turn = tokio::select! {
            // The turn first: usually it is there at once, and `gone` is not needed.
            biased;
            turn = async {
                match turn {
                    FirstTurn::NotBefore(at) => self.quota.acquire_not_before(key, deadline, at).await,
                    _ => self.quota.acquire(key, deadline).await,
                }
            } => turn,
            () = gone() => return Err(LocalAnswer::CallAbandoned),
        };
        match turn {
            Ok(waited) => {
                if waited > Duration::ZERO {
                    self.metrics.quota_wait(call.api, waited.as_secs_f64());
                }
                Ok(())
            }
            Err(refused) => Err(LocalAnswer::LocalQuota {
                retry_after: refused.retry_after,
            }),
        }
    }

    /// Sends one attempt and records it in the metrics.
    async fn send(
        &self,
        call: &Call,
        connection: ConnectionChoice,
    ) -> (Result<WechatAnswer, LocalAnswer>, Attempt) {
        let sent = Instant::now();
        let result = self.upstream.send(&call.request, connection).await;
        let seconds = sent.elapsed().as_secs_f64();
        match result {
            Ok(response) => {
                let errcode = Errcode::read(call.api, &response.body);
                self.metrics.upstream_answer(call.api, errcode, seconds);
                let answer = WechatAnswer { response, errcode };
                (Ok(answer), Attempt::Answered(errcode))
            }
            Err(error) => {
                self.metrics.upstream_failure(call.api, error, seconds);
                (Err(LocalAnswer::Upstream(error)), Attempt::Failed(error))
            }
        }
    }
}

/// Where a call stands between attempts: what the retry decision reads.
struct CallState {
    hold_deadline: Instant,
    quota_deadline: Instant,
    busy_retries: u32,
    resent_after_reuse: bool,
    connection: ConnectionChoice,
    idempotent: bool,
}

impl CallState {
    fn new(call: &Call, policy: &RetryPolicy) -> CallState {
        let started = Instant::now();
        CallState {
            hold_deadline: started + policy.max_hold(),
            quota_deadline: started + call.max_wait,
            busy_retries: 0,
            resent_after_reuse: false,
            connection: ConnectionChoice::Any,
            idempotent: call.request.method.is_idempotent(),
        }
    }

    /// What the decision after an attempt needs to know, now.
    fn progress(&self, window: Duration) -> Progress {
        Progress {
            busy_retries: self.busy_retries,
            hold_left: self.hold_deadline.saturating_duration_since(Instant::now()),
            next_window_in: next_window_start(window),
            jitter: fastrand::f64(),
            idempotent: self.idempotent,
            resent_after_reuse: self.resent_after_reuse,
        }
    }
}
