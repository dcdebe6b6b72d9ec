//! Fuzz targets for every parser that takes bytes from the network or the disk, run on the
//! stable toolchain with proptest: each input is a valid seed mutated (bits flipped, bytes
//! inserted, deleted, overwritten, runs cut or repeated) or plain random bytes.
//!
//! The checks are properties, not only "no panic": what decodes re-encodes to the same bytes,
//! what the config resolves is what its signature check allows, and a refused input changes
//! nothing stored. `cargo test` runs a bounded number of cases per target (`FUZZ_CASES`,
//! default 400); the longer run (docs/security.md) is
//! `FUZZ_CASES=200000 cargo test --release -p ops-e2e --test fuzz`.

use std::path::Path;
use std::sync::Arc;

use ops_config::trust::{SecretKey, TrustedKeys};
use ops_config::{ClusterMap, DesiredConfig, Heartbeat, compact};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `check` on `cases` inputs made from `seeds`; a failure panics with the input.
fn fuzz(name: &str, cases: u32, seeds: Vec<Vec<u8>>, check: impl FnMut(&[u8]) -> Result<(), String>) {
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let seeds = Arc::new(seeds);
    let s = seeds.clone();
    let mutated =
        (0..s.len(), prop::collection::vec((any::<u32>(), 0u8..6, any::<u8>()), 0..8)).prop_map(move |(i, ops)| mutate(&s[i], &ops));
    let strategy = prop_oneof![8 => mutated, 1 => prop::collection::vec(any::<u8>(), 0..600)];
    let (ran, check) = (std::cell::Cell::new(0u64), std::cell::RefCell::new(check));
    let result = runner.run(&strategy, |input| {
        ran.set(ran.get() + 1);
        (check.borrow_mut())(&input).map_err(|e| TestCaseError::fail(format!("{e}; input {:?}", String::from_utf8_lossy(&input))))
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
    eprintln!("fuzz target {name}: {} inputs, no failure", ran.get());
}

fn mutate(seed: &[u8], ops: &[(u32, u8, u8)]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(pos, op, byte) in ops {
        let p = pos as usize % (b.len() + 1);
        match op {
            0 if p < b.len() => b[p] ^= 1 << (byte % 8),
            1 => b.insert(p, byte),
            2 if p < b.len() => {
                b.remove(p);
            }
            3 if p < b.len() => b[p] = byte,
            4 => b.truncate(p),
            5 => {
                let end = (p + usize::from(byte % 32)).min(b.len());
                let run = b[p..end].to_vec();
                b.splice(p..p, run);
            }
            _ => {}
        }
    }
    b
}

const HEARTBEATS: &[&str] = &[
    r#"{"hostname":"liutian-01","ip":"192.168.1.154","runUser":"admin","updaterVersion":"0.0.4","realAgents":[{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1477380651,"runUser":"falcon","workDir":"/home/falcon/open-falcon"}]}"#,
    r#"{"hostname":"web-2","realAgents":[{"name":"a","version":"1.0","status":"stoped","timestamp":1,"lastError":"md5 mismatch \u00e9"},{"name":"b","version":"2+x","status":""}]}"#,
    r#"{"hostname":"h","realAgents":null}"#,
];

fn seeds(texts: &[&str]) -> Vec<Vec<u8>> {
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}

#[test]
fn fuzz_heartbeat() {
    fuzz("heartbeat", cases(2000), seeds(HEARTBEATS), |input| {
        let Ok(hb) = Heartbeat::parse(input) else { return Ok(()) };
        // What parses is valid, serializes and parses back the same, and survives the compact
        // encoding a relay forwards it in.
        let json = serde_json::to_vec(&hb).map_err(|e| e.to_string())?;
        let again = Heartbeat::parse(&json).map_err(|e| format!("re-parse: {e}"))?;
        prop_assert_eq_str(&again, &hb)?;
        let mut body = Vec::new();
        compact::begin(&mut body);
        compact::encode(compact::Record { seen: 7, told: 1, relay: "dc1-1", auth: Some(9) }, &hb, &mut body);
        let mut back = Vec::new();
        compact::decode(&body, |r, h| back.push((r.seen, r.told, r.relay.to_owned(), h.clone().into_owned(), r.auth)))
            .map_err(|e| e.to_string())?;
        if back.len() != 1 || back[0].0 != 7 || back[0].1 != 1 || back[0].2 != "dc1-1" || back[0].3 != hb || back[0].4 != Some(9) {
            return Err(format!("compact round trip changed it: {back:?}"));
        }
        Ok(())
    });
}

/// The fast path (`ops_config::fastjson`) never reads a body other than serde would: what it
/// takes, serde takes as the same value; what it leaves, serde decides alone. The plain seeds
/// (the Go updater's, ours, the bench's) must take it, or it would never run.
#[test]
fn fuzz_heartbeat_fast_path_agrees_with_serde() {
    let plain = [
        HEARTBEATS[0],
        HEARTBEATS[2],
        r#"{"hostname":"host-0000042","ip":"10.0.0.42","runUser":"root","updaterVersion":"0.1.0","realAgents":[{"name":"falcon-agent","version":"5.1.4","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops","lastError":"install 5.1.5: md5 mismatch, kept 5.1.4"},{"name":"mysql-monitor","version":"5.1.3","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops","pinned":"hold"}]}"#,
        " {\n  \"hostname\": \"h\",\n  \"realAgents\": [ ]\n}\n",
    ];
    for body in plain {
        assert!(ops_config::fastjson::heartbeat(body.as_bytes()).is_some(), "the fast path refused {body}");
    }
    let mut all = seeds(HEARTBEATS);
    all.extend(seeds(&plain));
    let (mut taken, mut left) = (0u64, 0u64);
    fuzz("heartbeat fast path", cases(4000), all, |input| {
        let Some(fast) = ops_config::fastjson::heartbeat(input) else {
            left += 1;
            return Ok(());
        };
        taken += 1;
        match serde_json::from_slice::<Heartbeat>(input) {
            Ok(slow) => prop_assert_eq_str(&fast, &slow),
            Err(e) => Err(format!("the fast path took what serde refuses ({e}): {fast:?}")),
        }
    });
    eprintln!("fast path took {taken} inputs, left {left} to serde");
    assert!(taken > 0 && left > 0, "both paths are exercised: {taken} taken, {left} left");
}

fn prop_assert_eq_str<T: PartialEq + std::fmt::Debug>(a: &T, b: &T) -> Result<(), String> {
    if a == b { Ok(()) } else { Err(format!("{a:?} != {b:?}")) }
}

fn batch_seeds() -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for n in 1..=HEARTBEATS.len() {
        let mut body = Vec::new();
        compact::begin(&mut body);
        for (i, h) in HEARTBEATS[..n].iter().enumerate() {
            let relay = ["dc1-1", "", "dc2-1"][i % 3];
            compact::encode(
                compact::Record { seen: 1_700_000_000 + i as u32, told: i as u8, relay, auth: (i % 2 == 1).then_some(i as u64) },
                &Heartbeat::parse(h.as_bytes()).unwrap(),
                &mut body,
            );
        }
        all.push(body);
    }
    // all[0] is one record through relay dc1-1: its relay string is bytes 9..15.
    let mut v3 = all[0].clone();
    v3[3] = b'3';
    v3.drain(9..15); // OPB3 records have no relay string.
    let mut v1 = v3.clone();
    v1[3] = b'1';
    v1.remove(8); // OPB1 records have no `told` byte either.
    all.push(v3);
    all.push(v1);
    all
}

/// A standalone meta node's state to ingest into.
fn node(dir: &Path) -> meta_node::Node {
    let agents = ops_e2e::workspace_root().join("config/examples/agents.toml");
    let config = DesiredConfig::load(&agents).unwrap();
    let settings = meta_node::Settings::standalone(agents, dir.to_path_buf());
    meta_node::Node::new(settings, config, None, None, tokio_util::sync::CancellationToken::new())
}

/// What a node holds, as text: every host and its agents.
fn held(node: &meta_node::Node) -> String {
    let mut out = Vec::new();
    for i in 0..meta_node::store::SHARDS {
        let shard = node.store.shard(i);
        let symbols = node.store.symbols().reader();
        for (_, h) in shard.hosts() {
            let agents: Vec<String> = shard
                .agents(h)
                .iter()
                .map(|a| {
                    format!("{}={}/{}/{}", symbols.resolve(a.name), symbols.resolve(a.version), symbols.resolve(a.status), a.timestamp)
                })
                .collect();
            out.push(format!("{} {} {}", h.name, h.last_seen, agents.join(",")));
        }
    }
    out.sort();
    out.join("\n")
}

#[test]
fn fuzz_compact_batch() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path());
    node.ingest_compact(&batch_seeds()[2]).unwrap();
    fuzz("compact batch", cases(2000), batch_seeds(), |input| {
        let before = held(&node);
        let checked = compact::check(input);
        let mut records = Vec::new();
        let decoded = compact::decode(input, |r, h| records.push((r.seen, r.told, r.relay.to_owned(), h.clone().into_owned(), r.auth)));
        if checked.is_ok() != decoded.is_ok() {
            return Err(format!("check {checked:?} but decode {decoded:?}"));
        }
        // A rogue relay holds the token: what it sends is refused whole or taken whole.
        let ingested = node.ingest_compact(input);
        if ingested.is_ok() != checked.is_ok() {
            return Err(format!("check {checked:?} but ingest {ingested:?}"));
        }
        if ingested.is_err() && held(&node) != before {
            return Err("a refused batch changed what the node holds".into());
        }
        if checked.is_ok() && input.starts_with(b"OPB5") {
            let mut again = Vec::new();
            compact::begin(&mut again);
            for (seen, told, relay, h, auth) in &records {
                compact::encode(compact::Record { seen: *seen, told: *told, relay, auth: *auth }, h, &mut again);
            }
            if again != input {
                return Err(format!("decoded {} records that re-encode to other bytes", records.len()));
            }
        }
        Ok(())
    });
}

