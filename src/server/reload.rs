//! Reloading the configuration without a restart (`SIGHUP`, or `wxgate reload`, which asks
//! the admin port): the file is read and validated again, and what can change while serving
//! changes; no connection or queued request is dropped.
//!
//! - A file with any problem is refused whole: every problem is logged as `check-config`
//!   prints it, the running configuration stays, and the failure is counted.
//! - Settings that need new sockets or a new Redis connection (the listen addresses, TLS
//!   turned on or off, `[upstream]`, `[cluster]`), the connection cap (fitted to the
//!   open-files limit at start), `[log]` (set up once) and the quota window (every bucket,
//!   the retry policy and the replicas' agreement are built on it) are reported as needing a
//!   restart and kept as they were (`RestartOnly`: each with its key path, checked at
//!   compile time against the configuration's fields); everything else takes effect: in
//!   the request pipeline (see `Proxy::reconfigure`) and in the listeners (`server.allow`,
//!   the connection deadlines and the TLS certificate, see `PortPolicy::reconfigure`).
//!
//! # A file that hangs
//! The files are read (and the configuration checked) on a thread of their own, never on the
//! runtime: a path on a FIFO or on a hung NFS or FUSE mount blocks that thread alone, while
//! requests, `/healthz` and shutdown go on. A reload whose files are not read within
//! [`READ_DEADLINE`] is answered "timed out" and counted as a failure; its thread is left to
//! finish (or not) and its result is thrown away. One reload at a time: another asked for
//! meanwhile is answered at once ("a reload is in progress"), never queued; and while
//! [`MAX_HUNG_READS`] reads still hang past their deadline, a reload is refused without
//! starting another thread.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::{Gauge, IntCounter, IntGauge};
use tokio::sync::oneshot;

use super::PortPolicy;
use crate::config::{config_key, Config, ConfigErrors};
use crate::metrics::{Label, Metrics, Series};
use crate::proxy::Proxy;

/// How long a reload waits for its files to be read and checked: far longer than any local
/// file takes, short enough that an operator gets an answer (`wxgate reload` waits 30 s).
pub const READ_DEADLINE: Duration = Duration::from_secs(10);

/// How many reads may still hang past their deadline, each holding a thread, before reloads
/// are refused without trying: enough to reload once a FIFO or a dead mount has been
/// replaced by a file, few enough that a path that always hangs cannot pile threads up.
pub const MAX_HUNG_READS: usize = 4;

/// Reloads one configuration file into one running proxy.
pub struct Reloader {
    path: PathBuf,
    /// The configuration in force (the restart-only parts as started).
    current: Mutex<Config>,
    proxy: Arc<Proxy>,
    /// The listeners' policies: allow-list, deadlines, certificate.
    ports: Vec<Arc<PortPolicy>>,
    metrics: ReloadMetrics,
    /// A reload is waiting for its files: another one is answered at once.
    pending: AtomicBool,
    /// Threads still reading files, those of reloads already answered "timed out" included.
    reading: Arc<AtomicUsize>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The new configuration is in force, but for these keys, which need a restart.
    Applied {
        /// Key paths whose new values wait for a restart.
        needs_restart: Vec<&'static str>,
    },
    /// The file was refused; the running configuration stays.
    Refused {
        /// Every problem, as `check-config` prints them.
        problems: Vec<String>,
    },
    /// Another reload is waiting for its files: this one did nothing.
    InProgress,
    /// The files were not read within [`READ_DEADLINE`]; the running configuration stays.
    TimedOut,
    /// [`MAX_HUNG_READS`] earlier reads still hang: nothing was read; the running
    /// configuration stays.
    Hung,
}

