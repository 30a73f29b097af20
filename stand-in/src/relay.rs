//! [`DelayRelay`]: a TCP relay that holds what it carries for a delay drawn per chunk, one
//! [`Delay`] each way, so that a peer on the same machine seems to be across a network: a
//! Redis a millisecond away, a WeChat tens of milliseconds away, or a Redis made slow at will
//! (the delays can be changed while it runs).
//!
//! Each direction of each connection is a delay line: a thread reads a chunk as soon as it
//! arrives, stamps it with its due time (arrival + a delay drawn for it), and another thread
//! writes it out at that time. Reading never waits for writing, so chunks in flight overlap
//! as on a wire, and the round trip of a pipelined protocol is one delay each way, not one
//! per chunk. A chunk is never due before the chunk read ahead of it: a jittered delay delays
//! the bytes behind it too (as TCP's head-of-line blocking does) and never reorders a stream.
//!
//! Threads, not tasks: a tokio timer ends on a whole millisecond, which would turn 1 ms ±
//! 0.3 ms into 1 to 2.3 ms; a thread's sleep ends within tens of microseconds of its due
//! time. A relay carries a few connections (a replica's Redis connections, an HTTP pool),
//! four threads each.
//!
//! What it does not model: the TCP handshake's round trip (a client's connect completes at
//! the relay at once, and the relay then connects to the target), loss, and bandwidth.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::lock;

/// How long connecting to the target may take before the client's connection is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest chunk read at once.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks waiting in one delay line before its reader stops reading (and TCP's flow control
/// slows the sender): ample for a delay of milliseconds at the rates of a test.
const CHUNKS_IN_FLIGHT: usize = 4096;

/// A TCP relay from its listening address to a target, delaying each direction.
///
/// Dropping it stops it: no more connections are accepted and the open ones are closed.
pub struct DelayRelay {
    addr: SocketAddr,
    state: Arc<RelayState>,
}

/// How long a chunk is held: `base` ± `jitter`, drawn uniformly for each chunk (never below
/// zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delay {
    /// The mean delay.
    pub base: Duration,
    /// The largest deviation from `base`, either way.
    pub jitter: Duration,
}

impl Delay {
    /// No delay at all.
    pub const NONE: Delay = Delay {
        base: Duration::ZERO,
        jitter: Duration::ZERO,
    };

    /// `base` ± `jitter`.
    pub const fn new(base: Duration, jitter: Duration) -> Delay {
        Delay { base, jitter }
    }

    /// Always `base`.
    pub const fn fixed(base: Duration) -> Delay {
        Delay::new(base, Duration::ZERO)
    }

    /// The shortest delay a chunk can get.
    pub fn min(&self) -> Duration {
        self.base.saturating_sub(self.jitter)
    }

    /// The longest delay a chunk can get.
    pub fn max(&self) -> Duration {
        self.base.saturating_add(self.jitter)
    }

    /// One chunk's delay, uniformly within [`Delay::min`]..=[`Delay::max`].
    pub fn draw(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.base;
        }
        let (min, max) = (self.min(), self.max());
        let span = u64::try_from((max - min).as_nanos()).unwrap_or(u64::MAX);
        min + Duration::from_nanos(fastrand::u64(0..=span))
    }
}

impl std::fmt::Display for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
        if self.jitter.is_zero() {
            write!(f, "{} ms", ms(self.base))
        } else {
            write!(f, "{} ms ± {} ms", ms(self.base), ms(self.jitter))
        }
    }
}

