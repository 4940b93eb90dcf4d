//! HTTPS for the API and the dashboard: `slipway serve --tls-cert FILE
//! --tls-key FILE`, rustls on the ring provider (as every client in
//! [`crate::http`]), HTTP/1.1 only (as the plain listener).
//!
//! - The files are read and checked before the node starts: each error
//!   names the file and says what was wrong with it, and a key that does
//!   not belong to the certificate is refused.
//! - `SIGHUP` reads both files again (certbot, cert-manager and the like
//!   replace them in place). A pair that fails to load leaves the running
//!   certificate in use and says why: a bad renewal never takes the API
//!   down.
//! - Handshakes run beside the accept loop, each within
//!   [`HANDSHAKE_TIMEOUT`]: a client that connects and sends nothing holds
//!   only its own connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A client has this long from its TCP connect to a finished handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; past it, accepting waits (the kernel's
/// backlog holds the rest), so a flood of idle connections costs bounded
/// memory.
const MAX_HANDSHAKES: usize = 512;

/// What is wrong with `--tls-cert` / `--tls-key`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {reason}", path.display())]
    File { flag: &'static str, path: PathBuf, reason: String },
    #[error("--tls-key {} does not belong to the certificate in --tls-cert {}: {reason}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

/// The certificate and key files `serve` was given.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Read and check both files: a chain of certificates (the server's
    /// first) and one private key (PKCS#8, PKCS#1 or SEC1) that matches it.
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let cert_err = |reason: String| TlsError::File { flag: "--tls-cert", path: self.cert.clone(), reason };
        let key_err = |reason: String| TlsError::File { flag: "--tls-key", path: self.key.clone(), reason };
        let cert_pem = read(&self.cert).map_err(cert_err)?;
        let chain =
            CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| cert_err(format!("not readable as PEM certificates: {e}")))?;
        if chain.is_empty() {
            return Err(cert_err(no_block("certificate", "-----BEGIN CERTIFICATE-----", &cert_pem)));
        }
        let key_pem = read(&self.key).map_err(key_err)?;
        let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(k) => k,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => {
                return Err(key_err(no_block("private key", "-----BEGIN PRIVATE KEY-----", &key_pem)));
            }
            Err(e) => return Err(key_err(format!("not readable as a PEM private key: {e}"))),
        };
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::Mismatch { cert: self.cert.clone(), key: self.key.clone(), reason: "the key's public half is not the certificate's".into() }
            }
            other => key_err(format!("this private key cannot be used: {other}")),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))
}

/// Why a file held no block of the kind wanted, in words: the common
/// mix-ups are the two files swapped, or a DER file.
fn no_block(what: &str, header: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let hint = if text.contains("PRIVATE KEY-----") && what == "certificate" {
        " (it holds a private key: are --tls-cert and --tls-key swapped?)"
    } else if text.contains("-----BEGIN CERTIFICATE-----") && what == "private key" {
        " (it holds a certificate: are --tls-cert and --tls-key swapped?)"
    } else if !text.contains("-----BEGIN") {
        " (it is not PEM: a DER file converts with `openssl x509 -inform der` or `openssl pkey -inform der`)"
    } else {
        ""
    };
    format!("found no {what} in it; expected a PEM block starting {header}{hint}")
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificate every handshake gets, replaced by [`Self::reload`].
#[derive(Debug)]
pub struct Certificate {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let key = files.load()?;
        Ok(Arc::new(Certificate { files, current: RwLock::new(Arc::new(key)) }))
    }

    /// Read the files again. On an error the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = self.files.load()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// rustls' configuration for the API's listener: TLS 1.2 and 1.3 with
    /// ring's safe defaults, no client certificates.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Reload `certificate` on every `SIGHUP` until `stop`; each outcome is
/// logged (a failed one names the file and keeps the old certificate).
/// Without TLS a `SIGHUP` is logged as having nothing to reload: it must
/// not end the node (`systemctl reload`, a terminal closing).
pub async fn reload_on_hangup(certificate: Option<Arc<Certificate>>, stop: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch SIGHUP: the TLS certificate will not be reloaded");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let Some(certificate) = &certificate else {
            tracing::info!("SIGHUP: nothing to reload (no --tls-cert)");
            continue;
        };
        match certificate.reload() {
            Ok(()) => tracing::info!(cert = %certificate.files().cert.display(), "SIGHUP: TLS certificate reloaded"),
            Err(e) => tracing::warn!(error = %e, "SIGHUP: TLS certificate not reloaded; the one loaded before stays in use"),
        }
    }
}

/// The API's listener with TLS: TCP connections are accepted at once and
/// their handshakes run in tasks of their own; [`super::serve::serve`]
/// takes the finished streams.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let accept = tokio::spawn(accept_loop(listener, acceptor, tx));
        TlsListener { ready, local, accept }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "API listener: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                // A client that does not trust the certificate, plain HTTP
                // on this port, a scanner: the client knows; debug only.
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        TlsFiles { cert: c, key: k }
    }

    #[test]
    fn each_bad_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsFiles { cert: dir.path().join("nope.pem"), key: dir.path().join("nokey.pem") };
        let e = missing.load().unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert ") && e.contains("nope.pem") && e.contains("cannot read it"), "{e}");

        let e = files(dir.path(), "hello", "x").load().unwrap_err().to_string();
        assert!(e.contains("cert.pem: found no certificate in it") && e.contains("not PEM"), "{e}");

        let swapped = files(dir.path(), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "x");
        let e = swapped.load().unwrap_err().to_string();
        assert!(e.contains("swapped"), "{e}");

        let e = files(dir.path(), "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "-----BEGIN CERTIFICATE-----\n")
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--tls-key ") && e.contains("key.pem"), "{e}");
    }
}
