//! The replica's connection to Redis in each form of `[cluster]` ([`RedisConnection`]):
//! one endpoint through redis-rs's `ConnectionManager` (which reconnects by itself with
//! exponential backoff), the primary that the sentinels name (found again after a
//! failover), or Redis Cluster through redis-rs's cluster client (which follows `MOVED` and
//! `ASK` and learns the slots again when a shard fails over).
//!
//! Every form speaks RESP3, so published messages arrive as pushes on the connection itself
//! and go to one channel that [`super::notices`] reads. Subscriptions come back by
//! themselves after a reconnection; with Sentinel, a connection to a new primary is new,
//! and the cluster layer subscribes again to what its waiters wait on.
//!
//! # Sentinel
//! redis-rs's `Sentinel` asks the sentinels for the primary, but it builds plain clients (no
//! backoff, no push messages), its TLS to the sentinels cannot take `cluster.ca_file`, and
//! its look-ups have no deadline. So the primary is asked for here:
//! `SENTINEL get-master-addr-by-name` of every sentinel at once, within the connection
//! timeout, the first answer in the configured order taken, and a `ConnectionManager` made
//! for it. Once an operation fails (a primary gone, or demoted: `READONLY`), the connection
//! is *stale*: the next probe of the degraded replica asks the sentinels again, and switches
//! when they name another primary. A request never waits for the sentinels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, PushInfo, RedisError, RedisResult, ScriptInvocation};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{Credentials, NodeAddress, NodeSettings, RedisForm, RedisTarget};

/// The replica's connection, in the form `[cluster]` names.
pub enum RedisConnection {
    /// `cluster.redis_url`.
    Standalone(ConnectionManager),
    /// `cluster.sentinels`.
    Sentinel(Box<SentinelConnection>),
    /// `cluster.cluster_nodes`.
    Cluster(ClusterConnection),
}

/// The primary the sentinels name, and how to find it again.
pub struct SentinelConnection {
    sentinels: Vec<redis::Client>,
    master: String,
    settings: NodeSettings,
    certificates: Option<redis::TlsCertificates>,
    /// The primary's address and the connection to it; `None` before the first look-up.
    current: Mutex<Option<(NodeAddress, ConnectionManager)>>,
    /// An operation failed since the last look-up: ask the sentinels again.
    stale: AtomicBool,
    push: UnboundedSender<PushInfo>,
    connect_timeout: Duration,
}

impl RedisConnection {
    /// The connection of `target`, made lazily: nothing is connected until the first
    /// operation. Pushed messages go to `push`.
    pub fn new(
        target: &RedisTarget,
        push: UnboundedSender<PushInfo>,
        connect_timeout: Duration,
    ) -> RedisResult<RedisConnection> {
        let certificates = target.tls_certificates();
        match &target.form {
            RedisForm::Standalone(url) => {
                let client = client(url.connection_info(), certificates)?;
                let manager = manager(client, push, connect_timeout)?;
                Ok(RedisConnection::Standalone(manager))
            }
            RedisForm::Sentinel {
                sentinels,
                master,
                nodes,
                sentinel_credentials,
            } => {
                let sentinels = sentinels
                    .iter()
                    .map(|sentinel| {
                        let info = sentinel_settings(nodes, sentinel_credentials)
                            .connection_info(sentinel);
                        client(info, certificates.clone())
                    })
                    .collect::<RedisResult<_>>()?;
                Ok(RedisConnection::Sentinel(Box::new(SentinelConnection {
                    sentinels,
                    master: master.clone(),
                    settings: nodes.clone(),
                    certificates,
                    current: Mutex::new(None),
                    stale: AtomicBool::new(true),
                    push,
                    connect_timeout,
                })))
            }
            RedisForm::Cluster { nodes, settings } => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(
                    nodes.iter().map(|node| settings.connection_info(node)),
                )
                .use_protocol(redis::ProtocolVersion::RESP3)
                .connection_timeout(connect_timeout)
                // A MOVED or ASK (resharding, a failover) is followed at once; other retries
                // stay short: past `cluster.timeout_ms` the replica stops waiting anyway, and
                // its probe tries again.
                .retries(5)
                .min_retry_wait(10)
                .max_retry_wait(100);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let client = builder.build()?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_push_sender(push);
                Ok(RedisConnection::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }

    /// Runs a script; its reply.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        let result = match self {
            RedisConnection::Standalone(manager) => {
                invocation.invoke_async(&mut manager.clone()).await
            }
            RedisConnection::Sentinel(sentinel) => match sentinel.manager() {
                Some(mut manager) => invocation.invoke_async(&mut manager).await,
                None => Err(no_primary()),
            },
            RedisConnection::Cluster(cluster) => {
                invocation.invoke_async(&mut cluster.clone()).await
            }
        };
        self.note(&result);
        result
    }

