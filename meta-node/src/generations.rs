//! Generations of `agents.toml`: a number that only grows with every apply
//! (`POST /config/apply`, `opsctl config apply`), kept beside the data (`config-generation`),
//! and the last applied versions (`config-history/{generation}.toml` and `.sig`), so
//! `opsctl config rollback` can bring one back and a node that missed an apply can tell.
//!
//! The generation lives outside the file, so a signed file is never touched: its bytes are
//! what the operator signed. Two nodes at one generation with different hashes have diverged
//! (`/health`, `opsctl cluster`, `ops_meta_config_diverged`); a node that sees a peer at a
//! higher generation pulls that peer's file, checks it (and its signature) and serves it
//! (`crate::coordination::peers`).
//!
//! With trusted keys the generation is the signed file's own `version` (whatever number a
//! coordinator or a peer proposes), so a node's generation names the operator's document.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Applied versions kept per node.
pub const KEEP: usize = 10;

const GENERATION_FILE: &str = "config-generation";
const HISTORY_DIR: &str = "config-history";

/// One kept version (the reply type of `GET /config/history`).
pub use ops_config::reply::KeptVersion as Entry;

/// The generation served and the history, under one data dir.
pub struct Generations {
    generation: AtomicU64,
    dir: PathBuf,
    /// One write at a time.
    lock: Mutex<()>,
}

impl Generations {
    /// Reads the generation kept in `data_dir` (0: never applied).
    pub fn open(data_dir: &Path) -> Self {
        let generation = std::fs::read_to_string(data_dir.join(GENERATION_FILE)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        Generations { generation: AtomicU64::new(generation), dir: data_dir.to_path_buf(), lock: Mutex::new(()) }
    }

    pub fn current(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// With trusted keys the generation is the signed version of the file served: set at
    /// start to the version of the file the node starts with (kept to disk).
    pub fn serve_signed(&self, version: u64) {
        let _one = self.lock.lock();
        if self.current() == version {
            return;
        }
        let p = self.dir.join(GENERATION_FILE);
        if let Err(e) =
            std::fs::create_dir_all(&self.dir).and_then(|()| ops_config::disk::write_atomically(&p, format!("{version}\n").as_bytes()))
        {
            tracing::error!(file = %p.display(), error = %e, "cannot keep the config generation");
        }
        self.generation.store(version, Ordering::Release);
    }

    fn history(&self) -> PathBuf {
        self.dir.join(HISTORY_DIR)
    }

    /// Writes `text` (and `signature`, or removes a stale `.sig`) over `agents_path` as
    /// generation `generation`: the version served now is kept in the history first (if it is
    /// not yet), then the new one, each file through a temporary file and a rename. The caller
    /// reloads. Refuses a generation that is not above the current one.
    pub fn write(&self, agents_path: &Path, text: &str, signature: Option<&str>, generation: u64) -> Result<(), String> {
        let _one = self.lock.lock();
        let current = self.current();
        if generation == current && std::fs::read(agents_path).is_ok_and(|t| t == text.as_bytes()) {
            // Already taken (from a peer that was written first): nothing to do.
            return Ok(());
        }
        if generation <= current {
            return Err(format!("generation {generation} is not above this node's {current}"));
        }
        let history = self.history();
        std::fs::create_dir_all(&history).map_err(|e| format!("{}: {e}", history.display()))?;
        let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        let sig_path = ops_config::trust::signature_path(agents_path);
        // A pair a crash left half written is finished first, so the version kept below is
        // whole.
        ops_config::trust::recover(agents_path).map_err(|e| e.to_string())?;
        let kept = history.join(format!("{current}.toml"));
        if !kept.exists()
            && let Ok(old) = std::fs::read(agents_path)
        {
            ops_config::disk::write_atomically(&kept, &old).map_err(|e| io(&kept, e))?;
            if let Ok(sig) = std::fs::read(&sig_path) {
                let p = history.join(format!("{current}.toml.sig"));
                ops_config::disk::write_atomically(&p, &sig).map_err(|e| io(&p, e))?;
            }
        }
        let p = history.join(format!("{generation}.toml"));
        ops_config::disk::write_atomically(&p, text.as_bytes()).map_err(|e| io(&p, e))?;
        if let Some(sig) = signature {
            let p = history.join(format!("{generation}.toml.sig"));
            ops_config::disk::write_atomically(&p, ops_config::trust::signature_file(sig).as_bytes()).map_err(|e| io(&p, e))?;
        }
        // The file and its signature as one pair: a crash between them is finished at the
        // next load (`ops_config::disk::write_pair`).
        ops_config::trust::write_signed(agents_path, text, signature, "").map_err(|e| io(agents_path, e))?;
        let p = self.dir.join(GENERATION_FILE);
        ops_config::disk::write_atomically(&p, format!("{generation}\n").as_bytes()).map_err(|e| io(&p, e))?;
        self.generation.store(generation, Ordering::Release);
        self.prune();
        Ok(())
    }

    /// Keeps the newest [`KEEP`] versions.
    fn prune(&self) {
        let mut gens: Vec<u64> = self.list().iter().map(|e| e.generation).collect();
        gens.sort_unstable();
        for g in gens.iter().rev().skip(KEEP) {
            let _ = std::fs::remove_file(self.history().join(format!("{g}.toml")));
            let _ = std::fs::remove_file(self.history().join(format!("{g}.toml.sig")));
        }
    }

    /// The kept versions, newest first.
    pub fn list(&self) -> Vec<Entry> {
        let mut out: Vec<Entry> = std::fs::read_dir(self.history())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let generation: u64 = name.strip_suffix(".toml")?.parse().ok()?;
                let bytes = std::fs::read(e.path()).ok()?;
                let signed = self.history().join(format!("{name}.sig")).exists();
                Some(Entry { generation, hash: ops_config::content_hash(&bytes), bytes: bytes.len() as u64, signed })
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.generation));
        out
    }

