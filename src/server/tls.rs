//! HTTPS on the proxy port (`[server.tls]`): the rustls server configuration, built once at
//! start, and the certificate it presents, which a reload replaces.
//!
//! The configuration asks its certificate of a [`CertificateSlot`] at every handshake, one
//! atomic load: a reload stores the new certificate there, new connections get it, and
//! connections already open keep the session they negotiated (nothing in them refers to the
//! slot after their handshake), so no connection is dropped by a rotation.
//!
//! ALPN offers `h2` and `http/1.1`; hyper's automatic server then speaks whichever the
//! client chose (HTTP/2 starts with its preface either way). Clients are not asked for a
//! certificate: who may connect is `server.allow`'s business.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::{tls_provider, ServerTlsConfig};

/// The TLS side of the proxy port: the acceptor, and the slot of the certificate it presents.
pub(crate) struct ServerTls {
    acceptor: TlsAcceptor,
    slot: Arc<CertificateSlot>,
}

impl ServerTls {
    /// Serves `config`'s certificate with TLS 1.2 and 1.3 over ring.
    pub(crate) fn new(config: &ServerTlsConfig) -> ServerTls {
        let slot = Arc::new(CertificateSlot(ArcSwap::new(
            config.certified_key().clone(),
        )));
        let mut server = ServerConfig::builder_with_provider(Arc::new(tls_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports rustls's default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            slot,
        }
    }

    /// The acceptor that runs each connection's handshake.
    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// New connections present `config`'s certificate from now on.
    pub(crate) fn replace(&self, config: &ServerTlsConfig) {
        self.slot.0.store(config.certified_key().clone());
    }
}

/// The certificate presented to every client, whatever name it asks for (wxgate has one).
struct CertificateSlot(ArcSwap<CertifiedKey>);

/// rustls wants its resolvers `Debug`; this one shows nothing of the certificate or its key.
impl std::fmt::Debug for CertificateSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateSlot")
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
