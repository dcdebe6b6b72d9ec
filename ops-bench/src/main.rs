//! `ops-bench`: a simulated fleet against a real ops fleet cluster.
//!
//! With no target flags it starts its own cluster from the release binaries built beside it
//! (`--meta 3 --relays 2`), runs the phases, prints a report and stops what it started (also on
//! ctrl-c). Phases: register (one sweep of every host), steady (every host once per compressed
//! interval; optionally a meta node SIGKILLed), rollout (a new default version, until every host
//! runs it), query (summary from every meta node, the full text listing), ceiling (the same
//! client against a minimal hyper server). Exit status 1 when a heartbeat failed, the listing
//! missed hosts or a phase did not converge.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;

mod chaos;
mod cluster;
mod load;
mod rollout;
mod steady;
mod storm;

#[derive(Parser, Debug)]
#[command(name = "ops-bench", version, about = "ops fleet bench: a simulated fleet against a real cluster")]
struct Cli {
    /// Simulated hosts (distinct hostnames).
    #[arg(long, default_value_t = 100_000)]
    hosts: u64,
    /// Agents per host.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Meta nodes to start.
    #[arg(long, default_value_t = 3)]
    meta: usize,
    /// Relays to start.
    #[arg(long, default_value_t = 2)]
    relays: usize,
    /// Heartbeats in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Drive an existing cluster: its relays (host:port, comma separated)...
    #[arg(long, value_delimiter = ',')]
    relay: Vec<SocketAddr>,
    /// ...and its meta nodes.
    #[arg(long = "meta-addr", value_delimiter = ',')]
    meta_addr: Vec<SocketAddr>,
    /// Skip the rollout phase.
    #[arg(long)]
    no_rollout: bool,
    /// Run the rollout staged (`[agent.rollout]`: waves 1/5/25/100 %, soak 15 min and deadline
    /// 20 min divided by --speedup) with this share of hosts failing the new version's install
    /// (they report `lastError` and keep the old one). 0: a good build, staged.
    #[arg(long)]
    bad_build_rate: Option<f64>,
    /// Give up on the rollout reaching 100 % after this long (staged: at least 20 soaks).
    #[arg(long, default_value_t = 180)]
    rollout_timeout_seconds: u64,
    /// A simulated host told a new version reports the old one for this long (its install).
    #[arg(long, default_value_t = 0)]
    install_delay_ms: u64,
    /// The simulated updaters' heartbeat interval (the Go updater's default is 300).
    #[arg(long, default_value_t = 300)]
    interval_seconds: u64,
    /// Time compression of the steady phase: each host reports once per interval / speedup.
    #[arg(long, default_value_t = 10.0)]
    speedup: f64,
    /// Length of the steady phase (0 skips it).
    #[arg(long, default_value_t = 10)]
    steady_seconds: u64,
    /// SIGKILL one meta node during the steady phase (own cluster only), then restart it.
    #[arg(long)]
    kill_meta: bool,
    /// Under the steady load, one fault after the other (own cluster only): SIGKILL a meta node
    /// and restart it; SIGSTOP one for --chaos-pause-seconds; SIGKILL a relay (the simulated
    /// updaters fail over to the next); restart every meta node at once; every meta node but
    /// one down. Each is a row of the report and of the JSON; exit status 1 if any loses a
    /// host, lists one twice, or never becomes whole again.
    #[arg(long)]
    chaos: bool,
    /// Under the steady load (own cluster only): add a meta node online, then remove one
    /// (meta-2), each by `/cluster/reload?all=1`; rows `grow-meta` and `shrink-meta` give the
    /// hosts moved (bound 1.1/(N+1)), the seconds until the new node holds its share, whether
    /// status stayed whole throughout, and the summary p99 meanwhile. After --chaos if both.
    #[arg(long)]
    grow_meta: bool,
    /// How long the chaos phase's SIGSTOP keeps its meta node stopped.
    #[arg(long, default_value_t = 30)]
    chaos_pause_seconds: u64,
    /// After each fault, once no failover copy is left, how long the bench waits before it
    /// reads every process's RSS again: the memory given back (the allocator's decay, the
    /// meta nodes' compaction at their sweep), against their RSS before the first fault.
    /// 0: not read.
    #[arg(long, default_value_t = 40)]
    rss_settle_seconds: u64,
    /// Worker threads of each meta node and relay it starts: the bench packs them all and its
    /// client on one box, where one each avoids most cross-thread wake-ups (measured: relay
    /// 54k -> 58k heartbeats/s at 500k hosts). 0: the servers' default, one per core.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Requests of the ceiling phase (at most --hosts).
    #[arg(long, default_value_t = 200_000)]
    ceiling_requests: u64,
    /// Internal: serve the ceiling phase's minimal server in this process, print its address,
    /// and exit when standard input closes (the bench starts itself this way).
    #[arg(long, hide = true)]
    ceiling_server: bool,
    /// Download storm (own cluster only): --storm-hosts simulated hosts of each relay download
    /// one --storm-bytes tarball at once, through their relay's package cache, then straight
    /// from the origin; a heartbeat sweep runs beside each pass and once alone.
    #[arg(long)]
    storm: bool,
    /// Downloads per relay in the storm.
    #[arg(long, default_value_t = 500)]
    storm_hosts: usize,
    /// Size of the storm's tarball.
    #[arg(long, default_value_t = 8 << 20)]
    storm_bytes: u64,
    /// Rounds of the storm (each: through the relays, then direct); medians are reported.
    #[arg(long, default_value_t = 3)]
    storm_rounds: usize,
    /// The storm's origin: a base URL serving `{base}/linux_amd64/storm-agent-1.0.tar.gz`.
    /// Default: a real nginx the bench starts, serving a file of --storm-bytes.
    #[arg(long)]
    storm_origin: Option<String>,
    /// Start the cluster under mutual TLS (own cluster only): the bench makes a cluster CA
    /// (`opsctl ca`), meta nodes serve HTTPS and know each other and the relays by their
    /// certificates (`mtls = true`); the simulated updaters still talk plain HTTP to the
    /// relays, so the heartbeat path's figures show what TLS between relay and meta costs.
    #[arg(long)]
    mtls: bool,
    /// Turn enrollment on (own cluster only): the bench makes a host key, every meta node and
    /// relay checks heartbeats' host credentials with it (`--host-key-file`), and every
    /// simulated updater sends its own; the heartbeat path's figures then include the check.
    #[arg(long)]
    enrollment: bool,
    /// Write every figure to this JSON file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const AGENTS_TOML: &str = r#"
[[agent]]
name = "falcon-agent"
tarball = "http://files.example/releases/falcon"
run_user = "root"
work_dir = "/opt/ops"
default = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66", cmd = "start" }
  [[agent.others]]
  prefix = "bj-web-"
  version = "5.1.4"
  md5 = ""

[[agent]]
name = "mysql-monitor"
tarball = "http://files.example/releases/falcon"
run_user = "root"
work_dir = "/opt/ops"
default = { version = "5.1.3", md5 = "", cmd = "start" }

[[agent]]
name = "naming-agent"
tarball = "http://files.example/releases/naming"
run_user = "root"
work_dir = "/opt/ops"
default = { version = "5.1.3", md5 = "", cmd = "start" }
"#;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ops-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.ceiling_server {
        // The ceiling server keeps tokio's default (a worker per core): on this box that is
        // its fastest setting, so the ceiling is not understated.
        return rt.block_on(async {
            match load::serve_ceiling_until_stdin_closes().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ops-bench --ceiling-server: {e:#}");
                    ExitCode::FAILURE
                }
            }
        });
    }
    rt.block_on(async move {
        tokio::select! {
            r = bench(cli) => match r {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("ops-bench: {e:#}");
                    ExitCode::FAILURE
                }
            },
            // The cluster guard inside `bench` is dropped here, stopping what was started.
            _ = tokio::signal::ctrl_c() => {
                eprintln!("ops-bench: interrupted, stopping the cluster");
                ExitCode::from(130)
            }
        }
    })
}

