//! End-to-end tests of the sharded cluster: real meta nodes and relays on loopback.
//!
//! One file per suite, though it is long: cargo links a test binary per file under `tests/`,
//! and every link of the workspace adds to each CI run's build; the tests in it share nothing
//! but the fixtures of `ops_e2e`, and each starts its own processes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ops_e2e::cluster::{Cluster, TOKEN, chromium, figure_after};
use ops_e2e::{AGENTS, Meta, Relay, eventually, get, get_json, get_json_auth, opsctl, post_json, post_json_auth};
use serde_json::{Value, json};

fn hostnames(n: usize) -> Vec<String> {
    (0..n).map(|i| if i % 4 == 0 { format!("bj-web-{i:05}") } else { format!("sh-app-{i:05}") }).collect()
}

/// Sends one heartbeat per host through the relays in turn and checks every reply.
fn sweep(c: &Cluster, hosts: &[String], version: &str) {
    for (i, h) in hosts.iter().enumerate() {
        let relay = &c.relays[i % c.relays.len()];
        let body = json!({"hostname": h, "ip": "10.0.0.1", "realAgents": [
            {"name": "falcon-agent", "version": version, "status": "started", "timestamp": 1}]});
        let (status, reply) = post_json(&relay.url("/heartbeat"), body.to_string());
        assert_eq!(status, 200, "{h}: {reply}");
        let want = if h.starts_with("bj-web-") { "5.1.4" } else { "5.1.3" };
        assert_eq!(reply["desiredAgents"][0]["version"], want, "{h}");
        assert_eq!(reply["desiredAgents"][1]["name"], "mysql-monitor");
    }
}

/// `metas` meta nodes and a relay, holding `n` hosts (one sweep at 5.1.3), every one listed once.
fn holding(metas: usize, n: usize) -> (Cluster, Vec<String>) {
    holding_with(metas, n, &[])
}

/// [`holding`] with extra meta-node flags.
fn holding_with(metas: usize, n: usize, args: &[&str]) -> (Cluster, Vec<String>) {
    let c = Cluster::up_with(metas, 1, AGENTS, args);
    let hosts = hostnames(n);
    sweep(&c, &hosts, "5.1.3");
    eventually(Duration::from_secs(20), || listed_once(c.meta(0), &hosts).ok()).expect("every host held");
    (c, hosts)
}

fn listed_once(m: &Meta, hosts: &[String]) -> Result<(), String> {
    let r = get(&m.url("/status/text/falcon-agent")).map_err(|e| e.to_string())?;
    let partial = r.headers().get("x-ops-partial").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = r.text().map_err(|e| e.to_string())?;
    let mut names: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split('\t').next().unwrap()).collect();
    names.sort();
    let mut want: Vec<&str> = hosts.iter().map(String::as_str).collect();
    want.sort();
    if partial.as_deref() != Some("false") {
        return Err(format!("partial: {partial:?}"));
    }
    if names != want {
        return Err(format!("listed {} hosts, want {}", names.len(), want.len()));
    }
    Ok(())
}

fn summary_without_partial(m: &Meta) -> Value {
    get_json(&m.url("/status/summary/falcon-agent")).1
}

#[test]
fn relays_shard_hosts_by_ring_and_every_node_answers_the_same() {
    let c = Cluster::up(3, 2, AGENTS);
    let hosts = hostnames(3000);
    sweep(&c, &hosts, "5.1.3");
    // A few heartbeats straight to meta-1, for hosts it mostly does not own: forwarded.
    let direct: Vec<String> = (0..30).map(|i| format!("direct-{i}")).collect();
    for h in &direct {
        let (status, reply) = post_json(&c.meta(0).url("/heartbeat"), json!({"hostname": h, "realAgents": []}).to_string());
        assert_eq!((status, reply["desiredAgents"][0]["version"].as_str()), (200, Some("5.1.3")));
    }
    let all: Vec<String> = hosts.iter().chain(&direct).cloned().collect();
    let want = c.ring_counts(&all);
    let got = eventually(Duration::from_secs(20), || {
        let got: Vec<u64> = c.running().map(Meta::hosts_held).collect();
        (got == want).then_some(got)
    });
    assert_eq!(got, Some(want.clone()), "each node holds exactly the hosts the ring gives it");
    assert!(want.iter().all(|&n| n > 500), "the ring spreads hosts: {want:?}");

    let summaries: Vec<Value> = c.running().map(summary_without_partial).collect();
    assert_eq!(
        summaries[0]["hosts"],
        all.len(),
        "{:#?}\n{}",
        summaries[0],
        c.running().map(|m| m.proc.log()).collect::<Vec<_>>().join("\n----\n")
    );
    assert_eq!(summaries[0]["partial"], false);
    assert!(summaries.iter().all(|s| *s == summaries[0]), "{summaries:#?}");
    for m in c.running() {
        listed_once(m, &all).unwrap();
        let (_, list) = get_json(&m.url("/status/json/falcon-agent?prefix=bj-web-"));
        assert_eq!(list["count"], hosts.iter().filter(|h| h.starts_with("bj-web-")).count());
        assert_eq!(list["partial"], false);
        assert!(list["hosts"].as_array().unwrap().iter().all(|h| h["desiredVersion"] == "5.1.4"));
        let (status, host) = get_json(&m.url("/status/host/sh-app-00001"));
        assert_eq!((status, host["agents"][0]["version"].as_str()), (200, Some("5.1.3")));
    }
    let (_, metrics) = ops_e2e::get_text(&c.relays[0].url("/metrics"));
    assert!(metrics.contains("ops_relay_batches_total{node=\"meta-1\",result=\"ok\"}"), "{metrics}");
    assert!(metrics.contains("ops_relay_heartbeats_total{result=\"ok\"} 1500"), "{metrics}");
}

