//! A call in flight and the callers waiting for it.
//!
//! The first caller (the [`Leader`]) polls the call itself, so the common path has no task
//! and no hand-over. The call does not belong to it, though: a leader dropped before the call
//! ends (its client went away) moves the call to a task of its own, which finishes it for the
//! followers and for the code's next caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::sync::watch;

use super::{CacheStatus, ExchangeResult};
use crate::local_answer::LocalAnswer;

/// One call in flight: its answer, once there is one, for every caller waiting.
pub(super) struct Flight {
    pub(super) answer: watch::Sender<Option<ExchangeResult>>,
    /// Set when the leader went away and the call moved to a task of its own.
    leader_gone: AtomicBool,
}

impl Flight {
    /// A new flight and the leader's own subscription to it.
    pub(super) fn new() -> (Arc<Flight>, watch::Receiver<Option<ExchangeResult>>) {
        let (answer, receiver) = watch::channel(None);
        let flight = Flight {
            answer,
            leader_gone: AtomicBool::new(false),
        };
        (Arc::new(flight), receiver)
    }

    /// A follower's subscription.
    pub(super) fn waiter(&self) -> Waiter {
        Waiter(self.answer.subscribe())
    }

    /// Hands `result` to the followers, if any wait. The leader, when it still waits, gets
    /// the result from its own call: publishing only for others lets the leader keep the
    /// only reference, so its response is moved rather than copied.
    pub(super) fn publish(&self, result: &ExchangeResult) {
        let leader_waits = usize::from(!self.leader_gone.load(Ordering::Acquire));
        if self.answer.receiver_count() > leader_waits {
            self.answer.send_replace(Some(result.clone()));
        }
    }

    /// Tells every waiter the call ended without an answer.
    pub(super) fn abandon(&self) {
        self.answer
            .send_replace(Some(ExchangeResult::Local(LocalAnswer::CallAbandoned)));
    }
}

/// A caller waiting for an identical call in flight.
pub struct Waiter(watch::Receiver<Option<ExchangeResult>>);

impl Waiter {
    /// The call's result.
    pub async fn result(mut self) -> ExchangeResult {
        match self.0.wait_for(Option::is_some).await {
            Ok(result) => result
                .clone()
                .unwrap_or(ExchangeResult::Local(LocalAnswer::CallAbandoned)),
            // The call ended without publishing (the slot guard normally publishes).
            Err(_) => ExchangeResult::Local(LocalAnswer::CallAbandoned),
        }
    }
}

/// The first caller's side of a call: it polls the call itself and counts as one of its
/// waiters. Dropped before the call ends, it moves the call to a task of its own.
pub(super) struct Leader {
    call: Option<Pin<Box<dyn Future<Output = Led> + Send>>>,
    flight: Arc<Flight>,
    /// Keeps the leader counted among the flight's waiters while it polls.
    receiver: Option<watch::Receiver<Option<ExchangeResult>>>,
}

impl Leader {
    pub(super) fn new(
        call: Pin<Box<dyn Future<Output = Led> + Send>>,
        flight: Arc<Flight>,
        receiver: watch::Receiver<Option<ExchangeResult>>,
    ) -> Leader {
        Leader {
            call: Some(call),
            flight,
            receiver: Some(receiver),
        }
    }
}

/// What the leader's call ended with, and where its answer came from (WeChat, or, with
/// `[cluster]`, another replica's memory or call).
pub(super) type Led = (ExchangeResult, CacheStatus);

impl Future for Leader {
    type Output = Led;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Led> {
        let Some(call) = self.call.as_mut() else {
            let abandoned = ExchangeResult::Local(LocalAnswer::CallAbandoned);
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
