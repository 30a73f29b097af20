//! Reloading the configuration without a restart (`SIGHUP`, or `wxgate reload`, which asks
//! the admin port): the file is read and validated again, and what can change while serving
//! changes; no connection or queued request is dropped.
//!
//! - A file with any problem is refused whole: every problem is logged as `check-config`
//!   prints it, the running configuration stays, and the failure is counted.
//! - Settings that need new sockets or a new Redis connection (the listen addresses, TLS
//!   turned on or off, `[upstream]`, `[cluster]`), the connection cap (fitted to the
//!   open-files limit at start), `[log]` (set up once) and the quota window (every bucket, the retry policy and
//!   the replicas' agreement are built on it) are reported as needing a restart and kept as
//!   they were; everything else takes effect: in the request pipeline (see
//!   `Proxy::reconfigure`) and in the listeners (`server.allow`, the connection deadlines
//!   and the TLS certificate, see `PortPolicy::reconfigure`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::{Gauge, IntCounter, IntGauge};

use super::PortPolicy;
use crate::config::Config;
use crate::metrics::{Label, Metrics, Series};
use crate::proxy::Proxy;

/// Reloads one configuration file into one running proxy.
pub struct Reloader {
    path: PathBuf,
    /// The configuration in force (the restart-only parts as started).
    current: Mutex<Config>,
    proxy: Arc<Proxy>,
    /// The listeners' policies: allow-list, deadlines, certificate.
    ports: Vec<Arc<PortPolicy>>,
    metrics: ReloadMetrics,
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
        }
    }

    /// `server.shutdown_grace_ms` in force: read at shutdown, so a reload changes it.
    pub fn shutdown_grace(&self) -> Duration {
        self.current.lock().server.shutdown_grace
    }

    /// Reads the file again and applies what can change while serving.
    pub fn reload(&self) -> Reloaded {
        let new = match Config::load(&self.path) {
            Ok(new) => new,
            Err(errors) => {
                for problem in &errors.0 {
                    tracing::error!(file = %self.path.display(), %problem, "reload refused");
                }
                self.metrics.reloaded(false, now_seconds());
                return Reloaded::Refused { problems: errors.0 };
            }
        };
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
    let mut needs_restart = Vec::new();
    if new.server.listen != old.server.listen {
        needs_restart.push("server.listen");
        new.server.listen = old.server.listen;
    }
    if new.server.admin_listen != old.server.admin_listen {
        needs_restart.push("server.admin_listen");
        new.server.admin_listen = old.server.admin_listen;
    }
    // On or off is the listener's protocol; another certificate (or other files) applies.
    if new.server.tls.is_some() != old.server.tls.is_some() {
        needs_restart.push("server.tls");
        new.server.tls = old.server.tls.clone();
    }
    if new.server.max_connections != old.server.max_connections {
        needs_restart.push("server.max_connections");
        new.server.max_connections = old.server.max_connections;
    }
    if new.upstream != old.upstream {
        needs_restart.push("upstream");
        new.upstream = old.upstream.clone();
    }
    if new.cluster != old.cluster {
        needs_restart.push("cluster");
        new.cluster = old.cluster.clone();
    }
    // The log's format and filter are set once, when the process starts.
    if new.log != old.log {
        needs_restart.push("log");
        new.log = old.log.clone();
    }
    if new.quota.window != old.quota.window {
        needs_restart.push("quota.window_secs");
        new.quota.window = old.quota.window;
        // A hold shorter than the window kept could never reach WeChat's next window.
        if new.retry.max_hold < new.quota.window {
            needs_restart.push("retry.max_hold_ms");
            new.retry.max_hold = old.retry.max_hold;
        }
    }
    (new, needs_restart)
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
}
