//! `POST /heartbeat`: the Go ops-meta's path. Stores the host's real state and replies with
//! its desired agents. The body is JSON whatever the Content-Type says (the Go updater sends
//! none).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use ops_config::Heartbeat;
use ops_config::wire::MAX_HEARTBEAT_BYTES;

use super::ApiError;
use crate::{Node, unix_now};

pub(super) async fn heartbeat(State(node): State<Arc<Node>>, body: Body) -> Response {
    let started = Instant::now();
    let result = handle(&node, body).await;
    node.hot
        .heartbeat_seconds
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(reply) => {
            node.hot.heartbeats_ok.increment(1);
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                reply,
            )
                .into_response()
        }
        Err(e) => {
            match e {
                ApiError::TooLarge(_) => node.hot.heartbeats_too_large.increment(1),
                _ => node.hot.heartbeats_bad.increment(1),
            }
            tracing::debug!(error = %e, "heartbeat refused");
            e.into_response()
        }
    }
}

async fn handle(node: &Node, body: Body) -> Result<bytes::Bytes, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_HEARTBEAT_BYTES)
        .await
        .map_err(|_| {
            ApiError::TooLarge(format!(
                "heartbeat body over the limit of {MAX_HEARTBEAT_BYTES} bytes"
            ))
        })?;
    let hb = Heartbeat::parse(&bytes).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let loaded = node.desired.guard();
    let class = loaded.config.class_of(&hb.hostname);
    node.store.upsert(&hb, unix_now(), class, loaded.generation);
    Ok(loaded.reply(class))
}
