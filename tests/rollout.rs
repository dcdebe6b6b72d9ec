//! End-to-end tests of staged rollouts: 3 real meta nodes, 2 real relays, simulated updaters
//! (each host reports its version, installs what it is told, or fails to).
//!
//! One file per suite, though it is long: cargo links a test binary per file under `tests/`,
//! and every link of the workspace adds to each CI run's build; the tests in it share nothing
//! but the fixtures of `ops_e2e`, and each starts its own processes.

use std::time::{Duration, Instant};

use ops_e2e::cluster::{Cluster, TOKEN, chromium};
use ops_e2e::{eventually, get_json, get_json_auth, get_text, post_json};
use serde_json::{Value, json};

const FROM: &str = "5.1.3";
const TARGET: &str = "5.1.5";
/// Meta-node flags: judge and poll the peers often, so a wave takes about a second.
const FAST: &[&str] = &["--rollout-interval-ms", "200"];

/// agents.toml with a rollout of falcon-agent from 5.1.3 to 5.1.5 over 10/50/100 %, plus
/// `extra` lines in `[agent.rollout]`.
fn agents(extra: &str) -> String {
    format!(
        r#"
[[agent]]
name = "falcon-agent"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
default = {{ version = "{TARGET}", md5 = "", cmd = "start" }}

  [[agent.others]]
  prefix = "canary-"
  version = "5.1.9"
  md5 = ""

  [agent.rollout]
  from = {{ version = "{FROM}", md5 = "" }}
  waves = [10, 50, 100]
  advance_at = 0.9
  deadline = "10m"
  halt_when = {{ failed_ratio = 0.2, min_sample = 4 }}
{extra}
"#
    )
}

/// A host's wave by the membership rule (waves 10/50/100).
fn wave_of(host: &str) -> usize {
    wave_in(&[10, 50, 100], host)
}

fn wave_in(waves: &[u8], host: &str) -> usize {
    ops_config::rollout::wave_of(waves, ops_config::rollout::bucket("falcon-agent", TARGET, host))
}

/// How a simulated host takes being told a new version.
#[derive(Clone, Copy, PartialEq)]
enum Install {
    Works,
    /// Hosts whose name hashes odd fail the target: `lastError`, old version kept.
    HalfFail,
    /// Never gets anywhere (no error either): stays in flight.
    Hangs,
}

struct Host {
    name: String,
    version: String,
    error: String,
    /// Ever answered the target version.
    told: bool,
    /// Its host credential, once enrolled (sent with every heartbeat).
    credential: Option<String>,
}

struct Sim {
    hosts: Vec<Host>,
    install: Install,
    /// The rollout's waves (for the membership checks).
    waves: Vec<u8>,
}

impl Sim {
    fn new(n: usize) -> Sim {
        let hosts = (0..n)
            .map(|i| Host {
                name: if i % 20 == 0 { format!("canary-{i:04}") } else { format!("host-{i:04}") },
                version: FROM.into(),
                error: String::new(),
                told: false,
                credential: None,
            })
            .collect();
        Sim { hosts, install: Install::Works, waves: vec![10, 50, 100] }
    }

    fn fails(name: &str) -> bool {
        ops_config::rollout::bucket("bad", "build", name) % 2 == 1
    }

    /// One heartbeat per host (host i through relay i % 2); returns the hosts told the target
    /// in this round.
    fn round(&mut self, c: &Cluster) -> Vec<String> {
        self.round_via(c, &[0, 1])
    }

    /// [`round`](Self::round) of the hosts behind the relays numbered in `relays` only.
    fn round_via(&mut self, c: &Cluster, relays: &[usize]) -> Vec<String> {
        let mut told = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if !relays.contains(&(i % c.relays.len())) {
                continue;
            }
            let relay = &c.relays[i % c.relays.len()];
            let mut agent = json!({"name": "falcon-agent", "version": h.version, "status": "started", "timestamp": 1});
            if !h.error.is_empty() {
                agent["lastError"] = json!(h.error);
            }
            let body = json!({"hostname": h.name, "realAgents": [agent]}).to_string();
            let (status, reply) = match &h.credential {
                None => post_json(&relay.url("/heartbeat"), body),
                Some(c) => {
                    let r = reqwest::blocking::Client::new()
                        .post(relay.url("/heartbeat"))
                        .header(ops_config::enroll::CREDENTIAL_HEADER, c)
                        .body(body)
                        .send()
                        .unwrap();
                    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
                }
            };
            assert_eq!(status, 200, "{}: {reply}", h.name);
            let desired = reply["desiredAgents"][0]["version"].as_str().unwrap().to_owned();
            if desired == TARGET {
                h.told = true;
                told.push(h.name.clone());
            }
            if desired == h.version {
                h.error.clear();
                continue;
            }
            match self.install {
                Install::HalfFail if desired == TARGET && Sim::fails(&h.name) => h.error = format!("install {desired}: md5 mismatch"),
                Install::Hangs => {}
                _ => {
                    h.version = desired;
                    h.error.clear();
                }
            }
        }
        told
    }

    fn on(&self, version: &str) -> usize {
        self.hosts.iter().filter(|h| h.version == version && h.error.is_empty()).count()
    }

    fn rollout_hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| !h.name.starts_with("canary-"))
    }
}

