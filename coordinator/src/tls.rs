//! TLS on the API ports (`[server.tls]`) and for the CLI's connections.
//!
//! Server side: [`Tls`] holds the rustls configuration built from the certificate, key and
//! (mutual TLS) client-CA files, and rebuilds it when one of them changes: at most once per
//! [`RELOAD_CHECK`], as connections arrive, it compares the files' modification time, size and
//! inode with those it last read, and builds a new configuration if any differs. A file that
//! cannot be used (half-written, a key that does not match) is logged and the previous
//! configuration kept, so renewing a certificate never takes the server down. [`serve`] accepts
//! TCP connections, makes each handshake in the connection's own task (a slow or failed one
//! delays no other), and serves the connection with hyper (HTTP/1.1 and HTTP/2; gRPC clients
//! negotiate `h2` by ALPN). Each request carries the peer's address as axum's
//! `ConnectInfo<SocketAddr>` (the rate limiter keys on it), as on the plaintext path, and on a
//! mutual-TLS connection the names of the verified client certificate as [`PeerCertNames`].
//!
//! The plaintext path (`axum::serve` in `server.rs`) has none of this: the choice is made once,
//! when the server starts.
//!
//! Client side: [`client_endpoint`] turns the CLI's `--server`, `--ca`, `--cert` and `--key`
//! into a tonic endpoint.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::peer::PeerCertNames;

/// How often, at most, the files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files TLS is served with (`[server.tls]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// CA certificates that sign client certificates (mutual TLS), PEM.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// What identifies each file's current content without reading it.
    fn stamps(&self) -> Vec<Option<Stamp>> {
        self.paths().map(Stamp::of).collect()
    }

    /// Reads the files and builds the server configuration; every error names its file.
    fn load(&self) -> anyhow::Result<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs(&self.cert, "TLS certificate file")?;
        let key_pem = std::fs::read(&self.key)
            .with_context(|| format!("cannot read the TLS key file {}", self.key.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            anyhow!(
                "the TLS key file {} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                self.key.display()
            )
        })?;
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| anyhow!("the TLS key file {}: {e}", self.key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("rustls has no TLS version for the ring provider")?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(ca, "TLS client CA file")? {
                    roots.add(cert).map_err(|e| {
                        anyhow!(
                            "the TLS client CA file {} holds a certificate that is not a usable CA: {e}",
                            ca.display()
                        )
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| anyhow!("the TLS client CA file {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => anyhow!(
                "the TLS key file {} does not match the certificate in {}",
                self.key.display(),
                self.cert.display()
            ),
            e => anyhow!(
                "the TLS certificate {} with the key {}: {e}",
                self.cert.display(),
                self.key.display()
            ),
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The certificates of a PEM file; an error (naming the file, as `what`) if it has none.
fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the {what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "the {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

/// A file's identity and version as `stat` tells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

impl Stamp {
    /// `None` when the file cannot be read (it may be in the middle of being replaced).
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt as _;
        // Follows symbolic links: a Kubernetes Secret volume swaps a link to a new folder.
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
            device: meta.dev(),
        })
    }
}

/// The server's TLS configuration, rebuilt when its files change.
pub struct Tls {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    check: Mutex<Check>,
    interval: Duration,
}

struct Check {
    at: Instant,
    stamps: Vec<Option<Stamp>>,
}

impl Tls {
    /// Reads the files; an error names the file that cannot be used and why.
    pub fn load(files: TlsFiles) -> anyhow::Result<Tls> {
        Self::with_interval(files, RELOAD_CHECK)
    }

    fn with_interval(files: TlsFiles, interval: Duration) -> anyhow::Result<Tls> {
        let stamps = files.stamps();
        let config = files.load()?;
        Ok(Tls {
            current: ArcSwap::from_pointee(config),
            check: Mutex::new(Check {
                at: Instant::now(),
                stamps,
            }),
            files,
            interval,
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for a new connection, rebuilt first if a file changed since the last
    /// check (made at most once per interval; a concurrent accept does not wait for it).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.reload_if_changed();
        self.current.load_full()
    }

    fn reload_if_changed(&self) {
        let Some(mut check) = self.check.try_lock() else {
            return;
        };
        if check.at.elapsed() < self.interval {
            return;
        }
        check.at = Instant::now();
        // Stamps before reading: a file changed while it is read is read again next time.
        let stamps = self.files.stamps();
        if stamps == check.stamps {
            return;
        }
        check.stamps = stamps;
        match self.files.load() {
            Ok(config) => {
                self.current.store(Arc::new(config));
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS files changed: new connections use the new certificate"
                );
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "TLS files changed but cannot be used; new connections keep the previous certificate"
            ),
        }
    }
}

/// The names of the peer's verified client certificate: its subject's common name first, then
/// its DNS subject-alternative names. `None` without a client certificate.
fn peer_names(conn: &rustls::ServerConnection) -> Option<PeerCertNames> {
    let leaf = conn.peer_certificates()?.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let mut names: Vec<String> = common_name(cert.subject()).into_iter().collect();
    names.extend(cert.valid_dns_names().map(str::to_string));
    Some(PeerCertNames(names))
}

/// One DER element at the start of `der`: its tag, its contents and what follows it.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The first common name (OID 2.5.4.3) of a certificate subject: the contents of its `Name`
/// SEQUENCE, a sequence of SETs of (OID, value) SEQUENCEs.
fn common_name(subject: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, set, rest) = der_element(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (tag, attribute, rest) = der_element(attributes)?;
            attributes = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_element(attribute)?;
            if tag == OID && oid == COMMON_NAME {
                let (tag, text, _) = der_element(value)?;
                return directory_string(tag, text);
            }
        }
    }
    None
}

/// The text of an X.520 DirectoryString (UTF8String, PrintableString, IA5String, BMPString).
fn directory_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        0x0c | 0x13 | 0x16 => String::from_utf8(bytes.to_vec()).ok(),
        0x1e if bytes.len().is_multiple_of(2) => char::decode_utf16(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]])),
        )
        .collect::<Result<String, _>>()
        .ok(),
        _ => None,
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then stops accepting,
/// lets the open connections finish their requests (each is told to close gracefully) and
/// returns when they have.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Arc<Tls>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Dropped at shutdown: each connection then closes gracefully.
    let (stop_tx, stop_rx) = watch::channel(());
    // Each connection holds a receiver; all dropped: every connection has closed.
    let (closed_tx, closed_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::error!(error = %e, "cannot accept a TLS connection");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            },
            _ = &mut shutdown => break,
        };
        // Small unary calls: send each response at once.
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                _ = stop.changed() => return,
            };
            let names = peer_names(stream.get_ref().1);
            if let Some(names) = &names {
                tracing::debug!(%peer, names = ?names.0, "TLS client certificate verified");
            }
            let service = router.map_request(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(names) = &names {
                    request.extensions_mut().insert(names.clone());
                }
                request
            });
            let builder = Builder::new(TokioExecutor::new());
            let mut connection = pin!(builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service)
            ));
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::trace!(%peer, error = %e, "TLS connection ended");
                        }
                        break;
                    }
                    _ = stop.changed(), if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closed);
        });
    }
    drop(listener);
    drop(stop_rx);
    drop(stop_tx);
    drop(closed_rx);
    closed_tx.closed().await;
    Ok(())
}

