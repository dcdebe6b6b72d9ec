//! Support for the end-to-end tests: build and start the real binaries on `127.0.0.1` with
//! port 0, learn their address from their log, and kill them through a guard on drop. A server
//! that needs its address before it starts (a node of a cluster map, nginx) gets a
//! [`reserved_port`], which no other pick of any test or ops-bench can be handed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// The desired config most end-to-end tests serve: the example's first two agents (see
/// `config/examples/agents.toml`), with `falcon-agent`'s `bj-web-` hosts on 5.1.4.
pub const AGENTS: &str = r#"
[[agent]]
name = "falcon-agent"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
config_file_name = "cfg.json"
config_remote_url = "http://files.example/falcon/conf/falcon-agent-cfg.json"
default = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66", cmd = "start" }

  [[agent.others]]
  prefix = "bj-web-"
  version = "5.1.4"
  md5 = ""

[[agent]]
name = "mysql-monitor"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
config_file_name = "cfg.json"
config_remote_url = "http://files.example/falcon/conf/mysql-monitor-cfg.json"
default = { version = "0.0.5", md5 = "5f9ab5e81c386cde72c022d1b6d061d9", cmd = "start" }
"#;

pub mod cluster;
pub mod netns;

/// Longest a test waits for a process to come up or go down.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

static BUILD: Once = Once::new();

/// The workspace's target dir for this profile (where the test binary itself lives).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/..").to_path_buf()
}

