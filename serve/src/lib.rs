//! What a relay and a meta node both do when they serve, below both of them.
//!
//! - [`server`]: the HTTP/1 (and TLS) listener with its connection limits and the heartbeat
//!   fast path in front of the router; [`tls`]: certificates, mTLS peer names, cluster clients.
//! - [`forward`]: batches of reports keyed by hostname on their way to the owning meta node.
//! - [`desired`]: the desired config as served, with the bytes of every reply; [`floor`]: the
//!   signed-version floor that refuses a rollback; [`rollout`]: the fleet view of the meta
//!   nodes' published rollout states that says which hosts a wave may tell.
//! - [`enrollment`]: host credentials, checked and issued; [`body`]: capped body reading,
//!   the heartbeat parse and refusals; [`cli`]: the flags both binaries take.
//!
//! Nothing here owns host state: that is the meta node's. Nothing here knows the package
//! cache or the relay's copies of the config and map: those are the relay's.
#![forbid(unsafe_code)]

pub mod body;
pub mod cli;
pub mod desired;
pub mod enrollment;
pub mod floor;
pub mod forward;
pub mod rollout;
pub mod server;
pub mod tls;
