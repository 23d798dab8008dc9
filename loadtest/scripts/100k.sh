#!/usr/bin/env bash
# 100,000 clients on one machine: NODES release gateways (one shard each; each process is capped
# at 20k open files here) joined by a Redis into one cluster, and `loadtest connect --procs NODES`
# from 8 source addresses. Every client presents a real token, joins the broadcast room (one room,
# spanning every node), and is held for HOLD with heartbeats running (every HEARTBEAT); then one
# message, sent through the first node, must reach every client on every node. The run fails on
# any connection failure or lost message. CLUSTER=no runs independent nodes instead (one
# broadcast per node); BROADCAST=no leaves the broadcast (and the room) out, to measure the idle
# and heartbeat cost alone; JSON=FILE keeps the report.
#
# Usage: loadtest/scripts/100k.sh [CLIENTS=100000] [HOLD=60s] [NODES=6] [HEARTBEAT=10s] [RATE=4000]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
clients="${1:-100000}"
hold="${2:-60s}"
nodes="${3:-6}"
heartbeat="${4:-10s}"
rate="${5:-4000}"

cargo build --release -p wsgate -p loadtest
prepare_load_test
cluster=(--cluster)
if [ "${CLUSTER:-yes}" = no ]; then
  cluster=()
else
  start_redis
  export WSGATE_BROKER=redis WSGATE_REDIS_URL="$REDIS_URL"
fi
# Rooms this big send no presence notices (presence_max_members), so the room's only traffic is
# the broadcast.
for _ in $(seq "$nodes"); do
  WSGATE_HEARTBEAT_INTERVAL="$heartbeat" WSGATE_LOG=warn start_gateway --shards 1
  wait_ready "$GATEWAY_ADDR"
done
targets=() pids=()
for i in "${!GATEWAY_ADDRS[@]}"; do
  targets+=(--target "${GATEWAY_ADDRS[$i]}")
  pids+=(--gateway-pid "${GATEWAY_PIDS[$i]}")
done
broadcast=(--broadcast "${cluster[@]}")
[ "${BROADCAST:-yes}" = no ] && broadcast=()
echo "$clients clients over $nodes nodes (${GATEWAY_ADDRS[*]}${REDIS_URL:+, cluster on $REDIS_URL}), hold $hold, heartbeat every $heartbeat"
"$TARGET_DIR/release/loadtest" connect "${targets[@]}" "${pids[@]}" --token "$TOKEN" \
  -n "$clients" --rate "$rate" --concurrency 128 --hold "$hold" "${broadcast[@]}" \
  --procs "$nodes" --source-ips 127.0.0.1-127.0.0.8 --handshake-timeout 30s \
  --json "${JSON:-/dev/null}"
