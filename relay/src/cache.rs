//! The relay's pull-through package cache (`--cache-dir`): the tarballs and `.md5` files of the
//! `relay_cache` agents of its config copy, fetched from their origin once per relay.
//!
//! - **Only configured files** (`ops_config::cache::PackageIndex`): any other path is a 404
//!   without an origin request.
//! - **Single flight**: concurrent misses for one file wait on one download (`moka`'s
//!   `or_try_insert_with`).
//! - **Checked before served**: the download streams to `tmp/` while its md5 and sha256 are
//!   computed; it is checked against the config (sha256 when given, else the hex md5, else the
//!   origin's `.md5`), and only then renamed into `files/`. A file that fails is never served,
//!   is counted, and is not fetched again for [`FAILURE_TTL`].
//! - **Bounded**: least-recently-used eviction by size; a restarted relay keeps its files (each
//!   data file has a `.json` beside it saying what it is; the `.json`'s mtime is its last use).
//! - **Served from memory or disk**: a whole-file GET of a file up to a quarter of
//!   `--cache-memory-bytes` is written from one shared in-memory copy (no read or copy per
//!   request, like nginx's sendfile); everything else (Range, HEAD, conditional requests,
//!   larger files) by `tower-http`'s `ServeFile` from disk in 64 KiB chunks. Memory stays
//!   bounded either way.
//!
//! (The file passes 600 lines only with its unit tests, which stay beside the checks they
//! pin; the code is under 600.)

use ops_config::clock::unix_now;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use md5::{Digest, Md5};
use moka::future::Cache;
use moka::notification::RemovalCause;
use ops_config::cache::{Kind, PackageIndex, Wanted};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

use crate::metrics as m;

/// How long a failed fetch or check is remembered: requests for that file in this time get the
/// same error without touching the origin.
pub const FAILURE_TTL: Duration = Duration::from_secs(10);
/// Read size when serving from disk.
const SERVE_CHUNK: usize = 64 * 1024;
/// What a connection writes of an in-memory file per turn.
const MEMORY_SLICE: usize = 256 * 1024;
/// A `.md5` file larger than this is not an md5sum line.
const MAX_DIGEST_FILE: u64 = 4096;
/// The last-use time on disk is refreshed at most this often per file.
const TOUCH_EVERY: u64 = 60;

/// `--cache-dir`, `--cache-max-bytes`, `--cache-memory-bytes`, `--advertise-url`.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Most bytes of cached files also kept in memory (0: none), for whole-file GETs.
    pub memory_bytes: u64,
    /// How updaters reach this relay (`http://relay-dc1:2200`).
    pub advertise: String,
}

/// Why a file could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("GET {url}: {message}")]
    Origin { url: String, message: String },
    #[error("GET {url}: the origin answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {message}; not served")]
    Check { url: String, message: String },
    #[error("{url}: larger than the whole cache ({max} bytes)")]
    TooLarge { url: String, max: u64 },
    #[error("cache disk: {0}")]
    Disk(String),
}

