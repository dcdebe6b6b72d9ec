//! The operator's signature over `agents.toml`: the root of trust of the fleet.
//!
//! An operator signs the file's exact bytes with an ed25519 key (`opsctl sign`), which writes a
//! detached `agents.toml.sig` beside it. Meta nodes, relays and updaters given the public keys
//! (`--trusted-key`, `--trusted-keys-file`) accept a config only when one of its signature lines
//! verifies under one of those keys, so neither the network, a relay nor one meta node can make
//! a host install what the operator did not sign (docs/security.md).
//!
//! A signed file carries its own `version` (strictly increasing: a later document has a higher
//! one) and `expires` (a time after which it is no longer current) inside the signed bytes, as
//! TUF's metadata does. Every party keeps the highest version it verified ([`Floor`]) and
//! takes a document only when [`check_fresh`] allows it: never a lower version (a rollback by
//! whoever serves an older signed file), never a different file at the same version (two
//! documents signed under one number: an operator error), never an expired one (a freeze:
//! a server that keeps serving one old file for ever). Rolling back is signing the old text
//! again at a higher version.
//!
//! Text forms (one line each, `#` comments and blank lines allowed in files):
//! - public key: the 32-byte key in standard base64 (44 characters);
//! - secret key file: the 32-byte seed in standard base64;
//! - signature file: `ed25519 <public key> <64-byte signature in base64>`, one line per key
//!   that signed (two during a key rotation). On the wire (`x-ops-signature`) the lines are
//!   joined with `,`.
//!
//! (The file passes 600 lines only with its unit tests, which stay beside the rules they
//! pin; the code is under 500.)

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::agents::{ConfigError, DesiredConfig};
use crate::wire::DesiredAgent;

/// The HTTP header that carries a config's signature lines next to its text.
pub const SIGNATURE_HEADER: &str = "x-ops-signature";

/// Why a key, a signature or a signed config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("{source_name}: {message}")]
    BadKey { source_name: String, message: String },
    #[error("no signature: a trusted key is configured, so the file must come with its .sig")]
    Unsigned,
    #[error("malformed signature line {line}: want `ed25519 <public key> <signature>` in base64")]
    Malformed { line: usize },
    #[error("signed only by keys that are not trusted here: {0}")]
    UnknownKey(String),
    #[error("the signature by {0} does not match the file's bytes (edited after signing?)")]
    Mismatch(String),
}

/// A signed document with its place in the operator's sequence: `agents.toml`
/// ([`DesiredConfig`]) and `cluster.toml` ([`crate::ClusterMap`]).
pub trait Versioned {
    /// The file's `version` (None: it has none).
    fn version(&self) -> Option<u64>;
    /// The file's `expires`, in unix seconds.
    fn expires(&self) -> Option<u64>;
    /// The content hash of the file's bytes.
    fn hash(&self) -> &str;
}

impl Versioned for DesiredConfig {
    fn version(&self) -> Option<u64> {
        DesiredConfig::version(self)
    }
    fn expires(&self) -> Option<u64> {
        DesiredConfig::expires(self)
    }
    fn hash(&self) -> &str {
        DesiredConfig::hash(self)
    }
}

impl Versioned for crate::ClusterMap {
    fn version(&self) -> Option<u64> {
        self.version
    }
    fn expires(&self) -> Option<u64> {
        self.expires
    }
    fn hash(&self) -> &str {
        &self.hash
    }
}

/// Why a verified signed document is not taken as current (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreshError {
    #[error("the signed file carries no `version`: sign it with `opsctl sign` (it sets `version` and `expires`)")]
    NoVersion,
    #[error("the signed file carries no `expires`: sign it with `opsctl sign --expires 30d`")]
    NoExpiry,
    #[error("version {version} is older than {highest}, the highest verified here (a rollback is the old text signed at a higher version)")]
    Older { version: u64, highest: u64 },
    #[error(
        "version {version} was verified here as {held}, and this file ({hash}) is another one at the same version: two files signed at one version (an operator error; sign the one you mean at a higher version)"
    )]
    Conflict { version: u64, held: String, hash: String },
    #[error("the signed file's version {version} expired at {at}: the operator must sign a fresh one (`opsctl sign --expires 30d`)")]
    Expired { version: u64, at: String },
}

