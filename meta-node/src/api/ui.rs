//! `GET /ui/`: the fleet page, one self-contained HTML file (`meta-node/ui/fleet.html`)
//! embedded in the binary, and `GET /status/agents`, the agent list it starts from.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use ops_config::status::{AgentEntry, AgentList};

use crate::Node;

const PAGE: &str = include_str!("../../ui/fleet.html");

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        PAGE,
    )
        .into_response()
}

/// The agents of the config this node serves, in file order, with their default version and
/// the prefixes of their `others` groups, and whether they have a staged rollout.
pub(super) async fn agents(State(node): State<Arc<Node>>) -> Json<AgentList> {
    let loaded = node.desired.current();
    let agents = loaded
        .config
        .agents()
        .iter()
        .map(|a| AgentEntry {
            name: a.name.clone(),
            version: a.default.version.clone(),
            cmd: a.default.cmd.as_str().to_owned(),
            prefixes: a.others.iter().map(|o| o.prefix.clone()).collect(),
            rollout: a.rollout.is_some(),
        })
        .collect();
    Json(AgentList { agents })
}
