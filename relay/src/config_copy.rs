//! The relay's read-only copy of the desired config: pulled from any meta node with
//! `If-None-Match`, validated with the same parser the meta nodes use, and kept on disk so a
//! restarted relay answers before any meta node is reachable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ops_config::trust::{SIGNATURE_HEADER, TrustedKeys, parse_signed};
use tokio_util::sync::CancellationToken;

use ops_serve::desired::Loaded;

const FILE_NAME: &str = "agents.toml";

#[cfg(test)]
const SIG_NAME: &str = "agents.toml.sig";

/// The config a relay serves, if it has one yet.
pub struct ConfigCopy {
    current: ArcSwapOption<Loaded>,
    dir: PathBuf,
    /// When set, a copy (fetched or on disk) must be signed by one of these keys.
    keys: TrustedKeys,
    /// Index of the meta node that answered last (tried first next time).
    last_good: AtomicUsize,
    /// Where updaters reach this relay's package cache, when it has one.
    cache_base: Option<String>,
    /// The highest config generation taken from a meta node (since start).
    generation: std::sync::atomic::AtomicU64,
    /// With keys: the highest signed version taken, kept in the data dir (`ops_serve::floor`).
    floor: Option<ops_serve::floor::VersionFloor>,
}

impl ConfigCopy {
    /// Loads the copy kept in `dir`, if any. A damaged or badly signed copy is logged and
    /// ignored.
    /// `cache_base`: where updaters reach this relay's package cache (`--advertise-url`), if
    /// it has one.
    pub fn open(dir: &Path, keys: TrustedKeys, cache_base: Option<String>) -> Self {
        let path = dir.join(FILE_NAME);
        let floor = (!keys.is_empty()).then(|| ops_serve::floor::VersionFloor::open(dir));
        let on_disk = ops_config::trust::load_signed(&path, &keys).and_then(|(config, signature)| {
            // An expired copy still answers until a meta node gives a fresh one (the updaters
            // refuse it); an older one than taken before is not served.
            match floor.as_ref().map_or(Ok(()), |f| f.check_order(&config)) {
                Ok(()) => Ok((config, signature)),
                Err(e) => Err(ops_config::ConfigError::File { file: path.display().to_string(), message: e.to_string() }),
            }
        });
        let current = match on_disk {
            Ok((config, signature)) => {
                tracing::info!(hash = config.hash(), file = %path.display(), "desired config loaded from the local copy");
                Some(Arc::new(Loaded::build(config, signature, 1, cache_base.as_deref())))
            }
            Err(ops_config::ConfigError::File { message, .. }) if !path.exists() => {
                tracing::debug!(%message, "no local config copy");
                None
            }
            Err(error) => {
                tracing::error!(%error, "local config copy refused, waiting for a meta node");
                None
            }
        };
        ConfigCopy {
            current: ArcSwapOption::new(current),
            dir: dir.to_path_buf(),
            keys,
            last_good: AtomicUsize::new(0),
            cache_base,
            generation: Default::default(),
            floor,
        }
    }

    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    pub fn hash(&self) -> Option<String> {
        self.current.load().as_ref().map(|l| l.config.hash().to_owned())
    }

    /// Validates (and checks the signature of, with keys set) a config text fetched from
    /// `source`, then installs it; writes it to disk first (signature, then text; each a
    /// temporary file + rename) so the disk copy is never newer than what is served, nor torn.
    pub fn install(&self, text: &str, signature: Option<&str>, source: &str) -> Result<Arc<Loaded>, String> {
        let config = parse_signed(text, signature, &self.keys, source).map_err(|e| e.to_string())?;
        if let Some(f) = &self.floor {
            f.check(&config).map_err(|e| format!("{source}: signed config refused: {e}"))?;
        }
        ops_config::trust::write_signed(&self.dir.join(FILE_NAME), text, signature, "")
            .map_err(|e| format!("cannot keep config copy in {}: {e}", self.dir.display()))?;
        let generation = self.current.load().as_ref().map_or(1, |l| l.generation.wrapping_add(1).max(1));
        let loaded = Arc::new(Loaded::build(config, signature.map(str::to_owned), generation, self.cache_base.as_deref()));
        self.current.store(Some(loaded.clone()));
        if let Some(f) = &self.floor {
            f.raise(&loaded.config).map_err(|e| format!("cannot keep the signed config version in {}: {e}", self.dir.display()))?;
        }
        Ok(loaded)
    }

