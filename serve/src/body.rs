//! Reading and answering request bodies the way both servers do: the capped body reader
//! (a heartbeat's 64 KiB, an enroll request's 4 KiB), the heartbeat parse, a refusal with its
//! metric label, an already-serialized JSON reply, and the `POST /enroll` exchange.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ops_config::Heartbeat;
use ops_config::wire::MAX_HEARTBEAT_BYTES;

/// A refused heartbeat: status, metric result label, message.
pub struct Refused(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, axum::Json(serde_json::json!({ "errorMessage": self.2 }))).into_response()
    }
}

/// How much of an oversize body is read and thrown away before the 413 goes out, and for how
/// long: closing a connection with unread data makes the kernel reset it, and the client then
/// sees a broken pipe instead of its 413 (nginx's lingering close does the same).
pub const DRAIN_BYTES: usize = 8 * 1024 * 1024;
pub const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads a heartbeat body (64 KiB cap) whatever its Content-Type; shared with meta nodes.
pub async fn read_heartbeat(body: Body) -> Result<Bytes, Refused> {
    read_capped(body, MAX_HEARTBEAT_BYTES).await.map_err(|()| {
        Refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("heartbeat body over the limit of {MAX_HEARTBEAT_BYTES} bytes"))
    })
}

/// A body of at most `limit` bytes; Err when it is longer (after draining up to
/// [`DRAIN_BYTES`] of it for at most [`DRAIN_TIME`]) or cannot be read. A body that arrives in
/// one chunk (the usual heartbeat) is returned without a copy.
pub async fn read_capped(body: Body, limit: usize) -> Result<Bytes, ()> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut first: Option<Bytes> = None;
    let mut rest = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(drop)?;
        total += chunk.len();
        if total > limit {
            let drain = async {
                while total <= DRAIN_BYTES
                    && let Some(Ok(chunk)) = stream.next().await
                {
                    total += chunk.len();
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            return Err(());
        }
        match &first {
            None => first = Some(chunk),
            Some(f) => {
                if rest.is_empty() {
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if rest.is_empty() { first.unwrap_or_default() } else { rest.freeze() })
}

/// Parses and validates a heartbeat body; shared with meta nodes.
pub fn parse_heartbeat(bytes: &[u8]) -> Result<Heartbeat<'_>, Refused> {
    Heartbeat::parse(bytes).map_err(|e| Refused(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
}

/// A JSON reply that is already serialized.
pub fn json_reply(bytes: Bytes) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

/// The reply of `POST /enroll` (relays and meta nodes): the body is at most 4 KiB.
pub async fn enroll_reply(
    enrollment: &crate::enrollment::Enrollment,
    revoked: &ops_config::enroll::Revocations,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Response {
    let Ok(bytes) = read_capped(body, 4096).await else {
        return Refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "enroll request over 4096 bytes".into()).into_response();
    };
    match enrollment.enroll(headers, &bytes, ops_config::clock::unix_ms(), revoked) {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(refused) => refused.into_response(),
    }
}
