//! The signed config an updater checks every desired state against, when it has trusted keys
//! (`ops_config::trust`): fetched from the server that answered, verified, kept on disk with
//! the highest signed version seen (the floor), so neither a restart nor whoever answers can
//! roll it back.

use std::path::{Path, PathBuf};

use ops_config::clock::unix_now;
use ops_config::trust::{Floor, SIGNATURE_HEADER, TrustedKeys};
use ops_config::{DesiredAgent, DesiredConfig};

/// The last signed config fetched and verified (with `.sig` beside it), kept across restarts.
const SIGNED_FILE: &str = "signed-agents.toml";
/// The highest signed version verified here and its hash (`VERSION HASH`): written, synced,
/// before the config itself, so no crash and no damaged config file lets an older signed
/// config in afterwards.
const FLOOR_FILE: &str = "signed-version";

/// Writes `{dir}/{name}` whole and durably (`ops_config::disk::write_atomically`).
fn keep_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    ops_config::disk::write_atomically(&dir.join(name), bytes)
}

/// Logs why a verified signed config was not taken; a conflict (two files signed at one
/// version) is an operator's error and said louder.
fn log_refusal(e: &ops_config::trust::FreshError) {
    match e {
        ops_config::trust::FreshError::Conflict { .. } => tracing::error!(error = %e, "two signed configs at one version"),
        _ => tracing::warn!(error = %e, "signed config not taken"),
    }
}

/// The operators' keys, the config they signed as last verified here, and the floor.
pub struct Signed {
    keys: TrustedKeys,
    hostname: String,
    dir: Option<PathBuf>,
    config: Option<DesiredConfig>,
    /// The highest signed version verified here (kept in `FLOOR_FILE`): nothing below it,
    /// and no other file at it, is taken again.
    floor: Option<Floor>,
}

impl Signed {
    /// What `dir` keeps (nothing without trusted keys): the signed config, unless it is below
    /// the floor kept beside it.
    pub fn load(keys: TrustedKeys, hostname: &str, dir: Option<&Path>) -> Signed {
        let config = match (dir, keys.is_empty()) {
            (Some(dir), false) => match ops_config::trust::load_signed(&dir.join(SIGNED_FILE), &keys) {
                Ok((config, _)) => Some(config),
                Err(e) => {
                    tracing::debug!(error = %e, "no signed config kept");
                    None
                }
            },
            _ => None,
        };
        let floor = dir.and_then(|dir| {
            let kept = std::fs::read_to_string(dir.join(FLOOR_FILE)).ok().and_then(|t| Floor::parse(&t));
            let held = config.as_ref().and_then(Floor::of);
            match (kept, held) {
                (Some(k), h) => Some(k.max(h)),
                (None, h) => h,
            }
        });
        // A kept file below the floor (the floor is written first, so a crash between the two
        // leaves the older file) is not checked against: the next reply fetches the newer one.
        let config = config.filter(|c| floor.as_ref().is_none_or(|f| c.version().is_some_and(|v| v >= f.version)));
        Signed { keys, hostname: hostname.to_owned(), dir: dir.map(Path::to_path_buf), config, floor }
    }

    /// Whether desired states are checked at all (trusted keys are set).
    pub fn checks(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Makes the held config the signed config of hash `hash` if it is not already: fetched from
    /// `server` (the one that answered), verified, then kept on disk. On failure the config
    /// held (if any) stays, and the error says why.
    pub async fn refresh(&mut self, client: &reqwest::Client, server: &str, hash: &str, max_bytes: usize) -> Result<(), String> {
        if self.config.as_ref().is_some_and(|c| c.hash() == hash) {
            return Ok(());
        }
        let url = format!("{}/config/desired", crate::send::base_url(server));
        let r = client.get(&url).send().await.map_err(|e| format!("GET {url}: {}", crate::causes(&e)))?;
        if !r.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", r.status()));
        }
        let signature = r.headers().get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = crate::body_capped(r, max_bytes).await.map_err(|e| format!("GET {url}: {e}"))?;
        let text = String::from_utf8(body).map_err(|_| format!("GET {url}: the config is not UTF-8"))?;
        let config = ops_config::trust::parse_signed(&text, signature.as_deref(), &self.keys, &url)
            .map_err(|e| format!("signed config refused: {e}"))?;
        // Signed is not enough: an older signed file (a rollback by whoever answers), another
        // file at the same version, or an expired one is not taken.
        ops_config::trust::check_fresh(&config, self.floor.as_ref(), unix_now()).map_err(|e| {
            log_refusal(&e);
            format!("signed config refused: {e}")
        })?;
        let floor = Floor::of(&config).expect("check_fresh wants a version");
        if self.floor.as_ref() != Some(&floor) {
            if let Some(dir) = &self.dir {
                // The floor first: once it is on disk, nothing older gets in, whatever happens
                // to the files below.
                if let Err(e) = keep_file(dir, FLOOR_FILE, floor.to_text().as_bytes()) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the signed version");
                }
            }
            self.floor = Some(floor);
        }
        if let (Some(dir), Some(sig)) = (&self.dir, &signature) {
            let kept = ops_config::trust::write_signed(&dir.join(SIGNED_FILE), &text, Some(sig.as_str()), "");
            if let Err(e) = kept {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the signed config");
            }
        }
        tracing::info!(hash = config.hash(), version = config.version(), from = %url, "signed config verified");
        if config.hash() != hash {
            tracing::warn!(reply = hash, fetched = config.hash(), "the server's reply and its config differ (a reload in between?)");
        }
        self.config = Some(config);
        Ok(())
    }

    /// With trusted keys: Ok when the signed config allows `d` for this host.
    pub fn check(&self, d: &DesiredAgent) -> Result<(), String> {
        if self.keys.is_empty() {
            return Ok(());
        }
        match &self.config {
            // The config held may have expired since it was taken: nothing changes by it then
            // (what runs keeps running) until the operator signs a fresh one.
            Some(config) => match ops_config::trust::check_fresh(config, None, unix_now()) {
                Err(e) => Err(format!("refused: agent {} {}: {e}; nothing is changed until then", d.name, d.version)),
                Ok(()) => ops_config::trust::allows(config, &self.hostname, d).map_err(|e| format!("refused: {e}")),
            },
            None => Err(format!("refused: agent {} {}: no verified signed config to check it against", d.name, d.version)),
        }
    }

    /// The sha256 the signed config gives agent `name` at `version` on this host, if any.
    pub fn sha256_of(&self, name: &str, version: &str) -> Option<String> {
        let config = self.config.as_ref()?;
        ops_config::trust::allowed_states(config, &self.hostname, name)
            .into_iter()
            .find(|a| a.version == version && !a.sha256.is_empty())
            .map(|a| a.sha256.clone())
    }
}
