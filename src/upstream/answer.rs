//! Reading an upstream answer (RFC 9112): its head (status, headers, whether the connection
//! stays open after it), how its body is framed (a length, chunks, or the connection's close),
//! and the chunked decoder.
//!
//! Pure functions over bytes already read, so that every framing rule is tested without a
//! socket; [`super::connection`] reads the bytes and calls them.

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use std::mem::MaybeUninit;

/// The most headers an answer may have (hyper's client allowed as many).
const MAX_HEADERS: usize = 100;

/// The largest answer head read: WeChat's are a few hundred bytes.
pub(super) const MAX_HEAD_BYTES: usize = 64 << 10;

/// The longest chunk-size line (with its extensions) and the most trailer bytes of a chunked
/// body.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILER_BYTES: usize = 16 << 10;

/// An answer's head, read whole.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) status: StatusCode,
    /// Every header but the hop-by-hop ones (and those `Connection` names) and
    /// `Content-Length`: what goes back to the client (hyper frames the body it sends).
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    /// Whether the server keeps the connection open after this answer (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub(super) keep_alive: bool,
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// After this many bytes (`Content-Length`, or none at all: HEAD, 204, 304).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// When the server closes the connection.
    UntilClose,
}

/// What the bytes read so far hold.
#[derive(Debug)]
pub(super) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An informational (1xx) head of this many bytes, to be skipped: the final answer follows.
    Informational(usize),
    /// The final head, of this many bytes; the body follows.
    Final(Head, usize),
}

/// The answer breaks HTTP/1.1: the connection cannot be trusted with another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Malformed;

/// Reads the head at the start of `bytes`, the answer to a `method` request.
pub(super) fn parse_head(bytes: &[u8], method: &Method) -> Result<Parsed, Malformed> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        bytes,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BYTES => {
            return Ok(Parsed::Partial)
        }
        Ok(httparse::Status::Partial) | Err(_) => return Err(Malformed),
    };
    let code = response.code.ok_or(Malformed)?;
    let http10 = response.version == Some(0);
    match code {
        // wxgate never asks to switch protocols.
        101 => return Err(Malformed),
        100..=199 => return Ok(Parsed::Informational(length)),
        _ => {}
    }
    let status = StatusCode::from_u16(code).map_err(|_| Malformed)?;
    let mut reader = HeadReader::default();
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Malformed)?;
        if reader.consumes(&name, field.value)? {
            continue;
        }
        let value = HeaderValue::from_bytes(field.value).map_err(|_| Malformed)?;
        headers.append(name, value);
    }
    for named in &reader.connection_names {
        headers.remove(named);
    }
    let framing = if code == 204 || code == 304 || method == Method::HEAD {
        Framing::Length(0)
    } else if reader.transfer_encoding {
        if http10 {
            return Err(Malformed);
        }
        if reader.chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match reader.content_length {
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        }
    };
    let keep_alive = if http10 {
        reader.keep_alive
    } else {
        !reader.close
    };
    Ok(Parsed::Final(
        Head {
            status,
            headers,
            framing,
            keep_alive,
        },
        length,
    ))
}

/// What the headers that describe the connection and the framing say.
#[derive(Default)]
struct HeadReader {
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// The last transfer coding (of the last `Transfer-Encoding`) is `chunked`.
    chunked: bool,
    close: bool,
    keep_alive: bool,
    /// Other names listed in `Connection`: hop-by-hop headers of this connection.
    connection_names: Vec<HeaderName>,
}

impl HeadReader {
    /// Reads `name: value` if it is one of the headers a proxy consumes; true if so (it is
    /// then not passed on).
    fn consumes(&mut self, name: &HeaderName, value: &[u8]) -> Result<bool, Malformed> {
        if *name == header::CONTENT_LENGTH {
            // Several values (in one header or several) must agree.
            for part in value.split(|&b| b == b',') {
                let length = parse_decimal(part.trim_ascii()).ok_or(Malformed)?;
                if self.content_length.is_some_and(|seen| seen != length) {
                    return Err(Malformed);
                }
                self.content_length = Some(length);
            }
            return Ok(true);
        }
        if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            return Ok(true);
        }
        if *name == header::CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if let Ok(named) = HeaderName::from_bytes(token) {
                    self.connection_names.push(named);
                }
            }
            return Ok(true);
        }
        Ok(super::headers::is_hop_by_hop(name))
    }
}

/// A `Content-Length` value: ASCII digits only.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// Where a chunked body stands between the bytes that came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last (empty) chunk: trailer lines until an empty one; this many bytes of them
    /// read so far.
    Trailers(usize),
    /// The body has ended.
    Done,
}

impl Chunked {
    /// Decodes what it can of `input` into `body`; returns how many bytes of `input` it used.
    /// Stops at the end of the body, or where a line is cut short (more bytes are needed), or
    /// once `body` holds more than `limit` bytes (the caller refuses it then).
    pub(super) fn decode(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        limit: usize,
    ) -> Result<usize, Malformed> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match *self {
                Chunked::Done => return Ok(used),
                Chunked::Size => {
                    let Some(end) = memchr::memchr(b'\n', rest) else {
                        return if rest.len() > MAX_CHUNK_LINE {
                            Err(Malformed)
                        } else {
                            Ok(used)
                        };
                    };
                    let size = chunk_size(&rest[..end])?;
                    used += end + 1;
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if rest.is_empty() || body.len() > limit {
                        return Ok(used);
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    // Never past the limit by more than the bytes already in hand.
                    let take = take.min(limit + 1 - body.len());
                    body.extend_from_slice(&rest[..take]);
                    used += take;
                    let left = left - take as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                }
                Chunked::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        used += 2;
                        *self = Chunked::Size;
                    }
                    [b'\n', ..] => {
                        used += 1;
                        *self = Chunked::Size;
                    }
                    [] | [b'\r'] => return Ok(used),
                    _ => return Err(Malformed),
                },
                Chunked::Trailers(seen) => {
                    let Some(end) = memchr::memchr(b'\n', rest) else {
                        return if seen + rest.len() > MAX_TRAILER_BYTES {
                            Err(Malformed)
                        } else {
                            Ok(used)
                        };
                    };
                    used += end + 1;
                    let line = &rest[..end];
                    *self = if line.is_empty() || line == b"\r" {
                        Chunked::Done
                    } else if seen + end + 1 > MAX_TRAILER_BYTES {
                        return Err(Malformed);
                    } else {
                        Chunked::Trailers(seen + end + 1)
                    };
                }
            }
        }
    }
}

