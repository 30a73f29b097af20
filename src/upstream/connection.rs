//! One HTTP/1.1 connection towards upstream, driven by the call that uses it.
//!
//! A call writes its request and reads the answer in its own task: there is no driver task
//! per connection, no channel that hands the request over and the answer back, and no
//! wake-up from one task to another on the way (hyper's `client::conn` needs all three). The
//! answer's head and framing are read by [`super::answer`].
//!
//! Nobody watches an idle connection in the pool. Whether its server closed it meanwhile is
//! asked when it is taken out, and by housekeeping once a second
//! ([`Connection::closed_while_idle`]): the runtime records every socket's readiness as the
//! kernel reports it, so asking costs no system call when nothing came.
//!
//! A call writes its request only after the other tasks that were ready when it got there
//! have run: the calls of one batch of client requests then write their requests one after
//! the other, and wake the upstream once, rather than each waking it again after it went back
//! to sleep. Waking a process asleep on another CPU costs the waker an inter-processor
//! interrupt (in a VM, an exit to the hypervisor): measured on loopback at saturation, writing
//! at once woke the upstream or the client 0.33-0.49 times per request (0.21-0.34
//! interrupts), deferred 0.11-0.15 times (0.07-0.10 interrupts), for one more poll of the
//! caller's task (about 1.6k instructions). The wait is one turn of the queue: with nothing
//! else ready, the call writes at once.
//!
//! A connection keeps its deadline timer from call to call. Each call moves it to the call's
//! own deadline, later than the last one (every call has the same timeout), and tokio then only
//! records the later time: no timer is registered and cancelled per call.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::Method;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::answer::{parse_head, Chunked, Framing, Head, Parsed, MAX_HEAD_BYTES};
use super::pool::Slot;
use super::request::RequestWriter;
use super::{UpstreamRequest, UpstreamResponse};

/// The read buffer's first size: an answer's head and a WeChat-sized body in one read.
const INPUT_BYTES: usize = 8 << 10;

/// An open connection and what it keeps between calls.
pub(super) struct Connection {
    stream: Stream,
    input: Input,
    /// The request head being written (its allocation kept between calls).
    output: Vec<u8>,
    deadline: Pin<Box<Sleep>>,
    /// Whether the last call left the connection able to carry another request: its request
    /// written whole, its answer read to the end and nothing after it, and the server keeping
    /// the connection open.
    reusable: bool,
    /// Its place under `upstream.max_connections`, given back when the connection is dropped.
    _slot: Slot,
}

/// The socket, plain or under TLS.
pub(super) enum Stream {
    /// `http://`.
    Plain(TcpStream),
    /// `https://`.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why a call on a connection got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// Writing failed before any byte of the request went out: it can go on another
    /// connection.
    Unsent,
    /// The connection was closed or reset after the request (or part of it) was written and
    /// before any byte of an answer came.
    ClosedBeforeAnswer,
    /// The connection broke, or the answer broke HTTP/1.1, after something of it came.
    Broken,
    /// The answer's body is larger than the limit.
    TooLarge,
    /// The call's deadline passed.
    Timeout,
}

/// One call on a connection: what it sends and how far it got.
struct Call<'a> {
    method: &'a Method,
    body: &'a Bytes,
    limit: usize,
    /// Bytes of the head, then of the body, written so far.
    written: usize,
    /// Whether any byte of an answer came.
    answered: bool,
    reading: Reading,
}

/// What the call is reading.
enum Reading {
    Head,
    Body(Head, Body),
}

/// A body read so far.
enum Body {
    Length { bytes: Vec<u8>, left: u64 },
    Chunked { bytes: Vec<u8>, state: Chunked },
    UntilClose { bytes: Vec<u8> },
}

impl Connection {
    /// A connection over `stream`, holding `slot` while it is open.
    pub(super) fn new(stream: Stream, slot: Slot) -> Connection {
        Connection {
            stream,
            input: Input::new(),
            output: Vec::with_capacity(512),
            // Registered with the timer at its first call.
            deadline: Box::pin(tokio::time::sleep_until(Instant::now())),
            reusable: false,
            _slot: slot,
        }
    }

    /// Whether the last call left the connection able to carry another request.
    pub(super) fn reusable(&self) -> bool {
        self.reusable
    }

