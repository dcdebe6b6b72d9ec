//! The write side of `opsctl`: `config diff|apply|history|rollback` and
//! `rollout pause|resume|abort` (edits of the served `agents.toml` through the same apply, so
//! the file stays the one source of truth). Applies go through `POST /config/apply` with the
//! hash the operator diffed against: a config changed meanwhile is refused, never overwritten.

use std::path::Path;

use ops_config::reply::{ApplyReply, ErrorReply, History};
use serde_json::Value;

use crate::Failure;
use crate::fleet::Server;

/// The config served now: (text, signature header, hash).
fn served(s: &Server) -> Result<(String, Option<String>, String), Failure> {
    let (text, sig) = s.get_signed("/config/desired")?;
    let hash = ops_config::content_hash(text.as_bytes());
    Ok((text, sig, hash))
}

/// A file and its `.sig` beside it, if any (header form).
fn read_signed(file: &Path) -> Result<(String, Option<String>), Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
    let sig = std::fs::read_to_string(ops_config::trust::signature_path(file)).ok().map(|s| ops_config::trust::signature_header(&s));
    Ok((text, sig))
}

fn unified(old: &str, new: &str, name: &str) -> String {
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(3).header(&format!("served {name}"), name).to_string()
}

/// `opsctl config diff FILE`: what applying FILE would change, and the hash to apply against.
pub fn diff(s: &Server, file: &Path) -> Result<(), Failure> {
    let (text, _) = read_signed(file)?;
    let (current, _, hash) = served(s)?;
    let (_, health) = s.get_as::<ops_config::status::Health>("/health")?;
    if current == text {
        println!("# {} is what the cluster serves (hash {hash}, generation {})", file.display(), health.config_generation);
        return Ok(());
    }
    print!("{}", unified(&current, &text, &file.display().to_string()));
    println!("# served: hash {hash}, generation {}", health.config_generation);
    println!("# apply it with: opsctl config apply {} --expect {hash}", file.display());
    Ok(())
}

/// Prints an apply's answer; refusals are `Refused` with the server's reason.
fn report(status: u16, v: &Value, json: bool) -> Result<(), Failure> {
    if json {
        println!("{v}");
    }
    // A refusal before any node was asked is only an `errorMessage`; after, the whole reply.
    let reply: Option<ApplyReply> = serde_json::from_value(v.clone()).ok();
    if status != 200 {
        let why = match &reply {
            Some(r) => r.error_message.clone(),
            None => serde_json::from_value::<ErrorReply>(v.clone()).map_or_else(|_| v.to_string(), |e| e.error_message),
        };
        if !json {
            for n in reply.iter().flat_map(|r| &r.nodes).filter(|n| !n.ok) {
                eprintln!("  {}: {}", n.id, n.error.as_deref().unwrap_or("?"));
            }
        }
        return Err(Failure::Refused(format!("HTTP {status}: {why}")));
    }
    let reply = reply.ok_or_else(|| Failure::Unavailable(format!("not an apply reply: {v}")))?;
    if !json {
        println!(
            "applied: hash {} (was {}), generation {}, on {} node(s)",
            reply.hash,
            reply.previous_hash,
            reply.generation,
            reply.nodes.len()
        );
    }
    if reply.missing_nodes.is_empty() {
        Ok(())
    } else {
        let why = if reply.error_message.is_empty() { "not every node answered".to_owned() } else { reply.error_message };
        Err(Failure::Partial(why))
    }
}

/// `opsctl config apply FILE [--expect HASH]`: checked on every node, then written by every
/// node as the next generation. Without --expect, the hash served now (printed with the diff).
pub fn apply(s: &Server, file: &Path, expect: Option<&str>, token: Option<&str>, json: bool) -> Result<(), Failure> {
    let (text, sig) = read_signed(file)?;
    let expect = match expect {
        Some(e) => e.to_owned(),
        None => {
            let (current, _, hash) = served(s)?;
            if !json {
                print!("{}", unified(&current, &text, &file.display().to_string()));
            }
            hash
        }
    };
    let (status, v) = s.post(&format!("/config/apply?expect={expect}"), text, sig.as_deref(), token)?;
    report(status, &v, json)
}

/// `opsctl config rollback [--expect HASH]`: the version before the one served, as the next
/// generation.
pub fn rollback(s: &Server, expect: Option<&str>, token: Option<&str>, json: bool) -> Result<(), Failure> {
    let expect = match expect {
        Some(e) => e.to_owned(),
        None => served(s)?.2,
    };
    let (status, v) = s.post(&format!("/config/rollback?expect={expect}"), String::new(), None, token)?;
    report(status, &v, json)
}

/// `opsctl config history`: the generations the asked node keeps.
pub fn history(s: &Server, json: bool) -> Result<(), Failure> {
    let (text, h) = s.get_as::<History>("/config/history")?;
    if json {
        println!("{}", text.trim());
        return Ok(());
    }
    let mut rows = vec![vec!["GEN".to_owned(), "HASH".into(), "BYTES".into(), "SIGNED".into(), String::new()]];
    for e in &h.versions {
        rows.push(vec![
            e.generation.to_string(),
            e.hash.clone(),
            e.bytes.to_string(),
            if e.signed { "yes".into() } else { "no".into() },
            if e.generation == h.generation && e.hash == h.hash { "<- served".into() } else { String::new() },
        ]);
    }
    println!("node {}: generation {}", h.id, h.generation);
    print!("{}", crate::fleet::table(&rows));
    Ok(())
}