/// Path of a workspace binary, built once per test process with the same profile.
pub fn binary(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = bin_dir().ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bins", "--workspace", "--quiet"]).current_dir(workspace_root());
        // As a shell's cargo would run: ring's build script tracks the CARGO_PKG_* and
        // CARGO_MANIFEST_* variables that cargo sets for this test process, and would rebuild
        // the TLS stack (and relink every binary) on each run otherwise.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            let set_for_tests =
                ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"];
            if set_for_tests.iter().any(|p| k.starts_with(p)) {
                cmd.env_remove(&key);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bins failed");
    });
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Runs the workspace's `opsctl args...` to its end: (exit code, stdout, stderr).
pub fn opsctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("opsctl")).args(args).stdin(Stdio::null()).output().expect("run opsctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A running process of ours; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts the workspace binary `bin` with `args`, capturing its stderr log.
    pub fn start(bin: &str, args: &[&str]) -> Proc {
        Proc::start_path(&binary(bin), args)
    }

    /// Starts the program at `path` with `args`, capturing its stderr log.
    pub fn start_path(path: &Path, args: &[&str]) -> Proc {
        Proc::start_path_env(path, args, &[])
    }

    /// [`start_path`](Self::start_path) with these environment variables set too.
    pub fn start_path_env(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let bin = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut child = Command::new(path)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc { name: bin, child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size now, in bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log has a line containing `needle`; returns that line.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.try_wait_for_log(needle).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`wait_for_log`](Self::wait_for_log), with the process's exit (and its log) as an error
    /// instead of a panic, for a caller that can start it again.
    pub fn try_wait_for_log(&mut self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the log thread a moment to read the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!("{} exited ({status}) before logging {needle:?}:\n{}", self.name, self.log()));
            }
            assert!(Instant::now() < deadline, "{} did not log {needle:?} in time:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal with the system's `kill`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// SIGKILL, and waits for the exit (nothing when it already exited).
    pub fn kill(&mut self) {
        if self.child.try_wait().expect("try_wait").is_none() {
            self.signal("KILL");
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Give the log thread a moment to read the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit in time:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a binary to completion (for start-up failures); returns its status and stderr.
    pub fn run_to_exit(bin: &str, args: &[&str]) -> (ExitStatus, String) {
        let mut p = Proc::start(bin, args);
        let status = p.wait_exit(START_TIMEOUT);
        (status, p.log())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `addr=127.0.0.1:PORT` out of a log line.
pub fn addr_in(line: &str) -> SocketAddr {
    let plain = strip_ansi(line);
    let start = plain.find("addr=").unwrap_or_else(|| panic!("no addr= in {line:?}")) + 5;
    let rest = &plain[start..];
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|e| panic!("bad addr in {line:?}: {e}"))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running meta node.
pub struct Meta {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Meta {
    /// Starts `meta-node --listen 127.0.0.1:0` plus `args`, and waits until `/health` answers.
    pub fn start(args: &[&str]) -> Meta {
        Meta::start_at("127.0.0.1:0", args)
    }

    /// Starts `meta-node --listen <listen>` plus `args`, and waits until `/health` answers.
    pub fn start_at(listen: &str, args: &[&str]) -> Meta {
        Meta::try_start_at(listen, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start_at`](Self::start_at), with an exit before listening (a port taken by another
    /// program: [`ops_loopback::is_addr_in_use`] on the text) as an error.
    pub fn try_start_at(listen: &str, args: &[&str]) -> Result<Meta, String> {
        let (proc, addr) = start_server("meta-node", listen, args, "meta node listening")?;
        Ok(Meta { proc, addr })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The hosts this node holds (its own and failover copies), from its `/health`.
    pub fn hosts_held(&self) -> u64 {
        get_json(&self.url("/health")).1["hosts"].as_u64().expect("/health has hosts")
    }
}

/// A running relay.
pub struct Relay {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Relay {
    /// Starts `relay --listen 127.0.0.1:0` plus `args`, and waits until `/health` answers.
    pub fn start(args: &[&str]) -> Relay {
        let (proc, addr) = start_server("relay", "127.0.0.1:0", args, "relay listening").unwrap_or_else(|e| panic!("{e}"));
        Relay { proc, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

fn start_server(bin: &str, listen: &str, args: &[&str], ready: &str) -> Result<(Proc, SocketAddr), String> {
    let mut all = vec!["--listen", listen];
    all.extend_from_slice(args);
    let mut proc = Proc::start(bin, &all);
    let addr = addr_in(&proc.try_wait_for_log(ready)?);
    let deadline = Instant::now() + START_TIMEOUT;
    while get(&format!("http://{addr}/health")).map(|r| r.status().is_success()) != Ok(true) {
        assert!(Instant::now() < deadline, "{bin} /health never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, addr))
}

/// A loopback port for a server that needs its address before it starts (cluster maps, nginx):
/// below the kernel's ephemeral range, never handed out twice, locked against other processes
/// (see `ops_loopback`). Never bind port 0 and close it to pick one: that port can be handed
/// to the next pick.
pub fn reserved_port() -> u16 {
    ops_loopback::reserve().expect("reserve a loopback port")
}

fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).no_proxy().build().expect("http client"))
}

pub fn get(url: &str) -> Result<reqwest::blocking::Response, String> {
    client().get(url).send().map_err(|e| e.to_string())
}

/// GET with a bearer token, returning (status, body as JSON).
pub fn get_json_auth(url: &str, token: &str) -> (u16, serde_json::Value) {
    let r = client().get(url).bearer_auth(token).send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {text}")))
}

/// POST with an optional bearer token; (status, body JSON).
pub fn post_json_auth(url: &str, token: Option<&str>, body: impl Into<Vec<u8>>) -> (u16, serde_json::Value) {
    let mut req = client().post(url).body(body.into());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {url}: not JSON ({e}): {text}")))
}

/// GET returning (status, body as JSON).
pub fn get_json(url: &str) -> (u16, serde_json::Value) {
    let r = get(url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {text}")))
}

/// The sum of every sample of metric `name` (any labels) that the server at `base` exposes
/// on `/metrics`.
pub fn metric_at(base: &str, name: &str) -> f64 {
    let (_, text) = get_text(&format!("{base}/metrics"));
    ops_config::prom::sum(&text, name)
}

pub fn get_text(url: &str) -> (u16, String) {
    let r = get(url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().expect("body"))
}

/// POST a body with no Content-Type (as the Go updater does); (status, body JSON).
pub fn post_json(url: &str, body: impl Into<Vec<u8>>) -> (u16, serde_json::Value) {
    let r = client().post(url).body(body.into()).send().unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {url}: not JSON ({e}): {text}")))
}

/// Sends raw bytes on a fresh connection and reads one response (headers and a
/// Content-Length body); returns it as text.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(request).expect("write");
    read_http_response(&mut s)
}

/// Reads one HTTP/1.1 response with a Content-Length body from `s` (head and body as text;
/// what came before the peer closed, if it closed first; at most 10 s), leaving the
/// connection open for the next request.
pub fn read_http_response(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body from `stream`; returns the body.
pub fn read_http_request_body(stream: &mut TcpStream) -> String {
    read_http_request(stream).map(|(_, body)| String::from_utf8_lossy(&body).into_owned()).unwrap_or_default()
}

/// Reads one HTTP/1.1 request with a Content-Length body from `stream`: its request line and
/// its body (None when the peer closed first).
pub fn read_http_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            if data.len() >= end + 4 + len {
                let line = head.lines().next().unwrap_or("").to_owned();
                return Some((line, data[end + 4..end + 4 + len].to_vec()));
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real nginx serving `root` on a loopback port, started with its own config in a temp dir;
/// `/slow/` is rate-limited (for the kill test). Killed on drop.
pub struct Nginx {
    _proc: Proc,
    log: PathBuf,
    pub port: u16,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(root: &Path, slow_bytes_per_second: u64) -> Nginx {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("nginx is not installed: apt-get install -y nginx-light (see README)");
        match Nginx::try_start(&nginx, root, slow_bytes_per_second) {
            Ok(n) => n,
            Err(log) if ops_loopback::is_addr_in_use(&log) => {
                eprintln!("nginx: its reserved port was taken by another program; starting it once more on a new port:\n{log}");
                Nginx::try_start(&nginx, root, slow_bytes_per_second).unwrap_or_else(|log| panic!("nginx did not start:\n{log}"))
            }
            Err(log) => panic!("nginx did not start:\n{log}"),
        }
    }

    /// Starts nginx on a new reserved port; its log when it exits before listening.
    fn try_start(nginx: &Path, root: &Path, slow_bytes_per_second: u64) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let port = reserved_port();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  default_type application/octet-stream;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    location /slow/ {{ limit_rate {slow_bytes_per_second}; }}\n  }}\n}}\n",
            root = root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let c = conf_path.display().to_string();
        let mut proc = Proc::start_path(nginx, &["-c", &c, "-p", &d]);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = proc.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                let errors = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited ({status}) before listening on 127.0.0.1:{port}:\n{}{errors}", proc.log()));
            }
            assert!(Instant::now() < deadline, "nginx did not start: {}", proc.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nginx { _proc: proc, port, root: root.to_path_buf(), log: dir.path().join("access.log"), _dir: dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// How many requests (any method) for exactly `path` nginx has logged.
    pub fn requests(&self, path: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|l| l.split('"').nth(1).and_then(|r| r.split(' ').nth(1)) == Some(path)).count()
    }

    /// Every request nginx has logged, as `METHOD path`.
    pub fn requests_seen(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                let r = l.split('"').nth(1)?;
                let mut w = r.split(' ');
                Some(format!("{} {}", w.next()?, w.next()?))
            })
            .collect()
    }
}
