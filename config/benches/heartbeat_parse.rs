//! Cost of reading one heartbeat body, the relay's largest piece of its own work per request:
//! `Heartbeat::parse` (the fast path, then the checks) against serde alone plus the same
//! checks, on the bench's body (3 agents) and seed 001's.
//! `cargo bench -p ops-config --bench heartbeat_parse`
use std::hint::black_box;
use std::time::Instant;

use ops_config::Heartbeat;

const BENCH_BODY: &str = r#"{"hostname":"host-0000042","ip":"10.0.0.42","runUser":"root","updaterVersion":"0.1.0","realAgents":[{"name":"falcon-agent","version":"5.1.4","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"},{"name":"mysql-monitor","version":"5.1.3","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"},{"name":"naming-agent","version":"5.1.3","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"}]}"#;
const SEED_001: &str = r#"{"hostname":"liutian-01","ip":"192.168.1.154","runUser":"admin","updaterVersion":"0.0.4","realAgents":[{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1477380651},{"name":"mysql-monitor","version":"0.0.5","status":"started","timestamp":1477380651}]}"#;

fn median_ns(f: impl Fn()) -> (f64, f64, f64) {
    const N: usize = 200_000;
    let mut samples = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        for _ in 0..N {
            f();
        }
        samples.push(start.elapsed().as_nanos() as f64 / N as f64);
    }
    samples.sort_by(f64::total_cmp);
    (samples[7], samples[0], samples[14])
}

fn main() {
    for (name, body) in [("bench body, 3 agents", BENCH_BODY), ("seed 001, 2 agents", SEED_001)] {
        let body = body.as_bytes();
        assert!(ops_config::fastjson::heartbeat(body).is_some(), "{name} takes the fast path");
        let fast = median_ns(|| {
            black_box(Heartbeat::parse(black_box(body)).unwrap());
        });
        let serde = median_ns(|| {
            let hb: Heartbeat = serde_json::from_slice(black_box(body)).unwrap();
            hb.validate().unwrap();
            black_box(hb);
        });
        println!(
            "{name}: Heartbeat::parse median {:.0} ns (min {:.0}, max {:.0}); serde + validate median {:.0} ns (min {:.0}, max {:.0}) over 15 runs of 200,000",
            fast.0, fast.1, fast.2, serde.0, serde.1, serde.2
        );
    }
}
