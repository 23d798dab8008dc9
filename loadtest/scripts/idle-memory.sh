#!/usr/bin/env bash
# Idle memory per connection: starts a release gateway (default config, 2 shards), opens N idle
# chat connections with `loadtest connect`, and reports the gateway's RSS growth per connection.
#
# Usage: loadtest/scripts/idle-memory.sh [N=10000] [extra loadtest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
n="${1:-10000}"
shift || true

cargo build --release -p wsgate -p loadtest
# Every connection presents a real token, so each one carries its verified identity.
export WSGATE_JWT_SECRET="idle-memory-$(date +%s%N)"
# One load generator is many clients behind few addresses: lift the per-address limits.
export WSGATE_MAX_CONNECTIONS_PER_IP=1000000 WSGATE_MAX_HANDSHAKES_PER_IP=1000000
token=$(target/release/wsgate token --user loadtest --ttl 1h)
log=$(mktemp)
WSGATE_LOG=warn target/release/wsgate --listen 127.0.0.1:0 --shards 2 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
addr=$(sed -n 's|.*listening on http://\([^/]*\)/.*|\1|p' "$log")
[ -n "$addr" ] || { echo "wsgate did not start"; cat "$log"; exit 1; }
# Four source addresses: 10k+ connections from one address would crowd its ephemeral ports.
target/release/loadtest connect --target "$addr" --token "$token" -n "$n" --rate 5000 --hold 3s \
  --source-ips 127.0.0.1-127.0.0.4 --gateway-pid "$pid" "$@"
