//! `ops-bench` end to end, small: it starts its own cluster from the binaries beside it, runs
//! every phase (register, steady with a meta node SIGKILLed, rollout with an install delay,
//! query, ceiling), writes its JSON, and stops everything it started. Behaviour only: no
//! figure here is a timing threshold.

use ops_e2e::Proc;

#[test]
fn small_bench_runs_every_phase_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let j = json.display().to_string();
    #[rustfmt::skip]
    let args = [
        "--hosts", "20000", "--connections", "16", "--json", &j,
        // steady: every host once per 30 s / 10 = 3 s, for 6 s, meta-3 killed 2 s in.
        "--interval-seconds", "30", "--speedup", "10", "--steady-seconds", "6", "--kill-meta",
        "--install-delay-ms", "200", "--rollout-timeout-seconds", "120",
    ];
    let mut p = Proc::start("ops-bench", &args);
    let status = p.wait_exit(std::time::Duration::from_secs(300));
    assert!(status.success(), "{}", p.log());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["hosts"], 20000);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["register"]["errors"], 0);
    assert_eq!(report["register"]["held_hosts"], 20000, "every host registered: {report}");
    assert_eq!(report["query"]["listed_hosts"], 20000, "the listing lists every simulated host");
    let steady = &report["steady"];
    assert!(steady["heartbeats"].as_u64().unwrap() > 0, "{steady}");
    assert_eq!(steady["errors"], 0, "no updater sees the meta node die: {steady}");
    assert_eq!(steady["kill_meta"]["node"], "meta-3");
    assert!(steady["kill_meta"]["complete_again_s"].is_number(), "status complete again after the kill: {steady}");
    assert!(steady["kill_meta"]["restored_s"].is_number(), "status whole again after the restart: {steady}");
    assert!(steady["batch_hosts_mean"].as_f64().unwrap() > 0.0, "relay batch sizes read from /metrics: {steady}");
    for key in ["wall_s", "meta", "processes"] {
        assert!(!report[key].is_null(), "{key} in the report");
    }
    assert!(report["register"]["heartbeats_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["ceiling"]["requests_per_s"].as_f64().unwrap() > 0.0);
    for p in ["50", "90", "99", "100"] {
        assert!(report["rollout"]["converged_s"][p].as_f64().is_some(), "rollout reached {p}%: {report}");
    }
    assert_eq!(report["rollout"]["errors"], 0);
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 5);
    // Everything it started is gone.
    for p in procs {
        let name = p["name"].as_str().unwrap();
        assert!(p["rss_bytes"].as_u64().unwrap() > 0, "{name}");
    }
    let left = std::process::Command::new("pgrep").arg("-f").arg("ops-bench-").output().map(|o| o.stdout).unwrap_or_default();
    assert!(left.is_empty(), "processes of the bench's cluster survived: {}", String::from_utf8_lossy(&left));
}
