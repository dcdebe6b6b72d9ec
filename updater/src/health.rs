//! The watched switch: after `./control start` of a new version, `./control status` is watched
//! for the health window; a version that is not `started` by then, or stops during it, is
//! stopped, `.version` goes back to the version it replaced, and that one is started again.
//!
//! Both the watch and the revert are written to `state.json` before they act, so an updater
//! killed in the middle finishes them at its next run: it never leaves two versions running or
//! `.version` naming one that is not the one running. A reverted version is remembered and not
//! tried again until the desired version or its digest changes, so a bad build does not flap a
//! host every cycle.

use ops_config::clock::unix_now;
use std::path::Path;
use std::time::Duration;

use ops_config::DesiredAgent;

use crate::control;
use crate::install::{read_version, write_version};
use crate::journal::Journal;
pub use crate::journal::{Reverted, Watch};

/// What identifies a build: its sha256, else its hex md5, else nothing more than its version
/// (an md5 in URL form names where a digest is, which differs from relay to relay).
pub fn digest(d: &DesiredAgent) -> String {
    if !d.sha256.is_empty() {
        d.sha256.clone()
    } else if crate::fetch::is_hex(&d.md5, 32) {
        d.md5.clone()
    } else {
        String::new()
    }
}

/// A switch's watch and revert: the journal they keep their steps in, the health window and
/// the bound of a `./control` call.
pub struct Switch<'a> {
    pub journal: &'a mut Journal,
    pub window: Duration,
    pub control_timeout: Duration,
}

impl Switch<'_> {
    /// Starts watching a switch from `previous` to `d.version` (kept before `.version` moves).
    pub fn begin_watch(&mut self, d: &DesiredAgent, previous: &str) -> Watch {
        let w = Watch {
            version: d.version.clone(),
            previous: previous.to_owned(),
            digest: digest(d),
            until: unix_now() + self.window.as_secs().max(1),
            reverting: false,
            reason: String::new(),
        };
        self.journal.watch.insert(d.name.clone(), w.clone());
        self.journal.save();
        w
    }

    /// Watches `w.version` until its window ends: Ok when it was `started` and stayed so,
    /// else the revert's error.
    pub async fn watch_health(&mut self, d: &DesiredAgent, agent_dir: &Path, w: Watch) -> Result<(), String> {
        let dir = agent_dir.join(&w.version);
        let tick = (self.window / 10).clamp(Duration::from_millis(200), Duration::from_secs(3));
        let mut seen_started = false;
        let last = loop {
            let status =
                control::run(&dir, "status", &d.run_user, self.control_timeout).await.unwrap_or_else(|e| format!("status failed: {e}"));
            let started = ops_config::rollout::is_started(&status);
            if started {
                seen_started = true;
            } else if seen_started {
                let reason = format!("stopped during the health window (status {:?})", status.trim());
                return self.revert(d, agent_dir, w, reason).await;
            }
            if unix_now() >= w.until {
                break status;
            }
            tokio::time::sleep(tick).await;
        };
        if !seen_started {
            let reason = format!("not started within the {} s health window (status {:?})", self.window.as_secs(), last.trim());
            return self.revert(d, agent_dir, w, reason).await;
        }
        tracing::info!(agent = %d.name, version = %w.version, "healthy through its window");
        self.journal.watch.remove(&d.name);
        self.journal.save();
        Ok(())
    }

    /// Stops `w.version`, puts `.version` back on `w.previous`, starts it and remembers the
    /// revert. Always an error: `reverted: ...` with what was seen.
    pub async fn revert(&mut self, d: &DesiredAgent, agent_dir: &Path, mut w: Watch, reason: String) -> Result<(), String> {
        tracing::error!(agent = %d.name, version = %w.version, back_to = %w.previous, %reason, "reverting");
        w.reverting = true;
        w.reason = reason.clone();
        self.journal.watch.insert(d.name.clone(), w.clone());
        self.journal.save();
        let timeout = self.control_timeout;
        let stopped = control::run(&agent_dir.join(&w.version), "stop", &d.run_user, timeout).await;
        if let Err(e) = &stopped {
            tracing::warn!(agent = %d.name, version = %w.version, error = %e, "stop of the reverted version failed");
        }
        write_version(agent_dir, &w.previous).map_err(|e| format!("reverting: writing {}/.version: {e}", agent_dir.display()))?;
        let started = control::run(&agent_dir.join(&w.previous), "start", &d.run_user, timeout).await;
        self.journal.watch.remove(&d.name);
        self.journal
            .reverted
            .insert(d.name.clone(), Reverted { version: w.version.clone(), digest: w.digest.clone(), reason: reason.clone() });
        self.journal.save();
        let mut restart = match started {
            Ok(_) => String::new(),
            Err(e) => format!(" (its start failed: {e})"),
        };
        if let Err(e) = stopped {
            restart.push_str(&format!(" (the stop of {} failed: {e})", w.version));
        }
        Err(format!("reverted: {} {}: {reason}; back on {}{restart}", d.name, w.version, w.previous))
    }

    /// Finishes a switch that a killed updater left in its health window or in its revert.
    pub async fn resume_watch(&mut self, d: &DesiredAgent, agent_dir: &Path) -> Result<(), String> {
        let Some(w) = self.journal.watch.get(&d.name).cloned() else { return Ok(()) };
        let current = read_version(agent_dir);
        if w.reverting {
            tracing::warn!(agent = %d.name, version = %w.version, "finishing a revert that was interrupted");
            let reason = w.reason.clone();
            return self.revert(d, agent_dir, w, reason).await;
        }
        if current == w.version {
            tracing::warn!(agent = %d.name, version = %w.version, "resuming the health window of an interrupted switch");
            return self.watch_health(d, agent_dir, w).await;
        }
        // Killed before `.version` moved: nothing was started, the switch starts over.
        self.journal.watch.remove(&d.name);
        self.journal.save();
        Ok(())
    }
}
