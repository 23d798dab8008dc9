#!/usr/bin/env bash
# wsgate against the two baseline echo servers, each measured the same way by the same load
# generator (server pinned to CPU 0, load generator to CPU 1): handshakes/s, echo 100 × 20 B and
# echo 1000 × 1 KiB, each REPEAT times, the servers taking turns (a shared machine drifts). JSON
# reports go to $OUT (default loadtest/results/compare/), and a markdown table of the medians to stdout.
#
# Usage: loadtest/scripts/compare.sh [DURATION=10s] [HANDSHAKES=19000] [REPEAT=3] [SERVER...]
# SERVERs default to wsgate, wsgate-anonymous and the two baselines; `external` is the program
# $EXTERNAL_SERVER (see scripts/lib/gateway.sh), e.g. uWebSockets built outside the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration="${1:-10s}"
handshakes="${2:-19000}"
repeat="${3:-3}"
out="${OUT:-loadtest/results/compare}"
mkdir -p "$out"
shift 3 || shift $#
servers=("$@")
[ ${#servers[@]} -gt 0 ] || servers=(wsgate wsgate-anonymous baseline_fastwebsockets baseline_tungstenite)
for r in $(seq "$repeat"); do
  for server in "${servers[@]}"; do
    JSON="$out/$server-handshakes-$r.json" loadtest/scripts/handshakes.sh "$handshakes" "$server" >/dev/null
    JSON="$out/$server-echo-100x20-$r.json" loadtest/scripts/echo.sh 100 20 "$duration" "$server" >/dev/null
    JSON="$out/$server-echo-1000x1024-$r.json" loadtest/scripts/echo.sh 1000 1024 "$duration" "$server" >/dev/null
  done
done
python3 - "$out" "$repeat" "${servers[@]}" <<'PY'
import json, statistics, sys
out, repeat, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def load(server, test):
    runs = [json.load(open(f"{out}/{server}-{test}-{r}.json")) for r in range(1, repeat + 1)]
    def med(path):
        values = []
        for run in runs:
            v = run
            for key in path:
                v = v[key]
            values.append(v or 0)
        return statistics.median(values)
    return med

print("| server | handshakes/s | handshakes per server CPU-s | echo 100×20 B msg/s | per server CPU-s | p99 ms | echo 1000×1 KiB msg/s | per server CPU-s | p99 ms |")
print("|---|---|---|---|---|---|---|---|---|")
for s in servers:
    h = load(s, "handshakes")
    row = [s, f"{h(['connections_per_second']):,.0f}", f"{h(['connections_per_gateway_cpu_second']):,.0f}"]
    for t in ("echo-100x20", "echo-1000x1024"):
        e = load(s, t)
        row += [f"{e(['messages_per_second']):,.0f}", f"{e(['messages_per_gateway_cpu_second']):,.0f}", f"{e(['latency', 'p99_ms']):.2f}"]
    print("| " + " | ".join(row) + " |")
PY