impl CacheError {
    fn status(&self) -> StatusCode {
        match self {
            CacheError::Status { status: 404, .. } => StatusCode::NOT_FOUND,
            CacheError::Disk(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// What a cached file is; kept as `{file}.json` beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    url: String,
    file: String,
    bytes: u64,
    /// Hex digests of the file's bytes.
    md5: String,
    sha256: String,
    /// For a `.md5` file: the digest it names.
    #[serde(default)]
    names: String,
}

struct Entry {
    meta: Meta,
    path: PathBuf,
    /// `Last-Modified` of the file (when it was fetched).
    modified: SystemTime,
    /// Unix seconds the last-use time on disk was last refreshed.
    touched: AtomicU64,
}

impl Entry {
    /// Still what the config asks for? (An operator may have changed a digest.)
    fn fits(&self, wanted: &Wanted) -> bool {
        let e = &wanted.expect;
        match wanted.kind {
            Kind::Tarball => (e.sha256.is_empty() || e.sha256 == self.meta.sha256) && (e.md5.is_empty() || e.md5 == self.meta.md5),
            Kind::Md5 => e.md5.is_empty() || e.md5 == self.meta.names,
        }
    }

    fn meta_path(&self) -> PathBuf {
        meta_path(&self.path)
    }
}

fn meta_path(data: &Path) -> PathBuf {
    let mut p = data.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// Counters behind `/health` (the Prometheus ones are in `crate::metrics`).
#[derive(Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    waits: AtomicU64,
}

pub struct PackageCache {
    settings: CacheSettings,
    files: PathBuf,
    tmp: PathBuf,
    entries: Cache<String, Arc<Entry>>,
    /// Whole files held in memory too, by file name (unique per download, so a file fetched
    /// again never meets its old bytes here): a hot file is then written from one shared
    /// buffer to every socket, with no read per request, as nginx's sendfile would.
    hot: Cache<String, bytes::Bytes>,
    failures: Cache<String, CacheError>,
    client: reqwest::Client,
    counts: Counts,
    /// Entries found on disk at start, put back by [`restore`](Self::restore).
    found: parking_lot::Mutex<Vec<Arc<Entry>>>,
    next_name: AtomicU64,
}

/// Weight of a file in the cache, in KiB (moka weighs in `u32`).
fn weight(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).max(1)
}

/// The cache key of an origin URL.
fn key_of(url: &str) -> String {
    ops_config::content_hash(url.as_bytes())
}

impl PackageCache {
    /// Creates `dir/files` and `dir/tmp`, clears `tmp` (leftovers of a killed relay are never
    /// trusted) and reads what `files` holds; call [`restore`](Self::restore) before serving.
    pub fn open(settings: CacheSettings, client: reqwest::Client) -> Result<Arc<Self>, String> {
        let files = settings.dir.join("files");
        let tmp = settings.dir.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        for d in [&files, &tmp] {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create cache dir {}: {e}", d.display()))?;
        }
        let capacity = (settings.max_bytes / 1024).max(1);
        let entries = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_: &String, e: &Arc<Entry>| weight(e.meta.bytes))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(|_key: Arc<String>, entry: Arc<Entry>, cause: RemovalCause| {
                if cause == RemovalCause::Replaced {
                    return;
                }
                if cause == RemovalCause::Size {
                    metrics::counter!(m::CACHE_EVICTIONS).increment(1);
                }
                let _ = std::fs::remove_file(entry.meta_path());
                let _ = std::fs::remove_file(&entry.path);
            })
            .build();
        let failures = Cache::builder().max_capacity(10_000).time_to_live(FAILURE_TTL).build();
        let hot = Cache::builder()
            .max_capacity((settings.memory_bytes / 1024).max(1))
            .weigher(|_: &String, b: &bytes::Bytes| weight(b.len() as u64))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        let found = scan(&files);
        Ok(Arc::new(PackageCache {
            settings,
            files,
            tmp,
            entries,
            hot,
            failures,
            client,
            counts: Counts::default(),
            found: parking_lot::Mutex::new(found),
            next_name: AtomicU64::new(0),
        }))
    }

    /// Puts the files found on disk back, least recently used first.
    pub async fn restore(&self) {
        let found = std::mem::take(&mut *self.found.lock());
        let n = found.len();
        for e in found {
            self.entries.insert(key_of(&e.meta.url), e).await;
        }
        self.entries.run_pending_tasks().await;
        self.gauges();
        if n > 0 {
            tracing::info!(files = self.entries.entry_count(), bytes = self.bytes_held(), "package cache restored from disk");
        }
    }

    pub fn advertise(&self) -> &str {
        &self.settings.advertise
    }

    fn bytes_held(&self) -> u64 {
        self.entries.iter().map(|(_, e)| e.meta.bytes).sum()
    }

    fn gauges(&self) {
        metrics::gauge!(m::CACHE_BYTES).set(self.bytes_held() as f64);
        metrics::gauge!(m::CACHE_FILES).set(self.entries.entry_count() as f64);
    }

    /// `/health`'s view: size, limits and hit ratio.
    pub fn health(&self) -> serde_json::Value {
        let (hits, misses, waits) = (
            self.counts.hits.load(Ordering::Relaxed),
            self.counts.misses.load(Ordering::Relaxed),
            self.counts.waits.load(Ordering::Relaxed),
        );
        let total = hits + misses + waits;
        serde_json::json!({
            "bytes": self.bytes_held(),
            "maxBytes": self.settings.max_bytes,
            "files": self.entries.entry_count(),
            "hits": hits,
            "misses": misses,
            "waits": waits,
            // A wait shared another request's download: no origin request of its own.
            "hitRatio": if total == 0 { None } else { Some((hits + waits) as f64 / total as f64) },
        })
    }

    /// `GET`/`HEAD /pkg/{key}/{rest}`.
    pub async fn serve(self: &Arc<Self>, packages: &PackageIndex, key: &str, rest: &str, request: Request<Body>) -> Response {
        let Some(wanted) = packages.resolve(key, rest) else {
            metrics::counter!(m::CACHE_REQUESTS, "result" => "refused").increment(1);
            return not_found(format!("no cached package at /pkg/{key}/{rest}"));
        };
        let entry = match self.get(packages, &wanted).await {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!(m::CACHE_REQUESTS, "result" => "error").increment(1);
                tracing::warn!(error = %e, "package cache");
                return (e.status(), axum::Json(serde_json::json!({ "errorMessage": e.to_string() }))).into_response();
            }
        };
        self.touch(&entry);
        let plain = request.method() == Method::GET
            && ![
                header::RANGE,
                header::IF_MODIFIED_SINCE,
                header::IF_UNMODIFIED_SINCE,
                header::IF_RANGE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
            ]
            .iter()
            .any(|h| request.headers().contains_key(h));
        if let Some(bytes) = self.in_memory(&entry, plain).await {
            metrics::counter!(m::CACHE_SERVED_BYTES).increment(bytes.len() as u64);
            let length = header::HeaderValue::from(bytes.len());
            // Zero-copy slices of the shared buffer, yielding to the runtime between slices: a
            // connection writes one slice per turn, so hundreds of downloads in flight add a
            // few milliseconds to a heartbeat, not a whole round of socket-buffer-sized writes.
            let body = bytes.clone();
            let slices = futures_util::stream::unfold(0usize, move |at| {
                let body = body.clone();
                async move {
                    if at >= body.len() {
                        return None;
                    }
                    if at > 0 {
                        tokio::task::yield_now().await;
                    }
                    let end = body.len().min(at + MEMORY_SLICE);
                    Some((Ok::<_, std::convert::Infallible>(body.slice(at..end)), end))
                }
            });
            let mut response = Response::new(Body::from_stream(slices));
            let h = response.headers_mut();
            h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
            h.insert(header::ACCEPT_RANGES, header::HeaderValue::from_static("bytes"));
            h.insert(header::CONTENT_LENGTH, length);
            if let Ok(v) = header::HeaderValue::from_str(&httpdate::fmt_http_date(entry.modified)) {
                h.insert(header::LAST_MODIFIED, v);
            }
            return response;
        }
        // Ranges, HEAD and conditional requests, and files not held in memory: from disk.
        let head = request.method() == Method::HEAD;
        let mut serve = tower_http::services::ServeFile::new(&entry.path).with_buf_chunk_size(SERVE_CHUNK);
        match serve.try_call(request).await {
            Ok(response) => {
                if !head
                    && response.status().is_success()
                    && let Some(n) = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                {
                    metrics::counter!(m::CACHE_SERVED_BYTES).increment(n);
                }
                response.map(Body::new)
            }
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading cached file: {e}\n")).into_response(),
        }
    }

