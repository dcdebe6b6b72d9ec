//! The ops fleet meta node.
//!
//! It owns the real state of the hosts the ring gives it (every host when standalone), serves
//! the desired config and its heartbeat replies, and answers fleet status. It must never
//! block the heartbeat path on disk or on another node, never hold a lock across an await, and
//! never serve a config that failed validation: a bad file on reload changes nothing.
//!
//! This file is the `Node` every module shares, its settings and its background tasks; it is
//! over 600 lines because the ingest paths (`ingest_*`), the sweep and the snapshot touch most
//! of its fields and read best beside them. The procedures are in `coordination`, the HTTP
//! layer in `api`, the hosts in `store`.
#![forbid(unsafe_code)]

pub mod api;
pub mod coordination;
pub mod fleet;
pub mod generations;
pub mod handoff;
pub mod membership;
pub mod metrics;
pub mod rollout;
pub mod snapshot;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use ops_config::{ClusterMap, DesiredConfig, Ring};
use ops_serve::forward::{ForwardSettings, Forwarder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::Store;
use ops_serve::desired::Desired;

/// Everything a node is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: String,
    pub agents_path: PathBuf,
    pub data_dir: PathBuf,
    /// A host not heard from for this long shows as `stale`.
    pub stale_after_seconds: u32,
    /// A host not heard from for this long is dropped.
    pub forget_after_seconds: u32,
    pub snapshot_interval: Duration,
    /// How often stale hosts are counted and forgotten ones dropped.
    pub sweep_interval: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Shared secret of internal and remote admin calls.
    pub token: Option<String>,
    pub cluster: Option<ClusterMap>,
    /// Where `cluster` was read from: a membership change online rewrites it.
    pub cluster_path: Option<PathBuf>,
    /// The text of `cluster.toml.sig` (with trusted keys, the map is checked against it).
    pub cluster_signature: Option<String>,
    /// How long a status query waits for each peer.
    pub peer_timeout: Duration,
    /// How heartbeats of hosts this node does not own are forwarded to their owner.
    pub forward: ForwardSettings,
    /// How often rollouts are judged and the peers' rollout states polled.
    pub rollout_interval: Duration,
    /// How often every peer's `/health` is probed (also the probe's timeout).
    pub probe_interval: Duration,
    /// How often failover copies are offered back to the node that should hold them.
    pub handoff_interval: Duration,
    /// How long a membership change that hosts moved here began lasts without this node's
    /// own prepare (`membership::Membership::moving_in`).
    pub moving_grace: Duration,
    /// The operators' public keys: when any is set, `agents.toml` must carry a valid
    /// `agents.toml.sig` by one of them, at start and on every reload.
    pub trusted_keys: ops_config::trust::TrustedKeys,
    /// Serve HTTPS with this (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<ops_serve::tls::ServerConfig>>,
    /// A report time (`seen`) in a batch later than this node's clock plus this is stored as
    /// the clock plus this (`--max-clock-skew-seconds`): a report from the future would make
    /// every later real report of its host "older" and the host never stale.
    pub max_clock_skew_seconds: u32,
    /// What each connection may take (`--max-connections`, `--*-timeout-ms`).
    pub limits: ops_serve::server::ConnLimits,
    /// What the interner may hold (`--max-interned-strings`, `--max-interned-bytes`): a
    /// report with a new string past them is refused.
    pub intern_limits: store::InternLimits,
    /// Host credentials checked and issued here (`--host-key-file`, ...).
    pub enrollment: Arc<ops_serve::enrollment::Enrollment>,
}

