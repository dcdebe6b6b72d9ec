//! End-to-end tests of `ops-updater`: real nginx serving real tarballs (each with a real
//! `control` shell script), a real meta node, real processes killed with real signals.
//!
//! One file per suite, though it is long: cargo links a test binary per file under `tests/`,
//! and every link of the workspace adds to each CI run's build; the tests in it share nothing
//! but the fixtures of `ops_e2e`, and each starts its own processes.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use md5::{Digest, Md5};
use ops_e2e::{Meta, Nginx, Proc, get_json, reserved_port};

/// A control script of seed 003's contract: start runs a long-lived process and writes its pid;
/// status prints started or stoped; stop kills it.
const CONTROL: &str = r#"#!/bin/sh
cd "$(dirname "$0")" || exit 1
case "$1" in
  start)
    if [ -f app.pid ] && kill -0 "$(cat app.pid)" 2>/dev/null; then exit 0; fi
    nohup sleep 100000 >/dev/null 2>&1 &
    echo $! > app.pid
    ;;
  stop)
    if [ -f app.pid ]; then kill "$(cat app.pid)" 2>/dev/null; rm -f app.pid; fi
    ;;
  status)
    if [ -f app.pid ] && kill -0 "$(cat app.pid)" 2>/dev/null; then echo started; else echo stoped; fi
    ;;
esac
"#;

/// A control script whose start never returns (and records the pid of what it runs).
const CONTROL_HANGS: &str = r#"#!/bin/sh
cd "$(dirname "$0")" || exit 1
case "$1" in
  start) sleep 100000 & echo $! > hang.pid; wait ;;
  status) echo stoped ;;
esac
"#;

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `opsctl` and asserts it succeeded.
fn opsctl(args: &[&str]) -> String {
    let (status, log) = Proc::run_to_exit("opsctl", args);
    assert!(status.success(), "opsctl {args:?}: {log}");
    log
}

/// Deterministic incompressible filler, so large tarballs really are large.
fn filler(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Fleet {
    dir: tempfile::TempDir,
    nginx: Nginx,
    meta: Meta,
    user: String,
    /// The operator's secret key file, when the fleet's config is signed.
    key: Option<PathBuf>,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet::start(false)
    }

    /// A fleet whose meta node trusts only a key made here (`opsctl keygen`), with its
    /// empty config signed (`opsctl sign`).
    fn signed() -> Fleet {
        Fleet::start(true)
    }

    fn start(signed: bool) -> Fleet {
        Fleet::start_with(signed, &[])
    }

    /// With `meta_args` added to the meta node's flags.
    fn start_with(signed: bool, meta_args: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        // 1 MiB/s on /slow/: a 2 MiB tarball takes about two seconds to download.
        let nginx = Nginx::start(&files, 1 << 20);
        let user = current_user();
        let fleet_agents = dir.path().join("agents.toml");
        std::fs::write(&fleet_agents, "").unwrap();
        let (a, d) = (fleet_agents.display().to_string(), dir.path().join("meta-data").display().to_string());
        let mut args = vec!["--agents".to_owned(), a.clone(), "--data-dir".to_owned(), d];
        let key = signed.then(|| {
            let key = dir.path().join("operator.key");
            opsctl(&["keygen", "--out", &key.display().to_string()]);
            opsctl(&["sign", "--key", &key.display().to_string(), &a]);
            args.extend(["--trusted-keys-file".to_owned(), format!("{}.pub", key.display())]);
            key
        });
        args.extend(meta_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let meta = Meta::start(&args);
        Fleet { dir, nginx, meta, user, key }
    }

    /// `--trusted-keys-file` of the fleet's key, for updaters.
    fn trust_flag(&self) -> String {
        format!("--trusted-keys-file={}.pub", self.key.as_ref().expect("a signed fleet").display())
    }

    /// Writes agents.toml, signs it when the fleet is signed, and reloads the meta node.
    fn desire_toml(&self, toml: &str) {
        self.desire_toml_signed(toml, &[]);
    }

    /// [`desire_toml`](Self::desire_toml), with `sign_args` added to `opsctl sign`'s flags. A
    /// signed fleet's next file is signed at the version after the one on disk, as an
    /// operator's next edit would be.
    fn desire_toml_signed(&self, toml: &str, sign_args: &[&str]) {
        let path = self.dir.path().join("agents.toml");
        let previous = std::fs::read_to_string(&path).ok().and_then(|t| ops_config::DesiredConfig::parse(&t, "agents.toml").ok());
        let next = previous.and_then(|c| c.version()).unwrap_or(0) + 1;
        std::fs::write(&path, toml).unwrap();
        if let Some(key) = &self.key {
            let (version, key, file) = (next.to_string(), key.display().to_string(), path.display().to_string());
            let mut args = vec!["sign", "--key", &key, "--version", &version];
            args.extend_from_slice(sign_args);
            args.push(&file);
            opsctl(&args);
        }
        let (status, reply) = get_json(&self.meta.url("/config/reload"));
        assert_eq!(status, 200, "{reply}");
    }

    /// agents.toml for `demo` at `version` from `base`, with both digests of its tarball.
    fn signed_toml(&self, base: &str, version: &str) -> String {
        let path = self.nginx.root.join(base).join(updater::fetch::arch()).join(format!("demo-{version}.tar.gz"));
        let bytes = std::fs::read(path).unwrap();
        format!(
            "[[agent]]\nname = \"demo\"\ntarball = \"{}\"\nrun_user = \"{}\"\nwork_dir = \"{}\"\n\
             default = {{ version = \"{version}\", md5 = \"{}\", sha256 = \"{}\" }}\n",
            self.nginx.url(&format!("/{base}")),
            self.user,
            self.work().display(),
            md5_hex(&bytes),
            sha256_hex(&bytes)
        )
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn agent_dir(&self) -> PathBuf {
        self.work().join("demo")
    }

    /// Builds `{base}/{arch}/demo-{version}.tar.gz` (+ `.md5`) under nginx's root; returns md5.
    fn tarball(&self, base: &str, version: &str, control: &str, filler_bytes: usize) -> String {
        self.tarball_with(base, version, control, filler_bytes, |_| {})
    }

    /// [`tarball`](Self::tarball) with more entries appended by `more`.
    fn tarball_with(
        &self,
        base: &str,
        version: &str,
        control: &str,
        filler_bytes: usize,
        more: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<File>>),
    ) -> String {
        let dir = self.nginx.root.join(base).join(updater::fetch::arch());
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!("demo-{version}.tar.gz");
        let path = dir.join(&name);
        {
            let gz = flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast());
            let mut b = tar::Builder::new(gz);
            let mut add = |name: &str, body: &[u8], mode: u32| {
                let mut h = tar::Header::new_gnu();
                h.set_size(body.len() as u64);
                h.set_mode(mode);
                h.set_cksum();
                b.append_data(&mut h, name, body).unwrap();
            };
            add("control", control.as_bytes(), 0o755);
            add("VERSION", version.as_bytes(), 0o644);
            if filler_bytes > 0 {
                add("payload.bin", &filler(filler_bytes, version.len() as u64 * 7919), 0o644);
            }
            more(&mut b);
            b.into_inner().unwrap().finish().unwrap();
        }
        let md5 = md5_hex(&std::fs::read(&path).unwrap());
        std::fs::write(dir.join(format!("{name}.md5")), format!("{md5}  {name}\n")).unwrap();
        md5
    }

    /// Writes agents.toml for `demo` and reloads the meta node.
    fn desire(&self, base: &str, version: &str, md5: &str, cmd: &str, others: &str) {
        let toml = format!(
            "[[agent]]\nname = \"demo\"\ntarball = \"{}\"\nrun_user = \"{}\"\nwork_dir = \"{}\"\n\
             default = {{ version = \"{version}\", md5 = \"{md5}\", cmd = \"{cmd}\" }}\n{others}",
            self.nginx.url(&format!("/{base}")),
            self.user,
            self.work().display()
        );
        self.desire_toml(&toml);
    }

    fn servers(&self) -> String {
        format!("--server=127.0.0.1:{}", self.meta.addr.port())
    }

    fn state_dir(&self) -> String {
        format!("--state-dir={}", self.dir.path().join("updater-state").display())
    }

    /// `ops-updater --once`: (exit code, log).
    fn once(&self, host: &str, extra: &[&str]) -> (i32, String) {
        let servers = self.servers();
        let hostname = format!("--hostname={host}");
        let state = self.state_dir();
        let mut args = vec![
            "--once",
            "--health-window-seconds=1",
            &servers,
            &hostname,
            "--control-timeout-seconds=2",
            "--interval=300",
            "--debug=false",
            &state,
        ];
        args.extend_from_slice(extra);
        let (status, log) = Proc::run_to_exit("ops-updater", &args);
        (status.code().unwrap_or(-1), log)
    }

    fn version_file(&self) -> Option<String> {
        std::fs::read_to_string(self.agent_dir().join(".version")).ok().map(|s| s.trim().to_owned())
    }

    fn pid_alive(&self, version: &str) -> bool {
        let Ok(pid) = std::fs::read_to_string(self.agent_dir().join(version).join("app.pid")) else { return false };
        let pid = pid.trim();
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    }

    fn host(&self, host: &str) -> serde_json::Value {
        get_json(&self.meta.url(&format!("/status/host/{host}"))).1
    }

    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.agent_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".tmp-") || n.starts_with(".download-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Fleet {
    /// Kills every process the agents' control scripts left running.
    fn drop(&mut self) {
        let Ok(versions) = std::fs::read_dir(self.agent_dir()) else { return };
        for v in versions.flatten() {
            for pidfile in ["app.pid", "hang.pid"] {
                if let Ok(pid) = std::fs::read_to_string(v.path().join(pidfile)) {
                    let _ = Command::new("kill").arg("-KILL").arg(pid.trim()).status();
                }
            }
        }
    }
}

