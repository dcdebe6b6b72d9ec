//! The desired config this node serves, swapped whole on reload.
//!
//! Each resolution class's heartbeat reply is serialized once at load, so answering a
//! heartbeat is a hash look-up and a reference-counted clone: no JSON is written per request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ops_config::cache::PackageIndex;
use ops_config::trust::{SIGNATURE_HEADER, TrustedKeys};
use ops_config::{ClassId, ConfigError, DesiredConfig, HeartbeatReply};
use parking_lot::Mutex;

/// A config as served: the model, its generation on this node, and the replies per class
/// and rollout mask.
pub struct Loaded {
    pub config: DesiredConfig,
    /// Starts at 1 and grows by one per successful reload (0 means "none" in the store).
    pub generation: u32,
    /// The operator's signature lines over the file (`agents.toml.sig`), when it has one.
    pub signature: Option<String>,
    /// `replies[class][mask]`: one per combination of the config's rollouts (1 without any).
    replies: Vec<Vec<Bytes>>,
    /// What a relay's package cache may fetch (empty without a cache).
    pub packages: PackageIndex,
}

impl Loaded {
    pub fn new(config: DesiredConfig, generation: u32) -> Self {
        Loaded::build(config, None, generation, None)
    }

    /// The same, with the signature read beside the file.
    pub fn signed(config: DesiredConfig, signature: Option<String>, generation: u32) -> Self {
        Loaded::build(config, signature, generation, None)
    }

    /// As served by a relay whose package cache updaters reach at `cache_base`
    /// (`--advertise-url`): the replies point `relay_cache` agents there.
    pub fn build(config: DesiredConfig, signature: Option<String>, generation: u32, cache_base: Option<&str>) -> Self {
        let masks = 1usize << config.rollouts().count();
        let replies = (0..config.class_count())
            .map(|c| {
                (0..masks)
                    .map(|mask| {
                        let mut desired_agents = config.variant(ClassId(c as u32), mask as u8);
                        if let Some(base) = cache_base {
                            desired_agents.iter_mut().for_each(|a| ops_config::cache::through_relay(&config, a, base));
                        }
                        let reply = HeartbeatReply { error_message: String::new(), desired_agents, config_hash: config.hash().to_owned() };
                        Bytes::from(serde_json::to_vec(&reply).expect("a reply of strings always serializes"))
                    })
                    .collect()
            })
            .collect();
        let packages = match cache_base {
            Some(_) => PackageIndex::new(&config),
            None => PackageIndex::default(),
        };
        Loaded { config, generation, signature, replies, packages }
    }

    /// `GET /config/desired` on meta nodes and relays: the file's exact text, `ETag` = its
    /// content hash (`If-None-Match` gives 304), the signature lines in `x-ops-signature`.
    pub fn serve(&self, request: &HeaderMap) -> Response {
        let etag = format!("\"{}\"", self.config.hash());
        let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
        let matches = request
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        if matches {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
        }
        let mut response = (
            [(header::ETAG, etag_value), (header::CONTENT_TYPE, HeaderValue::from_static("application/toml; charset=utf-8"))],
            self.config.source().to_owned(),
        )
            .into_response();
        if let Some(v) = self.signature.as_deref().and_then(|s| HeaderValue::from_str(&ops_config::trust::signature_header(s)).ok()) {
            response.headers_mut().insert(SIGNATURE_HEADER, v);
        }
        response
    }

    /// The serialized heartbeat reply for hosts of `class` outside every open rollout wave.
    pub fn reply(&self, class: ClassId) -> Bytes {
        self.reply_for(class, 0)
    }

    /// The serialized heartbeat reply for hosts of `class` with rollout mask `mask`
    /// (`DesiredConfig::rollout_mask`).
    pub fn reply_for(&self, class: ClassId, mask: u8) -> Bytes {
        let per_class = &self.replies[class.0 as usize];
        per_class.get(usize::from(mask)).unwrap_or(&per_class[0]).clone()
    }
}

