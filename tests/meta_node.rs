//! End-to-end tests of a standalone `meta-node`: the real binary on 127.0.0.1:0.
//!
//! One file per suite, though it is long: cargo links a test binary per file under `tests/`,
//! and every link of the workspace adds to each CI run's build; the tests in it share nothing
//! but the fixtures of `ops_e2e`, and each starts its own processes.

use std::path::Path;
use std::time::Duration;

use ops_e2e::{AGENTS, Meta, Proc, eventually, get_json, get_text, post_json, raw_http};
use serde_json::{Value, json};

/// Seed 001's heartbeat, verbatim.
const SEED_001: &str = r#"{
  "hostname":"liutian-01",
  "ip": "192.168.1.154",
  "runUser": "admin",
  "updaterVersion": "0.0.4",
  "realAgents": [
    {
      "name": "falcon-agent",
      "version": "5.1.3",
      "status": "started",
      "timestamp": 1477380651,
      "runUser": "falcon",
      "workDir": "/home/falcon/open-falcon"
    },
    {
      "name": "mysql-monitor",
      "version": "0.0.5",
      "status": "started",
      "timestamp": 1477380651,
      "runUser": "falcon",
      "workDir": "/home/falcon/open-falcon"
    }
  ]
}"#;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agents.toml"), AGENTS).unwrap();
        Setup { dir }
    }

    fn agents(&self) -> String {
        self.dir.path().join("agents.toml").display().to_string()
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn start(&self, extra: &[&str]) -> Meta {
        let (agents, data) = (self.agents(), self.data());
        let mut args = vec!["--agents", agents.as_str(), "--data-dir", data.as_str()];
        args.extend_from_slice(extra);
        Meta::start(&args)
    }
}

fn heartbeat(host: &str, agents: &[(&str, &str, &str)]) -> String {
    let agents: Vec<Value> =
        agents.iter().map(|(n, v, s)| json!({"name": n, "version": v, "status": s, "timestamp": 1_700_000_000})).collect();
    json!({"hostname": host, "ip": "10.1.2.3", "realAgents": agents}).to_string()
}

#[test]
fn seed_001_heartbeat_gets_the_go_reply_field_by_field() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let (status, reply) = post_json(&meta.url("/heartbeat"), SEED_001);
    assert_eq!(status, 200);
    assert_eq!(reply["errorMessage"], "");
    let desired = reply["desiredAgents"].as_array().unwrap();
    assert_eq!(desired.len(), 2);
    let expect = [
        json!({"name":"falcon-agent","version":"5.1.3","tarball":"http://files.example/releases/falcon",
               "md5":"490ac172dabecc867289079d48e84a66","cmd":"start","runUser":"falcon",
               "workDir":"/home/falcon/open-falcon","configFileName":"cfg.json",
               "configRemoteUrl":"http://files.example/falcon/conf/falcon-agent-cfg.json"}),
        json!({"name":"mysql-monitor","version":"0.0.5","tarball":"http://files.example/releases/falcon",
               "md5":"5f9ab5e81c386cde72c022d1b6d061d9","cmd":"start","runUser":"falcon",
               "workDir":"/home/falcon/open-falcon","configFileName":"cfg.json",
               "configRemoteUrl":"http://files.example/falcon/conf/mysql-monitor-cfg.json"}),
    ];
    for (got, want) in desired.iter().zip(&expect) {
        let (got, want) = (got.as_object().unwrap(), want.as_object().unwrap());
        assert_eq!(got.len(), want.len(), "no extra fields for the Go side: {got:?}");
        for (k, v) in want {
            assert_eq!(&got[k], v, "field {k}");
        }
    }
    // The host is stored as reported.
    let (status, host) = get_json(&meta.url("/status/host/liutian-01"));
    assert_eq!(status, 200);
    assert_eq!(host["ip"], "192.168.1.154");
    assert_eq!(host["runUser"], "admin");
    assert_eq!(host["updaterVersion"], "0.0.4");
    assert_eq!(host["agents"][0]["name"], "falcon-agent");
    assert_eq!(host["agents"][0]["timestamp"], 1477380651);
    assert_eq!(host["agents"][0]["state"], "ok");
    assert_eq!(host["agents"][1]["workDir"], "/home/falcon/open-falcon");
}

