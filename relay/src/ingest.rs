//! `POST /heartbeat` on a relay: answer from the config copy, queue the report for its owner.
//! No meta node is consulted on this path, so updaters get their answer while every meta node
//! is down.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ops_config::Heartbeat;
use ops_config::wire::MAX_HEARTBEAT_BYTES;

use crate::{Relay, unix_now};

/// A refused heartbeat: status, metric result label, message.
pub struct Refused(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, axum::Json(serde_json::json!({ "errorMessage": self.2 }))).into_response()
    }
}

/// Reads a heartbeat body (64 KiB cap) whatever its Content-Type; shared with meta nodes.
pub async fn read_heartbeat(body: Body) -> Result<Bytes, Refused> {
    axum::body::to_bytes(body, MAX_HEARTBEAT_BYTES).await.map_err(|_| {
        Refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("heartbeat body over the limit of {MAX_HEARTBEAT_BYTES} bytes"))
    })
}

/// Parses and validates a heartbeat body; shared with meta nodes.
pub fn parse_heartbeat(bytes: &[u8]) -> Result<Heartbeat<'_>, Refused> {
    Heartbeat::parse(bytes).map_err(|e| Refused(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
}

/// A JSON reply that is already serialized.
pub fn json_reply(bytes: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

pub(crate) async fn heartbeat(State(relay): State<Arc<Relay>>, body: Body) -> Response {
    let started = Instant::now();
    let result = handle(&relay, body).await;
    relay.hot.duration.record(started.elapsed().as_secs_f64());
    match result {
        Ok(reply) => {
            relay.hot.ok.increment(1);
            json_reply(reply)
        }
        Err(refused) => {
            metrics::counter!(crate::metrics::HEARTBEATS, "result" => refused.1).increment(1);
            tracing::debug!(error = %refused.2, "heartbeat refused");
            refused.into_response()
        }
    }
}

async fn handle(relay: &Relay, body: Body) -> Result<Bytes, Refused> {
    let bytes = read_heartbeat(body).await?;
    let hb = parse_heartbeat(&bytes)?;
    let Some(loaded) = relay.config.current() else {
        return Err(Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_config",
            "relay has no desired config yet: no meta node reached and no local copy".into(),
        ));
    };
    let now = unix_now();
    let answer = relay.rollouts.answer(&loaded, &hb, now);
    relay.forwarder.push(&hb, now, answer.told);
    Ok(answer.reply)
}
