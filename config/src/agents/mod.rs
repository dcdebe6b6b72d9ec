//! The desired config (`agents.toml`): what every host should run, and its resolution.
//!
//! Resolution is precomputed at load: a host's desired agents depend only on the longest
//! prefix (over every agent's `others` blocks) that its hostname starts with, because every
//! other matching prefix is a prefix of that one. So the file compiles into a few *classes*
//! (one per distinct prefix, plus the default), and resolving a host is a handful of hash
//! look-ups that return a slice shared by every host of its class.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::location::line_col;
use crate::wire::{DesiredAgent, valid_agent_name, valid_hostname, valid_version};

/// What the operators want an agent to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cmd {
    Start,
    Stop,
}

impl Cmd {
    pub fn as_str(self) -> &'static str {
        match self {
            Cmd::Start => "start",
            Cmd::Stop => "stop",
        }
    }
}

/// Version, digest and command of a `default` or `others` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Block {
    pub version: String,
    /// 32 lowercase hex digits; or empty: the updater then reads `{url}.md5`; or an http(s)
    /// base URL (seed 003's form, what the Go updater needs): the digest is in
    /// `{md5}/{name}-{version}.tar.gz.md5` (`{md5}/{arch}/...` for our updater).
    pub md5: String,
    /// 64 lowercase hex digits, or empty. Required where the config is signed and checked by
    /// updaters (`crate::trust`); the Go updater ignores it and checks `md5`.
    pub sha256: String,
    pub cmd: Cmd,
}

/// An `others` block: hosts whose name starts with `prefix` get it instead of `default`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    pub prefix: String,
    pub block: Block,
    pub tarball: Option<String>,
    pub run_user: Option<String>,
    pub work_dir: Option<String>,
}

/// One `[[agent]]` of the file, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentSpec {
    pub name: String,
    pub tarball: String,
    pub run_user: String,
    pub work_dir: String,
    pub config_file_name: String,
    pub config_remote_url: String,
    pub default: Block,
    pub others: Vec<Override>,
    /// A staged rollout from `rollout.from` to `default` (`[agent.rollout]`), if any.
    pub rollout: Option<RolloutSpec>,
    /// `relay_cache = true`: relays with a package cache answer this agent's `tarball` (and a
    /// URL-form `md5`) with their own base and serve the files from their cache.
    pub relay_cache: bool,
}

/// An agent's `[agent.rollout]`, validated: hosts outside the `others` groups keep `from`
/// until their wave opens (see [`crate::rollout`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutSpec {
    /// What hosts run until their wave opens (cmd: the default's).
    pub from: Block,
    pub policy: crate::rollout::Policy,
    pub window: Option<crate::rollout::Window>,
    /// Hosts one relay may have told the target and not yet seen converged (None: no limit).
    pub max_in_flight_per_relay: Option<u32>,
    /// Where meta nodes check host credentials (`--host-key-file`): count hosts whose reports
    /// carry none (stock Go updaters) in this rollout's judgement too. Off by default: anyone
    /// who reaches `/heartbeat` could then halt the rollout or crowd out its failures.
    pub count_unauthenticated: bool,
}

/// Index of a resolution class in a [`DesiredConfig`]; 0 is "no prefix matched".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClassId(pub u32);

/// A refused config file (`agents.toml` or `cluster.toml`). `Display` gives
/// `file:line:col: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}:{line}:{col}: {message}")]
    At { file: String, line: usize, col: usize, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
}

/// A loaded, validated desired config with its resolution classes.
#[derive(Debug, Clone)]
pub struct DesiredConfig {
    agents: Vec<AgentSpec>,
    /// `version`: the document's place in the operator's sequence (signed with it).
    version: Option<u64>,
    /// `expires`: unix seconds after which no party takes it as current (signed with it).
    expires: Option<u64>,
    hash: String,
    source: String,
    /// Per class: the prefix it stands for (None for class 0) and every agent's desired state.
    classes: Vec<(Option<String>, Vec<DesiredAgent>)>,
    prefix_class: HashMap<String, ClassId>,
    /// Distinct prefix lengths, longest first.
    prefix_lens: Vec<usize>,
    /// Indexes (in `agents`) of the agents with a rollout; rollout r is `agents[rollouts[r]]`.
    rollouts: Vec<usize>,
    /// Per class: for each rollout that applies there (no `others` block of its agent
    /// matched), `(r, the agent's desired state once the host's wave is open)`.
    class_targets: Vec<Vec<(usize, DesiredAgent)>>,
    /// `[enrollment]`: host credentials withdrawn.
    revocations: crate::enroll::Revocations,
}

