//! `meta-node`: parse flags, load and validate config (exit 64 when bad, before binding),
//! set up logging and metrics, bind, run until SIGINT/SIGTERM; SIGHUP reloads the config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use meta_node::{Node, Settings};
use ops_config::DesiredConfig;
use tokio_util::sync::CancellationToken;

/// jemalloc with its background purge thread: memory freed after a failover (the copies gone
/// home, shards compacted) goes back to the system within seconds; glibc kept it in the heap.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for a bad config or flag (EX_USAGE... EX_CONFIG is 78; we follow linkerd: 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "meta-node", version, about = "ops fleet meta node: real state of the fleet, desired config, status")]
struct Cli {
    /// Node id; must be listed in --cluster when given.
    #[arg(long)]
    id: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2000")]
    listen: String,
    /// Desired config. Default: config/agents.toml, else config/examples/agents.toml.
    #[arg(long)]
    agents: Option<PathBuf>,
    /// Cluster map (relays and meta nodes share it). Without it the node owns every host.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Where snapshots of real state are written.
    #[arg(long, default_value = "data/meta-node")]
    data_dir: PathBuf,
    /// A host not heard from for this long shows as stale (default: 3 x the 300 s interval).
    #[arg(long, default_value_t = 900)]
    stale_after_seconds: u32,
    /// A host not heard from for this long is dropped (default: 7 days).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    forget_after_seconds: u32,
    /// Seconds between snapshots.
    #[arg(long, default_value_t = 60)]
    snapshot_interval_seconds: u64,
    /// Seconds between sweeps for stale and forgotten hosts.
    #[arg(long, default_value_t = 30)]
    sweep_interval_seconds: u64,
    /// How often staged rollouts are judged and the peers' rollout states polled (milliseconds).
    #[arg(long, default_value_t = 5000)]
    rollout_interval_ms: u64,
    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_seconds: u64,
    /// Seconds a membership change that a peer's moved hosts began here (before this node's own
    /// prepare) lasts if that prepare never comes; then the hand-back resumes.
    #[arg(long, default_value_t = 30)]
    moving_grace_seconds: u64,
    /// How long a status query waits for a peer (milliseconds; per chunk for listings). A peer
    /// that does not answer in time is counted as down until its next probe answers, and the
    /// reply is partial.
    #[arg(long, default_value_t = 2000)]
    peer_timeout_ms: u64,
    /// How often every peer's /health is probed, which is also the probe's timeout
    /// (milliseconds). The status gather asks the peers that answered; failover copies go
    /// back to a peer once it answers.
    #[arg(long, default_value_t = 1000)]
    probe_interval_ms: u64,
    /// Heartbeats of hosts owned by another node: flush period (milliseconds).
    #[arg(long, default_value_t = 1000)]
    flush_ms: u64,
    /// A report time in a batch later than this node's clock plus this many seconds is stored
    /// at that ceiling (and counted in ops_meta_reports_clamped_total).
    #[arg(long, default_value_t = 60)]
    max_clock_skew_seconds: u32,
    /// Distinct strings (agent names, versions, status texts, users, directories) held at
    /// once; a report with a new string past it is refused (ops_meta_reports_refused_total).
    /// Strings no host uses any more are freed at each sweep.
    #[arg(long, default_value_t = 4_000_000)]
    max_interned_strings: usize,
    /// Bytes of those strings held at once (default 256 MiB); past it, the same.
    #[arg(long, default_value_t = 256 << 20)]
    max_interned_bytes: usize,
    /// Runtime worker threads (default: one per core). Lower it when several servers share
    /// a few cores, as in `ops-bench`'s one-box cluster.
    #[arg(long)]
    worker_threads: Option<usize>,
    #[command(flatten)]
    trust: ops_serve::cli::TrustArgs,
    #[command(flatten)]
    tls: ops_serve::cli::TlsArgs,
    #[command(flatten)]
    listen_limits: ops_serve::cli::ListenArgs,
    #[command(flatten)]
    enroll: ops_serve::enrollment::EnrollArgs,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log: String,
}

fn default_agents() -> PathBuf {
    let main = Path::new("config/agents.toml");
    if main.exists() { main.to_path_buf() } else { PathBuf::from("config/examples/agents.toml") }
}