/// What the relay's threads share.
struct RelayState {
    target: SocketAddr,
    /// (client → target, target → client).
    delays: Mutex<(Delay, Delay)>,
    stopping: AtomicBool,
    /// The open connections (both sockets), closed when the relay stops.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl DelayRelay {
    /// Listens on `listen` (port 0: a free one) and relays every connection to `target`,
    /// holding what the client sends for `forward` and what the target answers for
    /// `reverse`.
    pub fn start(
        listen: impl ToSocketAddrs,
        target: SocketAddr,
        forward: Delay,
        reverse: Delay,
    ) -> io::Result<DelayRelay> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(RelayState {
            target,
            delays: Mutex::new((forward, reverse)),
            stopping: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let accepting = state.clone();
        thread::Builder::new()
            .name(format!("relay-accept-{}", addr.port()))
            .spawn(move || accept_loop(&listener, &accepting))?;
        Ok(DelayRelay { addr, state })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address it relays to.
    pub fn target(&self) -> SocketAddr {
        self.state.target
    }

    /// From now on, chunks read get these delays (client → target, target → client); chunks
    /// already waiting keep theirs.
    pub fn set_delays(&self, forward: Delay, reverse: Delay) {
        *lock(&self.state.delays) = (forward, reverse);
    }

    /// From now on, every chunk read waits `delay`, both ways.
    pub fn set_delay(&self, delay: Duration) {
        self.set_delays(Delay::fixed(delay), Delay::fixed(delay));
    }

    /// The delays in force (client → target, target → client).
    pub fn delays(&self) -> (Delay, Delay) {
        *lock(&self.state.delays)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        lock(&self.state.open).len()
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stopping`.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => [127, 0, 0, 1].into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        for [client, server] in lock(&self.state.open).drain().map(|(_, pair)| pair) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<RelayState>) {
    for client in listener.incoming() {
        if state.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            // A connection reset before it was accepted, or out of descriptors for a moment.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        state.accepted.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        // Connecting may take a while (a target across a cut link): not on the accept loop.
        let _ = thread::Builder::new()
            .name("relay-connect".to_owned())
            .spawn(move || relay_connection(client, &state));
    }
}

/// Connects `client` to the target and starts its two delay lines; a target that cannot be
/// reached closes the client's connection.
fn relay_connection(client: TcpStream, state: &Arc<RelayState>) {
    let Ok(server) = TcpStream::connect_timeout(&state.target, CONNECT_TIMEOUT) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    // Chunks leave when they are due, not when Nagle's algorithm would let them.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let clones = (|| {
        Ok::<_, io::Error>((
            [client.try_clone()?, server.try_clone()?],
            client.try_clone()?,
            server.try_clone()?,
        ))
    })();
    let Ok((pair, client_writer, server_writer)) = clones else {
        return;
    };
    lock(&state.open).insert(id, pair);
    if state.stopping.load(Ordering::SeqCst) {
        // Stopped meanwhile, after the drop closed what it found open.
        lock(&state.open).remove(&id);
        return;
    }
    // Removes the connection from the open ones when its last thread ends.
    let open = Arc::new(OpenConnection {
        id,
        state: state.clone(),
    });
    start_line(client, server_writer, Direction::Forward, state, &open);
    start_line(server, client_writer, Direction::Reverse, state, &open);
}

/// Which way a delay line carries bytes.
#[derive(Clone, Copy)]
enum Direction {
    /// Client → target.
    Forward,
    /// Target → client.
    Reverse,
}

impl RelayState {
    fn delay(&self, direction: Direction) -> Duration {
        let (forward, reverse) = *lock(&self.delays);
        match direction {
            Direction::Forward => forward.draw(),
            Direction::Reverse => reverse.draw(),
        }
    }
}

/// One direction of a connection: a reader thread stamping chunks, a writer thread writing
/// them when due.
fn start_line(
    from: TcpStream,
    to: TcpStream,
    direction: Direction,
    state: &Arc<RelayState>,
    open: &Arc<OpenConnection>,
) {
    let (chunks, due_chunks) = sync_channel(CHUNKS_IN_FLIGHT);
    let reader_state = state.clone();
    let reader_open = open.clone();
    let writer_open = open.clone();
    let spawned = thread::Builder::new()
        .name("relay-read".to_owned())
        .spawn(move || {
            read_chunks(from, &chunks, direction, &reader_state);
            drop(reader_open);
        });
    if spawned.is_err() {
        return;
    }
    let _ = thread::Builder::new()
        .name("relay-write".to_owned())
        .spawn(move || {
            write_when_due(to, &due_chunks);
            drop(writer_open);
        });
}

/// Reads `from` until its end, each chunk stamped with the time it is due on the other side.
fn read_chunks(
    mut from: TcpStream,
    chunks: &SyncSender<(Instant, Vec<u8>)>,
    direction: Direction,
    state: &RelayState,
) {
    let mut line = DelayLine::default();
    let mut buffer = vec![0; CHUNK_BYTES];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let due = line.due(Instant::now(), state.delay(direction));
        if chunks.send((due, buffer[..read].to_vec())).is_err() {
            // The writer met an error: nothing more can be delivered.
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Writes each chunk to `to` when it is due; once the reader is done (its side closed) and
/// every chunk is out, closes `to` for writing, so the end of the stream is relayed too.
fn write_when_due(mut to: TcpStream, due_chunks: &Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, chunk)) = due_chunks.recv() {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// The due times of one direction's chunks: each after its own delay, and never before the
/// chunk ahead of it, so that a stream keeps its order whatever the jitter.
#[derive(Debug, Default)]
pub(crate) struct DelayLine {
    last_due: Option<Instant>,
}

impl DelayLine {
    /// When a chunk that `arrived` with `delay` drawn for it is due.
    pub(crate) fn due(&mut self, arrived: Instant, delay: Duration) -> Instant {
        let own = arrived + delay;
        let due = self.last_due.map_or(own, |last| own.max(last));
        self.last_due = Some(due);
        due
    }
}

/// One relayed connection while any of its threads runs.
struct OpenConnection {
    id: u64,
    state: Arc<RelayState>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some([client, server]) = lock(&self.state.open).remove(&self.id) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}