impl Reloader {
    /// A reloader of `path` for `proxy` and the listeners of `ports`, which run `current`.
    pub(crate) fn new(
        path: PathBuf,
        current: Config,
        proxy: Arc<Proxy>,
        ports: Vec<Arc<PortPolicy>>,
        metrics: ReloadMetrics,
    ) -> Reloader {
        metrics.reloaded(true, now_seconds());
        Reloader {
            path,
            current: Mutex::new(current),
            proxy,
            ports,
            metrics,
            pending: AtomicBool::new(false),
            reading: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// `server.shutdown_grace_ms` in force: read at shutdown, so a reload changes it.
    pub fn shutdown_grace(&self) -> Duration {
        self.current.lock().server.shutdown_grace
    }

    /// Reads the file again and applies what can change while serving, in a task of its
    /// own: a caller that stops waiting (an admin client hanging up) cancels nothing.
    pub async fn reload(self: &Arc<Self>) -> Reloaded {
        let reloader = self.clone();
        tokio::spawn(async move { reloader.reload_here().await })
            .await
            .unwrap_or_else(|_| Reloaded::Refused {
                problems: vec!["the reload ended before its answer (wxgate is stopping)".into()],
            })
    }

    /// One reload, unless another is waiting for its files.
    async fn reload_here(&self) -> Reloaded {
        let Some(_pending) = PendingReload::take(&self.pending) else {
            tracing::warn!(file = %self.path.display(), "a reload is in progress: this one does nothing");
            return Reloaded::InProgress;
        };
        self.read_and_apply().await
    }

    /// Reads and checks the file off the runtime, within [`READ_DEADLINE`], then applies it.
    async fn read_and_apply(&self) -> Reloaded {
        let hung = self.reading.load(Ordering::Acquire);
        if hung >= MAX_HUNG_READS {
            tracing::error!(file = %self.path.display(), hung, "reload refused: earlier reads of the configuration's files still hang (a FIFO, or a hung mount?); restart wxgate to reload");
            self.metrics.reloaded(false, now_seconds());
            return Reloaded::Hung;
        }
        let loaded = match tokio::time::timeout(READ_DEADLINE, self.load_on_a_thread()).await {
            Ok(loaded) => loaded,
            Err(_) => {
                tracing::error!(file = %self.path.display(), deadline_secs = READ_DEADLINE.as_secs(), "reload timed out: the configuration's files were not read in time (a FIFO, or a hung mount?); the running configuration stays");
                self.metrics.reloaded(false, now_seconds());
                return Reloaded::TimedOut;
            }
        };
        let new = match loaded {
            Ok(new) => new,
            Err(errors) => {
                for problem in &errors.0 {
                    tracing::error!(file = %self.path.display(), %problem, "reload refused");
                }
                self.metrics.reloaded(false, now_seconds());
                return Reloaded::Refused { problems: errors.0 };
            }
        };
        self.apply(new)
    }

    /// `Config::load` of the file on a thread of its own (counted in `reading` while it
    /// runs); its result, if the thread gives one.
    async fn load_on_a_thread(&self) -> Result<Config, ConfigErrors> {
        let (sender, receiver) = oneshot::channel();
        let path = self.path.clone();
        let reading = ReadingThread::start(&self.reading);
        let spawned = std::thread::Builder::new()
            .name("wxgate-reload".into())
            .spawn(move || {
                let _reading = reading;
                let _ = sender.send(Config::load(&path));
            });
        if let Err(error) = spawned {
            return Err(ConfigErrors(vec![format!(
                "cannot start a thread to read the file: {error}"
            )]));
        }
        receiver.await.unwrap_or_else(|_| {
            Err(ConfigErrors(vec![
                "the thread reading the file ended without a result".into(),
            ]))
        })
    }

    /// Puts `new` in force, but for what needs a restart.
    fn apply(&self, new: Config) -> Reloaded {
        let mut current = self.current.lock();
        let (effective, needs_restart) = merge(&current, new);
        for key in &needs_restart {
            tracing::warn!(key, "changed in the file, needs a restart: kept as it was");
        }
        self.proxy.reconfigure(&effective);
        for port in &self.ports {
            port.reconfigure(&effective.server);
        }
        *current = effective;
        self.metrics.reloaded(true, now_seconds());
        tracing::info!(file = %self.path.display(), "configuration reloaded");
        Reloaded::Applied { needs_restart }
    }
}

/// The one reload waiting for its files: the flag is given back when it ends, however it
/// ends.
struct PendingReload<'a>(&'a AtomicBool);

impl PendingReload<'_> {
    /// The flag, unless another reload holds it.
    fn take(pending: &AtomicBool) -> Option<PendingReload<'_>> {
        (!pending.swap(true, Ordering::AcqRel)).then_some(PendingReload(pending))
    }
}

impl Drop for PendingReload<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One thread reading the configuration's files, counted while it lives (also past its
/// reload's deadline, for [`MAX_HUNG_READS`]).
struct ReadingThread(Arc<AtomicUsize>);

