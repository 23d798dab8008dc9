#!/usr/bin/env bash
# Echo throughput and latency: a release gateway with one shard pinned to CPU 0, the load
# generator pinned to CPU 1 (taskset), closed-loop echo over /echo.
#
# Usage: loadtest/scripts/echo.sh [CONNECTIONS=100] [PAYLOAD=20] [DURATION=10s] [SERVER]
# SERVER: wsgate (default), baseline_fastwebsockets or baseline_tungstenite (examples/), measured
# the same way, by the same load generator.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
n="${1:-100}"
payload="${2:-20}"
duration="${3:-10s}"
server="${4:-wsgate}"

cargo build --release -p wsgate -p loadtest
if [ "$server" = wsgate ]; then
  export WSGATE_MAX_MESSAGE_SIZE=$((payload > 65536 ? payload : 65536))
  prepare_load_test
  WSGATE_LOG=warn start_gateway --shards 1
  path="/echo?token=$TOKEN"
else
  cargo build --release --example "$server"
  GATEWAY_BIN="target/release/examples/$server" start_gateway
  path="/"
fi
taskset -pc 0 "$GATEWAY_PID" >/dev/null
echo "server: $server, $n connections x $payload B, $duration"
taskset -c 1 target/release/loadtest echo --target "$GATEWAY_ADDR" --path "$path" \
  -n "$n" --payload "$payload" --duration "$duration" --gateway-pid "$GATEWAY_PID"
