//! The client connections of one listener: what each is doing (requests in flight, idle since
//! when), the deadlines that close those doing nothing, and the cap on how many are open.
//!
//! Each connection has a [`ConnectionState`] shared by three parties:
//! - the service wrapper, which counts the connection's requests in flight ([`InFlight`]);
//! - the connection's own task (`serving.rs`), whose watchdog closes it once it has had no
//!   request in flight past its deadline ([`Deadlines::verdict`]), whatever bytes trickle in
//!   meanwhile: a slowloris client cannot push the deadline back;
//! - [`Connections`], the registry the accept loop consults: at the cap it asks the connection
//!   idle the longest to close, and at shutdown it asks every connection to close and then
//!   cuts off the requests still in flight.
//!
//! Per request this costs an `Arc` clone, the in-flight count's increment and decrement, and a
//! clock read with one store when the request ends: no lock, no allocation, no timer (the
//! watchdog is one timer per connection, re-armed only when it fires). The registry's lock is
//! taken per connection (accept, close), not per request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::closes::{CloseReason, ConnectionMetrics};
use super::deadlines::{idle_since, Deadlines, Verdict};

/// The open connections of one listener and their cap.
pub(crate) struct Connections {
    /// At most this many are open (a few more for a moment, while those asked to make room
    /// close).
    limit: usize,
    registry: Mutex<Registry>,
    /// The proxy port's connection metrics; the admin port has none.
    metrics: Option<ConnectionMetrics>,
}

struct Registry {
    open: HashMap<u64, Arc<ConnectionState>>,
    next_id: u64,
}

/// What one connection is doing, shared by its task, its requests and the registry.
pub(crate) struct ConnectionState {
    id: u64,
    accepted: Instant,
    /// Requests being answered (HTTP/2: streams), counted from the service being called to
    /// its response being handed to hyper.
    in_flight: AtomicU32,
    /// When the in-flight count last fell to zero, as milliseconds since `accepted` plus one;
    /// 0 while the connection has carried no request (it is then idle since `accepted`).
    idle_mark: AtomicU64,
    /// [`Notice`] bits for the connection's task.
    notices: AtomicU8,
    /// The connection's task, woken for a notice.
    task: AtomicWaker,
    /// The requests of HTTP/2 streams, which hyper runs in tasks of their own, woken when
    /// they are cut off (HTTP/1 requests run in the connection's task: waking it is enough).
    streams: Notify,
}

/// What the registry asks of a connection's task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Notice(u8);

impl Notice {
    /// Close once no request is in flight: to make room at the cap, or at shutdown.
    pub(crate) const CLOSE: Notice = Notice(1);
    /// The shutdown grace has ended: the requests in flight answer now.
    pub(crate) const CUT_OFF: Notice = Notice(2);
    /// None yet.
    pub(crate) const NONE: Notice = Notice(0);

    /// Whether `self` holds every bit of `other`.
    pub(crate) fn contains(self, other: Notice) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits of both.
    #[cfg(test)]
    pub(crate) fn union(self, other: Notice) -> Notice {
        Notice(self.0 | other.0)
    }

    /// The bits of `self` that `seen` lacks.
    pub(crate) fn since(self, seen: Notice) -> Notice {
        Notice(self.0 & !seen.0)
    }
}

/// A connection in the registry; leaves it when dropped (its task ended or was aborted).
pub(crate) struct Registered {
    connections: Arc<Connections>,
    state: Arc<ConnectionState>,
}

/// A request in flight on a connection, from its service call to its response. Counted when
/// hyper calls the service, in the connection's task, so that the task never sees a request
/// hyper has read as not in flight.
pub(crate) struct InFlight(Arc<ConnectionState>);

