#!/usr/bin/env bash
# Heartbeat CPU cost: a release gateway (2 shards) holds N idle, authenticated connections that
# answer pings, for HOLD; the gateway's CPU over the hold is reported. Run it with different
# heartbeat intervals to separate the heartbeat's share from the idle baseline:
#
#   loadtest/scripts/heartbeat-cost.sh 10000 1s 20s    # 10k pings/s
#   loadtest/scripts/heartbeat-cost.sh 10000 30s 20s   # the default interval
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
n="${1:-10000}"
interval="${2:-1s}"
hold="${3:-20s}"

cargo build --release -p wsgate -p loadtest
prepare_load_test
WSGATE_HEARTBEAT_INTERVAL="$interval" WSGATE_LOG=warn start_gateway --shards 2
echo "heartbeat_interval=$interval, $n connections, hold $hold"
"$TARGET_DIR/release/loadtest" connect --target "$GATEWAY_ADDR" --token "$TOKEN" -n "$n" --rate 5000 \
  --hold "$hold" --source-ips 127.0.0.1-127.0.0.4 --gateway-pid "$GATEWAY_PID"
