//! The fleet as operators see it: each host's deployment of one agent (real against desired,
//! with a state), and summaries over them. Pure reads of the store and the loaded config.
//!
//! States: `stale` (not heard from for `stale_after`) wins over `error` (the agent reported a
//! `lastError`), which wins over `pinned` (an operator pinned the agent on the host, in the
//! updater's `pin.toml`: it is held whatever the config says), which wins over `upgrading`
//! (real version or run state differs from desired, agent absent included), else `ok`.

use std::collections::BTreeMap;
use std::io::Write;

use ops_config::{ClassId, DesiredConfig};
use serde::Serialize;

use crate::store::{AgentState, Host, SHARDS, Shard, Store, Sym, Symbols};
use ops_serve::desired::Loaded;

pub use ops_config::status::State;

/// `started` when `./control status` said so (seed 003), else `stopped`; `absent` when the host
/// does not report the agent at all.
pub fn run_state(status: &str) -> &'static str {
    if ops_config::rollout::is_started(status) { "started" } else { "stopped" }
}

/// Filters of `/status/json|text`: every given one must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub version: Option<String>,
    /// `started`/`stopped`/`absent` match the run state; anything else the exact status text.
    pub status: Option<String>,
    pub prefix: Option<String>,
    pub state: Option<State>,
    /// The relay the host's last report came through ("" for none: straight to a meta node).
    pub relay: Option<String>,
}

/// Which of the hosts held a scan looks at.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'s> {
    /// Every host held (standalone).
    All,
    /// In a cluster: the hosts this node answers for in a gather by the nodes in `present`
    /// (bit i: node i, this one included). Those are the hosts it owns, and the failover
    /// copies whose first candidate in `present` it is, which happens only while their owner
    /// is not in `present`. Every node scanning with the same `present` thus takes each host
    /// at most once, and once the cluster is whole each host exactly once, from its owner.
    Held {
        ring: &'s ops_config::Ring,
        me: usize,
        present: u64,
        /// Whether any node is missing from `present` (if none is, no copy is ever taken).
        copies: bool,
    },
    /// During a membership change (`crate::membership`): the hosts whose first candidate in
    /// `present` on `ring` is `me`, host by host, whatever their `owned` flag says.
    Ring { ring: &'s ops_config::Ring, me: usize, present: u64 },
}

impl<'s> Scope<'s> {
    /// The scope of node `me` in a gather by the nodes in `present`.
    pub fn held(ring: &'s ops_config::Ring, me: usize, present: u64) -> Self {
        let all = if ring.len() >= 64 { u64::MAX } else { (1u64 << ring.len()) - 1 };
        Scope::Held { ring, me, present, copies: present & all != all }
    }

    pub fn includes(&self, host: &Host) -> bool {
        match *self {
            Scope::All => true,
            Scope::Held { ring, me, present, copies } => host.owned() || (copies && ring.first_in(&host.name, present) == Some(me)),
            Scope::Ring { ring, me, present } => ring.first_in(&host.name, present) == Some(me),
        }
    }
}

/// What a query needs of the config for one agent, resolved once per query.
pub struct AgentQuery<'c> {
    pub agent: &'c str,
    config: &'c DesiredConfig,
    /// The loaded config's generation as host records keep it (`store::short_generation`).
    generation: u16,
    agent_index: Option<usize>,
    /// The agent's rollout number, if it has a rollout: hosts told its target want that.
    rollout: Option<usize>,
    now: u32,
    stale_after: u32,
}

/// The desired side of a deployment.
#[derive(Debug, Clone, Copy)]
pub struct Desired<'c> {
    pub version: &'c str,
    pub cmd: &'c str,
}

/// One host's deployment of the queried agent.
pub struct Row<'a> {
    pub hostname: &'a str,
    pub ip: crate::store::IpText<'a>,
    pub version: &'a str,
    pub status: &'a str,
    pub run_state: &'static str,
    pub desired: Option<Desired<'a>>,
    pub last_seen: u32,
    pub last_error: Option<&'a str>,
    /// The host's local pin of the agent (`hold` or a version).
    pub pinned: Option<&'a str>,
    pub state: State,
    /// The relay its last report came through ("" for none; set by [`scan_rows`]).
    pub relay: &'a str,
}

impl<'c> AgentQuery<'c> {
    pub fn new(agent: &'c str, loaded: &'c Loaded, now: u32, stale_after: u32) -> Self {
        AgentQuery {
            agent,
            config: &loaded.config,
            generation: crate::store::short_generation(loaded.generation),
            agent_index: loaded.config.agent_index(agent),
            rollout: loaded.config.rollout_of(agent),
            now,
            stale_after,
        }
    }

    /// Number of [`variant`](Self::variant)s: each class, told its rollout's target or not.
    fn variants(&self) -> usize {
        self.config.class_count() * 2
    }

