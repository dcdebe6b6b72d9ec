//! The meta nodes' read side, typed once for the servers that write it and the clients
//! (`opsctl`, `ops-bench`) that read it: `/status/summary/{agent}` ([`SummaryReply`]),
//! `/status/host/{name}` ([`HostView`]), `/health` ([`Health`]) and `/rollout/{agent}`
//! ([`RolloutView`]).
//!
//! Field names on the wire are camelCase. Every type round-trips through serde unchanged
//! (tests below); a field a client does not know is ignored, so a newer node's reply still
//! reads, and a field an older node does not send takes its default.
//!
//! "Generation" here: [`Health::config_generation`] is the *config generation* (the number
//! each apply writes); [`Health::cluster_generation`] is the *map generation*.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::WaveReport;

/// A deployment's state (`stale` wins over `error`, over `pinned`, over `upgrading`, else `ok`:
/// the meta node's `fleet` module decides which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

/// One group of a summary: hosts of one version × run state × state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub version: String,
    pub status: String,
    pub state: String,
    pub hosts: u64,
}

/// Counts of one agent's deployments across the hosts held (one node's part, or every
/// node's merged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub agent: String,
    pub hosts: u64,
    pub converged: u64,
    pub converged_ratio: f64,
    /// Hosts by the version (and cmd) they should run.
    pub desired: Vec<DesiredCount>,
    /// Hosts per [`State`] name (every state present, 0 when none).
    pub by_state: BTreeMap<String, u64>,
    pub groups: Vec<Group>,
    /// The same hosts by the relay their last report came through, with how many of them are
    /// stale: a datacenter that lost its network is one entry, not a host each. Most silent
    /// first. (Absent from nodes before silence by relay.)
    #[serde(default)]
    pub relays: Vec<RelayCount>,
}

/// A summary's hosts behind one relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Hosts that should run one version with one cmd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredCount {
    pub version: String,
    pub cmd: String,
    pub hosts: u64,
}

/// Orders relays most silent first, then most hosts, then by id.
pub fn sort_relays(relays: &mut [RelayCount]) {
    relays.sort_by(|a, b| b.silent.cmp(&a.silent).then_with(|| b.hosts.cmp(&a.hosts)).then_with(|| a.relay.cmp(&b.relay)));
}

fn zero_states() -> BTreeMap<String, u64> {
    State::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect()
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
            by_state: zero_states(),
            groups: Vec::new(),
            relays: Vec::new(),
        }
    }

    /// Hosts in `state`.
    pub fn in_state(&self, state: State) -> u64 {
        self.by_state.get(state.as_str()).copied().unwrap_or(0)
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

    pub fn add_group(&mut self, version: &str, status: &str, state: &str, n: u64) {
        match self.groups.iter_mut().find(|g| g.version == version && g.status == status && g.state == state) {
            Some(g) => g.hosts += n,
            None => self.groups.push(Group { version: version.to_owned(), status: status.to_owned(), state: state.to_owned(), hosts: n }),
        }
    }

    pub fn add_desired(&mut self, version: &str, cmd: &str, n: u64) {
        match self.desired.iter_mut().find(|d| d.version == version && d.cmd == cmd) {
            Some(d) => d.hosts += n,
            None => self.desired.push(DesiredCount { version: version.to_owned(), cmd: cmd.to_owned(), hosts: n }),
        }
    }

    pub fn add_relay(&mut self, relay: &str, hosts: u64, silent: u64, last_heard: u32) {
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
    pub fn finish(&mut self) {
        sort_relays(&mut self.relays);
        self.groups.sort_by(|a, b| (&a.version, &a.status, &a.state).cmp(&(&b.version, &b.status, &b.state)));
        self.desired.sort_by(|a, b| b.hosts.cmp(&a.hosts).then_with(|| a.version.cmp(&b.version)));
        self.by_state = zero_states();
        for g in &self.groups {
            *self.by_state.entry(g.state.clone()).or_default() += g.hosts;
        }
        self.hosts = self.by_state.values().sum();
        self.converged = self.in_state(State::Ok);
        self.converged_ratio = if self.hosts == 0 { 1.0 } else { self.converged as f64 / self.hosts as f64 };
    }
}

/// `GET /status/summary/{agent}`: the summary over every node that answered, partial when
/// some did not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryReply {
    #[serde(flatten)]
    pub summary: Summary,
    #[serde(default)]
    pub partial: bool,
    #[serde(default)]
    pub missing_nodes: Vec<String>,
}

