//! Flags the relay and the meta node share.

use std::path::PathBuf;

use ops_config::trust::TrustedKeys;

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
