//! The stand-in over HTTPS: it serves with the certificate it is given, notes each handshake
//! and the server name asked for, and refuses to start with a certificate it cannot use.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::{StandIn, StandInConfig, StandInTls};

/// A CA made here and a certificate for `localhost` it signed; the CA's certificate for the
/// client to trust.
fn certificate_for_localhost() -> (
    StandInTls,
    tokio_rustls::rustls::pki_types::CertificateDer<'static>,
) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let tls = StandInTls {
        certificate_chain_pem: leaf.pem(),
        private_key_pem: key.serialize_pem(),
    };
    (tls, ca.der().clone())
}

#[tokio::test]
async fn https_serves_the_given_certificate_and_notes_handshakes_and_server_names() {
    let (tls, ca) = certificate_for_localhost();
    let upstream = StandIn::start(StandInConfig {
        tls: Some(tls),
        ..StandInConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(
        upstream.base_url(),
        format!("https://127.0.0.1:{}", upstream.addr().port())
    );
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let client = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(client));
    for _ in 0..2 {
        let tcp = TcpStream::connect(upstream.addr()).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut stream = connector
            .connect(name, tcp)
            .await
            .expect("the CA's certificate");
        stream
            .write_all(b"GET /echo HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.tls_connections(), 2);
    assert_eq!(
        upstream.server_names(),
        [Some("localhost".to_owned()), Some("localhost".to_owned())]
    );
    assert_eq!(upstream.calls("/echo"), 2);
    upstream.reset_counters();
    assert_eq!(upstream.tls_connections(), 0);
    assert!(upstream.server_names().is_empty());
}

#[tokio::test]
async fn a_certificate_it_cannot_use_stops_it_from_starting() {
    let (tls, _) = certificate_for_localhost();
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    for (tls, what) in [
        (
            StandInTls {
                certificate_chain_pem: String::new(),
                ..tls.clone()
            },
            "no certificate",
        ),
        (
            StandInTls {
                private_key_pem: "not a key".to_owned(),
                ..tls.clone()
            },
            "no key",
        ),
        (
            StandInTls {
                private_key_pem: other_key,
                ..tls
            },
            "a key of another certificate",
        ),
    ] {
        let error = StandIn::start(StandInConfig {
            tls: Some(tls),
            ..StandInConfig::default()
        })
        .await
        .expect_err(what);
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{what}");
    }
}
