//! A cluster of real meta nodes and relays for the end-to-end tests, and headless Chromium.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ops_config::ClusterMap;

use crate::{Meta, Relay, eventually, get_json, reserved_port};

/// The cluster token every test cluster uses.
pub const TOKEN: &str = "test-cluster-token-0123456789abcdef";

/// Meta nodes and relays of one test on loopback, with their files in a temporary dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    pub metas: Vec<Option<Meta>>,
    pub relays: Vec<Relay>,
    /// The agents.toml every node starts with.
    pub agents: String,
    /// Extra flags of every meta node started.
    pub meta_args: Vec<String>,
    /// Extra flags of every relay started.
    pub relay_args: Vec<String>,
    /// The operator's secret key (`opsctl keygen`), when the cluster's documents are signed.
    pub key: Option<PathBuf>,
}

impl Cluster {
    pub fn cluster_file(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    pub fn agents_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agents-{}.toml", i + 1))
    }

    /// Writes the files for `metas` meta nodes (not started).
    pub fn files(metas: usize, agents: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.token"), format!("{TOKEN}\n")).unwrap();
        let ports: Vec<u16> = (0..metas).map(|_| reserved_port()).collect();
        let mut toml = String::from("vnodes = 1000\ntoken_file = \"cluster.token\"\n");
        for (i, p) in ports.iter().enumerate() {
            toml.push_str(&format!("[[node]]\nid = \"meta-{}\"\naddr = \"127.0.0.1:{p}\"\n", i + 1));
            std::fs::write(dir.path().join(format!("agents-{}.toml", i + 1)), agents).unwrap();
        }
        std::fs::write(dir.path().join("cluster.toml"), toml).unwrap();
        Cluster {
            dir,
            ports,
            metas: (0..metas).map(|_| None).collect(),
            relays: Vec::new(),
            agents: agents.to_owned(),
            meta_args: Vec::new(),
            relay_args: Vec::new(),
            key: None,
        }
    }

    /// [`files`](Self::files), signed by an operator key made here: every node's agents file
    /// and the cluster map are signed at version 1 (`opsctl sign`), and every meta node and
    /// relay started trusts only that key.
    pub fn signed_files(metas: usize, agents: &str) -> Cluster {
        let mut c = Cluster::files(metas, agents);
        let key = c.dir.path().join("operator.key");
        let (code, out, err) = crate::opsctl(&["keygen", "--out", &key.display().to_string()]);
        assert_eq!(code, 0, "{out}{err}");
        c.key = Some(key.clone());
        let trust = format!("--trusted-keys-file={}.pub", key.display());
        c.meta_args.push(trust.clone());
        c.relay_args.push(trust);
        c.sign_agents(&[]);
        c.sign(&c.cluster_file(), &[]);
        c
    }

    /// Signs `file` with the cluster's key (`opsctl sign`, with `args` added); returns the
    /// signed text.
    pub fn sign(&self, file: &Path, args: &[&str]) -> String {
        let key = self.key.as_ref().expect("a signed cluster").display().to_string();
        let file_arg = file.display().to_string();
        let mut all = vec!["sign", "--key", &key];
        all.extend_from_slice(args);
        all.push(&file_arg);
        let (code, out, err) = crate::opsctl(&all);
        assert_eq!(code, 0, "opsctl sign {}: {out}{err}", file.display());
        std::fs::read_to_string(file).unwrap()
    }

    /// Signs meta-1's agents file (with `args`) and gives every node the same file and
    /// signature; the signed text becomes [`agents`](Self::agents).
    pub fn sign_agents(&mut self, args: &[&str]) {
        self.agents = self.sign(&self.agents_file(0), args);
        let sig = std::fs::read(ops_config::trust::signature_path(&self.agents_file(0))).unwrap();
        for i in 1..self.metas.len() {
            std::fs::write(self.agents_file(i), &self.agents).unwrap();
            std::fs::write(ops_config::trust::signature_path(&self.agents_file(i)), &sig).unwrap();
        }
    }

