//! `GET /cluster/map` (the map served, for relays and operators), `GET /cluster/reload?all=1`
//! (a membership change, coordinated by the node asked) and `POST /internal/cluster/{step}`
//! (one node's step of it). See `crate::membership`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{ApiError, authorize};
use crate::Node;
use crate::membership::{self, StepReply};

/// How long one node's step may take (a prepare sends its moving hosts: ~250k at 1M hosts).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// `GET /cluster/map`: the `cluster.toml` this node serves, with its hash as the ETag
/// (`If-None-Match` answers 304), so relays learn a changed map as they learn the config.
pub(super) async fn map(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let Some(c) = node.cluster() else {
        return ApiError::NotFound("this node is standalone: it has no cluster map".into()).into_response();
    };
    let etag = format!("\"{}\"", c.map.hash);
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    let matches = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let generation = HeaderValue::from(node.cluster.as_ref().map_or(0, |m| m.generation()));
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
    }
    let mut r = (
        [
            (header::ETAG, etag_value),
            (header::CONTENT_TYPE, HeaderValue::from_static("application/toml; charset=utf-8")),
            (header::HeaderName::from_static(ops_config::wire::MAP_GENERATION_HEADER), generation),
        ],
        c.map.text.clone(),
    )
        .into_response();
    if let Some(sig) = c.signature.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
        r.headers_mut().insert(header::HeaderName::from_static(ops_config::trust::SIGNATURE_HEADER), sig);
    }
    r
}

#[derive(serde::Deserialize)]
pub(super) struct ReloadParams {
    #[serde(default)]
    all: Option<String>,
}

/// One node's part in a change, as the coordinator reports it.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeStep {
    id: String,
    url: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    moved: usize,
    remarked: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReloadReply {
    node: String,
    hash: String,
    previous_hash: String,
    changed: bool,
    /// The map's generation: one above the highest any node held at prepare.
    generation: u64,
    /// The step that failed, when the change was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_at: Option<&'static str>,
    error_message: String,
    nodes: Vec<NodeStep>,
}

