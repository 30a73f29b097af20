//! A certificate authority made at test time (rcgen), the leaf certificates it signs for an
//! HTTPS stand-in or for wxgate's own `[server.tls]`, and its own certificate written to a
//! file for `upstream.ca_file` or a client's trust.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use wxgate_stand_in::StandInTls;

/// A test CA; its certificate file is removed when it is dropped.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    file: PathBuf,
}

impl TestCa {
    /// A new CA, its certificate written under the target directory's temporary folder.
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wxgate test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "wxgate-test-ca-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, issuer.pem()).unwrap();
        TestCa { issuer, file }
    }

    /// The file holding the CA's certificate (PEM), for `upstream.ca_file`.
    pub fn ca_file(&self) -> &Path {
        &self.file
    }

    /// The CA's certificate (PEM), for a client that trusts it.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` and its key written to `cert_file` and `key_file`
    /// (PEM), as `[server.tls]` reads them; the certificate (DER), as a client is shown it.
    pub fn write_leaf(&self, names: &[&str], cert_file: &Path, key_file: &Path) -> Vec<u8> {
        let leaf = self.leaf(names);
        std::fs::write(cert_file, &leaf.certificate_chain_pem).unwrap();
        std::fs::write(key_file, &leaf.private_key_pem).unwrap();
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(leaf.certificate_chain_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// `ca_file = "…"`, a line of `[upstream]`.
    pub fn ca_file_key(&self) -> String {
        format!("ca_file = {:?}\n", self.file.display().to_string())
    }

    /// A server certificate for `names`, valid now.
    pub fn leaf(&self, names: &[&str]) -> StandInTls {
        self.sign(CertificateParams::new(to_strings(names)).unwrap())
    }

    /// A server certificate for `names` that expired in 2001.
    pub fn expired_leaf(&self, names: &[&str]) -> StandInTls {
        let mut params = CertificateParams::new(to_strings(names)).unwrap();
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2001, 1, 1);
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> StandInTls {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        StandInTls {
            certificate_chain_pem: certificate.pem(),
            private_key_pem: key.serialize_pem(),
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

fn to_strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// A folder under the target directory's temporary folder, removed when dropped.
pub struct TestDir(PathBuf);

impl TestDir {
    /// A new, empty folder named after `name`, unique to this process and call.
    pub fn new(name: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "wxgate-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    /// `name` inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
