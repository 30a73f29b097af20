//! The pool of idle keep-alive connections towards upstream: wxgate talks to one host, so it
//! is one list, most recently used last, with no per-host keying.
//!
//! A connection idle for `upstream.pool_idle_timeout_ms` is closed rather than used: servers
//! close idle connections after their own keep-alive timeout, and a request written at the
//! moment the server closes its end is lost on the way (see [`super::UpstreamClient`] for the
//! requests that are then sent again, and why not all are).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1;
use parking_lot::{Mutex, MutexGuard};
use tokio::time::Instant;

/// One end of an HTTP/1.1 connection: requests go in, answers come out; its driver task owns
/// the socket.
pub(super) type Sender = http1::SendRequest<Full<Bytes>>;

/// Idle keep-alive connections towards upstream, most recently used last (so the busy ones
/// stay warm and the rest idle out).
pub(super) struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Idle {
    /// Whether the connection can take a request at `now`: still open, and not idle for so
    /// long that its server may be closing it.
    fn usable(&self, now: Instant, idle_timeout: Duration) -> bool {
        !self.sender.is_closed() && now.saturating_duration_since(self.since) < idle_timeout
    }
}

impl Pool {
    pub(super) fn new(max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock()
    }

    /// The most recently used connection that is still usable. Those passed over are closed
    /// (dropping a sender ends its connection).
    pub(super) fn take(&self) -> Option<Sender> {
        let mut idle = self.lock();
        if idle.is_empty() {
            return None;
        }
        let now = Instant::now();
        while let Some(entry) = idle.pop() {
            if entry.usable(now, self.idle_timeout) {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Returns a connection whose answer was read to its end, so that it can carry the next
    /// request.
    pub(super) fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since });
        }
    }

    /// Closes the connections idle for too long and drops those already closed, so that
    /// sockets do not wait for the next request to be let go.
    pub(super) fn close_idle(&self) {
        let now = Instant::now();
        self.lock()
            .retain(|entry| entry.usable(now, self.idle_timeout));
    }
}
