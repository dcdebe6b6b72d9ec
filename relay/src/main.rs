//! `relay`: parse flags, load and validate the cluster map (exit 64 when bad, before binding),
//! set up logging and metrics, bind, run until SIGINT/SIGTERM, then drain.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ops_config::ClusterMap;
use ops_serve::forward::ForwardSettings;
use relay::{Relay, Settings};
use tokio_util::sync::CancellationToken;

const EXIT_CONFIG: u8 = 64;

/// mimalloc: the heartbeat path allocates and frees small buffers on every request, where
/// glibc's malloc spent ~5 % of the relay's CPU (perf, docs/ops-bench.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "relay", version, about = "ops fleet relay: answers updaters, forwards real state to the owning meta nodes")]
struct Cli {
    /// Relay id: in logs, /health, and every report it forwards (status groups silent hosts by
    /// it). 1-64 of [A-Za-z0-9._-]; give each relay its own, e.g. dc2-1.
    #[arg(long, default_value = "relay-1")]
    id: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2200")]
    listen: String,
    /// Cluster map. Without it: one meta node, meta-1 at 127.0.0.1:2000.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Flush buffered reports at least this often (milliseconds).
    #[arg(long, default_value_t = 1000)]
    flush_ms: u64,
    /// Flush early when this many hosts wait for one meta node; most hosts per batch.
    #[arg(long, default_value_t = 5000)]
    batch_max: usize,
    /// The most hosts whose reports wait for the meta nodes (while none takes them): past it
    /// the oldest reports are dropped, counted in ops_relay_pending_dropped_total and logged.
    /// Set it above the hosts behind this relay.
    #[arg(long, default_value_t = ops_serve::forward::DEFAULT_MAX_PENDING)]
    max_pending_hosts: usize,
    /// A batch not answered within this fails over (milliseconds).
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Poll the meta nodes for config changes this often (milliseconds).
    #[arg(long, default_value_t = 2000)]
    config_poll_ms: u64,
    /// Where the config copy is kept.
    #[arg(long, default_value = "data/relay")]
    data_dir: PathBuf,
    /// Seconds in-flight requests and the final flush get on shutdown.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_seconds: u64,
    /// Runtime worker threads (default: one per core). Lower it when several servers share
    /// a few cores, as in `ops-bench`'s one-box cluster.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Keep a package cache here: serve the tarballs and .md5 files of the agents marked
    /// `relay_cache = true`, fetching each from its origin once (off without it).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Most bytes the package cache holds; least recently used files go first.
    #[arg(long, default_value_t = 10 * 1024 * 1024 * 1024)]
    cache_max_bytes: u64,
    /// Most bytes of cached files also held in memory (0: none): whole-file GETs of a file up to
    /// a quarter of this are served from memory.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    cache_memory_bytes: u64,
    /// Threads that serve package downloads (with --cache-dir): a runtime of their own, so a
    /// download storm shares the CPU with the heartbeats instead of delaying them.
    #[arg(long, default_value_t = 1)]
    cache_threads: usize,
    /// How updaters reach this relay, for the package URLs in its replies
    /// (`http://relay-dc1:2200`). Default: the address it listens on, unless that is a
    /// wildcard address.
    #[arg(long)]
    advertise_url: Option<String>,
    #[command(flatten)]
    trust: ops_serve::cli::TrustArgs,
    #[command(flatten)]
    tls: ops_serve::cli::TlsArgs,
    #[command(flatten)]
    listen_limits: ops_serve::cli::ListenArgs,
    #[command(flatten)]
    enroll: ops_serve::enrollment::EnrollArgs,
    /// Under the map's `mtls`: the certificate (of the cluster CA, naming
    /// `{id}.relay.ops-fleet`) this relay shows the meta nodes, when it is not the one it
    /// serves updaters with (--tls-cert): updaters may trust another CA, or the relay may
    /// serve them plain HTTP. Needs --identity-key.
    #[arg(long, requires = "identity_key")]
    identity_cert: Option<std::path::PathBuf>,
    /// The identity certificate's private key (PEM).
    #[arg(long, requires = "identity_cert")]
    identity_key: Option<std::path::PathBuf>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log: String,
}

