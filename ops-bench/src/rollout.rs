//! Phase *rollout*: a new default version of `falcon-agent` in the file every meta node reads,
//! `/config/reload?all=1`, then sweeps of the fleet (each host installs what it is told, after
//! the install delay) until a meta node's `/status/summary` shows 100 % converged.
//!
//! Staged (`--bad-build-rate R`): the new version comes with an `[agent.rollout]` (waves 1, 5,
//! 25, 100 %, soak and deadline compressed by `--speedup`), a share R of the hosts fail its
//! install, and the phase follows `/rollout/falcon-agent` until every wave converged or the
//! rollout halted; the blast radius is the hosts ever told the new version.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ops_config::status::{RolloutView, SummaryReply};
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::load::{self, Fleet, Plan, VERSIONS};

pub struct Rollout {
    /// Seconds from the reload to 50/90/99/100 % of the fleet converged (None: not reached).
    pub converged_s: Vec<(u32, Option<f64>)>,
    pub heartbeats: u64,
    pub errors: u64,
    pub staged: Option<StagedResult>,
}

/// How a staged rollout went.
pub struct StagedResult {
    pub bad_build_rate: f64,
    pub soak_s: u64,
    pub deadline_s: u64,
    pub waves_opened: u64,
    /// Seconds from the reload to each wave's opening, as the fleet served it.
    pub wave_open_s: Vec<f64>,
    pub halted: bool,
    pub halt_s: Option<f64>,
    pub halted_by: Vec<String>,
    /// Hosts ever told the new version.
    pub blast_radius: u64,
    pub hosts: u64,
}

impl Rollout {
    pub fn done(&self) -> bool {
        match &self.staged {
            // A bad build is done when it halted; a good one when it reached everybody.
            Some(s) if s.bad_build_rate > 0.0 => s.halted,
            _ => self.converged_s.iter().all(|(_, t)| t.is_some()),
        }
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "from": VERSIONS[0],
            "to": VERSIONS[2],
            "converged_s": self.converged_s.iter().map(|(p, t)| (p.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
            "heartbeats": self.heartbeats,
            "errors": self.errors,
        });
        if let Some(s) = &self.staged {
            v["staged"] = json!(true);
            v["bad_build_rate"] = json!(s.bad_build_rate);
            v["soak_s"] = json!(s.soak_s);
            v["deadline_s"] = json!(s.deadline_s);
            v["waves_opened"] = json!(s.waves_opened);
            v["wave_open_s"] = json!(s.wave_open_s);
            v["halted"] = json!(s.halted);
            v["halt_s"] = json!(s.halt_s);
            v["halted_by"] = json!(s.halted_by);
            v["blast_radius"] = json!(s.blast_radius);
            v["blast_radius_ratio"] = json!(s.blast_radius as f64 / s.hosts.max(1) as f64);
        }
        v
    }
}

/// A staged rollout's timing, already compressed.
#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub bad_build_rate: f64,
    pub soak_s: u64,
    pub deadline_s: u64,
}

/// The waves of the bench's staged rollout (cumulative percents).
pub const WAVES: [u8; 4] = [1, 5, 25, 100];