/// The fleet wave each relay serves.
fn relay_waves(c: &Cluster) -> Vec<usize> {
    c.relays.iter().map(|r| get_json(&r.url("/health")).1["rollouts"][0]["fleetWave"].as_u64().unwrap_or(0) as usize).collect()
}

/// The highest fleet wave any relay serves.
fn relay_wave(c: &Cluster) -> usize {
    relay_waves(c).into_iter().max().unwrap_or(0)
}

/// The lowest fleet wave the relays serve: what every relay has heard (each polls the meta
/// nodes on its own period, so one may be a poll behind another).
fn relay_floor(c: &Cluster) -> usize {
    relay_waves(c).into_iter().min().unwrap_or(0)
}

fn rollout(c: &Cluster, i: usize) -> Value {
    let (status, v) = get_json(&c.meta(i).url("/rollout/falcon-agent"));
    assert_eq!(status, 200, "{v}");
    v
}

/// Runs rounds until `done` or `limit`; after each round checks that no host outside the
/// waves the relays serve was told the target.
fn run_until(c: &Cluster, sim: &mut Sim, limit: Duration, mut done: impl FnMut(&Sim, &Cluster) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let told = sim.round(c);
        let wave = relay_wave(c);
        for h in &told {
            let k = wave_in(&sim.waves, h);
            assert!(k <= wave.max(1), "{h} (wave {k}) told while the relays serve wave {wave}");
        }
        if done(sim, c) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Rewrites every node's agents.toml and reloads them all.
fn reconfigure(c: &Cluster, text: &str) {
    for i in 0..c.metas.len() {
        std::fs::write(c.agents_file(i), text).unwrap();
    }
    let (status, reply) = get_json_auth(&c.meta(0).url("/config/reload?all=1"), TOKEN);
    assert_eq!(status, 200, "{reply}");
    let hash = ops_config::content_hash(text.as_bytes());
    for r in &c.relays {
        eventually(Duration::from_secs(20), || (get_json(&r.url("/health")).1["configHash"] == hash.as_str()).then_some(()))
            .expect("relays take the new config");
    }
}

#[test]
fn a_rollout_advances_wave_by_wave_to_every_host() {
    let c = Cluster::up_with(3, 2, &agents(r#"  soak = "1s""#), FAST);
    let mut sim = Sim::new(240);
    let done = run_until(&c, &mut sim, Duration::from_secs(90), |s, _| s.rollout_hosts().all(|h| h.version == TARGET));
    assert!(done, "every host reached {TARGET}: {} did", sim.on(TARGET));
    sim.round(&c); // the last installs are reported
    // Canaries (an others group) stay outside the rollout.
    assert!(sim.hosts.iter().filter(|h| h.name.starts_with("canary-")).all(|h| h.version == "5.1.9" && !h.told));

    let r = eventually(Duration::from_secs(10), || {
        let r = rollout(&c, 1);
        let converged: u64 = r["waves"].as_array().unwrap().iter().map(|w| w["converged"].as_u64().unwrap()).sum();
        (converged == 228).then_some(r)
    })
    .unwrap_or_else(|| panic!("the gathered rollout counts every converged host: {}", rollout(&c, 1)));
    assert_eq!(r["fleetWave"], 3, "{r}");
    assert_eq!(r["halted"], false);
    assert_eq!(r["partial"], false);
    assert_eq!(r["estimatedSecondsToFull"], 0);
    let targeted: Vec<u64> = r["waves"].as_array().unwrap().iter().map(|w| w["targeted"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=3).map(|k| sim.rollout_hosts().filter(|h| wave_of(&h.name) == k).count() as u64).collect();
    assert_eq!(targeted, want, "per-wave targeted = membership by the md5 rule");
    assert!(r["nodes"].as_array().unwrap().iter().all(|n| n["approvedWave"] == 3 && n["reachable"] == true), "{r}");

    let metrics = get_text(&c.meta(0).url("/metrics")).1;
    assert!(metrics.contains(r#"ops_meta_rollout_wave{agent="falcon-agent"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"ops_meta_rollout_halted{agent="falcon-agent"} 0"#));
    assert!(metrics.contains(r#"ops_meta_rollout_hosts{agent="falcon-agent",wave="1",state="converged"}"#));
    // Status queries know what each host should run now.
    let summary = get_json(&c.meta(2).url("/status/summary/falcon-agent")).1;
    assert_eq!(summary["converged"], 240, "{summary}");
}

/// With host credentials checked, the attacks on the judge that anyone reaching `/heartbeat`
/// could make go nowhere: forged `lastError`s for told hosts (without enrollment they halt
/// the rollout at once) are answered but never stored over the enrolled hosts' reports, and
/// invented wave-1 hosts that never converge (without enrollment they keep wave 1 below its
/// advance share forever) are held, marked unauthenticated, and not judged.
#[test]
fn with_enrollment_forged_failures_and_invented_hosts_neither_halt_nor_stall_a_rollout() {
    let text = agents(r#"  soak = "1s""#);
    let mut c = Cluster::files(3, &text);
    let key = c.dir.path().join("host.keys").display().to_string();
    let (code, out, err) = ops_e2e::opsctl(&["host-key", "--out", &key]);
    assert_eq!(code, 0, "{out}{err}");
    let secret = c.dir.path().join("enroll.secret");
    std::fs::write(&secret, "rollout-enroll-secret-0123456789\n").unwrap();
    let flags = [format!("--host-key-file={key}"), format!("--enroll-secret-file={}", secret.display())];
    c.meta_args = FAST.iter().map(|s| s.to_string()).chain(flags.iter().cloned()).collect();
    c.relay_args = flags.to_vec();
    c.start_all(2);
    let mut sim = Sim::new(240);
    for h in &mut sim.hosts {
        let r = reqwest::blocking::Client::new()
            .post(c.relays[0].url("/enroll"))
            .bearer_auth("rollout-enroll-secret-0123456789")
            .body(json!({"hostname": h.name}).to_string())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        h.credential = Some(r.json::<Value>().unwrap()["credential"].as_str().unwrap().to_owned());
    }
    let invented: Vec<String> = (0..).map(|i| format!("host-x{i:05}")).filter(|h| wave_of(h) == 1).take(100).collect();
    let attack = |sim: &Sim, c: &Cluster| {
        for (i, h) in sim.rollout_hosts().filter(|h| h.told).enumerate() {
            let forged = json!({"hostname": h.name, "realAgents": [{"name": "falcon-agent", "version": FROM, "status": "started", "lastError": "forged failure"}]});
            let (status, reply) = post_json(&c.relays[i % 2].url("/heartbeat"), forged.to_string());
            assert_eq!(status, 200, "answered like any Go updater: {reply}");
        }
        for (i, h) in invented.iter().enumerate() {
            let stuck = json!({"hostname": h, "realAgents": [{"name": "falcon-agent", "version": FROM, "status": "started"}]});
            assert_eq!(post_json(&c.relays[i % 2].url("/heartbeat"), stuck.to_string()).0, 200);
        }
    };
    let done = run_until(&c, &mut sim, Duration::from_secs(90), |s, c| {
        attack(s, c);
        s.rollout_hosts().all(|h| h.version == TARGET)
    });
    let r = rollout(&c, 0);
    assert!(done, "every enrolled host reached {TARGET} under the attacks: {} did; {r}", sim.on(TARGET));
    assert_eq!(r["halted"], false, "{r}");
    let targeted: Vec<u64> = r["waves"].as_array().unwrap().iter().map(|w| w["targeted"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=3).map(|k| sim.rollout_hosts().filter(|h| wave_of(&h.name) == k).count() as u64).collect();
    assert_eq!(targeted, want, "only enrolled hosts are judged");
    let ignored: f64 =
        (0..3).map(|i| ops_e2e::metric_at(c.meta(i).url("").trim_end_matches('/'), "ops_meta_reports_unauthenticated_ignored_total")).sum();
    assert!(ignored >= 1.0, "the forged reports reached the owners and were not stored");
    let held = eventually(Duration::from_secs(10), || {
        (0..3).find_map(|i| {
            let (status, h) = get_json(&c.meta(i).url(&format!("/status/host/{}", invented[0])));
            (status == 200).then_some(h)
        })
    })
    .expect("an invented host is held");
    assert_eq!(held["authenticated"], false, "{held}");
}

#[test]
fn a_bad_build_halts_in_wave_1_and_abort_brings_every_host_back() {
    let text = agents(r#"  soak = "1s""#);
    let c = Cluster::up_with(3, 2, &text, FAST);
    let mut sim = Sim::new(240);
    sim.install = Install::HalfFail;
    let halted = run_until(&c, &mut sim, Duration::from_secs(60), |_, c| rollout(c, 0)["halted"] == true);
    assert!(halted, "the rollout halts: {}", rollout(&c, 0));
    // Keep going: a halted rollout tells nobody new, and nothing outside wave 1 ever hears of it.
    run_until(&c, &mut sim, Duration::from_secs(3), |_, _| false);
    let outside: Vec<&str> = sim.hosts.iter().filter(|h| h.told && wave_of(&h.name) > 1).map(|h| h.name.as_str()).collect();
    assert!(outside.is_empty(), "hosts outside wave 1 received the bad build: {outside:?}");
    let r = rollout(&c, 2);
    assert_eq!(r["fleetWave"], 1, "{r}");
    let by = r["haltedBy"].as_array().unwrap();
    assert!(!by.is_empty() && by[0].as_str().unwrap().contains("decided hosts failed"), "{r}");
    assert!(r["estimatedSecondsToFull"].is_null());
    assert!(c.relays.iter().all(|x| get_json(&x.url("/health")).1["rollouts"][0]["halted"] == true));
    let changed = sim.on(TARGET);
    assert!(changed > 0, "some wave-1 hosts installed it before the halt");
    assert!(get_text(&c.meta(0).url("/metrics")).1.contains(r#"ops_meta_rollout_halted{agent="falcon-agent"} 1"#));

    // opsctl says so too: the halt and its reason, wave 1 open, the others not.
    let (code, out, err) = ops_e2e::opsctl(&[&format!("--server={}", c.meta(2).url("")), "rollout", "falcon-agent"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!("rollout falcon-agent {FROM} -> {TARGET}: wave 1 of 3")), "{out}");
    assert!(out.contains("HALTED: ") && out.contains("decided hosts failed"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("wave 1 ( 10 %) [") && !l.contains("not open")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("wave 3 (100 %) [") && l.ends_with("(not open)")), "{out}");

    // The fleet page shows the halt and the waves (headless Chromium).
    let dom = chromium(&["--dump-dom", &c.meta(1).url("/ui/")]);
    assert!(dom.contains(r#"data-halted="falcon-agent""#) && dom.contains("HALTED at wave 1"), "{dom}");
    assert!(dom.contains(r#"data-wave="3""#) && dom.contains("wave 1 of 3"), "{dom}");
    let shot = ops_e2e::workspace_root().join("target/tmp/fleet-page-halted.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    chromium(&["--window-size=1200,800", &format!("--screenshot={}", shot.display()), &c.meta(1).url("/ui/")]);
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 1000).unwrap_or(false), "screenshot written");

    // Abort: every host goes back to `from`.
    reconfigure(&c, &agents("  soak = \"1s\"\n  abort = true"));
    let back = run_until(&c, &mut sim, Duration::from_secs(30), |s, _| s.rollout_hosts().all(|h| h.version == FROM && h.error.is_empty()));
    assert!(back, "every host back on {FROM}: {} are", sim.on(FROM));
    let again = sim.round(&c);
    assert!(again.is_empty(), "nobody is told the target after an abort: {again:?}");

    // Everyone is back on `from`, so nobody fails now; the failures of the rollout stay
    // counted (wave 1), and the fleet page shows them beside the halt.
    let told = sim.rollout_hosts().filter(|h| h.told && wave_of(&h.name) == 1).count() as u64;
    let settled = eventually(Duration::from_secs(15), || {
        let w = rollout(&c, 1)["waves"][0].clone();
        (w["failed"] == 0 && w["failedTotal"].as_u64() >= Some(1) && w["backOnFrom"] == w["failedTotal"]).then_some(w)
    });
    let w = settled.unwrap_or_else(|| panic!("wave 1 after the abort: {}", rollout(&c, 1)));
    assert!(w["failedTotal"].as_u64().unwrap() < told, "only hosts told the build, not all of them: {w}, {told} told");
    let dom = chromium(&["--dump-dom", &c.meta(0).url("/ui/")]);
    assert!(dom.contains(r#"data-halted="falcon-agent""#), "{dom}");
    let shown = format!(r#"data-failed-total="{}""#, w["failedTotal"]);
    assert!(dom.contains(&shown) && dom.contains("failed since the start"), "wave 1's failures shown: {shown}\n{dom}");
    assert!(dom.contains(&format!(r#"data-rollout-failed="{}""#, w["failedTotal"])), "{dom}");
}

#[test]
fn a_killed_meta_node_holds_the_wave_and_a_restarted_relay_serves_the_same_wave() {
    let mut c = Cluster::up_with(3, 2, &agents(r#"  soak = "1s""#), FAST);
    let mut sim = Sim::new(240);
    assert!(run_until(&c, &mut sim, Duration::from_secs(30), |_, c| relay_wave(c) >= 1), "wave 1 opens");
    // The surviving nodes have heard meta-3 approve wave 1 (they poll it like relays do).
    for i in 0..2 {
        let seen = eventually(Duration::from_secs(10), || {
            get_text(&c.meta(i).url("/metrics")).1.contains(r#"ops_meta_rollout_wave{agent="falcon-agent"} 1"#).then_some(())
        });
        assert!(seen.is_some(), "meta-{} sees fleet wave 1", i + 1);
    }
    c.metas[2].as_ref().unwrap().proc.signal("KILL");
    c.metas[2] = None;
    // Others approve waves 2 and 3 on their own; the fleet stays at meta-3's last word.
    run_until(&c, &mut sim, Duration::from_secs(6), |_, _| false);
    assert_eq!(relay_wave(&c), 1);
    let r = rollout(&c, 0);
    assert_eq!(r["fleetWave"], 1, "{r}");
    assert_eq!(r["partial"], true);
    assert_eq!(r["missingNodes"], json!(["meta-3"]));
    assert!(r["nodes"][0]["approvedWave"].as_u64().unwrap() > 1, "the live nodes went on: {r}");
    assert!(sim.hosts.iter().all(|h| !h.told || wave_of(&h.name) == 1));

    // A relay restarted now (meta-3 still down) serves wave 1 from its copy on disk.
    c.restart_relay(0);
    let wave1 = sim.hosts.iter().position(|h| wave_of(&h.name) == 1 && !h.name.starts_with("canary-")).unwrap();
    let host = &sim.hosts[wave1].name;
    let (_, reply) = post_json(
        &c.relays[0].url("/heartbeat"),
        json!({"hostname": host, "realAgents": [{"name": "falcon-agent", "version": TARGET, "status": "started", "timestamp": 1}]})
            .to_string(),
    );
    assert_eq!(reply["desiredAgents"][0]["version"], TARGET, "restarted relay still serves wave 1");
    assert_eq!(get_json(&c.relays[0].url("/health")).1["rollouts"][0]["fleetWave"], 1);

    // meta-3 back: it reads its state from disk and the rollout goes on to the end.
    c.start_meta(2);
    let done = run_until(&c, &mut sim, Duration::from_secs(60), |s, _| s.rollout_hosts().all(|h| h.version == TARGET));
    assert!(done, "rollout completes once meta-3 is back: {} on {TARGET}", sim.on(TARGET));
}

#[test]
fn pause_and_the_window_hold_the_rollout() {
    let c = Cluster::up_with(3, 2, &agents("  soak = \"3s\"\n  paused = true"), FAST);
    let mut sim = Sim::new(120);
    run_until(&c, &mut sim, Duration::from_secs(3), |_, _| false);
    assert!(sim.hosts.iter().all(|h| !h.told), "paused from the start: nobody told");
    let r = rollout(&c, 0);
    assert_eq!(r["fleetWave"], 0);
    assert!(r["nodes"].as_array().unwrap().iter().all(|n| n["verdict"] == "paused"), "{r}");

    reconfigure(&c, &agents(r#"  soak = "3s""#));
    assert!(run_until(&c, &mut sim, Duration::from_secs(20), |_, c| relay_wave(c) >= 1), "unpaused: wave 1 opens");
    reconfigure(&c, &agents("  soak = \"3s\"\n  paused = true"));
    run_until(&c, &mut sim, Duration::from_secs(6), |_, _| false);
    assert_eq!(relay_wave(&c), 1, "paused at wave 1: {}", rollout(&c, 0));
    assert!(sim.hosts.iter().all(|h| !h.told || wave_of(&h.name) == 1));

    // A window that is closed now (it opens two hours from now) holds it too.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let hour = (now / 3600 + 2) % 24;
    let window =
        format!("  soak = \"3s\"\n  window = {{ days = \"all\", hours = \"{hour:02}:00-{:02}:00\", tz = \"UTC\" }}", (hour + 1) % 24);
    reconfigure(&c, &agents(&window));
    run_until(&c, &mut sim, Duration::from_secs(6), |_, _| false);
    assert_eq!(relay_wave(&c), 1, "outside the window: {}", rollout(&c, 0));
    let r = rollout(&c, 1);
    assert!(r["nodes"].as_array().unwrap().iter().all(|n| n["verdict"] == "outside the window"), "{r}");
    assert!(r["estimatedSecondsToFull"].is_null());

    reconfigure(&c, &agents(r#"  soak = "1s""#));
    let done = run_until(&c, &mut sim, Duration::from_secs(60), |s, _| s.rollout_hosts().all(|h| h.version == TARGET));
    assert!(done, "released, the rollout completes");
}

#[test]
fn the_in_flight_limit_holds_per_relay() {
    let text = agents("  soak = \"1s\"\n  max_in_flight_per_relay = 4").replace("waves = [10, 50, 100]", "waves = [100]");
    let c = Cluster::up_with(3, 2, &text, FAST);
    let mut sim = Sim::new(80);
    sim.install = Install::Hangs;
    sim.waves = vec![100];
    run_until(&c, &mut sim, Duration::from_secs(30), |s, _| s.hosts.iter().filter(|h| h.told).count() >= 8);
    run_until(&c, &mut sim, Duration::from_secs(2), |_, _| false);
    // Hosts that hang stay in flight: 4 per relay, no more (hosts are tied to relay i % 2).
    for (k, relay) in c.relays.iter().enumerate() {
        let told = sim.hosts.iter().enumerate().filter(|(i, h)| i % 2 == k && h.told).count();
        assert_eq!(told, 4, "relay {k} told {told}");
        assert_eq!(get_json(&relay.url("/health")).1["rollouts"][0]["inFlight"], 4);
        assert!(get_text(&relay.url("/metrics")).1.contains(r#"ops_relay_rollout_in_flight{agent="falcon-agent"} 4"#));
    }
    // Installs work again: slots free up as hosts converge, and everybody gets there.
    sim.install = Install::Works;
    let done = run_until(&c, &mut sim, Duration::from_secs(90), |s, _| {
        for k in 0..2 {
            let pending = s.hosts.iter().enumerate().filter(|(i, h)| i % 2 == k && h.told && h.version != TARGET).count();
            assert!(pending <= 4, "relay {k} has {pending} hosts told and not there");
        }
        s.rollout_hosts().all(|h| h.version == TARGET)
    });
    assert!(done, "the rollout completes under the limit: {} on {TARGET}", sim.on(TARGET));
}

/// Every check of a membership change under load, on the fleet's figures read from `asked`:
/// the summary counts each simulated host once (none missing, none twice) and is not partial,
/// and the relays never serve a lower wave than `floor`.
fn whole(c: &Cluster, asked: &[usize], n: usize, floor: usize) -> Result<(), String> {
    for &i in asked {
        let (status, s) = get_json(&c.meta(i).url("/status/summary/falcon-agent"));
        if status != 200 || s["hosts"] != n || s["partial"] != false {
            return Err(format!("meta-{}: {status} {s}", i + 1));
        }
    }
    let wave = relay_waves(c).into_iter().min();
    if wave.unwrap_or(0) < floor {
        return Err(format!("a relay serves wave {wave:?}, below {floor}: a node held the fleet back"));
    }
    Ok(())
}

/// Runs `change` (a `/cluster/reload?all=1`) on its own thread while the simulated hosts keep
/// reporting through the relays and `whole` is checked after every round; returns the reply.
fn under_load(c: &Cluster, sim: &mut Sim, asked: &[usize], floor: usize, change: impl FnOnce() -> (u16, Value) + Send) -> (u16, Value) {
    std::thread::scope(|s| {
        let t = s.spawn(change);
        let mut rounds = 0;
        while !t.is_finished() || rounds < 3 {
            if t.is_finished() {
                rounds += 1;
            }
            sim.round(c);
            if let Err(e) = whole(c, asked, sim.hosts.len(), floor) {
                let logs: Vec<String> = c.running().map(|m| m.proc.log()).collect();
                panic!("status not whole during the change: {e}\n{}", logs.join("\n----\n"));
            }
        }
        t.join().unwrap()
    })
}

#[test]
fn a_meta_node_joins_and_another_leaves_online_under_load_and_the_rollout_goes_on() {
    let mut c = Cluster::up_with(3, 2, &agents(r#"  soak = "1s""#), FAST);
    let mut sim = Sim::new(240);
    // Every relay serves wave 2 (one relay's poll can be a period behind the other's).
    assert!(run_until(&c, &mut sim, Duration::from_secs(60), |_, c| relay_floor(c) >= 2), "the rollout reached wave 2");
    let floor = relay_floor(&c);

    // 3 -> 4: the operator writes the new map, starts meta-4 on it and asks any node.
    let four = c.add_meta();
    let map = c.write_map(&[0, 1, 2, four]);
    let hash = ops_config::content_hash(map.as_bytes());
    c.start_meta(four);
    let url = c.meta(0).url("/cluster/reload?all=1");
    let (status, reply) = under_load(&c, &mut sim, &[0, 1, 2], floor, || get_json_auth(&url, TOKEN));
    assert_eq!(status, 200, "{reply}");
    assert_eq!((reply["changed"].clone(), reply["generation"].clone()), (json!(true), json!(1)), "{reply}");
    let moved: u64 = reply["nodes"].as_array().unwrap().iter().map(|n| n["moved"].as_u64().unwrap()).sum();
    let share = c.ring_counts(&sim.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>());
    assert_eq!(moved, share[3], "exactly the hosts the ring gives meta-4 moved, and only those: {reply}");
    // A quarter of the hosts, give or take the sampling noise of 240 names (the 1.1/(N+1)
    // bound is `ops-bench --grow-meta`'s, at 1M hosts).
    assert!(moved > 0 && moved * 100 <= 240 * 35, "moved {moved} of 240");
    for r in &c.relays {
        eventually(Duration::from_secs(10), || {
            let h = get_json(&r.url("/health")).1;
            (h["clusterHash"] == hash.as_str() && h["clusterGeneration"] == 1).then_some(())
        })
        .expect("relays learn the new map, generation 1, from the meta nodes");
    }
    for i in 0..4 {
        assert_eq!(get_json(&c.meta(i).url("/health")).1["clusterGeneration"], 1, "meta-{} is at generation 1", i + 1);
    }
    // The copies left at the old owners go home; each host is held once, by its owner.
    let settled = eventually(Duration::from_secs(20), || {
        sim.round(&c);
        let held: Vec<u64> = (0..4).map(|i| c.meta(i).hosts_held()).collect();
        (held == share).then_some(held)
    });
    assert!(
        settled.is_some(),
        "every node holds its ring share: {:?} want {share:?}",
        (0..4).map(|i| c.meta(i).hosts_held()).collect::<Vec<_>>()
    );
    whole(&c, &[0, 1, 2, 3], 240, floor).unwrap();
    for i in 0..4 {
        let map: String = ops_e2e::get_text(&c.meta(i).url("/cluster/map")).1;
        assert_eq!(map, std::fs::read_to_string(c.cluster_file()).unwrap(), "meta-{} serves the new map", i + 1);
    }

    // 4 -> 3: meta-2 leaves. It hands its hosts over, then holds nothing and can be stopped.
    let floor = relay_floor(&c);
    let map = c.write_map(&[0, 2, four]);
    let hash = ops_config::content_hash(map.as_bytes());
    let url = c.meta(3).url("/cluster/reload?all=1");
    let (status, reply) = under_load(&c, &mut sim, &[0, 2, 3], floor, || get_json_auth(&url, TOKEN));
    assert_eq!((status, reply["generation"].as_u64()), (200, Some(2)), "{reply}");
    for r in &c.relays {
        eventually(Duration::from_secs(10), || (get_json(&r.url("/health")).1["clusterHash"] == hash.as_str()).then_some(()))
            .expect("relays drop meta-2");
    }
    eventually(Duration::from_secs(20), || {
        sim.round(&c);
        (c.meta(1).hosts_held() == 0).then_some(())
    })
    .expect("meta-2 handed every host over");
    let meta2 = c.metas[1].take().unwrap();
    meta2.proc.signal("TERM");
    whole(&c, &[0, 2, 3], 240, floor).unwrap();
    let (status, health) = get_json(&c.meta(0).url("/health"));
    assert_eq!(status, 200);
    assert_eq!(health["nodes"].as_array().unwrap().len(), 3, "{health}");

    // The rollout goes on to every host across both changes.
    let done = run_until(&c, &mut sim, Duration::from_secs(90), |s, _| s.rollout_hosts().all(|h| h.version == TARGET));
    assert!(done, "every host reached {TARGET}: {} did", sim.on(TARGET));
    whole(&c, &[0, 2, 3], 240, 3).unwrap();
}

/// The sum over the meta nodes of a gauge's series with these labels.
fn gauge_sum(c: &Cluster, series: &str) -> f64 {
    c.running()
        .map(|m| {
            let text = get_text(&m.url("/metrics")).1;
            ops_config::prom::series(&text, series).unwrap_or(0.0)
        })
        .sum()
}

/// Each node's rollout waves summed: (failed, failedTotal, silent).
fn failures(c: &Cluster) -> Vec<(u64, u64, u64)> {
    (0..c.metas.len())
        .map(|i| {
            let r = rollout(c, i);
            let sum = |k: &str| r["waves"].as_array().unwrap().iter().map(|w| w[k].as_u64().unwrap_or(0)).sum::<u64>();
            (sum("failed"), sum("failedTotal"), sum("silent"))
        })
        .collect()
}

/// A relay killed in the middle of a rollout: its hosts are one line ("relay relay-2: 120 hosts
/// silent since ...") in the summary, opsctl, the metrics and the fleet page; the judges count
/// them silent, never failed, past their deadline too; and back after an outage longer than
/// the deadline, still installing, they are not failed for the outage.
#[test]
fn a_silent_relay_is_one_line_and_its_hosts_are_never_failed_for_it() {
    let text = agents(r#"  soak = "1s""#).replace(r#"deadline = "10m""#, r#"deadline = "6s""#);
    let args: Vec<&str> = FAST.iter().copied().chain(["--stale-after-seconds", "2"]).collect();
    let mut c = Cluster::up_with(3, 2, &text, &args);
    let mut sim = Sim::new(240);
    // Wave 1 is told the target; nobody installs yet.
    sim.install = Install::Hangs;
    let told = run_until(&c, &mut sim, Duration::from_secs(30), |s, _| s.rollout_hosts().filter(|h| wave_of(&h.name) == 1).all(|h| h.told));
    assert!(told, "wave 1 is told: {}", rollout(&c, 0));
    let in_flight: Vec<String> = sim.hosts.iter().enumerate().filter(|(i, h)| i % 2 == 1 && h.told).map(|(_, h)| h.name.clone()).collect();
    assert!(!in_flight.is_empty(), "relay-2 has hosts told the target");

    let all = eventually(Duration::from_secs(10), || {
        let s = get_json(&c.meta(0).url("/status/summary/falcon-agent")).1;
        (s["hosts"] == 240).then_some(())
    });
    assert!(
        all.is_some(),
        "every host is held: {}\n{}",
        get_json(&c.meta(0).url("/status/summary/falcon-agent")).1,
        c.relays[1].proc.log()
    );
    // relay-2's datacenter goes dark; relay-1's hosts install and go on reporting.
    c.relays[1].proc.kill();
    let killed = Instant::now();
    sim.install = Install::Works;
    let behind: u64 = 120;
    let mut seen_silent = false;
    let mut last = Value::Null;
    while killed.elapsed() < Duration::from_secs(9) || !seen_silent {
        assert!(killed.elapsed() < Duration::from_secs(60), "relay-2's hosts never showed as silent: {last}");
        sim.round_via(&c, &[0]);
        for (i, (failed, total, _)) in failures(&c).into_iter().enumerate() {
            assert_eq!((failed, total), (0, 0), "meta-{} counts failures while relay-2 is silent: {}", i + 1, rollout(&c, i));
        }
        let s = get_json(&c.meta(0).url("/status/summary/falcon-agent")).1;
        seen_silent = s["byState"]["stale"] == behind;
        last = s;
        std::thread::sleep(Duration::from_millis(100));
    }
    // relay-1's hosts go on reporting meanwhile (the checks below take seconds: Chromium).
    let rollout_behind = sim.rollout_hosts().filter(|h| sim.hosts.iter().position(|x| x.name == h.name).unwrap() % 2 == 1).count() as u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (sim, c, stop) = (&mut sim, &c, &stop);
        scope.spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sim.round_via(c, &[0]);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Stops the reporting thread however the checks end (a failed one panics).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(stop);
        silent_relay_checks(c, behind, rollout_behind, &in_flight[0]);
    });

    // relay-2 is back after more than the deadline; its told hosts report still on `from`.
    c.restart_relay(1);
    sim.install = Install::Hangs;
    sim.round(&c);
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(2) {
        for (i, (failed, total, _)) in failures(&c).into_iter().enumerate() {
            assert_eq!((failed, total), (0, 0), "meta-{} fails hosts for the outage: {}", i + 1, rollout(&c, i));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // They install now, and the rollout reaches everybody with no failure at all.
    sim.install = Install::Works;
    let done = run_until(&c, &mut sim, Duration::from_secs(90), |s, _| s.rollout_hosts().all(|h| h.version == TARGET));
    assert!(done, "the rollout completes: {} on {TARGET}, {}", sim.on(TARGET), rollout(&c, 0));
    let settled = eventually(Duration::from_secs(10), || {
        let s = get_json(&c.meta(0).url("/status/summary/falcon-agent")).1;
        (s["byState"]["stale"] == 0).then_some(s)
    });
    assert!(settled.is_some(), "relay-2's hosts are heard again");
    assert!(failures(&c).iter().all(|f| f.1 == 0), "no failure in the whole rollout: {}", rollout(&c, 0));
}

/// The checks of `a_silent_relay_is_one_line...` while relay-2 (`behind` hosts, `rollout_behind`
/// of them in the rollout, `host` one of them) is down.
fn silent_relay_checks(c: &Cluster, behind: u64, rollout_behind: u64, host: &str) {
    // One line for relay-2, from any node.
    for i in 0..3 {
        let s = get_json(&c.meta(i).url("/status/summary/falcon-agent")).1;
        assert_eq!((s["partial"].clone(), s["byState"]["stale"].clone()), (json!(false), json!(behind)), "{s}");
        let relays = s["relays"].as_array().unwrap();
        assert_eq!(
            (relays[0]["relay"].as_str(), relays[0]["silent"].as_u64(), relays[0]["hosts"].as_u64()),
            (Some("relay-2"), Some(behind), Some(behind)),
            "{s}"
        );
        assert!(relays[0]["lastHeard"].as_u64().unwrap() > 0, "{s}");
        assert_eq!((relays[1]["relay"].as_str(), relays[1]["silent"].as_u64()), (Some("relay-1"), Some(0)), "{s}");
    }
    // The judges: relay-2's hosts in the rollout are silent, none failed, well past the deadline.
    // (Every node's /rollout gathers the fleet's waves.)
    for (i, (_, _, silent)) in failures(c).into_iter().enumerate() {
        assert_eq!(silent, rollout_behind, "{}", rollout(c, i));
    }
    assert!(rollout(c, 0)["halted"] == false, "{}", rollout(c, 0));
    // The listing by relay, the host view, opsctl and the metrics say the same.
    let (status, listing) = get_json(&c.meta(1).url("/status/json/falcon-agent?relay=relay-2&state=stale"));
    assert_eq!((status, listing["count"].as_u64()), (200, Some(behind)), "{listing}");
    assert!(listing["hosts"].as_array().unwrap().iter().all(|h| h["relay"] == "relay-2"), "{listing}");
    assert_eq!(get_json(&c.meta(1).url("/status/json/falcon-agent?relay=nowhere")).1["count"], 0);
    assert_eq!(get_json(&c.meta(1).url("/status/json/falcon-agent?relay=a%20b")).0, 400);
    assert_eq!(get_json(&c.meta(2).url(&format!("/status/host/{}", host))).1["relay"], "relay-2");
    let server = format!("--server={}", c.meta(2).url(""));
    let (code, out, err) = ops_e2e::opsctl(&[&server, "status"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = out.lines().find(|l| l.starts_with("relay relay-2: ")).unwrap_or_else(|| panic!("no line for relay-2:\n{out}"));
    assert!(line.contains("120 hosts silent since") && line.ends_with("(all of its hosts)"), "{line}");
    assert_eq!(out.lines().filter(|l| l.contains("silent since")).count(), 1, "one line, not one per host:\n{out}");
    let (code, out, err) = ops_e2e::opsctl(&[&server, "hosts", "falcon-agent", "--relay", "relay-2", "--state", "stale"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| !l.starts_with('#')).count() as u64, behind, "{out}");
    let metric = eventually(Duration::from_secs(10), || {
        (gauge_sum(c, r#"ops_meta_relay_silent_hosts{relay="relay-2"}"#) == behind as f64
            && gauge_sum(c, r#"ops_meta_relay_hosts{relay="relay-1"}"#) == 120.0)
            .then_some(())
    });
    assert!(metric.is_some(), "ops_meta_relay_silent_hosts sums to relay-2's hosts over the nodes");
    // The fleet page: one line for the relay.
    let dom = chromium(&["--dump-dom", &c.meta(0).url("/ui/")]);
    assert!(dom.contains(r#"data-relay="relay-2""#) && dom.contains(&format!(r#"data-silent="{behind}""#)), "{dom}");
    assert!(dom.contains("relay relay-2: 120 hosts silent since") && dom.contains("(all of its hosts)"), "{dom}");
    assert!(dom.contains(" silent</span>"), "the waves say how many are silent: {dom}");
    assert!(!dom.contains(r#"data-relay="relay-1""#), "relay-1 has no silent host: {dom}");
    let shot = ops_e2e::workspace_root().join("target/tmp/fleet-page-silent-relay.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    chromium(&["--window-size=1200,800", &format!("--screenshot={}", shot.display()), &c.meta(0).url("/ui/")]);
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 1000).unwrap_or(false), "screenshot written");
}
