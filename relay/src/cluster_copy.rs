//! The relay follows the cluster map of the meta nodes: a node added or removed online
//! (`GET /cluster/reload?all=1` on any meta node) reaches every relay within a config poll,
//! from `GET /cluster/map` (`If-None-Match` with the map's hash, as for the desired config).
//! The map learnt is kept in the data dir as `cluster.toml` and preferred at start to the
//! `--cluster` file, whose `tls`, `ca_file` and `token_file` it must keep: those change only
//! with a restart. Maps carry a generation (`x-ops-cluster-generation`, one more with every
//! change): a meta node behind a change (it missed a commit) is skipped, never followed back.
//!
//! With trusted keys (`--trusted-key`), a map is followed only when it comes with the
//! operator's signature (`x-ops-signature`, kept as `cluster.toml.sig` beside the copy) and
//! is fresh (`ops_config::trust::check_fresh`): its generation is then its signed `version`,
//! and the highest one verified is kept in the data dir (`cluster-version`), so neither a meta
//! node nor anything answering on its address can point the relay at other nodes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ops_config::ClusterMap;
use ops_config::trust::{SIGNATURE_HEADER, TrustedKeys};
use tokio_util::sync::CancellationToken;

use crate::Relay;
use ops_serve::forward::Forwarder;

const FILE_NAME: &str = "cluster.toml";

/// The map to start with: the copy learnt before, if it parses, keeps how nodes are reached
/// and (with `keys`) verifies and is newer than `given`, else `given` (the `--cluster` file).
pub fn at_start(given: &ClusterMap, data_dir: &Path, keys: &TrustedKeys) -> ClusterMap {
    let path = data_dir.join(FILE_NAME);
    if let Err(e) = ops_config::trust::recover(&path) {
        tracing::warn!(error = %e, "cluster map copy");
    }
    if !path.exists() {
        return given.clone();
    }
    let parsed = std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| {
        let sig = ops_config::trust::read_signature(&path).map_err(|e| e.to_string())?;
        ops_config::trust::parse_signed_map(&t, sig.as_deref(), keys, &given.file).map_err(|e| e.to_string())
    });
    match parsed {
        Ok(map) if map.hash == given.hash => map,
        Ok(map) if !keys.is_empty() && map.version <= given.version => {
            tracing::info!(file = %path.display(), "cluster map copy is not newer than --cluster; using --cluster");
            given.clone()
        }
        Ok(map) => match map.online_change_refused(given) {
            None => {
                tracing::info!(file = %path.display(), hash = %map.hash, "cluster map learnt from the meta nodes preferred to --cluster");
                map
            }
            Some(why) => {
                tracing::warn!(file = %path.display(), %why, "cluster map copy ignored; using --cluster");
                given.clone()
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cluster map copy unreadable or not signed; using --cluster");
            given.clone()
        }
    }
}

/// A newer map a meta node gave, with its signature and generation.
struct Fetched {
    map: ClusterMap,
    signature: Option<String>,
    generation: u64,
}

/// Asks the nodes of the current map for theirs; returns a newer valid map, and its
/// generation, if one answered. A node serving a map of a lower generation than `held` is
/// skipped; with keys, so is one whose map is not signed, older than the floor or expired.
async fn fetch(relay: &Relay, client: &reqwest::Client, current: &ClusterMap, held: u64) -> Result<Option<Fetched>, String> {
    let keys = &relay.settings.trusted_keys;
    let mut errors = Vec::new();
    for i in 0..current.nodes.len() {
        let url = current.url(i, "/cluster/map");
        let req = client.get(&url).timeout(Duration::from_secs(5)).header(reqwest::header::IF_NONE_MATCH, format!("\"{}\"", current.hash));
        match req.send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_MODIFIED => return Ok(None),
            // A standalone meta node has no map to give.
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return Ok(None),
            Ok(r) if r.status().is_success() => {
                let generation = r
                    .headers()
                    .get(ops_config::wire::MAP_GENERATION_HEADER)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(0);
                if keys.is_empty() && generation < held {
                    errors.push(format!("{url}: cluster map generation {generation} is older than {held}, taken before"));
                    continue;
                }
                let signature = r.headers().get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let text = r.text().await.map_err(|e| format!("{url}: {e}"))?;
                // Relative paths (token_file, ca_file) resolve as in the file the relay started with.
                let map = match ops_config::trust::parse_signed_map(&text, signature.as_deref(), keys, &current.file) {
                    Ok(map) => map,
                    Err(e) => {
                        errors.push(format!("{url}: cluster map refused: {e}"));
                        continue;
                    }
                };
                let generation = match (&relay.map_floor, map.version) {
                    (Some(floor), Some(version)) => {
                        if let Err(e) = floor.check(&map) {
                            errors.push(format!("{url}: signed cluster map refused: {e}"));
                            continue;
                        }
                        version
                    }
                    (Some(_), None) => {
                        errors.push(format!("{url}: signed cluster map refused: {}", ops_config::trust::FreshError::NoVersion));
                        continue;
                    }
                    (None, _) => generation,
                };
                if let Some(why) = map.online_change_refused(current) {
                    return Err(format!("{url}: {why}"));
                }
                return Ok(Some(Fetched { map, signature, generation }));
            }
            Ok(r) => errors.push(format!("{url}: {}", r.status())),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Writes the map (and its signature) to the data dir, after raising the floor to it: a
/// restart never starts below a map this relay followed.
fn keep_copy(relay: &Relay, map: &ClusterMap, signature: Option<&str>) -> std::io::Result<()> {
    if let Some(floor) = &relay.map_floor {
        floor.raise(map)?;
    }
    ops_config::trust::write_signed(&relay.settings.data_dir.join(FILE_NAME), &map.text, signature, "")
}

/// Every `period` until `stop`: follows the meta nodes' map. A new one is written to the data
/// dir, then served: a new forwarder takes the heartbeats (the old one drains to the old
/// owners, which forward what they no longer own) and the polls move to the new nodes.
pub async fn poll(relay: Arc<Relay>, period: Duration, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let current = relay.map.load_full();
        let client = match ops_serve::tls::for_cluster(reqwest::Client::builder().no_proxy(), &current)
            .and_then(|b| b.build().map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, "cannot build a client for the cluster map");
                continue;
            }
        };
        let held = relay.map_generation.load(std::sync::atomic::Ordering::Relaxed);
        let (map, signature) = match fetch(&relay, &client, &current, held).await {
            Ok(Some(Fetched { map, signature, generation })) => {
                relay.map_generation.fetch_max(generation, std::sync::atomic::Ordering::Relaxed);
                (map, signature)
            }
            Ok(None) => {
                failing = false;
                continue;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "no meta node gave its cluster map; following the one held");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        if let Err(error) = keep_copy(&relay, &map, signature.as_deref()) {
            tracing::error!(%error, "cannot keep the cluster map copy; following it anyway");
        }
        let ids: Vec<String> = map.nodes.iter().map(|n| n.id.clone()).collect();
        tracing::info!(hash = %map.hash, previous = %current.hash, nodes = ?ids, "cluster map changed; following it");
        relay.forwarder.store(Forwarder::new(&map, relay.settings.forward.clone(), relay.stop.child_token()));
        relay.rollouts.set_ids(ids);
        relay.map.store(Arc::new(map));
        if let Err(error) = relay.start_map_tasks() {
            tracing::error!(%error, "cannot start the new map's tasks");
        }
        metrics::counter!(crate::metrics::CLUSTER_MAPS).increment(1);
    }
}
