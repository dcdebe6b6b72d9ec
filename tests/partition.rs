//! Partitions (issue 24): three meta nodes and two relays, each in a network namespace of its
//! own made here (`ops_e2e::netns`: veth to a bridge, 10.77.0.0/24), under mutual TLS with
//! signed documents, as a production cluster runs. The test's clients live in a namespace of
//! their own too. Schedules, each followed by healing:
//!
//! 1. one meta node cut off from everyone, and a config applied on each side;
//! 2. two applies at once from two nodes;
//! 3. the coordinator of a membership change cut off between prepare and commit (the test
//!    sends the coordinator's steps with meta-1's certificate, so the cut falls exactly there);
//! 4. a process on a dead node's address, and a relay's certificate used for what it may not do.
//!
//! Checked throughout: no node or relay ever serves a config or map version lower than one it
//! served (a monitor polls every `/health`); after healing and a probe period every node and
//! relay serves the highest signed version; every host is listed exactly once by every node.
//! `OPS_PARTITION_ROUNDS=N` repeats schedules 1-3 N times (the longer run, docs/security.md).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ops_e2e::netns::Net;
use ops_e2e::{Proc, eventually, opsctl};
use serde_json::{Value, json};

const TOKEN: &str = "partition-test-token-0123456789abcdef";
/// Members of the network: the test's clients, three meta nodes, two relays.
const CTL: usize = 0;
const METAS: [usize; 3] = [1, 2, 3];
const RELAYS: [usize; 2] = [4, 5];
const META_PORT: u16 = 7000;
const RELAY_PORT: u16 = 7100;
/// How long a healed cluster may take to agree: a few probe periods (1 s) and relay polls.
const SETTLE: Duration = Duration::from_secs(15);

/// The example `agents.toml` with falcon-agent's default at `default_version`.
fn agents(default_version: &str) -> String {
    let example = std::fs::read_to_string(ops_e2e::workspace_root().join("config/examples/agents.toml")).unwrap();
    let default = "default = { version = \"5.1.3\",";
    assert!(example.contains(default), "config/examples/agents.toml gives falcon-agent 5.1.3");
    example.replacen(default, &format!("default = {{ version = \"{default_version}\","), 1)
}

fn p(x: &Path) -> String {
    x.display().to_string()
}

/// The cluster: its processes first, so they stop before their namespaces go.
struct Fleet {
    metas: Vec<Option<Proc>>,
    relays: Vec<Proc>,
    net: Net,
    dir: tempfile::TempDir,
    map: String,
    hosts: Vec<String>,
}

impl Fleet {
    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn meta_url(&self, i: usize, path: &str) -> String {
        format!("https://{}:{META_PORT}{path}", self.net.addr(METAS[i]))
    }

    fn relay_url(&self, j: usize, path: &str) -> String {
        format!("https://{}:{RELAY_PORT}{path}", self.net.addr(RELAYS[j]))
    }

    /// Signs `text` as the operator at `version` (`opsctl sign`): the signed text and its
    /// signature in header form.
    fn sign(&self, name: &str, text: &str, version: u64) -> (String, String) {
        let file = self.d().join("op").join(name);
        std::fs::write(&file, text).unwrap();
        let (key, v) = (p(&self.d().join("operator.key")), version.to_string());
        let (code, out, err) = opsctl(&["sign", "--key", &key, "--version", &v, "--expires", "30d", &p(&file)]);
        assert_eq!(code, 0, "opsctl sign {name}: {out}{err}");
        let sig = std::fs::read_to_string(ops_config::trust::signature_path(&file)).unwrap();
        (std::fs::read_to_string(&file).unwrap(), ops_config::trust::signature_header(&sig))
    }

