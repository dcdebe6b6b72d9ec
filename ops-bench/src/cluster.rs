//! Starting a cluster of the real binaries (built beside ops-bench) on loopback, and stopping
//! it again: on drop, so also on ctrl-c and on errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One process the bench started.
pub struct Started {
    pub name: String,
    pub addr: SocketAddr,
    /// It serves HTTPS (a meta node under `--mtls`).
    tls: bool,
    child: Child,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Started {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would: no snapshot, no drain.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again with the same flags (after [`Started::kill`]) and waits until
    /// it answers `/health`.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.respawn()?;
        self.wait_ready()
    }

    /// Starts the process again with the same flags, without waiting.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.bin, &self.name, &self.args, &self.log)?;
        Ok(())
    }

    /// Waits until the process answers `/health` with 200.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        wait_health(self.addr, self.tls)
    }

    /// Waits for a first start: `/health` answers 200, or the process exited, which is an
    /// error with the end of its log (a port taken by another program says "Address already
    /// in use" there: [`ops_loopback::is_addr_in_use`]).
    fn wait_started(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                bail!("{} exited ({status}) before answering /health on {}: {tail}", self.name, self.addr);
            }
            if health_ok(self.addr, self.tls) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not answer /health on {} within 30 s", self.name, self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`...).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).stderr(Stdio::null()).status();
    }

    /// SIGTERM, then waits for the exit (a meta node writes its snapshot, a relay drains);
    /// SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.signal("TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Started {
    fn terminate(&self) {
        // A stopped process (SIGSTOP) would never see the TERM.
        self.signal("CONT");
        self.signal("TERM");
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // SIGTERM first so relays drain and meta nodes snapshot, then make sure.
        self.signal("CONT");
        self.stop(Duration::from_secs(10));
    }
}

/// Under `--mtls`: the cluster CA the bench made (`opsctl ca init` in `{dir}/ca`), which
/// issues every node's and relay's certificate and which the bench's own clients trust.
struct Mtls {
    ca_dir: PathBuf,
    opsctl: PathBuf,
    client: std::sync::Arc<rustls::ClientConfig>,
}

static MTLS: std::sync::OnceLock<Mtls> = std::sync::OnceLock::new();

/// The host key file every meta node and relay started checks credentials with (`--enrollment`).
static HOST_KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Turns enrollment on for the cluster started next: writes a host key into `dir` (what
/// `opsctl host-key` writes) and gives it to every meta node and relay (`--host-key-file`).
/// Returns the keys, which the simulated updaters sign their hostnames with.
pub fn enable_enrollment(dir: &Path) -> anyhow::Result<std::sync::Arc<ops_config::enroll::HostKeys>> {
    use sha2::Digest;
    std::fs::create_dir_all(dir)?;
    let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
    let key: [u8; 32] = sha2::Sha256::digest(seed.as_bytes()).into();
    let path = dir.join("host.keys");
    let text = ops_config::enroll::HostKeys::file_text(&key);
    ops_config::disk::write_private(&path, text.as_bytes())?;
    let keys = ops_config::enroll::HostKeys::parse(&text, &path.display().to_string())?;
    HOST_KEY.set(path).map_err(|_| anyhow::anyhow!("enrollment enabled twice"))?;
    Ok(std::sync::Arc::new(keys))
}

/// Makes the cluster CA in `dir/ca` and turns `mtls = true` on for the cluster started next:
/// meta nodes serve HTTPS with certificates naming them (and 127.0.0.1), relays show theirs
/// to the meta nodes (`--identity-cert`) and still serve the simulated updaters plain HTTP.
pub fn enable_mtls(dir: &Path) -> anyhow::Result<()> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    std::fs::create_dir_all(dir)?;
    build_siblings()?;
    let opsctl = sibling("opsctl")?;
    let ca_dir = dir.join("ca");
    let _ = std::fs::remove_dir_all(&ca_dir);
    run_opsctl(&opsctl, &["ca", "init", "--dir", &ca_dir.display().to_string()])?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_dir.join("ca.pem")).context("ca.pem")? {
        roots.add(c.context("ca.pem")?)?;
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    MTLS.set(Mtls { ca_dir, opsctl, client: std::sync::Arc::new(client) }).map_err(|_| anyhow::anyhow!("mtls enabled twice"))
}

