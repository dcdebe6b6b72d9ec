//! One cycle of the updater: read the real state from disk and `./control status`, send the
//! heartbeat, apply the reply.
//!
//! Install rules (DESIGN.md, seed 003 made safe): `{workDir}/{name}/{version}/` is created only
//! by renaming a fully extracted and verified temporary sibling into place, so its existence
//! means it is complete; `.version` is switched by an atomic rename and only ever names such a
//! directory; leftovers of a killed run (`.tmp-*`, `.download-*`) are removed and redone.

use ops_config::clock::unix_now;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use ops_config::trust::{Floor, SIGNATURE_HEADER, TrustedKeys};
use ops_config::wire::{valid_agent_name, valid_version};
use ops_config::{DesiredAgent, DesiredConfig, Heartbeat, HeartbeatReply, RealAgent};

use crate::control;
use crate::fetch::{self, Fetcher};
use crate::pin::{Pinned, Pins, under_pin};
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

/// What is kept across restarts: which agents to report at the first heartbeat, and their
/// last errors. Never the real state, which is read again every cycle.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Kept {
    desired: Vec<DesiredAgent>,
    errors: HashMap<String, String>,
    /// Switches in their health window or revert, per agent.
    #[serde(default)]
    watch: HashMap<String, crate::health::Watch>,
    /// Versions reverted, per agent.
    #[serde(default)]
    reverted: HashMap<String, crate::health::Reverted>,
    /// A self-update between its check and its confirmation.
    #[serde(default)]
    self_update: Option<crate::selfupdate::Pending>,
}

const STATE_FILE: &str = "state.json";
/// Why no server answered a heartbeat: its credential refused (enroll again), or anything else.
enum Refusal {
    Credential(String),
    Other(String),
}

impl Refusal {
    fn into_text(self) -> String {
        match self {
            Refusal::Credential(e) | Refusal::Other(e) => e,
        }
    }
}

/// The host credential (`ops_config::enroll`), readable by the updater's user only.
const CREDENTIAL_FILE: &str = "host-credential";
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

/// `http://host:port` (or the scheme given) of a `--server` entry.
fn base_url(server: &str) -> String {
    if server.starts_with("http://") || server.starts_with("https://") {
        server.trim_end_matches('/').to_owned()
    } else {
        format!("http://{server}")
    }
}

/// The updater's state between cycles: the last desired list (which agents to report) and the
/// last error per agent. Real state is never remembered: it is read again every cycle.
pub struct Updater {
    pub settings: CycleSettings,
    fetcher: Fetcher,
    client: reqwest::Client,
    arch: String,
    known: Vec<DesiredAgent>,
    errors: HashMap<String, String>,
    /// The signed config last verified (only with trusted keys).
    signed: Option<DesiredConfig>,
    /// The highest signed version verified here (kept in `FLOOR_FILE`): nothing below it,
    /// and no other file at it, is taken again.
    floor: Option<Floor>,
    pub(crate) watch: HashMap<String, crate::health::Watch>,
    pub(crate) reverted: HashMap<String, crate::health::Reverted>,
    /// The pins as last read, or why the pin file could not be read (then every agent is held).
    pins: Result<Pins, String>,
    pub(crate) self_update: Option<crate::selfupdate::Pending>,
    /// A self-update the guard undid at this start (its old arguments are run again).
    pub(crate) restored: Option<crate::selfupdate::Pending>,
    /// This host's credential, once enrolled (kept in `CREDENTIAL_FILE`).
    credential: std::sync::Mutex<Option<String>>,
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

fn checked_dirs(d: &DesiredAgent) -> Result<(PathBuf, PathBuf), String> {
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

fn sudo_available() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("sudo").is_file()))
}

