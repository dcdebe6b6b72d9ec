//! Fleet status gathered from every node held up (`peers::Peers`), passing that set along:
//! each node answers for the hosts whose first ring candidate in the set it is
//! (`fleet::Scope::Held`): its own hosts, and while their owner is missing, the failover
//! copies it holds for it. Summaries travel as counts, so no per-host traffic crosses between
//! nodes and no host is counted twice. A node that is not up or does not answer makes the
//! reply partial.

use std::sync::Arc;

use ops_config::rollout::NodeReport;
use serde::{Deserialize, Serialize};

use super::Refusal;
use crate::fleet::{self, AgentQuery, Scope, Summary};
use crate::metrics::PEER_ERRORS;
use crate::{Cluster, Node, unix_now};

/// What a gathering node asks of a peer (`POST /internal/{rows,summary}/{agent}`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatherRequest {
    /// Bit i: node i takes part (see `fleet::Scope::Held`).
    pub present: u64,
    /// The hash of the gathering node's cluster map (absent from nodes before membership
    /// changes online: the map served).
    #[serde(default)]
    pub cluster: Option<String>,
    /// Summaries only: count the hosts whose name starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// This node's summary of `agent` in `scope` (blocking).
pub fn local_summary(node: &Node, agent: &str, scope: Scope<'_>, prefix: Option<&str>) -> Summary {
    let loaded = node.desired.current();
    fleet::summarize(&node.store, &AgentQuery::new(agent, &loaded, unix_now(), node.settings.stale_after_seconds), scope, prefix)
}

/// Who takes part in a gather: the nodes held up now (this one included), as a mask, and
/// the others, which make the answer partial; and the map they were taken from, whose hash
/// every peer is asked by (`View`).
pub struct Gather {
    pub present: u64,
    pub missing: Vec<usize>,
    pub nodes: usize,
    pub me: usize,
    pub cluster: Option<Arc<Cluster>>,
}

impl Gather {
    pub fn now(node: &Node) -> Gather {
        match node.cluster() {
            None => Gather { present: 1, missing: Vec::new(), nodes: 1, me: 0, cluster: None },
            Some(c) => {
                let present = c.alive.mask();
                let nodes = c.map.nodes.len();
                Gather { present, missing: (0..nodes).filter(|i| present & (1 << i) == 0).collect(), nodes, me: c.me, cluster: Some(c) }
            }
        }
    }

    pub fn asks(&self, i: usize) -> bool {
        self.present & (1 << i) != 0
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("peers exist only in a cluster")
    }

    /// What a peer is asked for its part: the nodes taking part and the map's hash.
    pub fn request(&self, prefix: Option<&str>) -> GatherRequest {
        GatherRequest {
            present: self.present,
            cluster: self.cluster.as_ref().map(|c| c.map.hash.clone()),
            prefix: prefix.map(str::to_owned),
        }
    }

    /// How this node answers its own part.
    pub fn own_view(&self, node: &Node) -> Result<View, Refusal> {
        View::resolve(node, self.cluster.as_ref().map(|c| c.map.hash.as_str()))
    }
}

/// The cluster map a node answers a gather by. While no membership change is on, the map
/// served, by the hosts' `owned` flags (a flag per host: the fast path); during a change, the
/// ring of the map the gathering node named (current, previous or next), host by host, so
/// every node of one gather counts by one ring (`membership`).
pub enum View {
    All,
    Owned(Arc<Cluster>),
    Ring(Arc<Cluster>),
}

impl View {
    pub fn resolve(node: &Node, hash: Option<&str>) -> Result<View, Refusal> {
        let Some(m) = &node.cluster else { return Ok(View::All) };
        let current = m.current();
        let hash = hash.unwrap_or(&current.map.hash);
        if hash == current.map.hash && !m.changing() {
            return Ok(View::Owned(current));
        }
        m.by_hash(hash).map(View::Ring).ok_or_else(|| {
            Refusal::Conflict(format!("node {} does not know cluster map {hash} (it serves {})", node.settings.id, current.map.hash))
        })
    }

