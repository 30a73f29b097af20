//! When an upstream call is sent again, decided by a pure function of the attempt's result
//! and the time left, so that every rule is tested without a socket or a clock.
//!
//! - **45011** (minute quota): WeChat did not execute the call, so sending it again is safe
//!   for any method. It is held until WeChat's next window (plus a little jitter, so that
//!   held calls of many keys and many replicas do not all arrive in the window's first
//!   millisecond), as long as that is within `retry.max_hold_ms` of the call's start.
//! - **-1** (system busy), and a connection that could not be opened (nothing was sent): sent
//!   again after an exponential backoff with jitter, up to `retry.busy_attempts` times.
//! - **A reused connection closed under the request** before any answer (the server's
//!   keep-alive timeout ran out as the request arrived; it never read it): sent again at once,
//!   on a new connection, once per call, when its method is idempotent (RFC 9110 §9.2.2: GET,
//!   HEAD, PUT, DELETE, OPTIONS, TRACE; every code exchange is a GET), as Go's net/http does.
//!   A server that read the request and then died looks the same and may have executed it,
//!   which an idempotent request allows; a POST (a message sent, a `clear_quota` reset spent)
//!   is not sent twice.
//! - Anything else is final, a timeout and a reset included: the call may have been executed
//!   (a code exchange may have spent its code).

use std::time::Duration;

use wxgate_contract::RetryReason;

use crate::config::RetryConfig;
use crate::upstream::{ConnectionChoice, TransportError};
use crate::wechat::{Errcode, MINUTE_QUOTA, SYSTEM_BUSY};

/// The first backoff after a `-1`; doubled for every further attempt, with ±50 % jitter.
const BUSY_BACKOFF: Duration = Duration::from_millis(200);

/// What one attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// WeChat answered with this errcode.
    Answered(Errcode),
    /// WeChat gave no answer.
    Failed(TransportError),
}

impl Attempt {
    /// Whether any retry rule can apply: a 45011, a -1, or no answer. Every other answer is
    /// final whatever the progress, so a caller need not read the clocks for it.
    pub fn may_be_retried(self) -> bool {
        matches!(
            self,
            Attempt::Answered(Errcode::Code(MINUTE_QUOTA | SYSTEM_BUSY)) | Attempt::Failed(_)
        )
    }
}

/// What the call does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// The attempt's result is the call's result.
    Done,
    /// Send again after `after`. For [`RetryReason::MinuteQuota`] the call's quota key is
    /// paused until then, so the calls queued behind it do not walk into the same wall.
    Retry {
        /// Why: also the `reason` label of `wxgate_retries_total`.
        reason: RetryReason,
        /// How long from now.
        after: Duration,
        /// On which connection: [`ConnectionChoice::New`] after a reused one closed.
        connection: ConnectionChoice,
    },
}

/// What the decision needs to know of the call so far and of the time.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Retries of -1 and of failed connections already made.
    pub busy_retries: u32,
    /// How much of `retry.max_hold_ms` is left since the call started.
    pub hold_left: Duration,
    /// How long until WeChat's next quota window begins.
    pub next_window_in: Duration,
    /// A uniform sample in `[0, 1)` for the jitter (random in production, fixed in tests).
    pub jitter: f64,
    /// Whether the call's method may be executed twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// Whether the call was already sent again after a reused connection closed under it.
    pub resent_after_reuse: bool,
}

/// `[retry]` and the quota window, as the decision reads them.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    busy_attempts: u32,
    max_hold: Duration,
    window: Duration,
}

impl RetryPolicy {
    /// The policy of `[retry]` for quota windows of `window`.
    pub fn new(config: &RetryConfig, window: Duration) -> RetryPolicy {
        RetryPolicy {
            busy_attempts: config.busy_attempts,
            max_hold: config.max_hold,
            window,
        }
    }

    /// How long a call may be held across 45011 answers, from its start.
    pub fn max_hold(&self) -> Duration {
        self.max_hold
    }

    /// The decision after `attempt`.
    pub fn decide(&self, attempt: Attempt, progress: Progress) -> Decision {
        if !attempt.may_be_retried() {
            return Decision::Done;
        }
        let busy_retry = |reason| {
            if progress.busy_retries < self.busy_attempts {
                Decision::Retry {
                    reason,
                    after: busy_backoff(progress.busy_retries + 1, progress.jitter),
                    connection: ConnectionChoice::Any,
                }
            } else {
                Decision::Done
            }
        };
        match attempt {
            Attempt::Answered(Errcode::Code(MINUTE_QUOTA)) => {
                let after = progress.next_window_in + window_jitter(self.window, progress.jitter);
                if after > progress.hold_left {
                    Decision::Done
                } else {
                    Decision::Retry {
                        reason: RetryReason::MinuteQuota,
                        after,
                        connection: ConnectionChoice::Any,
                    }
                }
            }
            Attempt::Answered(Errcode::Code(SYSTEM_BUSY)) => busy_retry(RetryReason::SystemBusy),
            Attempt::Failed(error) if error.retryable() => busy_retry(RetryReason::Transport),
            Attempt::Failed(TransportError::ReusedConnectionClosed)
                if progress.idempotent && !progress.resent_after_reuse =>
            {
                Decision::Retry {
                    reason: RetryReason::Transport,
                    after: Duration::ZERO,
                    connection: ConnectionChoice::New,
                }
            }
            Attempt::Answered(_) | Attempt::Failed(_) => Decision::Done,
        }
    }
}

