//! A config apply or rollback, coordinated by the node asked: the new `agents.toml` is
//! checked on every node first, then written by every node as the next generation and
//! reloaded. A node that does not answer the check is left out (it takes the generation from
//! a peer once back, `super::peers`); a node that refuses stops the apply everywhere before
//! anything is written. See `crate::generations`.

use std::sync::Arc;
use std::time::Duration;

use ops_config::reply::{ApplyNode, ApplyReply, ConfigStep};
use ops_config::trust::SIGNATURE_HEADER;

use super::fanout::{StepError, post_each};
use super::{Outcome, Refusal};
use crate::Node;

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A kept version of the config: what `POST /config/rollback` applies again.
pub struct Kept {
    pub generation: u64,
    pub hash: String,
    pub text: String,
    /// Its signature, as the `x-ops-signature` header carries it.
    pub signature: Option<String>,
}

/// The version before the one served, from this node's history.
pub fn previous(node: &Node) -> Result<Kept, Refusal> {
    let current = node.desired.current().config.hash().to_owned();
    let previous = node
        .generations
        .list()
        .into_iter()
        .find(|e| e.hash != current && e.generation < node.generations.current())
        .ok_or_else(|| Refusal::Conflict("no earlier version kept on this node to roll back to".into()))?;
    let (text, sig) = node
        .generations
        .read(previous.generation)
        .ok_or_else(|| Refusal::Internal(format!("generation {} is listed but cannot be read", previous.generation)))?;
    let signature = sig.map(|s| ops_config::trust::signature_header(&s));
    Ok(Kept { generation: previous.generation, hash: previous.hash, text, signature })
}

/// The apply itself, from this node: check on every node, then write on every node.
pub async fn apply(node: Arc<Node>, text: String, sig: Option<String>, expect: Option<String>) -> Result<(Outcome, ApplyReply), Refusal> {
    let current = node.desired.current().config.hash().to_owned();
    let expect = expect
        .filter(|e| !e.is_empty())
        .ok_or_else(|| Refusal::BadRequest(format!("give ?expect=HASH, the hash you diffed against (served now: {current})")))?;
    if expect != current {
        return Err(Refusal::Conflict(format!(
            "the config changed since you diffed it: you expected {expect}, the cluster serves {current}; diff again"
        )));
    }
    let targets = targets(&node);
    let mut reply = ApplyReply {
        hash: ops_config::content_hash(text.as_bytes()),
        previous_hash: current,
        generation: 0,
        changed: false,
        error_message: String::new(),
        missing_nodes: Vec::new(),
        nodes: targets.iter().map(|(id, _)| ApplyNode { id: id.clone(), ok: true, ..ApplyNode::default() }).collect(),
    };
    let checked = step_all(&node, &targets, "check", &text, sig.as_deref()).await;
    let mut refused = None;
    let mut top = 0;
    for (n, r) in reply.nodes.iter_mut().zip(checked) {
        match r {
            Ok(s) => {
                top = top.max(s.generation);
                (n.hash, n.generation) = (s.hash, s.generation);
            }
            // A node that is down does not hold the others back: it takes the new generation
            // from a peer when it is back (checking it as this step would have).
            Err(e @ StepError::NoAnswer(_)) if n.id != node.settings.id => {
                reply.missing_nodes.push(n.id.clone());
                (n.ok, n.error) = (false, Some(e.to_string()));
            }
            Err(e) => {
                refused.get_or_insert_with(|| format!("{}: {e}", n.id));
                (n.ok, n.error) = (false, Some(e.to_string()));
            }
        }
    }
    if let Some(why) = refused {
        reply.error_message = format!("refused, nothing changed on any node: {why}");
        return Ok((Outcome::Refused, reply));
    }
    reply.generation = top.checked_add(1).ok_or_else(|| Refusal::Conflict("config generations are exhausted".into()))?;
    let path = format!("write?generation={}", reply.generation);
    let up: Vec<(String, String)> = targets.iter().filter(|(id, _)| !reply.missing_nodes.contains(id)).cloned().collect();
    let written = step_all(&node, &up, &path, &text, sig.as_deref()).await;
    let mut failed = None;
    for (n, r) in reply.nodes.iter_mut().filter(|n| !reply.missing_nodes.contains(&n.id)).zip(written) {
        match r {
            Ok(s) => (n.hash, n.generation) = (s.hash, s.generation),
            Err(e) => {
                failed.get_or_insert_with(|| format!("{}: {e}", n.id));
                (n.ok, n.error) = (false, Some(e.to_string()));
            }
        }
    }
    reply.changed = true;
    if !node.settings.trusted_keys.is_empty() {
        // Every node wrote the signed file at its own version (`local_step`).
        reply.generation = reply.nodes.iter().filter(|n| n.ok).map(|n| n.generation).max().unwrap_or(reply.generation);
    }
    tracing::info!(hash = %reply.hash, generation = reply.generation, "config applied");
    if !reply.missing_nodes.is_empty() && failed.is_none() {
        reply.error_message =
            format!("applied; {} did not answer and will take generation {} from a peer", reply.missing_nodes.join(", "), reply.generation);
    }
    if let Some(why) = failed {
        // Checked everywhere, so a node that missed the write (it went away meanwhile) takes
        // the new generation from a peer once it answers again (`super::peers`).
        reply.error_message = format!("applied, but not written everywhere yet: {why}");
        return Ok((Outcome::NotEverywhere, reply));
    }
    Ok((Outcome::Done, reply))
}

