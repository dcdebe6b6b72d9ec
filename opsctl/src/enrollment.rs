//! `opsctl enrollment list|revoke|re-enroll|restore`: the `[enrollment]` table of the served
//! agents.toml, which every relay and meta node checks host credentials against
//! (`ops_config::enroll::Revocations`). An edit is signed and applied like any config change,
//! so a withdrawal comes only from the operator and an older file cannot undo it.

use ops_config::enroll::HostRevocation;

use crate::Failure;
use crate::fleet::Server;

/// What an edit does to `[enrollment]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// `hosts."H" = { revoked = true }`: every credential of H refused, and its enrollment.
    Revoke(String),
    /// `hosts."H" = { not_before = NOW }`: the credentials H holds are refused; it enrolls again.
    ReEnroll(String),
    /// `not_before = NOW`: every host's credential issued until now is refused.
    ReEnrollAll,
    /// H taken out of `[enrollment.hosts]`.
    Restore(String),
}

/// `unix_ms` as a TOML datetime to the millisecond (credential serials are milliseconds of
/// the issuing server's clock: keep the servers' clocks in step).
fn datetime(unix_ms: u64) -> toml_edit::Value {
    let text = format!("{}.{:03}Z", ops_config::trust::rfc3339(unix_ms / 1000).trim_end_matches('Z'), unix_ms % 1000);
    let dt: toml_edit::Datetime = text.parse().expect("rfc3339 parses as a TOML datetime");
    toml_edit::Value::from(dt)
}

/// The table `key` of `parent`, made (implicit: no header of its own) when missing.
fn table<'a>(parent: &'a mut dyn toml_edit::TableLike, key: &str, implicit: bool) -> Result<&'a mut dyn toml_edit::TableLike, Failure> {
    parent
        .entry(key)
        .or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(implicit);
            toml_edit::Item::Table(t)
        })
        .as_table_like_mut()
        .ok_or_else(|| Failure::Refused(format!("the served config's {key} is not a table")))
}

/// `text` (an agents.toml) with `edit` made, at `now_ms`; everything else kept as written.
pub fn edit_text(text: &str, edit: &Edit, now_ms: u64) -> Result<String, Failure> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| Failure::Refused(format!("the served config does not parse: {e}")))?;
    if let Edit::Revoke(h) | Edit::ReEnroll(h) | Edit::Restore(h) = edit
        && !ops_config::wire::valid_hostname(h)
    {
        return Err(Failure::Usage(format!("bad hostname {h:?}")));
    }
    // No empty `[enrollment]` header above `[enrollment.hosts]`.
    let enrollment = table(doc.as_table_mut(), "enrollment", true)?;
    let when = datetime(now_ms);
    match edit {
        Edit::ReEnrollAll => {
            enrollment.insert("not_before", toml_edit::Item::Value(when));
        }
        Edit::Revoke(h) | Edit::ReEnroll(h) | Edit::Restore(h) => {
            let hosts = table(enrollment, "hosts", false)?;
            let mut entry = toml_edit::InlineTable::new();
            match edit {
                Edit::Revoke(_) => {
                    entry.insert("revoked", true.into());
                }
                Edit::ReEnroll(_) => {
                    entry.insert("not_before", when);
                }
                _ => {}
            }
            if matches!(edit, Edit::Restore(_)) {
                hosts.remove(h);
            } else {
                hosts.insert(h, toml_edit::Item::Value(toml_edit::Value::InlineTable(entry)));
            }
            if hosts.is_empty() {
                enrollment.remove("hosts");
            }
        }
    }
    if enrollment.is_empty() {
        doc.remove("enrollment");
    }
    let edited = doc.to_string();
    ops_config::DesiredConfig::parse(&edited, "agents.toml").map_err(|e| Failure::Refused(format!("the edited config is refused: {e}")))?;
    Ok(edited)
}

/// `opsctl enrollment revoke|re-enroll|restore`: the edit applied to the served config.
pub fn apply(s: &Server, edit: &Edit, key: Option<&std::path::Path>, token: Option<&str>, json: bool) -> Result<(), Failure> {
    let what = match edit {
        Edit::Revoke(h) | Edit::ReEnroll(h) | Edit::Restore(h) => h.clone(),
        Edit::ReEnrollAll => "every host".to_owned(),
    };
    let now_ms = ops_config::clock::unix_ms();
    crate::config::edit_served(s, &what, |text| edit_text(text, edit, now_ms), key, token, json)
}