    /// Rewrites the shared `cluster.toml` with the meta nodes `nodes` (indexes, numbered from
    /// 0 as `meta-{i+1}`): what an operator edits before a membership change.
    pub fn write_map(&self, nodes: &[usize]) -> String {
        let mut toml = String::from("vnodes = 1000\ntoken_file = \"cluster.token\"\n");
        for &i in nodes {
            toml.push_str(&format!("[[node]]\nid = \"meta-{}\"\naddr = \"127.0.0.1:{}\"\n", i + 1, self.ports[i]));
        }
        std::fs::write(self.cluster_file(), &toml).unwrap();
        toml
    }

    /// Adds a meta node's port and agents file (not started, not in the map yet); returns its
    /// index.
    pub fn add_meta(&mut self) -> usize {
        self.ports.push(reserved_port());
        self.metas.push(None);
        let i = self.metas.len() - 1;
        std::fs::write(self.agents_file(i), &self.agents).unwrap();
        i
    }

    /// Starts every meta node of the map. If another program took a port, stops those that
    /// started and moves the whole cluster to new ports once, saying so.
    pub fn start_metas(&mut self) {
        let n = self.metas.len();
        match (0..n).try_for_each(|i| self.try_start_meta(i)) {
            Ok(()) => {}
            Err(log) if ops_loopback::is_addr_in_use(&log) && self.relays.is_empty() => {
                self.move_to_new_ports(&log);
                (0..n).for_each(|i| self.try_start_meta(i).unwrap_or_else(|e| panic!("meta-{} on a new port: {e}", i + 1)));
            }
            Err(log) => panic!("a meta node did not start: {log}"),
        }
    }

    /// Starts meta node `i` on its port in the map. If another program took the port and
    /// nothing of this cluster runs yet, moves every node to new ports once and says so.
    pub fn start_meta(&mut self, i: usize) {
        match self.try_start_meta(i) {
            Ok(()) => {}
            Err(log) if ops_loopback::is_addr_in_use(&log) && self.running().count() == 0 && self.relays.is_empty() => {
                self.move_to_new_ports(&log);
                self.try_start_meta(i).unwrap_or_else(|e| panic!("meta-{} on a new port: {e}", i + 1));
            }
            Err(log) => panic!("meta-{} did not start on port {}: {log}", i + 1, self.ports[i]),
        }
    }

    /// Starts meta node `i`; its log when it exits before listening.
    fn try_start_meta(&mut self, i: usize) -> Result<(), String> {
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let id = format!("meta-{}", i + 1);
        let (cluster, agents) = (self.cluster_file().display().to_string(), self.agents_file(i).display().to_string());
        let data = self.dir.path().join(format!("data-{id}")).display().to_string();
        let mut args: Vec<&str> = vec![
            "--cluster",
            &cluster,
            "--id",
            &id,
            "--agents",
            &agents,
            "--data-dir",
            &data,
            "--flush-ms",
            "100",
            "--snapshot-interval-seconds",
            "1",
            "--sweep-interval-seconds",
            "1",
            "--peer-timeout-ms",
            "2000",
        ];
        args.extend(self.meta_args.iter().map(String::as_str));
        self.metas[i] = Some(Meta::try_start_at(&listen, &args)?);
        Ok(())
    }

    /// Reserved ports are below the ephemeral range and locked against every other pick: only
    /// an unrelated program binding a fixed port can take one. Then every node gets a new
    /// reserved port and `cluster.toml` is rewritten with them (the same nodes, the same
    /// order), with the reason on stderr; only while no node or relay runs, and with the data
    /// dirs of nodes that ran under the old map cleared.
    fn move_to_new_ports(&mut self, why: &str) {
        eprintln!(
            "a port of this test cluster ({:?}) was taken by another program; moving the cluster to new ports once:\n{why}",
            self.ports
        );
        for (i, m) in self.metas.iter_mut().enumerate() {
            *m = None;
            let _ = std::fs::remove_dir_all(self.dir.path().join(format!("data-meta-{}", i + 1)));
        }
        let mut map = std::fs::read_to_string(self.cluster_file()).unwrap();
        for port in &mut self.ports {
            let new = reserved_port();
            map = map.replace(&format!("\"127.0.0.1:{port}\""), &format!("\"127.0.0.1:{new}\""));
            *port = new;
        }
        std::fs::write(self.cluster_file(), map).unwrap();
    }

