//! Heartbeat wire types, exactly as the Go ops-updater and ops-meta send them.
//!
//! One definition serves both sides: the request types borrow from the request body where the
//! JSON has no escapes (`Cow`), so a server parses a heartbeat without copying its strings, and
//! `Heartbeat<'static>` is the owned form an updater builds. Unknown fields are tolerated on the
//! wire (never `deny_unknown_fields` here); our extensions are skipped when empty so the Go side
//! sees its own format.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};

/// Largest heartbeat body a server accepts.
pub const MAX_HEARTBEAT_BYTES: usize = 64 * 1024;
/// Largest batch body (relay → meta) a server accepts.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most agents one host may report.
pub const MAX_AGENTS_PER_HOST: usize = 64;
/// Longest hostname.
pub const MAX_HOSTNAME: usize = 255;
/// Longest agent name and longest version.
pub const MAX_NAME: usize = 64;
/// Longest `status` text (the trimmed output of `./control status`).
pub const MAX_STATUS: usize = 256;
/// Longest `lastError` text.
pub const MAX_LAST_ERROR: usize = 1024;
/// Longest of the other free-text fields (`ip`, `runUser`, `updaterVersion`).
pub const MAX_SHORT_FIELD: usize = 64;
/// Longest `workDir`.
pub const MAX_PATH: usize = 4096;

// Paths and headers of the cluster's own exchanges (relays and meta nodes agree through these).

/// Path of the batch ingest endpoint on meta nodes.
pub const BATCH_PATH: &str = "/internal/batch";

/// Header (value `1`) of a batch of failover copies a meta node hands back: the receiver keeps
/// a copy only where it is strictly newer than what it holds.
pub const HANDOFF_HEADER: &str = "x-ops-handoff";

/// Header of the hosts a membership change's prepare moves to their new owner: the hash of
/// the map they move by. A node that has not prepared that map yet counts the change as on
/// from then (its hand-back paused), so it cannot send them home before its own prepare.
pub const MOVING_HEADER: &str = "x-ops-moving";

/// Header of `GET /config/desired` on meta nodes: the config's generation
/// (`meta_node::generations`). A relay never goes back to a lower generation than one it took,
/// so a node that missed an apply cannot take the relays back with it.
pub const CONFIG_GENERATION_HEADER: &str = "x-ops-config-generation";

/// Header of `GET /cluster/map` on meta nodes: the map's generation. A relay never takes a map
/// of a lower one.
pub const MAP_GENERATION_HEADER: &str = "x-ops-cluster-generation";

/// Header of a fleet-wide reply (`true`/`false`): some owners did not answer.
pub const PARTIAL_HEADER: &str = "x-ops-partial";

/// Header of a partial fleet-wide reply: the ids of the owners that did not answer, by commas.
pub const MISSING_NODES_HEADER: &str = "x-ops-missing-nodes";

/// What an updater reports every interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat<'a> {
    #[serde(borrow)]
    pub hostname: Cow<'a, str>,
    #[serde(default, borrow)]
    pub ip: Cow<'a, str>,
    #[serde(default, borrow)]
    pub run_user: Cow<'a, str>,
    #[serde(default, borrow)]
    pub updater_version: Cow<'a, str>,
    /// `[]` or `null` on the wire both mean "no agents".
    #[serde(default, borrow, deserialize_with = "null_as_empty")]
    pub real_agents: Vec<RealAgent<'a>>,
}

/// The real state of one agent on one host, read from disk and `./control status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RealAgent<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(default, borrow)]
    pub version: Cow<'a, str>,
    /// Free text; counted as started when it contains "started".
    #[serde(default, borrow)]
    pub status: Cow<'a, str>,
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default, borrow)]
    pub run_user: Cow<'a, str>,
    #[serde(default, borrow)]
    pub work_dir: Cow<'a, str>,
    /// Extension: what went wrong in the last cycle for this agent, empty when nothing did.
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pub last_error: Cow<'a, str>,
    /// Extension: the operator's local pin on this host (`pin.toml`): `hold`, or the version the
    /// agent is held at, whatever the reply says; empty when not pinned.
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pub pinned: Cow<'a, str>,
}

/// The reply to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    #[serde(default)]
    pub error_message: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub desired_agents: Vec<DesiredAgent>,
    /// Extension: the content hash of the `agents.toml` this reply was resolved from, so an
    /// updater that checks signatures knows when to fetch the signed config again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_hash: String,
}