impl ReadingThread {
    fn start(reading: &Arc<AtomicUsize>) -> ReadingThread {
        reading.fetch_add(1, Ordering::AcqRel);
        ReadingThread(reading.clone())
    }
}

impl Drop for ReadingThread {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The metrics of configuration loads and reloads. Registered whether or not wxgate serves
/// from a file: the configuration in force was valid (wxgate starts with no other).
#[derive(Clone)]
pub struct ReloadMetrics {
    /// `[success, failure]`.
    reloads: Series<IntCounter>,
    last_success: Gauge,
    /// 1 while the last load or reload succeeded, 0 after a refused one.
    last_successful: IntGauge,
}

impl ReloadMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<ReloadMetrics> {
        let last_successful = metrics.gauge(
            "wxgate_config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, 0 if the last reload was refused (the running configuration stayed).",
        )?;
        // The configuration in force was valid: wxgate starts with no other.
        last_successful.set(1);
        Ok(ReloadMetrics {
            reloads: metrics.counters(
                "wxgate_config_reloads_total",
                "Configuration loads (at start) and reloads, by result.",
                &[Label::new("result", ["success", "failure"])],
            )?,
            last_success: metrics.float_gauge(
                "wxgate_config_last_reload_success_timestamp_seconds",
                "When the configuration was last loaded or reloaded successfully (UNIX time).",
            )?,
            last_successful,
        })
    }

    /// The configuration was loaded or reloaded (`success`), or a reload was refused, at
    /// `timestamp` (UNIX seconds).
    pub fn reloaded(&self, success: bool, timestamp: f64) {
        self.reloads.get(usize::from(!success)).inc();
        self.last_successful.set(i64::from(success));
        if success {
            self.last_success.set(timestamp);
        }
    }
}

/// The configuration to run after a reload: `new`, but for what needs a restart, which stays
/// as in `old`; and the key paths of what changed there.
pub fn merge(old: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let needs_restart = RestartOnly::ALL
        .into_iter()
        .filter(|key| key.keep(old, &mut new))
        .map(RestartOnly::key)
        .collect();
    (new, needs_restart)
}

/// A setting a reload does not change: it needs new sockets or a new Redis connection (the
/// listen addresses, TLS turned on or off, `[upstream]`, `[cluster]`), was fitted at start
/// (the connection cap, to the open-files limit), is set up once (`[log]`), or is what every
/// bucket, the retry policy and the replicas' agreement are built on (the quota window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestartOnly {
    Listen,
    AdminListen,
    Tls,
    MaxConnections,
    Upstream,
    Cluster,
    Log,
    QuotaWindow,
    /// Only with the window kept: a hold shorter than it could never reach WeChat's next
    /// window.
    MaxHold,
}

impl RestartOnly {
    /// Every one, in the order a reload names them (the hold after the window it depends on).
    const ALL: [RestartOnly; 9] = [
        RestartOnly::Listen,
        RestartOnly::AdminListen,
        RestartOnly::Tls,
        RestartOnly::MaxConnections,
        RestartOnly::Upstream,
        RestartOnly::Cluster,
        RestartOnly::Log,
        RestartOnly::QuotaWindow,
        RestartOnly::MaxHold,
    ];

    /// Its key path in `config.toml`.
    fn key(self) -> &'static str {
        match self {
            RestartOnly::Listen => config_key!(server.listen),
            RestartOnly::AdminListen => config_key!(server.admin_listen),
            RestartOnly::Tls => config_key!(server.tls),
            RestartOnly::MaxConnections => config_key!(server.max_connections),
            RestartOnly::Upstream => config_key!(upstream),
            RestartOnly::Cluster => config_key!(cluster),
            RestartOnly::Log => config_key!(log),
            RestartOnly::QuotaWindow => config_key!(quota.window_secs),
            RestartOnly::MaxHold => config_key!(retry.max_hold_ms),
        }
    }

    /// Whether `new` changes this setting from `old`; if so, `new` gets `old`'s back.
    fn keep(self, old: &Config, new: &mut Config) -> bool {
        match self {
            RestartOnly::Listen => keep(&old.server.listen, &mut new.server.listen),
            RestartOnly::AdminListen => {
                keep(&old.server.admin_listen, &mut new.server.admin_listen)
            }
            // On or off is the listener's protocol; another certificate (or other files)
            // applies.
            RestartOnly::Tls => {
                let switched = new.server.tls.is_some() != old.server.tls.is_some();
                if switched {
                    new.server.tls = old.server.tls.clone();
                }
                switched
            }
            RestartOnly::MaxConnections => {
                keep(&old.server.max_connections, &mut new.server.max_connections)
            }
            RestartOnly::Upstream => keep(&old.upstream, &mut new.upstream),
            RestartOnly::Cluster => keep(&old.cluster, &mut new.cluster),
            RestartOnly::Log => keep(&old.log, &mut new.log),
            RestartOnly::QuotaWindow => keep(&old.quota.window, &mut new.quota.window),
            // A changed window was kept just before: the new hold must still reach it.
            RestartOnly::MaxHold => {
                new.retry.max_hold < new.quota.window
                    && keep(&old.retry.max_hold, &mut new.retry.max_hold)
            }
        }
    }
}

