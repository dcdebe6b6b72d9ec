//! `opsctl`: the operator's command line: the fleet as any meta node sees it (`status`,
//! `hosts`, `host`, `rollout`, `cluster`), and the signing keys and signatures that make
//! `agents.toml` the fleet's root of trust (docs/security.md).
//!
//! Exit status: 0 done; 1 refused (a signature or config by `verify`, or the server answered an
//! error, e.g. an unknown agent); 2 answered but not whole (a partial gather, a node down,
//! hashes that differ: printed, then said on stderr); 64 bad usage, a file that cannot be read
//! or written; 69 no server answered.

mod ca;
mod config;
mod enrollment;
mod fleet;
mod stamp;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ops_config::trust::{SecretKey, TrustedKeys, signature_path};

const EXIT_REFUSED: u8 = 1;
const EXIT_PARTIAL: u8 = 2;
const EXIT_USAGE: u8 = 64;
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser, Debug)]
#[command(name = "opsctl", version, about = "ops fleet operator's command line")]
struct Cli {
    /// Any meta node: host:port or http(s)://host:port (else $OPS_SERVER, else 127.0.0.1:2000).
    #[arg(long, global = true)]
    server: Option<String>,
    /// CA certificates (PEM) for an https:// server, besides the system's.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds a request may take.
    #[arg(long, global = true, default_value_t = 30)]
    timeout_seconds: u64,
    /// The cluster token, for `config apply|rollback` and `rollout pause|resume|abort` (else
    /// $OPS_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every agent's summary as a table (hosts, converged, by state), or one agent's hosts by
    /// version, run state and state.
    Status { agent: Option<String> },
    /// The hosts of an agent, one per line (tab-separated; --json: the server's listing).
    Hosts {
        agent: String,
        /// ok, upgrading, error, stale or pinned.
        #[arg(long)]
        state: Option<String>,
        /// Exact version reported.
        #[arg(long)]
        version: Option<String>,
        /// Hostname prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// started, stopped, absent, or an exact status text.
        #[arg(long)]
        status: Option<String>,
        /// The relay the hosts' last reports came through (- for none).
        #[arg(long)]
        relay: Option<String>,
    },
    /// One host: every agent it reports or should run, with its state and last error or pin.
    Host { name: String },
    /// An agent's staged rollout: its waves as text bars, the fleet's wave, each node's
    /// verdict, and why it halted. `rollout pause|resume|abort AGENT` edits the served
    /// agents.toml (`paused = true`, no `paused`, `abort = true`) and applies it.
    Rollout {
        /// AGENT, or pause, resume or abort followed by AGENT.
        first: String,
        agent: Option<String>,
        /// Signs the edit with this key when the served config is signed.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// The desired config: `diff FILE`, `apply FILE [--expect HASH]`, `history`,
    /// `rollback [--expect HASH]`.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Host credentials (`[enrollment]` of the served agents.toml, checked by every relay and
    /// meta node): `list`; `revoke HOST` (its credentials and its enrollment refused);
    /// `re-enroll HOST|--all` (the credentials held now refused: the updater enrolls again);
    /// `restore HOST`. An edit is applied like `config apply` (signed with --key when the
    /// served config is signed).
    Enrollment {
        #[command(subcommand)]
        action: EnrollmentAction,
    },
    /// The meta nodes of the cluster map: up or down, config and cluster hashes, hosts held
    /// and failover copies. Exit 2 when a node is down or the hashes differ.
    Cluster,
    /// The cluster CA and the certificates that name meta nodes and relays under mTLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Prints a shell completion script: `opsctl completion bash > /etc/bash_completion.d/opsctl`.
    Completion { shell: clap_complete::Shell },
    /// Creates an ed25519 signing key: KEY (secret, mode 0600) and KEY.pub (the public key
    /// to give meta nodes, relays and updaters as --trusted-key). Never overwrites.
    Keygen {
        /// Path of the secret key file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Makes a cluster host key file (0600): give it to every meta node and relay
    /// (`--host-key-file`); they check heartbeats' host credentials with it and issue them at
    /// `POST /enroll`. To rotate, put a new key's line first in the file (`opsctl host-key
    /// --out new && cat new old`), let hosts re-enroll, then drop the old line.
    HostKey {
        /// Path of the host key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sets FILE's `version` and `expires`, then signs its exact bytes into FILE.sig. During
    /// a key rotation sign with the old key, then with the new one and --append: both lines
    /// are kept, and the file is not changed.
    Sign {
        /// The secret key file (from `opsctl keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Keep the signature lines already in FILE.sig (other keys) and add this one; the
        /// file is signed as it is (its version and expires kept).
        #[arg(long)]
        append: bool,
        /// The version the file will carry: next (one above the file's, 1 when none), keep,
        /// or a number. Meta nodes, relays and updaters refuse a version below one they
        /// verified; a rollback is the old text signed at a higher version.
        #[arg(long)]
        version: Option<stamp::Version>,
        /// When the signed file stops being current: a duration from now (30d, 12h), a time
        /// (2027-01-05T00:00:00Z), or keep. Sign again before then.
        #[arg(long)]
        expires: Option<stamp::Expires>,
        /// The file to sign (agents.toml or cluster.toml).
        file: PathBuf,
    },
    /// Checks FILE.sig against trusted keys and parses FILE (agents.toml or cluster.toml), as meta
    /// nodes, relays and updaters will. Exit 0 when accepted, 1 when refused.
    Verify {
        #[arg(long)]
        trusted_key: Vec<String>,
        #[arg(long)]
        trusted_keys_file: Vec<PathBuf>,
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// What applying FILE would change (a unified diff), and the hash it was diffed against.
    Diff { file: PathBuf },
    /// Checks FILE (and FILE.sig) on every meta node, then has every node write it as the
    /// next generation and serve it. Refused when the served config is not --expect's (default:
    /// the one served when this runs, printed as a diff first).
    Apply {
        file: PathBuf,
        #[arg(long)]
        expect: Option<String>,
    },
    /// The generations the asked node keeps (the last 10).
    History,
    /// Applies the version before the one served as the next generation.
    Rollback {
        #[arg(long)]
        expect: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum EnrollmentAction {
    /// What the served config withdraws, and whether each named host's record is
    /// authenticated now.
    List,
    /// Refuses every credential of HOST and its enrollment (a host gone or taken over).
    Revoke {
        host: String,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Refuses the credentials HOST holds now (or every host's, --all): its updater gets a
    /// 401 and enrolls again with the enrollment secret.
    ReEnroll {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        host: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Takes HOST out of `[enrollment.hosts]`: it may enroll again.
    Restore {
        host: String,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Makes the cluster CA: DIR/ca.pem (ca_file of cluster.toml) and DIR/ca.key (0600, keep
    /// it offline). Never overwrites.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "ops fleet cluster CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issues a certificate of the CA in DIR for one meta node (--node ID, the id in
    /// cluster.toml) or one relay (--relay ID, its --id): DIR/ID.pem and DIR/ID.key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, conflicts_with = "relay", required_unless_present = "relay")]
        node: Option<String>,
        #[arg(long)]
        relay: Option<String>,
        /// Another DNS name or IP address the certificate is good for (what updaters and
        /// operators connect to); repeat for more.
        #[arg(long)]
        san: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Write OUT.pem and OUT.key instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug)]
enum Failure {
    Refused(String),
    Usage(String),
    /// No server answered.
    Unavailable(String),
    /// Answered, printed, but not whole: why.
    Partial(String),
}

fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// Writes a new file that must not exist yet, with `mode`.
fn create_new(path: &Path, mode: u32, text: &str) -> Result<(), Failure> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

fn keygen(out: &Path) -> Result<(), Failure> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Failure::Usage(format!("no randomness from the OS: {e}")))?;
    let key = SecretKey::from_seed(seed);
    let public = PathBuf::from(format!("{}.pub", out.display()));
    if public.exists() {
        return Err(Failure::Usage(format!("{} exists: not overwriting a key", public.display())));
    }
    create_new(out, 0o600, &key.to_text())?;
    create_new(&public, 0o644, &format!("# ops fleet trusted key (opsctl keygen)\n{}\n", key.public_text()))?;
    println!("secret key: {} (keep it offline; it signs what every host installs)", out.display());
    println!("public key: {} = {}", public.display(), key.public_text());
    Ok(())
}

fn host_key(out: &Path) -> Result<(), Failure> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| Failure::Usage(format!("no randomness from the OS: {e}")))?;
    create_new(out, 0o600, &ops_config::enroll::HostKeys::file_text(&key))?;
    println!("host key: {} (a secret: every meta node and relay that checks host credentials needs it)", out.display());
    Ok(())
}

/// How long a file signed without `--expires` stays current.
pub const DEFAULT_EXPIRY: stamp::Expires = stamp::Expires::In(30 * 86_400);

pub use ops_config::clock::unix_now;

fn sign(key: &Path, append: bool, version: Option<stamp::Version>, expires: Option<stamp::Expires>, file: &Path) -> Result<(), Failure> {
    let key_text = String::from_utf8(read(key)?).map_err(|_| Failure::Usage(format!("{}: not a key file", key.display())))?;
    let key = SecretKey::parse(&key_text).ok_or_else(|| Failure::Usage(format!("{}: not an opsctl secret key", key.display())))?;
    let text = String::from_utf8(read(file)?).map_err(|_| Failure::Refused(format!("{}: not UTF-8 text", file.display())))?;
    let name = file.display().to_string();
    let (version, expires) = match (append, version, expires) {
        (true, None | Some(stamp::Version::Keep), None | Some(stamp::Expires::Keep)) => (stamp::Version::Keep, stamp::Expires::Keep),
        (true, _, _) => {
            return Err(Failure::Usage(
                "--append signs the file as it is: --version and --expires would change the bytes the other signatures cover".into(),
            ));
        }
        (false, v, e) => (v.unwrap_or(stamp::Version::Next), e.unwrap_or(DEFAULT_EXPIRY)),
    };
    let stamped = stamp::stamp(&text, version, expires, unix_now(), &name)?;
    if stamped != text {
        write_atomically(file, stamped.as_bytes())?;
    }
    let bytes = stamped.into_bytes();
    let sig_path = signature_path(file);
    let mut lines: Vec<String> = Vec::new();
    if append && let Ok(old) = std::fs::read_to_string(&sig_path) {
        let mine = format!("ed25519 {} ", key.public_text());
        lines.extend(
            old.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(&mine)).map(str::to_owned),
        );
    }
    lines.push(key.sign(&bytes));
    let text = format!(
        "# signature of {} (opsctl sign)\n{}\n",
        file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        lines.join("\n")
    );
    write_atomically(&sig_path, text.as_bytes())?;
    let doc = Document::parse(&String::from_utf8_lossy(&bytes), file)?;
    println!(
        "{}: {}, signed by {} ({} signature line(s))",
        sig_path.display(),
        version_text(doc.versioned()),
        key.public_text(),
        lines.len()
    );
    Ok(())
}

/// A file `opsctl sign` and `verify` take: `agents.toml`, or `cluster.toml` (it lists
/// `[[node]]`s).
enum Document {
    Config(ops_config::DesiredConfig),
    Map(ops_config::ClusterMap),
}

impl Document {
    fn parse(text: &str, file: &Path) -> Result<Self, Failure> {
        let is_map = text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("node"));
        let refused = |e: ops_config::ConfigError| Failure::Refused(e.to_string());
        if is_map {
            ops_config::ClusterMap::parse(text, file).map(Document::Map).map_err(refused)
        } else {
            ops_config::DesiredConfig::parse(text, &file.display().to_string()).map(Document::Config).map_err(refused)
        }
    }

    fn versioned(&self) -> &dyn ops_config::trust::Versioned {
        match self {
            Document::Config(c) => c,
            Document::Map(m) => m,
        }
    }

    /// What `verify` says of it besides its version.
    fn summary(&self) -> String {
        match self {
            Document::Config(c) => format!("config valid ({}, hash {}, {} agents)", version_text(c), c.hash(), c.agents().len()),
            Document::Map(m) => format!("cluster map valid ({}, hash {}, {} nodes)", version_text(m), m.hash, m.nodes.len()),
        }
    }
}

/// `version N expires T` of a signed file, as `sign` and `verify` print it.
fn version_text(doc: &dyn ops_config::trust::Versioned) -> String {
    let expires = doc.expires().map(ops_config::trust::rfc3339).unwrap_or_else(|| "never".into());
    format!("version {} expires {expires}", doc.version().map_or("none".to_owned(), |v| v.to_string()))
}

/// [`ops_config::disk::write_atomically`], with the path in the error.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    ops_config::disk::write_atomically(path, bytes).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// The signature line of `bytes` by the key in `key` (a `.sig` file's text).
fn sign_text(key: &Path, bytes: &[u8]) -> Result<String, Failure> {
    let key_text = String::from_utf8(read(key)?).map_err(|_| Failure::Usage(format!("{}: not a key file", key.display())))?;
    let key = SecretKey::parse(&key_text).ok_or_else(|| Failure::Usage(format!("{}: not an opsctl secret key", key.display())))?;
    Ok(format!("{}\n", key.sign(bytes)))
}

/// The cluster token: `--token-file`, else `$OPS_TOKEN`, else none (loopback-only clusters).
fn token(file: Option<&Path>) -> Result<Option<String>, Failure> {
    match file {
        Some(f) => Ok(Some(String::from_utf8_lossy(&read(f)?).trim().to_owned())),
        None => Ok(std::env::var("OPS_TOKEN").ok().filter(|t| !t.is_empty())),
    }
}

fn verify(keys: &[String], files: &[PathBuf], file: &Path) -> Result<(), Failure> {
    let keys = TrustedKeys::load(keys, files).map_err(|e| Failure::Usage(e.to_string()))?;
    if keys.is_empty() {
        return Err(Failure::Usage("give --trusted-key or --trusted-keys-file".into()));
    }
    let text = String::from_utf8(read(file)?).map_err(|_| Failure::Refused(format!("{}: not UTF-8 text", file.display())))?;
    let sig = std::fs::read_to_string(signature_path(file)).ok();
    keys.verify(text.as_bytes(), sig.as_deref()).map_err(|e| Failure::Refused(format!("{}: {e}", file.display())))?;
    let doc = Document::parse(&text, file)?;
    // What every party checks next (with no floor: this file alone).
    ops_config::trust::check_fresh(doc.versioned(), None, unix_now()).map_err(|e| Failure::Refused(format!("{}: {e}", file.display())))?;
    println!("{}: signature good, {}", file.display(), doc.summary());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server =
        || fleet::Server::new(cli.server.as_deref(), cli.ca_file.as_deref(), std::time::Duration::from_secs(cli.timeout_seconds.max(1)));
    let whole = |r: Result<Option<String>, Failure>| match r {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(Failure::Partial(why)),
        Err(e) => Err(e),
    };
    let json = cli.json;
    let result = match &cli.command {
        Command::Keygen { out } => keygen(out),
        Command::HostKey { out } => host_key(out),
        Command::Ca(CaCommand::Init { dir, name, days }) => ca::init(dir, name, *days),
        Command::Ca(CaCommand::Issue { dir, node, relay, san, days, out }) => {
            let subject = match (node, relay) {
                (Some(id), _) => ca::Subject::Node(id),
                (None, Some(id)) => ca::Subject::Relay(id),
                (None, None) => unreachable!("clap requires one"),
            };
            ca::issue(dir, subject, san, *days, out.as_deref())
        }
        Command::Sign { key, append, version, expires, file } => sign(key, *append, *version, *expires, file),
        Command::Verify { trusted_key, trusted_keys_file, file } => verify(trusted_key, trusted_keys_file, file),
        Command::Status { agent } => server().and_then(|s| whole(fleet::status(&s, agent.as_deref(), json))),
        Command::Hosts { agent, state, version, prefix, status, relay } => server().and_then(|s| {
            let filters = [
                ("state", state.as_deref()),
                ("version", version.as_deref()),
                ("prefix", prefix.as_deref()),
                ("status", status.as_deref()),
                ("relay", relay.as_deref()),
            ];
            whole(fleet::hosts(&s, agent, &filters, json))
        }),
        Command::Host { name } => server().and_then(|s| whole(fleet::host(&s, name, json))),
        Command::Rollout { first, agent, key } => {
            let edit = match first.as_str() {
                "pause" => Some(config::Edit::Pause),
                "resume" => Some(config::Edit::Resume),
                "abort" => Some(config::Edit::Abort),
                _ => None,
            };
            match (edit, agent) {
                (None, None) => server().and_then(|s| whole(fleet::rollout(&s, first, json))),
                (Some(edit), Some(agent)) => token(cli.token_file.as_deref())
                    .and_then(|t| server().and_then(|s| config::rollout(&s, agent, edit, key.as_deref(), t.as_deref(), json))),
                (Some(_), None) => Err(Failure::Usage(format!("opsctl rollout {first} AGENT"))),
                (None, Some(_)) => Err(Failure::Usage(format!("unknown rollout action {first:?}: pause, resume or abort"))),
            }
        }
        Command::Config { action } => {
            let t = token(cli.token_file.as_deref());
            t.and_then(|t| {
                server().and_then(|s| match action {
                    ConfigAction::Diff { file } => config::diff(&s, file),
                    ConfigAction::Apply { file, expect } => config::apply(&s, file, expect.as_deref(), t.as_deref(), json),
                    ConfigAction::History => config::history(&s, json),
                    ConfigAction::Rollback { expect } => config::rollback(&s, expect.as_deref(), t.as_deref(), json),
                })
            })
        }
        Command::Enrollment { action } => {
            let (edit, key) = match action {
                EnrollmentAction::List => (None, None),
                EnrollmentAction::Revoke { host, key } => (Some(enrollment::Edit::Revoke(host.clone())), key.as_deref()),
                EnrollmentAction::ReEnroll { host: Some(host), key, .. } => {
                    (Some(enrollment::Edit::ReEnroll(host.clone())), key.as_deref())
                }
                EnrollmentAction::ReEnroll { host: None, key, .. } => (Some(enrollment::Edit::ReEnrollAll), key.as_deref()),
                EnrollmentAction::Restore { host, key } => (Some(enrollment::Edit::Restore(host.clone())), key.as_deref()),
            };
            match edit {
                None => server().and_then(|s| enrollment::list(&s, json)),
                Some(edit) => token(cli.token_file.as_deref())
                    .and_then(|t| server().and_then(|s| enrollment::apply(&s, &edit, key, t.as_deref(), json))),
            }
        }
        Command::Cluster => server().and_then(|s| whole(fleet::cluster(&s, json))),
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "opsctl", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(e)) => {
            eprintln!("opsctl: refused: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(Failure::Usage(e)) => {
            eprintln!("opsctl: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Unavailable(e)) => {
            eprintln!("opsctl: no answer: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(Failure::Partial(e)) => {
            eprintln!("opsctl: {e}");
            ExitCode::from(EXIT_PARTIAL)
        }
    }
}
