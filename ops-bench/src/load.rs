//! The simulated fleet's heartbeats: `connections` concurrent keep-alive clients, each host a
//! distinct hostname with its own agents, in the Go wire format (no Content-Type).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A simulated host's name: every tenth matches the bench config's `bj-web-` prefix.
pub fn hostname(i: u64) -> String {
    if i % 10 == 0 { format!("bj-web-{i:07}") } else { format!("dc{}-host-{i:07}", i % 4) }
}

/// The heartbeat of host `i`: `falcon-agent` at `version`, its other agents at the version the
/// bench's config gives them.
pub fn body(i: u64, agents: usize, version: &str) -> Vec<u8> {
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
            r#"{{"name":"{name}{}","version":"{}","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"}}"#,
            if a >= 4 { format!("-{a}") } else { String::new() },
            if a == 0 { version } else { VERSIONS[0] }
        ));
    }
    s.push_str("]}");
    s.into_bytes()
}

/// The versions of `falcon-agent` the bench's config names (default, prefix override, rollout).
pub const VERSIONS: [&str; 3] = ["5.1.3", "5.1.4", "5.1.5"];

/// The simulated fleet: each host runs the `falcon-agent` version it was last told
/// ("installed" at once), as an index into [`VERSIONS`].
pub struct Fleet {
    pub hosts: u64,
    pub agents: usize,
    running: Vec<AtomicU8>,
}

impl Fleet {
    pub fn new(hosts: u64, agents: usize) -> Arc<Fleet> {
        Arc::new(Fleet { hosts, agents, running: (0..hosts).map(|_| AtomicU8::new(0)).collect() })
    }

    fn body(&self, i: u64) -> Vec<u8> {
        body(i, self.agents, VERSIONS[usize::from(self.running[i as usize].load(Ordering::Relaxed))])
    }

    /// Installs what the reply says host `i` should run (a real reply parsed whole).
    fn adopt(&self, i: u64, reply: &[u8]) {
        let Ok(reply) = serde_json::from_slice::<ops_config::HeartbeatReply>(reply) else { return };
        if let Some(d) = reply.desired_agents.iter().find(|d| d.name == "falcon-agent")
            && let Some(v) = VERSIONS.iter().position(|v| *v == d.version)
        {
            self.running[i as usize].store(v as u8, Ordering::Relaxed);
        }
    }
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

/// Sends one heartbeat per host of `fleet` to `targets` (host i to target i % len), with
/// `connections` requests in flight, showing a progress bar; each host installs what it is told.
/// Stops early when `stop` is set.
pub async fn sweep(targets: &[SocketAddr], fleet: &Arc<Fleet>, connections: usize, label: &str, stop: &Arc<AtomicBool>) -> Run {
    let hosts = fleet.hosts;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bar = ProgressBar::new(hosts);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    let targets: Arc<Vec<SocketAddr>> = Arc::new(targets.to_vec());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..connections as u64 {
        let (done, errors, targets, fleet, stop) = (done.clone(), errors.clone(), targets.clone(), fleet.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity((hosts / connections as u64 + 1) as usize);
            // One keep-alive connection per target, reopened after an error.
            let mut conns: Vec<Option<Conn>> = targets.iter().map(|_| None).collect();
            let mut i = t;
            while i < hosts && !stop.load(Ordering::Relaxed) {
                let k = (i % targets.len() as u64) as usize;
                let t0 = Instant::now();
                let reply = post(&mut conns[k], targets[k], fleet.body(i)).await;
                let ok = reply.as_ref().is_some_and(|r| {
                    fleet.adopt(i, r);
                    true
                });
                lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += connections as u64;
            }
            lat
        }));
    }
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut latencies = Vec::with_capacity(hosts as usize);
    for t in tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    let seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    bar.set_position(done.load(Ordering::Relaxed));
    bar.finish();
    latencies.sort_unstable();
    Run { requests: done.load(Ordering::Relaxed), errors: errors.load(Ordering::Relaxed), seconds, latencies_us: latencies }
}

type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// One heartbeat over a keep-alive HTTP/1.1 connection (opened if needed); the body of a 2xx
/// reply, read whole. The bench uses hyper's client directly: it is the load generator, and a
/// heavier client would measure itself.
async fn post(conn: &mut Option<Conn>, addr: SocketAddr, body: Vec<u8>) -> Option<bytes::Bytes> {
    use http_body_util::BodyExt;
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = connect(addr).await;
    }
    let sender = conn.as_mut()?;
    if sender.ready().await.is_err() {
        *conn = None;
        return None;
    }
    let req = hyper::Request::post("/heartbeat")
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("a valid request");
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
