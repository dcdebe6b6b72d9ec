//! The fleet's staged rollouts as a heartbeat server sees them (relays, and meta nodes for the
//! updaters that talk to them directly).
//!
//! Every meta node publishes, per rollout, an `approved_wave` that only grows and a `halted`
//! flag that only goes from false to true (`GET /internal/rollout`). A [`FleetView`] keeps the
//! last value each node published (on disk too, so a restarted relay serves the same wave
//! before it reaches any node) and answers by the fleet's state: the lowest approved wave over
//! all nodes of the cluster map, halted if any node says so. A node never heard from counts as
//! wave 0, and an unreachable node keeps its last value: a dead node never lets a rollout run
//! ahead. No node coordinates with another.
//!
//! On top of the waves, a server holds at most `max_in_flight_per_relay` hosts told the target
//! and not converged yet; further wave members keep `from` until some converge.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use compact_str::CompactString;
use hashbrown::HashMap;
use ops_config::rollout::{NodeReport, RolloutReport, is_converged};
use ops_config::{ClassId, Heartbeat, MAX_ROLLOUTS};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::desired::Loaded;

const FILE_NAME: &str = "rollout-view.json";

/// The fleet's state of each rollout of one loaded config, by rollout number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// Config generation and view epoch this was computed for.
    generation: u32,
    epoch: u64,
    pub wave: [usize; MAX_ROLLOUTS],
    pub halted: [bool; MAX_ROLLOUTS],
    /// Any rollout with an open wave or halted: otherwise every host gets the plain reply.
    pub active: bool,
}

/// Hosts one server told a rollout's target that have not converged yet, with when.
#[derive(Default)]
struct InFlight {
    agent: String,
    target: String,
    hosts: HashMap<CompactString, u32>,
}

/// What a view knows of each meta node of the map, by map index.
struct Known {
    ids: Vec<String>,
    reports: Vec<Option<Vec<RolloutReport>>>,
    /// Added to the map after this view was made (`FleetView::set_ids`): such a node counts
    /// only for the rollouts it publishes, so a node joining the cluster never drops the
    /// fleet to wave 0 before it has adopted the fleet's waves.
    joining: Vec<bool>,
}

/// The last published state of every meta node, and the in-flight counts of this server.
pub struct FleetView {
    nodes: Mutex<Known>,
    epoch: AtomicU64,
    cache: ArcSwapOption<Fleet>,
    file: Option<PathBuf>,
    in_flight: [Mutex<InFlight>; MAX_ROLLOUTS],
    in_flight_gauge: &'static str,
}

/// What a heartbeat is answered: the host's class, its rollout mask (bit r: told rollout r's
/// target) and the serialized reply.
pub struct Answer {
    pub class: ClassId,
    pub told: u8,
    /// The host's wave per rollout (`DesiredConfig::rollout_waves`; 0 without rollouts).
    pub waves: u16,
    pub reply: Bytes,
}

impl FleetView {
    /// A view of the nodes `ids` (cluster map order), kept in `dir` when given (a damaged file
    /// is logged and ignored: every node then counts as never heard from, which holds the
    /// rollouts). `in_flight_gauge` names the gauge of in-flight hosts per agent.
    pub fn open(ids: Vec<String>, dir: Option<&Path>, in_flight_gauge: &'static str) -> Self {
        let file = dir.map(|d| d.join(FILE_NAME));
        let mut nodes = vec![None; ids.len()];
        if let Some(path) = &file
            && let Ok(text) = std::fs::read_to_string(path)
        {
            match serde_json::from_str::<std::collections::BTreeMap<String, Vec<RolloutReport>>>(&text) {
                Ok(saved) => {
                    for (i, id) in ids.iter().enumerate() {
                        nodes[i] = saved.get(id).cloned();
                    }
                    tracing::info!(file = %path.display(), nodes = saved.len(), "rollout state of the meta nodes loaded");
                }
                Err(error) => tracing::error!(%error, file = %path.display(), "rollout state unreadable; every node counts as wave 0"),
            }
        }
        let joining = vec![false; ids.len()];
        FleetView {
            nodes: Mutex::new(Known { ids, reports: nodes, joining }),
            epoch: AtomicU64::new(1),
            cache: ArcSwapOption::empty(),
            file,
            in_flight: Default::default(),
            in_flight_gauge,
        }
    }

