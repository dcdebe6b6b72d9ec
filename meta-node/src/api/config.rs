//! `POST /config/apply?expect=HASH` and `POST /config/rollback?expect=HASH` (token): a new
//! `agents.toml` for every node, checked on every node first, then written by every node as
//! the next generation and reloaded; `GET /config/history`: the versions this node keeps.
//! `POST /internal/config/{check,write}` are one node's steps. See `crate::generations`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ops_config::reply::{ApplyReply, ConfigStep, History};
use ops_config::trust::SIGNATURE_HEADER;
use serde::Deserialize;

use super::{ApiError, authorize};
use crate::Node;
use crate::coordination::{Outcome, Refusal, apply};

#[derive(Deserialize)]
pub(super) struct ApplyParams {
    /// The hash the operator diffed against: the apply is refused when the config served is
    /// another one (no lost update).
    expect: Option<String>,
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
    answer(apply::apply(node, text, signature(&headers), params.expect).await)
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
    let previous = apply::previous(&node)?;
    tracing::info!(to_generation = previous.generation, hash = %previous.hash, "config rollback requested");
    answer(apply::apply(node, previous.text, previous.signature, params.expect).await)
}

/// The reply of an apply: 422 when a node refused (nothing changed), 502 when not written
/// everywhere yet.
fn answer(result: Result<(Outcome, ApplyReply), Refusal>) -> Result<Response, ApiError> {
    let (outcome, reply) = result?;
    let code = match outcome {
        Outcome::Done => StatusCode::OK,
        Outcome::Refused => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::NotEverywhere => StatusCode::BAD_GATEWAY,
    };
    Ok((code, Json(reply)).into_response())
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
    apply::local_step(&node, generation, text, signature(&headers).as_deref()).await.map(Json).map_err(ApiError::BadRequest)
}

/// `GET /config/history`: this node's generation and the versions it keeps, newest first.
pub(super) async fn history(State(node): State<Arc<Node>>) -> Json<History> {
    let n = node.clone();
    let versions = tokio::task::spawn_blocking(move || n.generations.list()).await.unwrap_or_default();
    Json(History {
        id: node.settings.id.clone(),
        generation: node.generations.current(),
        hash: node.desired.current().config.hash().to_owned(),
        versions,
    })
}
