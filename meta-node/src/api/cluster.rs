//! `GET /cluster/map` (the map served, for relays and operators), `GET /cluster/reload?all=1`
//! (a membership change, coordinated by the node asked) and `POST /internal/cluster/{step}`
//! (one node's step of it). See `crate::membership`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ops_config::reply::StepReply;

use super::{ApiError, authorize};
use crate::Node;
use crate::coordination::{Outcome, change};
use crate::membership;

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

/// `GET /cluster/reload?all=1` (token): the membership change of `coordination::change`; 409
/// when refused at prepare (nothing changed), 502 when not every node took it yet.
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
    let (outcome, reply) = change::change(&node, m).await?;
    let code = match outcome {
        Outcome::Done => StatusCode::OK,
        Outcome::Refused => StatusCode::CONFLICT,
        Outcome::NotEverywhere => StatusCode::BAD_GATEWAY,
    };
    Ok((code, Json(reply)).into_response())
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