/// What one host should run of one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredAgent {
    pub name: String,
    pub version: String,
    /// Base URL; the tarball is `{tarball}/{arch}/{name}-{version}.tar.gz`.
    pub tarball: String,
    /// A hex digest; or empty (then the updater reads `{url}.md5`); or an http(s) base URL where
    /// the digest file is (`{md5}/{name}-{version}.tar.gz.md5`, seed 003).
    #[serde(default)]
    pub md5: String,
    /// `start` or `stop`.
    pub cmd: String,
    #[serde(default)]
    pub run_user: String,
    #[serde(default)]
    pub work_dir: String,
    #[serde(default)]
    pub config_file_name: String,
    #[serde(default)]
    pub config_remote_url: String,
    /// Extension: a hex sha256 the updater checks as well, when set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

/// One host's report inside a batch (relay → owning meta node): the heartbeat as the updater
/// sent it, and when the relay received it (unix seconds), so the newest report wins wherever
/// copies meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry<'a> {
    pub seen: u32,
    /// The rollout mask the host was answered with (see `compact`); absent = 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub told: u8,
    /// The relay the report came through (see `compact`); absent = none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub relay: String,
    #[serde(borrow)]
    pub hb: Heartbeat<'a>,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The body of `POST /internal/batch`: `{"hosts":[{"seen":N,"hb":{...}},...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch<'a> {
    #[serde(borrow, default, deserialize_with = "null_as_empty")]
    pub hosts: Vec<BatchEntry<'a>>,
}

impl<'a> Batch<'a> {
    /// Parses a batch; each heartbeat is validated as if it came alone.
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        if body.len() > MAX_BATCH_BYTES {
            return Err(WireError::TooLarge { size: body.len(), limit: MAX_BATCH_BYTES });
        }
        let batch: Batch<'a> = serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        for e in &batch.hosts {
            e.hb.validate()?;
            if !crate::compact::valid_relay_id(&e.relay) {
                return Err(WireError::Malformed(format!("batch: bad relay id {:?} (0-64 of [A-Za-z0-9._-])", e.relay)));
            }
        }
        Ok(batch)
    }

    /// Writes a batch from heartbeat bodies that were already validated, without parsing
    /// them again: `entries` yields `(seen, raw heartbeat JSON)`.
    pub fn encode_raw<'b>(entries: impl IntoIterator<Item = (u32, &'b [u8])>, out: &mut Vec<u8>) -> usize {
        out.extend_from_slice(b"{\"hosts\":[");
        let mut n = 0;
        for (seen, body) in entries {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"seen\":");
            out.extend_from_slice(seen.to_string().as_bytes());
            out.extend_from_slice(b",\"hb\":");
            out.extend_from_slice(body);
            out.push(b'}');
            n += 1;
        }
        out.extend_from_slice(b"]}");
        n
    }
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// Why a heartbeat was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed heartbeat: {0}")]
    Malformed(String),
    #[error("body of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("bad hostname {0:?}: want 1-255 of [A-Za-z0-9._-]")]
    Hostname(String),
    #[error("host {host}: {count} agents reported, at most {MAX_AGENTS_PER_HOST} allowed")]
    TooManyAgents { host: String, count: usize },
    #[error("host {host}: bad agent name {name:?}: want 1-64 of [A-Za-z0-9._-], not . or ..")]
    AgentName { host: String, name: String },
    #[error("host {host}: agent {agent} reported twice")]
    DuplicateAgent { host: String, agent: String },
    #[error("host {host}: agent {agent}: bad version {version:?}: want 1-64 of [A-Za-z0-9._+-], not . or ..")]
    Version { host: String, agent: String, version: String },
    #[error("host {host}: agent {agent}: bad pin {pin:?}: want `hold` or a version")]
    Pin { host: String, agent: String, pin: String },
    #[error("host {host}: field {field} is {len} bytes, at most {limit} allowed")]
    FieldTooLong { host: String, field: &'static str, len: usize, limit: usize },
    /// A relay known by its certificate posted a report that names another relay.
    #[error("host {host}: a report through relay {claimed:?} in a batch from relay {sender}: a relay posts only its own reports")]
    NotThisRelay { host: String, claimed: String, sender: String },
}

fn token_ok(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' || extra.contains(&b))
}

