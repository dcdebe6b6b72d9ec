//! Self-update: a desired agent named `ops-updater` is the updater itself, so a million
//! updaters are upgraded by the same staged rollouts as any agent.
//!
//! Its package is `ops-updater-{version}.tar.gz` with an executable `ops-updater` at its root,
//! downloaded, verified and unpacked into `{workDir}/ops-updater/{version}/` as any agent's;
//! `{workDir}/ops-updater/.version` names the version in place (absent: the version built in).
//! Then, in order, each step kept in `state.json` before it acts:
//!
//! 1. **Check**: the new binary runs with this process's flags and `--self-check`, which sends
//!    one heartbeat and exits 0 when a server answered. One that does not within the bound
//!    (`--self-update-seconds`), exits at once, or is for another machine never replaces
//!    anything: the version is remembered as reverted (not tried again until the desired
//!    version or its digest changes) and the host reports `reverted: ...`.
//! 2. **Swap**: the running binary is copied to `{exe}.old` (kept: the way back), the new one is
//!    written beside as `{exe}.new`, synced and renamed over `{exe}`, and `.version` moves.
//! 3. **Re-exec**: the process execs `{exe}` with its own arguments (same PID, so a service
//!    manager sees no restart). The new binary is on probation: it cycles at once, and again
//!    every few seconds, until a heartbeat is answered (confirmed). If none is within the bound,
//!    it puts `{exe}.old` back, `.version` back, remembers the version as reverted, and execs
//!    the old binary with the arguments it ran with before the swap.
//! 4. **Guard**: a new binary that dies after the exec (a crash, SIGKILL) cannot watch itself.
//!    Whatever starts the updater next finds the self-update still unconfirmed: the old binary
//!    runs `ops-updater --self-update-guard` first (the systemd unit's `ExecStartPre`, run from
//!    `{exe}.old`), and every start that is not the re-exec does the same check itself, so the
//!    old binary is put back before anything else.

use ops_config::clock::unix_now;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ops_config::DesiredAgent;

use crate::health::{Reverted, digest};
use crate::install::{Installer, prune_versions, read_version, write_version};
pub use crate::install::{SELF_AGENT, entry_of};
use crate::journal::Journal;
pub use crate::journal::Pending;

/// The version this binary was built as: the updater's version while `.version` names none.
pub const BUILT_IN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Set on the re-exec, so the new process knows it is on probation rather than restarted.
pub const EXECED_ENV: &str = "OPS_UPDATER_SELF_UPDATE_EXEC";

/// How this process can replace itself.
#[derive(Debug, Clone, Default)]
pub struct SelfSettings {
    /// The binary to replace (this process's); None: self-update is refused.
    pub exe: Option<PathBuf>,
    /// The arguments it was started with: given again to the check and at the re-exec.
    pub args: Vec<OsString>,
    /// How long a new binary has to complete a heartbeat, in its check and on probation.
    pub bound: Duration,
}

/// `{path}{suffix}`: a file beside `path`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Copies `from` to `to` through `{to}.new`, synced, then a rename: `to` is the old file or
/// the whole new one, never half. Permissions are copied.
fn copy_atomically(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = beside(to, ".new");
    std::fs::copy(from, &tmp)?;
    ops_config::disk::rename_synced(&tmp, to)
}

/// Replaces this process with `exe args...` (marked as a re-exec); returns only on failure.
fn exec_with<S: AsRef<std::ffi::OsStr>>(exe: &Path, args: &[S]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(exe).args(args).env(EXECED_ENV, "1").exec()
}

/// The updater's version as installed in `agent_dir` (the built-in one when none is).
pub fn self_version(agent_dir: &Path) -> String {
    let v = read_version(agent_dir);
    if v.is_empty() { BUILT_IN_VERSION.to_owned() } else { v }
}

/// Whether the journal's self-update waits for its first answered heartbeat.
pub fn on_probation(journal: &Journal) -> bool {
    journal.self_update.as_ref().is_some_and(|p| p.swapped)
}

