//! Host identity: the credential an updater gets once, by enrolling with the enrollment
//! secret, and sends with every heartbeat (`x-ops-host-credential`), so that a relay or a meta
//! node can tell a host's own report from anyone's who reaches `/heartbeat`.
//!
//! A credential is a MAC over the hostname under a cluster host key: checking it needs the
//! key and nothing per host (no table on relays), and a credential names exactly one host.
//!
//! ```text
//! credential = "ops1." kid "." serial "." mac
//! kid        = the first 8 hex digits of SHA-256(key): which host key made it
//! serial     = when it was issued (unix milliseconds), decimal: a re-enrolled host's is higher
//! mac        = hex HMAC-SHA256(key, "ops-host-credential\n" hostname "\n" serial)
//! ```
//!
//! The host keys file (`--host-key-file`, made by `opsctl host-key`) holds one key per line
//! (64 hex digits; `#` comments): the first issues credentials, every one checks them. To
//! rotate, put a new key first, let hosts re-enroll, then drop the old line.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The request header a heartbeat carries its credential in.
pub const CREDENTIAL_HEADER: &str = "x-ops-host-credential";

const PREFIX: &str = "ops1.";
const DOMAIN: &[u8] = b"ops-host-credential\n";

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("host credential is malformed")]
    Malformed,
    #[error("host credential is made by a host key this server does not hold (key {0})")]
    UnknownKey(String),
    #[error("host credential is not {0}'s (another host's, or forged)")]
    Mismatch(String),
}

/// Why a host keys file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("{file}:{line}: a host key is 64 hex digits")]
    BadKey { file: String, line: usize },
    #[error("{file}: no host key in it")]
    Empty { file: String },
}

struct HostKey {
    kid: String,
    /// The HMAC keyed with this key, domain already fed: cloned per credential, so a check
    /// does not redo the key schedule.
    keyed: Hmac<Sha256>,
}

/// The cluster's host keys: the first issues, all check.
pub struct HostKeys {
    keys: Vec<HostKey>,
}

impl std::fmt::Debug for HostKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("HostKeys").field("kids", &kids).finish()
    }
}

fn kid_of(key: &[u8; 32]) -> String {
    crate::hex(&Sha256::digest(key)[..4])
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl HostKeys {
    /// Keys from the text of a host keys file (`file` names it in errors).
    pub fn parse(text: &str, file: &str) -> Result<HostKeys, KeysError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let key = unhex32(line).ok_or_else(|| KeysError::BadKey { file: file.to_owned(), line: n + 1 })?;
            let mut keyed = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
            keyed.update(DOMAIN);
            keys.push(HostKey { kid: kid_of(&key), keyed });
        }
        if keys.is_empty() {
            return Err(KeysError::Empty { file: file.to_owned() });
        }
        Ok(HostKeys { keys })
    }

    /// Reads a host keys file.
    pub fn load(path: &std::path::Path) -> Result<HostKeys, KeysError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeysError::File { file: file.clone(), message: e.to_string() })?;
        HostKeys::parse(&text, &file)
    }

    /// A new host keys file's text with `key` (32 random bytes) as its one key.
    pub fn file_text(key: &[u8; 32]) -> String {
        format!(
            "# ops fleet host key {}: the first line issues host credentials, every line checks them\n{}\n",
            kid_of(key),
            crate::hex(key)
        )
    }

    /// The id of the key that issues.
    pub fn current_kid(&self) -> &str {
        &self.keys[0].kid
    }

    /// The MAC of `hostname` and `serial` (its decimal text, as the credential carries it).
    fn mac(key: &HostKey, hostname: &str, serial: &str) -> Hmac<Sha256> {
        let mut mac = key.keyed.clone();
        mac.update(hostname.as_bytes());
        mac.update(b"\n");
        mac.update(serial.as_bytes());
        mac
    }

    /// The credential of `hostname` issued at `serial`, by the first key.
    pub fn issue(&self, hostname: &str, serial: u64) -> String {
        let k = &self.keys[0];
        let serial = serial.to_string();
        let tag = Self::mac(k, hostname, &serial).finalize().into_bytes();
        format!("{PREFIX}{}.{serial}.{}", k.kid, crate::hex(&tag))
    }

    /// Checks that `credential` is `hostname`'s, by any of the keys; returns its serial.
    pub fn check(&self, hostname: &str, credential: &str) -> Result<u64, CredentialError> {
        let rest = credential.trim().strip_prefix(PREFIX).ok_or(CredentialError::Malformed)?;
        let mut parts = rest.split('.');
        let (Some(kid), Some(serial_text), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(CredentialError::Malformed);
        };
        let serial: u64 = serial_text.parse().map_err(|_| CredentialError::Malformed)?;
        let tag = unhex32(tag).ok_or(CredentialError::Malformed)?;
        let key = self.keys.iter().find(|k| k.kid == kid).ok_or_else(|| CredentialError::UnknownKey(kid.to_owned()))?;
        // `verify_slice` compares in constant time.
        // The MAC is over the serial's text as sent: a credential written another way
        // (leading zeros) is not one that was issued.
        Self::mac(key, hostname, serial_text).verify_slice(&tag).map_err(|_| CredentialError::Mismatch(hostname.to_owned()))?;
        Ok(serial)
    }
}

