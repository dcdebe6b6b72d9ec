//! One host's record (`Host`, its agents' `AgentState`s) and the tags a report is stored
//! with: 48 bytes a host, the hostname inline when short.

use super::*;

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
    pub(super) store: &'s Store,
    pub(super) last: Option<(String, u16)>,
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
    pub(super) fn set_owned(&mut self, owned: bool) -> bool {
        let was = self.owned();
        self.flags = (self.flags & !Host::OWNED) | if owned { Host::OWNED } else { 0 };
        was
    }

    pub(super) fn free() -> Host {
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
