//! The fleet's unit tests: the fast summary against the per-row reference, scopes, states.
use super::*;
use ops_config::{DesiredConfig, Heartbeat};
use ops_serve::desired::Loaded;

const AGENTS: &str = "[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\n\
    default = { version = \"2\", cmd = \"start\" }\n[[agent.others]]\nprefix = \"p-\"\nversion = \"3\"\ncmd = \"stop\"\n";

/// Adds one host's row to `s`: the slow way the tests check `summarize` against.
fn add_row(s: &mut Summary, row: &OwnedRow) {
    s.add_group(&row.version, &row.run_state, &row.state, 1);
    if !row.desired_version.is_empty() {
        s.add_desired(&row.desired_version, &row.desired_cmd, 1);
    }
    let silent = row.state == "stale";
    s.add_relay(&row.relay, 1, u64::from(silent), if silent { row.last_seen } else { 0 });
    s.finish();
}

/// The fast summary must count exactly what the per-row logic of the listings says.
#[test]
fn summary_agrees_with_rows() {
    let loaded = Loaded::new(DesiredConfig::parse(AGENTS, "t").unwrap(), 1);
    let store = Store::new();
    let now = 10_000;
    for i in 0..5000u32 {
        let host = if i % 3 == 0 { format!("p-{i}") } else { format!("h-{i}") };
        let version = ["1", "2", "3"][(i % 7 % 3) as usize];
        let status = ["started", "stoped", "started pid 12", ""][(i % 4) as usize];
        let err = if i % 11 == 0 { r#","lastError":"boom""# } else { "" };
        let pin = ["", "", "", "", "", r#","pinned":"hold""#, r#","pinned":"1""#][(i % 7) as usize];
        let agents =
            if i % 13 == 0 { String::new() } else { format!(r#"{{"name":"a","version":"{version}","status":"{status}"{err}{pin}}}"#) };
        let body = format!(r#"{{"hostname":"{host}","realAgents":[{agents}]}}"#);
        let hb = Heartbeat::parse(body.as_bytes()).unwrap();
        let seen = if i % 17 == 0 { now - 5000 } else { now };
        // Half the hosts resolved under an older generation: the class is recomputed.
        let tags = crate::store::Tags {
            class: loaded.config.class_of(&host),
            generation: if i % 2 == 0 { 1 } else { 0 },
            relay: store.relay_index(["", "dc1-1", "dc2-1"][(i % 3) as usize]),
            ..Default::default()
        };
        store.upsert_tagged(&hb, seen, tags, true).unwrap();
    }
    let q = AgentQuery::new("a", &loaded, now, 900);
    let fast = summarize(&store, &q, Scope::All, None);
    let silent: u64 = fast.relays.iter().map(|r| r.silent).sum();
    assert_eq!(silent, fast.by_state["stale"], "silent by relay splits the stale count");
    assert_eq!(fast.relays.len(), 3, "{:?}", fast.relays);
    assert_eq!(fast.relays.iter().map(|r| r.hosts).sum::<u64>(), fast.hosts);
    assert!(fast.relays.iter().all(|r| r.last_heard == now - 5000), "{:?}", fast.relays);
    let mut slow = Summary::empty("a");
    scan_rows(&store, &q, Scope::All, &Filter::default(), |row, _| add_row(&mut slow, &OwnedRow::from_row(row)), |_| true);
    assert_eq!(fast, slow);
    // The same for one prefix group.
    let only_p = summarize(&store, &q, Scope::All, Some("p-"));
    let mut slow_p = Summary::empty("a");
    let filter = Filter { prefix: Some("p-".into()), ..Filter::default() };
    scan_rows(&store, &q, Scope::All, &filter, |row, _| add_row(&mut slow_p, &OwnedRow::from_row(row)), |_| true);
    assert_eq!(only_p, slow_p);
    assert_eq!(only_p.hosts, 1667);
    assert_eq!(fast.hosts, 5000);
    assert!(fast.by_state.values().all(|&n| n > 0), "{:?}", fast.by_state);
}

/// Three nodes that each hold every host (the owner its own, the others as copies), as
/// after failovers in every direction: for every set of nodes answering a gather, the
/// held scopes of the nodes in the set count each host exactly once, from its owner when
/// the owner is in the set.
#[test]
fn held_scopes_count_each_host_once_for_every_set_of_nodes() {
    let loaded = Loaded::new(DesiredConfig::parse(AGENTS, "t").unwrap(), 1);
    let ring = ops_config::Ring::new([("meta-1", 1), ("meta-2", 1), ("meta-3", 1)], 100);
    let stores: Vec<Store> = (0..3).map(|_| Store::new()).collect();
    let hosts: Vec<String> = (0..3000).map(|i| format!("h-{i}")).collect();
    for h in &hosts {
        let body = format!(r#"{{"hostname":"{h}","realAgents":[{{"name":"a","version":"1"}}]}}"#);
        let hb = Heartbeat::parse(body.as_bytes()).unwrap();
        for (i, store) in stores.iter().enumerate() {
            store.upsert(&hb, 100, loaded.config.class_of(h), 1, ring.owner(h) == i).unwrap();
        }
    }
    let q = AgentQuery::new("a", &loaded, 100, 900);
    for present in 1u64..8 {
        let mut counted = vec![0u32; hosts.len()];
        let mut total = 0;
        for (i, store) in stores.iter().enumerate().filter(|(i, _)| present & (1 << i) != 0) {
            let scope = Scope::held(&ring, i, present);
            total += summarize(store, &q, scope, None).hosts;
            scan_rows(
                store,
                &q,
                scope,
                &Filter::default(),
                |row, _| {
                    let k: usize = row.hostname[2..].parse().unwrap();
                    counted[k] += 1;
                    if present & (1 << ring.owner(row.hostname)) != 0 {
                        assert_eq!(ring.owner(row.hostname), i, "{} listed by its owner while the owner answers", row.hostname);
                    }
                },
                |_| true,
            );
        }
        assert_eq!(total, hosts.len() as u64, "set {present:b}");
        assert!(counted.iter().all(|&c| c == 1), "set {present:b}: every host listed exactly once");
    }
    // During a membership change each node answers by the ring the gather names, whatever
    // its owned flags say: by the old ring (3 nodes) or a new one (a 4th node holding
    // every host), each host is counted once.
    let grown = ops_config::Ring::new([("meta-1", 1), ("meta-2", 1), ("meta-3", 1), ("meta-4", 1)], 100);
    let fourth = Store::new();
    for h in &hosts {
        let body = format!(r#"{{"hostname":"{h}","realAgents":[{{"name":"a","version":"1"}}]}}"#);
        fourth.upsert(&Heartbeat::parse(body.as_bytes()).unwrap(), 100, loaded.config.class_of(h), 1, grown.owner(h) == 3).unwrap();
    }
    for (ring, nodes) in [(&ring, 3usize), (&grown, 4)] {
        let present = (1u64 << nodes) - 1;
        let total: u64 = stores
            .iter()
            .chain([&fourth])
            .take(nodes)
            .enumerate()
            .map(|(i, store)| summarize(store, &q, Scope::Ring { ring, me: i, present }, None).hosts)
            .sum();
        assert_eq!(total, hosts.len() as u64, "by the {nodes}-node ring");
    }
}
