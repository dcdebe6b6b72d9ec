//! `version` and `expires` of a file to sign: the document's place in the operator's sequence
//! and the time after which no party takes it as current (`ops_config::trust::check_fresh`).
//! `opsctl sign` writes them into the file before signing, so they are inside the signed
//! bytes; the rest of the file is left as the operator wrote it (toml_edit).

use crate::Failure;

/// `--version`: the version the signed file will carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One above the file's (1 when it has none).
    Next,
    /// The file's own; it must have one.
    Keep,
    Exactly(u64),
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "next" => Ok(Version::Next),
            "keep" => Ok(Version::Keep),
            n => match n.parse::<u64>() {
                Ok(v) if v >= 1 && v <= i64::MAX as u64 => Ok(Version::Exactly(v)),
                _ => Err(format!("want next, keep or a whole number from 1 up, got {s:?}")),
            },
        }
    }
}

/// `--expires`: when the signed file stops being current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    /// This many seconds from now (`30d`, `12h`).
    In(u64),
    /// At this unix time (an RFC 3339 time with its offset).
    At(u64),
    /// The file's own; it must have one.
    Keep,
}

impl std::str::FromStr for Expires {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "keep" {
            return Ok(Expires::Keep);
        }
        if let Ok(dt) = s.parse::<toml::value::Datetime>() {
            return ops_config::trust::unix_seconds(&dt).map(Expires::At);
        }
        ops_config::rollout::parse_duration(s)
            .map(Expires::In)
            .map_err(|_| format!("want a duration (30d, 12h), a time like 2027-01-05T00:00:00Z, or keep; got {s:?}"))
    }
}

/// `text` with `version` and `expires` set as asked, at unix time `now`. Refuses a version
/// that does not move forward from the file's own (`Exactly` below it), and a time already
/// past.
pub fn stamp(text: &str, version: Version, expires: Expires, now: u64, file: &str) -> Result<String, Failure> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| Failure::Refused(format!("{file}: does not parse: {e}")))?;
    let current = match doc.get("version") {
        None => None,
        Some(v) => Some(
            v.as_integer()
                .filter(|&v| v >= 1)
                .ok_or_else(|| Failure::Refused(format!("{file}: version must be a whole number from 1 up")))? as u64,
        ),
    };
    let new_version = match version {
        Version::Next => current.map_or(1, |v| v + 1),
        Version::Keep => current.ok_or_else(|| Failure::Refused(format!("{file}: no version to keep (sign with --version next)")))?,
        Version::Exactly(v) => v,
    };
    let has_expiry = doc.get("expires").is_some();
    let new_expires = match expires {
        Expires::In(secs) => Some(now + secs),
        Expires::At(at) => Some(at),
        Expires::Keep if has_expiry => None,
        Expires::Keep => return Err(Failure::Refused(format!("{file}: no expires to keep (sign with --expires 30d)"))),
    };
    if current != Some(new_version) {
        doc.insert("version", toml_edit::value(new_version as i64));
    }
    if let Some(at) = new_expires {
        if at <= now {
            return Err(Failure::Usage(format!("--expires {}: that time is past", ops_config::trust::rfc3339(at))));
        }
        let dt: toml::value::Datetime = ops_config::trust::rfc3339(at).parse().expect("rfc3339 is a TOML datetime");
        let dt: toml_edit::Datetime = dt.to_string().parse().expect("the same datetime");
        doc.insert("expires", toml_edit::value(dt));
    }
    let out = doc.to_string();
    // Whatever was edited, the result must be what every party will parse.
    let parsed = crate::Document::parse(&out, std::path::Path::new(file))?;
    debug_assert_eq!(parsed.versioned().version(), Some(new_version));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_502_410; // 2026-12-05T20:26:50Z
    const FILE: &str = "# the fleet\n[[agent]]\nname = \"demo\"\ntarball = \"http://files/x\"\nrun_user = \"ops\"\nwork_dir = \"/opt\"\ndefault = { version = \"1.0\" }\n";

    fn parsed(text: &str) -> ops_config::DesiredConfig {
        ops_config::DesiredConfig::parse(text, "a").unwrap()
    }

    #[test]
    fn next_starts_at_one_then_climbs_and_the_rest_is_kept() {
        let one = stamp(FILE, Version::Next, Expires::In(30 * 86_400), NOW, "a").unwrap();
        assert_eq!(parsed(&one).version(), Some(1));
        assert_eq!(parsed(&one).expires(), Some(NOW + 30 * 86_400));
        assert!(one.starts_with("version = 1\nexpires = 2027-01-04T20:26:50Z\n# the fleet\n[[agent]]\n"), "on top, comments kept:\n{one}");
        let two = stamp(&one, Version::Next, Expires::Keep, NOW, "a").unwrap();
        assert_eq!((parsed(&two).version(), parsed(&two).expires()), (Some(2), Some(NOW + 30 * 86_400)));
        let kept = stamp(&two, Version::Keep, Expires::Keep, NOW, "a").unwrap();
        assert_eq!(kept, two, "keep and keep change no byte (what --append needs)");
        let nine = stamp(&two, Version::Exactly(9), Expires::At(NOW + 60), NOW, "a").unwrap();
        assert_eq!((parsed(&nine).version(), parsed(&nine).expires()), (Some(9), Some(NOW + 60)));
    }

    #[test]
    fn a_cluster_map_is_stamped_too() {
        let map = "vnodes = 1000\n[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:2000\"\n";
        let one = stamp(map, Version::Next, Expires::In(60), NOW, "cluster.toml").unwrap();
        let parsed = ops_config::ClusterMap::parse(&one, std::path::Path::new("cluster.toml")).unwrap();
        assert_eq!((parsed.version, parsed.expires), (Some(1), Some(NOW + 60)));
        assert!(
            one.starts_with("vnodes = 1000\n") && one.ends_with("[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:2000\"\n"),
            "kept as written:\n{one}"
        );
    }

    #[test]
    fn what_cannot_be_signed_is_refused() {
        assert!(matches!(stamp(FILE, Version::Keep, Expires::In(60), NOW, "a"), Err(Failure::Refused(e)) if e.contains("no version")));
        assert!(matches!(stamp(FILE, Version::Next, Expires::Keep, NOW, "a"), Err(Failure::Refused(e)) if e.contains("no expires")));
        assert!(matches!(stamp(FILE, Version::Next, Expires::At(NOW - 1), NOW, "a"), Err(Failure::Usage(e)) if e.contains("past")));
        assert!(matches!(stamp("version = 0\n", Version::Next, Expires::In(60), NOW, "a"), Err(Failure::Refused(_))));
        assert!(matches!(stamp("[[agent]\n", Version::Next, Expires::In(60), NOW, "a"), Err(Failure::Refused(_))));
    }

    #[test]
    fn flags_parse() {
        assert_eq!("next".parse(), Ok(Version::Next));
        assert_eq!("7".parse(), Ok(Version::Exactly(7)));
        assert!("0".parse::<Version>().is_err());
        assert_eq!("30d".parse(), Ok(Expires::In(30 * 86_400)));
        assert_eq!("2027-01-05T00:00:00Z".parse(), Ok(Expires::At(1_799_107_200)));
        assert_eq!("keep".parse(), Ok(Expires::Keep));
        assert!("soon".parse::<Expires>().is_err());
    }
}
