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
}

impl TrustArgs {
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
    /// towards the meta nodes (`tls::set_identity`); they are required then.
    pub fn identity_for(&self, map: &ops_config::ClusterMap) -> Result<(), String> {
        if !map.mtls {
            return Ok(());
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::set_identity(cert, key),
            _ => Err(format!("{}: mtls = true needs --tls-cert and --tls-key (opsctl ca issue)", map.file.display())),
        }
    }

    pub fn server_config(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key).map(Some),
            _ => Ok(None),
        }
    }
}
