#!/usr/bin/env bash
# Runs the Autobahn TestSuite fuzzingclient (all 517 cases, permessage-deflate's sections 12 and
# 13 included: the run turns compression on) against a release wsgate's /echo. Fails on any
# FAILED or UNIMPLEMENTED case. The suite is installed on first use by
# scripts/lib/autobahn-run.sh (into ~/.cache/autobahn-testsuite).
#
# Section 9 sends messages of up to 16 MiB, and messages of 1 MiB in fragments of 64 bytes, as
# fast as it can: this run raises max_message_size to 16 MiB (the byte burst follows it) and lifts
# the per-connection rates; the default limits are tested by tests/frames.rs and tests/limits.rs.
# The suite cannot present a token, so the run allows anonymous connections (authentication is
# tested by tests/auth.rs), and its back-to-back connections are not handshake-rate-limited.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/gateway.sh

cargo build --release --bin wsgate
WSGATE_MAX_MESSAGE_SIZE=16777216 WSGATE_ALLOW_ANONYMOUS=true WSGATE_COMPRESSION=on \
  WSGATE_MAX_HANDSHAKES_PER_IP=100000 \
  WSGATE_RATE_LIMIT_MESSAGES=1000000 WSGATE_RATE_LIMIT_BURST=1000000 \
  WSGATE_RATE_LIMIT_FRAMES=1000000 WSGATE_RATE_LIMIT_FRAME_BURST=1000000 \
  WSGATE_RATE_LIMIT_BYTES=1000000000000 WSGATE_LOG=warn \
  start_gateway
# With TLS=1 the same cases run over wss:// (the suite does not check the certificate).
scheme=ws
[ "${TLS:-0}" = 1 ] && scheme=wss
scripts/lib/autobahn-run.sh --implemented "$scheme://$GATEWAY_ADDR/echo" "wsgate-$scheme"
