//! HTTPS for relays and meta nodes (rustls with ring; no OpenSSL): the server side
//! (`--tls-cert`, `--tls-key`) and the client side (`ca_file` of the cluster map, or
//! `--ca-file`).
//!
//! Handshakes run in their own tasks, so a client that connects and says nothing holds only
//! its own task (for at most [`HANDSHAKE_TIMEOUT`]), never the accept loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that finished its handshake, with the permit it has held since its TCP accept.
pub type Accepted = (TlsStream<TcpStream>, SocketAddr, tokio::sync::OwnedSemaphorePermit);

/// The server config of a certificate chain and its private key (PEM files).
pub fn server_config(cert: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, String> {
    build_server_config(cert, key_path, None)
}

/// [`server_config`] that also asks every client for a certificate of the CA in `ca` (PEM)
/// and verifies the one it shows; a client with none still connects (updaters, operators),
/// and the node's routes decide what it may do ([`PeerNames`]).
pub fn server_config_mtls(cert: &Path, key_path: &Path, ca: &Path) -> Result<Arc<ServerConfig>, String> {
    build_server_config(cert, key_path, Some(ca))
}

fn build_server_config(cert: &Path, key_path: &Path, client_ca: Option<&Path>) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).and_then(|it| it.collect::<Result<_, _>>()).map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
                roots.add(c.map_err(|e| format!("{}: {e}", ca.display()))?).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| format!("{} with {}: {e}", cert.display(), key_path.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands on those that complete a TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<Accepted>,
    _stop: tokio_util::sync::DropGuard,
}

impl TlsListener {
    /// Accepts on `listener` while `gate` has room: a connection holds its permit from the TCP
    /// accept, through its handshake, until it closes.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>, gate: crate::server::Gate) -> std::io::Result<Self> {
        let (tx, ready) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let acceptor = TlsAcceptor::from(config);
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(v) => v,
                        Err(e) => {
                            // Out of file descriptors and the like: wait a little, as axum does.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Some(permit) = gate.admit(peer) else { continue };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer, permit)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, _stop: stop.drop_guard() })
    }

    /// The next connection that finished its handshake.
    pub async fn accept(&mut self) -> Accepted {
        match self.ready.recv().await {
            Some(v) => v,
            // The accept task only ends with the listener itself.
            None => std::future::pending().await,
        }
    }
}

/// The DNS names (subject alternative names) of the verified certificate a client showed on
/// this connection: empty when it showed none. Put into every request's extensions by
/// `crate::server`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerNames(pub Vec<String>);

impl PeerNames {
    /// The names of `conn`'s client certificate (rustls verified its chain in the handshake).
    pub fn of(conn: &rustls::ServerConnection) -> PeerNames {
        conn.peer_certificates().and_then(|c| c.first()).map_or_else(PeerNames::default, |c| PeerNames::of_der(c.as_ref()))
    }

    /// The DNS names of the certificate `der`.
    pub fn of_der(der: &[u8]) -> PeerNames {
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der) else { return PeerNames::default() };
        let names = match parsed.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        PeerNames(names)
    }

    /// The id of the meta node this certificate names (`{id}.meta.ops-fleet`), if it names one.
    pub fn node(&self) -> Option<&str> {
        self.0.iter().find_map(|n| n.strip_suffix(ops_config::cluster::NODE_DOMAIN)?.strip_suffix('.'))
    }

    /// The id of the relay it names (`{id}.relay.ops-fleet`).
    pub fn relay(&self) -> Option<&str> {
        self.0.iter().find_map(|n| n.strip_suffix(ops_config::cluster::RELAY_DOMAIN)?.strip_suffix('.'))
    }
}

/// This process's own certificate and key (PEM), shown to the meta nodes under mTLS: set once
/// at start from `--tls-cert`/`--tls-key` ([`set_identity`]).
static IDENTITY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Keeps `cert` and `key` as this process's client identity for [`for_cluster`]; its first
/// certificate must name `name` (`{id}.meta.ops-fleet` or `{id}.relay.ops-fleet`), or
/// the peers would refuse every call, or take this process for another one.
pub fn set_identity(cert: &Path, key: &Path, name: &str) -> Result<(), String> {
    let first = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("{}: no certificate in it", cert.display()))?
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let names = PeerNames::of_der(first.as_ref());
    if !names.0.iter().any(|n| n == name) {
        let shown = if names.0.is_empty() { "no DNS name".to_owned() } else { names.0.join(", ") };
        return Err(format!(
            "{}: under mtls this process is {name}, but the certificate names {shown} (opsctl ca issue --node ID or --relay ID)",
            cert.display()
        ));
    }
    let mut pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    pem.push(b'\n');
    pem.extend(std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?);
    reqwest::Identity::from_pem(&pem).map_err(|e| format!("{} with {}: {e}", cert.display(), key.display()))?;
    let _ = IDENTITY.set(pem);
    Ok(())
}

/// A client builder for the meta nodes of `map`: trusting its `ca_file` besides the system's
/// roots when it says `tls`, and loading no roots at all when it does not (they cost every
/// client about 1.5 MiB and would never be used). With `mtls`, it trusts only the cluster CA,
/// shows this process's certificate ([`set_identity`]) and reaches every node by its name
/// (resolved here to the map's address), so the peer's certificate must name that node.
pub fn for_cluster(builder: reqwest::ClientBuilder, map: &ops_config::ClusterMap) -> Result<reqwest::ClientBuilder, String> {
    if map.mtls {
        let pem = IDENTITY.get().ok_or("mtls = true: give this process its certificate with --tls-cert and --tls-key")?;
        let identity = reqwest::Identity::from_pem(pem).map_err(|e| e.to_string())?;
        let builder = map.nodes.iter().fold(builder.tls_built_in_root_certs(false).identity(identity), |b, n| {
            b.resolve(&ops_config::cluster::node_name(&n.id), n.addr)
        });
        return with_ca(builder, map.ca_file.as_deref());
    }
    if map.tls { with_ca(builder, map.ca_file.as_deref()) } else { Ok(builder.tls_built_in_root_certs(false)) }
}

/// `builder` trusting the CA certificates of the PEM file `ca` too (besides the system's).
pub fn with_ca(builder: reqwest::ClientBuilder, ca: Option<&Path>) -> Result<reqwest::ClientBuilder, String> {
    let Some(ca) = ca else { return Ok(builder) };
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", ca.display()));
    }
    Ok(certs.into_iter().fold(builder, reqwest::ClientBuilder::add_root_certificate))
}
