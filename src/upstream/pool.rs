//! The pool of idle keep-alive connections towards upstream: wxgate talks to one host, so it
//! is one list, with no per-host keying.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1;
use parking_lot::{Mutex, MutexGuard};

/// How long an idle connection is kept, in housekeeping ticks (seconds, see
/// [`Pool::close_idle`]): well under the minute after which servers commonly close
/// idle keep-alive connections, so a request rarely meets one being closed.
const IDLE_TICKS: u64 = 50;

/// Idle keep-alive connections towards upstream, most recently used last (so the busy ones
/// stay warm and the rest idle out). Idle time is counted in housekeeping ticks, so that
/// neither taking nor returning a connection reads the clock.
pub(super) struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    tick: AtomicU64,
}

struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    since_tick: u64,
}

impl Pool {
    pub(super) fn new(max_idle: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            tick: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock()
    }

    /// The most recently used connection that is still open.
    pub(super) fn take(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    pub(super) fn put(&self, sender: http1::SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let since_tick = self.tick.load(Ordering::Relaxed);
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { sender, since_tick });
        }
    }

    pub(super) fn close_idle(&self) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        // Dropping a sender closes its connection.
        self.lock()
            .retain(|entry| !entry.sender.is_closed() && tick - entry.since_tick < IDLE_TICKS);
    }
}
