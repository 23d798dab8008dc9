#!/usr/bin/env bash
# wsgate against the two baseline echo servers, each measured the same way by the same load
# generator (server pinned to CPU 0, load generator to CPU 1): handshakes/s, echo 100 × 20 B and
# echo 1000 × 1 KiB. JSON reports go to loadtest/results/compare/, and a markdown table to stdout.
#
# Usage: loadtest/scripts/compare.sh [DURATION=10s] [HANDSHAKES=19000]
set -euo pipefail
cd "$(dirname "$0")/../.."
duration="${1:-10s}"
handshakes="${2:-19000}"
out=loadtest/results/compare
mkdir -p "$out"
servers=(wsgate wsgate-anonymous baseline_fastwebsockets baseline_tungstenite)
for server in "${servers[@]}"; do
  JSON="$out/$server-handshakes.json" loadtest/scripts/handshakes.sh "$handshakes" "$server" >/dev/null
  JSON="$out/$server-echo-100x20.json" loadtest/scripts/echo.sh 100 20 "$duration" "$server" >/dev/null
  JSON="$out/$server-echo-1000x1024.json" loadtest/scripts/echo.sh 1000 1024 "$duration" "$server" >/dev/null
done
python3 - "$out" "${servers[@]}" <<'PY'
import json, sys
out, servers = sys.argv[1], sys.argv[2:]
load = lambda s, t: json.load(open(f"{out}/{s}-{t}.json"))
print("| server | handshakes/s | handshakes per server CPU-s | echo 100×20 B msg/s | per server CPU-s | p99 ms | echo 1000×1 KiB msg/s | per server CPU-s | p99 ms |")
print("|---|---|---|---|---|---|---|---|---|")
for s in servers:
    h = load(s, "handshakes")
    row = [s, f"{h['connections_per_second']:,.0f}", f"{h['connections_per_gateway_cpu_second'] or 0:,.0f}"]
    for t in ("echo-100x20", "echo-1000x1024"):
        e = load(s, t)
        row += [f"{e['messages_per_second']:,.0f}", f"{e['messages_per_gateway_cpu_second'] or 0:,.0f}", f"{e['latency']['p99_ms']:.2f}"]
    print("| " + " | ".join(row) + " |")
PY
