//! Downloads: the agent tarball (streamed to a file while its md5 and sha256 are computed,
//! with a connect timeout, a total timeout and a size cap) and the `.md5` files.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use md5::{Digest, Md5};
use ops_config::DesiredAgent;
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: {}", crate::causes(source))]
    Http { url: String, source: reqwest::Error },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: larger than the cap of {cap} bytes")]
    TooLarge { url: String, cap: u64 },
    #[error("{url}: no md5 digest in it")]
    BadDigestFile { url: String },
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// This machine's `{arch}` in tarball URLs (`linux_amd64`, `linux_386`, `linux_arm64`,
/// `darwin_amd64`...).
pub fn arch() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    let cpu = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{os}_{cpu}")
}

/// `{tarball}/{arch}/{name}-{version}.tar.gz`.
pub fn tarball_url(d: &DesiredAgent, arch: &str) -> String {
    format!("{}/{arch}/{}-{}.tar.gz", d.tarball.trim_end_matches('/'), d.name, d.version)
}

pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Digests of a downloaded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub md5: String,
    pub sha256: String,
    pub bytes: u64,
}

pub struct Fetcher {
    client: reqwest::Client,
    max_bytes: u64,
}

impl Fetcher {
    /// `roots`: CA certificates trusted for HTTPS origins besides the system's.
    pub fn new(connect_timeout: Duration, total_timeout: Duration, max_bytes: u64, roots: &[reqwest::Certificate]) -> Self {
        let builder = reqwest::Client::builder().connect_timeout(connect_timeout).timeout(total_timeout).no_proxy();
        let client = crate::with_roots(builder, roots).build().expect("http client");
        Fetcher { client, max_bytes }
    }

    async fn get_small(&self, url: &str) -> Result<String, FetchError> {
        let r = self.client.get(url).send().await.map_err(|source| FetchError::Http { url: url.into(), source })?;
        if !r.status().is_success() {
            return Err(FetchError::Status { url: url.into(), status: r.status().as_u16() });
        }
        let body = crate::body_capped(r, crate::MAX_DIGEST_FILE_BYTES).await.map_err(|e| match e {
            crate::BodyError::Http(source) => FetchError::Http { url: url.into(), source },
            crate::BodyError::TooLarge(cap) => FetchError::TooLarge { url: url.into(), cap: cap as u64 },
        })?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The md5 the tarball must have: the reply's digest; or, when empty, the first word of
    /// `{url}.md5`; or, when the reply holds an http(s) base URL (older servers), the first
    /// word of `{md5}/{arch}/{name}-{version}.tar.gz.md5`.
    pub async fn expected_md5(&self, d: &DesiredAgent, url: &str, arch: &str) -> Result<String, FetchError> {
        let md5 = d.md5.trim();
        if is_hex(md5, 32) {
            return Ok(md5.to_ascii_lowercase());
        }
        let md5_url = if md5.starts_with("http://") || md5.starts_with("https://") {
            format!("{}/{arch}/{}-{}.tar.gz.md5", md5.trim_end_matches('/'), d.name, d.version)
        } else {
            format!("{url}.md5")
        };
        let text = self.get_small(&md5_url).await?;
        let word = text.split_whitespace().next().unwrap_or("");
        if is_hex(word, 32) { Ok(word.to_ascii_lowercase()) } else { Err(FetchError::BadDigestFile { url: md5_url }) }
    }

    /// Streams `url` into `dest` (created or truncated), computing its digests.
    pub async fn download(&self, url: &str, dest: &Path) -> Result<Digests, FetchError> {
        let io = |source| FetchError::Io { path: dest.display().to_string(), source };
        let r = self.client.get(url).send().await.map_err(|source| FetchError::Http { url: url.into(), source })?;
        if !r.status().is_success() {
            return Err(FetchError::Status { url: url.into(), status: r.status().as_u16() });
        }
        if r.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(FetchError::TooLarge { url: url.into(), cap: self.max_bytes });
        }
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let (mut md5, mut sha) = (Md5::new(), Sha256::new());
        let mut bytes = 0u64;
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| FetchError::Http { url: url.into(), source })?;
            bytes += chunk.len() as u64;
            if bytes > self.max_bytes {
                return Err(FetchError::TooLarge { url: url.into(), cap: self.max_bytes });
            }
            md5.update(&chunk);
            sha.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        Ok(Digests { md5: ops_config::hex(&md5.finalize()), sha256: ops_config::hex(&sha.finalize()), bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_seed_layout() {
        let d = DesiredAgent { tarball: "http://files/releases/falcon/".into(), ..crate::test_desired("falcon-agent", "5.1.3", "/w") };
        assert_eq!(tarball_url(&d, "linux_amd64"), "http://files/releases/falcon/linux_amd64/falcon-agent-5.1.3.tar.gz");
        assert!(
            ["linux_amd64", "linux_arm64", "linux_386", "darwin_amd64", "darwin_arm64"].contains(&arch().as_str()) || !arch().is_empty()
        );
    }
}
