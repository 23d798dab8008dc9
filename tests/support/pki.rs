#![allow(dead_code)] // shared by test binaries, each using its part
//! TLS for tests: a CA made by the test, a certificate for `localhost` it signs, and a real TLS
//! client (tokio-rustls, tokio-tungstenite over it) that trusts that CA only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A CA, and a certificate for `localhost` it signed, written where the gateway reads them.
pub struct Pki {
    /// The CA's certificate, for clients to trust.
    pub ca_pem: String,
}

impl Pki {
    /// Makes a new CA and server certificate, and writes the certificate and key to `files`.
    pub fn issue(files: &(PathBuf, PathBuf)) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        // The chain as servers send it: the leaf, then the CA.
        std::fs::write(&files.0, format!("{}{}", cert.pem(), ca.pem())).unwrap();
        std::fs::write(&files.1, key.serialize_pem()).unwrap();
        Pki { ca_pem: ca.pem() }
    }

    pub fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes());
        roots.add(ca.unwrap()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        self.connect_over(TcpStream::connect(addr).await?).await
    }

    /// A TLS session over `tcp` (on which the test may have sent something first).
    pub async fn connect_over(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from("localhost").unwrap();
        self.connector().connect(name, tcp).await
    }

    pub async fn websocket(&self, addr: SocketAddr, path: &str) -> Wss {
        let tls = self.connect(addr).await.expect("TLS handshake");
        upgrade(tls, path).await
    }
}

pub type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

pub async fn upgrade(tls: TlsStream<TcpStream>, path: &str) -> Wss {
    let request = format!("wss://localhost{path}")
        .into_client_request()
        .unwrap();
    tokio_tungstenite::client_async(request, tls)
        .await
        .unwrap()
        .0
}

pub fn pem_files(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("wsgate-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("cert.pem"), dir.join("key.pem"))
}
