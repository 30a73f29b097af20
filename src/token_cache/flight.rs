//! A token fetch in flight and the callers waiting for it.
//!
//! Every fetch runs in a task of its own, so a caller that goes away never cancels it: the
//! others still get its answer, and the token is still cached. Callers subscribe to the
//! flight's result while the cache's lock is held, and the fetch leaves the cache's slot
//! before it publishes, so a caller either joins a flight or finds its result in the cache.

use std::sync::Arc;

use tokio::sync::watch;

use super::entry::{Credential, Entry};
use crate::answer::LocalAnswer;
use crate::answer::WechatAnswer;

/// One fetch for one (key, credential).
pub struct Flight {
    /// Whose secret the fetch presents: only callers with the same secret wait for it.
    pub credential: Credential,
    /// A forced refresh of a stable token (an unforced caller may wait for it; a forced
    /// caller does not wait for an unforced fetch).
    pub forced: bool,
    /// A refresh ahead of expiry, started while the current token is served.
    pub background: bool,
    result: watch::Sender<Option<FlightResult>>,
}

/// How a fetch ended, for everyone who waited for it.
#[derive(Debug, Clone)]
pub enum FlightResult {
    /// A token (served to each waiter with the lifetime that remains when it is served).
    Token {
        /// The token now cached.
        entry: Entry,
        /// This replica made the upstream call (rather than finding another replica's
        /// token in Redis).
        fetched_here: bool,
    },
    /// WeChat's answer was not a token (40125, 45009, -1…): passed to every waiter, who
    /// presented the same secret.
    Answer(Arc<WechatAnswer>),
    /// WeChat gave no answer, or no quota turn came in time.
    Local(LocalAnswer),
    /// The fetch found nothing to do (a background refresh another replica was already
    /// making): the waiters decide again.
    Again,
}

impl Flight {
    /// A new flight.
    pub fn new(credential: Credential, forced: bool, background: bool) -> Arc<Flight> {
        Arc::new(Flight {
            credential,
            forced,
            background,
            result: watch::channel(None).0,
        })
    }

    /// A waiter's subscription (taken under the cache's lock, see the module doc).
    pub fn subscribe(&self) -> watch::Receiver<Option<FlightResult>> {
        self.result.subscribe()
    }

    /// Hands the result to every waiter.
    pub fn publish(&self, result: FlightResult) {
        self.result.send_replace(Some(result));
    }

    /// Whether the fetch has ended.
    pub fn is_done(&self) -> bool {
        self.result.borrow().is_some()
    }
}

/// Waits for a flight's result.
pub async fn wait(mut receiver: watch::Receiver<Option<FlightResult>>) -> FlightResult {
    match receiver.wait_for(Option::is_some).await {
        Ok(result) => result
            .clone()
            .unwrap_or(FlightResult::Local(LocalAnswer::CallAbandoned)),
        // The fetch's task ended without a result (its guard normally publishes one).
        Err(_) => FlightResult::Local(LocalAnswer::CallAbandoned),
    }
}