/// The highest signed version a party has verified, and the hash of that file: what it keeps
/// on disk (fsynced) so that a restart does not forget it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Floor {
    pub version: u64,
    pub hash: String,
}

impl Floor {
    /// The floor a document sets once taken (None: it has no version).
    pub fn of(config: &(impl Versioned + ?Sized)) -> Option<Floor> {
        Some(Floor { version: config.version()?, hash: config.hash().to_owned() })
    }

    /// Its file form: `VERSION HASH` on one line.
    pub fn to_text(&self) -> String {
        format!("{} {}\n", self.version, self.hash)
    }

    /// Parses [`to_text`](Self::to_text)'s form (None: damaged).
    pub fn parse(text: &str) -> Option<Floor> {
        let mut w = text.split_ascii_whitespace();
        let (version, hash) = (w.next()?.parse().ok()?, w.next()?.to_owned());
        w.next().is_none().then_some(Floor { version, hash })
    }

    /// The higher of two floors (a tie keeps `self`).
    pub fn max(self, other: Option<Floor>) -> Floor {
        match other {
            Some(o) if o.version > self.version => o,
            _ => self,
        }
    }
}

/// Ok when a party whose highest verified document is `floor` may take `config` (already
/// verified by its signature) as current at unix time `now`: it has a version and an expiry,
/// its version is above the floor (or equal, for the very file of the floor), and it has not
/// expired.
pub fn check_fresh(config: &(impl Versioned + ?Sized), floor: Option<&Floor>, now: u64) -> Result<(), FreshError> {
    let version = config.version().ok_or(FreshError::NoVersion)?;
    let expires = config.expires().ok_or(FreshError::NoExpiry)?;
    if let Some(f) = floor {
        if version < f.version {
            return Err(FreshError::Older { version, highest: f.version });
        }
        if version == f.version && config.hash() != f.hash {
            return Err(FreshError::Conflict { version, held: f.hash.clone(), hash: config.hash().to_owned() });
        }
    }
    if now >= expires {
        return Err(FreshError::Expired { version, at: rfc3339(expires) });
    }
    Ok(())
}

/// Unix seconds of a TOML datetime with a date, a time and an offset (`2027-01-05T00:00:00Z`,
/// `2027-01-05T08:00:00+08:00`); fractions of a second are dropped.
pub fn unix_seconds(dt: &toml::value::Datetime) -> Result<u64, String> {
    let (Some(date), Some(time), Some(offset)) = (dt.date, dt.time, dt.offset) else {
        return Err(format!("expires must be a full time with its offset, like 2027-01-05T00:00:00Z; got {dt}"));
    };
    let offset_minutes = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => i64::from(minutes),
    };
    let days = days_from_civil(i64::from(date.year), u32::from(date.month), u32::from(date.day));
    let secs = days * 86_400 + i64::from(time.hour) * 3600 + i64::from(time.minute) * 60 + i64::from(time.second) - offset_minutes * 60;
    u64::try_from(secs).map_err(|_| format!("expires must be after 1970; got {dt}"))
}

