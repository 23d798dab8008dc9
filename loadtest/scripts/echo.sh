#!/usr/bin/env bash
# Echo throughput and latency: the server under test with one thread pinned to CPU 0, the load
# generator pinned to CPU 1 (taskset), closed-loop echo.
#
# Usage: loadtest/scripts/echo.sh [CONNECTIONS=100] [PAYLOAD=20] [DURATION=10s] [SERVER=wsgate]
# SERVER: wsgate, wsgate-anonymous, baseline_fastwebsockets or baseline_tungstenite (examples/),
# each measured the same way, by the same load generator.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
n="${1:-100}"
payload="${2:-20}"
duration="${3:-10s}"
server="${4:-wsgate}"

cargo build --release -p wsgate -p loadtest
export WSGATE_MAX_MESSAGE_SIZE=$((payload > 65536 ? payload : 65536))
start_server "$server"
echo "server: $server, $n connections x $payload B, $duration"
taskset -c 1 "$TARGET_DIR/release/loadtest" echo --target "$GATEWAY_ADDR" --path "$ECHO_PATH" \
  -n "$n" --payload "$payload" --duration "$duration" --gateway-pid "$GATEWAY_PID" \
  --json "${JSON:-/dev/null}" "${LOADTEST_TLS[@]}"
