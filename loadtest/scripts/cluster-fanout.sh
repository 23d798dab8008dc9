#!/usr/bin/env bash
# Cross-node fan-out against one node, in the same run and with the same load: SUBSCRIBERS
# connections in ROOMS rooms, PUBLISHERS each sending RATE chat messages per second, exact
# loss/dup/order accounting. Three set-ups, one after the other:
#   single:  one node (2 shards), memory broker;
#   redis-1: one node (2 shards), Redis broker: what Redis adds per publication;
#   cluster: NODES nodes (1 shard each), Redis broker, every room spread over all of them.
#   cluster-1: the cluster again with one message per publisher: Redis's cost of everything but
#   the publications (joins, presence, sessions, beats), so that the cost of a publication is
#   (cluster − cluster-1) / (their difference in publications).
# Prints, per set-up: deliveries, deliveries per gateway CPU-second (all nodes), publish→receive
# p50/p99, and Redis's CPU. JSON reports go to DIR when given.
#
# Usage: loadtest/scripts/cluster-fanout.sh [SUBSCRIBERS=3000] [ROOMS=10] [PUBLISHERS=10] [RATE=20] [DURATION=10s] [NODES=3] [DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
subscribers="${1:-3000}"
rooms="${2:-10}"
publishers="${3:-10}"
rate="${4:-20}"
duration="${5:-10s}"
nodes="${6:-3}"
dir="${7:-}"

command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }
cargo build --release -p wsgate -p loadtest
prepare_load_test

# run NAME BROKER NODES SHARDS [LOADTEST ARGS...]
run() {
  local name="$1" broker="$2" count="$3" shards="$4" report
  shift 4
  GATEWAY_PIDS=() GATEWAY_ADDRS=()
  if [ "$broker" = redis ]; then
    start_redis
    export WSGATE_BROKER=redis WSGATE_REDIS_URL="$REDIS_URL"
  else
    export WSGATE_BROKER=memory
  fi
  for _ in $(seq "$count"); do
    WSGATE_LOG=warn start_gateway --shards "$shards"
    wait_ready "$GATEWAY_ADDR"
  done
  local targets=() pids=()
  for i in "${!GATEWAY_ADDRS[@]}"; do
    targets+=(--target "${GATEWAY_ADDRS[$i]}")
    pids+=(--gateway-pid "${GATEWAY_PIDS[$i]}")
  done
  report="${dir:-$(mktemp -d)}/cluster-fanout-$name.json"
  local redis_before=0
  [ "$broker" = redis ] && redis_before=$(cpu_seconds "$REDIS_PID")
  "$TARGET_DIR/release/loadtest" fanout "${targets[@]}" "${pids[@]}" --token "$TOKEN" \
    -n "$subscribers" --rooms "$rooms" --publishers "$publishers" --publish-rate "$rate" \
    --duration "$duration" --source-ips 127.0.0.1-127.0.0.4 --procs 2 --max-loss 0 \
    --json "$report" "$@" >/dev/null
  local redis_cpu=0
  [ "$broker" = redis ] && redis_cpu=$(python3 -c "print($(cpu_seconds "$REDIS_PID") - $redis_before)")
  python3 - "$name" "$report" "$redis_cpu" <<'PY'
import json, sys
name, path, redis_cpu = sys.argv[1], sys.argv[2], float(sys.argv[3])
r = json.load(open(path))
run = r["measured"]["run"]
cpu = run["gateway_cpu_seconds"] or 0
per_cpu = r["received"] / cpu if cpu else float("nan")
print(f"{name:9} published {r['published']:6}  deliveries {r['received']:8} of {r['expected']:8}"
      f"  lost {r['lost']} dup {r['duplicates']} ooo {r['out_of_order']}"
      f"  {r['deliveries_per_second']:8.0f}/s  {per_cpu:8.0f} per gateway CPU-s"
      f"  p50 {r['latency']['p50_ms']:.1f} ms  p99 {r['latency']['p99_ms']:.1f} ms"
      f"  gateway CPU {cpu:.2f} s  loadtest CPU {run['loadtest_cpu_seconds']:.2f} s"
      f"  redis CPU {redis_cpu:.2f} s")
PY
  kill "${GATEWAY_PIDS[@]}" "${REDIS_PIDS[@]}" 2>/dev/null || true
  wait "${GATEWAY_PIDS[@]}" "${REDIS_PIDS[@]}" 2>/dev/null || true
  REDIS_PIDS=()
}

echo "$subscribers subscribers, $rooms rooms, $publishers publishers × $rate/s for $duration"
run single memory 1 2
run redis-1 redis 1 2
run cluster redis "$nodes" 1
run cluster-1 redis "$nodes" 1 --messages 1
