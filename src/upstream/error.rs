//! Why an upstream call got no answer ([`TransportError`]): the `reason` label of
//! `wxgate_upstream_transport_errors_total`, the status and errmsg of wxgate's own answer, and
//! whether the call may have reached WeChat.

use std::error::Error as _;
use std::io;

use http::StatusCode;

/// Why an upstream call got no answer: the `reason` label of
/// `wxgate_upstream_transport_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The connection could not be opened (refused, unreachable, TLS failed): nothing was sent.
    #[error("upstream connection failed")]
    Connect,
    /// No whole answer within `upstream.timeout_ms`.
    #[error("upstream timed out")]
    Timeout,
    /// The connection broke after the request may have been sent.
    #[error("upstream connection reset")]
    Reset,
    /// The answer's body is larger than `upstream.max_body_bytes`: refused as soon as that is
    /// known (from its `Content-Length`, or once that many bytes came), the rest never read and
    /// the connection closed. WeChat's answers are small JSON; a huge one is a fault, and
    /// reading it whole would let one upstream fill wxgate's memory.
    #[error("upstream answer larger than upstream.max_body_bytes")]
    TooLarge,
}

impl TransportError {
    /// Every value, in label order.
    pub const ALL: [TransportError; 4] = [
        TransportError::Connect,
        TransportError::Timeout,
        TransportError::Reset,
        TransportError::TooLarge,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            TransportError::Connect => "connect",
            TransportError::Timeout => "timeout",
            TransportError::Reset => "reset",
            TransportError::TooLarge => "too_large",
        }
    }

    /// Position in [`TransportError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The HTTP status wxgate answers with: 504 for a timeout, 502 otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            TransportError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            TransportError::Connect | TransportError::Reset | TransportError::TooLarge => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// Whether the request certainly never reached upstream, so sending it again cannot
    /// execute it twice (or spend a `js_code` twice).
    pub fn nothing_was_sent(self) -> bool {
        self == TransportError::Connect
    }
}

/// Whether hyper's error says the connection closed or was reset before an answer's head
/// came: what a server closing an idle connection does to a request written at that moment.
/// Not a parse error, nor anything that followed part of an answer.
pub(super) fn closed_before_answer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}