/// 1-255 of `[A-Za-z0-9._-]`, never `.` or `..`.
pub fn valid_hostname(s: &str) -> bool {
    token_ok(s, MAX_HOSTNAME, &[])
}

/// 1-64 of `[A-Za-z0-9._-]`, never `.` or `..`: safe as a path component.
pub fn valid_agent_name(s: &str) -> bool {
    token_ok(s, MAX_NAME, &[])
}

/// 1-64 of `[A-Za-z0-9._+-]`, never `.` or `..`: safe as a path component.
pub fn valid_version(s: &str) -> bool {
    token_ok(s, MAX_NAME, b"+")
}

/// What a local pin may say: `hold`, or a version (see [`valid_version`]).
pub fn valid_pin(s: &str) -> bool {
    s == PIN_HOLD || valid_version(s)
}

/// The pin that keeps an agent exactly as it is.
pub const PIN_HOLD: &str = "hold";

fn check_len(host: &str, field: &'static str, value: &str, limit: usize) -> Result<(), WireError> {
    if value.len() > limit {
        return Err(WireError::FieldTooLong { host: host.to_owned(), field, len: value.len(), limit });
    }
    Ok(())
}

impl<'a> Heartbeat<'a> {
    /// Parses and validates one heartbeat body (whatever its Content-Type said).
    pub fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        if body.len() > MAX_HEARTBEAT_BYTES {
            return Err(WireError::TooLarge { size: body.len(), limit: MAX_HEARTBEAT_BYTES });
        }
        // The plain shapes updaters send in one pass; anything else through serde, unchanged.
        let hb: Heartbeat<'a> = match crate::fastjson::heartbeat(body) {
            Some(hb) => hb,
            None => serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?,
        };
        hb.validate()?;
        Ok(hb)
    }

    /// Checks every limit of DESIGN.md. An agent reported with an empty version (installed
    /// nothing yet) is accepted; a non-empty one must be a safe version string.
    pub fn validate(&self) -> Result<(), WireError> {
        let host = &*self.hostname;
        if !valid_hostname(host) {
            let shown: String = host.chars().take(MAX_HOSTNAME).collect();
            return Err(WireError::Hostname(shown));
        }
        check_len(host, "ip", &self.ip, MAX_SHORT_FIELD)?;
        check_len(host, "runUser", &self.run_user, MAX_SHORT_FIELD)?;
        check_len(host, "updaterVersion", &self.updater_version, MAX_SHORT_FIELD)?;
        if self.real_agents.len() > MAX_AGENTS_PER_HOST {
            return Err(WireError::TooManyAgents { host: host.to_owned(), count: self.real_agents.len() });
        }
        for (i, a) in self.real_agents.iter().enumerate() {
            if !valid_agent_name(&a.name) {
                let name: String = a.name.chars().take(MAX_NAME + 1).collect();
                return Err(WireError::AgentName { host: host.to_owned(), name });
            }
            if !a.version.is_empty() && !valid_version(&a.version) {
                let version: String = a.version.chars().take(MAX_NAME + 1).collect();
                return Err(WireError::Version { host: host.to_owned(), agent: a.name.to_string(), version });
            }
            check_len(host, "status", &a.status, MAX_STATUS)?;
            check_len(host, "runUser", &a.run_user, MAX_SHORT_FIELD)?;
            check_len(host, "workDir", &a.work_dir, MAX_PATH)?;
            check_len(host, "lastError", &a.last_error, MAX_LAST_ERROR)?;
            if !a.pinned.is_empty() && !valid_pin(&a.pinned) {
                let pin: String = a.pinned.chars().take(MAX_NAME + 1).collect();
                return Err(WireError::Pin { host: host.to_owned(), agent: a.name.to_string(), pin });
            }
            if self.real_agents[..i].iter().any(|b| b.name == a.name) {
                return Err(WireError::DuplicateAgent { host: host.to_owned(), agent: a.name.to_string() });
            }
        }
        Ok(())
    }

    /// A copy that owns its strings.
    pub fn into_owned(self) -> Heartbeat<'static> {
        Heartbeat {
            hostname: Cow::Owned(self.hostname.into_owned()),
            ip: Cow::Owned(self.ip.into_owned()),
            run_user: Cow::Owned(self.run_user.into_owned()),
            updater_version: Cow::Owned(self.updater_version.into_owned()),
            real_agents: self.real_agents.into_iter().map(RealAgent::into_owned).collect(),
        }
    }
}

