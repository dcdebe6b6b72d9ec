//! Host credentials on the heartbeat path and `POST /enroll`, for relays and meta nodes alike
//! (`ops_config::enroll` holds the credential itself).
//!
//! With a host key (`--host-key-file`) a heartbeat's credential is checked: one that is not
//! the reported host's is refused (401) and nothing of it goes on. One without a credential
//! (the stock Go updater) is answered and goes on marked unauthenticated, unless
//! `--require-enrollment`, where it is refused too. Without a host key nothing is checked and
//! every report is unauthenticated.

use std::path::PathBuf;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use ops_config::enroll::{CREDENTIAL_HEADER, EnrollReply, EnrollRequest, HostKeys, Revocations};
use subtle::ConstantTimeEq;

use crate::body::Refused;

/// `--host-key-file`, `--enroll-secret-file`, `--require-enrollment`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EnrollArgs {
    /// The cluster's host keys (`opsctl host-key`): heartbeats' host credentials are checked
    /// against them (a wrong one is refused) and `POST /enroll` issues them with the first.
    #[arg(long)]
    pub host_key_file: Option<PathBuf>,
    /// The enrollment secret: `POST /enroll` with it (`Authorization: Bearer`) gets a host its
    /// credential. Needs --host-key-file.
    #[arg(long)]
    pub enroll_secret_file: Option<PathBuf>,
    /// Refuse heartbeats that carry no host credential (401). Needs --host-key-file. Without
    /// it they are answered and marked unauthenticated (what the stock Go updater sends).
    #[arg(long)]
    pub require_enrollment: bool,
}

impl EnrollArgs {
    /// What these flags ask, on a server whose metrics are `ops_{component}_*`.
    pub fn enrollment(&self, component: &'static str) -> Result<Enrollment, String> {
        let keys = match &self.host_key_file {
            Some(path) => Some(HostKeys::load(path).map_err(|e| e.to_string())?),
            None => None,
        };
        if keys.is_none() && (self.require_enrollment || self.enroll_secret_file.is_some()) {
            return Err("--require-enrollment and --enroll-secret-file need --host-key-file".into());
        }
        let secret = match &self.enroll_secret_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let secret = text.trim().to_owned();
                if secret.len() < 16 {
                    return Err(format!("{}: the enrollment secret must be at least 16 characters", path.display()));
                }
                Some(secret)
            }
            None => None,
        };
        Ok(Enrollment { keys, secret, require: self.require_enrollment, component })
    }
}

/// What this server checks and issues.
#[derive(Debug, Default)]
pub struct Enrollment {
    keys: Option<HostKeys>,
    secret: Option<String>,
    require: bool,
    /// `relay` or `meta`: the metrics' prefix.
    component: &'static str,
}

impl Enrollment {
    /// Whether host credentials are checked here (a host key is given).
    pub fn checks(&self) -> bool {
        self.keys.is_some()
    }

    /// The credential header of a request, if any.
    pub fn credential_of(headers: &HeaderMap) -> Option<HeaderValue> {
        headers.get(CREDENTIAL_HEADER).cloned()
    }

    /// Checks the credential `hostname`'s heartbeat carried: Some(serial) when it is that
    /// host's and not withdrawn by `revoked` (the served config's `[enrollment]`), None when it
    /// carried none and that is allowed (or nothing is checked here).
    pub fn check(&self, hostname: &str, credential: Option<&HeaderValue>, revoked: &Revocations) -> Result<Option<u64>, Refused> {
        let Some(keys) = &self.keys else { return Ok(None) };
        match credential {
            Some(c) => {
                let text = c.to_str().map_err(|_| self.refused("host credential is malformed".into()))?;
                let serial = keys.check(hostname, text).map_err(|e| self.refused(format!("{e}: report refused; enroll again")))?;
                revoked.refuses(hostname, serial).map_err(|e| self.revoked(e))?;
                Ok(Some(serial))
            }
            None if self.require => Err(self.refused(format!(
                "this server requires a host credential ({CREDENTIAL_HEADER}): enroll the updater with --enroll-secret-file"
            ))),
            None => Ok(None),
        }
    }