    /// Sends `request` and reads the whole answer, of at most `limit` body bytes, by
    /// `deadline`. The request is written and the answer read at the same time: a server may
    /// answer before it has read a large body (the connection is then not used again).
    pub(super) async fn send(
        &mut self,
        writer: &RequestWriter,
        request: &UpstreamRequest,
        limit: usize,
        deadline: Instant,
    ) -> Result<UpstreamResponse, Failure> {
        self.reusable = false;
        writer.write_head(request, &mut self.output);
        self.deadline.as_mut().reset(deadline);
        let mut call = Call {
            method: &request.method,
            body: &request.body,
            limit,
            written: 0,
            answered: false,
            reading: Reading::Head,
        };
        let mut deferred = false;
        poll_fn(|cx| {
            if !deferred {
                // Once, before writing: the task goes to the back of the runtime's queue, and
                // writes after the tasks ready now have run (see the module doc).
                deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.poll_call(cx, &mut call)
        })
        .await
    }

    /// Whether the server closed (or wrote to) the connection while it was idle: either way it
    /// cannot carry another request. Asks without waiting, and without a system call unless
    /// the runtime saw the socket become readable.
    pub(super) fn closed_while_idle(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match &mut self.stream {
            Stream::Plain(tcp) => {
                !matches!(tcp.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
            }
            Stream::Tls(tls) => {
                // A TLS record (a session ticket) may come and be consumed without any data.
                let mut cx = Context::from_waker(Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(tls.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_ready()
            }
        }
    }

    fn poll_call(
        &mut self,
        cx: &mut Context<'_>,
        call: &mut Call<'_>,
    ) -> Poll<Result<UpstreamResponse, Failure>> {
        let writing = match self.poll_write_request(cx, call) {
            Poll::Ready(Ok(())) => false,
            Poll::Ready(Err(failure)) => return Poll::Ready(Err(failure)),
            Poll::Pending => true,
        };
        loop {
            if let Some(answer) = self.read_answer(call)? {
                self.reusable &= !writing && self.input.is_empty();
                return Poll::Ready(Ok(answer));
            }
            match self.input.poll_fill(&mut self.stream, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(self.at_close(call)),
                Poll::Ready(Ok(_)) => call.answered = true,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(call.failure(&error))),
                Poll::Pending => break,
            }
        }
        // Only looked at when waiting: a call that never waits finishes before any deadline.
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Failure::Timeout));
        }
        Poll::Pending
    }

