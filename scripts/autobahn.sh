#!/usr/bin/env bash
# Runs the Autobahn TestSuite fuzzingclient (all 517 cases; permessage-deflate ones report
# UNIMPLEMENTED) against a release wsgate's /echo. Fails on any FAILED case.
#
# Section 9 sends messages of up to 16 MiB, so this run raises max_message_size to that; the
# default limit (64 KiB) is tested by tests/frames.rs. The suite cannot present a token, so the run
# allows anonymous connections (authentication is tested by tests/auth.rs), and the suite's
# back-to-back connections are not handshake-rate-limited.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_DIR="${SHARED_DIR:-../shared}"

cargo build --release --bin wsgate
log=$(mktemp)
WSGATE_MAX_MESSAGE_SIZE=16777216 WSGATE_RATE_LIMIT_BURST_BYTES=16777216 WSGATE_ALLOW_ANONYMOUS=true WSGATE_MAX_HANDSHAKES_PER_IP=100000 \
  WSGATE_LOG=warn target/release/wsgate --listen 127.0.0.1:0 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
url=$(sed -n 's|.*listening on http://\([^/]*\)/.*|ws://\1/echo|p' "$log")
[ -n "$url" ] || { echo "wsgate did not report its address"; cat "$log"; exit 1; }
"$SHARED_DIR/tools/autobahn/run.sh" "$url" wsgate
