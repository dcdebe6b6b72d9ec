//! The real state of the hosts this node owns: soft state, each report superseding the last.
//!
//! Laid out to stay lean at a million hosts: 256 shards, each a `Mutex` over a slot vector and
//! a `HashTable` of slot indexes (4 bytes an entry, the hostname lives once, inline in the
//! slot when ≤ 24 bytes). Everything that repeats across hosts (agent names, versions, status
//! texts, users, directories) is interned into a 4-byte [`Sym`]. Free text that does not
//! repeat (`lastError`, a non-IPv4 address) lives in per-shard side tables that are empty in a
//! healthy fleet. A lock is held only to copy one host's state in or out, never across an
//! await.

use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use ops_config::wire::MAX_AGENTS_PER_HOST;
use ops_config::{ClassId, Heartbeat};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// Number of shards. A power of two; shard = bits 32..40 of the hostname hash, which neither
/// the table's bucket index (low bits) nor its tag (top 7 bits) uses.
pub const SHARDS: usize = 256;

mod handback;
mod host;
mod intern;
mod shard;

pub use host::*;
pub use intern::*;
pub use shard::*;

/// A host record with its side-table texts, as the snapshot reads and writes it.
pub struct HostRecord {
    pub host: Host,
    pub agents: Vec<AgentState>,
    pub errors: Vec<(u8, Box<str>)>,
    pub pins: Vec<(u8, Sym)>,
    pub other_ip: Option<Box<str>>,
}

/// The sharded store of real state.
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: DefaultHashBuilder,
    syms: Interner,
    /// A report was refused at the interner's limits since the last collection.
    strings_full: AtomicBool,
    /// Hosts dropped since the last collection (their strings may be unused now).
    dropped_since_collection: AtomicUsize,
    /// Unauthenticated reports of hosts whose record is authenticated, not stored.
    unauthenticated_ignored: std::sync::atomic::AtomicU64,
    /// Relay ids, by the index host records keep (index 0: the empty id, no relay).
    relays: Interner,
    hosts: AtomicUsize,
}

impl Default for Store {
    fn default() -> Self {
        Store::with_limits(InternLimits::default())
    }
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose interner holds at most what `limits` say.
    pub fn with_limits(limits: InternLimits) -> Self {
        Store {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: DefaultHashBuilder::default(),
            syms: Interner::with_limits(limits),
            strings_full: AtomicBool::new(false),
            dropped_since_collection: AtomicUsize::new(0),
            unauthenticated_ignored: Default::default(),
            relays: Interner::default(),
            hosts: AtomicUsize::new(0),
        }
    }

    /// Unauthenticated reports not stored because the host's record is authenticated.
    pub fn unauthenticated_ignored(&self) -> u64 {
        self.unauthenticated_ignored.load(Ordering::Relaxed)
    }

    /// Whether [`collect_strings`](Self::collect_strings) may find anything: strings were
    /// interned since the last one, hosts were dropped, or a report was refused at the limits.
    /// (A host moving to a version another host already reported can leave its old one unused
    /// with none of these: the caller also collects now and then regardless.)
    pub fn strings_want_collection(&self) -> bool {
        self.strings_full.load(Ordering::Relaxed)
            || self.dropped_since_collection.load(Ordering::Relaxed) > 0
            || self.syms.inner.read().added > 0
    }