    /// Node `i` published `rollouts` (its `/internal/rollout`). Kept (and written to disk)
    /// only when it changed; per-wave figures are not kept.
    pub fn update(&self, i: usize, mut rollouts: Vec<RolloutReport>) {
        for r in &mut rollouts {
            r.waves.clear();
            r.verdict.clear();
            r.fleet_wave = 0;
        }
        let bytes = {
            let mut known = self.nodes.lock();
            let Known { ids, reports: nodes, .. } = &mut *known;
            if i >= nodes.len() || nodes[i].as_ref() == Some(&rollouts) {
                return;
            }
            if let Some(old) = &nodes[i] {
                for r in &rollouts {
                    let before = old.iter().find(|o| o.agent == r.agent && o.target == r.target);
                    if before.is_none_or(|b| b.approved_wave != r.approved_wave || b.halted != r.halted) {
                        tracing::info!(node = %ids[i], agent = %r.agent, target = %r.target, wave = r.approved_wave, halted = r.halted, "rollout state of a meta node changed");
                    }
                }
            }
            nodes[i] = Some(rollouts);
            self.epoch.fetch_add(1, Ordering::Release);
            let saved: std::collections::BTreeMap<&str, &Vec<RolloutReport>> =
                ids.iter().zip(nodes.iter()).filter_map(|(id, n)| n.as_ref().map(|n| (id.as_str(), n))).collect();
            serde_json::to_vec_pretty(&saved).expect("plain data serializes")
        };
        if let Some(path) = &self.file
            && let Err(error) = ops_config::disk::write_atomically(path, &bytes)
        {
            tracing::error!(%error, file = %path.display(), "cannot keep the rollout state on disk");
        }
    }

    /// The last state node `i` published, if it was ever heard from.
    pub fn node(&self, i: usize) -> Option<Vec<RolloutReport>> {
        self.nodes.lock().reports.get(i).cloned().flatten()
    }

