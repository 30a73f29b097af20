//! `[server.tls]`: the certificate and private key wxgate presents on the proxy port, read
//! and checked at validation (at start, and again at every reload), so that a file that
//! cannot serve stops wxgate at start, and is refused whole at a reload while the running
//! certificate stays.
//!
//! The checks are the ones a handshake would otherwise fail on, later and for every client:
//! the file cannot be read, holds no certificate or no private key, holds a key rustls cannot
//! sign with, or a key that is not the certificate's. No message holds a file's contents or
//! its path: a key file's text is the secret itself, and messages go to logs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::files::{read_limited, FileError, TooLarge};
use super::pem::{read_certificates, PemCertificatesError};

/// The certificate chain and key of `[server.tls]`, ready for a handshake.
#[derive(Clone)]
pub struct ServerTlsConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    /// The chain (leaf first) with its signing key, checked to belong together.
    certified: Arc<CertifiedKey>,
}

/// Why `server.tls.cert_file` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertFileError {
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
    #[error("holds no PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----), the server's first, then its intermediates")]
    NoCertificate,
}

/// Why `server.tls.key_file` cannot be used with the certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read (the I/O error's text, which does not name the file).
    #[error("cannot be read ({0})")]
    Unreadable(String),
    /// The file is larger than wxgate reads.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// A PEM section is broken (no end line, bad base64).
    #[error("is not a well-formed PEM file")]
    NotPem,
    /// No private key section.
    #[error("holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA / EC PRIVATE KEY)")]
    NoKey,
    /// A key rustls cannot sign with (an unsupported algorithm, a broken encoding).
    #[error("holds a private key wxgate cannot use (RSA, ECDSA P-256/P-384 or Ed25519 are)")]
    Unusable,
    /// The first certificate of the chain does not parse.
    #[error("cannot be checked against {0}: its first certificate cannot be parsed")]
    BadCertificate(String),
    /// The key is not the one the certificate was issued for.
    #[error("is not the private key of the first certificate in {0}")]
    Mismatch(String),
}

impl ServerTlsConfig {
    /// Reads the certificate chain, the first certificate being the server's own.
    pub fn read_chain(cert_file: &Path) -> Result<Vec<CertificateDer<'static>>, CertFileError> {
        read_certificates(cert_file).map_err(|error| match error {
            PemCertificatesError::Unreadable(text) => CertFileError::Unreadable(text),
            PemCertificatesError::TooLarge(error) => CertFileError::TooLarge(error),
            PemCertificatesError::NotPem => CertFileError::NotPem,
            PemCertificatesError::NoCertificate => CertFileError::NoCertificate,
        })
    }

    /// Reads the private key of `key_file` and checks it against `chain` (from
    /// [`ServerTlsConfig::read_chain`]); `cert_key` names the certificate file's key in
    /// messages.
    pub fn load(
        cert_file: &Path,
        chain: Vec<CertificateDer<'static>>,
        key_file: &Path,
        cert_key: &str,
    ) -> Result<ServerTlsConfig, KeyFileError> {
        let text = read_limited(key_file).map_err(|error| match error {
            FileError::Unreadable(error) => KeyFileError::Unreadable(error.to_string()),
            FileError::TooLarge(error) => KeyFileError::TooLarge(error),
        })?;
        // pem's own errors quote the offending line, which may be part of the key: each is
        // replaced by a message of wxgate's.
        let key = PrivateKeyDer::from_pem_slice(&text).map_err(|error| match error {
            pem::Error::NoItemsFound => KeyFileError::NoKey,
            _ => KeyFileError::NotPem,
        })?;
        let certified =
            CertifiedKey::from_der(chain, key, &tls_provider()).map_err(|error| match error {
                rustls::Error::InconsistentKeys(_) => KeyFileError::Mismatch(cert_key.to_owned()),
                rustls::Error::InvalidCertificate(_) => {
                    KeyFileError::BadCertificate(cert_key.to_owned())
                }
                _ => KeyFileError::Unusable,
            })?;
        Ok(ServerTlsConfig {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            certified: Arc::new(certified),
        })
    }

    /// The chain and key, as a handshake uses them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }
}