impl Settings {
    /// Defaults of a standalone node with its config at `agents_path`.
    pub fn standalone(agents_path: PathBuf, data_dir: PathBuf) -> Self {
        Settings {
            id: "meta-1".into(),
            agents_path,
            data_dir,
            stale_after_seconds: 900,
            forget_after_seconds: 7 * 24 * 3600,
            snapshot_interval: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            token: None,
            cluster: None,
            cluster_path: None,
            cluster_signature: None,
            peer_timeout: Duration::from_secs(2),
            forward: ForwardSettings { component: "meta_forward", ..ForwardSettings::default() },
            rollout_interval: Duration::from_secs(5),
            probe_interval: Duration::from_millis(1000),
            handoff_interval: Duration::from_millis(1000),
            moving_grace: Duration::from_secs(30),
            trusted_keys: ops_config::trust::TrustedKeys::default(),
            tls: None,
            max_clock_skew_seconds: 60,
            limits: ops_serve::server::ConnLimits::default(),
            intern_limits: store::InternLimits::default(),
            enrollment: Arc::default(),
        }
    }
}

/// Metric handles of the heartbeat path, registered once (no registry look-up per request).
pub struct HotMetrics {
    pub heartbeats_ok: ::metrics::Counter,
    pub heartbeats_bad: ::metrics::Counter,
    pub heartbeats_too_large: ::metrics::Counter,
    pub heartbeat_seconds: ::metrics::Histogram,
}

impl HotMetrics {
    fn register() -> Self {
        use crate::metrics::{HEARTBEAT_DURATION, HEARTBEATS};
        HotMetrics {
            heartbeats_ok: ::metrics::counter!(HEARTBEATS, "result" => "ok"),
            heartbeats_bad: ::metrics::counter!(HEARTBEATS, "result" => "bad_request"),
            heartbeats_too_large: ::metrics::counter!(HEARTBEATS, "result" => "too_large"),
            heartbeat_seconds: ::metrics::histogram!(HEARTBEAT_DURATION),
        }
    }
}

/// Clamps the report times of one batch to a ceiling, counting those it moved.
/// What a batch's reports met on the way in: times clamped, reports refused at the
/// interner's limits.
struct ReportClock {
    ceiling: u32,
    clamped: u64,
    refused: u64,
    full: Option<store::InternFull>,
    /// Reports whose credential the served `[enrollment]` withdraws (a relay that has not
    /// taken that config yet let them through): dropped.
    revoked: u64,
}

impl ReportClock {
    fn seen(&mut self, seen: u32) -> u32 {
        if seen > self.ceiling {
            self.clamped += 1;
            return self.ceiling;
        }
        seen
    }

    fn refuse(&mut self, full: store::InternFull) {
        self.refused += 1;
        self.full = Some(full);
    }

    /// Adds this batch's clamped reports to `ops_meta_reports_clamped_total` and its refused
    /// ones to `ops_meta_reports_refused_total`.
    fn count(self) {
        if let Some(full) = self.full {
            ::metrics::counter!(crate::metrics::REPORTS_REFUSED).increment(self.refused);
            tracing::warn!(reports = self.refused, error = %full, "reports of a batch refused");
        }
        if self.revoked > 0 {
            ::metrics::counter!(crate::metrics::REPORTS_REVOKED).increment(self.revoked);
            tracing::warn!(reports = self.revoked, "reports with a host credential the operator withdrew dropped");
        }
        if self.clamped > 0 {
            ::metrics::counter!(crate::metrics::REPORTS_CLAMPED).increment(self.clamped);
            tracing::warn!(reports = self.clamped, ceiling = self.ceiling, "report times in the future stored as now + max clock skew");
        }
    }
}

/// What a node of a cluster knows of the others.
pub struct Cluster {
    pub map: ClusterMap,
    pub ring: Ring,
    /// This node's index in `map.nodes`.
    pub me: usize,
    pub forwarder: Arc<Forwarder>,
    pub client: reqwest::Client,
    /// Which nodes answer now.
    pub alive: coordination::peers::Peers,
    /// This node is not in `map` (the last entry of `map.nodes` is itself): it is leaving and
    /// owns nothing (`membership`).
    pub leaving: bool,
    /// The operator's signature lines of `map.text` (header form), when signed.
    pub signature: Option<String>,
    /// Ends this map's forwarder probers once the map is no longer used.
    pub stop: CancellationToken,
}

