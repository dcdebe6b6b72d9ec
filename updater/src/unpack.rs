//! Safe extraction of an agent tarball into a fresh directory.
//!
//! Every entry is checked before anything is written: relative paths of normal components
//! only (no absolute path, no `..`), symbolic links whose target stays inside the directory,
//! hard links to entries inside it, and only regular files, directories and links (devices,
//! FIFOs and sparse files are refused). The archive must hold an executable `control` at its
//! root (`ops-updater` for the updater's own package).
//!
//! What an archive can make is bounded as a careful package manager bounds it ([`Limits`]):
//! its uncompressed size (contents and tar headers, counted as they are decompressed, so a
//! huge long-name or PAX header is cut off too) is at most `ratio` times the compressed file
//! (never less than [`MIN_ALLOWANCE`]) and at most `max_bytes`; it holds at most `max_entries`
//! entries. Modes are kept only in their permission bits without write for others: setuid,
//! setgid and sticky bits are cleared, and owners are never taken from the archive.
//!
//! Both passes read one open file (rewound between them), so the archive that is checked is
//! the archive that is extracted. A refused archive leaves the target directory for the
//! caller to remove: nothing is written outside it.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use tar::EntryType;

/// The least uncompressed size allowed whatever the ratio: a small archive's tar padding
/// alone can be a hundred times its gzip.
pub const MIN_ALLOWANCE: u64 = 16 << 20;

/// Mode bits that never reach the disk: other-write (with setuid, setgid and sticky, which
/// the extraction drops by keeping only the permission bits).
const MODE_MASK: u32 = 0o002;

/// What one archive may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest uncompressed size in bytes, whatever the archive's size.
    pub max_bytes: u64,
    /// Largest uncompressed size as a multiple of the compressed archive.
    pub ratio: u64,
    /// Most entries (files, directories, links).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bytes: 4 << 30, ratio: 20, max_entries: 100_000 }
    }
}

