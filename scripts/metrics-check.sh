#!/usr/bin/env bash
# Checks /metrics with an independent parser: the official Prometheus Python client's OpenMetrics
# parser (strict: names, types, suffixes, histogram buckets, # EOF) reads a release gateway's
# metrics after some traffic. Installs the client into ~/.cache/wsgate-metrics-check on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/gateway.sh

source scripts/lib/python-venv.sh
python_venv wsgate-metrics-check prometheus-client==0.26.0
cargo build --release --bin wsgate
export WSGATE_API_KEY="metrics-check-$(date +%s%N)"
start_gateway
base="http://$GATEWAY_ADDR"
# Some traffic: a publication (through a shard's bus), a refused upgrade, a 404.
curl -fs -H "Authorization: Bearer $WSGATE_API_KEY" -d '{"room":"r","data":1}' "$base/api/publish" >/dev/null
curl -s -o /dev/null -H 'Upgrade: websocket' -H 'Connection: Upgrade' -H 'Sec-WebSocket-Version: 13' \
  -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "$base/ws?token=garbage"
curl -s -o /dev/null "$base/nothing"
curl -fs "$base/metrics" | "$VENV/bin/python" -c '
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
refused = {s.labels.get("reason"): s.value for s in families["wsgate_handshakes_refused"].samples}
assert refused["auth_malformed_token"] == 1, refused
assert families["wsgate_delivery_latency_seconds"].type == "histogram"
print(f"/metrics: {len(families)} metric families parsed (OpenMetrics), refusals by reason counted")
'
