//! Loopback ports for servers that must be given a fixed address before they start (the nodes
//! of a cluster map, an nginx config), for the end-to-end tests and for ops-bench.
//!
//! Binding port 0 and closing the listener is a race: the kernel may hand the same port to the
//! next bind-to-0 (another pick, a server of another test started on port 0) or to an outgoing
//! connection before the server we meant it for binds it. CI saw two nodes of one cluster map
//! get the same port. A [`reserve`]d port cannot collide, for three reasons together:
//! - it lies **below the kernel's ephemeral range** (`ip_local_port_range`), so no bind to port
//!   0 and no outgoing connection of any process is ever given it;
//! - it is **never handed out twice within a process** (a process-wide set);
//! - it is **locked across processes** for the reserving process's life: an advisory lock on
//!   `$TMPDIR/ops-fleet-ports/PORT.lock`, which the kernel releases when the process dies (a
//!   killed test leaves no stale reservation), so a test and the ops-bench it starts, or two
//!   test binaries, never pick the same one;
//! - and it was free to bind when picked.
//!
//! What it cannot rule out is an unrelated program that binds a fixed port in that range after
//! the pick; callers retry once with new ports on "address in use" ([`is_addr_in_use`]).
//!
//! It must never hand out a port outside `127.0.0.1` use, and does no other I/O.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;

/// Ports handed out by this process, and the lock files that hold them across processes.
struct Held {
    ports: BTreeSet<u16>,
    locks: Vec<File>,
}

static HELD: Mutex<Held> = Mutex::new(Held { ports: BTreeSet::new(), locks: Vec::new() });

/// How many ports below the ephemeral range we choose from.
const SPAN: u16 = 12_000;

/// A loopback port that nobody else (in this process, in another process using this crate, or
/// the kernel's ephemeral allocation) will be handed while this process lives.
pub fn reserve() -> io::Result<u16> {
    let range = candidates();
    let len = range.end - range.start;
    let start = (RandomState::new().hash_one(std::process::id()) % u64::from(len)) as u16;
    let dir = lock_dir()?;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    for step in 0..len {
        let port = range.start + (start + step) % len;
        if held.ports.contains(&port) {
            continue;
        }
        let Some(lock) = claim(&dir, port)? else { continue };
        held.ports.insert(port);
        held.locks.push(lock);
        return Ok(port);
    }
    Err(io::Error::new(io::ErrorKind::AddrNotAvailable, format!("no free loopback port in {}..{}", range.start, range.end)))
}

/// Whether a server's start-up error text says its port was taken (tokio's and nginx's words).
pub fn is_addr_in_use(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("address already in use") || log.contains("(98:")
}

/// The ports to pick from: the `SPAN` ports below the ephemeral range (Linux's
/// `ip_local_port_range`), above the privileged ports.
fn candidates() -> Range<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    below(low)
}

fn below(ephemeral_low: u16) -> Range<u16> {
    let end = ephemeral_low.max(1024 + 1000);
    end.saturating_sub(SPAN).max(1024)..end
}

fn lock_dir() -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join("ops-fleet-ports");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The lock on `port`'s file when no other process holds it and the port can be bound now.
fn claim(dir: &std::path::Path, port: u16) -> io::Result<Option<File>> {
    let Some(lock) = try_lock(dir, port)? else { return Ok(None) };
    // SO_REUSEADDR as the servers bind (std and tokio set it): a port with connections in
    // TIME_WAIT is free for them, one with a listener is not.
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok().then_some(lock))
}

/// The lock on `port`'s file, or None when another process holds it.
fn try_lock(dir: &std::path::Path, port: u16) -> io::Result<Option<File>> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(format!("{port}.lock")))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_the_same_port_twice_and_never_an_ephemeral_one() {
        let range = candidates();
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let p = reserve().unwrap();
            assert!(range.contains(&p), "{p} outside {range:?}");
            assert!(seen.insert(p), "{p} handed out twice");
        }
    }

    #[test]
    fn picks_below_the_ephemeral_range() {
        assert_eq!(below(32_768), 20_768..32_768);
        assert_eq!(below(10_000), 1024..10_000);
        assert_eq!(below(1024), 1024..2024);
    }

    #[test]
    fn a_port_locked_by_another_process_is_skipped() {
        // Another process's lock, seen from here: the same file locked through another open
        // file description conflicts just as a lock of another process does.
        let dir = tempfile::tempdir().unwrap();
        let theirs = try_lock(dir.path(), 4242).unwrap().expect("free at first");
        assert!(try_lock(dir.path(), 4242).unwrap().is_none(), "a held lock is seen");
        drop(theirs);
        assert!(try_lock(dir.path(), 4242).unwrap().is_some(), "released when the holder goes");
    }

    #[test]
    fn a_port_with_a_listener_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        assert!(claim(dir.path(), port).unwrap().is_none(), "a listened port is not claimed");
        drop(taken);
        assert!(claim(dir.path(), port).unwrap().is_some(), "free again once closed");
    }

    #[test]
    fn address_in_use_is_recognised() {
        assert!(is_addr_in_use("cannot listen on 127.0.0.1:5: Address already in use (os error 98)"));
        assert!(is_addr_in_use("nginx: [emerg] bind() to 127.0.0.1:5 failed (98: Address in use)"));
        assert!(!is_addr_in_use("duplicate node addr 127.0.0.1:45181"));
    }
}
