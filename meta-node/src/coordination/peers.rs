//! What a meta node knows of its peers: which ones answer now.
//!
//! A prober asks every peer's `/health` each `probe_interval` (with that as its timeout), and a
//! peer that fails a status query or a hand-back is marked down at once. Two things follow
//! from this view, both through [`ops_config::Ring::first_in`]:
//! - the status gather asks only the nodes it holds up, and each of them answers for the hosts
//!   whose first candidate among those nodes it is (`fleet::Scope::Held`), so a host is counted
//!   once whether its owner is up or its copies stand in for it;
//! - failover copies go to the first candidate that is up (`handoff`), which is the owner once
//!   it is back.
//!
//! A probe that finds a peer refusing connections, or something else on its address, marks it
//! down at once; one that merely times out marks it down only at the second timeout in a row,
//! so a peer slow for a moment (a loaded machine) does not make every status answer partial.
//!
//! The probe also compares config and cluster generations and hashes (the divergence gauges),
//! and brings this node along when a peer holds a newer generation of either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Node;
use crate::metrics::{CONFIG_DIVERGED, PEER_ERRORS, PEERS_UP};

/// Which nodes of the cluster map answer, as this node last saw them.
pub struct Peers {
    up: Box<[AtomicBool]>,
    me: usize,
}

impl Peers {
    /// Every node is taken as up until a probe or a query says otherwise.
    pub fn new(nodes: usize, me: usize) -> Self {
        Peers { up: (0..nodes).map(|_| AtomicBool::new(true)).collect(), me }
    }

    /// The nodes up now, this one always included (bit i: node i).
    pub fn mask(&self) -> u64 {
        ops_serve::forward::mask_of(&self.up) | (1 << self.me)
    }

    /// Whether node `i` answered this node's last probe or query (this node: always).
    pub fn is_up(&self, i: usize) -> bool {
        i == self.me || self.up.get(i).is_some_and(|u| u.load(Ordering::Relaxed))
    }

    /// Records what a probe or a query found; logs a change.
    pub fn set(&self, node: usize, id: &str, up: bool) {
        if node == self.me {
            return;
        }
        if self.up[node].swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(peer = id, "peer answers again");
            } else {
                tracing::warn!(peer = id, "peer does not answer; its hosts are counted from their failover copies");
            }
        }
    }
}

/// What one probe of a peer found.
enum Probe {
    /// It answered as itself, with its `/health`.
    Up(serde_json::Value),
    /// It did not answer within the period.
    Slow,
    /// Refused, failed, or something else answered on its address.
    Down,
}

/// Probes every peer each `period` until `stop`.
pub async fn probe(node: std::sync::Arc<Node>, period: Duration, stop: CancellationToken) {
    if node.cluster.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Timeouts in a row, per node of the map `slow_map`.
    let (mut slow, mut slow_map) = (Vec::new(), String::new());
    // Per node of that map: the newest config and cluster generations it offered that this
    // node refused (not asked again until it offers a newer one; the other peers still are,
    // so a peer that claims a huge generation holds nobody back).
    let (mut refused, mut refused_map) = (Vec::new(), Vec::new());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(c) = node.cluster() else { return };
        if c.map.hash != slow_map {
            (slow, slow_map) = (vec![0u8; c.map.nodes.len()], c.map.hash.clone());
            (refused, refused_map) = (vec![0u64; c.map.nodes.len()], vec![0u64; c.map.nodes.len()]);
        }
        let mine = node.desired.current().config.hash().to_owned();
        let answers = futures_util::future::join_all(c.peers().map(|i| {
            let req = c.client.get(c.map.url(i, "/health")).timeout(period);
            let id = c.map.nodes[i].id.as_str();
            async move {
                // Only the node itself counts: whatever else answers on its address (a process
                // that took the port of a dead node) does not.
                let answer = match req.send().await {
                    Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                        Ok(v) if v["id"] == id => Probe::Up(v),
                        Ok(_) => Probe::Down,
                        Err(e) if e.is_timeout() => Probe::Slow,
                        Err(_) => Probe::Down,
                    },
                    Err(e) if e.is_timeout() => Probe::Slow,
                    _ => Probe::Down,
                };
                (i, answer)
            }
        }))
        .await;
        let (mut diverged, mut cluster_diverged) = (false, false);
        let mut newer: Option<(usize, u64)> = None;
        let mut newer_map: Option<(usize, u64)> = None;
        let my_generation = node.generations.current();
        let changing = node.cluster.as_ref().is_some_and(|m| m.changing());
        // Only prepared here: a peer serving a newer map may be the coordinator that got to
        // commit while this node missed it (`membership::catch_up`).
        let finishing = node.cluster.as_ref().is_some_and(|m| m.committed_unfinished());
        let my_map_generation = node.cluster.as_ref().map_or(0, |m| m.generation());
        for (i, answer) in answers {
            let up = match answer {
                Probe::Up(health) => {
                    let generation = health["configGeneration"].as_u64().unwrap_or(0);
                    // One generation, two files: diverged. A peer behind is catching up, and
                    // one ahead is taken from below.
                    diverged |= generation == my_generation && health["configHash"].as_str().is_some_and(|h| h != mine);
                    // The same for the cluster map, outside a membership change.
                    let map_generation = health["clusterGeneration"].as_u64().unwrap_or(0);
                    cluster_diverged |=
                        !changing && map_generation == my_map_generation && health["clusterHash"].as_str().is_some_and(|h| h != c.map.hash);
                    if generation > my_generation && generation > refused[i] && newer.is_none_or(|(_, g)| generation > g) {
                        newer = Some((i, generation));
                    }
                    if !finishing
                        && map_generation > my_map_generation
                        && map_generation > refused_map[i]
                        && newer_map.is_none_or(|(_, g)| map_generation > g)
                    {
                        newer_map = Some((i, map_generation));
                    }
                    slow[i] = 0;
                    true
                }
                Probe::Slow => {
                    slow[i] += 1;
                    slow[i] < 2 && c.alive.is_up(i)
                }
                Probe::Down => false,
            };
            if !up {
                metrics::counter!(PEER_ERRORS, "query" => "health").increment(1);
            }
            c.alive.set(i, &c.map.nodes[i].id, up);
        }
        metrics::gauge!(CONFIG_DIVERGED).set(if diverged { 1.0 } else { 0.0 });
        metrics::gauge!(crate::metrics::CLUSTER_DIVERGED).set(if cluster_diverged { 1.0 } else { 0.0 });
        node.config_diverged.store(diverged, Ordering::Relaxed);
        node.cluster_diverged.store(cluster_diverged, Ordering::Relaxed);
        // A peer holds a newer generation (this node missed an apply): take its file, checked
        // as any apply is, before serving it.
        if let Some((i, generation)) = newer
            && !catch_up(&node, &c, i, generation).await
        {
            // Not asked again until it offers a newer one.
            refused[i] = generation;
        }
        // A peer serves a newer cluster map (this node missed a commit): take it as a change
        // would, here alone.
        if let Some((i, generation)) = newer_map
            && !catch_up_map(&node, &c, i, generation).await
        {
            refused_map[i] = generation;
        }
        metrics::gauge!(PEERS_UP).set(f64::from(c.alive.mask().count_ones()));
    }
}

