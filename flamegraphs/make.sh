#!/usr/bin/env bash
# Regenerates the flame graphs: the gateway (profiling build: release code with line tables) is
# pinned to CPU 0 under load from `loadtest` on CPU 1, sampled by perf, folded and drawn by inferno.
#
# Needs: perf (Debian's linux-perf), inferno (`cargo install inferno`).
# Usage: flamegraphs/make.sh [echo|fanout]...   (both by default); the gateway's engine is
# WSGATE_ENGINE's (default auto: io_uring where available), and is named in the titles.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/gateway.sh

cargo build --profile profiling --bin wsgate
cargo build --release -p loadtest
export GATEWAY_BIN="$TARGET_DIR/profiling/wsgate"
# Fan-out publishers send faster than the default per-connection limit.
prepare_load_test
WSGATE_LOG=warn start_gateway --shards 1
taskset -apc 0 "$GATEWAY_PID" >/dev/null
engine=$(curl -s "http://$GATEWAY_ADDR/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["engine"])')

# profile NAME TITLE LOADTEST-ARGS...: runs the load (12 s after its ramp) and samples the
# gateway for 5 s in the middle of it.
profile() {
  local name="$1" title="$2"
  shift 2
  taskset -c 1 "$TARGET_DIR/release/loadtest" "$@" --target "$GATEWAY_ADDR" >/dev/null &
  local load=$!
  sleep 4
  # DWARF unwinding: the release code has no frame pointers, and -g alone loses the user-space
  # frames under a syscall.
  perf record -F 499 --call-graph dwarf,16384 -p "$GATEWAY_PID" -o "/tmp/wsgate-$name.perf.data" \
    -- sleep 5 2>/dev/null
  wait "$load"
  perf script -i "/tmp/wsgate-$name.perf.data" 2>/dev/null | inferno-collapse-perf \
    | inferno-flamegraph --title "$title" >"flamegraphs/$name.svg"
  rm -f "/tmp/wsgate-$name.perf.data"
  echo "wrote flamegraphs/$name.svg"
}

[ $# -gt 0 ] || set -- echo fanout
for what in "$@"; do
  case "$what" in
    echo)
      profile echo "wsgate echo ($engine): 100 connections x 20 B, closed loop, 1 shard" \
        echo --path "/echo?token=$TOKEN" -n 100 --payload 20 --duration 12s
      ;;
    fanout)
      profile fanout "wsgate fan-out ($engine): 2000 subscribers in 1 room, 5 publishers x 20 msg/s, 1 shard" \
        fanout --token "$TOKEN" -n 2000 --rooms 1 --publishers 5 --publish-rate 20 \
        --duration 12s --rate 5000 --procs 2
      ;;
    *) echo "unknown profile $what (echo, fanout)" >&2; exit 2 ;;
  esac
done
