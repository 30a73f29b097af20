//! The listeners: the proxy port and the admin port, their accept loops, housekeeping, and
//! the graceful drain on shutdown.
//!
//! [`run`] takes its listeners and its shutdown signal as arguments, so tests bind
//! `127.0.0.1:0`, read the ports, and stop the proxy with a channel instead of a signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::cluster::Cluster;
use crate::config::{Config, ServerConfig};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::proxy::Proxy;
use crate::reload::Reloader;

/// How often remembered answers are expired and idle quota keys dropped.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// A client that has not sent its request headers within this time is disconnected, so
/// idle or slow sockets cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
/// within `server.shutdown_grace_ms`, and returns.
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
    let cluster = match &config.cluster {
        Some(settings) => {
            let metrics = ClusterMetrics::new(&registry)?;
            let cluster = Arc::new(Cluster::new(settings, config.quota.window, metrics)?);
            // The first heartbeat decides the mode requests start in (shared, or degraded
            // when Redis does not answer); it takes at most `cluster.timeout_ms`.
            cluster.start().await;
            Some(cluster)
        }
        None => None,
    };
    let proxy = Arc::new(Proxy::with_cluster(
        &config,
        metrics.clone(),
        cluster.clone(),
    )?);
    let reloader = config_path
        .map(|path| Arc::new(Reloader::new(path, config.clone(), proxy.clone(), metrics)));
    let admin = Arc::new(Admin::new(registry, cluster.clone(), reloader.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(reloader) = reloader {
        tokio::spawn(reload_on_sighup(reloader, stop_rx.clone()));
    }
    let cluster_task = cluster.map(|cluster| tokio::spawn(cluster.run(stop_rx.clone())));

    let housekeeping = {
        let proxy = proxy.clone();
        let mut stop = stop_rx.clone();
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
    };

    let admin_addr = listeners
        .admin
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let admin_loop = {
        let admin = admin.clone();
        let stop = stop_rx.clone();
        let listener = listeners.admin;
        tokio::spawn(async move {
            let graceful = GracefulShutdown::new();
            accept_loop(listener, stop, &graceful, move |request| {
                admin.clone().handle(request)
            })
            .await;
            // Scrapes are short; the admin port does not hold the exit up.
            let _ = tokio::time::timeout(Duration::from_millis(100), graceful.shutdown()).await;
        })
    };

    tracing::info!(
        proxy = %listeners.proxy.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        admin = %admin_addr,
        upstream = %config.upstream.base_url,
        "wxgate serving"
    );
    admin.set_ready(true);
    let graceful = GracefulShutdown::new();
    let handler = proxy.clone();
    tokio::select! {
        () = accept_loop(listeners.proxy, stop_rx, &graceful, move |request| handler.clone().handle(request)) => {}
        () = shutdown => {}
    }
    // The proxy listener is closed by now: new connections are refused.
    admin.set_ready(false);
    let _ = stop_tx.send(true);
    let grace = config.server.shutdown_grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "wxgate draining");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("wxgate drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("wxgate shutdown grace elapsed with requests still in flight")
        }
    }
    let _ = admin_loop.await;
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

/// Accepts connections until `stop` turns true, serving each with `handle` on HTTP/1.1
/// (keep-alive) or HTTP/2 prior knowledge (h2c), and registering each with `graceful`.
async fn accept_loop<H, F>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    graceful: &GracefulShutdown,
    handle: H,
) where
    H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<
            Output = Result<
                http::Response<http_body_util::Full<bytes::Bytes>>,
                std::convert::Infallible,
            >,
        > + Send
        + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let connection = builder
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are clients going away mid-request; nothing to do about them.
            let _ = connection.await;
        });
    }
}
