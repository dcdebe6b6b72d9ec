//! Flags the relay and the meta node share.

use std::path::PathBuf;

use ops_config::trust::TrustedKeys;

/// What every connection to this server may take (`crate::server::ConnLimits`).
#[derive(clap::Args, Debug, Clone)]
pub struct ListenArgs {
    /// Most connections open at once, TLS handshakes included; past it a new connection is
    /// closed at once (counted in ops_relay_connections_refused_total or
    /// ops_meta_connections_refused_total). Keep it below the open-files limit.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// A request's headers must be in within this (milliseconds), else the connection is
    /// closed.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// A request's body must be in within this of its headers (milliseconds), else the
    /// request is refused and the connection closed.
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
}

impl ListenArgs {
    pub fn limits(&self) -> Result<crate::server::ConnLimits, String> {
        if self.max_connections == 0 || self.header_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err("--max-connections, --header-timeout-ms and --body-timeout-ms must be > 0".into());
        }
        Ok(crate::server::ConnLimits {
            max_connections: self.max_connections,
            header_timeout: std::time::Duration::from_millis(self.header_timeout_ms),
            body_timeout: std::time::Duration::from_millis(self.body_timeout_ms),
        })
    }
}

/// Which operator keys the desired config must be signed by.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrustArgs {
    /// An operator's ed25519 public key (base64, from `opsctl keygen`): the desired config
    /// must then carry a signature by one of the keys given (`agents.toml.sig`, `opsctl
    /// sign`). Repeat it to trust an old and a new key during a rotation.
    #[arg(long)]
    pub trusted_key: Vec<String>,
    /// A file of trusted public keys, one per line (`#` comments). Repeatable.
    #[arg(long)]
    pub trusted_keys_file: Vec<PathBuf>,
    /// Run without trusted keys on addresses other than loopback: a lab, where whatever can
    /// reach the cluster's addresses may change what the hosts install.
    #[arg(long)]
    pub lab: bool,
}

impl TrustArgs {
    /// Without trusted keys, a node or relay serves only loopback (`listen` and every node of
    /// `map`): on a network, unsigned documents are whatever the network says, so that takes
    /// `--lab`.
    pub fn check_lab(&self, keys: &TrustedKeys, listen: &str, map: Option<&ops_config::ClusterMap>) -> Result<(), String> {
        if !keys.is_empty() || self.lab {
            return Ok(());
        }
        let loopback = |a: std::net::SocketAddr| a.ip().is_loopback();
        let off = match listen.parse::<std::net::SocketAddr>() {
            Ok(a) if !loopback(a) => Some(format!("--listen {listen}")),
            Err(_) => Some(format!("--listen {listen}")),
            Ok(_) => map.and_then(|m| m.nodes.iter().find(|n| !loopback(n.addr)).map(|n| format!("{} at {}", n.id, n.addr))),
        };
        match off {
            None => Ok(()),
            Some(what) => Err(format!(
                "{what} is not loopback and no trusted key is given: give the operators' keys (--trusted-keys-file, opsctl keygen) \
                 so only signed documents are taken, or --lab for a lab where anything on the network may change them"
            )),
        }
    }

    pub fn keys(&self) -> Result<TrustedKeys, String> {
        TrustedKeys::load(&self.trusted_key, &self.trusted_keys_file).map_err(|e| e.to_string())
    }
}

/// HTTPS on the listening port.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Under the map's `mtls`: keeps `--tls-cert`/`--tls-key` as this process's identity
    /// towards the meta nodes (`tls::set_identity`); they are required then, and the
    /// certificate must name `name` (`cluster::node_name` or `cluster::relay_name` of the id).
    pub fn identity_for(&self, map: &ops_config::ClusterMap, name: &str) -> Result<(), String> {
        if !map.mtls {
            return Ok(());
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::set_identity(cert, key, name),
            _ => Err(format!(
                "{}: mtls = true needs this process's certificate: --tls-cert and --tls-key (a relay: or --identity-cert and --identity-key; opsctl ca issue)",
                map.file.display()
            )),
        }
    }

    pub fn server_config(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key).map(Some),
            _ => Ok(None),
        }
    }
}
