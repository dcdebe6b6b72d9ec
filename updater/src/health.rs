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
use serde::{Deserialize, Serialize};

use crate::control;
use crate::cycle::{Updater, read_version, write_version};

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

impl Updater {
    /// Starts watching a switch from `previous` to `d.version` (kept before `.version` moves).
    pub(crate) fn begin_watch(&mut self, d: &DesiredAgent, previous: &str) -> Watch {
        let w = Watch {
            version: d.version.clone(),
            previous: previous.to_owned(),
            digest: digest(d),
            until: unix_now() + self.settings.health_window.as_secs().max(1),
            reverting: false,
            reason: String::new(),
        };
        self.watch.insert(d.name.clone(), w.clone());
        self.save_kept();
        w
    }

    /// Watches `w.version` until its window ends: Ok when it was `started` and stayed so,
    /// else the revert's error.
    pub(crate) async fn watch_health(&mut self, d: &DesiredAgent, agent_dir: &Path, w: Watch) -> Result<(), String> {
        let dir = agent_dir.join(&w.version);
        let tick = (self.settings.health_window / 10).clamp(Duration::from_millis(200), Duration::from_secs(3));
        let mut seen_started = false;
        let last = loop {
            let status = control::run(&dir, "status", &d.run_user, self.settings.control_timeout)
                .await
                .unwrap_or_else(|e| format!("status failed: {e}"));
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
            let reason =
                format!("not started within the {} s health window (status {:?})", self.settings.health_window.as_secs(), last.trim());
            return self.revert(d, agent_dir, w, reason).await;
        }
        tracing::info!(agent = %d.name, version = %w.version, "healthy through its window");
        self.watch.remove(&d.name);
        self.save_kept();
        Ok(())
    }

    /// Stops `w.version`, puts `.version` back on `w.previous`, starts it and remembers the
    /// revert. Always an error: `reverted: ...` with what was seen.
    pub(crate) async fn revert(&mut self, d: &DesiredAgent, agent_dir: &Path, mut w: Watch, reason: String) -> Result<(), String> {
        tracing::error!(agent = %d.name, version = %w.version, back_to = %w.previous, %reason, "reverting");
        w.reverting = true;
        w.reason = reason.clone();
        self.watch.insert(d.name.clone(), w.clone());
        self.save_kept();
        let timeout = self.settings.control_timeout;
        let stopped = control::run(&agent_dir.join(&w.version), "stop", &d.run_user, timeout).await;
        if let Err(e) = &stopped {
            tracing::warn!(agent = %d.name, version = %w.version, error = %e, "stop of the reverted version failed");
        }
        write_version(agent_dir, &w.previous).map_err(|e| format!("reverting: writing {}/.version: {e}", agent_dir.display()))?;
        let started = control::run(&agent_dir.join(&w.previous), "start", &d.run_user, timeout).await;
        self.watch.remove(&d.name);
        self.reverted.insert(d.name.clone(), Reverted { version: w.version.clone(), digest: w.digest.clone(), reason: reason.clone() });
        self.save_kept();
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
    pub(crate) async fn resume_watch(&mut self, d: &DesiredAgent, agent_dir: &Path) -> Result<(), String> {
        let Some(w) = self.watch.get(&d.name).cloned() else { return Ok(()) };
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
        self.watch.remove(&d.name);
        self.save_kept();
        Ok(())
    }
}
