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

/// An interned string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Sym(pub(crate) u32);

impl Sym {
    /// The empty string, interned at index 0 by every interner.
    pub const EMPTY: Sym = Sym(0);
}

/// Limits on what the interner holds, each refused with [`InternFull`] when reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InternLimits {
    /// Distinct strings held at once.
    pub max_strings: usize,
    /// Bytes of text held at once (the strings' lengths summed).
    pub max_bytes: usize,
}

impl InternLimits {
    /// No limit: the relay-id table, which caps itself ([`OTHER_RELAYS`]).
    pub const NONE: InternLimits = InternLimits { max_strings: usize::MAX, max_bytes: usize::MAX };
}

impl Default for InternLimits {
    fn default() -> Self {
        InternLimits { max_strings: 4_000_000, max_bytes: 256 << 20 }
    }
}

/// A string the interner could not take: it is at one of its [`InternLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "interned strings at their cap ({strings} strings, {bytes} bytes held; --max-interned-strings {max_strings}, --max-interned-bytes {max_bytes}): report refused"
)]
pub struct InternFull {
    pub strings: usize,
    pub bytes: usize,
    pub max_strings: usize,
    pub max_bytes: usize,
}

#[derive(Default)]
struct InternerInner {
    map: HashMap<Arc<str>, Sym>,
    /// By symbol; `None`: freed, its index on `free` for the next new string.
    strings: Vec<Option<Arc<str>>>,
    /// By symbol: the collection epoch in which it was last looked up ([`Interner::collect`]).
    stamps: Vec<AtomicU32>,
    free: Vec<u32>,
    /// Bytes of the strings held.
    bytes: usize,
    /// Strings interned since the last collection.
    added: usize,
}

/// String interner whose strings no record uses any more are freed by [`Store::collect_strings`].
/// Reads take a shared lock once per heartbeat or per scanned shard; a write happens only for a
/// string never seen before.
///
/// Freeing races a heartbeat that looked a string up but has not stored it yet: each lookup
/// stamps the string with the current epoch; a collection first moves the epoch on (under the
/// write lock), then marks what the records use, then frees only strings neither marked nor
/// stamped with the new epoch; and a store checks, under its shard's lock, that the epoch its
/// lookups ran in is still current (else it looks them up again). A lookup of the old epoch
/// that passed that check was stored before its shard was marked.
pub struct Interner {
    inner: RwLock<InternerInner>,
    epoch: AtomicU32,
    limits: InternLimits,
    /// Held shared by everything that keeps symbols across a lock (scans, snapshots), and
    /// exclusively by a collection.
    pause: RwLock<()>,
}

impl Default for Interner {
    fn default() -> Self {
        Interner::with_limits(InternLimits::NONE)
    }
}

impl Interner {
    pub fn with_limits(limits: InternLimits) -> Self {
        let interner = Interner { inner: RwLock::new(InternerInner::default()), epoch: AtomicU32::new(0), limits, pause: RwLock::new(()) };
        {
            let mut w = interner.inner.write();
            let s: Arc<str> = Arc::from("");
            w.strings.push(Some(s.clone()));
            w.stamps.push(AtomicU32::new(0));
            w.map.insert(s, Sym::EMPTY);
        }
        interner
    }

    /// The symbol of `s`, interned on first sight; Err when the limits are reached.
    pub fn intern(&self, s: &str) -> Result<Sym, InternFull> {
        if let Some(&sym) = self.inner.read().map.get(s) {
            return Ok(sym);
        }
        let mut w = self.inner.write();
        if let Some(&sym) = w.map.get(s) {
            return Ok(sym);
        }
        let held = w.strings.len() - w.free.len();
        if held >= self.limits.max_strings || w.bytes.saturating_add(s.len()) > self.limits.max_bytes {
            return Err(InternFull {
                strings: held,
                bytes: w.bytes,
                max_strings: self.limits.max_strings,
                max_bytes: self.limits.max_bytes,
            });
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let s: Arc<str> = Arc::from(s);
        let sym = match w.free.pop() {
            Some(i) => {
                w.strings[i as usize] = Some(s.clone());
                w.stamps[i as usize].store(epoch, Ordering::Relaxed);
                Sym(i)
            }
            None => {
                let sym = Sym(u32::try_from(w.strings.len()).expect("fewer than 2^32 distinct strings"));
                w.strings.push(Some(s.clone()));
                w.stamps.push(AtomicU32::new(epoch));
                sym
            }
        };
        w.bytes += s.len();
        w.added += 1;
        w.map.insert(s, sym);
        Ok(sym)
    }

    /// A shared view for resolving many symbols at once.
    pub fn reader(&self) -> Symbols<'_> {
        Symbols { guard: self.inner.read() }
    }

    /// Strings held.
    pub fn len(&self) -> usize {
        let r = self.inner.read();
        r.strings.len() - r.free.len()
    }

    /// Bytes of the strings held.
    pub fn bytes(&self) -> usize {
        self.inner.read().bytes
    }

    /// One past the highest symbol in use (what a table by symbol needs).
    pub fn end(&self) -> usize {
        self.inner.read().strings.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Keeps every symbol valid while held (no collection frees one): hold it across a scan
    /// that resolves symbols it read under an earlier lock, or keeps them in a table.
    pub fn pause(&self) -> RwLockReadGuard<'_, ()> {
        self.pause.read_recursive()
    }

    /// Looks up many strings under one shared lock, interning the missing ones.
    fn lookup(&self) -> Lookup<'_> {
        let guard = self.inner.read();
        let epoch = self.epoch.load(Ordering::SeqCst);
        Lookup { interner: self, guard: Some(guard), epoch }
    }

    fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::SeqCst)
    }
}

/// Resolves symbols while holding the interner's shared lock.
pub struct Symbols<'a> {
    guard: RwLockReadGuard<'a, InternerInner>,
}

impl Symbols<'_> {
    pub fn resolve(&self, sym: Sym) -> &str {
        self.guard.strings.get(sym.0 as usize).and_then(Option::as_deref).unwrap_or("")
    }

    pub fn get(&self, s: &str) -> Option<Sym> {
        self.guard.map.get(s).copied()
    }
}