/// The `[enrollment]` table of agents.toml: host credentials the operator has withdrawn.
/// Signed and versioned with the rest of the file, so a relay or meta node takes a revocation
/// only from the operator, and a replayed older file cannot undo one.
///
/// ```toml
/// [enrollment]
/// not_before = 2026-12-07T09:00:00Z         # every credential issued before: enroll again
/// hosts."web-1" = { not_before = 2026-12-07T09:30:00Z }  # `opsctl enrollment re-enroll`
/// hosts."web-9" = { revoked = true }                      # `opsctl enrollment revoke`
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Credentials issued before this (unix ms) are refused for every host; 0: none.
    not_before_ms: u64,
    hosts: std::collections::HashMap<String, HostRevocation>,
}

/// What `[enrollment.hosts]` says of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRevocation {
    /// Its credentials issued before this (unix ms) are refused: it enrolls again.
    NotBefore(u64),
    /// Every credential of it is refused, and so is its enrollment.
    Revoked,
}

/// Why a credential that checks (the host's, by a key held here) is still refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("host {0} is revoked by the operator ([enrollment] of agents.toml)")]
    Host(String),
    #[error("host credential of {0} was issued before the operator's not_before ([enrollment] of agents.toml): enroll again")]
    Before(String),
}

/// Most hosts one `[enrollment.hosts]` may name: the table is kept by every relay.
pub const MAX_REVOKED_HOSTS: usize = 100_000;

impl Revocations {
    /// Revocations of `not_before_ms` (0: none) and `hosts`; hostnames are not checked here.
    pub fn new(not_before_ms: u64, hosts: impl IntoIterator<Item = (String, HostRevocation)>) -> Revocations {
        Revocations { not_before_ms, hosts: hosts.into_iter().collect() }
    }

    /// Whether nothing is withdrawn (the heartbeat path then looks nothing up).
    pub fn is_empty(&self) -> bool {
        self.not_before_ms == 0 && self.hosts.is_empty()
    }

    /// Whether `hostname`'s credential issued at `serial` is withdrawn.
    pub fn refuses(&self, hostname: &str, serial: u64) -> Result<(), Revoked> {
        if self.is_empty() {
            return Ok(());
        }
        if serial < self.not_before_ms {
            return Err(Revoked::Before(hostname.to_owned()));
        }
        match self.hosts.get(hostname) {
            Some(HostRevocation::Revoked) => Err(Revoked::Host(hostname.to_owned())),
            Some(HostRevocation::NotBefore(t)) if serial < *t => Err(Revoked::Before(hostname.to_owned())),
            _ => Ok(()),
        }
    }

    /// Whether `hostname` may enroll (it is not revoked).
    pub fn may_enroll(&self, hostname: &str) -> bool {
        self.hosts.get(hostname) != Some(&HostRevocation::Revoked)
    }

    /// What is said of `hostname`, if anything.
    pub fn host(&self, hostname: &str) -> Option<HostRevocation> {
        self.hosts.get(hostname).copied()
    }

    /// Every host named, sorted.
    pub fn hosts(&self) -> Vec<(&str, HostRevocation)> {
        let mut v: Vec<(&str, HostRevocation)> = self.hosts.iter().map(|(h, r)| (h.as_str(), *r)).collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The fleet-wide not_before (unix ms), 0 when none.
    pub fn not_before_ms(&self) -> u64 {
        self.not_before_ms
    }
}

/// `POST /enroll`'s body: the host asking for its credential. The enrollment secret goes in
/// `Authorization: Bearer`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EnrollRequest {
    pub hostname: String,
}

