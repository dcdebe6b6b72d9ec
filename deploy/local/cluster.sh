#!/usr/bin/env bash
# Starts (or stops) a 3-meta, 2-relay ops fleet cluster on loopback:
#   meta-1..3 on 127.0.0.1:2000-2002, relay-1..2 on 127.0.0.1:2200-2201.
# Usage: deploy/local/cluster.sh start|stop|status
# State, logs and pids live in deploy/local/run/. Uses the release binaries (built if missing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run="$here/run"
bin="$root/target/release"

start() {
    mkdir -p "$run"
    if [ ! -x "$bin/meta-node" ] || [ ! -x "$bin/relay" ]; then
        (cd "$root" && cargo build --release -p meta-node -p relay)
    fi
    if [ ! -s "$run/cluster.token" ]; then
        head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$run/cluster.token"
        chmod 600 "$run/cluster.token"
    fi
    [ -f "$run/agents.toml" ] || cp "$root/config/examples/agents.toml" "$run/agents.toml"
    for i in 1 2 3; do
        start_one "meta-$i" "$bin/meta-node" --id "meta-$i" --listen "127.0.0.1:$((1999 + i))" \
            --cluster "$here/cluster.toml" --agents "$run/agents.toml" --data-dir "$run/meta-$i"
    done
    for i in 1 2; do
        start_one "relay-$i" "$bin/relay" --id "relay-$i" --listen "127.0.0.1:$((2199 + i))" \
            --cluster "$here/cluster.toml" --data-dir "$run/relay-$i"
    done
    # A relay answers /health 200 only once it holds a desired config: ready means ready.
    for port in 2000 2001 2002 2200 2201; do wait_health "$port"; done
    echo "cluster up: meta 127.0.0.1:2000-2002, relays 127.0.0.1:2200-2201 (logs in $run)"
}

start_one() {
    local name="$1"; shift
    if [ -f "$run/$name.pid" ] && kill -0 "$(cat "$run/$name.pid")" 2>/dev/null; then
        echo "$name already running"; return
    fi
    "$@" >"$run/$name.log" 2>&1 &
    echo $! > "$run/$name.pid"
}

wait_health() {
    for _ in $(seq 300); do
        curl -fs "127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "127.0.0.1:$1 is not ready (no answer, or 503 from a relay without a config); see $run/*.log" >&2
    return 1
}

stop() {
    # Relays first, so they drain their buffers into the meta nodes; then the meta nodes,
    # which write their snapshots.
    for name in relay-1 relay-2 meta-1 meta-2 meta-3; do
        local pidfile="$run/$name.pid"
        [ -f "$pidfile" ] || continue
        local pid; pid="$(cat "$pidfile")"
        if kill -TERM "$pid" 2>/dev/null; then
            for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && { echo "$name did not stop, killing"; kill -KILL "$pid"; }
        fi
        rm -f "$pidfile"
    done
    echo "cluster stopped"
}

status() {
    for port in 2000 2001 2002 2200 2201; do
        printf '%s ' "$port"; curl -fs "127.0.0.1:$port/health" || printf 'down'; echo
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