impl Cluster {
    /// Indexes of the other nodes.
    pub fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.map.nodes.len()).filter(move |&i| i != self.me)
    }
}

/// A running node's shared state.
pub struct Node {
    pub settings: Settings,
    /// None when standalone: the node owns every host.
    pub cluster: Option<membership::Membership>,
    pub store: Store,
    pub desired: Desired,
    /// The generation of `agents.toml` and its last applied versions.
    pub generations: generations::Generations,
    /// Every node's published rollout state (this node's own included) and the in-flight
    /// counts of the heartbeats answered here.
    pub rollouts: Arc<ops_serve::rollout::FleetView>,
    pub controller: rollout::Controller,
    pub started: Instant,
    pub prometheus: Option<PrometheusHandle>,
    pub hot: HotMetrics,
    /// Ends the forwarders' probers (given to `new`; cancelled after `run` returns).
    pub stop: CancellationToken,
    /// At the last probe: a peer at this node's config generation served another config; a
    /// peer served another cluster map (outside a membership change).
    pub config_diverged: std::sync::atomic::AtomicBool,
    pub cluster_diverged: std::sync::atomic::AtomicBool,
    /// Sweeps run (the interner is collected every 20th regardless).
    sweeps: std::sync::atomic::AtomicU64,
    /// Ends the background tasks (cancelled when `run`'s shutdown begins).
    pub background: CancellationToken,
}

/// Server time in unix seconds (fits u32 until 2106), as relays stamp reports too.
pub use ops_config::clock::unix_now_u32 as unix_now;

impl Node {
    /// Builds a node serving `config` (with its `signature`, as `ops_config::trust::load_signed`
    /// read them); `stop` ends the forwarder's probers (cancel it after `run` returns).
    pub fn new(
        settings: Settings,
        config: DesiredConfig,
        signature: Option<String>,
        prometheus: Option<PrometheusHandle>,
        stop: CancellationToken,
    ) -> Self {
        let path = settings.agents_path.clone();
        let floor = ops_serve::floor::VersionFloor::open(&settings.data_dir);
        let desired = Desired::new(config, signature, path, settings.trusted_keys.clone(), Some(floor));
        let cluster = settings.cluster.as_ref().map(|map| {
            assert!(map.index_of(&settings.id).is_some(), "main checks the id is in the cluster map");
            let signature = settings.cluster_signature.as_deref().map(ops_config::trust::signature_header);
            let c = membership::build(&settings, map, signature, None, stop.child_token()).expect("the CA file is checked at start");
            membership::Membership::new(c, settings.cluster_path.clone(), &settings.data_dir, !settings.trusted_keys.is_empty())
        });
        let ids =
            cluster.as_ref().map_or_else(|| vec![settings.id.clone()], |m| m.current().map.nodes.iter().map(|n| n.id.clone()).collect());
        let rollouts = Arc::new(ops_serve::rollout::FleetView::open(ids, Some(&settings.data_dir), crate::metrics::ROLLOUT_IN_FLIGHT));
        let controller = rollout::Controller::open(&settings.id, &settings.data_dir);
        let generations = generations::Generations::open(&settings.data_dir);
        if let Some(version) = desired.current().config.version().filter(|_| !settings.trusted_keys.is_empty()) {
            generations.serve_signed(version);
        }
        Node {
            rollouts,
            controller,
            store: Store::with_limits(settings.intern_limits),
            settings,
            cluster,
            generations,
            desired,
            started: Instant::now(),
            prometheus,
            hot: HotMetrics::register(),
            stop,
            background: CancellationToken::new(),
            config_diverged: Default::default(),
            cluster_diverged: Default::default(),
            sweeps: Default::default(),
        }
    }

