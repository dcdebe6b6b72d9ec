//! HTTP surface of the meta node: one route or one concern a file. Errors become a status
//! code plus a JSON `errorMessage` here and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::Node;

pub(crate) mod admin;
mod cluster;
mod config;
mod heartbeat;
mod internal;
mod rollout;
mod status;
mod ui;

/// Every way a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Conflict(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "errorMessage": self.to_string() });
        (self.status(), axum::Json(body)).into_response()
    }
}

impl From<crate::coordination::Refusal> for ApiError {
    fn from(refusal: crate::coordination::Refusal) -> Self {
        use crate::coordination::Refusal;
        match refusal {
            Refusal::BadRequest(m) => ApiError::BadRequest(m),
            Refusal::NotFound(m) => ApiError::NotFound(m),
            Refusal::Conflict(m) => ApiError::Conflict(m),
            Refusal::Internal(m) => ApiError::Internal(m),
        }
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// The node's routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/heartbeat", post(heartbeat::heartbeat))
        .route("/enroll", post(heartbeat::enroll))
        .route("/status/json/{agent}", get(status::json))
        .route("/status/text/{agent}", get(status::text))
        .route("/status/summary/{agent}", get(status::summary))
        .route("/status/host/{hostname}", get(status::host))
        .route("/status/agents", get(ui::agents))
        .route("/rollout/{agent}", get(rollout::gathered))
        .route("/ui", get(ui::page))
        .route("/ui/", get(ui::page))
        .route("/config/reload", get(admin::reload))
        .route("/config/apply", post(config::apply))
        .route("/config/rollback", post(config::rollback))
        .route("/config/history", get(config::history))
        .route("/internal/config/{step}", post(config::step))
        .route("/cluster/map", get(cluster::map))
        .route("/cluster/reload", get(cluster::reload))
        .route("/internal/cluster/{step}", post(cluster::step))
        .route("/config/desired", get(admin::desired))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .route("/internal/batch", post(internal::batch))
        .route("/internal/rows/{agent}", post(internal::rows))
        .route("/internal/summary/{agent}", post(internal::summary))
        .route("/internal/host/{hostname}", get(internal::host))
        .route("/internal/rollout", get(rollout::internal))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(node.clone(), guard))
        .with_state(node)
}

/// Set by [`guard`] on a request whose client certificate allows it (its value names the
/// peer); removed from every request first, so no client can set it.
const VERIFIED_HEADER: &str = "x-ops-verified-peer";

/// Who may call a route under mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Anyone (heartbeats, status, documents, health).
    Public,
    /// A meta node of the map (gathers, hand-backs, rollout state, config and membership steps).
    Node,
    /// A meta node or a relay: batches of reports (not hand-backs or moved hosts, which only
    /// nodes send) and the rollout state.
    NodeOrRelay,
    /// A meta node (a reload fanned out by a peer) or the operator's token.
    NodeOrOperator,
    /// The operator's token (applies, rollbacks, membership changes: what they carry must be
    /// signed besides, when the node trusts keys).
    Operator,
}

/// A response body streamed from the chunks a producer sends (a listing, as it is written).
fn channel_body(mut chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> axum::body::Body {
    axum::body::Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        chunks.poll_recv(cx).map(|c| c.map(Ok::<_, std::convert::Infallible>))
    }))
}

fn scope_of(path: &str, headers: &axum::http::HeaderMap) -> Scope {
    match path {
        "/internal/batch" if headers.get(ops_config::wire::HANDOFF_HEADER).is_some_and(|v| v == "1") => Scope::Node,
        // Hosts a membership change moves begin the change here: only a node moves them.
        "/internal/batch" if headers.contains_key(ops_config::wire::MOVING_HEADER) => Scope::Node,
        // Relays post their batches and read the rollout state they gate updaters by.
        "/internal/batch" | "/internal/rollout" => Scope::NodeOrRelay,
        p if p.starts_with("/internal/") => Scope::Node,
        "/config/reload" => Scope::NodeOrOperator,
        "/config/apply" | "/config/rollback" | "/cluster/reload" => Scope::Operator,
        _ => Scope::Public,
    }
}

/// Under the map's `mtls`: internal routes are for the peers and relays whose certificates
/// (verified in the handshake, `ops_serve::tls::PeerNames`) name them, and only them; the cluster
/// token opens none of them. Without mTLS nothing changes here ([`authorize`] decides).
async fn guard(
    axum::extract::State(node): axum::extract::State<Arc<Node>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    request.headers_mut().remove(VERIFIED_HEADER);
    if !node.cluster().is_some_and(|c| c.map.mtls) {
        return next.run(request).await;
    }
    let scope = scope_of(request.uri().path(), request.headers());
    if scope == Scope::Public || scope == Scope::Operator {
        return next.run(request).await;
    }
    let names = request.extensions().get::<ops_serve::tls::PeerNames>().cloned().unwrap_or_default();
    // A node the last change left out still sends what it held (`membership::DEPARTED_GRACE`).
    let batch = request.uri().path() == "/internal/batch";
    let peer = names
        .node()
        .filter(|id| node.cluster.as_ref().is_some_and(|m| m.knows(id) || (batch && m.departed(id))))
        .map(|id| format!("node {id}"))
        .or_else(|| names.relay().filter(|_| scope == Scope::NodeOrRelay).map(|id| format!("relay {id}")));
    match peer.and_then(|p| axum::http::HeaderValue::from_str(&p).ok()) {
        Some(v) => {
            request.headers_mut().insert(VERIFIED_HEADER, v);
            next.run(request).await
        }
        None if scope == Scope::NodeOrOperator => next.run(request).await,
        None => {
            metrics::counter!(crate::metrics::PEER_REFUSED).increment(1);
            let shown = if names.0.is_empty() { "no certificate".to_owned() } else { format!("a certificate for {}", names.0.join(", ")) };
            ApiError::Forbidden(format!(
                "{}: this route is for {} of this cluster, known by a certificate of the cluster CA; the client showed {shown}",
                request.uri().path(),
                if scope == Scope::NodeOrRelay { "meta nodes and relays" } else { "meta nodes" }
            ))
            .into_response()
        }
    }
}

/// The relay that [`guard`] found named by the client's certificate, if the caller is one.
fn verified_relay(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(VERIFIED_HEADER)?.to_str().ok()?.strip_prefix("relay ")
}

/// Admin and internal calls: when the cluster has a token, every caller must present it
/// (`Authorization: Bearer ...`), loopback included, since peers on one machine are loopback
/// too; without a token only loopback callers are trusted (seed 000's reload).
fn authorize(node: &Node, peer: SocketAddr, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(VERIFIED_HEADER) {
        // A peer or relay known by its certificate (`guard`).
        return Ok(());
    }
    let presented =
        headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match (&node.settings.token, presented) {
        (Some(token), Some(p)) if constant_time_eq(token.as_bytes(), p.as_bytes()) => Ok(()),
        (Some(_), _) => Err(ApiError::Unauthorized("missing or wrong cluster token (Authorization: Bearer ...)".into())),
        (None, _) if peer.ip().is_loopback() => Ok(()),
        (None, _) => Err(ApiError::Forbidden("admin calls come from loopback only (no cluster token configured)".into())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