struct Lookup<'a> {
    interner: &'a Interner,
    guard: Option<RwLockReadGuard<'a, InternerInner>>,
    /// The epoch the lookups ran in (a store checks it is still current).
    epoch: u32,
}

impl Lookup<'_> {
    fn sym(&mut self, s: &str) -> Result<Sym, InternFull> {
        if s.is_empty() {
            return Ok(Sym::EMPTY);
        }
        if let Some(g) = self.guard.as_ref()
            && let Some(&sym) = g.map.get(s)
        {
            let stamp = &g.stamps[sym.0 as usize];
            if stamp.load(Ordering::Relaxed) != self.epoch {
                stamp.store(self.epoch, Ordering::Relaxed);
            }
            return Ok(sym);
        }
        self.guard = None;
        let sym = self.interner.intern(s);
        self.guard = Some(self.interner.inner.read());
        sym
    }
}

/// One agent's last reported state on one host: 24 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentState {
    pub name: Sym,
    pub version: Sym,
    pub status: Sym,
    pub run_user: Sym,
    pub work_dir: Sym,
    /// The updater's timestamp for this agent (unix seconds, clamped to u32).
    pub timestamp: u32,
}

/// How a host's `ip` field was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IpKind {
    None = 0,
    V4 = 1,
    /// Anything else (IPv6, a name): kept as text in the shard's side table.
    Other = 2,
}

/// One host's last report. An empty `name` marks a free slot. Its agents live in the shard's
/// agent arena ([`Shard::agents`]).
#[derive(Debug)]
pub struct Host {
    pub name: CompactString,
    /// Bit i set: agent i reported a `lastError` or a local pin, or both (kept in the shard's
    /// side tables, so hosts without either cost nothing more).
    pub note_mask: u64,
    pub ip: u32,
    /// Server time of the last report, unix seconds.
    pub last_seen: u32,
    pub run_user: Sym,
    pub updater_version: Sym,
    /// Config generation `class` was resolved under, shortened ([`short_generation`]).
    pub generation: u16,
    /// The relay the last report came through, by index in the store's relay table
    /// ([`Store::relay_index`]; 0: none, straight to a meta node).
    pub relay: u16,
    /// Where the host's agents start in the shard's arena (set by the shard).
    pub(crate) agents_at: u32,
    pub class: u16,
    pub ip_kind: IpKind,
    /// [`Host::OWNED`], [`Host::AUTHENTICATED`].
    pub(crate) flags: u8,
    pub(crate) agents_len: u8,
    /// Rollout mask of the last answer (bit r: told rollout r's target), as the relay said.
    pub told: u8,
    /// The host's wave in each rollout, 4 bits per rollout (`DesiredConfig::rollout_waves`),
    /// valid for `generation` like `class`.
    pub waves: u16,
}

/// How a report was answered and resolved, stored with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tags {
    pub class: ClassId,
    /// Config generation `class` and `waves` were resolved under.
    pub generation: u32,
    pub told: u8,
    pub waves: u16,
    /// The relay it came through ([`Store::relay_index`]).
    pub relay: u16,
    /// The report carried a checked host credential. An unauthenticated report never replaces
    /// an authenticated one (anyone who reaches `/heartbeat` can send it).
    pub auth: bool,
}

/// A config generation (counted from 1 by each node, `ops_serve::desired`) as a host record keeps
/// it, in 2 bytes: 1..=65535, 0 staying "none". Two generations 65,535 reloads apart look the
/// same; a record is resolved again at its host's next report, so that would take 65,535
/// reloads between two reports of one host.
pub fn short_generation(generation: u32) -> u16 {
    if generation == 0 { 0 } else { ((generation - 1) % u32::from(u16::MAX)) as u16 + 1 }
}

/// The relay index of a report that came through no relay (or a relay id given none).
pub const NO_RELAY: u16 = 0;
/// The relay index every relay id past the first 65,534 shares.
pub const OTHER_RELAYS: u16 = u16::MAX;

/// [`Store::relay_index`] over the records of one batch: a relay's batch names one relay
/// throughout, so the table is asked once per change of id, not once per record.
pub struct RelayIndexes<'s> {
    store: &'s Store,
    last: Option<(String, u16)>,
}

impl<'s> RelayIndexes<'s> {
    pub fn new(store: &'s Store) -> Self {
        RelayIndexes { store, last: None }
    }

    pub fn index(&mut self, id: &str) -> u16 {
        match &self.last {
            Some((last, index)) if last == id => *index,
            _ => {
                let index = self.store.relay_index(id);
                self.last = Some((id.to_owned(), index));
                index
            }
        }
    }
}

/// Host records by slot, in fixed chunks of [`CHUNK`]: slots never move, and a shard has at
/// most one chunk partly used. (A doubling `Vec` left about a quarter of a shard's records
/// unused on average, and growing it by smaller steps fragmented the heap: measured with the
/// `store_memory` bench.)
#[derive(Default)]
struct Slots {
    chunks: Vec<Vec<Host>>,
    len: usize,
}

const CHUNK: usize = 64;

