//! A call in flight and the callers waiting for it.
//!
//! The first caller (the [`Leader`]) polls the call itself, so the common path has no task
//! and no hand-over. The call does not belong to it, though: a leader dropped before the call
//! ends (its client went away) moves the call to a task of its own, which finishes it for the
//! followers and for the code's next caller.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use tokio::sync::Notify;

use wxgate_contract::CacheStatus;

use crate::answer::{Answer, LocalAnswer};

/// One call in flight: its answer, once there is one, for every caller waiting.
///
/// Not a `tokio::sync::watch` channel: its eight-way notifier is made and woken on every
/// call (about a thousand instructions, on every upstream call, to tell a follower that
/// rarely exists). Here the answer is set once, followers wait on one `Notify`, and the count
/// of callers waiting is one atomic.
pub(super) struct Flight {
    /// The call's result: set once, by `publish` when followers wait, or by `abandon`.
    answer: OnceLock<Answer>,
    /// Wakes the followers once `answer` is set.
    answered: Notify,
    /// Callers waiting for the answer: the leader while it polls, and every follower.
    waiting: AtomicUsize,
    /// Wakes a call waiting for quota when `waiting` falls to zero (see `everyone_gone`).
    left: Notify,
    /// Set when the leader went away and the call moved to a task of its own.
    leader_gone: AtomicBool,
}

impl Flight {
    /// A new flight and the leader's own place among its waiters.
    pub(super) fn new() -> (Arc<Flight>, Subscription) {
        let flight = Arc::new(Flight {
            answer: OnceLock::new(),
            answered: Notify::new(),
            waiting: AtomicUsize::new(0),
            left: Notify::new(),
            leader_gone: AtomicBool::new(false),
        });
        let leader = Subscription::new(&flight);
        (flight, leader)
    }

    /// A follower's subscription.
    pub(super) fn waiter(self: &Arc<Self>) -> Waiter {
        Waiter(Subscription::new(self))
    }

    /// Callers waiting for the answer right now.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Completes once no caller waits for the answer (at once if none does now).
    pub(super) async fn everyone_left(&self) {
        loop {
            // Registered before the count is read, so that the last one leaving in between
            // still wakes this.
            let mut left = pin!(self.left.notified());
            left.as_mut().enable();
            if self.waiting() == 0 {
                return;
            }
            left.await;
        }
    }

    /// Hands `result` to the followers, if any wait. The leader, when it still waits, gets
    /// the result from its own call: publishing only for others lets the leader keep the
    /// only reference, so its response is moved rather than copied.
    pub(super) fn publish(&self, result: &Answer) {
        let leader_waits = usize::from(!self.leader_gone.load(Ordering::Acquire));
        if self.waiting() > leader_waits {
            self.set(result.clone());
        }
    }

    /// Tells every waiter the call ended without an answer.
    pub(super) fn abandon(&self) {
        self.set(Answer::Local(LocalAnswer::CallAbandoned));
    }

    fn set(&self, result: Answer) {
        // The first result stands (an abandoned call publishes nothing else).
        let _ = self.answer.set(result);
        self.answered.notify_waiters();
    }
}

/// A caller counted among a flight's waiters for as long as this lives.
pub(super) struct Subscription(Arc<Flight>);

impl Subscription {
    fn new(flight: &Arc<Flight>) -> Subscription {
        flight.waiting.fetch_add(1, Ordering::AcqRel);
        Subscription(flight.clone())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.left.notify_waiters();
        }
    }
}

/// A caller waiting for an identical call in flight.
pub struct Waiter(Subscription);

impl Waiter {
    /// The call's result.
    pub async fn result(self) -> Answer {
        let flight = &self.0 .0;
        loop {
            // Registered before the answer is read, so that an answer set in between still
            // wakes this.
            let mut answered = pin!(flight.answered.notified());
            answered.as_mut().enable();
            if let Some(result) = flight.answer.get() {
                return result.clone();
            }
            answered.await;
        }
    }
}

/// The call a leader polls: it ends with the answer and where it came from (WeChat, or,
/// with `[cluster]`, another replica's memory or call).
pub(super) type LeaderCall = Pin<Box<dyn Future<Output = (Answer, CacheStatus)> + Send>>;

/// The first caller's side of a call: it polls the call itself and counts as one of its
/// waiters. Dropped before the call ends, it moves the call to a task of its own.
pub(super) struct Leader {
    call: Option<LeaderCall>,
    flight: Arc<Flight>,
    /// Keeps the leader counted among the flight's waiters while it polls.
    receiver: Option<Subscription>,
}

impl Leader {
    pub(super) fn new(call: LeaderCall, flight: Arc<Flight>, receiver: Subscription) -> Leader {
        Leader {
            call: Some(call),
            flight,
            receiver: Some(receiver),
        }
    }
}

impl Future for Leader {
    type Output = (Answer, CacheStatus);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(Answer, CacheStatus)> {
        let Some(call) = self.call.as_mut() else {
            let abandoned = Answer::Local(LocalAnswer::CallAbandoned);
            return Poll::Ready((abandoned, CacheStatus::Miss));
        };
        let result = ready!(call.as_mut().poll(cx));
        self.call = None;
        Poll::Ready(result)
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        if std::thread::panicking() {
            // The call panicked while this leader polled it: it cannot be polled again
            // (dropping it frees its slot, see `SlotGuard`).
            return;
        }
        // From now on only followers wait (see `Flight::publish`); and if there are none, a
        // call still waiting for quota sees everyone gone.
        self.flight.leader_gone.store(true, Ordering::Release);
        self.receiver = None;
        // Without a runtime (it is shutting down) the call goes with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                call.await;
            });
        }
    }
}
