//! Why wxgate closes client connections itself ([`CloseReason`]), and the proxy port's
//! connection metrics ([`ConnectionMetrics`]): open, the cap, and the closes by reason.

use prometheus::{IntCounter, IntGauge};

use crate::metrics::{Label, Metrics, Series};

/// Why wxgate closed a client connection itself: the `reason` label of
/// `wxgate_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No complete request head within `server.request_head_timeout_ms` of the accept.
    HeadTimeout,
    /// No request in flight for `server.idle_timeout_ms` after the last one.
    Idle,
    /// Closed while idle to admit a new connection at the cap.
    Cap,
    /// A new connection at the cap, with none idle to close instead.
    Refused,
    /// A new connection from an address outside `server.allow`, closed unread.
    NotAllowed,
    /// With `[server.tls]`: a handshake that failed (a client speaking plain HTTP, or one
    /// that refused the certificate).
    TlsHandshake,
}

impl CloseReason {
    /// Every value, in label order.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::HeadTimeout,
        CloseReason::Idle,
        CloseReason::Cap,
        CloseReason::Refused,
        CloseReason::NotAllowed,
        CloseReason::TlsHandshake,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeadTimeout => "head_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Cap => "cap",
            CloseReason::Refused => "refused",
            CloseReason::NotAllowed => "not_allowed",
            CloseReason::TlsHandshake => "tls_handshake",
        }
    }

    /// Position in [`CloseReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The proxy port's client connections: how many are open, the cap, and those wxgate closed
/// itself, by reason.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Open right now.
    pub open: IntGauge,
    /// The cap in force (`server.max_connections`, or less to fit the open-files limit).
    pub limit: IntGauge,
    /// By [`CloseReason::index`].
    closed: Series<IntCounter>,
}

impl ConnectionMetrics {
    /// Creates every series in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<ConnectionMetrics> {
        Ok(ConnectionMetrics {
            open: metrics.gauge(
                "wxgate_connections_open",
                "Client connections open on the proxy port right now.",
            )?,
            limit: metrics.gauge(
                "wxgate_connections_limit",
                "The cap on open client connections in force: server.max_connections, or less to fit the open-files limit.",
            )?,
            closed: metrics.counters(
                "wxgate_connections_closed_total",
                "Client connections wxgate closed itself, by reason: head_timeout (no complete request head, or TLS handshake, in time), idle (no request for idle_timeout), cap (closed to admit a new one), refused (a new one at the cap with none idle), not_allowed (from an address outside server.allow), tls_handshake (a failed TLS handshake).",
                &[Label::new("reason", CloseReason::ALL.map(CloseReason::label))],
            )?,
        })
    }

    /// wxgate closed a connection (or refused a new one) for `reason`.
    pub fn closed(&self, reason: CloseReason) {
        self.closed.get(reason.index()).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_counted_by_reason_from_the_start() {
        let registry = prometheus::Registry::new();
        let metrics = ConnectionMetrics::new(&Metrics::new(&registry).unwrap()).unwrap();
        metrics.closed(CloseReason::Cap);
        let text = crate::metrics::exposition(&registry);
        assert!(text.contains("wxgate_connections_closed_total{reason=\"cap\"} 1"));
        assert!(text.contains("wxgate_connections_closed_total{reason=\"head_timeout\"} 0"));
    }
}
