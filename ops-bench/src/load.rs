//! The simulated fleet's heartbeats: `connections` concurrent keep-alive clients, each host a
//! distinct hostname with its own agents, in the Go wire format (no Content-Type).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A simulated host's name: every tenth matches the bench config's `bj-web-` prefix.
pub fn hostname(i: u64) -> String {
    if i.is_multiple_of(10) { format!("bj-web-{i:07}") } else { format!("dc{}-host-{i:07}", i % 4) }
}

/// The heartbeat of host `i`: `falcon-agent` at `version` (with `lastError` when `failed`), its
/// other agents at the version the bench's config gives them.
pub fn body(i: u64, agents: usize, version: &str, failed: bool) -> Vec<u8> {
    let mut s = format!(
        r#"{{"hostname":"{}","ip":"10.{}.{}.{}","runUser":"root","updaterVersion":"0.1.0","realAgents":["#,
        hostname(i),
        i >> 16 & 255,
        i >> 8 & 255,
        i & 255
    );
    for a in 0..agents {
        if a > 0 {
            s.push(',');
        }
        let name = ["falcon-agent", "mysql-monitor", "naming-agent", "deploy-agent"][a % 4];
        s.push_str(&format!(
            r#"{{"name":"{name}{}","version":"{}","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"{}}}"#,
            if a >= 4 { format!("-{a}") } else { String::new() },
            if a == 0 { version } else { VERSIONS[0] },
            if a == 0 && failed {
                format!(r#","lastError":"install {}: md5 mismatch, kept {version}""#, VERSIONS[2])
            } else {
                String::new()
            }
        ));
    }
    s.push_str("]}");
    s.into_bytes()
}

/// The versions of `falcon-agent` the bench's config names (default, prefix override, rollout).
pub const VERSIONS: [&str; 3] = ["5.1.3", "5.1.4", "5.1.5"];

/// The simulated fleet. Each host runs the `falcon-agent` version it was last told, as an index
/// into [`VERSIONS`]; a host told a new version keeps reporting the old one until its install
/// is done (`install_delay` after it was told), as a real updater does.
pub struct Fleet {
    pub hosts: u64,
    pub agents: usize,
    install_delay_ms: u32,
    epoch: Instant,
    running: Vec<AtomicU8>,
    /// The version being installed (equal to `running` when nothing is).
    installing: Vec<AtomicU8>,
    /// Milliseconds after `epoch` when the install in progress is done.
    ready_ms: Vec<AtomicU32>,
    /// Per host: [`FAILED`] and [`TOUCHED`].
    flags: Vec<AtomicU8>,
    /// Hosts whose install of the rollout version fails, in basis points of the fleet.
    bad_build_bp: u64,
    /// With enrollment (`--enrollment`): the host key each host's credential is made with,
    /// as `POST /enroll` would have issued it (made per request: no 100 MB of credentials).
    keys: std::sync::OnceLock<Arc<ops_config::enroll::HostKeys>>,
}

/// The host's last install failed: it reports `lastError` and keeps its version.
const FAILED: u8 = 1;
/// The host was told the rollout version (`VERSIONS[2]`) at least once.
const TOUCHED: u8 = 2;

impl Fleet {
    /// A fleet of `hosts` at the first version; a share `bad_build_rate` of them (chosen by a
    /// hash of the host number) fail to install the rollout version.
    pub fn new(hosts: u64, agents: usize, install_delay: Duration, bad_build_rate: f64) -> Arc<Fleet> {
        let n = hosts as usize;
        Arc::new(Fleet {
            hosts,
            agents,
            install_delay_ms: u32::try_from(install_delay.as_millis()).unwrap_or(u32::MAX),
            epoch: Instant::now(),
            running: (0..n).map(|_| AtomicU8::new(0)).collect(),
            installing: (0..n).map(|_| AtomicU8::new(0)).collect(),
            ready_ms: (0..n).map(|_| AtomicU32::new(0)).collect(),
            flags: (0..n).map(|_| AtomicU8::new(0)).collect(),
            bad_build_bp: (bad_build_rate.clamp(0.0, 1.0) * 10_000.0).round() as u64,
            keys: std::sync::OnceLock::new(),
        })
    }

    /// Every host sends a host credential from now on (made with `keys`).
    pub fn enroll(&self, keys: Arc<ops_config::enroll::HostKeys>) {
        let _ = self.keys.set(keys);
    }

    /// Host `i`'s credential header, with enrollment.
    fn credential(&self, i: u64) -> Option<hyper::header::HeaderValue> {
        let keys = self.keys.get()?;
        hyper::header::HeaderValue::from_str(&keys.issue(&hostname(i), 1)).ok()
    }

    /// Whether host `i` fails the rollout version's install (a fixed pseudo-random choice).
    fn fails(&self, i: usize) -> bool {
        // splitmix64: host numbers are sequential, their hashes are not.
        let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % 10_000 < self.bad_build_bp
    }

    /// Hosts told the rollout version at least once (the blast radius of a bad build).
    pub fn touched(&self) -> u64 {
        self.flags.iter().filter(|f| f.load(Ordering::Relaxed) & TOUCHED != 0).count() as u64
    }

    fn now_ms(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u32::MAX)
    }

    /// The heartbeat host `i` sends now: its real state, with an install finished if its time
    /// has come. Only one request of a host is in flight at a time, so plain loads and stores do.
    fn body(&self, i: u64) -> Vec<u8> {
        let i = i as usize;
        let mut running = self.running[i].load(Ordering::Relaxed);
        let installing = self.installing[i].load(Ordering::Relaxed);
        if installing != running && self.now_ms() >= self.ready_ms[i].load(Ordering::Relaxed) {
            self.running[i].store(installing, Ordering::Relaxed);
            running = installing;
        }
        body(i as u64, self.agents, VERSIONS[usize::from(running)], self.flags[i].load(Ordering::Relaxed) & FAILED != 0)
    }

    /// Starts installing what the reply says host `i` should run (a real reply, parsed whole).
    fn adopt(&self, i: u64, reply: &[u8]) -> bool {
        let Ok(reply) = serde_json::from_slice::<Reply<'_>>(reply) else { return false };
        let i = i as usize;
        if let Some(d) = reply.desired_agents.iter().find(|d| d.name == "falcon-agent")
            && let Some(v) = VERSIONS.iter().position(|v| *v == d.version)
        {
            let v = v as u8;
            if v == 2 {
                self.flags[i].fetch_or(TOUCHED, Ordering::Relaxed);
                if self.fails(i) {
                    self.flags[i].fetch_or(FAILED, Ordering::Relaxed);
                    return reply.error_message.is_empty();
                }
            }
            self.flags[i].fetch_and(!FAILED, Ordering::Relaxed);
            if v != self.installing[i].load(Ordering::Relaxed) {
                self.installing[i].store(v, Ordering::Relaxed);
                if self.install_delay_ms == 0 {
                    self.running[i].store(v, Ordering::Relaxed);
                } else {
                    self.ready_ms[i].store(self.now_ms().saturating_add(self.install_delay_ms), Ordering::Relaxed);
                }
            }
        }
        reply.error_message.is_empty()
    }
}

