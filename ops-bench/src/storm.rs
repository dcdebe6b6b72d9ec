//! The download storm (`--storm`): K simulated hosts of each relay download one tarball of B
//! bytes at once, first through their relay's package cache, then straight from the origin
//! (a real nginx the bench starts, or `--storm-origin`). A heartbeat sweep runs beside each
//! pass and once without any download, so the report shows what serving packages costs the
//! heartbeat path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use ops_config::HeartbeatReply;
use serde_json::{Value, json};
use sha2::Digest;

use crate::cluster::{Cluster, usage};
use crate::load;

pub struct Settings {
    /// Downloads per relay.
    pub hosts_per_relay: usize,
    pub bytes: u64,
    /// An origin base URL serving `{base}/linux_amd64/storm-agent-1.0.tar.gz`; None: nginx.
    pub origin: Option<String>,
    pub connections: usize,
    /// Passes of each kind; the median by throughput is reported.
    pub rounds: usize,
}

/// The pass of median throughput.
fn median(mut passes: Vec<Pass>) -> Pass {
    passes.sort_by(|a, b| a.mb_per_s().total_cmp(&b.mb_per_s()));
    let errors: u64 = passes.iter().map(|p| p.errors).sum();
    let mut m = passes.swap_remove(passes.len() / 2);
    m.errors = errors;
    m
}

/// One pass of downloads.
#[derive(Debug, Default)]
pub struct Pass {
    pub downloads: u64,
    pub errors: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Sorted seconds per download.
    pub each_s: Vec<f64>,
    /// Requests for the file the origin saw in this pass (own nginx only).
    pub origin_requests: Option<u64>,
    /// Heartbeats/s of the sweep that ran beside the downloads.
    pub heartbeats_per_s: f64,
    pub heartbeat_errors: u64,
    /// Largest RSS of any relay during the pass.
    pub relay_rss_max: u64,
}

impl Pass {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }

    pub fn percentile_s(&self, p: f64) -> f64 {
        if self.each_s.is_empty() {
            return 0.0;
        }
        self.each_s[((self.each_s.len() as f64 - 1.0) * p).round() as usize]
    }

    fn json(&self) -> Value {
        json!({
            "downloads": self.downloads,
            "errors": self.errors,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s(),
            "p50_s": self.percentile_s(0.5),
            "p99_s": self.percentile_s(0.99),
            "origin_requests": self.origin_requests,
            "heartbeats_per_s": self.heartbeats_per_s,
            "heartbeat_errors": self.heartbeat_errors,
            "relay_rss_max_bytes": self.relay_rss_max,
        })
    }
}

pub struct Storm {
    pub relays: usize,
    pub bytes: u64,
    /// Heartbeats/s of a sweep with no download running.
    pub quiet_heartbeats_per_s: f64,
    pub via_relays: Pass,
    pub direct: Pass,
    /// Origin fetches each relay's cache made (its `miss` count).
    pub relay_misses: Vec<f64>,
}

impl Storm {
    pub fn ok(&self) -> bool {
        self.via_relays.errors == 0 && self.direct.errors == 0 && self.relay_misses.iter().all(|&m| m == 1.0)
    }

    pub fn json(&self) -> Value {
        json!({
            "relays": self.relays,
            "file_bytes": self.bytes,
            "quiet_heartbeats_per_s": self.quiet_heartbeats_per_s,
            "via_relays": self.via_relays.json(),
            "direct": self.direct.json(),
            "relay_misses": self.relay_misses,
            "relay_vs_origin_throughput": self.via_relays.mb_per_s() / self.direct.mb_per_s().max(1e-9),
        })
    }
}

