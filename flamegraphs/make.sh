#!/usr/bin/env bash
# Regenerates the flame graphs: the gateway (profiling build: release code with line tables) is
# pinned to CPU 0 under load from `loadtest` on CPU 1, sampled by perf, folded and drawn by inferno.
#
# Needs: perf (Debian's linux-perf), inferno (`cargo install inferno`).
# Usage: flamegraphs/make.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/gateway.sh

cargo build --profile profiling --bin wsgate
cargo build --release -p loadtest
export GATEWAY_BIN=target/profiling/wsgate
prepare_load_test
WSGATE_LOG=warn start_gateway --shards 1
taskset -pc 0 "$GATEWAY_PID" >/dev/null

# echo: 100 connections x 20 B, closed loop; 5 s of samples in the middle of a 12 s run.
taskset -c 1 target/release/loadtest echo --target "$GATEWAY_ADDR" --path "/echo?token=$TOKEN" \
  -n 100 --payload 20 --duration 12s >/dev/null &
load=$!
sleep 3
# DWARF unwinding: the release code has no frame pointers, and -g alone loses the user-space
# frames under a syscall.
perf record -F 499 --call-graph dwarf,16384 -p "$GATEWAY_PID" -o /tmp/wsgate-echo.perf.data \
  -- sleep 5 2>/dev/null
wait "$load"
perf script -i /tmp/wsgate-echo.perf.data 2>/dev/null | inferno-collapse-perf \
  | inferno-flamegraph --title "wsgate echo: 100 connections x 20 B, 1 shard" > flamegraphs/echo.svg
rm -f /tmp/wsgate-echo.perf.data
echo "wrote flamegraphs/echo.svg"