/// The part of a heartbeat reply a simulated host acts on, borrowed from the body; every other
/// field is still parsed (and skipped), so a malformed reply is an error.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply<'a> {
    #[serde(borrow, default)]
    error_message: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    desired_agents: Vec<DesiredRef<'a>>,
}

#[derive(serde::Deserialize)]
struct DesiredRef<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    version: std::borrow::Cow<'a, str>,
}

/// What a run of requests gave.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Sorted latencies in microseconds.
    pub latencies_us: Vec<u32>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let idx = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[idx]) / 1000.0
    }
}

/// How a run spreads its heartbeats.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// One heartbeat per host, as fast as the targets take them.
    Sweep,
    /// Hosts in turn (0, 1, …, wrapping) at a fixed rate, as updaters on their interval do,
    /// until the stop flag is set.
    Paced { per_second: f64 },
}

/// A run's counters, readable while it runs, and its stop flag.
#[derive(Default)]
pub struct Live {
    /// Set to end a run early (a paced run ends only this way).
    pub stop: AtomicBool,
    pub done: AtomicU64,
    /// Heartbeats no target answered: what an updater would see after its own failover.
    pub errors: AtomicU64,
    /// Heartbeats answered by another target than the host's own (its relay did not answer).
    pub failovers: AtomicU64,
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live::default())
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }
}

