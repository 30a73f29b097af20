//! Certificates read from a PEM file, for `upstream.ca_file` and `server.tls.cert_file`.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why a PEM file gave no certificates; each file's own error says it in its words.
pub enum PemCertificatesError {
    /// The file could not be read (the I/O error's text, which does not name the file).
    Unreadable(String),
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
    let text = std::fs::read(path)
        // An io::Error from `read` says what went wrong, not which file.
        .map_err(|error| PemCertificatesError::Unreadable(error.to_string()))?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .map(|certificate| certificate.map(CertificateDer::into_owned))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PemCertificatesError::NotPem)?;
    if certificates.is_empty() {
        return Err(PemCertificatesError::NoCertificate);
    }
    Ok(certificates)
}
