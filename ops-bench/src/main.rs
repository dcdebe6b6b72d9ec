//! `ops-bench`: a simulated fleet against a real ops fleet cluster.
//!
//! With no target flags it starts its own cluster from the release binaries built beside it
//! (`--meta 3 --relays 2`), runs the phases, prints a report and stops what it started (also on
//! ctrl-c). Phases in this version: register (one sweep of every host), query (summary from
//! every meta node, the full text listing), ceiling (the same client against a minimal hyper
//! server). Exit status 1 when a heartbeat failed or the listing missed hosts.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;

mod cluster;
mod load;

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

async fn bench(cli: Cli) -> anyhow::Result<bool> {
    let wall = Instant::now();
    let own = cli.relay.is_empty();
    let dir = std::env::temp_dir().join(format!("ops-bench-{}", std::process::id()));
    let cluster = if own {
        eprintln!("starting {} meta nodes and {} relays from the release binaries ...", cli.meta, cli.relays);
        let dir = dir.clone();
        let (m, r) = (cli.meta, cli.relays);
        Some(tokio::task::spawn_blocking(move || cluster::Cluster::start(&dir, m, r, AGENTS_TOML, 1000)).await??)
    } else {
        None
    };
    let relays: Vec<SocketAddr> = cluster.as_ref().map_or(cli.relay.clone(), |c| c.relays.iter().map(|r| r.addr).collect());
    let metas: Vec<SocketAddr> = cluster.as_ref().map_or(cli.meta_addr.clone(), |c| c.metas.iter().map(|m| m.addr).collect());
    anyhow::ensure!(!relays.is_empty() && !metas.is_empty(), "need at least one relay and one meta node (--relay, --meta-addr)");
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build()?;
    let baseline: Vec<(String, u64)> = cluster
        .as_ref()
        .map(|c| c.metas.iter().map(|m| (m.name.clone(), cluster::usage(m.pid()).map_or(0, |u| u.0))).collect())
        .unwrap_or_default();

    // 1. register: one sweep of every host.
    let fleet = load::Fleet::new(cli.hosts, cli.agents);
    let never = Arc::new(AtomicBool::new(false));
    let register = load::sweep(&relays, &fleet, cli.connections, "register", &never).await;
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
    let summary_url = format!("http://{}/status/summary/falcon-agent", metas[0]);
    let settle = Instant::now();
    let mut held = 0;
    while settle.elapsed() < Duration::from_secs(120) {
        held = get_json(&client, &summary_url).await?["hosts"].as_u64().unwrap_or(0);
        if held >= cli.hosts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("settled: {held} hosts held by the cluster {:.1} s after the sweep", settle.elapsed().as_secs_f64());

    // 3. rollout: a new default version on every meta node; sweeps until every host runs what
    // it should, the convergence read from /status/summary.
    let rollout = match &cluster {
        Some(c) if !cli.no_rollout => Some(rollout(c, &relays, &fleet, &client, &summary_url, cli.connections).await?),
        _ => None,
    };

    // 4. query: summary from every meta node, then the whole text listing.
    let mut summary_ms = Vec::new();
    for m in &metas {
        for _ in 0..20 {
            let t = Instant::now();
            get_json(&client, &format!("http://{m}/status/summary/falcon-agent")).await?;
            summary_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    summary_ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    let t = Instant::now();
    let resp = client.get(format!("http://{}/status/text/falcon-agent", metas[0])).send().await?;
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

    // Resources, before the ceiling phase adds its own load.
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
    let base_rss: u64 = baseline.iter().map(|b| b.1).sum();
    let bytes_per_host = if cluster.is_some() && cli.hosts > 0 { meta_rss.saturating_sub(base_rss) as f64 / cli.hosts as f64 } else { 0.0 };

    // 5. ceiling: the same client against a minimal hyper server.
    let ceiling_addr = load::ceiling_server().await?;
    let ceiling_n = cli.hosts.min(300_000);
    let ceiling = load::sweep(&[ceiling_addr], &load::Fleet::new(ceiling_n, cli.agents), cli.connections, "ceiling", &never).await;
    println!(
        "ceiling: {:.0} requests/s (minimal hyper server, same client); relay rate = {:.2} x ceiling",
        ceiling.rate(),
        register.rate() / ceiling.rate().max(1.0)
    );

    let errors = register.errors + rollout.as_ref().map_or(0, |r| r.errors);
    let rollout_done = rollout.as_ref().is_none_or(|r| r.converged_s.iter().all(|(_, t)| t.is_some()));
    let ok = errors == 0 && listed == cli.hosts && rollout_done;
    println!();
    println!("{:<28} {:>14}", "figure", "value");
    println!("{:<28} {:>14}", "hosts", cli.hosts);
    println!("{:<28} {:>14}", "errors", errors);
    println!("{:<28} {:>14.0}", "register heartbeats/s", register.rate());
    println!("{:<28} {:>14.2}", "register p99 ms", register.percentile_ms(0.99));
    println!("{:<28} {:>14.0}", "ceiling requests/s", ceiling.rate());
    if let Some(r) = &rollout {
        for (p, t) in &r.converged_s {
            println!("{:<28} {:>14}", format!("rollout {p}% converged s"), t.map_or("-".to_owned(), |t| format!("{t:.1}")));
        }
    }
    println!("{:<28} {:>14.1}", "summary p99 ms", pct(&summary_ms, 0.99));
    println!("{:<28} {:>14.2}", "listing s", listing_s);
    println!("{:<28} {:>14}", "listed hosts", listed);
    println!("{:<28} {:>14.1}", "meta bytes/host", bytes_per_host);
    for p in &processes {
        println!(
            "{:<28} {:>9} MiB {:>6.1} cpu-s",
            p["name"].as_str().unwrap_or(""),
            p["rss_bytes"].as_u64().unwrap_or(0) >> 20,
            p["cpu_s"].as_f64().unwrap_or(0.0)
        );
    }
    let wall_s = wall.elapsed().as_secs_f64();
    println!("{:<28} {:>14.1}", "wall s", wall_s);

    if let Some(path) = &cli.json {
        let report = json!({
            "hosts": cli.hosts,
            "agents": cli.agents,
            "errors": errors,
            "wall_s": wall_s,
            "register": {
                "heartbeats_per_s": register.rate(),
                "p50_ms": register.percentile_ms(0.5),
                "p99_ms": register.percentile_ms(0.99),
                "max_ms": register.percentile_ms(1.0),
                "errors": register.errors,
            },
            "ceiling": { "requests_per_s": ceiling.rate(), "requests": ceiling.requests },
            "rollout": rollout.as_ref().map(|r| json!({
                "converged_s": r.converged_s.iter().map(|(p, t)| (p.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
                "heartbeats": r.heartbeats,
                "errors": r.errors,
            })),
            "query": {
                "summary_p50_ms": pct(&summary_ms, 0.5),
                "summary_p99_ms": pct(&summary_ms, 0.99),
                "listing_s": listing_s,
                "listed_hosts": listed,
            },
            "meta": { "bytes_per_host": bytes_per_host },
            "processes": processes,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("write {}", path.display()))?;
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ok)
}

struct Rollout {
    /// Seconds from the reload to 50/90/99/100 % of the fleet converged (None: not reached).
    converged_s: Vec<(u32, Option<f64>)>,
    heartbeats: u64,
    errors: u64,
}

/// Changes falcon-agent's default version in the config every meta node reads, reloads all,
/// and sweeps the fleet until the summary shows every host converged (or two minutes pass).
async fn rollout(
    c: &cluster::Cluster,
    relays: &[SocketAddr],
    fleet: &Arc<load::Fleet>,
    client: &reqwest::Client,
    summary_url: &str,
    connections: usize,
) -> anyhow::Result<Rollout> {
    let new = AGENTS_TOML.replacen(
        &format!("version = \"{}\", md5 = \"490ac172dabecc867289079d48e84a66\"", load::VERSIONS[0]),
        &format!("version = \"{}\", md5 = \"\"", load::VERSIONS[2]),
        1,
    );
    std::fs::write(&c.agents_file, new)?;
    let token = std::fs::read_to_string(&c.token_file)?;
    let start = Instant::now();
    let reload = client.get(format!("http://{}/config/reload?all=1", c.metas[0].addr)).bearer_auth(token.trim()).send().await?;
    anyhow::ensure!(reload.status().is_success(), "reload all: {}", reload.text().await.unwrap_or_default());
    let targets = [50u32, 90, 99, 100];
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (client, url, stop) = (client.clone(), summary_url.to_owned(), stop.clone());
        tokio::spawn(async move {
            let mut reached: Vec<(u32, Option<f64>)> = targets.iter().map(|&p| (p, None)).collect();
            while start.elapsed() < Duration::from_secs(120) {
                if let Ok(r) = client.get(&url).send().await
                    && let Ok(v) = r.json::<serde_json::Value>().await
                {
                    let ratio = v["convergedRatio"].as_f64().unwrap_or(0.0);
                    // The ratio counts hosts already told the new version only after the
                    // desired side changed: wait until the summary shows the new version desired.
                    let new_desired = v["desired"].as_array().is_some_and(|d| d.iter().any(|x| x["version"] == load::VERSIONS[2]));
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
        let run = load::sweep(relays, fleet, connections, "rollout", &stop).await;
        heartbeats += run.requests;
        errors += run.errors;
    }
    let converged_s = poller.await?;
    let show: Vec<String> =
        converged_s.iter().map(|(p, t)| format!("{p}%: {}", t.map_or("-".to_owned(), |t| format!("{t:.1} s")))).collect();
    println!(
        "rollout: {} -> {} converged {} ({heartbeats} heartbeats, {errors} errors)",
        load::VERSIONS[0],
        load::VERSIONS[2],
        show.join(", ")
    );
    Ok(Rollout { converged_s, heartbeats, errors })
}
