//! Listings, streamed: a blocking task formats one shard at a time into a chunk and hands it
//! to the response through a small channel, so a million-host listing is never built whole in
//! memory. Every peer's stream is opened first, so the reply's headers already say which
//! nodes did not answer; then the nodes' rows follow one node after another.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::Refusal;
use super::gather::{Gather, missing_ids, peer_failed, peer_request};
use crate::fleet::{self, AgentQuery, Filter, Scope};
use crate::{Node, unix_now};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    Json,
    Text,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Format {
        if s == Some("text") { Format::Text } else { Format::Json }
    }
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
        }
    }
}

/// Streams this node's rows in `scope` into `tx` (blocking: run it off the runtime).
pub fn stream_local_rows(node: &Node, agent: &str, scope: Scope<'_>, filter: &Filter, format: Format, tx: &mpsc::Sender<Bytes>) -> bool {
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

/// A listing on its way: the nodes missing when it began (for the reply's headers) and its
/// chunks, head to tail.
pub struct Listing {
    pub initially_missing: Vec<String>,
    pub chunks: mpsc::Receiver<Bytes>,
}

/// Lists `agent`'s hosts through `filter` from every node held up, one node after another;
/// `query` is the filter as the peers are asked it (with `format`).
pub async fn listing(node: Arc<Node>, agent: String, filter: Filter, query: String, format: Format) -> Result<Listing, Refusal> {
    let gather = Arc::new(Gather::now(&node));
    let mut own_view = Some(gather.own_view(&node)?);
    let present = gather.present;
    // Every peer's stream is opened before the reply's headers go out, so they already say
    // which nodes did not answer; the peers start scanning meanwhile (each blocks on its
    // small channel until its rows are read).
    let qs = query;
    let opened = futures_util::future::join_all((0..gather.nodes).filter(|&i| gather.asks(i) && i != gather.me).map(|i| {
        let body = gather.request(None);
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
    let (tx, rx) = mpsc::channel::<Bytes>(4);
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
    Ok(Listing { initially_missing, chunks: rx })
}
