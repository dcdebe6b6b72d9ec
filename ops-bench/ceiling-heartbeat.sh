#!/bin/bash
# The relay's heartbeat path against the ceiling, with wrk (which costs the box less than the
# bench's own client): a relay in front of 3 meta nodes (one server thread) and the bench's
# minimal hyper server (`ops-bench --ceiling-server`, tokio's default threads), wrk -t1 -c32,
# taken in turn ROUNDS times (default 3); prints requests/s and the server's CPU per request
# (from /proc: steadier than requests/s on a shared box) of each run, and the medians.
# With STORM=1 the relay's package cache serves a download storm (curl, 32 at a time of an
# 8 MiB file, from the relay) while wrk measures the relay and the ceiling alike: the same
# box load for both, so the ratio shows what serving packages costs the heartbeat path.
# Usage: ops-bench/ceiling-heartbeat.sh <dir of release binaries>. Needs wrk and curl.
set -u
B=$1
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cp "$ROOT/config/examples/agents.toml" "$D/agents.toml"
if [ "${STORM:-0}" = 1 ]; then
  mkdir -p "$D/origin/pkg/linux_amd64"
  head -c $((8 << 20)) /dev/urandom > "$D/origin/pkg/linux_amd64/storm-agent-1.0.tar.gz"
  SHA=$(sha256sum "$D/origin/pkg/linux_amd64/storm-agent-1.0.tar.gz" | cut -d' ' -f1)
  OP=$(port)
  (cd "$D/origin" && exec python3 -m http.server "$OP" --bind 127.0.0.1 >/dev/null 2>&1) & PIDS+=($!)
  printf '\n[[agent]]\nname = "storm-agent"\ntarball = "http://127.0.0.1:%s/pkg"\nrun_user = "root"\nwork_dir = "/opt/ops"\nrelay_cache = true\ndefault = { version = "1.0", sha256 = "%s" }\n' "$OP" "$SHA" >> "$D/agents.toml"
fi
MP=($(port) $(port) $(port))
{ echo 'vnodes = 1000'; for i in 0 1 2; do printf '[[node]]\nid = "meta-%d"\naddr = "127.0.0.1:%s"\n' $((i+1)) "${MP[$i]}"; done; } > "$D/cluster.toml"
for i in 0 1 2; do
  "$B/meta-node" --id meta-$((i+1)) --listen 127.0.0.1:${MP[$i]} --cluster "$D/cluster.toml" --agents "$D/agents.toml" \
    --data-dir "$D/meta-$i" --worker-threads 1 --log warn 2>/dev/null & PIDS+=($!)
done
RP=$(port)
"$B/relay" --listen 127.0.0.1:$RP --cluster "$D/cluster.toml" --data-dir "$D/relay" --worker-threads 1 --log warn \
  $([ "${STORM:-0}" = 1 ] && echo --cache-dir "$D/cache") 2>/dev/null & R=$!; PIDS+=($R)
coproc CEIL { exec "$B/ops-bench" --ceiling-server; }
read -r CADDR <&"${CEIL[0]}"; PIDS+=($CEIL_PID)
for i in $(seq 100); do curl -sf http://127.0.0.1:$RP/health >/dev/null && break; sleep 0.1; done
storm() {
  local url
  url=$(curl -s -X POST --data '{"hostname":"storm","ip":"127.0.0.1","updaterVersion":"0.1.0","realAgents":[]}' http://127.0.0.1:$RP/heartbeat \
    | python3 -c 'import json,sys;d=[a for a in json.load(sys.stdin)["desiredAgents"] if a["name"]=="storm-agent"][0];print(d["tarball"])')
  while :; do seq 32 | xargs -P32 -I{} curl -s -o /dev/null "$url/linux_amd64/storm-agent-1.0.tar.gz"; done
}
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
# wrk against $1 while reading the CPU ticks of pid $2: "requests/s cpu-us-per-request"
w() {
  local t0 out n
  t0=$(ticks $2)
  out=$(wrk -t1 -c32 -d8s -s "$ROOT/meta-node/benches/heartbeat.lua" "http://$1/heartbeat")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$(echo "$out" | awk '/Requests\/sec/ {print $2}') $(python3 -c "print(round(($(ticks $2)-$t0)*10000/$n,1))")"
}
rs=(); cs=(); rc=(); cc=()
for r in $(seq "$ROUNDS"); do
  if [ "${STORM:-0}" = 1 ]; then storm & S=$!; sleep 1; fi
  read -r a b < <(w 127.0.0.1:$RP $R); rs+=($a); rc+=($b)
  read -r a b < <(w "$CADDR" $CEIL_PID); cs+=($a); cc+=($b)
  if [ "${STORM:-0}" = 1 ]; then kill $S; pkill -P $S 2>/dev/null; wait $S 2>/dev/null; fi
  echo "round $r: relay ${rs[-1]}/s (${rc[-1]} us cpu/request)  ceiling ${cs[-1]}/s (${cc[-1]} us cpu/request)"
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
R=$(med "${rs[@]}"); C=$(med "${cs[@]}"); RC=$(med "${rc[@]}"); CC=$(med "${cc[@]}")
echo "median: relay $R/s ($RC us cpu/request)  ceiling $C/s ($CC us cpu/request)  relay/ceiling $(python3 -c "print(round($R/$C,2))")"