/// The bench's agents file with falcon-agent's default moved to the rollout version, staged
/// when asked.
fn next_config(agents_toml: &str, staged: Option<Staged>) -> String {
    let moved = agents_toml.replacen(
        &format!("version = \"{}\", md5 = \"490ac172dabecc867289079d48e84a66\"", VERSIONS[0]),
        &format!("version = \"{}\", md5 = \"\"", VERSIONS[2]),
        1,
    );
    let Some(s) = staged else { return moved };
    let waves: Vec<String> = WAVES.iter().map(u8::to_string).collect();
    let block = format!(
        "  [agent.rollout]\n  from = {{ version = \"{}\", md5 = \"490ac172dabecc867289079d48e84a66\" }}\n  waves = [{}]\n  soak = \"{}s\"\n  deadline = \"{}s\"\n\n[[agent]]\nname = \"mysql-monitor\"",
        VERSIONS[0],
        waves.join(", "),
        s.soak_s,
        s.deadline_s
    );
    moved.replacen("[[agent]]\nname = \"mysql-monitor\"", &block, 1)
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    c: &Cluster,
    agents_toml: &str,
    relays: &[SocketAddr],
    fleet: &Arc<Fleet>,
    client: &reqwest::Client,
    connections: usize,
    limit: Duration,
    staged: Option<Staged>,
) -> anyhow::Result<Rollout> {
    let new = next_config(agents_toml, staged);
    anyhow::ensure!(new != agents_toml, "the bench config has no falcon-agent default to move");
    std::fs::write(&c.agents_file, new)?;
    let token = std::fs::read_to_string(&c.token_file)?;
    let start = Instant::now();
    let reload = client.get(crate::cluster::meta_url(c.metas[0].addr, "/config/reload?all=1")).bearer_auth(token.trim()).send().await?;
    anyhow::ensure!(reload.status().is_success(), "reload all: {}", reload.text().await.unwrap_or_default());
    let stop = load::Live::new();
    let meta = c.metas[0].addr;
    let Some(staged) = staged else {
        let poller = tokio::spawn(follow_summary(client.clone(), meta, start, limit, stop.clone()));
        // Relays pick the new config up within their poll period; sweeps run until convergence.
        let (heartbeats, errors) = sweep_until(relays, fleet, connections, &stop).await;
        let converged_s = poller.await?;
        println!("rollout: {} -> {} converged {} ({heartbeats} heartbeats, {errors} errors)", VERSIONS[0], VERSIONS[2], show(&converged_s));
        return Ok(Rollout { converged_s, heartbeats, errors, staged: None });
    };
    let poller = tokio::spawn(follow_staged(client.clone(), meta, start, limit, stop.clone(), staged));
    let (heartbeats, errors) = sweep_until(relays, fleet, connections, &stop).await;
    let (converged_s, mut result) = poller.await??;
    result.blast_radius = fleet.touched();
    result.hosts = fleet.hosts;
    let opened: Vec<String> = result.wave_open_s.iter().map(|t| format!("{t:.1} s")).collect();
    println!(
        "rollout (staged, bad build rate {}): {} -> {} waves {} opened at [{}]; {}; converged {}; blast radius {} hosts ({:.2} % of the fleet); {heartbeats} heartbeats, {errors} errors",
        staged.bad_build_rate,
        VERSIONS[0],
        VERSIONS[2],
        result.waves_opened,
        opened.join(", "),
        match result.halt_s {
            Some(t) => format!("HALTED {t:.1} s after the reload ({})", result.halted_by.join("; ")),
            None => "not halted".to_owned(),
        },
        show(&converged_s),
        result.blast_radius,
        100.0 * result.blast_radius as f64 / fleet.hosts.max(1) as f64
    );
    Ok(Rollout { converged_s, heartbeats, errors, staged: Some(result) })
}

/// Sweeps of the whole fleet until `stop`: (heartbeats, errors).
async fn sweep_until(relays: &[SocketAddr], fleet: &Arc<Fleet>, connections: usize, stop: &Arc<load::Live>) -> (u64, u64) {
    let (mut heartbeats, mut errors) = (0, 0);
    while !stop.stop.load(Ordering::Relaxed) {
        let run = load::run(relays, fleet, connections, "rollout", Plan::Sweep, stop).await;
        heartbeats += run.requests;
        errors += run.errors;
    }
    (heartbeats, errors)
}

/// The convergence milestones (percent, seconds from the reload once reached).
fn milestones() -> Vec<(u32, Option<f64>)> {
    [50u32, 90, 99, 100].iter().map(|&p| (p, None)).collect()
}

/// Marks the milestones `percent` (of 100) has reached, at `start.elapsed()`.
fn mark(reached: &mut [(u32, Option<f64>)], percent: f64, start: Instant) {
    for (p, t) in reached.iter_mut() {
        if t.is_none() && percent >= f64::from(*p) - 1e-9 {
            *t = Some(start.elapsed().as_secs_f64());
        }
    }
}

fn show(reached: &[(u32, Option<f64>)]) -> String {
    let parts: Vec<String> = reached.iter().map(|(p, t)| format!("{p}%: {}", t.map_or("-".to_owned(), |t| format!("{t:.1} s")))).collect();
    parts.join(", ")
}

