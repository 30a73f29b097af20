//! The `wxgate-relay` binary: it says where it listens, relays both ways with the delays it
//! was given (at least their minimum), and a bad command line exits 64.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn relays_both_ways_with_the_delays_it_was_given() {
    // The target: answers each message with its bytes reversed.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = target.accept().unwrap();
        let mut buffer = [0; 5];
        while stream.read_exact(&mut buffer).is_ok() {
            buffer.reverse();
            stream.write_all(&buffer).unwrap();
        }
        let _ = stream.shutdown(Shutdown::Write);
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_wxgate-relay"))
        .args(["--listen", "127.0.0.1:0", "--to", &target_addr.to_string()])
        .args([
            "--delay-ms",
            "30",
            "--jitter-ms",
            "10",
            "--reverse-delay-ms",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the binary says where it listens");
    let addr = line
        .strip_prefix("relaying ")
        .and_then(|rest| rest.split_once(" -> "))
        .map(|(addr, _)| addr.to_owned())
        .unwrap_or_else(|| panic!("first line: {line:?}"));
    assert!(
        line.contains("forward 30 ms ± 10 ms, reverse 20 ms ± 10 ms"),
        "{line:?}"
    );

    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        stream.write_all(b"hello").unwrap();
        let mut back = [0; 5];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"olleh");
        // At least 20 ms one way (30 - 10) and 10 ms back (20 - 10).
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_command_line_it_cannot_use_exits_64() {
    let output = Command::new(env!("CARGO_BIN_EXE_wxgate-relay"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(64));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("--to is required"), "{said}");
    assert!(said.contains("usage: wxgate-relay"), "{said}");
}