/// 3 metas and 2 relays holding `n` hosts at 5.1.3, each node exactly its ring share; then
/// meta `dead` (from 0), after writing a snapshot of its hosts, is SIGKILLed. Returns the
/// cluster, the hosts and each node's share.
fn cluster_with_a_dead_node(n: usize, dead: usize) -> (Cluster, Vec<String>, Vec<u64>) {
    let mut c = Cluster::up(3, 2, AGENTS);
    let hosts = hostnames(n);
    sweep(&c, &hosts, "5.1.3");
    let want = c.ring_counts(&hosts);
    assert!(
        eventually(Duration::from_secs(20), || (c.running().map(Meta::hosts_held).collect::<Vec<_>>() == want).then_some(())).is_some()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut m = c.metas[dead].take().unwrap();
    m.proc.signal("KILL");
    m.proc.wait_exit(Duration::from_secs(10));
    // A survivor counts the dead node down only at its prober's second failure in a row (or
    // when a gather finds it gone); until then its gathers still ask the dead node and leave
    // out the copies the others hold for it, partial but short. Wait until every survivor
    // knows, as an operator's first look would come later than that.
    let id = format!("meta-{}", dead + 1);
    for m in c.running() {
        let knows = eventually(Duration::from_secs(20), || {
            let nodes = get_json(&m.url("/health")).1["nodes"].clone();
            nodes.as_array().is_some_and(|n| n.iter().any(|n| n["id"] == id.as_str() && n["up"] == false)).then_some(())
        });
        assert!(knows.is_some(), "{} never counted {id} down", m.addr);
    }
    (c, hosts, want)
}

#[test]
fn killed_meta_node_fails_over_and_takes_its_hosts_back() {
    let (mut c, hosts, _) = cluster_with_a_dead_node(900, 1);

    // No updater sees an error while meta-2 is down.
    sweep(&c, &hosts, "5.1.4");
    let s = summary_without_partial(c.meta(0));
    assert_eq!(s["partial"], true);
    assert_eq!(s["missingNodes"], json!(["meta-2"]));
    // After the next flush every host is listed again, meta-2's from their failover copies.
    let listed = eventually(Duration::from_secs(20), || {
        let (_, list) = get_json(&c.meta(0).url("/status/json/falcon-agent?version=5.1.4"));
        (list["count"] == hosts.len()).then_some(list)
    });
    let list = listed.expect("every host listed via failover");
    assert_eq!(list["partial"], true);
    assert_eq!(list["missingNodes"], json!(["meta-2"]));
    let (_, metrics) = ops_e2e::get_text(&c.relays[0].url("/metrics"));
    let failed_over: f64 = ops_config::prom::series(&metrics, "ops_relay_failover_hosts_total").unwrap_or(0.0);
    assert!(failed_over > 0.0, "meta-2's hosts went to their next candidate: {metrics}");
    assert!(metrics.contains("ops_relay_node_up{node=\"meta-2\"} 0"), "{metrics}");
    let r = get(&c.meta(2).url("/status/text/falcon-agent")).unwrap();
    assert_eq!(r.headers()["x-ops-partial"], "true");
    assert_eq!(r.headers()["x-ops-missing-nodes"], "meta-2");

    // Reports are stamped in whole seconds, and two copies of one host with the same stamp
    // are a tie that the first to arrive wins (an updater reports every few minutes, so only
    // a test sweeps twice in a second): the 5.1.5 sweep below starts in a later second than
    // the 5.1.4 one. (The CI saw 48 hosts keep 5.1.4 when both had the same stamp, one copy
    // at meta-1 and one at meta-3.)
    std::thread::sleep(Duration::from_millis(1100));
    // meta-2 comes back with its snapshot; relays send its hosts home.
    c.start_meta(1);
    let back = eventually(Duration::from_secs(30), || {
        sweep(&c, &hosts[..30], "5.1.5");
        let nodes = get_json(&c.relays[0].url("/health")).1["nodes"].clone();
        nodes.as_array().unwrap().iter().all(|n| n["up"] == true).then_some(())
    });
    assert!(back.is_some(), "relays never saw meta-2 back");
    sweep(&c, &hosts, "5.1.5");
    let all_home = eventually(Duration::from_secs(20), || {
        let (_, s) = get_json(&c.meta(1).url("/status/summary/falcon-agent"));
        let v: BTreeMap<String, u64> = s["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["version"].as_str().unwrap().to_owned(), g["hosts"].as_u64().unwrap()))
            .collect();
        // Every node's probe sees meta-2 again within a probe period (1 s) of its return;
        // until then that node's answers are partial, as they should be.
        let whole_everywhere = c.running().all(|m| summary_without_partial(m)["partial"] == false);
        (s["partial"] == false && whole_everywhere && v.get("5.1.5") == Some(&(hosts.len() as u64))).then_some(())
    });
    assert!(
        all_home.is_some(),
        "every host reports 5.1.5 through the cluster: {:?} {}",
        c.running().map(|m| (summary_without_partial(m), metric(m, "ops_meta_failover_copies"))).collect::<Vec<_>>(),
        c.running().map(|m| m.proc.log()).collect::<Vec<_>>().join("\n----\n")
    );
    // Failover copies never show twice, from any node; summaries agree.
    for m in c.running() {
        listed_once(m, &hosts).unwrap();
    }
    let summaries: Vec<Value> = c.running().map(summary_without_partial).collect();
    assert!(summaries.iter().all(|s| *s == summaries[0] && s["hosts"] == hosts.len()), "{summaries:#?}");
    // The owner holds its hosts again, newest report included.
    let owned = c.ring_counts(&hosts)[1];
    assert!(c.meta(1).hosts_held() >= owned);
}

/// Versions of `falcon-agent` in a summary, by version.
fn versions(s: &Value) -> BTreeMap<String, u64> {
    let mut v = BTreeMap::new();
    for g in s["groups"].as_array().unwrap() {
        *v.entry(g["version"].as_str().unwrap().to_owned()).or_default() += g["hosts"].as_u64().unwrap();
    }
    v
}

fn metric(m: &Meta, name: &str) -> f64 {
    let (_, text) = ops_e2e::get_text(&m.url("/metrics"));
    ops_config::prom::series(&text, name).unwrap_or(0.0)
}

/// Hinted hand-off: the reports a dead node's hosts sent while it was down reach it once it is
/// back, with no new heartbeat, and the holders drop their copies; status counts every host
/// once throughout (from the copies while the owner is down, from the owner after).
#[test]
fn failover_copies_go_home_without_a_new_report_and_no_host_is_counted_twice() {
    let (mut c, hosts, want) = cluster_with_a_dead_node(3000, 2);

    sweep(&c, &hosts, "5.1.4");
    let during = eventually(Duration::from_secs(20), || {
        let s = summary_without_partial(c.meta(0));
        (versions(&s).get("5.1.4") == Some(&(hosts.len() as u64))).then_some(s)
    })
    .expect("every host counted at 5.1.4 while meta-3 is down, its own from the copies");
    assert_eq!((during["hosts"].as_u64(), &during["partial"]), (Some(hosts.len() as u64), &json!(true)), "{during}");
    assert_eq!(during["missingNodes"], json!(["meta-3"]));
    for m in c.running() {
        let (_, list) = get_json(&m.url("/status/json/falcon-agent"));
        let mut names: Vec<&str> = list["hosts"].as_array().unwrap().iter().map(|h| h["hostname"].as_str().unwrap()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            (names.len(), list["count"].as_u64()),
            (hosts.len(), Some(hosts.len() as u64)),
            "each host once, partial, from {}: {} {}",
            m.addr,
            get_json(&m.url("/health")).1,
            summary_without_partial(m)
        );
        assert_eq!(list["partial"], true);
    }
    let copies = eventually(Duration::from_secs(10), || {
        let n: f64 = c.running().map(|m| metric(m, "ops_meta_failover_copies")).sum();
        (n as u64 == want[2]).then_some(n)
    });
    assert!(copies.is_some(), "the survivors hold meta-3's {} hosts as copies", want[2]);

    // meta-3 comes back with its old snapshot. No heartbeat is sent from here on.
    c.start_meta(2);
    let home = eventually(Duration::from_secs(20), || {
        let s = summary_without_partial(c.meta(2));
        (s["partial"] == false && versions(&s) == BTreeMap::from([("5.1.4".to_owned(), hosts.len() as u64)])).then_some(())
    });
    assert!(home.is_some(), "the copies' newer reports reached meta-3: {}", summary_without_partial(c.meta(2)));
    let settled = eventually(Duration::from_secs(10), || (c.running().map(Meta::hosts_held).collect::<Vec<_>>() == want).then_some(()));
    assert!(
        settled.is_some(),
        "each node holds its own hosts and nothing else: {:?}",
        c.running().map(Meta::hosts_held).collect::<Vec<_>>()
    );
    let handed: f64 = c.running().map(|m| metric(m, "ops_meta_handoff_hosts_total{node=\"meta-3\"}")).sum();
    assert_eq!(handed as u64, want[2], "every copy was handed back once");
    for m in c.running() {
        listed_once(m, &hosts).unwrap();
        assert_eq!(summary_without_partial(m)["hosts"], hosts.len());
    }
}

/// The harness's ports: a port of the map taken by another program before the cluster starts
/// (what bind-and-close picks made likely, and reserved ports make rare) moves the cluster to
/// new ports once instead of failing, and no port is handed out twice.
#[test]
fn a_taken_port_moves_the_test_cluster_to_new_ports_once() {
    let mut c = Cluster::files(3, AGENTS);
    let old = c.ports.clone();
    let mut distinct = old.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three distinct ports: {old:?}");
    // Another program on meta-3's port: meta-1 and meta-2 start, meta-3 cannot.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", old[2])).unwrap();
    c.start_metas();
    assert!(c.ports.iter().all(|p| !old.contains(p)), "every node moved: {old:?} -> {:?}", c.ports);
    let map = ops_config::ClusterMap::load(&c.cluster_file()).unwrap();
    let in_map: Vec<u16> = map.nodes.iter().map(|n| n.addr.port()).collect();
    assert_eq!(in_map, c.ports, "the map names the new ports");
    for (i, m) in c.running().enumerate() {
        assert_eq!(m.addr.port(), c.ports[i]);
        let nodes = eventually(Duration::from_secs(20), || {
            let nodes = get_json(&m.url("/health")).1["nodes"].clone();
            nodes.as_array().is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["up"] == true)).then_some(())
        });
        assert!(nodes.is_some(), "meta-{} sees its peers on the new ports", i + 1);
    }
}