    /// What this node scans when a gather by the nodes in `present` asks it.
    pub fn scope(&self, present: u64) -> Scope<'_> {
        match self {
            View::All => Scope::All,
            View::Owned(c) => Scope::held(&c.ring, c.me, present | (1 << c.me)),
            View::Ring(c) => Scope::Ring { ring: &c.ring, me: c.me, present: present | (1 << c.me) },
        }
    }
}

/// A peer did not answer a gather: it counts as down until the prober hears it again.
fn peer_lost(c: &Cluster, peer: usize) {
    c.alive.set(peer, &c.map.nodes[peer].id, false);
}

pub fn peer_request(node: &Node, c: &Cluster, method: reqwest::Method, peer: usize, path: &str) -> reqwest::RequestBuilder {
    let url = c.map.url(peer, path);
    let mut req = c.client.request(method, url).timeout(node.settings.peer_timeout);
    if let Some(token) = node.peer_token() {
        req = req.bearer_auth(token);
    }
    req
}

pub fn peer_failed(c: &Cluster, peer: usize, what: &str, error: impl std::fmt::Display) {
    let id = c.map.nodes[peer].id.as_str();
    peer_lost(c, peer);
    metrics::counter!(PEER_ERRORS, "query" => what.to_owned()).increment(1);
    tracing::warn!(peer = id, query = what, %error, "peer did not answer a status query");
}

pub async fn peer_json<T: serde::de::DeserializeOwned>(c: &Cluster, req: reqwest::RequestBuilder, peer: usize, what: &str) -> Option<T> {
    match req.send().await {
        Ok(r) if r.status().is_success() => match r.json::<T>().await {
            Ok(v) => Some(v),
            Err(e) => {
                peer_failed(c, peer, what, e);
                None
            }
        },
        // A peer on another map (a membership change between two steps) is up: the answer is
        // partial this once, and nobody is marked down for it.
        Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => {
            metrics::counter!(PEER_ERRORS, "query" => what.to_owned()).increment(1);
            let why = r.text().await.unwrap_or_default();
            tracing::warn!(peer = %c.map.nodes[peer].id, query = what, %why, "peer answers by another cluster map");
            None
        }
        Ok(r) => {
            peer_failed(c, peer, what, r.status());
            None
        }
        Err(e) => {
            peer_failed(c, peer, what, e);
            None
        }
    }
}

pub fn missing_ids(gather: &Gather, missing: &[usize]) -> Vec<String> {
    gather.cluster.as_ref().map_or_else(Vec::new, |c| missing.iter().map(|&i| c.map.nodes[i].id.clone()).collect())
}

/// `agent`'s summary from every node held up (counts merged), partial when some did not
/// answer.
pub async fn summary(node: Arc<Node>, agent: String, prefix: Option<String>) -> Result<SummaryReply, Refusal> {
    let gather = Arc::new(Gather::now(&node));
    let own_view = Arc::new(gather.own_view(&node)?);
    let present = gather.present;
    let parts = futures_util::future::join_all((0..gather.nodes).filter(|&i| gather.asks(i)).map(|i| {
        let node = node.clone();
        let agent = agent.clone();
        let prefix = prefix.clone();
        let (gather, view) = (gather.clone(), own_view.clone());
        async move {
            let part = if i == gather.me {
                tokio::task::spawn_blocking(move || local_summary(&node, &agent, view.scope(present), prefix.as_deref())).await.ok()
            } else {
                let body = gather.request(prefix.as_deref());
                let req =
                    peer_request(&node, gather.cluster(), reqwest::Method::POST, i, &format!("/internal/summary/{agent}")).json(&body);
                peer_json::<Summary>(gather.cluster(), req, i, "summary").await
            };
            (i, part)
        }
    }))
    .await;
    let (total, missing) = merge(&agent, gather.missing.clone(), parts);
    Ok(SummaryReply { summary: total, partial: !missing.is_empty(), missing_nodes: missing_ids(&gather, &missing) })
}

