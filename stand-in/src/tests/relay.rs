//! The delaying relay: delays drawn within their bounds, due times that keep a stream's
//! order, bytes and the end of a stream carried both ways, delays of at least their minimum
//! observed over loopback (a lower bound only: a busy machine makes them longer, never
//! shorter), a delay changed while it runs, a target that cannot be reached.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::relay::DelayLine;
use crate::{Delay, DelayRelay};

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A server on a free loopback port that echoes every connection's bytes back, and closes
/// its side when the client closes its own.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buffer = [0; 4096];
                loop {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(read) => {
                            if stream.write_all(&buffer[..read]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn connect(relay: &DelayRelay) -> TcpStream {
    let stream = TcpStream::connect(relay.addr()).unwrap();
    // A relay that lost the bytes fails the test instead of hanging it.
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Writes `message` and reads as many bytes back; how long that took.
fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Duration {
    let started = Instant::now();
    stream.write_all(message).unwrap();
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
    started.elapsed()
}

/// The peer closed (the end of the stream, or a reset): no bytes, and not the read timeout.
fn assert_closed(stream: &mut TcpStream) {
    let mut buffer = [0; 8];
    match stream.read(&mut buffer) {
        Ok(read) => assert_eq!(read, 0, "bytes from a closed connection"),
        Err(error) => assert!(
            !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the connection stayed open: {error}"
        ),
    }
}

#[test]
fn a_drawn_delay_stays_within_base_plus_or_minus_jitter() {
    let delay = Delay::new(Duration::from_micros(1000), Duration::from_micros(300));
    assert_eq!(delay.min(), Duration::from_micros(700));
    assert_eq!(delay.max(), Duration::from_micros(1300));
    let draws: Vec<Duration> = (0..10_000).map(|_| delay.draw()).collect();
    assert!(draws
        .iter()
        .all(|d| (delay.min()..=delay.max()).contains(d)));
    // Spread over the range, not stuck on the base: both ends' tenths are reached.
    let low = Duration::from_micros(760);
    let high = Duration::from_micros(1240);
    assert!(draws.iter().any(|d| *d < low), "never near the minimum");
    assert!(draws.iter().any(|d| *d > high), "never near the maximum");
    assert_eq!(Delay::fixed(ms(5)).draw(), ms(5));
    assert_eq!(Delay::NONE.draw(), Duration::ZERO);
    // A jitter larger than the base never makes a negative delay.
    let wide = Delay::new(ms(1), ms(3));
    assert_eq!(wide.min(), Duration::ZERO);
    assert!((0..1000).all(|_| wide.draw() <= ms(4)));
    assert_eq!(delay.to_string(), "1 ms ± 0.3 ms");
    assert_eq!(Delay::fixed(ms(15)).to_string(), "15 ms");
}

#[test]
fn a_chunk_is_due_after_its_delay_and_never_before_the_chunk_ahead_of_it() {
    let start = Instant::now();
    let mut line = DelayLine::default();
    // Its own delay when nothing is ahead of it.
    assert_eq!(line.due(start, ms(10)), start + ms(10));
    // A shorter delay drawn for the next chunk: it waits for the first one.
    assert_eq!(line.due(start + ms(1), ms(2)), start + ms(10));
    // A longer one: its own.
    assert_eq!(line.due(start + ms(2), ms(12)), start + ms(14));
    // Long after: its own again.
    assert_eq!(line.due(start + ms(100), ms(1)), start + ms(101));
    // Whatever the draws, due times never go back and never come early.
    let delay = Delay::new(ms(5), ms(5));
    let mut line = DelayLine::default();
    let mut last = start;
    for i in 0..10_000 {
        let arrived = start + Duration::from_micros(i * 37);
        let drawn = delay.draw();
        let due = line.due(arrived, drawn);
        assert!(due >= arrived + drawn);
        assert!(due >= last);
        last = due;
    }
}

#[test]
fn bytes_cross_both_ways_in_order_whatever_the_jitter() {
    let target = echo_server();
    // A jitter as large as the delay: each chunk drawn anywhere from 0 to 4 ms.
    let jittery = Delay::new(ms(2), ms(2));
    let relay = DelayRelay::start("127.0.0.1:0", target, jittery, jittery).unwrap();
    let mut stream = connect(&relay);
    let mut reader = stream.try_clone().unwrap();
    // Many small writes, so that the relay reads many chunks and draws many delays.
    let sent: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let expected = sent.clone();
    let writer = thread::spawn(move || {
        for piece in sent.chunks(40) {
            stream.write_all(piece).unwrap();
        }
        stream.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    // Ends when the echo server, told of the end of the stream through the relay, closes.
    reader.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "the bytes came back out of order");
    assert_eq!(relay.accepted(), 1);
}

#[test]
fn each_direction_is_held_at_least_its_minimum_delay() {
    let target = echo_server();
    let forward = Delay::new(ms(40), ms(10));
    let reverse = Delay::new(ms(20), ms(5));
    let relay = DelayRelay::start("127.0.0.1:0", target, forward, reverse).unwrap();
    let mut stream = connect(&relay);
    for i in 0..5u8 {
        let took = round_trip(&mut stream, &[i; 16]);
        assert!(
            took >= forward.min() + reverse.min(),
            "round trip {i} took {took:?}"
        );
    }
    // Each way on its own: more forward delay than the reverse's whole round trip.
    relay.set_delays(Delay::fixed(ms(60)), Delay::NONE);
    assert_eq!(relay.delays(), (Delay::fixed(ms(60)), Delay::NONE));
    assert!(round_trip(&mut stream, b"forward") >= ms(60));
    relay.set_delays(Delay::NONE, Delay::fixed(ms(60)));
    assert!(round_trip(&mut stream, b"reverse") >= ms(60));
}

#[test]
fn a_delay_set_while_it_runs_applies_to_what_is_read_next() {
    let target = echo_server();
    let relay = DelayRelay::start("127.0.0.1:0", target, Delay::NONE, Delay::NONE).unwrap();
    let mut stream = connect(&relay);
    round_trip(&mut stream, b"before");
    relay.set_delay(ms(150));
    assert_eq!(
        relay.delays(),
        (Delay::fixed(ms(150)), Delay::fixed(ms(150)))
    );
    assert!(round_trip(&mut stream, b"slow") >= ms(300));
    // A new connection gets the delay too.
    let mut other = connect(&relay);
    assert!(round_trip(&mut other, b"slow too") >= ms(300));
}

#[test]
fn a_target_that_cannot_be_reached_closes_the_client_connection() {
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = DelayRelay::start("127.0.0.1:0", closed, Delay::NONE, Delay::NONE).unwrap();
    let mut stream = connect(&relay);
    assert_closed(&mut stream);
}

#[test]
fn a_dropped_relay_closes_its_connections_and_accepts_no_more() {
    let target = echo_server();
    let relay = DelayRelay::start("127.0.0.1:0", target, Delay::NONE, Delay::NONE).unwrap();
    let addr = relay.addr();
    let mut stream = connect(&relay);
    round_trip(&mut stream, b"open");
    assert_eq!(relay.open_connections(), 1);
    drop(relay);
    assert_closed(&mut stream);
    // The listener is gone with its thread: a new connection is refused, or (if the thread
    // has not yet returned) accepted and closed without an answer.
    if let Ok(mut late) = TcpStream::connect(addr) {
        late.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = late.write_all(b"late");
        assert_closed(&mut late);
    }
}
