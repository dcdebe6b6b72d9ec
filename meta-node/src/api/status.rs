//! `GET /status/{json,text,summary}/{agent}` and `GET /status/host/{hostname}`.
//!
//! Listings are streamed: a blocking task formats one shard at a time into a chunk and hands
//! it to the response through a small channel, so a million-host listing is never built whole
//! in memory and a slow client only holds a few chunks.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ops_config::wire::{valid_agent_name, valid_hostname};
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::fleet::{self, AgentQuery, Filter, State as RowState};
use crate::metrics::STATUS_REQUESTS;
use crate::{Node, unix_now};

#[derive(Debug, Deserialize)]
pub(super) struct FilterParams {
    version: Option<String>,
    status: Option<String>,
    prefix: Option<String>,
    state: Option<String>,
}

impl FilterParams {
    fn into_filter(self) -> Result<Filter, ApiError> {
        let state = match self.state.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(RowState::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown state {s:?}: want ok, upgrading, stale or error"
                ))
            })?),
        };
        let nonempty = |o: Option<String>| o.filter(|s| !s.is_empty());
        Ok(Filter {
            version: nonempty(self.version),
            status: nonempty(self.status),
            prefix: nonempty(self.prefix),
            state,
        })
    }
}

fn check_agent(agent: &str) -> Result<(), ApiError> {
    if valid_agent_name(agent) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!("bad agent name {agent:?}")))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Text,
}

fn listing(node: Arc<Node>, agent: String, filter: Filter, format: Format) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let loaded = node.desired.current();
        let q = AgentQuery::new(
            &agent,
            &loaded,
            unix_now(),
            node.settings.stale_after_seconds,
        );
        let head = match format {
            Format::Json => format!(
                "{{\"agent\":{},\"hosts\":[",
                serde_json::Value::from(agent.as_str())
            ),
            Format::Text => fleet::TEXT_HEADER.to_owned(),
        };
        if tx.blocking_send(Bytes::from(head)).is_err() {
            return;
        }
        let mut first = true;
        let count = fleet::scan_rows(
            &node.store,
            &q,
            &filter,
            |row, buf| match format {
                Format::Json => {
                    fleet::write_json_row(row, first, buf);
                    first = false;
                }
                Format::Text => fleet::write_text_row(row, buf),
            },
            |buf| tx.blocking_send(Bytes::from(buf)).is_ok(),
        );
        if format == Format::Json {
            let tail = format!("],\"count\":{count},\"partial\":false,\"missingNodes\":[]}}");
            let _ = tx.blocking_send(Bytes::from(tail));
        }
    });
    Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|chunk| chunk.map(Ok::<_, Infallible>))
    }))
}

pub(super) async fn json(
    state: State<Arc<Node>>,
    agent: Path<String>,
    params: Query<FilterParams>,
) -> Result<Response, ApiError> {
    listing_response(state, agent, params, Format::Json)
}

pub(super) async fn text(
    state: State<Arc<Node>>,
    agent: Path<String>,
    params: Query<FilterParams>,
) -> Result<Response, ApiError> {
    listing_response(state, agent, params, Format::Text)
}

fn listing_response(
    State(node): State<Arc<Node>>,
    Path(agent): Path<String>,
    Query(params): Query<FilterParams>,
    format: Format,
) -> Result<Response, ApiError> {
    check_agent(&agent)?;
    let filter = params.into_filter()?;
    let (kind, content_type) = match format {
        Format::Json => ("json", "application/json"),
        Format::Text => ("text", "text/plain; charset=utf-8"),
    };
    metrics::counter!(STATUS_REQUESTS, "kind" => kind).increment(1);
    let body = listing(node, agent, filter, format);
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SummaryReply {
    #[serde(flatten)]
    summary: fleet::Summary,
    partial: bool,
    missing_nodes: Vec<String>,
}

pub(super) async fn summary(
    State(node): State<Arc<Node>>,
    Path(agent): Path<String>,
) -> Result<Json<impl Serialize>, ApiError> {
    check_agent(&agent)?;
    metrics::counter!(STATUS_REQUESTS, "kind" => "summary").increment(1);
    let summary = tokio::task::spawn_blocking(move || {
        let loaded = node.desired.current();
        fleet::summarize(
            &node.store,
            &AgentQuery::new(
                &agent,
                &loaded,
                unix_now(),
                node.settings.stale_after_seconds,
            ),
        )
    })
    .await
    .map_err(|e| ApiError::Internal(format!("summary task failed: {e}")))?;
    Ok(Json(SummaryReply {
        summary,
        partial: false,
        missing_nodes: Vec::new(),
    }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentView {
    name: String,
    version: String,
    status: String,
    run_state: &'static str,
    desired_version: String,
    desired_cmd: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    work_dir: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HostView {
    hostname: String,
    ip: String,
    run_user: String,
    updater_version: String,
    last_seen: u32,
    age_seconds: u32,
    stale: bool,
    agents: Vec<AgentView>,
}

pub(super) async fn host(
    State(node): State<Arc<Node>>,
    Path(hostname): Path<String>,
) -> Result<Json<impl Serialize>, ApiError> {
    if !valid_hostname(&hostname) {
        return Err(ApiError::BadRequest(format!("bad hostname {hostname:?}")));
    }
    metrics::counter!(STATUS_REQUESTS, "kind" => "host").increment(1);
    let loaded = node.desired.current();
    let now = unix_now();
    let stale_after = node.settings.stale_after_seconds;
    let view = node.store.with_host(&hostname, |shard, slot, h| {
        let syms = node.store.symbols().reader();
        let mut names: Vec<String> = h
            .agents
            .iter()
            .map(|a| syms.resolve(a.name).to_owned())
            .collect();
        for a in loaded.config.agents() {
            if !names.contains(&a.name) {
                names.push(a.name.clone());
            }
        }
        let agents = names
            .iter()
            .filter_map(|name| {
                let q = AgentQuery::new(name, &loaded, now, stale_after);
                let sym = syms.get(name);
                let real = sym.and_then(|s| h.agent(s)).map(|p| h.agents[p]);
                let row = q.row(shard, slot, h, sym, &syms)?;
                Some(AgentView {
                    name: name.clone(),
                    version: row.version.to_owned(),
                    status: row.status.to_owned(),
                    run_state: row.run_state,
                    desired_version: row.desired.map_or(String::new(), |d| d.version.to_owned()),
                    desired_cmd: row.desired.map_or(String::new(), |d| d.cmd.to_owned()),
                    state: row.state.as_str(),
                    last_error: row.last_error.map(str::to_owned),
                    timestamp: real.map(|a| a.timestamp),
                    run_user: real.map(|a| syms.resolve(a.run_user).to_owned()),
                    work_dir: real.map(|a| syms.resolve(a.work_dir).to_owned()),
                })
            })
            .collect();
        let age = now.saturating_sub(h.last_seen);
        HostView {
            hostname: h.name.to_string(),
            ip: shard.ip(slot, h).to_string(),
            run_user: syms.resolve(h.run_user).to_owned(),
            updater_version: syms.resolve(h.updater_version).to_owned(),
            last_seen: h.last_seen,
            age_seconds: age,
            stale: age > stale_after,
            agents,
        }
    });
    view.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("host {hostname} has not reported to this node")))
}
