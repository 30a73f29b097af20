//! Certificates read from a PEM file, for `upstream.ca_file` and `server.tls.cert_file`.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::files::{read_limited, FileError, TooLarge};

/// Why a PEM file gave no certificates; each file's own error says it in its words.
pub enum PemCertificatesError {
    /// The file could not be read (the I/O error's text, which does not name the file).
    Unreadable(String),
    /// The file is larger than wxgate reads.
    TooLarge(TooLarge),
    /// A PEM section is broken (no end line, bad base64).
    NotPem,
    /// No `-----BEGIN CERTIFICATE-----` section.
    NoCertificate,
}

/// Every certificate of the PEM file at `path`, in file order; other sections (a key,
/// parameters) are ignored.
pub fn read_certificates(
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemCertificatesError> {
    let text = read_limited(path).map_err(|error| match error {
        // An io::Error says what went wrong, not which file.
        FileError::Unreadable(error) => PemCertificatesError::Unreadable(error.to_string()),
        FileError::TooLarge(error) => PemCertificatesError::TooLarge(error),
    })?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .map(|certificate| certificate.map(CertificateDer::into_owned))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PemCertificatesError::NotPem)?;
    if certificates.is_empty() {
        return Err(PemCertificatesError::NoCertificate);
    }
    Ok(certificates)
}
