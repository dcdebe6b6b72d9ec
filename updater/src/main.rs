//! `ops-updater`: flags compatible with seed 003 (`--interval=300 --debug=false
//! --server=127.0.0.1:2200`), an optional TOML file with the same settings, then cycles.
//! `--once` runs one cycle and exits 0 when the host converged, 1 when it did not.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use updater::fetch::Fetcher;
use updater::{CycleSettings, Updater};

const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "ops-updater", version, about = "ops fleet updater: keeps this host's agents at their desired versions")]
struct Cli {
    /// Relay or meta node addresses, local relay first: host:port[,host:port...].
    #[arg(long, value_delimiter = ',')]
    server: Vec<String>,
    /// Seconds between cycles.
    #[arg(long)]
    interval: Option<u64>,
    /// Debug logging (`--debug`, `--debug=true`, `--debug=false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    debug: Option<bool>,
    /// One cycle, no first delay, then one report of the result; exit 0 when converged, 1 when
    /// not.
    #[arg(long)]
    once: bool,
    /// Hostname to report (default: the system's).
    #[arg(long)]
    hostname: Option<String>,
    /// IP to report (default: none).
    #[arg(long)]
    ip: Option<String>,
    /// Seconds a control call may take before its process group is killed.
    #[arg(long)]
    control_timeout_seconds: Option<u64>,
    /// Seconds a tarball download may take in all.
    #[arg(long)]
    download_timeout_seconds: Option<u64>,
    /// Largest tarball accepted, in bytes.
    #[arg(long)]
    max_download_bytes: Option<u64>,
    /// Largest uncompressed size of a tarball (contents and tar headers), in bytes
    /// (default 4 GiB).
    #[arg(long)]
    max_unpack_bytes: Option<u64>,
    /// Largest uncompressed size of a tarball as a multiple of its compressed size (default
    /// 20; never below 16 MiB whatever the ratio).
    #[arg(long)]
    max_unpack_ratio: Option<u64>,
    /// Most entries in a tarball (default 100000).
    #[arg(long)]
    max_unpack_entries: Option<u64>,
    /// Largest heartbeat reply or /config/desired read, in bytes (default 16 MiB); a
    /// longer one is refused as that server's error.
    #[arg(long)]
    max_response_bytes: Option<usize>,
    /// Where the last desired list and errors are kept across restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The cluster's enrollment secret: the updater enrolls once (`POST /enroll`) for its
    /// host credential, keeps it in the state dir (0600) and sends it with every heartbeat.
    #[arg(long)]
    enroll_secret_file: Option<PathBuf>,
    /// An operator's ed25519 public key (base64, `opsctl keygen`). With one, the updater
    /// installs only what the operators' signed config allows this host (fetched from its
    /// server and verified), whatever a relay answers; a version without sha256 is refused.
    /// Repeat it during a key rotation.
    #[arg(long)]
    trusted_key: Vec<String>,
    /// A file of trusted public keys, one per line. Repeatable.
    #[arg(long)]
    trusted_keys_file: Vec<PathBuf>,
    /// CA certificates (PEM) trusted for `https://` servers and tarball origins, besides the
    /// system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Seconds a newly started version is watched (`./control status`): not `started` by then,
    /// or stopped during it, and the version it replaced comes back. 0: not watched.
    #[arg(long)]
    health_window_seconds: Option<u64>,
    /// The operator's local pins on this host: `agent = "hold"` (change nothing) or
    /// `agent = "5.1.3"` (keep that version), whatever the server answers. Read at every
    /// cycle; no file, no pins; a file that does not parse holds every agent.
    #[arg(long)]
    pin_file: Option<PathBuf>,
    /// Seconds a new ops-updater binary (the desired agent `ops-updater`) has to complete a
    /// heartbeat: in its check before it replaces this one, and after the re-exec; otherwise
    /// the old binary stays or comes back.
    #[arg(long)]
    self_update_seconds: Option<u64>,
    /// Send one heartbeat with these settings and exit 0 when a server answered, 1 when none
    /// did (how a new binary is checked before a self-update). Nothing is installed or changed.
    #[arg(long)]
    self_check: bool,
    /// Put the old binary back if a self-update is still unconfirmed (its new binary died on
    /// probation), then exit. For the service's `ExecStartPre`, run from `{binary}.old`.
    #[arg(long)]
    self_update_guard: bool,
    /// A TOML file with the same settings (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The TOML file's shape: every key optional, unknown keys refused.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<Vec<String>>,
    interval: Option<u64>,
    debug: Option<bool>,
    hostname: Option<String>,
    ip: Option<String>,
    control_timeout_seconds: Option<u64>,
    download_timeout_seconds: Option<u64>,
    max_download_bytes: Option<u64>,
    max_unpack_bytes: Option<u64>,
    max_unpack_ratio: Option<u64>,
    max_unpack_entries: Option<u64>,
    max_response_bytes: Option<usize>,
    state_dir: Option<PathBuf>,
    enroll_secret_file: Option<PathBuf>,
    trusted_key: Option<Vec<String>>,
    trusted_keys_file: Option<Vec<PathBuf>>,
    ca_file: Option<PathBuf>,
    health_window_seconds: Option<u64>,
    pin_file: Option<PathBuf>,
    self_update_seconds: Option<u64>,
}

