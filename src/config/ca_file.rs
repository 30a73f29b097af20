//! `upstream.ca_file`: certificate authorities wxgate trusts for HTTPS to its upstream in
//! addition to the webpki roots (a TLS-inspecting egress proxy's, a private test WeChat's),
//! read and checked once, at validation, so that a bad file stops wxgate at start rather than
//! failing every call. `cluster.ca_file` is read the same way: the authorities of Redis's
//! certificates.
//!
//! No message holds the file's contents or its path: a PEM file next to a configuration may
//! hold a key by mistake, and messages go to CI logs.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use super::files::TooLarge;
use super::pem::{read_certificates, PemCertificatesError};

/// The certificates of `upstream.ca_file`, each usable as a trusted root.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    path: PathBuf,
    certificates: Vec<CertificateDer<'static>>,
}

/// Why `upstream.ca_file` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaFileError {
    /// The file could not be read (the I/O error's text, which does not name the file).
    #[error("cannot be read ({0})")]
    Unreadable(String),
    /// The file is larger than wxgate reads.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// A PEM section is broken (no end line, bad base64).
    #[error("is not a well-formed PEM file")]
    NotPem,
    /// No `-----BEGIN CERTIFICATE-----` section.
    #[error(
        "holds no PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)"
    )]
    NoCertificate,
    /// A certificate that cannot be a trust anchor (its DER does not parse).
    #[error("certificate {0} in it cannot be used as a trusted root")]
    Unusable(usize),
}

impl CaFile {
    /// Reads `path` and checks every certificate in it; sections other than certificates
    /// (a key, parameters) are ignored.
    pub fn load(path: &Path) -> Result<CaFile, CaFileError> {
        let certificates = read_certificates(path).map_err(|error| match error {
            PemCertificatesError::Unreadable(text) => CaFileError::Unreadable(text),
            PemCertificatesError::TooLarge(error) => CaFileError::TooLarge(error),
            PemCertificatesError::NotPem => CaFileError::NotPem,
            PemCertificatesError::NoCertificate => CaFileError::NoCertificate,
        })?;
        let mut roots = RootCertStore::empty();
        for (index, certificate) in certificates.iter().enumerate() {
            roots
                .add(certificate.clone())
                .map_err(|_| CaFileError::Unusable(index + 1))?;
        }
        Ok(CaFile {
            path: path.to_owned(),
            certificates,
        })
    }

    /// The certificates, in file order.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The certificates as PEM (only the certificates: nothing else the file held).
    pub fn pem(&self) -> Vec<u8> {
        use base64::Engine as _;
        let mut pem = String::new();
        for certificate in &self.certificates {
            let encoded = base64::engine::general_purpose::STANDARD.encode(certificate.as_ref());
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in encoded.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        pem.into_bytes()
    }
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFile")
            .field("path", &self.path)
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_files::TempFile;

    #[test]
    fn a_ca_file_without_a_usable_certificate_is_refused() {
        let missing = Path::new("/nonexistent/wxgate/ca.pem");
        assert!(matches!(
            CaFile::load(missing),
            Err(CaFileError::Unreadable(_))
        ));
        let key_only = TempFile::new(
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\naHVudGVyMg==\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(CaFile::load(&key_only.0), Err(CaFileError::NoCertificate));
        let text = TempFile::new("text.pem", b"hunter2 is not a certificate\n");
        assert_eq!(CaFile::load(&text.0), Err(CaFileError::NoCertificate));
        let broken = TempFile::new(
            "broken.pem",
            b"-----BEGIN CERTIFICATE-----\nhunter2hunter2\n",
        );
        assert_eq!(CaFile::load(&broken.0), Err(CaFileError::NotPem));
        let garbage = TempFile::new(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\naHVudGVyMg==\n-----END CERTIFICATE-----\n",
        );
        assert_eq!(CaFile::load(&garbage.0), Err(CaFileError::Unusable(1)));
        // A CA made here: read, one certificate, and its contents nowhere in Debug.
        let ca = rcgen::KeyPair::generate()
            .and_then(|key| rcgen::CertificateParams::new(Vec::new())?.self_signed(&key))
            .unwrap();
        let good = TempFile::new("ca.pem", ca.pem().as_bytes());
        let loaded = CaFile::load(&good.0).unwrap();
        assert_eq!(loaded.certificates().len(), 1);
        assert_eq!(loaded.pem(), ca.pem().replace("\r\n", "\n").into_bytes());
        assert!(format!("{loaded:?}").ends_with("certificates: 1 }"));
        for error in [
            CaFileError::NotPem,
            CaFileError::NoCertificate,
            CaFileError::Unusable(1),
        ] {
            assert!(!error.to_string().contains("hunter2"));
        }
    }
}
