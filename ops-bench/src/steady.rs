//! Phase *steady*: every host reports once per interval, the interval compressed by the
//! speedup; relay pending hosts and batch sizes are read from the relays' `/metrics`. With
//! `--kill-meta` one meta node is SIGKILLed a third of the way in: the updaters must see no
//! error, and the phase measures how long until a surviving node's summary counts every host
//! again (through the relays' failover), then restarts the node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::load::{self, Fleet, Plan};

pub struct Settings {
    pub interval: Duration,
    pub speedup: f64,
    pub duration: Duration,
    pub connections: usize,
    pub kill_meta: bool,
}

pub struct Steady {
    pub target_per_s: f64,
    pub run: load::Run,
    /// Most hosts waiting in all relays' buffers at once, sampled twice a second.
    pub relay_pending_max: u64,
    /// Mean hosts per batch the relays sent during the phase.
    pub batch_hosts_mean: f64,
    pub kill: Option<Kill>,
}

pub struct Kill {
    pub node: String,
    /// Seconds from the SIGKILL until a surviving node's summary counted every host.
    pub complete_again_s: Option<f64>,
    /// Seconds from the restart until the summary was complete and no longer partial.
    pub restored_s: Option<f64>,
}

impl Steady {
    pub fn json(&self) -> Value {
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
            "kill_meta": self.kill.as_ref().map(|k| json!({
                "node": k.node,
                "updater_errors": self.run.errors,
                "complete_again_s": k.complete_again_s,
                "restored_s": k.restored_s,
            })),
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

/// Reads one Prometheus text exposition: the sum of every sample of `name` (any labels).
fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn relay_figures(client: &reqwest::Client, relays: &[SocketAddr]) -> RelayFigures {
    let mut f = RelayFigures::default();
    for r in relays {
        let Ok(resp) = client.get(format!("http://{r}/metrics")).send().await else { continue };
        let Ok(text) = resp.text().await else { continue };
        f.pending += sum_metric(&text, "ops_relay_pending_hosts");
        f.batch_sum += sum_metric(&text, "ops_relay_batch_hosts_sum");
        f.batch_count += sum_metric(&text, "ops_relay_batch_hosts_count");
    }
    f
}

/// Hosts a meta node's summary counts, and whether it said the answer is partial.
pub async fn summary_hosts(client: &reqwest::Client, meta: SocketAddr) -> Option<(u64, bool)> {
    let v: Value = client.get(format!("http://{meta}/status/summary/falcon-agent")).send().await.ok()?.json().await.ok()?;
    Some((v["hosts"].as_u64()?, v["partial"].as_bool().unwrap_or(false)))
}

/// Polls `meta`'s summary until it counts `hosts` (and, with `whole`, is not partial).
async fn until_complete(client: &reqwest::Client, meta: SocketAddr, hosts: u64, whole: bool, limit: Duration) -> Option<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some((n, partial)) = summary_hosts(client, meta).await
            && n >= hosts
            && (!whole || !partial)
        {
            return Some(start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

pub async fn run(
    s: &Settings,
    relays: &[SocketAddr],
    metas: &[SocketAddr],
    fleet: &Arc<Fleet>,
    cluster: Option<&mut Cluster>,
    client: &reqwest::Client,
) -> anyhow::Result<Steady> {
    let compressed = s.interval.as_secs_f64() / s.speedup;
    let target_per_s = fleet.hosts as f64 / compressed;
    let before = relay_figures(client, relays).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (relays, fleet, stop, connections) = (relays.to_vec(), fleet.clone(), stop.clone(), s.connections);
        tokio::spawn(
            async move { load::run(&relays, &fleet, connections, "steady", Plan::Paced { per_second: target_per_s }, &stop).await },
        )
    };
    let sampler = {
        let (client, relays, stop) = (client.clone(), relays.to_vec(), stop.clone());
        tokio::spawn(async move {
            let mut max = 0f64;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(relay_figures(&client, &relays).await.pending);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            max as u64
        })
    };
    let start = Instant::now();
    let mut kill = None;
    match cluster {
        Some(c) if s.kill_meta && c.metas.len() > 1 => {
            tokio::time::sleep(s.duration / 3).await;
            let victim = c.metas.last_mut().expect("more than one meta node");
            victim.kill();
            let node = victim.name.clone();
            // The survivors count every host again once each of the dead node's hosts has
            // reported through a relay's failover: about one compressed interval.
            let limit = Duration::from_secs_f64(3.0 * compressed + 10.0);
            let complete_again_s = until_complete(client, metas[0], fleet.hosts, false, limit).await;
            let rest = s.duration.saturating_sub(start.elapsed());
            tokio::time::sleep(rest).await;
            stop.store(true, Ordering::Relaxed);
            let restart = Instant::now();
            let victim = c.metas.last_mut().expect("more than one meta node");
            victim.restart()?;
            // Hosts the restarted node owns are held as failover copies by the others until
            // the relays send them home; the summary is whole again once the node answers.
            let restored_s =
                until_complete(client, metas[0], fleet.hosts, true, Duration::from_secs(60)).await.map(|_| restart.elapsed().as_secs_f64());
            kill = Some(Kill { node, complete_again_s, restored_s });
        }
        _ => {
            tokio::time::sleep(s.duration).await;
            stop.store(true, Ordering::Relaxed);
        }
    }
    let run = load.await?;
    let relay_pending_max = sampler.await?;
    let after = relay_figures(client, relays).await;
    let batches = after.batch_count - before.batch_count;
    let batch_hosts_mean = if batches > 0.0 { (after.batch_sum - before.batch_sum) / batches } else { 0.0 };
    Ok(Steady { target_per_s, run, relay_pending_max, batch_hosts_mean, kill })
}

#[cfg(test)]
mod tests {
    use super::sum_metric;

    #[test]
    fn sums_every_labelled_sample_of_one_name_only() {
        let text = "# TYPE ops_relay_pending_hosts gauge\n\
                    ops_relay_pending_hosts{node=\"meta-1\"} 12\n\
                    ops_relay_pending_hosts{node=\"meta-2\"} 30\n\
                    ops_relay_pending_hosts_other 99\n\
                    ops_relay_batch_hosts_sum 1500\n\
                    ops_relay_batch_hosts_count 3\n";
        assert_eq!(sum_metric(text, "ops_relay_pending_hosts"), 42.0);
        assert_eq!(sum_metric(text, "ops_relay_batch_hosts_sum"), 1500.0);
        assert_eq!(sum_metric(text, "ops_relay_batch_hosts_count"), 3.0);
        assert_eq!(sum_metric(text, "ops_relay_missing"), 0.0);
    }
}