    /// Frees the interned strings no host record uses any more (their symbols are reused);
    /// returns how many. One shard locked at a time; heartbeats go on meanwhile (see
    /// [`Interner`] for why none can store a freed symbol). Blocking: a scan of every record.
    pub fn collect_strings(&self) -> usize {
        let syms = &self.syms;
        let _pause = syms.pause.write();
        let epoch = {
            let _w = syms.inner.write();
            syms.epoch.fetch_add(1, Ordering::SeqCst).wrapping_add(1)
        };
        self.strings_full.store(false, Ordering::Relaxed);
        self.dropped_since_collection.store(0, Ordering::Relaxed);
        let end = syms.end();
        let mut marks = vec![0u64; end.div_ceil(64)];
        let mut mark = |s: Sym| {
            let i = s.0 as usize;
            if i < end {
                marks[i / 64] |= 1 << (i % 64);
            }
        };
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (_, h) in shard.hosts() {
                mark(h.run_user);
                mark(h.updater_version);
                for a in shard.agents(h) {
                    for s in [a.name, a.version, a.status, a.run_user, a.work_dir] {
                        mark(s);
                    }
                }
            }
            for &pin in shard.notes.pins.values() {
                mark(pin);
            }
        }
        let mut w = syms.inner.write();
        let w = &mut *w;
        let mut freed = 0;
        for i in 1..end {
            if marks[i / 64] & (1 << (i % 64)) != 0 || w.stamps[i].load(Ordering::Relaxed) == epoch {
                continue;
            }
            if let Some(s) = w.strings[i].take() {
                w.map.remove(&*s);
                w.bytes -= s.len();
                w.free.push(i as u32);
                freed += 1;
            }
        }
        w.added = 0;
        if w.map.capacity() > 4 * w.map.len() + 1024 {
            w.map.shrink_to_fit();
        }
        freed
    }

    /// Hosts held.
    pub fn len(&self) -> usize {
        self.hosts.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn symbols(&self) -> &Interner {
        &self.syms
    }

    /// The index host records keep for a relay id (interned on first sight; ids past the
    /// first 65,534 share [`OTHER_RELAYS`]).
    pub fn relay_index(&self, id: &str) -> u16 {
        if id.is_empty() {
            return NO_RELAY;
        }
        if let Some(sym) = self.relays.reader().get(id) {
            return u16::try_from(sym.0).unwrap_or(OTHER_RELAYS);
        }
        if self.relays.len() >= usize::from(OTHER_RELAYS) {
            return OTHER_RELAYS;
        }
        self.relays.intern(id).ok().and_then(|s| u16::try_from(s.0).ok()).unwrap_or(OTHER_RELAYS)
    }

    /// Every relay id by index (index 0: "", no relay); [`OTHER_RELAYS`] is past the end.
    pub fn relay_names(&self) -> Vec<Arc<str>> {
        let r = self.relays.reader();
        (0..self.relays.end().min(usize::from(OTHER_RELAYS))).map(|i| Arc::from(r.resolve(Sym(i as u32)))).collect()
    }

    /// The relay id of an index, as status shows it ("" for none; "(other relays)" for
    /// [`OTHER_RELAYS`]).
    pub fn relay_name(&self, index: u16) -> String {
        if index == OTHER_RELAYS {
            return "(other relays)".to_owned();
        }
        self.relays.reader().resolve(Sym(u32::from(index))).to_owned()
    }

    fn shard_of(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[((hash >> 32) as usize) & (SHARDS - 1)]
    }

    /// Records a validated heartbeat received at `now`, resolved to `class` under config
    /// generation `generation`, outside any rollout.
    pub fn upsert(&self, hb: &Heartbeat<'_>, now: u32, class: ClassId, generation: u32, owned: bool) -> Result<bool, InternFull> {
        self.upsert_tagged(hb, now, Tags { class, generation, told: 0, waves: 0, relay: NO_RELAY, auth: false }, owned)
    }

    /// Records a validated heartbeat received at `now` with how it was answered and resolved.
    /// The newest report wins: one older than the stored one is ignored (returns false). The
    /// heartbeat's agent count is at most 64 (validated). Err: a string of it is new and the
    /// interner is at its limits; nothing was stored.
    pub fn upsert_tagged(&self, hb: &Heartbeat<'_>, now: u32, tags: Tags, owned: bool) -> Result<bool, InternFull> {
        self.upsert_inner(hb, now, tags, owned, false)
    }

    /// Records a failover copy handed back by another node: like [`Store::upsert_tagged`], but
    /// only when strictly newer than what is held. Times are whole seconds, and on a tie the
    /// report this node took itself wins (it came straight from a relay; the copy may be the
    /// older of the two within that second).
    pub fn upsert_handed_back(&self, hb: &Heartbeat<'_>, now: u32, tags: Tags, owned: bool) -> Result<bool, InternFull> {
        self.upsert_inner(hb, now, tags, owned, true)
    }

    fn upsert_inner(&self, hb: &Heartbeat<'_>, now: u32, tags: Tags, owned: bool, strictly_newer: bool) -> Result<bool, InternFull> {
        loop {
            if let Some(kept) = self.try_upsert(hb, now, tags, owned, strictly_newer)? {
                return Ok(kept);
            }
        }
    }

    /// One try of [`Store::upsert_inner`]: None when a collection of strings ran between the
    /// lookups and the shard's lock (the caller tries again; see [`Interner`]).
    fn try_upsert(&self, hb: &Heartbeat<'_>, now: u32, tags: Tags, owned: bool, strictly_newer: bool) -> Result<Option<bool>, InternFull> {
        let Tags { class, generation, told, waves, relay, auth } = tags;
        let generation = short_generation(generation);
        let n = hb.real_agents.len().min(MAX_AGENTS_PER_HOST);
        let mut agents = [AgentState::default(); MAX_AGENTS_PER_HOST];
        let (run_user, updater_version, epoch);
        let mut pins = [Sym::EMPTY; MAX_AGENTS_PER_HOST];
        {
            let mut look = self.syms.lookup();
            let full = |e: InternFull| {
                self.strings_full.store(true, Ordering::Relaxed);
                e
            };
            for (slot, a) in agents.iter_mut().zip(&hb.real_agents) {
                *slot = AgentState {
                    name: look.sym(&a.name).map_err(full)?,
                    version: look.sym(&a.version).map_err(full)?,
                    status: look.sym(a.status.trim()).map_err(full)?,
                    run_user: look.sym(&a.run_user).map_err(full)?,
                    work_dir: look.sym(&a.work_dir).map_err(full)?,
                    timestamp: clamp_u32(a.timestamp),
                };
            }
            for (pin, a) in pins.iter_mut().zip(&hb.real_agents).filter(|(_, a)| !a.pinned.is_empty()) {
                *pin = look.sym(&a.pinned).map_err(full)?;
            }
            run_user = look.sym(&hb.run_user).map_err(full)?;
            updater_version = look.sym(&hb.updater_version).map_err(full)?;
            epoch = look.epoch;
        }
        let agents = &agents[..n];
        let note_mask = hb
            .real_agents
            .iter()
            .take(n)
            .enumerate()
            .filter(|(_, a)| !a.last_error.is_empty() || !a.pinned.is_empty())
            .fold(0u64, |m, (i, _)| m | (1 << i));
        let (ip_kind, ip) = match hb.ip.parse::<Ipv4Addr>() {
            _ if hb.ip.is_empty() => (IpKind::None, 0),
            Ok(v4) => (IpKind::V4, u32::from(v4)),
            Err(_) => (IpKind::Other, 0),
        };
        let class = u16::try_from(class.0).unwrap_or(u16::MAX);

        let name = &*hb.hostname;
        let hash = self.hasher.hash_one(name);
        let mut guard = self.shard_of(hash).lock();
        if self.syms.epoch() != epoch {
            return Ok(None);
        }
        let shard = &mut *guard;
        let slot = match shard.find(hash, name) {
            Some(slot) if shard.hosts[slot as usize].last_seen > now => return Ok(Some(false)),
            Some(slot) if strictly_newer && shard.hosts[slot as usize].last_seen == now => return Ok(Some(false)),
            Some(slot) if !auth && shard.hosts[slot as usize].authenticated() => {
                self.unauthenticated_ignored.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(false));
            }
            Some(slot) => {
                let host = &mut shard.hosts[slot as usize];
                if host.note_mask != 0 || host.ip_kind == IpKind::Other {
                    clear_side_tables(&mut shard.notes, &mut shard.other_ips, slot, host);
                }
                host.note_mask = note_mask;
                host.ip = ip;
                host.ip_kind = ip_kind;
                host.last_seen = now;
                host.run_user = run_user;
                host.updater_version = updater_version;
                host.generation = generation;
                host.relay = relay;
                host.class = class;
                host.told = told;
                host.waves = waves;
                let was = host.owned();
                host.flags = Host::flags_of(owned, auth);
                shard.count_owned(Some(was), Some(owned));
                shard.set_agents(slot, agents);
                slot
            }
            None => {
                let host = Host {
                    name: CompactString::from(name),
                    note_mask,
                    ip,
                    last_seen: now,
                    run_user,
                    updater_version,
                    generation,
                    relay,
                    class,
                    ip_kind,
                    flags: Host::flags_of(owned, auth),
                    agents_at: 0,
                    agents_len: 0,
                    told,
                    waves,
                };
                self.hosts.fetch_add(1, Ordering::Relaxed);
                shard.insert_new(hash, host, agents, &self.hasher)
            }
        };
        if note_mask != 0 {
            for (i, a) in hb.real_agents.iter().take(n).enumerate() {
                if !a.last_error.is_empty() {
                    shard.notes.errors.insert((slot, i as u8), a.last_error.as_ref().into());
                }
                if !a.pinned.is_empty() {
                    shard.notes.pins.insert((slot, i as u8), pins[i]);
                }
            }
        }
        if ip_kind == IpKind::Other {
            shard.other_ips.insert(slot, hb.ip.as_ref().into());
        }
        Ok(Some(true))
    }

    /// Inserts a record read from a snapshot (replacing a host of the same name).
    pub fn put(&self, rec: HostRecord) {
        if rec.host.name.is_empty() {
            return;
        }
        let hash = self.hasher.hash_one(rec.host.name.as_str());
        let mut shard = self.shard_of(hash).lock();
        if shard.put(hash, rec, &self.hasher) {
            self.hosts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the shard that holds `name`, with its slot if held.
    pub fn with_host<R>(&self, name: &str, f: impl FnOnce(&Shard, u32, &Host) -> R) -> Option<R> {
        let hash = self.hasher.hash_one(name);
        let shard = self.shard_of(hash).lock();
        let slot = shard.find(hash, name)?;
        Some(f(&shard, slot, &shard.hosts[slot as usize]))
    }

    /// Locks shard `i` (0..SHARDS) for a scan. Hold it briefly: heartbeats of that shard wait.
    pub fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].lock()
    }

    /// Compacts every shard whose slots are mostly free ([`Shard::compact`]), one at a time;
    /// returns how many. After failover copies went home or hosts were forgotten, this is
    /// what gives their memory back (with the allocator's trim, `crate::Node::sweep`).
    pub fn compact(&self) -> usize {
        let mut compacted = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            if shard.wants_compaction() {
                shard.compact(&self.hasher);
                compacted += 1;
            }
        }
        compacted
    }

    /// Clears the authenticated mark of `name`'s record (its credential was withdrawn): the
    /// judge stops counting it, and a report without a credential may replace it again.
    /// Returns whether a marked record was there.
    pub fn deauthenticate(&self, name: &str) -> bool {
        let hash = self.hasher.hash_one(name);
        let mut shard = self.shard_of(hash).lock();
        let Some(slot) = shard.find(hash, name) else { return false };
        let h = &mut shard.hosts[slot as usize];
        let was = h.authenticated();
        h.flags &= !Host::AUTHENTICATED;
        was
    }

    /// Drops hosts last seen before `cutoff`, and failover copies (not owned) last seen
    /// before `copies_cutoff`; returns how many.
    pub fn forget_before(&self, cutoff: u32, copies_cutoff: u32) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let old: Vec<u32> = shard
                .hosts()
                .filter(|(_, h)| h.last_seen < cutoff || (!h.owned() && h.last_seen < copies_cutoff))
                .map(|(slot, _)| slot)
                .collect();
            for slot in old {
                shard.remove_slot(slot, &self.hasher);
                dropped += 1;
            }
        }
        self.hosts.fetch_sub(dropped, Ordering::Relaxed);
        self.dropped_since_collection.fetch_add(dropped, Ordering::Relaxed);
        dropped
    }
}

#[cfg(test)]
mod tests;
