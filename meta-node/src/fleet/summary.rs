//! Summaries: one agent's deployments counted by version, run status and state, by desired
//! version and by relay, in one pass over the hosts held, and merged across nodes as counts.

use super::*;

pub use ops_config::status::{DesiredCount, Group, RelayCount, Summary, sort_relays};

/// Counts by version × run state × state, without resolving a string per host; with
/// `prefix`, of the hosts whose name starts with it only.
pub fn summarize(store: &Store, q: &AgentQuery<'_>, scope: Scope<'_>, prefix: Option<&str>) -> Summary {
    // The per-host work avoids strings: versions compare as symbols (the desired version of
    // each class interned once), run states come from a per-thread cache keyed by status
    // symbol, and the shards are split over the machine's cores.
    pub(super) const RUN_STATES: [&str; 3] = ["started", "stopped", "absent"];
    // The symbols read here and counted by are resolved at the end.
    let _pause = store.symbols().pause();
    let agent_sym = store.symbols().reader().get(q.agent);
    let desired_syms: Vec<Option<(Option<Sym>, bool)>> = {
        let syms = store.symbols().reader();
        (0..q.variants()).map(|v| q.desired_of(v).map(|d| (syms.get(&d.version), d.cmd == "start"))).collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    // Groups and distinct statuses are few: small vectors searched linearly beat hashing.
    // Per relay index: hosts, silent hosts, newest report of a silent one.
    type PerRelay = Vec<(u64, u64, u32)>;
    type Partial = (Vec<((Sym, u8, State), u64)>, Vec<u64>, PerRelay);
    let scan = |t: usize| -> Partial {
        let mut groups: Vec<((Sym, u8, State), u64)> = Vec::new();
        let mut by_class = vec![0u64; q.variants()];
        let mut relays: PerRelay = Vec::new();
        let mut started_cache: Vec<(Sym, bool)> = Vec::new();
        for i in (t..SHARDS).step_by(threads) {
            let shard = store.shard(i);
            let syms = store.symbols().reader();
            for (slot, host) in shard.hosts().filter(|(_, h)| scope.includes(h) && prefix.is_none_or(|p| h.name.starts_with(p))) {
                let agents = shard.agents(host);
                let pos = agent_sym.and_then(|s| shard.agent(host, s));
                let class = if q.agent_index.is_some() { q.variant(host) } else { 0 };
                let desired = desired_syms.get(class).copied().flatten();
                if pos.is_none() && desired.is_none() {
                    continue;
                }
                let real = pos.map(|p| agents[p]);
                let run_state: u8 = match real {
                    None => 2,
                    Some(a) => {
                        let started = match started_cache.iter().find(|(s, _)| *s == a.status) {
                            Some(&(_, started)) => started,
                            None => {
                                let started = ops_config::rollout::is_started(syms.resolve(a.status));
                                started_cache.push((a.status, started));
                                started
                            }
                        };
                        if started { 0 } else { 1 }
                    }
                };
                // Errors and pins are rare: look them up only when the host has a note.
                let noted = pos.filter(|&p| host.note_mask & (1 << p) != 0);
                let state = if q.now.saturating_sub(host.last_seen) > q.stale_after {
                    State::Stale
                } else if noted.is_some_and(|p| shard.last_error(slot, host, p).is_some()) {
                    State::Error
                } else if noted.is_some_and(|p| shard.pinned(slot, host, p).is_some()) {
                    State::Pinned
                } else {
                    match desired {
                        Some((dv, start)) if real.is_none_or(|a| Some(a.version) != dv) || start != (run_state == 0) => State::Upgrading,
                        _ => State::Ok,
                    }
                };
                let r = usize::from(host.relay);
                if r >= relays.len() {
                    relays.resize(r + 1, (0, 0, 0));
                }
                let per = &mut relays[r];
                per.0 += 1;
                if state == State::Stale {
                    per.1 += 1;
                    per.2 = per.2.max(host.last_seen);
                }
                let key = (real.map_or(Sym::EMPTY, |a| a.version), run_state, state);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, n)) => *n += 1,
                    None => groups.push((key, 1)),
                }
                if desired.is_some() {
                    by_class[class] += 1;
                }
            }
        }
        (groups, by_class, relays)
    };
    let partials: Vec<Partial> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|t| s.spawn(move || scan(t))).collect();
        let mut out = vec![scan(0)];
        out.extend(handles.into_iter().map(|h| h.join().expect("summary scan thread")));
        out
    });
    let mut groups: hashbrown::HashMap<(Sym, u8, State), u64> = hashbrown::HashMap::new();
    let mut desired_by_class = vec![0u64; q.variants()];
    let mut per_relay: PerRelay = Vec::new();
    for (g, c, r) in partials {
        for (k, n) in g {
            *groups.entry(k).or_default() += n;
        }
        for (total, n) in desired_by_class.iter_mut().zip(c) {
            *total += n;
        }
        if per_relay.len() < r.len() {
            per_relay.resize(r.len(), (0, 0, 0));
        }
        for (total, (hosts, silent, last)) in per_relay.iter_mut().zip(r) {
            *total = (total.0 + hosts, total.1 + silent, total.2.max(last));
        }
    }
    let mut relays: Vec<RelayCount> = per_relay
        .into_iter()
        .enumerate()
        .filter(|(_, (hosts, _, _))| *hosts > 0)
        .map(|(i, (hosts, silent, last_heard))| RelayCount { relay: store.relay_name(i as u16), hosts, silent, last_heard })
        .collect();
    sort_relays(&mut relays);
    let mut desired: hashbrown::HashMap<(String, String), u64> = hashbrown::HashMap::new();
    for (v, n) in desired_by_class.iter().enumerate() {
        if let Some(d) = q.desired_of(v).filter(|_| *n > 0) {
            *desired.entry((d.version.clone(), d.cmd.clone())).or_default() += n;
        }
    }
    let syms = store.symbols().reader();
    let mut by_state: BTreeMap<String, u64> = State::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect();
    let mut out: Vec<Group> = groups
        .into_iter()
        .map(|((version, run_state, state), n)| {
            *by_state.entry(state.as_str().to_owned()).or_default() += n;
            Group {
                version: syms.resolve(version).to_owned(),
                status: RUN_STATES[usize::from(run_state)].to_owned(),
                state: state.as_str().to_owned(),
                hosts: n,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.version, &a.status, &a.state).cmp(&(&b.version, &b.status, &b.state)));
    let hosts: u64 = by_state.values().sum();
    let converged = by_state.get("ok").copied().unwrap_or(0);
    let mut desired: Vec<DesiredCount> = desired.into_iter().map(|((version, cmd), hosts)| DesiredCount { version, cmd, hosts }).collect();
    desired.sort_by(|a, b| b.hosts.cmp(&a.hosts).then_with(|| a.version.cmp(&b.version)));
    Summary {
        agent: q.agent.to_owned(),
        hosts,
        converged,
        converged_ratio: if hosts == 0 { 1.0 } else { converged as f64 / hosts as f64 },
        desired,
        by_state,
        groups: out,
        relays,
    }
}