    /// The text and signature of a kept version.
    pub fn read(&self, generation: u64) -> Option<(String, Option<String>)> {
        let text = std::fs::read_to_string(self.history().join(format!("{generation}.toml"))).ok()?;
        let sig = std::fs::read_to_string(self.history().join(format!("{generation}.toml.sig"))).ok();
        Some((text, sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_only_grow_and_the_history_keeps_the_last_versions() {
        let dir = tempfile::tempdir().unwrap();
        let agents = dir.path().join("agents.toml");
        std::fs::write(&agents, "v0").unwrap();
        let g = Generations::open(dir.path());
        assert_eq!(g.current(), 0);
        g.write(&agents, "v1", None, 1).unwrap();
        assert_eq!(std::fs::read_to_string(&agents).unwrap(), "v1");
        assert!(g.write(&agents, "v1b", None, 1).is_err(), "not above the current generation");
        assert_eq!(std::fs::read_to_string(&agents).unwrap(), "v1", "nothing written");
        g.write(&agents, "v2", Some("ed25519 key sig"), 2).unwrap();
        assert!(ops_config::trust::signature_path(&agents).exists());
        g.write(&agents, "v3", None, 3).unwrap();
        assert!(!ops_config::trust::signature_path(&agents).exists(), "an unsigned version leaves no stale signature");
        let gens: Vec<u64> = g.list().iter().map(|e| e.generation).collect();
        assert_eq!(gens, vec![3, 2, 1, 0], "the version before the first apply is kept too");
        assert_eq!(g.read(2).unwrap(), ("v2".to_owned(), Some("ed25519 key sig\n".to_owned())));
        assert_eq!(Generations::open(dir.path()).current(), 3, "kept across restarts");
        for k in 4..20 {
            g.write(&agents, &format!("v{k}"), None, k).unwrap();
        }
        assert_eq!(g.list().len(), KEEP);
        assert_eq!(g.list()[0].generation, 19);
    }
}
