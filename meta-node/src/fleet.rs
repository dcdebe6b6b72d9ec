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

/// A deployment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Upgrading,
    Stale,
    Error,
    Pinned,
}

impl State {
    pub const ALL: [State; 5] = [State::Ok, State::Upgrading, State::Stale, State::Error, State::Pinned];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Upgrading => "upgrading",
            State::Stale => "stale",
            State::Error => "error",
            State::Pinned => "pinned",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

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

/// One group of a summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Group {
    pub version: String,
    pub status: String,
    pub state: String,
    pub hosts: u64,
}

/// Counts of one agent's deployments across the hosts held.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub agent: String,
    pub hosts: u64,
    pub converged: u64,
    pub converged_ratio: f64,
    /// Hosts by the version (and cmd) they should run.
    pub desired: Vec<DesiredCount>,
    pub by_state: BTreeMap<String, u64>,
    pub groups: Vec<Group>,
    /// The same hosts by the relay their last report came through, with how many of them are
    /// stale: a datacenter that lost its network is one entry, not a host each. Most silent
    /// first. (Absent from nodes before silence by relay.)
    #[serde(default)]
    pub relays: Vec<RelayCount>,
}

/// A summary's hosts behind one relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayCount {
    /// The relay's id ("" for reports that came straight to a meta node).
    pub relay: String,
    pub hosts: u64,
    /// Hosts stale (not heard from for `stale_after`): `byState.stale` split by relay.
    pub silent: u64,
    /// The newest report among the silent hosts (unix seconds; 0 when none is silent): about
    /// when the relay, or its datacenter, went quiet.
    pub last_heard: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DesiredCount {
    pub version: String,
    pub cmd: String,
    pub hosts: u64,
}

