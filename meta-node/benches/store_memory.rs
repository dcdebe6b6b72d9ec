//! Bytes per host of the real-state store at N hosts × 3 agents (RSS before and after), the
//! in-process upsert rate, and the cost of a summary, a full listing, a string collection and a
//! snapshot.
//! `cargo bench -p meta-node --bench store_memory -- 1000000 [--pinned=PERCENT]` (that share of
//! hosts reports falcon-agent pinned `hold`: the side-table cost of local pins).
use std::time::Instant;

use meta_node::fleet::{self, AgentQuery, Filter, Scope};
use meta_node::store::Store;
use meta_node::{snapshot, unix_now};
use ops_config::{DesiredConfig, Heartbeat};
use ops_serve::desired::Loaded;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("rss pages");
    pages * 4096
}

fn main() {
    let hosts: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let pinned: u32 = std::env::args().find_map(|a| a.strip_prefix("--pinned=").and_then(|p| p.parse().ok())).unwrap_or(0);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/agents.toml");
    let loaded = Loaded::new(DesiredConfig::load(&path).expect("example config"), 1);
    // Bodies are built before the first RSS reading so only the store is measured.
    let bodies: Vec<String> = (0..hosts)
        .map(|i| {
            let dc = ["bj", "sh", "gz"][(i % 3) as usize];
            format!(
                r#"{{"hostname":"{dc}-web-{i:07}","ip":"10.{}.{}.{}","runUser":"root","updaterVersion":"0.1.0","realAgents":[{{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1700000000,"runUser":"falcon","workDir":"/home/falcon/open-falcon"{}}},{{"name":"mysql-monitor","version":"0.0.5","status":"started","timestamp":1700000000,"runUser":"falcon","workDir":"/home/falcon/open-falcon"}},{{"name":"naming-agent","version":"1.2.0","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"}}]}}"#,
                i >> 16 & 255,
                i >> 8 & 255,
                i & 255,
                if i % 100 < pinned { r#","pinned":"hold""# } else { "" }
            )
        })
        .collect();
    let store = Store::new();
    let before = rss_bytes();
    let now = unix_now();
    let start = Instant::now();
    for body in &bodies {
        let hb = Heartbeat::parse(body.as_bytes()).expect("valid heartbeat");
        store.upsert(&hb, now, loaded.config.class_of(&hb.hostname), loaded.generation, true).expect("under the interner limits");
    }
    let insert_s = start.elapsed().as_secs_f64();
    let after = rss_bytes();
    println!(
        "hosts {hosts} x 3 agents ({pinned} % pinned): RSS {} -> {} MiB, {:.1} bytes/host",
        before >> 20,
        after >> 20,
        (after - before) as f64 / f64::from(hosts)
    );
    println!("first sweep (parse + resolve + upsert, 1 thread): {:.0} heartbeats/s", f64::from(hosts) / insert_s);

    let start = Instant::now();
    for body in &bodies {
        let hb = Heartbeat::parse(body.as_bytes()).expect("valid heartbeat");
        store.upsert(&hb, now, loaded.config.class_of(&hb.hostname), loaded.generation, true).expect("under the interner limits");
    }
    println!("steady sweep (existing hosts, 1 thread): {:.0} heartbeats/s", f64::from(hosts) / start.elapsed().as_secs_f64());
    drop(bodies);

    let q = AgentQuery::new("falcon-agent", &loaded, now, 900);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let s = fleet::summarize(&store, &q, Scope::All, None);
        assert_eq!(s.hosts, u64::from(hosts));
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    println!("summary scan: median {:.1} ms (min {:.1}, max {:.1})", samples[3], samples[0], samples[6]);

    let start = Instant::now();
    let mut bytes = 0usize;
    let rows = fleet::scan_rows(&store, &q, Scope::All, &Filter::default(), fleet::write_json_row, |buf| {
        bytes += buf.len();
        true
    });
    println!("full JSON listing formatted: {rows} rows, {} MiB in {:.2} s", bytes >> 20, start.elapsed().as_secs_f64());

    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let freed = store.collect_strings();
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(freed, 0, "every string is in use");
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "string collection (mark every record, free none): median {:.1} ms (min {:.1}, max {:.1})",
        samples[2], samples[0], samples[4]
    );

    let dir = std::env::temp_dir().join(format!("ops-bench-snap-{}", std::process::id()));
    let start = Instant::now();
    let w = snapshot::write(&store, &dir).expect("snapshot");
    println!("snapshot write: {} hosts, {} MiB, {:.2} s", w.hosts, w.bytes >> 20, start.elapsed().as_secs_f64());
    let fresh = Store::new();
    let start = Instant::now();
    let n = snapshot::load(&fresh, &dir, |_| true).expect("load");
    println!("snapshot load: {n} hosts in {:.2} s", start.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
}