    /// Reloads `agents.toml` from disk (SIGHUP, `/config/reload`); with trusted keys the
    /// config generation follows the signed version of the file now served.
    pub fn reload_config(&self) -> Result<Arc<ops_serve::desired::Loaded>, ops_config::ConfigError> {
        let previous = self.desired.current();
        let loaded = self.desired.reload()?;
        self.withdraw_credentials(&previous.config, &loaded.config);
        if let Some(version) = loaded.config.version().filter(|_| !self.settings.trusted_keys.is_empty()) {
            self.generations.serve_signed(version);
        }
        Ok(loaded)
    }

    /// After a config change: the records of hosts that `now`'s `[enrollment.hosts]` names
    /// and `before`'s did not (or named otherwise) lose their authenticated mark, so what
    /// a withdrawn credential reported is no longer believed by the judge.
    pub fn withdraw_credentials(&self, before: &DesiredConfig, now: &DesiredConfig) {
        let mut cleared = 0;
        for (host, r) in now.revocations().hosts() {
            if before.revocations().host(host) != Some(r) && self.store.deauthenticate(host) {
                cleared += 1;
            }
        }
        if cleared > 0 {
            tracing::info!(hosts = cleared, "records of hosts whose credentials were withdrawn are no longer authenticated");
        }
    }

    /// The token to send peers: none under mTLS, where they know this node by its
    /// certificate.
    pub fn peer_token(&self) -> Option<&String> {
        self.settings.token.as_ref().filter(|_| !self.cluster().is_some_and(|c| c.map.mtls))
    }

