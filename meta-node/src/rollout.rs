//! The rollout controller of one meta node: it judges only the hosts it owns (a uniform sample
//! of the fleet, thanks to the ring) and publishes per rollout an `approved_wave` that only
//! grows and a `halted` flag that only goes from false to true (`GET /internal/rollout`).
//! Relays and the other nodes merge what every node publishes ([`ops_serve::rollout::FleetView`]).
//! The published state is kept on disk beside the snapshot and read back at start, so a
//! restarted node publishes what it published before, never less.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ops_config::rollout::{NodeReport, RolloutReport, Verdict, WaveCounts, WaveReport, is_converged};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::SHARDS;
use crate::{Node, unix_now};

const FILE_NAME: &str = "rollout-state.json";

/// What a node keeps of one rollout across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    agent: String,
    target: String,
    approved_wave: usize,
    wave_opened_at: u64,
    halted: bool,
    #[serde(default)]
    halt_reason: String,
}

/// The state a node starts a rollout from: the lowest wave the other nodes in `heard`
/// approved (a node that does not list it counts as 0), halted if any of them halted.
fn adopt(key: &(String, String), heard: &[Vec<RolloutReport>]) -> Saved {
    let mut saved = Saved { agent: key.0.clone(), target: key.1.clone(), ..Saved::default() };
    let states: Vec<Option<&RolloutReport>> = heard.iter().map(|rs| rs.iter().find(|r| r.agent == key.0 && r.target == key.1)).collect();
    if let Some(lowest) = states.iter().map(|s| s.map_or(0, |r| r.approved_wave)).min() {
        saved.approved_wave = lowest;
        saved.wave_opened_at = states.iter().flatten().filter(|r| r.approved_wave == lowest).map(|r| r.wave_opened_at).max().unwrap_or(0);
    }
    if let Some(h) = states.iter().flatten().find(|r| r.halted) {
        saved.halted = true;
        saved.halt_reason = h.halt_reason.clone();
    }
    if saved.approved_wave > 0 || saved.halted {
        tracing::info!(agent = %key.0, target = %key.1, wave = saved.approved_wave, halted = saved.halted, "rollout: this node starts from the fleet's state");
    }
    saved
}

/// A node's rollout decisions and what it last published.
pub struct Controller {
    node_id: String,
    states: Mutex<BTreeMap<(String, String), Saved>>,
    report: ArcSwap<NodeReport>,
    path: PathBuf,
}

