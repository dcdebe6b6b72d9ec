//! Forwarding real state to the meta nodes that own it, in batches, with failover.
//!
//! Reports wait in one buffer per owning node, keyed by hostname, so a host that reports again
//! before a flush replaces its previous report: buffers are bounded by the hosts behind this
//! forwarder, and by `max_pending` whatever hostnames a sender invents (the oldest reports are
//! dropped first, counted and logged). A flush sends each owner its batch; when an
//! owner is down or slow its hosts go to their next ring candidate that is up, while a prober
//! polls the owner's `/health` with backoff and sends hosts back to it once it answers.
//! Relays use this, and so do meta nodes for heartbeats of hosts they do not own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use compact_str::CompactString;
use hashbrown::HashMap;
use ops_config::{ClusterMap, Heartbeat, NodeSpec, Ring, compact};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use ops_config::wire::{BATCH_PATH, HANDOFF_HEADER, MOVING_HEADER};

/// Default of `max_pending`: twice the hosts behind one relay of a million-host fleet with two.
pub const DEFAULT_MAX_PENDING: usize = 1_000_000;

/// How a forwarder batches and gives up.
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    /// Flush period.
    pub flush: Duration,
    /// Flush early when an owner has this many hosts waiting; also the most hosts in one request.
    pub batch_max: usize,
    /// A batch not answered within this is treated as failed (the owner is "slow").
    pub request_timeout: Duration,
    /// Shared secret of the internal endpoints.
    pub token: Option<String>,
    /// Metric prefix: `ops_{component}_...`.
    pub component: &'static str,
    /// The most hosts waiting, all owners together (each owner's buffer holds its share,
    /// rounded up): past it the oldest reports are dropped.
    pub max_pending: usize,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        ForwardSettings {
            flush: Duration::from_millis(1000),
            batch_max: 5000,
            request_timeout: Duration::from_secs(5),
            token: None,
            component: "relay",
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

/// One host's report on its way: when it was received, and its compact record.
pub struct Pending {
    pub seen: u32,
    pub body: Bytes,
}

/// A hostname with its report.
pub type Entry = (CompactString, Pending);

#[derive(Clone)]
struct NodeMetrics {
    batches_ok: metrics::Counter,
    batches_error: metrics::Counter,
    pending: metrics::Gauge,
    up: metrics::Gauge,
}

/// Buffers and sends batches of real state.
pub struct Forwarder {
    nodes: Vec<NodeSpec>,
    /// `http[s]://addr` of each node.
    bases: Vec<String>,
    ring: Ring,
    settings: ForwardSettings,
    buffers: Vec<Mutex<HashMap<CompactString, Pending>>>,
    up: Arc<[AtomicBool]>,
    probing: Arc<[AtomicBool]>,
    wake: Notify,
    client: reqwest::Client,
    stop: CancellationToken,
    per_node: Vec<NodeMetrics>,
    batch_hosts: metrics::Histogram,
    failover_hosts: metrics::Counter,
    dropped: metrics::Counter,
    /// Hosts one owner's buffer holds at most.
    buffer_cap: usize,
}

/// A set of flags as a bit mask (bit i: flag i set), the form `Ring::first_in` takes.
pub fn mask_of(flags: &[AtomicBool]) -> u64 {
    flags.iter().enumerate().filter(|(_, f)| f.load(Ordering::Relaxed)).fold(0, |m, (i, _)| m | (1 << i))
}

/// Result of one flush.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    pub failed_over: usize,
    /// Hosts put back because no node took them.
    pub requeued: usize,
}

