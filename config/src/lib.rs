//! `ops-config`: the contract every ops fleet binary agrees through.
//!
//! It owns the heartbeat wire types (byte-compatible with the Go ops-updater and ops-meta),
//! the desired-config model read from `agents.toml` and its per-host resolution, and the
//! cluster map read from `cluster.toml` with the consistent-hash ring built over it.
//!
//! It must never do network I/O, spawn tasks or depend on an async runtime: everything here is
//! a pure function of its inputs (plus the `load` helpers that read one file), so that a relay,
//! a meta node and an updater built from the same commit can never disagree.
#![forbid(unsafe_code)]

pub mod agents;
pub mod cache;
pub mod clock;
pub mod cluster;
pub mod compact;
pub mod disk;
pub mod enroll;
pub mod fastjson;
mod hash;
mod location;
pub mod prom;
pub mod reply;
pub mod rollout;
pub mod status;
pub mod trust;
pub mod wire;

pub use agents::{AgentSpec, Block, ClassId, Cmd, ConfigError, DesiredConfig, MAX_ROLLOUTS, Override};
pub use cluster::{ClusterError, ClusterMap, NodeSpec, Ring};
pub use hash::content_hash;
pub use wire::{Batch, BatchEntry, DesiredAgent, Heartbeat, HeartbeatReply, RealAgent, WireError};

/// Lowercase hex of `bytes` (digests in configs, reports and file names).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An error with its causes (`error sending request: ...: invalid peer certificate:
/// UnknownIssuer`): reqwest's own text stops at the first line.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}
