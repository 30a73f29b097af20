//! The listeners: the proxy port and the admin port, their accept loops, the connections
//! they serve, housekeeping, and the drain on shutdown.
//!
//! [`run`] takes its listeners and its shutdown signal as arguments, so tests bind
//! `127.0.0.1:0`, read the ports, and stop the proxy with a channel instead of a signal.
//!
//! Each accepted connection is first screened ([`policy`]): a client outside `server.allow`
//! is closed before any of its bytes is read. The others are served by a task of their own
//! ([`Serving::serve`]), which runs the TLS handshake with `[server.tls]` ([`tls`]) and
//! watches the connection: the deadlines, the cap and the shutdown of [`connections`] close
//! it there, so that no client can hold sockets, file descriptors or requests open for ever.
//! The handshake counts as part of the request head: it must end within the head deadline.
//!
//! Shutdown: the listeners close, every connection is asked to close once its requests are
//! answered (HTTP/1.1 after the response in progress, HTTP/2 with a GOAWAY), and requests
//! still in flight when `server.shutdown_grace_ms` ends get wxgate's own 503 `-1`, written
//! before their connections close.

mod connections;
mod open_files;
mod policy;
mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
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
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::admin::Admin;
use crate::cluster::Cluster;
use crate::config::{Config, ServerConfig};
use crate::metrics::{ClusterMetrics, ConnectionMetrics, Metrics};
use crate::proxy::Proxy;
use crate::reload::Reloader;
use connections::{Connections, Deadlines, Notice, Registered, Verdict};

pub use connections::CloseReason;
pub(crate) use policy::PortPolicy;

/// How often remembered answers are expired and idle quota keys dropped.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Open connections on the admin port at most: a Prometheus server and a few health probes.
/// It is part of the open files [`open_files`] keeps in reserve.
const ADMIN_MAX_CONNECTIONS: usize = 16;

/// How long scrapes in progress may finish at shutdown: the admin port holds no exit up.
const ADMIN_DRAIN: Duration = Duration::from_millis(100);

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

/// The two bound listeners.
pub struct Listeners {
    /// Where backends send their WeChat calls.
    pub proxy: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `[server]`.
    pub async fn bind(config: &ServerConfig) -> std::io::Result<Listeners> {
        Ok(Listeners {
            proxy: bind(config.listen).await?,
            admin: bind(config.admin_listen).await?,
        })
    }

    /// Binds two free ports on 127.0.0.1 (tests, benches, the demo).
    pub async fn bind_local() -> std::io::Result<Listeners> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Ok(Listeners {
            proxy: TcpListener::bind(any).await?,
            admin: TcpListener::bind(any).await?,
        })
    }

    /// The proxy port's address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin port's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {addr}: {error}"))
    })
}

/// Why wxgate could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The upstream client could not be built.
    #[error("cannot build the upstream client: {0}")]
    Upstream(#[from] crate::upstream::InvalidBaseUrl),
    /// The metrics could not be registered.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Redis client refused the cluster configuration.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
/// within `server.shutdown_grace_ms`, answers those still in flight with wxgate's own 503
/// `-1`, and returns.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    run_reloadable(listeners, config, None, shutdown).await
}

