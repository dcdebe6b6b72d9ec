//! The interner: every string that repeats across hosts (agent names, versions, status
//! texts, users, directories) as a 4-byte [`Sym`], with limits, and collection of the strings
//! no record uses any more.

use super::*;

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
pub(super) struct InternerInner {
    pub(super) map: HashMap<Arc<str>, Sym>,
    /// By symbol; `None`: freed, its index on `free` for the next new string.
    pub(super) strings: Vec<Option<Arc<str>>>,
    /// By symbol: the collection epoch in which it was last looked up ([`Interner::collect`]).
    pub(super) stamps: Vec<AtomicU32>,
    pub(super) free: Vec<u32>,
    /// Bytes of the strings held.
    pub(super) bytes: usize,
    /// Strings interned since the last collection.
    pub(super) added: usize,
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
    pub(super) inner: RwLock<InternerInner>,
    pub(super) epoch: AtomicU32,
    pub(super) limits: InternLimits,
    /// Held shared by everything that keeps symbols across a lock (scans, snapshots), and
    /// exclusively by a collection.
    pub(super) pause: RwLock<()>,
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
    pub(super) fn lookup(&self) -> Lookup<'_> {
        let guard = self.inner.read();
        let epoch = self.epoch.load(Ordering::SeqCst);
        Lookup { interner: self, guard: Some(guard), epoch }
    }

    pub(super) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::SeqCst)
    }
}

/// Resolves symbols while holding the interner's shared lock.
pub struct Symbols<'a> {
    pub(super) guard: RwLockReadGuard<'a, InternerInner>,
}

impl Symbols<'_> {
    pub fn resolve(&self, sym: Sym) -> &str {
        self.guard.strings.get(sym.0 as usize).and_then(Option::as_deref).unwrap_or("")
    }

    pub fn get(&self, s: &str) -> Option<Sym> {
        self.guard.map.get(s).copied()
    }
}

pub(super) struct Lookup<'a> {
    pub(super) interner: &'a Interner,
    pub(super) guard: Option<RwLockReadGuard<'a, InternerInner>>,
    /// The epoch the lookups ran in (a store checks it is still current).
    pub(super) epoch: u32,
}

impl Lookup<'_> {
    pub(super) fn sym(&mut self, s: &str) -> Result<Sym, InternFull> {
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
