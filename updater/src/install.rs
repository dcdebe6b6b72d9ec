//! Installing a version: `{workDir}/{name}/{version}/` is created only by renaming a fully
//! downloaded, verified and extracted temporary sibling into place, so its existence means it
//! is complete; `.version` is switched by an atomic rename and only ever names such a
//! directory; leftovers of a killed run (`.tmp-*`, `.download-*`) are removed and redone.
//! Old versions are pruned, never one a process still uses.

use std::path::{Component, Path, PathBuf};

use ops_config::DesiredAgent;
use ops_config::wire::{valid_agent_name, valid_version};

use crate::fetch::{self, Fetcher};
use crate::unpack;

/// The name of the desired agent that is the updater itself.
pub const SELF_AGENT: &str = "ops-updater";
/// The executable an agent's package must hold at its root.
pub fn entry_of(agent: &str) -> &'static str {
    if agent == SELF_AGENT { "ops-updater" } else { "control" }
}

/// What installing needs: the fetcher, this machine's architecture and the unpack limits.
pub struct Installer {
    pub fetcher: Fetcher,
    pub arch: String,
    pub limits: unpack::Limits,
}

/// The agent's directory and the version's, after refusing a hostile name, version, work
/// directory or cmd.
pub fn checked_dirs(d: &DesiredAgent) -> Result<(PathBuf, PathBuf), String> {
    if !valid_agent_name(&d.name) {
        return Err(format!("refused agent name {:?}", d.name));
    }
    if !valid_version(&d.version) {
        return Err(format!("agent {}: refused version {:?}", d.name, d.version));
    }
    let work = Path::new(&d.work_dir);
    if !work.is_absolute() || work.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("agent {}: refused workDir {:?} (must be absolute, without ..)", d.name, d.work_dir));
    }
    if d.cmd != "start" && d.cmd != "stop" {
        return Err(format!("agent {}: refused cmd {:?}", d.name, d.cmd));
    }
    let agent_dir = work.join(&d.name);
    let version_dir = agent_dir.join(&d.version);
    Ok((agent_dir, version_dir))
}

pub(crate) fn read_version(agent_dir: &Path) -> String {
    std::fs::read_to_string(agent_dir.join(".version")).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Writes `.version` by rename: a reader sees the old or the new content, never half.
pub(crate) fn write_version(agent_dir: &Path, version: &str) -> std::io::Result<()> {
    ops_config::disk::write_atomically(&agent_dir.join(".version"), format!("{version}\n").as_bytes())
}

/// Removes the version directories of `agent_dir` other than `keep` (and what a killed run
/// moved aside, `.broken-*`), except any that a running process still uses (its working
/// directory or executable is inside). Returns the versions removed.
pub fn prune_versions(agent_dir: &Path, keep: &[&str]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(agent_dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old_version = valid_version(&name) && !name.starts_with('.') && !keep.contains(&name.as_str());
        let path = entry.path();
        if !(old_version || name.starts_with(".broken-")) || !entry.file_type().is_ok_and(|t| t.is_dir()) || in_use(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed.push(name),
            Err(e) => tracing::warn!(dir = %path.display(), error = %e, "cannot remove an old version"),
        }
    }
    removed
}

/// Whether a process works in or runs a program from `dir` (read from `/proc`; when `/proc`
/// cannot be read, assumed in use).
fn in_use(dir: &Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    let Ok(dir) = dir.canonicalize() else { return true };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .any(|p| ["cwd", "exe"].iter().any(|link| std::fs::read_link(p.path().join(link)).is_ok_and(|target| target.starts_with(&dir))))
}

impl Installer {
    /// Makes `{agent_dir}/{version}` exist, complete: download, verify, extract into a
    /// temporary sibling, rename into place.
    pub async fn ensure_installed(&self, d: &DesiredAgent, agent_dir: &Path, version_dir: &Path) -> Result<(), String> {
        let entry = entry_of(&d.name);
        if version_dir.join(entry).is_file() {
            return Ok(());
        }
        let tmp = agent_dir.join(format!(".tmp-{}", d.version));
        let download = agent_dir.join(format!(".download-{}.tar.gz", d.version));
        // Leftovers of a killed run are never trusted.
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_file(&download);
        if version_dir.exists() {
            // Not made by us (we only rename complete trees into place): move it aside.
            let aside = agent_dir.join(format!(".broken-{}-{}", d.version, std::process::id()));
            std::fs::rename(version_dir, &aside).map_err(|e| format!("moving aside incomplete {}: {e}", version_dir.display()))?;
        }
        let url = fetch::tarball_url(d, &self.arch);
        // A sha256 alone is enough (and stronger); without it the md5 is needed. A hex md5 given
        // beside it is checked too; an md5 only to be fetched (empty or URL form) is not.
        let expected = if !d.sha256.is_empty() && !fetch::is_hex(d.md5.trim(), 32) {
            None
        } else {
            Some(self.fetcher.expected_md5(d, &url, &self.arch).await.map_err(|e| e.to_string())?)
        };
        let got = self.fetcher.download(&url, &download).await.map_err(|e| {
            let _ = std::fs::remove_file(&download);
            e.to_string()
        })?;
        if !d.sha256.is_empty() && !got.sha256.eq_ignore_ascii_case(d.sha256.trim()) {
            let _ = std::fs::remove_file(&download);
            return Err(format!("sha256 mismatch for {url}: expected {}, got {}", d.sha256, got.sha256));
        }
        if let Some(expected) = expected
            && got.md5 != expected
        {
            let _ = std::fs::remove_file(&download);
            return Err(format!("md5 mismatch for {url}: expected {expected}, got {}", got.md5));
        }
        std::fs::create_dir(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let (archive, dest, limits) = (download.clone(), tmp.clone(), self.limits);
        let unpacked =
            tokio::task::spawn_blocking(move || unpack::unpack_with(&archive, &dest, entry, limits)).await.map_err(|e| e.to_string())?;
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(&tmp);
            let _ = std::fs::remove_file(&download);
            return Err(format!("{url}: {e}"));
        }
        std::fs::rename(&tmp, version_dir).map_err(|e| format!("renaming into {}: {e}", version_dir.display()))?;
        if let Ok(dir) = std::fs::File::open(agent_dir) {
            let _ = dir.sync_all();
        }
        let _ = std::fs::remove_file(&download);
        tracing::info!(agent = %d.name, version = %d.version, bytes = got.bytes, "installed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_versions_go_but_the_kept_the_in_use_and_other_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["1.0", "2.0", "3.0", "4.0", ".broken-2.0-7", ".tmp-5.0"] {
            std::fs::create_dir(dir.path().join(v)).unwrap();
        }
        std::fs::write(dir.path().join(".version"), "4.0\n").unwrap();
        let mut busy = std::process::Command::new("sleep").arg("30").current_dir(dir.path().join("1.0")).spawn().unwrap();
        let mut removed = prune_versions(dir.path(), &["4.0", "3.0"]);
        removed.sort();
        busy.kill().unwrap();
        busy.wait().unwrap();
        assert_eq!(removed, [".broken-2.0-7", "2.0"]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, [".tmp-5.0", ".version", "1.0", "3.0", "4.0"], "1.0 is in use");
        assert_eq!(prune_versions(dir.path(), &["4.0", "3.0"]), ["1.0"]);
    }
}