/// `YYYY-MM-DDTHH:MM:SSZ` of unix seconds.
pub fn rfc3339(unix: u64) -> String {
    let (days, rem) = ((unix / 86_400) as i64, unix % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn decode_fixed<const N: usize>(text: &str) -> Option<[u8; N]> {
    STANDARD.decode(text.trim()).ok()?.try_into().ok()
}

/// The lines of a key or signature text that carry something (no comments, no blanks);
/// `,` also ends a line in a signature (its header form).
fn content_lines<'a>(text: &'a str, separators: &'a [char]) -> impl Iterator<Item = (usize, &'a str)> {
    text.split(separators).map(str::trim).enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// Parses one public key in its text form.
pub fn parse_public_key(text: &str) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(&decode_fixed::<32>(text)?).ok()
}

/// The text form of a public key.
pub fn public_key_text(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// The public keys a node, relay or updater accepts signatures from (several during a key
/// rotation). Empty: nothing is checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    /// Keys given on the command line and in key files (one key per line).
    pub fn load(keys: &[String], files: &[PathBuf]) -> Result<Self, TrustError> {
        let mut out = TrustedKeys::default();
        for (i, k) in keys.iter().enumerate() {
            out.add(k, &format!("--trusted-key #{}", i + 1), 1)?;
        }
        for f in files {
            let name = f.display().to_string();
            let text = std::fs::read_to_string(f).map_err(|e| TrustError::BadKey { source_name: name.clone(), message: e.to_string() })?;
            let before = out.keys.len();
            for (line, k) in content_lines(&text, &['\n']) {
                out.add(k, &name, line)?;
            }
            if out.keys.len() == before {
                return Err(TrustError::BadKey { source_name: name, message: "no key in the file".into() });
            }
        }
        Ok(out)
    }

    fn add(&mut self, text: &str, source_name: &str, line: usize) -> Result<(), TrustError> {
        let key = parse_public_key(text).ok_or_else(|| TrustError::BadKey {
            source_name: source_name.to_owned(),
            message: format!("line {line}: not an ed25519 public key (44 characters of base64): {:?}", text.trim()),
        })?;
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Ok when one line of `signature` is a valid signature of `file` by a trusted key. Other
    /// lines (other keys, other algorithms, damaged lines) are skipped; when none verifies, the
    /// error names the most telling reason: a trusted key whose signature does not match, else
    /// keys not trusted, else a damaged line, else no signature at all.
    pub fn verify(&self, file: &[u8], signature: Option<&str>) -> Result<(), TrustError> {
        let Some(signature) = signature else { return Err(TrustError::Unsigned) };
        let mut unknown = Vec::new();
        let (mut mismatch, mut malformed) = (None, None);
        for (line, l) in content_lines(signature, &['\n', ',']) {
            let mut parts = l.split_ascii_whitespace();
            let parsed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("ed25519"), Some(key), Some(sig), None) => parse_public_key(key).zip(decode_fixed::<64>(sig)),
                _ => None,
            };
            let Some((key, sig)) = parsed else {
                malformed.get_or_insert(line);
                continue;
            };
            if !self.keys.contains(&key) {
                unknown.push(public_key_text(&key));
                continue;
            }
            match key.verify_strict(file, &Signature::from_bytes(&sig)) {
                Ok(()) => return Ok(()),
                Err(_) => mismatch = Some(public_key_text(&key)),
            }
        }
        if let Some(key) = mismatch {
            return Err(TrustError::Mismatch(key));
        }
        if !unknown.is_empty() {
            return Err(TrustError::UnknownKey(unknown.join(", ")));
        }
        match malformed {
            Some(line) => Err(TrustError::Malformed { line }),
            None => Err(TrustError::Unsigned),
        }
    }
}

/// An operator's secret signing key.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A key from 32 random bytes (the caller takes them from the OS).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    /// Parses a secret key file's text.
    pub fn parse(text: &str) -> Option<Self> {
        let (_, line) = content_lines(text, &['\n']).next()?;
        decode_fixed::<32>(line).map(Self::from_seed)
    }

    /// The secret key file's text.
    pub fn to_text(&self) -> String {
        format!(
            "# ops fleet ed25519 signing key: keep it secret (mode 0600, offline when you can)\n# public key: {}\n{}\n",
            self.public_text(),
            STANDARD.encode(self.0.to_bytes())
        )
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    pub fn public_text(&self) -> String {
        public_key_text(&self.public_key())
    }

    /// One signature line over `file`'s exact bytes.
    pub fn sign(&self, file: &[u8]) -> String {
        format!("ed25519 {} {}", self.public_text(), STANDARD.encode(self.0.sign(file).to_bytes()))
    }
}

/// Where the signature of a config file lives: `{file}.sig`.
pub fn signature_path(config: &Path) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// The signature lines of a `.sig` text joined for the `x-ops-signature` header.
pub fn signature_header(signature: &str) -> String {
    content_lines(signature, &['\n', ',']).map(|(_, l)| l).collect::<Vec<_>>().join(",")
}

/// The signature lines of a `.sig` text or of its header form, as a `.sig` file keeps them.
pub fn signature_file(signature: &str) -> String {
    content_lines(signature, &['\n', ',']).map(|(_, l)| format!("{l}\n")).collect()
}