impl Slots {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, host: Host) {
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(host);
        }
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = &Host> {
        self.chunks.iter().flatten()
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Host;
    fn index(&self, i: usize) -> &Host {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl std::ops::IndexMut<usize> for Slots {
    fn index_mut(&mut self, i: usize) -> &mut Host {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

/// The agents of a shard's hosts, each host's in one contiguous run, in fixed chunks: no
/// allocation per host (a boxed slice per host cost a pointer, a length and an allocator
/// header, and a scan chased a pointer per host). A run left behind when a host's agent count
/// changes or the host goes is counted as garbage; the shard compacts when it piles up.
#[derive(Default)]
struct AgentArena {
    chunks: Vec<Vec<AgentState>>,
    live: usize,
    garbage: usize,
}

/// Agents per arena chunk (6 KiB); a host's run never spans two chunks (at most 64 agents).
const ARENA_CHUNK: usize = 256;

impl AgentArena {
    /// The chunk and the range in it of the run at `at` of `len` agents.
    fn locate(at: u32, len: u8) -> (usize, std::ops::Range<usize>) {
        let (c, off) = (at as usize / ARENA_CHUNK, at as usize % ARENA_CHUNK);
        (c, off..off + usize::from(len))
    }

    fn get(&self, at: u32, len: u8) -> &[AgentState] {
        if len == 0 {
            return &[];
        }
        let (c, range) = Self::locate(at, len);
        &self.chunks[c][range]
    }

    fn get_mut(&mut self, at: u32, len: u8) -> &mut [AgentState] {
        if len == 0 {
            return &mut [];
        }
        let (c, range) = Self::locate(at, len);
        &mut self.chunks[c][range]
    }

    fn alloc(&mut self, agents: &[AgentState]) -> u32 {
        if agents.is_empty() {
            return 0;
        }
        if self.chunks.last().is_none_or(|c| c.len() + agents.len() > ARENA_CHUNK) {
            self.chunks.push(Vec::with_capacity(ARENA_CHUNK));
        }
        let c = self.chunks.len() - 1;
        let chunk = &mut self.chunks[c];
        let at = c * ARENA_CHUNK + chunk.len();
        chunk.extend_from_slice(agents);
        self.live += agents.len();
        at as u32
    }

    fn release(&mut self, len: u8) {
        self.live -= usize::from(len);
        self.garbage += usize::from(len);
    }

    fn wants_compaction(&self) -> bool {
        self.garbage > ARENA_CHUNK && self.garbage > self.live / 2
    }
}

/// A per-host, per-rollout table of the rollout judge: `(slot, rollout)` → a u32.
pub type SlotTable = HashMap<(u32, u8), u32>;

/// A slice of the store behind one lock.
#[derive(Default)]
pub struct Shard {
    index: HashTable<u32>,
    hosts: Slots,
    agents: AgentArena,
    free: Vec<u32>,
    notes: Notes,
    other_ips: HashMap<u32, Box<str>>,
    /// `(slot, rollout)` → when a rollout judgement first saw the host told the target and not
    /// converged (for the deadline). Holds only hosts in flight or failing.
    told_at: HashMap<(u32, u8), u32>,
    /// `(slot, rollout)` → the rollout (an id of its agent and target) in which the host was
    /// judged failed: kept after a halt answers it `from` again, so the failures of a rollout
    /// stay counted. Holds only hosts that failed.
    failed_in: HashMap<(u32, u8), u32>,
    /// Live hosts here that this node does not own (failover copies). Usually 0, so a scan of
    /// the copies skips the shard without walking it.
    foreign: u32,
}

impl Shard {
    /// The agents `host` (of this shard) reported, in its order.
    pub fn agents(&self, host: &Host) -> &[AgentState] {
        self.agents.get(host.agents_at, host.agents_len)
    }

    /// Position of an agent of `host` by interned name.
    pub fn agent(&self, host: &Host, name: Sym) -> Option<usize> {
        self.agents(host).iter().position(|a| a.name == name)
    }

    /// Gives the host in `slot` these agents: in place when the count is unchanged.
    fn set_agents(&mut self, slot: u32, agents: &[AgentState]) {
        let (at, len) = {
            let h = &self.hosts[slot as usize];
            (h.agents_at, h.agents_len)
        };
        if usize::from(len) == agents.len() {
            self.agents.get_mut(at, len).copy_from_slice(agents);
            return;
        }
        self.agents.release(len);
        let at = self.agents.alloc(agents);
        let h = &mut self.hosts[slot as usize];
        h.agents_at = at;
        h.agents_len = agents.len() as u8;
        self.compact_agents_if_needed();
    }

    /// Copies every live host's agents into a fresh arena once garbage outweighs them.
    fn compact_agents_if_needed(&mut self) {
        if self.agents.wants_compaction() {
            self.compact_agents();
        }
    }

    /// Whether most of this shard's slots are free (hosts forgotten, failover copies gone
    /// home): [`Shard::compact`] would give their memory back.
    fn wants_compaction(&self) -> bool {
        let free = self.free.len();
        // A quarter of the live hosts: after a failover a survivor's copies are about half
        // its own hosts, and after they go home every shard is a third free.
        free > CHUNK && free > (self.hosts.len() - free) / 4
    }

    /// Moves the live hosts into fresh slots, none free, and renumbers every table keyed by
    /// slot; rebuilds the index and the agent arena at their size. Slot numbers are valid only
    /// under the shard's lock, so nothing outside sees the renumbering.
    fn compact(&mut self, hasher: &DefaultHashBuilder) {
        let old = std::mem::take(&mut self.hosts);
        let mut renumbered = vec![u32::MAX; old.len()];
        let mut fresh = Slots::default();
        for (i, chunk) in old.chunks.into_iter().enumerate() {
            for (j, h) in chunk.into_iter().enumerate() {
                if !h.name.is_empty() {
                    renumbered[i * CHUNK + j] = fresh.len() as u32;
                    fresh.push(h);
                }
            }
        }
        let to = |slot: u32| renumbered[slot as usize];
        let mut index = HashTable::with_capacity(fresh.len());
        for (slot, h) in fresh.iter().enumerate() {
            index.insert_unique(hasher.hash_one(h.name.as_str()), slot as u32, |&s| hasher.hash_one(fresh[s as usize].name.as_str()));
        }
        self.index = index;
        self.hosts = fresh;
        self.free = Vec::new();
        self.notes.errors = std::mem::take(&mut self.notes.errors).into_iter().map(|((s, a), v)| ((to(s), a), v)).collect();
        self.notes.pins = std::mem::take(&mut self.notes.pins).into_iter().map(|((s, a), v)| ((to(s), a), v)).collect();
        self.other_ips = std::mem::take(&mut self.other_ips).into_iter().map(|(s, v)| (to(s), v)).collect();
        self.told_at = std::mem::take(&mut self.told_at).into_iter().map(|((s, r), v)| ((to(s), r), v)).collect();
        self.failed_in = std::mem::take(&mut self.failed_in).into_iter().map(|((s, r), v)| ((to(s), r), v)).collect();
        self.compact_agents();
    }

    fn compact_agents(&mut self) {
        let mut fresh = AgentArena::default();
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            if h.name.is_empty() {
                continue;
            }
            let at = fresh.alloc(self.agents.get(h.agents_at, h.agents_len));
            self.hosts[i].agents_at = at;
        }
        self.agents = fresh;
    }

    /// Failover copies held in this shard.
    pub fn foreign(&self) -> u32 {
        self.foreign
    }

    /// Keeps `foreign` right when a live host's `owned` goes from `was` to `now`.
    fn count_owned(&mut self, was: Option<bool>, now: Option<bool>) {
        if was == Some(false) {
            self.foreign -= 1;
        }
        if now == Some(false) {
            self.foreign += 1;
        }
    }

    /// Live hosts with their slot numbers.
    pub fn hosts(&self) -> impl Iterator<Item = (u32, &Host)> {
        self.hosts.iter().enumerate().filter(|(_, h)| !h.name.is_empty()).map(|(i, h)| (i as u32, h))
    }

    /// When hosts of this shard were first seen told a rollout's target and not converged,
    /// by `(slot, rollout)`: kept by the rollout judge, cleared when a slot is freed.
    pub fn told_at_mut(&mut self) -> &mut HashMap<(u32, u8), u32> {
        &mut self.told_at
    }

    /// The rollout judge's two tables: `told_at` (see [`told_at_mut`](Self::told_at_mut)) and
    /// `(slot, rollout)` → the id of the rollout in which the host failed.
    pub fn rollout_tables_mut(&mut self) -> (&mut SlotTable, &mut SlotTable) {
        (&mut self.told_at, &mut self.failed_in)
    }

    /// The `lastError` an agent (by position) of the host in `slot` reported, if any.
    pub fn last_error(&self, slot: u32, host: &Host, agent: usize) -> Option<&str> {
        if host.note_mask & (1 << agent) == 0 {
            return None;
        }
        self.notes.errors.get(&(slot, agent as u8)).map(|s| &**s)
    }

    /// The local pin an agent (by position) of the host in `slot` reported (`hold` or a
    /// version), if any.
    pub fn pinned(&self, slot: u32, host: &Host, agent: usize) -> Option<Sym> {
        if host.note_mask & (1 << agent) == 0 {
            return None;
        }
        self.notes.pins.get(&(slot, agent as u8)).copied()
    }

    /// The host's `ip` field as reported.
    pub fn ip(&self, slot: u32, host: &Host) -> IpText<'_> {
        match host.ip_kind {
            IpKind::None => IpText::Str(""),
            IpKind::V4 => IpText::V4(Ipv4Addr::from(host.ip)),
            IpKind::Other => IpText::Str(self.other_ips.get(&slot).map_or("", |s| s)),
        }
    }

    fn find(&self, hash: u64, name: &str) -> Option<u32> {
        self.index.find(hash, |&slot| self.hosts[slot as usize].name == name).copied()
    }

    fn remove_slot(&mut self, slot: u32, hasher: &DefaultHashBuilder) {
        let host = &mut self.hosts[slot as usize];
        let hash = hasher.hash_one(host.name.as_str());
        if let Ok(entry) = self.index.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
        clear_side_tables(&mut self.notes, &mut self.other_ips, slot, host);
        if !self.told_at.is_empty() || !self.failed_in.is_empty() {
            for r in 0..ops_config::MAX_ROLLOUTS as u8 {
                self.told_at.remove(&(slot, r));
                self.failed_in.remove(&(slot, r));
            }
        }
        let was = host.owned();
        self.agents.release(host.agents_len);
        *host = Host::free();
        self.free.push(slot);
        self.count_owned(Some(was), None);
    }

    /// Inserts or replaces a whole host record (snapshot load). Returns true if it was new.
    fn put(&mut self, hash: u64, rec: HostRecord, hasher: &DefaultHashBuilder) -> bool {
        let HostRecord { mut host, agents, errors, pins, other_ip } = rec;
        let (slot, new) = match self.find(hash, &host.name) {
            Some(slot) => {
                let old = &self.hosts[slot as usize];
                clear_side_tables(&mut self.notes, &mut self.other_ips, slot, old);
                let (was, now) = (old.owned(), host.owned());
                (host.agents_at, host.agents_len) = (old.agents_at, old.agents_len);
                self.hosts[slot as usize] = host;
                self.count_owned(Some(was), Some(now));
                self.set_agents(slot, &agents);
                (slot, false)
            }
            None => (self.insert_new(hash, host, &agents, hasher), true),
        };
        for (i, e) in errors {
            self.notes.errors.insert((slot, i), e);
        }
        for (i, pin) in pins {
            self.notes.pins.insert((slot, i), pin);
        }
        if let Some(ip) = other_ip {
            self.other_ips.insert(slot, ip);
        }
        new
    }

    fn insert_new(&mut self, hash: u64, mut host: Host, agents: &[AgentState], hasher: &DefaultHashBuilder) -> u32 {
        self.count_owned(None, Some(host.owned()));
        host.agents_at = self.agents.alloc(agents);
        host.agents_len = agents.len() as u8;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.hosts[slot as usize] = host;
                slot
            }
            None => {
                self.hosts.push(host);
                (self.hosts.len() - 1) as u32
            }
        };
        let hosts = &self.hosts;
        self.index.insert_unique(hash, slot, |&s| hasher.hash_one(hosts[s as usize].name.as_str()));
        slot
    }
}

