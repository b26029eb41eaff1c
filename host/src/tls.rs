//! TLS with rustls: towards clients (a listener of its own, optional client certificates) and
//! towards backends (verified against a CA, optional client certificate, SNI).
//!
//! The certificate, key and CA files are read again when they change (watched with `notify`,
//! polled as a safety net): new connections use the new files, established ones keep theirs.
//! Files that do not load (a half-written key, a certificate that does not match its key)
//! leave the previous configuration in force and are logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{BackendTls, ClientAuth, Tls};

/// The TLS configuration respire serves clients with.
pub struct ServerTls {
    settings: Tls,
    current: ArcSwap<rustls::ServerConfig>,
    digest: std::sync::Mutex<[u8; 32]>,
}

impl ServerTls {
    /// Reads the files named in `settings`.
    pub fn load(settings: &Tls) -> Result<ServerTls, String> {
        let (config, digest) = server_config(settings)?;
        Ok(ServerTls {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(config),
            digest: std::sync::Mutex::new(digest),
        })
    }

    /// Performs the server side of the handshake with the configuration now in force.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
            .accept(tcp)
            .await
    }

    fn files(&self) -> Vec<PathBuf> {
        [
            Some(&self.settings.cert_file),
            Some(&self.settings.key_file),
            self.settings.ca_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    /// Reads the files again if their contents changed since they were last tried: whether a
    /// new configuration is in force (files that do not load are not retried until they change).
    fn reload(&self) -> Result<bool, String> {
        reload_if_changed(&self.digest, &self.files(), &self.current, || {
            server_config(&self.settings).map(|(c, _)| c)
        })
    }
}

/// The TLS configuration respire connects to backends with.
pub struct ClientTls {
    settings: BackendTls,
    current: ArcSwap<rustls::ClientConfig>,
    digest: std::sync::Mutex<[u8; 32]>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the files named in `settings`.
    pub fn load(settings: &BackendTls) -> Result<ClientTls, String> {
        let (config, digest) = client_config(settings)?;
        Ok(ClientTls {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(config),
            digest: std::sync::Mutex::new(digest),
        })
    }

    /// Performs the client side of the handshake with the node at `addr` ("host:port"). The
    /// name sent (SNI) and checked against the node's certificate is `server_name` when set,
    /// else the address's host (a DNS name or an IP address).
    pub async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let host = match &self.settings.server_name {
            Some(name) => name.clone(),
            None => host_of(addr).to_string(),
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
        tokio_rustls::TlsConnector::from(self.current.load_full())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    }

    fn files(&self) -> Vec<PathBuf> {
        [
            Some(&self.settings.ca_file),
            self.settings.cert_file.as_ref(),
            self.settings.key_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    fn reload(&self) -> Result<bool, String> {
        reload_if_changed(&self.digest, &self.files(), &self.current, || {
            client_config(&self.settings).map(|(c, _)| c)
        })
    }
}

/// Builds and publishes a new configuration if the files' contents changed since they were
/// last tried: whether one was published (files that do not load are not retried until
/// they change again).
fn reload_if_changed<C>(
    last: &std::sync::Mutex<[u8; 32]>,
    files: &[PathBuf],
    current: &ArcSwap<C>,
    build: impl FnOnce() -> Result<C, String>,
) -> Result<bool, String> {
    let Ok(mut last) = last.lock() else {
        return Ok(false);
    };
    match digest(files) {
        Some(d) if d != *last => *last = d,
        // Unchanged, or being replaced (a file missing for a moment).
        _ => return Ok(false),
    }
    current.store(Arc::new(build()?));
    Ok(true)
}

/// The host part of "host:port" (IPv6 brackets removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(s: &Tls) -> Result<(rustls::ServerConfig, [u8; 32]), String> {
    let files: Vec<PathBuf> = [Some(&s.cert_file), Some(&s.key_file), s.ca_file.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let digest = digest(&files).ok_or_else(|| "cannot read the certificate files".to_string())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let auth = s.auth_clients;
    let builder = match (&s.ca_file, auth) {
        (_, ClientAuth::No) => builder.with_no_client_auth(),
        (Some(ca), _) => {
            let roots = Arc::new(roots(ca)?);
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?,
            )
        }
        (None, _) => {
            return Err(
                "tls.auth_clients needs tls.ca_file to verify client certificates against".into(),
            );
        }
    };
    let mut config = builder
        .with_single_cert(certs(&s.cert_file)?, key(&s.key_file)?)
        .map_err(|e| format!("{}: {e}", s.cert_file.display()))?;
    config.alpn_protocols.clear();
    Ok((config, digest))
}

fn client_config(s: &BackendTls) -> Result<(rustls::ClientConfig, [u8; 32]), String> {
    let files: Vec<PathBuf> = [Some(&s.ca_file), s.cert_file.as_ref(), s.key_file.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let digest = digest(&files).ok_or_else(|| "cannot read the certificate files".to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&s.ca_file)?);
    let config = match (&s.cert_file, &s.key_file) {
        (Some(cert), Some(k)) => builder
            .with_client_auth_cert(certs(cert)?, key(k)?)
            .map_err(|e| format!("{}: {e}", cert.display()))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("backend.tls: cert_file and key_file go together".into()),
    };
    Ok((config, digest))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store)
}

/// A digest of the files' contents; `None` when one cannot be read.
fn digest(files: &[PathBuf]) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    for f in files {
        let data = std::fs::read(f).ok()?;
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Some(h.finalize().into())
}

/// Watches the TLS files and reloads them when they change, until shutdown.
pub fn watch(
    server: Option<Arc<ServerTls>>,
    client: Option<Arc<ClientTls>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use notify::Watcher;
    const QUIET: Duration = Duration::from_millis(200);
    const POLL: Duration = Duration::from_secs(2);
    let mut dirs: Vec<PathBuf> = server
        .iter()
        .flat_map(|s| s.files())
        .chain(client.iter().flat_map(|c| c.files()))
        .filter_map(|f| parent(&f))
        .collect();
    dirs.sort();
    dirs.dedup();
    let (tx, rx) = std::sync::mpsc::channel();
    // Directories, not files: certificates are usually replaced by renaming a new file over
    // the old one (and Kubernetes swaps a symlinked directory), which a watch on the file misses.
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| crate::plugin::changes(&e)) {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| {
        for d in &dirs {
            w.watch(d, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    });
    if let Err(e) = &watcher {
        warn!(error = %e, "cannot watch the TLS files for changes; polling them every {POLL:?}");
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        match rx.recv_timeout(POLL) {
            Ok(()) => crate::plugin::settle(&rx, QUIET),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(POLL),
        }
        if let Some(s) = &server {
            match s.reload() {
                Ok(true) => info!("TLS certificate for clients reloaded"),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "TLS files for clients changed but do not load; the previous ones stay in force")
                }
            }
        }
        if let Some(c) = &client {
            match c.reload() {
                Ok(true) => info!("TLS settings for backends reloaded"),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "TLS files for backends changed but do not load; the previous ones stay in force")
                }
            }
        }
    }
}

fn parent(f: &Path) -> Option<PathBuf> {
    let p = f.parent()?;
    Some(if p.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        p.to_path_buf()
    })
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("127.0.0.1:6379"), "127.0.0.1");
        assert_eq!(host_of("redis.internal:6379"), "redis.internal");
        assert_eq!(host_of("[::1]:6379"), "::1");
    }
}