#[test]
fn exact_go_updater_request_bytes_are_answered() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let body = r#"{"hostname":"bj-web-001","realAgents":[]}"#;
    let request = format!(
        "POST /heartbeat HTTP/1.1\r\nHost: {}\r\nUser-Agent: beegoServer\r\nContent-Length: {}\r\nAccept-Encoding: gzip\r\n\r\n{body}",
        meta.addr,
        body.len()
    );
    let response = raw_http(meta.addr, request.as_bytes());
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let json_body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let reply: Value = serde_json::from_str(json_body).unwrap();
    assert_eq!(reply["desiredAgents"][0]["version"], "5.1.4", "bj-web- prefix override");
    let reply: ops_config::HeartbeatReply = serde_json::from_str(json_body).unwrap();
    assert_eq!(reply.desired_agents.len(), 2);
}

#[test]
fn prefix_override_gets_its_block_and_others_the_default() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let (_, web) = post_json(&meta.url("/heartbeat"), heartbeat("bj-web-007", &[]));
    assert_eq!(web["desiredAgents"][0]["version"], "5.1.4");
    assert_eq!(web["desiredAgents"][0]["md5"], "", "never the default's digest for another version");
    assert_eq!(web["desiredAgents"][1]["version"], "0.0.5", "mysql-monitor has no override");
    let (_, db) = post_json(&meta.url("/heartbeat"), heartbeat("bj-db-007", &[]));
    assert_eq!(db["desiredAgents"][0]["version"], "5.1.3");
    assert_eq!(db["desiredAgents"][0]["md5"], "490ac172dabecc867289079d48e84a66");
}

#[test]
fn reload_good_and_bad_config_keeps_the_old_one_on_error() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let (_, before) = get_json(&meta.url("/health"));
    let old_hash = before["configHash"].as_str().unwrap().to_owned();
    assert_eq!(old_hash, ops_config::content_hash(AGENTS.as_bytes()));

    // /config/desired serves the file with its hash as ETag, 304 when unchanged.
    let r = ops_e2e::get(&meta.url("/config/desired")).unwrap();
    assert_eq!(r.headers()["etag"], format!("\"{old_hash}\"").as_str());
    assert_eq!(r.text().unwrap(), AGENTS);
    let not_modified = reqwest::blocking::Client::new()
        .get(meta.url("/config/desired"))
        .header("If-None-Match", format!("\"{old_hash}\""))
        .send()
        .unwrap();
    assert_eq!(not_modified.status().as_u16(), 304);

    // A good new file: reload prints it, heartbeats get the new version at once.
    let good = AGENTS.replace("5.1.3", "5.2.0");
    std::fs::write(setup.agents(), &good).unwrap();
    let (status, reply) = get_json(&meta.url("/config/reload"));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["hash"], ops_config::content_hash(good.as_bytes()));
    assert_eq!(reply["previousHash"], old_hash);
    assert_eq!(reply["changed"], true);
    assert_eq!(reply["agents"][0]["default"]["version"], "5.2.0");
    let (_, hb) = post_json(&meta.url("/heartbeat"), heartbeat("sh-1", &[]));
    assert_eq!(hb["desiredAgents"][0]["version"], "5.2.0");

    // A bad file: 400 with file:line:col, and the good config stays.
    let bad = good.replace("cmd = \"start\" }", "cmd = \"restart\" }");
    std::fs::write(setup.agents(), &bad).unwrap();
    let (status, reply) = get_json(&meta.url("/config/reload"));
    assert_eq!(status, 400);
    let msg = reply["errorMessage"].as_str().unwrap();
    let expected = format!("{}:9:80: cmd must be \"start\" or \"stop\", got \"restart\"", setup.agents());
    assert!(msg.starts_with(&expected), "{msg}");
    assert!(msg.contains("kept"), "{msg}");
    let (_, hb) = post_json(&meta.url("/heartbeat"), heartbeat("sh-1", &[]));
    assert_eq!(hb["desiredAgents"][0]["version"], "5.2.0", "old config kept");
    assert_eq!(get_json(&meta.url("/health")).1["configHash"], ops_config::content_hash(good.as_bytes()));
    let (_, metrics) = get_text(&meta.url("/metrics"));
    assert!(metrics.contains("ops_meta_config_reloads_total{result=\"error\"} 1"), "{metrics}");
    assert!(metrics.contains("ops_meta_config_reloads_total{result=\"ok\"} 1"), "{metrics}");
}