/// Whether a gathered reply (a listing's JSON, say) is whole: only these two fields of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Completeness {
    #[serde(default)]
    pub partial: bool,
    #[serde(default)]
    pub missing_nodes: Vec<String>,
}

/// One agent of a [`HostView`]: real against desired, with its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub name: String,
    pub version: String,
    pub status: String,
    /// `started`, `stopped` or `absent`.
    pub run_state: String,
    pub desired_version: String,
    pub desired_cmd: String,
    /// A [`State`] name.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
}

/// `GET /status/host/{name}` (and a peer's `/internal/host/{name}`): one host as its
/// newest report left it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    pub hostname: String,
    pub ip: String,
    pub run_user: String,
    pub updater_version: String,
    pub last_seen: u32,
    pub age_seconds: u32,
    pub stale: bool,
    /// The relay its last report came through ("" for none).
    #[serde(default)]
    pub relay: String,
    /// Its last report carried a checked host credential (`ops_config::enroll`).
    #[serde(default)]
    pub authenticated: bool,
    pub agents: Vec<AgentView>,
}

/// `GET /health`: one meta node's config, map and hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub status: String,
    pub id: String,
    pub config_hash: String,
    /// Grows with every `POST /config/apply` (0: never applied).
    pub config_generation: u64,
    /// In a cluster: a peer at the same generation serves another config (last probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_diverged: Option<bool>,
    /// In a cluster: a peer at the same cluster generation serves another map, outside a
    /// membership change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_diverged: Option<bool>,
    pub hosts: u64,
    pub uptime_seconds: u64,
    pub version: String,
    /// In a cluster: the content hash of `cluster.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_hash: Option<String>,
    /// In a cluster: grows with every membership change (0: never changed online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_generation: Option<u64>,
    /// In a cluster, with `?detail=1`: hosts held here for a node that was down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_copies: Option<u64>,
    /// In a cluster: every meta node of the map and whether it answers this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<HealthNode>,
}

/// A meta node of the map as [`Health`] lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthNode {
    pub id: String,
    pub url: String,
    pub up: bool,
}

/// One node's part of [`RolloutView`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutNode {
    pub id: String,
    /// Answered this query; when false the figures are the last the relays were told.
    pub reachable: bool,
    pub approved_wave: usize,
    pub wave_opened_at: u64,
    pub halted: bool,
    pub halt_reason: String,
    pub verdict: String,
}

/// `GET /rollout/{agent}`: one staged rollout over every node, partial when some did not
/// answer (their last published state is used).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    pub agent: String,
    pub from: String,
    pub target: String,
    /// The lowest approved wave over every node: what relays answer by.
    pub fleet_wave: usize,
    pub waves: Vec<WaveReport>,
    pub halted: bool,
    /// `node: reason` of each node that halted.
    pub halted_by: Vec<String>,
    /// When the fleet's current wave opened (unix seconds; 0 before the first).
    pub wave_opened_at: u64,
    /// Seconds to 100 % if every wave converges within its soak (None when halted, paused,
    /// aborted or outside the window).
    pub estimated_seconds_to_full: Option<u64>,
    pub paused: bool,
    pub abort: bool,
    pub soak_seconds: u64,
    pub deadline_seconds: u64,
    pub advance_at: f64,
    pub failed_ratio: f64,
    pub min_sample: u64,
    pub max_in_flight_per_relay: Option<u32>,
    pub nodes: Vec<RolloutNode>,
    pub partial: bool,
    pub missing_nodes: Vec<String>,
}

