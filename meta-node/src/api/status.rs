//! `GET /status/{json,text,summary}/{agent}` and `GET /status/host/{hostname}`, from any node.
//!
//! Listings are streamed: a blocking task formats one shard at a time into a chunk and hands
//! it to the response through a small channel, so a million-host listing is never built whole
//! in memory. In a cluster the node asked gathers from every node it holds up
//! (`peers::Peers`), passing that set along: each node answers for the hosts whose first ring
//! candidate in the set it is (`fleet::Scope::Held`): its own hosts, and while their owner is
//! missing, the failover copies it holds for it. Summaries travel as counts and listings as
//! each node's own rows, so no per-host traffic crosses between nodes, and no host is counted
//! twice. A node that is not up or does not answer makes the reply partial
//! (`partial`/`missingNodes` in JSON, `X-Ops-Partial`/`X-Ops-Missing-Nodes` headers and a
//! `#partial` line in text).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use ops_config::wire::{valid_agent_name, valid_hostname};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::ApiError;
use crate::fleet::{self, AgentQuery, Filter, Scope, State as RowState, Summary};
use crate::metrics::{PEER_ERRORS, STATUS_REQUESTS};
use crate::{Cluster, Node, unix_now};

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Format {
    Json,
    Text,
}

impl Format {
    pub(crate) fn parse(s: Option<&str>) -> Format {
        if s == Some("text") { Format::Text } else { Format::Json }
    }
    fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
        }
    }
}

/// Streams this node's rows in `scope` into `tx` (blocking: run it off the runtime).
pub(crate) fn stream_local_rows(
    node: &Node,
    agent: &str,
    scope: Scope<'_>,
    filter: &Filter,
    format: Format,
    tx: &mpsc::Sender<Bytes>,
) -> bool {
    let loaded = node.desired.current();
    let q = AgentQuery::new(agent, &loaded, unix_now(), node.settings.stale_after_seconds);
    let mut open = true;
    fleet::scan_rows(
        &node.store,
        &q,
        scope,
        filter,
        |row, buf| match format {
            Format::Json => fleet::write_json_row(row, buf),
            Format::Text => fleet::write_text_row(row, buf),
        },
        |buf| {
            open = tx.blocking_send(Bytes::from(buf)).is_ok();
            open
        },
    );
    open
}

/// This node's summary of `agent` in `scope` (blocking).
pub(crate) fn local_summary(node: &Node, agent: &str, scope: Scope<'_>, prefix: Option<&str>) -> Summary {
    let loaded = node.desired.current();
    fleet::summarize(&node.store, &AgentQuery::new(agent, &loaded, unix_now(), node.settings.stale_after_seconds), scope, prefix)
}

/// Who takes part in a gather: the nodes held up now (this one included), as a mask, and
/// the others, which make the answer partial; and the map they were taken from, whose hash
/// every peer is asked by (`View`).
pub(crate) struct Gather {
    pub present: u64,
    pub missing: Vec<usize>,
    pub nodes: usize,
    pub me: usize,
    pub cluster: Option<Arc<Cluster>>,
}

impl Gather {
    fn now(node: &Node) -> Gather {
        match node.cluster() {
            None => Gather { present: 1, missing: Vec::new(), nodes: 1, me: 0, cluster: None },
            Some(c) => {
                let present = c.alive.mask();
                let nodes = c.map.nodes.len();
                Gather { present, missing: (0..nodes).filter(|i| present & (1 << i) == 0).collect(), nodes, me: c.me, cluster: Some(c) }
            }
        }
    }

    fn asks(&self, i: usize) -> bool {
        self.present & (1 << i) != 0
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("peers exist only in a cluster")
    }

    /// The body of a peer's part: the nodes taking part and the map's hash.
    fn body(&self, prefix: Option<&str>) -> serde_json::Value {
        serde_json::json!({ "present": self.present, "cluster": self.cluster.as_ref().map(|c| c.map.hash.as_str()), "prefix": prefix })
    }

    /// How this node answers its own part.
    fn own_view(&self, node: &Node) -> Result<View, ApiError> {
        View::resolve(node, self.cluster.as_ref().map(|c| c.map.hash.as_str()))
    }
}

/// The cluster map a node answers a gather by. While no membership change is on, the map
/// served, by the hosts' `owned` flags (a flag per host: the fast path); during a change, the
/// ring of the map the gathering node named (current, previous or next), host by host, so
/// every node of one gather counts by one ring (`membership`).
pub(crate) enum View {
    All,
    Owned(Arc<Cluster>),
    Ring(Arc<Cluster>),
}