/// Follows `/status/summary/falcon-agent` on one meta node once a second until the fleet is
/// converged or `limit`; sets `stop` at the end.
async fn follow_summary(
    client: reqwest::Client,
    meta: SocketAddr,
    start: Instant,
    limit: Duration,
    stop: Arc<load::Live>,
) -> Vec<(u32, Option<f64>)> {
    let url = crate::cluster::meta_url(meta, "/status/summary/falcon-agent");
    let mut reached = milestones();
    while start.elapsed() < limit {
        if let Ok(r) = client.get(&url).send().await
            && let Ok(v) = r.json::<SummaryReply>().await
        {
            // The ratio counts hosts already told the new version only after the desired side
            // changed: wait until the summary shows the new version desired.
            if v.summary.desired.iter().any(|x| x.version == VERSIONS[2]) {
                mark(&mut reached, v.summary.converged_ratio * 100.0, start);
            }
        }
        if reached.iter().all(|(_, t)| t.is_some()) {
            break;
        }
        // A summary of a million hosts takes a core for tens of ms: poll gently.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop.stop.store(true, Ordering::Relaxed);
    reached
}

/// Follows `/rollout/falcon-agent` on one meta node once a second until every wave converged,
/// the rollout halted (then one more sweep's worth of time, to show nobody new is told), or
/// `limit`; sets `stop` at the end. Milestones are shares of the rollout's hosts converged.
async fn follow_staged(
    client: reqwest::Client,
    meta: SocketAddr,
    start: Instant,
    limit: Duration,
    stop: Arc<load::Live>,
    staged: Staged,
) -> anyhow::Result<(Vec<(u32, Option<f64>)>, StagedResult)> {
    let url = crate::cluster::meta_url(meta, "/rollout/falcon-agent");
    let mut reached = milestones();
    let mut r = StagedResult {
        bad_build_rate: staged.bad_build_rate,
        soak_s: staged.soak_s,
        deadline_s: staged.deadline_s,
        waves_opened: 0,
        wave_open_s: Vec::new(),
        halted: false,
        halt_s: None,
        halted_by: Vec::new(),
        blast_radius: 0,
        hosts: 0,
    };
    let mut halted_at: Option<Instant> = None;
    while start.elapsed() < limit {
        if let Ok(resp) = client.get(&url).send().await
            && let Ok(v) = resp.json::<RolloutView>().await
        {
            let wave = v.fleet_wave as u64;
            while r.waves_opened < wave {
                r.waves_opened += 1;
                r.wave_open_s.push(start.elapsed().as_secs_f64());
            }
            let (converged, targeted) = v.waves.iter().fold((0, 0), |(c, t), w| (c + w.converged, t + w.targeted));
            if targeted > 0 {
                mark(&mut reached, converged as f64 * 100.0 / targeted as f64, start);
            }
            if v.halted && !r.halted {
                r.halted = true;
                r.halt_s = Some(start.elapsed().as_secs_f64());
                r.halted_by = v.halted_by;
                halted_at = Some(Instant::now());
            }
        }
        if reached.iter().all(|(_, t)| t.is_some()) && r.waves_opened == WAVES.len() as u64 {
            break;
        }
        // After a halt, keep the fleet reporting a little: the blast radius must not grow.
        if halted_at.is_some_and(|t| t.elapsed() > Duration::from_secs(staged.soak_s.clamp(5, 30))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop.stop.store(true, Ordering::Relaxed);
    Ok((reached, r))
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_config_moves_only_the_falcon_default() {
        let next = super::next_config(crate::AGENTS_TOML, None);
        let parsed = ops_config::DesiredConfig::parse(&next, "next.toml").expect("the rolled config parses");
        let first = parsed.desired_for("dc1-host-0000001");
        let falcon = first.iter().find(|d| d.name == "falcon-agent").unwrap();
        assert_eq!(falcon.version, "5.1.5");
        let web = parsed.desired_for("bj-web-0000010");
        assert_eq!(web.iter().find(|d| d.name == "falcon-agent").unwrap().version, "5.1.4", "the prefix group keeps its version");
        assert_eq!(first.iter().find(|d| d.name == "mysql-monitor").unwrap().version, "5.1.3");
    }

    #[test]
    fn the_staged_config_parses_with_its_rollout() {
        let staged = super::Staged { bad_build_rate: 0.3, soak_s: 90, deadline_s: 120 };
        let next = super::next_config(crate::AGENTS_TOML, Some(staged));
        let parsed = ops_config::DesiredConfig::parse(&next, "next.toml").expect("the staged config parses");
        let spec = parsed.agents()[0].rollout.as_ref().expect("falcon-agent has a rollout");
        assert_eq!(spec.policy.waves, super::WAVES.to_vec());
        assert_eq!((spec.policy.soak_seconds, spec.policy.deadline_seconds), (90, 120));
        assert_eq!(spec.from.version, "5.1.3");
        assert_eq!(parsed.agents()[1].name, "mysql-monitor");
        // Before any wave opens, hosts keep the old version.
        assert_eq!(parsed.desired_for("dc1-host-0000001")[0].version, "5.1.3");
    }
}