fn settings(cli: &Cli) -> Result<Settings, String> {
    let keys = cli.trust.keys()?;
    if cli.id.is_empty() || !ops_config::compact::valid_relay_id(&cli.id) {
        return Err(format!("--id {:?}: want 1-64 of [A-Za-z0-9._-] (it names this relay in every report it forwards)", cli.id));
    }
    let (cluster, token) = match &cli.cluster {
        Some(path) => {
            // With trusted keys the map must carry the operator's signature, as agents.toml.
            let (c, _) = ops_config::trust::load_signed_map(path, &keys).map_err(|e| format!("{e} (sign it with opsctl sign)"))?;
            // Under mTLS the relay is known by its certificate: the token is never sent.
            let token = if c.mtls { None } else { c.read_token().map_err(|e| e.to_string())? };
            if c.mtls && !ops_config::cluster::lower_dns_label(&cli.id) {
                return Err(format!(
                    "--id {:?}: under mtls a relay id is a lowercase DNS label (its certificate names {{id}}.relay.ops-fleet)",
                    cli.id
                ));
            }
            let name = ops_config::cluster::relay_name(&cli.id);
            match (&cli.identity_cert, &cli.identity_key) {
                (Some(cert), Some(key)) if c.mtls => ops_serve::tls::set_identity(cert, key, &name)?,
                (Some(_), _) if !c.mtls => {
                    return Err(format!("--identity-cert is for mtls = true, which {} does not say", c.file.display()));
                }
                _ => cli.tls.identity_for(&c, &name)?,
            }
            ops_serve::tls::for_cluster(reqwest::Client::builder(), &c).map(drop)?;
            (c, token)
        }
        None => (ClusterMap::single("127.0.0.1:2000".parse().expect("literal address")), None),
    };
    cli.trust.check_lab(&keys, &cli.listen, cli.cluster.as_ref().map(|_| &cluster))?;
    if cli.flush_ms == 0 || cli.batch_max == 0 || cli.config_poll_ms == 0 || cli.request_timeout_ms == 0 || cli.max_pending_hosts == 0 {
        return Err("--flush-ms, --batch-max, --config-poll-ms, --request-timeout-ms and --max-pending-hosts must be > 0".into());
    }
    Ok(Settings {
        id: cli.id.clone(),
        cluster,
        data_dir: cli.data_dir.clone(),
        forward: ForwardSettings {
            flush: Duration::from_millis(cli.flush_ms),
            batch_max: cli.batch_max,
            request_timeout: Duration::from_millis(cli.request_timeout_ms),
            token,
            component: "relay",
            max_pending: cli.max_pending_hosts,
        },
        config_poll: Duration::from_millis(cli.config_poll_ms),
        shutdown_grace: Duration::from_secs(cli.shutdown_grace_seconds),
        trusted_keys: keys,
        tls: cli.tls.server_config()?,
        packages: None,
        limits: cli.listen_limits.limits()?,
        enrollment: std::sync::Arc::new(cli.enroll.enrollment("relay")?),
        // Set once the listening address is known (port 0); the flags are checked here.
        cache: {
            let listen = cli.listen.parse().unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            cache_settings(cli, listen, cli.tls.tls_cert.is_some())?;
            None
        },
    })
}

/// The package cache's settings, once the listening address is known.
fn cache_settings(cli: &Cli, listening: std::net::SocketAddr, tls: bool) -> Result<Option<relay::cache::CacheSettings>, String> {
    let Some(dir) = &cli.cache_dir else {
        if cli.advertise_url.is_some() {
            return Err("--advertise-url needs --cache-dir".into());
        }
        return Ok(None);
    };
    if cli.cache_max_bytes < 1024 * 1024 {
        return Err("--cache-max-bytes must be at least 1 MiB".into());
    }
    let advertise = match &cli.advertise_url {
        Some(url) => {
            let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
            if !rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace) && !r.trim_end_matches('/').contains('/')) {
                return Err(format!("--advertise-url must be http(s)://host[:port], got {url:?}"));
            }
            url.trim_end_matches('/').to_owned()
        }
        None if listening.ip().is_unspecified() => {
            return Err(format!("listening on {listening}: give --advertise-url, the address updaters reach this relay at"));
        }
        None => format!("{}://{listening}", if tls { "https" } else { "http" }),
    };
    Ok(Some(relay::cache::CacheSettings {
        dir: dir.clone(),
        max_bytes: cli.cache_max_bytes,
        memory_bytes: cli.cache_memory_bytes,
        advertise,
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let settings = match settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads.filter(|&n| n > 0) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let packages = match cli.cache_dir.is_some() {
        true => match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.cache_threads.max(1))
            .thread_name("packages")
            .enable_all()
            .build()
        {
            Ok(rt) => Some(rt),
            Err(e) => {
                eprintln!("relay: cannot start the package runtime: {e}");
                return ExitCode::FAILURE;
            }
        },
        false => None,
    };
    let mut settings = settings;
    settings.packages = packages.as_ref().map(|rt| rt.handle().clone());
    let result = runtime.block_on(serve(&cli, settings));
    if let Some(rt) = packages {
        rt.shutdown_background();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: &Cli, mut settings: Settings) -> anyhow::Result<()> {
    let listen = &cli.listen;
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), relay::metrics::LATENCY_BUCKETS)?
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_batch_hosts".into()), relay::metrics::BATCH_BUCKETS)?
        .install_recorder()?;
    relay::metrics::describe();
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    settings.cache = cache_settings(cli, listener.local_addr()?, settings.tls.is_some()).map_err(anyhow::Error::msg)?;
    let relay = Relay::new(settings, Some(prometheus), CancellationToken::new()).map_err(anyhow::Error::msg)?;
    tracing::info!(
        addr = %listener.local_addr()?,
        id = %relay.settings.id,
        meta_nodes = relay.map.load().nodes.len(),
        config = ?relay.config.hash(),
        cache = ?relay.cache.as_ref().map(|c| c.advertise()),
        "relay listening"
    );
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: draining buffers");
        s.cancel();
    });
    relay::run(relay, listener, shutdown).await
}