/// Errors of one connection, not of the listener: accept the next.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The endpoint the CLI connects to: `server` is HOST:PORT or a URL. `--ca` (the CAs to trust
/// instead of the system's), `--cert` and `--key` (a client certificate, for mutual TLS) make
/// a bare HOST:PORT https; an `http://` URL with any of them is refused.
pub fn client_endpoint(
    server: &str,
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let wants_tls = ca.is_some() || cert.is_some() || key.is_some();
    let url = if server.contains("://") {
        server.to_string()
    } else if wants_tls {
        format!("https://{server}")
    } else {
        format!("http://{server}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("'{server}' is not a valid server address"))?;
    let https = match endpoint.uri().scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("'{server}': the server address must be HOST:PORT, http://… or https://…"),
    };
    if !https {
        if wants_tls {
            bail!("--ca, --cert and --key are for TLS: give the server as https://… (got {url})");
        }
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the CA file {} (--ca)", ca.display()))?;
            read_certs(ca, "CA file (--ca)")?;
            tls.ca_certificate(Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    match (cert, key) {
        (Some(cert), Some(key)) => {
            read_certs(cert, "client certificate file (--cert)")?;
            let cert_pem = std::fs::read(cert)?;
            let key_pem = std::fs::read(key)
                .with_context(|| format!("cannot read the key file {} (--key)", key.display()))?;
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                anyhow!(
                    "the key file {} (--key) holds no usable PEM private key: {e}",
                    key.display()
                )
            })?;
            tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        _ => bail!("--cert and --key go together: a client certificate needs its key"),
    }
    endpoint
        .tls_config(tls)
        .with_context(|| format!("cannot set up TLS for {url}"))
}

#[cfg(test)]
mod tests;
