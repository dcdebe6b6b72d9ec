//! A membership change, coordinated by the node asked (`GET /cluster/reload?all=1`): it
//! reads its own `cluster.toml` and takes every node of the old and the new map through
//! prepare, commit and finish. A refusal or an unreachable node at prepare aborts the change
//! everywhere; nothing changed then. One node's steps are `crate::membership`'s.

use std::time::Duration;

use ops_config::reply::{ChangeNode, ChangeReply, StepReply};

use super::fanout::{StepError, post_each};
use super::{Outcome, Refusal};
use crate::Node;
use crate::membership::{self, Membership};

/// How long one node's step may take (a prepare sends its moving hosts: ~250k at 1M hosts).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// The change to the map in this node's `--cluster` file, on every node of both maps.
pub async fn change(node: &Node, m: &Membership) -> Result<(Outcome, ChangeReply), Refusal> {
    let _one = m.coordinating.try_lock().map_err(|_| Refusal::Conflict("a membership change is already running here".into()))?;
    let path = m.path().ok_or_else(|| Refusal::BadRequest("this node was not started with --cluster FILE".into()))?.to_owned();
    let text = tokio::fs::read_to_string(&path).await.map_err(|e| Refusal::BadRequest(format!("{}: {e}", path.display())))?;
    let signature = ops_config::trust::read_signature(&path)
        .map_err(|e| Refusal::BadRequest(e.to_string()))?
        .map(|s| ops_config::trust::signature_header(&s));
    let current = m.current();
    // The map served now is taken again as it is (a diverged peer is brought to it); any
    // other must be signed and newer here first, as every node will check.
    let map = if signature == current.signature && text == current.map.text {
        current.map.clone()
    } else {
        membership::verify(node, m, &text, signature.as_deref()).map_err(|e| Refusal::BadRequest(format!("{}: {e}", path.display())))?
    };
    let mut reply = ChangeReply {
        node: node.settings.id.clone(),
        hash: map.hash.clone(),
        previous_hash: current.map.hash.clone(),
        changed: false,
        generation: m.generation(),
        failed_at: None,
        error_message: String::new(),
        nodes: Vec::new(),
    };
    // The same map as served is no change, unless a peer diverged (one generation, another
    // map): then the change brings every node to this one, at a new generation.
    if map.hash == current.map.hash && !node.cluster_diverged.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok((Outcome::Done, reply));
    }
    if let Some(why) = map.online_change_refused(&current.map) {
        return Err(Refusal::BadRequest(format!("{}: {why}", path.display())));
    }
    // Every node of the new map, then those of the old one it leaves out.
    let mut targets: Vec<(String, String)> = (0..map.nodes.len()).map(|i| (map.nodes[i].id.clone(), map.url(i, ""))).collect();
    for (i, n) in current.map.nodes.iter().enumerate() {
        if !targets.iter().any(|(id, _)| id == &n.id) {
            targets.push((n.id.clone(), current.map.url(i, "")));
        }
    }
    reply.nodes =
        targets.iter().map(|(id, url)| ChangeNode { id: id.clone(), url: url.clone(), ok: true, ..ChangeNode::default() }).collect();
    // Under mTLS a client reaches only the nodes whose names it resolves (`ops_serve::tls::
    // for_cluster`): the current map's client does not know a node that joins.
    let client = if map.mtls {
        let mut both = map.clone();
        both.nodes.extend(current.map.nodes.iter().filter(|n| map.index_of(&n.id).is_none()).cloned());
        ops_serve::tls::for_cluster(reqwest::Client::builder().no_proxy(), &both)
            .and_then(|b| b.build().map_err(|e| e.to_string()))
            .map_err(Refusal::Internal)?
    } else {
        current.client.clone()
    };
    tracing::info!(hash = %map.hash, nodes = targets.len(), "membership change: preparing every node");

    let results = step_all(node, &client, &targets, "prepare", text.clone(), signature.as_deref()).await;
    let mut top = m.generation();
    let refused = record(&mut reply, results, |s, r| {
        s.moved = r.moved;
        top = top.max(r.generation);
    });
    if let Some(error) = refused {
        tracing::warn!(%error, "membership change refused at prepare; aborting everywhere");
        let _ = step_all(node, &client, &targets, "abort", map.hash.clone(), None).await;
        reply.failed_at = Some("prepare".into());
        reply.error_message = format!("nothing changed: {error}");
        return Ok((Outcome::Refused, reply));
    }
    // A signed map's generation is its version; an unsigned lab map's, one above the highest.
    reply.generation = match map.version.filter(|_| !node.settings.trusted_keys.is_empty()) {
        Some(version) => version,
        None => top.checked_add(1).ok_or_else(|| Refusal::Conflict("cluster generations are exhausted".into()))?,
    };
    let commit = format!("commit?generation={}", reply.generation);
    let results = step_all(node, &client, &targets, &commit, map.hash.clone(), None).await;
    let refused = record(&mut reply, results, |s, r| s.remarked = r.remarked);
    reply.changed = true;
    // A gather that began by the old map before its node committed still asks by it: every
    // node keeps the old map that long (a peer's part must open within the peer timeout).
    tokio::time::sleep(node.settings.peer_timeout).await;
    let results = step_all(node, &client, &targets, "finish", map.hash.clone(), None).await;
    let refused = refused.or(record(&mut reply, results, |_, _| {}));
    if let Some(error) = refused {
        // Committed nodes serve the new map; one that missed a step ends it by itself
        // (`membership::CHANGE_TIMEOUT`) or is brought along by asking again.
        reply.failed_at = Some("commit".into());
        reply.error_message = format!("the new map is served, but not by every node: {error}; ask again once they answer");
        return Ok((Outcome::NotEverywhere, reply));
    }
    tracing::info!(hash = %map.hash, generation = reply.generation, "membership change done on every node");
    Ok((Outcome::Done, reply))
}

/// Folds one step's results into the reply; returns the first error.
fn record(
    reply: &mut ChangeReply,
    results: Vec<Result<StepReply, StepError>>,
    mut f: impl FnMut(&mut ChangeNode, &StepReply),
) -> Option<String> {
    let mut first = None;
    for (s, r) in reply.nodes.iter_mut().zip(results) {
        match r {
            Ok(r) => f(s, &r),
            Err(e) => {
                s.ok = false;
                first.get_or_insert_with(|| format!("{}: {e}", s.id));
                s.error = Some(e.to_string());
            }
        }
    }
    first
}

/// Runs `step` on every target at once.
async fn step_all(
    node: &Node,
    client: &reqwest::Client,
    targets: &[(String, String)],
    step: &str,
    body: String,
    signature: Option<&str>,
) -> Vec<Result<StepReply, StepError>> {
    let headers: Vec<(&str, &str)> = signature.map(|s| (ops_config::trust::SIGNATURE_HEADER, s)).into_iter().collect();
    post_each(node, client, targets, &format!("/internal/cluster/{step}"), &body, &headers, STEP_TIMEOUT).await
}
