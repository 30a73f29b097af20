//! The leader of a code exchange in flight: the first caller, which polls the call itself,
//! so the common path has no task and no hand-over. The call does not belong to it, though:
//! a leader dropped before the call ends (its client went away) moves the call to a task of
//! its own, which finishes it for the followers and for the code's next caller.
//!
//! The flight itself (its result set once, its waiters) is [`crate::flight`]'s; what is the
//! code cache's own is here: the leader, whether it still waits ([`LeaderState`]), and who
//! gets the answer ([`publish`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use wxgate_contract::CacheStatus;

use crate::answer::{Answer, LocalAnswer};
use crate::flight::{Flight, FlightWaiter};

/// A code exchange in flight: its answer for every caller waiting, the leader among them.
pub type CodeFlight = Flight<Answer, LeaderState>;

/// A caller waiting for a code exchange in flight.
pub type CodeWaiter = FlightWaiter<Answer, LeaderState>;

/// The call a leader polls: it ends with the answer and where it came from (WeChat, or,
/// with `[cluster]`, another replica's memory or call).
pub(super) type LeaderCall = Pin<Box<dyn Future<Output = (Answer, CacheStatus)> + Send>>;

/// The leader's side of a flight, its tag.
#[derive(Default)]
pub struct LeaderState {
    /// Set when the leader went away and the call moved to a task of its own.
    gone: AtomicBool,
}

/// Hands `answer` to the followers, if any wait. The leader, when it still waits, gets the
/// answer from its own call: publishing only for others lets the leader keep the only
/// reference, so its response is moved rather than copied.
pub(super) fn publish(flight: &CodeFlight, answer: &Answer) {
    let leader_waits = usize::from(!flight.tag().gone.load(Ordering::Acquire));
    if flight.waiting() > leader_waits {
        flight.set(answer.clone());
    }
}

/// Tells every waiter the call ended without an answer.
pub(super) fn abandon(flight: &CodeFlight) {
    flight.set(Answer::Local(LocalAnswer::CallAbandoned));
}

/// The first caller's side of a call: it polls the call itself and counts as one of its
/// waiters. Dropped before the call ends, it moves the call to a task of its own.
pub(super) struct Leader {
    call: Option<LeaderCall>,
    flight: Arc<CodeFlight>,
    /// Keeps the leader counted among the flight's waiters while it polls.
    waiter: Option<CodeWaiter>,
}

impl Leader {
    /// The leader of `flight`, polling `call`; `waiter` is its own place among the flight's
    /// waiters, taken when the flight was made (before anyone could see it).
    pub(super) fn new(call: LeaderCall, flight: Arc<CodeFlight>, waiter: CodeWaiter) -> Leader {
        Leader {
            call: Some(call),
            flight,
            waiter: Some(waiter),
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
        // From now on only followers wait (see `publish`); and if there are none, a call
        // still waiting for quota sees everyone gone.
        self.flight.tag().gone.store(true, Ordering::Release);
        self.waiter = None;
        // Without a runtime (it is shutting down) the call goes with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                call.await;
            });
        }
    }
}
