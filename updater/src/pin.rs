//! Local pins: an operator on the host writes `/etc/ops-updater/pin.toml` (`--pin-file`),
//!
//! ```toml
//! falcon-agent = "5.1.3"   # keep this version (installed from the same origin if need be)
//! mysql-monitor = "hold"   # change nothing at all: no install, no switch, no start or stop
//! ```
//!
//! and the updater keeps those agents so whatever the server answers, and says so in its report
//! (`pinned` in the agent's entry), so the meta nodes count the host as `pinned`: neither
//! converged nor failed. The file is read at every cycle: an edit takes effect at the next one,
//! and removing a line hands the agent back to the config. A file that cannot be read or parsed
//! holds every agent (nothing is changed, each reports the error), since ignoring it could
//! upgrade what an operator meant to hold.

use std::collections::BTreeMap;
use std::path::Path;

use ops_config::DesiredAgent;
use ops_config::wire::{PIN_HOLD, valid_agent_name, valid_pin};

/// The pins of one reading of the file: agent name → `hold` or a version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins(pub BTreeMap<String, String>);

impl Pins {
    /// Reads the pin file: no file is no pins; Err says what is wrong with one that exists.
    pub fn load(path: &Path) -> Result<Pins, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pins::default()),
            Err(e) => return Err(format!("pin file {}: {e}", path.display())),
        };
        Self::parse(&text).map_err(|e| format!("pin file {}: {e}", path.display()))
    }

    /// Parses the file's text: a table of agent name → `"hold"` or a version string.
    pub fn parse(text: &str) -> Result<Pins, String> {
        let table: BTreeMap<String, toml::Value> = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
        let mut pins = BTreeMap::new();
        for (agent, value) in table {
            if !valid_agent_name(&agent) {
                return Err(format!("{agent:?} is not an agent name"));
            }
            let Some(pin) = value.as_str().filter(|s| valid_pin(s)) else {
                return Err(format!("{agent} = {value}: want \"{PIN_HOLD}\" or a version string"));
            };
            pins.insert(agent, pin.to_owned());
        }
        Ok(Pins(pins))
    }

    pub fn get(&self, agent: &str) -> Option<&str> {
        self.0.get(agent).map(String::as_str)
    }
}

/// What to do with one desired agent under its pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinned {
    /// No pin, or a pin naming the desired version: apply the reply.
    Follow,
    /// `hold`: leave the agent exactly as it is.
    Hold,
    /// Keep this version (with the reply's run state): the desired state with the version
    /// replaced and its digest to be fetched beside the tarball (the reply's digest is for
    /// another version).
    Version(Box<DesiredAgent>),
}

/// The desired state `d` under `pin`.
pub fn under_pin(d: &DesiredAgent, pin: Option<&str>) -> Pinned {
    match pin {
        None => Pinned::Follow,
        Some(p) if p == d.version => Pinned::Follow,
        Some(PIN_HOLD) => Pinned::Hold,
        Some(version) => Pinned::Version(Box::new(DesiredAgent {
            version: version.to_owned(),
            // A URL-form md5 names where the digests are; a hex one is the other version's.
            md5: if ops_config::cache::is_url(&d.md5) { d.md5.clone() } else { String::new() },
            sha256: String::new(),
            ..d.clone()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(version: &str, md5: &str) -> DesiredAgent {
        DesiredAgent { tarball: "http://f/r".into(), md5: md5.into(), sha256: "ab".repeat(32), ..crate::test_desired("a", version, "/w") }
    }

    #[test]
    fn the_file_is_a_table_of_hold_or_versions() {
        let p = Pins::parse("falcon-agent = \"5.1.3\"\nmysql-monitor = \"hold\"\n").unwrap();
        assert_eq!((p.get("falcon-agent"), p.get("mysql-monitor"), p.get("x")), (Some("5.1.3"), Some("hold"), None));
        assert_eq!(Pins::parse("").unwrap(), Pins::default());
        for (bad, says) in [
            ("a = 5", "want \"hold\" or a version"),
            ("a = \"../x\"", "want \"hold\""),
            ("\"a/b\" = \"1\"", "not an agent name"),
            ("a = [\"1\"]", "want"),
            ("a = \"1\"\na = \"2\"", "duplicate"),
            ("not toml", "expected"),
        ] {
            let e = Pins::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Pins::load(&dir.path().join("none.toml")).unwrap(), Pins::default(), "no file, no pins");
        std::fs::write(dir.path().join("pin.toml"), "a = 1").unwrap();
        assert!(Pins::load(&dir.path().join("pin.toml")).unwrap_err().contains("pin.toml"));
    }

    #[test]
    fn a_pin_holds_follows_or_names_another_version_with_its_own_digest() {
        let d = desired("2", &"c".repeat(32));
        assert_eq!(under_pin(&d, None), Pinned::Follow);
        assert_eq!(under_pin(&d, Some("2")), Pinned::Follow);
        assert_eq!(under_pin(&d, Some("hold")), Pinned::Hold);
        let Pinned::Version(p) = under_pin(&d, Some("1")) else { panic!() };
        assert_eq!((p.version.as_str(), p.md5.as_str(), p.sha256.as_str(), p.cmd.as_str()), ("1", "", "", "start"));
        let url = desired("2", "http://f/md5");
        let Pinned::Version(p) = under_pin(&url, Some("1")) else { panic!() };
        assert_eq!(p.md5, "http://f/md5", "a URL-form md5 still says where the digests are");
    }
}
