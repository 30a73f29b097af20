//! The single-flight the code cache and the token cache share: one call in flight, its
//! result set once, and the callers waiting for it.
//!
//! A [`Flight`] is not a `tokio::sync::watch` channel: a watch's eight-way notifier is made
//! and woken on every call (about a thousand instructions, on every upstream call of a code
//! exchange, to tell a follower that rarely exists). Here the result is set once (the first
//! result stands), the callers wait on one `Notify`, and how many wait is one atomic count,
//! which also tells a call that everyone has left ([`Flight::everyone_left`]).
//!
//! What differs between the two caches sits on top, in each cache, with what the flight is
//! for as its *tag*:
//! - the code cache's first caller (its leader) polls the call itself, with no task on the
//!   common path; the call moves to a task when the leader's caller leaves, and stops before
//!   its quota turn when every caller has left (`code_cache/leader.rs`);
//! - the token cache runs every fetch in a task of its own and keeps one flight per
//!   credential, forced or not, in the background or not (`token_cache/fetch.rs`).

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

/// One call in flight: its result, once there is one, for every caller waiting; and `Tag`,
/// what the call is for.
pub struct Flight<T, Tag = ()> {
    tag: Tag,
    /// The call's result: set once.
    result: OnceLock<T>,
    /// Wakes the waiters once `result` is set.
    answered: Notify,
    /// Callers waiting for the result ([`FlightWaiter`]s alive).
    waiting: AtomicUsize,
    /// Wakes [`Flight::everyone_left`] when `waiting` falls to zero.
    left: Notify,
}

impl<T: Clone, Tag> Flight<T, Tag> {
    /// A flight for `tag`, with nobody waiting yet.
    pub fn new(tag: Tag) -> Arc<Flight<T, Tag>> {
        Arc::new(Flight {
            tag,
            result: OnceLock::new(),
            answered: Notify::new(),
            waiting: AtomicUsize::new(0),
            left: Notify::new(),
        })
    }

    /// What the call is for.
    pub fn tag(&self) -> &Tag {
        &self.tag
    }

    /// A caller joins: it counts among the waiters until its [`FlightWaiter`] is dropped.
    pub fn join(self: &Arc<Self>) -> FlightWaiter<T, Tag> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        FlightWaiter(self.clone())
    }

    /// Callers waiting right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Completes once no caller waits (at once if none does now).
    pub async fn everyone_left(&self) {
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

    /// Sets the result and wakes every waiter; a result already set stands.
    pub fn set(&self, result: T) {
        let _ = self.result.set(result);
        self.answered.notify_waiters();
    }

    /// Whether the call has its result.
    pub fn is_done(&self) -> bool {
        self.result.get().is_some()
    }
}

/// A caller waiting for a flight's result, counted among its waiters for as long as this
/// lives.
pub struct FlightWaiter<T, Tag = ()>(Arc<Flight<T, Tag>>);

impl<T: Clone, Tag> FlightWaiter<T, Tag> {
    /// The call's result, once it is set.
    pub async fn result(self) -> T {
        let flight = &self.0;
        loop {
            // Registered before the result is read, so that a result set in between still
            // wakes this.
            let mut answered = pin!(flight.answered.notified());
            answered.as_mut().enable();
            if let Some(result) = flight.result.get() {
                return result.clone();
            }
            answered.await;
        }
    }
}

impl<T, Tag> Drop for FlightWaiter<T, Tag> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.left.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_the_first_result_and_leaving_is_seen() {
        let flight: Arc<Flight<u32, &str>> = Flight::new("what for");
        assert_eq!(*flight.tag(), "what for");
        let first = flight.join();
        let second = flight.join();
        assert_eq!(flight.waiting(), 2);
        let waiting = tokio::spawn(first.result());
        flight.set(1);
        flight.set(2);
        assert!(flight.is_done());
        assert_eq!(waiting.await.unwrap(), 1, "the first result stands");
        assert_eq!(flight.waiting(), 1);
        drop(second);
        // Nobody waits: completes at once.
        flight.everyone_left().await;
        assert_eq!(
            flight.join().result().await,
            1,
            "a late joiner reads it too"
        );
    }
}
