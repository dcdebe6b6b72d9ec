//! Failover copies and ownership: the copies a node holds for others, encoded as the compact
//! records a relay would have sent (so the receiver stores them as any report, newest
//! wins), the hosts a membership change moves, the `owned` flags a new map remarks, and a
//! copy dropped once it went home unchanged (`crate::handoff`, `crate::membership`).

use super::*;

impl Store {
    /// Failover copies held (hosts held here that another node owns).
    pub fn copies(&self) -> usize {
        self.shards.iter().map(|s| s.lock().foreign as usize).sum()
    }

    /// Calls `f(target, hostname, last_seen, record)` for each failover copy of shard `i`
    /// (0..SHARDS) that `dest` sends elsewhere, `record` being the copy as a compact record
    /// (`ops_config::compact`): what a relay would have sent, so the receiver stores it the
    /// way it stores any report (newest wins). The shard stays locked meanwhile: keep `f` short.
    pub fn encode_copies(&self, i: usize, dest: impl Fn(&str) -> Option<usize>, f: impl FnMut(usize, &str, u32, Vec<u8>)) {
        self.encode_held(i, false, dest, f)
    }

    /// The same for the hosts of shard `i` whose `owned` flag is `owned`: with `true`, the
    /// hosts a membership change moves away (`crate::membership`).
    pub fn encode_held(&self, i: usize, owned: bool, dest: impl Fn(&str) -> Option<usize>, mut f: impl FnMut(usize, &str, u32, Vec<u8>)) {
        let shard = self.shards[i].lock();
        if !owned && shard.foreign == 0 {
            return;
        }
        let syms = self.syms.reader();
        let relays = self.relays.reader();
        let mut agents = Vec::new();
        for (slot, h) in shard.hosts().filter(|(_, h)| h.owned() == owned) {
            let Some(target) = dest(&h.name) else { continue };
            agents.clear();
            agents.extend(shard.agents(h).iter().enumerate().map(|(k, a)| ops_config::wire::RealAgent {
                name: syms.resolve(a.name).into(),
                version: syms.resolve(a.version).into(),
                status: syms.resolve(a.status).into(),
                timestamp: i64::from(a.timestamp),
                run_user: syms.resolve(a.run_user).into(),
                work_dir: syms.resolve(a.work_dir).into(),
                last_error: shard.last_error(slot, h, k).unwrap_or("").into(),
                pinned: shard.pinned(slot, h, k).map_or("", |p| syms.resolve(p)).into(),
            }));
            let ip = match shard.ip(slot, h) {
                IpText::V4(v4) => std::borrow::Cow::Owned(v4.to_string()),
                IpText::Str(s) => std::borrow::Cow::Borrowed(s),
            };
            let hb = Heartbeat {
                hostname: h.name.as_str().into(),
                ip,
                run_user: syms.resolve(h.run_user).into(),
                updater_version: syms.resolve(h.updater_version).into(),
                real_agents: std::mem::take(&mut agents),
            };
            let mut record = Vec::with_capacity(256);
            // The relays past the table's end go on unnamed.
            let relay = if h.relay == OTHER_RELAYS { "" } else { relays.resolve(Sym(u32::from(h.relay))) };
            // A copy keeps whether it was authenticated (its serial is not kept: 0).
            let rec = ops_config::compact::Record { seen: h.last_seen, told: h.told, relay, auth: h.authenticated().then_some(0) };
            ops_config::compact::encode(rec, &hb, &mut record);
            f(target, &h.name, h.last_seen, record);
            agents = hb.real_agents;
        }
    }

    /// Sets every host's `owned` flag to `owns(hostname)` (a new cluster map); returns how
    /// many changed. One shard locked at a time.
    pub fn remark_owned(&self, owns: impl Fn(&str) -> bool) -> usize {
        let mut changed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let flips: Vec<(u32, bool)> =
                shard.hosts().filter_map(|(slot, h)| (owns(&h.name) != h.owned()).then_some((slot, !h.owned()))).collect();
            for (slot, now) in flips {
                let was = shard.hosts[slot as usize].set_owned(now);
                shard.count_owned(Some(was), Some(now));
                changed += 1;
            }
        }
        changed
    }

    /// Drops the failover copy of `name` if it is still a copy last seen at `seen` (one that
    /// reported again meanwhile stays, to go home with the next hand-back). Returns whether
    /// it was dropped.
    pub fn drop_copy(&self, name: &str, seen: u32) -> bool {
        let hash = self.hasher.hash_one(name);
        let mut shard = self.shard_of(hash).lock();
        let Some(slot) = shard.find(hash, name) else { return false };
        let h = &shard.hosts[slot as usize];
        if h.owned() || h.last_seen != seen {
            return false;
        }
        shard.remove_slot(slot, &self.hasher);
        self.hosts.fetch_sub(1, Ordering::Relaxed);
        self.dropped_since_collection.fetch_add(1, Ordering::Relaxed);
        true
    }
}