/// `POST /enroll`'s reply.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EnrollReply {
    pub hostname: String,
    pub credential: String,
    pub serial: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(lines: &[[u8; 32]]) -> HostKeys {
        let text: String = lines.iter().map(|k| format!("{}\n", crate::hex(k))).collect();
        HostKeys::parse(&text, "host.keys").unwrap()
    }

    #[test]
    fn a_credential_names_one_host_and_one_key() {
        let k = keys(&[[7; 32]]);
        let c = k.issue("web-1", 1_700_000_000_000);
        assert!(c.starts_with(&format!("ops1.{}.1700000000000.", k.current_kid())), "{c}");
        assert_eq!(k.check("web-1", &c), Ok(1_700_000_000_000));
        assert_eq!(k.check("web-2", &c), Err(CredentialError::Mismatch("web-2".into())), "another host's");
        let forged = c.replace(".1700000000000.", ".1700000000001.");
        assert_eq!(k.check("web-1", &forged), Err(CredentialError::Mismatch("web-1".into())), "the serial is signed too");
        let padded = c.replace(".1700000000000.", ".01700000000000.");
        assert_eq!(k.check("web-1", &padded), Err(CredentialError::Mismatch("web-1".into())), "only the serial's text as issued");
        let mut flipped = c.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(k.check("web-1", &flipped), Err(CredentialError::Mismatch("web-1".into())));
        let other = keys(&[[8; 32]]);
        assert!(matches!(other.check("web-1", &c), Err(CredentialError::UnknownKey(_))));
        for bad in ["", "ops1.", "ops1.a.b.c", "ops2.x.1.00", &format!("{c}.x"), "ops1.abcd.12.zz"] {
            assert_eq!(k.check("web-1", bad), Err(CredentialError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn rotation_issues_with_the_first_key_and_checks_with_all() {
        let old = keys(&[[1; 32]]);
        let issued_before = old.issue("h", 5);
        let both = keys(&[[2; 32], [1; 32]]);
        assert_eq!(both.check("h", &issued_before), Ok(5), "credentials of the old key still check");
        let issued_after = both.issue("h", 6);
        assert_ne!(both.current_kid(), old.current_kid());
        assert!(matches!(old.check("h", &issued_after), Err(CredentialError::UnknownKey(_))));
        let new_only = keys(&[[2; 32]]);
        assert!(
            matches!(new_only.check("h", &issued_before), Err(CredentialError::UnknownKey(_))),
            "dropping the old line ends its credentials"
        );
    }

    #[test]
    fn revocations_refuse_by_host_and_by_issue_time_and_nothing_else() {
        let none = Revocations::default();
        assert!(none.is_empty() && none.refuses("h", 0).is_ok() && none.may_enroll("h"));
        let r =
            Revocations::new(1_000, [("gone".to_owned(), HostRevocation::Revoked), ("again".to_owned(), HostRevocation::NotBefore(5_000))]);
        assert_eq!(r.refuses("other", 999), Err(Revoked::Before("other".into())), "the fleet-wide not_before");
        assert!(r.refuses("other", 1_000).is_ok(), "issued at not_before is kept");
        assert_eq!(r.refuses("gone", u64::MAX), Err(Revoked::Host("gone".into())), "a revoked host: every serial");
        assert_eq!(r.refuses("again", 4_999), Err(Revoked::Before("again".into())));
        assert!(r.refuses("again", 5_000).is_ok(), "re-enrolled after its not_before");
        assert!(!r.may_enroll("gone") && r.may_enroll("again") && r.may_enroll("other"));
        assert_eq!(r.hosts().iter().map(|h| h.0).collect::<Vec<_>>(), ["again", "gone"]);
    }

    #[test]
    fn a_host_keys_file_is_checked_line_by_line() {
        let text = HostKeys::file_text(&[9; 32]);
        assert!(HostKeys::parse(&text, "f").is_ok());
        assert_eq!(HostKeys::parse("# only a comment\n", "f").unwrap_err(), KeysError::Empty { file: "f".into() });
        assert_eq!(HostKeys::parse("abcd\n", "f").unwrap_err(), KeysError::BadKey { file: "f".into(), line: 1 });
        assert!(!format!("{:?}", HostKeys::parse(&text, "f").unwrap()).contains(&crate::hex(&[9; 32])), "Debug never shows a key");
    }
}
