//! Snapshots of the real-state store on disk, so a restarted node still shows hosts that
//! stopped reporting.
//!
//! Format (little endian), written shard by shard without stopping heartbeats:
//! `OPSSNAP5`, then host records, a zero byte, then the symbol table and the relay table (taken
//! after the hosts, so they hold every symbol and relay the records name: no string is freed
//! while a snapshot is written, and a freed symbol is written as ""),
//! then a trailer of the symbol table's offset (u64) and a CRC-32 of everything before the CRC.
//! `OPSSNAP4` (before enrollment) has no flags byte (bit 0: authenticated) after the relay
//! index; `OPSSNAP3` (before silence by relay) has no relay index in records and no relay table;
//! `OPSSNAP2` has no pins either, `OPSSNAP1` no `told` byte either. Written to a temporary
//! file, synced and renamed over the last one: a crash leaves the old snapshot or the new one,
//! never a mix. A file that fails its checks is moved aside and the node starts empty.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use compact_str::CompactString;

use crate::store::{AgentState, Host, HostRecord, IpKind, SHARDS, Store, Sym};

const MAGIC: &[u8; 8] = b"OPSSNAP5";
/// Before enrollment: no flags byte after the relay index.
const MAGIC_V4: &[u8; 8] = b"OPSSNAP4";
/// Before silence by relay: no relay index in host records, no relay table.
const MAGIC_V3: &[u8; 8] = b"OPSSNAP3";
/// Before local pins: no pin list after the errors of a host record.
const MAGIC_V2: &[u8; 8] = b"OPSSNAP2";
/// Before staged rollouts: no `told` byte in host records either.
const MAGIC_V1: &[u8; 8] = b"OPSSNAP1";
const FILE_NAME: &str = "state.snap";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {path}: {what}")]
    Corrupt { path: PathBuf, what: &'static str },
}

/// Path of the snapshot in a data dir.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// What a write did.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub hosts: usize,
    pub bytes: u64,
}

struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str, width: usize) {
    match width {
        1 => buf.push(s.len() as u8),
        2 => buf.extend_from_slice(&(s.len() as u16).to_le_bytes()),
        _ => buf.extend_from_slice(&(s.len() as u32).to_le_bytes()),
    }
    buf.extend_from_slice(s.as_bytes());
}

fn encode_shard(store: &Store, i: usize, buf: &mut Vec<u8>) -> usize {
    let shard = store.shard(i);
    let mut n = 0;
    for (slot, h) in shard.hosts() {
        put_str(buf, &h.name, 1);
        buf.push(h.ip_kind as u8);
        match shard.ip(slot, h) {
            crate::store::IpText::V4(_) => buf.extend_from_slice(&h.ip.to_le_bytes()),
            crate::store::IpText::Str(s) if h.ip_kind == IpKind::Other => put_str(buf, s, 2),
            crate::store::IpText::Str(_) => {}
        }
        for v in [h.last_seen, h.run_user.0, h.updater_version.0] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.push(h.told);
        buf.extend_from_slice(&h.relay.to_le_bytes());
        buf.push(u8::from(h.authenticated()));
        let agents = shard.agents(h);
        buf.push(agents.len() as u8);
        for a in agents {
            for v in [a.name.0, a.version.0, a.status.0, a.run_user.0, a.work_dir.0, a.timestamp] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        let errors: Vec<(usize, &str)> = (0..agents.len()).filter_map(|i| shard.last_error(slot, h, i).map(|e| (i, e))).collect();
        buf.push(errors.len() as u8);
        for (i, e) in errors {
            buf.push(i as u8);
            put_str(buf, e, 2);
        }
        let pins: Vec<(usize, u32)> = (0..agents.len()).filter_map(|i| shard.pinned(slot, h, i).map(|p| (i, p.0))).collect();
        buf.push(pins.len() as u8);
        for (i, p) in pins {
            buf.push(i as u8);
            buf.extend_from_slice(&p.to_le_bytes());
        }
        n += 1;
    }
    n
}

/// Writes the store to `{data_dir}/state.snap` atomically. Blocking: run it off the runtime.
pub fn write(store: &Store, data_dir: &Path) -> Result<Written, SnapshotError> {
    let path = path_in(data_dir);
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    let io_err = |source| SnapshotError::Io { path: tmp.clone(), source };
    // The records are written before the table they index: no string is freed meanwhile.
    let _pause = store.symbols().pause();
    fs::create_dir_all(data_dir).map_err(io_err)?;
    let file = File::create(&tmp).map_err(io_err)?;
    let mut w = CrcWriter { inner: BufWriter::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new(), written: 0 };
    w.write_all(MAGIC).map_err(io_err)?;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut hosts = 0;
    for i in 0..SHARDS {
        buf.clear();
        hosts += encode_shard(store, i, &mut buf);
        w.write_all(&buf).map_err(io_err)?;
    }
    w.write_all(&[0]).map_err(io_err)?;
    let sym_offset = w.written;
    buf.clear();
    {
        let syms = store.symbols().reader();
        // Freed symbols are written as "": the table keeps its indexes.
        let count = store.symbols().end();
        buf.extend_from_slice(&(count as u32).to_le_bytes());
        for i in 0..count {
            put_str(&mut buf, syms.resolve(Sym(i as u32)), 4);
        }
    }
    let relays = store.relay_names();
    buf.extend_from_slice(&(relays.len() as u32).to_le_bytes());
    for r in &relays {
        put_str(&mut buf, r, 1);
    }
    buf.extend_from_slice(&sym_offset.to_le_bytes());
    w.write_all(&buf).map_err(io_err)?;
    let crc = w.crc.clone().finalize();
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes()).map_err(io_err)?;
    let file = inner.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)?;
    let bytes = file.metadata().map_err(io_err)?.len();
    drop(file);
    ops_config::disk::rename_synced(&tmp, &path).map_err(|source| SnapshotError::Io { path: path.clone(), source })?;
    Ok(Written { hosts, bytes })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn str(&mut self, len: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(len)?).ok()
    }
}