    /// `--listen`, `--cluster`, `--id`, `--data-dir`, its certificate, the operator's key and
    /// a short flush: what every process of member `member` named `id` (files in `sub/`) is
    /// started with.
    fn common_args(&self, member: usize, port: u16, id: &str, sub: &str) -> Vec<String> {
        let (files, ca) = (self.d().join(sub), self.d().join("ca"));
        [
            ("--listen", format!("{}:{port}", self.net.addr(member))),
            ("--cluster", p(&files.join("cluster.toml"))),
            ("--id", id.to_owned()),
            ("--data-dir", p(&files.join("data"))),
            ("--tls-cert", p(&ca.join(format!("{id}.pem")))),
            ("--tls-key", p(&ca.join(format!("{id}.key")))),
            ("--trusted-keys-file", p(&self.d().join("operator.key.pub"))),
            ("--flush-ms", "100".to_owned()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }

    fn start_meta(&mut self, i: usize) {
        let sub = format!("m{}", i + 1);
        let mut args = self.common_args(METAS[i], META_PORT, &format!("meta-{}", i + 1), &sub);
        let agents = p(&self.d().join(&sub).join("agents.toml"));
        let more = ["--agents", &agents, "--snapshot-interval-seconds", "1", "--sweep-interval-seconds", "1", "--peer-timeout-ms", "2000"];
        args.extend(more.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = self.net.start(METAS[i], "meta-node", &args);
        proc.wait_for_log("meta node listening");
        self.metas[i] = Some(proc);
    }

    fn start_relay(&mut self, j: usize) {
        let mut args = self.common_args(RELAYS[j], RELAY_PORT, &format!("relay-{}", j + 1), &format!("r{}", j + 1));
        args.extend(["--config-poll-ms", "200", "--request-timeout-ms", "1000"].iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = self.net.start(RELAYS[j], "relay", &args);
        proc.wait_for_log("relay listening");
        self.relays.push(proc);
    }
}

/// Writes `text` and its signature (header form) as `file` and `file.sig`.
fn put_signed(file: &Path, text: &str, sig_header: &str) {
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, text).unwrap();
    std::fs::write(ops_config::trust::signature_path(file), ops_config::trust::signature_file(sig_header)).unwrap();
}

/// An HTTPS client trusting only the cluster CA, showing `cert` (`ca/NAME.pem`) when given.
fn https(dir: &Path, cert: Option<&str>) -> reqwest::blocking::Client {
    let ca = std::fs::read(dir.join("ca/ca.pem")).unwrap();
    let mut b = reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(Duration::from_secs(5));
    if let Some(name) = cert {
        let mut pem = std::fs::read(dir.join(format!("ca/{name}.pem"))).unwrap();
        pem.extend(std::fs::read(dir.join(format!("ca/{name}.key"))).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

fn get(client: &reqwest::blocking::Client, url: &str) -> Option<Value> {
    client.get(url).timeout(Duration::from_secs(2)).send().ok()?.json().ok()
}

/// POSTs `body` (with `headers`): status and JSON answer.
fn post(client: &reqwest::blocking::Client, url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client.post(url).body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Polls every meta node's and relay's `/health` until `stop`; a version lower than one the
/// same process served before is recorded as a violation.
fn monitor(client: reqwest::blocking::Client, urls: Vec<(String, String)>, stop: Arc<AtomicBool>, violations: Arc<Mutex<Vec<String>>>) {
    let mut highest: Vec<(u64, u64)> = vec![(0, 0); urls.len()];
    while !stop.load(Ordering::Relaxed) {
        for (k, (name, url)) in urls.iter().enumerate() {
            let Some(h) = get(&client, url) else { continue };
            // Meta nodes: configGeneration is the signed version; relays: configVersion.
            let config = h["configVersion"].as_u64().or(h["configGeneration"].as_u64()).unwrap_or(0);
            let map = h["clusterGeneration"].as_u64().unwrap_or(0);
            let (hc, hm) = highest[k];
            if config < hc || map < hm {
                violations.lock().unwrap().push(format!("{name} served config {config} after {hc}, map {map} after {hm}"));
            }
            highest[k] = (hc.max(config), hm.max(map));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One heartbeat per host, through the relays in turn; every one answered.
fn beat_all(f: &Fleet, client: &reqwest::blocking::Client) {
    for (i, h) in f.hosts.iter().enumerate() {
        let body = json!({"hostname": h, "ip": "10.0.0.1", "realAgents": [
            {"name": "falcon-agent", "version": "5.1.3", "status": "started", "timestamp": 1}]});
        let (status, reply) = post(client, &f.relay_url(i % 2, "/heartbeat"), &body.to_string(), &[]);
        assert_eq!(status, 200, "{h}: {reply}");
    }
}

/// Whether meta node `i` lists every host exactly once, in a whole (not partial) answer.
fn listed_once(f: &Fleet, client: &reqwest::blocking::Client, i: usize, partial_ok: bool) -> Result<(), String> {
    let r = client.get(f.meta_url(i, "/status/text/falcon-agent")).send().map_err(|e| e.to_string())?;
    let partial = r.headers().get("x-ops-partial").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = r.text().map_err(|e| e.to_string())?;
    let mut names: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split('\t').next().unwrap_or("")).collect();
    names.sort();
    let mut want: Vec<&str> = f.hosts.iter().map(String::as_str).collect();
    want.sort();
    if partial.as_deref() != Some("false") && !partial_ok {
        return Err(format!("partial: {partial:?}"));
    }
    if names != want {
        return Err(format!(
            "listed {} hosts ({} distinct), want {}",
            names.len(),
            names.iter().collect::<std::collections::BTreeSet<_>>().len(),
            want.len()
        ));
    }
    Ok(())
}

/// Waits until every meta node running lists every host once, in a whole answer when all
/// three run (from the failover copies of a dead node's hosts otherwise).
fn all_listed_once(f: &Fleet, client: &reqwest::blocking::Client, when: &str) {
    let partial_ok = f.metas.iter().any(Option::is_none);
    for i in (0..3).filter(|&i| f.metas[i].is_some()) {
        let ok = eventually(SETTLE, || listed_once(f, client, i, partial_ok).ok());
        assert!(ok.is_some(), "{when}: meta-{} lists every host once: {:?}", i + 1, listed_once(f, client, i, partial_ok));
    }
}

/// What every meta node, then every relay, says in `/health` (None: no answer).
fn healths(f: &Fleet, client: &reqwest::blocking::Client) -> Vec<Option<Value>> {
    let metas = (0..3).map(|i| f.meta_url(i, "/health"));
    let relays = (0..2).map(|j| f.relay_url(j, "/health"));
    metas.chain(relays).map(|url| get(client, &url)).collect()
}

/// (config version, config hash) of every meta node, then every relay.
fn served_configs(f: &Fleet, client: &reqwest::blocking::Client) -> Vec<Option<(u64, String)>> {
    let served = |h: Value| Some((h["configVersion"].as_u64().or(h["configGeneration"].as_u64())?, h["configHash"].as_str()?.to_owned()));
    healths(f, client).into_iter().map(|h| h.and_then(served)).collect()
}

/// (map generation, map hash) of every meta node, then every relay.
fn served_maps(f: &Fleet, client: &reqwest::blocking::Client) -> Vec<Option<(u64, String)>> {
    let served = |h: Value| Some((h["clusterGeneration"].as_u64()?, h["clusterHash"].as_str()?.to_owned()));
    healths(f, client).into_iter().map(|h| h.and_then(served)).collect()
}

/// Waits until every process serves config `version` of `text`.
fn converge_config(f: &Fleet, client: &reqwest::blocking::Client, version: u64, text: &str, when: &str) {
    let want = Some((version, ops_config::content_hash(text.as_bytes())));
    let ok = eventually(SETTLE, || served_configs(f, client).iter().all(|s| *s == want).then_some(()));
    assert!(ok.is_some(), "{when}: every node and relay serves config version {version}: {:?}", served_configs(f, client));
}

fn meta_config(f: &Fleet, client: &reqwest::blocking::Client, i: usize) -> Option<u64> {
    get(client, &f.meta_url(i, "/health"))?["configGeneration"].as_u64()
}

/// Waits until meta node `i` counts the nodes `down` (ids) as down and the others up.
fn sees_down(f: &Fleet, client: &reqwest::blocking::Client, i: usize, down: &[&str]) {
    let ok = eventually(SETTLE, || {
        let h = get(client, &f.meta_url(i, "/health"))?;
        h["nodes"].as_array()?.iter().all(|n| (n["up"] == false) == down.contains(&n["id"].as_str().unwrap_or(""))).then_some(())
    });
    assert!(ok.is_some(), "meta-{} sees {down:?} down: {:?}", i + 1, get(client, &f.meta_url(i, "/health")));
}

fn apply(f: &Fleet, client: &reqwest::blocking::Client, i: usize, signed: &(String, String), expect: &str) -> (u16, Value) {
    let url = f.meta_url(i, &format!("/config/apply?expect={expect}"));
    let auth = format!("Bearer {TOKEN}");
    post(client, &url, &signed.0, &[(ops_config::trust::SIGNATURE_HEADER, &signed.1), ("authorization", &auth)])
}

/// The files a meta node keeps of its documents.
fn files(f: &Fleet, i: usize) -> Vec<Vec<u8>> {
    let m = f.d().join(format!("m{}", i + 1));
    let (a, c) = (m.join("agents.toml"), m.join("cluster.toml"));
    [a.clone(), ops_config::trust::signature_path(&a), c.clone(), ops_config::trust::signature_path(&c)]
        .iter()
        .map(|x| std::fs::read(x).unwrap())
        .collect()
}

#[test]
fn partitions_heal_to_the_highest_signed_version_and_lose_no_host() {
    // Build before leaving the machine's own namespace.
    for bin in ["meta-node", "relay", "opsctl"] {
        ops_e2e::binary(bin);
    }
    let mut f = Fleet {
        metas: vec![None, None, None],
        relays: Vec::new(),
        net: Net::new(&["ctl", "m1", "m2", "m3", "r1", "r2"]),
        dir: tempfile::tempdir().unwrap(),
        map: String::new(),
        hosts: (0..120).map(|i| format!("host-{i:04}")).collect(),
    };
    let d = f.d().to_path_buf();
    let ca = p(&d.join("ca"));
    assert_eq!(opsctl(&["ca", "init", "--dir", &ca]).0, 0);
    for (kind, id, member) in
        [("--node", "meta-1", 1), ("--node", "meta-2", 2), ("--node", "meta-3", 3), ("--relay", "relay-1", 4), ("--relay", "relay-2", 5)]
    {
        let ip = f.net.addr(member).to_string();
        let (code, out, err) = opsctl(&["ca", "issue", "--dir", &ca, kind, id, "--san", &ip]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, err) = opsctl(&["keygen", "--out", &p(&d.join("operator.key"))]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(d.join("cluster.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::create_dir_all(d.join("op")).unwrap();
    f.map = format!(
        "tls = true\nmtls = true\nca_file = \"{}\"\ntoken_file = \"{}\"\nvnodes = 1000\n",
        p(&d.join("ca/ca.pem")),
        p(&d.join("cluster.token"))
    );
    for (i, &m) in METAS.iter().enumerate() {
        let node = format!("[[node]]\nid = \"meta-{}\"\naddr = \"{}:{META_PORT}\"\n", i + 1, f.net.addr(m));
        f.map.push_str(&node);
    }
    let map_v1 = f.sign("cluster.toml", &f.map, 1);
    let config_v1 = f.sign("agents.toml", &agents("5.1.3"), 1);
    for i in 0..3 {
        let m = f.d().join(format!("m{}", i + 1));
        put_signed(&m.join("cluster.toml"), &map_v1.0, &map_v1.1);
        put_signed(&m.join("agents.toml"), &config_v1.0, &config_v1.1);
    }
    for j in 0..2 {
        put_signed(&f.d().join(format!("r{}/cluster.toml", j + 1)), &map_v1.0, &map_v1.1);
    }
    for i in 0..3 {
        f.start_meta(i);
    }
    for j in 0..2 {
        f.start_relay(j);
    }

    // From here this thread (and every thread it starts) is on the test's own host.
    f.net.enter(CTL);
    let client = https(f.d(), None);
    for i in 0..3 {
        sees_down(&f, &client, i, &[]);
    }
    converge_config(&f, &client, 1, &config_v1.0, "at start");
    let stop = Arc::new(AtomicBool::new(false));
    let violations: Arc<Mutex<Vec<String>>> = Default::default();
    let urls: Vec<(String, String)> = (0..3)
        .map(|i| (format!("meta-{}", i + 1), f.meta_url(i, "/health")))
        .chain((0..2).map(|j| (format!("relay-{}", j + 1), f.relay_url(j, "/health"))))
        .collect();
    let watcher = {
        let (c, s, v) = (client.clone(), stop.clone(), violations.clone());
        std::thread::spawn(move || monitor(c, urls, s, v))
    };
    beat_all(&f, &client);
    all_listed_once(&f, &client, "at start");

    let rounds: u64 = std::env::var("OPS_PARTITION_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let (mut config, mut config_version, mut map_version) = (config_v1, 1u64, 1u64);
    for round in 0..rounds {
        // 1. meta-3 cut off from every other process; an apply on each side.
        f.net.isolate(METAS[2], &[METAS[0], METAS[1], RELAYS[0], RELAYS[1]]);
        sees_down(&f, &client, 0, &["meta-3"]);
        sees_down(&f, &client, 2, &["meta-1", "meta-2"]);
        beat_all(&f, &client);
        let expect = ops_config::content_hash(config.0.as_bytes());
        let majority = f.sign("agents.toml", &agents(&format!("5.2.{round}")), config_version + 1);
        let (status, r) = apply(&f, &client, 0, &majority, &expect);
        assert_eq!(status, 200, "{r}");
        assert_eq!((r["generation"].as_u64(), r["missingNodes"].clone()), (Some(config_version + 1), json!(["meta-3"])), "{r}");
        let minority = f.sign("agents.toml", &agents(&format!("5.3.{round}")), config_version + 2);
        let (status, r) = apply(&f, &client, 2, &minority, &expect);
        assert_eq!(status, 200, "{r}");
        assert_eq!((r["generation"].as_u64(), r["missingNodes"].clone()), (Some(config_version + 2), json!(["meta-1", "meta-2"])), "{r}");
        let sides = eventually(SETTLE, || {
            let s: Vec<Option<u64>> = (0..3).map(|i| meta_config(&f, &client, i)).collect();
            (s == [Some(config_version + 1), Some(config_version + 1), Some(config_version + 2)]).then_some(())
        });
        assert!(sides.is_some(), "each side serves what it applied: {:?}", served_configs(&f, &client));
        beat_all(&f, &client);
        f.net.heal();
        converge_config(&f, &client, config_version + 2, &minority.0, "after healing an isolated node");
        beat_all(&f, &client);
        all_listed_once(&f, &client, "after healing an isolated node");
        (config, config_version) = (minority, config_version + 2);

        // 2. Two applies at once, from two nodes: the higher version is served everywhere.
        let expect = ops_config::content_hash(config.0.as_bytes());
        let first = f.sign("agents.toml", &agents(&format!("5.4.{round}")), config_version + 1);
        let second = f.sign("agents.toml", &agents(&format!("5.5.{round}")), config_version + 2);
        let applies = std::thread::scope(|s| {
            let a = s.spawn(|| apply(&f, &client, 0, &first, &expect));
            let b = s.spawn(|| apply(&f, &client, 1, &second, &expect));
            (a.join().unwrap(), b.join().unwrap())
        });
        // Each either wrote (200, or 502 when a node had taken the other's higher version
        // first) or changed nothing (409: the other changed the config it diffed against;
        // 422: a node held a higher version at the check). The highest written wins.
        let mut written = Vec::new();
        for ((status, r), signed, version) in [(&applies.0, &first, config_version + 1), (&applies.1, &second, config_version + 2)] {
            match status {
                200 | 502 => written.push((version, signed.clone())),
                409 | 422 => {}
                _ => panic!("apply of version {version}: {status} {r}"),
            }
        }
        let (version, winner) = written.into_iter().max_by_key(|(v, _)| *v).expect("one of two applies at once is written");
        converge_config(&f, &client, version, &winner.0, "after two applies at once");
        (config, config_version) = (winner, config_version + 2);

        // 3. A membership change whose coordinator (meta-1) is cut off between prepare and
        //    commit: it commits alone; the others hold the map prepared until they can see it.
        map_version += 1;
        let vnodes = if map_version % 2 == 0 { 500 } else { 1000 };
        let next_map = f.sign("cluster.toml", &f.map.replace("vnodes = 1000", &format!("vnodes = {vnodes}")), map_version);
        let next_hash = ops_config::content_hash(next_map.0.as_bytes());
        let coordinator = https(f.d(), Some("meta-1"));
        for i in 0..3 {
            let (status, r) = post(
                &coordinator,
                &f.meta_url(i, "/internal/cluster/prepare"),
                &next_map.0,
                &[(ops_config::trust::SIGNATURE_HEADER, &next_map.1)],
            );
            assert_eq!(status, 200, "prepare on meta-{}: {r}", i + 1);
        }
        f.net.isolate(METAS[0], &[METAS[1], METAS[2], RELAYS[0], RELAYS[1]]);
        let commit = f.meta_url(0, &format!("/internal/cluster/commit?generation={map_version}"));
        let (status, r) = post(&coordinator, &commit, &next_hash, &[]);
        assert_eq!((status, r["generation"].as_u64()), (200, Some(map_version)), "{r}");
        let (status, r) = post(&coordinator, &f.meta_url(0, "/internal/cluster/finish"), &next_hash, &[]);
        assert_eq!(status, 200, "{r}");
        sees_down(&f, &client, 1, &["meta-1"]);
        let maps = served_maps(&f, &client);
        assert_eq!(maps[0], Some((map_version, next_hash.clone())), "the coordinator serves the new map: {maps:?}");
        assert!(maps[1..3].iter().all(|m| m.as_ref().is_some_and(|m| m.0 == map_version - 1)), "the others do not yet: {maps:?}");
        beat_all(&f, &client);
        f.net.heal();
        let want = Some((map_version, next_hash.clone()));
        let healed = eventually(SETTLE, || served_maps(&f, &client).iter().all(|m| *m == want).then_some(()));
        assert!(healed.is_some(), "after healing every node and relay serves map {map_version}: {:?}", served_maps(&f, &client));
        beat_all(&f, &client);
        all_listed_once(&f, &client, "after the coordinator's partition");
    }

    // 4. meta-3 dies and something else answers on its address, in its namespace: it offers
    //    ever newer generations in plain HTTP and records whatever anyone sends it.
    let before: Vec<Vec<Vec<u8>>> = (0..2).map(|i| files(&f, i)).collect();
    let served_before = (served_configs(&f, &client), served_maps(&f, &client));
    f.metas[2].take().unwrap().kill();
    let received: Arc<Mutex<Vec<u8>>> = Default::default();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let ns = PathBuf::from("/run/netns").join(f.net.ns(METAS[2]));
        let addr = format!("{}:{META_PORT}", f.net.addr(METAS[2]));
        let (rx, count) = (received.clone(), connections.clone());
        let ready = Arc::new(AtomicBool::new(false));
        let up = ready.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(ns).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = std::net::TcpListener::bind(&addr).unwrap();
            up.store(true, Ordering::Relaxed);
            let mut generation = 1000u64;
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                count.fetch_add(1, Ordering::Relaxed);
                s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let mut buf = [0u8; 16384];
                let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
                rx.lock().unwrap().extend_from_slice(&buf[..n]);
                generation += 1;
                let body = json!({"id": "meta-3", "status": "ok", "configGeneration": generation, "clusterGeneration": generation,
                    "configHash": "f", "clusterHash": "f"})
                .to_string();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = std::io::Write::write_all(&mut s, head.as_bytes());
                let _ = std::io::Write::write_all(&mut s, body.as_bytes());
            }
        });
        assert!(eventually(SETTLE, || ready.load(Ordering::Relaxed).then_some(())).is_some(), "the fake listens");
    }
    let probed = eventually(SETTLE, || (connections.load(Ordering::Relaxed) >= 6).then_some(()));
    assert!(probed.is_some(), "the nodes and relays knocked on the fake: {}", connections.load(Ordering::Relaxed));
    sees_down(&f, &client, 0, &["meta-3"]);
    let got = received.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(!text.contains(&TOKEN.to_ascii_lowercase()) && !text.contains("authorization"), "the fake got no credential");
    // A relay's certificate opens batches and the rollout state, and nothing that writes.
    let relay_cert = https(f.d(), Some("relay-1"));
    let config_write = f.meta_url(0, "/internal/config/write?generation=999");
    let (status, r) = post(&relay_cert, &config_write, &config.0, &[(ops_config::trust::SIGNATURE_HEADER, &config.1)]);
    assert_eq!(status, 403, "{r}");
    let (status, r) = post(&relay_cert, &f.meta_url(0, "/internal/cluster/prepare"), &map_v1.0, &[]);
    assert_eq!(status, 403, "{r}");
    let (status, r) = post(
        &relay_cert,
        &f.meta_url(0, &format!("/config/apply?expect={}", ops_config::content_hash(config.0.as_bytes()))),
        &config.0,
        &[],
    );
    assert_eq!(status, 401, "no token, no apply: {r}");
    let stolen =
        json!({"hosts": [{"seen": u32::MAX - 1, "relay": "relay-2", "hb": {"hostname": "host-0000", "ip": "6.6.6.6", "realAgents": []}}]});
    let (status, r) = post(&relay_cert, &f.meta_url(0, "/internal/batch"), &stolen.to_string(), &[]);
    assert_eq!(status, 403, "a relay reports only as itself: {r}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!((0..2).map(|i| files(&f, i)).collect::<Vec<_>>(), before, "meta-1's and meta-2's files are as they were");
    let served_after = (served_configs(&f, &client), served_maps(&f, &client));
    assert_eq!(served_after.0[..2], served_before.0[..2], "configs served as before");
    assert_eq!(served_after.1[..2], served_before.1[..2], "maps served as before");
    assert_eq!(served_after.0[3..], served_before.0[3..], "the relays too");
    beat_all(&f, &client);
    all_listed_once(&f, &client, "with meta-3's address taken");

    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let v = violations.lock().unwrap().clone();
    assert!(v.is_empty(), "a process served a lower version than it had served: {v:?}");
}