    /// The whole file from memory, for a `plain` GET (no range, no condition) of a file small
    /// enough to keep there (at most a quarter of `--cache-memory-bytes`); read from disk
    /// once, however many ask.
    async fn in_memory(&self, entry: &Arc<Entry>, plain: bool) -> Option<bytes::Bytes> {
        if !plain || self.settings.memory_bytes == 0 || entry.meta.bytes > self.settings.memory_bytes / 4 {
            return None;
        }
        let path = entry.path.clone();
        let read = async move {
            tokio::task::spawn_blocking(move || std::fs::read(&path).map(bytes::Bytes::from))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
        };
        match self.hot.try_get_with(entry.meta.file.clone(), read).await {
            Ok(b) if b.len() as u64 == entry.meta.bytes => Some(b),
            _ => None,
        }
    }

    /// The checked file for `wanted`: from the cache, or fetched once however many ask.
    async fn get(self: &Arc<Self>, packages: &PackageIndex, wanted: &Wanted) -> Result<Arc<Entry>, CacheError> {
        let key = key_of(&wanted.origin_url);
        if let Some(e) = self.entries.get(&key).await {
            if e.fits(wanted) {
                self.counts.hits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::CACHE_REQUESTS, "result" => "hit").increment(1);
                return Ok(e);
            }
            tracing::info!(url = %wanted.origin_url, "cached file no longer matches the config's digest: fetching again");
            self.entries.invalidate(&key).await;
        }
        if let Some(error) = self.failures.get(&key).await {
            return Err(error);
        }
        let this = self.clone();
        let fetched = self.entries.entry(key.clone()).or_try_insert_with(this.fetch(packages, wanted)).await;
        match fetched {
            Ok(entry) => {
                let (counter, result) = if entry.is_fresh() { (&self.counts.misses, "miss") } else { (&self.counts.waits, "wait") };
                counter.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::CACHE_REQUESTS, "result" => result).increment(1);
                if entry.is_fresh() {
                    self.entries.run_pending_tasks().await;
                    self.gauges();
                }
                Ok(entry.into_value())
            }
            Err(error) => {
                let error = (*error).clone();
                self.failures.insert(key, error.clone()).await;
                Err(error)
            }
        }
    }

    /// One download: stream to `tmp/`, check, rename into `files/`, write its `.json`.
    async fn fetch(self: Arc<Self>, packages: &PackageIndex, wanted: &Wanted) -> Result<Arc<Entry>, CacheError> {
        let url = &wanted.origin_url;
        let origin = |message: String| CacheError::Origin { url: url.clone(), message };
        let disk = |e: std::io::Error| CacheError::Disk(e.to_string());
        let max = match wanted.kind {
            Kind::Tarball => self.settings.max_bytes,
            Kind::Md5 => MAX_DIGEST_FILE,
        };
        let response = self.client.get(url).send().await.map_err(|e| origin(ops_config::causes(&e)))?;
        if !response.status().is_success() {
            return Err(CacheError::Status { url: url.clone(), status: response.status().as_u16() });
        }
        if response.content_length().is_some_and(|n| n > max) {
            return Err(CacheError::TooLarge { url: url.clone(), max });
        }
        let name = format!("{}-{}-{}", key_of(url), unix_now(), self.next_name.fetch_add(1, Ordering::Relaxed));
        let tmp = self.tmp.join(&name);
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(disk)?;
            let (mut md5, mut sha) = (Md5::new(), Sha256::new());
            let mut bytes = 0u64;
            let mut head = Vec::new();
            let mut stream = response.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| origin(ops_config::causes(&e)))?;
                bytes += chunk.len() as u64;
                metrics::counter!(m::CACHE_ORIGIN_BYTES).increment(chunk.len() as u64);
                if bytes > max {
                    return Err(CacheError::TooLarge { url: url.clone(), max });
                }
                if wanted.kind == Kind::Md5 {
                    head.extend_from_slice(&chunk);
                }
                md5.update(&chunk);
                sha.update(&chunk);
                file.write_all(&chunk).await.map_err(disk)?;
            }
            file.sync_all().await.map_err(disk)?;
            let mut meta = Meta {
                url: url.clone(),
                file: name.clone(),
                bytes,
                md5: ops_config::hex(&md5.finalize()),
                sha256: ops_config::hex(&sha.finalize()),
                names: String::new(),
            };
            self.check(packages, wanted, &mut meta, &head).await?;
            Ok(meta)
        }
        .await;
        let meta = match result {
            Ok(meta) => meta,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                if matches!(e, CacheError::Check { .. }) {
                    metrics::counter!(m::CACHE_FAILED_CHECKS).increment(1);
                    tracing::error!(error = %e, "package failed its check");
                }
                return Err(e);
            }
        };
        let path = self.files.join(&name);
        let json = serde_json::to_vec(&meta).expect("meta serializes");
        let (file, meta_file) = (path.clone(), meta_path(&path));
        tokio::task::spawn_blocking(move || {
            ops_config::disk::rename_synced(&tmp, &file).and_then(|()| ops_config::disk::write_atomically(&meta_file, &json))
        })
        .await
        .map_err(|e| CacheError::Disk(e.to_string()))?
        .map_err(disk)?;
        tracing::info!(url = %meta.url, bytes = meta.bytes, "package cached");
        Ok(Arc::new(Entry { meta, path, modified: SystemTime::now(), touched: AtomicU64::new(unix_now()) }))
    }

    /// Checks a downloaded file against the config (and, for a tarball whose config gives
    /// neither sha256 nor md5, against the origin's `.md5`, itself fetched through the cache).
    async fn check(self: &Arc<Self>, packages: &PackageIndex, wanted: &Wanted, meta: &mut Meta, head: &[u8]) -> Result<(), CacheError> {
        let fail = |message: String| Err(CacheError::Check { url: wanted.origin_url.clone(), message });
        match judge(wanted, meta, head) {
            Judged::Good => Ok(()),
            Judged::Bad(message) => fail(message),
            Judged::ByDigestFile => {
                let Some(digest) = packages.resolve_url(&wanted.md5_url) else {
                    return fail(format!("no digest to check it by ({} is not a configured file)", wanted.md5_url));
                };
                let named = Box::pin(self.get(packages, &digest)).await.map_err(|d| CacheError::Check {
                    url: wanted.origin_url.clone(),
                    message: format!("its digest file could not be had: {d}"),
                })?;
                if meta.md5 == named.meta.names {
                    Ok(())
                } else {
                    fail(format!("md5 {}, {} says {}", meta.md5, wanted.md5_url, named.meta.names))
                }
            }
        }
    }

    /// Refreshes the file's last use on disk (its `.json`'s mtime), at most once a minute.
    fn touch(&self, entry: &Arc<Entry>) {
        let now = unix_now();
        if now.saturating_sub(entry.touched.load(Ordering::Relaxed)) < TOUCH_EVERY {
            return;
        }
        entry.touched.store(now, Ordering::Relaxed);
        let path = entry.meta_path();
        tokio::task::spawn_blocking(move || {
            if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
        });
    }
}