/// Loads `{data_dir}/state.snap` into `store`; returns the hosts loaded (0 with no file).
/// `owned` tells whether this node owns a hostname on the ring (ownership may have changed
/// since the snapshot was written).
pub fn load(store: &Store, data_dir: &Path, owned: impl Fn(&str) -> bool) -> Result<usize, SnapshotError> {
    let path = path_in(data_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(SnapshotError::Io { path, source }),
    };
    let corrupt = |what| SnapshotError::Corrupt { path: path.clone(), what };
    let layout = match bytes.get(..8) {
        _ if bytes.len() < MAGIC.len() + 12 => return Err(corrupt("not a snapshot (bad magic)")),
        Some(m) if m == MAGIC => 5,
        Some(m) if m == MAGIC_V4 => 4,
        Some(m) if m == MAGIC_V3 => 3,
        Some(m) if m == MAGIC_V2 => 2,
        Some(m) if m == MAGIC_V1 => 1,
        _ => return Err(corrupt("not a snapshot (bad magic)")),
    };
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(corrupt("checksum mismatch (truncated or damaged)"));
    }
    let (body, offset) = body.split_at(body.len() - 8);
    let sym_offset = u64::from_le_bytes(offset.try_into().map_err(|_| corrupt("bad trailer"))?) as usize;

    let _pause = store.symbols().pause();
    let mut r = Reader { buf: body, pos: sym_offset };
    let count = r.u32().ok_or_else(|| corrupt("bad symbol table"))? as usize;
    let mut syms = Vec::with_capacity(count.min(1 << 24));
    for _ in 0..count {
        let len = r.u32().ok_or_else(|| corrupt("bad symbol"))? as usize;
        let s = r.str(len).ok_or_else(|| corrupt("bad symbol"))?;
        syms.push(store.symbols().intern(s).map_err(|_| corrupt("more strings than --max-interned-strings / --max-interned-bytes allow"))?);
    }
    let map = |old: u32| syms.get(old as usize).copied().ok_or("unknown symbol");
    let mut relays = Vec::new();
    if layout >= 4 {
        let count = r.u32().ok_or_else(|| corrupt("bad relay table"))? as usize;
        for _ in 0..count.min(usize::from(crate::store::OTHER_RELAYS)) {
            let len = r.u8().ok_or_else(|| corrupt("bad relay id"))? as usize;
            let id = r.str(len).ok_or_else(|| corrupt("bad relay id"))?;
            relays.push(store.relay_index(id));
        }
    }
    // An index this snapshot's table does not name (OTHER_RELAYS) keeps that meaning.
    let relay = |old: u16| match relays.get(usize::from(old)) {
        Some(&new) => Ok(new),
        None if old == crate::store::OTHER_RELAYS => Ok(old),
        None => Err("unknown relay"),
    };

    // Every record is read and checked before the first is stored: a damaged snapshot
    // changes nothing (then is quarantined), rather than leaving half a fleet loaded.
    let records = &body[..sym_offset.min(body.len())];
    read_records(records, layout, &map, &relay, &owned, |_| {}).map_err(corrupt)?;
    read_records(records, layout, &map, &relay, &owned, |record| store.put(record)).map_err(corrupt)
}

