//! Phase *steady*: every host reports once per interval, the interval compressed by the
//! speedup; relay pending hosts and batch sizes are read from the relays' `/metrics`. With
//! `--kill-meta` or `--chaos`, faults are injected a third of the way in, one scenario after
//! the other (`chaos`), while the load goes on; the phase lasts at least until they are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ops_config::status::SummaryReply;
use serde_json::{Value, json};

use crate::chaos::{self, Scenario};
use crate::cluster::Cluster;
use crate::load::{self, Fleet, Live, Plan};

pub struct Settings {
    pub interval: Duration,
    pub speedup: f64,
    pub duration: Duration,
    pub connections: usize,
    /// Faults injected one after the other (`--kill-meta`, `--chaos`).
    pub scenarios: Vec<Scenario>,
    /// How long `stop-meta` keeps its node stopped.
    pub pause: Duration,
    /// How long after a fault's copies went home the processes' RSS is read again.
    pub rss_settle: Duration,
}

pub struct Steady {
    pub target_per_s: f64,
    pub run: load::Run,
    /// Most hosts waiting in all relays' buffers at once, sampled twice a second.
    pub relay_pending_max: u64,
    /// Mean hosts per batch the relays sent during the phase.
    pub batch_hosts_mean: f64,
    pub chaos: Vec<chaos::Row>,
    /// Each process's RSS at the end of every interval of the phase.
    pub rss: Vec<(String, Vec<u64>)>,
}

impl Steady {
    /// Per process: the largest RSS after the first interval over the RSS at the end of it
    /// (None before two intervals, or for a process restarted meanwhile).
    pub fn rss_growth(&self) -> Vec<(String, Option<f64>)> {
        self.rss
            .iter()
            .map(|(name, v)| {
                let growth = match v.as_slice() {
                    [first, rest @ ..] if *first > 0 && !rest.is_empty() && rest.iter().all(|&b| b > 0) => {
                        Some(*rest.iter().max().unwrap_or(first) as f64 / *first as f64)
                    }
                    _ => None,
                };
                (name.clone(), growth)
            })
            .collect()
    }