/// The current config, where it is reloaded from and the keys its signature must verify
/// under (none: not checked).
pub struct Desired {
    current: ArcSwap<Loaded>,
    path: PathBuf,
    keys: TrustedKeys,
    /// With keys: the highest signed version taken (`crate::floor`); nothing older is taken.
    floor: Option<crate::floor::VersionFloor>,
    reload_lock: Mutex<()>,
}

impl Desired {
    /// `config` and `signature` as `ops_config::trust::load_signed` read them from `path`;
    /// with keys, `floor` is raised to it (the caller checked it against the floor first).
    pub fn new(
        config: DesiredConfig,
        signature: Option<String>,
        path: PathBuf,
        keys: TrustedKeys,
        floor: Option<crate::floor::VersionFloor>,
    ) -> Self {
        let floor = floor.filter(|_| !keys.is_empty());
        if let Some(f) = &floor
            && let Err(e) = f.raise(&config)
        {
            tracing::error!(error = %e, "cannot keep the signed config version");
        }
        Desired { current: ArcSwap::from_pointee(Loaded::signed(config, signature, 1)), path, keys, floor, reload_lock: Mutex::new(()) }
    }

    /// Ok when `config` (its signature verified) may be taken: with keys, not older than the
    /// highest version taken, not another file at that version, not expired.
    pub fn check_fresh(&self, config: &DesiredConfig) -> Result<(), ops_config::trust::FreshError> {
        self.floor.as_ref().map_or(Ok(()), |f| f.check(config))
    }

    /// The highest signed version taken (with keys).
    pub fn floor(&self) -> Option<ops_config::trust::Floor> {
        self.floor.as_ref().and_then(|f| f.current())
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// A cheap borrow for the heartbeat path.
    pub fn guard(&self) -> arc_swap::Guard<Arc<Loaded>> {
        self.current.load()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file (and its signature, checked when keys are set) again. On any error the
    /// served config is unchanged.
    pub fn reload(&self) -> Result<Arc<Loaded>, ConfigError> {
        let _one_at_a_time = self.reload_lock.lock();
        let (config, signature) = ops_config::trust::load_signed(&self.path, &self.keys)?;
        self.check_fresh(&config)
            .map_err(|e| ConfigError::File { file: self.path.display().to_string(), message: format!("signed config refused: {e}") })?;
        let generation = self.current.load().generation.wrapping_add(1).max(1);
        let loaded = Arc::new(Loaded::signed(config, signature, generation));
        self.current.store(loaded.clone());
        if let Some(f) = &self.floor
            && let Err(e) = f.raise(&loaded.config)
        {
            tracing::error!(error = %e, "cannot keep the signed config version");
        }
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_follow_the_fleet_wave() {
        let text = r#"[[agent]]
name = "falcon-agent"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "5.1.5" }
[agent.rollout]
from = { version = "5.1.3" }
waves = [50, 100]
"#;
        let loaded = Loaded::new(DesiredConfig::parse(text, "t").unwrap(), 1);
        let version = |reply: Bytes| serde_json::from_slice::<HeartbeatReply>(&reply).unwrap().desired_agents[0].version.clone();
        // The reply a host gets when the fleet has opened `waves` of each rollout.
        let reply_for_host = |h: &str, waves: &[usize]| {
            let class = loaded.config.class_of(h);
            (class, loaded.reply_for(class, loaded.config.rollout_mask(h, class, waves)))
        };
        let hosts: Vec<String> = (0..200).map(|i| format!("h{i}")).collect();
        assert!(hosts.iter().all(|h| version(reply_for_host(h, &[]).1) == "5.1.3"));
        assert!(hosts.iter().all(|h| version(reply_for_host(h, &[2]).1) == "5.1.5"));
        let half = hosts.iter().filter(|h| version(reply_for_host(h, &[1]).1) == "5.1.5").count();
        assert!((60..140).contains(&half), "wave 1 is about half the hosts: {half}");
        for h in &hosts {
            let in_wave = ops_config::rollout::bucket("falcon-agent", "5.1.5", h) < 5000;
            assert_eq!(version(reply_for_host(h, &[1]).1) == "5.1.5", in_wave, "{h}");
        }
    }
}