/// The parts of a summary gather added up: the total and the nodes missing (those not asked
/// and those that did not answer), in order.
pub fn merge(agent: &str, mut missing: Vec<usize>, parts: impl IntoIterator<Item = (usize, Option<Summary>)>) -> (Summary, Vec<usize>) {
    let mut total = Summary::empty(agent);
    for (i, part) in parts {
        match part {
            Some(s) => total.merge(&s),
            None => missing.push(i),
        }
    }
    missing.sort_unstable();
    (total, missing)
}

pub use ops_config::status::{AgentView, HostView, SummaryReply};

/// This node's view of one host, if it holds it.
pub fn local_host(node: &Node, hostname: &str) -> Option<HostView> {
    let loaded = node.desired.current();
    let now = unix_now();
    let stale_after = node.settings.stale_after_seconds;
    node.store.with_host(hostname, |shard, slot, h| {
        let syms = node.store.symbols().reader();
        let mut names: Vec<String> = shard.agents(h).iter().map(|a| syms.resolve(a.name).to_owned()).collect();
        for a in loaded.config.agents() {
            if !names.contains(&a.name) {
                names.push(a.name.clone());
            }
        }
        let agents = names
            .iter()
            .filter_map(|name| {
                let q = AgentQuery::new(name, &loaded, now, stale_after);
                let sym = syms.get(name);
                let real = sym.and_then(|s| shard.agent(h, s)).map(|p| shard.agents(h)[p]);
                let row = q.row(shard, slot, h, sym, &syms)?;
                let view = AgentView {
                    name: name.clone(),
                    version: row.version.to_owned(),
                    status: row.status.to_owned(),
                    run_state: row.run_state.to_owned(),
                    desired_version: row.desired.map_or(String::new(), |d| d.version.to_owned()),
                    desired_cmd: row.desired.map_or(String::new(), |d| d.cmd.to_owned()),
                    state: row.state.as_str().to_owned(),
                    last_error: row.last_error.map(str::to_owned),
                    pinned: row.pinned.map(str::to_owned),
                    timestamp: real.map(|a| a.timestamp),
                    run_user: real.map(|a| syms.resolve(a.run_user).to_owned()),
                    work_dir: real.map(|a| syms.resolve(a.work_dir).to_owned()),
                };
                Some(view)
            })
            .collect();
        let age = now.saturating_sub(h.last_seen);
        HostView {
            hostname: h.name.to_string(),
            ip: shard.ip(slot, h).to_string(),
            run_user: syms.resolve(h.run_user).to_owned(),
            updater_version: syms.resolve(h.updater_version).to_owned(),
            last_seen: h.last_seen,
            age_seconds: age,
            stale: age > stale_after,
            relay: node.store.relay_name(h.relay),
            authenticated: h.authenticated(),
            agents,
        }
    })
}

/// One host: the newest copy among every node held up that holds it.
pub async fn host(node: &Node, hostname: &str) -> Option<HostView> {
    let mut best = local_host(node, hostname);
    if let Some(c) = node.cluster() {
        let up = c.alive.mask();
        let peers = futures_util::future::join_all(c.peers().filter(|i| up & (1 << i) != 0).map(|i| {
            let req = peer_request(node, &c, reqwest::Method::GET, i, &format!("/internal/host/{hostname}"));
            let c = &c;
            async move { peer_json::<Option<HostView>>(c, req, i, "host").await.flatten() }
        }))
        .await;
        best = newest(best, peers.into_iter().flatten());
    }
    best
}

/// The newest of a host's copies (by its last report); the first of equals.
pub fn newest(mut best: Option<HostView>, copies: impl IntoIterator<Item = HostView>) -> Option<HostView> {
    for v in copies {
        if best.as_ref().is_none_or(|b| v.last_seen > b.last_seen) {
            best = Some(v);
        }
    }
    best
}