impl View {
    pub(crate) fn resolve(node: &Node, hash: Option<&str>) -> Result<View, ApiError> {
        let Some(m) = &node.cluster else { return Ok(View::All) };
        let current = m.current();
        let hash = hash.unwrap_or(&current.map.hash);
        if hash == current.map.hash && !m.changing() {
            return Ok(View::Owned(current));
        }
        m.by_hash(hash).map(View::Ring).ok_or_else(|| {
            ApiError::Conflict(format!("node {} does not know cluster map {hash} (it serves {})", node.settings.id, current.map.hash))
        })
    }

    /// What this node scans when a gather by the nodes in `present` asks it.
    pub(crate) fn scope(&self, present: u64) -> Scope<'_> {
        match self {
            View::All => Scope::All,
            View::Owned(c) => Scope::held(&c.ring, c.me, present | (1 << c.me)),
            View::Ring(c) => Scope::Ring { ring: &c.ring, me: c.me, present: present | (1 << c.me) },
        }
    }
}

/// A peer did not answer a gather: it counts as down until the prober hears it again.
fn peer_lost(c: &Cluster, peer: usize) {
    c.alive.set(peer, &c.map.nodes[peer].id, false);
}

pub(super) fn peer_request(node: &Node, c: &Cluster, method: reqwest::Method, peer: usize, path: &str) -> reqwest::RequestBuilder {
    let url = c.map.url(peer, path);
    let mut req = c.client.request(method, url).timeout(node.settings.peer_timeout);
    if let Some(token) = node.peer_token() {
        req = req.bearer_auth(token);
    }
    req
}

fn peer_failed(c: &Cluster, peer: usize, what: &str, error: impl std::fmt::Display) {
    let id = c.map.nodes[peer].id.as_str();
    peer_lost(c, peer);
    metrics::counter!(PEER_ERRORS, "query" => what.to_owned()).increment(1);
    tracing::warn!(peer = id, query = what, %error, "peer did not answer a status query");
}

pub(super) async fn peer_json<T: serde::de::DeserializeOwned>(
    c: &Cluster,
    req: reqwest::RequestBuilder,
    peer: usize,
    what: &str,
) -> Option<T> {
    match req.send().await {
        Ok(r) if r.status().is_success() => match r.json::<T>().await {
            Ok(v) => Some(v),
            Err(e) => {
                peer_failed(c, peer, what, e);
                None
            }
        },
        // A peer on another map (a membership change between two steps) is up: the answer is
        // partial this once, and nobody is marked down for it.
        Ok(r) if r.status() == reqwest::StatusCode::CONFLICT => {
            metrics::counter!(PEER_ERRORS, "query" => what.to_owned()).increment(1);
            let why = r.text().await.unwrap_or_default();
            tracing::warn!(peer = %c.map.nodes[peer].id, query = what, %why, "peer answers by another cluster map");
            None
        }
        Ok(r) => {
            peer_failed(c, peer, what, r.status());
            None
        }
        Err(e) => {
            peer_failed(c, peer, what, e);
            None
        }
    }
}

fn missing_ids(gather: &Gather, missing: &[usize]) -> Vec<String> {
    gather.cluster.as_ref().map_or_else(Vec::new, |c| missing.iter().map(|&i| c.map.nodes[i].id.clone()).collect())
}

/// Counts rows in a stream of formatted chunks, across chunk boundaries.
struct RowCounter {
    needle: &'static [u8],
    carry: Vec<u8>,
    rows: u64,
}

impl RowCounter {
    fn new(format: Format) -> Self {
        RowCounter { needle: if format == Format::Json { b",{\"hostname\":" } else { b"\n" }, carry: Vec::new(), rows: 0 }
    }
    fn feed(&mut self, chunk: &[u8]) {
        let mut joined = std::mem::take(&mut self.carry);
        joined.extend_from_slice(chunk);
        self.rows += joined.windows(self.needle.len()).filter(|w| *w == self.needle).count() as u64;
        let keep = (self.needle.len() - 1).min(joined.len());
        self.carry = joined[joined.len() - keep..].to_vec();
    }
}

/// Sends row chunks to the client: drops the first comma of a JSON array and counts rows.
struct RowSink {
    tx: mpsc::Sender<Bytes>,
    format: Format,
    first: bool,
    counter: RowCounter,
}

impl RowSink {
    async fn send(&mut self, chunk: Bytes) -> bool {
        if chunk.is_empty() {
            return true;
        }
        self.counter.feed(&chunk);
        let chunk = if self.first && self.format == Format::Json && chunk[0] == b',' { chunk.slice(1..) } else { chunk };
        self.first = false;
        self.tx.send(chunk).await.is_ok()
    }
}

