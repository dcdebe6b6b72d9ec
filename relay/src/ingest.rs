//! `POST /heartbeat` on a relay: answer from the config copy, queue the report for its owner.
//! No meta node is consulted on this path, so updaters get their answer while every meta node
//! is down.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ops_serve::body::{Refused, enroll_reply, json_reply, parse_heartbeat, read_heartbeat};

use crate::Relay;
use ops_config::clock::unix_now_u32 as unix_now;

pub(crate) async fn heartbeat(State(relay): State<Arc<Relay>>, headers: axum::http::HeaderMap, body: Body) -> Response {
    answer(relay, ops_serve::enrollment::Enrollment::credential_of(&headers), body).await
}

/// `POST /enroll`: a host's credential for the enrollment secret (`ops_serve::enrollment`).
pub(crate) async fn enroll(State(relay): State<Arc<Relay>>, headers: axum::http::HeaderMap, body: Body) -> Response {
    let loaded = relay.config.current();
    let none = ops_config::enroll::Revocations::default();
    let revoked = loaded.as_ref().map_or(&none, |l| l.config.revocations());
    enroll_reply(&relay.settings.enrollment, revoked, &headers, body).await
}

/// The whole heartbeat exchange (`ops_serve::server` calls it before the router).
pub(crate) async fn answer(relay: Arc<Relay>, credential: Option<axum::http::HeaderValue>, body: Body) -> Response {
    let started = Instant::now();
    let result = handle(&relay, credential, body).await;
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

async fn handle(relay: &Relay, credential: Option<axum::http::HeaderValue>, body: Body) -> Result<Bytes, Refused> {
    let bytes = read_heartbeat(body).await?;
    let hb = parse_heartbeat(&bytes)?;
    let Some(loaded) = relay.config.current() else {
        return Err(Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_config",
            "relay has no desired config yet: no meta node reached and no local copy".into(),
        ));
    };
    let auth = relay.settings.enrollment.check(&hb.hostname, credential.as_ref(), loaded.config.revocations())?;
    let now = unix_now();
    let answer = relay.rollouts.answer(&loaded, &hb, now);
    relay.forwarder.load().push(&hb, ops_config::compact::Record { seen: now, told: answer.told, relay: &relay.settings.id, auth });
    Ok(answer.reply)
}