/// Counts by version × run state × state, without resolving a string per host; with
/// `prefix`, of the hosts whose name starts with it only.
pub fn summarize(store: &Store, q: &AgentQuery<'_>, scope: Scope<'_>, prefix: Option<&str>) -> Summary {
    // The per-host work avoids strings: versions compare as symbols (the desired version of
    // each class interned once), run states come from a per-thread cache keyed by status
    // symbol, and the shards are split over the machine's cores.
    const RUN_STATES: [&str; 3] = ["started", "stopped", "absent"];
    // The symbols read here and counted by are resolved at the end.
    let _pause = store.symbols().pause();
    let agent_sym = store.symbols().reader().get(q.agent);
    let desired_syms: Vec<Option<(Option<Sym>, bool)>> = {
        let syms = store.symbols().reader();
        (0..q.variants()).map(|v| q.desired_of(v).map(|d| (syms.get(&d.version), d.cmd == "start"))).collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    // Groups and distinct statuses are few: small vectors searched linearly beat hashing.
    // Per relay index: hosts, silent hosts, newest report of a silent one.
    type PerRelay = Vec<(u64, u64, u32)>;
    type Partial = (Vec<((Sym, u8, State), u64)>, Vec<u64>, PerRelay);
    let scan = |t: usize| -> Partial {
        let mut groups: Vec<((Sym, u8, State), u64)> = Vec::new();
        let mut by_class = vec![0u64; q.variants()];
        let mut relays: PerRelay = Vec::new();
        let mut started_cache: Vec<(Sym, bool)> = Vec::new();
        for i in (t..SHARDS).step_by(threads) {
            let shard = store.shard(i);
            let syms = store.symbols().reader();
            for (slot, host) in shard.hosts().filter(|(_, h)| scope.includes(h) && prefix.is_none_or(|p| h.name.starts_with(p))) {
                let agents = shard.agents(host);
                let pos = agent_sym.and_then(|s| shard.agent(host, s));
                let class = if q.agent_index.is_some() { q.variant(host) } else { 0 };
                let desired = desired_syms.get(class).copied().flatten();
                if pos.is_none() && desired.is_none() {
                    continue;
                }
                let real = pos.map(|p| agents[p]);
                let run_state: u8 = match real {
                    None => 2,
                    Some(a) => {
                        let started = match started_cache.iter().find(|(s, _)| *s == a.status) {
                            Some(&(_, started)) => started,
                            None => {
                                let started = ops_config::rollout::is_started(syms.resolve(a.status));
                                started_cache.push((a.status, started));
                                started
                            }
                        };
                        if started { 0 } else { 1 }
                    }
                };
                // Errors and pins are rare: look them up only when the host has a note.
                let noted = pos.filter(|&p| host.note_mask & (1 << p) != 0);
                let state = if q.now.saturating_sub(host.last_seen) > q.stale_after {
                    State::Stale
                } else if noted.is_some_and(|p| shard.last_error(slot, host, p).is_some()) {
                    State::Error
                } else if noted.is_some_and(|p| shard.pinned(slot, host, p).is_some()) {
                    State::Pinned
                } else {
                    match desired {
                        Some((dv, start)) if real.is_none_or(|a| Some(a.version) != dv) || start != (run_state == 0) => State::Upgrading,
                        _ => State::Ok,
                    }
                };
                let r = usize::from(host.relay);
                if r >= relays.len() {
                    relays.resize(r + 1, (0, 0, 0));
                }
                let per = &mut relays[r];
                per.0 += 1;
                if state == State::Stale {
                    per.1 += 1;
                    per.2 = per.2.max(host.last_seen);
                }
                let key = (real.map_or(Sym::EMPTY, |a| a.version), run_state, state);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, n)) => *n += 1,
                    None => groups.push((key, 1)),
                }
                if desired.is_some() {
                    by_class[class] += 1;
                }
            }
        }
        (groups, by_class, relays)
    };
    let partials: Vec<Partial> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|t| s.spawn(move || scan(t))).collect();
        let mut out = vec![scan(0)];
        out.extend(handles.into_iter().map(|h| h.join().expect("summary scan thread")));
        out
    });
    let mut groups: hashbrown::HashMap<(Sym, u8, State), u64> = hashbrown::HashMap::new();
    let mut desired_by_class = vec![0u64; q.variants()];
    let mut per_relay: PerRelay = Vec::new();
    for (g, c, r) in partials {
        for (k, n) in g {
            *groups.entry(k).or_default() += n;
        }
        for (total, n) in desired_by_class.iter_mut().zip(c) {
            *total += n;
        }
        if per_relay.len() < r.len() {
            per_relay.resize(r.len(), (0, 0, 0));
        }
        for (total, (hosts, silent, last)) in per_relay.iter_mut().zip(r) {
            *total = (total.0 + hosts, total.1 + silent, total.2.max(last));
        }
    }
    let mut relays: Vec<RelayCount> = per_relay
        .into_iter()
        .enumerate()
        .filter(|(_, (hosts, _, _))| *hosts > 0)
        .map(|(i, (hosts, silent, last_heard))| RelayCount { relay: store.relay_name(i as u16), hosts, silent, last_heard })
        .collect();
    sort_relays(&mut relays);
    let mut desired: hashbrown::HashMap<(String, String), u64> = hashbrown::HashMap::new();
    for (v, n) in desired_by_class.iter().enumerate() {
        if let Some(d) = q.desired_of(v).filter(|_| *n > 0) {
            *desired.entry((d.version.clone(), d.cmd.clone())).or_default() += n;
        }
    }
    let syms = store.symbols().reader();
    let mut by_state: BTreeMap<String, u64> = State::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect();
    let mut out: Vec<Group> = groups
        .into_iter()
        .map(|((version, run_state, state), n)| {
            *by_state.entry(state.as_str().to_owned()).or_default() += n;
            Group {
                version: syms.resolve(version).to_owned(),
                status: RUN_STATES[usize::from(run_state)].to_owned(),
                state: state.as_str().to_owned(),
                hosts: n,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.version, &a.status, &a.state).cmp(&(&b.version, &b.status, &b.state)));
    let hosts: u64 = by_state.values().sum();
    let converged = by_state.get("ok").copied().unwrap_or(0);
    let mut desired: Vec<DesiredCount> = desired.into_iter().map(|((version, cmd), hosts)| DesiredCount { version, cmd, hosts }).collect();
    desired.sort_by(|a, b| b.hosts.cmp(&a.hosts).then_with(|| a.version.cmp(&b.version)));
    Summary {
        agent: q.agent.to_owned(),
        hosts,
        converged,
        converged_ratio: if hosts == 0 { 1.0 } else { converged as f64 / hosts as f64 },
        desired,
        by_state,
        groups: out,
        relays,
    }
}

fn sort_relays(relays: &mut [RelayCount]) {
    relays.sort_by(|a, b| b.silent.cmp(&a.silent).then_with(|| b.hosts.cmp(&a.hosts)).then_with(|| a.relay.cmp(&b.relay)));
}