/// What a downloaded file's digests say against the config.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    Good,
    /// Not what the config says: never served.
    Bad(String),
    /// A tarball the config gives no digest for: checked against the origin's `.md5`.
    ByDigestFile,
}

/// Judges a download by what the config expects: a `.md5` file must hold an md5 (the
/// config's, when it gives one; `meta.names` is set to it); a tarball must match the config's
/// sha256 when given, else its hex md5, else its digest file decides.
fn judge(wanted: &Wanted, meta: &mut Meta, head: &[u8]) -> Judged {
    let e = &wanted.expect;
    match wanted.kind {
        Kind::Md5 => {
            let text = String::from_utf8_lossy(head);
            let word = text.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
            if word.len() != 32 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Judged::Bad("no md5 digest in it".into());
            }
            if !e.md5.is_empty() && e.md5 != word {
                return Judged::Bad(format!("names md5 {word}, the config says {}", e.md5));
            }
            meta.names = word;
            Judged::Good
        }
        Kind::Tarball if !e.sha256.is_empty() => {
            if meta.sha256 == e.sha256 {
                Judged::Good
            } else {
                Judged::Bad(format!("sha256 {}, the config says {}", meta.sha256, e.sha256))
            }
        }
        Kind::Tarball if !e.md5.is_empty() => {
            if meta.md5 == e.md5 {
                Judged::Good
            } else {
                Judged::Bad(format!("md5 {}, the config says {}", meta.md5, e.md5))
            }
        }
        Kind::Tarball => Judged::ByDigestFile,
    }
}

