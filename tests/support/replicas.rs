//! Several wxgates sharing one Redis (`[cluster]`), each with the same configuration and a
//! cluster secret in a file of its own; and a way to wait until they all report a state.
//! (tests/cluster_quota.rs has its own copy from before this one; both can share this.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wxgate_stand_in::StandIn;

use super::{config, config_text, metric, spawn_proxy, TestProxy};

/// Replicas of one wxgate, sharing a Redis.
pub struct Replicas {
    pub proxies: Vec<TestProxy>,
    _secret: SecretFile,
}

impl Replicas {
    /// `count` replicas in front of `upstream`, with `extra` TOML and `[cluster]` on
    /// `redis_url`.
    pub async fn start(count: usize, upstream: &StandIn, redis_url: &str, extra: &str) -> Replicas {
        let secret = SecretFile::new();
        let text = config_text(
            &upstream.base_url(),
            &format!(
                "{extra}\n[cluster]\nredis_url = \"{redis_url}\"\nsecret_file = \"{}\"\ntimeout_ms = 100\n",
                secret.path.display()
            ),
        );
        let mut proxies = Vec::new();
        for _ in 0..count {
            proxies.push(spawn_proxy(config(&text)).await);
        }
        Replicas {
            proxies,
            _secret: secret,
        }
    }

    /// The replica request `i` goes to (round robin, as a load balancer would).
    pub fn pick(&self, i: usize) -> &TestProxy {
        &self.proxies[i % self.proxies.len()]
    }

    /// Waits until every replica reports `state` (`shared` or `degraded`).
    pub async fn wait_for_state(&self, state: &str, within: Duration) {
        let deadline = Instant::now() + within;
        for proxy in &self.proxies {
            loop {
                let text = proxy.metrics().await;
                if metric(&text, "wxgate_cluster_state", &[("state", state)]) == 1.0 {
                    break;
                }
                assert!(Instant::now() < deadline, "a replica never became {state}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The sum of one series over every replica.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut sum = 0.0;
        for proxy in &self.proxies {
            sum += metric(&proxy.metrics().await, name, labels);
        }
        sum
    }
}

/// A cluster secret in a file of its own (the environment variable would be shared by every
/// test of the process); removed when dropped.
pub struct SecretFile {
    pub path: PathBuf,
}

impl SecretFile {
    pub fn new() -> SecretFile {
        let path = std::env::temp_dir().join(format!(
            "wxgate-cluster-secret-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(
            &path,
            format!("{:032x}{:032x}\n", fastrand::u128(..), fastrand::u128(..)),
        )
        .unwrap();
        SecretFile { path }
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