impl Summary {
    /// An empty summary of `agent`.
    pub fn empty(agent: &str) -> Summary {
        Summary {
            agent: agent.to_owned(),
            hosts: 0,
            converged: 0,
            converged_ratio: 1.0,
            desired: Vec::new(),
            by_state: State::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect(),
            groups: Vec::new(),
            relays: Vec::new(),
        }
    }

    /// Adds the counts of another summary of the same agent (another node's hosts).
    pub fn merge(&mut self, other: &Summary) {
        for g in &other.groups {
            self.add_group(&g.version, &g.status, &g.state, g.hosts);
        }
        for d in &other.desired {
            self.add_desired(&d.version, &d.cmd, d.hosts);
        }
        for r in &other.relays {
            self.add_relay(&r.relay, r.hosts, r.silent, r.last_heard);
        }
        self.finish();
    }

    /// Adds one host's row: the slow way the tests check `summarize` against.
    #[cfg(test)]
    pub fn add_row(&mut self, row: &OwnedRow) {
        self.add_group(&row.version, &row.run_state, &row.state, 1);
        if !row.desired_version.is_empty() {
            self.add_desired(&row.desired_version, &row.desired_cmd, 1);
        }
        let silent = row.state == "stale";
        self.add_relay(&row.relay, 1, u64::from(silent), if silent { row.last_seen } else { 0 });
        self.finish();
    }

    pub(crate) fn add_group(&mut self, version: &str, status: &str, state: &str, n: u64) {
        match self.groups.iter_mut().find(|g| g.version == version && g.status == status && g.state == state) {
            Some(g) => g.hosts += n,
            None => self.groups.push(Group { version: version.to_owned(), status: status.to_owned(), state: state.to_owned(), hosts: n }),
        }
    }

    fn add_desired(&mut self, version: &str, cmd: &str, n: u64) {
        match self.desired.iter_mut().find(|d| d.version == version && d.cmd == cmd) {
            Some(d) => d.hosts += n,
            None => self.desired.push(DesiredCount { version: version.to_owned(), cmd: cmd.to_owned(), hosts: n }),
        }
    }

    pub(crate) fn add_relay(&mut self, relay: &str, hosts: u64, silent: u64, last_heard: u32) {
        match self.relays.iter_mut().find(|r| r.relay == relay) {
            Some(r) => {
                r.hosts += hosts;
                r.silent += silent;
                r.last_heard = r.last_heard.max(last_heard);
            }
            None => self.relays.push(RelayCount { relay: relay.to_owned(), hosts, silent, last_heard }),
        }
    }

    /// Recomputes totals and orders from the groups.
    pub(crate) fn finish(&mut self) {
        sort_relays(&mut self.relays);
        self.groups.sort_by(|a, b| (&a.version, &a.status, &a.state).cmp(&(&b.version, &b.status, &b.state)));
        self.desired.sort_by(|a, b| b.hosts.cmp(&a.hosts).then_with(|| a.version.cmp(&b.version)));
        self.by_state = State::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect();
        for g in &self.groups {
            *self.by_state.entry(g.state.clone()).or_default() += g.hosts;
        }
        self.hosts = self.by_state.values().sum();
        self.converged = self.by_state.get("ok").copied().unwrap_or(0);
        self.converged_ratio = if self.hosts == 0 { 1.0 } else { self.converged as f64 / self.hosts as f64 };
    }
}

/// A row with its own strings (the tests' reference for summaries).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnedRow {
    pub hostname: String,
    pub ip: String,
    pub version: String,
    pub status: String,
    pub run_state: String,
    pub desired_version: String,
    pub desired_cmd: String,
    pub last_seen: u32,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    #[serde(default)]
    pub relay: String,
}