async fn listing(node: Arc<Node>, agent: String, params: FilterParams, format: Format) -> Result<Response, ApiError> {
    let filter = params.to_filter()?;
    let gather = Arc::new(Gather::now(&node));
    let mut own_view = Some(gather.own_view(&node)?);
    let present = gather.present;
    // Every peer's stream is opened before the reply's headers go out, so they already say
    // which nodes did not answer; the peers start scanning meanwhile (each blocks on its
    // small channel until its rows are read).
    let mut query = params.clone();
    query.format = Some(format.name().to_owned());
    let qs = serde_urlencoded_pairs(&query);
    let opened = futures_util::future::join_all((0..gather.nodes).filter(|&i| gather.asks(i) && i != gather.me).map(|i| {
        let body = gather.body(None);
        // Per chunk, not per stream: a large listing may take longer than the timeout.
        let req = peer_request(&node, gather.cluster(), reqwest::Method::POST, i, &format!("/internal/rows/{agent}?{qs}"))
            .json(&body)
            .timeout(std::time::Duration::from_secs(3600));
        let node = node.clone();
        let gather = gather.clone();
        async move {
            match tokio::time::timeout(node.settings.peer_timeout, req.send()).await {
                Ok(Ok(r)) if r.status().is_success() => (i, Some(r)),
                Ok(Ok(r)) if r.status() == reqwest::StatusCode::CONFLICT => (i, None),
                Ok(Ok(r)) => {
                    peer_failed(gather.cluster(), i, "rows", r.status());
                    (i, None)
                }
                Ok(Err(e)) => {
                    peer_failed(gather.cluster(), i, "rows", e);
                    (i, None)
                }
                Err(_) => {
                    peer_failed(gather.cluster(), i, "rows", "no answer within the peer timeout");
                    (i, None)
                }
            }
        }
    }))
    .await;
    let mut missing = gather.missing.clone();
    let mut streams: Vec<Option<reqwest::Response>> = (0..gather.nodes).map(|_| None).collect();
    for (i, r) in opened {
        match r {
            Some(r) => streams[i] = Some(r),
            None => missing.push(i),
        }
    }
    missing.sort_unstable();
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let initially_missing = missing_ids(&gather, &missing);
    tokio::spawn(async move {
        let head = match format {
            Format::Json => format!("{{\"agent\":{},\"hosts\":[", serde_json::Value::from(agent.as_str())),
            Format::Text => fleet::TEXT_HEADER.to_owned(),
        };
        if tx.send(Bytes::from(head)).await.is_err() {
            return;
        }
        let mut sink = RowSink { tx: tx.clone(), format, first: true, counter: RowCounter::new(format) };
        for i in (0..gather.nodes).filter(|&i| gather.asks(i)) {
            if i == gather.me {
                let (ltx, mut lrx) = mpsc::channel::<Bytes>(4);
                let (n2, a2, f2) = (node.clone(), agent.clone(), filter.clone());
                let view = own_view.take();
                let producer = tokio::task::spawn_blocking(move || {
                    if let Some(view) = view {
                        stream_local_rows(&n2, &a2, view.scope(present), &f2, format, &ltx);
                    }
                });
                while let Some(chunk) = lrx.recv().await {
                    if !sink.send(chunk).await {
                        return;
                    }
                }
                let _ = producer.await;
            } else if let Some(r) = streams[i].take() {
                let mut stream = r.bytes_stream();
                loop {
                    match tokio::time::timeout(node.settings.peer_timeout, stream.next()).await {
                        Ok(Some(Ok(chunk))) => {
                            if !sink.send(chunk).await {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Ok(Some(Err(e))) => {
                            peer_failed(gather.cluster(), i, "rows", e);
                            missing.push(i);
                            break;
                        }
                        Err(_) => {
                            peer_failed(gather.cluster(), i, "rows", "timed out mid-stream");
                            missing.push(i);
                            break;
                        }
                    }
                }
            }
        }
        missing.sort_unstable();
        missing.dedup();
        let ids = missing_ids(&gather, &missing);
        let tail = match format {
            Format::Json => format!(
                "],\"count\":{},\"partial\":{},\"missingNodes\":{}}}",
                sink.counter.rows,
                !ids.is_empty(),
                serde_json::Value::from(ids.clone())
            ),
            Format::Text if !ids.is_empty() => format!("#partial: missing {}\n", ids.join(",")),
            Format::Text => String::new(),
        };
        let _ = tx.send(Bytes::from(tail)).await;
    });
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, Infallible>))));
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SummaryReply {
    #[serde(flatten)]
    summary: Summary,
    partial: bool,
    missing_nodes: Vec<String>,
}

#[derive(serde::Deserialize, Default)]
pub(super) struct SummaryParams {
    prefix: Option<String>,
}

