//! deploy/monitoring/: the alert rules and scrape config pass `promtool` (and the rules' own
//! unit tests), and every metric they or the Grafana dashboard name is documented in
//! docs/metrics.md, whose every metric the code emits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    ops_e2e::workspace_root()
}

fn monitoring() -> PathBuf {
    root().join("deploy/monitoring")
}

/// Runs `promtool args...` in deploy/monitoring; panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .unwrap_or_else(|e| panic!("promtool: {e}: install Debian's prometheus package (apt-get install -y prometheus; .ci/run does)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The `ops_*` metric names in a text, histogram series (`_bucket`, `_sum`, `_count`) as their
/// histogram.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ops_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start + text[start..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(text.len() - start);
        let name = &text[start..end];
        if boundary && (name.starts_with("ops_meta_") || name.starts_with("ops_relay_")) {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            out.insert(base.to_owned());
        }
        i = end.max(start + 4);
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metrics of docs/metrics.md's tables (first column).
fn documented() -> BTreeSet<String> {
    read(&root().join("docs/metrics.md"))
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("ops_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn rules_and_config_pass_promtool_and_the_rules_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    promtool(&["check", "config", "prometheus.yml"]);
    let tested = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_metric_the_rules_and_dashboard_name_is_documented_and_emitted() {
    let docs = documented();
    assert!(docs.len() > 30, "{docs:?}");
    let dashboard = read(&monitoring().join("grafana-dashboard.json"));
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let exprs: Vec<&str> =
        panels.iter().flat_map(|p| p["targets"].as_array().into_iter().flatten()).filter_map(|t| t["expr"].as_str()).collect();
    assert!(exprs.len() > 20, "{exprs:?}");
    for (file, text) in [("alerts.yml", read(&monitoring().join("alerts.yml"))), ("grafana-dashboard.json", exprs.join("\n"))] {
        let named = metric_names(&text);
        assert!(named.len() > 5, "{file}: {named:?}");
        let missing: Vec<&String> = named.difference(&docs).collect();
        assert!(missing.is_empty(), "{file} names metrics not in docs/metrics.md: {missing:?}");
    }
    // Every documented metric is emitted: its literal name in the code, or its suffix after
    // the per-component prefix (`ops_{c}_...` in the shared forwarding code).
    let mut code = String::new();
    for dir in ["meta-node/src", "relay/src", "serve/src"] {
        for entry in walk(&root().join(dir)) {
            code.push_str(&read(&entry));
        }
    }
    for name in &docs {
        // The forwarding code's component is `relay` or `meta_forward`.
        let emitted = code.contains(&format!("\"{name}\""))
            || ["ops_meta_forward_", "ops_meta_", "ops_relay_"]
                .iter()
                .filter_map(|p| name.strip_prefix(p))
                .any(|suffix| code.contains(&format!("ops_{{c}}_{suffix}\"")) || code.contains(&format!("ops_{{component}}_{suffix}\"")));
        assert!(emitted, "docs/metrics.md documents {name}, which no code emits");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn metric_names_are_found_whole() {
    let names = metric_names("rate(ops_relay_heartbeats_total[5m]) / x_ops_meta_no + ops_meta_heartbeat_duration_seconds_bucket{le}");
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["ops_meta_heartbeat_duration_seconds", "ops_relay_heartbeats_total"]);
}