impl Limits {
    /// The uncompressed bytes allowed for an archive of `compressed` bytes.
    pub fn allowance(&self, compressed: u64) -> u64 {
        self.ratio.saturating_mul(compressed).max(MIN_ALLOWANCE).min(self.max_bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read archive {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("archive entry {entry:?} refused: {why}")]
    Refused { entry: String, why: &'static str },
    #[error("archive has no executable `{0}` at its root")]
    NoEntry(&'static str),
    #[error("archive refused: it unpacks to more than {cap} bytes (--max-unpack-bytes, --max-unpack-ratio)")]
    TooLarge { cap: u64 },
    #[error("archive refused: more than {cap} entries (--max-unpack-entries)")]
    TooManyEntries { cap: u64 },
}

/// A reader that fails once more than `left` bytes went through it.
struct Capped<R> {
    inner: R,
    left: u64,
    hit: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.hit.set(true);
            return Err(std::io::Error::other("uncompressed size over the cap"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// `path` made of normal components only; returns it without any `./` prefix.
fn inside(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Whether a symlink at `entry` pointing to `target` stays inside the root (lexically).
fn link_stays_inside(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: isize = entry.parent().map_or(0, |p| p.components().count() as isize);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Extracts the gzipped tarball `archive` into the empty directory `dest`.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), UnpackError> {
    unpack_with(archive, dest, "control", Limits::default())
}

/// [`unpack`] of an archive whose executable at the root is `entry`, within `limits`.
pub fn unpack_with(archive: &Path, dest: &Path, entry: &'static str, limits: Limits) -> Result<(), UnpackError> {
    let io = |source| UnpackError::Io { path: archive.to_path_buf(), source };
    let file = File::open(archive).map_err(io)?;
    let cap = limits.allowance(file.metadata().map_err(io)?.len());
    let hit = Rc::new(Cell::new(false));
    let open = |file: &File| -> Result<tar::Archive<Capped<flate2::read::GzDecoder<BufReader<File>>>>, UnpackError> {
        let mut file = file.try_clone().map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        let inner = flate2::read::GzDecoder::new(BufReader::new(file));
        Ok(tar::Archive::new(Capped { inner, left: cap, hit: hit.clone() }))
    };
    // An error of the stream is the cap's when the cap was hit.
    let read_err = |e| if hit.get() { UnpackError::TooLarge { cap } } else { io(e) };
    // First pass: check every entry, write nothing.
    {
        let mut tar = open(&file)?;
        let mut count = 0u64;
        let entries = tar.entries().map_err(io)?;
        let mut failed = None;
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            count += 1;
            if count > limits.max_entries {
                return Err(UnpackError::TooManyEntries { cap: limits.max_entries });
            }
            let raw = entry.path().map_err(io)?.into_owned();
            let name = raw.display().to_string();
            let refuse = |why| UnpackError::Refused { entry: name.clone(), why };
            let path = if raw.components().all(|c| c == Component::CurDir) {
                continue;
            } else {
                inside(&raw).ok_or_else(|| refuse("absolute path or .. component"))?
            };
            match entry.header().entry_type() {
                EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
                EntryType::Symlink => {
                    let target = entry.link_name().map_err(io)?.ok_or_else(|| refuse("symlink without target"))?;
                    if !link_stays_inside(&path, &target) {
                        return Err(refuse("symlink pointing outside the archive"));
                    }
                }
                EntryType::Link => {
                    let target = entry.link_name().map_err(io)?.ok_or_else(|| refuse("hard link without target"))?;
                    if inside(&target).is_none() {
                        return Err(refuse("hard link pointing outside the archive"));
                    }
                }
                EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink => {}
                EntryType::Char | EntryType::Block => return Err(refuse("a device file")),
                EntryType::Fifo => return Err(refuse("a FIFO")),
                _ => return Err(refuse("not a file, directory or link")),
            }
        }
        if let Some(e) = failed {
            return Err(read_err(e));
        }
    }
    // Second pass: extract, each entry through `unpack_in`, which re-checks containment.
    let mut tar = open(&file)?;
    tar.set_preserve_permissions(false);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    tar.set_mask(MODE_MASK);
    tar.set_overwrite(false);
    let mut failed = None;
    for entry in tar.entries().map_err(io)? {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        let name = entry.path().map_err(io)?.display().to_string();
        match entry.unpack_in(dest) {
            Ok(true) => {}
            Ok(false) => return Err(UnpackError::Refused { entry: name, why: "outside the target directory" }),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        return Err(read_err(e));
    }
    let meta = std::fs::symlink_metadata(dest.join(entry)).map_err(|_| UnpackError::NoEntry(entry))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(UnpackError::NoEntry(entry));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<File>>)) -> PathBuf {
        let path = dir.join("a.tar.gz");
        let gz = flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        build(&mut b);
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    fn file(b: &mut tar::Builder<flate2::write::GzEncoder<File>>, name: &str, body: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(EntryType::Regular);
        // set_path refuses `..`; write the raw name to build hostile archives.
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }

    fn link(b: &mut tar::Builder<flate2::write::GzEncoder<File>>, kind: EntryType, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(kind);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    fn check(build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<File>>)) -> (Result<(), UnpackError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let a = archive(dir.path(), build);
        let dest = dir.path().join("work/agent/.tmp-1");
        std::fs::create_dir_all(&dest).unwrap();
        (unpack(&a, &dest), dir)
    }

    #[test]
    fn good_archive_unpacks_with_modes() {
        let (r, dir) = check(|b| {
            file(b, "control", b"#!/bin/sh\necho started\n", 0o755);
            file(b, "bin/agent", b"x", 0o755);
            link(b, EntryType::Symlink, "current", "bin/agent");
        });
        r.unwrap();
        let dest = dir.path().join("work/agent/.tmp-1");
        assert!(dest.join("bin/agent").exists());
        assert_eq!(std::fs::metadata(dest.join("control")).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn hostile_archives_are_refused_and_write_nothing_outside() {
        type Build = Box<dyn FnOnce(&mut tar::Builder<flate2::write::GzEncoder<File>>)>;
        let cases: Vec<(&str, Build)> = vec![
            ("absolute", Box::new(|b| file(b, "/tmp/ops-evil-abs", b"x", 0o644))),
            ("dotdot", Box::new(|b| file(b, "../../evil", b"x", 0o644))),
            ("inner dotdot", Box::new(|b| file(b, "bin/../../../evil", b"x", 0o644))),
            ("symlink out", Box::new(|b| link(b, EntryType::Symlink, "escape", "../../../etc"))),
            ("symlink abs", Box::new(|b| link(b, EntryType::Symlink, "escape", "/etc/passwd"))),
            ("hardlink out", Box::new(|b| link(b, EntryType::Link, "hl", "../../etc/passwd"))),
            ("hardlink abs", Box::new(|b| link(b, EntryType::Link, "hl", "/etc/passwd"))),
        ];
        for (what, build) in cases {
            let (r, dir) = check(|b| {
                file(b, "control", b"#!/bin/sh\n", 0o755);
                build(b);
            });
            assert!(matches!(r, Err(UnpackError::Refused { .. })), "{what}: {r:?}");
            // Nothing at all was written: the check runs before extraction.
            let dest = dir.path().join("work/agent/.tmp-1");
            assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0, "{what}");
            assert!(!dir.path().join("evil").exists() && !dir.path().join("work/evil").exists(), "{what}");
        }
        assert!(!Path::new("/tmp/ops-evil-abs").exists());
    }

    fn special(b: &mut tar::Builder<flate2::write::GzEncoder<File>>, kind: EntryType, name: &str, mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    #[test]
    fn setuid_setgid_sticky_and_other_write_never_reach_the_disk() {
        let (r, dir) = check(|b| {
            file(b, "control", b"#!/bin/sh\n", 0o4777);
            special(b, EntryType::Directory, "shared", 0o1777);
            file(b, "shared/tool", b"x", 0o6755);
            file(b, "conf", b"x", 0o666);
        });
        r.unwrap();
        let dest = dir.path().join("work/agent/.tmp-1");
        let mode = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("control"), 0o775);
        assert_eq!(mode("shared"), 0o775);
        assert_eq!(mode("shared/tool"), 0o755);
        assert_eq!(mode("conf"), 0o664);
    }

    #[test]
    fn devices_and_fifos_are_refused_before_anything_is_written() {
        for (kind, why) in [(EntryType::Char, "a device file"), (EntryType::Block, "a device file"), (EntryType::Fifo, "a FIFO")] {
            let (r, dir) = check(|b| {
                file(b, "control", b"#!/bin/sh\n", 0o755);
                special(b, kind, "dev", 0o666);
            });
            assert!(matches!(&r, Err(UnpackError::Refused { why: w, .. }) if *w == why), "{kind:?}: {r:?}");
            assert_eq!(std::fs::read_dir(dir.path().join("work/agent/.tmp-1")).unwrap().count(), 0);
        }
    }

    #[test]
    fn a_zip_bomb_is_refused_under_the_cap_before_anything_is_written() {
        // 200 MB of zeros: under 1 MB of gzip, so an allowance of 20 times that (or the
        // 16 MiB floor).
        let (r, dir) = check(|b| {
            file(b, "control", b"#!/bin/sh\n", 0o755);
            let mut h = tar::Header::new_gnu();
            h.set_size(200_000_000);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, "zeros", std::io::repeat(0).take(200_000_000)).unwrap();
        });
        assert!(matches!(r, Err(UnpackError::TooLarge { cap }) if (MIN_ALLOWANCE..=20 << 20).contains(&cap)), "{r:?}");
        assert_eq!(std::fs::read_dir(dir.path().join("work/agent/.tmp-1")).unwrap().count(), 0);
        // The ratio counts too: an archive of 1 MB may unpack to 20 MB, not more.
        let l = Limits::default();
        assert_eq!(l.allowance(1 << 20), 20 << 20);
        assert_eq!(l.allowance(1 << 40), 4 << 30);
        assert_eq!(l.allowance(100), MIN_ALLOWANCE);
    }

    #[test]
    fn a_huge_pax_header_is_cut_off_at_the_cap() {
        // A PAX header the tar reader would read whole into memory.
        let (r, _dir) = check(|b| {
            let mut h = tar::Header::new_ustar();
            h.set_size(1 << 30);
            h.set_entry_type(EntryType::XHeader);
            h.set_path("pax").unwrap();
            h.set_cksum();
            b.append(&h, std::io::repeat(b'a').take(1 << 30)).unwrap();
            file(b, "control", b"#!/bin/sh\n", 0o755);
        });
        assert!(matches!(r, Err(UnpackError::TooLarge { .. })), "{r:?}");
    }

    #[test]
    fn more_entries_than_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = archive(dir.path(), |b| {
            file(b, "control", b"#!/bin/sh\n", 0o755);
            for i in 0..20 {
                file(b, &format!("f{i}"), b"x", 0o644);
            }
        });
        let dest = dir.path().join("d");
        std::fs::create_dir(&dest).unwrap();
        let limits = Limits { max_entries: 10, ..Limits::default() };
        assert!(matches!(unpack_with(&a, &dest, "control", limits), Err(UnpackError::TooManyEntries { cap: 10 })));
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);
        unpack_with(&a, &dest, "control", Limits { max_entries: 21, ..Limits::default() }).unwrap();
    }

    #[test]
    fn archive_without_executable_control_is_refused() {
        let (r, _d) = check(|b| file(b, "agent", b"x", 0o755));
        assert!(matches!(r, Err(UnpackError::NoEntry("control"))));
        let (r, _d) = check(|b| file(b, "control", b"x", 0o644));
        assert!(matches!(r, Err(UnpackError::NoEntry("control"))));
        let (r, _d) = check(|b| file(b, "sub/control", b"x", 0o755));
        assert!(matches!(r, Err(UnpackError::NoEntry("control"))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.tar.gz");
        std::fs::write(&p, b"not gzip at all").unwrap();
        assert!(matches!(unpack(&p, dir.path()), Err(UnpackError::Io { .. })));
    }
}
