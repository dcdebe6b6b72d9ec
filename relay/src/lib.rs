//! The ops fleet relay.
//!
//! A relay answers updater heartbeats from its read-only copy of the desired config and
//! forwards their real state, batched and keyed by hostname, to the meta node that owns each
//! host. It holds no authoritative state: its config copy comes from the meta nodes and its
//! buffers only hold reports on their way. It must never make an updater wait on a meta node.
#![forbid(unsafe_code)]

//!
//! What serving it shares with the meta nodes (the listener, the forwarder, the served config,
//! the rollout view, enrollment) is in `ops_serve`; this crate holds what only a relay does: its
//! copies of the desired config and the cluster map, the package cache, its heartbeat answer.

pub mod cache;
pub mod cluster_copy;
pub mod config_copy;
pub mod ingest;
pub mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use ops_config::ClusterMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config_copy::ConfigCopy;
use ops_serve::forward::{ForwardSettings, Forwarder};

/// Everything a relay is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: String,
    pub cluster: ClusterMap,
    pub data_dir: PathBuf,
    pub forward: ForwardSettings,
    pub config_poll: Duration,
    pub shutdown_grace: Duration,
    /// When set, config copies must be signed by one of these keys.
    pub trusted_keys: ops_config::trust::TrustedKeys,
    /// Serve HTTPS with this (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<ops_serve::tls::ServerConfig>>,
    /// The package cache (`--cache-dir`), if on.
    pub cache: Option<crate::cache::CacheSettings>,
    /// The runtime package downloads are served on (`--cache-threads`); None: the main one.
    pub packages: Option<tokio::runtime::Handle>,
    /// What each connection may take (`--max-connections`, `--*-timeout-ms`).
    pub limits: ops_serve::server::ConnLimits,
    /// Host credentials checked and issued here (`--host-key-file`, ...).
    pub enrollment: Arc<ops_serve::enrollment::Enrollment>,
}

pub(crate) struct HotMetrics {
    ok: ::metrics::Counter,
    duration: ::metrics::Histogram,
}

/// What belongs to the cluster map followed now: its polls, its forwarder and the token
/// that drains it, and the forwarder's task.
struct MapTasks {
    tasks: CancellationToken,
    drain: CancellationToken,
    forwarder: Arc<Forwarder>,
    task: tokio::task::JoinHandle<()>,
}

/// A running relay's shared state.
pub struct Relay {
    pub settings: Settings,
    pub config: Arc<ConfigCopy>,
    /// The cluster map followed now: the one given at start, or a newer one learnt from the
    /// meta nodes (`cluster_copy`).
    pub map: arc_swap::ArcSwap<ClusterMap>,
    /// The highest generation of the cluster map taken from a meta node (`cluster_copy`): a
    /// map of a lower one is never taken.
    pub map_generation: std::sync::atomic::AtomicU64,
    /// With trusted keys: the highest signed map version followed (`cluster_copy`).
    pub map_floor: Option<ops_serve::floor::VersionFloor>,
    /// The forwarder of `map`.
    pub forwarder: arc_swap::ArcSwap<Forwarder>,
    /// The tasks of `map` (config and rollout polls) and its forwarder's drain token and task.
    map_tasks: parking_lot::Mutex<Option<MapTasks>>,
    /// The meta nodes' published rollout states.
    pub rollouts: Arc<ops_serve::rollout::FleetView>,
    pub started: Instant,
    pub prometheus: Option<PrometheusHandle>,
    pub(crate) hot: HotMetrics,
    /// The package cache, when `--cache-dir` is given.
    pub cache: Option<Arc<crate::cache::PackageCache>>,
    stop: CancellationToken,
}

