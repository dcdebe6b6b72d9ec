//! The relay's read-only copy of the desired config: pulled from any meta node with
//! `If-None-Match`, validated with the same parser the meta nodes use, and kept on disk so a
//! restarted relay answers before any meta node is reachable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ops_config::DesiredConfig;
use tokio_util::sync::CancellationToken;

use crate::desired::Loaded;

const FILE_NAME: &str = "agents.toml";

/// The config a relay serves, if it has one yet.
pub struct ConfigCopy {
    current: ArcSwapOption<Loaded>,
    dir: PathBuf,
    /// Index of the meta node that answered last (tried first next time).
    last_good: AtomicUsize,
}

impl ConfigCopy {
    /// Loads the copy kept in `dir`, if any. A damaged copy is logged and ignored.
    pub fn open(dir: &Path) -> Self {
        let path = dir.join(FILE_NAME);
        let current = match std::fs::read_to_string(&path) {
            Ok(text) => match DesiredConfig::parse(&text, &path.display().to_string()) {
                Ok(config) => {
                    tracing::info!(hash = config.hash(), file = %path.display(), "desired config loaded from the local copy");
                    Some(Arc::new(Loaded::new(config, 1)))
                }
                Err(error) => {
                    tracing::error!(%error, "local config copy unreadable, waiting for a meta node");
                    None
                }
            },
            Err(_) => None,
        };
        ConfigCopy { current: ArcSwapOption::new(current), dir: dir.to_path_buf(), last_good: AtomicUsize::new(0) }
    }

    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    pub fn hash(&self) -> Option<String> {
        self.current.load().as_ref().map(|l| l.config.hash().to_owned())
    }

    /// Validates and installs a config text fetched from `source`; writes it to disk first
    /// (temporary file + rename) so the disk copy is never newer than what is served... nor torn.
    pub fn install(&self, text: &str, source: &str) -> Result<Arc<Loaded>, String> {
        let config = DesiredConfig::parse(text, source).map_err(|e| e.to_string())?;
        crate::write_atomically(&self.dir.join(FILE_NAME), text.as_bytes())
            .map_err(|e| format!("cannot keep config copy in {}: {e}", self.dir.display()))?;
        let generation = self.current.load().as_ref().map_or(1, |l| l.generation.wrapping_add(1).max(1));
        let loaded = Arc::new(Loaded::new(config, generation));
        self.current.store(Some(loaded.clone()));
        Ok(loaded)
    }

    /// One poll: asks the meta nodes in turn (last good first) until one answers.
    pub async fn poll_once(&self, client: &reqwest::Client, nodes: &[SocketAddr]) -> Result<bool, String> {
        let mut errors = Vec::new();
        let start = self.last_good.load(Ordering::Relaxed);
        for k in 0..nodes.len() {
            let i = (start + k) % nodes.len();
            let url = format!("http://{}/config/desired", nodes[i]);
            let mut req = client.get(&url).timeout(Duration::from_secs(5));
            if let Some(hash) = self.hash() {
                req = req.header(reqwest::header::IF_NONE_MATCH, format!("\"{hash}\""));
            }
            match req.send().await {
                Ok(r) if r.status() == reqwest::StatusCode::NOT_MODIFIED => {
                    self.last_good.store(i, Ordering::Relaxed);
                    return Ok(false);
                }
                Ok(r) if r.status().is_success() => {
                    self.last_good.store(i, Ordering::Relaxed);
                    let text = r.text().await.map_err(|e| format!("{url}: {e}"))?;
                    let old = self.hash();
                    let loaded = self.install(&text, &url)?;
                    if let Some(old) = old {
                        metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => old).set(0.0);
                    }
                    metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => loaded.config.hash().to_owned()).set(1.0);
                    tracing::info!(hash = loaded.config.hash(), from = %url, "desired config updated");
                    return Ok(true);
                }
                Ok(r) => errors.push(format!("{url}: {}", r.status())),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    /// Polls every `period` until `shutdown`.
    pub async fn poll(self: Arc<Self>, client: reqwest::Client, nodes: Vec<SocketAddr>, period: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            match self.poll_once(&client, &nodes).await {
                Ok(changed) => {
                    failing = false;
                    metrics::counter!(crate::metrics::CONFIG_POLLS, "result" => if changed { "changed" } else { "unchanged" }).increment(1);
                }
                Err(error) => {
                    metrics::counter!(crate::metrics::CONFIG_POLLS, "result" => "error").increment(1);
                    if !failing {
                        tracing::warn!(%error, "no meta node gave the desired config; serving the copy held");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\ndefault = { version = \"1\" }\n";

    #[test]
    fn installed_copy_survives_a_restart_and_bad_text_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let copy = ConfigCopy::open(dir.path());
        assert!(copy.current().is_none());
        copy.install(GOOD, "test").unwrap();
        assert!(copy.install("[[agent]]\nname = 1\n", "test").is_err());
        assert_eq!(copy.hash().unwrap(), ops_config::content_hash(GOOD.as_bytes()));
        let again = ConfigCopy::open(dir.path());
        assert_eq!(again.hash(), copy.hash());
        assert!(!dir.path().join("agents.toml.tmp").exists());
    }
}