/// The size of a chunk-size line (`1a3;ext=1\r`, the LF already cut): hex digits, then
/// optional whitespace and extensions, which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(Malformed);
    }
    let after = line[digits..].trim_ascii_start();
    if !after.is_empty() && after[0] != b';' {
        return Err(Malformed);
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| Malformed)?;
    u64::from_str_radix(text, 16).map_err(|_| Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: Method) -> (Head, usize) {
        match parse_head(text.as_bytes(), &method).unwrap() {
            Parsed::Final(head, length) => (head, length),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_usual_answer_has_its_length_and_keeps_the_connection() {
        let text = "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n\
                    Content-Length: 27\r\nConnection: keep-alive\r\n\r\n{\"errcode\":0}";
        let (head, length) = head(text, Method::GET);
        assert_eq!(length, text.len() - "{\"errcode\":0}".len());
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, Framing::Length(27));
        assert!(head.keep_alive);
        // Content-Length and Connection stay here; the rest goes back to the client.
        assert_eq!(head.headers.len(), 2);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.headers["server"], "nginx");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::GET,
                Framing::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
                Method::GET,
                Framing::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Method::GET,
                Framing::UntilClose,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Method::GET, Framing::UntilClose),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n",
                Method::GET,
                Framing::Length(7),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
                Method::HEAD,
                Framing::Length(0),
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                Method::GET,
                Framing::Length(0),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                Method::GET,
                Framing::Length(0),
            ),
        ];
        for (text, method, framing) in cases {
            assert_eq!(head(text, method).0.framing, framing, "{text}");
        }
    }

    #[test]
    fn keep_alive_depends_on_the_version_and_connection() {
        let cases = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true),
            (
                "HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            ("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                true,
            ),
        ];
        for (text, keep_alive) in cases {
            assert_eq!(head(text, Method::GET).0.keep_alive, keep_alive, "{text}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_stay_here() {
        let text = "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-private\r\nx-private: 1\r\n\
                    Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nx-kept: 2\r\n\
                    Content-Length: 0\r\n\r\n";
        let (head, _) = head(text, Method::GET);
        assert_eq!(head.headers.len(), 1, "{:?}", head.headers);
        assert_eq!(head.headers["x-kept"], "2");
    }

    #[test]
    fn informational_answers_are_skipped_and_partial_heads_wait() {
        let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert!(matches!(
            parse_head(text, &Method::POST),
            Ok(Parsed::Informational(25))
        ));
        assert!(matches!(
            parse_head(&text[25..], &Method::POST),
            Ok(Parsed::Partial)
        ));
        assert!(matches!(parse_head(b"", &Method::GET), Ok(Parsed::Partial)));
    }

    #[test]
    fn broken_heads_are_malformed() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 7, 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +7\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse_head(text.as_bytes(), &Method::GET).is_err(), "{text}");
        }
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "y".repeat(MAX_HEAD_BYTES));
        assert!(parse_head(endless.as_bytes(), &Method::GET).is_err());
    }

    /// Decodes `input` fed `step` bytes at a time, as reads may cut it.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
        limit: usize,
    ) -> Result<(Vec<u8>, usize), Malformed> {
        let mut state = Chunked::Size;
        let mut body = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        while state != Chunked::Done {
            if fed == input.len() {
                panic!("ran out of input in {state:?}");
            }
            let next = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..next]);
            fed = next;
            let used = state.decode(&pending, &mut body, limit)?;
            pending.drain(..used);
            if body.len() > limit {
                break;
            }
        }
        Ok((body, pending.len() + input.len() - fed))
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_are_cut() {
        let input = b"5\r\nhello\r\n7;name=value\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..input.len() {
            let (body, left) = decode_in_steps(input, step, 1000).unwrap();
            assert_eq!(body, b"hello, world", "step {step}");
            assert!(
                left <= 4,
                "step {step}: the next answer's bytes are left alone"
            );
        }
    }

    #[test]
    fn a_chunked_body_stops_past_its_limit() {
        let input = b"a\r\n0123456789\r\n0\r\n\r\n";
        let (body, _) = decode_in_steps(input, input.len(), 4).unwrap();
        assert_eq!(body.len(), 5, "one byte past the limit, no more");
        let (body, _) = decode_in_steps(input, input.len(), 10).unwrap();
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn broken_chunks_are_malformed() {
        for input in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"5 junk\r\nhello\r\n",
            b"11111111111111111\r\n",
        ] {
            let mut state = Chunked::Size;
            assert!(
                state.decode(input, &mut Vec::new(), 100).is_err(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let mut state = Chunked::Size;
        let long_line = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(state.decode(&long_line, &mut Vec::new(), 100).is_err());
    }
}