impl Relay {
    /// Builds a relay; `stop` ends its background tasks (child of the process shutdown token).
    /// Fails only when the package cache's directory cannot be made.
    pub fn new(settings: Settings, prometheus: Option<PrometheusHandle>, stop: CancellationToken) -> Result<Arc<Self>, String> {
        let cache = match &settings.cache {
            Some(c) => {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(30))
                    .build()
                    .map_err(|e| e.to_string())?;
                Some(crate::cache::PackageCache::open(c.clone(), client)?)
            }
            None => None,
        };
        let cache_base = cache.as_ref().map(|c| c.advertise().to_owned());
        let config = Arc::new(ConfigCopy::open(&settings.data_dir, settings.trusted_keys.clone(), cache_base));
        let map = crate::cluster_copy::at_start(&settings.cluster, &settings.data_dir, &settings.trusted_keys);
        let map_floor = (!settings.trusted_keys.is_empty()).then(|| ops_serve::floor::VersionFloor::open_map(&settings.data_dir));
        // (Without --cluster the relay starts from a built-in one-node map, which is no
        // document of the operator's: only maps learnt later are checked.)
        if let Some(f) = map_floor.as_ref().filter(|_| !map.text.is_empty()) {
            // Neither the --cluster file nor the copy may be older than a map followed before.
            f.check_order(&map).map_err(|e| format!("{}: signed cluster map refused: {e}", settings.cluster.file.display()))?;
            f.raise(&map).map_err(|e| format!("cannot keep the signed cluster map version: {e}"))?;
        }
        let forwarder = Forwarder::new(&map, settings.forward.clone(), stop.child_token());
        if let Some(hash) = config.hash() {
            ::metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => hash).set(1.0);
        }
        let ids = map.nodes.iter().map(|n| n.id.clone()).collect();
        let rollouts = Arc::new(ops_serve::rollout::FleetView::open(ids, Some(&settings.data_dir), crate::metrics::ROLLOUT_IN_FLIGHT));
        Ok(Arc::new(Relay {
            cache,
            rollouts,
            hot: HotMetrics {
                ok: ::metrics::counter!(crate::metrics::HEARTBEATS, "result" => "ok"),
                duration: ::metrics::histogram!(crate::metrics::HEARTBEAT_DURATION),
            },
            settings,
            config,
            map_generation: std::sync::atomic::AtomicU64::new(map.version.filter(|_| map_floor.is_some()).unwrap_or(0)),
            map_floor,
            map: arc_swap::ArcSwap::from_pointee(map),
            forwarder: arc_swap::ArcSwap::new(forwarder),
            map_tasks: parking_lot::Mutex::new(None),
            started: Instant::now(),
            prometheus,
            stop,
        }))
    }

    /// Starts the tasks of the current map (its forwarder, the config and rollout polls of
    /// its nodes); drains and stops those of the map before.
    pub(crate) fn start_map_tasks(self: &Arc<Self>) -> anyhow::Result<()> {
        let map = self.map.load_full();
        let client = ops_serve::tls::for_cluster(reqwest::Client::builder().no_proxy(), &map).map_err(anyhow::Error::msg)?.build()?;
        let bases: Vec<String> = (0..map.nodes.len()).map(|i| map.url(i, "")).collect();
        let tasks = self.stop.child_token();
        tokio::spawn(self.config.clone().poll(client.clone(), bases.clone(), self.settings.config_poll, tasks.clone()));
        let config = self.config.clone();
        tokio::spawn(self.rollouts.clone().poll(
            ops_serve::rollout::Nodes { client, bases, skip: None, token: self.settings.forward.token.clone() },
            self.settings.config_poll,
            move || config.current(),
            tasks.clone(),
        ));
        let drain = CancellationToken::new();
        let forwarder = self.forwarder.load_full();
        let task = tokio::spawn(forwarder.clone().run(drain.clone()));
        let new = MapTasks { tasks, drain, forwarder, task };
        if let Some(old) = self.map_tasks.lock().replace(new) {
            old.tasks.cancel();
            // What the old forwarder holds goes to the old map's owners, which forward it;
            // then its probers stop (a removed node's would probe forever).
            old.drain.cancel();
            tokio::spawn(async move {
                let _ = old.task.await;
                old.forwarder.retire();
            });
        }
        Ok(())
    }

    fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/heartbeat", post(ingest::heartbeat))
            .route("/enroll", post(ingest::enroll))
            .route("/health", get(health))
            .route("/config/desired", get(desired))
            .route("/metrics", get(metrics_text))
            .route("/pkg/{key}/{*rest}", get(package))
            .fallback(|uri: axum::http::Uri| async move {
                (axum::http::StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"errorMessage": format!("no route for {}", uri.path())})))
            })
            .with_state(self.clone())
    }
}

