//! The ops fleet updater: keeps this host's company agents at the version and run state the
//! operators want.
//!
//! It does little, and does it safely: it never trusts its memory for real state (read again
//! from disk and `./control status` every cycle), never runs a script from an unverified
//! tarball, never writes outside an agent's directory, never names an incomplete version in
//! `.version`, and never kills a control script halfway on its own shutdown.
#![forbid(unsafe_code)]

pub mod control;
pub mod cycle;
pub mod fetch;
pub mod health;
pub mod install;
pub mod journal;
pub mod pin;
pub mod selfupdate;
pub mod send;
pub mod signed;
pub mod unpack;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

pub use cycle::{CycleSettings, Outcome, Updater};

/// The first cycle's delay: spread over `interval`, seeded by hostname and time so a fleet
/// started together does not hit the relays together.
pub fn first_delay(hostname: &str, interval: Duration) -> Duration {
    let mut h = DefaultHasher::new();
    hostname.hash(&mut h);
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()).hash(&mut h);
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % ms)
}

/// Runs cycles every `interval` until `shutdown`; a cycle in progress always finishes.
pub async fn run(mut updater: Updater, interval: Duration, first: Duration, shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(first) => {}
    }
    loop {
        let outcome = updater.cycle().await;
        tracing::info!(answered = outcome.answered, converged = outcome.converged, errors = outcome.errors.len(), "cycle done");
        // A new binary on probation tries again soon: its deadline is far shorter than a cycle.
        let wait = if updater.on_probation() { interval.min(Duration::from_secs(2)) } else { interval };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

pub use ops_config::causes;

/// Default of `--max-response-bytes`: the most bytes read of a heartbeat reply or of
/// `/config/desired`.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 << 20;

/// The most bytes read of a `.md5` file (a digest and a file name).
pub const MAX_DIGEST_FILE_BYTES: usize = 4096;

/// Why a capped body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{}", causes(.0))]
    Http(#[from] reqwest::Error),
    #[error("reply larger than the cap of {0} bytes")]
    TooLarge(usize),
}

/// The body of `r`, refused as soon as it is known to be longer than `cap` (by its
/// Content-Length, or as it streams in): a server cannot make the updater hold more.
pub async fn body_capped(r: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    use futures_util::StreamExt;
    if r.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge(cap));
    }
    let mut body = Vec::new();
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge(cap));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The CA certificates of a PEM file (`--ca-file`), trusted for HTTPS servers and tarball
/// origins besides the system's.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// `builder` trusting `roots` too.
pub fn with_roots(builder: reqwest::ClientBuilder, roots: &[reqwest::Certificate]) -> reqwest::ClientBuilder {
    roots.iter().cloned().fold(builder, reqwest::ClientBuilder::add_root_certificate)
}

/// What the updater needs from the machine; Err names what is missing.
pub fn check_environment() -> Result<(), String> {
    if !std::path::Path::new("/bin/sh").exists() {
        return Err("/bin/sh is missing: control scripts cannot run".into());
    }
    Ok(())
}

/// A desired state for unit tests: `name` at `version` under `work_dir`, started, from a
/// server nobody answers on, with no digest.
#[cfg(test)]
pub(crate) fn test_desired(name: &str, version: &str, work_dir: &str) -> ops_config::DesiredAgent {
    ops_config::DesiredAgent {
        name: name.into(),
        version: version.into(),
        tarball: "http://127.0.0.1:9/releases".into(),
        md5: String::new(),
        cmd: "start".into(),
        run_user: String::new(),
        work_dir: work_dir.into(),
        config_file_name: String::new(),
        config_remote_url: String::new(),
        sha256: String::new(),
    }
}