/// Finishes a write of `path` and its signature that a crash interrupted
/// ([`crate::disk::write_pair`]), so a loader never sees a text beside another's signature.
pub fn recover(path: &Path) -> Result<(), ConfigError> {
    match crate::disk::recover_pair(path, &signature_path(path)) {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError::File {
            file: crate::disk::pair_journal(path).display().to_string(),
            message: format!("cannot finish the interrupted write of the file and its signature: {e}"),
        }),
    }
}

/// Writes `text` to `path` and `signature` (a signature line; None: none) to its `.sig`, as
/// one crash-safe pair ([`crate::disk::write_pair`]).
pub fn write_signed(path: &Path, text: &str, signature: Option<&str>, tag: &str) -> std::io::Result<()> {
    let sig = signature.map(signature_file);
    crate::disk::write_pair(path, text.as_bytes(), &signature_path(path), sig.as_deref().map(str::as_bytes), tag)
}

/// The text of `path`'s `.sig`, if there is one.
pub fn read_signature(path: &Path) -> Result<Option<String>, ConfigError> {
    let sig_path = signature_path(path);
    match std::fs::read_to_string(&sig_path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError::File { file: sig_path.display().to_string(), message: e.to_string() }),
    }
}

/// Reads `path` and its `.sig` (if any), checks the signature when `keys` are given, then
/// parses the config. Returns the config and the signature text as read.
pub fn load_signed(path: &Path, keys: &TrustedKeys) -> Result<(DesiredConfig, Option<String>), ConfigError> {
    let file = path.display().to_string();
    recover(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File { file: file.clone(), message: e.to_string() })?;
    let signature = read_signature(path)?;
    let config = parse_signed(&text, signature.as_deref(), keys, &file)?;
    Ok((config, signature))
}

/// Checks `signature` over `text` when `keys` are given, then parses the config.
pub fn parse_signed(text: &str, signature: Option<&str>, keys: &TrustedKeys, file: &str) -> Result<DesiredConfig, ConfigError> {
    verify_if_keys(text, signature, keys, file)?;
    DesiredConfig::parse(text, file)
}

fn verify_if_keys(text: &str, signature: Option<&str>, keys: &TrustedKeys, file: &str) -> Result<(), ConfigError> {
    if keys.is_empty() {
        return Ok(());
    }
    keys.verify(text.as_bytes(), signature).map_err(|e| ConfigError::File { file: file.to_owned(), message: e.to_string() })
}

/// [`load_signed`] for a `cluster.toml`: with trusted keys, the map must carry a valid
/// `cluster.toml.sig` as `agents.toml` does (the operator's signature is the only thing that
/// changes which nodes hold the hosts and receive the cluster's credentials).
pub fn load_signed_map(path: &Path, keys: &TrustedKeys) -> Result<(crate::ClusterMap, Option<String>), ConfigError> {
    recover(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File { file: path.display().to_string(), message: e.to_string() })?;
    let signature = read_signature(path)?;
    let map = parse_signed_map(&text, signature.as_deref(), keys, path)?;
    Ok((map, signature))
}

/// Checks `signature` over a cluster map's `text` when `keys` are given, then parses it
/// (`file` anchors its relative paths).
pub fn parse_signed_map(text: &str, signature: Option<&str>, keys: &TrustedKeys, file: &Path) -> Result<crate::ClusterMap, ConfigError> {
    verify_if_keys(text, signature, keys, &file.display().to_string())?;
    crate::ClusterMap::parse(text, file)
}

