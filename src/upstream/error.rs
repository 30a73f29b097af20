//! Why an upstream call got no answer ([`TransportError`]): the `reason` label of
//! `wxgate_upstream_transport_errors_total`, the status and errmsg of wxgate's own answer, and
//! whether the call may have reached WeChat.

use http::StatusCode;

/// Why an upstream call got no answer: the `reason` label of
/// `wxgate_upstream_transport_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The connection could not be opened (refused, unreachable, a TLS handshake broken
    /// off): nothing was sent.
    #[error("upstream connection failed")]
    Connect,
    /// No whole answer within `upstream.timeout_ms`.
    #[error("upstream timed out")]
    Timeout,
    /// The connection broke after the request may have been sent.
    #[error("upstream connection reset")]
    Reset,
    /// A connection kept alive from an earlier call closed, or was reset, after the request
    /// was written and before any answer: what a server closing an idle connection at its
    /// keep-alive timeout does to a request that arrives at that moment (it never read it).
    /// A server that read the request and then died looks the same, so only a request that may
    /// be executed twice is sent again (see [`crate::retry`]).
    #[error("upstream closed a reused connection without answering")]
    ReusedConnectionClosed,
    /// The answer's body is larger than `upstream.max_body_bytes`: refused as soon as that is
    /// known (from its `Content-Length`, or once that many bytes came), the rest never read and
    /// the connection closed. WeChat's answers are small JSON; a huge one is a fault, and
    /// reading it whole would let one upstream fill wxgate's memory.
    #[error("upstream answer larger than upstream.max_body_bytes")]
    TooLarge,
    /// `upstream.max_connections` were open and busy for the whole of `upstream.timeout_ms`:
    /// nothing was sent.
    #[error("upstream timed out: all upstream.max_connections busy")]
    ConnectionLimit,
    /// The upstream's TLS certificate was refused: nothing was sent. Said to the client in
    /// general terms (what was wrong, never the certificate's contents); the log has rustls's
    /// own words.
    #[error("upstream TLS certificate refused: {0}")]
    Certificate(CertificateProblem),
}

/// What was wrong with a refused certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertificateProblem {
    /// Issued for other names than the base URL's host.
    #[error("not valid for the upstream's host name")]
    WrongHost,
    /// Expired, or not valid yet (also: this host's clock is wrong).
    #[error("expired or not yet valid")]
    OutOfDate,
    /// Not issued by a trusted authority (the webpki roots and `upstream.ca_file`'s).
    #[error("not issued by a trusted authority")]
    Untrusted,
    /// Anything else (a bad signature, a revoked certificate, a wrong purpose...).
    #[error("invalid")]
    Invalid,
}

impl TransportError {
    /// Every label value, in [`TransportError::index`] order. Every certificate problem is
    /// one label: their number is small, but the label stays about transport.
    pub const LABELS: [&'static str; 7] = [
        "connect",
        "timeout",
        "reset",
        "reused_connection_closed",
        "too_large",
        "connection_limit",
        "certificate",
    ];

    /// Position of its label in [`TransportError::LABELS`].
    pub fn index(self) -> usize {
        match self {
            TransportError::Connect => 0,
            TransportError::Timeout => 1,
            TransportError::Reset => 2,
            TransportError::ReusedConnectionClosed => 3,
            TransportError::TooLarge => 4,
            TransportError::ConnectionLimit => 5,
            TransportError::Certificate(_) => 6,
        }
    }

    /// The HTTP status wxgate answers with: 504 when the call's time ran out, 502 otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            TransportError::Timeout | TransportError::ConnectionLimit => {
                StatusCode::GATEWAY_TIMEOUT
            }
            TransportError::Connect
            | TransportError::Reset
            | TransportError::ReusedConnectionClosed
            | TransportError::TooLarge
            | TransportError::Certificate(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether the call is worth sending again: the request certainly never reached upstream
    /// (so sending it again cannot execute it twice, or spend a `js_code` twice), and another
    /// try may fare better. Only a connection that could not be opened: a call that waited its
    /// whole timeout for a free connection has no time left, and a refused certificate is
    /// refused again.
    pub fn retryable(self) -> bool {
        self == TransportError::Connect
    }
}