/// Puts `old` back into `new` if they differ; whether they did.
fn keep<T: PartialEq + Clone>(old: &T, new: &mut T) -> bool {
    if new == old {
        return false;
    }
    *new = old.clone();
    true
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml_str(text).unwrap()
    }

    #[test]
    fn what_needs_a_restart_is_kept_and_named() {
        let old = config("[quota]\nper_window = 100\n");
        let new = config(
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_connections = 5\nallow = [\"10.0.0.0/8\"]\nidle_timeout_ms = 5\n[upstream]\ntimeout_ms = 5\n[quota]\nper_window = 10\nwindow_secs = 30\n[retry]\nmax_hold_ms = 70000\n[code_cache]\nttl_secs = 60\n[log]\nformat = \"json\"\n",
        );
        let (effective, needs_restart) = merge(&old, new);
        assert_eq!(
            needs_restart,
            [
                "server.listen",
                "server.max_connections",
                "upstream",
                "log",
                "quota.window_secs"
            ]
        );
        assert_eq!(effective.server.max_connections, old.server.max_connections);
        assert!(!effective.server.allow.is_everyone());
        assert_eq!(effective.server.idle_timeout.as_millis(), 5);
        assert_eq!(effective.server.listen, old.server.listen);
        assert_eq!(effective.upstream, old.upstream);
        assert_eq!(effective.log, old.log);
        assert_eq!(effective.quota.window, old.quota.window);
        // The rest takes effect.
        assert_eq!(effective.quota.default.per_window, 10);
        assert_eq!(effective.retry.max_hold.as_secs(), 70);
        assert_eq!(effective.code_cache.ttl.as_secs(), 60);
        let (_, nothing) = merge(&old, old.clone());
        assert!(nothing.is_empty());
    }
    /// A reload while another waits for its files is answered at once and does nothing
    /// (nor counts); while as many reads as allowed still hang, a reload reads nothing and
    /// counts as a failure.
    #[tokio::test]
    async fn reloads_do_not_pile_up_behind_reads_that_hang() {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let config = Config::default();
        let proxy = Arc::new(Proxy::new(&config, metrics.clone()).unwrap());
        let path = PathBuf::from("/nonexistent/wxgate/config.toml");
        let reload_metrics = ReloadMetrics::new(&metrics).unwrap();
        let reloader = Arc::new(Reloader::new(
            path,
            config,
            proxy,
            Vec::new(),
            reload_metrics,
        ));
        let failures = || reloader.metrics.reloads.get(1).get();

        reloader.pending.store(true, Ordering::Release);
        assert_eq!(reloader.reload().await, Reloaded::InProgress);
        assert_eq!(failures(), 0);
        reloader.pending.store(false, Ordering::Release);

        reloader.reading.store(MAX_HUNG_READS, Ordering::Release);
        assert_eq!(reloader.reload().await, Reloaded::Hung);
        assert_eq!(failures(), 1);
        // One of them ends: a reload reads again (here a file that is not there).
        reloader
            .reading
            .store(MAX_HUNG_READS - 1, Ordering::Release);
        assert!(matches!(reloader.reload().await, Reloaded::Refused { .. }));
        assert_eq!(failures(), 2);
        // The reading thread counts itself until it has ended, a moment after its answer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reloader.reading.load(Ordering::Acquire) != MAX_HUNG_READS - 1
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(reloader.reading.load(Ordering::Acquire), MAX_HUNG_READS - 1);
    }
}
