//! The cluster map (`cluster.toml`) and the consistent-hash ring built over it.
//!
//! Relays and meta nodes build the same ring from the same file, so they agree on the owner of
//! every hostname without talking. The ring is `consistent_hash::StaticHashRing` with
//! `vnodes × weight` virtual nodes per meta node, keyed by node id (SipHash 1-3 of the id and
//! the virtual node's sequence number; of the hostname for items). A golden test pins owners
//! of fixed hostnames: changing any of this moves hosts between nodes and must be deliberate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use consistent_hash::{DefaultHash, Node, RingHash, StaticHashRing};
use serde::Deserialize;
use toml::Spanned;

use crate::location::line_col;

/// Virtual nodes per unit of weight when the file does not say: the smallest round value that
/// keeps max/mean load ≤ 1.05 on 3 and on 10 nodes over a million hostnames (see the tests).
pub const DEFAULT_VNODES: u32 = 1000;

/// Most meta nodes a cluster map may list: sets of nodes travel as one `u64` bit mask
/// ([`Ring::first_in`], the status gather).
pub const MAX_NODES: usize = 64;

/// One meta node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

/// A validated `cluster.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMap {
    pub vnodes: u32,
    /// Absolute, or relative to the working directory if the file itself was given so.
    pub token_file: Option<PathBuf>,
    /// The meta nodes serve HTTPS: relays and peers reach them with `https://`.
    pub tls: bool,
    /// CA certificates (PEM) that the meta nodes' certificates chain to, besides the system's;
    /// resolved like `token_file`.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS with node identity: every meta node and relay presents a certificate of
    /// the cluster CA (`ca_file`, `opsctl ca issue`) that names it ([`node_name`],
    /// [`relay_name`]); a peer is believed only as the node its certificate names, and only
    /// where the map puts that node. The cluster token is then never sent between nodes.
    pub mtls: bool,
    pub nodes: Vec<NodeSpec>,
    /// Content hash of the file text.
    pub hash: String,
    /// The file text, as meta nodes hand it to relays and to each other (`GET /cluster/map`).
    pub text: String,
    /// The file it was read from: a copy learnt from a meta node resolves its relative paths
    /// from there too.
    pub file: PathBuf,
    /// `version`: the map's place in the operator's sequence (inside the signed bytes; a
    /// signed map must have one, `crate::trust::check_fresh`).
    pub version: Option<u64>,
    /// `expires`, in unix seconds (signed with it).
    pub expires: Option<u64>,
}

/// A refused cluster file: the same shape as a refused desired config
/// (`file:line:col: what is wrong`).
pub type ClusterError = crate::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    version: Option<Spanned<i64>>,
    expires: Option<Spanned<toml::value::Datetime>>,
    vnodes: Option<Spanned<u32>>,
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    tls: bool,
    ca_file: Option<Spanned<String>>,
    mtls: Option<Spanned<bool>>,
    #[serde(default)]
    node: Vec<Spanned<RawNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<String>,
    addr: Spanned<String>,
    weight: Option<Spanned<u32>>,
}

