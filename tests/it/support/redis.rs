//! A real `redis-server` per test (Debian's package: `.ci/run` installs it), on a free
//! loopback port, without persistence; stopped when dropped. (A Redis slow on demand is one
//! behind the stand-in crate's `DelayRelay`.)

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of the test's own.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// More arguments for `redis-server` (`--requirepass`...).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port; `None`, with a message saying so, when Debian's
    /// `redis-server` is not installed and this is not CI. `cargo test` on a fresh machine
    /// then passes without Redis, as the README promises, while CI (`CI=true`, which
    /// installs it) runs every cluster test: there a missing server is a failure.
    pub fn start_or_skip(test: &str) -> Option<RedisServer> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !installed && std::env::var("CI").is_err() {
            // Written past the test harness's capture, so that it shows in `cargo test`.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: redis-server is not installed (apt-get install redis-server); CI runs it"
            );
            return None;
        }
        Some(RedisServer::start())
    }

    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        RedisServer::start_on(port)
    }

    /// Starts one on `port` (again, after [`RedisServer::stop`]).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::start_on_with(port, &[])
    }

    /// Starts one on a free port with more arguments for `redis-server`, such as
    /// `--requirepass PASSWORD`.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        RedisServer::start_on_with(port, extra)
    }

    fn start_on_with(port: u16, extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("wxgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        server.restart();
        server
    }

    /// Starts the server again on its port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // A server with a password answers NOAUTH: it is up all the same.
        let up = |answer: Option<String>| {
            answer.is_some_and(|line| line == "+PONG" || line.starts_with("-NOAUTH"))
        };
        while !up(self.command(&["PING"])) {
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (the port is free again).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it runs (not stopped).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command; the first line of its answer (`+PONG`, `:3`, `$5`...).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command(self.addr(), args)
    }

    /// The names of the keys matching `pattern` (`KEYS`), as an attacker lists them.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.reply(&["KEYS", pattern]) {
            Reply::Array(keys) => keys
                .into_iter()
                .filter_map(|key| match key {
                    Reply::Bulk(Some(key)) => Some(String::from_utf8(key).unwrap()),
                    _ => None,
                })
                .collect(),
            other => panic!("KEYS answered {other:?}"),
        }
    }

    /// A string value (`GET`, `HGET`...), `None` when there is none.
    pub fn value(&self, args: &[&str]) -> Option<String> {
        match self.reply(args) {
            Reply::Bulk(value) => value.map(|value| String::from_utf8_lossy(&value).into_owned()),
            other => panic!("{args:?} answered {other:?}"),
        }
    }

    /// Redis's own clock (`TIME`), in milliseconds since the epoch.
    pub fn time_ms(&self) -> u64 {
        let Reply::Array(parts) = self.reply(&["TIME"]) else {
            panic!("TIME answered otherwise");
        };
        let number = |part: &Reply| match part {
            Reply::Bulk(Some(digits)) => String::from_utf8_lossy(digits).parse::<u64>().unwrap(),
            other => panic!("TIME answered {other:?}"),
        };
        number(&parts[0]) * 1000 + number(&parts[1]) / 1000
    }

    /// Runs one command; its whole answer.
    fn reply(&self, args: &[&str]) -> Reply {
        let mut stream = StdStream::connect(self.addr()).expect("redis answers");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&encode(args)).unwrap();
        read_reply(&mut BufReader::new(stream))
    }

    /// Every key and its value (strings as they are, other types as `TYPE` + a `DUMP`),
    /// for tests that prove nothing readable is stored.
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut stream = StdStream::connect(self.addr()).expect("redis answers");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        stream.write_all(&encode(&["KEYS", "*"])).unwrap();
        let keys = match read_reply(&mut reader) {
            Reply::Array(keys) => keys,
            other => panic!("KEYS answered {other:?}"),
        };
        keys.into_iter()
            .filter_map(|key| match key {
                Reply::Bulk(Some(key)) => Some(key),
                _ => None,
            })
            .map(|key| {
                let name = String::from_utf8_lossy(&key).into_owned();
                stream.write_all(&encode(&["DUMP", &name])).unwrap();
                let value = match read_reply(&mut reader) {
                    Reply::Bulk(Some(value)) => value,
                    _ => Vec::new(),
                };
                (key, value)
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs one command on the Redis at `addr` (from any thread); the first line of its answer.
pub fn command(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let mut stream = StdStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(&encode(args)).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line.trim_end().to_owned())
}

/// Runs one command on the Redis at `addr` as the ACL user `user`; the first line of its
/// answer (`-NOPERM ...` for a command or key the user may not use).
pub fn command_as(addr: SocketAddr, user: &str, password: &str, args: &[&str]) -> Option<String> {
    let mut stream = StdStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(&encode(&["AUTH", user, password])).ok()?;
    stream.write_all(&encode(args)).ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    assert_eq!(line.trim_end(), "+OK", "AUTH as {user}");
    line.clear();
    reader.read_line(&mut line).ok()?;
    Some(line.trim_end().to_owned())
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Debug)]
enum Reply {
    /// A status or error line, kept for the `Debug` of a failed assertion.
    Line(#[allow(dead_code)] String),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

fn read_reply(reader: &mut impl BufRead) -> Reply {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let line = line.trim_end();
    let (kind, rest) = line.split_at(1);
    match kind {
        "$" => {
            let len: i64 = rest.parse().unwrap();
            if len < 0 {
                return Reply::Bulk(None);
            }
            let mut data = vec![0; len as usize + 2];
            reader.read_exact(&mut data).unwrap();
            data.truncate(len as usize);
            Reply::Bulk(Some(data))
        }
        "*" => {
            let count: i64 = rest.parse().unwrap();
            Reply::Array((0..count.max(0)).map(|_| read_reply(reader)).collect())
        }
        _ => Reply::Line(line.to_owned()),
    }
}