async fn health(State(relay): State<Arc<Relay>>) -> Response {
    let forwarder = relay.forwarder.load();
    let pending: usize = forwarder.pending().iter().sum();
    let nodes: Vec<serde_json::Value> = forwarder.nodes_up().into_iter().map(|(id, up)| serde_json::json!({"id": id, "up": up})).collect();
    let rollouts: Vec<serde_json::Value> = relay
        .config
        .current()
        .map(|loaded| {
            let fleet = relay.rollouts.fleet(&loaded);
            let in_flight = relay.rollouts.in_flight(&loaded);
            loaded
                .config
                .rollouts()
                .enumerate()
                .map(|(r, a)| {
                    serde_json::json!({"agent": a.name, "target": a.default.version, "fleetWave": fleet.wave[r],
                        "halted": fleet.halted[r], "inFlight": in_flight[r].1})
                })
                .collect()
        })
        .unwrap_or_default();
    // Ready means ready: until the relay holds a desired config (from a meta node or its disk
    // copy) it cannot answer a heartbeat, so it is not healthy either.
    let ready = relay.config.current().is_some();
    let code = if ready { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    let reason = (!ready).then_some("no desired config yet: no meta node reached and no local copy; heartbeats get 503");
    (
        code,
        axum::Json(serde_json::json!({
            "reason": reason,
            "rollouts": rollouts,
            "status": if ready { "ok" } else { "no_config" },
            "id": relay.settings.id,
            "configHash": relay.config.hash(),
            // The signed version of that config (none when unsigned).
            "configVersion": relay.config.current().and_then(|l| l.config.version()),
            "clusterHash": relay.map.load().hash,
            "clusterGeneration": relay.map_generation.load(std::sync::atomic::Ordering::Relaxed),
            "pendingHosts": pending,
            "nodes": nodes,
            "uptimeSeconds": relay.started.elapsed().as_secs(),
            "cache": relay.cache.as_ref().map(|c| c.health()),
            "version": env!("CARGO_PKG_VERSION"),
        })),
    )
        .into_response()
}

/// The config copy as served (`Loaded::serve`): updaters that check signatures fetch it here.
async fn desired(State(relay): State<Arc<Relay>>, headers: axum::http::HeaderMap) -> Response {
    match relay.config.current() {
        Some(loaded) => loaded.serve(&headers),
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no desired config yet\n").into_response(),
    }
}

/// `GET`/`HEAD /pkg/{key}/{rest}`: a package from the cache (`crate::cache`).
async fn package(
    State(relay): State<Arc<Relay>>,
    axum::extract::Path((key, rest)): axum::extract::Path<(String, String)>,
    request: axum::extract::Request,
) -> Response {
    let (Some(cache), Some(loaded)) = (&relay.cache, relay.config.current()) else {
        let why = if relay.cache.is_none() { "this relay has no package cache (--cache-dir)" } else { "no desired config yet" };
        return (axum::http::StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "errorMessage": why }))).into_response();
    };
    cache.serve(&loaded.packages, &key, &rest, request).await
}

async fn metrics_text(State(relay): State<Arc<Relay>>) -> Response {
    let text = relay.prometheus.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], text).into_response()
}

/// Serves until `shutdown`, then drains requests and the forwarder's buffers.
pub async fn run(relay: Arc<Relay>, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    if let Some(cache) = &relay.cache {
        cache.restore().await;
    }
    relay.start_map_tasks()?;
    tracker.spawn(crate::cluster_copy::poll(relay.clone(), relay.settings.config_poll, relay.stop.clone()));
    if let Some(handle) = relay.prometheus.clone() {
        let stop = relay.stop.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                }
            }
        });
    }
    tracker.close();

    let hot = relay.clone();
    let heartbeat: ops_serve::server::Heartbeat = Arc::new(move |credential, body| Box::pin(ingest::answer(hot.clone(), credential, body)));
    let server = tokio::spawn(ops_serve::server::serve(
        listener,
        relay.settings.tls.clone(),
        relay.router(),
        Some(heartbeat),
        relay.settings.packages.clone().filter(|_| relay.cache.is_some()).map(|runtime| ops_serve::server::Packages { runtime }),
        relay.settings.limits,
        "relay",
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    match tokio::time::timeout(relay.settings.shutdown_grace, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "server error"),
        Ok(Err(error)) => tracing::error!(%error, "server task failed"),
        Err(_) => tracing::warn!("requests still in flight after the grace period; stopping anyway"),
    }
    // The forwarder stops after the server, so reports of the last requests are drained too.
    let taken = relay.map_tasks.lock().take();
    if let Some(MapTasks { tasks, drain, task, .. }) = taken {
        tasks.cancel();
        drain.cancel();
        if tokio::time::timeout(relay.settings.shutdown_grace, task).await.is_err() {
            tracing::warn!("forwarder did not drain within the grace period");
        }
    }
    relay.stop.cancel();
    if tokio::time::timeout(relay.settings.shutdown_grace, tracker.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop within the grace period");
    }
    tracing::info!("relay stopped");
    Ok(())
}