/// Ok when the signed `config` allows host `hostname` to be told `d`: exactly one of the
/// states the config resolves for that host (its class's, or a rollout's `from` or target;
/// which one is run-time state), and that state carries a sha256.
pub fn allows(config: &DesiredConfig, hostname: &str, d: &DesiredAgent) -> Result<(), String> {
    let Some(i) = config.agent_index(&d.name) else {
        return Err(format!("agent {}: not in the signed config {}", d.name, config.hash()));
    };
    let allowed = allowed_states(config, hostname, &d.name);
    // A cached agent's files come from the host's relay (`crate::cache`): where they come from
    // does not matter, as the sha256 required below is checked on what arrives.
    let cached = config.agents()[i].relay_cache;
    let same = |a: &DesiredAgent| {
        if !cached {
            return a == d;
        }
        let md5_moved = crate::cache::is_url(&a.md5) && crate::cache::is_url(&d.md5);
        DesiredAgent { tarball: String::new(), md5: if md5_moved { String::new() } else { a.md5.clone() }, ..a.clone() }
            == DesiredAgent { tarball: String::new(), md5: if md5_moved { String::new() } else { d.md5.clone() }, ..d.clone() }
    };
    let Some(ok) = allowed.iter().find(|a| same(a)) else {
        let versions: Vec<&str> = allowed.iter().map(|a| a.version.as_str()).collect();
        return Err(format!(
            "agent {}: {} {} (tarball {}, md5 {:?}, sha256 {:?}, user {:?}, dir {:?}) is not what the signed config {} allows \
             this host (version {})",
            d.name,
            d.cmd,
            d.version,
            d.tarball,
            d.md5,
            d.sha256,
            d.run_user,
            d.work_dir,
            config.hash(),
            versions.join(" or ")
        ));
    };
    if ok.sha256.is_empty() {
        return Err(format!("agent {} {}: the signed config gives no sha256 for it; refused", d.name, d.version));
    }
    Ok(())
}

