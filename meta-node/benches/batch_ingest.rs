//! Batch ingest rate of a meta node, in host states per second: 1,000,000 hosts × 3 agents in
//! batches of 5,000, in both encodings a meta node takes: compact (what relays and peers send,
//! `Node::ingest_compact`) and JSON (older relays, `Node::ingest_batch`), on 1 and on 2
//! threads. `cargo bench -p meta-node --bench batch_ingest [-- HOSTS]`
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use meta_node::{Node, Settings};
use ops_config::{Batch, DesiredConfig, compact};
use tokio_util::sync::CancellationToken;

fn main() {
    let hosts: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let agents = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/examples/agents.toml");
    let config = DesiredConfig::load(&agents).expect("example config");
    let json_batches: Vec<Vec<u8>> = (0..hosts)
        .collect::<Vec<_>>()
        .chunks(5000)
        .map(|chunk| {
            let bodies: Vec<String> = chunk
                .iter()
                .map(|i| {
                    format!(
                        r#"{{"hostname":"dc{}-host-{i:07}","ip":"10.{}.{}.{}","runUser":"root","updaterVersion":"0.1.0","realAgents":[{{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1700000000,"runUser":"falcon","workDir":"/home/falcon/open-falcon"}},{{"name":"mysql-monitor","version":"0.0.5","status":"started","timestamp":1700000000,"runUser":"falcon","workDir":"/home/falcon/open-falcon"}},{{"name":"naming-agent","version":"1.2.0","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"}}]}}"#,
                        i % 5,
                        i >> 16 & 255,
                        i >> 8 & 255,
                        i & 255
                    )
                })
                .collect();
            let mut out = Vec::new();
            Batch::encode_raw(bodies.iter().map(|b| (1_700_000_000u32, b.as_bytes())), &mut out);
            out
        })
        .collect();
    // The same batches in the compact encoding, built as a relay builds them.
    let compact_batches: Vec<Vec<u8>> = json_batches
        .iter()
        .map(|b| {
            let mut out = Vec::new();
            compact::begin(&mut out);
            for e in Batch::parse(b).expect("valid batch").hosts {
                compact::encode(compact::Record { seen: e.seen, told: e.told, relay: "dc1-1", auth: None }, &e.hb, &mut out);
            }
            out
        })
        .collect();
    let mib = |b: &[Vec<u8>]| b.iter().map(Vec::len).sum::<usize>() >> 20;
    println!("{} batches, {} hosts: {} MiB compact, {} MiB JSON", json_batches.len(), hosts, mib(&compact_batches), mib(&json_batches));

    type Ingest = fn(&Node, &[u8]) -> Result<(u64, u64), ops_config::WireError>;
    let encodings: [(&str, &[Vec<u8>], Ingest); 2] =
        [("compact", &compact_batches, Node::ingest_compact), ("json", &json_batches, Node::ingest_batch)];
    for (encoding, batches, ingest) in encodings {
        for threads in [1usize, 2] {
            for pass in ["first (new hosts)", "steady (known hosts)"] {
                // A fresh node each time, so "first" really inserts.
                let node = fresh_node(&config, &agents);
                if pass.starts_with("steady") {
                    for b in batches {
                        ingest(&node, b).expect("valid batch");
                    }
                }
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let node = node.clone();
                        s.spawn(move || {
                            for b in batches.iter().skip(t).step_by(threads) {
                                ingest(&node, b).expect("valid batch");
                            }
                        });
                    }
                });
                let secs = start.elapsed().as_secs_f64();
                println!("{encoding:>7}, {threads} thread(s), {pass}: {:.0} host states/s ({:.2} s)", f64::from(hosts) / secs, secs);
            }
        }
    }
}

fn fresh_node(config: &DesiredConfig, agents: &std::path::Path) -> Arc<Node> {
    let settings = Settings::standalone(agents.to_path_buf(), std::env::temp_dir().join("ops-bench-ingest"));
    Arc::new(Node::new(settings, config.clone(), None, None, CancellationToken::new()))
}
