//! `POST /config/apply?expect=HASH` and `POST /config/rollback?expect=HASH` (token): a new
//! `agents.toml` for every node, checked on every node first, then written by every node as
//! the next generation and reloaded; `GET /config/history`: the versions this node keeps.
//! `POST /internal/config/{check,write}` are one node's steps. See `crate::generations`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ops_config::trust::SIGNATURE_HEADER;
use serde::{Deserialize, Serialize};

use super::{ApiError, NO_ANSWER, authorize};
use crate::Node;

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
pub(super) struct ApplyParams {
    /// The hash the operator diffed against: the apply is refused when the config served is
    /// another one (no lost update).
    expect: Option<String>,
}

/// A node's answer to a step.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStep {
    pub id: String,
    pub hash: String,
    pub generation: u64,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeResult {
    id: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    hash: String,
    generation: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ApplyReply {
    hash: String,
    previous_hash: String,
    generation: u64,
    changed: bool,
    error_message: String,
    /// Nodes that did not answer: they take the new generation from a peer once back.
    missing_nodes: Vec<String>,
    nodes: Vec<NodeResult>,
}

fn body_text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::BadRequest("the config is not UTF-8".into()))
}

fn signature(headers: &HeaderMap) -> Option<String> {
    headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_owned)
}

/// `POST /config/apply?expect=HASH`: body the new `agents.toml`, `x-ops-signature` its
/// signature (when the nodes trust keys).
pub(super) async fn apply(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<ApplyParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    let text = body_text(&body)?.to_owned();
    coordinate(node, text, signature(&headers), params.expect).await
}

/// `POST /config/rollback?expect=HASH`: applies the version before the one served (from this
/// node's history) as the next generation.
pub(super) async fn rollback(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<ApplyParams>,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    let current = node.desired.current().config.hash().to_owned();
    let previous = node
        .generations
        .list()
        .into_iter()
        .find(|e| e.hash != current && e.generation < node.generations.current())
        .ok_or_else(|| ApiError::Conflict("no earlier version kept on this node to roll back to".into()))?;
    let (text, sig) = node
        .generations
        .read(previous.generation)
        .ok_or_else(|| ApiError::Internal(format!("generation {} is listed but cannot be read", previous.generation)))?;
    tracing::info!(to_generation = previous.generation, hash = %previous.hash, "config rollback requested");
    coordinate(node, text, sig.map(|s| ops_config::trust::signature_header(&s)), params.expect).await
}

/// The apply itself, from this node: check on every node, then write on every node.
async fn coordinate(node: Arc<Node>, text: String, sig: Option<String>, expect: Option<String>) -> Result<Response, ApiError> {
    let current = node.desired.current().config.hash().to_owned();
    let expect = expect
        .filter(|e| !e.is_empty())
        .ok_or_else(|| ApiError::BadRequest(format!("give ?expect=HASH, the hash you diffed against (served now: {current})")))?;
    if expect != current {
        return Err(ApiError::Conflict(format!(
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
        nodes: targets.iter().map(|(id, _)| NodeResult { id: id.clone(), ok: true, ..NodeResult::default() }).collect(),
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
            Err(e) if e.starts_with(NO_ANSWER) && n.id != node.settings.id => {
                reply.missing_nodes.push(n.id.clone());
                (n.ok, n.error) = (false, Some(e));
            }
            Err(e) => {
                refused.get_or_insert_with(|| format!("{}: {e}", n.id));
                (n.ok, n.error) = (false, Some(e));
            }
        }
    }
    if let Some(why) = refused {
        reply.error_message = format!("refused, nothing changed on any node: {why}");
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(reply)).into_response());
    }
    reply.generation = top.checked_add(1).ok_or_else(|| ApiError::Conflict("config generations are exhausted".into()))?;
    let path = format!("write?generation={}", reply.generation);
    let up: Vec<(String, String)> = targets.iter().filter(|(id, _)| !reply.missing_nodes.contains(id)).cloned().collect();
    let written = step_all(&node, &up, &path, &text, sig.as_deref()).await;
    let mut failed = None;
    for (n, r) in reply.nodes.iter_mut().filter(|n| !reply.missing_nodes.contains(&n.id)).zip(written) {
        match r {
            Ok(s) => (n.hash, n.generation) = (s.hash, s.generation),
            Err(e) => {
                failed.get_or_insert_with(|| format!("{}: {e}", n.id));
                (n.ok, n.error) = (false, Some(e));
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
        // the new generation from a peer once it answers again (`crate::peers`).
        reply.error_message = format!("applied, but not written everywhere yet: {why}");
        return Ok((StatusCode::BAD_GATEWAY, Json(reply)).into_response());
    }
    Ok(Json(reply).into_response())
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
) -> Vec<Result<ConfigStep, String>> {
    if node.cluster.is_none() {
        let generation = step.strip_prefix("write?generation=").and_then(|g| g.parse().ok());
        return vec![local_step(node, generation, text, sig).await];
    }
    let client = node.cluster().map(|c| c.client.clone()).expect("targets exist only in a cluster");
    let headers: Vec<(&str, &str)> = sig.map(|s| (SIGNATURE_HEADER, s)).into_iter().collect();
    super::post_each(node, &client, targets, &format!("/internal/config/{step}"), text, &headers, STEP_TIMEOUT).await
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

#[derive(Deserialize)]
pub(super) struct StepParams {
    generation: Option<u64>,
}

/// `POST /internal/config/check` and `/internal/config/write?generation=G` (token).
pub(super) async fn step(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Path(step): axum::extract::Path<String>,
    Query(params): Query<StepParams>,
    body: Bytes,
) -> Result<Json<ConfigStep>, ApiError> {
    authorize(&node, peer, &headers)?;
    let text = body_text(&body)?;
    let generation = match step.as_str() {
        "check" => None,
        "write" => Some(params.generation.ok_or_else(|| ApiError::BadRequest("write needs ?generation=".into()))?),
        other => return Err(ApiError::NotFound(format!("no config step {other:?}: check or write"))),
    };
    local_step(&node, generation, text, signature(&headers).as_deref()).await.map(Json).map_err(ApiError::BadRequest)
}

/// `GET /config/history`: this node's generation and the versions it keeps, newest first.
pub(super) async fn history(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let n = node.clone();
    let entries = tokio::task::spawn_blocking(move || n.generations.list()).await.unwrap_or_default();
    Json(serde_json::json!({
        "id": node.settings.id,
        "generation": node.generations.current(),
        "hash": node.desired.current().config.hash(),
        "versions": entries,
    }))
}