/// The states of agent `name` the config resolves for host `hostname`: its class's, and its
/// rollout's target when it has one (empty when the config lacks the agent).
pub fn allowed_states<'c>(config: &'c DesiredConfig, hostname: &str, name: &str) -> Vec<&'c DesiredAgent> {
    let Some(i) = config.agent_index(name) else { return Vec::new() };
    let class = config.class_of(hostname);
    let mut allowed: Vec<&DesiredAgent> = vec![&config.class(class)[i]];
    if let Some(r) = config.rollout_of(name)
        && let Some(target) = config.class_target(class, r)
    {
        allowed.push(target);
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn versioned(version: u64, expires: &str, extra: &str) -> DesiredConfig {
        let text = format!("version = {version}\nexpires = {expires}\n{extra}");
        DesiredConfig::parse(&text, "agents.toml").unwrap()
    }

    #[test]
    fn times_round_trip_and_match_known_instants() {
        for (text, unix) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2000-02-29T12:00:00Z", 951_825_600),
            ("2026-12-05T20:26:50Z", 1_796_502_410),
            ("2100-03-01T00:00:00Z", 4_107_542_400),
        ] {
            let dt: toml::value::Datetime = text.parse().unwrap();
            assert_eq!(unix_seconds(&dt), Ok(unix), "{text}");
            assert_eq!(rfc3339(unix), text);
        }
        let east: toml::value::Datetime = "2026-12-06T04:26:50+08:00".parse().unwrap();
        assert_eq!(unix_seconds(&east), Ok(1_796_502_410));
        let local: toml::value::Datetime = "2026-12-06T04:26:50".parse().unwrap();
        assert!(unix_seconds(&local).unwrap_err().contains("offset"));
    }

    #[test]
    fn freshness_refuses_rollback_conflict_and_expiry() {
        let now = 1_796_502_410; // 2026-12-05T20:26:50Z
        let later = "2027-01-01T00:00:00Z";
        let v5 = versioned(5, later, "");
        let floor = Floor::of(&v5).unwrap();
        assert_eq!(check_fresh(&v5, None, now), Ok(()), "first contact");
        assert_eq!(check_fresh(&v5, Some(&floor), now), Ok(()), "the very file of the floor");
        assert_eq!(check_fresh(&versioned(6, later, ""), Some(&floor), now), Ok(()));
        let older = check_fresh(&versioned(4, later, ""), Some(&floor), now).unwrap_err();
        assert_eq!(older, FreshError::Older { version: 4, highest: 5 });
        assert!(older.to_string().contains("version 4 is older than 5"), "{older}");
        let other = versioned(5, later, "# another file\n");
        assert!(matches!(check_fresh(&other, Some(&floor), now), Err(FreshError::Conflict { version: 5, .. })));
        let expired = check_fresh(&versioned(6, "2026-12-05T20:26:50Z", ""), Some(&floor), now).unwrap_err();
        assert_eq!(expired, FreshError::Expired { version: 6, at: "2026-12-05T20:26:50Z".into() });
        assert_eq!(check_fresh(&DesiredConfig::parse("", "a").unwrap(), None, now), Err(FreshError::NoVersion));
        let no_expiry = DesiredConfig::parse("version = 3\n", "a").unwrap();
        assert_eq!(check_fresh(&no_expiry, None, now), Err(FreshError::NoExpiry));
    }

    #[test]
    fn a_cluster_map_is_signed_versioned_and_checked_like_a_config() {
        let now = 1_796_502_410;
        let key = SecretKey::from_seed([9; 32]);
        let keys = TrustedKeys::load(&[key.public_text()], &[]).unwrap();
        let text = "version = 4\nexpires = 2027-01-01T00:00:00Z\n[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:7001\"\n";
        let sig = key.sign(text.as_bytes());
        let map = parse_signed_map(text, Some(&sig), &keys, Path::new("cluster.toml")).unwrap();
        assert_eq!((map.version, map.expires), (Some(4), Some(1_798_761_600)));
        assert_eq!(check_fresh(&map, None, now), Ok(()));
        let floor = Floor { version: 5, hash: "x".into() };
        assert_eq!(check_fresh(&map, Some(&floor), now), Err(FreshError::Older { version: 4, highest: 5 }));
        let edited = text.replace("7001", "7666");
        let e = parse_signed_map(&edited, Some(&sig), &keys, Path::new("cluster.toml")).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        let e = parse_signed_map(text, None, &keys, Path::new("cluster.toml")).unwrap_err().to_string();
        assert!(e.contains("no signature"), "{e}");
        let unsigned = crate::ClusterMap::parse("[[node]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\n", Path::new("c")).unwrap();
        assert_eq!(check_fresh(&unsigned, None, now), Err(FreshError::NoVersion));
        let e = crate::ClusterMap::parse("version = 0\n[[node]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\n", Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("c:1:11:"), "{e}");
    }

    #[test]
    fn floors_keep_the_highest_and_survive_their_text() {
        let f = Floor { version: 7, hash: "abc".into() };
        assert_eq!(Floor::parse(&f.to_text()), Some(f.clone()));
        assert_eq!(Floor::parse("7"), None);
        assert_eq!(Floor::parse("x abc"), None);
        assert_eq!(Floor::parse("7 abc extra"), None);
        assert_eq!(f.clone().max(Some(Floor { version: 9, hash: "d".into() })).version, 9);
        assert_eq!(f.clone().max(Some(Floor { version: 3, hash: "d".into() })), f);
    }

    #[test]
    fn bad_versions_and_expiries_are_refused_with_their_place() {
        let e = DesiredConfig::parse("version = 0\n", "agents.toml").unwrap_err().to_string();
        assert!(e.starts_with("agents.toml:1:11:") && e.contains("from 1 up"), "{e}");
        let e = DesiredConfig::parse("expires = 2027-01-01\n", "agents.toml").unwrap_err().to_string();
        assert!(e.contains("agents.toml:1:") && e.contains("offset"), "{e}");
        let e = DesiredConfig::parse("version = \"5\"\n", "agents.toml").unwrap_err().to_string();
        assert!(e.contains("agents.toml:1:"), "{e}");
    }

    #[test]
    fn a_signature_verifies_only_for_its_bytes_and_a_trusted_key() {
        let (k1, k2) = (key(1), key(2));
        let file = b"[[agent]]\n";
        let sig = k1.sign(file);
        let trusted = TrustedKeys::load(&[k1.public_text()], &[]).unwrap();
        assert_eq!(trusted.verify(file, Some(&sig)), Ok(()));
        assert!(matches!(trusted.verify(b"[[agent]]\n\n", Some(&sig)), Err(TrustError::Mismatch(_))));
        assert!(matches!(trusted.verify(file, Some(&k2.sign(file))), Err(TrustError::UnknownKey(_))));
        assert_eq!(trusted.verify(file, None), Err(TrustError::Unsigned));
        assert_eq!(trusted.verify(file, Some("# nothing\n")), Err(TrustError::Unsigned));
        assert_eq!(trusted.verify(file, Some("ed25519 abc def")), Err(TrustError::Malformed { line: 1 }));
        // Rotation: signed by the old and the new key; either one trusted is enough.
        let both = format!("{}\n{}\n", k2.sign(file), k1.sign(file));
        assert_eq!(trusted.verify(file, Some(&both)), Ok(()));
        assert_eq!(trusted.verify(file, Some(&signature_header(&both))), Ok(()));
    }

    #[test]
    fn secret_key_text_round_trips_and_bad_keys_are_named() {
        let k = key(7);
        let again = SecretKey::parse(&k.to_text()).unwrap();
        assert_eq!(again.public_text(), k.public_text());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys");
        std::fs::write(&f, format!("# ops\n{}\n\nnot-a-key\n", k.public_text())).unwrap();
        let e = TrustedKeys::load(&[], &[f]).unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("not-a-key"), "{e}");
    }

    const SIGNED: &str = r#"[[agent]]
