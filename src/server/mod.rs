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
//!
//! - [`serving`]: one listener's accept loop, a connection's task and its watchdog, the drain.
//! - [`connections`]: the open connections, their requests in flight and the cap;
//!   [`deadlines`] the watchdog's decision; [`closes`] why wxgate closes a connection, and
//!   the connection metrics.
//! - [`policy`]: what a reload changes in a listener (`server.allow`, the deadlines);
//!   [`tls`]: HTTPS on the proxy port; [`open_files`]: the limit the cap must fit.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `POST /-/reload` on their own port;
//!   [`reload`]: the configuration read again (`SIGHUP`, `POST /-/reload`).

mod admin;
mod closes;
mod connections;
mod deadlines;
mod open_files;
mod policy;
mod reload;
mod serving;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use self::admin::Admin;
use self::closes::ConnectionMetrics;
use self::reload::ReloadMetrics;
use self::reload::Reloader;
use self::serving::{join_all, Serving};
use crate::cluster::Cluster;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::proxy::Proxy;

pub(crate) use policy::PortPolicy;

/// How often remembered answers are expired and idle quota keys dropped.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Open connections on the admin port at most: a Prometheus server and a few health probes.
/// It is part of the open files [`open_files`] keeps in reserve.
const ADMIN_MAX_CONNECTIONS: usize = 16;

/// How long scrapes in progress may finish at shutdown: the admin port holds no exit up.
const ADMIN_DRAIN: Duration = Duration::from_millis(100);

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
    /// The request pipeline could not be built.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
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
    let connection_metrics = ConnectionMetrics::new(&metrics)?;
    let reload_metrics = ReloadMetrics::new(&metrics)?;
    let cluster = start_cluster(&config, &metrics).await?;
    let proxy = Arc::new(Proxy::with_cluster(&config, &metrics, cluster.clone())?);
    let proxy_port = Arc::new(PortPolicy::proxy(&config.server));
    let admin_port = Arc::new(PortPolicy::admin(&config.server));
    let reloader = config_path.map(|path| {
        let ports = vec![proxy_port.clone(), admin_port.clone()];
        Arc::new(Reloader::new(
            path,
            config.clone(),
            proxy.clone(),
            ports,
            reload_metrics,
        ))
    });
    let admin = Arc::new(Admin::new(
        registry,
        cluster.clone(),
        reloader.clone(),
        proxy.clone(),
    ));
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
                    // In a task: this loop goes on, and a SIGHUP while the reload waits for
                    // its files is answered "in progress" (logged) rather than queued.
                    let reloader = reloader.clone();
                    tokio::spawn(async move { reloader.reload().await });
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
    metrics: &Metrics,
) -> Result<Option<Arc<Cluster>>, RunError> {
    let Some(settings) = &config.cluster else {
        return Ok(None);
    };
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
