#!/usr/bin/env bash
# Idle memory per connection: starts a release gateway (2 shards, an HS256 secret), opens N idle
# chat connections that each present a real token (`loadtest connect`), and reports the gateway's
# RSS growth per connection.
#
# Usage: loadtest/scripts/idle-memory.sh [N=10000] [extra loadtest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
n="${1:-10000}"
shift || true

cargo build --release -p wsgate -p loadtest
prepare_load_test
WSGATE_LOG=warn start_gateway --shards 2
# Four source addresses: 10k+ connections from one address would crowd its ephemeral ports.
"$TARGET_DIR/release/loadtest" connect --target "$GATEWAY_ADDR" --token "$TOKEN" -n "$n" --rate 5000 \
  --hold 3s --source-ips 127.0.0.1-127.0.0.4 --gateway-pid "$GATEWAY_PID" "$@" "${LOADTEST_TLS[@]}"