impl Controller {
    /// Reads the states kept in `data_dir` (a damaged file is moved aside: the node then starts
    /// every rollout at wave 0, which holds the fleet at the other nodes' lowest wave).
    pub fn open(node_id: &str, data_dir: &Path) -> Self {
        let path = data_dir.join(FILE_NAME);
        let mut states = BTreeMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<Vec<Saved>>(&text) {
                Ok(saved) => {
                    for s in saved {
                        states.insert((s.agent.clone(), s.target.clone()), s);
                    }
                    tracing::info!(rollouts = states.len(), file = %path.display(), "rollout states loaded");
                }
                Err(error) => {
                    let aside = path.with_extension(format!("damaged-{}", unix_now()));
                    let _ = std::fs::rename(&path, &aside);
                    tracing::error!(%error, moved_to = %aside.display(), "rollout states unreadable; starting every rollout at wave 0");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::error!(%error, file = %path.display(), "cannot read the rollout states"),
        }
        Controller {
            node_id: node_id.to_owned(),
            states: Mutex::new(states),
            report: ArcSwap::from_pointee(NodeReport { node: node_id.to_owned(), at: 0, rollouts: Vec::new() }),
            path,
        }
    }

    /// What this node publishes now.
    pub fn report(&self) -> Arc<NodeReport> {
        self.report.load_full()
    }

    /// One judgement of every rollout of the loaded config over the hosts this node owns, then
    /// publishes it (and hands it to the node's own fleet view). Blocking: it scans the store.
    pub fn judge(&self, node: &Node) {
        let loaded = node.desired.current();
        let config = &loaded.config;
        let now = u64::from(unix_now());
        let fleet = node.rollouts.fleet(&loaded);
        let counts = count(node, &loaded);
        let mut reports = Vec::new();
        let mut changed = false;
        // What the other nodes published: a rollout this node has no state of yet starts from
        // the fleet's wave and halt (a node joining the cluster in the middle of a rollout
        // never takes the fleet back to wave 0); with peers and none heard yet, it waits.
        let (peers, heard) = match node.cluster() {
            None => (0, Vec::new()),
            Some(c) => {
                let heard: Vec<Vec<RolloutReport>> =
                    (0..c.map.nodes.len()).filter(|&i| i != c.me).filter_map(|i| node.rollouts.node(i)).collect();
                (c.map.nodes.len() - 1, heard)
            }
        };
        {
            let mut states = self.states.lock();
            for (r, agent) in config.rollouts().enumerate() {
                let Some(spec) = &agent.rollout else { continue };
                let key = (agent.name.clone(), agent.default.version.clone());
                if !states.contains_key(&key) {
                    if peers > 0 && heard.is_empty() {
                        continue;
                    }
                    states.insert(key.clone(), adopt(&key, &heard));
                }
                let saved = states.get_mut(&key).expect("inserted above");
                let before = saved.clone();
                let waves = &counts[r];
                let state = ops_config::rollout::NodeRollout {
                    approved_wave: saved.approved_wave,
                    wave_opened_at: saved.wave_opened_at,
                    halted: saved.halted,
                };
                let window_open = spec.window.is_none_or(|w| w.contains(now));
                let wave_counts: Vec<WaveCounts> = waves.iter().map(WaveReport::counts).collect();
                // A node that holds no host at all (a lost snapshot, before the first batches)
                // knows nothing of its shard: it may open the first wave, never a later one.
                let (next, verdict) = if node.store.is_empty() && state.approved_wave > 0 && !state.halted {
                    (state, Verdict::Waiting("no hosts held yet"))
                } else {
                    state.judge(&spec.policy, &wave_counts, now, window_open)
                };
                match &verdict {
                    Verdict::Opened(k) => {
                        tracing::info!(agent = %agent.name, target = %key.1, wave = k, "rollout: this node approves a wave")
                    }
                    Verdict::Halted { failed, decided } => {
                        saved.halt_reason = format!(
                            "{failed} of {decided} decided hosts failed ({:.1} %, halt at {:.1} %)",
                            *failed as f64 * 100.0 / *decided as f64,
                            f64::from(spec.policy.failed_ratio_bp) / 100.0,
                        );
                        tracing::warn!(agent = %agent.name, target = %key.1, reason = %saved.halt_reason, "rollout halted");
                    }
                    _ => {}
                }
                (saved.approved_wave, saved.wave_opened_at, saved.halted) = (next.approved_wave, next.wave_opened_at, next.halted);
                changed |= *saved != before;
                reports.push(RolloutReport {
                    agent: agent.name.clone(),
                    target: key.1.clone(),
                    from: spec.from.version.clone(),
                    approved_wave: saved.approved_wave,
                    wave_opened_at: saved.wave_opened_at,
                    halted: saved.halted,
                    halt_reason: saved.halt_reason.clone(),
                    verdict: verdict.to_string(),
                    fleet_wave: fleet.wave[r],
                    waves: waves.clone(),
                });
                gauges(&agent.name, waves, fleet.wave[r], fleet.halted[r] || saved.halted);
            }
            if changed {
                let all: Vec<&Saved> = states.values().collect();
                if let Err(error) =
                    ops_config::disk::write_atomically(&self.path, &serde_json::to_vec_pretty(&all).expect("plain data serializes"))
                {
                    tracing::error!(%error, file = %self.path.display(), "cannot keep the rollout states");
                }
            }
        }
        node.rollouts.update(node.cluster().map_or(0, |c| c.me), reports.clone());
        self.report.store(Arc::new(NodeReport { node: self.node_id.clone(), at: now, rollouts: reports }));
    }
}

fn gauges(agent: &str, waves: &[WaveReport], fleet_wave: usize, halted: bool) {
    use crate::metrics::{ROLLOUT_HALTED, ROLLOUT_HOSTS, ROLLOUT_WAVE};
    for (k, w) in waves.iter().enumerate() {
        let wave = (k + 1).to_string();
        for (state, v) in [
            ("targeted", w.targeted),
            ("told", w.told),
            ("converged", w.converged),
            ("failed", w.failed),
            ("silent", w.silent),
            ("pinned", w.pinned),
            ("failed_since_start", w.failed_total),
            ("back_on_from", w.back_on_from),
        ] {
            ::metrics::gauge!(ROLLOUT_HOSTS, "agent" => agent.to_owned(), "wave" => wave.clone(), "state" => state).set(v as f64);
        }
    }
    ::metrics::gauge!(ROLLOUT_WAVE, "agent" => agent.to_owned()).set(fleet_wave as f64);
    ::metrics::gauge!(ROLLOUT_HALTED, "agent" => agent.to_owned()).set(if halted { 1.0 } else { 0.0 });
}

/// Per rollout of the loaded config, per wave: this node's owned hosts counted as the judge
/// needs them. Keeps each shard's table of when hosts were first seen told and not converged.
fn count(node: &Node, loaded: &ops_serve::desired::Loaded) -> Vec<Vec<WaveReport>> {
    let config = &loaded.config;
    let specs: Vec<_> = config.rollouts().collect();
    let mut out: Vec<Vec<WaveReport>> = specs
        .iter()
        .map(|a| {
            a.rollout
                .as_ref()
                .map_or_else(Vec::new, |s| s.policy.waves.iter().map(|&p| WaveReport { percent: p, ..WaveReport::default() }).collect())
        })
        .collect();
    if specs.is_empty() {
        return out;
    }
    let now = unix_now();
    let stale_after = node.settings.stale_after_seconds;
    let store = &node.store;
    let generation = crate::store::short_generation(loaded.generation);
    // The symbols read here are compared with the records' in every shard.
    let _pause = store.symbols().pause();
    let (names, targets, froms) = {
        let syms = store.symbols().reader();
        let (mut names, mut targets, mut froms) = (Vec::new(), Vec::new(), Vec::new());
        for a in &specs {
            names.push(syms.get(&a.name));
            targets.push(syms.get(&a.default.version));
            froms.push(a.rollout.as_ref().and_then(|s| syms.get(&s.from.version)));
        }
        (names, targets, froms)
    };
    // Which rollout a failure belongs to: a new target starts with none.
    let ids: Vec<u32> = specs
        .iter()
        .map(|a| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&a.name, &a.default.version).hash(&mut h);
            h.finish() as u32
        })
        .collect();
    let deadlines: Vec<u64> = specs.iter().map(|a| a.rollout.as_ref().map_or(u64::MAX, |s| s.policy.deadline_seconds)).collect();
    // Where host credentials are checked, a host whose last report carried none is not
    // judged (anyone could have sent it), unless its agent's rollout counts them.
    let judged_unauthenticated: Vec<bool> =
        specs.iter().map(|a| !node.settings.enrollment.checks() || a.rollout.as_ref().is_some_and(|s| s.count_unauthenticated)).collect();
    for i in 0..SHARDS {
        let mut guard = store.shard(i);
        let shard = &mut *guard;
        // What the judge needs of each (host, rollout), read first: the deadline table is
        // updated after, under the same lock.
        let mut rows: Vec<Row> = Vec::new();
        {
            let syms = store.symbols().reader();
            for (slot, h) in shard.hosts().filter(|(_, h)| h.owned()) {
                let (class, waves) = if h.generation == generation {
                    (ops_config::ClassId(u32::from(h.class)), h.waves)
                } else {
                    let class = config.class_of(&h.name);
                    (class, config.rollout_waves(&h.name, class))
                };
                for r in 0..specs.len() {
                    if !h.authenticated() && !judged_unauthenticated[r] {
                        continue;
                    }
                    let wave = usize::from((waves >> (4 * r)) & 0xf);
                    let Some(target) = config.class_target(class, r).filter(|_| wave > 0) else { continue };
                    let agents = shard.agents(h);
                    let real = names[r].and_then(|n| agents.iter().position(|a| a.name == n));
                    let on_target = real.is_some_and(|p| targets[r] == Some(agents[p].version));
                    let on_from = real.is_some_and(|p| froms[r] == Some(agents[p].version));
                    let has_error = real.is_some_and(|p| shard.last_error(slot, h, p).is_some());
                    let pinned = real.is_some_and(|p| shard.pinned(slot, h, p).is_some());
                    let converged = real.is_some_and(|p| is_converged(on_target, syms.resolve(agents[p].status), &target.cmd, has_error));
                    rows.push(Row {
                        slot,
                        r: r as u8,
                        wave,
                        told: h.told & (1 << r) != 0,
                        stale: now.saturating_sub(h.last_seen) > stale_after,
                        on_target,
                        on_from,
                        has_error,
                        pinned,
                        converged,
                    });
                }
            }
        }
        let (table, failed_in) = shard.rollout_tables_mut();
        for row in &rows {
            let c = &mut out[usize::from(row.r)][row.wave - 1];
            let key = (row.slot, row.r);
            let id = ids[usize::from(row.r)];
            c.targeted += 1;
            c.told += u64::from(row.told);
            let mut failed_now = false;
            if row.stale && !row.converged {
                // Silent (its relay or datacenter went quiet, most often): never failed, and
                // its deadline starts again when it is heard again, so a host back from an
                // outage longer than the deadline is not failed for the outage.
                c.silent += 1;
                if !table.is_empty() {
                    table.remove(&key);
                }
            } else if row.pinned || row.converged {
                // A pinned host is neither converged nor failed: an operator holds it.
                if row.pinned {
                    c.pinned += 1;
                } else {
                    c.converged += 1;
                }
                if !table.is_empty() {
                    table.remove(&key);
                }
            } else if row.told {
                let since = *table.entry(key).or_insert(now);
                if row.has_error || row.on_target || u64::from(now.saturating_sub(since)) >= deadlines[usize::from(row.r)] {
                    c.failed += 1;
                    failed_now = true;
                }
            } else if !table.is_empty() {
                table.remove(&key);
            }
            // A host that failed stays counted for the rollout, also once a halt answered it
            // `from` again (then `failed` above no longer counts it).
            if failed_now {
                failed_in.insert(key, id);
            }
            if failed_now || (!failed_in.is_empty() && failed_in.get(&key) == Some(&id)) {
                c.failed_total += 1;
                c.back_on_from += u64::from(!row.told && row.on_from);
            }
        }
    }
    out
}