    /// Writes what is left of the request.
    fn poll_write_request(
        &mut self,
        cx: &mut Context<'_>,
        call: &mut Call<'_>,
    ) -> Poll<Result<(), Failure>> {
        let head = self.output.len();
        let total = head + call.body.len();
        while call.written < total {
            let written = if call.written < head {
                let parts = [
                    IoSlice::new(&self.output[call.written..]),
                    IoSlice::new(call.body),
                ];
                self.stream.poll_write_vectored(cx, &parts)
            } else {
                self.stream
                    .poll_write(cx, &call.body[call.written - head..])
            };
            match written {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(call.write_failure(&io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => call.written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(call.write_failure(&error))),
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.stream.poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(error)) => Poll::Ready(Err(call.write_failure(&error))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads what the input holds of the answer: the answer, once it is whole.
    fn read_answer(&mut self, call: &mut Call<'_>) -> Result<Option<UpstreamResponse>, Failure> {
        loop {
            match &mut call.reading {
                Reading::Head => {
                    if self.input.is_empty() {
                        return Ok(None);
                    }
                    let (head, length) = match parse_head(self.input.filled(), call.method) {
                        Ok(Parsed::Partial) => return Ok(None),
                        Ok(Parsed::Informational(length)) => {
                            self.input.consume(length);
                            continue;
                        }
                        Ok(Parsed::Final(head, length)) => (head, length),
                        Err(_) => return Err(Failure::Broken),
                    };
                    self.input.consume(length);
                    let body = match head.framing {
                        Framing::Length(length) if length > call.limit as u64 => {
                            return Err(Failure::TooLarge)
                        }
                        // The usual answer: its body came with its head.
                        Framing::Length(length) if length as usize <= self.input.filled().len() => {
                            let length = length as usize;
                            let body = Bytes::copy_from_slice(&self.input.filled()[..length]);
                            self.input.consume(length);
                            return Ok(Some(self.answered(head, body)));
                        }
                        Framing::Length(length) => Body::Length {
                            bytes: Vec::with_capacity(length as usize),
                            left: length,
                        },
                        Framing::Chunked => Body::Chunked {
                            bytes: Vec::new(),
                            state: Chunked::Size,
                        },
                        Framing::UntilClose => Body::UntilClose { bytes: Vec::new() },
                    };
                    call.reading = Reading::Body(head, body);
                }
                Reading::Body(_, body) => {
                    let input = self.input.filled();
                    let (used, done) = match body {
                        Body::Length { bytes, left } => {
                            let take = input
                                .len()
                                .min(usize::try_from(*left).unwrap_or(usize::MAX));
                            bytes.extend_from_slice(&input[..take]);
                            *left -= take as u64;
                            (take, *left == 0)
                        }
                        Body::Chunked { bytes, state } => {
                            let used = state
                                .decode(input, bytes, call.limit)
                                .map_err(|_| Failure::Broken)?;
                            if bytes.len() > call.limit {
                                return Err(Failure::TooLarge);
                            }
                            (used, *state == Chunked::Done)
                        }
                        Body::UntilClose { bytes } => {
                            if bytes.len() + input.len() > call.limit {
                                return Err(Failure::TooLarge);
                            }
                            bytes.extend_from_slice(input);
                            (input.len(), false)
                        }
                    };
                    self.input.consume(used);
                    if !done {
                        return Ok(None);
                    }
                    return Ok(Some(self.finish(call)));
                }
            }
        }
    }

    /// The connection closed under the call: the end of a body framed by the close, and a
    /// failure otherwise.
    fn at_close(&mut self, call: &mut Call<'_>) -> Result<UpstreamResponse, Failure> {
        match &call.reading {
            Reading::Body(_, Body::UntilClose { .. }) => Ok(self.finish(call)),
            _ if call.answered => Err(Failure::Broken),
            _ => Err(Failure::ClosedBeforeAnswer),
        }
    }

    /// The answer whose body has been read whole.
    fn finish(&mut self, call: &mut Call<'_>) -> UpstreamResponse {
        let Reading::Body(head, body) = std::mem::replace(&mut call.reading, Reading::Head) else {
            unreachable!("finish is called with a body read")
        };
        let bytes = match body {
            Body::Length { bytes, .. }
            | Body::Chunked { bytes, .. }
            | Body::UntilClose { bytes } => bytes,
        };
        self.answered(head, Bytes::from(bytes))
    }

    fn answered(&mut self, head: Head, body: Bytes) -> UpstreamResponse {
        self.reusable = head.keep_alive && head.framing != Framing::UntilClose;
        UpstreamResponse {
            status: head.status,
            headers: head.headers,
            body,
        }
    }
}

impl Call<'_> {
    /// A failure to write: nothing written, the request can go elsewhere.
    fn write_failure(&self, error: &io::Error) -> Failure {
        if self.written == 0 {
            Failure::Unsent
        } else {
            self.failure(error)
        }
    }

    /// A failure of the connection once something was written: a close or a reset before
    /// any answer, or a broken answer.
    fn failure(&self, error: &io::Error) -> Failure {
        let closed = matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        );
        if closed && !self.answered {
            Failure::ClosedBeforeAnswer
        } else {
            Failure::Broken
        }
    }
}

impl Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, bytes),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, bytes),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        parts: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, parts),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, parts),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }
}

/// The bytes read from the socket and not yet consumed: `data[start..end]`. Kept between
/// calls, so a connection zeroes its buffer once, not per read.
struct Input {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    fn new() -> Input {
        Input {
            data: vec![0; INPUT_BYTES],
            start: 0,
            end: 0,
        }
    }

    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what the socket has into the free space (made by moving the unconsumed bytes to
    /// the front, or by growing for a long head); the number of bytes read, 0 at the end.
    fn poll_fill(&mut self, stream: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // Only a head is kept unconsumed, and it is refused past MAX_HEAD_BYTES.
                let grown = (self.data.len() * 2).min(2 * MAX_HEAD_BYTES);
                self.data.resize(grown, 0);
            }
        }
        let mut buf = ReadBuf::new(&mut self.data[self.end..]);
        match stream.poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}
