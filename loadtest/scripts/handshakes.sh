#!/usr/bin/env bash
# Handshakes per second: the server under test with one thread pinned to CPU 0, the load
# generator pinned to CPU 1, opening N connections to the echo endpoint as fast as it can (up to
# RATE per second, 256 in flight); connections per second and per server CPU-second.
#
# Usage: loadtest/scripts/handshakes.sh [N=10000] [SERVER=wsgate] [RATE=50000]
# SERVER: wsgate (HS256 token verified on every handshake), wsgate-anonymous,
# baseline_fastwebsockets or baseline_tungstenite.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
n="${1:-10000}"
server="${2:-wsgate}"
rate="${3:-50000}"

cargo build --release -p wsgate -p loadtest
start_server "$server"
echo "server: $server, $n handshakes"
taskset -c 1 "$TARGET_DIR/release/loadtest" connect --target "$GATEWAY_ADDR" --path "$ECHO_PATH" \
  -n "$n" --rate "$rate" --hold 1s --source-ips 127.0.0.1-127.0.0.4 \
  --gateway-pid "$GATEWAY_PID" --json "${JSON:-/dev/null}" "${LOADTEST_TLS[@]}"