/// The rare per-agent texts, by `(slot, agent position)`: only agents whose bit is set in
/// their host's `note_mask` have an entry in either.
#[derive(Default)]
struct Notes {
    errors: HashMap<(u32, u8), Box<str>>,
    pins: HashMap<(u32, u8), Sym>,
}

fn clear_side_tables(notes: &mut Notes, other_ips: &mut HashMap<u32, Box<str>>, slot: u32, host: &Host) {
    let mut mask = host.note_mask;
    while mask != 0 {
        let i = mask.trailing_zeros() as u8;
        notes.errors.remove(&(slot, i));
        notes.pins.remove(&(slot, i));
        mask &= mask - 1;
    }
    if host.ip_kind == IpKind::Other {
        other_ips.remove(&slot);
    }
}

/// The text of a host's `ip` field.
#[derive(Debug, Clone, Copy)]
pub enum IpText<'a> {
    V4(Ipv4Addr),
    Str(&'a str),
}

impl std::fmt::Display for IpText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpText::V4(ip) => ip.fmt(f),
            IpText::Str(s) => f.write_str(s),
        }
    }
}

impl Host {
    /// This node owns the host on the ring (clear: a failover copy).
    pub const OWNED: u8 = 1;
    /// Its last report carried a host credential that was checked (`ops_config::enroll`).
    pub const AUTHENTICATED: u8 = 2;

