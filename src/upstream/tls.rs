//! HTTPS towards upstream: the rustls client configuration (which authorities are trusted) and
//! how a refused certificate is told apart from other failures to connect.

use std::error::Error;
use std::io;
use std::sync::Arc;

use rustls::{CertificateError, ClientConfig, RootCertStore};

use super::error::CertificateProblem;
use crate::config::{tls_provider, CaFile};

/// The client configuration: the webpki roots (Mozilla's, compiled in: no system store to
/// depend on), plus the authorities of `upstream.ca_file`; TLS 1.2 and 1.3 over ring.
pub(super) fn client_config(ca_file: Option<&CaFile>) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca_file) = ca_file {
        // Each was checked to be usable when the configuration was validated.
        roots.add_parsable_certificates(ca_file.certificates().iter().cloned());
    }
    ClientConfig::builder_with_provider(Arc::new(tls_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// What was wrong with the upstream's certificate, if `error` (from the connector) is rustls
/// refusing it; `None` for anything else (refused, unreachable, a handshake broken off).
pub(super) fn certificate_problem(error: &(dyn Error + 'static)) -> Option<CertificateProblem> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(rustls::Error::InvalidCertificate(certificate)) =
            error.downcast_ref::<rustls::Error>()
        {
            return Some(classify(certificate));
        }
        // tokio-rustls wraps rustls's error in an io::Error, whose `source` skips it.
        if let Some(inner) = error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            if let Some(problem) = certificate_problem(inner) {
                return Some(problem);
            }
        }
        next = error.source();
    }
    None
}

fn classify(error: &CertificateError) -> CertificateProblem {
    match error {
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            CertificateProblem::WrongHost
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => CertificateProblem::OutOfDate,
        CertificateError::UnknownIssuer => CertificateProblem::Untrusted,
        _ => CertificateProblem::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_found_inside_the_connectors_error() {
        let refused = |error: CertificateError| -> Box<dyn Error + Send + Sync> {
            // As hyper-rustls hands it over: rustls's error in tokio-rustls's io::Error.
            Box::new(io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(error),
            ))
        };
        for (error, problem) in [
            (
                CertificateError::NotValidForName,
                CertificateProblem::WrongHost,
            ),
            (CertificateError::Expired, CertificateProblem::OutOfDate),
            (CertificateError::NotValidYet, CertificateProblem::OutOfDate),
            (
                CertificateError::UnknownIssuer,
                CertificateProblem::Untrusted,
            ),
            (CertificateError::BadSignature, CertificateProblem::Invalid),
        ] {
            assert_eq!(
                certificate_problem(&*refused(error.clone())),
                Some(problem),
                "{error:?}"
            );
        }
        let refused_connection: Box<dyn Error + Send + Sync> =
            Box::new(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(certificate_problem(&*refused_connection), None);
        let alert: Box<dyn Error + Send + Sync> = Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        ));
        assert_eq!(certificate_problem(&*alert), None);
    }
}