/// A relay is ready when it can answer a heartbeat: with no meta node reached and no disk copy
/// its `/health` says 503 and why; it fetches the config as soon as a meta node answers.
#[test]
fn relay_health_is_503_until_it_holds_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = ops_e2e::reserved_port();
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(&cluster, format!("[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:{port}\"\n")).unwrap();
    let data = dir.path().join("relay").display().to_string();
    let cluster_arg = cluster.display().to_string();
    let mut relay = ops_e2e::Proc::start(
        "relay",
        &["--listen", "127.0.0.1:0", "--cluster", &cluster_arg, "--data-dir", &data, "--config-poll-ms", "200"],
    );
    let addr = ops_e2e::addr_in(&relay.wait_for_log("relay listening"));
    let (status, health) = get_json(&format!("http://{addr}/health"));
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "no_config");
    assert!(health["reason"].as_str().unwrap().contains("no desired config yet"), "{health}");
    let (status, reply) = post_json(&format!("http://{addr}/heartbeat"), r#"{"hostname":"h1","realAgents":[]}"#);
    assert_eq!(status, 503, "{reply}");

    let agents = dir.path().join("agents.toml");
    std::fs::write(&agents, AGENTS).unwrap();
    let meta_data = dir.path().join("meta").display().to_string();
    let _meta = Meta::start_at(
        &format!("127.0.0.1:{port}"),
        &["--cluster", &cluster_arg, "--id", "meta-1", "--agents", &agents.display().to_string(), "--data-dir", &meta_data],
    );
    let ready = eventually(Duration::from_secs(20), || (get_json(&format!("http://{addr}/health")).0 == 200).then_some(()));
    assert!(ready.is_some(), "{}", relay.log());
    let (status, reply) = post_json(&format!("http://{addr}/heartbeat"), r#"{"hostname":"h1","realAgents":[]}"#);
    assert_eq!((status, reply["desiredAgents"][0]["version"].as_str()), (200, Some("5.1.3")));
}

#[test]
fn relay_answers_from_its_disk_copy_with_every_meta_node_down() {
    let mut c = Cluster::up(2, 1, AGENTS);
    for i in 0..2 {
        let mut m = c.metas[i].take().unwrap();
        m.proc.signal("KILL");
        m.proc.wait_exit(Duration::from_secs(10));
    }
    let mut relay = c.relays.pop().unwrap();
    relay.proc.signal("TERM");
    assert!(relay.proc.wait_exit(Duration::from_secs(20)).success(), "{}", relay.proc.log());
    drop(relay);
    let i = c.start_relay(0);
    let relay = &c.relays[i];
    relay.proc.log().contains("desired config loaded from the local copy").then_some(()).expect("loaded from disk");
    let (status, reply) = post_json(&relay.url("/heartbeat"), r#"{"hostname":"bj-web-9","realAgents":[]}"#);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["desiredAgents"][0]["version"], "5.1.4");
    let (_, health) = get_json(&relay.url("/health"));
    assert_eq!(health["configHash"], ops_config::content_hash(AGENTS.as_bytes()));
    assert!(health["pendingHosts"].as_u64().unwrap() >= 1, "the report waits for a meta node: {health}");
}

#[test]
fn batch_and_reload_need_the_token_and_reload_all_shows_divergence() {
    let mut c = Cluster::files(2, AGENTS);
    // meta-2 gets a different file: divergence must show.
    std::fs::write(c.agents_file(1), AGENTS.replace("5.1.3", "5.9.9")).unwrap();
    c.start_meta(0);
    c.start_meta(1);
    let m = c.meta(0);
    let batch = r#"{"hosts":[{"seen":1,"hb":{"hostname":"sneaky","realAgents":[]}}]}"#;
    let (status, reply) = post_json_auth(&m.url("/internal/batch"), None, batch);
    assert_eq!(status, 401, "{reply}");
    assert!(reply["errorMessage"].as_str().unwrap().contains("token"));
    let (status, _) = post_json_auth(&m.url("/internal/batch"), Some("wrong-token-wrong-token"), batch);
    assert_eq!(status, 401);
    assert_eq!(m.hosts_held(), 0, "nothing stored from a refused batch");
    let (status, _) = get_json(&m.url("/config/reload"));
    assert_eq!(status, 401, "reload without the token");
    let (status, _) = post_json_auth(&m.url("/internal/summary/falcon-agent"), None, r#"{"present":3}"#);
    assert_eq!(status, 401, "a gather query without the token");

    let (status, reply) = post_json_auth(&m.url("/internal/batch"), Some(TOKEN), batch);
    assert_eq!((status, reply["stored"].as_u64()), (200, Some(1)), "{reply}");

    // The compact encoding relays send: a batch with one bad record is refused whole.
    let compact = |hosts: &[&str]| {
        let mut body = Vec::new();
        ops_config::compact::begin(&mut body);
        for h in hosts {
            // Encoded without validation, as a broken or hostile sender could.
            let hb = ops_config::Heartbeat {
                hostname: (*h).into(),
                ip: "".into(),
                run_user: "".into(),
                updater_version: "".into(),
                real_agents: Vec::new(),
            };
            ops_config::compact::encode(ops_config::compact::Record { seen: 7, told: 0, relay: "relay-1", auth: None }, &hb, &mut body);
        }
        body
    };
    let post_compact = |body: Vec<u8>| {
        let r = reqwest::blocking::Client::new()
            .post(m.url("/internal/batch"))
            .bearer_auth(TOKEN)
            .header("content-type", ops_config::compact::CONTENT_TYPE)
            .body(body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    };
    let (status, reply) = post_compact(compact(&["compact-ok", "bad host!"]));
    assert_eq!(status, 400, "{reply}");
    assert!(reply["errorMessage"].as_str().unwrap().contains("bad hostname"), "{reply}");
    assert_eq!(m.hosts_held(), 1, "nothing of a refused compact batch is stored");
    let (status, reply) = post_compact(b"OPB1\x07".to_vec());
    assert_eq!(status, 400, "truncated: {reply}");
    let (status, reply) = post_compact(compact(&["compact-1", "compact-2"]));
    assert_eq!((status, reply["stored"].as_u64()), (200, Some(2)), "{reply}");
    assert_eq!(m.hosts_held(), 3);

    let (status, reply) = get_json_auth(&m.url("/config/reload?all=1"), TOKEN);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["diverged"], true);
    let hashes: Vec<&str> = reply["nodes"].as_array().unwrap().iter().map(|n| n["hash"].as_str().unwrap()).collect();
    assert_eq!(hashes.len(), 2);
    assert_ne!(hashes[0], hashes[1]);
    let diverged = eventually(Duration::from_secs(10), || {
        ops_e2e::get_text(&m.url("/metrics")).1.contains("ops_meta_config_diverged 1").then_some(())
    });
    assert!(diverged.is_some(), "divergence metric");
    assert_eq!(get_json(&m.url("/health")).1["configDiverged"], true, "one generation (0), two configs: shown on /health");
    assert_eq!(get_json(&m.url("/health")).1["clusterDiverged"], false);

    // Same file everywhere again: no divergence.
    std::fs::write(c.agents_file(1), AGENTS).unwrap();
    let (_, reply) = get_json_auth(&m.url("/config/reload?all=1"), TOKEN);
    assert_eq!(reply["diverged"], false, "{reply}");
    assert!(Path::new(&c.cluster_file()).exists());
}

/// A relay whose meta nodes are down buffers every host that reports: invented hostnames must
/// not grow it past --max-pending-hosts. The oldest reports go first, counted and logged, and
/// the rest reach the meta node once it is back.
#[test]
fn invented_hosts_at_a_relay_with_its_meta_nodes_down_never_pass_the_pending_cap() {
    let mut c = Cluster::files(1, AGENTS);
    c.start_meta(0);
    let (cluster, data) = (c.cluster_file().display().to_string(), c.dir.path().join("relay-cap").display().to_string());
    let mut relay = Relay::start(&[
        "--cluster",
        &cluster,
        "--data-dir",
        &data,
        "--flush-ms",
        "200",
        "--config-poll-ms",
        "100",
        "--request-timeout-ms",
        "500",
        "--max-pending-hosts",
        "100",
    ]);
    let hash = ops_config::content_hash(AGENTS.as_bytes());
    assert!(
        eventually(Duration::from_secs(20), || (get_json(&relay.url("/health")).1["configHash"] == hash.as_str()).then_some(())).is_some()
    );
    let mut m = c.metas[0].take().unwrap();
    m.proc.signal("KILL");
    m.proc.wait_exit(Duration::from_secs(10));
    drop(m);
    for i in 0..400 {
        let (status, reply) =
            post_json(&relay.url("/heartbeat"), json!({"hostname": format!("invented-{i}"), "realAgents": []}).to_string());
        assert_eq!(status, 200, "every host still gets its answer: {reply}");
        let pending = get_json(&relay.url("/health")).1["pendingHosts"].as_u64().unwrap();
        assert!(pending <= 100, "pending {pending} above the cap after {i}");
    }
    let (_, metrics) = ops_e2e::get_text(&relay.url("/metrics"));
    assert!(metrics.contains("ops_relay_pending_dropped_total 300"), "{metrics}");
    relay.proc.wait_for_log("pending buffer full (--max-pending-hosts)");
    c.start_meta(0);
    let delivered = eventually(Duration::from_secs(30), || (c.meta(0).hosts_held() == 100).then_some(()));
    assert!(delivered.is_some(), "the 100 kept reach the meta node: it holds {}", c.meta(0).hosts_held());
    assert_eq!(get_json(&relay.url("/health")).1["pendingHosts"], 0);
}

/// Whether the server closed `s` within `within` (a read returns end of file or a reset).
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

fn raw_heartbeat(host: &str) -> Vec<u8> {
    let body = json!({"hostname": host, "realAgents": []}).to_string();
    format!("POST /heartbeat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// Slowloris against a server started with `--max-connections 4 --header-timeout-ms 1000
/// --body-timeout-ms 1000`: partial headers, a partial body and a silent connection are each
/// closed within their timeout; past four open connections new ones are closed unanswered
/// (and counted) while a kept-alive connection goes on getting its heartbeats answered.
fn slowloris(addr: std::net::SocketAddr, component: &str) {
    use std::io::Write;
    let connect = || std::net::TcpStream::connect(addr).unwrap();
    let mut partial_head = connect();
    partial_head.write_all(b"POST /heartbeat HTTP/1.1\r\nHost: t\r\nContent-Len").unwrap();
    let mut partial_body = connect();
    partial_body.write_all(b"POST /heartbeat HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"hostname\"").unwrap();
    let mut silent = connect();
    for (what, s) in [("partial headers", &mut partial_head), ("a partial body", &mut partial_body), ("nothing sent", &mut silent)] {
        assert!(closed_within(s, Duration::from_secs(8)), "{component}: a connection with {what} was still open after 8 s");
    }
    // The cap: one kept-alive connection that is answered, then eight more at once, each
    // sending a heartbeat. At most three of them are let in and answered (fewer when the
    // node's own probes hold a slot); the others are closed without an answer. The kept-alive
    // connection goes on being answered.
    let mut kept = connect();
    kept.write_all(&raw_heartbeat("kept-1")).unwrap();
    assert!(ops_e2e::read_http_response(&mut kept).starts_with("HTTP/1.1 200"), "{component}: the first heartbeat");
    let mut more: Vec<_> = (0..8).map(|_| connect()).collect();
    for (i, s) in more.iter_mut().enumerate() {
        let _ = s.write_all(&raw_heartbeat(&format!("more-{i}")));
    }
    let (mut answered, mut refused_here) = (0, 0);
    for s in &mut more {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 12];
        match std::io::Read::read(s, &mut head) {
            Ok(n) if n > 0 && head[..n].starts_with(b"HTTP/1.1") => answered += 1,
            Ok(_) => refused_here += 1,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("{component}: a connection past the cap was neither answered nor closed")
            }
            Err(_) => refused_here += 1,
        }
    }
    assert!(answered <= 3 && refused_here >= 5, "{component}: {answered} let in past the cap of 4, {refused_here} refused");
    kept.write_all(&raw_heartbeat("kept-1")).unwrap();
    let reply = ops_e2e::read_http_response(&mut kept);
    assert!(reply.starts_with("HTTP/1.1 200"), "{component}: the kept-alive connection is still answered: {reply}");
    drop(kept);
    drop(more);
    // The slots free as the server sees those connections close.
    let metrics = eventually(Duration::from_secs(10), || ops_e2e::get(&format!("http://{addr}/metrics")).ok()?.text().ok())
        .unwrap_or_else(|| panic!("{component}: /metrics once the connections closed"));
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("ops_{component}_connections_refused_total ")))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{component}: refusals counted: {refused:?}");
}

#[test]
fn slowloris_clients_are_closed_and_the_connection_cap_holds_on_meta_nodes_and_relays() {
    let mut c = Cluster::files(1, AGENTS);
    c.meta_args = ["--max-connections", "4", "--header-timeout-ms", "1000", "--body-timeout-ms", "1000"].map(String::from).to_vec();
    c.start_meta(0);
    let (cluster, data) = (c.cluster_file().display().to_string(), c.dir.path().join("relay-slow").display().to_string());
    let relay = Relay::start(&[
        "--cluster",
        &cluster,
        "--data-dir",
        &data,
        "--config-poll-ms",
        "100",
        "--max-connections",
        "4",
        "--header-timeout-ms",
        "1000",
        "--body-timeout-ms",
        "1000",
    ]);
    let hash = ops_config::content_hash(AGENTS.as_bytes());
    assert!(
        eventually(Duration::from_secs(20), || (get_json(&relay.url("/health")).1["configHash"] == hash.as_str()).then_some(())).is_some()
    );
    slowloris(c.meta(0).addr, "meta");
    slowloris(relay.addr, "relay");
}

#[test]
fn relay_drains_its_buffers_on_sigterm() {
    let mut c = Cluster::files(1, AGENTS);
    c.start_meta(0);
    let (cluster, data) = (c.cluster_file().display().to_string(), c.dir.path().join("relay-drain").display().to_string());
    // A flush period far longer than the test: only the drain can deliver these reports.
    let mut relay = Relay::start(&["--cluster", &cluster, "--data-dir", &data, "--flush-ms", "600000", "--config-poll-ms", "100"]);
    let hash = ops_config::content_hash(AGENTS.as_bytes());
    assert!(
        eventually(Duration::from_secs(20), || (get_json(&relay.url("/health")).1["configHash"] == hash.as_str()).then_some(())).is_some()
    );
    let (_, metrics) = ops_e2e::get_text(&relay.url("/metrics"));
    assert!(metrics.contains(&format!("ops_relay_config_info{{hash=\"{hash}\"}} 1")), "{metrics}");
    for i in 0..200 {
        let (status, _) = post_json(&relay.url("/heartbeat"), json!({"hostname": format!("drain-{i}"), "realAgents": []}).to_string());
        assert_eq!(status, 200);
    }
    assert_eq!(get_json(&relay.url("/health")).1["pendingHosts"], 200);
    assert_eq!(c.meta(0).hosts_held(), 0);
    relay.proc.signal("TERM");
    assert!(relay.proc.wait_exit(Duration::from_secs(20)).success(), "{}", relay.proc.log());
    assert_eq!(c.meta(0).hosts_held(), 200, "the relay drained its buffer on SIGTERM");
}

#[test]
fn fleet_page_shows_the_gathered_figures_and_a_partial_banner() {
    let mut c = Cluster::files(2, AGENTS);
    c.start_meta(0);
    c.start_meta(1);
    let m = c.meta(0);
    // 30 hosts straight to meta-1 (those meta-2 owns are forwarded): 20 converged, 6 on the
    // old version, 4 of those with a lastError; and 4 of the bj-web- group, converged on 5.1.4.
    for i in 0..4 {
        let body = format!(
            r#"{{"hostname":"bj-web-{i}","realAgents":[{{"name":"falcon-agent","version":"5.1.4","status":"started","timestamp":1}}]}}"#
        );
        assert_eq!(post_json(&m.url("/heartbeat"), body).0, 200);
    }
    for i in 0..30 {
        let version = if i < 20 { "5.1.3" } else { "5.1.2" };
        let error = if i >= 26 { r#","lastError":"md5 mismatch""# } else { "" };
        let body = format!(
            r#"{{"hostname":"dc1-host-{i}","realAgents":[{{"name":"falcon-agent","version":"{version}","status":"started","timestamp":1{error}}}]}}"#
        );
        assert_eq!(post_json(&m.url("/heartbeat"), body).0, 200);
    }
    let all = eventually(Duration::from_secs(10), || (get_json(&m.url("/status/summary/falcon-agent")).1["hosts"] == 34).then_some(()));
    assert!(all.is_some(), "both nodes hold their hosts");
    let (_, group) = get_json(&m.url("/status/summary/falcon-agent?prefix=bj-web-"));
    assert_eq!((group["hosts"].as_u64(), group["converged"].as_u64()), (Some(4), Some(4)), "{group}");
    assert_eq!(get_json(&m.url("/status/summary/falcon-agent?prefix=a%20b")).0, 400);

    let (status, agents) = get_json(&m.url("/status/agents"));
    assert_eq!(status, 200);
    assert_eq!(
        agents["agents"][0],
        json!({"name": "falcon-agent", "version": "5.1.3", "cmd": "start", "prefixes": ["bj-web-"], "rollout": false})
    );

    let dom = chromium(&["--dump-dom", &m.url("/ui/")]);
    assert!(dom.contains(r#"<body data-loaded="1">"#), "the page's script ran:\n{dom}");
    let falcon = &dom[dom.find(r#"data-agent="falcon-agent""#).expect("falcon-agent card")..];
    assert_eq!(figure_after(falcon, r#"class="hosts""#, ">"), "34");
    assert_eq!(figure_after(falcon, r#"data-state="ok""#, r#"class="count">"#), "24");
    assert_eq!(figure_after(falcon, r#"data-state="upgrading""#, r#"class="count">"#), "6");
    assert_eq!(figure_after(falcon, r#"data-state="error""#, r#"class="count">"#), "4");
    assert_eq!(figure_after(falcon, r#"class="converged""#, ">"), "70.6 %");
    let group = &falcon[falcon.find(r#"data-prefix="bj-web-""#).expect("the prefix table")..];
    assert_eq!(figure_after(group, r#"class="n hosts""#, ">"), "4");
    assert_eq!(figure_after(group, r#"data-state="ok""#, ">"), "4");
    assert!(dom.contains(r#"data-agent="mysql-monitor""#));
    assert!(!dom.contains(r#"id="partial""#), "nothing missing yet");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-page.png");
    chromium(&["--window-size=1200,800", &format!("--screenshot={}", shot.display()), &m.url("/ui/")]);
    assert!(std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 10_000, "a screenshot at {}", shot.display());

    // The same figures through opsctl, against meta-2 (any node answers for the fleet).
    let server = format!("--server={}", c.meta(1).url(""));
    let (code, out, err) = opsctl(&[&server, "status"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = out.lines().find(|l| l.starts_with("falcon-agent")).unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols, ["falcon-agent", "5.1.3", "(start),", "5.1.4", "(start)", "34", "70.6", "%", "24", "6", "4", "0", "0"], "{out}");
    let (code, out, _) = opsctl(&[&server, "status", "falcon-agent"]);
    assert_eq!(code, 0);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(out.starts_with("falcon-agent: 34 hosts, 24 converged (70.6 %)"), "{out}");
    assert!(rows.contains(&vec!["5.1.2", "started", "error", "4"]) && rows.contains(&vec!["5.1.3", "started", "ok", "20"]), "{out}");
    let (code, out, _) = opsctl(&[&server, "hosts", "falcon-agent", "--state", "error"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().filter(|l| !l.starts_with('#')).count(), 4, "{out}");
    assert!(out.lines().skip(1).all(|l| l.contains("md5 mismatch")), "{out}");
    let (code, out, _) = opsctl(&[&server, "--json", "hosts", "falcon-agent", "--prefix", "bj-web-"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["count"], 4, "{out}");
    let (code, out, _) = opsctl(&[&server, "host", "dc1-host-27"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("dc1-host-27 ") && out.contains("falcon-agent") && out.contains("md5 mismatch"), "{out}");
    let (code, out, _) = opsctl(&[&server, "cluster"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("meta-") && l.contains(" ok ")).count(), 2, "{out}");
    let (code, _, err) = opsctl(&[&server, "host", "no-such-host"]);
    assert_eq!(code, 1, "the server's refusal: {err}");
    assert!(err.contains("HTTP 404"), "{err}");
    let (code, _, err) = opsctl(&["--server=127.0.0.1:9", "status"]);
    assert_eq!(code, 69, "nobody answers: {err}");
    let (code, out, _) = opsctl(&["completion", "bash"]);
    assert!(code == 0 && out.contains("opsctl") && out.contains("rollout"), "{out}");

    // meta-2 dies: the page says whose hosts are missing.
    c.metas[1] = None;
    let dom = chromium(&["--dump-dom", &c.meta(0).url("/ui/")]);
    let banner = figure_after(&dom, r#"id="partial""#, ">");
    assert!(banner.contains("meta-2"), "{banner}");
    // opsctl prints what it has and exits 2: a node is down, the counts are partial.
    let server = format!("--server={}", c.meta(0).url(""));
    let (code, out, err) = opsctl(&[&server, "cluster"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.lines().any(|l| l.starts_with("meta-2") && l.contains("down")) && err.contains("down: meta-2"), "{out}{err}");
    let (code, out, err) = opsctl(&[&server, "status"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("falcon-agent") && err.contains("partial: no answer from meta-2"), "{out}{err}");
}

/// `opsctl config` against a real cluster: a bad file and a stale hash are refused with
/// nothing changed anywhere; an apply is written by every node as the next generation; a
/// rollout is paused and resumed by editing the served file; history and rollback; a node that
/// was down during an apply takes the newer generation from a peer when it is back.
#[test]
fn opsctl_config_apply_is_checked_everywhere_versioned_and_rolled_back() {
    let mut c = Cluster::up(3, 1, AGENTS);
    let server = format!("--server={}", c.meta(0).addr);
    let token = format!("--token-file={}", c.dir.path().join("cluster.token").display());
    let served = |c: &Cluster| -> Vec<(String, u64)> {
        c.running()
            .map(|m| {
                let h = get_json(&m.url("/health")).1;
                (h["configHash"].as_str().unwrap().to_owned(), h["configGeneration"].as_u64().unwrap())
            })
            .collect()
    };
    let old = ops_config::content_hash(AGENTS.as_bytes());
    let untouched = |c: &Cluster, why: &str| {
        assert!(served(c).iter().all(|s| *s == (old.clone(), 0)), "{why}: {:?}", served(c));
        for i in 0..3 {
            assert_eq!(std::fs::read_to_string(c.agents_file(i)).unwrap(), AGENTS, "{why}: meta-{} file", i + 1);
        }
    };

    // A file no node accepts: refused, nothing written anywhere.
    let bad = c.dir.path().join("bad.toml");
    std::fs::write(&bad, "[[agent]]\nname = 1\n").unwrap();
    let (code, _, err) = opsctl(&[&server, &token, "config", "apply", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing changed on any node") && err.contains("meta-1"), "{err}");
    untouched(&c, "after a bad file");

    // A good file against a stale hash: refused (someone applied since the diff).
    let good_text = AGENTS.replace("version = \"5.1.3\"", "version = \"5.1.5\"").replacen(
        "\n[[agent]]\nname = \"mysql-monitor\"",
        "\n  [agent.rollout]\n  from = { version = \"5.1.3\", md5 = \"\" }\n  waves = [10, 100]\n\n[[agent]]\nname = \"mysql-monitor\"",
        1,
    );
    let good = c.dir.path().join("good.toml");
    std::fs::write(&good, &good_text).unwrap();
    let (code, _, err) = opsctl(&[&server, &token, "config", "apply", good.to_str().unwrap(), "--expect", "0123abcd"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("changed since you diffed"), "{err}");
    untouched(&c, "after a stale hash");
    // Without the token: refused too.
    let (code, _, err) = opsctl(&[&server, "config", "apply", good.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    untouched(&c, "without the token");

    // diff, then apply against the hash it printed.
    let (code, out, _) = opsctl(&[&server, "config", "diff", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("+default = { version = \"5.1.5\"") || out.contains("+  [agent.rollout]"), "{out}");
    assert!(out.contains(&format!("--expect {old}")), "{out}");
    let (code, out, err) = opsctl(&[&server, &token, "config", "apply", good.to_str().unwrap(), "--expect", &old]);
    assert_eq!(code, 0, "{out}{err}");
    let new = ops_config::content_hash(good_text.as_bytes());
    assert!(served(&c).iter().all(|s| *s == (new.clone(), 1)), "{:?}", served(&c));
    for i in 0..3 {
        assert_eq!(std::fs::read_to_string(c.agents_file(i)).unwrap(), good_text, "meta-{} wrote the file", i + 1);
    }
    let relay = &c.relays[0];
    eventually(Duration::from_secs(10), || (get_json(&relay.url("/health")).1["configHash"] == new.as_str()).then_some(()))
        .expect("the relay takes the applied config");

    // pause / resume: edits of the served file through the same apply.
    let (code, out, err) = opsctl(&[&server, &token, "rollout", "pause", "falcon-agent"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.lines().any(|l| l.starts_with('+') && l.contains("paused = true")), "{out}");
    let paused = ops_e2e::get_text(&c.meta(1).url("/config/desired")).1;
    assert!(paused.contains("paused = true"));
    assert!(served(&c).iter().all(|s| s.1 == 2));
    let (code, _, err) = opsctl(&[&server, &token, "rollout", "resume", "falcon-agent"]);
    assert_eq!(code, 0, "{err}");
    assert!(served(&c).iter().all(|s| *s == (new.clone(), 3)), "resume gives back the same text: {:?}", served(&c));
    let (code, _, err) = opsctl(&[&server, &token, "rollout", "pause", "mysql-monitor"]);
    assert_eq!(code, 1, "no rollout to pause: {err}");

    // history and rollback (to the paused version before the resume).
    let (code, out, _) = opsctl(&[&server, "config", "history"]);
    assert_eq!(code, 0);
    for g in ["0", "1", "2", "3"] {
        assert!(out.lines().any(|l| l.starts_with(g)), "generation {g} kept: {out}");
    }
    let (code, out, err) = opsctl(&[&server, &token, "config", "rollback"]);
    assert_eq!(code, 0, "{out}{err}");
    let paused_hash = ops_config::content_hash(paused.as_bytes());
    assert!(served(&c).iter().all(|s| *s == (paused_hash.clone(), 4)), "{:?}", served(&c));
    let (code, out, _) = opsctl(&[&server, "cluster"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("GEN"), "{out}");

    // meta-3 is down during an apply: the others take it, and meta-3 takes it from a peer
    // once it is back.
    let meta3 = c.metas[2].take().unwrap();
    meta3.proc.signal("TERM");
    drop(meta3);
    let (code, _, err) = opsctl(&[&server, &token, "config", "apply", good.to_str().unwrap()]);
    assert_eq!(code, 2, "applied but not whole: {err}");
    assert!(err.contains("meta-3"), "{err}");
    c.start_meta(2);
    let caught = eventually(Duration::from_secs(20), || {
        let h = get_json(&c.meta(2).url("/health")).1;
        (h["configHash"] == new.as_str() && h["configGeneration"] == 5).then_some(())
    });
    assert!(caught.is_some(), "meta-3 took generation 5 from a peer: {}", get_json(&c.meta(2).url("/health")).1);
    assert_eq!(std::fs::read_to_string(c.agents_file(2)).unwrap(), good_text);
    let (code, out, _) = opsctl(&[&server, "cluster"]);
    assert_eq!(code, 0, "whole again: {out}");
}

/// A relay id is in every report the relay forwards (status groups silent hosts by it): one
/// that is not a safe token stops the relay with status 64 before it binds.
#[test]
fn a_relay_id_that_is_not_a_token_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let long = "r".repeat(65);
    for id in ["", "dc 2", "../x", long.as_str()] {
        let (status, log) = ops_e2e::Proc::run_to_exit("relay", &["--id", id, "--listen", "127.0.0.1:0", "--data-dir", &data]);
        assert_eq!(status.code(), Some(64), "{id:?}: {log}");
        assert!(log.contains("--id") && log.contains("want 1-64 of [A-Za-z0-9._-]"), "{id:?}: {log}");
        assert!(!log.contains("relay listening"), "never bound a port: {log}");
    }
}

/// POSTs one node's step of a membership change, as a coordinator would.
fn cluster_step(m: &Meta, step: &str, body: &str) -> (u16, Value) {
    post_json_auth(&m.url(&format!("/internal/cluster/{step}")), Some(TOKEN), body.to_owned())
}

/// Every node's (cluster generation, cluster hash) from its /health.
fn map_generations(c: &Cluster) -> Vec<(u64, String)> {
    c.running()
        .map(|m| {
            let h = get_json(&m.url("/health")).1;
            (h["clusterGeneration"].as_u64().unwrap_or(u64::MAX), h["clusterHash"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

/// cluster.toml carries a generation that grows with every change. A node that missed a
/// commit (its coordinator died) takes the newer map from a peer at its next probe, and the
/// relays follow the highest generation; one generation with two maps is a divergence
/// (/health, opsctl cluster) that a reload from any node repairs.
#[test]
fn cluster_map_generations_bring_a_node_along_and_show_divergence() {
    let (c, hosts) = holding(3, 300);
    let before = map_generations(&c);
    assert!(before.iter().all(|g| g.0 == 0 && g.1 == before[0].1), "{before:?}");
    // A new map (another ring: fewer virtual nodes), prepared everywhere, committed and
    // finished on meta-1 and meta-2 only: meta-3's change then ends by itself (abort here).
    let a = c.write_map(&[0, 1, 2]).replace("vnodes = 1000", "vnodes = 900");
    let a_hash = ops_config::content_hash(a.as_bytes());
    for m in c.running() {
        let (status, r) = cluster_step(m, "prepare", &a);
        assert_eq!((status, r["generation"].as_u64()), (200, Some(0)), "{r}");
    }
    for m in [c.meta(0), c.meta(1)] {
        let (status, r) = cluster_step(m, "commit?generation=1", &a_hash);
        assert_eq!((status, r["generation"].as_u64()), (200, Some(1)), "{r}");
        assert_eq!(cluster_step(m, "finish", &a_hash).0, 200);
    }
    assert_eq!(cluster_step(c.meta(2), "abort", &a_hash).0, 200);
    let caught = eventually(Duration::from_secs(20), || map_generations(&c).iter().all(|g| *g == (1, a_hash.clone())).then_some(()));
    assert!(caught.is_some(), "meta-3 takes generation 1 from a peer: {:?}", map_generations(&c));
    assert!(c.meta(2).proc.log().contains("missed a membership change"), "{}", c.meta(2).proc.log());
    let relay = &c.relays[0];
    let followed = eventually(Duration::from_secs(20), || {
        let h = get_json(&relay.url("/health")).1;
        (h["clusterHash"] == a_hash.as_str() && h["clusterGeneration"] == 1).then_some(())
    });
    assert!(followed.is_some(), "the relay follows: {}", get_json(&relay.url("/health")).1);
    // Every host is counted once by the new ring.
    eventually(Duration::from_secs(20), || listed_once(c.meta(2), &hosts).ok()).expect("whole after the catch-up");
    assert_eq!(
        map_generations(&c)[2].0,
        std::fs::read_to_string(c.dir.path().join("data-meta-3/cluster-generation")).unwrap().trim().parse::<u64>().unwrap()
    );

    // Generation 2 with two maps: meta-1 and meta-2 take B, meta-3 takes C.
    let b = a.replace("vnodes = 900", "vnodes = 800");
    let b_hash = ops_config::content_hash(b.as_bytes());
    let c_text = a.replace("vnodes = 900", "vnodes = 700");
    let c_hash = ops_config::content_hash(c_text.as_bytes());
    // Every node prepares before any commits: a node with a change prepared does not catch up
    // from a peer. (Done node by node, meta-3's probe could take B at generation 2 from meta-1
    // before its own steps, and then commit C at generation 3, which everyone took: no
    // divergence, the CI failure of this test.)
    let plan = [(c.meta(0), &b, &b_hash), (c.meta(1), &b, &b_hash), (c.meta(2), &c_text, &c_hash)];
    for (m, text, _) in plan {
        assert_eq!(cluster_step(m, "prepare", text).0, 200);
    }
    for (m, _, hash) in plan {
        let (status, r) = cluster_step(m, "commit?generation=2", hash);
        assert_eq!((status, r["generation"].as_u64()), (200, Some(2)), "{r}");
    }
    for (m, _, hash) in plan {
        assert_eq!(cluster_step(m, "finish", hash).0, 200);
    }
    let diverged =
        eventually(Duration::from_secs(20), || c.running().all(|m| get_json(&m.url("/health")).1["clusterDiverged"] == true).then_some(()));
    assert!(diverged.is_some(), "every node says so: {:?}", map_generations(&c));
    let server = format!("--server={}", c.meta(0).url(""));
    let (code, out, err) = opsctl(&[&server, "cluster"]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("diverged: cluster map generation 2"), "{out}{err}");
    assert!(out.contains("CGEN"), "{out}");
    // Repaired from meta-1, which serves B already: every node serves B at generation 3.
    std::fs::write(c.cluster_file(), &b).unwrap();
    let (status, r) = get_json_auth(&c.meta(0).url("/cluster/reload?all=1"), TOKEN);
    assert_eq!((status, r["generation"].as_u64()), (200, Some(3)), "{r}");
    assert!(map_generations(&c).iter().all(|g| *g == (3, b_hash.clone())), "{:?}", map_generations(&c));
    let whole = eventually(Duration::from_secs(20), || {
        c.running().all(|m| get_json(&m.url("/health")).1["clusterDiverged"] == false).then_some(())
    });
    assert!(whole.is_some(), "no divergence left");
    let (code, out, err) = opsctl(&[&server, "cluster"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(20), || listed_once(c.meta(1), &hosts).ok()).expect("whole after the repair");
}

/// `POST /internal/cluster/prepare` of `text` with signature `sig` (header form) and `token`.
/// Hosts a prepare moves may reach their new owner before that node's own prepare (the
/// coordinator prepares every node at once): the change is on there from the first of them,
/// or its hand-back sent them home and dropped them, and status missed them until the change
/// ended (the CI failure of `chaos_at_50k_hosts...`: shrink-meta, "whole throughout: NO").
#[test]
fn moved_hosts_that_arrive_before_their_new_owner_prepared_stay_there() {
    let (c, hosts) = holding(2, 400);
    let before = c.meta(1).hosts_held();
    // Another ring: some of meta-1's hosts go to meta-2 (and some of meta-2's to meta-1).
    let a = c.write_map(&[0, 1]).replace("vnodes = 1000", "vnodes = 900");
    let a_hash = ops_config::content_hash(a.as_bytes());
    let (status, r) = cluster_step(c.meta(0), "prepare", &a);
    assert_eq!(status, 200, "{r}");
    let moved = r["moved"].as_u64().unwrap();
    assert!(moved > 0, "{r}");
    assert_eq!(c.meta(1).hosts_held(), before + moved, "meta-2 holds what meta-1 moved to it");
    // Several hand-back periods (1 s): nothing goes back to meta-1.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(c.meta(1).hosts_held(), before + moved, "meta-2 keeps them before its own prepare");
    assert!(c.meta(1).proc.log().contains("before this node prepared it"), "{}", c.meta(1).proc.log());
    assert_eq!(cluster_step(c.meta(1), "prepare", &a).0, 200);
    for m in [c.meta(0), c.meta(1)] {
        listed_once(m, &hosts).unwrap();
    }
    for m in [c.meta(0), c.meta(1)] {
        assert_eq!(cluster_step(m, "abort", &a_hash).0, 200);
    }
    eventually(Duration::from_secs(20), || listed_once(c.meta(0), &hosts).ok()).expect("whole after the abort");
    let home = eventually(Duration::from_secs(20), || (c.meta(1).hosts_held() == before).then_some(()));
    assert!(home.is_some(), "after the abort the copies go home: meta-2 holds {}, {before} before", c.meta(1).hosts_held());
}

/// A peer that says it moves hosts for a map this node is never asked to prepare (a bogus
/// hash) pauses the hand-back for `--moving-grace-seconds` only, not the change timeout: then
/// the change is off, counted, and the hosts it pushed go home to their owner.
#[test]
fn moved_hosts_of_a_map_never_prepared_here_go_home_after_the_grace() {
    let (c, hosts) = holding_with(2, 200, &["--moving-grace-seconds", "3"]);
    let before = c.meta(1).hosts_held();
    // meta-1's own hosts, pushed to meta-2 as if a change moved them there.
    let ring = ops_config::ClusterMap::load(&c.cluster_file()).unwrap().ring();
    let owned_by_1: Vec<&String> = hosts.iter().filter(|h| ring.owner(h) == 0).collect();
    assert!(!owned_by_1.is_empty());
    // A minute old: older than what meta-1 holds, so going home changes nothing there.
    let seen = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 60;
    let entries: Vec<Value> =
        owned_by_1.iter().map(|h| json!({"seen": seen, "hb": {"hostname": h, "ip": "10.0.0.1", "realAgents": []}})).collect();
    let r = reqwest::blocking::Client::new()
        .post(c.meta(1).url("/internal/batch"))
        .bearer_auth(TOKEN)
        .header("x-ops-moving", "00000000000000000000000000000000")
        .body(json!({"hosts": entries}).to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let pushed = before + owned_by_1.len() as u64;
    assert_eq!(c.meta(1).hosts_held(), pushed, "meta-2 holds the pushed hosts");
    assert!(c.meta(1).proc.log().contains("before this node prepared it"), "{}", c.meta(1).proc.log());
    // Within the grace (hand-back every second) nothing goes home.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.meta(1).hosts_held(), pushed, "the hand-back is paused within the grace");
    // After it, well before the 120 s change timeout, they do.
    let home = eventually(Duration::from_secs(20), || (c.meta(1).hosts_held() == before).then_some(()));
    assert!(home.is_some(), "the pushed hosts went home: meta-2 holds {}, {before} before", c.meta(1).hosts_held());
    assert!(c.meta(1).proc.log().contains("not asked to prepare within the grace"), "{}", c.meta(1).proc.log());
    assert!(ops_e2e::get_text(&c.meta(1).url("/metrics")).1.contains("ops_meta_unprepared_moves_total 1"));
    listed_once(c.meta(0), &hosts).unwrap();
}

fn prepare_signed(m: &Meta, text: &str, sig: Option<&str>, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::blocking::Client::new().post(m.url("/internal/cluster/prepare")).body(text.to_owned());
    if let Some(s) = sig {
        req = req.header(ops_config::trust::SIGNATURE_HEADER, s);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// The signature lines of `file`'s `.sig` in header form.
fn sig_header(file: &Path) -> String {
    ops_config::trust::signature_header(&std::fs::read_to_string(ops_config::trust::signature_path(file)).unwrap())
}

/// A second operator key, made here and trusted by nobody: what an attacker signs with.
fn rogue_key(dir: &Path) -> ops_config::trust::SecretKey {
    let path = dir.join("rogue.key");
    assert_eq!(opsctl(&["keygen", "--out", &path.display().to_string()]).0, 0);
    ops_config::trust::SecretKey::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// With trusted keys, cluster.toml changes only by the operator's signature: an unsigned or
/// wrongly signed map is refused by the coordinator and by every node's prepare, even with
/// the cluster token; an older signed one is refused as a rollback; the signed next version
/// is taken by every node at its own version as generation, and the relay follows it and
/// keeps its signature.
#[test]
fn with_trusted_keys_only_a_signed_newer_cluster_map_is_taken() {
    let c = Cluster::up_signed(2, 1, AGENTS);
    let v1 = std::fs::read_to_string(c.cluster_file()).unwrap();
    let v1_sig = sig_header(&c.cluster_file());
    let v1_hash = ops_config::content_hash(v1.as_bytes());
    for m in c.running() {
        let h = get_json(&m.url("/health")).1;
        assert_eq!((h["clusterGeneration"].as_u64(), h["configGeneration"].as_u64()), (Some(1), Some(1)), "versions: {h}");
    }
    let served = get(&c.meta(0).url("/cluster/map")).unwrap();
    assert_eq!(served.headers()[ops_config::trust::SIGNATURE_HEADER].to_str().unwrap(), v1_sig, "the map is served with its signature");

    // The operator's edit, not signed: refused by the coordinator, nothing changed.
    let edited = v1.replace("vnodes = 1000", "vnodes = 900");
    std::fs::write(c.cluster_file(), &edited).unwrap();
    let (status, r) = get_json_auth(&c.meta(0).url("/cluster/reload?all=1"), TOKEN);
    assert_eq!(status, 400, "{r}");
    assert!(r["errorMessage"].as_str().unwrap().contains("does not match"), "{r}");
    // Straight to a node's prepare with the cluster token: unsigned, rogue-signed.
    let (status, r) = prepare_signed(c.meta(1), &edited, None, Some(TOKEN));
    assert_eq!(status, 409, "{r}");
    assert!(r["errorMessage"].as_str().unwrap().contains("no signature"), "{r}");
    let rogue = rogue_key(c.dir.path());
    let (status, r) = prepare_signed(c.meta(1), &edited, Some(&rogue.sign(edited.as_bytes())), Some(TOKEN));
    assert_eq!(status, 409, "{r}");
    assert!(r["errorMessage"].as_str().unwrap().contains("not trusted"), "{r}");
    assert_eq!(map_generations(&c), vec![(1, v1_hash.clone()); 2], "nothing changed");

    // Signed at the next version: taken everywhere, at generation 2.
    let v2 = c.sign(&c.cluster_file(), &[]);
    let v2_hash = ops_config::content_hash(v2.as_bytes());
    let (status, r) = get_json_auth(&c.meta(0).url("/cluster/reload?all=1"), TOKEN);
    assert_eq!((status, r["generation"].as_u64()), (200, Some(2)), "{r}");
    assert_eq!(map_generations(&c), vec![(2, v2_hash.clone()); 2]);
    for i in 0..2 {
        assert_eq!(
            std::fs::read_to_string(c.dir.path().join(format!("data-meta-{}/cluster-version", i + 1))).unwrap(),
            format!("2 {v2_hash}\n")
        );
    }
    let relay = &c.relays[0];
    let followed = eventually(Duration::from_secs(20), || {
        let h = get_json(&relay.url("/health")).1;
        (h["clusterHash"] == v2_hash.as_str() && h["clusterGeneration"] == 2).then_some(())
    });
    assert!(followed.is_some(), "the relay follows the signed map: {}", get_json(&relay.url("/health")).1);
    let relay_dir = c.dir.path().join("relay-1");
    assert_eq!(std::fs::read_to_string(relay_dir.join("cluster.toml")).unwrap(), v2);
    assert_eq!(sig_header(&relay_dir.join("cluster.toml")), sig_header(&c.cluster_file()));
    assert_eq!(std::fs::read_to_string(relay_dir.join("cluster-version")).unwrap(), format!("2 {v2_hash}\n"));

    // The first map again, validly signed: a rollback, refused.
    let (status, r) = prepare_signed(c.meta(1), &v1, Some(&v1_sig), Some(TOKEN));
    assert_eq!(status, 409, "{r}");
    assert!(r["errorMessage"].as_str().unwrap().contains("version 1 is older than 2"), "{r}");
    assert_eq!(map_generations(&c), vec![(2, v2_hash); 2]);
}

/// What answers on a peer's address in place of the peer. It says it is `meta-2` with ever
/// higher config and cluster generations, and serves, in turn, the operator's own older
/// signed files (a rollback) and files signed by a key nobody trusts (a config that runs
/// everything as root, a map with a node of its own); everything else gets 503.
struct FakePeer {
    served: std::sync::Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
}

impl FakePeer {
    fn start(listener: std::net::TcpListener, configs: [(String, String); 2], maps: [(String, String); 2]) -> FakePeer {
        let served: std::sync::Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Default::default();
        let count = served.clone();
        std::thread::spawn(move || {
            let mut generation = 100u64;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let Some((line, _)) = ops_e2e::read_http_request(&mut stream) else { continue };
                let path = line.split(' ').nth(1).unwrap_or("").split('?').next().unwrap_or("").to_owned();
                let n = {
                    let mut c = count.lock().unwrap();
                    let n = c.entry(path.clone()).or_default();
                    *n += 1;
                    *n
                };
                let (code, extra, body) = match path.as_str() {
                    "/health" => {
                        generation += 1;
                        let h = json!({"id": "meta-2", "status": "ok", "configGeneration": generation, "configHash": "f",
                            "clusterGeneration": generation, "clusterHash": "f"});
                        (200, String::new(), h.to_string())
                    }
                    "/config/desired" => {
                        let (text, sig) = &configs[n % 2];
                        (200, format!("x-ops-signature: {sig}\r\n"), text.clone())
                    }
                    "/cluster/map" => {
                        let (text, sig) = &maps[n % 2];
                        (200, format!("x-ops-signature: {sig}\r\nx-ops-cluster-generation: {generation}\r\n"), text.clone())
                    }
                    _ => (503, String::new(), "{}".to_owned()),
                };
                let head = format!("HTTP/1.1 {code} X\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n", body.len());
                let _ = std::io::Write::write_all(&mut stream, head.as_bytes());
                let _ = std::io::Write::write_all(&mut stream, body.as_bytes());
            }
        });
        FakePeer { served }
    }

    fn served(&self, path: &str) -> usize {
        self.served.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// The attack of issue 24, with trusted keys: a process on meta-2's address offers meta-1
/// newer generations of older signed files and of files signed by another key. Nothing is
/// taken: meta-1's files, signatures, hashes and versions stay as they were, as do the
/// relay's, and the node the fake's map names never hears from anyone. Whoever holds the
/// cluster token (a stolen relay or node credential) cannot change the map either; without
/// it, not even ask.
#[test]
fn a_fake_peer_on_a_nodes_address_changes_no_file_hash_or_version() {
    let mut c = Cluster::signed_files(2, AGENTS);
    // The operator's first documents, kept to be replayed, then the next versions, served.
    let old_config = (c.agents.clone(), sig_header(&c.agents_file(0)));
    let old_map = (std::fs::read_to_string(c.cluster_file()).unwrap(), sig_header(&c.cluster_file()));
    c.sign_agents(&[]);
    c.sign(&c.cluster_file(), &[]);
    let rogue = rogue_key(c.dir.path());
    let evil_node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    evil_node.set_nonblocking(true).unwrap();
    let evil_map = format!(
        "{}[[node]]\nid = \"meta-evil\"\naddr = \"{}\"\n",
        old_map.0.replace("version = 1", "version = 99"),
        evil_node.local_addr().unwrap()
    );
    let evil_config =
        format!("version = 99\nexpires = 2999-01-01T00:00:00Z\n{}", AGENTS.replace("run_user = \"falcon\"", "run_user = \"root\""));
    let fake = FakePeer::start(
        std::net::TcpListener::bind(("127.0.0.1", c.ports[1])).unwrap(),
        [old_config.clone(), (evil_config.clone(), rogue.sign(evil_config.as_bytes()))],
        [old_map.clone(), (evil_map.clone(), rogue.sign(evil_map.as_bytes()))],
    );
    c.start_meta(0);
    c.start_relay(0);
    let files = |c: &Cluster| -> Vec<Vec<u8>> {
        let (a, m) = (c.agents_file(0), c.cluster_file());
        [a.clone(), ops_config::trust::signature_path(&a), m.clone(), ops_config::trust::signature_path(&m)]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect()
    };
    let before = files(&c);
    let health = |url: String| {
        let h = get_json(&url).1;
        (h["configHash"].clone(), h["configGeneration"].clone(), h["clusterHash"].clone(), h["clusterGeneration"].clone())
    };
    let meta_before = health(c.meta(0).url("/health"));
    assert_eq!((meta_before.1.as_u64(), meta_before.3.as_u64()), (Some(2), Some(2)), "{meta_before:?}");
    // Both of each kind offered, at ever newer generations.
    let offered =
        eventually(Duration::from_secs(40), || (fake.served("/config/desired") >= 3 && fake.served("/cluster/map") >= 3).then_some(()));
    assert!(offered.is_some(), "the fake's documents were fetched: {:?}", fake.served.lock().unwrap());
    assert_eq!(files(&c), before, "meta-1's files and signatures are as they were");
    assert_eq!(health(c.meta(0).url("/health")), meta_before, "meta-1 serves what it served");
    let log = c.meta(0).proc.log();
    assert!(log.contains("version 1 is older than 2"), "the replayed files are refused as rollbacks: {log}");
    assert!(log.contains("not trusted here"), "the rogue-signed files are refused: {log}");
    assert!(log.contains("a peer serves a newer cluster map, which this node refuses"), "maps are among them: {log}");
    assert!(log.contains("a peer serves a newer config generation, which this node refuses"), "configs too: {log}");
    let relay = &c.relays[0];
    let rh = get_json(&relay.url("/health")).1;
    assert_eq!((rh["configHash"].clone(), rh["clusterHash"].clone()), (meta_before.0.clone(), meta_before.2.clone()), "{rh}");
    assert!(!c.dir.path().join("relay-1/cluster.toml").exists(), "the relay learnt no other map");

    // A fake relay (no token), then a stolen credential (the token): the map does not move.
    let (status, _) = prepare_signed(c.meta(0), &evil_map, Some(&rogue.sign(evil_map.as_bytes())), None);
    assert_eq!(status, 401);
    let (status, r) = prepare_signed(c.meta(0), &evil_map, Some(&rogue.sign(evil_map.as_bytes())), Some(TOKEN));
    assert_eq!(status, 409, "{r}");
    let (status, r) =
        post_json_auth(&c.meta(0).url("/internal/config/write?generation=18446744073709551615"), Some(TOKEN), evil_config.clone());
    assert_eq!(status, 400, "{r}");
    assert_eq!(files(&c), before);
    assert_eq!(health(c.meta(0).url("/health")), meta_before);
    // The node of the fake's map was never contacted: no request, no token.
    assert!(evil_node.accept().is_err(), "nothing connected to meta-evil");
}

/// An HTTPS client trusting only the CA in `ca`, showing the certificate `cert` (`NAME.pem`
/// and `NAME.key` from `opsctl ca issue`) when given.
fn https(ca: &Path, cert: Option<&Path>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(5));
    if let Some(c) = cert {
        let mut pem = std::fs::read(c.with_extension("pem")).unwrap();
        pem.extend(std::fs::read(c.with_extension("key")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// Under `mtls = true` the nodes and the relay know each other by the certificates of the
/// cluster CA that name them (`opsctl ca init`, `opsctl ca issue`), and the cluster token
/// opens no internal route: a client with no certificate, or with one of a relay on a
/// node's route, or of a node that is not in the map, is refused (403) token or not. A
/// process on meta-2's address with a certificate of the same CA for another node is not
/// believed: meta-1 and the relay count meta-2 down and send it nothing, and its hosts are
/// held by meta-1 as failover copies.
#[test]
fn under_mtls_peers_and_relays_are_known_by_their_certificates_only() {
    use ops_e2e::{Proc, reserved_port};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca_dir = d.join("ca");
    let ca = ca_dir.display().to_string();
    assert_eq!(opsctl(&["ca", "init", "--dir", &ca]).0, 0);
    for (kind, id) in [("--node", "meta-1"), ("--node", "meta-2"), ("--node", "meta-3"), ("--relay", "relay-1")] {
        let (code, out, err) = opsctl(&["ca", "issue", "--dir", &ca, kind, id, "--san", "127.0.0.1"]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, _, err) = opsctl(&["ca", "init", "--dir", &ca]);
    assert_ne!(code, 0, "never overwrites a CA");
    assert!(err.contains("not overwriting"), "{err}");
    std::fs::write(d.join("cluster.token"), format!("{TOKEN}\n")).unwrap();
    let ports = [reserved_port(), reserved_port()];
    let map = format!(
        "tls = true\nmtls = true\nca_file = \"ca/ca.pem\"\ntoken_file = \"cluster.token\"\n\
         [[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:{}\"\n[[node]]\nid = \"meta-2\"\naddr = \"127.0.0.1:{}\"\n",
        ports[0], ports[1]
    );
    std::fs::write(d.join("cluster.toml"), &map).unwrap();
    std::fs::write(d.join("agents.toml"), AGENTS).unwrap();
    let p = |x: &Path| x.display().to_string();
    let (cluster, agents) = (p(&d.join("cluster.toml")), p(&d.join("agents.toml")));
    let meta = |i: usize, cert: &str| {
        let (listen, data) = (format!("127.0.0.1:{}", ports[i]), p(&d.join(format!("data-{i}"))));
        let (c, k) = (p(&ca_dir.join(format!("{cert}.pem"))), p(&ca_dir.join(format!("{cert}.key"))));
        let id = format!("meta-{}", i + 1);
        let args = ["--listen", &listen, "--cluster", &cluster, "--id", &id, "--agents", &agents, "--data-dir", &data];
        let mut proc = Proc::start("meta-node", &[&args[..], &["--tls-cert", &c, "--tls-key", &k, "--flush-ms", "100"]].concat());
        proc.wait_for_log("meta node listening");
        proc
    };
    let _m1 = meta(0, "meta-1");
    let mut m2 = meta(1, "meta-2");
    let (rc, rk, rdata) = (p(&ca_dir.join("relay-1.pem")), p(&ca_dir.join("relay-1.key")), p(&d.join("relay")));
    let mut relay = Proc::start(
        "relay",
        &["--listen", "127.0.0.1:0", "--cluster", &cluster, "--id", "relay-1", "--data-dir", &rdata, "--flush-ms", "100"]
            .iter()
            .copied()
            .chain(["--config-poll-ms", "200", "--request-timeout-ms", "1000", "--tls-cert", &rc, "--tls-key", &rk])
            .collect::<Vec<_>>(),
    );
    let relay_addr = ops_e2e::addr_in(&relay.wait_for_log("relay listening"));
    let ca_pem = ca_dir.join("ca.pem");
    let anon = https(&ca_pem, None);
    let url = |i: usize, path: &str| format!("https://127.0.0.1:{}{path}", ports[i]);
    let health = |i: usize| anon.get(url(i, "/health")).send().ok().and_then(|r| r.json::<Value>().ok());
    let both_up = eventually(Duration::from_secs(20), || {
        let h = health(0)?;
        h["nodes"].as_array().is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["up"] == true)).then_some(())
    });
    assert!(both_up.is_some(), "meta-1 sees meta-2 over mTLS: {:?}", health(0));

    // Heartbeats through the relay reach both owners; any node lists them all (a gather).
    let hosts = hostnames(40);
    let beat = |h: &str| {
        let body = json!({"hostname": h, "ip": "10.0.0.1", "realAgents": []}).to_string();
        anon.post(format!("https://{relay_addr}/heartbeat")).body(body).send().map(|r| r.status().as_u16()).unwrap_or(0)
    };
    let relay_ready = eventually(Duration::from_secs(20), || (beat(&hosts[0]) == 200).then_some(()));
    assert!(relay_ready.is_some(), "the relay serves over TLS with the config of the meta nodes");
    hosts.iter().for_each(|h| assert_eq!(beat(h), 200));
    let listed =
        |i: usize| anon.get(url(i, "/status/json/falcon-agent")).send().ok()?.json::<Value>().ok()?["hosts"].as_array().map(Vec::len);
    let gathered = eventually(Duration::from_secs(20), || (listed(0) == Some(40) && listed(1) == Some(40)).then_some(()));
    assert!(gathered.is_some(), "every host listed once by each node: {:?} {:?}", listed(0), listed(1));
    let h = health(0).unwrap();
    assert!((1..40).contains(&h["hosts"].as_u64().unwrap()), "both nodes hold hosts: {h}");

    // Who may call what.
    let status = |client: &reqwest::blocking::Client, path: &str, token: bool| {
        let mut req = client.post(url(0, path)).body("{}");
        if token {
            req = req.bearer_auth(TOKEN);
        }
        req.send().unwrap().status().as_u16()
    };
    let cert = |name: &str| https(&ca_pem, Some(&ca_dir.join(name)));
    assert_eq!(status(&anon, "/internal/batch", true), 403, "the token opens no internal route");
    assert_eq!(status(&anon, "/internal/summary/falcon-agent", true), 403);
    assert_eq!(status(&cert("relay-1"), "/internal/summary/falcon-agent", false), 403, "a relay gathers nothing");
    assert_eq!(status(&cert("meta-3"), "/internal/summary/falcon-agent", false), 403, "a node not in the map is nobody");
    assert_ne!(status(&cert("relay-1"), "/internal/batch", false), 403, "a relay posts batches");
    assert_ne!(status(&cert("meta-2"), "/internal/summary/falcon-agent", false), 403, "a node of the map gathers");
    let (_, metrics) = (0, anon.get(url(0, "/metrics")).send().unwrap().text().unwrap());
    assert!(metrics.contains("ops_meta_peer_refused_total 4"), "{metrics}");
    // A relay posts only its own reports: relay-1's certificate with a report through
    // relay-2 is refused whole, nothing stored.
    let batch = |relay: &str, host: &str| {
        let b = json!({"hosts": [
            {"seen": 1, "relay": "relay-1", "hb": {"hostname": "fake-a", "ip": "10.0.0.9", "realAgents": []}},
            {"seen": 1, "relay": relay, "hb": {"hostname": host, "ip": "10.0.0.9", "realAgents": []}},
        ]});
        let r = cert("relay-1").post(url(0, "/internal/batch")).body(b.to_string()).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (code, body) = batch("relay-2", "fake-b");
    assert_eq!(code, 403, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert!(error["errorMessage"].as_str().unwrap().contains("a report through relay \"relay-2\" in a batch from relay relay-1"), "{body}");
    let host_known = |h: &str| anon.get(url(0, &format!("/status/host/{h}"))).send().unwrap().status().as_u16();
    assert_eq!((host_known("fake-a"), host_known("fake-b")), (404, 404), "nothing of the refused batch is stored");
    // Hosts moved by a membership change come from nodes only: a relay's batch that says so
    // (it would pause meta-1's hand-back) is refused whole.
    let body = json!({"hosts": [{"seen": 1, "relay": "relay-1", "hb": {"hostname": "fake-c", "ip": "10.0.0.9", "realAgents": []}}]});
    let r = cert("relay-1").post(url(0, "/internal/batch")).header("x-ops-moving", "0123").body(body.to_string()).send().unwrap();
    assert_eq!(r.status().as_u16(), 403, "a relay moves no host");
    assert_eq!(host_known("fake-c"), 404);
    // A process whose certificate does not name it does not start.
    let (lc, lk) = (p(&ca_dir.join("meta-3.pem")), p(&ca_dir.join("meta-3.key")));
    let spare = format!("127.0.0.1:{}", reserved_port());
    let (status_wrong, log) = Proc::run_to_exit(
        "meta-node",
        &["--listen", &spare, "--cluster", &cluster, "--id", "meta-2", "--agents", &agents, "--tls-cert", &lc, "--tls-key", &lk],
    );
    assert_eq!(status_wrong.code(), Some(64), "{log}");
    assert!(log.contains("under mtls this process is meta-2.meta.ops-fleet, but the certificate names meta-3.meta.ops-fleet"), "{log}");

    // meta-2's address taken by a process with a certificate of the same CA for meta-3: a
    // real meta node of another map, which puts meta-3 there.
    m2.kill();
    std::fs::write(d.join("impostor.toml"), map.replace("id = \"meta-2\"", "id = \"meta-3\"")).unwrap();
    let impostor_map = p(&d.join("impostor.toml"));
    let (listen, data, c3, k3) = (format!("127.0.0.1:{}", ports[1]), p(&d.join("data-impostor")), lc.clone(), lk.clone());
    let impostor_args = ["--listen", &listen, "--cluster", &impostor_map, "--id", "meta-3", "--agents", &agents, "--data-dir", &data];
    let mut impostor = Proc::start("meta-node", &[&impostor_args[..], &["--tls-cert", &c3, "--tls-key", &k3]].concat());
    impostor.wait_for_log("meta node listening");
    let down = eventually(Duration::from_secs(20), || {
        let h = health(0)?;
        (h["nodes"].as_array()?.iter().any(|n| n["id"] == "meta-2" && n["up"] == false)).then_some(())
    });
    assert!(down.is_some(), "meta-1 does not believe the impostor: {:?}", health(0));
    hosts.iter().for_each(|h| assert_eq!(beat(h), 200));
    let held = eventually(Duration::from_secs(20), || (listed(0) == Some(40)).then_some(()));
    assert!(held.is_some(), "meta-1 holds every host, copies included: {:?}", listed(0));
    let impostor_metrics = anon.get(url(1, "/metrics")).send().unwrap().text().unwrap();
    assert!(!impostor_metrics.contains("ops_meta_batches_received_total{"), "the impostor got no batch: {impostor_metrics}");
    assert!(!impostor_metrics.contains("ops_meta_status_requests_total{"), "and no gather: {impostor_metrics}");
}