/// One owned host's state as one rollout's judge needs it.
struct Row {
    slot: u32,
    r: u8,
    wave: usize,
    /// Its last report was answered with the target.
    told: bool,
    stale: bool,
    /// Reports the target version.
    on_target: bool,
    /// Reports the rollout's `from` version.
    on_from: bool,
    has_error: bool,
    /// An operator pinned the agent on the host (`pin.toml`).
    pinned: bool,
    converged: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Tags;

    #[test]
    fn a_node_new_to_a_rollout_starts_from_the_lowest_wave_published_and_any_halt() {
        let key = ("a".to_owned(), "2".to_owned());
        let r = |wave, halted: bool, at| RolloutReport {
            agent: "a".into(),
            target: "2".into(),
            approved_wave: wave,
            wave_opened_at: at,
            halted,
            halt_reason: if halted { "3 of 4 failed".into() } else { String::new() },
            ..RolloutReport::default()
        };
        let s = adopt(&key, &[vec![r(3, false, 30)], vec![r(2, false, 20)], vec![r(2, false, 25)]]);
        assert_eq!((s.approved_wave, s.wave_opened_at, s.halted), (2, 25, false));
        let s = adopt(&key, &[vec![r(3, false, 30)], vec![]]);
        assert_eq!(s.approved_wave, 0, "a node that does not list it counts as wave 0");
        let s = adopt(&key, &[vec![r(1, true, 10)], vec![r(2, false, 20)]]);
        assert!(s.halted && s.halt_reason == "3 of 4 failed");
        assert_eq!(adopt(&key, &[]), Saved { agent: "a".into(), target: "2".into(), ..Saved::default() });
    }
    use crate::{Node, Settings};
    use ops_config::{DesiredConfig, Heartbeat};