struct Resolved {
    cycle: CycleSettings,
    interval: Duration,
    debug: bool,
    download_timeout: Duration,
    max_download_bytes: u64,
}

fn system_hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

fn unpack_limits(cli: &Cli, file: &FileConfig) -> Result<updater::unpack::Limits, String> {
    let d = updater::unpack::Limits::default();
    let limits = updater::unpack::Limits {
        max_bytes: cli.max_unpack_bytes.or(file.max_unpack_bytes).unwrap_or(d.max_bytes),
        ratio: cli.max_unpack_ratio.or(file.max_unpack_ratio).unwrap_or(d.ratio),
        max_entries: cli.max_unpack_entries.or(file.max_unpack_entries).unwrap_or(d.max_entries),
    };
    if limits.max_bytes == 0 || limits.ratio == 0 || limits.max_entries == 0 {
        return Err("--max-unpack-bytes, --max-unpack-ratio and --max-unpack-entries must be > 0".into());
    }
    Ok(limits)
}

fn resolve(cli: &Cli) -> Result<Resolved, String> {
    let file = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            toml::from_str::<FileConfig>(&text).map_err(|e| format!("{}: {}", p.display(), e.to_string().trim()))?
        }
        None => FileConfig::default(),
    };
    let unpack = unpack_limits(cli, &file)?;
    let servers = if cli.server.is_empty() { file.server.unwrap_or_else(|| vec!["127.0.0.1:2200".into()]) } else { cli.server.clone() };
    let servers: Vec<String> = servers.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    if servers.is_empty() {
        return Err("--server needs at least one address".into());
    }
    let hostname = cli.hostname.clone().or(file.hostname).unwrap_or_else(system_hostname);
    if !ops_config::wire::valid_hostname(&hostname) {
        return Err(format!("hostname {hostname:?} is not 1-255 of [A-Za-z0-9._-]; pass --hostname"));
    }
    let keys = if cli.trusted_key.is_empty() { file.trusted_key.unwrap_or_default() } else { cli.trusted_key.clone() };
    let key_files =
        if cli.trusted_keys_file.is_empty() { file.trusted_keys_file.unwrap_or_default() } else { cli.trusted_keys_file.clone() };
    let trusted_keys = ops_config::trust::TrustedKeys::load(&keys, &key_files).map_err(|e| e.to_string())?;
    let interval = cli.interval.or(file.interval).unwrap_or(300);
    if interval == 0 {
        return Err("--interval must be > 0".into());
    }
    Ok(Resolved {
        cycle: CycleSettings {
            servers,
            hostname,
            ip: cli.ip.clone().or(file.ip).unwrap_or_default(),
            control_timeout: Duration::from_secs(cli.control_timeout_seconds.or(file.control_timeout_seconds).unwrap_or(30).max(1)),
            heartbeat_timeout: Duration::from_secs(10),
            state_dir: Some(cli.state_dir.clone().or(file.state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/ops-updater"))),
            trusted_keys,
            health_window: Duration::from_secs(cli.health_window_seconds.or(file.health_window_seconds).unwrap_or(30)),
            self_update: updater::selfupdate::SelfSettings {
                exe: std::env::current_exe().ok(),
                args: std::env::args_os().skip(1).collect(),
                bound: Duration::from_secs(cli.self_update_seconds.or(file.self_update_seconds).unwrap_or(60).max(1)),
            },
            pin_file: Some(cli.pin_file.clone().or(file.pin_file).unwrap_or_else(|| PathBuf::from("/etc/ops-updater/pin.toml"))),
            roots: match cli.ca_file.clone().or(file.ca_file) {
                Some(path) => updater::read_ca_file(&path)?,
                None => Vec::new(),
            },
            unpack,
            max_response_bytes: match cli.max_response_bytes.or(file.max_response_bytes).unwrap_or(updater::DEFAULT_MAX_RESPONSE_BYTES) {
                0 => return Err("--max-response-bytes must be > 0".into()),
                n => n,
            },
            enroll_secret: match cli.enroll_secret_file.clone().or(file.enroll_secret_file) {
                Some(path) => Some(
                    std::fs::read_to_string(&path).map_err(|e| format!("--enroll-secret-file {}: {e}", path.display()))?.trim().to_owned(),
                ),
                None => None,
            },
        },
        interval: Duration::from_secs(interval),
        debug: cli.debug.or(file.debug).unwrap_or(false),
        download_timeout: Duration::from_secs(cli.download_timeout_seconds.or(file.download_timeout_seconds).unwrap_or(600).max(1)),
        max_download_bytes: cli.max_download_bytes.or(file.max_download_bytes).unwrap_or(1 << 30),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match resolve(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ops-updater: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let level = if r.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = updater::check_environment() {
        eprintln!("ops-updater: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ops-updater: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let fetcher = Fetcher::new(Duration::from_secs(10), r.download_timeout, r.max_download_bytes, &r.cycle.roots);
        let hostname = r.cycle.hostname.clone();
        let mut updater = Updater::new(r.cycle, fetcher);
        if cli.self_check {
            return match updater.report().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ops-updater: self-check: {e}");
                    ExitCode::from(1)
                }
            };
        }
        // A self-update left unconfirmed by a process that died: the old binary comes back.
        if cli.self_update_guard {
            updater.guard_self_update();
            return ExitCode::SUCCESS;
        }
        if std::env::var_os(updater::selfupdate::EXECED_ENV).is_none() && updater.guard_self_update() {
            let e = updater.restart();
            tracing::error!(error = %e, "cannot start the old binary again; going on with this one");
        }
        tracing::info!(hostname = %hostname, version = updater::selfupdate::BUILT_IN_VERSION, servers = ?updater.settings.servers, "ops-updater starting");
        if cli.once {
            let outcome = updater.cycle().await;
            if outcome.answered
                && let Err(e) = updater.report().await
            {
                tracing::warn!(error = %e, "final report not delivered");
            }
            for e in &outcome.errors {
                eprintln!("ops-updater: {e}");
            }
            return if outcome.converged { ExitCode::SUCCESS } else { ExitCode::from(1) };
        }
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping after the cycle in progress");
            s.cancel();
        });
        // On probation after a self-update: the first heartbeat at once.
        let first = if updater.on_probation() { Duration::ZERO } else { updater::first_delay(&hostname, r.interval) };
        updater::run(updater, r.interval, first, shutdown).await;
        ExitCode::SUCCESS
    })
}
