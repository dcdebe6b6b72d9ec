//! `POST /heartbeat`: the Go ops-meta's path. Stores the host's real state (or, in a cluster,
//! queues it for the owner as a relay would) and replies with its desired agents. The body is
//! JSON whatever the Content-Type says (the Go updater sends none).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use ops_serve::body::{Refused, json_reply, parse_heartbeat, read_heartbeat};

use crate::{Node, unix_now};

pub(super) async fn heartbeat(State(node): State<Arc<Node>>, headers: axum::http::HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let result = handle(&node, &headers, body).await;
    node.hot.heartbeat_seconds.record(started.elapsed().as_secs_f64());
    match result {
        Ok(reply) => {
            node.hot.heartbeats_ok.increment(1);
            json_reply(reply)
        }
        Err(refused) => {
            match refused.1 {
                "too_large" => node.hot.heartbeats_too_large.increment(1),
                _ => node.hot.heartbeats_bad.increment(1),
            }
            tracing::debug!(error = %refused.2, "heartbeat refused");
            refused.into_response()
        }
    }
}

/// `POST /enroll`: a host's credential for the enrollment secret (`ops_serve::enrollment`).
pub(super) async fn enroll(State(node): State<Arc<Node>>, headers: axum::http::HeaderMap, body: Body) -> Response {
    let loaded = node.desired.current();
    ops_serve::body::enroll_reply(&node.settings.enrollment, loaded.config.revocations(), &headers, body).await
}

async fn handle(node: &Node, headers: &axum::http::HeaderMap, body: Body) -> Result<bytes::Bytes, Refused> {
    let bytes = read_heartbeat(body).await?;
    let hb = parse_heartbeat(&bytes)?;
    let loaded = node.desired.guard();
    let auth =
        node.settings.enrollment.check(&hb.hostname, headers.get(ops_config::enroll::CREDENTIAL_HEADER), loaded.config.revocations())?;
    let now = unix_now();
    let answer = node.rollouts.answer(&loaded, &hb, now);
    let cluster = node.cluster.as_ref().map(|m| m.guard());
    match cluster.as_deref() {
        Some(c) if c.ring.owner(&hb.hostname) != c.me => {
            c.forwarder.push(&hb, ops_config::compact::Record { seen: now, told: answer.told, relay: "", auth })
        }
        _ => {
            let tags = crate::store::Tags {
                class: answer.class,
                generation: loaded.generation,
                told: answer.told,
                waves: answer.waves,
                relay: crate::store::NO_RELAY,
                auth: auth.is_some(),
            };
            if let Err(full) = node.store.upsert_tagged(&hb, now, tags, true) {
                ::metrics::counter!(crate::metrics::REPORTS_REFUSED).increment(1);
                return Err(Refused(axum::http::StatusCode::SERVICE_UNAVAILABLE, "strings_cap", full.to_string()));
            }
        }
    }
    Ok(answer.reply)
}