    pub fn json(&self) -> Value {
        let kill = self.chaos.iter().find(|r| r.name == Scenario::KillMeta.name());
        json!({
            "target_per_s": self.target_per_s,
            "heartbeats_per_s": self.run.rate(),
            "heartbeats": self.run.requests,
            "p50_ms": self.run.percentile_ms(0.5),
            "p99_ms": self.run.percentile_ms(0.99),
            "max_ms": self.run.percentile_ms(1.0),
            "errors": self.run.errors,
            "relay_pending_max": self.relay_pending_max,
            "batch_hosts_mean": self.batch_hosts_mean,
            "kill_meta": kill.map(|k| json!({
                "node": k.fault.trim_start_matches("SIGKILL "),
                "updater_errors": k.errors,
                "complete_again_s": k.complete_s,
                "restored_s": k.whole_s,
                "summary_p99_ms": k.summary_p99_ms,
                "listed_hosts": k.listed,
                "missing_hosts": k.missing,
                "hosts_listed_twice": k.twice,
            })),
            "chaos": self.chaos.iter().map(chaos::Row::json).collect::<Vec<_>>(),
            "rss_per_interval_bytes": self.rss.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "rss_growth_after_first_interval": self.rss_growth().into_iter().map(|(n, g)| (n, json!(g))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// Sums of relay metrics that the phase reads.
#[derive(Default, Clone, Copy)]
struct RelayFigures {
    pending: f64,
    batch_sum: f64,
    batch_count: f64,
}

async fn relay_figures(client: &reqwest::Client, relays: &[SocketAddr]) -> RelayFigures {
    let mut f = RelayFigures::default();
    for r in relays {
        let Ok(resp) = client.get(format!("http://{r}/metrics")).send().await else { continue };
        let Ok(text) = resp.text().await else { continue };
        f.pending += ops_config::prom::sum(&text, "ops_relay_pending_hosts");
        f.batch_sum += ops_config::prom::sum(&text, "ops_relay_batch_hosts_sum");
        f.batch_count += ops_config::prom::sum(&text, "ops_relay_batch_hosts_count");
    }
    f
}

/// Hosts a meta node's summary counts, and whether it said the answer is partial.
pub async fn summary_hosts(client: &reqwest::Client, meta: SocketAddr) -> Option<(u64, bool)> {
    let r: SummaryReply =
        client.get(crate::cluster::meta_url(meta, "/status/summary/falcon-agent")).send().await.ok()?.json().await.ok()?;
    Some((r.summary.hosts, r.partial))
}

pub async fn run(
    s: &Settings,
    relays: &[SocketAddr],
    fleet: &Arc<Fleet>,
    cluster: Option<&mut Cluster>,
    client: &reqwest::Client,
) -> anyhow::Result<Steady> {
    let compressed = s.interval.as_secs_f64() / s.speedup;
    let target_per_s = fleet.hosts as f64 / compressed;
    let before = relay_figures(client, relays).await;
    let live = Live::new();
    let load = {
        let (relays, fleet, live, connections) = (relays.to_vec(), fleet.clone(), live.clone(), s.connections);
        tokio::spawn(
            async move { load::run(&relays, &fleet, connections, "steady", Plan::Paced { per_second: target_per_s }, &live).await },
        )
    };
    let sampler = {
        let (client, relays, live) = (client.clone(), relays.to_vec(), live.clone());
        tokio::spawn(async move {
            let mut max = 0f64;
            while !live.stop.load(Ordering::Relaxed) {
                max = max.max(relay_figures(&client, &relays).await.pending);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            max as u64
        })
    };
    // RSS of every process once per interval: a long run (the soak) shows whether memory stays
    // flat after the first interval.
    let procs: Vec<(String, u32)> =
        cluster.as_ref().map(|c| c.processes().map(|p| (p.name.clone(), p.pid())).collect()).unwrap_or_default();
    let rss_task = {
        let live = live.clone();
        let every = Duration::from_secs_f64(compressed);
        tokio::spawn(async move {
            let mut samples: Vec<Vec<u64>> = vec![Vec::new(); procs.len()];
            while !live.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                for ((_, pid), v) in procs.iter().zip(samples.iter_mut()) {
                    v.push(crate::cluster::usage(*pid).map_or(0, |u| u.0));
                }
            }
            procs.into_iter().map(|p| p.0).zip(samples).collect::<Vec<_>>()
        })
    };
    let start = Instant::now();
    let mut rows = Vec::new();
    match cluster {
        Some(cluster) if !s.scenarios.is_empty() => {
            // Faults start a third into the phase, once the load is steady.
            tokio::time::sleep(s.duration / 3).await;
            let summaries = chaos::Sampler::start(client.clone(), cluster.metas[0].addr);
            let mut ctx = chaos::Ctx {
                cluster,
                client,
                live: &live,
                sampler: &summaries,
                hosts: fleet.hosts,
                interval: Duration::from_secs_f64(compressed),
                pause: s.pause,
                settle: s.rss_settle,
                baseline: Vec::new(),
            };
            ctx.baseline = ctx.rss();
            for &scenario in &s.scenarios {
                let row = chaos::run(&mut ctx, scenario).await?;
                println!("chaos: {}", row.line());
                rows.push(row);
            }
            tokio::time::sleep(s.duration.saturating_sub(start.elapsed())).await;
        }
        _ => tokio::time::sleep(s.duration).await,
    }
    live.stop.store(true, Ordering::Relaxed);
    let run = load.await?;
    let relay_pending_max = sampler.await?;
    let rss = rss_task.await?;
    let after = relay_figures(client, relays).await;
    let batches = after.batch_count - before.batch_count;
    let batch_hosts_mean = if batches > 0.0 { (after.batch_sum - before.batch_sum) / batches } else { 0.0 };
    Ok(Steady { target_per_s, run, relay_pending_max, batch_hosts_mean, chaos: rows, rss })
}
