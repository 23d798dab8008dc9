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
# Every connection presents a real token, so each one carries its verified identity.
export WSGATE_JWT_SECRET="idle-memory-$(date +%s%N)"
# One load generator is many clients behind few addresses: lift the per-address limits.
export WSGATE_MAX_CONNECTIONS_PER_IP=1000000 WSGATE_MAX_HANDSHAKES_PER_IP=1000000
token=$(target/release/wsgate token --user loadtest --ttl 1h)
WSGATE_LOG=warn start_gateway --shards 2
# Four source addresses: 10k+ connections from one address would crowd its ephemeral ports.
target/release/loadtest connect --target "$GATEWAY_ADDR" --token "$token" -n "$n" --rate 5000 \
  --hold 3s --source-ips 127.0.0.1-127.0.0.4 --gateway-pid "$GATEWAY_PID" "$@"