/// Sends heartbeats of `fleet` to `targets` following `plan`, with `connections` requests in
/// flight, showing a progress bar; each host installs what it is told. Host i goes to target
/// i % len first, as an updater keeps its local relay, and to the next targets in turn when
/// that one does not answer, as the updater's `--server` list does. Stops early when
/// `live.stop` is set.
pub async fn run(targets: &[SocketAddr], fleet: &Arc<Fleet>, connections: usize, label: &str, plan: Plan, live: &Arc<Live>) -> Run {
    let hosts = fleet.hosts;
    let next = Arc::new(AtomicU64::new(0));
    let bar = match plan {
        Plan::Sweep => ProgressBar::new(hosts).with_style(
            ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        ),
        Plan::Paced { .. } => ProgressBar::no_length().with_style(
            ProgressStyle::with_template("{prefix:>9} {spinner} {pos} heartbeats {per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_prefix(label.to_owned());
    let targets: Arc<Vec<SocketAddr>> = Arc::new(targets.to_vec());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, live, targets, fleet) = (next.clone(), live.clone(), targets.clone(), fleet.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            // One keep-alive connection per target, reopened after an error.
            let mut conns: Vec<Option<Conn>> = targets.iter().map(|_| None).collect();
            while !live.stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let i = match plan {
                    Plan::Sweep if n >= hosts => break,
                    Plan::Sweep => n,
                    Plan::Paced { per_second } => {
                        let due = started + Duration::from_secs_f64(n as f64 / per_second);
                        tokio::time::sleep_until(due.into()).await;
                        if live.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        n % hosts
                    }
                };
                let own = (i % targets.len() as u64) as usize;
                let t0 = Instant::now();
                let body = bytes::Bytes::from(fleet.body(i));
                let credential = fleet.credential(i);
                let mut reply = None;
                for k in (0..targets.len()).map(|d| (own + d) % targets.len()) {
                    reply = post(&mut conns[k], targets[k], body.clone(), credential.clone()).await;
                    if reply.is_some() {
                        if k != own {
                            live.failovers.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                }
                let ok = reply.as_ref().is_some_and(|r| fleet.adopt(i, r));
                lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !ok {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                }
                live.done.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let start_done = live.done.load(Ordering::Relaxed);
    let start_errors = live.errors();
    let ticker = {
        let (bar, live) = (bar.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(live.done.load(Ordering::Relaxed) - start_done);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut latencies = Vec::with_capacity(if matches!(plan, Plan::Sweep) { hosts as usize } else { 0 });
    for t in tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    let seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    let requests = live.done.load(Ordering::Relaxed) - start_done;
    bar.set_position(requests);
    bar.finish();
    latencies.sort_unstable();
    Run { requests, errors: live.errors() - start_errors, seconds, latencies_us: latencies }
}

type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// One heartbeat over a keep-alive HTTP/1.1 connection (opened if needed); the body of a 2xx
/// reply, read whole. The bench uses hyper's client directly: it is the load generator, and a
/// heavier client would measure itself.
async fn post(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    body: bytes::Bytes,
    credential: Option<hyper::header::HeaderValue>,
) -> Option<bytes::Bytes> {
    use http_body_util::BodyExt;
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = connect(addr).await;
    }
    let sender = conn.as_mut()?;
    if sender.ready().await.is_err() {
        *conn = None;
        return None;
    }
    let mut req = hyper::Request::post("/heartbeat")
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Full::new(body))
        .expect("a valid request");
    if let Some(c) = credential {
        req.headers_mut().insert(ops_config::enroll::CREDENTIAL_HEADER, c);
    }
    let work = async {
        let res = sender.send_request(req).await.ok()?;
        let ok = res.status().is_success();
        let body = res.into_body().collect().await.ok()?.to_bytes();
        Some(ok.then_some(body))
    };
    match tokio::time::timeout(Duration::from_secs(30), work).await {
        Ok(Some(reply)) => reply,
        _ => {
            *conn = None;
            None
        }
    }
}

async fn connect(addr: SocketAddr) -> Option<Conn> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// Serves [`ceiling_server`], prints its address on standard output, and returns when
/// standard input closes: the ceiling process dies with the bench that started it.
pub async fn serve_ceiling_until_stdin_closes() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let addr = ceiling_server().await?;
    println!("{addr}");
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    Ok(())
}

/// A minimal hyper server answering every request with a canned heartbeat reply: the
/// machine's ceiling for this client.
pub async fn ceiling_server() -> anyhow::Result<SocketAddr> {
    use http_body_util::{BodyExt, Full};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reply = bytes::Bytes::from_static(
        br#"{"errorMessage":"","desiredAgents":[{"name":"falcon-agent","version":"5.1.3","tarball":"http://files/releases/falcon","md5":"","cmd":"start","runUser":"root","workDir":"/opt/ops","configFileName":"","configRemoteUrl":""}]}"#,
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let reply = reply.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let reply = reply.clone();
                    async move {
                        // Read the body, as a real server must.
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(reply)))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(addr)
}