    /// `POST /enroll`: the credential of the host the body names, for whoever shows the
    /// enrollment secret, unless `revoked` revokes that host.
    pub fn enroll(&self, headers: &HeaderMap, body: &[u8], now_ms: u64, revoked: &Revocations) -> Result<EnrollReply, Refused> {
        let (Some(keys), Some(secret)) = (&self.keys, &self.secret) else {
            return Err(Refused(StatusCode::NOT_FOUND, "not_found", "this server does not enroll hosts (no --enroll-secret-file)".into()));
        };
        let given = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| bool::from(g.trim().as_bytes().ct_eq(secret.as_bytes()))) {
            let component = self.component;
            ::metrics::counter!(format!("ops_{component}_enroll_refused_total")).increment(1);
            return Err(Refused(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "enrollment needs the enrollment secret (Authorization: Bearer)".into(),
            ));
        }
        let req: EnrollRequest =
            serde_json::from_slice(body).map_err(|e| Refused(StatusCode::BAD_REQUEST, "bad_request", format!("enroll request: {e}")))?;
        if !ops_config::wire::valid_hostname(&req.hostname) {
            return Err(Refused(StatusCode::BAD_REQUEST, "bad_request", format!("enroll request: bad hostname {:?}", req.hostname)));
        }
        if !revoked.may_enroll(&req.hostname) {
            let component = self.component;
            ::metrics::counter!(format!("ops_{component}_enroll_refused_total")).increment(1);
            return Err(Refused(
                StatusCode::FORBIDDEN,
                "revoked",
                format!("host {} is revoked by the operator: not enrolled ([enrollment] of agents.toml)", req.hostname),
            ));
        }
        let credential = keys.issue(&req.hostname, now_ms);
        let component = self.component;
        ::metrics::counter!(format!("ops_{component}_enrolled_total")).increment(1);
        tracing::info!(hostname = %req.hostname, serial = now_ms, "host enrolled");
        Ok(EnrollReply { hostname: req.hostname, credential, serial: now_ms })
    }
}

impl Enrollment {
    /// A heartbeat refused for its credential (or its lack of one), counted in
    /// `ops_{component}_credential_refused_total`.
    fn refused(&self, message: String) -> Refused {
        let component = self.component;
        ::metrics::counter!(format!("ops_{component}_credential_refused_total")).increment(1);
        Refused(StatusCode::UNAUTHORIZED, "credential", message)
    }

    /// A heartbeat whose credential checks but the operator withdrew, counted in
    /// `ops_{component}_credential_revoked_total`.
    fn revoked(&self, why: ops_config::enroll::Revoked) -> Refused {
        let component = self.component;
        ::metrics::counter!(format!("ops_{component}_credential_revoked_total")).increment(1);
        Refused(StatusCode::UNAUTHORIZED, "revoked", format!("{why}: report refused"))
    }

    /// Describes the metrics of `component`'s enrollment.
    pub fn describe(component: &str) {
        use metrics::{Unit, describe_counter};
        describe_counter!(
            format!("ops_{component}_credential_refused_total"),
            Unit::Count,
            "Heartbeats refused (401) for a host credential that is not the reported host's, or none under --require-enrollment."
        );
        describe_counter!(
            format!("ops_{component}_credential_revoked_total"),
            Unit::Count,
            "Heartbeats refused (401) for a host credential the operator withdrew ([enrollment] of agents.toml)."
        );
        describe_counter!(format!("ops_{component}_enrolled_total"), Unit::Count, "Host credentials issued at POST /enroll.");
        describe_counter!(
            format!("ops_{component}_enroll_refused_total"),
            Unit::Count,
            "POST /enroll refused for a missing or wrong enrollment secret, or a revoked host."
        );
    }
}