    const CONFIG: &str = r#"[[agent]]
name = "a"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "2", cmd = "start" }
[agent.rollout]
from = { version = "1" }
waves = [100]
deadline = "10m"
halt_when = { failed_ratio = 0.5, min_sample = 4 }
"#;

    fn report(version: &str, status: &str, error: &str) -> String {
        format!(
            r#"{{"hostname":"h","realAgents":[{{"name":"a","version":"{version}","status":"{status}","timestamp":1,"lastError":"{error}"}}]}}"#
        )
    }

    /// A standalone node serving [`CONFIG`], its data in `dir`.
    fn standalone(dir: &std::path::Path) -> Node {
        let config = DesiredConfig::parse(CONFIG, "t").unwrap();
        Node::new(
            Settings::standalone("agents.toml".into(), dir.to_path_buf()),
            config,
            None,
            None,
            tokio_util::sync::CancellationToken::new(),
        )
    }

    #[test]
    fn hosts_are_counted_as_the_rules_say_and_the_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let node = standalone(dir.path());
        let loaded = node.desired.current();
        let now = unix_now();
        // (host, version, status, lastError, told, seconds ago)
        let hosts = [
            ("conv", "2", "started", "", 1, 0),
            ("stopped", "2", "stopped", "", 1, 0),
            ("error", "1", "started", "md5 mismatch", 1, 0),
            ("waiting", "1", "started", "", 1, 0),
            ("untold", "1", "started", "", 0, 0),
            ("silent", "1", "started", "", 1, 3600),
        ];
        for (name, version, status, error, told, ago) in hosts {
            let body = report(version, status, error).replace("\"h\"", &format!("\"{name}\""));
            let hb = Heartbeat::parse(body.as_bytes()).unwrap();
            let tags = Tags { told, ..Node::tags(&loaded, name, told) };
            node.store.upsert_tagged(&hb, now - ago, tags, true).unwrap();
        }
        // Pinned on the host: as "stopped" above (the target, not started: failed) and on
        // `from`, yet neither failed nor converged.
        for (name, version, pin) in [("pinned", "2", "hold"), ("pinned-old", "1", "1")] {
            let body = format!(
                r#"{{"hostname":"{name}","realAgents":[{{"name":"a","version":"{version}","status":"stopped","pinned":"{pin}"}}]}}"#
            );
            let tags = Tags { told: 1, ..Node::tags(&loaded, name, 1) };
            node.store.upsert_tagged(&Heartbeat::parse(body.as_bytes()).unwrap(), now, tags, true).unwrap();
        }
        node.controller.judge(&node);
        let r = &node.controller.report().rollouts[0];
        let w = r.waves[0];
        assert_eq!((w.targeted, w.told, w.converged, w.silent, w.pinned), (8, 7, 1, 1, 2), "{w:?}");
        // Failed: the target not running, and a lastError; "waiting" is within its deadline.
        assert_eq!(w.failed, 2, "{w:?}");
        assert_eq!(r.approved_wave, 1, "the first wave opens at once");
        // 2 failed of 3 decided is over 50 % but under min_sample 4: not halted yet.
        assert!(!r.halted);
        // One more failure makes 4 decided: halted, for good, and it is saved. It is a host whose
        // updater reverted the target (back on `from`, saying why): a failure like any other.
        let reverted = "reverted: a 2: not started within the 30 s health window (status stoped); back on 1";
        let hb = report("1", "started", reverted).replace("\"h\"", "\"error2\"");
        node.store
            .upsert_tagged(&Heartbeat::parse(hb.as_bytes()).unwrap(), now, Tags { told: 1, ..Node::tags(&loaded, "error2", 1) }, true)
            .unwrap();
        node.controller.judge(&node);
        let r = &node.controller.report().rollouts[0];
        assert!(r.halted && r.halt_reason.contains("3 of 4 decided hosts failed"), "{r:?}");
        // Told an hour ago and still not there: past the deadline, failed.
        for i in 0..SHARDS {
            for t in node.store.shard(i).told_at_mut().values_mut() {
                *t = now - 3600;
            }
        }
        node.controller.judge(&node);
        assert_eq!(node.controller.report().rollouts[0].waves[0].failed, 4, "the deadline counts \"waiting\" as failed");
        let again = Controller::open("meta-1", dir.path());
        assert_eq!(again.states.lock().values().next().map(|s| (s.approved_wave, s.halted)), Some((1, true)));
    }

    /// A host told the target, then silent past its deadline (its relay went down), is silent,
    /// not failed; heard again and still in flight, it gets the whole deadline again.
    #[test]
    fn a_host_back_from_silence_is_not_failed_for_the_silence() {
        let dir = tempfile::tempdir().unwrap();
        let node = standalone(dir.path());
        let loaded = node.desired.current();
        let now = unix_now();
        let body = report("1", "started", "").replace("\"h\"", "\"away\"");
        let hb = Heartbeat::parse(body.as_bytes()).unwrap();
        let tags = Tags { told: 1, ..Node::tags(&loaded, "away", 1) };
        node.store.upsert_tagged(&hb, now - 3600, tags, true).unwrap();
        // The judge first saw it told and in flight an hour ago, just before it went quiet.
        let told_at = |node: &Node| -> Option<u32> {
            (0..SHARDS).find_map(|i| {
                let mut s = node.store.shard(i);
                let slot = s.hosts().find(|(_, h)| h.name == "away").map(|(slot, _)| slot)?;
                Some(s.told_at_mut().get(&(slot, 0)).copied())
            })?
        };
        for i in 0..SHARDS {
            let mut s = node.store.shard(i);
            let slot = s.hosts().find(|(_, h)| h.name == "away").map(|(slot, _)| slot);
            if let Some(slot) = slot {
                s.told_at_mut().insert((slot, 0), now - 3600);
            }
        }
        node.controller.judge(&node);
        let w = node.controller.report().rollouts[0].waves[0];
        assert_eq!((w.silent, w.failed, w.failed_total), (1, 0, 0), "{w:?}");
        assert_eq!(told_at(&node), None, "the deadline clock stops while the host is silent");
        // Heard again, told again, still on `from`: in flight, not failed.
        node.store.upsert_tagged(&hb, now, tags, true).unwrap();
        node.controller.judge(&node);
        let w = node.controller.report().rollouts[0].waves[0];
        assert_eq!((w.silent, w.failed, w.failed_total), (0, 0, 0), "{w:?}");
        assert!(told_at(&node).is_some_and(|t| t >= now), "the deadline starts again");
    }
}