/// A real nginx serving `root` (sendfile on, one worker, as deployed), killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Nginx {
    /// Starts nginx on a reserved port; once more on a new one when another program took it.
    fn start(dir: &Path, root: &Path) -> anyhow::Result<Nginx> {
        match Nginx::start_once(dir, root) {
            Err(e) if ops_loopback::is_addr_in_use(&format!("{e:#}")) => {
                eprintln!("ops-bench: nginx's port was taken by another program; starting it once more on a new port: {e:#}");
                Nginx::start_once(dir, root)
            }
            other => other,
        }
    }

    fn start_once(dir: &Path, root: &Path) -> anyhow::Result<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("nginx is not installed (apt-get install -y nginx-light), or give --storm-origin URL")?;
        let port = ops_loopback::reserve().context("reserve a loopback port for nginx")?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log {d}/access.log;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  default_type application/octet-stream;\n\
               server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    root {root};\n  }}\n}}\n",
            root = root.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut child = Command::new(bin)
            .args(["-c", &conf_path.display().to_string(), "-p", &d.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start nginx")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("nginx exited ({status}): {}", std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
            }
            if Instant::now() > deadline {
                bail!("nginx did not start: {}", std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nginx { child, port, log: dir.join("access.log") })
    }

    fn requests(&self, path: &str) -> u64 {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|l| l.split('"').nth(1).and_then(|r| r.split(' ').nth(1)) == Some(path)).count() as u64
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FILE: &str = "linux_amd64/storm-agent-1.0.tar.gz";

/// Incompressible bytes (a xorshift stream), so nothing on the way can shrink them.
fn filler(len: u64) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// Runs the storm against the bench's own cluster (its relays must have a package cache).
pub async fn run(
    s: &Settings,
    c: &Cluster,
    dir: &Path,
    agents_toml: &str,
    fleet: &Arc<load::Fleet>,
    client: &reqwest::Client,
) -> anyhow::Result<Storm> {
    // The origin and the file's digest.
    let (nginx, base, sha256) = match &s.origin {
        Some(base) => {
            let base = base.trim_end_matches('/').to_owned();
            let body = client.get(format!("{base}/{FILE}")).send().await?.error_for_status()?.bytes().await?;
            let sha = ops_config::hex(&sha2::Sha256::digest(&body));
            (None, base, sha)
        }
        None => {
            let root = dir.join("storm-origin");
            let path = root.join("pkg").join(FILE);
            std::fs::create_dir_all(path.parent().context("parent")?)?;
            let bytes = filler(s.bytes);
            let sha = ops_config::hex(&sha2::Sha256::digest(&bytes));
            std::fs::write(&path, &bytes)?;
            drop(bytes);
            let nginx_dir = dir.join("storm-nginx");
            std::fs::create_dir_all(&nginx_dir)?;
            let (d, r) = (nginx_dir.clone(), root.clone());
            let nginx = tokio::task::spawn_blocking(move || Nginx::start(&d, &r)).await??;
            let base = format!("http://127.0.0.1:{}/pkg", nginx.port);
            (Some(nginx), base, sha)
        }
    };
    // (reqwest's content_length() is the body's, 0 for a HEAD: read the header.)
    let head = client.head(format!("{base}/{FILE}")).send().await?.error_for_status()?;
    let bytes = head
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .context("the origin gives no Content-Length for the storm file")?;

    // The agent, cached by relays, in every meta node's config.
    let toml = format!(
        "{agents_toml}\n[[agent]]\nname = \"storm-agent\"\ntarball = \"{base}\"\nrun_user = \"root\"\nwork_dir = \"/opt/ops\"\n\
         relay_cache = true\ndefault = {{ version = \"1.0\", sha256 = \"{sha256}\", cmd = \"start\" }}\n"
    );
    std::fs::write(&c.agents_file, &toml)?;
    let token = std::fs::read_to_string(&c.token_file)?;
    let reload = client.get(crate::cluster::meta_url(c.metas[0].addr, "/config/reload?all=1")).bearer_auth(token.trim()).send().await?;
    anyhow::ensure!(reload.status().is_success(), "reload all: {}", reload.text().await.unwrap_or_default());
    // Each relay's URL for the file, from its own reply once it has the new config.
    let relays: Vec<SocketAddr> = c.relays.iter().map(|r| r.addr).collect();
    let mut relay_urls = Vec::new();
    for r in &relays {
        relay_urls.push(relay_url(client, *r).await?);
    }

    let quiet = heartbeats_for(&relays, fleet, s.connections, Duration::from_secs(5)).await;
    println!("storm: heartbeats with no download {:.0}/s", quiet.rate());

    // Rounds of (through the relays, straight from the origin), alternated so both see the
    // same box; the median round of each by throughput is reported. Only the first round
    // through the relays can miss: the origin requests are counted over all rounds.
    let urls: Vec<String> = relay_urls.iter().flat_map(|u| std::iter::repeat_n(u.clone(), s.hosts_per_relay)).collect();
    let direct_urls: Vec<String> = std::iter::repeat_n(format!("{base}/{FILE}"), urls.len()).collect();
    let path = format!("/pkg/{FILE}");
    let (mut vias, mut directs) = (Vec::new(), Vec::new());
    let (mut via_origin, mut direct_origin) = (0, 0);
    for round in 0..s.rounds.max(1) {
        let before = nginx.as_ref().map_or(0, |n| n.requests(&path));
        vias.push(pass(&format!("via relays {}", round + 1), &urls, bytes, c, &relays, fleet, s.connections).await);
        let middle = nginx.as_ref().map_or(0, |n| n.requests(&path));
        directs.push(pass(&format!("direct {}", round + 1), &direct_urls, bytes, c, &relays, fleet, s.connections).await);
        via_origin += middle - before;
        direct_origin += nginx.as_ref().map_or(0, |n| n.requests(&path)) - middle;
    }
    let (mut via, mut direct) = (median(vias), median(directs));
    via.origin_requests = nginx.as_ref().map(|_| via_origin);
    direct.origin_requests = nginx.as_ref().map(|_| direct_origin);
    let mut relay_misses = Vec::new();
    for r in &relays {
        let text = client.get(format!("http://{r}/metrics")).send().await?.text().await?;
        let misses = ops_config::prom::series(&text, r#"ops_relay_cache_requests_total{result="miss"}"#).unwrap_or(0.0);
        relay_misses.push(misses);
    }

    // Back to the bench's config.
    std::fs::write(&c.agents_file, agents_toml)?;
    let _ = client.get(crate::cluster::meta_url(c.metas[0].addr, "/config/reload?all=1")).bearer_auth(token.trim()).send().await;
    Ok(Storm { relays: relays.len(), bytes, quiet_heartbeats_per_s: quiet.rate(), via_relays: via, direct, relay_misses })
}

/// The file's URL as relay `r` answers it, waiting (up to 30 s) for the relay to take the
/// config with the storm agent.
async fn relay_url(client: &reqwest::Client, r: SocketAddr) -> anyhow::Result<String> {
    let body = r#"{"hostname":"storm-probe","ip":"127.0.0.1","updaterVersion":"0.1.0","realAgents":[]}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply: HeartbeatReply = client.post(format!("http://{r}/heartbeat")).body(body).send().await?.json().await?;
        if let Some(tarball) = reply.desired_agents.iter().find(|d| d.name == "storm-agent").map(|d| d.tarball.as_str()) {
            anyhow::ensure!(tarball.contains("/pkg/"), "relay {r} answers the origin, not its cache: {tarball}");
            return Ok(format!("{tarball}/{FILE}"));
        }
        anyhow::ensure!(Instant::now() < deadline, "relay {r} never took the storm config");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A heartbeat sweep over the relays for `how_long` (or until `stop` is set).
async fn heartbeats_for(relays: &[SocketAddr], fleet: &Arc<load::Fleet>, connections: usize, how_long: Duration) -> load::Run {
    let live = load::Live::new();
    let l = live.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(how_long).await;
        l.stop.store(true, Ordering::Relaxed);
    });
    let run = load::run(relays, fleet, connections, "storm hb", load::Plan::Sweep, &live).await;
    timer.abort();
    run
}

/// Every URL downloaded at once (one task each), with a heartbeat sweep beside it and the
/// relays' RSS sampled.
async fn pass(
    label: &str,
    urls: &[String],
    bytes: u64,
    c: &Cluster,
    relays: &[SocketAddr],
    fleet: &Arc<load::Fleet>,
    connections: usize,
) -> Pass {
    // A client of its own: one connection per download, as separate hosts would have.
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).timeout(Duration::from_secs(600)).build();
    let Ok(client) = client else { return Pass { errors: urls.len() as u64, ..Pass::default() } };
    let pids: Vec<u32> = c.relays.iter().map(|r| r.pid()).collect();
    let hb_live = load::Live::new();
    let hb = {
        let (relays, fleet, live) = (relays.to_vec(), fleet.clone(), hb_live.clone());
        tokio::spawn(async move { load::run(&relays, &fleet, connections, "storm hb", load::Plan::Sweep, &live).await })
    };
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pids, sampling) = (pids.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut max = 0u64;
            while sampling.load(Ordering::Relaxed) {
                max = max.max(pids.iter().filter_map(|p| usage(*p).map(|u| u.0)).max().unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            max
        })
    };
    let start = Instant::now();
    let tasks: Vec<_> = urls
        .iter()
        .map(|url| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let Ok(r) = client.get(&url).send().await else { return None };
                if !r.status().is_success() {
                    return None;
                }
                let mut got = 0u64;
                let mut stream = r.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    got += chunk.ok()?.len() as u64;
                }
                (got == bytes).then(|| t.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut out = Pass::default();
    for t in tasks {
        match t.await.ok().flatten() {
            Some(s) => {
                out.downloads += 1;
                out.bytes += bytes;
                out.each_s.push(s);
            }
            None => out.errors += 1,
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    hb_live.stop.store(true, Ordering::Relaxed);
    sampling.store(false, Ordering::Relaxed);
    let hb = hb.await.unwrap_or_default();
    out.heartbeats_per_s = hb.rate();
    out.heartbeat_errors = hb.errors;
    out.relay_rss_max = sampler.await.unwrap_or(0);
    out.each_s.sort_by(f64::total_cmp);
    println!(
        "storm {label}: {} downloads of {} MiB in {:.1} s = {:.0} MB/s, p50 {:.2} s, p99 {:.2} s, errors {}; heartbeats beside it {:.0}/s",
        out.downloads,
        bytes >> 20,
        out.seconds,
        out.mb_per_s(),
        out.percentile_s(0.5),
        out.percentile_s(0.99),
        out.errors,
        out.heartbeats_per_s
    );
    out
}
