//! Hosts of their own for the partition tests: one network namespace per process, made here
//! with `ip netns` (iproute2; root with CAP_NET_ADMIN), joined by veth pairs to a bridge in a
//! hub namespace, on the private subnet 10.77.0.0/24, which exists only inside them. A
//! partition is a pair of blackhole routes (each side drops what it would send the other);
//! healing deletes them. Everything is removed on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::Proc;

/// A set of namespaces: `hub` holds the bridge, every member one address on it.
pub struct Net {
    hub: String,
    members: Vec<(String, Ipv4Addr)>,
    cut: Vec<(usize, usize)>,
}

/// Runs `ip args...`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (the partition tests need root with CAP_NET_ADMIN and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Net {
    /// Makes the hub and one namespace per name in `names`, member `i` at 10.77.0.`10+i`.
    pub fn new(names: &[&str]) -> Net {
        // One set per test process and call: names never meet another run's.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("opsf{}x{n}", std::process::id());
        let hub = format!("{prefix}-hub");
        let mut net = Net { hub: hub.clone(), members: Vec::new(), cut: Vec::new() };
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            let addr = Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(i).expect("at most 240 members"));
            ip(&["netns", "add", &ns]);
            net.members.push((ns.clone(), addr));
            let hub_end = format!("v{i}");
            ip(&["link", "add", &hub_end, "netns", &hub, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// Member `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.members[i].1
    }

    /// Member `i`'s namespace name (for `ip netns exec`).
    pub fn ns(&self, i: usize) -> &str {
        &self.members[i].0
    }

    /// Moves the calling thread into member `i`'s namespace: every socket it opens from now
    /// on, and every thread and process it starts, are there. The test's own clients live in
    /// a member of their own this way.
    pub fn enter(&self, i: usize) {
        let file = std::fs::File::open(PathBuf::from("/run/netns").join(self.ns(i))).expect("open the namespace");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns (needs CAP_SYS_ADMIN)");
    }

    /// Starts the workspace binary `bin` with `args` inside member `i`'s namespace.
    pub fn start(&self, i: usize, bin: &str, args: &[&str]) -> Proc {
        let path = crate::binary(bin).display().to_string();
        let mut all = vec!["netns", "exec", self.ns(i), path.as_str()];
        all.extend_from_slice(args);
        Proc::start_path(std::path::Path::new("ip"), &all)
    }

    /// Cuts members `a` and `b` apart, both ways: each drops what it would send the other.
    pub fn cut(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            ip(&["-n", self.ns(x), "route", "add", "blackhole", &format!("{}/32", self.addr(y))]);
        }
        self.cut.push((a, b));
    }

    /// Cuts member `a` from every member in `others`.
    pub fn isolate(&mut self, a: usize, others: &[usize]) {
        others.iter().for_each(|&b| self.cut(a, b));
    }

    /// Removes every cut.
    pub fn heal(&mut self) {
        for (a, b) in std::mem::take(&mut self.cut) {
            for (x, y) in [(a, b), (b, a)] {
                ip(&["-n", self.ns(x), "route", "del", "blackhole", &format!("{}/32", self.addr(y))]);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (ns, _) in &self.members {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.hub]).status();
    }
}