#[test]
fn install_start_stop_and_upgrade() {
    let f = Fleet::new();
    let md5_1 = f.tarball("releases", "1.0", CONTROL, 0);
    f.tarball("releases", "2.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5_1, "start", "");

    // First install: downloaded, verified, extracted, .version written, started.
    let (code, log) = f.once("host-a", &[]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert!(f.pid_alive("1.0"));
    assert!(f.leftovers().is_empty());
    // The next heartbeat reports it, and the meta node shows the host converged.
    assert_eq!(f.once("host-a", &[]).0, 0);
    let host = f.host("host-a");
    assert_eq!(host["agents"][0]["version"], "1.0");
    assert_eq!(host["agents"][0]["status"], "started");
    assert_eq!(host["agents"][0]["state"], "ok");

    // Stop.
    f.desire("releases", "1.0", &md5_1, "stop", "");
    assert_eq!(f.once("host-a", &[]).0, 0);
    assert!(!f.pid_alive("1.0"));
    // Start again (applied only when needed: one process, not two).
    f.desire("releases", "1.0", &md5_1, "start", "");
    assert_eq!(f.once("host-a", &[]).0, 0);
    let first_pid = std::fs::read_to_string(f.agent_dir().join("1.0/app.pid")).unwrap();
    assert_eq!(f.once("host-a", &[]).0, 0);
    assert_eq!(std::fs::read_to_string(f.agent_dir().join("1.0/app.pid")).unwrap(), first_pid, "running agent left alone");

    // Upgrade, with an empty md5: the updater reads {url}.md5. Old stopped, new started.
    f.desire("releases", "2.0", "", "start", "");
    let (code, log) = f.once("host-a", &[]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("2.0"));
    assert!(!f.pid_alive("1.0"), "old version stopped");
    assert!(f.pid_alive("2.0"), "new version started");
    assert_eq!(std::fs::read_to_string(f.agent_dir().join("2.0/VERSION")).unwrap(), "2.0");
    f.once("host-a", &[]);
    assert_eq!(f.host("host-a")["agents"][0]["version"], "2.0");

    // Bounded disk: after the switch to 3.0, 3.0 runs, 2.0 (the one it replaced) stays, 1.0 goes.
    f.tarball("releases", "3.0", CONTROL, 0);
    f.desire("releases", "3.0", "", "start", "");
    let (code, log) = f.once("host-a", &[]);
    assert_eq!(code, 0, "{log}");
    assert!(f.pid_alive("3.0"));
    assert!(f.agent_dir().join("2.0/control").is_file() && f.agent_dir().join("3.0/control").is_file());
    assert!(!f.agent_dir().join("1.0").exists(), "{log}");
}

#[test]
fn a_restarted_updater_reports_its_agents_in_its_first_heartbeat() {
    let f = Fleet::new();
    let md5 = f.tarball("releases", "1.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5, "start", "");
    assert_eq!(f.once("host-r", &[]).0, 0);
    // A server that records what it is sent and wants nothing: only kept state can make the
    // first heartbeat of a new process name the agent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let Ok(mut stream) = stream else { return };
            let body = ops_e2e::read_http_request_body(&mut stream);
            sink.lock().unwrap().push(body);
            let reply = r#"{"errorMessage":"","desiredAgents":[]}"#;
            let _ = std::io::Write::write_all(
                &mut stream,
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len()).as_bytes(),
            );
        }
    });
    let servers = format!("--server=127.0.0.1:{port}");
    let state = f.state_dir();
    let (status, log) = Proc::run_to_exit("ops-updater", &["--once", "--health-window-seconds=1", &servers, "--hostname=host-r", &state]);
    assert_eq!(status.code(), Some(0), "{log}");
    let first: serde_json::Value = serde_json::from_str(&bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(first["hostname"], "host-r");
    assert_eq!(first["realAgents"][0]["name"], "demo");
    assert_eq!(first["realAgents"][0]["version"], "1.0");
    assert_eq!(first["realAgents"][0]["status"], "started");
}

#[test]
fn prefix_override_gets_the_other_version() {
    let f = Fleet::new();
    let md5_1 = f.tarball("releases", "1.0", CONTROL, 0);
    let md5_2 = f.tarball("releases", "2.0", CONTROL, 0);
    f.desire(
        "releases",
        "1.0",
        &md5_1,
        "start",
        &format!("[[agent.others]]\nprefix = \"canary-\"\nversion = \"2.0\"\nmd5 = \"{md5_2}\"\n"),
    );
    assert_eq!(f.once("canary-1", &[]).0, 0);
    assert_eq!(f.version_file().as_deref(), Some("2.0"));
}