    /// One poll: asks the meta nodes in turn (last good first) until one answers.
    /// `nodes`: `http[s]://addr` of each meta node.
    pub async fn poll_once(&self, client: &reqwest::Client, nodes: &[String]) -> Result<bool, String> {
        let mut errors = Vec::new();
        let start = self.last_good.load(Ordering::Relaxed);
        for k in 0..nodes.len() {
            let i = (start + k) % nodes.len();
            let url = format!("{}/config/desired", nodes[i]);
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
                    let generation = r
                        .headers()
                        .get(ops_config::wire::CONFIG_GENERATION_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if generation.is_some_and(|g| g < self.generation.load(Ordering::Relaxed)) {
                        // Behind an apply the relay already took: ask the next node.
                        errors.push(format!("{url}: config generation {generation:?} is older than one already taken"));
                        continue;
                    }
                    self.last_good.store(i, Ordering::Relaxed);
                    if let Some(g) = generation {
                        self.generation.fetch_max(g, Ordering::Relaxed);
                    }
                    let signature = r.headers().get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let text = r.text().await.map_err(|e| format!("{url}: {e}"))?;
                    let old = self.hash();
                    let loaded = self.install(&text, signature.as_deref(), &url)?;
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
    pub async fn poll(self: Arc<Self>, client: reqwest::Client, nodes: Vec<String>, period: Duration, shutdown: CancellationToken) {
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
        let copy = ConfigCopy::open(dir.path(), TrustedKeys::default(), None);
        assert!(copy.current().is_none());
        copy.install(GOOD, None, "test").unwrap();
        assert!(copy.install("[[agent]]\nname = 1\n", None, "test").is_err());
        assert_eq!(copy.hash().unwrap(), ops_config::content_hash(GOOD.as_bytes()));
        let again = ConfigCopy::open(dir.path(), TrustedKeys::default(), None);
        assert_eq!(again.hash(), copy.hash());
        assert!(!dir.path().join("agents.toml.tmp").exists());
    }

    /// [`GOOD`] at a signed version.
    fn versioned(version: u64) -> String {
        format!("version = {version}\nexpires = 2999-01-01T00:00:00Z\n{GOOD}")
    }

    #[test]
    fn with_keys_an_older_signed_copy_is_refused_and_the_floor_survives_a_restart() {
        let key = ops_config::trust::SecretKey::from_seed([3; 32]);
        let keys = TrustedKeys::load(&[key.public_text()], &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = ConfigCopy::open(dir.path(), keys.clone(), None);
        let signed = |text: &str| ops_config::trust::signature_header(&key.sign(text.as_bytes()));
        let (v4, v5) = (versioned(4), versioned(5));
        copy.install(&v5, Some(&signed(&v5)), "m1").unwrap();
        let e = copy.install(&v4, Some(&signed(&v4)), "m2").err().expect("refused");
        assert!(e.contains("version 4 is older than 5"), "{e}");
        assert_eq!(copy.hash().unwrap(), ops_config::content_hash(v5.as_bytes()), "the newer copy is kept");
        let again = ConfigCopy::open(dir.path(), keys.clone(), None);
        assert!(again.install(&v4, Some(&signed(&v4)), "m2").is_err(), "the floor is kept on disk");
        // An older copy put on disk by hand while the relay was down is not served at start.
        std::fs::write(dir.path().join(FILE_NAME), &v4).unwrap();
        std::fs::write(dir.path().join(SIG_NAME), ops_config::trust::signature_file(&signed(&v4))).unwrap();
        assert!(ConfigCopy::open(dir.path(), keys, None).current().is_none());
    }

    #[test]
    fn with_keys_only_a_signed_copy_is_taken_or_reloaded_from_disk() {
        let key = ops_config::trust::SecretKey::from_seed([3; 32]);
        let keys = TrustedKeys::load(&[key.public_text()], &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = ConfigCopy::open(dir.path(), keys.clone(), None);
        let e = copy.install(GOOD, None, "m1").err().unwrap();
        assert!(e.contains("no signature"), "{e}");
        let other = ops_config::trust::SecretKey::from_seed([4; 32]);
        assert!(copy.install(GOOD, Some(&other.sign(GOOD.as_bytes())), "m1").err().unwrap().contains("not trusted"));
        assert!(copy.current().is_none() && !dir.path().join(FILE_NAME).exists(), "a refused copy changes nothing");
        let good = versioned(1);
        let sig = ops_config::trust::signature_header(&key.sign(good.as_bytes()));
        copy.install(&good, Some(&sig), "m1").unwrap();
        assert_eq!(ConfigCopy::open(dir.path(), keys.clone(), None).hash(), copy.hash());
        // A copy edited on disk is refused at the next start.
        std::fs::write(dir.path().join(FILE_NAME), good.replace("\"1\"", "\"2\"")).unwrap();
        assert!(ConfigCopy::open(dir.path(), keys, None).current().is_none());
    }
}