/// Every node of the map (this one included) as (id, base URL); a standalone node is its
/// only target (no URL: it runs each step itself).
fn targets(node: &Node) -> Vec<(String, String)> {
    match node.cluster() {
        None => vec![(node.settings.id.clone(), String::new())],
        Some(c) => (0..c.map.nodes.len()).map(|i| (c.map.nodes[i].id.clone(), c.map.url(i, ""))).collect(),
    }
}

/// Runs one step on every target at once; a standalone node runs it on itself.
async fn step_all(
    node: &Arc<Node>,
    targets: &[(String, String)],
    step: &str,
    text: &str,
    sig: Option<&str>,
) -> Vec<Result<ConfigStep, StepError>> {
    if node.cluster.is_none() {
        let generation = step.strip_prefix("write?generation=").and_then(|g| g.parse().ok());
        return vec![local_step(node, generation, text, sig).await.map_err(StepError::Refused)];
    }
    let client = node.cluster().map(|c| c.client.clone()).expect("targets exist only in a cluster");
    let headers: Vec<(&str, &str)> = sig.map(|s| (SIGNATURE_HEADER, s)).into_iter().collect();
    post_each(node, &client, targets, &format!("/internal/config/{step}"), text, &headers, STEP_TIMEOUT).await
}

/// Checks `text` (and `sig`) as this node would serve it; with `generation`, also writes it as
/// that generation and reloads.
pub async fn local_step(node: &Arc<Node>, generation: Option<u64>, text: &str, sig: Option<&str>) -> Result<ConfigStep, String> {
    let (n, text, sig) = (node.clone(), text.to_owned(), sig.map(str::to_owned));
    tokio::task::spawn_blocking(move || {
        let path = n.desired.path().to_owned();
        let config = ops_config::trust::parse_signed(&text, sig.as_deref(), &n.settings.trusted_keys, &path.display().to_string())
            .map_err(|e| e.to_string())?;
        // Signed is not enough: an older signed file, another one at the same version, or an
        // expired one is refused here as on every relay and updater.
        n.desired.check_fresh(&config).map_err(|e| format!("{}: signed config refused: {e}", path.display()))?;
        // A signed file's generation is its version, whatever the coordinator or a peer says.
        let generation = match config.version() {
            Some(version) if generation.is_some() && !n.settings.trusted_keys.is_empty() => Some(version),
            _ => generation,
        };
        if let Some(g) = generation {
            let previous = n.desired.current();
            n.generations.write(&path, &text, sig.as_deref(), g)?;
            let loaded = n.desired.reload().map_err(|e| format!("written, but the reload failed: {e}"))?;
            n.withdraw_credentials(&previous.config, &loaded.config);
            metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => "ok").increment(1);
            if previous.config.hash() != loaded.config.hash() {
                metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => previous.config.hash().to_owned()).set(0.0);
                metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => loaded.config.hash().to_owned()).set(1.0);
            }
            tracing::info!(hash = loaded.config.hash(), generation = g, "config generation written and served");
        }
        Ok(ConfigStep { id: n.settings.id.clone(), hash: config.hash().to_owned(), generation: n.generations.current() })
    })
    .await
    .map_err(|e| format!("task failed: {e}"))?
}
