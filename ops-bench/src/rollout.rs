//! Phase *rollout*: a new default version of `falcon-agent` in the file every meta node reads,
//! `/config/reload?all=1`, then sweeps of the fleet (each host installs what it is told, after
//! the install delay) until a meta node's `/status/summary` shows 100 % converged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::load::{self, Fleet, Plan, VERSIONS};

pub struct Rollout {
    /// Seconds from the reload to 50/90/99/100 % of the fleet converged (None: not reached).
    pub converged_s: Vec<(u32, Option<f64>)>,
    pub heartbeats: u64,
    pub errors: u64,
}

impl Rollout {
    pub fn done(&self) -> bool {
        self.converged_s.iter().all(|(_, t)| t.is_some())
    }

    pub fn json(&self) -> Value {
        json!({
            "from": VERSIONS[0],
            "to": VERSIONS[2],
            "converged_s": self.converged_s.iter().map(|(p, t)| (p.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
            "heartbeats": self.heartbeats,
            "errors": self.errors,
        })
    }
}

/// The bench's agents file with falcon-agent's default moved to the rollout version.
fn next_config(agents_toml: &str) -> String {
    agents_toml.replacen(
        &format!("version = \"{}\", md5 = \"490ac172dabecc867289079d48e84a66\"", VERSIONS[0]),
        &format!("version = \"{}\", md5 = \"\"", VERSIONS[2]),
        1,
    )
}

pub async fn run(
    c: &Cluster,
    agents_toml: &str,
    relays: &[SocketAddr],
    fleet: &Arc<Fleet>,
    client: &reqwest::Client,
    connections: usize,
    limit: Duration,
) -> anyhow::Result<Rollout> {
    let new = next_config(agents_toml);
    anyhow::ensure!(new != agents_toml, "the bench config has no falcon-agent default to move");
    std::fs::write(&c.agents_file, new)?;
    let token = std::fs::read_to_string(&c.token_file)?;
    let start = Instant::now();
    let reload = client.get(format!("http://{}/config/reload?all=1", c.metas[0].addr)).bearer_auth(token.trim()).send().await?;
    anyhow::ensure!(reload.status().is_success(), "reload all: {}", reload.text().await.unwrap_or_default());
    let targets = [50u32, 90, 99, 100];
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (client, url, stop) = (client.clone(), format!("http://{}/status/summary/falcon-agent", c.metas[0].addr), stop.clone());
        tokio::spawn(async move {
            let mut reached: Vec<(u32, Option<f64>)> = targets.iter().map(|&p| (p, None)).collect();
            while start.elapsed() < limit {
                if let Ok(r) = client.get(&url).send().await
                    && let Ok(v) = r.json::<Value>().await
                {
                    let ratio = v["convergedRatio"].as_f64().unwrap_or(0.0);
                    // The ratio counts hosts already told the new version only after the
                    // desired side changed: wait until the summary shows the new version desired.
                    let new_desired = v["desired"].as_array().is_some_and(|d| d.iter().any(|x| x["version"] == VERSIONS[2]));
                    for (p, t) in reached.iter_mut() {
                        if t.is_none() && new_desired && ratio * 100.0 >= f64::from(*p) - 1e-9 {
                            *t = Some(start.elapsed().as_secs_f64());
                        }
                    }
                }
                if reached.iter().all(|(_, t)| t.is_some()) {
                    break;
                }
                // A summary of a million hosts takes a core for tens of ms: poll gently.
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            stop.store(true, Ordering::Relaxed);
            reached
        })
    };
    // Relays pick the new config up within their poll period; sweeps run until convergence.
    let (mut heartbeats, mut errors) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let run = load::run(relays, fleet, connections, "rollout", Plan::Sweep, &stop).await;
        heartbeats += run.requests;
        errors += run.errors;
    }
    let converged_s = poller.await?;
    let show: Vec<String> =
        converged_s.iter().map(|(p, t)| format!("{p}%: {}", t.map_or("-".to_owned(), |t| format!("{t:.1} s")))).collect();
    println!("rollout: {} -> {} converged {} ({heartbeats} heartbeats, {errors} errors)", VERSIONS[0], VERSIONS[2], show.join(", "));
    Ok(Rollout { converged_s, heartbeats, errors })
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_config_moves_only_the_falcon_default() {
        let next = super::next_config(crate::AGENTS_TOML);
        let parsed = ops_config::DesiredConfig::parse(&next, "next.toml").expect("the rolled config parses");
        let first = parsed.desired_for("dc1-host-0000001");
        let falcon = first.iter().find(|d| d.name == "falcon-agent").unwrap();
        assert_eq!(falcon.version, "5.1.5");
        let web = parsed.desired_for("bj-web-0000010");
        assert_eq!(web.iter().find(|d| d.name == "falcon-agent").unwrap().version, "5.1.4", "the prefix group keeps its version");
        assert_eq!(first.iter().find(|d| d.name == "mysql-monitor").unwrap().version, "5.1.3");
    }
}