impl Connections {
    /// The registry of a listener admitting at most `limit` connections; the proxy port's
    /// counts in `metrics`.
    pub(crate) fn new(limit: usize, metrics: Option<ConnectionMetrics>) -> Arc<Connections> {
        let limit = limit.max(1);
        if let Some(metrics) = &metrics {
            metrics.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        Arc::new(Connections {
            limit,
            registry: Mutex::new(Registry {
                open: HashMap::new(),
                next_id: 0,
            }),
            metrics,
        })
    }

    /// Admits a new connection. At the cap, the connection idle the longest is asked to close
    /// to make room; with none idle, the new one is refused (`None`: the caller drops it).
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Registered> {
        let now = Instant::now();
        let mut registry = self.registry.lock();
        if registry.open.len() >= self.limit {
            let victim = longest_idle(registry.open.values().map(|state| state.idleness()))
                .and_then(|id| registry.open.get(&id));
            match victim {
                Some(victim) => {
                    victim.notify(Notice::CLOSE);
                    self.count(CloseReason::Cap);
                }
                None => {
                    drop(registry);
                    self.count(CloseReason::Refused);
                    return None;
                }
            }
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let state = Arc::new(ConnectionState {
            id,
            accepted: now,
            in_flight: AtomicU32::new(0),
            idle_mark: AtomicU64::new(0),
            notices: AtomicU8::new(0),
            task: AtomicWaker::new(),
            streams: Notify::new(),
        });
        registry.open.insert(id, state.clone());
        if let Some(metrics) = &self.metrics {
            metrics.open.inc();
        }
        Some(Registered {
            connections: self.clone(),
            state,
        })
    }

    /// Asks every open connection to close once its requests are answered (shutdown).
    pub(crate) fn close_all(&self) {
        self.notify_all(Notice::CLOSE);
    }

    /// Cuts off every request still in flight: each answers at once (shutdown, once the
    /// grace has ended).
    pub(crate) fn cut_off_all(&self) {
        self.notify_all(Notice::CUT_OFF);
    }

    /// Requests in flight on every open connection.
    pub(crate) fn requests_in_flight(&self) -> u64 {
        let registry = self.registry.lock();
        registry
            .open
            .values()
            .map(|state| u64::from(state.in_flight.load(Ordering::Acquire)))
            .sum()
    }

    /// Counts a connection wxgate closed itself.
    pub(crate) fn count(&self, reason: CloseReason) {
        if let Some(metrics) = &self.metrics {
            metrics.closed(reason);
        }
    }

    fn notify_all(&self, notice: Notice) {
        let registry = self.registry.lock();
        for state in registry.open.values() {
            state.notify(notice);
        }
    }
}

/// How idle one connection is, for choosing which to close at the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Idleness {
    id: u64,
    /// No request in flight and not already asked to close.
    idle: bool,
    /// Has carried a request.
    served: bool,
    since: Instant,
}

/// The connection to close at the cap: among those idle, one that never carried a request
/// before one that did (a client that connects and sends nothing is more likely a fault or
/// an attack than a keep-alive client between two requests), then the one idle since the
/// earliest. `None` when every connection has a request in flight.
fn longest_idle(connections: impl Iterator<Item = Idleness>) -> Option<u64> {
    connections
        .filter(|connection| connection.idle)
        .min_by_key(|connection| (connection.served, connection.since))
        .map(|connection| connection.id)
}

impl ConnectionState {
    /// A request starts; it counts as in flight until the guard is dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection was accepted: its head deadline counts from here.
    pub(crate) fn accepted(&self) -> Instant {
        self.accepted
    }

