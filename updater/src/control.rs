//! Running an agent's `./control` script: as its run user (through `sudo -n -u` when that is
//! not our own user), in its own process group, with a timeout that kills the whole group.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Most bytes of `./control status` output read.
const MAX_STATUS_OUTPUT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control {action} in {dir}: cannot run: {source}")]
    Spawn { action: &'static str, dir: String, source: std::io::Error },
    #[error("control {action} timed out after {secs}s (process group killed)")]
    Timeout { action: &'static str, secs: u64 },
    #[error("control {action} exited with {status}")]
    Failed { action: &'static str, status: std::process::ExitStatus },
}

/// The user this process runs as.
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name).unwrap_or_default()
}

/// Runs `./control {action}` in `dir`; returns its trimmed stdout (bounded).
pub async fn run(dir: &Path, action: &'static str, run_user: &str, timeout: Duration) -> Result<String, ControlError> {
    let mut cmd = if run_user.is_empty() || run_user == current_user() {
        let mut c = Command::new("./control");
        c.arg(action);
        c
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "-u", run_user, "--", "./control", action]);
        c
    };
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(if action == "status" { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // ETXTBSY: a script just written can stay open for writing in a child another thread
    // forked in between (until that child execs); it clears within milliseconds.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => break r.map_err(|source| ControlError::Spawn { action, dir: dir.display().to_string(), source })?,
        }
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let mut stdout = child.stdout.take();
    let work = async {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            // A daemon that keeps our pipe open must not hold us past the timeout either.
            let _ = s.take(MAX_STATUS_OUTPUT as u64).read_to_end(&mut out).await;
        }
        let status = child.wait().await;
        (status, out)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((Ok(status), out)) if status.success() || action == "status" => Ok(String::from_utf8_lossy(&out).trim().to_owned()),
        Ok((Ok(status), _)) => Err(ControlError::Failed { action, status }),
        Ok((Err(source), _)) => Err(ControlError::Spawn { action, dir: dir.display().to_string(), source }),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            Err(ControlError::Timeout { action, secs: timeout.as_secs() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) {
        let p = dir.join("control");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn status_output_is_captured_and_trimmed() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "echo '  started  '");
        assert_eq!(run(d.path(), "status", "", Duration::from_secs(10)).await.unwrap(), "started");
    }

    #[tokio::test]
    async fn failing_start_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "exit 3");
        assert!(matches!(run(d.path(), "start", "", Duration::from_secs(10)).await, Err(ControlError::Failed { .. })));
    }

    #[tokio::test]
    async fn hanging_script_and_its_children_are_killed_at_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("child.pid");
        script(d.path(), &format!("sleep 300 &\necho $! > {}\nwait", pidfile.display()));
        let started = std::time::Instant::now();
        let r = run(d.path(), "start", "", Duration::from_secs(2)).await;
        assert!(matches!(r, Err(ControlError::Timeout { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The background child was in the group: it is gone (or a zombie being reaped).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false);
        assert!(!alive, "child {pid} survived");
    }
}
