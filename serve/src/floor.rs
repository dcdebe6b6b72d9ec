//! The highest signed version a relay or a meta node has verified of a document, kept in its
//! data dir (`config-version` for `agents.toml`, `cluster-version` for `cluster.toml`:
//! `VERSION HASH`), so that no restart, peer, relay poll or reload takes it back to an older
//! signed file (`ops_config::trust::check_fresh`). Only with trusted keys: an unsigned lab
//! cluster has no versions to keep.

use std::path::{Path, PathBuf};

use ops_config::trust::{Floor, FreshError, Versioned};
use parking_lot::Mutex;

/// The file name in a data dir of the `agents.toml` floor.
pub const FILE_NAME: &str = "config-version";

/// The same of the `cluster.toml` floor.
pub const MAP_FILE_NAME: &str = "cluster-version";

pub struct VersionFloor {
    path: PathBuf,
    floor: Mutex<Option<Floor>>,
}

impl VersionFloor {
    /// The floor kept in `data_dir` (none yet: nothing verified). A damaged file is logged and
    /// read as none; the file of the config on disk raises it again at once.
    pub fn open(data_dir: &Path) -> Self {
        Self::open_named(data_dir, FILE_NAME)
    }

    /// The floor of the cluster map kept in `data_dir`.
    pub fn open_map(data_dir: &Path) -> Self {
        Self::open_named(data_dir, MAP_FILE_NAME)
    }

    fn open_named(data_dir: &Path, name: &str) -> Self {
        let path = data_dir.join(name);
        let floor = match std::fs::read_to_string(&path) {
            Ok(text) => Floor::parse(&text).or_else(|| {
                tracing::error!(file = %path.display(), "damaged signed-version file ignored");
                None
            }),
            Err(_) => None,
        };
        VersionFloor { path, floor: Mutex::new(floor) }
    }

    pub fn current(&self) -> Option<Floor> {
        self.floor.lock().clone()
    }

    /// Whether `config` (its signature already verified) may be taken now.
    pub fn check(&self, config: &(impl Versioned + ?Sized)) -> Result<(), FreshError> {
        ops_config::trust::check_fresh(config, self.floor.lock().as_ref(), u64::from(ops_config::clock::unix_now_u32()))
    }

    /// [`check`](Self::check) without the expiry: what a node checks of the file it starts
    /// with (an expired file is still served, for the updaters to refuse; a lower one is not).
    pub fn check_order(&self, config: &(impl Versioned + ?Sized)) -> Result<(), FreshError> {
        match self.check(config) {
            Err(FreshError::Expired { .. }) => Ok(()),
            other => other,
        }
    }

    /// Raises the floor to `config`'s version (nothing when it is not higher), written and
    /// synced before this returns.
    pub fn raise(&self, config: &(impl Versioned + ?Sized)) -> std::io::Result<()> {
        let Some(new) = Floor::of(config) else { return Ok(()) };
        let mut floor = self.floor.lock();
        if floor.as_ref().is_some_and(|f| f.version >= new.version) {
            return Ok(());
        }
        ops_config::disk::write_atomically(&self.path, new.to_text().as_bytes())?;
        *floor = Some(new);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops_config::DesiredConfig;

    fn config(version: u64, body: &str) -> DesiredConfig {
        DesiredConfig::parse(&format!("version = {version}\nexpires = 2999-01-01T00:00:00Z\n{body}"), "t").unwrap()
    }

    #[test]
    fn the_floor_only_rises_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let floor = VersionFloor::open(dir.path());
        assert_eq!(floor.current(), None);
        let (v3, v5) = (config(3, ""), config(5, ""));
        floor.check(&v5).unwrap();
        floor.raise(&v5).unwrap();
        floor.raise(&v3).unwrap();
        assert_eq!(floor.current().unwrap().version, 5, "never lowered");
        let again = VersionFloor::open(dir.path());
        assert_eq!(again.current(), floor.current(), "kept on disk");
        assert!(matches!(again.check(&v3), Err(FreshError::Older { version: 3, highest: 5 })));
        assert!(matches!(again.check(&config(5, "# other\n")), Err(FreshError::Conflict { .. })));
        again.check(&v5).unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "garbage").unwrap();
        assert_eq!(VersionFloor::open(dir.path()).current(), None);
    }

    #[test]
    fn a_node_starts_with_an_expired_file_but_never_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let floor = VersionFloor::open(dir.path());
        let expired = DesiredConfig::parse("version = 2\nexpires = 2001-01-01T00:00:00Z\n", "t").unwrap();
        assert!(matches!(floor.check(&expired), Err(FreshError::Expired { .. })));
        floor.check_order(&expired).unwrap();
        floor.raise(&config(4, "")).unwrap();
        assert!(matches!(floor.check_order(&expired), Err(FreshError::Older { .. })));
    }
}
