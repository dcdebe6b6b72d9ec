//! Internal endpoints, token-protected: batch ingest from relays and peers, and the shard
//! queries a gathering node sends its peers (see `status`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use hashbrown::HashSet;
use serde::Deserialize;

use super::status::{FilterParams, Format, HostView, check_agent, local_foreign, local_host, local_seen, local_summary, stream_local_rows};
use super::{ApiError, authorize};
use crate::Node;
use crate::fleet::{OwnedRow, Scope, Summary};
use crate::metrics::{BATCH_HOSTS_RECEIVED, BATCHES_RECEIVED};

/// `POST /internal/batch`: host reports forwarded by a relay or a peer. The newest report of a
/// host wins; an older one is counted and ignored.
pub(super) async fn batch(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Err(e) = authorize(&node, peer, &headers) {
        metrics::counter!(BATCHES_RECEIVED, "result" => "unauthorized").increment(1);
        return Err(e);
    }
    let bytes = axum::body::to_bytes(body, ops_config::wire::MAX_BATCH_BYTES)
        .await
        .map_err(|_| ApiError::TooLarge(format!("batch body over the limit of {} bytes", ops_config::wire::MAX_BATCH_BYTES)))?;
    let n = node.clone();
    let compact = headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(ops_config::compact::CONTENT_TYPE.as_bytes()));
    let result = tokio::task::spawn_blocking(move || ingest(&n, &bytes, compact))
        .await
        .map_err(|e| ApiError::Internal(format!("ingest task failed: {e}")))?;
    match result {
        Ok((stored, older)) => {
            metrics::counter!(BATCHES_RECEIVED, "result" => "ok").increment(1);
            metrics::counter!(BATCH_HOSTS_RECEIVED, "result" => "stored").increment(stored);
            metrics::counter!(BATCH_HOSTS_RECEIVED, "result" => "older").increment(older);
            Ok(Json(serde_json::json!({ "stored": stored, "older": older })))
        }
        Err(e) => {
            metrics::counter!(BATCHES_RECEIVED, "result" => "bad_request").increment(1);
            Err(e)
        }
    }
}

fn ingest(node: &Node, bytes: &[u8], compact: bool) -> Result<(u64, u64), ApiError> {
    let result = if compact { node.ingest_compact(bytes) } else { node.ingest_batch(bytes) };
    result.map_err(|e| ApiError::BadRequest(e.to_string()))
}

pub(super) async fn foreign(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> Result<Json<Vec<OwnedRow>>, ApiError> {
    authorize(&node, peer, &headers)?;
    check_agent(&agent)?;
    let rows = tokio::task::spawn_blocking(move || local_foreign(&node, &agent)).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(rows))
}

pub(super) async fn seen(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(hosts): Json<Vec<String>>,
) -> Result<Json<std::collections::HashMap<String, u32>>, ApiError> {
    authorize(&node, peer, &headers)?;
    let seen = tokio::task::spawn_blocking(move || local_seen(&node, &hosts)).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(seen.into_iter().collect()))
}

#[derive(Deserialize, Default)]
pub(super) struct Exclude {
    #[serde(default)]
    exclude: Vec<String>,
    /// Summaries only: count the hosts whose name starts with this.
    #[serde(default)]
    prefix: Option<String>,
}

pub(super) async fn owned(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    Query(params): Query<FilterParams>,
    Json(body): Json<Exclude>,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    check_agent(&agent)?;
    let filter = params.to_filter()?;
    let format = Format::parse(params.format.as_deref());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let exclude: HashSet<String> = body.exclude.into_iter().collect();
        stream_local_rows(&node, &agent, Scope::Owned { exclude: &exclude }, &filter, format, &tx);
    });
    let body =
        Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, std::convert::Infallible>))));
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], body).into_response())
}

pub(super) async fn summary(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    Json(body): Json<Exclude>,
) -> Result<Json<Summary>, ApiError> {
    authorize(&node, peer, &headers)?;
    check_agent(&agent)?;
    let s = tokio::task::spawn_blocking(move || {
        let exclude: HashSet<String> = body.exclude.into_iter().collect();
        local_summary(&node, &agent, Scope::Owned { exclude: &exclude }, body.prefix.as_deref())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(s))
}

pub(super) async fn host(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
) -> Result<Json<Option<HostView>>, ApiError> {
    authorize(&node, peer, &headers)?;
    Ok(Json(local_host(&node, &hostname)))
}
