//! The `wxgate` binary as a child process on free loopback ports, for tests that need the
//! process itself: killing a replica outright (`SIGKILL`: no drain, no goodbye to Redis),
//! reloading its configuration file (`SIGHUP`), reading its log, stopping it (`SIGTERM`).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `wxgate` binary; killed when dropped.
pub struct ChildWxgate {
    child: Child,
    /// Its proxy port.
    pub proxy: SocketAddr,
    /// Its admin port.
    pub admin: SocketAddr,
    /// Its configuration file (rewritten by [`ChildWxgate::rewrite`]).
    pub config_path: PathBuf,
    /// Its log, line by line.
    log: Arc<Mutex<Vec<String>>>,
}

impl ChildWxgate {
    /// Starts the binary with `config` plus a `[server]` table on two free ports (so `config`
    /// has none), and waits until it says where it serves.
    pub fn start(config: &str) -> ChildWxgate {
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .unwrap()
        };
        let (proxy, admin) = (free(), free());
        let config_path = std::env::temp_dir().join(format!(
            "wxgate-child-{}-{}.toml",
            std::process::id(),
            fastrand::u64(..)
        ));
        let server = format!("[server]\nlisten = \"{proxy}\"\nadmin_listen = \"{admin}\"\n");
        std::fs::write(&config_path, format!("{server}{config}")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the wxgate binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut wxgate = ChildWxgate {
            child,
            proxy,
            admin,
            config_path,
            log,
        };
        wxgate.wait_for_log("wxgate serving", Duration::from_secs(30));
        wxgate
    }

    /// `http://ADDR` + `path_and_query` on its proxy port.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.proxy, path_and_query)
    }

    /// Replaces its configuration file with the same `[server]` table and `config`.
    pub fn rewrite(&self, config: &str) {
        let server = format!(
            "[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n",
            self.proxy, self.admin
        );
        std::fs::write(&self.config_path, format!("{server}{config}")).unwrap();
    }

    /// Sends it `SIGHUP` (with the shell's builtin `kill`: no procps needed).
    pub fn hangup(&self) {
        let status = Command::new("sh")
            .args(["-c", &format!("kill -HUP {}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// How many log lines hold `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until at least `count` log lines hold `needle`.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log_count(needle) < count {
            assert!(
                Instant::now() < deadline,
                "wxgate never logged {needle:?}:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a line holding `needle` has been logged.
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) {
        self.wait_for_log_count(needle, 1, within);
    }

    /// Sends it `SIGTERM` and waits until it exits (panicking if it has not within
    /// `within`, which means "never", not "slow"); its exit code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return exit.code();
            }
            assert!(
                Instant::now() < deadline,
                "wxgate did not exit after SIGTERM:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills it outright (`SIGKILL`).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildWxgate {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config_path);
    }
}