/// `GET /status/agents`: the agents of the config a node serves, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentEntry>,
}

/// One agent of [`AgentList`]: its default version and cmd, the prefixes of its `others`
/// groups, and whether it has a staged rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEntry {
    pub name: String,
    pub version: String,
    pub cmd: String,
    pub prefixes: Vec<String>,
    pub rollout: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) -> serde_json::Value {
        let json = serde_json::to_value(v).unwrap();
        let back: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&back, v);
        json
    }

    #[test]
    fn summary_reply_is_flat_and_round_trips() {
        let mut s = Summary::empty("falcon-agent");
        s.add_group("5.1.4", "started", "ok", 3);
        s.add_group("5.1.3", "started", "upgrading", 1);
        s.add_desired("5.1.4", "start", 4);
        s.add_relay("dc1-1", 4, 1, 1_700_000_000);
        s.finish();
        assert_eq!((s.hosts, s.converged, s.in_state(State::Upgrading)), (4, 3, 1));
        let reply = SummaryReply { summary: s, partial: true, missing_nodes: vec!["m2".into()] };
        let json = round_trip(&reply);
        assert_eq!(json["byState"]["ok"], 3);
        assert_eq!(json["convergedRatio"], 0.75);
        assert_eq!(json["missingNodes"][0], "m2");
        assert_eq!(json["relays"][0]["lastHeard"], 1_700_000_000u32);
        // A part from a node before silence by relay: no `relays`.
        let old: Summary =
            serde_json::from_str(r#"{"agent":"a","hosts":0,"converged":0,"convergedRatio":1.0,"desired":[],"byState":{},"groups":[]}"#)
                .unwrap();
        assert!(old.relays.is_empty());
    }

    #[test]
    fn states_name_themselves() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(State::parse("broken"), None);
        assert_eq!(Summary::empty("a").by_state.len(), 5);
    }

    #[test]
    fn host_health_and_rollout_round_trip() {
        let host = HostView {
            hostname: "h1".into(),
            ip: "10.0.0.1".into(),
            agents: vec![
                AgentView { name: "a".into(), state: "ok".into(), last_error: Some("boom".into()), ..AgentView::default() },
                AgentView { name: "b".into(), run_state: "absent".into(), ..AgentView::default() },
            ],
            ..HostView::default()
        };
        let json = round_trip(&host);
        assert_eq!(json["agents"][0]["lastError"], "boom");
        assert!(json["agents"][1].get("lastError").is_none(), "absent notes are left out: {json}");
        let health = Health {
            status: "ok".into(),
            id: "m1".into(),
            cluster_generation: Some(3),
            nodes: vec![HealthNode { id: "m1".into(), url: "http://127.0.0.1:1".into(), up: true }],
            ..Health::default()
        };
        let json = round_trip(&health);
        assert_eq!(json["clusterGeneration"], 3);
        assert!(json.get("failoverCopies").is_none());
        // A node outside a cluster sends none of the cluster fields.
        let single: Health = serde_json::from_str(
            r#"{"status":"ok","id":"m","configHash":"x","configGeneration":0,"hosts":2,"uptimeSeconds":1,"version":"0.1.0"}"#,
        )
        .unwrap();
        assert_eq!((single.hosts, single.cluster_hash, single.nodes.len()), (2, None, 0));
        let view = RolloutView {
            agent: "a".into(),
            waves: vec![WaveReport { percent: 1, targeted: 10, ..WaveReport::default() }],
            nodes: vec![RolloutNode { id: "m1".into(), reachable: true, ..RolloutNode::default() }],
            estimated_seconds_to_full: Some(60),
            ..RolloutView::default()
        };
        let json = round_trip(&view);
        assert_eq!(json["fleetWave"], 0);
        assert_eq!(json["nodes"][0]["reachable"], true);
        assert_eq!(json["waves"][0]["targeted"], 10);
    }
}