pub(super) async fn summary(
    State(node): State<Arc<Node>>,
    Path(agent): Path<String>,
    Query(params): Query<SummaryParams>,
) -> Result<Json<impl Serialize>, ApiError> {
    check_agent(&agent)?;
    let prefix = params.prefix.filter(|p| !p.is_empty());
    if let Some(p) = &prefix
        && !ops_config::wire::valid_hostname(p)
    {
        return Err(ApiError::BadRequest(format!("prefix must be 1-255 of [A-Za-z0-9._-], got {p:?}")));
    }
    metrics::counter!(STATUS_REQUESTS, "kind" => "summary").increment(1);
    let gather = Arc::new(Gather::now(&node));
    let own_view = Arc::new(gather.own_view(&node)?);
    let present = gather.present;
    let parts = futures_util::future::join_all((0..gather.nodes).filter(|&i| gather.asks(i)).map(|i| {
        let node = node.clone();
        let agent = agent.clone();
        let prefix = prefix.clone();
        let (gather, view) = (gather.clone(), own_view.clone());
        async move {
            let part = if i == gather.me {
                tokio::task::spawn_blocking(move || local_summary(&node, &agent, view.scope(present), prefix.as_deref())).await.ok()
            } else {
                let body = gather.body(prefix.as_deref());
                let req =
                    peer_request(&node, gather.cluster(), reqwest::Method::POST, i, &format!("/internal/summary/{agent}")).json(&body);
                peer_json::<Summary>(gather.cluster(), req, i, "summary").await
            };
            (i, part)
        }
    }))
    .await;
    let mut missing = gather.missing.clone();
    let mut total = Summary::empty(&agent);
    for (i, part) in parts {
        match part {
            Some(s) => total.merge(&s),
            None => missing.push(i),
        }
    }
    missing.sort_unstable();
    Ok(Json(SummaryReply { summary: total, partial: !missing.is_empty(), missing_nodes: missing_ids(&gather, &missing) }))
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
    pinned: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    work_dir: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HostView {
    hostname: String,
    ip: String,
    run_user: String,
    updater_version: String,
    last_seen: u32,
    age_seconds: u32,
    stale: bool,
    /// The relay its last report came through ("" for none).
    #[serde(default)]
    relay: String,
    /// Its last report carried a checked host credential (`ops_config::enroll`).
    #[serde(default)]
    authenticated: bool,
    agents: Vec<serde_json::Value>,
}

/// This node's view of one host, if it holds it.
pub(crate) fn local_host(node: &Node, hostname: &str) -> Option<HostView> {
    let loaded = node.desired.current();
    let now = unix_now();
    let stale_after = node.settings.stale_after_seconds;
    node.store.with_host(hostname, |shard, slot, h| {
        let syms = node.store.symbols().reader();
        let mut names: Vec<String> = shard.agents(h).iter().map(|a| syms.resolve(a.name).to_owned()).collect();
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
                let real = sym.and_then(|s| shard.agent(h, s)).map(|p| shard.agents(h)[p]);
                let row = q.row(shard, slot, h, sym, &syms)?;
                let view = AgentView {
                    name: name.clone(),
                    version: row.version.to_owned(),
                    status: row.status.to_owned(),
                    run_state: row.run_state,
                    desired_version: row.desired.map_or(String::new(), |d| d.version.to_owned()),
                    desired_cmd: row.desired.map_or(String::new(), |d| d.cmd.to_owned()),
                    state: row.state.as_str(),
                    last_error: row.last_error.map(str::to_owned),
                    pinned: row.pinned.map(str::to_owned),
                    timestamp: real.map(|a| a.timestamp),
                    run_user: real.map(|a| syms.resolve(a.run_user).to_owned()),
                    work_dir: real.map(|a| syms.resolve(a.work_dir).to_owned()),
                };
                serde_json::to_value(view).ok()
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
            relay: node.store.relay_name(h.relay),
            authenticated: h.authenticated(),
            agents,
        }
    })
}

/// One host: the newest copy among every node that holds it.
pub(super) async fn host(State(node): State<Arc<Node>>, Path(hostname): Path<String>) -> Result<Json<impl Serialize>, ApiError> {
    if !valid_hostname(&hostname) {
        return Err(ApiError::BadRequest(format!("bad hostname {hostname:?}")));
    }
    metrics::counter!(STATUS_REQUESTS, "kind" => "host").increment(1);
    let mut best = local_host(&node, &hostname);
    if let Some(c) = node.cluster() {
        let up = c.alive.mask();
        let peers = futures_util::future::join_all(c.peers().filter(|i| up & (1 << i) != 0).map(|i| {
            let req = peer_request(&node, &c, reqwest::Method::GET, i, &format!("/internal/host/{hostname}"));
            let c = &c;
            async move { peer_json::<Option<HostView>>(c, req, i, "host").await.flatten() }
        }))
        .await;
        for v in peers.into_iter().flatten() {
            if best.as_ref().is_none_or(|b| v.last_seen > b.last_seen) {
                best = Some(v);
            }
        }
    }
    best.map(Json).ok_or_else(|| ApiError::NotFound(format!("host {hostname} has not reported")))
}