const AGENTS_SIGNED: &str = r#"[[agent]]
name = "falcon-agent"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "2", sha256 = "1111111111111111111111111111111111111111111111111111111111111111" }
others = [{ prefix = "old-", version = "0", md5 = "0123456789abcdef0123456789abcdef", sha256 = "3333333333333333333333333333333333333333333333333333333333333333" }, { prefix = "old-x", version = "9", tarball = "https://g/r", run_user = "v", work_dir = "/v" }]
rollout = { from = { version = "1", sha256 = "2222222222222222222222222222222222222222222222222222222222222222" }, waves = [10, 50, 100] }

[[agent]]
name = "b"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "1", cmd = "stop" }
"#;

#[test]
fn fuzz_agents_toml() {
    let example = std::fs::read_to_string(ops_e2e::workspace_root().join("config/examples/agents.toml")).unwrap();
    let hosts = ["old-1", "old-x1", "web-1", "", "o", "falcon-agent"];
    fuzz("agents.toml", cases(1500), seeds(&[&example, AGENTS_SIGNED]), |input| {
        let text = String::from_utf8_lossy(input);
        let Ok(config) = DesiredConfig::parse(&text, "agents.toml") else { return Ok(()) };
        let again = DesiredConfig::parse(config.source(), "agents.toml").map_err(|e| format!("its own source is refused: {e}"))?;
        if again.hash() != config.hash() {
            return Err("hash changed on re-parse".into());
        }
        // What the config resolves for a host is exactly what its signature check allows it
        // (or refused only for lacking a sha256), rollout `from` and target alike.
        for h in hosts {
            let class = config.class_of(h);
            for d in config.desired_for(h).iter().chain((0..config.rollouts().count()).filter_map(|r| config.class_target(class, r))) {
                match ops_config::trust::allows(&config, h, d) {
                    Ok(()) => {}
                    Err(e) if d.sha256.is_empty() && e.contains("no sha256") => {}
                    Err(e) => return Err(format!("{h}: resolves {d:?} but refuses it: {e}")),
                }
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_cluster_toml() {
    let example = std::fs::read_to_string(ops_e2e::workspace_root().join("config/examples/cluster.toml")).unwrap();
    let tls = "tls = true\nca_file = \"ca.pem\"\nvnodes = 10\n[[node]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\nweight = 3\n[[node]]\nid = \"b\"\naddr = \"[::1]:2\"\n";
    fuzz("cluster.toml", cases(1500), seeds(&[&example, tls]), |input| {
        let text = String::from_utf8_lossy(input);
        let Ok(map) = ClusterMap::parse(&text, Path::new("/etc/ops/cluster.toml")) else { return Ok(()) };
        if map.nodes.is_empty() || map.nodes.len() > ops_config::cluster::MAX_NODES {
            return Err(format!("{} nodes accepted", map.nodes.len()));
        }
        let ring = map.ring();
        let all = if map.nodes.len() == 64 { u64::MAX } else { (1u64 << map.nodes.len()) - 1 };
        for h in ["web-1", "x", "db-99"] {
            let owner = ring.owner(h);
            if owner >= map.nodes.len() || ring.first_in(h, all) != Some(owner) {
                return Err(format!("{h}: owner {owner}, first_in {:?}", ring.first_in(h, all)));
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let source = node(&dir.path().join("source"));
    source.ingest_compact(&batch_seeds()[2]).unwrap();
    std::fs::create_dir_all(dir.path().join("source")).unwrap();
    meta_node::snapshot::write(&source.store, &dir.path().join("source")).unwrap();
    let seed = std::fs::read(meta_node::snapshot::path_in(&dir.path().join("source"))).unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let mut fixed_crc = 0u64;
    fuzz("snapshot", cases(1500), vec![seed], |input| {
        // Half the inputs get a valid checksum, so the records themselves are reached.
        let mut bytes = input.to_vec();
        if bytes.len() > 16 && bytes[bytes.len() - 1] % 2 == 0 {
            let n = bytes.len() - 4;
            let crc = crc32fast::hash(&bytes[..n]).to_le_bytes();
            bytes[n..].copy_from_slice(&crc);
            fixed_crc += 1;
        }
        std::fs::write(meta_node::snapshot::path_in(&target), &bytes).map_err(|e| e.to_string())?;
        let store = meta_node::store::Store::new();
        match meta_node::snapshot::load(&store, &target, |_| true) {
            Ok(n) if store.len() > n => Err(format!("loaded {n} records but holds {}", store.len())),
            Err(_) if !store.is_empty() => Err(format!("a refused snapshot left {} hosts loaded", store.len())),
            _ => Ok(()),
        }
    });
    assert!(fixed_crc > 0);
}

#[test]
fn fuzz_signed_config_check() {
    let key = SecretKey::from_seed([9; 32]);
    let keys = TrustedKeys::load(&[key.public_text()], &[]).unwrap();
    let file = AGENTS_SIGNED.as_bytes();
    let signature = format!("# signed\n{}\n", key.sign(file));
    // Mutate the file, the signature, or both (the input is split at a byte the strategy picks).
    let seeds = vec![[file, b"\x00", signature.as_bytes()].concat()];
    fuzz("signed config", cases(3000), seeds, |input| {
        let (f, s) = match input.iter().position(|&b| b == 0) {
            Some(i) => (&input[..i], &input[i + 1..]),
            None => (input, &[][..]),
        };
        let s = String::from_utf8_lossy(s);
        let verdict = keys.verify(f, Some(&s));
        // Genuine: the file unchanged and a line that is the genuine signature up to spacing.
        let good = key.sign(file);
        let genuine = f == file && s.split(['\n', ',']).any(|l| l.split_ascii_whitespace().eq(good.split(' ')));
        match (verdict, genuine) {
            (Ok(()), false) => Err("a changed file or signature was accepted".into()),
            (Err(e), true) => Err(format!("the genuine file was refused: {e}")),
            _ => Ok(()),
        }
    });
}

fn tarball_seed() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, body: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, body).unwrap();
    };
    add("control", b"#!/bin/sh\necho started\n", 0o755);
    add("bin/agent", b"\x7fELF....", 0o755);
    add("cfg.json", b"{}", 0o644);
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    tar.append_link(&mut link, "bin/current", "agent").unwrap();
    tar.into_inner().unwrap()
}

#[test]
fn fuzz_tar_unpack() {
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    fuzz("tar unpack", cases(400), vec![tarball_seed()], |input| {
        // Mutate the tar inside the gzip (to reach the tar parser), or the gzip itself.
        let gz = if input.first().is_some_and(|b| b % 4 == 0) {
            input.to_vec()
        } else {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, input).map_err(|e| e.to_string())?;
            e.finish().map_err(|e| e.to_string())?
        };
        let work = tempfile::tempdir_in(root.path()).map_err(|e| e.to_string())?;
        let (archive, dest) = (work.path().join("a.tar.gz"), work.path().join("dest"));
        std::fs::write(&archive, &gz).map_err(|e| e.to_string())?;
        std::fs::create_dir(&dest).map_err(|e| e.to_string())?;
        let result = updater::unpack::unpack(&archive, &dest);
        let beside: Vec<_> = std::fs::read_dir(work.path()).map_err(|e| e.to_string())?.flatten().map(|e| e.file_name()).collect();
        if beside.len() != 2 || std::fs::read_dir(&outside).map_err(|e| e.to_string())?.next().is_some() {
            return Err(format!("wrote outside its directory: {beside:?}"));
        }
        if result.is_err() && std::fs::read_dir(&dest).map_err(|e| e.to_string())?.next().is_some() {
            return Err(format!("refused ({result:?}) but wrote into its directory"));
        }
        Ok(())
    });
}

/// The package cache's request paths (`/pkg/{key}/{rest}`): whatever the path, the relay
/// either refuses it or fetches a URL under the configured origin whose last segment is one
/// of the configured files (or its `.md5`), never anything with `..` or another directory.
#[test]
fn fuzz_package_paths() {
    let config = DesiredConfig::parse(
        "[[agent]]\nname = \"falcon-agent\"\ntarball = \"http://files.example/rel\"\nrun_user = \"u\"\nwork_dir = \"/w\"\n\
         relay_cache = true\ndefault = { version = \"5.1.5\", sha256 = \"1111111111111111111111111111111111111111111111111111111111111111\" }\n\
         rollout = { from = { version = \"5.1.3\", md5 = \"http://digests.example/d\" }, waves = [100] }\n",
        "t",
    )
    .unwrap();
    let index = ops_config::cache::PackageIndex::new(&config);
    let (files, digests) =
        (ops_config::cache::origin_key("http://files.example/rel"), ops_config::cache::origin_key("http://digests.example/d"));
    let allowed = ["falcon-agent-5.1.5.tar.gz", "falcon-agent-5.1.3.tar.gz"];
    let seeds = seeds(&[
        &format!("{files}/linux_amd64/falcon-agent-5.1.5.tar.gz"),
        &format!("{files}/falcon-agent-5.1.3.tar.gz.md5"),
        &format!("{digests}/linux_arm64/falcon-agent-5.1.3.tar.gz.md5"),
    ]);
    fuzz("package paths", cases(2000), seeds, |input| {
        let path = String::from_utf8_lossy(input);
        let (key, rest) = path.split_once('/').unwrap_or((&path, ""));
        let Some(w) = index.resolve(key, rest) else { return Ok(()) };
        let base = ["http://files.example/rel/", "http://digests.example/d/"]
            .into_iter()
            .find(|b| w.origin_url.starts_with(b))
            .ok_or(format!("{} is not under a configured origin", w.origin_url))?;
        let tail = &w.origin_url[base.len()..];
        let segments: Vec<&str> = tail.split('/').collect();
        let file = segments.last().unwrap().trim_end_matches(".md5");
        if segments.len() > 2 || segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") || !allowed.contains(&file) {
            return Err(format!("{} resolved to {}", path, w.origin_url));
        }
        Ok(())
    });
}
