//! The `wxgate` binary as a child process on free loopback ports, for tests that need to
//! kill a replica outright (`SIGKILL`: no drain, no goodbye to Redis).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `wxgate` binary; killed when dropped.
pub struct ChildWxgate {
    child: Child,
    /// Its proxy port.
    pub proxy: SocketAddr,
}

impl ChildWxgate {
    /// Starts the binary with `config` (its listeners are set to free ports here) and waits
    /// until it says where it serves.
    pub fn start(config: &str) -> ChildWxgate {
        let path = std::env::temp_dir().join(format!(
            "wxgate-child-{}-{}.toml",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{config}"),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the wxgate binary starts");
        let (serving_tx, serving_rx) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("wxgate serving") {
                    let _ = serving_tx.send(line);
                }
            }
        });
        let serving = serving_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("wxgate says where it serves");
        let _ = std::fs::remove_file(&path);
        let start = serving.find("proxy=").expect("the proxy address") + "proxy=".len();
        let proxy = serving[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        ChildWxgate { child, proxy }
    }

    /// `http://ADDR` + `path_and_query` on its proxy port.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.proxy, path_and_query)
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
    }
}