async fn get_json(client: &reqwest::Client, url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(client.get(url).send().await.with_context(|| format!("GET {url}"))?.json().await?)
}

/// Seconds each phase took, in order, for the report.
struct Phases {
    mark: Instant,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    /// Ends the phase `name` now; the next one starts.
    fn lap(&mut self, name: &'static str) {
        self.done.push((name, self.mark.elapsed().as_secs_f64()));
        self.mark = Instant::now();
    }
}

async fn bench(cli: Cli) -> anyhow::Result<bool> {
    anyhow::ensure!(cli.hosts > 0, "--hosts must be > 0");
    anyhow::ensure!(cli.connections > 0, "--connections must be > 0");
    anyhow::ensure!(cli.speedup > 0.0 && cli.interval_seconds > 0, "--speedup and --interval-seconds must be > 0");
    let wall = Instant::now();
    let mut phases = Phases { mark: Instant::now(), done: Vec::new() };
    let own = cli.relay.is_empty();
    anyhow::ensure!(own || !cli.mtls, "--mtls starts the bench's own cluster under mutual TLS: not with --relay");
    let dir = std::env::temp_dir().join(format!("ops-bench-{}", std::process::id()));
    anyhow::ensure!(own || !cli.enrollment, "--enrollment starts the bench's own cluster with host keys: not with --relay");
    let mut host_keys = None;
    let mut cluster = if own {
        eprintln!("starting {} meta nodes and {} relays from the release binaries ...", cli.meta, cli.relays);
        let dir = dir.clone();
        if cli.mtls {
            cluster::enable_mtls(&dir)?;
        }
        if cli.enrollment {
            host_keys = Some(cluster::enable_enrollment(&dir)?);
        }
        let (m, r, t) = (cli.meta, cli.relays, Some(cli.server_threads).filter(|&n| n > 0));
        Some(tokio::task::spawn_blocking(move || cluster::Cluster::start(&dir, m, r, AGENTS_TOML, 1000, t)).await??)
    } else {
        None
    };
    let relays: Vec<SocketAddr> = cluster.as_ref().map_or(cli.relay.clone(), |c| c.relays.iter().map(|r| r.addr).collect());
    let metas: Vec<SocketAddr> = cluster.as_ref().map_or(cli.meta_addr.clone(), |c| c.metas.iter().map(|m| m.addr).collect());
    anyhow::ensure!(!relays.is_empty() && !metas.is_empty(), "need at least one relay and one meta node (--relay, --meta-addr)");
    let client = cluster::client_builder()?.timeout(Duration::from_secs(120)).build()?;
    let baseline: Vec<(String, u64)> = cluster
        .as_ref()
        .map(|c| c.metas.iter().map(|m| (m.name.clone(), cluster::usage(m.pid()).map_or(0, |u| u.0))).collect())
        .unwrap_or_default();

    phases.lap("start");

    // 1. register: one sweep of every host.
    let fleet = load::Fleet::new(cli.hosts, cli.agents, Duration::from_millis(cli.install_delay_ms), cli.bad_build_rate.unwrap_or(0.0));
    if let Some(keys) = host_keys.clone() {
        fleet.enroll(keys);
    }
    let never = load::Live::new();
    let register = load::run(&relays, &fleet, cli.connections, "register", load::Plan::Sweep, &never).await;
    println!(
        "register: {} heartbeats in {:.1} s = {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, errors {}",
        register.requests,
        register.seconds,
        register.rate(),
        register.percentile_ms(0.5),
        register.percentile_ms(0.99),
        register.percentile_ms(1.0),
        register.errors
    );

    // Every report reaches its owner within a flush or two.
    let settle = Instant::now();
    let mut held = 0;
    while settle.elapsed() < Duration::from_secs(120) {
        held = steady::summary_hosts(&client, metas[0]).await.map_or(0, |h| h.0);
        if held >= cli.hosts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled_s = settle.elapsed().as_secs_f64();
    println!("settled: {held} hosts held by the cluster {settled_s:.1} s after the sweep");

    phases.lap("register");

    // 2. steady: every host once per compressed interval.
    let steady = if cli.steady_seconds > 0 {
        let mut scenarios = if cli.chaos {
            chaos::Scenario::ALL.to_vec()
        } else if cli.kill_meta {
            vec![chaos::Scenario::KillMeta]
        } else {
            Vec::new()
        };
        if cli.grow_meta {
            scenarios.extend([chaos::Scenario::GrowMeta, chaos::Scenario::ShrinkMeta]);
        }
        anyhow::ensure!(scenarios.is_empty() || own, "--kill-meta, --chaos and --grow-meta need the bench's own cluster");
        let settings = steady::Settings {
            interval: Duration::from_secs(cli.interval_seconds),
            speedup: cli.speedup,
            duration: Duration::from_secs(cli.steady_seconds),
            connections: cli.connections,
            scenarios,
            pause: Duration::from_secs(cli.chaos_pause_seconds),
            rss_settle: Duration::from_secs(cli.rss_settle_seconds),
        };
        let s = steady::run(&settings, &relays, &fleet, cluster.as_mut(), &client).await?;
        println!(
            "steady: {:.0}/s sustained of {:.0}/s asked ({} s interval / {}), p50 {:.2} ms, p99 {:.2} ms, errors {}; relays: pending at most {}, {:.0} hosts a batch",
            s.run.rate(),
            s.target_per_s,
            cli.interval_seconds,
            cli.speedup,
            s.run.percentile_ms(0.5),
            s.run.percentile_ms(0.99),
            s.run.errors,
            s.relay_pending_max,
            s.batch_hosts_mean
        );
        Some(s)
    } else {
        None
    };

    phases.lap("steady");

    // 3. rollout: a new default version on every meta node; sweeps until every host runs what
    // it should, the convergence read from /status/summary.
    let staged = cli.bad_build_rate.map(|bad_build_rate| rollout::Staged {
        bad_build_rate,
        soak_s: ((15.0 * 60.0 / cli.speedup).round() as u64).max(1),
        deadline_s: ((20.0 * 60.0 / cli.speedup).round() as u64).max(1),
    });
    let rollout_limit = Duration::from_secs(cli.rollout_timeout_seconds.max(staged.map_or(0, |s| 20 * s.soak_s)));
    let rollout = match &cluster {
        Some(c) if !cli.no_rollout => {
            Some(rollout::run(c, AGENTS_TOML, &relays, &fleet, &client, cli.connections, rollout_limit, staged).await?)
        }
        _ => None,
    };

    phases.lap("rollout");

    // 4. query: summary from every meta node, then the whole text listing. (--grow-meta
    // changed the meta nodes: ask those of the map now.)
    let metas: Vec<SocketAddr> = cluster.as_ref().map_or(metas, |c| c.metas.iter().map(|m| m.addr).collect());
    let mut summary_ms = Vec::new();
    for m in &metas {
        for _ in 0..20 {
            let t = Instant::now();
            get_json(&client, &cluster::meta_url(m, "/status/summary/falcon-agent")).await?;
            summary_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    summary_ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    let t = Instant::now();
    let resp = client.get(cluster::meta_url(metas[0], "/status/text/falcon-agent")).send().await?;
    let mut stream = resp.bytes_stream();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let listing_s = t.elapsed().as_secs_f64();
    let listed = lines.saturating_sub(1);
    println!(
        "query: summary p50 {:.1} ms, p99 {:.1} ms over {} requests; text listing {listed} hosts, {} MiB in {listing_s:.2} s",
        pct(&summary_ms, 0.5),
        pct(&summary_ms, 0.99),
        summary_ms.len(),
        bytes >> 20
    );

    phases.lap("query");

    // Resources, then stop what was started (meta nodes snapshot, relays drain).
    let mut processes = Vec::new();
    let mut meta_rss = 0u64;
    if let Some(c) = &cluster {
        for p in c.processes() {
            let (rss, cpu) = cluster::usage(p.pid()).unwrap_or((0, 0.0));
            if p.name.starts_with("meta") {
                meta_rss += rss;
            }
            processes.push(json!({"name": p.name, "rss_bytes": rss, "cpu_s": cpu}));
        }
    }
    let client_usage = cluster::usage(std::process::id()).unwrap_or((0, 0.0));

    // 5. storm: after the resource figures, which it would distort.
    let storm = match &cluster {
        Some(c) if cli.storm => {
            let settings = storm::Settings {
                hosts_per_relay: cli.storm_hosts.max(1),
                bytes: cli.storm_bytes.max(1),
                origin: cli.storm_origin.clone(),
                connections: cli.connections,
                rounds: cli.storm_rounds,
            };
            Some(storm::run(&settings, c, &dir, AGENTS_TOML, &fleet, &client).await?)
        }
        _ => None,
    };
    anyhow::ensure!(!cli.storm || own, "--storm needs the bench's own cluster");
    let client = client_usage;
    phases.lap("storm");
    // CPU the relays spent per heartbeat they answered, for comparison with the ceiling
    // server's per request (both from /proc).
    let relay_cpu_s: f64 =
        processes.iter().filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("relay"))).filter_map(|p| p["cpu_s"].as_f64()).sum();
    let relayed = register.requests + steady.as_ref().map_or(0, |s| s.run.requests) + rollout.as_ref().map_or(0, |r| r.heartbeats);
    let base_rss: u64 = baseline.iter().map(|b| b.1).sum();
    let bytes_per_host = if cluster.is_some() { meta_rss.saturating_sub(base_rss) as f64 / cli.hosts as f64 } else { 0.0 };

    drop(cluster.take());
    phases.lap("stop");

    // 5. ceiling: the same client against a minimal hyper server in a process of its own,
    // as the relays are (in the bench's own runtime it would share the client's threads).
    let ceiling_server = tokio::task::spawn_blocking(cluster::CeilingServer::start).await??;
    let ceiling_addr = ceiling_server.addr;
    let ceiling_n = cli.hosts.min(cli.ceiling_requests.max(1));
    let ceiling_fleet = load::Fleet::new(ceiling_n, cli.agents, Duration::ZERO, 0.0);
    let ceiling = load::run(&[ceiling_addr], &ceiling_fleet, cli.connections, "ceiling", load::Plan::Sweep, &never).await;
    let ceiling_cpu_s = cluster::usage(ceiling_server.pid()).map_or(0.0, |u| u.1);
    drop(ceiling_server);
    let ratio = register.rate() / ceiling.rate().max(1.0);
    println!("ceiling: {:.0} requests/s (minimal hyper server, same client); relay rate = {ratio:.2} x ceiling", ceiling.rate());
    if let Some(s) = &storm {
        println!(
            "storm vs ceiling: heartbeats {:.2} x ceiling alone, {:.2} x during the relay storm, {:.2} x during the direct one",
            s.quiet_heartbeats_per_s / ceiling.rate().max(1.0),
            s.via_relays.heartbeats_per_s / ceiling.rate().max(1.0),
            s.direct.heartbeats_per_s / ceiling.rate().max(1.0)
        );
    }

    phases.lap("ceiling");
    let steady_errors = steady.as_ref().map_or(0, |s| s.run.errors);
    let errors = register.errors + steady_errors + rollout.as_ref().map_or(0, |r| r.errors);
    let chaos_ok = steady.as_ref().is_none_or(|s| s.chaos.iter().all(chaos::Row::ok));
    let storm_ok = storm.as_ref().is_none_or(storm::Storm::ok);
    let ok = errors == 0 && held >= cli.hosts && listed == cli.hosts && rollout.as_ref().is_none_or(|r| r.done()) && chaos_ok && storm_ok;
    let wall_s = wall.elapsed().as_secs_f64();
    // The issue's end-to-end figure: start, register, rollout, query, stop (steady and
    // ceiling are extra phases, shown apart).
    let extra: f64 = phases.done.iter().filter(|(n, _)| matches!(*n, "steady" | "ceiling")).map(|p| p.1).sum();
    let wall_core_s = wall_s - extra;

    println!();
    let row = |name: &str, value: String| println!("{name:<30} {value:>14}");
    row("hosts", cli.hosts.to_string());
    row("relay -> meta", (if cli.mtls { "mTLS" } else { "HTTP" }).to_string());
    row("host credentials", (if cli.enrollment { "checked" } else { "off" }).to_string());
    row("errors", errors.to_string());
    row("register heartbeats/s", format!("{:.0}", register.rate()));
    row("register p50 / p99 ms", format!("{:.2} / {:.2}", register.percentile_ms(0.5), register.percentile_ms(0.99)));
    row("ceiling requests/s", format!("{:.0}", ceiling.rate()));
    row("relay / ceiling", format!("{ratio:.2}"));
    let per = |cpu: f64, n: u64| if n == 0 { 0.0 } else { cpu * 1e6 / n as f64 };
    row("cpu us: relay / ceiling srv", format!("{:.1} / {:.1}", per(relay_cpu_s, relayed), per(ceiling_cpu_s, ceiling.requests)));
    if let Some(s) = &steady {
        row("steady heartbeats/s (asked)", format!("{:.0} ({:.0})", s.run.rate(), s.target_per_s));
        row("steady p99 ms", format!("{:.2}", s.run.percentile_ms(0.99)));
        row("relay pending max", s.relay_pending_max.to_string());
        row("relay hosts per batch", format!("{:.0}", s.batch_hosts_mean));
        let growth: Vec<String> =
            s.rss_growth().into_iter().filter_map(|(n, g)| g.map(|g| format!("{n} {:+.1}%", (g - 1.0) * 100.0))).collect();
        if !growth.is_empty() {
            row("rss growth after 1st interval", growth.join(", "));
        }
        for c in &s.chaos {
            let t = |v: Option<f64>| v.map_or("never".to_owned(), |t| format!("{t:.1}"));
            row(&format!("{}: whole again s", c.name), t(c.whole_s));
            row(&format!("{}: errors/missing/twice", c.name), format!("{} / {} / {}", c.errors, c.missing, c.twice));
            row(&format!("{}: summary p99 ms", c.name), c.summary_p99_ms.map_or("-".to_owned(), |t| format!("{t:.1}")));
            if let Some((node, ratio)) = &c.settled_ratio {
                row(&format!("{}: meta rss settled / before", c.name), format!("{ratio:.2} ({node})"));
            }
        }
    }
    if let Some(r) = &rollout {
        for (p, t) in &r.converged_s {
            row(&format!("rollout {p}% converged s"), t.map_or("-".to_owned(), |t| format!("{t:.1}")));
        }
        if let Some(s) = &r.staged {
            row("staged: waves opened", s.waves_opened.to_string());
            row("staged: halted after s", s.halt_s.map_or("-".to_owned(), |t| format!("{t:.1}")));
            row(
                "staged: blast radius hosts",
                format!("{} ({:.2} %)", s.blast_radius, 100.0 * s.blast_radius as f64 / cli.hosts.max(1) as f64),
            );
        }
    }
    if let Some(s) = &storm {
        let c = ceiling.rate().max(1.0);
        row("storm downloads (relays x hosts)", format!("{} x {}", s.relays, cli.storm_hosts));
        row("storm file MiB", format!("{:.1}", s.bytes as f64 / (1 << 20) as f64));
        for (name, p) in [("via relays", &s.via_relays), ("direct", &s.direct)] {
            row(&format!("storm {name} MB/s"), format!("{:.0}", p.mb_per_s()));
            row(&format!("storm {name} p50 / p99 s"), format!("{:.2} / {:.2}", p.percentile_s(0.5), p.percentile_s(0.99)));
            row(&format!("storm {name} errors"), p.errors.to_string());
            row(&format!("storm {name} origin requests"), p.origin_requests.map_or("-".to_owned(), |n| n.to_string()));
            row(&format!("storm {name} relay rss max MiB"), (p.relay_rss_max >> 20).to_string());
            row(&format!("storm {name} hb/s (x ceiling)"), format!("{:.0} ({:.2})", p.heartbeats_per_s, p.heartbeats_per_s / c));
        }
        row("storm relay misses (each)", format!("{:?}", s.relay_misses));
        row("storm relay / origin MB/s", format!("{:.2}", s.via_relays.mb_per_s() / s.direct.mb_per_s().max(1e-9)));
        row("storm quiet hb/s (x ceiling)", format!("{:.0} ({:.2})", s.quiet_heartbeats_per_s, s.quiet_heartbeats_per_s / c));
    }
    row("summary p50 / p99 ms", format!("{:.1} / {:.1}", pct(&summary_ms, 0.5), pct(&summary_ms, 0.99)));
    row("listing s", format!("{listing_s:.2}"));
    row("listed hosts", listed.to_string());
    row("meta bytes/host", format!("{bytes_per_host:.1}"));
    for p in &processes {
        row(
            p["name"].as_str().unwrap_or(""),
            format!("{} MiB {:.1} cpu-s", p["rss_bytes"].as_u64().unwrap_or(0) >> 20, p["cpu_s"].as_f64().unwrap_or(0.0)),
        );
    }
    row("ops-bench (client)", format!("{} MiB {:.1} cpu-s", client.0 >> 20, client.1));
    row("phases s", phases.done.iter().map(|(n, t)| format!("{n} {t:.1}")).collect::<Vec<_>>().join(", "));
    row("wall s (without steady, ceiling)", format!("{wall_s:.1} ({wall_core_s:.1})"));
    row("result", if ok { "ok".to_owned() } else { "FAILED".to_owned() });

    if let Some(path) = &cli.json {
        let report = json!({
            "hosts": cli.hosts,
            "agents": cli.agents,
            "mtls": cli.mtls,
            "enrollment": cli.enrollment,
            "ok": ok,
            "errors": errors,
            "wall_s": wall_s,
            "wall_core_s": wall_core_s,
            "phases_s": phases.done.iter().map(|(n, t)| (n.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
            "register": {
                "heartbeats_per_s": register.rate(),
                "p50_ms": register.percentile_ms(0.5),
                "p99_ms": register.percentile_ms(0.99),
                "max_ms": register.percentile_ms(1.0),
                "errors": register.errors,
                "held_hosts": held,
                "settled_s": settled_s,
            },
            "steady": steady.as_ref().map(steady::Steady::json),
            "ceiling": {
                "requests_per_s": ceiling.rate(),
                "requests": ceiling.requests,
                "relay_ratio": ratio,
                "server_cpu_us_per_request": per(ceiling_cpu_s, ceiling.requests),
                "relay_cpu_us_per_heartbeat": per(relay_cpu_s, relayed),
            },
            "rollout": rollout.as_ref().map(rollout::Rollout::json),
            "query": {
                "summary_p50_ms": pct(&summary_ms, 0.5),
                "summary_p99_ms": pct(&summary_ms, 0.99),
                "listing_s": listing_s,
                "listing_bytes": bytes,
                "listed_hosts": listed,
            },
            "meta": { "bytes_per_host": bytes_per_host },
            "processes": processes,
            "client": { "rss_bytes": client.0, "cpu_s": client.1 },
            "server_threads": cli.server_threads,
            "storm": storm.as_ref().map(storm::Storm::json),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("write {}", path.display()))?;
    }
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else if dir.exists() {
        // The processes' logs say why: kept for whoever reads the failure.
        eprintln!("the cluster's logs and data are kept in {}", dir.display());
    }
    Ok(ok)
}