impl ClusterMap {
    /// Parses and validates `text`; `file` names it in errors and anchors a relative
    /// `token_file`.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ClusterError> {
        let name = file.display().to_string();
        let at = |span: std::ops::Range<usize>, message: String| {
            let (line, col) = line_col(text, span.start);
            ClusterError::At { file: name.clone(), line, col, message }
        };
        let raw: RawCluster = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => at(span, e.message().to_owned()),
            None => ClusterError::File { file: name.clone(), message: e.message().to_owned() },
        })?;
        let version = match &raw.version {
            Some(v) if *v.get_ref() < 1 => return Err(at(v.span(), "version must be a whole number from 1 up".into())),
            v => v.as_ref().map(|v| *v.get_ref() as u64),
        };
        let expires = match &raw.expires {
            Some(v) => Some(crate::trust::unix_seconds(v.get_ref()).map_err(|e| at(v.span(), e))?),
            None => None,
        };
        let vnodes = match raw.vnodes {
            Some(v) if !(1..=100_000).contains(v.get_ref()) => {
                return Err(at(v.span(), format!("vnodes must be 1-100000, got {}", v.get_ref())));
            }
            Some(v) => v.into_inner(),
            None => DEFAULT_VNODES,
        };
        if raw.node.is_empty() {
            return Err(ClusterError::File { file: name, message: "no [[node]]: a cluster needs at least one meta node".into() });
        }
        if raw.node.len() > MAX_NODES {
            return Err(at(raw.node[MAX_NODES].span(), format!("at most {MAX_NODES} meta nodes, got {}", raw.node.len())));
        }
        let mut nodes: Vec<NodeSpec> = Vec::with_capacity(raw.node.len());
        for n in &raw.node {
            let n = n.get_ref();
            let id = n.id.get_ref();
            if !crate::wire::valid_agent_name(id) {
                return Err(at(n.id.span(), format!("node id must be 1-64 of [A-Za-z0-9._-], got {id:?}")));
            }
            if nodes.iter().any(|m| &m.id == id) {
                return Err(at(n.id.span(), format!("duplicate node id {id:?}")));
            }
            let addr: SocketAddr =
                n.addr.get_ref().parse().map_err(|_| at(n.addr.span(), format!("addr must be ip:port, got {:?}", n.addr.get_ref())))?;
            if nodes.iter().any(|m| m.addr == addr) {
                return Err(at(n.addr.span(), format!("duplicate node addr {addr}")));
            }
            let weight = match &n.weight {
                Some(w) if !(1..=100).contains(w.get_ref()) => {
                    return Err(at(w.span(), format!("weight must be 1-100, got {}", w.get_ref())));
                }
                Some(w) => *w.get_ref(),
                None => 1,
            };
            nodes.push(NodeSpec { id: id.clone(), addr, weight });
        }
        let beside = |t: Spanned<String>| {
            let p = PathBuf::from(t.into_inner());
            if p.is_absolute() { p } else { file.parent().unwrap_or(Path::new("")).join(p) }
        };
        if let Some(ca) = raw.ca_file.as_ref().filter(|_| !raw.tls) {
            return Err(at(ca.span(), "ca_file is only used with tls = true".into()));
        }
        let mtls = match &raw.mtls {
            Some(m) if *m.get_ref() && (!raw.tls || raw.ca_file.is_none()) => {
                return Err(at(m.span(), "mtls needs tls = true and the cluster CA as ca_file".into()));
            }
            Some(m) => *m.get_ref(),
            None => false,
        };
        if mtls && let Some(n) = raw.node.iter().find(|n| !lower_dns_label(n.get_ref().id.get_ref())) {
            let id = n.get_ref().id.get_ref();
            return Err(at(
                n.get_ref().id.span(),
                format!("with mtls a node id is a lowercase DNS label (letters, digits, inner -), got {id:?}"),
            ));
        }
        let token_file = raw.token_file.map(beside);
        let ca_file = raw.ca_file.map(beside);
        Ok(ClusterMap {
            vnodes,
            token_file,
            tls: raw.tls,
            ca_file,
            mtls,
            nodes,
            hash: crate::content_hash(text.as_bytes()),
            text: text.to_owned(),
            file: file.to_path_buf(),
            version,
            expires,
        })
    }

    /// The map of a one-node set-up: `meta-1` at `addr`, no token.
    pub fn single(addr: SocketAddr) -> Self {
        ClusterMap {
            vnodes: DEFAULT_VNODES,
            token_file: None,
            tls: false,
            ca_file: None,
            mtls: false,
            nodes: vec![NodeSpec { id: "meta-1".into(), addr, weight: 1 }],
            hash: String::new(),
            text: String::new(),
            file: PathBuf::new(),
            version: None,
            expires: None,
        }
    }

    /// Why `self` cannot replace `current` online (a membership change keeps how nodes reach
    /// and trust each other: changing TLS, the CA or the token takes a restart), if it cannot.
    pub fn online_change_refused(&self, current: &ClusterMap) -> Option<String> {
        if self.tls != current.tls || self.ca_file != current.ca_file || self.mtls != current.mtls {
            return Some("tls, mtls and ca_file differ from the running map: change them with a restart, not online".into());
        }
        if self.token_file != current.token_file {
            return Some("token_file differs from the running map: change it with a restart, not online".into());
        }
        None
    }

    /// `http` or `https`: how the meta nodes are reached.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The URL of `path` on meta node `i`. With mTLS its host is the node's name
    /// ([`node_name`]), which the cluster's clients resolve to its address themselves: the
    /// name is what the peer's certificate must show.
    pub fn url(&self, i: usize, path: &str) -> String {
        let n = &self.nodes[i];
        if self.mtls {
            format!("https://{}:{}{path}", node_name(&n.id), n.addr.port())
        } else {
            format!("{}://{}{path}", self.scheme(), n.addr)
        }
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ClusterError::File { file: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text, path)
    }

    /// The shared secret of internal endpoints, read from `token_file` (trimmed).
    /// `Ok(None)` when the file names no token file.
    pub fn read_token(&self) -> Result<Option<String>, ClusterError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ClusterError::File { file: file.clone(), message: e.to_string() })?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(ClusterError::File { file, message: "token must be at least 16 characters".into() });
        }
        Ok(Some(token.to_owned()))
    }

    /// Index of a node by id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The ring over these nodes.
    pub fn ring(&self) -> Ring {
        Ring::new(self.nodes.iter().map(|n| (n.id.as_str(), n.weight)), self.vnodes)
    }
}