/// Every node's rollout report by id, in map order: this node's own, the peers' asked now
/// (None: it did not answer).
pub async fn rollout_reports(node: &Arc<Node>) -> Vec<(String, Option<NodeReport>)> {
    let own = node.controller.report();
    let mut reports: Vec<(String, Option<NodeReport>)> = Vec::new();
    match node.cluster() {
        None => reports.push((node.settings.id.clone(), Some((*own).clone()))),
        Some(c) => {
            let c: &crate::Cluster = &c;
            let asks = c.map.nodes.iter().enumerate().map(|(i, n)| {
                let node = node.clone();
                let own = own.clone();
                let id = n.id.clone();
                async move {
                    if i == c.me {
                        return (id, Some((*own).clone()));
                    }
                    let req = peer_request(&node, c, reqwest::Method::GET, i, "/internal/rollout");
                    (id, peer_json::<NodeReport>(c, req, i, "rollout").await)
                }
            });
            reports = futures_util::future::join_all(asks).await;
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(agent: &str, groups: &[(&str, &str, u64)], relays: &[(&str, u64, u64, u32)]) -> Summary {
        let mut s = Summary::empty(agent);
        for (version, state, hosts) in groups {
            s.add_group(version, "", state, *hosts);
        }
        for (relay, hosts, silent, last) in relays {
            s.add_relay(relay, *hosts, *silent, *last);
        }
        s.finish();
        s
    }

    #[test]
    fn a_summary_gather_adds_the_parts_and_lists_every_node_missing_once_in_order() {
        let a = part("falcon-agent", &[("5.1.0", "ok", 3), ("5.0.0", "upgrading", 1)], &[("relay-1", 4, 0, 0)]);
        let b = part("falcon-agent", &[("5.1.0", "ok", 2), ("5.0.0", "stale", 2)], &[("relay-1", 2, 2, 90), ("relay-2", 2, 0, 0)]);
        // Node 3 was not held up when the gather began; node 1 did not answer it.
        let (total, missing) = merge("falcon-agent", vec![3], [(0, Some(a.clone())), (1, None), (2, Some(b.clone()))]);
        assert_eq!(missing, vec![1, 3]);
        assert_eq!(total.hosts, a.hosts + b.hosts);
        assert_eq!(total.by_state["ok"], 5);
        assert_eq!(total.by_state["stale"], 2);
        assert_eq!(total.by_state["upgrading"], 1);
        let relay1 = total.relays.iter().find(|r| r.relay == "relay-1").unwrap();
        assert_eq!((relay1.hosts, relay1.silent, relay1.last_heard), (6, 2, 90));
        // Order does not matter: the same parts the other way round give the same counts.
        let (again, _) = merge("falcon-agent", vec![], [(2, Some(b)), (0, Some(a))]);
        assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&total).unwrap());
        let (nothing, all) = merge("falcon-agent", vec![], [(0, None), (1, None)]);
        assert_eq!((nothing.hosts, all), (0, vec![0, 1]));
    }

    fn copy(last_seen: u32, relay: &str) -> HostView {
        serde_json::from_value(serde_json::json!({
            "hostname": "web-1", "ip": "10.0.0.1", "runUser": "ops", "updaterVersion": "1", "lastSeen": last_seen,
            "ageSeconds": 0, "stale": false, "relay": relay, "agents": []
        }))
        .unwrap()
    }

    #[test]
    fn a_hosts_newest_copy_wins_and_an_equal_one_does_not_replace_it() {
        let best = newest(Some(copy(100, "own")), [copy(90, "older"), copy(120, "newer"), copy(120, "equal")]).unwrap();
        assert_eq!((best.last_seen, best.relay.as_str()), (120, "newer"));
        let from_peer = newest(None, [copy(5, "peer")]).unwrap();
        assert_eq!(from_peer.relay, "peer");
        assert!(newest(None, []).is_none());
    }

    #[test]
    fn a_gather_request_reads_from_a_node_that_sends_no_map_or_prefix() {
        let old: GatherRequest = serde_json::from_str(r#"{"present": 5}"#).unwrap();
        assert_eq!(old, GatherRequest { present: 5, cluster: None, prefix: None });
        let full = GatherRequest { present: 3, cluster: Some("abc".into()), prefix: Some("web-".into()) };
        assert_eq!(serde_json::from_value::<GatherRequest>(serde_json::to_value(&full).unwrap()).unwrap(), full);
    }
}