    /// The cluster map served now (None when standalone).
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.as_ref().map(|m| m.current())
    }

    /// Parses and stores a JSON batch of host reports (blocking): `(stored, older)`. The
    /// newest report of a host wins; an older one is counted and ignored. A batch with any bad
    /// entry is refused whole.
    pub fn ingest_batch(&self, bytes: &[u8]) -> Result<(u64, u64), ops_config::WireError> {
        self.ingest_batch_from(bytes, None)
    }

    /// [`ingest_batch`](Self::ingest_batch) of a batch that relay `sender` posted (its
    /// certificate names it): refused whole when a report names another relay.
    pub fn ingest_batch_from(&self, bytes: &[u8], sender: Option<&str>) -> Result<(u64, u64), ops_config::WireError> {
        let batch = ops_config::Batch::parse(bytes)?;
        if let Some(s) = sender
            && let Some(e) = batch.hosts.iter().find(|e| e.relay != s)
        {
            return Err(ops_config::WireError::NotThisRelay {
                host: e.hb.hostname.to_string(),
                claimed: e.relay.clone(),
                sender: s.to_owned(),
            });
        }
        let loaded = self.desired.guard();
        let owns = self.owner_check();
        let mut relays = store::RelayIndexes::new(&self.store);
        let (mut stored, mut older) = (0, 0);
        let mut clock = self.report_clock();
        for e in &batch.hosts {
            let tags = store::Tags { relay: relays.index(&e.relay), ..Self::tags(&loaded, &e.hb.hostname, e.told) };
            match self.store.upsert_tagged(&e.hb, clock.seen(e.seen), tags, owns(&e.hb.hostname)) {
                Ok(true) => stored += 1,
                Ok(false) => older += 1,
                Err(full) => clock.refuse(full),
            }
        }
        clock.count();
        Ok((stored, older))
    }

    /// The same for a compact batch (`ops_config::compact`), what relays send: checked whole
    /// first, so a bad record changes nothing, then decoded again straight into the store.
    pub fn ingest_compact(&self, bytes: &[u8]) -> Result<(u64, u64), ops_config::WireError> {
        self.ingest_compact_as(bytes, false, None)
    }

    /// [`ingest_compact`](Self::ingest_compact) of a batch that relay `sender` posted (its
    /// certificate names it): refused whole when a record names another relay.
    pub fn ingest_compact_from(&self, bytes: &[u8], sender: Option<&str>) -> Result<(u64, u64), ops_config::WireError> {
        self.ingest_compact_as(bytes, false, sender)
    }

    /// A compact batch of failover copies a peer hands back (`handoff`): each is kept only
    /// where it is strictly newer than what this node holds.
    pub fn ingest_handed_back(&self, bytes: &[u8]) -> Result<(u64, u64), ops_config::WireError> {
        self.ingest_compact_as(bytes, true, None)
    }

    fn ingest_compact_as(&self, bytes: &[u8], handed_back: bool, sender: Option<&str>) -> Result<(u64, u64), ops_config::WireError> {
        ops_config::compact::check_from(bytes, sender)?;
        let loaded = self.desired.guard();
        let owns = self.owner_check();
        let (mut stored, mut older) = (0, 0);
        let mut relays = store::RelayIndexes::new(&self.store);
        let mut clock = self.report_clock();
        let revocations = loaded.config.revocations();
        ops_config::compact::decode_checked(bytes, |rec, hb| {
            // A relay checked the credential; the withdrawals are checked again here, against
            // the config this node serves. A copy handed back carries no serial: it keeps its
            // mark only if nothing is said of its host.
            let auth = match rec.auth {
                Some(_) if handed_back => revocations.host(&hb.hostname).is_none(),
                Some(serial) => {
                    if revocations.refuses(&hb.hostname, serial).is_err() {
                        clock.revoked += 1;
                        return;
                    }
                    true
                }
                None => false,
            };
            let tags = store::Tags { relay: relays.index(rec.relay), auth, ..Self::tags(&loaded, &hb.hostname, rec.told) };
            let owned = owns(&hb.hostname);
            let seen = clock.seen(rec.seen);
            let kept = if handed_back {
                self.store.upsert_handed_back(hb, seen, tags, owned)
            } else {
                self.store.upsert_tagged(hb, seen, tags, owned)
            };
            match kept {
                Ok(true) => stored += 1,
                Ok(false) => older += 1,
                Err(full) => clock.refuse(full),
            }
        })?;
        clock.count();
        Ok((stored, older))
    }

    /// The latest report time a batch may carry now (this node's clock plus the skew allowed).
    fn report_clock(&self) -> ReportClock {
        ReportClock {
            ceiling: ops_config::clock::unix_now_u32().saturating_add(self.settings.max_clock_skew_seconds),
            clamped: 0,
            refused: 0,
            full: None,
            revoked: 0,
        }
    }

    /// How a host's report is stored under `loaded`: its class, and its waves when the config
    /// has rollouts (one md5 per rollout).
    pub fn tags(loaded: &ops_serve::desired::Loaded, hostname: &str, told: u8) -> store::Tags {
        let class = loaded.config.class_of(hostname);
        let waves = if loaded.config.rollouts().next().is_some() { loaded.config.rollout_waves(hostname, class) } else { 0 };
        store::Tags { class, generation: loaded.generation, told, waves, relay: store::NO_RELAY, auth: false }
    }

    /// Whether this node owns `hostname` on the ring (always, standalone).
    pub fn owns(&self, hostname: &str) -> bool {
        self.owner_check()(hostname)
    }

    /// [`Node::owns`] for many hosts under one load of the map (a batch).
    fn owner_check(&self) -> impl Fn(&str) -> bool {
        let cluster = self.cluster.as_ref().map(|m| m.guard());
        move |hostname| cluster.as_ref().is_none_or(|c| c.ring.owner(hostname) == c.me)
    }

    /// Gauges that are cheap to read at scrape time.
    pub fn refresh_gauges(&self) {
        ::metrics::gauge!(crate::metrics::HOSTS).set(self.store.len() as f64);
        ::metrics::gauge!(crate::metrics::INTERNED_STRINGS).set(self.store.symbols().len() as f64);
        ::metrics::gauge!(crate::metrics::INTERNED_BYTES).set(self.store.symbols().bytes() as f64);
        ::metrics::counter!(crate::metrics::UNAUTHENTICATED_IGNORED).absolute(self.store.unauthenticated_ignored());
    }

    /// Frees the interned strings no host uses any more, when any may have become unused.
    /// Blocking: a scan of every record (tens of ms at a million hosts).
    fn collect_strings(&self) {
        // Every 20th sweep regardless (10 minutes at the default interval).
        let nth = self.sweeps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.store.strings_want_collection() && nth % 20 != 19 {
            return;
        }
        let started = std::time::Instant::now();
        let freed = self.store.collect_strings();
        if freed > 0 {
            ::metrics::counter!(crate::metrics::STRINGS_FREED).increment(freed as u64);
            tracing::info!(
                freed,
                held = self.store.symbols().len(),
                bytes = self.store.symbols().bytes(),
                ms = started.elapsed().as_millis() as u64,
                "freed interned strings no host uses"
            );
        }
    }

    /// Drops forgotten hosts and counts stale ones. Blocking.
    fn sweep(&self) {
        let now = unix_now();
        // Failover copies (hosts of another node) are dropped once stale: their reports went
        // back to the owner.
        let forgotten = self
            .store
            .forget_before(now.saturating_sub(self.settings.forget_after_seconds), now.saturating_sub(self.settings.stale_after_seconds));
        if forgotten > 0 {
            ::metrics::counter!(crate::metrics::HOSTS_FORGOTTEN).increment(forgotten as u64);
            tracing::info!(forgotten, "dropped hosts not heard from for forget_after");
        }
        self.collect_strings();
        let compacted = self.store.compact();
        if compacted > 0 {
            tracing::info!(shards = compacted, hosts = self.store.len(), "compacted shards whose slots were mostly free");
        }
        let cutoff = now.saturating_sub(self.settings.stale_after_seconds);
        let mut stale = 0usize;
        // Owned hosts by relay index: (hosts, silent); summed over the nodes, each host once.
        let mut by_relay: Vec<(u64, u64)> = Vec::new();
        for i in 0..store::SHARDS {
            let shard = self.store.shard(i);
            for (_, h) in shard.hosts() {
                let silent = h.last_seen < cutoff;
                stale += usize::from(silent);
                if h.owned() {
                    let r = usize::from(h.relay);
                    if r >= by_relay.len() {
                        by_relay.resize(r + 1, (0, 0));
                    }
                    by_relay[r].0 += 1;
                    by_relay[r].1 += u64::from(silent);
                }
            }
        }
        ::metrics::gauge!(crate::metrics::HOSTS_STALE).set(stale as f64);
        // Every relay ever seen gets a value, 0 once it has no host here.
        for (i, name) in self.store.relay_names().iter().enumerate() {
            let (hosts, silent) = by_relay.get(i).copied().unwrap_or_default();
            let relay = if name.is_empty() { "direct".to_owned() } else { name.to_string() };
            ::metrics::gauge!(crate::metrics::RELAY_HOSTS, "relay" => relay.clone()).set(hosts as f64);
            ::metrics::gauge!(crate::metrics::RELAY_SILENT_HOSTS, "relay" => relay).set(silent as f64);
        }
        self.refresh_gauges();
    }

    /// Writes a snapshot, logging and counting the outcome. Blocking.
    pub fn snapshot(&self) {
        let started = Instant::now();
        match snapshot::write(&self.store, &self.settings.data_dir) {
            Ok(w) => {
                let secs = started.elapsed().as_secs_f64();
                ::metrics::counter!(crate::metrics::SNAPSHOTS, "result" => "ok").increment(1);
                ::metrics::histogram!(crate::metrics::SNAPSHOT_DURATION).record(secs);
                ::metrics::gauge!(crate::metrics::SNAPSHOT_BYTES).set(w.bytes as f64);
                tracing::debug!(hosts = w.hosts, bytes = w.bytes, secs, "snapshot written");
            }
            Err(error) => {
                ::metrics::counter!(crate::metrics::SNAPSHOTS, "result" => "error").increment(1);
                tracing::error!(%error, "snapshot failed");
            }
        }
    }

    /// Loads the snapshot of the data dir; a damaged one is moved aside and the node starts
    /// empty (real state is soft: the next sweep of heartbeats refills it).
    pub fn restore(&self) {
        let dir = &self.settings.data_dir;
        match snapshot::load(&self.store, dir, |h| self.owns(h)) {
            Ok(hosts) => tracing::info!(hosts, dir = %dir.display(), "snapshot loaded"),
            Err(error) => {
                let moved = snapshot::quarantine(dir, unix_now());
                tracing::error!(%error, moved_to = ?moved, "snapshot unreadable, starting empty");
            }
        }
    }
}

