//! Writing a file so that a crash never leaves it half written or takes it back: the one
//! helper every binary's kept state goes through.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `path` through a synced temporary file beside it, a rename, and a sync of the
/// directory: a reader sees the old or the new content, never half, and once this returns a
/// crash cannot bring the old content back. Creates the directory if needed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_as(path, bytes, "")
}

/// [`write_atomically`] through `{path}.{tag}.tmp`: for a file that several processes of one
/// machine may write at once (meta nodes sharing a `cluster.toml`), each with its own tag.
pub fn write_atomically_as(path: &Path, bytes: &[u8], tag: &str) -> std::io::Result<()> {
    write_atomically_mode(path, bytes, tag, 0o666)
}

/// [`write_atomically`] of a secret: the file (and its temporary file, from its creation) is
/// readable by its owner only (0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_mode(path, bytes, "", 0o600)
}

fn write_atomically_mode(path: &Path, bytes: &[u8], tag: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = beside(path, &if tag.is_empty() { ".tmp".to_owned() } else { format!(".{tag}.tmp") });
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    if mode != 0o666 {
        // A temporary file left by a crash keeps its old mode: set it.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    f.write_all(bytes)?;
    drop(f);
    rename_synced(&tmp, path)
}

/// Puts the whole file `tmp` (written beside `path`) in place as `path`: syncs it, renames it
/// and syncs the directory, so once this returns a crash brings neither half a file nor the
/// old one back. What [`write_atomically`] ends with; for files streamed to `tmp` (snapshots,
/// packages, binaries). Creates nothing.
pub fn rename_synced(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The journal of a pair write in progress: `{path}.pair`.
pub fn pair_journal(path: &Path) -> PathBuf {
    beside(path, ".pair")
}

/// Set (to anything) in the environment of a process, it aborts after writing a pair's
/// signature and before its text: the crash [`write_pair`] must survive, for the tests that
/// kill a real process there.
pub const CRASH_BETWEEN_PAIR_WRITES: &str = "OPS_FAULT_CRASH_BETWEEN_PAIR_WRITES";

/// Writes `text` to `path` and `signature` to `sig_path` (None: removes it) so that no crash
/// can leave a text beside a signature of another: both go first into one journal file
/// ([`pair_journal`], written atomically), then the signature, then the text, then the journal
/// is removed. A crash before the journal is whole leaves the old pair; after, the next
/// [`recover_pair`] (every loader of a signed file calls it) finishes the new one. `tag` as in
/// [`write_atomically_as`].
pub fn write_pair(path: &Path, text: &[u8], sig_path: &Path, signature: Option<&[u8]>, tag: &str) -> std::io::Result<()> {
    let journal = pair_journal(path);
    write_atomically_as(&journal, &encode_pair(text, signature), tag)?;
    apply_pair(path, text, sig_path, signature, tag)?;
    remove_synced(&journal)
}

fn apply_pair(path: &Path, text: &[u8], sig_path: &Path, signature: Option<&[u8]>, tag: &str) -> std::io::Result<()> {
    match signature {
        Some(sig) => write_atomically_as(sig_path, sig, tag)?,
        None => remove_synced(sig_path)?,
    }
    if std::env::var_os(CRASH_BETWEEN_PAIR_WRITES).is_some() {
        std::process::abort();
    }
    write_atomically_as(path, text, tag)
}

/// Removes `path` (absent is fine) and syncs its directory.
fn remove_synced(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `ops-pair 1 <text bytes> <signature bytes or -1>\n`, the text, the signature.
fn encode_pair(text: &[u8], signature: Option<&[u8]>) -> Vec<u8> {
    let sig_len = signature.map_or("-1".to_owned(), |s| s.len().to_string());
    let mut out = format!("ops-pair 1 {} {sig_len}\n", text.len()).into_bytes();
    out.extend_from_slice(text);
    out.extend_from_slice(signature.unwrap_or_default());
    out
}

fn decode_pair(bytes: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..nl]).ok()?;
    let mut parts = header.strip_prefix("ops-pair 1 ")?.split(' ');
    let text_len: usize = parts.next()?.parse().ok()?;
    let sig_len: i64 = parts.next()?.parse().ok()?;
    let body = &bytes[nl + 1..];
    let text = body.get(..text_len)?;
    let rest = &body[text_len..];
    match sig_len {
        -1 if rest.is_empty() => Some((text, None)),
        n if n >= 0 && rest.len() == n as usize => Some((text, Some(rest))),
        _ => None,
    }
}

/// Finishes a pair write that a crash interrupted ([`write_pair`]): when `{path}.pair` is
/// there, writes its text and signature over `path` and `sig_path` and removes it. Returns
/// whether it did. A journal that does not read whole (never written by `write_pair`, which
/// writes it atomically) is removed and the pair left as it is.
pub fn recover_pair(path: &Path, sig_path: &Path) -> std::io::Result<bool> {
    let journal = pair_journal(path);
    let bytes = match std::fs::read(&journal) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let Some((text, signature)) = decode_pair(&bytes) else {
        remove_synced(&journal)?;
        return Ok(false);
    };
    apply_pair(path, text, sig_path, signature, "recover")?;
    remove_synced(&journal)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state");
        super::write_atomically(&path, b"one").unwrap();
        super::write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_private_file_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(dir.path().join("secret.tmp"), b"left by a crash").unwrap();
        super::write_private(&path, b"s3cret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"s3cret");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_pair_interrupted_after_its_journal_is_finished_by_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (text, sig) = (dir.path().join("a.toml"), dir.path().join("a.toml.sig"));
        super::write_pair(&text, b"old", &sig, Some(b"sig-old"), "").unwrap();
        assert_eq!((std::fs::read(&text).unwrap(), std::fs::read(&sig).unwrap()), (b"old".to_vec(), b"sig-old".to_vec()));
        assert!(!super::pair_journal(&text).exists());
        assert!(!super::recover_pair(&text, &sig).unwrap(), "nothing to finish");

        // The crash: journal written, the new signature beside the old text.
        super::write_atomically(&super::pair_journal(&text), &super::encode_pair(b"new", Some(b"sig-new"))).unwrap();
        super::write_atomically(&sig, b"sig-new").unwrap();
        assert!(super::recover_pair(&text, &sig).unwrap());
        assert_eq!((std::fs::read(&text).unwrap(), std::fs::read(&sig).unwrap()), (b"new".to_vec(), b"sig-new".to_vec()));
        assert!(!super::pair_journal(&text).exists());

        // An unsigned pair removes the signature, at once or on recovery.
        super::write_atomically(&super::pair_journal(&text), &super::encode_pair(b"plain", None)).unwrap();
        assert!(super::recover_pair(&text, &sig).unwrap());
        assert_eq!(std::fs::read(&text).unwrap(), b"plain");
        assert!(!sig.exists());

        // A journal that does not read whole is dropped; the pair stays.
        std::fs::write(super::pair_journal(&text), b"ops-pair 1 99 3\nshort").unwrap();
        assert!(!super::recover_pair(&text, &sig).unwrap());
        assert_eq!(std::fs::read(&text).unwrap(), b"plain");
        assert!(!super::pair_journal(&text).exists());
        assert_eq!(super::decode_pair(&super::encode_pair(b"t\nx", Some(b""))), Some((&b"t\nx"[..], Some(&b""[..]))));
    }
}