#[cfg(test)]
impl OwnedRow {
    pub fn from_row(row: &Row<'_>) -> OwnedRow {
        OwnedRow {
            hostname: row.hostname.to_owned(),
            ip: row.ip.to_string(),
            version: row.version.to_owned(),
            status: row.status.to_owned(),
            run_state: row.run_state.to_owned(),
            desired_version: row.desired.map_or(String::new(), |d| d.version.to_owned()),
            desired_cmd: row.desired.map_or(String::new(), |d| d.cmd.to_owned()),
            last_seen: row.last_seen,
            state: row.state.as_str().to_owned(),
            last_error: row.last_error.map(str::to_owned),
            pinned: row.pinned.map(str::to_owned),
            relay: row.relay.to_owned(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RowJson<'a> {
    hostname: &'a str,
    ip: String,
    version: &'a str,
    status: &'a str,
    desired_version: &'a str,
    desired_cmd: &'a str,
    last_seen: u32,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    relay: &'a str,
}

/// Appends a row as one JSON object with a comma before it: streams of rows from several
/// sources concatenate, and the writer of the array drops the very first comma.
pub fn write_json_row(row: &Row<'_>, buf: &mut Vec<u8>) {
    buf.push(b',');
    let r = RowJson {
        hostname: row.hostname,
        ip: row.ip.to_string(),
        version: row.version,
        status: row.status,
        desired_version: row.desired.map_or("", |d| d.version),
        desired_cmd: row.desired.map_or("", |d| d.cmd),
        last_seen: row.last_seen,
        state: row.state.as_str(),
        last_error: row.last_error,
        pinned: row.pinned,
        relay: row.relay,
    };
    // Writing into a Vec cannot fail, and the row has no map with non-string keys.
    let _ = serde_json::to_writer(&mut *buf, &r);
}

/// The header line of the text listing.
pub const TEXT_HEADER: &str = "#hostname\tip\tversion\tstatus\tdesired\tstate\tlast_seen\tlast_error\n";

fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) { s.replace(char::is_control, " ").into() } else { s.into() }
}

/// Appends a row as one tab-separated line.
pub fn write_text_row(row: &Row<'_>, buf: &mut Vec<u8>) {
    let status = if row.status.is_empty() { row.run_state } else { row.status };
    let _ = writeln!(
        buf,
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        row.hostname,
        if matches!(row.ip, crate::store::IpText::Str("")) { "-".to_string() } else { row.ip.to_string() },
        if row.version.is_empty() { "-" } else { row.version },
        clean(status),
        row.desired.map_or("-", |d| d.version),
        row.state.as_str(),
        row.last_seen,
        clean(row.last_error.unwrap_or("-")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops_config::{DesiredConfig, Heartbeat};
    use ops_serve::desired::Loaded;

    const AGENTS: &str = "[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\n\
        default = { version = \"2\", cmd = \"start\" }\n[[agent.others]]\nprefix = \"p-\"\nversion = \"3\"\ncmd = \"stop\"\n";

    /// The fast summary must count exactly what the per-row logic of the listings says.
    #[test]
    fn summary_agrees_with_rows() {
        let loaded = Loaded::new(DesiredConfig::parse(AGENTS, "t").unwrap(), 1);
        let store = Store::new();
        let now = 10_000;
        for i in 0..5000u32 {
            let host = if i % 3 == 0 { format!("p-{i}") } else { format!("h-{i}") };
            let version = ["1", "2", "3"][(i % 7 % 3) as usize];
            let status = ["started", "stoped", "started pid 12", ""][(i % 4) as usize];
            let err = if i % 11 == 0 { r#","lastError":"boom""# } else { "" };
            let pin = ["", "", "", "", "", r#","pinned":"hold""#, r#","pinned":"1""#][(i % 7) as usize];
            let agents =
                if i % 13 == 0 { String::new() } else { format!(r#"{{"name":"a","version":"{version}","status":"{status}"{err}{pin}}}"#) };
            let body = format!(r#"{{"hostname":"{host}","realAgents":[{agents}]}}"#);
            let hb = Heartbeat::parse(body.as_bytes()).unwrap();
            let seen = if i % 17 == 0 { now - 5000 } else { now };
            // Half the hosts resolved under an older generation: the class is recomputed.
            let tags = crate::store::Tags {
                class: loaded.config.class_of(&host),
                generation: if i % 2 == 0 { 1 } else { 0 },
                relay: store.relay_index(["", "dc1-1", "dc2-1"][(i % 3) as usize]),
                ..Default::default()
            };
            store.upsert_tagged(&hb, seen, tags, true).unwrap();
        }
        let q = AgentQuery::new("a", &loaded, now, 900);
        let fast = summarize(&store, &q, Scope::All, None);
        let silent: u64 = fast.relays.iter().map(|r| r.silent).sum();
        assert_eq!(silent, fast.by_state["stale"], "silent by relay splits the stale count");
        assert_eq!(fast.relays.len(), 3, "{:?}", fast.relays);
        assert_eq!(fast.relays.iter().map(|r| r.hosts).sum::<u64>(), fast.hosts);
        assert!(fast.relays.iter().all(|r| r.last_heard == now - 5000), "{:?}", fast.relays);
        let mut slow = Summary::empty("a");
        scan_rows(&store, &q, Scope::All, &Filter::default(), |row, _| slow.add_row(&OwnedRow::from_row(row)), |_| true);
        assert_eq!(fast, slow);
        // The same for one prefix group.
        let only_p = summarize(&store, &q, Scope::All, Some("p-"));
        let mut slow_p = Summary::empty("a");
        let filter = Filter { prefix: Some("p-".into()), ..Filter::default() };
        scan_rows(&store, &q, Scope::All, &filter, |row, _| slow_p.add_row(&OwnedRow::from_row(row)), |_| true);
        assert_eq!(only_p, slow_p);
        assert_eq!(only_p.hosts, 1667);
        assert_eq!(fast.hosts, 5000);
        assert!(fast.by_state.values().all(|&n| n > 0), "{:?}", fast.by_state);
    }

    /// Three nodes that each hold every host (the owner its own, the others as copies), as
    /// after failovers in every direction: for every set of nodes answering a gather, the
    /// held scopes of the nodes in the set count each host exactly once, from its owner when
    /// the owner is in the set.
    #[test]
    fn held_scopes_count_each_host_once_for_every_set_of_nodes() {
        let loaded = Loaded::new(DesiredConfig::parse(AGENTS, "t").unwrap(), 1);
        let ring = ops_config::Ring::new([("meta-1", 1), ("meta-2", 1), ("meta-3", 1)], 100);
        let stores: Vec<Store> = (0..3).map(|_| Store::new()).collect();
        let hosts: Vec<String> = (0..3000).map(|i| format!("h-{i}")).collect();
        for h in &hosts {
            let body = format!(r#"{{"hostname":"{h}","realAgents":[{{"name":"a","version":"1"}}]}}"#);
            let hb = Heartbeat::parse(body.as_bytes()).unwrap();
            for (i, store) in stores.iter().enumerate() {
                store.upsert(&hb, 100, loaded.config.class_of(h), 1, ring.owner(h) == i).unwrap();
            }
        }
        let q = AgentQuery::new("a", &loaded, 100, 900);
        for present in 1u64..8 {
            let mut counted = vec![0u32; hosts.len()];
            let mut total = 0;
            for (i, store) in stores.iter().enumerate().filter(|(i, _)| present & (1 << i) != 0) {
                let scope = Scope::held(&ring, i, present);
                total += summarize(store, &q, scope, None).hosts;
                scan_rows(
                    store,
                    &q,
                    scope,
                    &Filter::default(),
                    |row, _| {
                        let k: usize = row.hostname[2..].parse().unwrap();
                        counted[k] += 1;
                        if present & (1 << ring.owner(row.hostname)) != 0 {
                            assert_eq!(ring.owner(row.hostname), i, "{} listed by its owner while the owner answers", row.hostname);
                        }
                    },
                    |_| true,
                );
            }
            assert_eq!(total, hosts.len() as u64, "set {present:b}");
            assert!(counted.iter().all(|&c| c == 1), "set {present:b}: every host listed exactly once");
        }
        // During a membership change each node answers by the ring the gather names, whatever
        // its owned flags say: by the old ring (3 nodes) or a new one (a 4th node holding
        // every host), each host is counted once.
        let grown = ops_config::Ring::new([("meta-1", 1), ("meta-2", 1), ("meta-3", 1), ("meta-4", 1)], 100);
        let fourth = Store::new();
        for h in &hosts {
            let body = format!(r#"{{"hostname":"{h}","realAgents":[{{"name":"a","version":"1"}}]}}"#);
            fourth.upsert(&Heartbeat::parse(body.as_bytes()).unwrap(), 100, loaded.config.class_of(h), 1, grown.owner(h) == 3).unwrap();
        }
        for (ring, nodes) in [(&ring, 3usize), (&grown, 4)] {
            let present = (1u64 << nodes) - 1;
            let total: u64 = stores
                .iter()
                .chain([&fourth])
                .take(nodes)
                .enumerate()
                .map(|(i, store)| summarize(store, &q, Scope::Ring { ring, me: i, present }, None).hosts)
                .sum();
            assert_eq!(total, hosts.len() as u64, "by the {nodes}-node ring");
        }
    }
}
