//! The store's unit tests: records, copies, compaction, the interner and its limits.

use super::*;

fn hb(body: &str) -> Heartbeat<'_> {
    Heartbeat::parse(body.as_bytes()).unwrap()
}

fn foreign_total(store: &Store) -> u32 {
    (0..SHARDS).map(|i| store.shard(i).foreign()).sum()
}

#[test]
fn foreign_count_follows_copies_in_and_out() {
    let store = Store::new();
    let a = hb(r#"{"hostname":"a","realAgents":[]}"#);
    let b = hb(r#"{"hostname":"b","realAgents":[]}"#);
    store.upsert(&a, 10, ClassId(0), 1, true).unwrap();
    assert_eq!(foreign_total(&store), 0);
    store.upsert(&b, 10, ClassId(0), 1, false).unwrap();
    store.upsert(&b, 11, ClassId(0), 1, false).unwrap();
    assert_eq!(foreign_total(&store), 1, "a copy counts once however often it reports");
    store.upsert(&a, 12, ClassId(0), 1, false).unwrap();
    assert_eq!(foreign_total(&store), 2);
    store.upsert(&a, 13, ClassId(0), 1, true).unwrap();
    assert_eq!(foreign_total(&store), 1, "owned again");
    // Copies are forgotten sooner than owned hosts.
    assert_eq!(store.forget_before(0, 12), 1);
    assert_eq!(foreign_total(&store), 0);
    assert_eq!(store.len(), 1);
}

/// A copy goes out as the compact record of its last report, and is dropped only if it
/// did not report again meanwhile.
#[test]
fn a_new_map_remarks_owned_flags_and_the_moving_hosts_are_encoded() {
    let store = Store::new();
    for (name, owned) in [("stays", true), ("moves", true), ("comes", false)] {
        let body = format!(r#"{{"hostname":"{name}","realAgents":[]}}"#);
        store.upsert(&hb(&body), 50, ops_config::ClassId(0), 1, owned).unwrap();
    }
    let mut out = Vec::new();
    for i in 0..SHARDS {
        store.encode_held(i, true, |h| (h == "moves").then_some(3), |t, h, _, _| out.push((t, h.to_owned())));
    }
    assert_eq!(out, vec![(3, "moves".to_owned())], "only owned hosts the new ring sends elsewhere");
    assert_eq!(store.copies(), 1);
    assert_eq!(store.remark_owned(|h| h != "moves"), 2, "moves is no longer owned, comes now is");
    assert_eq!(store.copies(), 1, "the copy count follows");
    assert!(store.with_host("comes", |_, _, h| h.owned()).unwrap());
    assert!(!store.with_host("moves", |_, _, h| h.owned()).unwrap());
    assert_eq!(store.remark_owned(|h| h != "moves"), 0);
}

#[test]
fn copies_are_encoded_as_their_report_and_dropped_only_when_unchanged() {
    let store = Store::new();
    let copy = r#"{"hostname":"c1","ip":"10.1.2.3","runUser":"root","updaterVersion":"0.1","realAgents":[{"name":"a","version":"1","status":"started","timestamp":7,"runUser":"u","workDir":"/w","lastError":"boom"}]}"#;
    let relay = store.relay_index("dc2-1");
    store.upsert_tagged(&hb(copy), 50, Tags { told: 3, relay, ..Tags::default() }, false).unwrap();
    store.upsert(&hb(r#"{"hostname":"mine","realAgents":[]}"#), 50, ClassId(0), 1, true).unwrap();
    store.upsert(&hb(r#"{"hostname":"stays","realAgents":[]}"#), 50, ClassId(0), 1, false).unwrap();
    assert_eq!(store.copies(), 2);
    let mut out = Vec::new();
    for i in 0..SHARDS {
        store.encode_copies(i, |h| (h != "stays").then_some(4), |t, h, seen, rec| out.push((t, h.to_owned(), seen, rec)));
    }
    assert_eq!(out.len(), 1, "owned hosts and copies that stay are not sent");
    let (target, host, seen, record) = out.pop().unwrap();
    assert_eq!((target, host.as_str(), seen), (4, "c1", 50));
    let mut body = Vec::new();
    ops_config::compact::begin(&mut body);
    body.extend_from_slice(&record);
    let mut decoded = Vec::new();
    ops_config::compact::decode(&body, |r, h| decoded.push((r.seen, r.told, r.relay.to_owned(), h.clone().into_owned()))).unwrap();
    assert_eq!(decoded, vec![(50, 3, "dc2-1".to_owned(), hb(copy).into_owned())], "the relay goes with the copy");
    // Reported again since: stays.
    store.upsert(&hb(r#"{"hostname":"c1","realAgents":[]}"#), 51, ClassId(0), 1, false).unwrap();
    assert!(!store.drop_copy("c1", 50));
    assert!(!store.drop_copy("mine", 50), "an owned host is never dropped as a copy");
    assert!(store.drop_copy("c1", 51));
    assert_eq!((store.copies(), store.len()), (1, 2));
}

/// A copy handed back never replaces what the owner took in the same second.
#[test]
fn a_handed_back_copy_wins_only_when_strictly_newer() {
    let store = Store::new();
    let v = |ver: &str| format!(r#"{{"hostname":"h","realAgents":[{{"name":"a","version":"{ver}"}}]}}"#);
    let version = |store: &Store| store.with_host("h", |s, _, h| store.symbols().reader().resolve(s.agents(h)[0].version).to_owned());
    store.upsert(&hb(&v("new")), 10, ClassId(0), 1, true).unwrap();
    assert!(!store.upsert_handed_back(&hb(&v("copy")), 10, Tags::default(), true).unwrap(), "a tie keeps the owner's");
    assert!(!store.upsert_handed_back(&hb(&v("copy")), 9, Tags::default(), true).unwrap());
    assert_eq!(version(&store).as_deref(), Some("new"));
    assert!(store.upsert_handed_back(&hb(&v("copy")), 11, Tags::default(), true).unwrap());
    assert_eq!(version(&store).as_deref(), Some("copy"));
    assert!(store.upsert_tagged(&hb(&v("relay")), 11, Tags::default(), true).unwrap(), "a relay's report of the same second still wins");
    assert_eq!(version(&store).as_deref(), Some("relay"));
}

#[test]
fn host_record_stays_small() {
    assert_eq!(std::mem::size_of::<AgentState>(), 24);
    assert!(std::mem::size_of::<Host>() <= 64, "{}", std::mem::size_of::<Host>());
}

/// Hosts whose agent count keeps changing leave runs behind in the arena; compaction must
/// keep every host's agents, and the arena must stay bounded.
#[test]
fn agent_arena_keeps_every_host_right_through_compaction() {
    let store = Store::new();
    let body = |h: u32, n: u32, round: u32| {
        let agents: Vec<String> = (0..n).map(|a| format!(r#"{{"name":"a{a}","version":"{round}.{h}","status":"started"}}"#)).collect();
        format!(r#"{{"hostname":"h{h}","realAgents":[{}]}}"#, agents.join(","))
    };
    for round in 0..40u32 {
        for h in 0..2000u32 {
            let n = (h + round) % 5;
            store.upsert(&hb(&body(h, n, round)), round, ClassId(0), 1, true).unwrap();
        }
    }
    let syms = store.symbols().reader();
    let mut arena_agents = 0;
    for h in 0..2000u32 {
        let n = (h + 39) % 5;
        store
            .with_host(&format!("h{h}"), |shard, _, host| {
                let agents = shard.agents(host);
                assert_eq!(agents.len(), n as usize, "h{h}");
                for (a, st) in agents.iter().enumerate() {
                    assert_eq!(syms.resolve(st.name), format!("a{a}"));
                    assert_eq!(syms.resolve(st.version), format!("39.{h}"));
                }
            })
            .unwrap();
    }
    for i in 0..SHARDS {
        let shard = store.shard(i);
        let held: usize = shard.agents.chunks.iter().map(Vec::len).sum();
        assert_eq!(held, shard.agents.live + shard.agents.garbage);
        arena_agents += held;
    }
    let live: usize = (0..2000u32).map(|h| ((h + 39) % 5) as usize).sum();
    assert!(arena_agents < live * 3 + SHARDS * ARENA_CHUNK * 2, "arena bounded: {arena_agents} for {live} live agents");
    // Forgetting hosts releases their runs too.
    assert_eq!(store.forget_before(100, 0), 2000);
    let live_left: usize = (0..SHARDS).map(|i| store.shard(i).agents.live).sum();
    assert_eq!(live_left, 0);
}

#[test]
fn newest_report_replaces_the_last() {
    let store = Store::new();
    store
        .upsert(
            &hb(r#"{"hostname":"h1","ip":"10.0.0.1","realAgents":[{"name":"a","version":"1","status":"started","lastError":"boom"}]}"#),
            100,
            ClassId(0),
            1,
            true,
        )
        .unwrap();
    store.upsert(&hb(r#"{"hostname":"h2","ip":"::1","realAgents":[]}"#), 100, ClassId(0), 1, true).unwrap();
    assert_eq!(store.len(), 2);
    let (ver, err, ip) = store
        .with_host("h1", |shard, slot, h| {
            let syms = store.symbols().reader();
            (
                syms.resolve(shard.agents(h)[0].version).to_owned(),
                shard.last_error(slot, h, 0).map(str::to_owned),
                shard.ip(slot, h).to_string(),
            )
        })
        .unwrap();
    assert_eq!((ver.as_str(), err.as_deref(), ip.as_str()), ("1", Some("boom"), "10.0.0.1"));

    store
        .upsert(
            &hb(r#"{"hostname":"h1","realAgents":[{"name":"a","version":"2","status":" stopped\n"},{"name":"b","version":"9"}]}"#),
            200,
            ClassId(3),
            2,
            true,
        )
        .unwrap();
    assert_eq!(store.len(), 2);
    store
        .with_host("h1", |shard, slot, h| {
            let syms = store.symbols().reader();
            assert_eq!(shard.agents(h).len(), 2);
            assert_eq!(syms.resolve(shard.agents(h)[0].version), "2");
            assert_eq!(syms.resolve(shard.agents(h)[0].status), "stopped", "status is trimmed");
            assert_eq!(shard.last_error(slot, h, 0), None);
            assert_eq!(shard.ip(slot, h).to_string(), "");
            assert_eq!((h.last_seen, h.class, h.generation), (200, 3, 2));
            assert!(shard.notes.errors.is_empty() && shard.notes.pins.is_empty());
        })
        .unwrap();
    assert_eq!(store.with_host("h2", |s, slot, h| s.ip(slot, h).to_string()).unwrap(), "::1");
}

#[test]
fn pins_are_kept_beside_errors_and_go_when_no_longer_reported() {
    let store = Store::new();
    let body = r#"{"hostname":"h","realAgents":[{"name":"a","lastError":"x"},{"name":"b","pinned":"5.1.3","lastError":"y"},{"name":"c","pinned":"hold"}]}"#;
    store.upsert(&hb(body), 10, ClassId(0), 1, true).unwrap();
    let seen = |store: &Store| {
        store
            .with_host("h", |shard, slot, h| {
                let syms = store.symbols().reader();
                (0..3)
                    .map(|i| {
                        (shard.last_error(slot, h, i).map(str::to_owned), shard.pinned(slot, h, i).map(|p| syms.resolve(p).to_owned()))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap()
    };
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(seen(&store), [(s("x"), None), (s("y"), s("5.1.3")), (None, s("hold"))]);
    store
        .upsert(&hb(r#"{"hostname":"h","realAgents":[{"name":"a"},{"name":"b"},{"name":"c","pinned":"hold"}]}"#), 11, ClassId(0), 1, true)
        .unwrap();
    assert_eq!(seen(&store), [(None, None), (None, None), (None, s("hold"))]);
    let shard = (0..SHARDS).map(|i| store.shard(i)).find(|s| s.hosts().count() == 1).unwrap();
    assert_eq!((shard.notes.errors.len(), shard.notes.pins.len()), (0, 1), "nothing left behind");
}

#[test]
fn forgetting_frees_slots_and_side_tables() {
    let store = Store::new();
    for i in 0..1000 {
        let body = format!(
            r#"{{"hostname":"host-{i}","ip":"name-{i}","realAgents":[{{"name":"a","lastError":"e"}},{{"name":"b","pinned":"hold"}}]}}"#
        );
        store.upsert(&hb(&body), if i % 2 == 0 { 10 } else { 20 }, ClassId(0), 1, true).unwrap();
    }
    assert_eq!(store.forget_before(15, 0), 500);
    assert_eq!(store.len(), 500);
    assert!(store.with_host("host-0", |_, _, _| ()).is_none());
    assert!(store.with_host("host-1", |_, _, _| ()).is_some());
    let side: usize = (0..SHARDS)
        .map(|i| {
            let shard = store.shard(i);
            shard.notes.errors.len() + shard.notes.pins.len() + shard.other_ips.len()
        })
        .sum();
    assert_eq!(side, 1500, "500 errors, 500 pins, 500 ips");
    // Freed slots are reused (names come back to the shard they left).
    for i in (0..1000).step_by(2) {
        store.upsert(&hb(&format!(r#"{{"hostname":"host-{i}"}}"#)), 30, ClassId(0), 1, true).unwrap();
    }
    let slots: usize = (0..SHARDS).map(|i| store.shard(i).hosts.len()).sum();
    assert_eq!(slots, 1000);
    assert_eq!(store.len(), 1000);
}

#[test]
fn interner_dedups_and_resolves() {
    let i = Interner::default();
    let a = i.intern("x").unwrap();
    assert_eq!(i.intern("x").unwrap(), a);
    assert_eq!(i.intern("").unwrap(), Sym::EMPTY);
    assert_eq!(i.reader().resolve(a), "x");
    assert_eq!(i.reader().get("nope"), None);
}

#[test]
fn compaction_gives_free_slots_back_and_keeps_every_host_and_its_notes() {
    let store = Store::new();
    let body = |i: u32| {
        let ip = if i.is_multiple_of(7) { "::1".to_owned() } else { format!("10.0.{}.{}", i / 256, i % 256) };
        let extra = if i.is_multiple_of(5) { r#","lastError":"boom","pinned":"hold""# } else { "" };
        format!(r#"{{"hostname":"host-{i}","ip":"{ip}","realAgents":[{{"name":"a","version":"v{}","status":"started"{extra}}}]}}"#, i % 3)
    };
    for i in 0..40_000u32 {
        store.upsert(&hb(&body(i)), if i.is_multiple_of(10) { 20 } else { 10 }, ClassId(0), 1, i.is_multiple_of(10)).unwrap();
    }
    for i in (0..40_000u32).step_by(10) {
        store.with_host(&format!("host-{i}"), |_, _, _| ()).unwrap();
    }
    // The rollout judge's tables, keyed by slot.
    for i in 0..SHARDS {
        let mut shard = store.shard(i);
        let slots: Vec<(u32, u32)> = shard.hosts().map(|(s, h)| (s, h.name[5..].parse().unwrap())).collect();
        for (s, n) in slots {
            shard.told_at_mut().insert((s, 0), n);
        }
    }
    let slots_before: usize = (0..SHARDS).map(|i| store.shard(i).hosts.len()).sum();
    assert_eq!(store.forget_before(0, 15), 36_000, "the copies (not owned, older) go");
    assert_eq!(store.compact(), SHARDS, "every shard was mostly free");
    assert_eq!(store.compact(), 0, "nothing left to compact");
    let slots_after: usize = (0..SHARDS).map(|i| store.shard(i).hosts.len()).sum();
    assert_eq!((slots_before, slots_after), (40_000, 4_000));
    assert_eq!(store.len(), 4_000);
    for i in (0..40_000u32).step_by(10) {
        let name = format!("host-{i}");
        let (ip, error, pinned, version, told) = store
            .with_host(&name, |s, slot, h| {
                let syms = store.symbols().reader();
                let told = s.told_at.get(&(slot, 0)).copied();
                (
                    s.ip(slot, h).to_string(),
                    s.last_error(slot, h, 0).map(str::to_owned),
                    s.pinned(slot, h, 0).map(|p| syms.resolve(p).to_owned()),
                    syms.resolve(s.agents(h)[0].version).to_owned(),
                    told,
                )
            })
            .unwrap();
        let want_ip = if i.is_multiple_of(7) { "::1".to_owned() } else { format!("10.0.{}.{}", i / 256, i % 256) };
        assert_eq!(ip, want_ip);
        assert_eq!((error.as_deref(), pinned.as_deref()), if i.is_multiple_of(5) { (Some("boom"), Some("hold")) } else { (None, None) });
        assert_eq!(version, format!("v{}", i % 3));
        assert_eq!(told, Some(i), "the judge's table follows the host to its new slot");
    }
    // The shards go on as before: new hosts, replaced reports, removals.
    for i in 0..500u32 {
        store.upsert(&hb(&body(100_000 + i)), 30, ClassId(0), 1, true).unwrap();
    }
    store.upsert(&hb(&body(0).replace("v0", "v9")), 31, ClassId(0), 1, true).unwrap();
    assert_eq!(store.len(), 4_500);
    assert_eq!(store.forget_before(30, 0), 4_000 - 1);
    assert_eq!(store.len(), 501);
}

fn dir_report(host: &str, dir: &str) -> String {
    format!(r#"{{"hostname":"{host}","realAgents":[{{"name":"a","version":"1","status":"started","workDir":"{dir}"}}]}}"#)
}

fn work_dir(store: &Store, host: &str) -> String {
    store.with_host(host, |s, _, h| store.symbols().reader().resolve(s.agents(h)[0].work_dir).to_owned()).unwrap()
}

#[test]
fn strings_no_record_uses_are_freed_and_their_symbols_reused() {
    let store = Store::new();
    for round in 0..100u32 {
        store.upsert(&hb(&dir_report("h", &format!("/d/{round}"))), round, ClassId(0), 1, true).unwrap();
    }
    store.upsert(&hb(&dir_report("g", "/kept")), 1, ClassId(0), 1, true).unwrap();
    // "", a, 1, started, /d/0../d/99, /kept
    assert_eq!(store.symbols().len(), 4 + 100 + 1);
    let end = store.symbols().end();
    assert!(store.strings_want_collection());
    assert_eq!(store.collect_strings(), 99, "every /d/ but the last");
    assert_eq!(store.symbols().len(), 4 + 2);
    assert_eq!(store.symbols().bytes(), "a1started/d/99/kept".len());
    assert!(!store.strings_want_collection(), "nothing new since");
    assert_eq!((work_dir(&store, "h"), work_dir(&store, "g")), ("/d/99".to_owned(), "/kept".to_owned()));
    store.upsert(&hb(&dir_report("h", "/new")), 200, ClassId(0), 1, true).unwrap();
    assert_eq!(store.symbols().end(), end, "a freed symbol was reused");
    assert_eq!(work_dir(&store, "h"), "/new");
    assert_eq!(store.collect_strings(), 1);
    assert_eq!(store.symbols().reader().get("/d/99"), None);
}

#[test]
fn a_report_past_the_interner_limits_is_refused_and_changes_nothing() {
    let store = Store::with_limits(InternLimits { max_strings: 6, max_bytes: 1 << 20 });
    store.upsert(&hb(&dir_report("h", "/one")), 10, ClassId(0), 1, true).unwrap();
    assert_eq!(store.symbols().len(), 5);
    store.upsert(&hb(&dir_report("h", "/two")), 11, ClassId(0), 1, true).unwrap();
    let err = store.upsert(&hb(&dir_report("h", "/three")), 12, ClassId(0), 1, true).unwrap_err();
    assert_eq!((err.strings, err.max_strings), (6, 6));
    assert!(err.to_string().contains("--max-interned-strings 6"), "{err}");
    assert_eq!(work_dir(&store, "h"), "/two", "the refused report changed nothing");
    assert_eq!(store.with_host("h", |_, _, h| h.last_seen), Some(11));
    // A report of strings already held still goes in.
    store.upsert(&hb(&dir_report("h", "/one")), 13, ClassId(0), 1, true).unwrap();
    assert!(store.strings_want_collection(), "a refusal asks for a collection");
    assert_eq!(store.collect_strings(), 1, "/two");
    store.upsert(&hb(&dir_report("h", "/three")), 14, ClassId(0), 1, true).unwrap();
    assert_eq!(work_dir(&store, "h"), "/three");

    let small = Store::with_limits(InternLimits { max_strings: 100, max_bytes: 12 });
    small.upsert(&hb(&dir_report("h", "/d")), 1, ClassId(0), 1, true).unwrap();
    let err = small.upsert(&hb(&dir_report("h", "/longer")), 2, ClassId(0), 1, true).unwrap_err();
    assert_eq!((err.bytes, err.max_bytes), (11, 12));
}

#[test]
fn collections_racing_heartbeats_never_free_a_string_a_record_holds() {
    let store = Store::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    const THREADS: usize = 3;
    const HOSTS: usize = 40;
    const ROUNDS: u32 = 300;
    let collections = std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                store.collect_strings();
                n += 1;
            }
            n
        });
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    for round in 1..=ROUNDS {
                        for k in 0..HOSTS {
                            let host = format!("h{t}-{k}");
                            store.upsert(&hb(&dir_report(&host, &format!("/d/{t}/{k}/{round}"))), round, ClassId(0), 1, true).unwrap();
                            let dir = work_dir(store, &host);
                            assert_eq!(dir, format!("/d/{t}/{k}/{round}"), "a stored string was freed or reused");
                        }
                    }
                })
            })
            .collect();
        let results: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Ordering::Relaxed);
        for r in results {
            if let Err(panic) = r {
                std::panic::resume_unwind(panic);
            }
        }
        collector.join().unwrap()
    });
    assert!(collections > 1, "the collector ran during the writes");
    store.collect_strings();
    assert_eq!(store.symbols().len(), 4 + THREADS * HOSTS, "one directory per host is left");
    for t in 0..THREADS {
        for k in 0..HOSTS {
            assert_eq!(work_dir(&store, &format!("h{t}-{k}")), format!("/d/{t}/{k}/{ROUNDS}"));
        }
    }
}