    /// Node ids, cluster map order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.lock().ids.clone()
    }

    /// The cluster map changed: the view now holds `ids` (map order). A node kept keeps what it
    /// published; a node that left no longer counts; a node that joined counts only for the
    /// rollouts it publishes (see `Known::joining`).
    pub fn set_ids(&self, ids: Vec<String>) {
        let mut known = self.nodes.lock();
        if known.ids == ids {
            return;
        }
        let old = std::mem::replace(&mut *known, Known { reports: vec![None; ids.len()], joining: vec![true; ids.len()], ids });
        let Known { ids, reports, joining } = &mut *known;
        for (i, id) in ids.iter().enumerate() {
            if let Some(k) = old.ids.iter().position(|o| o == id) {
                reports[i] = old.reports[k].clone();
                joining[i] = old.joining[k];
            }
        }
        self.epoch.fetch_add(1, Ordering::Release);
        tracing::info!(nodes = ?ids, "rollout view follows the new cluster map");
    }

    /// The fleet's state of `loaded`'s rollouts (cached until the config or a node changes).
    pub fn fleet(&self, loaded: &Loaded) -> Arc<Fleet> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some(f) = self.cache.load_full()
            && f.generation == loaded.generation
            && f.epoch == epoch
        {
            return f;
        }
        let mut fleet =
            Fleet { generation: loaded.generation, epoch, wave: [0; MAX_ROLLOUTS], halted: [false; MAX_ROLLOUTS], active: false };
        {
            let known = self.nodes.lock();
            for (r, agent) in loaded.config.rollouts().enumerate() {
                let target = agent.default.version.as_str();
                let states: Vec<Option<ops_config::rollout::NodeRollout>> = known
                    .reports
                    .iter()
                    .zip(&known.joining)
                    .filter_map(|(n, &joining)| {
                        let state = n
                            .as_ref()
                            .and_then(|n| n.iter().find(|x| x.agent == agent.name && x.target == target))
                            .map(RolloutReport::state);
                        if joining && state.is_none() { None } else { Some(state) }
                    })
                    .collect();
                let (wave, halted) = ops_config::rollout::fleet_state(&states);
                fleet.wave[r] = wave;
                fleet.halted[r] = halted;
                fleet.active |= wave > 0 || halted;
            }
        }
        let fleet = Arc::new(fleet);
        self.cache.store(Some(fleet.clone()));
        fleet
    }

    /// What to answer the heartbeat `hb` received at `now`: per rollout, a host of an open wave
    /// gets the target (within the in-flight limit); after a halt only hosts already running
    /// the target keep it; an abort sends everybody back to `from`.
    pub fn answer(&self, loaded: &Loaded, hb: &Heartbeat<'_>, now: u32) -> Answer {
        let config = &loaded.config;
        let class = config.class_of(&hb.hostname);
        // Without rollouts (the usual case) nothing more is looked at.
        if config.rollouts().next().is_none() {
            return Answer { class, told: 0, waves: 0, reply: loaded.reply(class) };
        }
        let waves = config.rollout_waves(&hb.hostname, class);
        let fleet = self.fleet(loaded);
        if !fleet.active {
            return Answer { class, told: 0, waves, reply: loaded.reply(class) };
        }
        // Wave members of open waves; after a halt, members of any wave (only those already on
        // the target keep it). Aborted rollouts and `others` groups are in neither.
        let open = config.mask_of_waves(waves, &fleet.wave);
        let members = config.mask_of_waves(waves, &[ops_config::rollout::MAX_WAVES; MAX_ROLLOUTS]);
        let mut told = 0u8;
        for (r, agent) in config.rollouts().enumerate() {
            let candidates = if fleet.halted[r] { members } else { open };
            let (Some(spec), Some(target)) = (&agent.rollout, config.class_target(class, r)) else { continue };
            if candidates & (1 << r) == 0 {
                continue;
            }
            let real = hb.real_agents.iter().find(|a| a.name == agent.name);
            let on_target = real.is_some_and(|a| a.version == target.version);
            let converged = real.is_some_and(|a| is_converged(on_target, &a.status, &target.cmd, !a.last_error.is_empty()));
            let yes = if fleet.halted[r] {
                on_target
            } else {
                match spec.max_in_flight_per_relay {
                    None => true,
                    Some(limit) => self.admit(r, &agent.name, &target.version, &hb.hostname, on_target, converged, limit as usize, now),
                }
            };
            if yes {
                told |= 1 << r;
            }
        }
        Answer { class, told, waves, reply: loaded.reply_for(class, told) }
    }

    /// Whether a wave member may be told the target under the in-flight limit.
    #[allow(clippy::too_many_arguments)]
    fn admit(&self, r: usize, agent: &str, target: &str, host: &str, on_target: bool, converged: bool, limit: usize, now: u32) -> bool {
        let mut f = self.in_flight[r].lock();
        if f.agent != agent || f.target != target {
            *f = InFlight { agent: agent.to_owned(), target: target.to_owned(), hosts: HashMap::new() };
        }
        if converged {
            f.hosts.remove(host);
            return true;
        }
        if f.hosts.contains_key(host) {
            return true;
        }
        // A host already running the target (told before a restart, or by another server)
        // keeps it, even over the limit.
        if on_target || f.hosts.len() < limit {
            f.hosts.insert(CompactString::from(host), now);
            return true;
        }
        false
    }

    /// Hosts in flight per rollout of `loaded` (0 for rollouts without a limit).
    pub fn in_flight(&self, loaded: &Loaded) -> Vec<(String, usize)> {
        loaded.config.rollouts().enumerate().map(|(r, a)| (a.name.clone(), self.in_flight[r].lock().hosts.len())).collect()
    }

    /// Forgets in-flight hosts told longer than the rollout's deadline ago (the meta nodes count
    /// them as failed; their slot goes to another host) and those of a rollout that changed,
    /// halted or was aborted; sets the in-flight gauges.
    pub fn prune(&self, loaded: &Loaded, now: u32) {
        let fleet = self.fleet(loaded);
        for (r, agent) in loaded.config.rollouts().enumerate() {
            let Some(spec) = &agent.rollout else { continue };
            let mut f = self.in_flight[r].lock();
            if f.agent != agent.name || f.target != agent.default.version || fleet.halted[r] || spec.policy.abort {
                f.hosts.clear();
            }
            let cutoff = u64::from(now).saturating_sub(spec.policy.deadline_seconds);
            f.hosts.retain(|_, &mut told| u64::from(told) >= cutoff);
            ::metrics::gauge!(self.in_flight_gauge, "agent" => agent.name.clone()).set(f.hosts.len() as f64);
        }
        for f in self.in_flight.iter().skip(loaded.config.rollouts().count()) {
            f.lock().hosts.clear();
        }
    }

    /// Asks node `i` at `base` (`http[s]://addr`) for its published state.
    pub async fn poll_node(&self, i: usize, base: &str, client: &reqwest::Client, token: Option<&str>) -> Result<(), String> {
        let url = format!("{base}/internal/rollout");
        let mut req = client.get(&url).timeout(Duration::from_secs(5));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let r = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("{url}: {}", r.status()));
        }
        let report: NodeReport = r.json().await.map_err(|e| format!("{url}: {e}"))?;
        let expected = self.nodes.lock().ids.get(i).cloned().unwrap_or_default();
        if report.node != expected {
            return Err(format!("{url} is node {:?}, the cluster map says {expected:?}", report.node));
        }
        self.update(i, report.rollouts);
        Ok(())
    }

    /// Polls `nodes` every `period` until `stop`; `current` gives the config to prune
    /// in-flight hosts against.
    pub async fn poll(
        self: Arc<Self>,
        nodes: Nodes,
        period: Duration,
        current: impl Fn() -> Option<Arc<Loaded>> + Send + 'static,
        stop: CancellationToken,
    ) {
        let Nodes { client, bases, skip, token } = nodes;
        let mut failing = vec![false; bases.len()];
        loop {
            let polls = bases.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(i, base)| {
                let (view, client, token) = (&self, &client, token.as_deref());
                async move { (i, view.poll_node(i, base, client, token).await) }
            });
            for (i, result) in futures_util::future::join_all(polls).await {
                match result {
                    Ok(()) => failing[i] = false,
                    Err(error) => {
                        if !failing[i] {
                            tracing::warn!(%error, node = i, "no rollout state from a meta node; keeping its last one");
                        }
                        failing[i] = true;
                    }
                }
            }
            if let Some(loaded) = current() {
                self.prune(&loaded, ops_config::clock::unix_now_u32());
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}

/// The meta nodes a [`FleetView`] polls.
pub struct Nodes {
    pub client: reqwest::Client,
    /// `http[s]://addr` of each node, cluster map order.
    pub bases: Vec<String>,
    /// A meta node's own index: it hands its state over directly.
    pub skip: Option<usize>,
    /// The cluster token (`/internal/rollout` is an internal call).
    pub token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops_config::DesiredConfig;

    const CONFIG: &str = r#"[[agent]]
name = "falcon-agent"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "5.1.5" }
[[agent.others]]
prefix = "test-"
version = "5.1.9"
[agent.rollout]
from = { version = "5.1.3" }
waves = [10, 50, 100]
max_in_flight_per_relay = 3
"#;

    fn report(wave: usize, halted: bool) -> Vec<RolloutReport> {
        vec![RolloutReport { agent: "falcon-agent".into(), target: "5.1.5".into(), approved_wave: wave, halted, ..Default::default() }]
    }

    fn hb(host: &str, version: &str, status: &str) -> String {
        format!(
            r#"{{"hostname":"{host}","realAgents":[{{"name":"falcon-agent","version":"{version}","status":"{status}","timestamp":1}}]}}"#
        )
    }

    fn told(view: &FleetView, loaded: &Loaded, body: &str) -> bool {
        view.answer(loaded, &Heartbeat::parse(body.as_bytes()).unwrap(), 100).told & 1 != 0
    }

    #[test]
    fn the_fleet_wave_is_the_lowest_and_a_silent_node_holds_it() {
        let loaded = Loaded::new(DesiredConfig::parse(CONFIG, "t").unwrap(), 1);
        let view = FleetView::open(vec!["a".into(), "b".into()], None, "g");
        view.update(0, report(2, false));
        assert_eq!(view.fleet(&loaded).wave[0], 0, "node b never heard from counts as 0");
        view.update(1, report(1, false));
        assert_eq!(view.fleet(&loaded).wave[0], 1);
        view.update(1, report(3, false));
        assert_eq!(view.fleet(&loaded).wave[0], 2);
        view.update(1, vec![]);
        assert_eq!(view.fleet(&loaded).wave[0], 0, "a node without the rollout counts as 0");
        view.update(1, report(3, true));
        assert!(view.fleet(&loaded).halted[0], "halted if any node says so");
    }

    #[test]
    fn in_flight_limit_halt_and_membership() {
        let loaded = Loaded::new(DesiredConfig::parse(CONFIG, "t").unwrap(), 1);
        let view = FleetView::open(vec!["a".into()], None, "g");
        let hosts: Vec<String> = (0..400).map(|i| format!("h{i}")).collect();
        let wave1: Vec<&String> = hosts.iter().filter(|h| ops_config::rollout::bucket("falcon-agent", "5.1.5", h) < 1000).collect();
        assert!(wave1.len() > 10);
        assert!(hosts.iter().all(|h| !told(&view, &loaded, &hb(h, "5.1.3", "started"))), "nothing open yet");
        view.update(0, report(1, false));
        let first: Vec<&&String> = wave1.iter().filter(|h| told(&view, &loaded, &hb(h, "5.1.3", "started"))).collect();
        assert_eq!(first.len(), 3, "at most 3 in flight");
        assert!(!told(&view, &loaded, &hb("test-1", "5.1.3", "started")), "others groups stay out");
        // One converges: its slot goes to the next wave member; it keeps the target.
        assert!(told(&view, &loaded, &hb(first[0], "5.1.5", "started")));
        let more = wave1.iter().filter(|h| told(&view, &loaded, &hb(h, "5.1.3", "started"))).count();
        assert_eq!(more, 3, "two still in flight plus one new");
        assert_eq!(view.in_flight(&loaded), vec![("falcon-agent".to_string(), 3)]);
        // Outside wave 1: never told.
        let outside = hosts.iter().find(|h| ops_config::rollout::bucket("falcon-agent", "5.1.5", h) >= 5000).unwrap();
        assert!(!told(&view, &loaded, &hb(outside, "5.1.3", "started")));
        // Halted: only hosts already on the target keep it.
        view.update(0, report(1, true));
        assert!(told(&view, &loaded, &hb(first[0], "5.1.5", "started")));
        assert!(!told(&view, &loaded, &hb(first[1], "5.1.3", "started")));
        view.prune(&loaded, 100);
        assert_eq!(view.in_flight(&loaded), vec![("falcon-agent".to_string(), 0)]);
    }

    #[test]
    fn a_joining_node_counts_once_it_publishes_and_a_leaving_one_no_longer() {
        let loaded = Loaded::new(DesiredConfig::parse(CONFIG, "t").unwrap(), 1);
        let view = FleetView::open(vec!["a".into(), "b".into()], None, "g");
        view.update(0, report(3, false));
        view.update(1, report(2, false));
        assert_eq!(view.fleet(&loaded).wave[0], 2);
        view.set_ids(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(view.node(0), Some(report(3, false)), "kept nodes keep what they published");
        assert_eq!(view.fleet(&loaded).wave[0], 2, "c, not heard yet, does not hold the fleet at 0");
        view.update(2, vec![]);
        assert_eq!(view.fleet(&loaded).wave[0], 2, "nor while it publishes nothing of the rollout");
        view.update(2, report(1, false));
        assert_eq!(view.fleet(&loaded).wave[0], 1, "once it publishes the rollout, it counts");
        view.set_ids(vec!["a".into(), "c".into()]);
        assert_eq!(view.ids(), vec!["a".to_owned(), "c".to_owned()]);
        assert_eq!(view.fleet(&loaded).wave[0], 1);
        view.update(1, report(3, true));
        assert_eq!((view.fleet(&loaded).wave[0], view.fleet(&loaded).halted[0]), (3, true), "b left the minimum");
    }

    #[test]
    fn the_view_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = Loaded::new(DesiredConfig::parse(CONFIG, "t").unwrap(), 1);
        let view = FleetView::open(vec!["a".into(), "b".into()], Some(dir.path()), "g");
        view.update(0, report(2, false));
        view.update(1, report(2, false));
        let again = FleetView::open(vec!["b".into(), "a".into(), "c".into()], Some(dir.path()), "g");
        assert_eq!(again.node(0), Some(report(2, false)));
        assert_eq!(again.fleet(&loaded).wave[0], 0, "c was never heard from");
        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        let damaged = FleetView::open(vec!["a".into()], Some(dir.path()), "g");
        assert_eq!(damaged.node(0), None);
    }
}