/// The DNS name a meta node's certificate carries under mTLS: `{id}.meta.ops-fleet`.
pub fn node_name(id: &str) -> String {
    format!("{id}.{NODE_DOMAIN}")
}

/// The DNS name a relay's certificate carries under mTLS: `{id}.relay.ops-fleet`.
pub fn relay_name(id: &str) -> String {
    format!("{id}.{RELAY_DOMAIN}")
}

/// The domains of [`node_name`] and [`relay_name`] (never looked up in DNS).
pub const NODE_DOMAIN: &str = "meta.ops-fleet";
pub const RELAY_DOMAIN: &str = "relay.ops-fleet";

/// Whether `s` is one DNS label (what an id must be to be named in a certificate).
pub fn dns_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !s.starts_with('-') && !s.ends_with('-')
}

/// A [`dns_label`] in lowercase: how a name of a certificate compares (ids under `mtls`).
pub fn lower_dns_label(s: &str) -> bool {
    dns_label(s) && !s.bytes().any(|b| b.is_ascii_uppercase())
}

/// Which meta node owns a hostname, and the failover order after it.
pub struct Ring {
    ring: StaticHashRing<'static, String, usize, DefaultHash>,
    /// The same ring's virtual nodes as `(hash, node index)` in ring order, so finding the
    /// owner is one binary search with no allocation (`calc_candidates` builds a set per call,
    /// which the heartbeat path of relays and meta nodes cannot afford). A test checks it
    /// against `calc_candidates` over many hostnames.
    points: Vec<(u64, u32)>,
    /// `first[b]`: index of the first point whose hash's top [`BUCKET_BITS`] bits are ≥ b, so
    /// a search looks at a point or two instead of a dozen scattered ones (cache misses were
    /// most of a relay's owner look-up).
    first: Vec<u32>,
}

const BUCKET_BITS: u32 = 12;

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("nodes", &self.ring.nodes().len()).field("vnodes", &self.ring.len()).finish()
    }
}

