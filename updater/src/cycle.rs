//! One cycle of the updater: read the real state from disk and `./control status`, send the
//! heartbeat, apply the reply.
//!
//! The pieces a cycle drives are beside it: `send` (servers and the host credential),
//! `signed` (the signed config desired states are checked against), `install` (a version
//! made whole before it is named; DESIGN.md's install rules, seed 003 made safe), `health`
//! (the watched switch), `selfupdate` and `journal` (what survives a restart).

use ops_config::clock::unix_now;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ops_config::trust::TrustedKeys;
use ops_config::wire::{valid_agent_name, valid_version};
use ops_config::{DesiredAgent, Heartbeat, RealAgent};

use crate::control;
use crate::fetch::{self, Fetcher};
use crate::health::Switch;
use crate::install::{Installer, checked_dirs, prune_versions, read_version, write_version};
use crate::journal::Journal;
use crate::pin::{Pinned, Pins, under_pin};
use crate::selfupdate::SelfUpdate;
use crate::send::Transport;
use crate::signed::Signed;
use crate::unpack;

/// What a cycle needs to know.
#[derive(Debug, Clone)]
pub struct CycleSettings {
    pub servers: Vec<String>,
    pub hostname: String,
    pub ip: String,
    pub control_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// Where the last desired list and errors are kept across restarts (None: memory only).
    pub state_dir: Option<PathBuf>,
    /// The operators' public keys. When set, only what the signed config allows this host
    /// is installed (`ops_config::trust::allows`), whatever the server answers.
    pub trusted_keys: TrustedKeys,
    /// CA certificates trusted for `https://` servers besides the system's (`--ca-file`).
    pub roots: Vec<reqwest::Certificate>,
    /// How long a newly started version is watched before it counts as healthy (zero: not
    /// watched); see `health`.
    pub health_window: Duration,
    /// The operator's local pins (`pin.toml`), read at every cycle; None: no pins.
    pub pin_file: Option<PathBuf>,
    /// How this process replaces itself (the desired agent `ops-updater`).
    pub self_update: crate::selfupdate::SelfSettings,
    /// What one tarball may unpack to (`--max-unpack-*`).
    pub unpack: unpack::Limits,
    /// The most bytes read of a heartbeat reply or of `/config/desired` (`--max-response-bytes`).
    pub max_response_bytes: usize,
    /// The enrollment secret (`--enroll-secret-file`): with it the updater enrolls once for
    /// its host credential (kept in `state_dir/host-credential`, 0600) and sends it with
    /// every heartbeat.
    pub enroll_secret: Option<String>,
}

/// The updater's state between cycles: what the journal keeps (the last desired list, which
/// agents to report, and the last error per agent), the signed config, the pins. Real state
/// is never remembered: it is read again every cycle.
pub struct Updater {
    pub settings: CycleSettings,
    transport: Transport,
    signed: Signed,
    installer: Installer,
    journal: Journal,
    /// The pins as last read, or why the pin file could not be read (then every agent is held).
    pins: Result<Pins, String>,
    /// A self-update the guard undid at this start (its old arguments are run again).
    restored: Option<crate::selfupdate::Pending>,
}

/// What one cycle saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// A server answered.
    pub answered: bool,
    /// Every desired agent is at its version and run state, with no error.
    pub converged: bool,
    pub errors: Vec<String>,
}

fn sudo_available() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("sudo").is_file()))
}

impl Updater {
    pub fn new(settings: CycleSettings, fetcher: Fetcher) -> Self {
        let builder = reqwest::Client::builder().no_proxy().timeout(settings.heartbeat_timeout);
        let client = crate::with_roots(builder, &settings.roots).build().expect("http client");
        let dir = settings.state_dir.clone();
        let transport = Transport::new(
            client,
            settings.servers.clone(),
            &settings.hostname,
            dir.clone(),
            settings.enroll_secret.clone(),
            settings.max_response_bytes,
        );
        Updater {
            signed: Signed::load(settings.trusted_keys.clone(), &settings.hostname, dir.as_deref()),
            journal: Journal::load(dir.as_deref()),
            installer: Installer { fetcher, arch: fetch::arch(), limits: settings.unpack },
            transport,
            settings,
            pins: Ok(Pins::default()),
            restored: None,
        }
    }

