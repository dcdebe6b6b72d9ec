//! Metric names of the relay (`ops_relay_*`), described once at start-up. The forwarder's
//! batch metrics are described by `Forwarder::describe("relay")`.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const HEARTBEATS: &str = "ops_relay_heartbeats_total";
pub const HEARTBEAT_DURATION: &str = "ops_relay_heartbeat_duration_seconds";
pub const CONFIG_POLLS: &str = "ops_relay_config_polls_total";
pub const CONFIG_INFO: &str = "ops_relay_config_info";
pub const CLUSTER_MAPS: &str = "ops_relay_cluster_map_changes_total";
pub const ROLLOUT_IN_FLIGHT: &str = "ops_relay_rollout_in_flight";
pub const CACHE_REQUESTS: &str = "ops_relay_cache_requests_total";
pub const CACHE_ORIGIN_BYTES: &str = "ops_relay_cache_origin_bytes_total";
pub const CACHE_SERVED_BYTES: &str = "ops_relay_cache_served_bytes_total";
pub const CACHE_BYTES: &str = "ops_relay_cache_bytes";
pub const CACHE_FILES: &str = "ops_relay_cache_files";
pub const CACHE_EVICTIONS: &str = "ops_relay_cache_evictions_total";
pub const CACHE_FAILED_CHECKS: &str = "ops_relay_cache_failed_checks_total";

/// Histogram buckets for latencies, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Histogram buckets for batch sizes, in hosts.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

pub fn describe() {
    ops_serve::server::Gate::describe("relay");
    ops_serve::enrollment::Enrollment::describe("relay");
    describe_counter!(HEARTBEATS, Unit::Count, "Heartbeats received, by result (ok, bad_request, too_large, no_config).");
    describe_histogram!(HEARTBEAT_DURATION, Unit::Seconds, "Time to answer one heartbeat.");
    describe_counter!(CONFIG_POLLS, Unit::Count, "Desired-config polls of the meta nodes, by result (changed, unchanged, error).");
    describe_gauge!(CONFIG_INFO, Unit::Count, "Always 1; the hash label is the content hash of the config served.");
    describe_counter!(CLUSTER_MAPS, Unit::Count, "Cluster maps learnt from the meta nodes (a node added or removed online).");
    describe_gauge!(ROLLOUT_IN_FLIGHT, Unit::Count, "Hosts this relay told a rollout's target that have not converged yet, by agent.");
    describe_counter!(
        CACHE_REQUESTS,
        Unit::Count,
        "Package cache requests, by result: hit, miss (fetched from the origin), wait (shared another request's fetch), \
         refused (not a configured file: 404, origin untouched), error."
    );
    describe_counter!(CACHE_ORIGIN_BYTES, Unit::Bytes, "Bytes the package cache fetched from origins.");
    describe_counter!(CACHE_SERVED_BYTES, Unit::Bytes, "Bytes the package cache served (body lengths of 200 and 206 answers).");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Bytes held in the package cache.");
    describe_gauge!(CACHE_FILES, Unit::Count, "Files held in the package cache.");
    describe_counter!(CACHE_EVICTIONS, Unit::Count, "Files evicted (least recently used) to keep the cache under --cache-max-bytes.");
    describe_counter!(CACHE_FAILED_CHECKS, Unit::Count, "Downloads that failed their sha256/md5 check: never served.");
    ops_serve::forward::Forwarder::describe("relay");
}
