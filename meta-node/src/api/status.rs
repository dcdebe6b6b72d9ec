//! `GET /status/{json,text,summary}/{agent}` and `GET /status/host/{hostname}`, from any node:
//! the query checked and translated here, gathered by `coordination::{gather, listing}`. A
//! partial reply says so (`partial`/`missingNodes` in JSON, `X-Ops-Partial`/
//! `X-Ops-Missing-Nodes` headers and a `#partial` line in text).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use ops_config::wire::{valid_agent_name, valid_hostname};
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::Node;
use crate::coordination::gather::{self, SummaryReply};
use crate::coordination::listing::{self, Format};
use crate::fleet::{Filter, State as RowState};
use crate::metrics::STATUS_REQUESTS;

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub(crate) struct FilterParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    /// The relay the hosts' last reports came through; `-` for none (straight to a meta node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay: Option<String>,
    /// Internal: the format a peer streams in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) format: Option<String>,
}

impl FilterParams {
    pub(crate) fn to_filter(&self) -> Result<Filter, ApiError> {
        let state = match self.state.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                RowState::parse(s)
                    .ok_or_else(|| ApiError::BadRequest(format!("unknown state {s:?}: want ok, upgrading, stale, error or pinned")))?,
            ),
        };
        let nonempty = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
        let relay = match nonempty(&self.relay) {
            Some(r) if r == "-" => Some(String::new()),
            Some(r) if ops_config::compact::valid_relay_id(&r) => Some(r),
            Some(r) => {
                return Err(ApiError::BadRequest(format!("bad relay {r:?}: want a relay id (1-64 of [A-Za-z0-9._-]) or - for none")));
            }
            None => None,
        };
        Ok(Filter { version: nonempty(&self.version), status: nonempty(&self.status), prefix: nonempty(&self.prefix), state, relay })
    }
}

pub(crate) fn check_agent(agent: &str) -> Result<(), ApiError> {
    if valid_agent_name(agent) { Ok(()) } else { Err(ApiError::BadRequest(format!("bad agent name {agent:?}"))) }
}

/// A listing's reply: its chunks as the body, the nodes missing when it began in the headers.
async fn listing(node: Arc<Node>, agent: String, params: FilterParams, format: Format) -> Result<Response, ApiError> {
    let filter = params.to_filter()?;
    let mut query = params.clone();
    query.format = Some(format.name().to_owned());
    let listing::Listing { initially_missing, chunks } =
        listing::listing(node, agent, filter, serde_urlencoded_pairs(&query), format).await?;
    let body = super::channel_body(chunks);
    let content_type = match format {
        Format::Json => "application/json",
        Format::Text => "text/plain; charset=utf-8",
    };
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response();
    let h = response.headers_mut();
    h.insert(ops_config::wire::PARTIAL_HEADER, HeaderValue::from_static(if initially_missing.is_empty() { "false" } else { "true" }));
    if let Ok(v) = HeaderValue::from_str(&initially_missing.join(",")) {
        h.insert(ops_config::wire::MISSING_NODES_HEADER, v);
    }
    Ok(response)
}

/// `version=..&state=..` from the filter params (values are plain tokens or percent-encoded).
fn serde_urlencoded_pairs(p: &FilterParams) -> String {
    let value = serde_json::to_value(p).unwrap_or_default();
    let mut out = Vec::new();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            if let Some(s) = v.as_str() {
                let enc: String = s
                    .bytes()
                    .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
                    .collect();
                out.push(format!("{k}={enc}"));
            }
        }
    }
    out.join("&")
}

pub(super) async fn json(
    State(node): State<Arc<Node>>,
    Path(agent): Path<String>,
    Query(params): Query<FilterParams>,
) -> Result<Response, ApiError> {
    check_agent(&agent)?;
    metrics::counter!(STATUS_REQUESTS, "kind" => "json").increment(1);
    listing(node, agent, params, Format::Json).await
}

pub(super) async fn text(
    State(node): State<Arc<Node>>,
    Path(agent): Path<String>,
    Query(params): Query<FilterParams>,
) -> Result<Response, ApiError> {
    check_agent(&agent)?;
    metrics::counter!(STATUS_REQUESTS, "kind" => "text").increment(1);
    listing(node, agent, params, Format::Text).await
}

#[derive(serde::Deserialize, Default)]
pub(super) struct SummaryParams {
    prefix: Option<String>,
}

pub(super) async fn summary(
    State(node): State<Arc<Node>>,
    Path(agent): Path<String>,
    Query(params): Query<SummaryParams>,
) -> Result<Json<SummaryReply>, ApiError> {
    check_agent(&agent)?;
    let prefix = params.prefix.filter(|p| !p.is_empty());
    if let Some(p) = &prefix
        && !ops_config::wire::valid_hostname(p)
    {
        return Err(ApiError::BadRequest(format!("prefix must be 1-255 of [A-Za-z0-9._-], got {p:?}")));
    }
    metrics::counter!(STATUS_REQUESTS, "kind" => "summary").increment(1);
    Ok(Json(gather::summary(node, agent, prefix).await?))
}

/// One host: the newest copy among every node that holds it.
pub(super) async fn host(State(node): State<Arc<Node>>, Path(hostname): Path<String>) -> Result<Json<gather::HostView>, ApiError> {
    if !valid_hostname(&hostname) {
        return Err(ApiError::BadRequest(format!("bad hostname {hostname:?}")));
    }
    metrics::counter!(STATUS_REQUESTS, "kind" => "host").increment(1);
    let best = gather::host(&node, &hostname).await;
    best.map(Json).ok_or_else(|| ApiError::NotFound(format!("host {hostname} has not reported")))
}
