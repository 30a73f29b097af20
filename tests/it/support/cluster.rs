//! Several wxgates sharing one Redis: started in-process with the same configuration,
//! reached round robin, and watched through their metrics.

use std::time::{Duration, Instant};

use wxgate_stand_in::StandIn;

use super::*;

/// The configuration every replica of a test runs: the stand-in upstream, `[cluster]` on
/// `redis_url` with the secret in `secret`, and the test's `extra` TOML.
///
/// `cluster.timeout_ms` is 300 ms, six times the default: on a two-core machine running the
/// whole suite, a Redis round trip under a burst of 200 requests can take longer than 100 ms,
/// and a replica that degrades then fetches on its own (what the tests of degradation cause
/// on purpose, with delays of seconds).
pub fn cluster_config_text(
    upstream: &StandIn,
    redis_url: &str,
    secret: &SecretFile,
    extra: &str,
) -> String {
    section_config_text(
        upstream,
        &format!("redis_url = \"{redis_url}\"\n"),
        secret,
        extra,
    )
}

/// As [`cluster_config_text`], with `redis` in `[cluster]` for where Redis is (one of its
/// forms).
pub fn section_config_text(
    upstream: &StandIn,
    redis: &str,
    secret: &SecretFile,
    extra: &str,
) -> String {
    config_text(
        &upstream.base_url(),
        &format!(
            "{extra}\n[cluster]\n{redis}secret_file = \"{}\"\ntimeout_ms = 300\n",
            secret.path.display()
        ),
    )
}

/// Three wxgates with the same configuration, sharing one Redis.
pub struct Replicas {
    pub proxies: Vec<TestProxy>,
    /// The cluster secret's file, for replicas started elsewhere (a child process).
    pub secret: SecretFile,
}

impl Replicas {
    pub async fn start(upstream: &StandIn, redis_url: &str, extra: &str) -> Replicas {
        Replicas::start_on(upstream, &format!("redis_url = \"{redis_url}\"\n"), extra).await
    }

    /// Three replicas with `redis` in `[cluster]` for where Redis is (one of its forms).
    pub async fn start_on(upstream: &StandIn, redis: &str, extra: &str) -> Replicas {
        let secret = SecretFile::new();
        let text = section_config_text(upstream, redis, &secret, extra);
        let mut proxies = Vec::new();
        for _ in 0..3 {
            proxies.push(spawn_proxy(config(&text)).await);
        }
        Replicas { proxies, secret }
    }

    /// The replica request `i` goes to.
    pub fn pick(&self, i: usize) -> &TestProxy {
        &self.proxies[i % self.proxies.len()]
    }

    /// Waits until every replica reports `state` (`shared` or `degraded`).
    pub async fn wait_for_state(&self, state: &str, within: Duration) {
        self.wait_for(within, |text| {
            metric(text, "wxgate_cluster_state", &[("state", state)]) == 1.0
        })
        .await;
    }

    /// Waits until every replica has counted all three in its heartbeats (its share of a
    /// quota, were Redis to go, is then a third).
    pub async fn wait_until_they_know_each_other(&self) {
        self.wait_for(Duration::from_secs(5), |text| {
            metric(text, "wxgate_cluster_replicas", &[]) == 3.0
        })
        .await;
    }

    /// The sum of one series over every replica.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut sum = 0.0;
        for proxy in &self.proxies {
            sum += metric(&proxy.metrics().await, name, labels);
        }
        sum
    }

    pub async fn wait_for(&self, within: Duration, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        for proxy in &self.proxies {
            while !done(&proxy.metrics().await) {
                assert!(Instant::now() < deadline, "a replica never got there");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A cluster secret in a file of its own (the environment variable would be shared by every
/// test of the process); removed when dropped.
pub struct SecretFile {
    pub path: std::path::PathBuf,
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