fn run_opsctl(opsctl: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(opsctl).args(args).stdin(Stdio::null()).output().context("run opsctl")?;
    anyhow::ensure!(out.status.success(), "opsctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// The flags giving process `id` its certificate under `--mtls` (issued on first use),
/// none otherwise.
fn identity_args(id: &str) -> anyhow::Result<Vec<String>> {
    let Some(m) = MTLS.get() else { return Ok(Vec::new()) };
    let (cert, key) = (m.ca_dir.join(format!("{id}.pem")), m.ca_dir.join(format!("{id}.key")));
    let relay = !id.starts_with("meta-");
    if !cert.exists() {
        let kind = if relay { "--relay" } else { "--node" };
        run_opsctl(&m.opsctl, &["ca", "issue", "--dir", &m.ca_dir.display().to_string(), kind, id, "--san", "127.0.0.1"])?;
    }
    let (c, k) = if relay { ("--identity-cert", "--identity-key") } else { ("--tls-cert", "--tls-key") };
    Ok(vec![c.into(), cert.display().to_string(), k.into(), key.display().to_string()])
}

/// The URL of `path` on the meta node at `addr`: HTTPS under `--mtls`.
pub fn meta_url(addr: impl std::fmt::Display, path: &str) -> String {
    format!("{}://{addr}{path}", if MTLS.get().is_some() { "https" } else { "http" })
}

/// A client builder for the meta nodes: trusting the bench's CA under `--mtls`.
pub fn client_builder() -> anyhow::Result<reqwest::ClientBuilder> {
    let b = reqwest::Client::builder().no_proxy();
    let Some(m) = MTLS.get() else { return Ok(b) };
    let ca = reqwest::Certificate::from_pem(&std::fs::read(m.ca_dir.join("ca.pem"))?)?;
    Ok(b.add_root_certificate(ca))
}

/// The head of every `cluster.toml` the bench writes.
fn map_head() -> String {
    let tls = if MTLS.get().is_some() { "tls = true\nmtls = true\nca_file = \"ca/ca.pem\"\n" } else { "" };
    format!("vnodes = 1000\ntoken_file = \"cluster.token\"\n{tls}")
}

/// A cluster the bench owns.
pub struct Cluster {
    pub metas: Vec<Started>,
    pub relays: Vec<Started>,
    /// The desired config every meta node reads (the rollout phase rewrites it).
    pub agents_file: PathBuf,
    pub token_file: PathBuf,
    /// The cluster map every node started with (`--grow-meta` rewrites it).
    pub cluster_file: PathBuf,
    dir: PathBuf,
    meta_bin: PathBuf,
    /// Flags of every meta node besides id, port, map and data dir.
    meta_extra: Vec<String>,
    threads: Option<usize>,
}

/// A port for a process that must be named in the map before it starts: never one that
/// another pick of this or another process (a test that runs ops-bench) can be handed, and
/// below the ephemeral range (see `ops_loopback`).
fn reserved_port() -> anyhow::Result<u16> {
    ops_loopback::reserve().context("reserve a loopback port")
}

/// The binaries built beside this one (`target/release/`).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("exe dir")?.join(name);
    if !path.exists() {
        bail!("{} not found: build it with `cargo build --release -p meta-node -p relay -p opsctl`", path.display());
    }
    Ok(path)
}

/// Under `cargo run` (cargo passes its own path in `CARGO`), builds the meta node and relay
/// binaries beside this one with the same profile first, so `cargo run --release -p ops-bench`
/// works on a fresh clone and never starts stale servers. A no-op when they are up to date.
///
/// Only under `cargo run` of this package: a test (or any program run by cargo) that starts
/// ops-bench passes its own `CARGO` on, and has built the binaries already. The variables cargo
/// sets for the process it runs are left out of the build's environment: ring's build script
/// tracks `CARGO_MANIFEST_DIR`, and a value that differs from a shell's rebuilt the TLS stack
/// and relinked every binary on each start (50 s of every bench test).
fn build_siblings() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else { return Ok(()) };
    if std::env::var_os("CARGO_MANIFEST_DIR").is_none_or(|d| d != env!("CARGO_MANIFEST_DIR")) {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let release = exe.parent().is_some_and(|d| d.ends_with("release"));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "meta-node", "-p", "relay", "-p", "opsctl"]).current_dir(workspace);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE"].iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("run cargo build for the meta node and relay")?;
    anyhow::ensure!(status.success(), "cargo build -p meta-node -p relay -p opsctl failed");
    Ok(())
}