/// Reads `files/`: each data file with a readable `.json` whose size matches; anything else
/// is removed. Sorted by last use, oldest first.
fn scan(files: &Path) -> Vec<Arc<Entry>> {
    let Ok(dir) = std::fs::read_dir(files) else { return Vec::new() };
    let mut found = Vec::new();
    let mut names: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    for path in &names {
        if path.extension().is_some_and(|x| x == "json") {
            let data = path.with_extension("");
            if !data.exists() {
                let _ = std::fs::remove_file(path);
            }
            continue;
        }
        let json = meta_path(path);
        let meta = std::fs::read(&json).ok().and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
        let size = std::fs::metadata(path).map(|m| m.len()).ok();
        match meta {
            Some(meta) if Some(meta.bytes) == size && path.file_name().is_some_and(|n| *n == *meta.file) => {
                let used = std::fs::metadata(&json).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
                let touched = used.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
                found.push((used, Arc::new(Entry { meta, path: path.clone(), modified, touched: AtomicU64::new(touched) })));
            }
            _ => {
                tracing::warn!(file = %path.display(), "cache file without a matching record: removed");
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(&json);
            }
        }
    }
    found.sort_by_key(|(used, _)| *used);
    found.into_iter().map(|(_, e)| e).collect()
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "errorMessage": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops_config::cache::Expect;

    const MD5_OF_ABC: &str = "900150983cd24fb0d6963f7d28e17f72";

    fn wanted(kind: Kind, sha256: &str, md5: &str) -> Wanted {
        Wanted {
            kind,
            origin_url: "http://origin.example/a-1.tar.gz".into(),
            expect: Expect { sha256: sha256.into(), md5: md5.into(), md5_base: None },
            md5_url: "http://origin.example/a-1.tar.gz.md5".into(),
        }
    }

    fn meta(bytes: u64, md5: &str, sha256: &str) -> Meta {
        Meta { url: "u".into(), file: "f".into(), bytes, md5: md5.into(), sha256: sha256.into(), names: String::new() }
    }

    #[test]
    fn downloads_are_judged_by_the_strongest_digest_the_config_gives() {
        let m = || meta(3, MD5_OF_ABC, "sha-of-abc");
        assert_eq!(judge(&wanted(Kind::Tarball, "sha-of-abc", "wrong"), &mut m(), b""), Judged::Good, "sha256 wins over md5");
        assert!(matches!(judge(&wanted(Kind::Tarball, "other", MD5_OF_ABC), &mut m(), b""), Judged::Bad(e) if e.contains("sha256")));
        assert_eq!(judge(&wanted(Kind::Tarball, "", MD5_OF_ABC), &mut m(), b""), Judged::Good);
        assert!(matches!(judge(&wanted(Kind::Tarball, "", "0".repeat(32).as_str()), &mut m(), b""), Judged::Bad(e) if e.contains("md5")));
        assert_eq!(judge(&wanted(Kind::Tarball, "", ""), &mut m(), b""), Judged::ByDigestFile);
    }

    #[test]
    fn digest_files_must_name_an_md5_and_the_configs() {
        let mut m = meta(40, "x", "y");
        let line = format!("{}  a-1.tar.gz\n", MD5_OF_ABC.to_uppercase());
        assert_eq!(judge(&wanted(Kind::Md5, "", ""), &mut m, line.as_bytes()), Judged::Good);
        assert_eq!(m.names, MD5_OF_ABC, "kept lowercase");
        let mut m = meta(40, "x", "y");
        assert!(
            matches!(judge(&wanted(Kind::Md5, "", "1".repeat(32).as_str()), &mut m, line.as_bytes()), Judged::Bad(e) if e.contains("config"))
        );
        for bad in [&b"<html>not found</html>"[..], b"", b"900150983cd24fb0d6963f7d28e17f7 short", b"zz0150983cd24fb0d6963f7d28e17f72"] {
            let mut m = meta(1, "x", "y");
            assert_eq!(judge(&wanted(Kind::Md5, "", ""), &mut m, bad), Judged::Bad("no md5 digest in it".into()), "{bad:?}");
            assert!(m.names.is_empty());
        }
    }

    #[test]
    fn a_cached_file_fits_only_while_the_config_says_the_same() {
        let entry = |names: &str| Entry {
            meta: Meta { names: names.into(), ..meta(3, MD5_OF_ABC, "s") },
            path: PathBuf::from("/nonexistent"),
            modified: SystemTime::now(),
            touched: AtomicU64::new(0),
        };
        assert!(entry("").fits(&wanted(Kind::Tarball, "s", MD5_OF_ABC)));
        assert!(entry("").fits(&wanted(Kind::Tarball, "", "")));
        assert!(!entry("").fits(&wanted(Kind::Tarball, "s2", "")), "an operator changed the sha256");
        assert!(!entry("").fits(&wanted(Kind::Tarball, "", "0".repeat(32).as_str())));
        assert!(entry(MD5_OF_ABC).fits(&wanted(Kind::Md5, "", MD5_OF_ABC)));
        assert!(!entry(MD5_OF_ABC).fits(&wanted(Kind::Md5, "", "1".repeat(32).as_str())));
    }

    #[test]
    fn weights_round_up_and_never_reach_zero() {
        assert_eq!((weight(0), weight(1), weight(1024), weight(1025)), (1, 1, 1, 2));
        assert_eq!(weight(u64::MAX), u32::MAX);
    }

    #[test]
    fn a_restart_keeps_whole_records_oldest_use_first_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, data: &[u8], record: Option<Meta>, used: u64| {
            std::fs::write(dir.path().join(name), data).unwrap();
            if let Some(m) = record {
                let json = dir.path().join(format!("{name}.json"));
                std::fs::write(&json, serde_json::to_vec(&m).unwrap()).unwrap();
                let f = std::fs::File::options().append(true).open(&json).unwrap();
                f.set_modified(UNIX_EPOCH + Duration::from_secs(used)).unwrap();
            }
        };
        let record = |file: &str, bytes: u64| Meta { file: file.into(), ..meta(bytes, "m", "s") };
        write("new", b"abc", Some(record("new", 3)), 2_000_000_000);
        write("old", b"abcd", Some(record("old", 4)), 1_000_000_000);
        write("short", b"ab", Some(record("short", 3)), 1_500_000_000);
        write("renamed", b"abc", Some(record("other-name", 3)), 1_500_000_000);
        write("bare", b"abc", None, 0);
        std::fs::write(dir.path().join("gone.json"), b"{}").unwrap();
        let found = scan(dir.path());
        let names: Vec<&str> = found.iter().map(|e| e.meta.file.as_str()).collect();
        assert_eq!(names, ["old", "new"], "least recently used first");
        assert_eq!(found[0].touched.load(Ordering::Relaxed), 1_000_000_000);
        let mut left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["new", "new.json", "old", "old.json"], "partial, renamed, bare and orphan records are removed");
    }
}