/// Hosts past this many are listed without asking the cluster for their records.
const LOOKED_UP: usize = 200;

/// `opsctl enrollment list`: what the served config withdraws, and for each named host
/// whether its record is authenticated now.
pub fn list(s: &Server, json: bool) -> Result<(), Failure> {
    let (text, _, hash) = crate::config::served_config(s)?;
    let config = ops_config::DesiredConfig::parse(&text, "agents.toml").map_err(|e| Failure::Refused(e.to_string()))?;
    let r = config.revocations();
    let hosts = r.hosts();
    let record = |h: &str| match s.get_as::<ops_config::status::HostView>(&format!("/status/host/{h}")) {
        Ok((_, v)) if v.authenticated => "authenticated",
        Ok(_) => "unauthenticated",
        Err(Failure::Refused(_)) => "not held",
        Err(_) => "?",
    };
    if json {
        let rows: Vec<serde_json::Value> = hosts
            .iter()
            .enumerate()
            .map(|(i, (h, rev))| {
                let (revoked, not_before) = match rev {
                    HostRevocation::Revoked => (true, None),
                    HostRevocation::NotBefore(t) => (false, Some(*t)),
                };
                let looked = (i < LOOKED_UP).then(|| record(h));
                serde_json::json!({"hostname": h, "revoked": revoked, "notBeforeMs": not_before, "record": looked})
            })
            .collect();
        let not_before = (r.not_before_ms() > 0).then(|| r.not_before_ms());
        println!("{}", serde_json::json!({"configHash": hash, "notBeforeMs": not_before, "hosts": rows}));
        return Ok(());
    }
    match r.not_before_ms() {
        0 => println!("every host: credentials kept (no [enrollment] not_before)"),
        t => println!("every host: credentials issued before {} refused", datetime(t)),
    }
    if hosts.is_empty() {
        println!("no host named in [enrollment.hosts] (config {hash})");
        return Ok(());
    }
    let mut rows = vec![vec!["HOST".to_owned(), "WITHDRAWN".into(), "RECORD".into()]];
    for (i, (h, rev)) in hosts.iter().enumerate() {
        let withdrawn = match rev {
            HostRevocation::Revoked => "revoked (credentials and enrollment)".to_owned(),
            HostRevocation::NotBefore(t) => format!("issued before {}", datetime(*t)),
        };
        rows.push(vec![h.to_string(), withdrawn, if i < LOOKED_UP { record(h).to_owned() } else { "-".into() }]);
    }
    print!("{}", crate::fleet::table(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# the fleet\n[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\ndefault = { version = \"1\" }  # keep me\n";

    #[test]
    fn edits_name_the_host_and_time_and_keep_the_rest_of_the_file() {
        let now_ms = 1_767_225_600_001; // 2026-01-01T00:00:00.001Z
        let revoked = edit_text(TEXT, &Edit::Revoke("web-9".into()), now_ms).unwrap();
        assert!(revoked.starts_with(TEXT), "{revoked}");
        let again = edit_text(&revoked, &Edit::ReEnroll("web-1".into()), now_ms).unwrap();
        let config = ops_config::DesiredConfig::parse(&again, "t").unwrap();
        let r = config.revocations();
        assert_eq!(r.host("web-9"), Some(HostRevocation::Revoked));
        assert_eq!(r.host("web-1"), Some(HostRevocation::NotBefore(now_ms)), "to the millisecond");
        assert!(r.refuses("web-1", now_ms - 1).is_err() && r.refuses("web-1", now_ms).is_ok());
        let all = edit_text(&again, &Edit::ReEnrollAll, now_ms).unwrap();
        assert_eq!(ops_config::DesiredConfig::parse(&all, "t").unwrap().revocations().not_before_ms(), now_ms);
        let restored = edit_text(&again, &Edit::Restore("web-9".into()), now_ms).unwrap();
        let restored = edit_text(&restored, &Edit::Restore("web-1".into()), now_ms).unwrap();
        assert_eq!(restored, TEXT, "restoring every host takes the table out again");
        assert!(matches!(edit_text(TEXT, &Edit::Revoke("a b".into()), now_ms), Err(Failure::Usage(_))));
    }
}