name = "falcon-agent"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "2", sha256 = "1111111111111111111111111111111111111111111111111111111111111111" }
others = [{ prefix = "old-", version = "0", md5 = "0123456789abcdef0123456789abcdef" }]
rollout = { from = { version = "1", sha256 = "2222222222222222222222222222222222222222222222222222222222222222" }, waves = [10, 100] }
"#;

    #[test]
    fn allows_the_states_of_the_host_and_nothing_else() {
        let config = DesiredConfig::parse(SIGNED, "t").unwrap();
        let class = config.class_of("web-1");
        let from = config.class(class)[0].clone();
        let target = config.class_target(class, 0).unwrap().clone();
        assert_eq!((from.version.as_str(), target.version.as_str()), ("1", "2"));
        assert_eq!(allows(&config, "web-1", &from), Ok(()));
        assert_eq!(allows(&config, "web-1", &target), Ok(()));
        for change in [
            |d: &mut DesiredAgent| d.version = "3".into(),
            |d: &mut DesiredAgent| d.tarball = "http://evil/r".into(),
            |d: &mut DesiredAgent| d.sha256 = "33".repeat(32),
            |d: &mut DesiredAgent| d.work_dir = "/tmp".into(),
            |d: &mut DesiredAgent| d.run_user = "root".into(),
            |d: &mut DesiredAgent| d.cmd = "stop".into(),
            |d: &mut DesiredAgent| d.name = "other".into(),
        ] {
            let mut d = target.clone();
            change(&mut d);
            assert!(allows(&config, "web-1", &d).is_err(), "{d:?}");
        }
        // The old- group's own version is allowed there only, and refused for lacking sha256.
        let old = config.desired_for("old-1")[0].clone();
        assert!(allows(&config, "web-1", &old).is_err());
        assert!(allows(&config, "old-1", &old).unwrap_err().contains("no sha256"));
        // An old- host is not in the rollout: the target is not allowed there.
        assert!(allows(&config, "old-1", &target).is_err());
    }

    #[test]
    fn a_cached_agent_may_come_from_any_relay_but_is_otherwise_the_same() {
        let config = DesiredConfig::parse(&SIGNED.replace("work_dir = \"/w\"", "work_dir = \"/w\"\nrelay_cache = true"), "t").unwrap();
        let class = config.class_of("web-1");
        let mut target = config.class_target(class, 0).unwrap().clone();
        crate::cache::through_relay(&config, &mut target, "http://relay-dc1:2200");
        assert!(target.tarball.starts_with("http://relay-dc1:2200/pkg/"));
        assert_eq!(allows(&config, "web-1", &target), Ok(()));
        target.version = "3".into();
        assert!(allows(&config, "web-1", &target).is_err(), "only the source may differ");
    }

    #[test]
    fn a_bad_sha256_is_refused_with_its_place() {
        let bad = SIGNED.replace("\"2222", "\"z222");
        let e = DesiredConfig::parse(&bad, "agents.toml").unwrap_err().to_string();
        assert!(e.starts_with("agents.toml:8:") && e.contains("sha256 must be empty or 64 hex digits"), "{e}");
    }
}