/// Whether `GET /health` on `addr` answers 200 (over TLS trusting the bench's CA with `tls`).
fn health_ok(addr: SocketAddr, tls: bool) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    match MTLS.get().filter(|_| tls) {
        Some(m) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let Ok(mut conn) = rustls::ClientConnection::new(m.client.clone(), name) else { return false };
            health_over(&mut rustls::Stream::new(&mut conn, &mut s))
        }
        None => health_over(&mut s),
    }
}

fn health_over(s: &mut (impl std::io::Read + std::io::Write)) -> bool {
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    // A TLS server may close without close_notify: what was read counts.
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out.starts_with(b"HTTP/1.1 200")
}

fn wait_health(addr: SocketAddr, tls: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if health_ok(addr, tls) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not answer /health within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(bin: &Path, name: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {name}"))
}

impl Drop for Cluster {
    /// Relays first, so their last reports reach the meta nodes before those snapshot; each
    /// group is signalled at once, then waited for.
    fn drop(&mut self) {
        for group in [&mut self.relays, &mut self.metas] {
            for p in group.iter() {
                p.terminate();
            }
            group.clear();
        }
    }
}

impl Cluster {
    /// Writes configs into `dir` and starts `metas` meta nodes and `relays` relays. Their
    /// ports are reserved (no other pick can be handed them); when another program took one
    /// all the same, the cluster is started once more on new ports, and stderr says why.
    pub fn start(
        dir: &Path,
        metas: usize,
        relays: usize,
        agents_toml: &str,
        flush_ms: u64,
        threads: Option<usize>,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        build_siblings()?;
        match Cluster::start_once(dir, metas, relays, agents_toml, flush_ms, threads) {
            Err(e) if ops_loopback::is_addr_in_use(&format!("{e:#}")) => {
                eprintln!("ops-bench: a port of the cluster was taken by another program; starting it once more on new ports: {e:#}");
                // Data written under the old map would name the old addresses.
                for entry in std::fs::read_dir(dir)?.flatten() {
                    // The CA (`--mtls`) names no address.
                    if entry.path().is_dir() && entry.file_name() != "ca" {
                        std::fs::remove_dir_all(entry.path())?;
                    }
                }
                Cluster::start_once(dir, metas, relays, agents_toml, flush_ms, threads)
            }
            other => other,
        }
    }

    fn start_once(
        dir: &Path,
        metas: usize,
        relays: usize,
        agents_toml: &str,
        flush_ms: u64,
        threads: Option<usize>,
    ) -> anyhow::Result<Cluster> {
        let (meta_bin, relay_bin) = (sibling("meta-node")?, sibling("relay")?);
        let token: String = format!("bench-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos()) + "-0123456789abcdef";
        std::fs::write(dir.join("cluster.token"), token)?;
        let agents_file = dir.join("agents.toml");
        std::fs::write(&agents_file, agents_toml)?;
        let mut ports = Vec::new();
        let mut toml = map_head();
        for i in 0..metas {
            let port = reserved_port()?;
            ports.push(port);
            toml.push_str(&format!("[[node]]\nid = \"meta-{}\"\naddr = \"127.0.0.1:{port}\"\n", i + 1));
        }
        let cluster_file = dir.join("cluster.toml");
        std::fs::write(&cluster_file, toml)?;
        let meta_extra: Vec<String> = vec![
            "--agents".into(),
            agents_file.display().to_string(),
            "--snapshot-interval-seconds".into(),
            "3600".into(),
            "--rollout-interval-ms".into(),
            "1000".into(),
        ];
        let mut out = Cluster {
            metas: Vec::new(),
            relays: Vec::new(),
            agents_file: agents_file.clone(),
            token_file: dir.join("cluster.token"),
            cluster_file,
            dir: dir.to_path_buf(),
            meta_bin,
            meta_extra,
            threads,
        };
        for (i, port) in ports.iter().enumerate() {
            let m = out.start_one(&out.meta_bin, format!("meta-{}", i + 1), *port, &out.meta_extra)?;
            out.metas.push(m);
        }
        for m in &mut out.metas {
            m.wait_started()?;
        }
        for i in 0..relays {
            // Each relay keeps a package cache (the storm phase uses it; idle otherwise).
            let id = format!("relay-{}", i + 1);
            let relay_extra: Vec<String> = vec![
                "--flush-ms".into(),
                flush_ms.to_string(),
                "--config-poll-ms".into(),
                "500".into(),
                "--cache-dir".into(),
                dir.join(format!("{id}-cache")).display().to_string(),
                "--cache-max-bytes".into(),
                (4u64 << 30).to_string(),
            ];
            let r = out.start_one(&relay_bin, id, reserved_port()?, &relay_extra)?;
            out.relays.push(r);
        }
        for r in &mut out.relays {
            r.wait_started()?;
        }
        Ok(out)
    }

    /// Starts one process with the flags both binaries take (each its own id, port, data dir
    /// and log) and `extra`.
    fn start_one(&self, bin: &Path, id: String, port: u16, extra: &[String]) -> anyhow::Result<Started> {
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--cluster".into(),
            self.cluster_file.display().to_string(),
            "--data-dir".into(),
            self.dir.join(&id).display().to_string(),
        ];
        args.extend_from_slice(extra);
        args.extend(identity_args(&id)?);
        if let Some(key) = HOST_KEY.get() {
            args.extend(["--host-key-file".to_owned(), key.display().to_string()]);
        }
        if let Some(n) = self.threads {
            args.extend(["--worker-threads".to_owned(), n.to_string()]);
        }
        let log = self.dir.join(format!("{id}.log"));
        let child = spawn(bin, &id, &args, &log)?;
        let tls = MTLS.get().is_some() && id.starts_with("meta-");
        Ok(Started { addr: format!("127.0.0.1:{port}").parse()?, name: id, tls, child, bin: bin.to_path_buf(), args, log })
    }

    /// Writes `cluster.toml` with the meta nodes `metas` (indexes into `self.metas`, plus
    /// `extra`: a node not started yet), as an operator edits it before a membership change.
    pub fn write_map(&self, metas: &[usize], extra: Option<(&str, SocketAddr)>) -> anyhow::Result<()> {
        let mut toml = map_head();
        let nodes = metas.iter().map(|&i| (self.metas[i].name.as_str(), self.metas[i].addr)).chain(extra);
        for (id, addr) in nodes {
            toml.push_str(&format!("[[node]]\nid = \"{id}\"\naddr = \"{addr}\"\n"));
        }
        std::fs::write(&self.cluster_file, toml)?;
        Ok(())
    }

    /// Adds meta node `meta-{N+1}` to the map and starts it on it (not yet announced to the
    /// others: that is the `/cluster/reload?all=1` the caller sends). Returns its index.
    pub fn add_meta(&mut self) -> anyhow::Result<usize> {
        let id = format!(
            "meta-{}",
            self.metas.iter().filter_map(|m| m.name.strip_prefix("meta-")?.parse::<usize>().ok()).max().unwrap_or(0) + 1
        );
        let port = reserved_port()?;
        let all: Vec<usize> = (0..self.metas.len()).collect();
        self.write_map(&all, Some((&id, format!("127.0.0.1:{port}").parse()?)))?;
        let mut m = self.start_one(&self.meta_bin, id, port, &self.meta_extra)?;
        m.wait_started()?;
        self.metas.push(m);
        Ok(self.metas.len() - 1)
    }

    pub fn processes(&self) -> impl Iterator<Item = &Started> {
        self.metas.iter().chain(&self.relays)
    }
}

/// The ceiling phase's minimal server: this binary again, in a process of its own. Killed on
/// drop; it also exits by itself when the bench goes (its standard input closes).
pub struct CeilingServer {
    pub addr: SocketAddr,
    child: Child,
}

impl CeilingServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl CeilingServer {
    pub fn start() -> anyhow::Result<CeilingServer> {
        use std::io::BufRead;
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("--ceiling-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the ceiling server")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("ceiling server stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = match line.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ceiling server did not print its address (got {line:?})");
            }
        };
        Ok(CeilingServer { addr, child })
    }
}

impl Drop for CeilingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RSS (bytes) and CPU seconds (user + system) of a process, from /proc.
pub fn usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss_kb * 1024, ticks / 100.0))
}
