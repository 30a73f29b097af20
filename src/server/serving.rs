//! How one listener serves: the accept loop, each connection's task (the TLS handshake,
//! hyper's HTTP/1.1 and HTTP/2, the watchdog of its deadlines and notices) and the drain at
//! shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admin::Admin;
use super::closes::{CloseReason, ConnectionMetrics};
use super::connections::{Connections, Notice, Registered};
use super::deadlines::{Deadlines, Verdict};
use super::PortPolicy;
use crate::proxy::Proxy;

/// HTTP/2 pings: a peer that has not acknowledged one within the timeout is dead (its host
/// went away without closing) and its connection is closed, requests in flight included.
/// Connections without a request in flight are closed by the idle deadline anyway.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connection shut down gracefully (idle, or at shutdown) may take to finish on
/// its own once no request is in flight: an HTTP/2 GOAWAY waits for the peer's ping
/// acknowledgement, a head half sent keeps HTTP/1.1 reading. Then it is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// After the shutdown grace: how long the answers of the requests cut off may take to be
/// written before the remaining connections are dropped (more than [`CLOSE_LINGER`], after
/// which each connection drops itself).
const CUT_OFF_WRITE: Duration = Duration::from_secs(2);

/// After a failed accept (out of file descriptors and the like): back off instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What answers the requests of one listener.
pub(super) trait Answerer: Send + Sync + 'static {
    /// Answers `request`. `cut_off` completes if the shutdown grace ends first: the request
    /// is then answered at once.
    fn answer<C>(
        self: Arc<Self>,
        request: Request<Incoming>,
        cut_off: C,
    ) -> impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send
    where
        C: Future<Output = ()> + Send;
}

impl Answerer for Proxy {
    fn answer<C>(
        self: Arc<Self>,
        request: Request<Incoming>,
        cut_off: C,
    ) -> impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send
    where
        C: Future<Output = ()> + Send,
    {
        self.handle_until(request, cut_off)
    }
}

impl Answerer for Admin {
    fn answer<C>(
        self: Arc<Self>,
        request: Request<Incoming>,
        _cut_off: C,
    ) -> impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send
    where
        C: Future<Output = ()> + Send,
    {
        // Admin answers never wait on anything.
        self.handle(request)
    }
}

/// One listener's way of serving: what answers, the protocols' settings, who may connect and
/// the deadlines of connections without a request (reloadable), and the open connections
/// under their cap.
pub(super) struct Serving<A> {
    answerer: Arc<A>,
    builder: auto::Builder<TokioExecutor>,
    policy: Arc<PortPolicy>,
    pub(super) connections: Arc<Connections>,
}