/// Pulls peer `i`'s cluster map (generation `generation`) and serves it, if it checks. False
/// when this node refuses that map (not asked again until a newer one); a fetch that failed
/// is tried again at the next probe.
async fn catch_up_map(node: &std::sync::Arc<Node>, c: &crate::Cluster, i: usize, generation: u64) -> bool {
    let id = &c.map.nodes[i].id;
    let fetched = async {
        let r = fetch(c, i, "/cluster/map").await?;
        let served = r.headers().get(ops_config::wire::MAP_GENERATION_HEADER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if served != Some(generation) {
            return Err(format!("it now serves generation {served:?}"));
        }
        let sig = r.headers().get(ops_config::trust::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok::<_, String>((r.text().await.map_err(|e| e.to_string())?, sig))
    }
    .await;
    let (text, sig) = match fetched {
        Ok(v) => v,
        Err(error) => {
            tracing::debug!(peer = %id, generation, %error, "cannot fetch a peer's newer cluster map; trying at the next probe");
            return true;
        }
    };
    match crate::membership::catch_up(node, &text, sig.as_deref(), generation).await {
        Ok(s) => {
            tracing::warn!(peer = %id, generation, hash = %s.hash, "this node missed a membership change: took the newer cluster map from a peer");
            true
        }
        Err(crate::membership::CatchUpError::Busy(error)) => {
            tracing::info!(peer = %id, generation, %error, "a peer serves a newer cluster map; taking it once the change here ends");
            true
        }
        Err(error) => {
            tracing::error!(peer = %id, generation, %error, "a peer serves a newer cluster map, which this node refuses");
            false
        }
    }
}

/// GET `path` of peer `i`: the answer when it is a success.
async fn fetch(c: &crate::Cluster, i: usize, path: &str) -> Result<reqwest::Response, String> {
    let r = c.client.get(c.map.url(i, path)).timeout(Duration::from_secs(10)).send().await.map_err(|e| e.to_string())?;
    if r.status().is_success() { Ok(r) } else { Err(format!("HTTP {}", r.status())) }
}

/// Pulls generation `generation` of `agents.toml` from peer `i` and serves it, if it checks.
async fn catch_up(node: &std::sync::Arc<Node>, c: &crate::Cluster, i: usize, generation: u64) -> bool {
    let id = &c.map.nodes[i].id;
    let fetched = async {
        let r = fetch(c, i, "/config/desired").await?;
        let sig = r.headers().get(ops_config::trust::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = r.text().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((text, sig))
    }
    .await;
    let result = match fetched {
        Ok((text, sig)) => super::apply::local_step(node, Some(generation), &text, sig.as_deref()).await,
        Err(error) => {
            // Not a refusal: asked again at the next probe.
            tracing::debug!(peer = %id, generation, %error, "cannot fetch a peer's newer config; trying at the next probe");
            return true;
        }
    };
    match result {
        Ok(s) => {
            tracing::warn!(peer = %id, generation, hash = %s.hash, "this node missed a config apply: took the newer generation from a peer");
            true
        }
        Err(error) => {
            tracing::error!(peer = %id, generation, %error, "a peer serves a newer config generation, which this node refuses");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_always_holds_this_node() {
        let p = Peers::new(3, 1);
        assert_eq!(p.mask(), 0b111);
        p.set(2, "meta-3", false);
        p.set(1, "meta-2", false);
        assert_eq!(p.mask(), 0b011, "a node never marks itself down");
        p.set(2, "meta-3", true);
        assert_eq!(p.mask(), 0b111);
    }
}
