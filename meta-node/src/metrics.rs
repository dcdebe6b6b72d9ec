//! Metric names of the meta node (`ops_meta_*`), described once at start-up.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const HEARTBEATS: &str = "ops_meta_heartbeats_total";
pub const HEARTBEAT_DURATION: &str = "ops_meta_heartbeat_duration_seconds";
pub const HOSTS: &str = "ops_meta_hosts";
pub const HOSTS_STALE: &str = "ops_meta_hosts_stale";
pub const RELAY_HOSTS: &str = "ops_meta_relay_hosts";
pub const RELAY_SILENT_HOSTS: &str = "ops_meta_relay_silent_hosts";
pub const HOSTS_FORGOTTEN: &str = "ops_meta_hosts_forgotten_total";
pub const CONFIG_RELOADS: &str = "ops_meta_config_reloads_total";
pub const CONFIG_INFO: &str = "ops_meta_config_info";
pub const SNAPSHOTS: &str = "ops_meta_snapshots_total";
pub const SNAPSHOT_DURATION: &str = "ops_meta_snapshot_duration_seconds";
pub const SNAPSHOT_BYTES: &str = "ops_meta_snapshot_bytes";
pub const STATUS_REQUESTS: &str = "ops_meta_status_requests_total";
pub const INTERNED_STRINGS: &str = "ops_meta_interned_strings";
pub const INTERNED_BYTES: &str = "ops_meta_interned_bytes";
pub const STRINGS_FREED: &str = "ops_meta_interned_strings_freed_total";
pub const REPORTS_REFUSED: &str = "ops_meta_reports_refused_total";
pub const REPORTS_REVOKED: &str = "ops_meta_reports_revoked_total";
pub const UNAUTHENTICATED_IGNORED: &str = "ops_meta_reports_unauthenticated_ignored_total";
pub const REPORTS_CLAMPED: &str = "ops_meta_reports_clamped_total";
pub const BATCHES_RECEIVED: &str = "ops_meta_batches_received_total";
pub const BATCH_HOSTS_RECEIVED: &str = "ops_meta_batch_hosts_received_total";
pub const PEER_ERRORS: &str = "ops_meta_peer_errors_total";
pub const CONFIG_DIVERGED: &str = "ops_meta_config_diverged";
pub const CLUSTER_DIVERGED: &str = "ops_meta_cluster_diverged";
pub const PEERS_UP: &str = "ops_meta_peers_up";
pub const PEER_REFUSED: &str = "ops_meta_peer_refused_total";
pub const UNPREPARED_MOVES: &str = "ops_meta_unprepared_moves_total";
pub const FAILOVER_COPIES: &str = "ops_meta_failover_copies";
pub const HANDOFF_HOSTS: &str = "ops_meta_handoff_hosts_total";
pub const ROLLOUT_HOSTS: &str = "ops_meta_rollout_hosts";
pub const ROLLOUT_WAVE: &str = "ops_meta_rollout_wave";
pub const ROLLOUT_HALTED: &str = "ops_meta_rollout_halted";
pub const ROLLOUT_IN_FLIGHT: &str = "ops_meta_rollout_in_flight";

/// Histogram buckets for request latencies, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