    /// What decides a host's desired state of the agent: its class, and whether its last
    /// answer told it the target of the agent's rollout.
    fn variant(&self, host: &Host) -> usize {
        let told = self.rollout.is_some_and(|r| host.told & (1 << r) != 0);
        self.class_of(host).0 as usize * 2 + usize::from(told)
    }

    /// The agent's desired state for hosts of a variant (None when the config lacks the agent).
    fn desired_of(&self, variant: usize) -> Option<&'c ops_config::DesiredAgent> {
        let i = self.agent_index?;
        let class = ClassId((variant / 2) as u32);
        let target = if variant % 2 == 1 { self.rollout.and_then(|r| self.config.class_target(class, r)) } else { None };
        Some(target.unwrap_or(&self.config.class(class)[i]))
    }

    fn class_of(&self, host: &Host) -> ClassId {
        if host.generation == self.generation { ClassId(u32::from(host.class)) } else { self.config.class_of(&host.name) }
    }

    /// The row of one host, or None when the host neither reports nor should run the agent.
    pub fn row<'a>(
        &'a self,
        shard: &'a Shard,
        slot: u32,
        host: &'a Host,
        agent_sym: Option<Sym>,
        syms: &'a Symbols<'_>,
    ) -> Option<Row<'a>> {
        let agents = shard.agents(host);
        let pos = agent_sym.and_then(|s| shard.agent(host, s));
        let desired = self.desired_of(self.variant(host)).map(|d| Desired { version: d.version.as_str(), cmd: d.cmd.as_str() });
        if pos.is_none() && desired.is_none() {
            return None;
        }
        let real: Option<&AgentState> = pos.map(|p| &agents[p]);
        let version = real.map_or("", |a| syms.resolve(a.version));
        let status = real.map_or("", |a| syms.resolve(a.status));
        let run_state = if real.is_some() { run_state(status) } else { "absent" };
        let last_error = pos.and_then(|p| shard.last_error(slot, host, p));
        let pinned = pos.and_then(|p| shard.pinned(slot, host, p)).map(|p| syms.resolve(p));
        let state = if self.now.saturating_sub(host.last_seen) > self.stale_after {
            State::Stale
        } else if last_error.is_some() {
            State::Error
        } else if pinned.is_some() {
            State::Pinned
        } else {
            match desired {
                Some(d) if real.is_none() || d.version != version || (d.cmd == "start") != (run_state == "started") => State::Upgrading,
                _ => State::Ok,
            }
        };
        Some(Row {
            hostname: &host.name,
            ip: shard.ip(slot, host),
            version,
            status,
            run_state,
            desired,
            last_seen: host.last_seen,
            last_error,
            pinned,
            state,
            relay: "",
        })
    }
}

impl Filter {
    pub fn matches(&self, row: &Row<'_>) -> bool {
        self.prefix.as_deref().is_none_or(|p| row.hostname.starts_with(p))
            && self.version.as_deref().is_none_or(|v| v == row.version)
            && self.status.as_deref().is_none_or(|s| match s {
                "started" | "stopped" | "absent" => s == row.run_state,
                other => other == row.status,
            })
            && self.state.is_none_or(|s| s == row.state)
    }
}

/// Calls `emit` with each shard's matching rows, one shard at a time; `emit` gets the rows
/// formatted into a buffer and returns false to stop (the client went away).
pub fn scan_rows(
    store: &Store,
    q: &AgentQuery<'_>,
    scope: Scope<'_>,
    filter: &Filter,
    mut format: impl FnMut(&Row<'_>, &mut Vec<u8>),
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> u64 {
    let mut count = 0;
    let _pause = store.symbols().pause();
    let agent_sym = store.symbols().reader().get(q.agent);
    let relays = store.relay_names();
    // A relay this node never heard of matches no host here.
    let relay_filter: Option<Option<u16>> = filter.relay.as_deref().map(|id| relays.iter().position(|r| &**r == id).map(|i| i as u16));
    for i in 0..SHARDS {
        let mut buf = Vec::new();
        {
            let shard = store.shard(i);
            let syms = store.symbols().reader();
            for (slot, host) in shard.hosts() {
                if !scope.includes(host) {
                    continue;
                }
                if let Some(p) = &filter.prefix
                    && !host.name.starts_with(p.as_str())
                {
                    continue;
                }
                if relay_filter.is_some_and(|want| want != Some(host.relay)) {
                    continue;
                }
                if let Some(mut row) = q.row(&shard, slot, host, agent_sym, &syms)
                    && filter.matches(&row)
                {
                    row.relay = relays.get(usize::from(host.relay)).map_or("", |r| r);
                    format(&row, &mut buf);
                    count += 1;
                }
            }
        }
        if !buf.is_empty() && !emit(buf) {
            break;
        }
    }
    count
}

mod format;
mod summary;
#[cfg(test)]
mod tests;

pub use format::*;
pub use summary::*;
