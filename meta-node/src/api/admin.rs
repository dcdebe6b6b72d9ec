//! `GET /config/reload`, `GET /config/desired`, `GET /health`, `GET /metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ops_config::status::{Health, HealthNode};
use serde::Serialize;

use super::{ApiError, authorize};
use crate::Node;
use crate::metrics::{CONFIG_INFO, CONFIG_RELOADS, PEER_ERRORS};

#[derive(serde::Deserialize)]
pub(super) struct ReloadParams {
    #[serde(default)]
    all: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReloadReply<'a> {
    node: &'a str,
    hash: &'a str,
    previous_hash: &'a str,
    changed: bool,
    file: String,
    agents: &'a [ops_config::AgentSpec],
}

/// Seed 000's reload: on success prints the loaded config; on a bad file the old one stays.
pub(super) async fn reload(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(params): Query<ReloadParams>,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    if matches!(params.all.as_deref(), Some("1" | "true")) {
        return Ok(reload_all(node).await);
    }
    reload_local(node).await
}

#[derive(Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeReload {
    id: String,
    ok: bool,
    #[serde(default)]
    hash: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

async fn reload_all(node: Arc<Node>) -> Response {
    let mut results = Vec::new();
    let local = match reload_local(node.clone()).await {
        Ok(_) => {
            NodeReload { id: node.settings.id.clone(), ok: true, hash: Some(node.desired.current().config.hash().to_owned()), error: None }
        }
        Err(e) => NodeReload {
            id: node.settings.id.clone(),
            ok: false,
            hash: Some(node.desired.current().config.hash().to_owned()),
            error: Some(e.to_string()),
        },
    };
    results.push(local);
    if let Some(c) = node.cluster() {
        let peers = futures_util::future::join_all(c.peers().map(|i| {
            let spec = c.map.nodes[i].clone();
            let mut req = c.client.get(c.map.url(i, "/config/reload")).timeout(node.settings.peer_timeout);
            if let Some(token) = node.peer_token() {
                req = req.bearer_auth(token);
            }
            async move {
                match req.send().await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        NodeReload {
                            id: spec.id,
                            ok,
                            hash: v["hash"].as_str().map(str::to_owned),
                            error: v["errorMessage"].as_str().map(str::to_owned),
                        }
                    }
                    Err(e) => {
                        metrics::counter!(PEER_ERRORS, "query" => "reload").increment(1);
                        NodeReload { id: spec.id, ok: false, hash: None, error: Some(e.to_string()) }
                    }
                }
            }
        }))
        .await;
        results.extend(peers);
    }
    let hashes: std::collections::BTreeSet<&str> = results.iter().filter_map(|r| r.hash.as_deref()).collect();
    let all_ok = results.iter().all(|r| r.ok);
    let body = serde_json::json!({
        "errorMessage": if all_ok { String::new() } else { "some nodes did not reload; see nodes".to_owned() },
        "diverged": hashes.len() > 1,
        "nodes": results,
    });
    let status = if all_ok { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, Json(body)).into_response()
}

async fn reload_local(node: Arc<Node>) -> Result<Response, ApiError> {
    let previous = node.desired.current();
    let n = node.clone();
    let result =
        tokio::task::spawn_blocking(move || n.reload_config()).await.map_err(|e| ApiError::Internal(format!("reload task failed: {e}")))?;
    match result {
        Ok(loaded) => {
            metrics::counter!(CONFIG_RELOADS, "result" => "ok").increment(1);
            if previous.config.hash() != loaded.config.hash() {
                metrics::gauge!(CONFIG_INFO, "hash" => previous.config.hash().to_owned()).set(0.0);
                metrics::gauge!(CONFIG_INFO, "hash" => loaded.config.hash().to_owned()).set(1.0);
            }
            tracing::info!(
                hash = loaded.config.hash(),
                previous = previous.config.hash(),
                agents = loaded.config.agents().len(),
                "config reloaded"
            );
            let reply = ReloadReply {
                node: &node.settings.id,
                hash: loaded.config.hash(),
                previous_hash: previous.config.hash(),
                changed: previous.config.hash() != loaded.config.hash(),
                file: node.desired.path().display().to_string(),
                agents: loaded.config.agents(),
            };
            Ok(Json(reply).into_response())
        }
        Err(e) => {
            metrics::counter!(CONFIG_RELOADS, "result" => "error").increment(1);
            tracing::error!(error = %e, kept = previous.config.hash(), "config reload refused, old config kept");
            Err(ApiError::BadRequest(format!("{e} (config {} kept)", previous.config.hash())))
        }
    }
}

/// The config file as served (`ops_serve::desired::Loaded::serve`).
pub(super) async fn desired(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let mut response = node.desired.current().serve(&headers);
    // Relays take the highest generation they see (`the relay's config_copy`).
    response.headers_mut().insert(ops_config::wire::CONFIG_GENERATION_HEADER, HeaderValue::from(node.generations.current()));
    response
}

/// `?detail=1` adds what costs a walk of the store (failover copies); peers' probes do not ask.
#[derive(serde::Deserialize)]
pub(super) struct HealthQuery {
    #[serde(default)]
    detail: Option<String>,
}

pub(super) async fn health(State(node): State<Arc<Node>>, Query(q): Query<HealthQuery>) -> Json<Health> {
    let detail = q.detail.as_deref().is_some_and(|d| d == "1" || d == "true");
    let loaded = node.desired.current();
    let cluster = node.cluster();
    Json(Health {
        status: "ok".into(),
        id: node.settings.id.clone(),
        config_hash: loaded.config.hash().to_owned(),
        config_generation: node.generations.current(),
        config_diverged: cluster.as_ref().map(|_| node.config_diverged.load(std::sync::atomic::Ordering::Relaxed)),
        cluster_diverged: cluster.as_ref().map(|_| node.cluster_diverged.load(std::sync::atomic::Ordering::Relaxed)),
        hosts: node.store.len() as u64,
        uptime_seconds: node.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").into(),
        cluster_hash: cluster.as_ref().map(|c| c.map.hash.clone()),
        cluster_generation: node.cluster.as_ref().map(|m| m.generation()),
        failover_copies: cluster.as_ref().filter(|_| detail).map(|_| node.store.copies() as u64),
        nodes: cluster
            .as_ref()
            .map(|c| {
                let scheme = if c.map.tls { "https" } else { "http" };
                c.map
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| HealthNode { id: n.id.clone(), url: format!("{scheme}://{}", n.addr), up: c.alive.is_up(i) })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

pub(super) async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.refresh_gauges();
    let text = node.prometheus.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], text).into_response()
}