/// Reads the host records of a snapshot body of layout 1 to 5 (the magic's digit), handing
/// each to `put`; Err names what is bad.
fn read_records(
    body: &[u8],
    layout: u8,
    map: &impl Fn(u32) -> Result<crate::store::Sym, &'static str>,
    relay: &impl Fn(u16) -> Result<u16, &'static str>,
    owned: &impl Fn(&str) -> bool,
    mut put: impl FnMut(HostRecord),
) -> Result<usize, &'static str> {
    let mut r = Reader { buf: body, pos: MAGIC.len() };
    let mut loaded = 0;
    let bad = || "bad host record";
    loop {
        let name_len = r.u8().ok_or_else(bad)? as usize;
        if name_len == 0 {
            break;
        }
        let name = r.str(name_len).ok_or_else(bad)?;
        let ip_kind = r.u8().ok_or_else(bad)?;
        let (ip_kind, ip, other_ip) = match ip_kind {
            0 => (IpKind::None, 0, None),
            1 => (IpKind::V4, r.u32().ok_or_else(bad)?, None),
            2 => {
                let len = r.u16().ok_or_else(bad)? as usize;
                (IpKind::Other, 0, Some(Box::from(r.str(len).ok_or_else(bad)?)))
            }
            _ => return Err(bad()),
        };
        let last_seen = r.u32().ok_or_else(bad)?;
        let run_user = map(r.u32().ok_or_else(bad)?)?;
        let updater_version = map(r.u32().ok_or_else(bad)?)?;
        let told = if layout == 1 { 0 } else { r.u8().ok_or_else(bad)? };
        let relay = if layout >= 4 { relay(r.u16().ok_or_else(bad)?)? } else { crate::store::NO_RELAY };
        let authenticated = match if layout >= 5 { r.u8().ok_or_else(bad)? } else { 0 } {
            0 => false,
            1 => true,
            _ => return Err(bad()),
        };
        let n = r.u8().ok_or_else(bad)? as usize;
        let mut agents = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = [0u32; 6];
            for x in &mut v {
                *x = r.u32().ok_or_else(bad)?;
            }
            agents.push(AgentState {
                name: map(v[0])?,
                version: map(v[1])?,
                status: map(v[2])?,
                run_user: map(v[3])?,
                work_dir: map(v[4])?,
                timestamp: v[5],
            });
        }
        let nerr = r.u8().ok_or_else(bad)? as usize;
        let mut errors = Vec::with_capacity(nerr);
        let mut note_mask = 0u64;
        for _ in 0..nerr {
            let i = r.u8().ok_or_else(bad)?;
            let len = r.u16().ok_or_else(bad)? as usize;
            let e = r.str(len).ok_or_else(bad)?;
            if usize::from(i) < n {
                note_mask |= 1 << i;
                errors.push((i, Box::from(e)));
            }
        }
        let npins = if layout >= 3 { r.u8().ok_or_else(bad)? as usize } else { 0 };
        let mut pins = Vec::with_capacity(npins);
        for _ in 0..npins {
            let i = r.u8().ok_or_else(bad)?;
            let pin = map(r.u32().ok_or_else(bad)?)?;
            if usize::from(i) < n {
                note_mask |= 1 << i;
                pins.push((i, pin));
            }
        }
        let host = Host {
            name: CompactString::from(name),
            note_mask,
            ip,
            last_seen,
            run_user,
            updater_version,
            // 0 is no config generation: the class is resolved again on first use.
            generation: 0,
            relay,
            class: 0,
            ip_kind,
            flags: crate::store::Host::flags_of(owned(name), authenticated),
            agents_at: 0,
            agents_len: 0,
            told,
            waves: 0,
        };
        put(HostRecord { host, agents, errors, pins, other_ip });
        loaded += 1;
    }
    Ok(loaded)
}

