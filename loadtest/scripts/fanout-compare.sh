#!/usr/bin/env bash
# Fan-out per server CPU-second, wsgate against peers: SUBSCRIBERS members of one room and one
# publisher sending RATE chat messages per second for DURATION, each server in turn (server
# pinned to CPU 0 — wsgate with one shard and a token on every connection —, load generator to
# CPU 1), REPEAT times. JSON reports go to loadtest/results/fanout-compare/, a markdown table of
# the medians (deliveries per server CPU-second, publish-to-receive p99) to stdout.
#
# Usage: loadtest/scripts/fanout-compare.sh [SUBSCRIBERS=1000] [RATE=100] [DURATION=10s] [REPEAT=3] [SERVER...]
# SERVERs: wsgate (default; wsgate@io_uring, wsgate@epoll pick the engine), wsgate+publish-proxy
# (every chat message asked of examples/backend.py first, the backend on the load generator's
# CPU), external ($EXTERNAL_SERVER run with $EXTERNAL_SERVER_ARGS: a peer
# built outside this repository that speaks the chat protocol's greeting, join_room and
# chat_message, see scripts/lib/gateway.sh).
# CHARS=N pads each chat message's text to N characters (realistic chat JSON); COMPRESSION=1
# turns permessage-deflate on: wsgate with compression = "on", the load generator offering it
# (give an external peer its own flag in EXTERNAL_SERVER_ARGS). The table adds the loopback
# interface's bytes per delivery during the run (the wire: TCP/IP headers and acknowledgements
# included, publishers' messages too; run it on an otherwise quiet machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/gateway.sh
subscribers="${1:-1000}"
rate="${2:-100}"
duration="${3:-10s}"
repeat="${4:-3}"
shift 4 || shift $#
servers=("$@")
chars="${CHARS:-0}"
compression=off
client_flags=(--message-chars "$chars")
if [ "${COMPRESSION:-0}" = 1 ]; then
  compression=on
  client_flags+=(--compression)
fi
tag="$subscribers-$rate-$chars-$compression"
[ ${#servers[@]} -gt 0 ] || servers=(wsgate)
out="${OUT:-loadtest/results/fanout-compare}"
mkdir -p "$out"
cargo build --release -p wsgate -p loadtest
prepare_load_test
for r in $(seq "$repeat"); do
  for server in "${servers[@]}"; do
    case "$server" in
      wsgate) WSGATE_COMPRESSION=$compression WSGATE_LOG=warn start_gateway --shards 1 ;;
      wsgate@*)
        WSGATE_COMPRESSION=$compression WSGATE_ENGINE="${server#*@}" WSGATE_LOG=warn \
          start_gateway --shards 1
        ;;
      wsgate+publish-proxy)
        start_example_backend 1
        WSGATE_PUBLISH_PROXY="http://127.0.0.1:$BACKEND_PORT/publish" WSGATE_LOG=warn \
          start_gateway --shards 1
        ;;
      external)
        # shellcheck disable=SC2086 # the arguments are words
        GATEWAY_BIN="${EXTERNAL_SERVER:?set EXTERNAL_SERVER}" start_gateway ${EXTERNAL_SERVER_ARGS:-}
        ;;
      *) echo "unknown server $server (wsgate, external)" >&2; exit 2 ;;
    esac
    taskset -apc 0 "$GATEWAY_PID" >/dev/null
    taskset -c 1 "$TARGET_DIR/release/loadtest" fanout --target "$GATEWAY_ADDR" --token "$TOKEN" \
      -n "$subscribers" --rooms 1 --publishers 1 --publish-rate "$rate" --duration "$duration" \
      --source-ips 127.0.0.1-127.0.0.4 --gateway-pid "$GATEWAY_PID" "${client_flags[@]}" \
      --json "$out/$server-$tag-$r.json" >/dev/null
    kill "$GATEWAY_PID"
    wait "$GATEWAY_PID" 2>/dev/null || true
    stop_example_backend
  done
done
python3 - "$out" "$tag" "$repeat" "${servers[@]}" <<'PY'
import json, statistics, sys
out, tag, repeat, servers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
print(f"| server ({tag}: members-rate-chars-compression) | deliveries | lost | per server CPU-s (runs) | median | p99 ms | wire bytes per delivery |")
print("|---|---|---|---|---|---|---|")
for s in servers:
    runs = [json.load(open(f"{out}/{s}-{tag}-{r}.json")) for r in range(1, repeat + 1)]
    per_cpu = [run["received"] / run["measured"]["run"]["gateway_cpu_seconds"] for run in runs]
    p99 = statistics.median(run["latency"]["p99_ms"] for run in runs)
    received = statistics.median(run["received"] for run in runs)
    lost = sum(run["lost"] for run in runs)
    wire = statistics.median(run["measured"]["run"]["loopback_bytes"] / max(run["received"], 1) for run in runs)
    print(f"| {s} | {received:,.0f} | {lost} | {', '.join(f'{v:,.0f}' for v in per_cpu)} | {statistics.median(per_cpu):,.0f} | {p99:.2f} | {wire:.1f} |")
PY