impl<A: Answerer> Serving<A> {
    pub(super) fn new(
        answerer: Arc<A>,
        policy: Arc<PortPolicy>,
        limit: usize,
        metrics: Option<ConnectionMetrics>,
    ) -> Arc<Serving<A>> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The watchdog bounds the time to a head from the accept and between requests
        // (connections.rs). hyper's own header timer would also cut a keep-alive connection
        // idle for its duration, and costs a boxed timer per request.
        builder.http1().keep_alive(true).header_read_timeout(None);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Arc::new(Serving {
            answerer,
            builder,
            policy,
            connections: Connections::new(limit, metrics),
        })
    }

    /// Accepts connections for ever (the caller stops by dropping this future, which closes
    /// the listener), serving each in a task of `tasks` and reaping the tasks that ended.
    pub(super) async fn accept(self: &Arc<Self>, listener: TcpListener, tasks: &mut JoinSet<()>) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let stream = match accepted {
                Ok((stream, peer)) => {
                    if !self.policy.allows(peer.ip()) {
                        // Dropped unread: closed before any byte or handshake, and before it
                        // could take a place under the cap from an allowed client.
                        self.connections.count(CloseReason::NotAllowed);
                        tracing::debug!(%peer, "connection closed: not in server.allow");
                        continue;
                    }
                    stream
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // At the cap with no connection idle: refused, by closing it at once.
            if let Some(registered) = self.connections.admit() {
                tasks.spawn(self.clone().serve(stream, registered));
            }
        }
    }

    /// Serves one connection, over TLS with `[server.tls]`, until it ends.
    async fn serve(self: Arc<Self>, stream: TcpStream, registered: Registered) {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = self.policy.tls().map(|tls| tls.acceptor().clone()) else {
            return self.serve_http(stream, registered).await;
        };
        if let Some(stream) = self.handshake(acceptor, stream, &registered).await {
            self.serve_http(stream, registered).await;
        }
    }

    /// The TLS handshake of a new connection, under the head deadline (counted from the
    /// accept, like a request head's: a client that connects and never finishes its
    /// handshake is closed as a silent socket is), and given up when the connection is asked
    /// to close (at the cap, or at shutdown: it has no request in flight).
    async fn handshake(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        registered: &Registered,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let state = registered.state();
        let deadline = state.accepted() + self.policy.deadlines().head;
        tokio::select! {
            biased;
            handshake = acceptor.accept(stream) => match handshake {
                Ok(stream) => Some(stream),
                Err(error) => {
                    // A client that closes before its hello (a load balancer's TCP check) is
                    // no failure; one that sent plain HTTP, or refused the certificate, is.
                    if error.kind() != std::io::ErrorKind::UnexpectedEof {
                        registered.count(CloseReason::TlsHandshake);
                    }
                    tracing::debug!(%error, "TLS handshake failed");
                    None
                }
            },
            _ = state.next_notice(Notice::NONE) => None,
            () = tokio::time::sleep_until(deadline) => {
                registered.count(CloseReason::HeadTimeout);
                None
            }
        }
    }

    /// Serves HTTP on one connection (HTTP/1.1 with keep-alive, or HTTP/2: by prior
    /// knowledge, or by ALPN over TLS) until it ends, and closes it when the watchdog, the
    /// cap or the shutdown says so.
    ///
    /// A connection with no request in flight is closed at once when it is overdue for its
    /// first head or asked to make room at the cap. One idle after a request is shut down
    /// gracefully (an HTTP/2 client gets a GOAWAY), and so is one asked to close at shutdown:
    /// requests in flight finish first. Either is dropped [`CLOSE_LINGER`] after it has no
    /// request left, if it has not ended by itself.
    async fn serve_http<I>(self: Arc<Self>, stream: I, registered: Registered)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = registered.state().clone();
        let service = {
            let answerer = self.answerer.clone();
            service_fn(move |request: Request<Incoming>| {
                // Counted here, in the connection's task, as hyper calls the service.
                let in_flight = state.request_started();
                let answerer = answerer.clone();
                async move {
                    let cut_off = in_flight.cut_off(request.version());
                    answerer.answer(request, cut_off).await
                }
            })
        };
        let state = registered.state();
        let mut connection = pin!(self.builder.serve_connection(TokioIo::new(stream), service));
        // From the accept: a TLS handshake has spent part of the head's time already.
        let mut watchdog = pin!(tokio::time::sleep_until(
            state.accepted() + self.policy.deadlines().head
        ));
        let mut watch = Watch::default();
        loop {
            let step = tokio::select! {
                biased;
                // Errors here are clients going away mid-request; nothing to do about them.
                _ = connection.as_mut() => return,
                notices = state.next_notice(watch.seen) => watch.on_notices(notices, state.in_flight()),
                () = watchdog.as_mut() => watch.on_deadline(&registered, self.policy.deadlines()),
            };
            match step {
                Step::Close => return,
                Step::Shutdown { check_at } => {
                    connection.as_mut().graceful_shutdown();
                    watchdog.as_mut().reset(check_at);
                }
                Step::CheckAt(at) => watchdog.as_mut().reset(at),
            }
        }
    }

    /// Once the listener is closed: asks every connection to close once its requests are
    /// answered and waits for them within `grace`; then cuts off the requests still in
    /// flight (each answers wxgate's 503 `-1`) and gives their answers [`CUT_OFF_WRITE`] to
    /// be written. Connections still open after that are dropped with `tasks`.
    pub(super) async fn drain(&self, mut tasks: JoinSet<()>, grace: Duration) {
        tracing::info!(grace_ms = grace.as_millis() as u64, "wxgate draining");
        self.connections.close_all();
        if tokio::time::timeout(grace, join_all(&mut tasks))
            .await
            .is_ok()
        {
            tracing::info!("wxgate drained");
            return;
        }
        tracing::warn!(
            requests = self.connections.requests_in_flight(),
            "wxgate shutdown grace elapsed: answering the requests still in flight with 503"
        );
        self.connections.cut_off_all();
        let _ = tokio::time::timeout(CUT_OFF_WRITE, join_all(&mut tasks)).await;
    }
}

