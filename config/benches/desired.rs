//! Cost of `desired_ref`/`class_of` per call: the resolution every heartbeat does.
//! `cargo bench -p ops-config --bench desired`
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use ops_config::DesiredConfig;

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agents.toml");
    let cfg = DesiredConfig::load(&path).expect("example config");
    let hosts: Vec<String> = (0..100_000)
        .map(|i| match i % 4 {
            0 => format!("bj-web-{i:06}"),
            1 => format!("bj-db-{i:06}"),
            _ => format!("sh-app-{i:06}"),
        })
        .collect();
    let mut samples = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        for h in &hosts {
            black_box(cfg.desired_ref(black_box(h)));
        }
        samples.push(start.elapsed().as_nanos() as f64 / hosts.len() as f64);
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "desired_ref: median {:.1} ns/call (min {:.1}, max {:.1}) over 15 runs of {} hosts",
        samples[7],
        samples[0],
        samples[14],
        hosts.len()
    );
    let mut owned = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        for h in &hosts[..10_000] {
            black_box(cfg.desired_for(black_box(h)));
        }
        owned.push(start.elapsed().as_nanos() as f64 / 10_000.0);
    }
    owned.sort_by(f64::total_cmp);
    println!("desired_for (owned Vec): median {:.1} ns/call", owned[7]);
}