fn settings(cli: &Cli) -> Result<(Settings, DesiredConfig, Option<String>), String> {
    let agents_path = cli.agents.clone().unwrap_or_else(default_agents);
    let keys = cli.trust.keys()?;
    let (config, signature) = ops_config::trust::load_signed(&agents_path, &keys).map_err(|e| e.to_string())?;
    if !keys.is_empty() {
        // Never start on an older signed file than one this node served; an expired one is
        // served (updaters refuse it and keep what runs) with a warning, until a fresh one.
        let floor = ops_serve::floor::VersionFloor::open(&cli.data_dir);
        floor.check_order(&config).map_err(|e| format!("{}: signed config refused: {e}", agents_path.display()))?;
        if let Err(e) = floor.check(&config) {
            tracing::warn!(file = %agents_path.display(), error = %e, "serving an expired signed config: updaters will not take it");
        }
    }
    let mut s = Settings::standalone(agents_path, cli.data_dir.clone());
    s.trusted_keys = keys;
    s.tls = cli.tls.server_config()?;
    if let Some(path) = &cli.cluster {
        // With trusted keys the map must carry the operator's signature, as agents.toml, and
        // never be older than one this node served.
        let (cluster, signature) =
            ops_config::trust::load_signed_map(path, &s.trusted_keys).map_err(|e| format!("{e} (sign it with opsctl sign)"))?;
        if !s.trusted_keys.is_empty() {
            let floor = ops_serve::floor::VersionFloor::open_map(&cli.data_dir);
            floor.check_order(&cluster).map_err(|e| format!("{}: signed cluster map refused: {e}", path.display()))?;
            if let Err(e) = floor.check(&cluster) {
                tracing::warn!(file = %path.display(), error = %e, "serving an expired signed cluster map: sign a fresh one");
            }
        }
        s.cluster_signature = signature;
        let id = cli.id.clone().ok_or_else(|| format!("--cluster {} needs --id (one of the [[node]] ids)", path.display()))?;
        if cluster.index_of(&id).is_none() {
            let ids: Vec<&str> = cluster.nodes.iter().map(|n| n.id.as_str()).collect();
            return Err(format!("{}: no [[node]] with id {id:?} (have {})", path.display(), ids.join(", ")));
        }
        s.token = cluster.read_token().map_err(|e| e.to_string())?;
        if cluster.mtls {
            // Peers and relays are known by their certificates (of the cluster CA), which
            // this node asks every client for; it shows its own to its peers.
            cli.tls.identity_for(&cluster, &ops_config::cluster::node_name(&id))?;
            let (Some(cert), Some(key), Some(ca)) = (&cli.tls.tls_cert, &cli.tls.tls_key, &cluster.ca_file) else {
                unreachable!("identity_for and ClusterMap::parse check them")
            };
            s.tls = Some(ops_serve::tls::server_config_mtls(cert, key, ca)?);
        }
        ops_serve::tls::for_cluster(reqwest::Client::builder(), &cluster).map(drop)?;
        s.id = id;
        s.cluster = Some(cluster);
        s.cluster_path = Some(path.clone());
    } else if let Some(id) = &cli.id {
        s.id = id.clone();
    }
    cli.trust.check_lab(&s.trusted_keys, &cli.listen, s.cluster.as_ref())?;
    if cli.stale_after_seconds == 0 || cli.forget_after_seconds <= cli.stale_after_seconds {
        return Err("--stale-after-seconds must be > 0 and < --forget-after-seconds".into());
    }
    if cli.snapshot_interval_seconds == 0 || cli.sweep_interval_seconds == 0 {
        return Err("--snapshot-interval-seconds and --sweep-interval-seconds must be > 0".into());
    }
    s.stale_after_seconds = cli.stale_after_seconds;
    s.forget_after_seconds = cli.forget_after_seconds;
    s.snapshot_interval = Duration::from_secs(cli.snapshot_interval_seconds);
    s.sweep_interval = Duration::from_secs(cli.sweep_interval_seconds);
    s.shutdown_grace = Duration::from_secs(cli.shutdown_grace_seconds);
    if cli.moving_grace_seconds == 0 {
        return Err("--moving-grace-seconds must be > 0".into());
    }
    s.moving_grace = Duration::from_secs(cli.moving_grace_seconds);
    if cli.peer_timeout_ms == 0 || cli.flush_ms == 0 || cli.rollout_interval_ms == 0 || cli.probe_interval_ms == 0 {
        return Err("--peer-timeout-ms, --flush-ms, --rollout-interval-ms and --probe-interval-ms must be > 0".into());
    }
    s.probe_interval = Duration::from_millis(cli.probe_interval_ms);
    s.handoff_interval = Duration::from_millis(cli.probe_interval_ms);
    s.rollout_interval = Duration::from_millis(cli.rollout_interval_ms);
    s.peer_timeout = Duration::from_millis(cli.peer_timeout_ms);
    s.forward.flush = Duration::from_millis(cli.flush_ms);
    s.max_clock_skew_seconds = cli.max_clock_skew_seconds;
    if cli.max_interned_strings < 2 || cli.max_interned_bytes == 0 {
        return Err("--max-interned-strings must be at least 2 and --max-interned-bytes above 0".into());
    }
    s.enrollment = Arc::new(cli.enroll.enrollment("meta")?);
    s.intern_limits = meta_node::store::InternLimits { max_strings: cli.max_interned_strings, max_bytes: cli.max_interned_bytes };
    s.limits = cli.listen_limits.limits()?;
    Ok((s, config, signature))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let (settings, config, signature) = match settings(&cli) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("meta-node: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The purge thread returns dirty pages after jemalloc's decay (10 s); without it pages
    // are purged only when an allocating thread passes by, which an idle node may never do.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("jemalloc background thread not started: {e}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads.filter(|&n| n > 0) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meta-node: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli.listen, settings, config, signature)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meta-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: String, settings: Settings, config: DesiredConfig, signature: Option<String>) -> anyhow::Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), meta_node::metrics::LATENCY_BUCKETS)?
        .install_recorder()?;
    meta_node::metrics::describe();
    ::metrics::gauge!(meta_node::metrics::CONFIG_INFO, "hash" => config.hash().to_owned()).set(1.0);

    let forward_stop = CancellationToken::new();
    let node = Arc::new(Node::new(settings, config, signature, Some(prometheus), forward_stop.clone()));
    let n = node.clone();
    tokio::task::spawn_blocking(move || n.restore()).await?;

    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        id = %node.settings.id,
        config = %node.desired.path().display(),
        hash = node.desired.current().config.hash(),
        hosts = node.store.len(),
        "meta node listening"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone(), node.clone()));
    let result = meta_node::run(node, listener, shutdown).await;
    forward_stop.cancel();
    result
}

async fn signals(shutdown: CancellationToken, node: Arc<Node>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let n = node.clone();
                match tokio::task::spawn_blocking(move || n.reload_config()).await {
                    Ok(Ok(l)) => tracing::info!(hash = l.config.hash(), "config reloaded on SIGHUP"),
                    Ok(Err(error)) => tracing::error!(%error, "config reload on SIGHUP refused, old config kept"),
                    Err(error) => tracing::error!(%error, "reload task failed"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
