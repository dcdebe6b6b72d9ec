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

/// A config as served: the model, its generation on this node, and the replies per class.
pub struct Loaded {
    pub config: DesiredConfig,
    /// Starts at 1 and grows by one per successful reload (0 means "none" in the store).
    pub generation: u32,
    replies: Vec<Bytes>,
}

impl Loaded {
    pub fn new(config: DesiredConfig, generation: u32) -> Self {
        let replies = (0..config.class_count())
            .map(|c| {
                let reply = HeartbeatReply { error_message: String::new(), desired_agents: config.class(ClassId(c as u32)).to_vec() };
                Bytes::from(serde_json::to_vec(&reply).expect("a reply of strings always serializes"))
            })
            .collect();
        Loaded { config, generation, replies }
    }

    /// The serialized heartbeat reply for hosts of `class`.
    pub fn reply(&self, class: ClassId) -> Bytes {
        self.replies[class.0 as usize].clone()
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