/// What a connection's task has seen of its notices and whether it is closing.
#[derive(Default)]
struct Watch {
    seen: Notice,
    closing: bool,
}

/// What a connection's task does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Drop the connection: nothing in flight is lost.
    Close,
    /// Shut the connection down gracefully, and look again then.
    Shutdown { check_at: Instant },
    /// Look again then.
    CheckAt(Instant),
}

impl Watch {
    /// New notices: asked to close, the connection closes at once with no request in
    /// flight, gracefully otherwise; cut off, its requests answer now, and their answers get
    /// [`CLOSE_LINGER`] to be written.
    fn on_notices(&mut self, notices: Notice, in_flight: u32) -> Step {
        let new = notices.since(self.seen);
        self.seen = notices;
        let check_at = Instant::now() + CLOSE_LINGER;
        if new.contains(Notice::CLOSE) && !self.closing {
            if in_flight == 0 {
                return Step::Close;
            }
            self.closing = true;
            return Step::Shutdown { check_at };
        }
        Step::CheckAt(check_at)
    }

    /// The watchdog's timer fired. Closing: the connection is dropped once no request is in
    /// flight. Otherwise its deadline is checked: overdue for its first head, it is dropped
    /// (there is no one to be polite to); idle after a request, it is shut down gracefully.
    fn on_deadline(&mut self, registered: &Registered, deadlines: Deadlines) -> Step {
        let now = Instant::now();
        if self.closing {
            return if registered.state().in_flight() == 0 {
                Step::Close
            } else {
                Step::CheckAt(now + CLOSE_LINGER)
            };
        }
        match registered.verdict(deadlines, now) {
            Verdict::CheckAt(at) => Step::CheckAt(at),
            Verdict::Close(reason) => {
                registered.count(reason);
                if reason != CloseReason::Idle {
                    return Step::Close;
                }
                self.closing = true;
                Step::Shutdown {
                    check_at: now + CLOSE_LINGER,
                }
            }
        }
    }
}

/// Waits for every task of `tasks` to end.
pub(super) async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_asked_to_close_closes_at_once_unless_a_request_is_in_flight() {
        let mut idle = Watch::default();
        assert_eq!(idle.on_notices(Notice::CLOSE, 0), Step::Close);

        let mut busy = Watch::default();
        assert!(matches!(
            busy.on_notices(Notice::CLOSE, 1),
            Step::Shutdown { .. }
        ));
        // Cut off at the end of the grace: no second shutdown, time for the answers.
        let cut = Notice::CLOSE.union(Notice::CUT_OFF);
        assert!(matches!(busy.on_notices(cut, 1), Step::CheckAt(_)));
    }

    #[test]
    fn the_watchdog_drops_a_silent_connection_and_shuts_an_idle_one_down() {
        let connections = Connections::new(10, None);
        let instant = Deadlines {
            head: Duration::ZERO,
            idle: Duration::ZERO,
        };
        let silent = connections.admit().unwrap();
        assert_eq!(Watch::default().on_deadline(&silent, instant), Step::Close);

        let served = connections.admit().unwrap();
        drop(served.state().request_started());
        let mut watch = Watch::default();
        assert!(matches!(
            watch.on_deadline(&served, instant),
            Step::Shutdown { .. }
        ));
        // Once closing, a request that slipped in is let finish, then the connection drops.
        let late = served.state().request_started();
        assert!(matches!(
            watch.on_deadline(&served, instant),
            Step::CheckAt(_)
        ));
        drop(late);
        assert_eq!(watch.on_deadline(&served, instant), Step::Close);

        let patient = Deadlines {
            head: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        };
        let fresh = connections.admit().unwrap();
        assert!(matches!(
            Watch::default().on_deadline(&fresh, patient),
            Step::CheckAt(_)
        ));
    }
}
