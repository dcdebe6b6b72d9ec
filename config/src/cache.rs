//! What a relay's package cache may fetch, and how relays point updaters at it.
//!
//! For each agent with `relay_cache = true` a relay answers `tarball` (and an `md5` in URL
//! form) with `{advertise}/pkg/{key}`, where `key` names the origin base URL
//! ([`origin_key`]). A request under `/pkg/{key}/` is served only when it is one of the file
//! shapes updaters ask for, for a version the config names under that origin:
//!
//! - ours: `{arch}/{name}-{version}.tar.gz` and `{arch}/{name}-{version}.tar.gz.md5`;
//! - the Go updater's: `{name}-{version}.tar.gz` and `{name}-{version}.tar.gz.md5`.
//!
//! Anything else is refused before the origin is touched, so a relay is never an open proxy.

use std::collections::HashMap;

use crate::{Block, DesiredAgent, DesiredConfig};

/// Where cached packages are served on a relay.
pub const PATH_PREFIX: &str = "/pkg/";

/// Longest `{arch}` path segment accepted.
const MAX_ARCH: usize = 32;

/// A stable name for an origin base URL: 16 hex digits of its md5 (trailing `/` ignored).
/// Stable across config edits, so a URL an updater got just before a reload still resolves.
pub fn origin_key(base: &str) -> String {
    crate::content_hash(base.trim_end_matches('/').as_bytes())[..16].to_owned()
}

/// `{advertise}/pkg/{key}`: the base URL a relay answers for an origin base.
pub fn relay_base(advertise: &str, origin_base: &str) -> String {
    format!("{}{PATH_PREFIX}{}", advertise.trim_end_matches('/'), origin_key(origin_base))
}

/// True for an md5 field that names where the digest file is rather than the digest.
pub fn is_url(md5: &str) -> bool {
    md5.starts_with("http://") || md5.starts_with("https://")
}

/// Points a desired agent at the relay `advertise` when the config marks it `relay_cache`.
pub fn through_relay(config: &DesiredConfig, agent: &mut DesiredAgent, advertise: &str) {
    let cached = config.agent_index(&agent.name).is_some_and(|i| config.agents()[i].relay_cache);
    if !cached {
        return;
    }
    agent.tarball = relay_base(advertise, &agent.tarball);
    if is_url(&agent.md5) {
        agent.md5 = relay_base(advertise, &agent.md5);
    }
}

/// What the config says a file must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    /// Hex sha256, or empty.
    pub sha256: String,
    /// Hex md5, or empty.
    pub md5: String,
    /// Where the origin keeps the `.md5` file when the config gives its md5 in URL form.
    pub md5_base: Option<String>,
}

/// One origin base URL and the files that may be fetched under it.
#[derive(Debug, Default)]
struct Origin {
    base: String,
    /// `{name}-{version}.tar.gz` of the tarballs kept here.
    tarballs: HashMap<String, Expect>,
    /// Tarball names whose `.md5` file is kept here (an md5 given in URL form).
    digests: HashMap<String, Expect>,
}

/// Which kind of file a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tarball,
    /// A `.md5` file (md5sum output).
    Md5,
}

/// A request the cache may serve: where the file comes from and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub kind: Kind,
    /// The full origin URL of the file.
    pub origin_url: String,
    pub expect: Expect,
    /// For a tarball: the origin URL of its `.md5` file (used only when the config gives
    /// neither sha256 nor a hex md5).
    pub md5_url: String,
}

/// The files a config lets relays fetch, per origin key.
#[derive(Debug, Default)]
pub struct PackageIndex {
    origins: HashMap<String, Origin>,
}

impl PackageIndex {
    pub fn new(config: &DesiredConfig) -> Self {
        let mut index = PackageIndex::default();
        for a in config.agents().iter().filter(|a| a.relay_cache) {
            let mut blocks: Vec<(&str, &Block)> = vec![(&a.tarball, &a.default)];
            if let Some(r) = &a.rollout {
                blocks.push((&a.tarball, &r.from));
            }
            for o in &a.others {
                blocks.push((o.tarball.as_deref().unwrap_or(&a.tarball), &o.block));
            }
            for (tarball, block) in blocks {
                let file = format!("{}-{}.tar.gz", a.name, block.version);
                let expect = Expect {
                    sha256: block.sha256.clone(),
                    md5: if is_url(&block.md5) { String::new() } else { block.md5.clone() },
                    md5_base: is_url(&block.md5).then(|| block.md5.trim_end_matches('/').to_owned()),
                };
                if let Some(base) = &expect.md5_base {
                    index.origin(base).digests.insert(file.clone(), expect.clone());
                }
                index.origin(tarball).tarballs.insert(file, expect);
            }
        }
        index
    }

    fn origin(&mut self, base: &str) -> &mut Origin {
        let base = base.trim_end_matches('/');
        self.origins.entry(origin_key(base)).or_insert_with(|| Origin { base: base.to_owned(), ..Origin::default() })
    }