pub fn describe() {
    describe_counter!(HEARTBEATS, Unit::Count, "Heartbeats received, by result (ok, bad_request, too_large).");
    describe_histogram!(HEARTBEAT_DURATION, Unit::Seconds, "Time to handle one heartbeat, body read to reply.");
    describe_gauge!(HOSTS, Unit::Count, "Hosts whose real state this node holds.");
    describe_gauge!(
        ROLLOUT_HOSTS,
        Unit::Count,
        "Owned hosts of a rollout's wave, by agent, wave and state (targeted, told, converged, failed, silent, pinned)."
    );
    describe_gauge!(ROLLOUT_WAVE, Unit::Count, "The fleet's open wave of an agent's rollout as this node sees it (0: none).");
    describe_gauge!(ROLLOUT_HALTED, Unit::Count, "1 when an agent's rollout is halted.");
    describe_gauge!(
        ROLLOUT_IN_FLIGHT,
        Unit::Count,
        "Hosts this node answered directly and told a rollout's target that have not converged yet, by agent."
    );
    describe_gauge!(
        CLUSTER_DIVERGED,
        Unit::Count,
        "1 when a peer at the same cluster generation served another cluster map at the last probe, outside a membership change."
    );
    describe_gauge!(PEERS_UP, Unit::Count, "Meta nodes of the cluster map that answer this node's probe, itself included.");
    describe_counter!(
        PEER_REFUSED,
        Unit::Count,
        "Internal requests refused under mTLS: no certificate, or not one of this cluster's nodes (or relays)."
    );
    describe_counter!(
        UNPREPARED_MOVES,
        Unit::Count,
        "Membership changes that hosts moved here began but this node's own prepare never followed within --moving-grace-seconds: ended here."
    );
    describe_gauge!(FAILOVER_COPIES, Unit::Count, "Hosts held here for another node while it was down (failover copies).");
    describe_counter!(
        HANDOFF_HOSTS,
        Unit::Count,
        "Failover copies handed back to the node that should hold them (the owner once back), by node."
    );
    describe_gauge!(HOSTS_STALE, Unit::Count, "Hosts held but not heard from for stale_after.");
    describe_gauge!(
        RELAY_HOSTS,
        Unit::Count,
        "Hosts this node owns, by the relay their last report came through (relay=\"direct\": none)."
    );
    describe_gauge!(
        RELAY_SILENT_HOSTS,
        Unit::Count,
        "Hosts this node owns not heard from for stale_after, by the relay their last report came through."
    );
    describe_counter!(HOSTS_FORGOTTEN, Unit::Count, "Hosts dropped after forget_after without a report.");
    describe_counter!(CONFIG_RELOADS, Unit::Count, "Desired-config reloads, by result (ok, error).");
    describe_gauge!(CONFIG_INFO, Unit::Count, "Always 1; the hash label is the content hash of the config served.");
    describe_counter!(SNAPSHOTS, Unit::Count, "Snapshot writes, by result (ok, error).");
    describe_histogram!(SNAPSHOT_DURATION, Unit::Seconds, "Time to write one snapshot.");
    describe_gauge!(SNAPSHOT_BYTES, Unit::Bytes, "Size of the last snapshot written.");
    describe_counter!(STATUS_REQUESTS, Unit::Count, "Status queries, by kind (json, text, summary, host).");
    ops_serve::server::Gate::describe("meta");
    ops_serve::enrollment::Enrollment::describe("meta");
    describe_counter!(
        REPORTS_CLAMPED,
        Unit::Count,
        "Reports of a batch whose time was later than this node's clock plus --max-clock-skew-seconds, stored at that ceiling."
    );
    describe_gauge!(INTERNED_STRINGS, Unit::Count, "Distinct strings interned (agent names, versions, status texts...).");
    describe_counter!(
        UNAUTHENTICATED_IGNORED,
        Unit::Count,
        "Reports without a host credential of hosts whose record is authenticated: answered, never stored."
    );
    describe_gauge!(INTERNED_BYTES, Unit::Bytes, "Bytes of the interned strings (capped by --max-interned-bytes).");
    describe_counter!(STRINGS_FREED, Unit::Count, "Interned strings freed because no host record used them any more.");
    describe_counter!(
        REPORTS_REFUSED,
        Unit::Count,
        "Reports refused because a new string of theirs would pass --max-interned-strings or --max-interned-bytes."
    );
    describe_counter!(
        REPORTS_REVOKED,
        Unit::Count,
        "Reports of a batch whose host credential the served [enrollment] withdraws: dropped (the relay had an older config)."
    );
}
