#!/bin/bash
# A/B of the heartbeat path: a relay (with its meta node) and a meta node alone, one server
# thread each, wrk on the other core. Usage: ops-bench/ab-heartbeat.sh <dir of release binaries>
# (run it for each build alternately; needs wrk, curl, ports 2000 and 2200 free).
# Prints requests/s of the relay and of the meta node alone.
set -u
B=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
"$B/meta-node" --listen 127.0.0.1:2000 --agents "$ROOT/config/examples/agents.toml" --data-dir "$D/meta" --worker-threads 1 --log warn 2>/dev/null & M=$!
sleep 1
"$B/relay" --listen 127.0.0.1:2200 --data-dir "$D/relay" --worker-threads 1 --log warn 2>/dev/null & R=$!
for i in $(seq 50); do curl -sf http://127.0.0.1:2200/health >/dev/null && break; sleep 0.1; done
r=$(wrk -t1 -c32 -d8s -s "$ROOT/meta-node/benches/heartbeat.lua" http://127.0.0.1:2200/heartbeat | grep Requests/sec | awk '{print $2}')
rc=$(awk '{print $14+$15}' /proc/$R/stat)
kill $R; wait $R 2>/dev/null
m=$(wrk -t1 -c32 -d8s -s "$ROOT/meta-node/benches/heartbeat.lua" http://127.0.0.1:2000/heartbeat | grep Requests/sec | awk '{print $2}')
kill $M; wait $M 2>/dev/null
echo "relay $r/s (relay cpu ticks $rc)  meta $m/s"
