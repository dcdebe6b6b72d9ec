//! `ops-bench` end to end, small: it starts its own cluster from the binaries beside it, runs
//! its phases (register, rollout, query, ceiling), writes its JSON, and stops everything it started.

use ops_e2e::Proc;

#[test]
fn small_bench_runs_every_phase_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let j = json.display().to_string();
    let mut p = Proc::start("ops-bench", &["--hosts", "3000", "--meta", "2", "--relays", "1", "--connections", "8", "--json", &j]);
    let status = p.wait_exit(std::time::Duration::from_secs(120));
    assert!(status.success(), "{}", p.log());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["hosts"], 3000);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["query"]["listed_hosts"], 3000, "the listing lists every simulated host");
    assert!(report["register"]["heartbeats_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["ceiling"]["requests_per_s"].as_f64().unwrap() > 0.0);
    for p in ["50", "90", "99", "100"] {
        assert!(report["rollout"]["converged_s"][p].as_f64().is_some(), "rollout reached {p}%: {report}");
    }
    assert_eq!(report["rollout"]["errors"], 0);
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 3);
    // Everything it started is gone.
    for p in procs {
        let name = p["name"].as_str().unwrap();
        assert!(p["rss_bytes"].as_u64().unwrap() > 0, "{name}");
    }
    let left = std::process::Command::new("pgrep").arg("-f").arg("ops-bench-").output().map(|o| o.stdout).unwrap_or_default();
    assert!(left.is_empty(), "processes of the bench's cluster survived: {}", String::from_utf8_lossy(&left));
}