#[test]
fn bad_inputs_get_a_4xx_json_error_and_lose_nothing() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    post_json(&meta.url("/heartbeat"), SEED_001);
    assert_eq!(meta.hosts_held(), 1);

    let too_big = format!(r#"{{"hostname":"big","ip":"{}","realAgents":[]}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("oversize", too_big, 413, "over the limit of 65536 bytes"),
        ("malformed", "{\"hostname\":".into(), 400, "malformed heartbeat"),
        ("not json", "hello".into(), 400, "malformed heartbeat"),
        ("no hostname", r#"{"realAgents":[]}"#.into(), 400, "missing field `hostname`"),
        ("bad hostname", r#"{"hostname":"../../etc"}"#.into(), 400, "bad hostname"),
        ("bad agent", r#"{"hostname":"h1","realAgents":[{"name":"../x","version":"1"}]}"#.into(), 400, "bad agent name"),
        ("bad version", r#"{"hostname":"h1","realAgents":[{"name":"a","version":".."}]}"#.into(), 400, "bad version"),
        ("wrong type", r#"{"hostname":42}"#.into(), 400, "malformed heartbeat"),
    ];
    for (what, body, status, needle) in cases {
        let (got, reply) = post_json(&meta.url("/heartbeat"), body);
        assert_eq!(got, status, "{what}: {reply}");
        let msg = reply["errorMessage"].as_str().unwrap_or_else(|| panic!("{what}: {reply}"));
        assert!(msg.contains(needle), "{what}: {msg}");
    }
    let many: Vec<Value> = (0..65).map(|i| json!({"name": format!("a{i}"), "version": "1"})).collect();
    let (got, reply) = post_json(&meta.url("/heartbeat"), json!({"hostname": "h1", "realAgents": many}).to_string());
    assert_eq!(got, 400);
    assert!(reply["errorMessage"].as_str().unwrap().contains("at most 64"));

    let (got, reply) = get_json(&meta.url("/status/json/..%2Fetc"));
    assert_eq!(got, 400, "{reply}");
    let (got, reply) = get_json(&meta.url("/status/json/falcon-agent?state=weird"));
    assert_eq!(got, 400, "{reply}");
    let (got, _) = get_json(&meta.url("/status/host/nobody"));
    assert_eq!(got, 404);
    let (got, reply) = get_json(&meta.url("/no/such/route"));
    assert_eq!((got, reply["errorMessage"].is_string()), (404, true));

    // Nothing was lost and the node still answers.
    assert_eq!(meta.hosts_held(), 1);
    assert_eq!(get_json(&meta.url("/status/host/liutian-01")).1["agents"][0]["version"], "5.1.3");
    let (_, metrics) = get_text(&meta.url("/metrics"));
    assert!(metrics.contains("ops_meta_heartbeats_total{result=\"too_large\"} 1"), "{metrics}");
    assert!(metrics.contains("ops_meta_heartbeats_total{result=\"bad_request\"} 8"), "{metrics}");
    assert!(metrics.contains("ops_meta_heartbeats_total{result=\"ok\"} 1"), "{metrics}");
}

#[test]
fn status_listings_summary_and_filters() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let n = 3000;
    for i in 0..n {
        let host = if i % 3 == 0 { format!("bj-web-{i:05}") } else { format!("sh-app-{i:05}") };
        // Every 10th host still runs an old version; every 50th reports an error.
        let version = if i % 10 == 0 {
            "5.1.2"
        } else if i % 3 == 0 {
            "5.1.4"
        } else {
            "5.1.3"
        };
        let mut hb: Value = serde_json::from_str(&heartbeat(&host, &[("falcon-agent", version, "started")])).unwrap();
        if i % 50 == 1 {
            hb["realAgents"][0]["lastError"] = json!("md5 mismatch");
        }
        let (status, _) = post_json(&meta.url("/heartbeat"), hb.to_string());
        assert_eq!(status, 200);
    }
    // Expected counts, computed the slow way.
    let old = (0..n).filter(|i| i % 10 == 0).count() as u64;
    let errors = (0..n).filter(|i| i % 50 == 1).count() as u64;
    let upgrading = (0..n).filter(|i| i % 10 == 0 && i % 50 != 1).count() as u64;
    let ok = n as u64 - errors - upgrading;

    let (status, list) = get_json(&meta.url("/status/json/falcon-agent"));
    assert_eq!(status, 200);
    let hosts = list["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), n);
    assert_eq!(list["count"], n);
    assert_eq!(list["partial"], false);
    let mut names: Vec<&str> = hosts.iter().map(|h| h["hostname"].as_str().unwrap()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "every host listed once");
    let web = hosts.iter().find(|h| h["hostname"] == "bj-web-00003").unwrap();
    assert_eq!(
        (web["version"].as_str(), web["desiredVersion"].as_str(), web["state"].as_str()),
        (Some("5.1.4"), Some("5.1.4"), Some("ok"))
    );
    assert_eq!(web["ip"], "10.1.2.3");

    let count = |q: &str| get_json(&meta.url(&format!("/status/json/falcon-agent?{q}"))).1["count"].as_u64().unwrap();
    assert_eq!(count("version=5.1.2"), old);
    assert_eq!(count("state=error"), errors);
    assert_eq!(count("state=upgrading"), upgrading);
    assert_eq!(count("state=ok"), ok);
    assert_eq!(count("prefix=bj-web-"), (0..n).filter(|i| i % 3 == 0).count() as u64);
    assert_eq!(count("prefix=bj-web-&version=5.1.2"), (0..n).filter(|i| i % 3 == 0 && i % 10 == 0).count() as u64);
    assert_eq!(count("status=started"), n as u64);
    assert_eq!(count("status=stopped"), 0);

    // mysql-monitor is desired everywhere but reported nowhere: all upgrading, absent.
    let (_, mm) = get_json(&meta.url("/status/summary/mysql-monitor"));
    assert_eq!(mm["hosts"], n);
    assert_eq!(mm["byState"]["upgrading"], n);
    assert_eq!(mm["groups"][0]["status"], "absent");

    let (status, text) = get_text(&meta.url("/status/text/falcon-agent?state=error"));
    assert_eq!(status, 200);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("#hostname\t"));
    assert_eq!(lines.len() as u64, errors + 1);
    assert!(lines[1..].iter().all(|l| l.split('\t').nth(5) == Some("error") && l.ends_with("md5 mismatch")), "{text}");

    let (status, s) = get_json(&meta.url("/status/summary/falcon-agent"));
    assert_eq!(status, 200);
    assert_eq!(s["hosts"], n);
    assert_eq!(s["converged"], ok);
    assert_eq!(s["byState"]["error"], errors);
    assert_eq!(s["byState"]["upgrading"], upgrading);
    assert_eq!(s["byState"]["stale"], 0);
    let desired: Vec<(String, u64)> = s["desired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["version"].as_str().unwrap().to_owned(), d["hosts"].as_u64().unwrap()))
        .collect();
    assert_eq!(desired, vec![("5.1.3".to_owned(), 2000), ("5.1.4".to_owned(), 1000)]);
    let group_total: u64 = s["groups"].as_array().unwrap().iter().map(|g| g["hosts"].as_u64().unwrap()).sum();
    assert_eq!(group_total, n as u64);
    let ratio = s["convergedRatio"].as_f64().unwrap();
    assert!((ratio - ok as f64 / n as f64).abs() < 1e-9);
}

#[test]
fn host_goes_stale_when_it_stops_reporting() {
    let setup = Setup::new();
    let meta = setup.start(&["--stale-after-seconds", "1", "--sweep-interval-seconds", "1"]);
    post_json(&meta.url("/heartbeat"), heartbeat("quiet-1", &[("falcon-agent", "5.1.3", "started")]));
    assert_eq!(get_json(&meta.url("/status/host/quiet-1")).1["agents"][0]["state"], "ok");
    let stale = eventually(Duration::from_secs(10), || {
        let (_, s) = get_json(&meta.url("/status/summary/falcon-agent"));
        (s["byState"]["stale"] == 1).then_some(s)
    });
    assert!(stale.is_some(), "host never went stale");
    let (_, host) = get_json(&meta.url("/status/host/quiet-1"));
    assert_eq!((host["stale"].as_bool(), host["agents"][0]["state"].as_str()), (Some(true), Some("stale")));
    assert_eq!(get_json(&meta.url("/status/json/falcon-agent?state=stale")).1["count"], 1);
    // A stale host is still listed (kept until forget_after), and a new report revives it.
    post_json(&meta.url("/heartbeat"), heartbeat("quiet-1", &[("falcon-agent", "5.1.3", "started")]));
    assert_eq!(get_json(&meta.url("/status/host/quiet-1")).1["agents"][0]["state"], "ok");
}

/// A batch can carry any report time. One from the future is stored at the node's clock plus
/// the skew allowed (counted): the host still goes stale, and its next real report is taken.
#[test]
fn a_report_time_in_the_future_is_clamped_to_the_clock_plus_skew() {
    let setup = Setup::new();
    let meta = setup.start(&["--max-clock-skew-seconds", "2", "--stale-after-seconds", "1", "--sweep-interval-seconds", "1"]);
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let future = json!({"hosts": [{"seen": u32::MAX - 1, "hb": {"hostname": "future-1", "ip": "6.6.6.6", "realAgents": []}}]});
    let before = now();
    let (status, r) = post_json(&meta.url("/internal/batch"), future.to_string());
    assert_eq!((status, r["stored"].as_u64()), (200, Some(1)), "{r}");
    let (_, host) = get_json(&meta.url("/status/host/future-1"));
    let seen = host["lastSeen"].as_u64().unwrap();
    assert!(seen >= before && seen <= now() + 2, "stored at the clock plus 2 s, not {seen}: {host}");
    let (_, metrics) = get_text(&meta.url("/metrics"));
    assert!(metrics.contains("ops_meta_reports_clamped_total 1"), "counted:\n{metrics}");
    let stale = eventually(Duration::from_secs(15), || {
        let (_, h) = get_json(&meta.url("/status/host/future-1"));
        (h["stale"] == true).then_some(())
    });
    assert!(stale.is_some(), "the host goes stale once the clamped time is past");
    // Its real report is newer than the clamped one and replaces it.
    let (status, _) = post_json(&meta.url("/heartbeat"), heartbeat("future-1", &[]));
    assert_eq!(status, 200);
    let (_, host) = get_json(&meta.url("/status/host/future-1"));
    assert_eq!((host["ip"].as_str(), host["stale"].as_bool()), (Some("10.1.2.3"), Some(false)), "{host}");
}

/// A heartbeat of `host` with `agents` agents, each with a distinct `workDir` of `len` bytes
/// made unique by `tag`.
fn unique_dirs(host: &str, tag: usize, agents: usize, len: usize) -> String {
    let agents: Vec<Value> = (0..agents)
        .map(|a| {
            let prefix = format!("/d/{host}/{tag}/{a}/");
            let dir = format!("{prefix}{}", "x".repeat(len.saturating_sub(prefix.len())));
            let name = if a == 0 { "falcon-agent".to_owned() } else { format!("agent-{a}") };
            json!({"name": name, "version": "1.0", "status": "started", "workDir": dir})
        })
        .collect();
    json!({"hostname": host, "ip": "10.1.2.3", "realAgents": agents}).to_string()
}

/// A unique-string flood (every report new 4 KB `workDir`s) stays under the interner's cap:
/// the reports past it are refused with a clear error and counted, the strings no host uses
/// any more are freed at the next sweep, and once the flood's hosts are forgotten their
/// strings go too and the snapshot shrinks.
#[test]
fn unique_string_floods_stay_under_the_cap_and_are_freed_once_their_hosts_go() {
    let setup = Setup::new();
    let meta = setup.start(&[
        "--max-interned-strings",
        "1000",
        "--stale-after-seconds",
        "1",
        "--forget-after-seconds",
        "4",
        "--sweep-interval-seconds",
        "1",
        "--snapshot-interval-seconds",
        "1",
    ]);
    let base = meta.url("");
    let base = base.trim_end_matches('/');
    let interned = || ops_e2e::metric_at(base, "ops_meta_interned_strings");
    post_json(&meta.url("/heartbeat"), heartbeat("warm-up", &[("falcon-agent", "5.1.3", "started")]));
    let rss_before = meta.proc.rss_bytes();
    assert!(rss_before > 0);

    // One host, 15 new 4 KB strings a report: 1,000 reports would intern 60 MB.
    let (mut ok, mut refused, mut most) = (0, 0, 0.0f64);
    for i in 0..1000 {
        let (status, reply) = post_json(&meta.url("/heartbeat"), unique_dirs("flood-1", i, 15, 4000));
        match status {
            200 => ok += 1,
            503 => {
                refused += 1;
                let msg = reply["errorMessage"].as_str().unwrap_or_default();
                assert!(msg.contains("--max-interned-strings 1000") && msg.contains("refused"), "clear error: {reply}");
            }
            other => panic!("status {other}: {reply}"),
        }
        if i % 50 == 0 {
            most = most.max(interned());
        }
    }
    most = most.max(interned());
    assert!(most <= 1000.0, "interned strings passed the cap: {most}");
    assert!(refused > 0 && ok > 0, "some refused at the cap, some taken after a sweep freed strings: {ok} ok, {refused} refused");
    assert_eq!(ops_e2e::metric_at(base, "ops_meta_reports_refused_total"), f64::from(refused));
    let grown = meta.proc.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 30 << 20, "RSS grew {grown} bytes under a cap of 1,000 strings of 4 KB");
    // Once a sweep has freed the unused ones, the host's next report goes in.
    let taken = eventually(Duration::from_secs(15), || {
        (post_json(&meta.url("/heartbeat"), unique_dirs("flood-1", 5000, 15, 4000)).0 == 200).then_some(())
    });
    assert!(taken.is_some(), "the host's report is taken again once unused strings are freed");
    let (_, host) = get_json(&meta.url("/status/host/flood-1"));
    assert!(host["agents"][0]["workDir"].as_str().unwrap().starts_with("/d/flood-1/5000/0/"), "{host}");

    // Many hosts, each with its own strings, then silent: forgotten, their strings freed.
    for h in 0..50 {
        let (status, reply) = post_json(&meta.url("/heartbeat"), unique_dirs(&format!("many-{h}"), 0, 3, 2000));
        assert_eq!(status, 200, "{reply}");
    }
    let snap = Path::new(&setup.data()).join("state.snap");
    let size = || std::fs::metadata(&snap).map_or(0, |m| m.len());
    let big = eventually(Duration::from_secs(10), || (size() > 300_000).then(size)).expect("a snapshot with the hosts' strings");
    let freed = eventually(Duration::from_secs(30), || (meta.hosts_held() == 0 && interned() < 20.0).then(interned));
    assert!(freed.is_some(), "hosts forgotten and their strings freed: {} hosts, {} strings", meta.hosts_held(), interned());
    assert!(ops_e2e::metric_at(base, "ops_meta_interned_strings_freed_total") > 1000.0);
    let small = eventually(Duration::from_secs(10), || (size() < big / 10).then(size));
    assert!(small.is_some(), "the snapshot shrinks once the strings are freed: {} bytes, was {big}", size());
}

#[test]
fn forgotten_hosts_are_dropped() {
    let setup = Setup::new();
    let meta = setup.start(&["--stale-after-seconds", "1", "--forget-after-seconds", "2", "--sweep-interval-seconds", "1"]);
    post_json(&meta.url("/heartbeat"), heartbeat("gone-1", &[]));
    assert_eq!(meta.hosts_held(), 1);
    let gone = eventually(Duration::from_secs(15), || (meta.hosts_held() == 0).then_some(()));
    assert!(gone.is_some(), "host never forgotten");
    assert_eq!(get_json(&meta.url("/status/host/gone-1")).0, 404);
}

#[test]
fn restart_keeps_hosts_from_the_snapshot() {
    let setup = Setup::new();
    let mut meta = setup.start(&[]);
    for i in 0..500 {
        post_json(&meta.url("/heartbeat"), heartbeat(&format!("keep-{i}"), &[("falcon-agent", "5.1.3", "started")]));
    }
    let mut err: Value = serde_json::from_str(&heartbeat("keep-err", &[("falcon-agent", "5.1.2", "stopped")])).unwrap();
    err["realAgents"][0]["lastError"] = json!("control start timed out after 30s");
    post_json(&meta.url("/heartbeat"), err.to_string());
    let before = get_json(&meta.url("/status/summary/falcon-agent")).1;

    // SIGTERM: drains and writes a snapshot on the way out.
    meta.proc.signal("TERM");
    let status = meta.proc.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", meta.proc.log());
    assert!(Path::new(&setup.data()).join("state.snap").exists());

    let again = setup.start(&[]);
    assert_eq!(again.hosts_held(), 501);
    let after = get_json(&again.url("/status/summary/falcon-agent")).1;
    assert_eq!(after, before);
    let (_, host) = get_json(&again.url("/status/host/keep-err"));
    assert_eq!(host["agents"][0]["lastError"], "control start timed out after 30s");
    assert_eq!(host["agents"][0]["state"], "error");
    assert_eq!(host["ip"], "10.1.2.3");
}

#[test]
fn periodic_snapshot_survives_sigkill() {
    let setup = Setup::new();
    let mut meta = setup.start(&["--snapshot-interval-seconds", "1"]);
    for i in 0..100 {
        post_json(&meta.url("/heartbeat"), heartbeat(&format!("crash-{i}"), &[]));
    }
    let snap = Path::new(&setup.data()).join("state.snap");
    // Wait for a snapshot written after the last heartbeat (a second apart: mtimes of some
    // file systems are in whole seconds).
    let after = std::time::SystemTime::now() + Duration::from_secs(1);
    let written =
        eventually(Duration::from_secs(20), || std::fs::metadata(&snap).and_then(|m| m.modified()).ok().filter(|t| *t >= after).map(drop));
    assert!(written.is_some(), "a snapshot after the last heartbeat: {}", meta.proc.log());
    meta.proc.signal("KILL");
    meta.proc.wait_exit(Duration::from_secs(10));
    let again = setup.start(&[]);
    assert_eq!(again.hosts_held(), 100);
}

#[test]
fn damaged_snapshot_is_moved_aside_and_the_node_starts_empty() {
    let setup = Setup::new();
    std::fs::create_dir_all(setup.data()).unwrap();
    std::fs::write(Path::new(&setup.data()).join("state.snap"), b"OPSSNAP1 but then garbage").unwrap();
    let mut meta = setup.start(&[]);
    assert_eq!(meta.hosts_held(), 0);
    meta.proc.wait_for_log("snapshot unreadable");
    let kept: Vec<String> = std::fs::read_dir(setup.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.snap.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file is kept for a person to look at");
}

#[test]
fn bad_config_at_start_exits_64_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agents.toml");
    std::fs::write(&path, AGENTS.replace("/home/falcon/open-falcon", "home/falcon")).unwrap();
    let p = path.display().to_string();
    let (status, log) = Proc::run_to_exit("meta-node", &["--listen", "127.0.0.1:0", "--agents", &p]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains(&format!("{p}:6:12: work_dir must be an absolute path without ..")), "{log}");
    assert!(!log.contains("listening"), "never bound a port: {log}");

    let (status, log) = Proc::run_to_exit("meta-node", &["--listen", "127.0.0.1:0", "--agents", "/nonexistent/agents.toml"]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("/nonexistent/agents.toml: No such file"), "{log}");
}

#[test]
fn metrics_and_health_describe_the_node() {
    let setup = Setup::new();
    let meta = setup.start(&["--id", "meta-7"]);
    post_json(&meta.url("/heartbeat"), SEED_001);
    let (_, health) = get_json(&meta.url("/health"));
    assert_eq!(health["id"], "meta-7");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["hosts"], 1);
    assert!(health["uptimeSeconds"].is_u64());
    let (status, metrics) = get_text(&meta.url("/metrics"));
    assert_eq!(status, 200);
    for needle in [
        "ops_meta_heartbeats_total{result=\"ok\"} 1",
        "ops_meta_hosts 1",
        "ops_meta_heartbeat_duration_seconds_bucket",
        &format!("ops_meta_config_info{{hash=\"{}\"}} 1", ops_config::content_hash(AGENTS.as_bytes())),
        "# HELP ops_meta_heartbeats_total",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in:\n{metrics}");
    }
    assert!(!metrics.contains("liutian-01"), "never a hostname as a label");
}

/// A 2 MiB heartbeat always gets its 413, never a broken pipe: the server reads (and throws
/// away) the body before it answers, as nginx's lingering close does.
#[test]
fn an_oversize_heartbeat_always_gets_its_413() {
    use std::io::{Read, Write};
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let body = format!(r#"{{"hostname":"big","ip":"{}","realAgents":[]}}"#, "x".repeat(2 << 20));
    for attempt in 0..8 {
        let mut s = std::net::TcpStream::connect(meta.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!("POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap_or_else(|e| panic!("attempt {attempt}: the server closed before reading the body: {e}"));
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&reply).contains("over the limit") {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) => panic!("attempt {attempt}: {e} after {:?}", String::from_utf8_lossy(&reply)),
            }
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 413"), "attempt {attempt}: {reply}");
    }
    let (_, metrics) = get_text(&meta.url("/metrics"));
    assert!(metrics.contains("ops_meta_heartbeats_total{result=\"too_large\"} 8"), "{metrics}");
}

#[test]
fn a_standalone_apply_of_a_bad_file_is_refused_and_changes_nothing() {
    let setup = Setup::new();
    let meta = setup.start(&[]);
    let hash = ops_config::content_hash(AGENTS.as_bytes());
    let apply = |body: &str, expect: &str| post_json(&meta.url(&format!("/config/apply?expect={expect}")), body.to_owned());
    let (status, reply) = apply("[[agent]]\nname = \n", &hash);
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["changed"], false, "{reply}");
    assert!(reply["errorMessage"].as_str().unwrap().contains("nothing changed"), "{reply}");
    assert_eq!(std::fs::read_to_string(setup.agents()).unwrap(), AGENTS, "the file on disk is untouched");
    assert_eq!(get_json(&meta.url("/health")).1["configHash"], hash.as_str(), "the served config is untouched");
    let good = AGENTS.replace("5.1.3", "5.2.0");
    let (status, reply) = apply(&good, &hash);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["changed"], true, "{reply}");
    assert_eq!(reply["generation"], 1, "{reply}");
    assert_eq!(std::fs::read_to_string(setup.agents()).unwrap(), good);
}

/// `agents.toml` and its signature are written as one pair: a meta node killed (it aborts, at
/// the fault point) after writing the new signature and before the new text starts again on
/// the new pair, where a text beside another's signature would keep it from starting.
#[test]
fn a_crash_between_the_signature_and_the_file_never_keeps_a_node_from_starting() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    let key = dir.join("operator.key").display().to_string();
    assert_eq!(ops_e2e::opsctl(&["keygen", "--out", &key]).0, 0);
    let agents = setup.agents();
    let (code, out, err) = ops_e2e::opsctl(&["sign", "--key", &key, &agents]);
    assert_eq!(code, 0, "{out}{err}");
    let v1 = std::fs::read_to_string(&agents).unwrap();
    let sig_path = ops_config::trust::signature_path(Path::new(&agents));
    let v1_sig = std::fs::read_to_string(&sig_path).unwrap();
    // The next version, signed beside the served one.
    let next = dir.join("next.toml");
    std::fs::write(&next, v1.replace("5.1.3", "5.2.0")).unwrap();
    let (code, out, err) = ops_e2e::opsctl(&["sign", "--key", &key, &next.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let v2 = std::fs::read_to_string(&next).unwrap();
    let v2_sig = ops_config::trust::signature_header(&std::fs::read_to_string(ops_config::trust::signature_path(&next)).unwrap());

    let trust = format!("--trusted-keys-file={key}.pub");
    let data = setup.data();
    let args = ["--listen", "127.0.0.1:0", "--agents", agents.as_str(), "--data-dir", data.as_str(), trust.as_str()];
    let crash = [(ops_config::disk::CRASH_BETWEEN_PAIR_WRITES, "1")];
    let mut meta = Proc::start_path_env(&ops_e2e::binary("meta-node"), &args, &crash);
    let addr = ops_e2e::addr_in(&meta.wait_for_log("meta node listening"));
    let url = format!("http://{addr}/config/apply?expect={}", ops_config::content_hash(v1.as_bytes()));
    let sent = reqwest::blocking::Client::new()
        .post(url)
        .header(ops_config::trust::SIGNATURE_HEADER, &v2_sig)
        .body(v2.clone())
        .timeout(Duration::from_secs(20))
        .send();
    assert!(sent.is_err(), "the node died in the apply: {sent:?}");
    let status = meta.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "aborted: {status}");
    // What the crash left: the old text beside the new signature, and the pair's journal.
    assert_eq!(std::fs::read_to_string(&agents).unwrap(), v1);
    assert_ne!(std::fs::read_to_string(&sig_path).unwrap(), v1_sig, "the new signature was written");
    assert!(ops_config::disk::pair_journal(Path::new(&agents)).exists());

    let again = Meta::start(&args[2..]);
    let health = get_json(&again.url("/health")).1;
    assert_eq!(health["configHash"], ops_config::content_hash(v2.as_bytes()).as_str(), "serving the new pair: {health}");
    assert_eq!(std::fs::read_to_string(&agents).unwrap(), v2);
    assert!(!ops_config::disk::pair_journal(Path::new(&agents)).exists(), "the journal is gone once the pair is whole");
    let (code, out, err) = ops_e2e::opsctl(&["verify", "--trusted-keys-file", &format!("{key}.pub"), &agents]);
    assert_eq!(code, 0, "the pair on disk verifies: {out}{err}");
}

#[test]
fn without_trusted_keys_a_node_off_loopback_needs_lab() {
    let setup = Setup::new();
    let (agents, data) = (setup.agents(), setup.data());
    let (status, log) = Proc::run_to_exit("meta-node", &["--listen", "0.0.0.0:0", "--agents", &agents, "--data-dir", &data]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("is not loopback and no trusted key is given") && log.contains("--lab"), "the refusal names the flag: {log}");
    assert!(!log.contains("meta node listening"), "{log}");
    // A cluster map with a node off loopback is refused the same way.
    let cluster = setup.dir.path().join("cluster.toml");
    std::fs::write(&cluster, "[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:1\"\n[[node]]\nid = \"meta-2\"\naddr = \"10.9.9.9:2000\"\n")
        .unwrap();
    let c = cluster.display().to_string();
    let (status, log) = Proc::run_to_exit(
        "meta-node",
        &["--listen", "127.0.0.1:0", "--cluster", &c, "--id", "meta-1", "--agents", &agents, "--data-dir", &data],
    );
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("meta-2 at 10.9.9.9:2000 is not loopback"), "{log}");
    // The flag itself is taken (a lab on loopback here: the tests never bind other addresses).
    let meta = setup.start(&["--lab"]);
    assert_eq!(get_json(&meta.url("/health")).0, 200);
}
