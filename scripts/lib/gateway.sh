# Sourced by the scripts that run a release gateway: `start_gateway [wsgate args...]` starts
# target/release/wsgate on 127.0.0.1:0 (environment WSGATE_* applies), waits until it listens,
# sets GATEWAY_ADDR (host:port) and GATEWAY_PID, and stops it when the script exits.
start_gateway() {
  GATEWAY_LOG=$(mktemp)
  "${GATEWAY_BIN:-target/release/wsgate}" --listen 127.0.0.1:0 "$@" >"$GATEWAY_LOG" 2>&1 &
  GATEWAY_PID=$!
  trap 'kill "$GATEWAY_PID" 2>/dev/null || true; rm -f "$GATEWAY_LOG"' EXIT
  for _ in $(seq 100); do
    grep -q "listening on" "$GATEWAY_LOG" && break
    kill -0 "$GATEWAY_PID" 2>/dev/null || break
    sleep 0.1
  done
  GATEWAY_ADDR=$(sed -n 's|.*listening on http://\([^/]*\)/.*|\1|p' "$GATEWAY_LOG")
  if [ -z "$GATEWAY_ADDR" ]; then
    echo "wsgate did not start:" >&2
    cat "$GATEWAY_LOG" >&2
    exit 1
  fi
}

# Set-up shared by the load scripts: a fresh HS256 secret (exported, so the gateway started next
# uses it), per-address limits lifted (one load generator is many clients behind few addresses),
# and TOKEN, a real token every simulated client presents. Run after the gateway binary is built.
prepare_load_test() {
  export WSGATE_JWT_SECRET="load-test-$(date +%s%N)"
  export WSGATE_MAX_CONNECTIONS_PER_IP=1000000 WSGATE_MAX_HANDSHAKES_PER_IP=1000000
  TOKEN=$("${GATEWAY_BIN:-target/release/wsgate}" token --user loadtest --ttl 1h)
}
