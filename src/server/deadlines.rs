//! The deadlines of connections without a request in flight, and the watchdog's decision
//! ([`Deadlines::verdict`]), a pure function of the connection's times and counts.

use std::time::Duration;

use tokio::time::Instant;

use super::closes::CloseReason;

/// The deadlines of connections without a request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadlines {
    /// From accept to a complete first request head.
    pub(crate) head: Duration,
    /// From the end of the last request to the next one.
    pub(crate) idle: Duration,
}

/// What the watchdog does when it wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The connection has had no request in flight past its deadline.
    Close(CloseReason),
    /// Wake again then.
    CheckAt(Instant),
}

impl Deadlines {
    /// The watchdog's decision for a connection accepted at `accepted`, with `in_flight`
    /// requests and idle mark `mark`, at `now`. A connection with a request in flight is
    /// never closed here (its request has deadlines of its own); one without is closed past
    /// the head deadline if it never carried a request, past the idle deadline otherwise.
    pub(crate) fn verdict(
        self,
        now: Instant,
        accepted: Instant,
        in_flight: u32,
        mark: u64,
    ) -> Verdict {
        if in_flight > 0 {
            // The earliest the connection can be overdue: a full idle spell from now.
            return Verdict::CheckAt(now + self.idle);
        }
        let (deadline, reason) = if mark == 0 {
            (accepted + self.head, CloseReason::HeadTimeout)
        } else {
            (idle_since(accepted, mark) + self.idle, CloseReason::Idle)
        };
        if now >= deadline {
            Verdict::Close(reason)
        } else {
            Verdict::CheckAt(deadline)
        }
    }
}

/// When a connection accepted at `accepted` with this idle mark became idle.
pub(super) fn idle_since(accepted: Instant, mark: u64) -> Instant {
    accepted + Duration::from_millis(mark.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINES: Deadlines = Deadlines {
        head: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    #[test]
    fn a_connection_without_a_request_closes_at_the_head_deadline_then_the_idle_one() {
        let accepted = Instant::now();
        let at = |secs| accepted + Duration::from_secs(secs);
        // Never served: the head deadline, counted from the accept.
        assert_eq!(
            DEADLINES.verdict(at(3), accepted, 0, 0),
            Verdict::CheckAt(at(10))
        );
        assert_eq!(
            DEADLINES.verdict(at(10), accepted, 0, 0),
            Verdict::Close(CloseReason::HeadTimeout)
        );
        // A request in flight is never cut here, however long it takes.
        assert_eq!(
            DEADLINES.verdict(at(500), accepted, 1, 0),
            Verdict::CheckAt(at(560))
        );
        // Served, idle since 20 s after the accept: the idle deadline from then.
        let mark = 20_000 + 1;
        assert_eq!(
            DEADLINES.verdict(at(30), accepted, 0, mark),
            Verdict::CheckAt(at(80))
        );
        assert_eq!(
            DEADLINES.verdict(at(80), accepted, 0, mark),
            Verdict::Close(CloseReason::Idle)
        );
    }
}