impl Updater {
    pub fn new(settings: CycleSettings, fetcher: Fetcher) -> Self {
        let builder = reqwest::Client::builder().no_proxy().timeout(settings.heartbeat_timeout);
        let client = crate::with_roots(builder, &settings.roots).build().expect("http client");
        let kept = settings.state_dir.as_deref().map(Self::load_kept).unwrap_or_default();
        let signed = match (&settings.state_dir, settings.trusted_keys.is_empty()) {
            (Some(dir), false) => match ops_config::trust::load_signed(&dir.join(SIGNED_FILE), &settings.trusted_keys) {
                Ok((config, _)) => Some(config),
                Err(e) => {
                    tracing::debug!(error = %e, "no signed config kept");
                    None
                }
            },
            _ => None,
        };
        let floor = settings.state_dir.as_deref().and_then(|dir| {
            let kept = std::fs::read_to_string(dir.join(FLOOR_FILE)).ok().and_then(|t| Floor::parse(&t));
            let held = signed.as_ref().and_then(Floor::of);
            match (kept, held) {
                (Some(k), h) => Some(k.max(h)),
                (None, h) => h,
            }
        });
        // A kept file below the floor (the floor is written first, so a crash between the two
        // leaves the older file) is not checked against: the next reply fetches the newer one.
        let signed = signed.filter(|c| floor.as_ref().is_none_or(|f| c.version().is_some_and(|v| v >= f.version)));
        let credential = settings
            .state_dir
            .as_deref()
            .and_then(|d| std::fs::read_to_string(d.join(CREDENTIAL_FILE)).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        Updater {
            credential: std::sync::Mutex::new(credential),
            settings,
            fetcher,
            client,
            arch: fetch::arch(),
            known: kept.desired,
            errors: kept.errors,
            signed,
            floor,
            watch: kept.watch,
            reverted: kept.reverted,
            pins: Ok(Pins::default()),
            self_update: kept.self_update,
            restored: None,
        }
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

    /// Makes `self.signed` the signed config of hash `hash` if it is not already: fetched from
    /// `server` (the one that answered), verified, then kept on disk. On failure the config
    /// held (if any) stays, and the error says why.
    async fn refresh_signed(&mut self, server: &str, hash: &str) -> Result<(), String> {
        if self.signed.as_ref().is_some_and(|c| c.hash() == hash) {
            return Ok(());
        }
        let url = format!("{}/config/desired", base_url(server));
        let r = self.client.get(&url).send().await.map_err(|e| format!("GET {url}: {}", crate::causes(&e)))?;
        if !r.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", r.status()));
        }
        let signature = r.headers().get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = crate::body_capped(r, self.settings.max_response_bytes).await.map_err(|e| format!("GET {url}: {e}"))?;
        let text = String::from_utf8(body).map_err(|_| format!("GET {url}: the config is not UTF-8"))?;
        let config = ops_config::trust::parse_signed(&text, signature.as_deref(), &self.settings.trusted_keys, &url)
            .map_err(|e| format!("signed config refused: {e}"))?;
        // Signed is not enough: an older signed file (a rollback by whoever answers), another
        // file at the same version, or an expired one is not taken.
        ops_config::trust::check_fresh(&config, self.floor.as_ref(), unix_now()).map_err(|e| {
            log_refusal(&e);
            format!("signed config refused: {e}")
        })?;
        let floor = Floor::of(&config).expect("check_fresh wants a version");
        if self.floor.as_ref() != Some(&floor) {
            if let Some(dir) = &self.settings.state_dir {
                // The floor first: once it is on disk, nothing older gets in, whatever happens
                // to the files below.
                if let Err(e) = keep_file(dir, FLOOR_FILE, floor.to_text().as_bytes()) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the signed version");
                }
            }
            self.floor = Some(floor);
        }
        if let (Some(dir), Some(sig)) = (&self.settings.state_dir, &signature) {
            let kept = ops_config::trust::write_signed(&dir.join(SIGNED_FILE), &text, Some(sig.as_str()), "");
            if let Err(e) = kept {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the signed config");
            }
        }
        tracing::info!(hash = config.hash(), version = config.version(), from = %url, "signed config verified");
        if config.hash() != hash {
            tracing::warn!(reply = hash, fetched = config.hash(), "the server's reply and its config differ (a reload in between?)");
        }
        self.signed = Some(config);
        Ok(())
    }

    /// With trusted keys: Ok when the signed config allows `d` for this host.
    fn check_signed(&self, d: &DesiredAgent) -> Result<(), String> {
        if self.settings.trusted_keys.is_empty() {
            return Ok(());
        }
        match &self.signed {
            // The config held may have expired since it was taken: nothing changes by it then
            // (what runs keeps running) until the operator signs a fresh one.
            Some(config) => match ops_config::trust::check_fresh(config, None, unix_now()) {
                Err(e) => Err(format!("refused: agent {} {}: {e}; nothing is changed until then", d.name, d.version)),
                Ok(()) => ops_config::trust::allows(config, &self.settings.hostname, d).map_err(|e| format!("refused: {e}")),
            },
            None => Err(format!("refused: agent {} {}: no verified signed config to check it against", d.name, d.version)),
        }
    }

