//! Staged rollouts over HTTP: `GET /internal/rollout` (this node's published state, what
//! relays and peers poll; token-protected like the other internal calls) and
//! `GET /rollout/{agent}` (gathered from every node, partial when one does not answer).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use ops_config::rollout::{NodeReport, RolloutReport, WaveReport};
use ops_config::status::{RolloutNode, RolloutView};

use super::{ApiError, authorize};
use crate::coordination::gather;
use crate::{Node, unix_now};

pub(super) async fn internal(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<NodeReport>, ApiError> {
    authorize(&node, peer, &headers)?;
    Ok(Json(NodeReport::clone(&node.controller.report())))
}

pub(super) async fn gathered(State(node): State<Arc<Node>>, Path(agent): Path<String>) -> Result<Json<RolloutView>, ApiError> {
    super::status::check_agent(&agent)?;
    let loaded = node.desired.current();
    let spec = loaded
        .config
        .agents()
        .iter()
        .find(|a| a.name == agent)
        .ok_or_else(|| ApiError::NotFound(format!("no agent {agent:?} in the desired config")))?;
    let rollout = spec.rollout.as_ref().ok_or_else(|| ApiError::NotFound(format!("agent {agent:?} has no [agent.rollout]")))?;
    let target = spec.default.version.clone();

    // Every node's report: this node's own, the peers' asked now.
    let reports = gather::rollout_reports(&node).await;

    let find = |rs: &[RolloutReport]| rs.iter().find(|r| r.agent == agent && r.target == target).cloned();
    let mut waves: Vec<WaveReport> = rollout.policy.waves.iter().map(|&p| WaveReport { percent: p, ..WaveReport::default() }).collect();
    let mut nodes = Vec::new();
    let mut missing = Vec::new();
    for (i, (id, report)) in reports.iter().enumerate() {
        let reachable = report.is_some();
        let r = match report {
            Some(rep) => find(&rep.rollouts),
            None => {
                missing.push(id.clone());
                node.rollouts.node(i).and_then(|rs| find(&rs))
            }
        };
        if let Some(r) = &r {
            for (w, x) in waves.iter_mut().zip(&r.waves) {
                w.add(x);
            }
        }
        let r = r.unwrap_or_default();
        nodes.push(RolloutNode {
            id: id.clone(),
            reachable,
            approved_wave: r.approved_wave,
            wave_opened_at: r.wave_opened_at,
            halted: r.halted,
            halt_reason: r.halt_reason,
            verdict: if reachable { r.verdict } else { "unreachable: last published state".into() },
        });
    }
    let fleet_wave = nodes.iter().map(|n| n.approved_wave).min().unwrap_or(0);
    let halted_by: Vec<String> = nodes.iter().filter(|n| n.halted).map(|n| format!("{}: {}", n.id, n.halt_reason)).collect();
    let halted = !halted_by.is_empty();
    let wave_opened_at = nodes.iter().filter(|n| n.approved_wave == fleet_wave).map(|n| n.wave_opened_at).max().unwrap_or(0);
    let now = u64::from(unix_now());
    let window_open = rollout.window.is_none_or(|w| w.contains(now));
    let p = &rollout.policy;
    let estimated_seconds_to_full = if halted || p.paused || p.abort || !window_open {
        None
    } else if fleet_wave >= p.waves.len() {
        Some(0)
    } else {
        let left_in_current = if fleet_wave == 0 { 0 } else { (wave_opened_at + p.soak_seconds).saturating_sub(now) };
        let later = (p.waves.len() - fleet_wave).saturating_sub(1) as u64;
        Some(left_in_current + later * p.soak_seconds)
    };
    let reply = RolloutView {
        agent: agent.clone(),
        from: rollout.from.version.clone(),
        target,
        fleet_wave,
        waves,
        halted,
        halted_by,
        wave_opened_at,
        estimated_seconds_to_full,
        paused: p.paused,
        abort: p.abort,
        soak_seconds: p.soak_seconds,
        deadline_seconds: p.deadline_seconds,
        advance_at: f64::from(p.advance_at_bp) / 10_000.0,
        failed_ratio: f64::from(p.failed_ratio_bp) / 10_000.0,
        min_sample: p.min_sample,
        max_in_flight_per_relay: rollout.max_in_flight_per_relay,
        nodes,
        partial: !missing.is_empty(),
        missing_nodes: missing,
    };
    Ok(Json(reply))
}