#[test]
fn md5_mismatch_and_404_keep_the_old_version_and_report_last_error() {
    let f = Fleet::new();
    let md5_1 = f.tarball("releases", "1.0", CONTROL, 0);
    f.tarball("releases", "2.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5_1, "start", "");
    assert_eq!(f.once("host-b", &[]).0, 0);

    // Wrong digest for 2.0.
    f.desire("releases", "2.0", "0123456789abcdef0123456789abcdef", "start", "");
    let (code, log) = f.once("host-b", &[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("md5 mismatch"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"), "old version kept");
    assert!(f.pid_alive("1.0"), "old version still running");
    assert!(!f.agent_dir().join("2.0").exists(), "nothing half-installed");
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
    // Each heartbeat carries the error of the previous cycle: a second run reports it.
    f.once("host-b", &[]);
    let host = f.host("host-b");
    assert!(host["agents"][0]["lastError"].as_str().unwrap_or("").contains("md5 mismatch"), "{host}");
    assert_eq!(host["agents"][0]["state"], "error");

    // A version nginx does not have.
    f.desire("releases", "3.0", "", "start", "");
    let (code, log) = f.once("host-b", &[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("404"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert!(f.pid_alive("1.0"));
    f.once("host-b", &[]);
    assert!(f.host("host-b")["agents"][0]["lastError"].as_str().unwrap_or("").contains("404"));

    // Back to a good config: the error clears.
    f.desire("releases", "1.0", &md5_1, "start", "");
    assert_eq!(f.once("host-b", &[]).0, 0);
    f.once("host-b", &[]);
    let host = f.host("host-b");
    assert!(host["agents"][0].get("lastError").is_none(), "{host}");
    assert_eq!(host["agents"][0]["state"], "ok");
}

#[test]
fn a_tarball_cannot_plant_setuid_files_or_fill_the_disk() {
    let f = Fleet::new();
    let entry = |b: &mut tar::Builder<flate2::write::GzEncoder<File>>,
                 name: &str,
                 kind: tar::EntryType,
                 mode: u32,
                 body: &mut dyn std::io::Read,
                 len: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_size(len);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_cksum();
        b.append_data(&mut h, name, body).unwrap();
    };
    let md5_1 = f.tarball_with("releases", "1.0", CONTROL, 0, |b| {
        entry(b, "bin", tar::EntryType::Directory, 0o777, &mut std::io::empty(), 0);
        entry(b, "bin/su-me", tar::EntryType::Regular, 0o4755, &mut &b"#!/bin/sh\nid\n"[..], 13);
        entry(b, "bin/group-me", tar::EntryType::Regular, 0o2775, &mut &b"x"[..], 1);
    });
    f.desire("releases", "1.0", &md5_1, "start", "");
    let (code, log) = f.once("host-t", &[]);
    assert_eq!(code, 0, "{log}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::symlink_metadata(f.agent_dir().join("1.0").join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin"), 0o775, "other-write cleared");
    assert_eq!(mode("bin/su-me"), 0o755, "setuid cleared");
    assert_eq!(mode("bin/group-me"), 0o775, "setgid cleared");
    assert!(f.pid_alive("1.0"));

    // 200 MB of zeros in a tarball under 1 MB, well within --max-download-bytes.
    let md5_2 = f.tarball_with("releases", "2.0", CONTROL, 0, |b| {
        entry(b, "zeros", tar::EntryType::Regular, 0o644, &mut std::io::Read::take(std::io::repeat(0), 200_000_000), 200_000_000);
    });
    let size = std::fs::metadata(f.nginx.root.join("releases").join(updater::fetch::arch()).join("demo-2.0.tar.gz")).unwrap().len();
    assert!(size < 1 << 20, "{size}");
    f.desire("releases", "2.0", &md5_2, "start", "");
    let (code, log) = f.once("host-t", &["--max-download-bytes=1048576"]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("unpacks to more than"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"), "old version kept");
    assert!(f.pid_alive("1.0"), "old version still running");
    assert!(!f.agent_dir().join("2.0").exists(), "nothing half-installed");
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
    f.once("host-t", &["--max-download-bytes=1048576"]);
    let host = f.host("host-t");
    assert!(host["agents"][0]["lastError"].as_str().unwrap_or("").contains("unpacks to more than"), "{host}");

    // A tighter entry cap is a flag; 0 is refused as a bad flag.
    let (code, log) = f.once("host-t", &["--max-unpack-entries=0"]);
    assert_eq!(code, 64, "{log}");
    assert!(log.contains("--max-unpack-entries"), "{log}");
}

/// Every response the updater reads is capped: a heartbeat reply padded past
/// --max-response-bytes is that server's error (the next server answers and the host
/// converges), and a `.md5` file over 4 KiB is refused with nothing installed.
#[test]
fn oversize_replies_and_digest_files_are_refused() {
    let f = Fleet::new();
    let md5 = f.tarball("releases", "1.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5, "start", "");
    let hostile = HostileRelay::start(&f.meta);
    hostile.set(|v| v["padding"] = serde_json::Value::String("x".repeat(2 << 20)));
    let servers = format!("--server=127.0.0.1:{},127.0.0.1:{}", hostile.port, f.meta.addr.port());
    let state = f.state_dir();
    let args = ["--once", "--health-window-seconds=1", &servers, "--hostname=host-cap", "--control-timeout-seconds=2", &state];
    let with_cap: Vec<&str> = args.iter().copied().chain(["--max-response-bytes=1048576"]).collect();
    let (status, log) = Proc::run_to_exit("ops-updater", &with_cap);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("reply larger than the cap of 1048576 bytes"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"), "the next server's answer was applied");

    // 2.0's digest file: a valid digest, then 8 KiB of blanks.
    let md5_2 = f.tarball("releases", "2.0", CONTROL, 0);
    let dir = f.nginx.root.join("releases").join(updater::fetch::arch());
    std::fs::write(dir.join("demo-2.0.tar.gz.md5"), format!("{md5_2}{}", " ".repeat(8192))).unwrap();
    f.desire("releases", "2.0", "", "start", "");
    let (code, log) = f.once("host-cap", &[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("larger than the cap of 4096 bytes"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"), "old version kept");
    assert!(f.pid_alive("1.0"), "old version still running");
    assert!(!f.agent_dir().join("2.0").exists(), "nothing half-installed");
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
}

#[test]
fn hanging_control_script_is_killed_at_the_timeout() {
    let f = Fleet::new();
    let md5 = f.tarball("releases", "1.0", CONTROL_HANGS, 0);
    f.desire("releases", "1.0", &md5, "start", "");
    let started = std::time::Instant::now();
    let (code, log) = f.once("host-c", &[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("timed out after 2s"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let pid = std::fs::read_to_string(f.agent_dir().join("1.0/hang.pid")).unwrap();
    let alive = || std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok_and(|s| !s.contains(") Z "));
    let gone = ops_e2e::eventually(Duration::from_secs(10), || (!alive()).then_some(()));
    assert!(gone.is_some(), "the hanging script's process group was killed");
    f.once("host-c", &[]);
    assert!(f.host("host-c")["agents"][0]["lastError"].as_str().unwrap_or("").contains("timed out"));
}

#[test]
fn fails_over_from_a_dead_first_server() {
    let f = Fleet::new();
    let md5 = f.tarball("releases", "1.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5, "start", "");
    let servers = format!("--server=127.0.0.1:{},127.0.0.1:{}", reserved_port(), f.meta.addr.port());
    let state = f.state_dir();
    let (status, log) = Proc::run_to_exit(
        "ops-updater",
        &["--once", "--health-window-seconds=1", &servers, "--hostname=host-d", "--control-timeout-seconds=2", &state],
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert!(get_json(&f.meta.url("/status/host/host-d")).0 == 200);
}

#[test]
fn bad_flags_and_config_files_exit_64() {
    let (status, log) = Proc::run_to_exit("ops-updater", &["--once", "--health-window-seconds=1", "--hostname=../etc"]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("hostname"), "{log}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("updater.toml");
    std::fs::write(&cfg, "interval = 300\nsrever = [\"x\"]\n").unwrap();
    let c = cfg.display().to_string();
    let (status, log) = Proc::run_to_exit("ops-updater", &["--once", "--health-window-seconds=1", "--config", &c]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("unknown field `srever`"), "{log}");
}

/// SIGKILL the updater at many moments (download, extraction, control calls): after each kill
/// `.version` names only a complete version, and the next `--once` converges and cleans up.
#[test]
fn killed_at_any_moment_the_next_run_converges() {
    let f = Fleet::new();
    let runs = 20;
    let mut md5s = Vec::new();
    for i in 0..runs {
        md5s.push(f.tarball("slow/releases", &format!("{i}.0"), CONTROL, 2 << 20));
    }
    let servers = f.servers();
    let mut phases = std::collections::BTreeSet::new();
    for (i, md5) in md5s.iter().enumerate() {
        let version = format!("{i}.0");
        f.desire("slow/releases", &version, md5, "start", "");
        let state = f.state_dir();
        let mut p = Proc::start(
            "ops-updater",
            &["--once", "--health-window-seconds=1", &servers, "--hostname=host-k", "--control-timeout-seconds=5", &state],
        );
        // Spread the kills from the start of the download (~2 s at 1 MiB/s) past its end.
        std::thread::sleep(Duration::from_millis(100 + (i as u64 * 2600) / runs as u64));
        p.signal("KILL");
        p.wait_exit(Duration::from_secs(10));
        if let Some(v) = f.version_file() {
            assert!(f.agent_dir().join(&v).join("control").is_file(), "run {i}: .version names {v}, which is not completely installed");
        }
        let left = f.leftovers();
        phases.insert(if left.iter().any(|n| n.starts_with(".download-")) {
            "downloading"
        } else if left.iter().any(|n| n.starts_with(".tmp-")) {
            "extracting"
        } else if f.version_file().as_deref() == Some(version.as_str()) {
            "switched"
        } else if f.agent_dir().join(&version).exists() {
            "installed, not switched"
        } else {
            "before download"
        });
        let (code, log) = f.once("host-k", &[]);
        assert_eq!(code, 0, "run {i}: {log}");
        assert_eq!(f.version_file().as_deref(), Some(version.as_str()), "run {i}");
        assert!(f.pid_alive(&version), "run {i}: new version running");
        assert!(f.leftovers().is_empty(), "run {i}: {:?}", f.leftovers());
        if i > 0 {
            assert!(!f.pid_alive(&format!("{}.0", i - 1)), "run {i}: old version stopped");
        }
    }
    assert!(phases.contains("downloading") && phases.len() >= 2, "kills landed in too few phases: {phases:?}");
    eprintln!("kill phases seen: {phases:?}");
}

type Tamper = Box<dyn Fn(&mut serde_json::Value) + Send>;

/// A hostile relay: passes heartbeats to the real meta node and `GET /config/desired` (with
/// its signature) through, but rewrites each heartbeat reply with the current `tamper`.
struct HostileRelay {
    port: u16,
    tamper: std::sync::Arc<std::sync::Mutex<Tamper>>,
    /// When set: the `(text, signature header)` served as `/config/desired` instead of the
    /// meta node's (an older signed file it kept).
    desired: ServedConfig,
}

/// A `(text, signature header)` a hostile relay serves as `/config/desired`, once set.
type ServedConfig = std::sync::Arc<std::sync::Mutex<Option<(Vec<u8>, String)>>>;

impl HostileRelay {
    fn start(meta: &Meta) -> HostileRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tamper: std::sync::Arc<std::sync::Mutex<Tamper>> = std::sync::Arc::new(std::sync::Mutex::new(Box::new(|_| {})));
        let t = tamper.clone();
        let desired: ServedConfig = Default::default();
        let served = desired.clone();
        let upstream = format!("http://127.0.0.1:{}", meta.addr.port());
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let Some((line, body)) = ops_e2e::read_http_request(&mut stream) else { continue };
                let (code, extra, reply) = if line.starts_with("POST /heartbeat") {
                    let r = client.post(format!("{upstream}/heartbeat")).body(body).send().unwrap();
                    let mut v: serde_json::Value = r.json().unwrap();
                    (t.lock().unwrap())(&mut v);
                    (200, String::new(), serde_json::to_vec(&v).unwrap())
                } else if let (true, Some((text, sig))) = (line.starts_with("GET /config/desired"), served.lock().unwrap().clone()) {
                    (200, format!("x-ops-signature: {sig}\r\n"), text)
                } else if line.starts_with("GET /config/desired") {
                    let r = client.get(format!("{upstream}/config/desired")).send().unwrap();
                    let sig = r.headers().get("x-ops-signature").map(|v| format!("x-ops-signature: {}\r\n", v.to_str().unwrap()));
                    (r.status().as_u16(), sig.unwrap_or_default(), r.bytes().unwrap().to_vec())
                } else {
                    (404, String::new(), b"{}".to_vec())
                };
                let head = format!("HTTP/1.1 {code} X\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n", reply.len());
                let _ = std::io::Write::write_all(&mut stream, head.as_bytes());
                let _ = std::io::Write::write_all(&mut stream, &reply);
            }
        });
        HostileRelay { port, tamper, desired }
    }

    /// Serves `text` with signature `sig` as `/config/desired` from now on.
    fn serve_config(&self, text: Vec<u8>, sig: String) {
        *self.desired.lock().unwrap() = Some((text, sig));
    }

    fn set(&self, tamper: impl Fn(&mut serde_json::Value) + Send + 'static) {
        *self.tamper.lock().unwrap() = Box::new(tamper);
    }
}

/// The operator's signature decides what a host installs, not the server that answers: a
/// relay that answers another version, tarball or digest is refused (nothing downloaded,
/// the old version keeps running, the refusal is reported); a tarball changed on the file
/// server after signing fails its sha256 before extraction; the signed version installs.
#[test]
fn with_a_trusted_key_only_what_the_operator_signed_is_installed() {
    let f = Fleet::signed();
    f.tarball("releases", "1.0", CONTROL, 0);
    f.tarball("releases", "2.0", CONTROL, 0);
    f.tarball("releases", "3.0", CONTROL, 0);
    f.tarball("evil", "2.0", CONTROL_HANGS, 0);
    f.desire_toml(&f.signed_toml("releases", "1.0"));
    let trust = f.trust_flag();
    let (code, log) = f.once("host-s", &[&trust]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert!(f.pid_alive("1.0"));

    // The operator signs 2.0; a hostile relay in front of the meta node rewrites the answer.
    f.desire_toml(&f.signed_toml("releases", "2.0"));
    let hostile = HostileRelay::start(&f.meta);
    let evil = std::fs::read(f.nginx.root.join("evil").join(updater::fetch::arch()).join("demo-2.0.tar.gz")).unwrap();
    let (evil_md5, evil_sha) = (md5_hex(&evil), sha256_hex(&evil));
    let three = std::fs::read(f.nginx.root.join("releases").join(updater::fetch::arch()).join("demo-3.0.tar.gz")).unwrap();
    let (three_md5, three_sha) = (md5_hex(&three), sha256_hex(&three));
    let evil_base = f.nginx.url("/evil");
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "another version",
            Box::new(move |v| {
                v["desiredAgents"][0]["version"] = "3.0".into();
                v["desiredAgents"][0]["md5"] = three_md5.clone().into();
                v["desiredAgents"][0]["sha256"] = three_sha.clone().into();
            }),
        ),
        (
            "another tarball base",
            Box::new(move |v| {
                v["desiredAgents"][0]["tarball"] = evil_base.clone().into();
                v["desiredAgents"][0]["md5"] = evil_md5.clone().into();
                v["desiredAgents"][0]["sha256"] = evil_sha.clone().into();
            }),
        ),
        ("another digest", Box::new(|v| v["desiredAgents"][0]["sha256"] = "ab".repeat(32).into())),
        ("no digest", Box::new(|v| v["desiredAgents"][0]["sha256"] = "".into())),
        ("another work dir", Box::new(|v| v["desiredAgents"][0]["workDir"] = "/tmp".into())),
    ];
    let servers = format!("--server=127.0.0.1:{}", hostile.port);
    let hostname = "--hostname=host-s".to_owned();
    let state = f.state_dir();
    for (what, tamper) in cases {
        hostile.set(tamper);
        let (status, log) = Proc::run_to_exit(
            "ops-updater",
            &["--once", "--health-window-seconds=1", &servers, &hostname, &state, &trust, "--control-timeout-seconds=2"],
        );
        assert_eq!(status.code(), Some(1), "{what}: {log}");
        assert!(log.contains("refused"), "{what}: {log}");
        assert_eq!(f.version_file().as_deref(), Some("1.0"), "{what}: old version kept");
        assert!(f.pid_alive("1.0"), "{what}: old version still running");
        for v in ["2.0", "3.0"] {
            assert!(!f.agent_dir().join(v).exists(), "{what}: {v} installed");
        }
        assert!(f.leftovers().is_empty(), "{what}: {:?}", f.leftovers());
        // The refusal went out with the run's last report (through the hostile relay to the meta).
        let host = f.host("host-s");
        let error = host["agents"][0]["lastError"].as_str().unwrap_or("");
        assert!(error.contains("refused") && error.contains("signed config"), "{what}: {host}");
        assert_eq!(host["agents"][0]["version"], "1.0", "{what}");
    }

    // The file server's 2.0 replaced after signing (its .md5 too): refused before extraction.
    let good = f.nginx.root.join("releases").join(updater::fetch::arch()).join("demo-2.0.tar.gz");
    let kept = std::fs::read(&good).unwrap();
    std::fs::write(&good, &evil).unwrap();
    std::fs::write(good.with_extension("gz.md5"), format!("{}  demo-2.0.tar.gz\n", md5_hex(&evil))).unwrap();
    let (code, log) = f.once("host-s", &[&trust]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("sha256 mismatch"), "{log}");
    assert!(!f.agent_dir().join("2.0").exists() && f.leftovers().is_empty(), "nothing extracted");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));

    // The genuine file back: the signed 2.0 installs, through the (now honest) relay too.
    std::fs::write(&good, &kept).unwrap();
    hostile.set(|_| {});
    let (status, log) = Proc::run_to_exit("ops-updater", &["--once", "--health-window-seconds=1", &servers, &hostname, &state, &trust]);
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("2.0"));
    assert!(f.pid_alive("2.0") && !f.pid_alive("1.0"));
}

/// A config edited after signing, signed by an unknown key or not signed: the meta node
/// refuses the reload, keeps serving the signed one, and refuses to start with it.
#[test]
fn a_badly_signed_config_is_refused_and_the_old_one_kept() {
    let f = Fleet::signed();
    f.tarball("releases", "1.0", CONTROL, 0);
    f.desire_toml(&f.signed_toml("releases", "1.0"));
    let agents = f.dir.path().join("agents.toml");
    // As signed: `opsctl sign` wrote its version and expiry into the file.
    let good = std::fs::read_to_string(&agents).unwrap();
    let (_, before) = ops_e2e::get_text(&f.meta.url("/config/desired"));
    assert_eq!(before, good);
    let sig = f.dir.path().join("agents.toml.sig");
    let signature = std::fs::read_to_string(&sig).unwrap();
    let other = f.dir.path().join("other.key");
    opsctl(&["keygen", "--out", &other.display().to_string()]);
    let edited = good.replace("1.0", "6.6");
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Damage)> = vec![
        ("does not match", Box::new(|| std::fs::write(&agents, &edited).unwrap())),
        (
            "not trusted",
            Box::new(|| {
                std::fs::write(&agents, &edited).unwrap();
                opsctl(&["sign", "--key", &other.display().to_string(), &agents.display().to_string()]);
            }),
        ),
        (
            "no signature",
            Box::new(|| {
                std::fs::write(&agents, &edited).unwrap();
                std::fs::remove_file(&sig).unwrap();
            }),
        ),
    ];
    for (expect, make) in cases {
        std::fs::write(&agents, &good).unwrap();
        std::fs::write(&sig, &signature).unwrap();
        make();
        let (status, reply) = get_json(&f.meta.url("/config/reload"));
        assert_eq!(status, 400, "{expect}: {reply}");
        assert!(reply["errorMessage"].as_str().unwrap().contains(expect), "{expect}: {reply}");
        let (_, served) = ops_e2e::get_text(&f.meta.url("/config/desired"));
        assert_eq!(served, good, "{expect}: the signed config is still served");
        let (_, reply) = ops_e2e::post_json(&f.meta.url("/heartbeat"), r#"{"hostname":"h1","realAgents":[]}"#);
        assert_eq!(reply["desiredAgents"][0]["version"], "1.0", "{expect}");
        // A node started on these files refuses to start.
        let a = agents.display().to_string();
        let d = f.dir.path().join("data-2").display().to_string();
        let k = format!("{}.pub", f.key.as_ref().unwrap().display());
        let (status, log) =
            Proc::run_to_exit("meta-node", &["--listen", "127.0.0.1:0", "--agents", &a, "--data-dir", &d, "--trusted-keys-file", &k]);
        assert_eq!(status.code(), Some(64), "{expect}: {log}");
        assert!(log.contains(expect), "{expect}: {log}");
    }
    // The Go updater's heartbeat gets its reply as before: every field it knows, plus the
    // optional ones it ignores.
    let (_, reply) = ops_e2e::post_json(&f.meta.url("/heartbeat"), r#"{"hostname":"h1","ip":"","realAgents":null}"#);
    let d = reply["desiredAgents"][0].as_object().unwrap();
    for k in ["name", "version", "tarball", "md5", "cmd", "runUser", "workDir", "configFileName", "configRemoteUrl"] {
        assert!(d.contains_key(k), "{k}: {reply}");
    }
    assert_eq!(d.len(), 10, "{reply}");
    assert_eq!(d["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(reply["configHash"].as_str().unwrap().len(), 32);
}

/// A test CA and a certificate for 127.0.0.1 signed by it, written to `dir`:
/// (ca.pem, server.pem, server.key).
fn test_ca(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "ops fleet test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// updater → relay → meta nodes, every hop over HTTPS with certificates of a CA made here:
/// the relay takes its config and delivers its reports over TLS, the meta nodes probe and
/// gather from each other over TLS, the updater installs through the relay, and a client
/// without the CA is refused.
#[test]
fn updater_relay_and_meta_talk_https_with_a_test_ca() {
    let f = Fleet::new();
    f.tarball("releases", "1.0", CONTROL, 0);
    f.desire_toml(&f.signed_toml("releases", "1.0"));
    let (ca, cert, key) = test_ca(f.dir.path());
    let (port, port2) = (reserved_port(), reserved_port());
    std::fs::write(f.dir.path().join("cluster.token"), "tls-test-token-0123456789\n").unwrap();
    let cluster = f.dir.path().join("cluster-tls.toml");
    std::fs::write(
        &cluster,
        format!(
            "tls = true\nca_file = \"ca.pem\"\ntoken_file = \"cluster.token\"\n[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:{port}\"\n\
             [[node]]\nid = \"meta-2\"\naddr = \"127.0.0.1:{port2}\"\n"
        ),
    )
    .unwrap();
    let p = |p: &PathBuf| p.display().to_string();
    let (c, a, cert, key) = (p(&cluster), p(&f.dir.path().join("agents.toml")), p(&cert), p(&key));
    let (meta_data, relay_data) = (p(&f.dir.path().join("tls-meta")), p(&f.dir.path().join("tls-relay")));
    let listen = format!("127.0.0.1:{port}");
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let mut meta_args = vec!["--listen", &listen, "--cluster", &c, "--id", "meta-1", "--agents", &a, "--data-dir", &meta_data];
    meta_args.extend(tls);
    let mut meta = Proc::start("meta-node", &meta_args);
    meta.wait_for_log("meta node listening");
    let (listen2, meta2_data) = (format!("127.0.0.1:{port2}"), p(&f.dir.path().join("tls-meta-2")));
    let mut meta2_args = vec!["--listen", &listen2, "--cluster", &c, "--id", "meta-2", "--agents", &a, "--data-dir", &meta2_data];
    meta2_args.extend(tls);
    let mut meta2 = Proc::start("meta-node", &meta2_args);
    meta2.wait_for_log("meta node listening");
    let mut relay_args =
        vec!["--listen", "127.0.0.1:0", "--cluster", &c, "--data-dir", &relay_data, "--flush-ms", "100", "--config-poll-ms", "200"];
    relay_args.extend(tls);
    let mut relay = Proc::start("relay", &relay_args);
    let relay_addr = ops_e2e::addr_in(&relay.wait_for_log("relay listening"));

    let ca_pem = std::fs::read(&ca).unwrap();
    let https = reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let get = |url: &str| https.get(url).send().ok().filter(|r| r.status().is_success()).and_then(|r| r.json::<serde_json::Value>().ok());
    // The relay is ready once it has fetched the config from the meta node over HTTPS.
    let health = ops_e2e::eventually(Duration::from_secs(20), || get(&format!("https://{relay_addr}/health")));
    assert!(health.is_some(), "relay never got its config over HTTPS: {}\n{}", relay.log(), meta.log());
    assert!(!ops_e2e::get(&format!("http://{relay_addr}/health")).is_ok_and(|r| r.status().is_success()), "plain HTTP is not served");

    let servers = format!("--server=https://{relay_addr}");
    let ca_flag = format!("--ca-file={}", ca.display());
    let state = f.state_dir();
    let (status, log) =
        Proc::run_to_exit("ops-updater", &["--once", "--health-window-seconds=1", &servers, "--hostname=host-tls", &state, &ca_flag]);
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    // The report went relay → meta node over HTTPS.
    let host = ops_e2e::eventually(Duration::from_secs(10), || {
        get(&format!("https://127.0.0.1:{port}/status/host/host-tls")).filter(|h| h["agents"][0]["status"] == "started")
    });
    assert!(host.is_some(), "{}", relay.log());
    // Both nodes see each other up (probes over HTTPS), and a summary asked of either node
    // gathers the other's share over HTTPS: the host counts once, whichever node owns it.
    let peers_up = ops_e2e::eventually(Duration::from_secs(10), || {
        let text = https.get(format!("https://127.0.0.1:{port}/metrics")).send().ok()?.text().ok()?;
        text.lines().any(|l| l == "ops_meta_peers_up 2").then_some(())
    });
    assert!(peers_up.is_some(), "meta-1 never saw meta-2 up over HTTPS: {}", meta.log());
    for p in [port, port2] {
        let summary = get(&format!("https://127.0.0.1:{p}/status/summary/demo")).unwrap();
        assert_eq!(summary["hosts"], 1, "{summary}");
        assert_eq!(summary["partial"], false, "{summary}");
    }
    drop(meta2);
    // Without the CA the updater refuses the relay certificate.
    let (status, log) = Proc::run_to_exit("ops-updater", &["--once", "--health-window-seconds=1", &servers, "--hostname=host-tls", &state]);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.to_lowercase().contains("certificate") || log.contains("UnknownIssuer"), "{log}");
}

/// `opsctl`: a key is never overwritten; verify says 0 for a good signature and 1 (with the
/// reason) for an unknown key or an edited file; `--append` co-signs for a key rotation.
#[test]
fn opsctl_keys_signatures_and_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (old, new, file) = (p("old.key"), p("new.key"), p("agents.toml"));
    let (old_pub, new_pub) = (format!("{old}.pub"), format!("{new}.pub"));
    std::fs::write(
        &file,
        "[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\ndefault = { version = \"1\" }\n",
    )
    .unwrap();
    opsctl(&["keygen", "--out", &old]);
    let secret = std::fs::read(&old).unwrap();
    let (status, log) = Proc::run_to_exit("opsctl", &["keygen", "--out", &old]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert_eq!(std::fs::read(&old).unwrap(), secret, "the key is not overwritten");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&old).unwrap().permissions().mode() & 0o777, 0o600);
    opsctl(&["keygen", "--out", &new]);
    let verify = |keys: &str| Proc::run_to_exit("opsctl", &["verify", "--trusted-keys-file", keys, &file]);

    opsctl(&["sign", "--key", &old, &file]);
    assert_eq!(verify(&old_pub).0.code(), Some(0));
    let (status, log) = verify(&new_pub);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("not trusted"), "{log}");
    // Rotation: co-signed, either key verifies.
    opsctl(&["sign", "--key", &new, "--append", &file]);
    assert_eq!(std::fs::read_to_string(format!("{file}.sig")).unwrap().lines().filter(|l| l.starts_with("ed25519 ")).count(), 2);
    assert_eq!(verify(&old_pub).0.code(), Some(0));
    assert_eq!(verify(&new_pub).0.code(), Some(0));
    // Signing again with the new key alone drops the old line.
    opsctl(&["sign", "--key", &new, &file]);
    assert_eq!(verify(&old_pub).0.code(), Some(1));
    // An edit after signing.
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("\"1\"", "\"2\"")).unwrap();
    let (status, log) = verify(&new_pub);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("does not match"), "{log}");
}

/// Signed is not enough: a hostile relay that kept an older signed config (and its reply)
/// serves it after the operator signed a newer one, and our updater refuses it by version,
/// installs nothing and says why; a config signed with an expiry that has passed is not
/// taken either: the running version keeps running and the report says it expired.
#[test]
fn an_older_or_expired_signed_config_is_refused_and_nothing_changes() {
    let f = Fleet::signed();
    for v in ["1.0", "2.0", "3.0"] {
        f.tarball("releases", v, CONTROL, 0);
    }
    let trust = f.trust_flag();
    // Version 2 of the signed file desires 1.0; the relay keeps that file and a reply by it.
    f.desire_toml(&f.signed_toml("releases", "1.0"));
    let agents = f.dir.path().join("agents.toml");
    let old_text = std::fs::read(&agents).unwrap();
    let old_sig = ops_config::trust::signature_header(&std::fs::read_to_string(format!("{}.sig", agents.display())).unwrap());
    let old_version = ops_config::DesiredConfig::parse(&String::from_utf8_lossy(&old_text), "a").unwrap().version().unwrap();
    let body = serde_json::json!({"hostname": "host-v", "realAgents": []}).to_string();
    let (_, old_reply) = ops_e2e::post_json(&f.meta.url("/heartbeat"), body);
    assert_eq!(old_reply["desiredAgents"][0]["version"], "1.0", "{old_reply}");

    // The operator signs 2.0 (the next version); the host installs it through the meta node.
    f.desire_toml(&f.signed_toml("releases", "2.0"));
    let (code, log) = f.once("host-v", &[&trust]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("2.0"));
    let floor = std::fs::read_to_string(f.dir.path().join("updater-state").join("signed-version")).unwrap();
    assert!(floor.starts_with(&format!("{} ", old_version + 1)), "the highest version verified is kept: {floor}");

    // The hostile relay answers with the old signed file and the old reply: both genuine.
    let hostile = HostileRelay::start(&f.meta);
    hostile.serve_config(old_text.clone(), old_sig);
    let replayed = old_reply.clone();
    hostile.set(move |v| *v = replayed.clone());
    let servers = format!("--server=127.0.0.1:{}", hostile.port);
    let state = f.state_dir();
    let (status, log) = Proc::run_to_exit("ops-updater", &["--once", &servers, "--hostname=host-v", &state, &trust]);
    assert_eq!(status.code(), Some(1), "{log}");
    let older = format!("version {old_version} is older than {}", old_version + 1);
    assert!(log.contains("refused") && log.contains(&older), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("2.0"), "the newer version keeps running");
    assert!(f.pid_alive("2.0"));
    assert!(!f.agent_dir().join("1.0").exists(), "the older version was not installed");
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
    let error = f.host("host-v")["agents"][0]["lastError"].as_str().unwrap_or("").to_owned();
    assert!(error.starts_with("refused") && error.contains(&older), "the refusal is reported: {error}");

    // 3.0, signed with an expiry 2 s ahead, is fetched only after it passed: not taken.
    f.desire_toml_signed(&f.signed_toml("releases", "3.0"), &["--expires", "2s"]);
    std::thread::sleep(Duration::from_millis(2500));
    let (code, log) = f.once("host-v", &[&trust]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("expired at"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("2.0"), "the running version is kept");
    assert!(f.pid_alive("2.0") && !f.agent_dir().join("3.0").exists());
    let error = f.host("host-v")["agents"][0]["lastError"].as_str().unwrap_or("").to_owned();
    assert!(error.contains("refused") && error.contains("expired at"), "the report says why: {error}");
    // The floor did not move to the expired file.
    let after = std::fs::read_to_string(f.dir.path().join("updater-state").join("signed-version")).unwrap();
    assert_eq!(after, floor);
}

/// A meta node with keys keeps the highest signed version it served (`{data-dir}/config-version`):
/// an older signed file put back on its disk is refused on reload (the newer one stays
/// served), and a start on it exits 64 and says why.
#[test]
fn a_meta_node_never_goes_back_to_an_older_signed_config() {
    let f = Fleet::signed();
    for v in ["1.0", "2.0"] {
        f.tarball("releases", v, CONTROL, 0);
    }
    let agents = f.dir.path().join("agents.toml");
    let sig = format!("{}.sig", agents.display());
    f.desire_toml(&f.signed_toml("releases", "1.0"));
    let (old_text, old_sig) = (std::fs::read(&agents).unwrap(), std::fs::read(&sig).unwrap());
    let old = ops_config::DesiredConfig::parse(&String::from_utf8_lossy(&old_text), "a").unwrap().version().unwrap();
    f.desire_toml(&f.signed_toml("releases", "2.0"));
    let served = get_json(&f.meta.url("/health")).1["configHash"].clone();
    let kept = std::fs::read_to_string(f.dir.path().join("meta-data").join("config-version")).unwrap();
    assert!(kept.starts_with(&format!("{} ", old + 1)), "{kept}");

    // The older file, genuine signature and all, back on disk.
    std::fs::write(&agents, &old_text).unwrap();
    std::fs::write(&sig, &old_sig).unwrap();
    let (status, reply) = get_json(&f.meta.url("/config/reload"));
    assert_eq!(status, 400, "{reply}");
    let why = reply["errorMessage"].as_str().unwrap_or("");
    assert!(why.contains(&format!("version {old} is older than {}", old + 1)), "{reply}");
    assert_eq!(get_json(&f.meta.url("/health")).1["configHash"], served, "the newer config is still served");

    let (a, d, k) = (agents.display().to_string(), f.dir.path().join("meta-data").display().to_string(), f.trust_flag());
    let (status, log) = Proc::run_to_exit("meta-node", &["--listen", "127.0.0.1:0", "--agents", &a, "--data-dir", &d, &k]);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("signed config refused") && log.contains("is older than"), "{log}");
}

/// A build that never reports `started` (its start does run a process, so a revert must stop
/// it), and whose stop takes a second (room to kill the updater during a revert): `CONTROL`
/// with those two changes.
fn control_never_started() -> String {
    let status = r#"if [ -f app.pid ] && kill -0 "$(cat app.pid)" 2>/dev/null; then echo started; else echo stoped; fi"#;
    assert!(CONTROL.contains(status) && CONTROL.contains("  stop)\n"));
    CONTROL.replace(status, "echo stoped").replace("  stop)\n", "  stop)\n    sleep 1\n")
}

impl Fleet {
    /// The versions whose process runs.
    fn running(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.agent_dir())
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|v| self.pid_alive(v)).collect())
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// A build that is not `started` within the health window is reverted: the old version runs
/// again, the host reports `reverted`, the next cycles do not retry it, and a good build after
/// it stays.
#[test]
fn a_build_that_never_starts_is_reverted_and_not_retried() {
    let f = Fleet::new();
    let md5_1 = f.tarball("releases", "1.0", CONTROL, 0);
    let md5_2 = f.tarball("releases", "2.0", &control_never_started(), 0);
    let md5_3 = f.tarball("releases", "3.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5_1, "start", "");
    assert_eq!(f.once("host-v", &[]).0, 0);

    f.desire("releases", "2.0", &md5_2, "start", "");
    let (code, log) = f.once("host-v", &[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("reverted: demo 2.0: not started within the 1 s health window"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert_eq!(f.running(), ["1.0"], "the bad build was stopped, the old one started again");
    let host = f.host("host-v");
    assert_eq!(host["agents"][0]["version"], "1.0", "{host}");
    assert!(host["agents"][0]["lastError"].as_str().unwrap_or("").starts_with("reverted: "), "{host}");
    assert_eq!(host["agents"][0]["state"], "error", "{host}");

    // Not tried again while 2.0 with this digest is desired: the old version keeps running.
    let pid = std::fs::read_to_string(f.agent_dir().join("1.0/app.pid")).unwrap();
    for _ in 0..2 {
        let (code, log) = f.once("host-v", &[]);
        assert_eq!(code, 1, "{log}");
        assert!(log.contains("not retried"), "{log}");
        assert!(!log.contains("switched version"), "{log}");
    }
    assert_eq!(std::fs::read_to_string(f.agent_dir().join("1.0/app.pid")).unwrap(), pid, "left alone");
    assert_eq!(f.running(), ["1.0"]);

    // A good build afterwards stays.
    f.desire("releases", "3.0", &md5_3, "start", "");
    let (code, log) = f.once("host-v", &[]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("3.0"));
    assert_eq!(f.running(), ["3.0"]);
}

/// SIGKILL the updater during the health window, then during the revert: the next run ends
/// with exactly one version running and `.version` naming it.
#[test]
fn killed_in_the_window_or_the_revert_the_next_run_leaves_one_version_running() {
    let f = Fleet::new();
    let md5_1 = f.tarball("releases", "1.0", CONTROL, 0);
    f.desire("releases", "1.0", &md5_1, "start", "");
    assert_eq!(f.once("host-w", &[]).0, 0);
    let (servers, state) = (f.servers(), f.state_dir());
    let state_file = f.dir.path().join("updater-state/state.json");
    for (bad, window, when) in
        [("2.0", "--health-window-seconds=3", "\"reverting\":false"), ("4.0", "--health-window-seconds=1", "\"reverting\":true")]
    {
        let md5 = f.tarball("releases", bad, &control_never_started(), 0);
        f.desire("releases", bad, &md5, "start", "");
        let mut p = Proc::start("ops-updater", &["--once", window, &servers, "--hostname=host-w", &state]);
        let reached = ops_e2e::eventually(Duration::from_secs(20), || {
            std::fs::read_to_string(&state_file).ok().filter(|s| s.contains(when) && f.version_file().is_some()).map(drop)
        });
        assert!(reached.is_some(), "{bad}: never saw {when}: {}", p.log());
        p.signal("KILL");
        p.wait_exit(Duration::from_secs(10));
        let (code, log) = f.once("host-w", &[]);
        assert_eq!(code, 1, "{bad}: {log}");
        assert!(log.contains(&format!("reverted: demo {bad}")), "{bad}: {log}");
        assert_eq!(f.version_file().as_deref(), Some("1.0"), "{bad}");
        assert_eq!(f.running(), ["1.0"], "{bad}: exactly one version runs");
        let kept = std::fs::read_to_string(&state_file).unwrap();
        assert!(kept.contains("\"watch\":{}"), "{bad}: nothing left half done: {kept}");
    }
}

/// Local pins (`pin.toml`): `hold` leaves the agent exactly as it is, a version pin keeps (and
/// if need be installs) that version whatever the config says, a broken pin file holds
/// everything and says why, and removing the pin hands the agent back to the config. The meta
/// node shows the host as `pinned` in status, listing and summary.
#[test]
fn pins_hold_or_keep_a_version_and_the_meta_node_counts_them_pinned() {
    let f = Fleet::new();
    let md5_1 = f.tarball("releases", "1.0", CONTROL, 0);
    let md5_2 = f.tarball("releases", "2.0", CONTROL, 0);
    f.tarball("releases", "3.0", CONTROL, 0);
    let pin = f.dir.path().join("pin.toml");
    let pin_flag = format!("--pin-file={}", pin.display());
    let once = || f.once("host-p", &[&pin_flag]);
    f.desire("releases", "1.0", &md5_1, "start", "");
    assert_eq!(once().0, 0);
    let pid_1 = std::fs::read_to_string(f.agent_dir().join("1.0/app.pid")).unwrap();
    let agent = |f: &Fleet| f.host("host-p")["agents"][0].clone();
    let summary = |f: &Fleet| get_json(&f.meta.url("/status/summary/demo")).1;
    let listed = |f: &Fleet, state: &str| get_json(&f.meta.url(&format!("/status/json/demo?state={state}"))).1["count"].clone();

    // hold: 2.0 is desired, nothing at all changes.
    std::fs::write(&pin, "demo = \"hold\"\n").unwrap();
    f.desire("releases", "2.0", &md5_2, "start", "");
    let (code, log) = once();
    assert_eq!(code, 0, "a held agent is as its operator wants it: {log}");
    assert!(!log.contains("switched version") && !log.contains("installed"), "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert_eq!(f.running(), ["1.0"]);
    assert_eq!(std::fs::read_to_string(f.agent_dir().join("1.0/app.pid")).unwrap(), pid_1, "not even restarted");
    assert!(!f.agent_dir().join("2.0").exists(), "nothing downloaded");
    let a = agent(&f);
    assert_eq!(
        (a["state"].as_str(), a["pinned"].as_str(), a["desiredVersion"].as_str()),
        (Some("pinned"), Some("hold"), Some("2.0")),
        "{a}"
    );
    let s = summary(&f);
    assert_eq!((s["byState"]["pinned"].as_u64(), s["converged"].as_u64()), (Some(1), Some(0)), "{s}");
    assert_eq!(listed(&f, "pinned"), 1);

    // A version pin: 3.0 is in no config; it is fetched with the .md5 beside its tarball.
    std::fs::write(&pin, "demo = \"3.0\"\n").unwrap();
    let (code, log) = once();
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("3.0"));
    assert_eq!(f.running(), ["3.0"]);
    let a = agent(&f);
    assert_eq!((a["state"].as_str(), a["pinned"].as_str(), a["version"].as_str()), (Some("pinned"), Some("3.0"), Some("3.0")), "{a}");

    // A pin file that does not parse holds every agent and says why.
    std::fs::write(&pin, "demo = 3\n").unwrap();
    let (code, log) = once();
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("pin file") && log.contains("held, nothing changed"), "{log}");
    assert_eq!((f.version_file().as_deref(), f.running()), (Some("3.0"), vec!["3.0".to_owned()]));
    let a = agent(&f);
    assert!(a["lastError"].as_str().unwrap_or("").contains("pin file"), "{a}");
    assert_eq!(a["state"], "error", "{a}");

    // No pin: back to the config.
    std::fs::remove_file(&pin).unwrap();
    let (code, log) = once();
    assert_eq!(code, 0, "{log}");
    assert_eq!((f.version_file().as_deref(), f.running()), (Some("2.0"), vec!["2.0".to_owned()]));
    let a = agent(&f);
    assert_eq!(a["state"], "ok", "{a}");
    assert!(a.get("pinned").is_none(), "{a}");
    assert_eq!(summary(&f)["byState"]["pinned"], 0);
}

// ---- The relay's package cache (issue 14) ----

impl Fleet {
    /// A relay in front of the fleet's meta node with a package cache in `cache` (a dir under
    /// the fleet's temp dir) of at most `max_bytes`.
    fn cached_relay(&self, name: &str, max_bytes: u64) -> ops_e2e::Relay {
        let cluster = self.dir.path().join("cluster-cache.toml");
        std::fs::write(&cluster, format!("[[node]]\nid = \"meta-1\"\naddr = \"127.0.0.1:{}\"\n", self.meta.addr.port())).unwrap();
        let p = |n: &str| self.dir.path().join(n).display().to_string();
        let (c, data, cache, max) =
            (cluster.display().to_string(), p(&format!("{name}-data")), p(&format!("{name}-cache")), max_bytes.to_string());
        ops_e2e::Relay::start(&[
            "--cluster",
            &c,
            "--data-dir",
            &data,
            "--cache-dir",
            &cache,
            "--cache-max-bytes",
            &max,
            "--config-poll-ms",
            "100",
            "--flush-ms",
            "100",
        ])
    }

    /// agents.toml for `demo` at `version`, cached by relays, with its sha256 (and, with
    /// `md5_url`, the Go updater's URL-form md5 pointing at nginx).
    fn cached_toml(&self, version: &str, md5_url: bool) -> String {
        let signed = self.signed_toml("releases", version);
        let md5 = if md5_url { format!("md5 = \"{}\", ", self.nginx.url("/releases")) } else { String::new() };
        let digest = signed.split("sha256 = \"").nth(1).unwrap().split('"').next().unwrap().to_owned();
        signed
            .replace("work_dir = ", "relay_cache = true\nwork_dir = ")
            .lines()
            .map(|l| {
                if l.starts_with("default = ") {
                    format!("default = {{ version = \"{version}\", {md5}sha256 = \"{digest}\" }}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }

    /// `ops-updater --once` with `relay` as its only server: (exit code, log).
    fn once_via(&self, relay: &ops_e2e::Relay, host: &str) -> (i32, String) {
        let (servers, hostname, state) = (format!("--server={}", relay.addr), format!("--hostname={host}"), self.state_dir());
        let args = ["--once", "--health-window-seconds=1", &servers, &hostname, "--control-timeout-seconds=2", "--debug=false", &state];
        let (status, log) = Proc::run_to_exit("ops-updater", &args);
        (status.code().unwrap_or(-1), log)
    }

    /// Waits until `relay` serves the config the meta node has now.
    fn relay_caught_up(&self, relay: &ops_e2e::Relay) {
        let want = get_json(&self.meta.url("/health")).1["configHash"].clone();
        let ok = ops_e2e::eventually(Duration::from_secs(10), || (get_json(&relay.url("/health")).1["configHash"] == want).then_some(()));
        assert!(ok.is_some(), "relay never took config {want}: {}", relay.proc.log());
    }
}

/// `{tarball}` as the relay answers it for the first agent (its own `/pkg/{key}` base).
fn relay_tarball(relay: &ops_e2e::Relay, host: &str) -> serde_json::Value {
    let body = format!(r#"{{"hostname":"{host}","ip":"127.0.0.1","updaterVersion":"0.0.4","realAgents":[]}}"#);
    let (status, reply) = ops_e2e::post_json(&relay.url("/heartbeat"), body);
    assert_eq!(status, 200, "{reply}");
    reply["desiredAgents"][0].clone()
}

/// 300 concurrent downloads of one file through one relay cost the origin one request; the
/// file is whole for every one; Range and HEAD work; /health and /metrics count it.
#[test]
fn relay_cache_fetches_each_file_once_for_300_concurrent_downloads() {
    let f = Fleet::new();
    f.tarball("releases", "1.0", CONTROL, 4 << 20);
    f.desire_toml(&f.cached_toml("1.0", false));
    let relay = f.cached_relay("r1", 1 << 30);
    f.relay_caught_up(&relay);
    let desired = relay_tarball(&relay, "host-c1");
    let base = desired["tarball"].as_str().unwrap().to_owned();
    assert!(base.starts_with(&relay.url("/pkg/")), "the reply points at the relay: {desired}");
    let file = format!("{base}/{}/demo-1.0.tar.gz", updater::fetch::arch());
    let origin_path = format!("/releases/{}/demo-1.0.tar.gz", updater::fetch::arch());
    let want = std::fs::read(f.nginx.root.join(&origin_path[1..])).unwrap();

    let client = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(300));
    let threads: Vec<_> = (0..300)
        .map(|_| {
            let (client, file, barrier) = (client.clone(), file.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = client.get(&file).send().unwrap();
                (r.status().as_u16(), r.bytes().unwrap().to_vec())
            })
        })
        .collect();
    for t in threads {
        let (status, body) = t.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == want, "a download differs from the origin's file");
    }
    assert_eq!(f.nginx.requests(&origin_path), 1, "one origin request: {:?}", f.nginx.requests_seen());

    // Range and HEAD, from the cache.
    let r = client.get(&file).header("Range", "bytes=100-199").send().unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &want[100..200]);
    let r = client.head(&file).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-length"].to_str().unwrap(), want.len().to_string());
    assert_eq!(f.nginx.requests(&origin_path), 1);

    let health = get_json(&relay.url("/health")).1;
    let cache = &health["cache"];
    assert_eq!(cache["files"], 1, "{health}");
    assert_eq!(cache["misses"], 1, "{health}");
    assert_eq!(cache["bytes"], want.len(), "{health}");
    assert!(cache["hitRatio"].as_f64().unwrap() > 0.99, "{health}");
    let metrics = ops_e2e::get_text(&relay.url("/metrics")).1;
    let value = |name: &str| metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(value("ops_relay_cache_origin_bytes_total"), Some(want.len() as f64), "{metrics}");
    assert!(value("ops_relay_cache_served_bytes_total").unwrap() >= (300 * want.len()) as f64);
    assert!(metrics.contains("ops_relay_cache_requests_total{result=\"miss\"} 1"), "{metrics}");

    // Our updater installs through the relay: no new origin request for the tarball.
    let (code, log) = f.once_via(&relay, "host-c1");
    assert_eq!(code, 0, "{log}");
    assert_eq!(f.version_file().as_deref(), Some("1.0"));
    assert_eq!(f.nginx.requests(&origin_path), 1, "{:?}", f.nginx.requests_seen());
}

/// Paths the config does not name are 404 without any origin request: the relay is not a
/// proxy.
#[test]
fn relay_cache_refuses_paths_outside_the_configured_agents() {
    let f = Fleet::new();
    f.tarball("releases", "1.0", CONTROL, 0);
    f.tarball("releases", "9.9", CONTROL, 0);
    f.desire_toml(&f.cached_toml("1.0", false));
    let relay = f.cached_relay("r2", 1 << 30);
    f.relay_caught_up(&relay);
    let base = relay_tarball(&relay, "host-c2")["tarball"].as_str().unwrap().to_owned();
    let arch = updater::fetch::arch();
    let other_key = ops_config::cache::origin_key(&f.nginx.url("/elsewhere"));
    for url in [
        format!("{base}/{arch}/demo-9.9.tar.gz"),
        format!("{base}/{arch}/other-1.0.tar.gz"),
        format!("{base}/{arch}/demo-1.0.tar"),
        format!("{base}/x/y/demo-1.0.tar.gz"),
        format!("{base}/{arch}/..%2f..%2fdemo-1.0.tar.gz"),
        format!("{base}/{arch}/cluster.toml"),
        relay.url(&format!("/pkg/{other_key}/{arch}/demo-1.0.tar.gz")),
        relay.url("/pkg/../etc/passwd"),
    ] {
        let r = ops_e2e::get(&url).unwrap();
        assert_eq!(r.status().as_u16(), 404, "{url}");
    }
    assert_eq!(f.nginx.requests_seen(), Vec::<String>::new(), "no origin request at all");
    let metrics = ops_e2e::get_text(&relay.url("/metrics")).1;
    assert!(metrics.contains("ops_relay_cache_requests_total{result=\"refused\"}"), "{metrics}");
}

/// A corrupted origin file is never served: the relay answers 502, counts it, does not fetch
/// it again at once; an updater through the relay reports the failure and installs nothing.
#[test]
fn relay_cache_never_serves_a_file_that_fails_its_check() {
    let f = Fleet::new();
    f.tarball("releases", "1.0", CONTROL, 0);
    f.desire_toml(&f.cached_toml("1.0", false));
    let arch = updater::fetch::arch();
    let origin_path = format!("/releases/{arch}/demo-1.0.tar.gz");
    // The origin's file is damaged after the operator took its digest.
    let path = f.nginx.root.join(&origin_path[1..]);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let relay = f.cached_relay("r3", 1 << 30);
    f.relay_caught_up(&relay);
    let base = relay_tarball(&relay, "host-c3")["tarball"].as_str().unwrap().to_owned();
    let r = ops_e2e::get(&format!("{base}/{arch}/demo-1.0.tar.gz")).unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let text = r.text().unwrap();
    assert!(text.contains("sha256") && text.contains("not served"), "{text}");

    let (code, log) = f.once_via(&relay, "host-c3");
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("HTTP 502"), "{log}");
    assert_eq!(f.version_file(), None, "nothing installed");
    assert!(!f.agent_dir().join("1.0").exists() && f.leftovers().is_empty(), "nothing half-installed");
    let host = ops_e2e::eventually(Duration::from_secs(10), || {
        let h = f.host("host-c3");
        h["agents"][0]["lastError"].as_str().is_some_and(|e| e.contains("502")).then_some(h)
    });
    assert!(host.is_some(), "the failure reaches the meta node: {}", f.host("host-c3"));
    assert_eq!(f.nginx.requests(&origin_path), 1, "not fetched again within the failure TTL");
    let metrics = ops_e2e::get_text(&relay.url("/metrics")).1;
    assert!(metrics.contains("ops_relay_cache_failed_checks_total 1"), "{metrics}");
    assert_eq!(get_json(&relay.url("/health")).1["cache"]["files"], 0);
}

/// A full cache evicts the least recently used file; a restarted relay keeps what it held.
#[test]
fn relay_cache_evicts_the_least_recently_used_and_survives_a_restart() {
    let f = Fleet::new();
    let arch = updater::fetch::arch();
    let mut toml = String::new();
    for v in ["1", "2", "3"] {
        f.tarball("releases", v, CONTROL, 1 << 20);
        toml.push_str(&f.cached_toml(v, false).replace("name = \"demo\"", &format!("name = \"demo{v}\"")));
    }
    // cached_toml names the agent demo; the tarball of agent demoN is demoN-N.tar.gz.
    for v in ["1", "2", "3"] {
        let dir = f.nginx.root.join("releases").join(&arch);
        std::fs::copy(dir.join(format!("demo-{v}.tar.gz")), dir.join(format!("demo{v}-{v}.tar.gz"))).unwrap();
    }
    f.desire_toml(&toml);
    // Room for two of the three ~1 MiB files.
    let relay = f.cached_relay("r4", (2 << 20) + (512 << 10));
    f.relay_caught_up(&relay);
    let base = relay_tarball(&relay, "host-c4")["tarball"].as_str().unwrap().to_owned();
    let fetch = |v: &str| {
        let r = ops_e2e::get(&format!("{base}/{arch}/demo{v}-{v}.tar.gz")).unwrap();
        assert_eq!(r.status().as_u16(), 200, "demo{v}");
    };
    let origin = |v: &str| f.nginx.requests(&format!("/releases/{arch}/demo{v}-{v}.tar.gz"));
    fetch("1");
    fetch("2");
    fetch("1"); // 1 is now more recently used than 2
    fetch("3"); // over the limit: 2 goes
    assert_eq!((origin("1"), origin("2"), origin("3")), (1, 1, 1));
    let health = get_json(&relay.url("/health")).1;
    assert_eq!(health["cache"]["files"], 2, "{health}");
    assert!(health["cache"]["bytes"].as_u64().unwrap() <= (2 << 20) + (512 << 10), "{health}");
    fetch("1");
    fetch("3");
    assert_eq!((origin("1"), origin("3")), (1, 1), "1 and 3 kept");
    let metrics = ops_e2e::get_text(&relay.url("/metrics")).1;
    assert!(metrics.contains("ops_relay_cache_evictions_total 1"), "{metrics}");

    // Restart (SIGKILL, so nothing is flushed on the way out): the cache is still there.
    relay.proc.signal("KILL");
    drop(relay);
    let relay = f.cached_relay("r4", (2 << 20) + (512 << 10));
    let base = relay_tarball(&relay, "host-c4")["tarball"].as_str().unwrap().to_owned();
    for v in ["1", "3"] {
        let r = ops_e2e::get(&format!("{base}/{arch}/demo{v}-{v}.tar.gz")).unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    assert_eq!((origin("1"), origin("2"), origin("3")), (1, 1, 1), "served from the kept cache: {:?}", f.nginx.requests_seen());
    assert_eq!(get_json(&relay.url("/health")).1["cache"]["hits"], 2);
}

/// The Go updater installs through the cache, unchanged: its heartbeat (no Content-Type), then
/// the exact commands its install runs (`wget -q {tarball}/{name}-{version}.tar.gz`, `wget -q
/// {md5}/{name}-{version}.tar.gz.md5`, `md5sum`, `tar zxf`, `./control start`), against the
/// URLs the relay answered. The origin sees one request per file.
#[test]
fn the_go_updaters_install_steps_work_through_the_cache() {
    let f = Fleet::new();
    f.tarball("releases", "1.0", CONTROL, 1 << 20);
    // The Go updater's layout: no {arch} directory.
    let arch_dir = f.nginx.root.join("releases").join(updater::fetch::arch());
    for n in ["demo-1.0.tar.gz", "demo-1.0.tar.gz.md5"] {
        std::fs::copy(arch_dir.join(n), f.nginx.root.join("releases").join(n)).unwrap();
    }
    f.desire_toml(&f.cached_toml("1.0", true));
    let relay = f.cached_relay("r5", 1 << 30);
    f.relay_caught_up(&relay);
    let body = r#"{"hostname":"go-host","ip":"127.0.0.1","updaterVersion":"0.0.4","runUser":"root","realAgents":[]}"#;
    let reply = ops_e2e::raw_http(relay.addr, format!(
        "POST /heartbeat HTTP/1.1\r\nHost: {}\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept-Encoding: gzip\r\n\r\n{body}",
        relay.addr,
        body.len()
    ).as_bytes());
    let json: serde_json::Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let d = &json["desiredAgents"][0];
    let (tarball, md5) = (d["tarball"].as_str().unwrap(), d["md5"].as_str().unwrap());
    assert!(tarball.starts_with(&relay.url("/pkg/")) && md5.starts_with(&relay.url("/pkg/")), "{d}");
    let dir = f.dir.path().join("go-work/demo/1.0");
    std::fs::create_dir_all(&dir).unwrap();
    let sh = |cmd: String| {
        let out = Command::new("sh").arg("-c").arg(&cmd).current_dir(&dir).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for _ in 0..2 {
        sh(format!("wget -q {tarball}/demo-1.0.tar.gz -O demo-1.0.tar.gz"));
        sh(format!("wget -q {md5}/demo-1.0.tar.gz.md5 -O demo-1.0.tar.gz.md5"));
    }
    let actual = sh("md5sum demo-1.0.tar.gz".into());
    let expected = std::fs::read_to_string(dir.join("demo-1.0.tar.gz.md5")).unwrap();
    assert_eq!(actual.split_whitespace().next(), expected.split_whitespace().next());
    sh("tar zxf demo-1.0.tar.gz -C . && ./control start && sleep 0.2 && ./control status | grep -q started && ./control stop".into());
    assert_eq!(f.nginx.requests("/releases/demo-1.0.tar.gz"), 1, "{:?}", f.nginx.requests_seen());
    assert_eq!(f.nginx.requests("/releases/demo-1.0.tar.gz.md5"), 1, "{:?}", f.nginx.requests_seen());
}

/// Bad package-cache flags stop the relay with status 64 and a clear message, before it binds.
#[test]
fn bad_relay_cache_flags_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache").display().to_string();
    let data = dir.path().join("data").display().to_string();
    for (args, expect) in [
        (
            vec!["--listen", "127.0.0.1:0", "--cache-dir", &cache, "--advertise-url", "ftp://relay:2200"],
            "--advertise-url must be http(s)://host[:port]",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--cache-dir", &cache, "--advertise-url", "http://relay:2200/some/path"],
            "--advertise-url must be",
        ),
        (vec!["--listen", "127.0.0.1:0", "--advertise-url", "http://relay:2200"], "--advertise-url needs --cache-dir"),
        (vec!["--listen", "0.0.0.0:0", "--lab", "--cache-dir", &cache], "give --advertise-url"),
        // Without trusted keys only loopback, unless it says it is a lab.
        (vec!["--listen", "0.0.0.0:0"], "--listen 0.0.0.0:0 is not loopback and no trusted key is given"),
        (vec!["--listen", "127.0.0.1:0", "--cache-dir", &cache, "--cache-max-bytes", "1000"], "--cache-max-bytes must be at least 1 MiB"),
    ] {
        let mut all = args.clone();
        all.extend(["--data-dir", &data]);
        let (status, log) = Proc::run_to_exit("relay", &all);
        assert_eq!(status.code(), Some(64), "{args:?}: {log}");
        assert!(log.contains(expect), "{args:?}: {log}");
        assert!(!log.contains("relay listening"), "never bound a port: {log}");
    }
}

// ---- Self-update (issue 15) ----

impl Fleet {
    /// `{base}/{arch}/ops-updater-{version}.tar.gz` holding `body` as `ops-updater`; its md5.
    fn self_tarball(&self, version: &str, body: &[u8]) -> String {
        let dir = self.nginx.root.join("updater").join(updater::fetch::arch());
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("ops-updater-{version}.tar.gz"));
        {
            // Stored, not compressed: the test binary is large and compression is not the point.
            let gz = flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::none());
            let mut b = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, "ops-updater", body).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        md5_hex(&std::fs::read(&path).unwrap())
    }

    /// agents.toml with the updater itself at `to`, in a staged rollout from `from`.
    fn desire_self(&self, from: &str, to: &str, md5: &str) {
        self.desire_toml(&format!(
            "[[agent]]\nname = \"ops-updater\"\ntarball = \"{}\"\nrun_user = \"{}\"\nwork_dir = \"{}\"\n\
             default = {{ version = \"{to}\", md5 = \"{md5}\" }}\n\
             [agent.rollout]\nfrom = {{ version = \"{from}\", md5 = \"\" }}\nwaves = [50, 100]\nsoak = \"1s\"\nhalt_when = {{ failed_ratio = 1.0, min_sample = 1000 }}\n",
            self.nginx.url("/updater"),
            self.user,
            self.work().display()
        ));
    }

    /// The host's `ops-updater` agent as the meta node shows it.
    fn self_agent(&self, host: &str) -> serde_json::Value {
        let h = self.host(host);
        h["agents"].as_array().into_iter().flatten().find(|a| a["name"] == "ops-updater").cloned().unwrap_or_default()
    }
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default()
}

/// The updater upgrades itself through a staged rollout (check, swap, re-exec in the same
/// process) and keeps heartbeating; a new binary that exits at once never replaces it and is
/// not tried again; one that dies after the swap is put back by the guard
/// (`{binary}.old --self-update-guard`, the service's `ExecStartPre`).
#[test]
fn the_updater_upgrades_itself_and_a_broken_build_never_sticks() {
    // Rollouts judged every 300 ms, so a wave opens soon after the last converged.
    let f = Fleet::start_with(false, &["--rollout-interval-ms", "300"]);
    let bin_dir = f.dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("ops-updater");
    let original = std::fs::read(ops_e2e::binary("ops-updater")).unwrap();
    std::fs::write(&bin, &original).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, out) = {
        let o = Command::new(&bin).arg("--version").output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    assert_eq!(code, Some(0));
    let built_in = out.strip_prefix("ops-updater ").unwrap().to_owned();

    let (servers, state) = (f.servers(), f.state_dir());
    let args = [
        servers.as_str(),
        "--hostname=host-s",
        "--interval=1",
        &state,
        "--self-update-seconds=8",
        "--control-timeout-seconds=5",
        "--pin-file=/nonexistent/pin.toml",
    ];
    let mut p = Proc::start_path(&bin, &args);
    let pid = p.pid();

    // 2.0: the same binary under another version, through the rollout.
    let md5 = f.self_tarball("2.0", &original);
    f.desire_self(&built_in, "2.0", &md5);
    let up = ops_e2e::eventually(Duration::from_secs(90), || {
        let a = f.self_agent("host-s");
        (a["version"] == "2.0" && a["state"] == "ok" && p.log().contains("self-update confirmed")).then_some(a)
    });
    assert!(up.is_some(), "not upgraded: {}\n{}", f.self_agent("host-s"), p.log());
    let log = p.log();
    assert!(log.contains("binary replaced, re-executing"), "{log}");
    assert_eq!(exe_of(pid), bin.display().to_string(), "the same process runs the new file (not a deleted one)");
    assert_eq!(std::fs::read(bin_dir.join("ops-updater.old")).unwrap(), original, "the old binary is kept");
    assert_eq!(std::fs::read_to_string(f.work().join("ops-updater/.version")).unwrap().trim(), "2.0");
    let seen = f.host("host-s")["lastSeen"].as_u64().unwrap();
    assert!(
        ops_e2e::eventually(Duration::from_secs(20), || (f.host("host-s")["lastSeen"].as_u64().unwrap() > seen).then_some(())).is_some(),
        "keeps heartbeating"
    );
    let rollout = get_json(&f.meta.url("/rollout/ops-updater")).1;
    assert_eq!(rollout["halted"], false, "{rollout}");

    // 3.0 exits at once: its check fails, nothing is replaced, and it is not tried again.
    let md5 = f.self_tarball("3.0", b"#!/bin/sh\necho broken >&2\nexit 3\n");
    f.desire_self("2.0", "3.0", &md5);
    let refused = ops_e2e::eventually(Duration::from_secs(60), || {
        let a = f.self_agent("host-s");
        a["lastError"].as_str().filter(|e| e.starts_with("reverted: ops-updater 3.0: its check failed")).map(str::to_owned)
    });
    assert!(refused.is_some(), "{}\n{}", f.self_agent("host-s"), p.log());
    assert!(refused.unwrap().contains("broken"), "the check's last words are reported");
    assert_eq!(std::fs::read(&bin).unwrap(), original, "never replaced");
    assert_eq!(f.self_agent("host-s")["version"], "2.0");
    std::thread::sleep(Duration::from_secs(3));
    let log = p.log();
    assert_eq!(log.matches("self-update refused").count(), 1, "checked once, not every cycle:\n{log}");
    assert!(log.contains("not retried"), "{log}");
    assert_eq!(exe_of(pid), bin.display().to_string(), "still the same process");

    // 4.0 passes its check, then dies as soon as it runs for real: the process is gone, and
    // the guard puts the old binary back before the service starts again.
    let real = bin_dir.join("real-ops-updater");
    std::fs::write(&real, &original).unwrap();
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script =
        format!("#!/bin/sh\ncase \" $* \" in *\" --self-check \"*) exec {} \"$@\" ;; esac\necho dying >&2\nexit 7\n", real.display());
    let md5 = f.self_tarball("4.0", script.as_bytes());
    f.desire_self("2.0", "4.0", &md5);
    let status = p.wait_exit(Duration::from_secs(90));
    assert_eq!(status.code(), Some(7), "the new build ran in the updater's process and died:\n{}", p.log());
    assert_eq!(std::fs::read(&bin).unwrap(), script.as_bytes(), "the broken build is in place");
    let old = bin_dir.join("ops-updater.old");
    let mut guard_args = vec!["--self-update-guard"];
    guard_args.extend_from_slice(&args);
    let mut guard = Proc::start_path(&old, &guard_args);
    assert_eq!(guard.wait_exit(Duration::from_secs(20)).code(), Some(0), "{}", guard.log());
    assert_eq!(std::fs::read(&bin).unwrap(), original, "the old binary is back");
    assert_eq!(std::fs::read_to_string(f.work().join("ops-updater/.version")).unwrap().trim(), "2.0");
    let mut again = Proc::start_path(&bin, &args);
    let reverted = ops_e2e::eventually(Duration::from_secs(30), || {
        let a = f.self_agent("host-s");
        a["lastError"].as_str().filter(|e| e.starts_with("reverted: ops-updater 4.0")).map(|_| a.clone())
    });
    assert!(reverted.is_some(), "{}\n{}", f.self_agent("host-s"), again.log());
    assert_eq!(reverted.unwrap()["version"], "2.0");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!again.log().contains("re-executing"), "4.0 is not tried again:\n{}", again.log());

    // 5.0 passes its check, then runs for real without reaching any server: on probation, it
    // puts the old binary back at its deadline and execs it with the old arguments.
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in *\" --self-check \"*) exec {real} \"$@\" ;; esac\n\
         args=\"\"\nfor a in \"$@\"; do case \"$a\" in --server=*) ;; *) args=\"$args $a\" ;; esac; done\n\
         exec {real} $args --server=127.0.0.1:9\n",
        real = real.display()
    );
    let md5 = f.self_tarball("5.0", script.as_bytes());
    f.desire_self("2.0", "5.0", &md5);
    let pid = again.pid();
    let back = ops_e2e::eventually(Duration::from_secs(60), || {
        let a = f.self_agent("host-s");
        a["lastError"].as_str().filter(|e| e.starts_with("reverted: ops-updater 5.0")).map(|_| a.clone())
    });
    assert!(back.is_some(), "{}\n{}", f.self_agent("host-s"), again.log());
    let a = back.unwrap();
    assert!(a["lastError"].as_str().unwrap().contains("no heartbeat by its deadline"), "{a}");
    assert_eq!(a["version"], "2.0", "{a}");
    assert_eq!(std::fs::read(&bin).unwrap(), original, "the old binary is back in place");
    assert_eq!(exe_of(pid), bin.display().to_string(), "and runs in the same process");
    again.signal("TERM");
    again.wait_exit(Duration::from_secs(20));
}
