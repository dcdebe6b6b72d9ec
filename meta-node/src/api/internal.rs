//! Internal endpoints, token-protected: batch ingest from relays and peers (failover copies
//! handed back come this way too), and the queries a gathering node sends its peers (see
//! `status`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::status::{FilterParams, check_agent};
use super::{ApiError, authorize};
use crate::Node;
use crate::coordination::gather::{GatherRequest, HostView, View, local_host, local_summary};
use crate::coordination::listing::{Format, stream_local_rows};
use crate::fleet::Summary;
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
    let handed_back = headers.get(ops_config::wire::HANDOFF_HEADER).is_some_and(|v| v == "1");
    // Hosts a membership change moves here may come before this node's own prepare: the
    // change is on from now, so its hand-back cannot send them home and drop them.
    if let (Some(map), Some(m)) = (headers.get(ops_config::wire::MOVING_HEADER), &node.cluster)
        && m.moving_in(map.to_str().unwrap_or_default())
    {
        tracing::info!("hosts moved here by a membership change before this node prepared it; hand-back paused");
    }
    // A relay known by its certificate posts only reports that name it.
    let sender = super::verified_relay(&headers).map(str::to_owned);
    let result = tokio::task::spawn_blocking(move || ingest(&n, &bytes, compact, handed_back, sender.as_deref()))
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
            let result = if matches!(e, ApiError::Forbidden(_)) { "forbidden" } else { "bad_request" };
            metrics::counter!(BATCHES_RECEIVED, "result" => result).increment(1);
            Err(e)
        }
    }
}

fn ingest(node: &Node, bytes: &[u8], compact: bool, handed_back: bool, sender: Option<&str>) -> Result<(u64, u64), ApiError> {
    let result = match (compact, handed_back) {
        (true, true) => node.ingest_handed_back(bytes),
        (true, false) => node.ingest_compact_from(bytes, sender),
        (false, _) => node.ingest_batch_from(bytes, sender),
    };
    result.map_err(|e| match e {
        ops_config::WireError::NotThisRelay { .. } => ApiError::Forbidden(e.to_string()),
        e => ApiError::BadRequest(e.to_string()),
    })
}

/// A gather's request, parsed after the token is checked, whatever the Content-Type.
fn gather_request(bytes: &[u8]) -> Result<GatherRequest, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("bad gather body: {e}")))
}

/// `POST /internal/rows/{agent}`: this node's share of a listing, streamed.
pub(super) async fn rows(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    Query(params): Query<FilterParams>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    check_agent(&agent)?;
    let body = gather_request(&body)?;
    let filter = params.to_filter()?;
    let format = Format::parse(params.format.as_deref());
    let view = View::resolve(&node, body.cluster.as_deref())?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        stream_local_rows(&node, &agent, view.scope(body.present), &filter, format, &tx);
    });
    let body = super::channel_body(rx);
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], body).into_response())
}

/// `POST /internal/summary/{agent}`: this node's share of a summary, as counts.
pub(super) async fn summary(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent): Path<String>,
    body: Bytes,
) -> Result<Json<Summary>, ApiError> {
    authorize(&node, peer, &headers)?;
    check_agent(&agent)?;
    let body = gather_request(&body)?;
    let view = View::resolve(&node, body.cluster.as_deref())?;
    let s = tokio::task::spawn_blocking(move || local_summary(&node, &agent, view.scope(body.present), body.prefix.as_deref()))
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