/// A self-update's steps: the journal they are kept in, how this process replaces itself, and
/// the self-update the guard undid at this start (its old arguments are run again).
pub struct SelfUpdate<'a> {
    pub journal: &'a mut Journal,
    pub settings: &'a SelfSettings,
    pub restored: &'a mut Option<Pending>,
}

impl SelfUpdate<'_> {
    /// Brings the updater itself to `d.version`: check, swap, re-exec (see the module). Only
    /// returns when nothing was replaced, or the new binary could not be started.
    /// `installer` brings the new version's package in, as any agent's.
    pub async fn apply(&mut self, installer: &Installer, d: &DesiredAgent, agent_dir: &Path, version_dir: &Path) -> Result<(), String> {
        if d.cmd != "start" {
            return Err(format!("agent {SELF_AGENT}: cmd {:?} refused: the updater does not stop itself", d.cmd));
        }
        let current = self_version(agent_dir);
        if current == d.version {
            return Ok(());
        }
        let Some(exe) = self.settings.exe.clone() else {
            return Err(format!("agent {SELF_AGENT} {}: cannot tell this binary's path; not replaced", d.version));
        };
        installer.ensure_installed(d, agent_dir, version_dir).await?;
        let new_bin = version_dir.join(entry_of(SELF_AGENT));
        if let Err(why) = self.check_binary(&new_bin).await {
            let reason = format!("its check failed: {why}");
            tracing::error!(from = %current, to = %d.version, %reason, "self-update refused: the old binary stays");
            self.journal
                .reverted
                .insert(SELF_AGENT.to_owned(), Reverted { version: d.version.clone(), digest: digest(d), reason: reason.clone() });
            self.journal.save();
            return Err(format!("reverted: {SELF_AGENT} {}: {reason}; still on {current}", d.version));
        }
        let mut pending = Pending {
            from: current.clone(),
            to: d.version.clone(),
            digest: digest(d),
            exe: exe.clone(),
            agent_dir: agent_dir.to_path_buf(),
            swapped: false,
            deadline: unix_now() + self.settings.bound.as_secs().max(1),
            args: self.settings.args.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        };
        self.journal.self_update = Some(pending.clone());
        self.journal.save();
        let fail = |what: &str, e: std::io::Error| format!("self-update to {}: {what}: {e}", d.version);
        if let Err(e) = copy_atomically(&exe, &beside(&exe, ".old")) {
            self.journal.self_update = None;
            self.journal.save();
            return Err(fail("keeping the old binary", e));
        }
        pending.swapped = true;
        self.journal.self_update = Some(pending.clone());
        self.journal.save();
        let swapped = copy_atomically(&new_bin, &exe).and_then(|()| write_version(agent_dir, &d.version));
        if let Err(e) = swapped {
            self.put_back(&pending, None);
            return Err(fail("replacing the binary", e));
        }
        for removed in prune_versions(agent_dir, &[d.version.as_str(), current.as_str()]) {
            tracing::info!(agent = SELF_AGENT, version = %removed, "removed an old version");
        }
        tracing::info!(from = %current, to = %d.version, exe = %exe.display(), "self-update: binary replaced, re-executing");
        let e = self.exec();
        self.put_back(&pending, None);
        Err(fail("starting the new binary", e))
    }

    /// Runs `bin --self-check` with this process's flags: Ok when it completed a heartbeat
    /// within the bound.
    async fn check_binary(&self, bin: &Path) -> Result<(), String> {
        let bound = self.settings.bound;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(&self.settings.args)
            .arg("--self-check")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        match tokio::time::timeout(bound, cmd.output()).await {
            Err(_) => Err(format!("no heartbeat within {} s", bound.as_secs())),
            Ok(Err(e)) => Err(format!("cannot run it: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                let last: String = last.chars().take(200).collect();
                Err(format!("{}{}", out.status, if last.is_empty() { String::new() } else { format!(": {last}") }))
            }
        }
    }

    /// Execs this process's binary again with its arguments; returns only on failure.
    fn exec(&self) -> std::io::Error {
        let Some(exe) = &self.settings.exe else { return std::io::Error::other("no binary path") };
        exec_with(exe, &self.settings.args)
    }

    /// Execs the old binary put back by [`put_back`](Self::put_back), where it was and with
    /// the arguments it ran with before the swap.
    fn exec_old(&self, p: &Pending) -> std::io::Error {
        if p.args.is_empty() { exec_with(&p.exe, &self.settings.args) } else { exec_with(&p.exe, &p.args) }
    }

    /// Puts the old binary and `.version` back after a swap; with `reason`, the new version is
    /// remembered as reverted (not tried again until its version or digest changes).
    fn put_back(&mut self, p: &Pending, reason: Option<String>) {
        if p.swapped {
            let old = beside(&p.exe, ".old");
            if let Err(e) = copy_atomically(&old, &p.exe) {
                tracing::error!(old = %old.display(), error = %e, "cannot put the old binary back");
            }
            if let Err(e) = write_version(&p.agent_dir, &p.from) {
                tracing::error!(error = %e, "cannot put .version back");
            }
        }
        if let Some(reason) = reason {
            tracing::error!(from = %p.from, to = %p.to, %reason, "self-update reverted: the old binary is back");
            self.journal.reverted.insert(SELF_AGENT.to_owned(), Reverted { version: p.to.clone(), digest: p.digest.clone(), reason });
        }
        self.journal.self_update = None;
        self.journal.save();
    }

    /// After a cycle: a heartbeat answered confirms a self-update on probation; none answered
    /// past its deadline sends the updater back to its old binary (re-exec).
    pub fn probation(&mut self, answered: bool) {
        let Some(p) = self.journal.self_update.clone().filter(|p| p.swapped) else { return };
        if answered {
            tracing::info!(from = %p.from, to = %p.to, "self-update confirmed: the new binary completed a heartbeat");
            self.journal.self_update = None;
            self.journal.save();
        } else if unix_now() >= p.deadline {
            let reason = "the new binary completed no heartbeat by its deadline".to_owned();
            self.put_back(&p, Some(reason));
            let e = self.exec_old(&p);
            tracing::error!(error = %e, "cannot start the old binary again; going on with this one");
        }
    }

    /// At a start that is not the re-exec of a self-update: one left unconfirmed means the new
    /// binary died on probation (or the updater was killed mid-swap). The old binary is put
    /// back; returns true when it was (the caller then runs it: [`SelfUpdate::restart`]).
    pub fn guard_self_update(&mut self) -> bool {
        let Some(p) = self.journal.self_update.clone() else { return false };
        if !p.swapped {
            tracing::warn!(to = %p.to, "a self-update was interrupted before the swap; it starts over");
            self.journal.self_update = None;
            self.journal.save();
            return false;
        }
        let ran = read_version(&p.agent_dir) == p.to;
        let reason = ran.then(|| format!("the new binary stopped before completing a heartbeat (restarted on probation, {})", p.to));
        self.put_back(&p, reason);
        *self.restored = Some(p);
        true
    }

    /// Execs the binary in place (after [`guard_self_update`](Self::guard_self_update) put the
    /// old one back, with the arguments it ran with); returns only on failure.
    pub fn restart(&self) -> std::io::Error {
        match &*self.restored {
            Some(p) => self.exec_old(p),
            None => self.exec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_whole_and_beside() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        copy_atomically(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!beside(&b, ".new").exists());
        assert_eq!(beside(Path::new("/usr/bin/ops-updater"), ".old"), Path::new("/usr/bin/ops-updater.old"));
        assert_eq!(self_version(dir.path()), BUILT_IN_VERSION);
        assert_eq!((entry_of(SELF_AGENT), entry_of("falcon-agent")), ("ops-updater", "control"));
    }
}
