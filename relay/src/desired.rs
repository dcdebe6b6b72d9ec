//! The desired config this node serves, swapped whole on reload.
//!
//! Each resolution class's heartbeat reply is serialized once at load, so answering a
//! heartbeat is a hash look-up and a reference-counted clone: no JSON is written per request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use ops_config::{ClassId, ConfigError, DesiredConfig, HeartbeatReply};
use parking_lot::Mutex;

/// A config as served: the model, its generation on this node, and the replies per class
/// and rollout mask.
pub struct Loaded {
    pub config: DesiredConfig,
    /// Starts at 1 and grows by one per successful reload (0 means "none" in the store).
    pub generation: u32,
    /// `replies[class][mask]`: one per combination of the config's rollouts (1 without any).
    replies: Vec<Vec<Bytes>>,
}

impl Loaded {
    pub fn new(config: DesiredConfig, generation: u32) -> Self {
        let masks = 1usize << config.rollouts().count();
        let replies = (0..config.class_count())
            .map(|c| {
                (0..masks)
                    .map(|mask| {
                        let desired_agents = config.variant(ClassId(c as u32), mask as u8);
                        let reply = HeartbeatReply { error_message: String::new(), desired_agents };
                        Bytes::from(serde_json::to_vec(&reply).expect("a reply of strings always serializes"))
                    })
                    .collect()
            })
            .collect();
        Loaded { config, generation, replies }
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

/// The current config and where it is reloaded from.
pub struct Desired {
    current: ArcSwap<Loaded>,
    path: PathBuf,
    reload_lock: Mutex<()>,
}

impl Desired {
    pub fn new(config: DesiredConfig, path: PathBuf) -> Self {
        Desired { current: ArcSwap::from_pointee(Loaded::new(config, 1)), path, reload_lock: Mutex::new(()) }
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

    /// Reads the file again. On any error the served config is unchanged.
    pub fn reload(&self) -> Result<Arc<Loaded>, ConfigError> {
        let _one_at_a_time = self.reload_lock.lock();
        let config = DesiredConfig::load(&self.path)?;
        let generation = self.current.load().generation.wrapping_add(1).max(1);
        let loaded = Arc::new(Loaded::new(config, generation));
        self.current.store(loaded.clone());
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