impl Ring {
    /// A ring over `(id, weight)` pairs; node indexes returned later are positions in this
    /// list. Ids must be distinct (the cluster map checks it).
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, u32)>, vnodes: u32) -> Self {
        let nodes: Vec<Node<String, usize>> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, (id, weight))| Node::new(id.to_owned()).value(i).quantity((vnodes * weight.max(1)) as usize))
            .collect();
        // The crate places virtual node `seq` of a node at `hash_vnode(key, seq)` and orders
        // the ring by (hash, key); the same here, from the crate's own hash.
        let mut keyed: Vec<(u64, &str, u32)> = nodes
            .iter()
            .flat_map(|n| (0..n.quantity).map(move |seq| (DefaultHash.hash_vnode(&n.key, seq), n.key.as_str(), n.value as u32)))
            .collect();
        keyed.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let points: Vec<(u64, u32)> = keyed.into_iter().map(|(h, _, i)| (h, i)).collect();
        let first = (0..=1u64 << BUCKET_BITS).map(|b| points.partition_point(|p| p.0 >> (64 - BUCKET_BITS) < b) as u32).collect();
        Ring { ring: StaticHashRing::new(DefaultHash, nodes.into_iter()), points, first }
    }

    /// Number of real nodes.
    pub fn len(&self) -> usize {
        self.ring.nodes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.nodes().is_empty()
    }

    /// Index of the node that owns `hostname`.
    ///
    /// # Panics
    /// On an empty ring (a cluster map always has a node).
    pub fn owner(&self, hostname: &str) -> usize {
        assert!(!self.points.is_empty(), "ring has at least one node");
        let h = DefaultHash.hash_item(&hostname);
        let b = (h >> (64 - BUCKET_BITS)) as usize;
        let (lo, hi) = (self.first[b] as usize, self.first[b + 1] as usize);
        let at = lo + self.points[lo..hi].partition_point(|p| p.0 < h);
        self.points[if at == self.points.len() { 0 } else { at }].1 as usize
    }

    /// Every node, in failover order for `hostname` (owner first).
    pub fn candidates<'r>(&'r self, hostname: &str) -> impl Iterator<Item = usize> + 'r {
        self.ring.calc_candidates(&hostname).map(|n| n.value)
    }

    /// The first node of `hostname`'s failover order that is in `nodes` (bit i: node i), with
    /// no allocation: the walk over the ring's points that `candidates` does, stopped at the
    /// first point of a node in the set. `None` when the set names no node of the ring.
    ///
    /// This one function decides who holds and who lists a host while nodes are down, on
    /// every relay and meta node alike (see `meta-node`'s `api::status`).
    pub fn first_in(&self, hostname: &str, nodes: u64) -> Option<usize> {
        let all = if self.len() >= 64 { u64::MAX } else { (1u64 << self.len()) - 1 };
        if nodes & all == 0 {
            return None;
        }
        let h = DefaultHash.hash_item(&hostname);
        let b = (h >> (64 - BUCKET_BITS)) as usize;
        let (lo, hi) = (self.first[b] as usize, self.first[b + 1] as usize);
        let start = lo + self.points[lo..hi].partition_point(|p| p.0 < h);
        let n = self.points.len();
        (0..n).map(|k| self.points[(start + k) % n].1 as usize).find(|&i| nodes & (1 << i) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtls_needs_the_ca_and_names_nodes_by_dns_labels() {
        let file = Path::new("cluster.toml");
        let node = "[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:2000\"\n";
        let e = ClusterMap::parse(&format!("tls = true\nmtls = true\n{node}"), file).unwrap_err().to_string();
        assert!(e.contains("cluster.toml:2:8:") && e.contains("ca_file"), "{e}");
        let map = ClusterMap::parse(&format!("tls = true\nca_file = \"ca.pem\"\nmtls = true\n{node}"), file).unwrap();
        assert_eq!(map.url(0, "/health"), "https://meta-1.meta.ops-fleet:2000/health");
        let plain = ClusterMap::parse(&format!("tls = true\nca_file = \"ca.pem\"\n{node}"), file).unwrap();
        assert_eq!(plain.url(0, "/health"), "https://127.0.0.1:2000/health");
        assert!(map.online_change_refused(&plain).is_some(), "mtls changes only with a restart");
        let e = ClusterMap::parse(&format!("tls = true\nca_file = \"ca.pem\"\nmtls = true\n{}", node.replace("meta-1", "meta_1")), file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("DNS label"), "{e}");
        assert!(dns_label("relay-dc1") && !dns_label("-a") && !dns_label("a.b") && !dns_label(""));
    }

    fn three() -> Ring {
        Ring::new([("meta-1", 1), ("meta-2", 1), ("meta-3", 1)], DEFAULT_VNODES)
    }

    /// Two builds that disagree here would send hosts to different owners: never change these
    /// owners without a migration note.
    #[test]
    fn golden_owners() {
        let ring = three();
        let ids = ["meta-1", "meta-2", "meta-3"];
        let got: Vec<(&str, &str)> = GOLDEN.iter().map(|(h, _)| (*h, ids[ring.owner(h)])).collect();
        assert_eq!(got, GOLDEN.to_vec());
    }

    const GOLDEN: [(&str, &str); 20] = [
        ("bj-web-001", "meta-2"),
        ("bj-web-002", "meta-3"),
        ("bj-web-003", "meta-2"),
        ("bj-db-001", "meta-3"),
        ("sh-cache-17", "meta-2"),
        ("gz-api-9", "meta-3"),
        ("liutian-01", "meta-2"),
        ("host-0000000", "meta-2"),
        ("host-0000001", "meta-2"),
        ("host-0999999", "meta-1"),
        ("a", "meta-2"),
        ("z", "meta-3"),
        ("node.example.com", "meta-3"),
        ("web_01", "meta-3"),
        ("k8s-worker-123", "meta-2"),
        ("dc1-rack4-u12", "meta-1"),
        ("falcon-judge-7", "meta-3"),
        ("x-1.y-2.z-3", "meta-2"),
        ("mysql-master-001", "meta-2"),
        ("redis-cluster-42", "meta-1"),
    ];

    fn hostname(i: u32) -> String {
        format!("dc{}-host-{:07}", i % 7, i)
    }

    fn max_over_mean(ring: &Ring, n: usize, hosts: u32) -> f64 {
        let mut counts = vec![0u64; n];
        for i in 0..hosts {
            counts[ring.owner(&hostname(i))] += 1;
        }
        let mean = f64::from(hosts) / n as f64;
        *counts.iter().max().unwrap() as f64 / mean
    }

    #[test]
    fn balanced_over_a_million_hosts_on_3_and_10_nodes() {
        for n in [3usize, 10] {
            let ids: Vec<String> = (1..=n).map(|i| format!("meta-{i}")).collect();
            let ring = Ring::new(ids.iter().map(|s| (s.as_str(), 1)), DEFAULT_VNODES);
            let ratio = max_over_mean(&ring, n, 1_000_000);
            assert!(ratio <= 1.05, "{n} nodes: max/mean {ratio:.4}");
        }
    }

    /// Prints max/mean for a range of vnode counts (how DEFAULT_VNODES was chosen):
    /// `cargo test --release -p ops-config vnode_sweep -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn vnode_sweep() {
        for vnodes in [40, 160, 250, 500, 1000, 2000] {
            for n in [3usize, 10] {
                let ids: Vec<String> = (1..=n).map(|i| format!("meta-{i}")).collect();
                let ring = Ring::new(ids.iter().map(|s| (s.as_str(), 1)), vnodes);
                println!("vnodes {vnodes:5} nodes {n:2}: max/mean {:.4}", max_over_mean(&ring, n, 1_000_000));
            }
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_plus_one() {
        let n = 5usize;
        let ids: Vec<String> = (1..=n + 1).map(|i| format!("meta-{i}")).collect();
        let before = Ring::new(ids[..n].iter().map(|s| (s.as_str(), 1)), DEFAULT_VNODES);
        let after = Ring::new(ids.iter().map(|s| (s.as_str(), 1)), DEFAULT_VNODES);
        let hosts = 200_000u32;
        let mut moved = 0u32;
        for i in 0..hosts {
            let h = hostname(i);
            let (a, b) = (before.owner(&h), after.owner(&h));
            if a != b {
                assert_eq!(b, n, "a host only ever moves to the new node");
                moved += 1;
            }
        }
        let share = f64::from(moved) / f64::from(hosts);
        let ideal = 1.0 / (n as f64 + 1.0);
        assert!((share - ideal).abs() < 0.02, "moved {share:.4}, ideal {ideal:.4}");
    }

    #[test]
    fn owner_agrees_with_the_crates_candidates() {
        for ring in [three(), Ring::new([("meta-1", 1), ("meta-2", 3), ("x", 2), ("meta-10", 1)], 50), Ring::new([("solo", 1)], 7)] {
            for i in 0..200_000u32 {
                let h = format!("dc{}-host-{i:07}", i % 7);
                assert_eq!(ring.owner(&h), ring.ring.calc_candidates(&h.as_str()).next().unwrap().value, "{h}");
            }
        }
    }

    #[test]
    fn candidates_list_every_node_once_owner_first() {
        let ring = three();
        for h in ["a", "bj-web-001", "zzz"] {
            let c: Vec<usize> = ring.candidates(h).collect();
            assert_eq!(c.len(), 3);
            assert_eq!(c[0], ring.owner(h));
            let mut sorted = c.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2]);
        }
    }

    /// `first_in` is the crate's failover order filtered by the set, for every set of 3 nodes
    /// and a few of a weighted 4-node ring.
    #[test]
    fn first_in_is_the_first_candidate_in_the_set() {
        for ring in [three(), Ring::new([("meta-1", 1), ("meta-2", 3), ("x", 2), ("meta-10", 1)], 50)] {
            let all = (1u64 << ring.len()) - 1;
            for i in 0..20_000u32 {
                let h = hostname(i);
                let order: Vec<usize> = ring.candidates(&h).collect();
                for set in 0..=all {
                    let want = order.iter().copied().find(|&c| set & (1 << c) != 0);
                    assert_eq!(ring.first_in(&h, set), want, "{h} set {set:b}");
                }
                assert_eq!(ring.first_in(&h, u64::MAX), Some(ring.owner(&h)));
            }
        }
    }

    #[test]
    fn a_cluster_of_more_than_64_nodes_is_refused() {
        let nodes: String = (0..65).map(|i| format!("[[node]]\nid = \"m{i}\"\naddr = \"127.0.0.1:{}\"\n", 1000 + i)).collect();
        assert_eq!(parse(&nodes).unwrap_err(), "/etc/ops/cluster.toml:193:1: at most 64 meta nodes, got 65");
    }

    #[test]
    fn weight_scales_the_share() {
        let ring = Ring::new([("meta-1", 1), ("meta-2", 3)], DEFAULT_VNODES);
        let mut heavy = 0;
        for i in 0..100_000 {
            heavy += usize::from(ring.owner(&hostname(i)) == 1);
        }
        let share = heavy as f64 / 100_000.0;
        assert!((share - 0.75).abs() < 0.03, "{share}");
    }

    fn parse(text: &str) -> Result<ClusterMap, String> {
        ClusterMap::parse(text, Path::new("/etc/ops/cluster.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_issue_shape_and_resolves_token_path() {
        let c = parse("vnodes = 160\ntoken_file = \"cluster.token\"\n[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:2000\"\nweight = 1\n")
            .unwrap();
        assert_eq!(c.vnodes, 160);
        assert_eq!(c.token_file.as_deref(), Some(Path::new("/etc/ops/cluster.token")));
        assert_eq!(c.nodes[0].addr, "127.0.0.1:2000".parse().unwrap());
        let c = parse("[[node]]\nid = \"m\"\naddr = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!((c.vnodes, c.nodes[0].weight, c.token_file), (DEFAULT_VNODES, 1, None));
    }

    #[test]
    fn bad_cluster_files_name_line_and_column() {
        let node = "[[node]]\nid = \"m\"\naddr = \"127.0.0.1:1\"\n";
        assert_eq!(parse("").unwrap_err(), "/etc/ops/cluster.toml: no [[node]]: a cluster needs at least one meta node");
        assert_eq!(parse(&format!("vnodes = 0\n{node}")).unwrap_err(), "/etc/ops/cluster.toml:1:10: vnodes must be 1-100000, got 0");
        assert_eq!(parse(&format!("{node}{node}")).unwrap_err(), "/etc/ops/cluster.toml:5:6: duplicate node id \"m\"");
        assert_eq!(
            parse("[[node]]\nid = \"m\"\naddr = \"localhost\"\n").unwrap_err(),
            "/etc/ops/cluster.toml:3:8: addr must be ip:port, got \"localhost\""
        );
        assert_eq!(
            parse("[[node]]\nid = \"m\"\naddr = \"127.0.0.1:1\"\nweight = 0\n").unwrap_err(),
            "/etc/ops/cluster.toml:4:10: weight must be 1-100, got 0"
        );
        assert!(parse("[[node]]\nid = \"m\"\nadr = \"x\"\n").unwrap_err().starts_with("/etc/ops/cluster.toml:3:1: unknown field `adr`"));
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster.toml");
        let c = ClusterMap::load(&path).unwrap();
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.ring().len(), 3);
    }
}