    fn new_relay(&self, i: usize) -> Relay {
        let (cluster, data) =
            (self.cluster_file().display().to_string(), self.dir.path().join(format!("relay-{}", i + 1)).display().to_string());
        let id = format!("relay-{}", i + 1);
        let mut args = vec![
            "--cluster",
            &cluster,
            "--id",
            &id,
            "--data-dir",
            &data,
            "--flush-ms",
            "100",
            "--config-poll-ms",
            "200",
            "--request-timeout-ms",
            "1000",
        ];
        args.extend(self.relay_args.iter().map(String::as_str));
        Relay::start(&args)
    }

    /// Starts relay `i` (numbered from 0, id `relay-{i+1}`, data in `relay-{i+1}/`).
    pub fn start_relay(&mut self, i: usize) -> usize {
        let relay = self.new_relay(i);
        self.relays.push(relay);
        self.relays.len() - 1
    }

    /// Kills relay `i` (SIGKILL), if it still runs, and starts it again on its data dir (a
    /// new port).
    pub fn restart_relay(&mut self, i: usize) {
        self.relays[i].proc.kill();
        self.relays[i] = self.new_relay(i);
    }

    pub fn meta(&self, i: usize) -> &Meta {
        self.metas[i].as_ref().expect("meta running")
    }

    pub fn running(&self) -> impl Iterator<Item = &Meta> {
        self.metas.iter().flatten()
    }

    /// Starts `metas` meta nodes and `relays` relays and waits for the relays' config.
    pub fn up(metas: usize, relays: usize, agents: &str) -> Cluster {
        Cluster::up_with(metas, relays, agents, &[])
    }

    /// [`up`](Self::up) with extra meta-node flags.
    pub fn up_with(metas: usize, relays: usize, agents: &str, meta_args: &[&str]) -> Cluster {
        let mut c = Cluster::files(metas, agents);
        c.meta_args = meta_args.iter().map(|s| s.to_string()).collect();
        c.start_all(relays);
        c
    }

    /// [`up`](Self::up) with every document signed ([`signed_files`](Self::signed_files)).
    pub fn up_signed(metas: usize, relays: usize, agents: &str) -> Cluster {
        let mut c = Cluster::signed_files(metas, agents);
        c.start_all(relays);
        c
    }

    /// Starts every meta node and `relays` relays, and waits until the nodes see each other
    /// and the relays hold the config.
    pub fn start_all(&mut self, relays: usize) {
        let c = self;
        c.start_metas();
        // A node started before its peers listened counts them down until its next probe
        // (1 s): wait until every node sees every other, or a first status answer is partial.
        for m in c.running() {
            let all_up = eventually(Duration::from_secs(20), || {
                let nodes = get_json(&m.url("/health")).1["nodes"].clone();
                nodes.as_array().is_some_and(|n| n.iter().all(|n| n["up"] == true)).then_some(())
            });
            assert!(all_up.is_some(), "every meta node sees its peers up");
        }
        for i in 0..relays {
            c.start_relay(i);
        }
        for r in &c.relays {
            let got = eventually(Duration::from_secs(20), || get_json(&r.url("/health")).1["configHash"].as_str().map(str::to_owned));
            assert_eq!(got.as_deref(), Some(ops_config::content_hash(c.agents.as_bytes()).as_str()), "relay got the config");
        }
    }

    pub fn ring_counts(&self, hosts: &[String]) -> Vec<u64> {
        let map = ClusterMap::load(&self.cluster_file()).unwrap();
        let ring = map.ring();
        let mut counts = vec![0u64; map.nodes.len()];
        for h in hosts {
            counts[ring.owner(h)] += 1;
        }
        counts
    }
}

/// Headless Chromium (Debian's `chromium`; `.ci/run` installs it), as the probes here run it.
pub fn chromium(args: &[&str]) -> String {
    let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is not installed: apt-get install -y chromium (see README)");
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=5000")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().expect("start chromium");
    // Bound its time: a hung browser must not hang the suite.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

/// The text of the first element carrying `marker` (an attribute or class), up to its close.
pub fn figure_after<'a>(dom: &'a str, marker: &str, inner: &str) -> &'a str {
    let at = dom.find(marker).unwrap_or_else(|| panic!("{marker} not in the page:\n{dom}"));
    let rest = &dom[at..];
    let open = rest.find(inner).unwrap_or_else(|| panic!("{inner} after {marker}")) + inner.len();
    let close = rest[open..].find('<').unwrap();
    &rest[open..open + close]
}
