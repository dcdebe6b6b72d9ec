//! A slice of the store behind one lock: the slot vector in fixed chunks, the agent arena,
//! the hostname table and the side tables for the rare texts.

use super::*;

/// Host records by slot, in fixed chunks of [`CHUNK`]: slots never move, and a shard has at
/// most one chunk partly used. (A doubling `Vec` left about a quarter of a shard's records
/// unused on average, and growing it by smaller steps fragmented the heap: measured with the
/// `store_memory` bench.)
#[derive(Default)]
pub(super) struct Slots {
    pub(super) chunks: Vec<Vec<Host>>,
    pub(super) len: usize,
}

pub(super) const CHUNK: usize = 64;

impl Slots {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn push(&mut self, host: Host) {
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(host);
        }
        self.len += 1;
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Host> {
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
pub(super) struct AgentArena {
    pub(super) chunks: Vec<Vec<AgentState>>,
    pub(super) live: usize,
    pub(super) garbage: usize,
}

/// Agents per arena chunk (6 KiB); a host's run never spans two chunks (at most 64 agents).
pub(super) const ARENA_CHUNK: usize = 256;

impl AgentArena {
    /// The chunk and the range in it of the run at `at` of `len` agents.
    pub(super) fn locate(at: u32, len: u8) -> (usize, std::ops::Range<usize>) {
        let (c, off) = (at as usize / ARENA_CHUNK, at as usize % ARENA_CHUNK);
        (c, off..off + usize::from(len))
    }

    pub(super) fn get(&self, at: u32, len: u8) -> &[AgentState] {
        if len == 0 {
            return &[];
        }
        let (c, range) = Self::locate(at, len);
        &self.chunks[c][range]
    }

    pub(super) fn get_mut(&mut self, at: u32, len: u8) -> &mut [AgentState] {
        if len == 0 {
            return &mut [];
        }
        let (c, range) = Self::locate(at, len);
        &mut self.chunks[c][range]
    }

    pub(super) fn alloc(&mut self, agents: &[AgentState]) -> u32 {
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

    pub(super) fn release(&mut self, len: u8) {
        self.live -= usize::from(len);
        self.garbage += usize::from(len);
    }

    pub(super) fn wants_compaction(&self) -> bool {
        self.garbage > ARENA_CHUNK && self.garbage > self.live / 2
    }
}

/// A per-host, per-rollout table of the rollout judge: `(slot, rollout)` → a u32.
pub type SlotTable = HashMap<(u32, u8), u32>;

/// A slice of the store behind one lock.
#[derive(Default)]
pub struct Shard {
    pub(super) index: HashTable<u32>,
    pub(super) hosts: Slots,
    pub(super) agents: AgentArena,
    pub(super) free: Vec<u32>,
    pub(super) notes: Notes,
    pub(super) other_ips: HashMap<u32, Box<str>>,
    /// `(slot, rollout)` → when a rollout judgement first saw the host told the target and not
    /// converged (for the deadline). Holds only hosts in flight or failing.
    pub(super) told_at: HashMap<(u32, u8), u32>,
    /// `(slot, rollout)` → the rollout (an id of its agent and target) in which the host was
    /// judged failed: kept after a halt answers it `from` again, so the failures of a rollout
    /// stay counted. Holds only hosts that failed.
    pub(super) failed_in: HashMap<(u32, u8), u32>,
    /// Live hosts here that this node does not own (failover copies). Usually 0, so a scan of
    /// the copies skips the shard without walking it.
    pub(super) foreign: u32,
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
    pub(super) fn set_agents(&mut self, slot: u32, agents: &[AgentState]) {
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
    pub(super) fn compact_agents_if_needed(&mut self) {
        if self.agents.wants_compaction() {
            self.compact_agents();
        }
    }

    /// Whether most of this shard's slots are free (hosts forgotten, failover copies gone
    /// home): [`Shard::compact`] would give their memory back.
    pub(super) fn wants_compaction(&self) -> bool {
        let free = self.free.len();
        // A quarter of the live hosts: after a failover a survivor's copies are about half
        // its own hosts, and after they go home every shard is a third free.
        free > CHUNK && free > (self.hosts.len() - free) / 4
    }

    /// Moves the live hosts into fresh slots, none free, and renumbers every table keyed by
    /// slot; rebuilds the index and the agent arena at their size. Slot numbers are valid only
    /// under the shard's lock, so nothing outside sees the renumbering.
    pub(super) fn compact(&mut self, hasher: &DefaultHashBuilder) {
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

    pub(super) fn compact_agents(&mut self) {
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
    pub(super) fn count_owned(&mut self, was: Option<bool>, now: Option<bool>) {
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

    pub(super) fn find(&self, hash: u64, name: &str) -> Option<u32> {
        self.index.find(hash, |&slot| self.hosts[slot as usize].name == name).copied()
    }

    pub(super) fn remove_slot(&mut self, slot: u32, hasher: &DefaultHashBuilder) {
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
    pub(super) fn put(&mut self, hash: u64, rec: HostRecord, hasher: &DefaultHashBuilder) -> bool {
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

    pub(super) fn insert_new(&mut self, hash: u64, mut host: Host, agents: &[AgentState], hasher: &DefaultHashBuilder) -> u32 {
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
pub(super) struct Notes {
    pub(super) errors: HashMap<(u32, u8), Box<str>>,
    pub(super) pins: HashMap<(u32, u8), Sym>,
}

pub(super) fn clear_side_tables(notes: &mut Notes, other_ips: &mut HashMap<u32, Box<str>>, slot: u32, host: &Host) {
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