    /// Runs one command, its reply ignored.
    pub async fn exec(&self, command: &Cmd) -> RedisResult<()> {
        let result = match self {
            RedisConnection::Standalone(manager) => command.exec_async(&mut manager.clone()).await,
            RedisConnection::Sentinel(sentinel) => match sentinel.manager() {
                Some(mut manager) => command.exec_async(&mut manager).await,
                None => Err(no_primary()),
            },
            RedisConnection::Cluster(cluster) => command.exec_async(&mut cluster.clone()).await,
        };
        self.note(&result);
        result
    }

    /// Subscribes to `channel`: a sharded channel on Redis Cluster (see
    /// [`RedisConnection::sharded`]), else a classic one.
    pub async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        let result = match self {
            RedisConnection::Standalone(manager) => manager.clone().subscribe(channel).await,
            RedisConnection::Sentinel(sentinel) => match sentinel.manager() {
                Some(mut manager) => manager.subscribe(channel).await,
                None => Err(no_primary()),
            },
            RedisConnection::Cluster(cluster) => {
                let mut cluster = cluster.clone();
                match cluster.ssubscribe(channel).await {
                    // A Redis 6 cluster has no sharded pub/sub: its PUBLISH reaches every
                    // node, so a classic subscription anywhere hears it.
                    Err(error) if is_unknown_command(&error) => cluster.subscribe(channel).await,
                    other => other,
                }
            }
        };
        self.note(&result);
        result
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            RedisConnection::Standalone(manager) => manager.clone().unsubscribe(channel).await,
            RedisConnection::Sentinel(sentinel) => match sentinel.manager() {
                Some(mut manager) => manager.unsubscribe(channel).await,
                None => Ok(()),
            },
            RedisConnection::Cluster(cluster) => {
                let mut cluster = cluster.clone();
                let sharded = cluster.sunsubscribe(channel).await;
                let classic = cluster.unsubscribe(channel).await;
                sharded.or(classic)
            }
        }
    }

    /// Whether results are published on sharded channels (`SPUBLISH`): on Redis Cluster,
    /// where a classic message goes to every node, and a sharded one only to its shard.
    pub fn sharded(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// With Sentinel, asks the sentinels for the primary if an operation failed since the
    /// last look-up (the probe of a degraded replica calls this): whether the connection
    /// now goes to another primary (its subscriptions are then to be made again).
    pub async fn refresh(&self) -> bool {
        match self {
            RedisConnection::Sentinel(sentinel) => sentinel.refresh().await,
            _ => false,
        }
    }

    /// Takes note of an operation's result: a failure makes a Sentinel connection stale.
    fn note<T>(&self, result: &RedisResult<T>) {
        if let (RedisConnection::Sentinel(sentinel), Err(error)) = (self, result) {
            // A script's own error (a key of another type, say) is not the primary's fault.
            if !matches!(
                error.kind(),
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
            ) {
                sentinel.stale.store(true, Ordering::Release);
            }
        }
    }
}

impl SentinelConnection {
    /// The connection to the primary, if one was found.
    fn manager(&self) -> Option<ConnectionManager> {
        self.current
            .lock()
            .as_ref()
            .map(|(_, manager)| manager.clone())
    }

