#!/usr/bin/env bash
# Fan-out: a release gateway (2 shards) with SUBSCRIBERS connections spread over ROOMS rooms and
# PUBLISHERS connections each sending RATE chat messages per second; exact loss/dup/order counts.
# The load generator runs as PROCS processes (its side of every delivery — a recv, a wake-up, a
# record — is the heavier one on this 2-core machine).
#
# Usage: loadtest/scripts/fanout.sh [SUBSCRIBERS=1000] [ROOMS=10] [PUBLISHERS=10] [RATE=10] [DURATION=10s] [PROCS=2]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
subscribers="${1:-1000}"
rooms="${2:-10}"
publishers="${3:-10}"
rate="${4:-10}"
duration="${5:-10s}"
procs="${6:-2}"

cargo build --release -p wsgate -p loadtest
# Rooms this big send no join notices (presence_max_members); publishers stay under the limit.
prepare_load_test
WSGATE_LOG=warn start_gateway --shards 2
"$TARGET_DIR/release/loadtest" fanout --target "$GATEWAY_ADDR" --token "$TOKEN" -n "$subscribers" \
  --rooms "$rooms" --publishers "$publishers" --publish-rate "$rate" --duration "$duration" \
  --source-ips 127.0.0.1-127.0.0.4 --gateway-pid "$GATEWAY_PID" --procs "$procs" \
  --json "${JSON:-/dev/null}" "${LOADTEST_TLS[@]}"