async fn every(period: Duration, token: CancellationToken, mut f: impl FnMut()) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => f(),
        }
    }
}

/// Serves `node` on `listener` until `shutdown` is cancelled, then drains requests (up to the
/// grace period) and writes a last snapshot.
pub async fn run(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let background = node.background.clone();

    {
        let n = node.clone();
        tracker.spawn(every(node.settings.snapshot_interval, background.clone(), move || {
            let n = n.clone();
            // Off the runtime: a snapshot of a million hosts takes a moment of disk I/O.
            drop(tokio::task::spawn_blocking(move || n.snapshot()));
        }));
        let n = node.clone();
        tracker.spawn(every(node.settings.sweep_interval, background.clone(), move || {
            let n = n.clone();
            drop(tokio::task::spawn_blocking(move || n.sweep()));
        }));
        if let Some(handle) = node.prometheus.clone() {
            tracker.spawn(every(Duration::from_secs(5), background.clone(), move || handle.run_upkeep()));
        }
    }

    // Judge once before serving, so the first answer to a relay is what this node published
    // before it stopped (read back from disk), never less.
    {
        let n = node.clone();
        tokio::task::spawn_blocking(move || n.controller.judge(&n)).await?;
        let n = node.clone();
        tracker.spawn(every(node.settings.rollout_interval, background.clone(), move || {
            let n = n.clone();
            drop(tokio::task::spawn_blocking(move || n.controller.judge(&n)));
        }));
        if node.cluster.is_some() {
            // The peers' rollout poll and the forwarder belong to the map: a membership
            // change restarts them (`membership`).
            membership::start_map_tasks(&node);
        } else {
            let n = node.clone();
            tracker.spawn(every(node.settings.rollout_interval, background.clone(), move || {
                n.rollouts.prune(&n.desired.current(), unix_now())
            }));
        }
    }

    if node.cluster.is_some() {
        tracker.spawn(coordination::peers::probe(node.clone(), node.settings.probe_interval, background.clone()));
        tracker.spawn(handoff::run(node.clone(), node.settings.handoff_interval, background.clone()));
    }

    let server = tokio::spawn(ops_serve::server::serve_router(
        listener,
        node.settings.tls.clone(),
        api::router(node.clone()),
        node.settings.limits,
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    background.cancel();
    tracker.close();
    match tokio::time::timeout(node.settings.shutdown_grace, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "server error"),
        Ok(Err(error)) => tracing::error!(%error, "server task failed"),
        Err(_) => {
            tracing::warn!(grace = ?node.settings.shutdown_grace, "requests still in flight after the grace period; stopping anyway")
        }
    }
    membership::drain(&node, node.settings.shutdown_grace).await;
    if tokio::time::timeout(node.settings.shutdown_grace, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within the grace period");
    }
    let n = node.clone();
    tokio::task::spawn_blocking(move || n.snapshot()).await?;
    tracing::info!(hosts = node.store.len(), "snapshot written on shutdown, stopped");
    Ok(())
}
