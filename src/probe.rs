//! `wsgate probe`: one GET of a health URL, for container health checks and scripts on hosts with
//! no curl. Speaks http:// and https:// (rustls, the gateway's own TLS stack).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Whom an https:// probe believes.
pub enum Trust {
    /// The system's CA certificates.
    System,
    /// The CA certificates in this PEM file.
    CaFile(Box<Path>),
    /// Any certificate: the connection is encrypted, but whoever answers is believed. For a
    /// gateway probing its own listener on loopback, where its certificate names the public host
    /// (an orchestrator's HTTPS probe does the same).
    Anyone,
}

/// How `wsgate probe` asks.
pub struct Probe {
    pub trust: Trust,
    /// Start with a PROXY protocol header naming no client (`PROXY UNKNOWN`): the gateway takes
    /// the probe for a trusted proxy's own connection (its settings say loopback is one).
    pub proxy_header: bool,
}

/// GETs `url` (`http://` or `https://host:port/path`); Ok on a 2xx answer within two seconds.
pub fn probe(url: &str, how: &Probe) -> Result<(), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err("only http:// and https:// URLs are probed".into());
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let default_port = if tls { 443 } else { 80 };
    let (host, addrs) = resolve(authority, default_port)?;
    let timeout = Duration::from_secs(2);
    let mut tcp = connect(&addrs, timeout)?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    if how.proxy_header {
        tcp.write_all(b"PROXY UNKNOWN\r\n")
            .map_err(|e| e.to_string())?;
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    let status = if tls {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
        let connection = rustls::ClientConnection::new(client_config(&how.trust)?, name)
            .map_err(|e| e.to_string())?;
        exchange(rustls::StreamOwned::new(connection, tcp), &request)
    } else {
        exchange(tcp, &request)
    }?;
    match &status[..10] {
        [b'H', b'T', b'T', b'P', b'/', _, _, _, b' ', b'2'] => Ok(()),
        _ => Err(format!(
            "answered {}",
            String::from_utf8_lossy(&status[9..])
        )),
    }
}

/// The host (without brackets or port) and the addresses it resolves to.
fn resolve(authority: &str, default_port: u16) -> Result<(&str, Vec<SocketAddr>), String> {
    let (host, with_port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let end = v6.find(']').ok_or("unclosed [ in the URL")?;
            let port = v6[end + 1..].strip_prefix(':');
            (&v6[..end], port.is_some())
        }
        None => {
            let host = authority.split(':').next().unwrap_or(authority);
            (host, authority.contains(':'))
        }
    };
    let addrs: Vec<SocketAddr> = if with_port {
        authority.to_socket_addrs()
    } else {
        (host, default_port).to_socket_addrs()
    }
    .map_err(|e| format!("{authority}: {e}"))?
    .collect();
    if addrs.is_empty() {
        return Err(format!("{authority}: no address"));
    }
    Ok((host, addrs))
}

/// A connection to the first of `addrs` that accepts one (`localhost` may name ::1 first, and
/// the gateway listen on 127.0.0.1 only).
fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, String> {
    let mut failures = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    Err(failures.join("; "))
}

/// Writes the request; returns the first 12 bytes of the answer ("HTTP/1.1 200").
fn exchange(mut stream: impl Read + Write, request: &str) -> Result<[u8; 12], String> {
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| e.to_string())?;
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).map_err(|e| e.to_string())?;
    Ok(status)
}

fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match trust {
        Trust::Anyone => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        Trust::System => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificate", path.display()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err("no system CA certificates found (give --ca FILE)".into());
    }
    Ok(roots)
}

/// Accepts any certificate, but still checks the handshake's signatures with it: the session is
/// encrypted to whoever holds that certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