/// `BUSY_BACKOFF × 2^(attempt−1)`, times a factor in [0.5, 1.5) taken from `jitter`.
fn busy_backoff(attempt: u32, jitter: f64) -> Duration {
    let base = BUSY_BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    base.mul_f64(0.5 + jitter)
}

/// Up to 2 % of the window (at most one second).
fn window_jitter(window: Duration, jitter: f64) -> Duration {
    let most = (window / 50).min(Duration::from_secs(1));
    most.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::CertificateProblem;

    fn policy(busy_attempts: u32, max_hold_secs: u64) -> RetryPolicy {
        RetryPolicy {
            busy_attempts,
            max_hold: Duration::from_secs(max_hold_secs),
            window: Duration::from_secs(60),
        }
    }

    fn progress(busy_retries: u32, hold_left_secs: u64, next_window_secs: u64) -> Progress {
        Progress {
            busy_retries,
            hold_left: Duration::from_secs(hold_left_secs),
            next_window_in: Duration::from_secs(next_window_secs),
            jitter: 0.5,
            idempotent: true,
            resent_after_reuse: false,
        }
    }

    #[test]
    fn minute_quota_is_held_to_the_next_window_while_the_hold_lasts() {
        let decision = policy(2, 65).decide(
            Attempt::Answered(Errcode::Code(MINUTE_QUOTA)),
            progress(0, 65, 20),
        );
        assert_eq!(
            decision,
            Decision::Retry {
                reason: RetryReason::MinuteQuota,
                // 20 s to the window, plus half of the jitter's one second.
                after: Duration::from_millis(20_500),
                connection: ConnectionChoice::Any,
            }
        );
        // The next window starts after the hold ends: the 45011 goes back to the client.
        let decision = policy(2, 65).decide(
            Attempt::Answered(Errcode::Code(MINUTE_QUOTA)),
            progress(0, 10, 20),
        );
        assert_eq!(decision, Decision::Done);
        // Busy retries already spent do not limit quota holds.
        let decision = policy(0, 65).decide(
            Attempt::Answered(Errcode::Code(MINUTE_QUOTA)),
            progress(9, 65, 1),
        );
        assert!(matches!(decision, Decision::Retry { .. }));
    }

    #[test]
    fn busy_answers_and_unopened_connections_back_off_a_bounded_number_of_times() {
        let policy = policy(2, 65);
        for attempt in [
            Attempt::Answered(Errcode::Code(SYSTEM_BUSY)),
            Attempt::Failed(TransportError::Connect),
        ] {
            let first = policy.decide(attempt, progress(0, 65, 30));
            let second = policy.decide(attempt, progress(1, 65, 30));
            let third = policy.decide(attempt, progress(2, 65, 30));
            let after = |decision| match decision {
                Decision::Retry { after, .. } => after,
                Decision::Done => panic!("{attempt:?} should be retried"),
            };
            assert_eq!(after(first), Duration::from_millis(200));
            assert_eq!(after(second), Duration::from_millis(400));
            assert_eq!(third, Decision::Done);
        }
    }

    #[test]
    fn an_idempotent_call_lost_on_a_reused_connection_is_sent_again_once_on_a_new_one() {
        let policy = policy(0, 65);
        let lost = Attempt::Failed(TransportError::ReusedConnectionClosed);
        assert_eq!(
            policy.decide(lost, progress(0, 65, 30)),
            Decision::Retry {
                reason: RetryReason::Transport,
                after: Duration::ZERO,
                connection: ConnectionChoice::New,
            },
            "at once, and not limited by busy_attempts (0 here)"
        );
        let again = Progress {
            resent_after_reuse: true,
            ..progress(0, 65, 30)
        };
        assert_eq!(policy.decide(lost, again), Decision::Done, "only once");
        let post = Progress {
            idempotent: false,
            ..progress(0, 65, 30)
        };
        assert_eq!(
            policy.decide(lost, post),
            Decision::Done,
            "a POST may have been executed"
        );
    }

    #[test]
    fn anything_that_may_have_been_executed_is_final() {
        let policy = policy(5, 65);
        for attempt in [
            Attempt::Failed(TransportError::Timeout),
            Attempt::Failed(TransportError::Reset),
            Attempt::Failed(TransportError::TooLarge),
            Attempt::Failed(TransportError::ConnectionLimit),
            Attempt::Failed(TransportError::Certificate(CertificateProblem::OutOfDate)),
            Attempt::Answered(Errcode::Success),
            Attempt::Answered(Errcode::Code(40163)),
            Attempt::Answered(Errcode::Code(45009)),
            Attempt::Answered(Errcode::NotJson),
        ] {
            assert_eq!(
                policy.decide(attempt, progress(0, 65, 30)),
                Decision::Done,
                "{attempt:?}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        for attempt in 1..5 {
            let base = BUSY_BACKOFF * (1 << (attempt - 1));
            assert_eq!(busy_backoff(attempt, 0.0), base / 2);
            assert!(busy_backoff(attempt, 0.999_999) < base * 3 / 2);
        }
        assert!(window_jitter(Duration::from_secs(60), 0.999) <= Duration::from_secs(1));
        assert!(window_jitter(Duration::from_secs(2), 0.999) <= Duration::from_millis(40));
    }
}