    /// True when no agent is cached.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// The file `/pkg/{key}/{rest}` stands for, or None when the config names no such file.
    pub fn resolve(&self, key: &str, rest: &str) -> Option<Wanted> {
        let origin = self.origins.get(key)?;
        let (arch, file) = match rest.split_once('/') {
            None => (None, rest),
            Some((arch, file)) => (Some(arch), file),
        };
        if let Some(arch) = arch {
            let ok = !arch.is_empty()
                && arch.len() <= MAX_ARCH
                && arch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return None;
            }
        }
        let dir = arch.map_or_else(String::new, |a| format!("{a}/"));
        if let Some(tarball) = file.strip_suffix(".md5") {
            let expect = origin.tarballs.get(tarball).or_else(|| origin.digests.get(tarball))?;
            return Some(Wanted {
                kind: Kind::Md5,
                origin_url: format!("{}/{dir}{file}", origin.base),
                expect: expect.clone(),
                md5_url: String::new(),
            });
        }
        let expect = origin.tarballs.get(file)?;
        let origin_url = format!("{}/{dir}{file}", origin.base);
        let md5_url = match &expect.md5_base {
            Some(base) => format!("{base}/{dir}{file}.md5"),
            None => format!("{origin_url}.md5"),
        };
        Some(Wanted { kind: Kind::Tarball, origin_url, expect: expect.clone(), md5_url })
    }

    /// The request for a `.md5` URL (`md5_url` of a tarball), when the index allows it.
    pub fn resolve_url(&self, url: &str) -> Option<Wanted> {
        self.origins.iter().find_map(|(key, o)| {
            let rest = url.strip_prefix(o.base.as_str())?.strip_prefix('/')?;
            self.resolve(key, rest)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[agent]]
name = "falcon-agent"
tarball = "http://files.example/releases/falcon/"
run_user = "falcon"
work_dir = "/home/falcon"
relay_cache = true
default = { version = "5.1.5", sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" }
[[agent.others]]
prefix = "canary"
version = "5.2.0"
md5 = "http://digests.example/falcon"
tarball = "http://canary.example/falcon"
[agent.rollout]
from = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66" }
waves = [100]

[[agent]]
name = "mysql-monitor"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon"
default = { version = "0.0.5" }
"#;

    fn index() -> (DesiredConfig, PackageIndex) {
        let c = DesiredConfig::parse(CONFIG, "agents.toml").unwrap();
        let i = PackageIndex::new(&c);
        (c, i)
    }

    #[test]
    fn only_configured_files_of_cached_agents_resolve() {
        let (_, index) = index();
        let files = origin_key("http://files.example/releases/falcon");
        let w = index.resolve(&files, "linux_amd64/falcon-agent-5.1.5.tar.gz").unwrap();
        assert_eq!(w.kind, Kind::Tarball);
        assert_eq!(w.origin_url, "http://files.example/releases/falcon/linux_amd64/falcon-agent-5.1.5.tar.gz");
        assert_eq!(w.md5_url, "http://files.example/releases/falcon/linux_amd64/falcon-agent-5.1.5.tar.gz.md5");
        assert_eq!(w.expect.sha256.len(), 64);
        // The Go updater's shape (no arch), the rollout's from version, and .md5 files.
        assert_eq!(index.resolve(&files, "falcon-agent-5.1.3.tar.gz").unwrap().expect.md5, "490ac172dabecc867289079d48e84a66");
        assert_eq!(index.resolve(&files, "falcon-agent-5.1.3.tar.gz.md5").unwrap().kind, Kind::Md5);
        // Not cached, not configured, not a known shape: refused.
        for rest in [
            "mysql-monitor-0.0.5.tar.gz",
            "falcon-agent-9.9.9.tar.gz",
            "falcon-agent-5.2.0.tar.gz",
            "../falcon-agent-5.1.5.tar.gz",
            "a/b/falcon-agent-5.1.5.tar.gz",
            "Linux/falcon-agent-5.1.5.tar.gz",
            "/falcon-agent-5.1.5.tar.gz",
            "linux_amd64/falcon-agent-5.1.5.tar",
            "",
        ] {
            assert_eq!(index.resolve(&files, rest), None, "{rest}");
        }
        assert_eq!(index.resolve("0123456789abcdef", "falcon-agent-5.1.5.tar.gz"), None);
    }

    #[test]
    fn url_form_md5_lives_at_its_own_origin() {
        let (_, index) = index();
        let canary = origin_key("http://canary.example/falcon");
        let w = index.resolve(&canary, "falcon-agent-5.2.0.tar.gz").unwrap();
        assert_eq!(w.md5_url, "http://digests.example/falcon/falcon-agent-5.2.0.tar.gz.md5");
        let digests = origin_key("http://digests.example/falcon");
        assert_eq!(index.resolve(&digests, "falcon-agent-5.2.0.tar.gz.md5").unwrap().kind, Kind::Md5);
        assert_eq!(index.resolve(&digests, "falcon-agent-5.2.0.tar.gz"), None, "only digests there");
        assert_eq!(index.resolve_url(&w.md5_url).unwrap().origin_url, w.md5_url);
        assert_eq!(index.resolve_url("http://elsewhere/falcon-agent-5.2.0.tar.gz.md5"), None);
    }

    #[test]
    fn replies_point_cached_agents_at_the_relay() {
        let (c, _) = index();
        let canary = c.class_of("canary-1");
        let mut agents = c.variant(canary, 0);
        for a in &mut agents {
            through_relay(&c, a, "http://relay-dc1:2200/");
        }
        let key = origin_key("http://canary.example/falcon");
        assert_eq!(agents[0].tarball, format!("http://relay-dc1:2200/pkg/{key}"));
        assert_eq!(agents[0].md5, format!("http://relay-dc1:2200/pkg/{}", origin_key("http://digests.example/falcon")));
        assert_eq!(agents[1].tarball, "http://files.example/releases/falcon", "not cached: unchanged");
    }
}