impl RealAgent<'_> {
    /// `./control status` printed something containing "started" (seed 003).
    pub fn is_started(&self) -> bool {
        self.status.contains("started")
    }

    /// A copy that owns its strings.
    pub fn into_owned(self) -> RealAgent<'static> {
        RealAgent {
            name: Cow::Owned(self.name.into_owned()),
            version: Cow::Owned(self.version.into_owned()),
            status: Cow::Owned(self.status.into_owned()),
            timestamp: self.timestamp,
            run_user: Cow::Owned(self.run_user.into_owned()),
            work_dir: Cow::Owned(self.work_dir.into_owned()),
            last_error: Cow::Owned(self.last_error.into_owned()),
            pinned: Cow::Owned(self.pinned.into_owned()),
        }
    }
}

impl HeartbeatReply {
    /// The reply a server sends when it refuses a request.
    pub fn error(message: impl Into<String>) -> Self {
        HeartbeatReply { error_message: message.into(), desired_agents: Vec::new(), config_hash: String::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_001: &str = r#"{
      "hostname":"liutian-01",
      "ip": "192.168.1.154",
      "runUser": "admin",
      "updaterVersion": "0.0.4",
      "realAgents": [
        {"name": "falcon-agent","version": "5.1.3","status": "started","timestamp": 1477380651,
         "runUser": "falcon","workDir": "/home/falcon/open-falcon"},
        {"name": "mysql-monitor","version": "0.0.5","status": "started","timestamp": 1477380651,
         "runUser": "falcon","workDir": "/home/falcon/open-falcon"}
      ]
    }"#;

    #[test]
    fn parses_seed_001_heartbeat_without_copying() {
        let hb = Heartbeat::parse(SEED_001.as_bytes()).unwrap();
        assert_eq!(hb.hostname, "liutian-01");
        assert!(matches!(hb.hostname, Cow::Borrowed(_)));
        assert_eq!(hb.real_agents.len(), 2);
        assert_eq!(hb.real_agents[1].version, "0.0.5");
        assert_eq!(hb.real_agents[0].timestamp, 1477380651);
        assert!(hb.real_agents[0].is_started());
    }

    #[test]
    fn minimal_go_heartbeat_and_null_agents() {
        let hb = Heartbeat::parse(br#"{"hostname":"bj-web-001","realAgents":[]}"#).unwrap();
        assert!(hb.real_agents.is_empty());
        let hb = Heartbeat::parse(br#"{"hostname":"bj-web-001","realAgents":null}"#).unwrap();
        assert!(hb.real_agents.is_empty());
        let hb = Heartbeat::parse(
            br#"{"hostname":"h","realAgents":[{"name":"a","version":"1","status":"stoped","timestamp":1}],"extra":{"x":1}}"#,
        )
        .unwrap();
        assert!(!hb.real_agents[0].is_started());
    }

    #[test]
    fn escaped_strings_are_owned() {
        let hb = Heartbeat::parse(br#"{"hostname":"h\u0031","realAgents":[]}"#).unwrap();
        assert_eq!(hb.hostname, "h1");
    }

    fn refused(body: &str) -> WireError {
        Heartbeat::parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn limits_are_refused_with_clear_errors() {
        assert!(matches!(refused("{"), WireError::Malformed(_)));
        assert!(matches!(refused(r#"{"realAgents":[]}"#), WireError::Malformed(_)));
        assert!(matches!(refused(r#"{"hostname":"","realAgents":[]}"#), WireError::Hostname(_)));
        assert!(matches!(refused(r#"{"hostname":"a/b"}"#), WireError::Hostname(_)));
        assert!(matches!(refused(r#"{"hostname":".."}"#), WireError::Hostname(_)));
        let long = "h".repeat(256);
        assert!(matches!(refused(&format!(r#"{{"hostname":"{long}"}}"#)), WireError::Hostname(_)));
        assert!(Heartbeat::parse(format!(r#"{{"hostname":"{}"}}"#, "h".repeat(255)).as_bytes()).is_ok());
        let e = refused(r#"{"hostname":"h","realAgents":[{"name":"../etc","version":"1"}]}"#);
        assert_eq!(e.to_string(), "host h: bad agent name \"../etc\": want 1-64 of [A-Za-z0-9._-], not . or ..");
        assert!(matches!(refused(r#"{"hostname":"h","realAgents":[{"name":"a","version":".."}]}"#), WireError::Version { .. }));
        assert!(matches!(refused(r#"{"hostname":"h","realAgents":[{"name":"a","version":"1 2"}]}"#), WireError::Version { .. }));
        assert!(matches!(refused(r#"{"hostname":"h","realAgents":[{"name":"a"},{"name":"a"}]}"#), WireError::DuplicateAgent { .. }));
        let agents: Vec<String> = (0..65).map(|i| format!(r#"{{"name":"a{i}"}}"#)).collect();
        let body = format!(r#"{{"hostname":"h","realAgents":[{}]}}"#, agents.join(","));
        assert!(matches!(refused(&body), WireError::TooManyAgents { count: 65, .. }));
        let status = "s".repeat(MAX_STATUS + 1);
        assert!(matches!(
            refused(&format!(r#"{{"hostname":"h","realAgents":[{{"name":"a","status":"{status}"}}]}}"#)),
            WireError::FieldTooLong { field: "status", .. }
        ));
        let big = vec![b' '; MAX_HEARTBEAT_BYTES + 1];
        assert!(matches!(Heartbeat::parse(&big), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn raw_encoded_batch_parses_back() {
        let a = br#"{"hostname":"a","realAgents":[]}"#;
        let b = SEED_001.as_bytes();
        let mut out = Vec::new();
        assert_eq!(Batch::encode_raw([(7, &a[..]), (9, b)], &mut out), 2);
        let batch = Batch::parse(&out).unwrap();
        assert_eq!(batch.hosts.len(), 2);
        assert_eq!((batch.hosts[0].seen, &*batch.hosts[0].hb.hostname), (7, "a"));
        assert_eq!(batch.hosts[1].hb, Heartbeat::parse(b).unwrap());
        let bad = br#"{"hosts":[{"seen":1,"hb":{"hostname":"../x"}}]}"#;
        assert!(matches!(Batch::parse(bad), Err(WireError::Hostname(_))));
        let mut empty = Vec::new();
        Batch::encode_raw(std::iter::empty(), &mut empty);
        assert!(Batch::parse(&empty).unwrap().hosts.is_empty());
    }

    #[test]
    fn reply_matches_the_go_format_and_skips_empty_extensions() {
        let reply = HeartbeatReply {
            error_message: String::new(),
            desired_agents: vec![DesiredAgent {
                name: "falcon-agent".into(),
                version: "5.1.3".into(),
                tarball: "http://files/releases/falcon".into(),
                md5: "490ac172dabecc867289079d48e84a66".into(),
                cmd: "start".into(),
                run_user: "falcon".into(),
                work_dir: "/home/falcon/open-falcon".into(),
                config_file_name: "cfg.json".into(),
                config_remote_url: "http://files/falcon/conf/falcon-agent-cfg.json".into(),
                sha256: String::new(),
            }],
            config_hash: String::new(),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            r#"{"errorMessage":"","desiredAgents":[{"name":"falcon-agent","version":"5.1.3","tarball":"http://files/releases/falcon","md5":"490ac172dabecc867289079d48e84a66","cmd":"start","runUser":"falcon","workDir":"/home/falcon/open-falcon","configFileName":"cfg.json","configRemoteUrl":"http://files/falcon/conf/falcon-agent-cfg.json"}]}"#
        );
        let back: HeartbeatReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn owned_heartbeat_round_trips_and_skips_empty_last_error() {
        let hb = Heartbeat::parse(SEED_001.as_bytes()).unwrap().into_owned();
        let json = serde_json::to_string(&hb).unwrap();
        assert!(!json.contains("lastError") && !json.contains("pinned"), "the Go side sees its own format");
        let again = Heartbeat::parse(json.as_bytes()).unwrap();
        assert_eq!(again, hb);
    }

    #[test]
    fn a_pin_is_hold_or_a_version() {
        let with = |pin: &str| format!(r#"{{"hostname":"h","realAgents":[{{"name":"a","version":"1","pinned":"{pin}"}}]}}"#);
        for ok in ["hold", "5.1.3", ""] {
            let text = with(ok);
            let hb = Heartbeat::parse(text.as_bytes()).unwrap();
            assert_eq!(hb.real_agents[0].pinned, ok);
        }
        for bad in ["../x", "a b", "x/y", ".."] {
            let text = with(bad);
            let e = Heartbeat::parse(text.as_bytes()).unwrap_err();
            assert!(matches!(e, WireError::Pin { .. }), "{bad}: {e}");
        }
    }
}