    /// The watched switch of an agent, kept in the journal.
    fn switch(&mut self) -> Switch<'_> {
        Switch { journal: &mut self.journal, window: self.settings.health_window, control_timeout: self.settings.control_timeout }
    }

    /// The self-update's steps, kept in the journal.
    fn self_update(&mut self) -> SelfUpdate<'_> {
        SelfUpdate { journal: &mut self.journal, settings: &self.settings.self_update, restored: &mut self.restored }
    }

    /// Whether a self-update waits for its first answered heartbeat.
    pub fn on_probation(&self) -> bool {
        crate::selfupdate::on_probation(&self.journal)
    }

    /// See [`SelfUpdate::guard_self_update`].
    pub fn guard_self_update(&mut self) -> bool {
        self.self_update().guard_self_update()
    }

    /// See [`SelfUpdate::restart`].
    pub fn restart(&mut self) -> std::io::Error {
        self.self_update().restart()
    }

    /// Reads the pin file again (an operator's edit takes effect at the next cycle).
    fn load_pins(&mut self) {
        let Some(path) = &self.settings.pin_file else { return };
        let pins = Pins::load(path);
        match (&pins, &self.pins) {
            (Err(e), _) => tracing::error!(error = %e, "pin file unreadable: every agent is held until it is fixed"),
            (Ok(new), Ok(old)) if new != old => tracing::info!(pins = ?new.0, "local pins"),
            _ => {}
        }
        self.pins = pins;
    }

    /// An agent's pin as reported (empty: none).
    fn pin_of(&self, agent: &str) -> &str {
        self.pins.as_ref().ok().and_then(|p| p.get(agent)).unwrap_or("")
    }

    /// What the pins make of the desired state `d`.
    fn pinned(&self, d: &DesiredAgent) -> Result<Pinned, String> {
        match &self.pins {
            Ok(pins) => Ok(under_pin(d, pins.get(&d.name))),
            Err(e) => Err(format!("{e}; agent {} held, nothing changed until it is fixed", d.name)),
        }
    }

    /// The real state of the agents last desired, read from disk and `./control status`.
    pub async fn real_state(&self) -> Vec<RealAgent<'static>> {
        let mut out = Vec::new();
        for d in &self.journal.desired {
            let Ok((agent_dir, _)) = checked_dirs(d) else { continue };
            let is_self = d.name == crate::selfupdate::SELF_AGENT;
            let version = if is_self { crate::selfupdate::self_version(&agent_dir) } else { read_version(&agent_dir) };
            let dir = agent_dir.join(&version);
            // The updater runs: it is the one reporting.
            let status = if is_self {
                "started".to_owned()
            } else if !version.is_empty() && dir.join("control").is_file() {
                match control::run(&dir, "status", &d.run_user, self.settings.control_timeout).await {
                    Ok(s) => s.chars().take(ops_config::wire::MAX_STATUS).collect(),
                    Err(e) => {
                        tracing::warn!(agent = %d.name, error = %e, "control status failed");
                        String::new()
                    }
                }
            } else {
                String::new()
            };
            let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
            out.push(RealAgent {
                name: d.name.clone().into(),
                version: version.into(),
                status: status.into(),
                timestamp: now,
                run_user: d.run_user.clone().into(),
                work_dir: d.work_dir.clone().into(),
                last_error: self.error_text(&d.name).into(),
                pinned: self.pin_of(&d.name).to_owned().into(),
            });
        }
        // An agent whose desired state was refused before anything of it was installed is
        // still reported, so the operator sees why.
        let mut refused: Vec<&String> =
            self.journal.errors.keys().filter(|n| valid_agent_name(n) && !self.journal.desired.iter().any(|d| &d.name == *n)).collect();
        refused.sort();
        for name in refused.into_iter().take(ops_config::wire::MAX_AGENTS_PER_HOST.saturating_sub(out.len())) {
            out.push(RealAgent {
                name: name.clone().into(),
                version: "".into(),
                status: "".into(),
                timestamp: 0,
                run_user: "".into(),
                work_dir: "".into(),
                last_error: self.error_text(name).into(),
                pinned: "".into(),
            });
        }
        out
    }

    fn error_text(&self, name: &str) -> String {
        self.journal.errors.get(name).map(|e| e.chars().take(ops_config::wire::MAX_LAST_ERROR).collect()).unwrap_or_default()
    }

    async fn heartbeat(&self) -> Heartbeat<'static> {
        Heartbeat {
            hostname: self.settings.hostname.clone().into(),
            ip: self.settings.ip.clone().into(),
            run_user: control::current_user().into(),
            updater_version: crate::selfupdate::BUILT_IN_VERSION.into(),
            real_agents: self.real_state().await,
        }
    }

    /// Sends the state as it is now, without applying the reply (the last step of `--once`,
    /// so the meta node sees what the cycle achieved, errors included, at once).
    pub async fn report(&self) -> Result<(), String> {
        let hb = self.heartbeat().await;
        self.transport.send(&hb).await.map(drop)
    }

    /// One cycle. Never panics on what the server or the disk says.
    pub async fn cycle(&mut self) -> Outcome {
        self.load_pins();
        let hb = self.heartbeat().await;
        let sent = self.transport.send(&hb).await;
        self.self_update().probation(sent.is_ok());
        let (reply, server) = match sent {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "no server answered the heartbeat");
                return Outcome { answered: false, converged: false, errors: vec![e] };
            }
        };
        if !reply.error_message.is_empty() {
            tracing::error!(error = %reply.error_message, "server refused the heartbeat");
            return Outcome { answered: true, converged: false, errors: vec![reply.error_message] };
        }
        let mut errors = Vec::new();
        let mut refused = HashMap::new();
        if self.signed.checks() {
            let server = &self.transport.servers[server];
            let fetched = self.signed.refresh(&self.transport.client, server, &reply.config_hash, self.settings.max_response_bytes).await;
            if let Err(e) = &fetched {
                tracing::error!(error = %e, "cannot verify the signed config");
            }
            for d in &reply.desired_agents {
                if let Err(e) = self.signed.check(d) {
                    let e = match &fetched {
                        Err(why) => format!("{e} ({why})"),
                        Ok(()) => e,
                    };
                    refused.insert(d.name.clone(), e);
                }
            }
        }
        // A refused state is not taken: the agent stays as last verified (and reported).
        let previous = std::mem::take(&mut self.journal.desired);
        self.journal.desired = reply
            .desired_agents
            .into_iter()
            .filter_map(|d| if refused.contains_key(&d.name) { previous.iter().find(|p| p.name == d.name).cloned() } else { Some(d) })
            .collect();
        for (name, e) in &refused {
            tracing::error!(agent = %name, error = %e, "desired state refused: not in the signed config");
            errors.push(e.clone());
            self.journal.errors.insert(name.clone(), e.clone());
        }
        // A refused agent is left as it is this cycle: nothing downloaded, switched or started.
        for d in self.journal.desired.clone() {
            if refused.contains_key(&d.name) {
                continue;
            }
            let applied = match self.pinned(&d) {
                Err(e) => Err(e),
                Ok(Pinned::Follow) => self.apply(&d).await,
                Ok(Pinned::Hold) => self.hold(&d).await,
                Ok(Pinned::Version(p)) => self.apply_pinned_version(*p).await,
            };
            match applied {
                Ok(()) => {
                    self.journal.errors.remove(&d.name);
                }
                Err(e) => {
                    tracing::error!(agent = %d.name, version = %d.version, error = %e, "agent not converged");
                    errors.push(e.clone());
                    self.journal.errors.insert(d.name.clone(), e);
                }
            }
        }
        self.journal.save();
        let converged = errors.is_empty() && self.check_converged().await;
        Outcome { answered: true, converged, errors }
    }

    /// Reads the state again and compares it with the desired one.
    async fn check_converged(&self) -> bool {
        let real = self.real_state().await;
        self.journal.desired.iter().all(|d| {
            let pinned = match self.pinned(d) {
                Ok(Pinned::Hold) => return true,
                Ok(Pinned::Version(p)) => Some(*p),
                _ => None,
            };
            let d = pinned.as_ref().unwrap_or(d);
            real.iter()
                .any(|r| r.name == d.name && r.version == d.version && r.is_started() == (d.cmd == "start") && r.last_error.is_empty())
        })
    }

    /// `hold`: the agent is left as it is; only a switch a killed updater left half done is
    /// finished, so exactly one version runs.
    async fn hold(&mut self, d: &DesiredAgent) -> Result<(), String> {
        let (agent_dir, _) = checked_dirs(d)?;
        if agent_dir.is_dir() {
            self.switch().resume_watch(d, &agent_dir).await?;
        }
        Ok(())
    }

    /// Brings the agent to the version it is pinned at. Installed already, it is switched to as
    /// is (it was verified when installed). Otherwise it is fetched with the digest beside its
    /// tarball; with trusted keys, only when the signed config gives a sha256 for that version
    /// on this host.
    async fn apply_pinned_version(&mut self, mut p: DesiredAgent) -> Result<(), String> {
        let (_, version_dir) = checked_dirs(&p)?;
        if self.signed.checks() && !version_dir.join("control").is_file() {
            match self.signed.sha256_of(&p.name, &p.version) {
                Some(sha256) => p.sha256 = sha256,
                None => {
                    return Err(format!(
                        "refused: agent {} pinned at {}, which is not installed here and has no sha256 in the signed config for this host",
                        p.name, p.version
                    ));
                }
            }
        }
        self.apply(&p).await
    }

    /// Brings one agent to its desired version and run state.
    pub async fn apply(&mut self, d: &DesiredAgent) -> Result<(), String> {
        let (agent_dir, version_dir) = checked_dirs(d)?;
        if !d.run_user.is_empty() && d.run_user != control::current_user() && !sudo_available() {
            return Err(format!("agent {}: runs as {:?} but sudo is not installed", d.name, d.run_user));
        }
        std::fs::create_dir_all(&agent_dir).map_err(|e| format!("cannot create {}: {e}", agent_dir.display()))?;
        // A switch a killed updater left in its health window or revert is finished first.
        self.switch().resume_watch(d, &agent_dir).await?;
        // A version reverted here is not tried again until the desired version or digest
        // changes; the version running is kept in its run state meanwhile.
        match self.journal.reverted.get(&d.name) {
            Some(r) if r.version == d.version && r.digest == crate::health::digest(d) => {
                let error = format!(
                    "reverted: {} {} ({}); not retried until the desired version or its digest changes",
                    d.name, r.version, r.reason
                );
                let current = read_version(&agent_dir);
                let dir = agent_dir.join(&current);
                if !current.is_empty() && valid_version(&current) && dir.join("control").is_file() {
                    self.keep_run_state(d, &dir).await?;
                }
                return Err(error);
            }
            Some(_) => {
                self.journal.reverted.remove(&d.name);
                self.journal.save();
            }
            None => {}
        }
        if d.name == crate::selfupdate::SELF_AGENT {
            let (installer, mut update) = (
                &self.installer,
                SelfUpdate { journal: &mut self.journal, settings: &self.settings.self_update, restored: &mut self.restored },
            );
            return update.apply(installer, d, &agent_dir, &version_dir).await;
        }
        self.installer.ensure_installed(d, &agent_dir, &version_dir).await?;
        let timeout = self.settings.control_timeout;
        let current = read_version(&agent_dir);
        if current != d.version {
            let old = agent_dir.join(&current);
            let has_previous = !current.is_empty() && valid_version(&current) && old.join("control").is_file();
            if has_previous {
                control::run(&old, "stop", &d.run_user, timeout).await.map_err(|e| format!("stopping {} {current}: {e}", d.name))?;
            }
            // Watched when there is a version to go back to.
            let watch = (d.cmd == "start" && has_previous && !self.settings.health_window.is_zero())
                .then(|| self.switch().begin_watch(d, &current));
            write_version(&agent_dir, &d.version).map_err(|e| format!("writing {}/.version: {e}", agent_dir.display()))?;
            tracing::info!(agent = %d.name, from = %current, to = %d.version, "switched version");
            if d.cmd == "start" {
                let started = control::run(&version_dir, "start", &d.run_user, timeout).await;
                match (started, watch) {
                    (Ok(_), Some(w)) => self.switch().watch_health(d, &agent_dir, w).await?,
                    (Ok(_), None) => {}
                    (Err(e), Some(w)) => self.switch().revert(d, &agent_dir, w, format!("start failed: {e}")).await?,
                    (Err(e), None) => return Err(e.to_string()),
                }
            }
            // Bounded disk: the running version and the one it replaced stay, older ones go.
            let keep = [d.version.as_str(), current.as_str()];
            for removed in prune_versions(&agent_dir, &keep) {
                tracing::info!(agent = %d.name, version = %removed, "removed an old version");
            }
            return Ok(());
        }
        self.keep_run_state(d, &version_dir).await
    }

    /// Applies `cmd` to the version in `dir`: start only if not started, stop only if started.
    async fn keep_run_state(&self, d: &DesiredAgent, dir: &Path) -> Result<(), String> {
        let timeout = self.settings.control_timeout;
        let status = control::run(dir, "status", &d.run_user, timeout).await.map_err(|e| e.to_string())?;
        let started = status.contains("started");
        match (d.cmd.as_str(), started) {
            ("start", false) => control::run(dir, "start", &d.run_user, timeout).await.map(drop).map_err(|e| e.to_string()),
            ("stop", true) => control::run(dir, "stop", &d.run_user, timeout).await.map(drop).map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_desired as desired;

    fn updater() -> Updater {
        let settings = CycleSettings {
            servers: vec!["127.0.0.1:9".into()],
            hostname: "h".into(),
            ip: String::new(),
            control_timeout: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(1),
            state_dir: None,
            trusted_keys: TrustedKeys::default(),
            roots: Vec::new(),
            health_window: Duration::ZERO,
            pin_file: None,
            self_update: Default::default(),
            unpack: Default::default(),
            max_response_bytes: crate::DEFAULT_MAX_RESPONSE_BYTES,
            enroll_secret: None,
        };
        Updater::new(settings, Fetcher::new(Duration::from_secs(1), Duration::from_secs(2), 1 << 20, &[]))
    }

    #[tokio::test]
    async fn hostile_desired_states_are_refused_and_write_nothing() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let w = work.display().to_string();
        let mut u = updater();
        for (what, d) in [
            ("name ../../etc", desired("../../etc", "1.0", &w)),
            ("name with /", desired("a/b", "1.0", &w)),
            ("name ..", desired("..", "1.0", &w)),
            ("version ../../etc", desired("agent", "../../etc", &w)),
            ("version ..", desired("agent", "..", &w)),
            ("relative work dir", desired("agent", "1.0", "relative/dir")),
            ("work dir with ..", desired("agent", "1.0", &format!("{w}/../escape"))),
        ] {
            let e = u.apply(&d).await.unwrap_err();
            assert!(e.contains("refused"), "{what}: {e}");
        }
        let mut bad_cmd = desired("agent", "1.0", &w);
        bad_cmd.cmd = "rm -rf /".into();
        assert!(u.apply(&bad_cmd).await.unwrap_err().contains("refused cmd"));
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "nothing written in the work dir");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1, "nothing written beside it");
    }

    #[tokio::test]
    async fn unreachable_servers_are_an_outcome_not_a_panic() {
        let mut u = updater();
        let out = u.cycle().await;
        assert!(!out.answered && !out.converged);
        assert!(out.errors[0].contains("127.0.0.1:9"), "{:?}", out.errors);
    }
}