/// Most agents with a rollout in one config: a host's rollout state is a bit mask of this
/// many bits, and servers keep a reply per class and mask (16 per class).
pub const MAX_ROLLOUTS: usize = 4;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: Option<Spanned<i64>>,
    expires: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgent>>,
    enrollment: Option<RawEnrollment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrollment {
    not_before: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    hosts: std::collections::BTreeMap<String, Spanned<RawHostRevocation>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostRevocation {
    not_before: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    tarball: Spanned<String>,
    run_user: Spanned<String>,
    work_dir: Spanned<String>,
    config_file_name: Option<Spanned<String>>,
    config_remote_url: Option<Spanned<String>>,
    default: Spanned<RawBlock>,
    #[serde(default)]
    others: Vec<Spanned<RawOther>>,
    rollout: Option<Spanned<RawRollout>>,
    #[serde(default)]
    relay_cache: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    from: Spanned<RawFrom>,
    waves: Spanned<Vec<Spanned<i64>>>,
    soak: Option<Spanned<String>>,
    advance_at: Option<Spanned<f64>>,
    deadline: Option<Spanned<String>>,
    halt_when: Option<Spanned<RawHalt>>,
    max_in_flight_per_relay: Option<Spanned<i64>>,
    window: Option<Spanned<RawWindow>>,
    #[serde(default)]
    count_unauthenticated: bool,
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    abort: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    version: Spanned<String>,
    md5: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHalt {
    failed_ratio: Option<Spanned<f64>>,
    min_sample: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Spanned<String>,
    hours: Spanned<String>,
    tz: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    version: Spanned<String>,
    md5: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    cmd: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOther {
    prefix: Spanned<String>,
    version: Spanned<String>,
    md5: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    cmd: Option<Spanned<String>>,
    tarball: Option<Spanned<String>>,
    run_user: Option<Spanned<String>>,
    work_dir: Option<Spanned<String>>,
}

/// Carries the file name and text so every check can say where it failed.
struct Checker<'a> {
    file: &'a str,
    text: &'a str,
}

impl Checker<'_> {
    /// A `not_before` datetime as unix milliseconds (fractions of a second kept to the ms).
    fn not_before(&self, v: &Spanned<toml::value::Datetime>) -> Result<u64, ConfigError> {
        let ms = v.get_ref().time.map_or(0, |t| u64::from(t.nanosecond) / 1_000_000);
        crate::trust::unix_seconds(v.get_ref()).map(|s| s.saturating_mul(1000) + ms).map_err(|_| {
            self.err(
                v.span(),
                format_args!("not_before must be a full time with its offset, like 2027-01-05T00:00:00Z; got {}", v.get_ref()),
            )
        })
    }

    fn enrollment(&self, e: &RawEnrollment) -> Result<crate::enroll::Revocations, ConfigError> {
        use crate::enroll::HostRevocation;
        let not_before = e.not_before.as_ref().map(|v| self.not_before(v)).transpose()?.unwrap_or(0);
        if e.hosts.len() > crate::enroll::MAX_REVOKED_HOSTS {
            let first = e.hosts.values().next().map_or(0..0, Spanned::span);
            return Err(self.err(first, format_args!("[enrollment.hosts] may name at most {} hosts", crate::enroll::MAX_REVOKED_HOSTS)));
        }
        let mut hosts = Vec::with_capacity(e.hosts.len());
        for (name, v) in &e.hosts {
            if !crate::wire::valid_hostname(name) {
                return Err(self.err(v.span(), format_args!("[enrollment.hosts]: bad hostname {name:?}")));
            }
            let r = v.get_ref();
            let revocation = match (&r.not_before, r.revoked) {
                (None, true) => HostRevocation::Revoked,
                (Some(t), false) => HostRevocation::NotBefore(self.not_before(t)?),
                _ => {
                    return Err(
                        self.err(v.span(), format_args!("[enrollment.hosts] {name:?}: give either revoked = true or not_before = <time>"))
                    );
                }
            };
            hosts.push((name.clone(), revocation));
        }
        Ok(crate::enroll::Revocations::new(not_before, hosts))
    }

    fn err(&self, span: Range<usize>, message: impl fmt::Display) -> ConfigError {
        let (line, col) = line_col(self.text, span.start);
        ConfigError::At { file: self.file.to_owned(), line, col, message: message.to_string() }
    }

    fn check(&self, v: &Spanned<String>, ok: bool, what: impl fmt::Display) -> Result<String, ConfigError> {
        if ok { Ok(v.get_ref().clone()) } else { Err(self.err(v.span(), format_args!("{what}, got {:?}", v.get_ref()))) }
    }

    fn name(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        self.check(v, valid_agent_name(v.get_ref()), "agent name must be 1-64 of [A-Za-z0-9._-], not . or ..")
    }

    fn version(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        self.check(v, valid_version(v.get_ref()), "version must be 1-64 of [A-Za-z0-9._+-], not . or ..")
    }

    fn md5(&self, v: Option<&Spanned<String>>) -> Result<String, ConfigError> {
        match v {
            Some(u) if u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://") => self.url(u, "a URL-form md5"),
            _ => self.hex_digest(v, 32, "md5 must be empty, 32 hex digits or an http(s) base URL"),
        }
    }

    fn sha256(&self, v: Option<&Spanned<String>>) -> Result<String, ConfigError> {
        self.hex_digest(v, 64, "sha256 must be empty or 64 hex digits")
    }

    fn hex_digest(&self, v: Option<&Spanned<String>>, len: usize, what: &str) -> Result<String, ConfigError> {
        let Some(v) = v else { return Ok(String::new()) };
        let s = v.get_ref();
        let ok = s.is_empty() || (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(self.check(v, ok, what)?.to_ascii_lowercase())
    }

    fn cmd(&self, v: Option<&Spanned<String>>, inherited: Cmd) -> Result<Cmd, ConfigError> {
        match v.map(|v| (v, v.get_ref().as_str())) {
            None => Ok(inherited),
            Some((_, "start")) => Ok(Cmd::Start),
            Some((_, "stop")) => Ok(Cmd::Stop),
            Some((v, other)) => Err(self.err(v.span(), format_args!("cmd must be \"start\" or \"stop\", got {other:?}"))),
        }
    }

    fn url(&self, v: &Spanned<String>, what: &str) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
        let ok = rest.is_some_and(|r| {
            let host = r.split('/').next().unwrap_or("");
            !host.is_empty() && !r.chars().any(|c| c.is_whitespace() || c.is_control())
        });
        self.check(v, ok, format_args!("{what} must be an http:// or https:// URL with a host"))
    }

    fn work_dir(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = s.starts_with('/') && !s.split('/').any(|c| c == "..") && !s.contains('\0') && s.len() <= 4096;
        self.check(v, ok, "work_dir must be an absolute path without ..")
    }

    fn run_user(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = !s.is_empty()
            && s.len() <= 32
            && !s.starts_with('-')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        self.check(v, ok, "run_user must be 1-32 of [A-Za-z0-9._-], not starting with -")
    }

    fn file_name(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = s.is_empty() || valid_agent_name(s);
        self.check(v, ok, "config_file_name must be a plain file name of [A-Za-z0-9._-]")
    }

    fn ratio(&self, v: Option<&Spanned<f64>>, default: u16) -> Result<u16, ConfigError> {
        v.map_or(Ok(default), |v| crate::rollout::ratio_bp(*v.get_ref()).map_err(|e| self.err(v.span(), e)))
    }

    fn duration(&self, v: Option<&Spanned<String>>, default: u64) -> Result<u64, ConfigError> {
        v.map_or(Ok(default), |v| crate::rollout::parse_duration(v.get_ref()).map_err(|e| self.err(v.span(), e)))
    }

    fn rollout(&self, raw: &Spanned<RawRollout>, default: &Block) -> Result<RolloutSpec, ConfigError> {
        let r = raw.get_ref();
        let from = r.from.get_ref();
        let from = Block {
            version: self.version(&from.version)?,
            md5: self.md5(from.md5.as_ref())?,
            sha256: self.sha256(from.sha256.as_ref())?,
            cmd: default.cmd,
        };
        if from.version == default.version {
            return Err(
                self.err(r.from.span(), format_args!("rollout.from is the default version {:?}: nothing to roll out", from.version))
            );
        }
        let mut waves = Vec::with_capacity(r.waves.get_ref().len());
        for w in r.waves.get_ref() {
            let p = *w.get_ref();
            if !(1..=100).contains(&p) || waves.last().is_some_and(|&last: &u8| i64::from(last) >= p) {
                return Err(self.err(w.span(), format_args!("waves are percents of the fleet, 1-100, strictly increasing; got {p}")));
            }
            waves.push(p as u8);
        }
        if waves.last() != Some(&100) {
            return Err(self.err(r.waves.span(), "waves must end at 100"));
        }
        if waves.len() > crate::rollout::MAX_WAVES {
            return Err(self.err(r.waves.span(), format_args!("at most {} waves", crate::rollout::MAX_WAVES)));
        }
        let halt = r.halt_when.as_ref().map(Spanned::get_ref);
        let min_sample = match halt.and_then(|h| h.min_sample.as_ref()) {
            None => 20,
            Some(v) if *v.get_ref() >= 1 => *v.get_ref() as u64,
            Some(v) => return Err(self.err(v.span(), format_args!("min_sample must be at least 1, got {}", v.get_ref()))),
        };
        let max_in_flight_per_relay = match &r.max_in_flight_per_relay {
            None => None,
            Some(v) if (1..=i64::from(u32::MAX)).contains(v.get_ref()) => Some(*v.get_ref() as u32),
            Some(v) => return Err(self.err(v.span(), format_args!("max_in_flight_per_relay must be at least 1, got {}", v.get_ref()))),
        };
        let window = match &r.window {
            None => None,
            Some(w) => {
                let raw = w.get_ref();
                let tz = raw.tz.as_ref().map_or("UTC", |t| t.get_ref().as_str());
                Some(crate::rollout::Window::parse(raw.days.get_ref(), raw.hours.get_ref(), tz).map_err(|e| self.err(w.span(), e))?)
            }
        };
        Ok(RolloutSpec {
            from,
            policy: crate::rollout::Policy {
                waves,
                soak_seconds: self.duration(r.soak.as_ref(), 15 * 60)?,
                advance_at_bp: self.ratio(r.advance_at.as_ref(), 9500)?,
                deadline_seconds: self.duration(r.deadline.as_ref(), 20 * 60)?,
                failed_ratio_bp: self.ratio(halt.and_then(|h| h.failed_ratio.as_ref()), 500)?,
                min_sample,
                paused: r.paused,
                abort: r.abort,
            },
            window,
            max_in_flight_per_relay,
            count_unauthenticated: r.count_unauthenticated,
        })
    }

    fn agent(&self, raw: &RawAgent) -> Result<AgentSpec, ConfigError> {
        let default_block = raw.default.get_ref();
        let default = Block {
            version: self.version(&default_block.version)?,
            md5: self.md5(default_block.md5.as_ref())?,
            sha256: self.sha256(default_block.sha256.as_ref())?,
            cmd: self.cmd(default_block.cmd.as_ref(), Cmd::Start)?,
        };
        let mut others = Vec::with_capacity(raw.others.len());
        let mut seen = HashSet::new();
        for o in &raw.others {
            let o = o.get_ref();
            let prefix = self.check(&o.prefix, valid_hostname(o.prefix.get_ref()), "prefix must be 1-255 of [A-Za-z0-9._-]")?;
            if !seen.insert(prefix.clone()) {
                return Err(self.err(o.prefix.span(), format_args!("duplicate prefix {prefix:?} in this agent")));
            }
            others.push(Override {
                prefix,
                block: Block {
                    version: self.version(&o.version)?,
                    // Never inherited: a digest belongs to one version (the Go ops-meta's fault).
                    md5: self.md5(o.md5.as_ref())?,
                    sha256: self.sha256(o.sha256.as_ref())?,
                    cmd: self.cmd(o.cmd.as_ref(), default.cmd)?,
                },
                tarball: o.tarball.as_ref().map(|t| self.url(t, "tarball")).transpose()?,
                run_user: o.run_user.as_ref().map(|u| self.run_user(u)).transpose()?,
                work_dir: o.work_dir.as_ref().map(|w| self.work_dir(w)).transpose()?,
            });
        }
        Ok(AgentSpec {
            name: self.name(&raw.name)?,
            tarball: self.url(&raw.tarball, "tarball")?,
            run_user: self.run_user(&raw.run_user)?,
            work_dir: self.work_dir(&raw.work_dir)?,
            config_file_name: raw.config_file_name.as_ref().map(|f| self.file_name(f)).transpose()?.unwrap_or_default(),
            config_remote_url: raw
                .config_remote_url
                .as_ref()
                .map(|u| if u.get_ref().is_empty() { Ok(String::new()) } else { self.url(u, "config_remote_url") })
                .transpose()?
                .unwrap_or_default(),
            rollout: raw.rollout.as_ref().map(|r| self.rollout(r, &default)).transpose()?,
            default,
            others,
            relay_cache: raw.relay_cache,
        })
    }
}

impl AgentSpec {
    /// The desired state of this agent for a host whose longest matching prefix (over the
    /// whole file) is `longest`: the longest of this agent's own prefixes that `longest`
    /// starts with wins, else `default`.
    fn resolve(&self, longest: Option<&str>) -> DesiredAgent {
        self.resolve_at(longest, false)
    }

    /// The `others` block of this agent that a host of longest prefix `longest` gets.
    fn chosen(&self, longest: Option<&str>) -> Option<&Override> {
        longest.and_then(|l| self.others.iter().filter(|o| l.starts_with(o.prefix.as_str())).max_by_key(|o| o.prefix.len()))
    }

    /// [`resolve`](Self::resolve), with `at_target`: the host's rollout wave is open.
    fn resolve_at(&self, longest: Option<&str>, at_target: bool) -> DesiredAgent {
        let chosen = self.chosen(longest);
        // `others` groups keep precedence over a rollout. Outside them, a rollout holds a host
        // at `from` until its wave is open (the waves are opened by the rollout controller,
        // not wired into the servers yet: see README, staged rollouts).
        let block = match (chosen, &self.rollout) {
            (Some(o), _) => &o.block,
            (None, Some(r)) if !at_target => &r.from,
            (None, _) => &self.default,
        };
        DesiredAgent {
            name: self.name.clone(),
            version: block.version.clone(),
            tarball: chosen.and_then(|o| o.tarball.clone()).unwrap_or_else(|| self.tarball.clone()),
            md5: block.md5.clone(),
            cmd: block.cmd.as_str().to_owned(),
            run_user: chosen.and_then(|o| o.run_user.clone()).unwrap_or_else(|| self.run_user.clone()),
            work_dir: chosen.and_then(|o| o.work_dir.clone()).unwrap_or_else(|| self.work_dir.clone()),
            config_file_name: self.config_file_name.clone(),
            config_remote_url: self.config_remote_url.clone(),
            sha256: block.sha256.clone(),
        }
    }
}

impl DesiredConfig {
    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let checker = Checker { file, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => checker.err(span, e.message()),
            None => ConfigError::File { file: file.to_owned(), message: e.message().to_owned() },
        })?;
        let version = match &raw.version {
            Some(v) if *v.get_ref() < 1 => return Err(checker.err(v.span(), "version must be a whole number from 1 up")),
            v => v.as_ref().map(|v| *v.get_ref() as u64),
        };
        let expires = match &raw.expires {
            Some(v) => Some(crate::trust::unix_seconds(v.get_ref()).map_err(|e| checker.err(v.span(), e))?),
            None => None,
        };
        let mut agents: Vec<AgentSpec> = Vec::with_capacity(raw.agent.len());
        let mut rollouts = Vec::new();
        for a in &raw.agent {
            let spec = checker.agent(a.get_ref())?;
            if agents.iter().any(|b| b.name == spec.name) {
                return Err(checker.err(a.get_ref().name.span(), format_args!("duplicate agent name {:?}", spec.name)));
            }
            if let Some(r) = &a.get_ref().rollout {
                if rollouts.len() == MAX_ROLLOUTS {
                    return Err(checker.err(r.span(), format_args!("at most {MAX_ROLLOUTS} agents may have a rollout at once")));
                }
                rollouts.push(agents.len());
            }
            agents.push(spec);
        }

        let mut prefixes: Vec<String> = agents.iter().flat_map(|a| a.others.iter().map(|o| o.prefix.clone())).collect();
        prefixes.sort();
        prefixes.dedup();
        let mut classes = vec![(None, agents.iter().map(|a| a.resolve(None)).collect())];
        let mut prefix_class = HashMap::with_capacity(prefixes.len());
        for p in prefixes {
            let desired = agents.iter().map(|a| a.resolve(Some(&p))).collect();
            prefix_class.insert(p.clone(), ClassId(classes.len() as u32));
            classes.push((Some(p), desired));
        }
        let mut prefix_lens: Vec<usize> = prefix_class.keys().map(String::len).collect();
        prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lens.dedup();
        let class_targets = classes
            .iter()
            .map(|(prefix, _)| {
                let longest = prefix.as_deref();
                rollouts
                    .iter()
                    .enumerate()
                    .filter(|&(_, &ai)| agents[ai].chosen(longest).is_none())
                    .map(|(r, &ai)| (r, agents[ai].resolve_at(longest, true)))
                    .collect()
            })
            .collect();

        let revocations = match &raw.enrollment {
            Some(e) => checker.enrollment(e)?,
            None => crate::enroll::Revocations::default(),
        };

        Ok(DesiredConfig {
            revocations,
            agents,
            version,
            expires,
            hash: crate::content_hash(text.as_bytes()),
            source: text.to_owned(),
            classes,
            prefix_class,
            prefix_lens,
            rollouts,
            class_targets,
        })
    }

    /// The agents with a rollout, by rollout number r (the bit of [`rollout_mask`](Self::rollout_mask)).
    pub fn rollouts(&self) -> impl Iterator<Item = &AgentSpec> {
        self.rollouts.iter().map(|&i| &self.agents[i])
    }

    /// Bit r set: host `hostname` (of `class`) runs rollout r's target, because its wave is
    /// among the `fleet_waves[r]` the fleet has opened (0 or missing: none) and the rollout is
    /// not aborted. A host of an `others` group is never in a rollout of that agent.
    pub fn rollout_mask(&self, hostname: &str, class: ClassId, fleet_waves: &[usize]) -> u8 {
        if !fleet_waves.iter().any(|&w| w > 0) {
            return 0;
        }
        self.mask_of_waves(self.rollout_waves(hostname, class), fleet_waves)
    }

    /// [`rollout_mask`](Self::rollout_mask) from a host's [`rollout_waves`](Self::rollout_waves).
    pub fn mask_of_waves(&self, waves: u16, fleet_waves: &[usize]) -> u8 {
        let mut mask = 0u8;
        for (r, &i) in self.rollouts.iter().enumerate() {
            let wave = usize::from((waves >> (4 * r)) & 0xf);
            let open = fleet_waves.get(r).copied().unwrap_or(0);
            let aborted = self.agents[i].rollout.as_ref().is_none_or(|s| s.policy.abort);
            if wave > 0 && wave <= open && !aborted {
                mask |= 1 << r;
            }
        }
        mask
    }

    /// The wave of `hostname` (of `class`) in each rollout, 4 bits per rollout (bits 4r..4r+4):
    /// 1..=15 its wave, 0 when the rollout does not apply to its class (an `others` group).
    /// Needs one md5 per rollout; stores keep it per host.
    pub fn rollout_waves(&self, hostname: &str, class: ClassId) -> u16 {
        let mut waves = 0u16;
        for (r, target) in &self.class_targets[class.0 as usize] {
            let agent = &self.agents[self.rollouts[*r]];
            let Some(spec) = &agent.rollout else { continue };
            let bucket = crate::rollout::bucket(&agent.name, &target.version, hostname);
            waves |= (crate::rollout::wave_of(&spec.policy.waves, bucket) as u16 & 0xf) << (4 * r);
        }
        waves
    }

    /// Rollout r's target for the hosts of `class`, or None when an `others` group of its agent
    /// keeps them out of it.
    pub fn class_target(&self, class: ClassId, r: usize) -> Option<&DesiredAgent> {
        self.class_targets[class.0 as usize].iter().find(|(x, _)| *x == r).map(|(_, d)| d)
    }

    /// The rollout number of agent `name`, if it has a rollout.
    pub fn rollout_of(&self, name: &str) -> Option<usize> {
        self.rollouts.iter().position(|&i| self.agents[i].name == name)
    }

    /// Every agent's desired state for the hosts of `class` whose rollout mask is `mask`
    /// (mask 0 is [`class`](Self::class)).
    pub fn variant(&self, class: ClassId, mask: u8) -> Vec<DesiredAgent> {
        let mut desired = self.class(class).to_vec();
        for (r, target) in &self.class_targets[class.0 as usize] {
            if mask & (1 << r) != 0 {
                desired[self.rollouts[*r]] = target.clone();
            }
        }
        desired
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File { file: file.clone(), message: e.to_string() })?;
        Self::parse(&text, &file)
    }

    /// `[enrollment]`: the host credentials the operator has withdrawn.
    pub fn revocations(&self) -> &crate::enroll::Revocations {
        &self.revocations
    }

    /// The content hash of the file text this was parsed from.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The file's `version` (None: the file has none; a signed one must, see
    /// [`crate::trust::check_fresh`]).
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// The file's `expires`, in unix seconds.
    pub fn expires(&self) -> Option<u64> {
        self.expires
    }

    /// The file text this was parsed from (what `/config/desired` serves).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn agents(&self) -> &[AgentSpec] {
        &self.agents
    }

    /// Position of an agent in [`agents`](Self::agents) and in every class's desired list.
    pub fn agent_index(&self, name: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.name == name)
    }

    /// Number of resolution classes (distinct prefixes + 1).
    pub fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// The class of a hostname: the longest configured prefix it starts with.
    pub fn class_of(&self, hostname: &str) -> ClassId {
        for &len in &self.prefix_lens {
            if let Some(head) = hostname.get(..len)
                && let Some(&class) = self.prefix_class.get(head)
            {
                return class;
            }
        }
        ClassId(0)
    }

    /// Every agent's desired state for the hosts of a class, in file order.
    ///
    /// # Panics
    /// If `class` did not come from this config.
    pub fn class(&self, class: ClassId) -> &[DesiredAgent] {
        &self.classes[class.0 as usize].1
    }

    /// The prefix a class stands for (None for the default class).
    pub fn class_prefix(&self, class: ClassId) -> Option<&str> {
        self.classes.get(class.0 as usize).and_then(|c| c.0.as_deref())
    }

    /// Every agent's desired state for one host, borrowed from its class.
    pub fn desired_ref(&self, hostname: &str) -> &[DesiredAgent] {
        self.class(self.class_of(hostname))
    }

    /// Every agent's desired state for one host.
    pub fn desired_for(&self, hostname: &str) -> Vec<DesiredAgent> {
        self.desired_ref(hostname).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
[[agent]]
name = "falcon-agent"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
config_file_name = "cfg.json"
config_remote_url = "http://files.example/conf/falcon-agent-cfg.json"
default = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66", cmd = "start" }

  [[agent.others]]
  prefix = "bj-web-"
  version = "5.1.4"
  md5 = ""
  cmd = "start"

  [[agent.others]]
  prefix = "bj-web-1"
  version = "5.1.5"
  tarball = "https://canary.example/falcon"
  run_user = "canary"
  work_dir = "/opt/canary"

[[agent]]
name = "mysql-monitor"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
default = { version = "0.0.5", md5 = "5F9AB5E81C386CDE72C022D1B6D061D9", cmd = "stop" }

  [[agent.others]]
  prefix = "bj-"
  version = "0.0.6"
"#;

    fn cfg() -> DesiredConfig {
        DesiredConfig::parse(ISSUE_EXAMPLE, "agents.toml").unwrap()
    }

    fn versions(c: &DesiredConfig, host: &str) -> Vec<(String, String, String)> {
        c.desired_for(host).into_iter().map(|d| (d.name, d.version, d.cmd)).collect()
    }

    #[test]
    fn default_block_for_unmatched_hosts() {
        let c = cfg();
        let d = c.desired_for("sh-db-001");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "falcon-agent");
        assert_eq!(d[0].version, "5.1.3");
        assert_eq!(d[0].md5, "490ac172dabecc867289079d48e84a66");
        assert_eq!(d[0].tarball, "http://files.example/releases/falcon");
        assert_eq!(d[0].config_file_name, "cfg.json");
        assert_eq!(d[0].config_remote_url, "http://files.example/conf/falcon-agent-cfg.json");
        assert_eq!(d[1].md5, "5f9ab5e81c386cde72c022d1b6d061d9", "digests are normalised to lowercase");
        assert_eq!(d[1].cmd, "stop");
        assert_eq!(d[1].config_file_name, "");
    }

    #[test]
    fn longest_prefix_wins_per_agent() {
        let c = cfg();
        let check = |host: &str, expected: &[(&str, &str, &str)]| {
            let got = versions(&c, host);
            let want: Vec<(String, String, String)> =
                expected.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
            assert_eq!(got, want, "host {host}");
        };
        check("bj-db-1", &[("falcon-agent", "5.1.3", "start"), ("mysql-monitor", "0.0.6", "stop")]);
        check("bj-web-001", &[("falcon-agent", "5.1.4", "start"), ("mysql-monitor", "0.0.6", "stop")]);
        check("bj-web-101", &[("falcon-agent", "5.1.5", "start"), ("mysql-monitor", "0.0.6", "stop")]);
        check("bj-we", &[("falcon-agent", "5.1.3", "start"), ("mysql-monitor", "0.0.6", "stop")]);
        check("bj", &[("falcon-agent", "5.1.3", "start"), ("mysql-monitor", "0.0.5", "stop")]);
    }

    #[test]
    fn override_never_inherits_the_default_digest_but_may_override_paths() {
        let c = cfg();
        let web = &c.desired_for("bj-web-001")[0];
        assert_eq!(web.md5, "", "an empty md5 in others means: fetch {{url}}.md5");
        assert_eq!(web.tarball, "http://files.example/releases/falcon");
        let canary = &c.desired_for("bj-web-100")[0];
        assert_eq!(canary.tarball, "https://canary.example/falcon");
        assert_eq!(canary.run_user, "canary");
        assert_eq!(canary.work_dir, "/opt/canary");
        assert_eq!(canary.md5, "");
        // mysql-monitor's override has no md5 and no cmd: digest empty, cmd inherited.
        let mm = &c.desired_for("bj-x")[1];
        assert_eq!((mm.md5.as_str(), mm.cmd.as_str()), ("", "stop"));
    }

    #[test]
    fn classes_are_distinct_prefixes_plus_default() {
        let c = cfg();
        assert_eq!(c.class_count(), 4);
        assert_eq!(c.class_of("nothing"), ClassId(0));
        assert_eq!(c.class_prefix(c.class_of("bj-web-1x")), Some("bj-web-1"));
        assert_eq!(c.agent_index("mysql-monitor"), Some(1));
        assert_eq!(c.agent_index("nope"), None);
    }

    #[test]
    fn hash_is_of_the_file_text() {
        let c = cfg();
        assert_eq!(c.hash(), crate::content_hash(ISSUE_EXAMPLE.as_bytes()));
        assert_eq!(c.source(), ISSUE_EXAMPLE);
        assert_eq!(DesiredConfig::parse("", "x").unwrap().agents().len(), 0);
    }

    fn error_of(text: &str) -> String {
        DesiredConfig::parse(text, "agents.toml").unwrap_err().to_string()
    }

    fn agent_with(field_line: &str) -> String {
        let base = [
            r#"name = "a""#,
            r#"tarball = "http://f/r""#,
            r#"run_user = "u""#,
            r#"work_dir = "/w""#,
            r#"default = { version = "1", md5 = "", cmd = "start" }"#,
        ];
        let key = field_line.split('=').next().unwrap().trim();
        let mut lines: Vec<String> = base.iter().filter(|l| l.split('=').next().unwrap().trim() != key).map(|l| l.to_string()).collect();
        lines.insert(0, field_line.to_string());
        format!("[[agent]]\n{}\n", lines.join("\n"))
    }

    #[test]
    fn bad_files_name_line_and_column() {
        let check = |text: String, expected: &str| assert_eq!(error_of(&text), expected, "for:\n{text}");
        check(agent_with(r#"name = "../etc""#), r#"agents.toml:2:8: agent name must be 1-64 of [A-Za-z0-9._-], not . or .., got "../etc""#);
        check(
            agent_with(r#"tarball = "ftp://x/y""#),
            r#"agents.toml:2:11: tarball must be an http:// or https:// URL with a host, got "ftp://x/y""#,
        );
        check(
            agent_with(r#"tarball = "http:///y""#),
            r#"agents.toml:2:11: tarball must be an http:// or https:// URL with a host, got "http:///y""#,
        );
        check(
            agent_with(r#"work_dir = "relative/dir""#),
            r#"agents.toml:2:12: work_dir must be an absolute path without .., got "relative/dir""#,
        );
        check(
            agent_with(r#"work_dir = "/a/../etc""#),
            r#"agents.toml:2:12: work_dir must be an absolute path without .., got "/a/../etc""#,
        );
        check(
            agent_with(r#"run_user = "-rf""#),
            r#"agents.toml:2:12: run_user must be 1-32 of [A-Za-z0-9._-], not starting with -, got "-rf""#,
        );
        check(
            agent_with(r#"default = { version = "1", md5 = "abc", cmd = "start" }"#),
            r#"agents.toml:2:34: md5 must be empty, 32 hex digits or an http(s) base URL, got "abc""#,
        );
        check(
            agent_with(r#"default = { version = "1", cmd = "restart" }"#),
            r#"agents.toml:2:34: cmd must be "start" or "stop", got "restart""#,
        );
        check(
            agent_with(r#"default = { version = "1/2" }"#),
            r#"agents.toml:2:23: version must be 1-64 of [A-Za-z0-9._+-], not . or .., got "1/2""#,
        );
        check(
            agent_with(r#"colour = "blue""#),
            "agents.toml:2:1: unknown field `colour`, expected one of `name`, `tarball`, `run_user`, `work_dir`, `config_file_name`, `config_remote_url`, `default`, `others`, `rollout`, `relay_cache`",
        );
        check("[[agent]]\nname = \"a\"\n".to_string(), "agents.toml:1:1: missing field `tarball`");
        check("[[agent]\n".to_string(), "agents.toml:1:9: unclosed array table, expected `]`");
    }

    #[test]
    fn duplicates_are_refused() {
        let one = agent_with(r#"name = "a""#);
        let e = error_of(&format!("{one}{one}"));
        assert_eq!(e, r#"agents.toml:8:8: duplicate agent name "a""#);
        let dup = format!("{one}[[agent.others]]\nprefix = \"p\"\nversion = \"2\"\n[[agent.others]]\nprefix = \"p\"\nversion = \"3\"\n");
        assert_eq!(error_of(&dup), r#"agents.toml:11:10: duplicate prefix "p" in this agent"#);
        let bad_prefix = format!("{one}[[agent.others]]\nprefix = \"a b\"\nversion = \"2\"\n");
        assert_eq!(error_of(&bad_prefix), r#"agents.toml:8:10: prefix must be 1-255 of [A-Za-z0-9._-], got "a b""#);
    }

    const ROLLOUT: &str = r#"[[agent]]
name = "falcon-agent"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "5.1.5", md5 = "" }
  [[agent.others]]
  prefix = "bj-web-"
  version = "5.1.4"
  [agent.rollout]
  from = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66" }
  waves = [1, 5, 25, 100]
  soak = "15m"
  advance_at = 0.95
  deadline = "20m"
  halt_when = { failed_ratio = 0.05, min_sample = 20 }
  max_in_flight_per_relay = 200
  window = { days = "mon-fri", hours = "09:00-17:00", tz = "UTC" }
"#;

    #[test]
    fn rollout_block_parses_and_holds_hosts_at_from_outside_the_groups() {
        let c = DesiredConfig::parse(ROLLOUT, "agents.toml").unwrap();
        let r = c.agents()[0].rollout.as_ref().unwrap();
        assert_eq!((r.from.version.as_str(), r.from.cmd), ("5.1.3", Cmd::Start));
        assert_eq!(r.policy.waves, vec![1, 5, 25, 100]);
        assert_eq!((r.policy.soak_seconds, r.policy.deadline_seconds), (900, 1200));
        assert_eq!((r.policy.advance_at_bp, r.policy.failed_ratio_bp, r.policy.min_sample), (9500, 500, 20));
        assert_eq!(r.max_in_flight_per_relay, Some(200));
        assert!(r.window.is_some() && !r.policy.paused && !r.policy.abort);
        // Wave 0 (no controller has opened a wave): the default hosts keep `from`, the
        // explicit test group keeps its own block.
        let d = &c.desired_ref("dc1-host-1")[0];
        assert_eq!((d.version.as_str(), d.md5.as_str()), ("5.1.3", "490ac172dabecc867289079d48e84a66"));
        assert_eq!(c.desired_ref("bj-web-7")[0].version, "5.1.4");
        // Defaults for everything but `from` and `waves`.
        let minimal = ROLLOUT.split("  soak").next().unwrap();
        let r = DesiredConfig::parse(minimal, "agents.toml").unwrap().agents()[0].rollout.clone().unwrap();
        assert_eq!((r.policy.soak_seconds, r.policy.deadline_seconds, r.max_in_flight_per_relay, r.window), (900, 1200, None, None));
    }

    #[test]
    fn hosts_get_the_target_once_their_wave_is_open() {
        let c = DesiredConfig::parse(ROLLOUT, "agents.toml").unwrap();
        assert_eq!(c.rollouts().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["falcon-agent"]);
        let hosts: Vec<String> = (0..2000).map(|i| format!("dc1-host-{i}")).collect();
        let version = |h: &str, fleet: &[usize]| {
            let class = c.class_of(h);
            c.variant(class, c.rollout_mask(h, class, fleet))[0].version.clone()
        };
        // Wave 0: everybody keeps `from`; the last wave open: everybody has the target.
        assert!(hosts.iter().all(|h| version(h, &[0]) == "5.1.3" && version(h, &[]) == "5.1.3"));
        assert!(hosts.iter().all(|h| version(h, &[4]) == "5.1.5"));
        // Wave 1 (1 %): exactly the hosts whose bucket is under 100, by the documented rule.
        for h in &hosts {
            let in_first = crate::rollout::bucket("falcon-agent", "5.1.5", h) < 100;
            assert_eq!(version(h, &[1]) == "5.1.5", in_first, "{h}");
        }
        let first = hosts.iter().filter(|h| version(h, &[1]) == "5.1.5").count();
        let second = hosts.iter().filter(|h| version(h, &[2]) == "5.1.5").count();
        assert!(first > 0 && first < second && second < 2000, "{first} {second}");
        // The target carries the default's digest; `from` its own.
        let h = hosts.iter().find(|h| version(h, &[1]) == "5.1.5").unwrap();
        let class = c.class_of(h);
        assert_eq!(c.variant(class, c.rollout_mask(h, class, &[1]))[0].md5, "");
        assert_eq!(c.variant(class, 0)[0].md5, "490ac172dabecc867289079d48e84a66");
        // The others group is outside the waves, whatever the fleet's wave.
        let web = c.class_of("bj-web-7");
        assert_eq!(c.rollout_mask("bj-web-7", web, &[4]), 0);
        assert_eq!(c.variant(web, 0xf)[0].version, "5.1.4");
        // abort: everybody back to `from`.
        let aborted = DesiredConfig::parse(&ROLLOUT.replace("  soak", "  abort = true\n  soak"), "a.toml").unwrap();
        assert!(hosts.iter().all(|h| aborted.rollout_mask(h, aborted.class_of(h), &[4]) == 0));
    }

    #[test]
    fn at_most_four_rollouts() {
        let agent = |i: usize| {
            format!(
                "[[agent]]\nname = \"a{i}\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\n\
                 default = {{ version = \"2\" }}\n[agent.rollout]\nfrom = {{ version = \"1\" }}\nwaves = [100]\n"
            )
        };
        let four: String = (0..4).map(agent).collect();
        assert_eq!(DesiredConfig::parse(&four, "x").unwrap().rollouts().count(), 4);
        let five = format!("{four}{}", agent(4));
        assert_eq!(error_of(&five), "agents.toml:43:1: at most 4 agents may have a rollout at once");
    }

    #[test]
    fn the_enrollment_table_names_revoked_hosts_and_times() {
        use crate::enroll::HostRevocation;
        let base =
            "[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\ndefault = { version = \"1\" }\n";
        let c = DesiredConfig::parse(base, "agents.toml").unwrap();
        assert!(c.revocations().is_empty(), "no [enrollment]: nothing withdrawn");
        let text = format!(
            "{base}[enrollment]\nnot_before = 2026-01-01T00:00:00Z\nhosts.\"web-1\" = {{ not_before = 2026-01-02T00:00:00.25+01:00 }}\nhosts.\"web-9\" = {{ revoked = true }}\n"
        );
        let c = DesiredConfig::parse(&text, "agents.toml").unwrap();
        let r = c.revocations();
        assert_eq!(r.not_before_ms(), 1_767_225_600_000);
        assert_eq!(r.host("web-1"), Some(HostRevocation::NotBefore(1_767_308_400_250)));
        assert_eq!(r.host("web-9"), Some(HostRevocation::Revoked));
        assert_eq!(r.host("web-2"), None);
        let with = |tail: &str| DesiredConfig::parse(&format!("{base}[enrollment]\n{tail}\n"), "agents.toml").unwrap_err().to_string();
        assert!(
            with("hosts.\"a b\" = { revoked = true }").contains("bad hostname \"a b\""),
            "{}",
            with("hosts.\"a b\" = { revoked = true }")
        );
        assert!(with("hosts.h = { }").contains("either revoked = true or not_before"));
        assert!(with("hosts.h = { revoked = true, not_before = 2026-01-01T00:00:00Z }").contains("either revoked"));
        assert!(with("not_before = 2026-01-01T00:00:00").contains("not_before must be a full time with its offset"));
        assert!(with("revoked = [\"h\"]").contains("unknown field"), "{}", with("revoked = [\"h\"]"));
    }

    #[test]
    fn bad_rollout_blocks_name_line_and_column() {
        let with = |from: &str, to: &str| error_of(&ROLLOUT.replace(from, to));
        assert_eq!(with("waves = [1, 5, 25, 100]", "waves = [1, 5, 25, 90]"), "agents.toml:12:11: waves must end at 100");
        assert_eq!(
            with("waves = [1, 5, 25, 100]", "waves = [1, 5, 5, 100]"),
            "agents.toml:12:18: waves are percents of the fleet, 1-100, strictly increasing; got 5"
        );
        assert_eq!(
            with("waves = [1, 5, 25, 100]", "waves = [0, 100]"),
            "agents.toml:12:12: waves are percents of the fleet, 1-100, strictly increasing; got 0"
        );
        let sixteen: Vec<String> = (85..=100).map(|p| p.to_string()).collect();
        assert_eq!(with("waves = [1, 5, 25, 100]", &format!("waves = [{}]", sixteen.join(", "))), "agents.toml:12:11: at most 15 waves");
        assert_eq!(with("advance_at = 0.95", "advance_at = 1.5"), "agents.toml:14:16: must be a ratio in (0, 1], got 1.5");
        assert_eq!(
            with("soak = \"15m\"", "soak = \"15 minutes\""),
            r#"agents.toml:13:10: duration must be a number with s, m, h or d ("15m"), got "15 minutes""#
        );
        assert_eq!(with("min_sample = 20", "min_sample = 0"), "agents.toml:16:51: min_sample must be at least 1, got 0");
        assert_eq!(
            with("max_in_flight_per_relay = 200", "max_in_flight_per_relay = 0"),
            "agents.toml:17:29: max_in_flight_per_relay must be at least 1, got 0"
        );
        assert_eq!(
            with("tz = \"UTC\"", "tz = \"CET\""),
            r#"agents.toml:18:12: tz must be "UTC" or a fixed offset like "+08:00", got "CET""#
        );
        assert_eq!(
            with("version = \"5.1.3\"", "version = \"5.1.5\""),
            r#"agents.toml:11:10: rollout.from is the default version "5.1.5": nothing to roll out"#
        );
        let unknown = with("  soak", "  speed = 3\n  soak");
        assert!(unknown.starts_with("agents.toml:13:3: unknown field `speed`"), "{unknown}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = DesiredConfig::load(Path::new("/nonexistent/agents.toml")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/agents.toml: "), "{e}");
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agents.toml");
        let c = DesiredConfig::load(&path).unwrap();
        assert!(!c.agents().is_empty());
        assert!(c.class_count() > 1, "the example shows a prefix override");
    }
}
