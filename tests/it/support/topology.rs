//! Highly available Redis as production runs it, started by a test from Debian's packages on
//! free loopback ports: a Redis Cluster (`redis-cli --cluster create`), a primary with a
//! replica watched by three sentinels, and a Redis with TLS and an ACL user. Failovers are
//! quick on purpose (a node counted down after a second). Every process is stopped when its
//! value is dropped.

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{command, RedisServer};

/// How long a cluster or a set of sentinels may take to form, or to fail over.
const FORMING: Duration = Duration::from_secs(30);

/// Whether the binaries a topology needs are here; outside CI, a test without them says
/// SKIPPED and passes (CI installs them: `.ci/run`).
pub fn binaries_or_skip(test: &str, binaries: &[&str]) -> bool {
    let missing: Vec<&str> = binaries
        .iter()
        .copied()
        .filter(|binary| {
            Command::new(binary)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{test}: {missing:?} missing under CI (.ci/run installs redis-server, redis-sentinel and redis-tools)"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {missing:?} not installed (apt-get install redis-server redis-sentinel redis-tools); CI runs it"
    );
    false
}

/// A free loopback port.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until `done`, failing the test with `what` past [`FORMING`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + FORMING;
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lines of a command's whole answer (`CLUSTER NODES`, `INFO`), read with redis-cli.
pub fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A Redis Cluster of three primaries, each with one replica.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Six nodes, joined by `redis-cli --cluster create`; ready when every node says
    /// `cluster_state:ok`. A node is counted down after a second, so that a replica takes
    /// over within a few.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|node| node.addr().to_string()).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok();
        cluster
    }

    /// Waits until every live node says the cluster is ok and every slot is served.
    pub fn wait_until_ok(&self) {
        for node in self.nodes.iter().filter(|node| node.running()) {
            wait_until("cluster_state:ok", || {
                let info = cli(node.port(), &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
        }
    }

    /// `host:port` of every node, for `cluster.cluster_nodes`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| node.addr().to_string())
            .collect()
    }

    /// The nodes that are primaries now.
    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|node| node.running() && cli(node.port(), &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// The index in `nodes` of the primary serving `key`.
    pub fn primary_of(&self, key: &str) -> usize {
        let slot: u16 = cli(self.nodes[0].port(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        let map = cli(self.nodes[0].port(), &["CLUSTER", "NODES"]);
        for line in map.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                match (low.parse::<u16>(), high.parse::<u16>()) {
                    (Ok(low), Ok(high)) => (low..=high).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let port: u16 = fields[1]
                    .split('@')
                    .next()
                    .and_then(|addr| addr.rsplit_once(':'))
                    .and_then(|(_, port)| port.parse().ok())
                    .unwrap();
                return self
                    .nodes
                    .iter()
                    .position(|node| node.port() == port)
                    .unwrap();
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// The wxgate keys (`wxgate:*`) each live primary holds.
    pub fn keys_per_primary(&self) -> Vec<usize> {
        self.primaries()
            .iter()
            .map(|node| node.keys("wxgate:*").len())
            .collect()
    }
}

/// A primary and its replica, watched by three sentinels under the name [`MASTER`].
pub struct Sentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<Child>,
    pub sentinel_ports: Vec<u16>,
    dir: PathBuf,
}

/// The name the sentinels monitor the primary by.
pub const MASTER: &str = "wxgate-primary";

impl Sentinels {
    /// Ready when each sentinel knows the replica and the two other sentinels (a failover
    /// needs their votes). The primary is counted down after a second.
    pub fn start() -> Sentinels {
        let primary = RedisServer::start();
        let primary_port = primary.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary_port]);
        wait_until("the replica in sync", || {
            cli(replica.port(), &["INFO", "replication"]).contains("master_link_status:up")
        });
        let dir = std::env::temp_dir().join(format!(
            "wxgate-sentinels-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for index in 0..3 {
            let port = free_port();
            let file = dir.join(format!("sentinel-{index}.conf"));
            std::fs::write(
                &file,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 4000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&file)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel starts");
            sentinels.push(child);
            sentinel_ports.push(port);
        }
        let set = Sentinels {
            primary,
            replica,
            sentinels,
            sentinel_ports,
            dir,
        };
        for port in &set.sentinel_ports {
            let addr: SocketAddr = ([127, 0, 0, 1], *port).into();
            wait_until("a sentinel knowing the replica and the others", || {
                let replicas = command(addr, &["SENTINEL", "REPLICAS", MASTER]);
                let others = command(addr, &["SENTINEL", "SENTINELS", MASTER]);
                replicas.as_deref() == Some("*1") && others.as_deref() == Some("*2")
            });
        }
        set
    }

    /// `host:port` of each sentinel, for `cluster.sentinels`.
    pub fn addresses(&self) -> Vec<String> {
        self.sentinel_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// The port the sentinels name as the primary's now.
    pub fn primary_port(&self) -> u16 {
        let addr: SocketAddr = ([127, 0, 0, 1], self.sentinel_ports[0]).into();
        let answer = cli(
            addr.port(),
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER],
        );
        answer.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
