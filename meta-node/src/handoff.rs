//! Hinted hand-off: failover copies go home.
//!
//! While a node is down, relays send its hosts' reports to the next ring candidate that is
//! up, which keeps them as failover copies (`Host::owned == false`). Every `period`, a node
//! holding copies sends each one to the first candidate of its host that is up now
//! ([`ops_config::Ring::first_in`] over [`crate::coordination::peers::Peers::mask`]): the owner once it
//! answers again, or a candidate before this node that came back first. The copies travel as
//! compact batches through the ordinary `/internal/batch`, marked as handed back: the receiver
//! keeps a copy only where it is strictly newer than what it holds (on a tie within the same
//! second its own report wins), and a copy is dropped once taken unless it reported again
//! meanwhile. Copies whose first up candidate is this node stay: they stand in for their
//! owner in status.
//!
//! Cost while nothing failed: one count of the copies per period (0, nothing else). While a
//! node is down: a scan of the copies when the view of the peers changes, after a round that
//! sent something, every [`GROWN_TICKS`] periods while copies keep arriving, and every
//! [`RESCAN_TICKS`] periods otherwise.

use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use ops_serve::forward::{Entry, Pending};
use tokio_util::sync::CancellationToken;

use crate::Node;
use crate::metrics::{FAILOVER_COPIES, HANDOFF_HOSTS};
use crate::store::SHARDS;

/// Periods between scans of the copies when nothing changed.
const RESCAN_TICKS: u32 = 10;

/// Periods between scans while the copies only grow.
const GROWN_TICKS: u32 = 2;

/// Shards scanned per blocking step: bounds the records built at once (a 1M-host fleet with a
/// node down holds ~170k copies per survivor, ~11k of them per 16 shards).
const SHARDS_PER_STEP: usize = 16;

/// Runs the hand-back every `period` until `stop`.
pub async fn run(node: Arc<Node>, period: Duration, stop: CancellationToken) {
    if node.cluster.is_none() {
        return;
    }
    let mut last_mask = 0u64;
    let mut last_map = String::new();
    let mut since_scan = 0u32;
    let mut copies_at_scan = 0usize;
    let mut sent = 0usize;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        // While the cluster map changes, copies stay where a gather by the old map finds them
        // (`membership`); a change nobody finishes ends here.
        if let Some(m) = &node.cluster {
            m.expire(node.settings.moving_grace);
            if m.changing() {
                continue;
            }
        }
        let n = node.clone();
        let copies = tokio::task::spawn_blocking(move || n.store.copies()).await.unwrap_or(0);
        metrics::gauge!(FAILOVER_COPIES).set(copies as f64);
        if copies == 0 {
            continue;
        }
        let Some(c) = node.cluster() else { return };
        let mask = c.alive.mask();
        // A new map is a change of view too, whatever its mask.
        let remapped = c.map.hash != last_map;
        since_scan += 1;
        // New copies can be for a node this one already holds up (a relay that has not seen
        // it back yet): look again soon, but not every period while a node is down and its
        // hosts keep arriving here.
        let grew = copies > copies_at_scan && since_scan >= GROWN_TICKS;
        if mask == last_mask && !remapped && sent == 0 && !grew && since_scan < RESCAN_TICKS {
            continue;
        }
        last_mask = mask;
        last_map = c.map.hash.clone();
        since_scan = 0;
        sent = hand_back(&node, mask).await;
        let n = node.clone();
        copies_at_scan = tokio::task::spawn_blocking(move || n.store.copies()).await.unwrap_or(0);
        metrics::gauge!(FAILOVER_COPIES).set(copies_at_scan as f64);
    }
}

/// One round: sends every copy whose first candidate up in `mask` is another node to that
/// node, drops what was taken. Returns the hosts sent (some may stay, having reported again
/// meanwhile: the next round takes them).
pub async fn hand_back(node: &Arc<Node>, mask: u64) -> usize {
    let Some(c) = node.cluster() else { return 0 };
    let nodes = c.map.nodes.len();
    let mut failed = 0u64;
    let (mut sent, mut handed) = (0, 0);
    let changing = || node.cluster.as_ref().is_some_and(|m| m.changing());
    for first in (0..SHARDS).step_by(SHARDS_PER_STEP) {
        // A membership change that began during the round pauses it here: what a prepare
        // moves to this node must stay (`membership`).
        if changing() {
            break;
        }
        let (n, cc) = (node.clone(), c.clone());
        let usable = mask & !failed;
        let scanned = tokio::task::spawn_blocking(move || {
            let c = cc;
            let mut out: Vec<Vec<Entry>> = (0..nodes).map(|_| Vec::new()).collect();
            for i in first..(first + SHARDS_PER_STEP).min(SHARDS) {
                n.store.encode_copies(
                    i,
                    |h| c.ring.first_in(h, usable).filter(|&t| t != c.me),
                    |target, host, seen, record| out[target].push((CompactString::from(host), Pending { seen, body: record.into() })),
                );
            }
            out
        })
        .await;
        let Ok(by_target) = scanned else { return sent };
        for (target, entries) in by_target.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            if !c.forwarder.send_handoff(target, &entries).await {
                failed |= 1 << target;
                c.alive.set(target, &c.map.nodes[target].id, false);
                continue;
            }
            sent += entries.len();
            // Sent, so the owner holds them; kept here as well if a change began meanwhile.
            if changing() {
                continue;
            }
            let n = node.clone();
            let dropped = tokio::task::spawn_blocking(move || entries.iter().filter(|(h, p)| n.store.drop_copy(h, p.seen)).count())
                .await
                .unwrap_or(0);
            handed += dropped;
            metrics::counter!(HANDOFF_HOSTS, "node" => c.map.nodes[target].id.clone()).increment(dropped as u64);
        }
    }
    if sent > 0 {
        tracing::info!(sent, dropped = handed, "failover copies handed back");
    }
    sent
}
