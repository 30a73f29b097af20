//! HTTPS for the stand-in: a rustls server with the certificate its [`StandInTls`] gives, and
//! what the stand-in notes of each TLS connection (that it happened, and the server name the
//! client asked for), so that tests can see a client's handshakes, SNI and connection reuse.

use std::io;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{crypto, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::StandInTls;

/// The acceptor for `tls`: TLS 1.2 and 1.3 over ring, ALPN offering HTTP/2 and HTTP/1.1 (the
/// server speaks both).
///
/// # Errors
/// `InvalidInput` when the PEM holds no certificate or no usable key, or they do not match.
pub(crate) fn acceptor(tls: &StandInTls) -> io::Result<TlsAcceptor> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    let chain = CertificateDer::pem_slice_iter(tls.certificate_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid("stand-in TLS: the certificate chain is not valid PEM"))?;
    if chain.is_empty() {
        return Err(invalid("stand-in TLS: no certificate in the chain"));
    }
    let key = PrivateKeyDer::from_pem_slice(tls.private_key_pem.as_bytes())
        .map_err(|_| invalid("stand-in TLS: no private key in the key PEM"))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|_| invalid("stand-in TLS: no protocol version"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|_| invalid("stand-in TLS: the key does not fit the certificate"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