/// [`run`], and with `config_path`, the configuration is read again from that file on
/// `SIGHUP` or `POST /-/reload` on the admin port (see `crate::reload`).
pub async fn run_reloadable(
    listeners: Listeners,
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry)?;
    let connection_metrics = metrics.connections.clone();
    let cluster = start_cluster(&config, &registry).await?;
    let proxy = Arc::new(Proxy::with_cluster(
        &config,
        metrics.clone(),
        cluster.clone(),
    )?);
    let proxy_port = Arc::new(PortPolicy::proxy(&config.server));
    let admin_port = Arc::new(PortPolicy::admin(&config.server));
    let reloader = config_path.map(|path| {
        let ports = vec![proxy_port.clone(), admin_port.clone()];
        Arc::new(Reloader::new(
            path,
            config.clone(),
            proxy.clone(),
            ports,
            metrics,
        ))
    });
    let admin = Arc::new(Admin::new(registry, cluster.clone(), reloader.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(reloader) = &reloader {
        tokio::spawn(reload_on_sighup(reloader.clone(), stop_rx.clone()));
    }
    let cluster_task = cluster.map(|cluster| tokio::spawn(cluster.run(stop_rx.clone())));
    let housekeeping = spawn_housekeeping(proxy.clone(), stop_rx.clone());

    let limit = connection_limit(&config.server);
    let serving = Serving::new(proxy, proxy_port, limit, Some(connection_metrics));
    tracing::info!(
        proxy = %address(&listeners.proxy),
        tls = config.server.tls.is_some(),
        admin = %address(&listeners.admin),
        upstream = %config.upstream.base_url,
        max_connections = limit,
        "wxgate serving"
    );
    let admin_task = spawn_admin(listeners.admin, admin.clone(), admin_port, stop_rx);
    admin.set_ready(true);
    let mut tasks = JoinSet::new();
    tokio::select! {
        () = serving.accept(listeners.proxy, &mut tasks) => {}
        () = shutdown => {}
    }
    // The proxy listener is closed by now: new connections are refused.
    admin.set_ready(false);
    let _ = stop_tx.send(true);
    let grace = reloader.map_or(config.server.shutdown_grace, |r| r.shutdown_grace());
    serving.drain(tasks, grace).await;
    let _ = admin_task.await;
    let _ = housekeeping.await;
    if let Some(task) = cluster_task {
        let _ = task.await;
    }
    Ok(())
}

/// Reloads the configuration on every `SIGHUP`, until `stop` turns true.
async fn reload_on_sighup(reloader: Arc<Reloader>, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reload through the admin port");
                return;
            }
        };
        loop {
            tokio::select! {
                Some(()) = hangups.recv() => {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    reloader.reload();
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, stop.wait_for(|stop| *stop).await);
    }
}

/// With `[cluster]`: the replica's shared state, after its first heartbeat.
async fn start_cluster(
    config: &Config,
    registry: &prometheus::Registry,
) -> Result<Option<Arc<Cluster>>, RunError> {
    let Some(settings) = &config.cluster else {
        return Ok(None);
    };
    let metrics = ClusterMetrics::new(registry)?;
    let cluster = Arc::new(Cluster::new(settings, config.quota.window, metrics)?);
    // The first heartbeat decides the mode requests start in (shared, or degraded when Redis
    // does not answer); it takes at most `cluster.timeout_ms`.
    cluster.start().await;
    Ok(Some(cluster))
}

/// Expires remembered answers and drops idle quota keys every second until `stop`.
fn spawn_housekeeping(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => proxy.housekeeping(),
                _ = stop.changed() => return,
            }
        }
    })
}

/// Serves the admin port until `stop`, under the proxy port's deadlines and a small cap of
/// its own.
fn spawn_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    policy: Arc<PortPolicy>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let serving = Serving::new(admin, policy, ADMIN_MAX_CONNECTIONS, None);
    tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        tokio::select! {
            () = serving.accept(listener, &mut tasks) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
        // Scrapes are short; the admin port does not hold the exit up.
        serving.connections.close_all();
        let _ = tokio::time::timeout(ADMIN_DRAIN, join_all(&mut tasks)).await;
    })
}

/// The cap on client connections: `server.max_connections`, lowered to fit the open-files
/// limit (raised first to its hard limit).
fn connection_limit(server: &ServerConfig) -> usize {
    let configured = server.max_connections;
    let limit = open_files::connection_limit(configured, open_files::raise_limit());
    if limit < configured {
        tracing::warn!(
            max_connections = limit,
            configured,
            "server.max_connections lowered to fit the open-files limit"
        );
    }
    limit
}

fn address(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}

/// What answers the requests of one listener.
trait Answerer: Send + Sync + 'static {
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
struct Serving<A> {
    answerer: Arc<A>,
    builder: auto::Builder<TokioExecutor>,
    policy: Arc<PortPolicy>,
    connections: Arc<Connections>,
}

impl<A: Answerer> Serving<A> {
    fn new(
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
    async fn accept(self: &Arc<Self>, listener: TcpListener, tasks: &mut JoinSet<()>) {
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
    async fn drain(&self, mut tasks: JoinSet<()>, grace: Duration) {
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
async fn join_all(tasks: &mut JoinSet<()>) {
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