/// What `rollout pause|resume|abort` sets in the agent's `[agent.rollout]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    Pause,
    Resume,
    Abort,
}

/// The served text with `agent`'s rollout edited.
pub fn edit_rollout(text: &str, agent: &str, edit: Edit) -> Result<String, Failure> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| Failure::Refused(format!("the served config does not parse: {e}")))?;
    let agents = doc
        .get_mut("agent")
        .and_then(|a| a.as_array_of_tables_mut())
        .ok_or_else(|| Failure::Refused("the served config has no [[agent]]".into()))?;
    let table = agents
        .iter_mut()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(agent))
        .ok_or_else(|| Failure::Refused(format!("no agent {agent:?} in the served config")))?;
    let rollout = table
        .get_mut("rollout")
        .and_then(|r| r.as_table_like_mut())
        .ok_or_else(|| Failure::Refused(format!("agent {agent:?} has no [agent.rollout]")))?;
    match edit {
        Edit::Pause => {
            rollout.insert("paused", toml_edit::value(true));
        }
        Edit::Resume => {
            rollout.remove("paused");
        }
        Edit::Abort => {
            rollout.insert("abort", toml_edit::value(true));
        }
    }
    Ok(doc.to_string())
}

/// `opsctl rollout pause|resume|abort AGENT [--key KEY]`: edits the served file and applies it
/// against the hash it was read at. A signed config needs `--key` to sign the edit.
pub fn rollout(s: &Server, agent: &str, edit: Edit, key: Option<&Path>, token: Option<&str>, json: bool) -> Result<(), Failure> {
    edit_served(s, agent, |text| edit_rollout(text, agent, edit), key, token, json)
}

/// Reads the served agents.toml, edits it with `edit`, signs the edit with `key` when the
/// served file is signed, and applies it against the hash it was read at (`what` names the
/// edit's subject when there is nothing to change).
pub fn edit_served(
    s: &Server,
    what: &str,
    edit: impl FnOnce(&str) -> Result<String, Failure>,
    key: Option<&Path>,
    token: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let (text, sig, hash) = served(s)?;
    let mut edited = edit(&text)?;
    if edited == text {
        println!("{what}: nothing to change");
        return Ok(());
    }
    let new_sig = match (sig, key) {
        (_, Some(key)) => {
            // A signed edit is a new document: the next version, the expiry kept (30 days
            // from now when the file had none).
            let has_expiry = ops_config::DesiredConfig::parse(&edited, "agents.toml").is_ok_and(|c| c.expires().is_some());
            let expires = if has_expiry { crate::stamp::Expires::Keep } else { crate::DEFAULT_EXPIRY };
            edited = crate::stamp::stamp(&edited, crate::stamp::Version::Next, expires, crate::unix_now(), "agents.toml")?;
            Some(ops_config::trust::signature_header(&crate::sign_text(key, edited.as_bytes())?))
        }
        (Some(_), None) => {
            return Err(Failure::Usage("the served config is signed: give --key KEY to sign the edit (opsctl keygen)".into()));
        }
        (None, None) => None,
    };
    if !json {
        print!("{}", unified(&text, &edited, "agents.toml"));
    }
    let (status, v) = s.post(&format!("/config/apply?expect={hash}"), edited, new_sig.as_deref(), token)?;
    report(status, &v, json)
}

/// The served agents.toml as text, its signature header and its hash.
pub fn served_config(s: &Server) -> Result<(String, Option<String>, String), Failure> {
    served(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# the fleet
[[agent]]
name = "a"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "2" }

  [agent.rollout]
  from = { version = "1" }   # keep me
  waves = [10, 100]

[[agent]]
name = "b"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "1" }
"#;

    #[test]
    fn rollout_edits_touch_one_key_and_keep_the_rest_of_the_file() {
        let paused = edit_rollout(TEXT, "a", Edit::Pause).unwrap();
        assert!(paused.contains("paused = true") && paused.contains("# keep me") && paused.starts_with("# the fleet"));
        let config = ops_config::DesiredConfig::parse(&paused, "t").unwrap();
        assert!(config.agents()[0].rollout.as_ref().unwrap().policy.paused);
        assert_eq!(edit_rollout(&paused, "a", Edit::Resume).unwrap(), TEXT, "resume takes the key out again");
        let aborted = edit_rollout(TEXT, "a", Edit::Abort).unwrap();
        assert!(ops_config::DesiredConfig::parse(&aborted, "t").unwrap().agents()[0].rollout.as_ref().unwrap().policy.abort);
        assert!(matches!(edit_rollout(TEXT, "b", Edit::Pause), Err(Failure::Refused(_))), "b has no rollout");
        assert!(matches!(edit_rollout(TEXT, "c", Edit::Pause), Err(Failure::Refused(_))));
    }
}
