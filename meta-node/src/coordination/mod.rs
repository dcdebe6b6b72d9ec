//! The cluster's procedures, below the HTTP layer: what a node does with its peers.
//!
//! - [`fanout`]: one step posted to every node at once, each answer checked to come from the
//!   node expected on that address.
//! - [`apply`]: a config apply or rollback (check on every node, then write on every node as
//!   the next generation) and one node's step of it.
//! - [`change`]: a membership change (prepare, commit, finish; abort on a refusal).
//! - [`gather`]: fleet status from every node held up (summaries merged as counts, one host's
//!   newest copy, the rollout reports), and [`listing`]: the rows of a listing streamed
//!   node after node.
//! - [`peers`]: which peers answer (the prober), and catching up with a peer's newer config
//!   or map generation.
//!
//! These functions return typed results ([`Refusal`], [`Outcome`]); `crate::api` maps them to
//! status codes and bodies and holds no procedure of its own. Nothing here imports `api`.

pub mod apply;
pub mod change;
pub mod fanout;
pub mod gather;
pub mod listing;
pub mod peers;

/// Why a procedure was refused before it changed anything.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The request itself is wrong (a bad name, a bad file, a standalone node asked for a
    /// cluster step).
    #[error("{0}")]
    BadRequest(String),
    /// Nothing of that name is here.
    #[error("{0}")]
    NotFound(String),
    /// The cluster is not in the state the request expects (another hash served, another map,
    /// a change already running, generations exhausted).
    #[error("{0}")]
    Conflict(String),
    /// This node failed (a task, a client).
    #[error("{0}")]
    Internal(String),
}

/// How a cluster-wide procedure ended, beside its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done on every node that answered.
    Done,
    /// A node refused at the first step: nothing changed anywhere.
    Refused,
    /// Done, but not on every node yet: they catch up or are asked again.
    NotEverywhere,
}
