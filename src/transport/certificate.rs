//! TLS (wss://, https://) with rustls: the certificate chain and key from PEM files
//! (`tls_cert_file`, `tls_key_file`), reloaded without a restart — on SIGHUP, or when either
//! file changes — for new handshakes only: connections already up keep their session. The files
//! are read off the shard threads (the signal handler's thread, or the watcher's, see
//! `server::start`), must be plain files (a FIFO in their place would block the reader), and
//! are read up to [`MAX_PEM_BYTES`] each.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

/// The largest certificate chain or key file read: a chain is a few KiB.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// The listener's TLS: the configuration handshakes are accepted with (see
/// [`crate::transport::tls::accept`]), and the certificate it presents.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    certificate: Arc<Certificate>,
}

/// The certificate presented to new handshakes, swapped whole on reload.
#[derive(Debug)]
struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' modification times when they were read (a change triggers a reload).
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .key
                .clone(),
        )
    }
}

impl Tls {
    /// Reads the chain and key; the error names the file at fault.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let loaded = load(cert_file, key_file)?;
        let certificate = Arc::new(Certificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(loaded),
        });
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .with_no_client_auth()
                .with_cert_resolver(certificate.clone());
        // WebSocket is HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config: Arc::new(config),
            certificate,
        })
    }

    /// Reads the files again and presents them to new handshakes; on an error the certificate in
    /// use stays.
    pub fn reload(&self) -> Result<(), String> {
        let cert = &self.certificate;
        let loaded = load(&cert.cert_file, &cert.key_file)?;
        *cert.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }

    /// Reloads when either file changed since it was read (logged either way).
    pub fn reload_if_changed(&self) {
        let cert = &self.certificate;
        let now = stamps(&cert.cert_file, &cert.key_file);
        let before = cert
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .stamps;
        if now == before {
            return;
        }
        match self.reload() {
            Ok(()) => {
                info!(cert = %cert.cert_file.display(), "TLS certificate reloaded (the files changed)")
            }
            Err(e) => {
                warn!(error = %e, "TLS certificate files changed but cannot be loaded: keeping the current one");
                // Not retried until they change again.
                cert.current
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .stamps = now;
            }
        }
    }
}

fn stamps(cert_file: &Path, key_file: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (modified(cert_file), modified(key_file))
}

/// A PEM file's bytes, if it is a plain file of at most [`MAX_PEM_BYTES`].
fn read_pem(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let plain = |meta: std::fs::Metadata| {
        if !meta.is_file() {
            return Err(std::io::Error::other("not a plain file"));
        }
        if meta.len() > MAX_PEM_BYTES {
            return Err(std::io::Error::other(format!(
                "larger than {MAX_PEM_BYTES} bytes"
            )));
        }
        Ok(())
    };
    // Opened without waiting (opening a FIFO for reading would block until a writer comes),
    // checked once open, and read no further than the bound whatever it says.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    plain(file.metadata()?)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_PEM_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

fn load(cert_file: &Path, key_file: &Path) -> Result<Loaded, String> {
    let stamps = stamps(cert_file, key_file);
    let cert_error =
        |e: &dyn std::fmt::Display| format!("tls_cert_file {}: {e}", cert_file.display());
    let key_error = |e: &dyn std::fmt::Display| format!("tls_key_file {}: {e}", key_file.display());
    let cert_pem = read_pem(cert_file).map_err(|e| cert_error(&e))?;
    let key_pem = read_pem(key_file).map_err(|e| key_error(&e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(&e))?;
    if chain.is_empty() {
        return Err(format!(
            "tls_cert_file {}: no certificate in it (PEM \"BEGIN CERTIFICATE\")",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| key_error(&e))?;
    let key = CertifiedKey::from_der(chain, key, &aws_lc_rs::default_provider())
        .map_err(|e| key_error(&e))?;
    Ok(Loaded {
        key: Arc::new(key),
        stamps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_files_within_the_bound_are_read() {
        let dir = std::env::temp_dir().join(format!("wsgate-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.pem");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // A FIFO nobody writes to: refused at once, not waited on.
        let started = std::time::Instant::now();
        let error = load(&fifo, &fifo).unwrap_err();
        assert!(error.contains("not a plain file"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let huge = dir.join("huge.pem");
        std::fs::write(&huge, vec![b'x'; MAX_PEM_BYTES as usize + 1]).unwrap();
        let error = load(&huge, &huge).unwrap_err();
        assert!(
            error.contains("tls_cert_file") && error.contains("larger than"),
            "{error}"
        );
        let error = load(&dir, &dir).unwrap_err();
        assert!(error.contains("not a plain file"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
