//! Safe extraction of an agent tarball into a fresh directory.
//!
//! Every entry is checked before anything is written: relative paths of normal components
//! only (no absolute path, no `..`), symbolic links whose target stays inside the directory,
//! hard links to entries inside it, and only regular files, directories and links. The
//! archive must hold an executable `control` at its root (`ops-updater` for the updater's own
//! package). A refused archive leaves the
//! target directory for the caller to remove: nothing is written outside it.

use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read archive {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("archive entry {entry:?} refused: {why}")]
    Refused { entry: String, why: &'static str },
    #[error("archive has no executable `{0}` at its root")]
    NoEntry(&'static str),
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
    unpack_with(archive, dest, "control")
}

/// [`unpack`] of an archive whose executable at the root is `entry`.
pub fn unpack_with(archive: &Path, dest: &Path, entry: &'static str) -> Result<(), UnpackError> {
    let io = |source| UnpackError::Io { path: archive.to_path_buf(), source };
    // First pass: check every entry, write nothing.
    {
        let file = File::open(archive).map_err(io)?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
        for entry in tar.entries().map_err(io)? {
            let entry = entry.map_err(io)?;
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
                _ => return Err(refuse("not a file, directory or link")),
            }
        }
    }
    // Second pass: extract, each entry through `unpack_in`, which re-checks containment.
    let file = File::open(archive).map_err(io)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    tar.set_preserve_permissions(true);
    tar.set_overwrite(false);
    for entry in tar.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let name = entry.path().map_err(io)?.display().to_string();
        let ok = entry.unpack_in(dest).map_err(io)?;
        if !ok {
            return Err(UnpackError::Refused { entry: name, why: "outside the target directory" });
        }
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