/// Moves a snapshot that failed to load aside, so it is kept for a person to look at and the
/// next write does not overwrite it.
pub fn quarantine(data_dir: &Path, now: u32) -> io::Result<PathBuf> {
    let to = data_dir.join(format!("{FILE_NAME}.corrupt-{now}"));
    fs::rename(path_in(data_dir), &to)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops_config::{ClassId, Heartbeat};

    fn fill(store: &Store, n: usize) {
        for i in 0..n {
            let ip = if i % 10 == 0 { format!("fe80::{i:x}") } else { format!("10.0.{}.{}", i / 256 % 256, i % 256) };
            let err = if i % 7 == 0 { r#","lastError":"md5 mismatch""# } else { "" };
            let pin = match i % 5 {
                0 => r#","pinned":"hold""#,
                1 => r#","pinned":"5.1.0""#,
                _ => "",
            };
            let body = format!(
                r#"{{"hostname":"host-{i}","ip":"{ip}","runUser":"root","updaterVersion":"0.1.0","realAgents":[{{"name":"falcon-agent","version":"5.1.{v}","status":"started","timestamp":{i},"runUser":"falcon","workDir":"/home/falcon"{err}}},{{"name":"b","version":"1"{pin}}}]}}"#,
                v = i % 3
            );
            let relay = store.relay_index(["", "dc1-1", "dc2-1"][i % 3]);
            let tags = crate::store::Tags { class: ClassId(0), generation: 1, told: (i % 4) as u8, waves: 0, relay, auth: i % 3 == 0 };
            store.upsert_tagged(&Heartbeat::parse(body.as_bytes()).unwrap(), 1000 + i as u32, tags, true).unwrap();
        }
    }

    fn dump(store: &Store) -> Vec<String> {
        let syms = store.symbols().reader();
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let shard = store.shard(i);
            for (slot, h) in shard.hosts() {
                let agents: Vec<String> = shard
                    .agents(h)
                    .iter()
                    .enumerate()
                    .map(|(ai, a)| {
                        format!(
                            "{}={}/{}/{}/{}/{}/{:?}/{:?}",
                            syms.resolve(a.name),
                            syms.resolve(a.version),
                            syms.resolve(a.status),
                            syms.resolve(a.run_user),
                            syms.resolve(a.work_dir),
                            a.timestamp,
                            shard.last_error(slot, h, ai),
                            shard.pinned(slot, h, ai).map(|p| syms.resolve(p))
                        )
                    })
                    .collect();
                out.push(format!(
                    "{} {} {} {} {} {} told={} relay={} auth={}",
                    h.name,
                    shard.ip(slot, h),
                    h.last_seen,
                    syms.resolve(h.run_user),
                    syms.resolve(h.updater_version),
                    agents.join(","),
                    h.told,
                    store.relay_name(h.relay),
                    h.authenticated()
                ));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        fill(&store, 3000);
        let w = write(&store, dir.path()).unwrap();
        assert_eq!(w.hosts, 3000);
        let again = Store::new();
        again.symbols().intern("something else first").unwrap();
        assert_eq!(again.relay_index("another relay first"), 1);
        assert_eq!(load(&again, dir.path(), |_| true).unwrap(), 3000);
        assert_eq!(again.len(), 3000);
        assert_eq!(dump(&again), dump(&store));
        assert!(!dir.path().join("state.snap.tmp").exists());
    }

    /// A snapshot of the layout before silence by relay loads, its hosts under no relay.
    #[test]
    fn a_snapshot_before_relays_loads_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = b"OPSSNAP3".to_vec();
        body.push(3);
        body.extend_from_slice(b"old");
        body.push(1);
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&77u32.to_le_bytes());
        body.extend_from_slice(&[0; 8]); // runUser, updaterVersion: symbol 0
        body.extend_from_slice(&[2, 0, 0, 0]); // told, no agents, errors or pins
        body.push(0);
        let offset = body.len() as u64;
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        fs::write(path_in(dir.path()), &body).unwrap();
        let store = Store::new();
        assert_eq!(load(&store, dir.path(), |_| true).unwrap(), 1);
        let got = store.with_host("old", |_, _, h| (h.last_seen, h.told, h.relay)).unwrap();
        assert_eq!(got, (77, 2, crate::store::NO_RELAY));
    }

    #[test]
    fn no_file_is_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(&Store::new(), dir.path(), |_| true).unwrap(), 0);
    }

    #[test]
    fn damaged_files_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        fill(&store, 200);
        write(&store, dir.path()).unwrap();
        let path = path_in(dir.path());
        let good = fs::read(&path).unwrap();
        for (what, bytes) in [
            ("truncated", good[..good.len() / 2].to_vec()),
            ("flipped", {
                let mut b = good.clone();
                b[100] ^= 0x55;
                b
            }),
            ("garbage", b"hello world, not a snapshot".to_vec()),
            ("empty", Vec::new()),
        ] {
            fs::write(&path, &bytes).unwrap();
            let fresh = Store::new();
            let e = load(&fresh, dir.path(), |_| true).unwrap_err();
            assert!(matches!(e, SnapshotError::Corrupt { .. }), "{what}: {e}");
            assert_eq!(fresh.len(), 0, "{what}: nothing half-loaded");
        }
        let moved = quarantine(dir.path(), 42).unwrap();
        assert!(moved.ends_with("state.snap.corrupt-42") && moved.exists() && !path.exists());
    }
}
