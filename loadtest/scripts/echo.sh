#!/usr/bin/env bash
# Echo throughput and latency: a release gateway with one shard pinned to CPU 0, the load
# generator pinned to CPU 1 (taskset), closed-loop echo over /echo.
#
# Usage: loadtest/scripts/echo.sh [CONNECTIONS=100] [PAYLOAD=20] [DURATION=10s]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
n="${1:-100}"
payload="${2:-20}"
duration="${3:-10s}"

cargo build --release -p wsgate -p loadtest
export WSGATE_JWT_SECRET="echo-bench-$(date +%s%N)"
export WSGATE_MAX_CONNECTIONS_PER_IP=1000000 WSGATE_MAX_HANDSHAKES_PER_IP=1000000
export WSGATE_MAX_MESSAGE_SIZE=$((payload > 65536 ? payload : 65536))
token=$(target/release/wsgate token --user loadtest --ttl 1h)
WSGATE_LOG=warn start_gateway --shards 1
taskset -pc 0 "$GATEWAY_PID" >/dev/null
taskset -c 1 target/release/loadtest echo --target "$GATEWAY_ADDR" --path /echo --token "$token" \
  -n "$n" --payload "$payload" --duration "$duration" --gateway-pid "$GATEWAY_PID"
