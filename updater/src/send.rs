//! The updater's side of the wire: heartbeats sent to the first server that answers (the
//! local relay first), and the host credential (`ops_config::enroll`), enrolled for once
//! with the enrollment secret and kept in `{state_dir}/host-credential` (0600).

use std::path::PathBuf;

use ops_config::{Heartbeat, HeartbeatReply};

/// Why no server answered a heartbeat: its credential refused (enroll again), or anything else.
enum Refusal {
    Credential(String),
    Other(String),
}

impl Refusal {
    fn into_text(self) -> String {
        match self {
            Refusal::Credential(e) | Refusal::Other(e) => e,
        }
    }
}

/// The host credential (`ops_config::enroll`), readable by the updater's user only.
const CREDENTIAL_FILE: &str = "host-credential";

/// `http://host:port` (or the scheme given) of a `--server` entry.
pub fn base_url(server: &str) -> String {
    if server.starts_with("http://") || server.starts_with("https://") {
        server.trim_end_matches('/').to_owned()
    } else {
        format!("http://{server}")
    }
}

/// The servers, the HTTP client, and this host's credential once enrolled.
pub struct Transport {
    pub client: reqwest::Client,
    pub servers: Vec<String>,
    hostname: String,
    dir: Option<PathBuf>,
    enroll_secret: Option<String>,
    max_response_bytes: usize,
    /// This host's credential, once enrolled (kept in `CREDENTIAL_FILE`).
    credential: std::sync::Mutex<Option<String>>,
}

impl Transport {
    /// A transport to `servers` for `hostname`; the credential kept in `dir` is read back.
    pub fn new(
        client: reqwest::Client,
        servers: Vec<String>,
        hostname: &str,
        dir: Option<PathBuf>,
        enroll_secret: Option<String>,
        max_response_bytes: usize,
    ) -> Transport {
        let credential = dir
            .as_deref()
            .and_then(|d| std::fs::read_to_string(d.join(CREDENTIAL_FILE)).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        Transport {
            client,
            servers,
            hostname: hostname.to_owned(),
            dir,
            enroll_secret,
            max_response_bytes,
            credential: std::sync::Mutex::new(credential),
        }
    }

    /// The host credential, enrolling for one first when there is none and an enrollment
    /// secret is given (each server in turn); None when not enrolled (logged).
    async fn credential(&self) -> Option<String> {
        if let Some(c) = self.credential.lock().expect("credential lock").clone() {
            return Some(c);
        }
        let secret = self.enroll_secret.as_deref()?;
        let body = serde_json::to_vec(&ops_config::enroll::EnrollRequest { hostname: self.hostname.clone() }).ok()?;
        let mut errors = Vec::new();
        for server in &self.servers {
            let url = format!("{}/enroll", base_url(server));
            let reply = match self.client.post(&url).bearer_auth(secret).body(body.clone()).send().await {
                Ok(r) => {
                    let status = r.status();
                    let body = crate::body_capped(r, 64 * 1024).await.map_err(|e| e.to_string());
                    match body.and_then(|b| {
                        if status.is_success() { Ok(b) } else { Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&b))) }
                    }) {
                        Ok(b) => serde_json::from_slice::<ops_config::enroll::EnrollReply>(&b).map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(crate::causes(&e)),
            };
            match reply {
                Ok(r) if r.hostname == self.hostname => {
                    if let Some(dir) = &self.dir
                        && let Err(e) =
                            ops_config::disk::write_private(&dir.join(CREDENTIAL_FILE), format!("{}\n", r.credential).as_bytes())
                    {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the host credential: enrolling again at the next start");
                    }
                    tracing::info!(server = %server, serial = r.serial, "enrolled: host credential kept");
                    *self.credential.lock().expect("credential lock") = Some(r.credential.clone());
                    return Some(r.credential);
                }
                Ok(r) => errors.push(format!("{url}: a credential for {:?}, not this host", r.hostname)),
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        tracing::warn!(errors = %errors.join("; "), "cannot enroll: heartbeats go without a host credential");
        None
    }

    /// Drops a credential a server refused, so the next cycle enrolls again.
    fn forget_credential(&self) {
        *self.credential.lock().expect("credential lock") = None;
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(CREDENTIAL_FILE));
        }
    }

    /// Sends a heartbeat to the first server that answers (local relay first): its reply
    /// and which server it was (its index in `servers`).
    pub async fn send(&self, hb: &Heartbeat<'_>) -> Result<(HeartbeatReply, usize), String> {
        let body = serde_json::to_vec(hb).map_err(|e| e.to_string())?;
        match self.send_once(&body).await {
            // The credential was refused (withdrawn by the operator, or of a dropped key):
            // enroll again and send once more in the same cycle.
            Err(Refusal::Credential(e)) => {
                tracing::warn!(error = %e, "host credential refused: enrolling again");
                self.send_once(&body).await.map_err(Refusal::into_text)
            }
            r => r.map_err(Refusal::into_text),
        }
    }

    async fn send_once(&self, body: &[u8]) -> Result<(HeartbeatReply, usize), Refusal> {
        let credential = self.credential().await;
        let mut errors = Vec::new();
        for (i, server) in self.servers.iter().enumerate() {
            let url = format!("{}/heartbeat", base_url(server));
            let mut request = self.client.post(&url).body(body.to_vec());
            if let Some(c) = &credential {
                request = request.header(ops_config::enroll::CREDENTIAL_HEADER, c);
            }
            match request.send().await {
                Ok(r) => {
                    let status = r.status();
                    let refused_credential =
                        status == reqwest::StatusCode::UNAUTHORIZED && credential.is_some() && self.enroll_secret.is_some();
                    let reply = crate::body_capped(r, self.max_response_bytes)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|body| serde_json::from_slice::<HeartbeatReply>(&body).map_err(|e| e.to_string()));
                    match reply {
                        Ok(reply) if status.is_success() => {
                            if !errors.is_empty() {
                                tracing::warn!(errors = %errors.join("; "), answered = %server, "servers before this one did not answer");
                            }
                            return Ok((reply, i));
                        }
                        Ok(reply) if refused_credential => {
                            self.forget_credential();
                            errors.push(format!("{url}: HTTP {status}: {}", reply.error_message));
                            return Err(Refusal::Credential(errors.join("; ")));
                        }
                        Ok(reply) => errors.push(format!("{url}: HTTP {status}: {}", reply.error_message)),
                        Err(e) => errors.push(format!("{url}: HTTP {status}: {e}")),
                    }
                }
                Err(e) => errors.push(format!("{url}: {}", crate::causes(&e))),
            }
        }
        Err(Refusal::Other(errors.join("; ")))
    }
}