/// `GET /cluster/reload?all=1` (token): reads this node's `cluster.toml` and takes every node
/// of the old and the new map through prepare, commit and finish. A refusal or an unreachable
/// node at prepare aborts the change everywhere; nothing changed then.
pub(super) async fn reload(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<ReloadParams>,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    let m = node.cluster.as_ref().ok_or_else(|| {
        ApiError::BadRequest("this node is standalone: start every node with --cluster to change membership online".into())
    })?;
    if !matches!(params.all.as_deref(), Some("1" | "true")) {
        return Err(ApiError::BadRequest(
            "a membership change takes every node: ask GET /cluster/reload?all=1 (any node coordinates it)".into(),
        ));
    }
    let _one = m.coordinating.try_lock().map_err(|_| ApiError::Conflict("a membership change is already running here".into()))?;
    let path = m.path().ok_or_else(|| ApiError::BadRequest("this node was not started with --cluster FILE".into()))?.to_owned();
    let text = tokio::fs::read_to_string(&path).await.map_err(|e| ApiError::BadRequest(format!("{}: {e}", path.display())))?;
    let signature = ops_config::trust::read_signature(&path)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?
        .map(|s| ops_config::trust::signature_header(&s));
    let current = m.current();
    // The map served now is taken again as it is (a diverged peer is brought to it); any
    // other must be signed and newer here first, as every node will check.
    let map = if signature == current.signature && text == current.map.text {
        current.map.clone()
    } else {
        membership::verify(&node, m, &text, signature.as_deref()).map_err(|e| ApiError::BadRequest(format!("{}: {e}", path.display())))?
    };
    let mut reply = ReloadReply {
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
        return Ok(Json(reply).into_response());
    }
    if let Some(why) = map.online_change_refused(&current.map) {
        return Err(ApiError::BadRequest(format!("{}: {why}", path.display())));
    }
    // Every node of the new map, then those of the old one it leaves out.
    let mut targets: Vec<(String, String)> = (0..map.nodes.len()).map(|i| (map.nodes[i].id.clone(), map.url(i, ""))).collect();
    for (i, n) in current.map.nodes.iter().enumerate() {
        if !targets.iter().any(|(id, _)| id == &n.id) {
            targets.push((n.id.clone(), current.map.url(i, "")));
        }
    }
    reply.nodes = targets.iter().map(|(id, url)| NodeStep { id: id.clone(), url: url.clone(), ok: true, ..NodeStep::default() }).collect();
    // Under mTLS a client reaches only the nodes whose names it resolves (`ops_serve::tls::
    // for_cluster`): the current map's client does not know a node that joins.
    let client = if map.mtls {
        let mut both = map.clone();
        both.nodes.extend(current.map.nodes.iter().filter(|n| map.index_of(&n.id).is_none()).cloned());
        ops_serve::tls::for_cluster(reqwest::Client::builder().no_proxy(), &both)
            .and_then(|b| b.build().map_err(|e| e.to_string()))
            .map_err(ApiError::Internal)?
    } else {
        current.client.clone()
    };
    tracing::info!(hash = %map.hash, nodes = targets.len(), "membership change: preparing every node");

    let results = step_all(&node, &client, &targets, "prepare", text.clone(), signature.as_deref()).await;
    let mut top = m.generation();
    let refused = record(&mut reply, results, |s, r| {
        s.moved = r.moved;
        top = top.max(r.generation);
    });
    if let Some(error) = refused {
        tracing::warn!(%error, "membership change refused at prepare; aborting everywhere");
        let _ = step_all(&node, &client, &targets, "abort", map.hash.clone(), None).await;
        reply.failed_at = Some("prepare");
        reply.error_message = format!("nothing changed: {error}");
        return Ok((StatusCode::CONFLICT, Json(reply)).into_response());
    }
    // A signed map's generation is its version; an unsigned lab map's, one above the highest.
    reply.generation = match map.version.filter(|_| !node.settings.trusted_keys.is_empty()) {
        Some(version) => version,
        None => top.checked_add(1).ok_or_else(|| ApiError::Conflict("cluster generations are exhausted".into()))?,
    };
    let commit = format!("commit?generation={}", reply.generation);
    let results = step_all(&node, &client, &targets, &commit, map.hash.clone(), None).await;
    let refused = record(&mut reply, results, |s, r| s.remarked = r.remarked);
    reply.changed = true;
    // A gather that began by the old map before its node committed still asks by it: every
    // node keeps the old map that long (a peer's part must open within the peer timeout).
    tokio::time::sleep(node.settings.peer_timeout).await;
    let results = step_all(&node, &client, &targets, "finish", map.hash.clone(), None).await;
    let refused = refused.or(record(&mut reply, results, |_, _| {}));
    if let Some(error) = refused {
        // Committed nodes serve the new map; one that missed a step ends it by itself
        // (`membership::CHANGE_TIMEOUT`) or is brought along by asking again.
        reply.failed_at = Some("commit");
        reply.error_message = format!("the new map is served, but not by every node: {error}; ask again once they answer");
        return Ok((StatusCode::BAD_GATEWAY, Json(reply)).into_response());
    }
    tracing::info!(hash = %map.hash, generation = reply.generation, "membership change done on every node");
    Ok(Json(reply).into_response())
}

/// Folds one step's results into the reply; returns the first error.
fn record(
    reply: &mut ReloadReply,
    results: Vec<Result<StepReply, String>>,
    mut f: impl FnMut(&mut NodeStep, &StepReply),
) -> Option<String> {
    let mut first = None;
    for (s, r) in reply.nodes.iter_mut().zip(results) {
        match r {
            Ok(r) => f(s, &r),
            Err(e) => {
                s.ok = false;
                first.get_or_insert_with(|| format!("{}: {e}", s.id));
                s.error = Some(e);
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
) -> Vec<Result<StepReply, String>> {
    let headers: Vec<(&str, &str)> = signature.map(|s| (ops_config::trust::SIGNATURE_HEADER, s)).into_iter().collect();
    super::post_each(node, client, targets, &format!("/internal/cluster/{step}"), &body, &headers, STEP_TIMEOUT).await
}

#[derive(serde::Deserialize)]
pub(super) struct StepParams {
    #[serde(default)]
    generation: Option<u64>,
}

/// `POST /internal/cluster/{step}` (token): prepare (body: the map's text), commit
/// (`?generation=`), finish or abort (body: the map's hash).
pub(super) async fn step(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(step): Path<String>,
    Query(params): Query<StepParams>,
    body: Bytes,
) -> Result<Json<StepReply>, ApiError> {
    authorize(&node, peer, &headers)?;
    let body = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("the body is not UTF-8".into()))?;
    let result = match step.as_str() {
        "prepare" => {
            let sig = headers.get(ops_config::trust::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty());
            membership::prepare(&node, body, sig).await
        }
        "commit" => membership::commit(&node, body.trim(), params.generation).await,
        "finish" => membership::finish(&node, body.trim()),
        "abort" => Ok(membership::abort(&node, body.trim())),
        other => return Err(ApiError::NotFound(format!("no cluster step {other:?}: prepare, commit, finish or abort"))),
    };
    result.map(Json).map_err(ApiError::Conflict)
}