impl Forwarder {
    pub fn new(cluster: &ClusterMap, settings: ForwardSettings, stop: CancellationToken) -> Arc<Self> {
        let c = settings.component;
        let per_node = cluster
            .nodes
            .iter()
            .map(|n| NodeMetrics {
                batches_ok: metrics::counter!(format!("ops_{c}_batches_total"), "node" => n.id.clone(), "result" => "ok"),
                batches_error: metrics::counter!(format!("ops_{c}_batches_total"), "node" => n.id.clone(), "result" => "error"),
                pending: metrics::gauge!(format!("ops_{c}_pending_hosts"), "node" => n.id.clone()),
                up: metrics::gauge!(format!("ops_{c}_node_up"), "node" => n.id.clone()),
            })
            .collect::<Vec<_>>();
        for m in &per_node {
            m.up.set(1.0);
        }
        Arc::new(Forwarder {
            bases: (0..cluster.nodes.len()).map(|i| cluster.url(i, "")).collect(),
            nodes: cluster.nodes.clone(),
            ring: cluster.ring(),
            buffers: cluster.nodes.iter().map(|_| Mutex::new(HashMap::new())).collect(),
            up: cluster.nodes.iter().map(|_| AtomicBool::new(true)).collect(),
            probing: cluster.nodes.iter().map(|_| AtomicBool::new(false)).collect(),
            wake: Notify::new(),
            client: crate::tls::for_cluster(reqwest::Client::builder().no_proxy().pool_max_idle_per_host(4), cluster)
                .and_then(|b| b.build().map_err(|e| e.to_string()))
                .expect("the CA file is checked at start"),
            stop,
            per_node,
            batch_hosts: metrics::histogram!(format!("ops_{c}_batch_hosts")),
            failover_hosts: metrics::counter!(format!("ops_{c}_failover_hosts_total")),
            dropped: metrics::counter!(format!("ops_{c}_pending_dropped_total")),
            buffer_cap: settings.max_pending.div_ceil(cluster.nodes.len().max(1)).max(1),
            settings,
        })
    }