    fn load_kept(dir: &Path) -> Kept {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "kept state unreadable, starting without it");
                Kept::default()
            }),
            Err(_) => Kept::default(),
        }
    }

    /// Keeps the desired list and errors for the next start (temporary file + rename).
    pub(crate) fn save_kept(&self) {
        let Some(dir) = &self.settings.state_dir else { return };
        let kept = Kept {
            desired: self.known.clone(),
            errors: self.errors.clone(),
            watch: self.watch.clone(),
            reverted: self.reverted.clone(),
            self_update: self.self_update.clone(),
        };
        if let Err(e) = keep_file(dir, STATE_FILE, &serde_json::to_vec(&kept).unwrap_or_default()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot keep state across restarts");
        }
    }

    /// The real state of the agents last desired, read from disk and `./control status`.
    pub async fn real_state(&self) -> Vec<RealAgent<'static>> {
        let mut out = Vec::new();
        for d in &self.known {
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
            self.errors.keys().filter(|n| valid_agent_name(n) && !self.known.iter().any(|d| &d.name == *n)).collect();
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
        self.errors.get(name).map(|e| e.chars().take(ops_config::wire::MAX_LAST_ERROR).collect()).unwrap_or_default()
    }

    /// Sends a heartbeat to the first server that answers (local relay first): its reply
    /// and which server it was.
    /// The host credential, enrolling for one first when there is none and an enrollment
    /// secret is given (each server in turn); None when not enrolled (logged).
    async fn credential(&self) -> Option<String> {
        if let Some(c) = self.credential.lock().expect("credential lock").clone() {
            return Some(c);
        }
        let secret = self.settings.enroll_secret.as_deref()?;
        let body = serde_json::to_vec(&ops_config::enroll::EnrollRequest { hostname: self.settings.hostname.clone() }).ok()?;
        let mut errors = Vec::new();
        for server in &self.settings.servers {
            let url = format!("{}/enroll", base_url(server));
            let reply = match self.client.post(&url).bearer_auth(secret).body(body.clone()).send().await {
                Ok(r) => {
                    let status = r.status();
                    let body = crate::body_capped(r, 64 * 1024).await.map_err(|e| e.to_string());
                    match body.and_then(|b| {
                        if status.is_success() { Ok(b) } else { Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&b))) }
                    }) {
                        Ok(b) => serde_json::from_slice::<ops_config::enroll::EnrollReply>(&b).map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(crate::causes(&e)),
            };
            match reply {
                Ok(r) if r.hostname == self.settings.hostname => {
                    if let Some(dir) = &self.settings.state_dir
                        && let Err(e) =
                            ops_config::disk::write_private(&dir.join(CREDENTIAL_FILE), format!("{}\n", r.credential).as_bytes())
                    {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the host credential: enrolling again at the next start");
                    }
                    tracing::info!(server = %server, serial = r.serial, "enrolled: host credential kept");
                    *self.credential.lock().expect("credential lock") = Some(r.credential.clone());
                    return Some(r.credential);
                }
                Ok(r) => errors.push(format!("{url}: a credential for {:?}, not this host", r.hostname)),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        tracing::warn!(errors = %errors.join("; "), "cannot enroll: heartbeats go without a host credential");
        None
    }

    /// Drops a credential a server refused, so the next cycle enrolls again.
    fn forget_credential(&self) {
        *self.credential.lock().expect("credential lock") = None;
        if let Some(dir) = &self.settings.state_dir {
            let _ = std::fs::remove_file(dir.join(CREDENTIAL_FILE));
        }
    }

    async fn send(&self, hb: &Heartbeat<'_>) -> Result<(HeartbeatReply, usize), String> {
        let body = serde_json::to_vec(hb).map_err(|e| e.to_string())?;
        match self.send_once(&body).await {
            // The credential was refused (withdrawn by the operator, or of a dropped key):
            // enroll again and send once more in the same cycle.
            Err(Refusal::Credential(e)) => {
                tracing::warn!(error = %e, "host credential refused: enrolling again");
                self.send_once(&body).await.map_err(Refusal::into_text)
            }
            r => r.map_err(Refusal::into_text),
        }
    }

    async fn send_once(&self, body: &[u8]) -> Result<(HeartbeatReply, usize), Refusal> {
        let credential = self.credential().await;
        let mut errors = Vec::new();
        for (i, server) in self.settings.servers.iter().enumerate() {
            let url = format!("{}/heartbeat", base_url(server));
            let mut request = self.client.post(&url).body(body.to_vec());
            if let Some(c) = &credential {
                request = request.header(ops_config::enroll::CREDENTIAL_HEADER, c);
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status();
                    let refused_credential =
                        status == reqwest::StatusCode::UNAUTHORIZED && credential.is_some() && self.settings.enroll_secret.is_some();
                    let reply = crate::body_capped(r, self.settings.max_response_bytes)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|body| serde_json::from_slice::<HeartbeatReply>(&body).map_err(|e| e.to_string()));
                    match reply {
                        Ok(reply) if status.is_success() => {
                            if !errors.is_empty() {
                                tracing::warn!(errors = %errors.join("; "), answered = %server, "servers before this one did not answer");
                            }
                            return Ok((reply, i));
                        }
                        Ok(reply) if refused_credential => {
                            self.forget_credential();
                            errors.push(format!("{url}: HTTP {status}: {}", reply.error_message));
                            return Err(Refusal::Credential(errors.join("; ")));
                        }
                        Ok(reply) => errors.push(format!("{url}: HTTP {status}: {}", reply.error_message)),
                        Err(e) => errors.push(format!("{url}: HTTP {status}: {e}")),
                    }
                }
                Err(e) => errors.push(format!("{url}: {}", crate::causes(&e))),
            }
        }
        Err(Refusal::Other(errors.join("; ")))
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
        self.send(&hb).await.map(drop)
    }

    /// One cycle. Never panics on what the server or the disk says.
    pub async fn cycle(&mut self) -> Outcome {
        self.load_pins();
        let hb = self.heartbeat().await;
        let sent = self.send(&hb).await;
        self.probation(sent.is_ok());
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
        if !self.settings.trusted_keys.is_empty() {
            let server = self.settings.servers[server].clone();
            let fetched = self.refresh_signed(&server, &reply.config_hash).await;
            if let Err(e) = &fetched {
                tracing::error!(error = %e, "cannot verify the signed config");
            }
            for d in &reply.desired_agents {
                if let Err(e) = self.check_signed(d) {
                    let e = match &fetched {
                        Err(why) => format!("{e} ({why})"),
                        Ok(()) => e,
                    };
                    refused.insert(d.name.clone(), e);
                }
            }
        }
        // A refused state is not taken: the agent stays as last verified (and reported).
        let previous = std::mem::take(&mut self.known);
        self.known = reply
            .desired_agents
            .into_iter()
            .filter_map(|d| if refused.contains_key(&d.name) { previous.iter().find(|p| p.name == d.name).cloned() } else { Some(d) })
            .collect();
        for (name, e) in &refused {
            tracing::error!(agent = %name, error = %e, "desired state refused: not in the signed config");
            errors.push(e.clone());
            self.errors.insert(name.clone(), e.clone());
        }
        // A refused agent is left as it is this cycle: nothing downloaded, switched or started.
        for d in self.known.clone() {
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
                    self.errors.remove(&d.name);
                }
                Err(e) => {
                    tracing::error!(agent = %d.name, version = %d.version, error = %e, "agent not converged");
                    errors.push(e.clone());
                    self.errors.insert(d.name.clone(), e);
                }
            }
        }
        self.save_kept();
        let converged = errors.is_empty() && self.check_converged().await;
        Outcome { answered: true, converged, errors }
    }

    /// Reads the state again and compares it with the desired one.
    async fn check_converged(&self) -> bool {
        let real = self.real_state().await;
        self.known.iter().all(|d| {
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
            self.resume_watch(d, &agent_dir).await?;
        }
        Ok(())
    }

    /// Brings the agent to the version it is pinned at. Installed already, it is switched to as
    /// is (it was verified when installed). Otherwise it is fetched with the digest beside its
    /// tarball; with trusted keys, only when the signed config gives a sha256 for that version
    /// on this host.
    async fn apply_pinned_version(&mut self, mut p: DesiredAgent) -> Result<(), String> {
        let (_, version_dir) = checked_dirs(&p)?;
        if !self.settings.trusted_keys.is_empty() && !version_dir.join("control").is_file() {
            let signed = self.signed.as_ref().and_then(|c| {
                ops_config::trust::allowed_states(c, &self.settings.hostname, &p.name)
                    .into_iter()
                    .find(|a| a.version == p.version && !a.sha256.is_empty())
            });
            match signed {
                Some(a) => p.sha256 = a.sha256.clone(),
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
        self.resume_watch(d, &agent_dir).await?;
        // A version reverted here is not tried again until the desired version or digest
        // changes; the version running is kept in its run state meanwhile.
        match self.reverted.get(&d.name) {
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
                self.reverted.remove(&d.name);
                self.save_kept();
            }
            None => {}
        }
        if d.name == crate::selfupdate::SELF_AGENT {
            return self.apply_self(d, &agent_dir, &version_dir).await;
        }
        self.ensure_installed(d, &agent_dir, &version_dir).await?;
        let timeout = self.settings.control_timeout;
        let current = read_version(&agent_dir);
        if current != d.version {
            let old = agent_dir.join(&current);
            let has_previous = !current.is_empty() && valid_version(&current) && old.join("control").is_file();
            if has_previous {
                control::run(&old, "stop", &d.run_user, timeout).await.map_err(|e| format!("stopping {} {current}: {e}", d.name))?;
            }
            // Watched when there is a version to go back to.
            let watch = (d.cmd == "start" && has_previous && !self.settings.health_window.is_zero()).then(|| self.begin_watch(d, &current));
            write_version(&agent_dir, &d.version).map_err(|e| format!("writing {}/.version: {e}", agent_dir.display()))?;
            tracing::info!(agent = %d.name, from = %current, to = %d.version, "switched version");
            if d.cmd == "start" {
                let started = control::run(&version_dir, "start", &d.run_user, timeout).await;
                match (started, watch) {
                    (Ok(_), Some(w)) => self.watch_health(d, &agent_dir, w).await?,
                    (Ok(_), None) => {}
                    (Err(e), Some(w)) => self.revert(d, &agent_dir, w, format!("start failed: {e}")).await?,
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

    /// Makes `{agent_dir}/{version}` exist, complete: download, verify, extract into a
    /// temporary sibling, rename into place.
    pub(crate) async fn ensure_installed(&self, d: &DesiredAgent, agent_dir: &Path, version_dir: &Path) -> Result<(), String> {
        let entry = crate::selfupdate::entry_of(&d.name);
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
        let (archive, dest, limits) = (download.clone(), tmp.clone(), self.settings.unpack);
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

    fn desired(name: &str, version: &str, work_dir: &str) -> DesiredAgent {
        DesiredAgent {
            name: name.into(),
            version: version.into(),
            tarball: "http://127.0.0.1:9/releases".into(),
            md5: String::new(),
            cmd: "start".into(),
            run_user: String::new(),
            work_dir: work_dir.into(),
            config_file_name: String::new(),
            config_remote_url: String::new(),
            sha256: String::new(),
        }
    }

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

    #[tokio::test]
    async fn kept_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = updater();
        u.settings.state_dir = Some(dir.path().to_path_buf());
        u.known = vec![desired("agent", "1.0", "/w")];
        u.errors.insert("agent".into(), "md5 mismatch".into());
        u.save_kept();
        let mut settings = u.settings.clone();
        settings.hostname = "again".into();
        let again = Updater::new(settings, Fetcher::new(Duration::from_secs(1), Duration::from_secs(2), 1 << 20, &[]));
        assert_eq!(again.known, u.known);
        assert_eq!(again.errors.get("agent").map(String::as_str), Some("md5 mismatch"));
        std::fs::write(dir.path().join(STATE_FILE), b"garbage").unwrap();
        let fresh = Updater::new(u.settings.clone(), Fetcher::new(Duration::from_secs(1), Duration::from_secs(2), 1 << 20, &[]));
        assert!(fresh.known.is_empty(), "an unreadable file is ignored, not fatal");
    }

    #[tokio::test]
    async fn unreachable_servers_are_an_outcome_not_a_panic() {
        let mut u = updater();
        let out = u.cycle().await;
        assert!(!out.answered && !out.converged);
        assert!(out.errors[0].contains("127.0.0.1:9"), "{:?}", out.errors);
    }
}