    /// Requests in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Completes once the requests of this connection are cut off at shutdown. An HTTP/1
    /// request is polled by the connection's own task, which [`Connections::cut_off_all`]
    /// wakes, so it only looks at the flag (no waker kept per request); an HTTP/2 request
    /// runs in a task of its own and waits on `streams`.
    pub(crate) async fn cut_off(&self, version: http::Version) {
        if version == http::Version::HTTP_2 {
            // Created before the flag is read, so a cut between the two is not missed.
            let notified = self.streams.notified();
            if !self.notices().contains(Notice::CUT_OFF) {
                notified.await;
            }
        } else {
            std::future::poll_fn(|_| {
                if self.notices().contains(Notice::CUT_OFF) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
    }

    /// The notices so far, registering the connection's task to be woken for the next one.
    pub(crate) fn poll_notices(&self, cx: &mut Context<'_>, seen: Notice) -> Poll<Notice> {
        self.task.register(cx.waker());
        let notices = self.notices();
        if notices.since(seen) == Notice::NONE {
            Poll::Pending
        } else {
            Poll::Ready(notices)
        }
    }

    /// Waits for a notice not in `seen`; resolves to every notice so far.
    pub(crate) fn next_notice(&self, seen: Notice) -> impl Future<Output = Notice> + '_ {
        std::future::poll_fn(move |cx| self.poll_notices(cx, seen))
    }

    fn notices(&self) -> Notice {
        Notice(self.notices.load(Ordering::Acquire))
    }

    fn notify(&self, notice: Notice) {
        self.notices.fetch_or(notice.0, Ordering::AcqRel);
        self.task.wake();
        if notice.contains(Notice::CUT_OFF) {
            self.streams.notify_waiters();
        }
    }

    fn idleness(&self) -> Idleness {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let mark = self.idle_mark.load(Ordering::Acquire);
        Idleness {
            id: self.id,
            idle: in_flight == 0 && !self.notices().contains(Notice::CLOSE),
            served: mark != 0,
            since: idle_since(self.accepted, mark),
        }
    }
}

impl InFlight {
    /// Completes once the request is cut off at shutdown (see [`ConnectionState::cut_off`]).
    pub(crate) fn cut_off(&self, version: http::Version) -> impl Future<Output = ()> + Send + '_ {
        self.0.cut_off(version)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.0;
        // The mark first: the watchdog reads it only after seeing the count at zero, so it
        // never pairs a zero count with the mark of an earlier idle spell.
        let since_accept = state.accepted.elapsed().as_millis();
        let mark = u64::try_from(since_accept).unwrap_or(u64::MAX - 1) + 1;
        state.idle_mark.store(mark, Ordering::Release);
        state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registered {
    /// The connection's state.
    pub(crate) fn state(&self) -> &Arc<ConnectionState> {
        &self.state
    }

    /// Whether the connection has had no request in flight past its deadline, or when to
    /// look again.
    pub(crate) fn verdict(&self, deadlines: Deadlines, now: Instant) -> Verdict {
        let state = &self.state;
        let in_flight = state.in_flight.load(Ordering::Acquire);
        let mark = state.idle_mark.load(Ordering::Acquire);
        deadlines.verdict(now, state.accepted, in_flight, mark)
    }

    /// Counts a connection wxgate closed itself.
    pub(crate) fn count(&self, reason: CloseReason) {
        self.connections.count(reason);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.registry.lock().open.remove(&self.state.id);
        if let Some(metrics) = &self.connections.metrics {
            metrics.open.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_cap_closes_a_never_served_connection_first_then_the_longest_idle() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let connection = |id, idle, served, since| Idleness {
            id,
            idle,
            served,
            since,
        };
        let open = [
            connection(0, false, true, at(0)),
            connection(1, true, true, at(1)),
            connection(2, true, false, at(5)),
            connection(3, true, false, at(4)),
        ];
        assert_eq!(longest_idle(open.into_iter()), Some(3));
        assert_eq!(longest_idle(open[..2].iter().copied()), Some(1));
        assert_eq!(longest_idle(open[..1].iter().copied()), None);
    }

    #[test]
    fn requests_in_flight_and_the_idle_mark() {
        let connections = Connections::new(2, None);
        let first = connections.admit().unwrap();
        let second = connections.admit().unwrap();
        assert!(!first.state().idleness().served);
        {
            let _request = first.state().request_started();
            let _other = first.state().request_started();
            assert_eq!(connections.requests_in_flight(), 2);
            assert!(!first.state().idleness().idle);
        }
        let idleness = first.state().idleness();
        assert!(idleness.idle && idleness.served);
        // At the cap the never-served one makes room, and is told so once.
        let third = connections.admit().unwrap();
        assert_eq!(second.state().notices(), Notice::CLOSE);
        assert_eq!(first.state().notices(), Notice::NONE);
        // Then the served one; then, with both asked already and the third busy, a refusal.
        let _busy = third.state().request_started();
        assert!(connections.admit().is_some());
        assert_eq!(first.state().notices(), Notice::CLOSE);
        assert!(connections.admit().is_none());
        drop((first, second));
        assert_eq!(connections.registry.lock().open.len(), 1);
    }
}