    pub fn flags_of(owned: bool, authenticated: bool) -> u8 {
        (if owned { Host::OWNED } else { 0 }) | (if authenticated { Host::AUTHENTICATED } else { 0 })
    }

    /// This node owns the host on the ring (false: a failover copy).
    pub fn owned(&self) -> bool {
        self.flags & Host::OWNED != 0
    }

    /// Its last report carried a checked host credential.
    pub fn authenticated(&self) -> bool {
        self.flags & Host::AUTHENTICATED != 0
    }

    /// Sets `owned`; returns what it was.
    fn set_owned(&mut self, owned: bool) -> bool {
        let was = self.owned();
        self.flags = (self.flags & !Host::OWNED) | if owned { Host::OWNED } else { 0 };
        was
    }

    fn free() -> Host {
        Host {
            name: CompactString::default(),
            note_mask: 0,
            ip: 0,
            last_seen: 0,
            run_user: Sym::EMPTY,
            updater_version: Sym::EMPTY,
            generation: 0,
            relay: NO_RELAY,
            class: 0,
            ip_kind: IpKind::None,
            flags: Host::OWNED,
            agents_at: 0,
            agents_len: 0,
            told: 0,
            waves: 0,
        }
    }
}

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
mod tests {
    use super::*;

    fn hb(body: &str) -> Heartbeat<'_> {
        Heartbeat::parse(body.as_bytes()).unwrap()
    }

    fn foreign_total(store: &Store) -> u32 {
        (0..SHARDS).map(|i| store.shard(i).foreign()).sum()
    }

    #[test]
    fn foreign_count_follows_copies_in_and_out() {
        let store = Store::new();
        let a = hb(r#"{"hostname":"a","realAgents":[]}"#);
        let b = hb(r#"{"hostname":"b","realAgents":[]}"#);
        store.upsert(&a, 10, ClassId(0), 1, true).unwrap();
        assert_eq!(foreign_total(&store), 0);
        store.upsert(&b, 10, ClassId(0), 1, false).unwrap();
        store.upsert(&b, 11, ClassId(0), 1, false).unwrap();
        assert_eq!(foreign_total(&store), 1, "a copy counts once however often it reports");
        store.upsert(&a, 12, ClassId(0), 1, false).unwrap();
        assert_eq!(foreign_total(&store), 2);
        store.upsert(&a, 13, ClassId(0), 1, true).unwrap();
        assert_eq!(foreign_total(&store), 1, "owned again");
        // Copies are forgotten sooner than owned hosts.
        assert_eq!(store.forget_before(0, 12), 1);
        assert_eq!(foreign_total(&store), 0);
        assert_eq!(store.len(), 1);
    }

    /// A copy goes out as the compact record of its last report, and is dropped only if it
    /// did not report again meanwhile.
    #[test]
    fn a_new_map_remarks_owned_flags_and_the_moving_hosts_are_encoded() {
        let store = Store::new();
        for (name, owned) in [("stays", true), ("moves", true), ("comes", false)] {
            let body = format!(r#"{{"hostname":"{name}","realAgents":[]}}"#);
            store.upsert(&hb(&body), 50, ops_config::ClassId(0), 1, owned).unwrap();
        }
        let mut out = Vec::new();
        for i in 0..SHARDS {
            store.encode_held(i, true, |h| (h == "moves").then_some(3), |t, h, _, _| out.push((t, h.to_owned())));
        }
        assert_eq!(out, vec![(3, "moves".to_owned())], "only owned hosts the new ring sends elsewhere");
        assert_eq!(store.copies(), 1);
        assert_eq!(store.remark_owned(|h| h != "moves"), 2, "moves is no longer owned, comes now is");
        assert_eq!(store.copies(), 1, "the copy count follows");
        assert!(store.with_host("comes", |_, _, h| h.owned()).unwrap());
        assert!(!store.with_host("moves", |_, _, h| h.owned()).unwrap());
        assert_eq!(store.remark_owned(|h| h != "moves"), 0);
    }

    #[test]
    fn copies_are_encoded_as_their_report_and_dropped_only_when_unchanged() {
        let store = Store::new();
        let copy = r#"{"hostname":"c1","ip":"10.1.2.3","runUser":"root","updaterVersion":"0.1","realAgents":[{"name":"a","version":"1","status":"started","timestamp":7,"runUser":"u","workDir":"/w","lastError":"boom"}]}"#;
        let relay = store.relay_index("dc2-1");
        store.upsert_tagged(&hb(copy), 50, Tags { told: 3, relay, ..Tags::default() }, false).unwrap();
        store.upsert(&hb(r#"{"hostname":"mine","realAgents":[]}"#), 50, ClassId(0), 1, true).unwrap();
        store.upsert(&hb(r#"{"hostname":"stays","realAgents":[]}"#), 50, ClassId(0), 1, false).unwrap();
        assert_eq!(store.copies(), 2);
        let mut out = Vec::new();
        for i in 0..SHARDS {
            store.encode_copies(i, |h| (h != "stays").then_some(4), |t, h, seen, rec| out.push((t, h.to_owned(), seen, rec)));
        }
        assert_eq!(out.len(), 1, "owned hosts and copies that stay are not sent");
        let (target, host, seen, record) = out.pop().unwrap();
        assert_eq!((target, host.as_str(), seen), (4, "c1", 50));
        let mut body = Vec::new();
        ops_config::compact::begin(&mut body);
        body.extend_from_slice(&record);
        let mut decoded = Vec::new();
        ops_config::compact::decode(&body, |r, h| decoded.push((r.seen, r.told, r.relay.to_owned(), h.clone().into_owned()))).unwrap();
        assert_eq!(decoded, vec![(50, 3, "dc2-1".to_owned(), hb(copy).into_owned())], "the relay goes with the copy");
        // Reported again since: stays.
        store.upsert(&hb(r#"{"hostname":"c1","realAgents":[]}"#), 51, ClassId(0), 1, false).unwrap();
        assert!(!store.drop_copy("c1", 50));
        assert!(!store.drop_copy("mine", 50), "an owned host is never dropped as a copy");
        assert!(store.drop_copy("c1", 51));
        assert_eq!((store.copies(), store.len()), (1, 2));
    }

    /// A copy handed back never replaces what the owner took in the same second.
    #[test]
    fn a_handed_back_copy_wins_only_when_strictly_newer() {
        let store = Store::new();
        let v = |ver: &str| format!(r#"{{"hostname":"h","realAgents":[{{"name":"a","version":"{ver}"}}]}}"#);
        let version = |store: &Store| store.with_host("h", |s, _, h| store.symbols().reader().resolve(s.agents(h)[0].version).to_owned());
        store.upsert(&hb(&v("new")), 10, ClassId(0), 1, true).unwrap();
        assert!(!store.upsert_handed_back(&hb(&v("copy")), 10, Tags::default(), true).unwrap(), "a tie keeps the owner's");
        assert!(!store.upsert_handed_back(&hb(&v("copy")), 9, Tags::default(), true).unwrap());
        assert_eq!(version(&store).as_deref(), Some("new"));
        assert!(store.upsert_handed_back(&hb(&v("copy")), 11, Tags::default(), true).unwrap());
        assert_eq!(version(&store).as_deref(), Some("copy"));
        assert!(
            store.upsert_tagged(&hb(&v("relay")), 11, Tags::default(), true).unwrap(),
            "a relay's report of the same second still wins"
        );
        assert_eq!(version(&store).as_deref(), Some("relay"));
    }

    #[test]
    fn host_record_stays_small() {
        assert_eq!(std::mem::size_of::<AgentState>(), 24);
        assert!(std::mem::size_of::<Host>() <= 64, "{}", std::mem::size_of::<Host>());
    }

    /// Hosts whose agent count keeps changing leave runs behind in the arena; compaction must
    /// keep every host's agents, and the arena must stay bounded.
    #[test]
    fn agent_arena_keeps_every_host_right_through_compaction() {
        let store = Store::new();
        let body = |h: u32, n: u32, round: u32| {
            let agents: Vec<String> = (0..n).map(|a| format!(r#"{{"name":"a{a}","version":"{round}.{h}","status":"started"}}"#)).collect();
            format!(r#"{{"hostname":"h{h}","realAgents":[{}]}}"#, agents.join(","))
        };
        for round in 0..40u32 {
            for h in 0..2000u32 {
                let n = (h + round) % 5;
                store.upsert(&hb(&body(h, n, round)), round, ClassId(0), 1, true).unwrap();
            }
        }
        let syms = store.symbols().reader();
        let mut arena_agents = 0;
        for h in 0..2000u32 {
            let n = (h + 39) % 5;
            store
                .with_host(&format!("h{h}"), |shard, _, host| {
                    let agents = shard.agents(host);
                    assert_eq!(agents.len(), n as usize, "h{h}");
                    for (a, st) in agents.iter().enumerate() {
                        assert_eq!(syms.resolve(st.name), format!("a{a}"));
                        assert_eq!(syms.resolve(st.version), format!("39.{h}"));
                    }
                })
                .unwrap();
        }
        for i in 0..SHARDS {
            let shard = store.shard(i);
            let held: usize = shard.agents.chunks.iter().map(Vec::len).sum();
            assert_eq!(held, shard.agents.live + shard.agents.garbage);
            arena_agents += held;
        }
        let live: usize = (0..2000u32).map(|h| ((h + 39) % 5) as usize).sum();
        assert!(arena_agents < live * 3 + SHARDS * ARENA_CHUNK * 2, "arena bounded: {arena_agents} for {live} live agents");
        // Forgetting hosts releases their runs too.
        assert_eq!(store.forget_before(100, 0), 2000);
        let live_left: usize = (0..SHARDS).map(|i| store.shard(i).agents.live).sum();
        assert_eq!(live_left, 0);
    }

    #[test]
    fn newest_report_replaces_the_last() {
        let store = Store::new();
        store
            .upsert(
                &hb(r#"{"hostname":"h1","ip":"10.0.0.1","realAgents":[{"name":"a","version":"1","status":"started","lastError":"boom"}]}"#),
                100,
                ClassId(0),
                1,
                true,
            )
            .unwrap();
        store.upsert(&hb(r#"{"hostname":"h2","ip":"::1","realAgents":[]}"#), 100, ClassId(0), 1, true).unwrap();
        assert_eq!(store.len(), 2);
        let (ver, err, ip) = store
            .with_host("h1", |shard, slot, h| {
                let syms = store.symbols().reader();
                (
                    syms.resolve(shard.agents(h)[0].version).to_owned(),
                    shard.last_error(slot, h, 0).map(str::to_owned),
                    shard.ip(slot, h).to_string(),
                )
            })
            .unwrap();
        assert_eq!((ver.as_str(), err.as_deref(), ip.as_str()), ("1", Some("boom"), "10.0.0.1"));

        store
            .upsert(
                &hb(r#"{"hostname":"h1","realAgents":[{"name":"a","version":"2","status":" stopped\n"},{"name":"b","version":"9"}]}"#),
                200,
                ClassId(3),
                2,
                true,
            )
            .unwrap();
        assert_eq!(store.len(), 2);
        store
            .with_host("h1", |shard, slot, h| {
                let syms = store.symbols().reader();
                assert_eq!(shard.agents(h).len(), 2);
                assert_eq!(syms.resolve(shard.agents(h)[0].version), "2");
                assert_eq!(syms.resolve(shard.agents(h)[0].status), "stopped", "status is trimmed");
                assert_eq!(shard.last_error(slot, h, 0), None);
                assert_eq!(shard.ip(slot, h).to_string(), "");
                assert_eq!((h.last_seen, h.class, h.generation), (200, 3, 2));
                assert!(shard.notes.errors.is_empty() && shard.notes.pins.is_empty());
            })
            .unwrap();
        assert_eq!(store.with_host("h2", |s, slot, h| s.ip(slot, h).to_string()).unwrap(), "::1");
    }

    #[test]
    fn pins_are_kept_beside_errors_and_go_when_no_longer_reported() {
        let store = Store::new();
        let body = r#"{"hostname":"h","realAgents":[{"name":"a","lastError":"x"},{"name":"b","pinned":"5.1.3","lastError":"y"},{"name":"c","pinned":"hold"}]}"#;
        store.upsert(&hb(body), 10, ClassId(0), 1, true).unwrap();
        let seen = |store: &Store| {
            store
                .with_host("h", |shard, slot, h| {
                    let syms = store.symbols().reader();
                    (0..3)
                        .map(|i| {
                            (shard.last_error(slot, h, i).map(str::to_owned), shard.pinned(slot, h, i).map(|p| syms.resolve(p).to_owned()))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap()
        };
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(seen(&store), [(s("x"), None), (s("y"), s("5.1.3")), (None, s("hold"))]);
        store
            .upsert(
                &hb(r#"{"hostname":"h","realAgents":[{"name":"a"},{"name":"b"},{"name":"c","pinned":"hold"}]}"#),
                11,
                ClassId(0),
                1,
                true,
            )
            .unwrap();
        assert_eq!(seen(&store), [(None, None), (None, None), (None, s("hold"))]);
        let shard = (0..SHARDS).map(|i| store.shard(i)).find(|s| s.hosts().count() == 1).unwrap();
        assert_eq!((shard.notes.errors.len(), shard.notes.pins.len()), (0, 1), "nothing left behind");
    }

    #[test]
    fn forgetting_frees_slots_and_side_tables() {
        let store = Store::new();
        for i in 0..1000 {
            let body = format!(
                r#"{{"hostname":"host-{i}","ip":"name-{i}","realAgents":[{{"name":"a","lastError":"e"}},{{"name":"b","pinned":"hold"}}]}}"#
            );
            store.upsert(&hb(&body), if i % 2 == 0 { 10 } else { 20 }, ClassId(0), 1, true).unwrap();
        }
        assert_eq!(store.forget_before(15, 0), 500);
        assert_eq!(store.len(), 500);
        assert!(store.with_host("host-0", |_, _, _| ()).is_none());
        assert!(store.with_host("host-1", |_, _, _| ()).is_some());
        let side: usize = (0..SHARDS)
            .map(|i| {
                let shard = store.shard(i);
                shard.notes.errors.len() + shard.notes.pins.len() + shard.other_ips.len()
            })
            .sum();
        assert_eq!(side, 1500, "500 errors, 500 pins, 500 ips");
        // Freed slots are reused (names come back to the shard they left).
        for i in (0..1000).step_by(2) {
            store.upsert(&hb(&format!(r#"{{"hostname":"host-{i}"}}"#)), 30, ClassId(0), 1, true).unwrap();
        }
        let slots: usize = (0..SHARDS).map(|i| store.shard(i).hosts.len()).sum();
        assert_eq!(slots, 1000);
        assert_eq!(store.len(), 1000);
    }

    #[test]
    fn interner_dedups_and_resolves() {
        let i = Interner::default();
        let a = i.intern("x").unwrap();
        assert_eq!(i.intern("x").unwrap(), a);
        assert_eq!(i.intern("").unwrap(), Sym::EMPTY);
        assert_eq!(i.reader().resolve(a), "x");
        assert_eq!(i.reader().get("nope"), None);
    }

    #[test]
    fn compaction_gives_free_slots_back_and_keeps_every_host_and_its_notes() {
        let store = Store::new();
        let body = |i: u32| {
            let ip = if i.is_multiple_of(7) { "::1".to_owned() } else { format!("10.0.{}.{}", i / 256, i % 256) };
            let extra = if i.is_multiple_of(5) { r#","lastError":"boom","pinned":"hold""# } else { "" };
            format!(
                r#"{{"hostname":"host-{i}","ip":"{ip}","realAgents":[{{"name":"a","version":"v{}","status":"started"{extra}}}]}}"#,
                i % 3
            )
        };
        for i in 0..40_000u32 {
            store.upsert(&hb(&body(i)), if i.is_multiple_of(10) { 20 } else { 10 }, ClassId(0), 1, i.is_multiple_of(10)).unwrap();
        }
        for i in (0..40_000u32).step_by(10) {
            store.with_host(&format!("host-{i}"), |_, _, _| ()).unwrap();
        }
        // The rollout judge's tables, keyed by slot.
        for i in 0..SHARDS {
            let mut shard = store.shard(i);
            let slots: Vec<(u32, u32)> = shard.hosts().map(|(s, h)| (s, h.name[5..].parse().unwrap())).collect();
            for (s, n) in slots {
                shard.told_at_mut().insert((s, 0), n);
            }
        }
        let slots_before: usize = (0..SHARDS).map(|i| store.shard(i).hosts.len()).sum();
        assert_eq!(store.forget_before(0, 15), 36_000, "the copies (not owned, older) go");
        assert_eq!(store.compact(), SHARDS, "every shard was mostly free");
        assert_eq!(store.compact(), 0, "nothing left to compact");
        let slots_after: usize = (0..SHARDS).map(|i| store.shard(i).hosts.len()).sum();
        assert_eq!((slots_before, slots_after), (40_000, 4_000));
        assert_eq!(store.len(), 4_000);
        for i in (0..40_000u32).step_by(10) {
            let name = format!("host-{i}");
            let (ip, error, pinned, version, told) = store
                .with_host(&name, |s, slot, h| {
                    let syms = store.symbols().reader();
                    let told = s.told_at.get(&(slot, 0)).copied();
                    (
                        s.ip(slot, h).to_string(),
                        s.last_error(slot, h, 0).map(str::to_owned),
                        s.pinned(slot, h, 0).map(|p| syms.resolve(p).to_owned()),
                        syms.resolve(s.agents(h)[0].version).to_owned(),
                        told,
                    )
                })
                .unwrap();
            let want_ip = if i.is_multiple_of(7) { "::1".to_owned() } else { format!("10.0.{}.{}", i / 256, i % 256) };
            assert_eq!(ip, want_ip);
            assert_eq!(
                (error.as_deref(), pinned.as_deref()),
                if i.is_multiple_of(5) { (Some("boom"), Some("hold")) } else { (None, None) }
            );
            assert_eq!(version, format!("v{}", i % 3));
            assert_eq!(told, Some(i), "the judge's table follows the host to its new slot");
        }
        // The shards go on as before: new hosts, replaced reports, removals.
        for i in 0..500u32 {
            store.upsert(&hb(&body(100_000 + i)), 30, ClassId(0), 1, true).unwrap();
        }
        store.upsert(&hb(&body(0).replace("v0", "v9")), 31, ClassId(0), 1, true).unwrap();
        assert_eq!(store.len(), 4_500);
        assert_eq!(store.forget_before(30, 0), 4_000 - 1);
        assert_eq!(store.len(), 501);
    }

    fn dir_report(host: &str, dir: &str) -> String {
        format!(r#"{{"hostname":"{host}","realAgents":[{{"name":"a","version":"1","status":"started","workDir":"{dir}"}}]}}"#)
    }

    fn work_dir(store: &Store, host: &str) -> String {
        store.with_host(host, |s, _, h| store.symbols().reader().resolve(s.agents(h)[0].work_dir).to_owned()).unwrap()
    }

    #[test]
    fn strings_no_record_uses_are_freed_and_their_symbols_reused() {
        let store = Store::new();
        for round in 0..100u32 {
            store.upsert(&hb(&dir_report("h", &format!("/d/{round}"))), round, ClassId(0), 1, true).unwrap();
        }
        store.upsert(&hb(&dir_report("g", "/kept")), 1, ClassId(0), 1, true).unwrap();
        // "", a, 1, started, /d/0../d/99, /kept
        assert_eq!(store.symbols().len(), 4 + 100 + 1);
        let end = store.symbols().end();
        assert!(store.strings_want_collection());
        assert_eq!(store.collect_strings(), 99, "every /d/ but the last");
        assert_eq!(store.symbols().len(), 4 + 2);
        assert_eq!(store.symbols().bytes(), "a1started/d/99/kept".len());
        assert!(!store.strings_want_collection(), "nothing new since");
        assert_eq!((work_dir(&store, "h"), work_dir(&store, "g")), ("/d/99".to_owned(), "/kept".to_owned()));
        store.upsert(&hb(&dir_report("h", "/new")), 200, ClassId(0), 1, true).unwrap();
        assert_eq!(store.symbols().end(), end, "a freed symbol was reused");
        assert_eq!(work_dir(&store, "h"), "/new");
        assert_eq!(store.collect_strings(), 1);
        assert_eq!(store.symbols().reader().get("/d/99"), None);
    }

    #[test]
    fn a_report_past_the_interner_limits_is_refused_and_changes_nothing() {
        let store = Store::with_limits(InternLimits { max_strings: 6, max_bytes: 1 << 20 });
        store.upsert(&hb(&dir_report("h", "/one")), 10, ClassId(0), 1, true).unwrap();
        assert_eq!(store.symbols().len(), 5);
        store.upsert(&hb(&dir_report("h", "/two")), 11, ClassId(0), 1, true).unwrap();
        let err = store.upsert(&hb(&dir_report("h", "/three")), 12, ClassId(0), 1, true).unwrap_err();
        assert_eq!((err.strings, err.max_strings), (6, 6));
        assert!(err.to_string().contains("--max-interned-strings 6"), "{err}");
        assert_eq!(work_dir(&store, "h"), "/two", "the refused report changed nothing");
        assert_eq!(store.with_host("h", |_, _, h| h.last_seen), Some(11));
        // A report of strings already held still goes in.
        store.upsert(&hb(&dir_report("h", "/one")), 13, ClassId(0), 1, true).unwrap();
        assert!(store.strings_want_collection(), "a refusal asks for a collection");
        assert_eq!(store.collect_strings(), 1, "/two");
        store.upsert(&hb(&dir_report("h", "/three")), 14, ClassId(0), 1, true).unwrap();
        assert_eq!(work_dir(&store, "h"), "/three");

        let small = Store::with_limits(InternLimits { max_strings: 100, max_bytes: 12 });
        small.upsert(&hb(&dir_report("h", "/d")), 1, ClassId(0), 1, true).unwrap();
        let err = small.upsert(&hb(&dir_report("h", "/longer")), 2, ClassId(0), 1, true).unwrap_err();
        assert_eq!((err.bytes, err.max_bytes), (11, 12));
    }

    #[test]
    fn collections_racing_heartbeats_never_free_a_string_a_record_holds() {
        let store = Store::new();
        let stop = std::sync::atomic::AtomicBool::new(false);
        const THREADS: usize = 3;
        const HOSTS: usize = 40;
        const ROUNDS: u32 = 300;
        let collections = std::thread::scope(|s| {
            let collector = s.spawn(|| {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    store.collect_strings();
                    n += 1;
                }
                n
            });
            let writers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        for round in 1..=ROUNDS {
                            for k in 0..HOSTS {
                                let host = format!("h{t}-{k}");
                                store.upsert(&hb(&dir_report(&host, &format!("/d/{t}/{k}/{round}"))), round, ClassId(0), 1, true).unwrap();
                                let dir = work_dir(store, &host);
                                assert_eq!(dir, format!("/d/{t}/{k}/{round}"), "a stored string was freed or reused");
                            }
                        }
                    })
                })
                .collect();
            let results: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
            stop.store(true, Ordering::Relaxed);
            for r in results {
                if let Err(panic) = r {
                    std::panic::resume_unwind(panic);
                }
            }
            collector.join().unwrap()
        });
        assert!(collections > 1, "the collector ran during the writes");
        store.collect_strings();
        assert_eq!(store.symbols().len(), 4 + THREADS * HOSTS, "one directory per host is left");
        for t in 0..THREADS {
            for k in 0..HOSTS {
                assert_eq!(work_dir(&store, &format!("h{t}-{k}")), format!("/d/{t}/{k}/{ROUNDS}"));
            }
        }
    }
}
