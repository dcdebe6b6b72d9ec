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
//! The probe also compares config hashes (the divergence gauge).

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
        relay::forward::mask_of(&self.up) | (1 << self.me)
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

/// Probes every peer each `period` until `stop`.
pub async fn probe(node: std::sync::Arc<Node>, period: Duration, stop: CancellationToken) {
    let Some(c) = &node.cluster else { return };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mine = node.desired.current().config.hash().to_owned();
        let answers = futures_util::future::join_all(c.peers().map(|i| {
            let req = c.client.get(c.map.url(i, "/health")).timeout(period);
            let id = c.map.nodes[i].id.as_str();
            async move {
                // Only the node itself counts: whatever else answers on its address (a process
                // that took the port of a dead node) does not.
                let hash = match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        r.json::<serde_json::Value>().await.ok().filter(|v| v["id"] == id).map(|v| v["configHash"].clone())
                    }
                    _ => None,
                };
                (i, hash)
            }
        }))
        .await;
        let mut diverged = false;
        for (i, hash) in answers {
            c.alive.set(i, &c.map.nodes[i].id, hash.is_some());
            match hash {
                Some(h) => diverged |= h.as_str().is_some_and(|h| h != mine),
                None => metrics::counter!(PEER_ERRORS, "query" => "health").increment(1),
            }
        }
        metrics::gauge!(CONFIG_DIVERGED).set(if diverged { 1.0 } else { 0.0 });
        metrics::gauge!(PEERS_UP).set(f64::from(c.alive.mask().count_ones()));
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
