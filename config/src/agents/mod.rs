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

mod check;

use check::{Checker, RawFile};

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
mod tests;
