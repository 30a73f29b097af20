//! The connections towards upstream: a cap on how many are open, and the idle ones kept alive
//! between calls. wxgate talks to one host, so the idle ones are one list, most recently used
//! last, with no per-host keying.
//!
//! **The cap** (`upstream.max_connections`): every open connection holds a permit of one
//! semaphore, taken when it is opened and given back when the connection is dropped (the
//! server closed it, the call on it failed, or the pool let it go). A call that finds no idle
//! connection and no permit waits for whichever comes first: a connection returned idle by
//! another call, or a permit freed by a connection that closed. A permit is taken per
//! connection, not per request: a call on a pooled connection touches nothing but the idle
//! list's lock.
//!
//! **Idle connections**: one idle for `upstream.pool_idle_timeout_ms` is closed rather than
//! used: servers close idle connections after their own keep-alive timeout, and a request
//! written at the moment the server closes its end is lost on the way (see
//! [`crate::retry`] for the requests that are then sent again, and why not all are). One
//! its server closed is let go when it is next looked at: taken out, or at housekeeping.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::connection::Connection;

/// What a call gets to send its request on.
pub(super) enum Checkout {
    /// A kept-alive connection.
    Idle(Connection),
    /// Room for a new connection: the permit goes to the connection.
    New(Slot),
}

/// The right to hold one open connection: dropped when the connection ends.
pub(super) type Slot = OwnedSemaphorePermit;

/// The connections towards upstream: the cap on open ones, and the idle ones.
pub(super) struct Pool {
    state: Mutex<State>,
    max_idle: usize,
    idle_timeout: Duration,
    /// One permit per connection that may be open (`upstream.max_connections`).
    slots: Arc<Semaphore>,
    /// Wakes a waiting call when a connection is returned idle.
    returned: Notify,
}

struct State {
    /// Most recently used last.
    idle: Vec<Idle>,
    /// Calls waiting for a connection: only then does returning one wake anybody.
    waiting: usize,
}

struct Idle {
    connection: Connection,
    since: Instant,
}

impl Idle {
    /// Whether the connection can take a request at `now`: not idle for so long that its
    /// server may be closing it, and not closed by its server.
    fn usable(&mut self, now: Instant, idle_timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) < idle_timeout
            && !self.connection.closed_while_idle()
    }
}

impl Pool {
    pub(super) fn new(max_connections: usize, max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            state: Mutex::new(State {
                idle: Vec::new(),
                waiting: 0,
            }),
            max_idle,
            idle_timeout,
            slots: Arc::new(Semaphore::new(max_connections)),
            returned: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// An idle connection, or room for a new one; waits while neither is there (the caller
    /// bounds the wait with its deadline).
    pub(super) async fn checkout(&self) -> Checkout {
        if let Some(checkout) = self.try_checkout() {
            return checkout;
        }
        self.lock().waiting += 1;
        let _waiting = Waiting(self);
        loop {
            // Registered before looking, so that a connection returned in between wakes it.
            let mut returned = pin!(self.returned.notified());
            returned.as_mut().enable();
            if let Some(checkout) = self.try_checkout() {
                return checkout;
            }
            tokio::select! {
                permit = Arc::clone(&self.slots).acquire_owned() => {
                    return Checkout::New(permit.expect("the semaphore is never closed"));
                }
                () = returned => {}
            }
        }
    }

    /// Room for a new connection, even when idle ones are there: at the cap, the least
    /// recently used idle connection is closed to make room.
    pub(super) async fn new_slot(&self) -> Slot {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return slot;
        }
        let oldest = {
            let mut state = self.lock();
            (!state.idle.is_empty()).then(|| state.idle.remove(0))
        };
        // Its permit is freed with it (or another connection's comes first).
        drop(oldest);
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// An idle connection, or room for a new one, if either is there now.
    pub(super) fn try_checkout(&self) -> Option<Checkout> {
        if let Some(connection) = self.take() {
            return Some(Checkout::Idle(connection));
        }
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .map(Checkout::New)
    }

    /// The most recently used connection that is still usable. Those passed over are closed
    /// (dropped).
    fn take(&self) -> Option<Connection> {
        let mut state = self.lock();
        if state.idle.is_empty() {
            return None;
        }
        let now = Instant::now();
        while let Some(mut entry) = state.idle.pop() {
            if entry.usable(now, self.idle_timeout) {
                return Some(entry.connection);
            }
        }
        None
    }

    /// Returns a connection whose answer was read to its end, so that it can carry the next
    /// request; a call waiting for a connection is woken to take it.
    pub(super) fn put(&self, connection: Connection) {
        let since = Instant::now();
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            // Dropped: the connection closes and its permit goes to a waiting call, if any.
            return;
        }
        state.idle.push(Idle { connection, since });
        let wake = state.waiting > 0;
        drop(state);
        if wake {
            self.returned.notify_one();
        }
    }

    /// Closes the connections idle for too long and drops those already closed, so that
    /// sockets (and their permits) do not wait for the next request to be let go.
    pub(super) fn close_idle(&self) {
        let now = Instant::now();
        self.lock()
            .idle
            .retain_mut(|entry| entry.usable(now, self.idle_timeout));
    }
}

/// Counts a call in [`State::waiting`] while it waits, including when its deadline drops it.
struct Waiting<'a>(&'a Pool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}
