# Sourced by the scripts that run release gateways: `start_gateway [wsgate args...]` starts
# $TARGET_DIR/release/wsgate (or $GATEWAY_BIN) on 127.0.0.1:0 (environment WSGATE_* applies), waits until it listens,
# sets GATEWAY_ADDR (host:port) and GATEWAY_PID, appends them to GATEWAY_ADDRS and GATEWAY_PIDS
# (call it again for more nodes), and stops every node it started when the script exits.
source "$(dirname "${BASH_SOURCE[0]}")/target-dir.sh"
source "$(dirname "${BASH_SOURCE[0]}")/test-ca.sh"
# With TLS=1 the gateways this script starts speak TLS, with a P-256 certificate for localhost
# (scripts/lib/test-ca.sh) signed by a CA made for the run (openssl), and LOADTEST_TLS holds the loadtest flag that
# trusts that CA (append "${LOADTEST_TLS[@]}" to loadtest's arguments).
LOADTEST_TLS=()
if [ "${TLS:-0}" = 1 ]; then
  tls_dir=$(mktemp -d)
  make_test_ca "$tls_dir"
  export WSGATE_TLS_CERT_FILE="$tls_dir/cert.pem" WSGATE_TLS_KEY_FILE="$tls_dir/key.pem"
  LOADTEST_TLS=(--tls-ca "$tls_dir/ca.pem")
fi
GATEWAY_PIDS=()
GATEWAY_ADDRS=()
GATEWAY_LOGS=()
REDIS_PIDS=()
trap 'kill "${GATEWAY_PIDS[@]}" "${REDIS_PIDS[@]}" ${BACKEND_PID:-} 2>/dev/null || true; rm -f "${GATEWAY_LOGS[@]}"; rm -rf "${tls_dir:-}"' EXIT

# `start_redis`: a redis-server on a free loopback port, without persistence, stopped when the
# script exits; sets REDIS_URL and REDIS_PID. Gateways started after `export WSGATE_BROKER=redis
# WSGATE_REDIS_URL=$REDIS_URL` form a cluster on it.
start_redis() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
  REDIS_PID=$!
  REDIS_PIDS+=("$REDIS_PID")
  REDIS_URL="redis://127.0.0.1:$port/"
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "redis-server did not start" >&2
  exit 1
}

# `wait_ready ADDR`: waits until the gateway at ADDR answers /readyz with 200 (a cluster node
# once it reached Redis).
wait_ready() {
  for _ in $(seq 200); do
    curl -fs "http://$1/readyz" >/dev/null && return
    sleep 0.05
  done
  echo "gateway $1 never got ready" >&2
  exit 1
}

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

start_gateway() {
  local log
  log=$(mktemp)
  GATEWAY_LOGS+=("$log")
  "${GATEWAY_BIN:-$TARGET_DIR/release/wsgate}" --listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
  GATEWAY_PID=$!
  GATEWAY_PIDS+=("$GATEWAY_PID")
  for _ in $(seq 100); do
    grep -q "listening on" "$log" && break
    kill -0 "$GATEWAY_PID" 2>/dev/null || break
    sleep 0.1
  done
  GATEWAY_ADDR=$(sed -n 's|.*listening on https\{0,1\}://\([^/]*\)/.*|\1|p' "$log")
  if [ -z "$GATEWAY_ADDR" ]; then
    echo "wsgate did not start:" >&2
    cat "$log" >&2
    exit 1
  fi
  GATEWAY_ADDRS+=("$GATEWAY_ADDR")
}

# examples/backend.py (the proxies' example backend) on a free port, pinned to CPU `$1`: sets
# BACKEND_PORT and BACKEND_PID; stop_example_backend ends it.
start_example_backend() {
  BACKEND_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  taskset -c "$1" python3 examples/backend.py "$BACKEND_PORT" 2>/dev/null &
  BACKEND_PID=$!
  for _ in $(seq 50); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $BACKEND_PORT))" 2>/dev/null && return
    sleep 0.1
  done
  echo "examples/backend.py did not start" >&2
  exit 1
}

stop_example_backend() {
  [ -n "${BACKEND_PID:-}" ] || return 0
  kill "$BACKEND_PID" 2>/dev/null || true
  wait "$BACKEND_PID" 2>/dev/null || true
  BACKEND_PID=
}

# Set-up shared by the load scripts: a fresh HS256 secret (exported, so the gateways started next
# use it), per-address limits lifted (one load generator is many clients behind few addresses),
# per-connection rates lifted (a benchmark client sends far more than a person), and TOKEN, a
# real token every simulated client presents. Run after the gateway binary is built.
prepare_load_test() {
  export WSGATE_JWT_SECRET="load-test-$(date +%s%N)"
  export WSGATE_MAX_CONNECTIONS_PER_IP=1000000 WSGATE_MAX_HANDSHAKES_PER_IP=1000000
  export WSGATE_RATE_LIMIT_MESSAGES=1000000 WSGATE_RATE_LIMIT_BURST=1000000
  export WSGATE_RATE_LIMIT_FRAMES=1000000 WSGATE_RATE_LIMIT_FRAME_BURST=1000000
  export WSGATE_RATE_LIMIT_BYTES=1000000000000 WSGATE_RATE_LIMIT_BURST_BYTES=1000000000000
  TOKEN=$("${GATEWAY_BIN:-$TARGET_DIR/release/wsgate}" token --user loadtest --ttl 1h)
}

# The server under test for the comparisons (echo, handshakes): `start_server SERVER` builds and
# starts one of wsgate (a token on every connection), wsgate-anonymous (no token, like the
# baselines) — either with `@ENGINE` to pick the shard's engine (wsgate-anonymous@epoll) —,
# baseline_fastwebsockets or baseline_tungstenite (examples/), or external — the
# program $EXTERNAL_SERVER (a peer built outside this repository, e.g. uWebSockets; it is run as
# `$EXTERNAL_SERVER --listen 127.0.0.1:0 $EXTERNAL_SERVER_ARGS`, echoes on every path and prints
# `listening on http://HOST:PORT/`) — with every thread pinned to CPU 0, and sets ECHO_PATH, the
# path of its echo endpoint (with the token, for wsgate).
start_server() {
  case "$1" in
    wsgate | wsgate-anonymous | wsgate@* | wsgate-anonymous@*)
      prepare_load_test
      [[ "$1" != *@* ]] || export WSGATE_ENGINE="${1#*@}"
      if [ "${1%@*}" = wsgate-anonymous ]; then
        export WSGATE_ALLOW_ANONYMOUS=true
        ECHO_PATH=/echo
      else
        ECHO_PATH="/echo?token=$TOKEN"
      fi
      WSGATE_LOG=warn start_gateway --shards 1
      ;;
    baseline_fastwebsockets | baseline_tungstenite)
      cargo build --release --example "$1"
      GATEWAY_BIN="$TARGET_DIR/release/examples/$1" start_gateway
      ECHO_PATH=/
      ;;
    external)
      # shellcheck disable=SC2086 # the arguments are words
      GATEWAY_BIN="${EXTERNAL_SERVER:?set EXTERNAL_SERVER to the peer server program}" \
        start_gateway ${EXTERNAL_SERVER_ARGS:-}
      ECHO_PATH=/
      ;;
    *)
      echo "unknown server $1 (wsgate, wsgate-anonymous, baseline_fastwebsockets, baseline_tungstenite, external)" >&2
      exit 2
      ;;
  esac
  taskset -apc 0 "$GATEWAY_PID" >/dev/null
}