/// The crypto wxgate uses for TLS on both sides: ring (no C toolchain for aws-lc).
pub fn tls_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Two configurations are the same when they name the same files and those held the same
/// chain: a chain matches one key only, so the keys are the same too.
impl PartialEq for ServerTlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.certified.cert == other.certified.cert
    }
}

impl Eq for ServerTlsConfig {}

impl fmt::Debug for ServerTlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key, nor the certificates' bytes.
        f.debug_struct("ServerTlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("certificates", &self.certified.cert.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_files::TempFile;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (certificate.pem(), key.serialize_pem())
    }

    fn load(cert: &TempFile, key: &TempFile) -> Result<ServerTlsConfig, KeyFileError> {
        let chain = ServerTlsConfig::read_chain(&cert.0).unwrap();
        ServerTlsConfig::load(&cert.0, chain, &key.0, "server.tls.cert_file")
    }

    #[test]
    fn a_certificate_and_its_key_load_and_their_contents_are_never_shown() {
        let (cert_pem, key_pem) = self_signed("wxgate.test");
        let cert = TempFile::new("good-cert.pem", cert_pem.as_bytes());
        let key = TempFile::new("good-key.pem", key_pem.as_bytes());
        let loaded = load(&cert, &key).unwrap();
        assert_eq!(loaded.certified_key().cert.len(), 1);
        let debug = format!("{loaded:?}");
        assert!(debug.ends_with("certificates: 1 }"), "{debug}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
        assert_eq!(loaded, load(&cert, &key).unwrap());
    }

    #[test]
    fn unusable_files_are_refused_with_a_reason_and_nothing_of_their_text() {
        let (cert_pem, key_pem) = self_signed("wxgate.test");
        let (_, other_key_pem) = self_signed("other.test");
        let cert = TempFile::new("cert.pem", cert_pem.as_bytes());
        let other_key = TempFile::new("other-key.pem", other_key_pem.as_bytes());
        assert_eq!(
            load(&cert, &other_key).unwrap_err(),
            KeyFileError::Mismatch("server.tls.cert_file".into())
        );

        assert!(matches!(
            ServerTlsConfig::read_chain(Path::new("/nonexistent/wxgate/cert.pem")),
            Err(CertFileError::Unreadable(_))
        ));
        // A key where the certificate should be: no certificate.
        let key_as_cert = TempFile::new("key-as-cert.pem", key_pem.as_bytes());
        assert_eq!(
            ServerTlsConfig::read_chain(&key_as_cert.0),
            Err(CertFileError::NoCertificate)
        );
        let broken = TempFile::new("broken.pem", b"-----BEGIN CERTIFICATE-----\nhunter2\n");
        assert_eq!(
            ServerTlsConfig::read_chain(&broken.0),
            Err(CertFileError::NotPem)
        );

        // A certificate where the key should be: no key.
        assert_eq!(load(&cert, &cert).unwrap_err(), KeyFileError::NoKey);
        let text = TempFile::new("text.pem", b"hunter2 is not a key\n");
        assert_eq!(load(&cert, &text).unwrap_err(), KeyFileError::NoKey);
        let garbage = TempFile::new(
            "garbage-key.pem",
            b"-----BEGIN PRIVATE KEY-----\naHVudGVyMg==\n-----END PRIVATE KEY-----\n",
        );
        assert_eq!(load(&cert, &garbage).unwrap_err(), KeyFileError::Unusable);
        let broken_key = TempFile::new(
            "broken-key.pem",
            b"-----BEGIN PRIVATE KEY-----\naHVudGVyMg==\n",
        );
        assert_eq!(load(&cert, &broken_key).unwrap_err(), KeyFileError::NotPem);
        let missing = ServerTlsConfig::load(
            &cert.0,
            ServerTlsConfig::read_chain(&cert.0).unwrap(),
            Path::new("/nonexistent/wxgate/key.pem"),
            "server.tls.cert_file",
        );
        assert!(matches!(missing, Err(KeyFileError::Unreadable(_))));
    }
}