    /// See [`RedisConnection::refresh`].
    async fn refresh(&self) -> bool {
        if !self.stale.load(Ordering::Acquire) {
            return false;
        }
        let Ok(primary) = self.ask_sentinels().await else {
            return false;
        };
        self.stale.store(false, Ordering::Release);
        let mut current = self.current.lock();
        if current
            .as_ref()
            .is_some_and(|(address, _)| *address == primary)
        {
            return false;
        }
        let info = self.settings.connection_info(&primary);
        let made = client(info, self.certificates.clone())
            .and_then(|client| manager(client, self.push.clone(), self.connect_timeout));
        match made {
            Ok(manager) => {
                tracing::info!(
                    primary = %primary,
                    "the sentinels name a primary: Redis operations go to it"
                );
                *current = Some((primary, manager));
                true
            }
            Err(_) => false,
        }
    }

    /// The primary's address by the first sentinel (in the configured order) that names
    /// one, all asked at once within the connection timeout.
    async fn ask_sentinels(&self) -> RedisResult<NodeAddress> {
        ask_sentinels(&self.sentinels, &self.master, self.connect_timeout).await
    }
}

/// The primary of `master` as the first of `sentinels` that answers names it, all asked at
/// once within `within`.
pub async fn ask_sentinels(
    sentinels: &[redis::Client],
    master: &str,
    within: Duration,
) -> RedisResult<NodeAddress> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(within))
        .set_response_timeout(Some(within));
    let asks = sentinels.iter().map(|sentinel| {
        let config = config.clone();
        async move {
            let mut connection = sentinel
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let answer: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(master)
                .query_async(&mut connection)
                .await?;
            answer
                .map(|(host, port)| NodeAddress { host, port })
                .ok_or_else(unknown_master)
        }
    });
    let answers = tokio::time::timeout(within, futures_util::future::join_all(asks))
        .await
        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?;
    let mut first_error = None;
    for answer in answers {
        match answer {
            Ok(primary) => return Ok(primary),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error.unwrap_or_else(unknown_master))
}

/// The settings of a connection to a sentinel: the nodes' TLS, the sentinels' own
/// credentials.
pub fn sentinel_settings(nodes: &NodeSettings, credentials: &Credentials) -> NodeSettings {
    NodeSettings {
        tls: nodes.tls,
        credentials: credentials.clone(),
    }
}

/// A client for `info`, trusting `certificates` (else the public roots) for TLS.
pub fn client(
    info: redis::ConnectionInfo,
    certificates: Option<redis::TlsCertificates>,
) -> RedisResult<redis::Client> {
    match certificates {
        Some(certificates) if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
            redis::Client::build_with_tls(info, certificates)
        }
        _ => redis::Client::open(info),
    }
}

/// A connection manager for `client`, made lazily, with the replica's settings: pushes to
/// `push`, subscriptions made again after a reconnection, reconnection backing off from
/// 100 ms to at most 2 s (a Redis that comes back is found quickly, and a dead one is not
/// hammered).
fn manager(
    client: redis::Client,
    push: UnboundedSender<PushInfo>,
    connect_timeout: Duration,
) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_push_sender(push)
        .set_automatic_resubscription()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(None)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(3);
    ConnectionManager::new_lazy_with_config(client, config)
}

/// The error of an operation tried before the sentinels named a primary.
fn no_primary() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "no primary named by the sentinels yet",
    ))
}

/// The error of sentinels that know no primary of that name.
fn unknown_master() -> RedisError {
    RedisError::from((
        redis::ErrorKind::MasterNameNotFoundBySentinel,
        "no sentinel names a primary of cluster.sentinel_master",
    ))
}

/// Whether Redis does not know a command (`SSUBSCRIBE` on Redis 6).
fn is_unknown_command(error: &RedisError) -> bool {
    error.to_string().contains("unknown command")
}
