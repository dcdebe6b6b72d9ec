//! What the updater keeps across restarts, in `{state_dir}/state.json`: which agents to report
//! at the first heartbeat, their last errors, the switches in their health window, the
//! versions reverted and a self-update in progress. Never the real state, which is read again
//! every cycle.
//!
//! Each step that must survive a kill (a watch begun, a revert begun, a self-update's swap)
//! saves the journal before it acts; the file is written whole or not at all
//! (`ops_config::disk::write_atomically`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ops_config::DesiredAgent;
use serde::{Deserialize, Serialize};

/// The file under the state directory.
pub const STATE_FILE: &str = "state.json";

/// The kept state, and where it is kept (None: memory only).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Journal {
    #[serde(skip)]
    dir: Option<PathBuf>,
    /// The desired list last taken.
    pub desired: Vec<DesiredAgent>,
    /// The last error per agent.
    pub errors: HashMap<String, String>,
    /// Switches in their health window or revert, per agent.
    #[serde(default)]
    pub watch: HashMap<String, Watch>,
    /// Versions reverted, per agent.
    #[serde(default)]
    pub reverted: HashMap<String, Reverted>,
    /// A self-update between its check and its confirmation.
    #[serde(default)]
    pub self_update: Option<Pending>,
}

impl Journal {
    /// The journal kept in `dir` (an unreadable file is logged and ignored), or an empty one
    /// in memory only.
    pub fn load(dir: Option<&Path>) -> Journal {
        let Some(dir) = dir else { return Journal::default() };
        let path = dir.join(STATE_FILE);
        let mut journal = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "kept state unreadable, starting without it");
                Journal::default()
            }),
            Err(_) => Journal::default(),
        };
        journal.dir = Some(dir.to_path_buf());
        journal
    }

    /// Writes the journal whole (temporary file + rename); a failure is logged, not fatal.
    pub fn save(&self) {
        let Some(dir) = &self.dir else { return };
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        if let Err(e) = ops_config::disk::write_atomically(&dir.join(STATE_FILE), &bytes) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot keep state across restarts");
        }
    }
}

/// The records the watched switch (`health`) and the self-update (`selfupdate`) keep here.
/// A switch whose health window has not ended (or whose revert has not finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub version: String,
    /// The version it replaced: the revert target.
    pub previous: String,
    pub digest: String,
    /// Unix seconds at which the window ends.
    pub until: u64,
    /// The revert has begun, for this reason.
    #[serde(default)]
    pub reverting: bool,
    #[serde(default)]
    pub reason: String,
}

/// A version this host reverted, not tried again while it is desired with the same digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reverted {
    pub version: String,
    pub digest: String,
    pub reason: String,
}

/// A self-update between its check and its confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub from: String,
    pub to: String,
    pub digest: String,
    pub exe: PathBuf,
    pub agent_dir: PathBuf,
    /// `{exe}.old` holds the old binary, and the new one may be in place.
    pub swapped: bool,
    /// Unix seconds by which the new binary must complete a heartbeat.
    pub deadline: u64,
    /// The arguments the old binary ran with: it gets them back if it comes back.
    #[serde(default)]
    pub args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::load(Some(dir.path()));
        j.desired = vec![crate::test_desired("agent", "1.0", "/w")];
        j.errors.insert("agent".into(), "md5 mismatch".into());
        j.save();
        let again = Journal::load(Some(dir.path()));
        assert_eq!(again.desired, j.desired);
        assert_eq!(again.errors.get("agent").map(String::as_str), Some("md5 mismatch"));
        std::fs::write(dir.path().join(STATE_FILE), b"garbage").unwrap();
        let fresh = Journal::load(Some(dir.path()));
        assert!(fresh.desired.is_empty(), "an unreadable file is ignored, not fatal");
        // In memory only: nothing written anywhere.
        Journal::load(None).save();
    }

    #[test]
    fn the_file_keeps_its_field_names() {
        let text = r#"{"desired":[],"errors":{"a":"boom"}}"#;
        let j: Journal = serde_json::from_str(text).unwrap();
        assert_eq!(j.errors["a"], "boom");
        let v = serde_json::to_value(&j).unwrap();
        for key in ["desired", "errors", "watch", "reverted", "self_update"] {
            assert!(v.get(key).is_some(), "{key} in {v}");
        }
    }
}