    /// Describes the forwarder's metrics (once per process).
    pub fn describe(component: &'static str) {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            format!("ops_{component}_batches_total"),
            Unit::Count,
            "Batches sent to meta nodes, by node and result (ok, error)."
        );
        describe_gauge!(format!("ops_{component}_pending_hosts"), Unit::Count, "Hosts waiting to be sent, by owning node.");
        describe_gauge!(format!("ops_{component}_node_up"), Unit::Count, "1 while a meta node takes batches, 0 while it is failed over.");
        describe_histogram!(format!("ops_{component}_batch_hosts"), Unit::Count, "Hosts per batch sent.");
        describe_counter!(
            format!("ops_{component}_failover_hosts_total"),
            Unit::Count,
            "Host reports sent to a node other than their owner."
        );
        describe_counter!(
            format!("ops_{component}_pending_dropped_total"),
            Unit::Count,
            "Waiting host reports dropped, oldest first, because the buffers held --max-pending-hosts."
        );
    }

    /// Ends this forwarder's probers (a forwarder replaced by a new cluster map's, once it
    /// drained). Give each forwarder its own token (a child) for this.
    pub fn retire(&self) {
        self.stop.cancel();
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Queues a validated heartbeat for the owner of its host, as a compact record (see
    /// `ops_config::compact`): when it was received, what it was told, the relay it came through.
    pub fn push(&self, hb: &Heartbeat<'_>, rec: compact::Record<'_>) {
        let mut record = Vec::with_capacity(256);
        compact::encode(rec, hb, &mut record);
        let owner = self.ring.owner(&hb.hostname);
        self.push_to(owner, &hb.hostname, rec.seen, Bytes::from(record));
    }

    fn push_to(&self, owner: usize, host: &str, seen: u32, body: Bytes) {
        let len = {
            let mut buf = self.buffers[owner].lock();
            match buf.get_mut(host) {
                Some(p) if p.seen > seen => {}
                Some(p) => *p = Pending { seen, body },
                None => {
                    self.make_room(owner, &mut buf);
                    buf.insert(CompactString::from(host), Pending { seen, body });
                }
            }
            buf.len()
        };
        if len >= self.settings.batch_max {
            self.wake.notify_one();
        }
    }

    /// The nodes that take batches now, as a bit mask (bit i: node i).
    pub fn up_mask(&self) -> u64 {
        mask_of(&self.up)
    }

    /// Hosts waiting, per node.
    pub fn pending(&self) -> Vec<usize> {
        self.buffers.iter().map(|b| b.lock().len()).collect()
    }

    /// Whether each node currently takes batches.
    pub fn nodes_up(&self) -> Vec<(String, bool)> {
        self.nodes.iter().zip(self.up.iter()).map(|(n, u)| (n.id.clone(), u.load(Ordering::Relaxed))).collect()
    }

    /// Flushes every period (or early when a buffer is full) until `shutdown`, then drains.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.settings.flush) => {}
                _ = self.wake.notified() => {}
            }
            self.flush().await;
        }
        // Drain: a few rounds, so hosts failing over still get a chance.
        for _ in 0..3 {
            let f = self.flush().await;
            if f.requeued == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left: usize = self.pending().iter().sum();
        if left > 0 {
            tracing::warn!(hosts = left, "stopping with reports no meta node took");
        }
    }

    /// Sends everything waiting now.
    pub async fn flush(&self) -> Flushed {
        let mut out = Flushed::default();
        let mut routed: HashMap<usize, Vec<Entry>> = HashMap::new();
        for owner in 0..self.nodes.len() {
            let taken = std::mem::take(&mut *self.buffers[owner].lock());
            self.per_node[owner].pending.set(0.0);
            if !taken.is_empty() {
                self.route(owner, taken.into_iter().collect(), &mut routed, &mut out);
            }
        }
        // Each round sends to every target at once; failures are routed again to the next
        // candidate that is up, at most once per node.
        for _ in 0..=self.nodes.len() {
            if routed.is_empty() {
                break;
            }
            let sends = routed.drain().map(|(target, entries)| async move {
                let ok = self.send(target, &entries).await;
                (target, entries, ok)
            });
            let results = futures_util::future::join_all(sends).await;
            for (target, entries, ok) in results {
                if ok {
                    out.sent += entries.len();
                } else {
                    self.mark_down(target);
                    let mut by_owner: HashMap<usize, Vec<Entry>> = HashMap::new();
                    for e in entries {
                        by_owner.entry(self.ring.owner(&e.0)).or_default().push(e);
                    }
                    for (owner, entries) in by_owner {
                        self.route(owner, entries, &mut routed, &mut out);
                    }
                }
            }
        }
        for entries in routed.into_values() {
            self.requeue(entries, &mut out);
        }
        for (i, b) in self.buffers.iter().enumerate() {
            self.per_node[i].pending.set(b.lock().len() as f64);
        }
        out
    }

    /// Puts `entries` of `owner` into per-target lists: the owner when up, else each host's
    /// next candidate that is up; hosts with no node up are requeued.
    fn route(&self, owner: usize, entries: Vec<Entry>, routed: &mut HashMap<usize, Vec<Entry>>, out: &mut Flushed) {
        if self.up[owner].load(Ordering::Relaxed) {
            routed.entry(owner).or_default().extend(entries);
            return;
        }
        let up = self.up_mask();
        let mut homeless = Vec::new();
        for e in entries {
            match self.ring.first_in(&e.0, up) {
                Some(target) => {
                    out.failed_over += 1;
                    self.failover_hosts.increment(1);
                    routed.entry(target).or_default().push(e);
                }
                None => homeless.push(e),
            }
        }
        self.requeue(homeless, out);
    }

    /// Puts entries back in their owner's buffer unless a newer report arrived meanwhile.
    fn requeue(&self, entries: Vec<Entry>, out: &mut Flushed) {
        out.requeued += entries.len();
        for (host, p) in entries {
            let owner = self.ring.owner(&host);
            let mut buf = self.buffers[owner].lock();
            match buf.get_mut(&host) {
                Some(existing) if existing.seen >= p.seen => {}
                Some(existing) => *existing = p,
                None => {
                    self.make_room(owner, &mut buf);
                    buf.insert(host, p);
                }
            }
        }
    }

    /// Before a new host goes into a full buffer: drops its oldest reports, a hundredth of the
    /// cap at a time (one pass over the buffer per hundredth, not per report).
    fn make_room(&self, owner: usize, buf: &mut HashMap<CompactString, Pending>) {
        if buf.len() < self.buffer_cap {
            return;
        }
        let drop = (self.buffer_cap / 100).max(1).min(buf.len());
        let mut times: Vec<u32> = buf.values().map(|p| p.seen).collect();
        let (_, &mut cut, _) = times.select_nth_unstable(drop - 1);
        // Everything older than the cut goes, then reports at the cut until `drop` are gone.
        let mut at_cut = drop - times[..drop].iter().filter(|&&t| t < cut).count();
        buf.retain(|_, p| match p.seen.cmp(&cut) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal if at_cut > 0 => {
                at_cut -= 1;
                false
            }
            _ => true,
        });
        self.dropped.increment(drop as u64);
        tracing::warn!(
            node = %self.nodes[owner].id,
            dropped = drop,
            held = buf.len(),
            "pending buffer full (--max-pending-hosts): dropped its oldest reports"
        );
    }

    /// Sends `entries` to node `target` in batches of at most `batch_max` hosts: true when
    /// every batch was taken (a batch refused as malformed is dropped and logged: it would
    /// never be taken). Meta nodes also hand failover copies back through this.
    pub async fn send(&self, target: usize, entries: &[Entry]) -> bool {
        self.send_batches(target, entries, false, None).await
    }

    /// [`Forwarder::send`] of failover copies handed back ([`HANDOFF_HEADER`]).
    pub async fn send_handoff(&self, target: usize, entries: &[Entry]) -> bool {
        self.send_batches(target, entries, true, None).await
    }

    /// [`Forwarder::send_handoff`] of the hosts a membership change moves to `target` by the
    /// map whose hash is `map` ([`MOVING_HEADER`]).
    pub async fn send_moving(&self, target: usize, entries: &[Entry], map: &str) -> bool {
        self.send_batches(target, entries, true, Some(map)).await
    }

    async fn send_batches(&self, target: usize, entries: &[Entry], handoff: bool, moving: Option<&str>) -> bool {
        let node = &self.nodes[target];
        let url = format!("{}{BATCH_PATH}", self.bases[target]);
        for chunk in entries.chunks(self.settings.batch_max.max(1)) {
            let mut body = Vec::with_capacity(chunk.iter().map(|e| e.1.body.len()).sum::<usize>() + 4);
            compact::begin(&mut body);
            for (_, p) in chunk {
                body.extend_from_slice(&p.body);
            }
            let mut req = self
                .client
                .post(&url)
                .timeout(self.settings.request_timeout)
                .header(reqwest::header::CONTENT_TYPE, compact::CONTENT_TYPE)
                .body(body);
            if let Some(token) = &self.settings.token {
                req = req.bearer_auth(token);
            }
            if handoff {
                req = req.header(HANDOFF_HEADER, "1");
            }
            if let Some(map) = moving {
                req = req.header(MOVING_HEADER, map);
            }
            let result = req.send().await;
            match result {
                Ok(r) if r.status().is_success() => {
                    self.per_node[target].batches_ok.increment(1);
                    self.batch_hosts.record(chunk.len() as f64);
                }
                Ok(r) if r.status() == reqwest::StatusCode::BAD_REQUEST => {
                    // A batch the node cannot read will never be readable: drop it loudly
                    // rather than retry it forever.
                    self.per_node[target].batches_error.increment(1);
                    let text = r.text().await.unwrap_or_default();
                    tracing::error!(node = %node.id, hosts = chunk.len(), reply = %text, "batch refused as malformed, dropped");
                }
                Ok(r) => {
                    self.per_node[target].batches_error.increment(1);
                    tracing::warn!(node = %node.id, status = %r.status(), "batch refused");
                    return false;
                }
                Err(error) => {
                    self.per_node[target].batches_error.increment(1);
                    tracing::warn!(node = %node.id, %error, "batch not delivered");
                    return false;
                }
            }
        }
        true
    }

    /// Marks a node down and starts a prober that marks it up again when `/health` answers.
    fn mark_down(&self, node: usize) {
        self.up[node].store(false, Ordering::Relaxed);
        self.per_node[node].up.set(0.0);
        if self.probing[node].swap(true, Ordering::AcqRel) {
            return;
        }
        let url = format!("{}/health", self.bases[node]);
        let id = self.nodes[node].id.clone();
        let client = self.client.clone();
        let stop = self.stop.clone();
        let timeout = self.settings.request_timeout;
        let (up, probing, gauge) = (self.up.clone(), self.probing.clone(), self.per_node[node].up.clone());
        tracing::warn!(node = %id, "meta node failed over");
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                if let Ok(r) = client.get(&url).timeout(timeout).send().await
                    && r.status().is_success()
                {
                    up[node].store(true, Ordering::Relaxed);
                    probing[node].store(false, Ordering::Release);
                    gauge.set(1.0);
                    tracing::info!(node = %id, "meta node back, its hosts return to it");
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_cluster() -> ClusterMap {
        // Port 9 on loopback: nothing listens, connections are refused at once.
        ClusterMap::single("127.0.0.1:9".parse().unwrap())
    }

    #[tokio::test]
    async fn buffers_keep_one_report_per_host_newest_first_and_requeue_when_no_node_takes_them() {
        let settings = ForwardSettings { request_timeout: Duration::from_millis(500), ..ForwardSettings::default() };
        let f = Forwarder::new(&unreachable_cluster(), settings, CancellationToken::new());
        let hb = |h: u32, seen: u32| format!(r#"{{"hostname":"host-{h}","ip":"10.0.0.{seen}","realAgents":[]}}"#);
        for seen in [5, 7, 6] {
            for h in 0..100 {
                f.push(&Heartbeat::parse(hb(h, seen).as_bytes()).unwrap(), compact::Record { seen, told: 0, relay: "r", auth: None });
            }
        }
        assert_eq!(f.pending(), vec![100], "one entry per host, however often it reports");
        let out = f.flush().await;
        assert_eq!((out.sent, out.requeued), (0, 100));
        assert_eq!(f.pending(), vec![100], "nothing lost while no node is up");
        assert_eq!(f.nodes_up(), vec![("meta-1".to_owned(), false)]);
        let kept = f.buffers[0].lock().get("host-3").map(|p| (p.seen, p.body.clone())).unwrap();
        assert_eq!(kept.0, 7, "the newest report wins, not the last pushed");
        let mut body = Vec::new();
        compact::begin(&mut body);
        body.extend_from_slice(&kept.1);
        let mut ips = Vec::new();
        compact::decode(&body, |r, h| ips.push((r.seen, h.ip.to_string()))).unwrap();
        assert_eq!(ips, vec![(7, "10.0.0.7".to_owned())], "the record held is the newest report");
        // A report older than the one held is ignored; a newer one replaces it.
        f.push(&Heartbeat::parse(hb(3, 6).as_bytes()).unwrap(), compact::Record { seen: 6, told: 0, relay: "r", auth: None });
        assert_eq!(f.buffers[0].lock().get("host-3").unwrap().seen, 7);
        f.push(&Heartbeat::parse(hb(3, 8).as_bytes()).unwrap(), compact::Record { seen: 8, told: 0, relay: "r", auth: None });
        assert_eq!(f.buffers[0].lock().get("host-3").unwrap().seen, 8);
        f.stop.cancel();
    }

    #[tokio::test]
    async fn a_full_buffer_drops_its_oldest_reports_and_never_grows_past_the_cap() {
        let settings = ForwardSettings { request_timeout: Duration::from_millis(500), max_pending: 500, ..ForwardSettings::default() };
        let f = Forwarder::new(&unreachable_cluster(), settings, CancellationToken::new());
        let push = |h: u32, seen: u32| {
            let body = format!(r#"{{"hostname":"host-{h}","realAgents":[]}}"#);
            f.push(&Heartbeat::parse(body.as_bytes()).unwrap(), compact::Record { seen, told: 0, relay: "r", auth: None });
        };
        // 500 real hosts, then 2,000 invented ones reported later.
        for h in 0..500 {
            push(h, 100 + h / 100);
        }
        assert_eq!(f.pending(), vec![500]);
        for h in 500..2500 {
            push(h, 1000);
            assert!(f.pending()[0] <= 500, "never above the cap");
        }
        {
            let buf = f.buffers[0].lock();
            assert!(buf.len() > 490, "only a hundredth of the cap goes at a time: {}", buf.len());
            assert!((0..500).all(|h| !buf.contains_key(format!("host-{h}").as_str())), "the oldest went first");
        }
        // A known host reporting again replaces its entry without dropping anyone.
        let before = f.pending()[0];
        push(2499, 1001);
        assert_eq!(f.pending()[0], before);
        // Requeued reports respect the cap too.
        let out = f.flush().await;
        assert_eq!(out.requeued, before);
        assert_eq!(f.pending()[0], before);
        f.stop.cancel();
    }
}
