#!/usr/bin/env bash
# The whole test suite, from a fresh machine: lints, unit and integration tests (real sockets,
# tokio-tungstenite as the independent client), benches compiled and run once, the test page in
# headless Chromium, the client SDK's tests on Node >= 22, the Autobahn RFC 6455 conformance
# suite against a release build, and every fuzz target for a bounded time. Needs: Rust >= 1.95,
# Node.js with npm, python3, and root (or sudo) for apt-get (redis-server, nginx, Chromium,
# Python 2.7 for Autobahn) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc (broken or private links in the docs are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib

step "redis-server and nginx (the cluster and proxy tests start their own)"
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The whole suite runs once per engine of the shards' loops: io_uring, then epoll (the fallback
# where a kernel or sandbox refuses io_uring). Every gateway a test starts takes WSGATE_ENGINE.
step "cargo test (unit, integration, benches in test mode), engine io_uring"
WSGATE_ENGINE=io_uring cargo test --workspace --all-targets

step "cargo test again, engine epoll"
WSGATE_ENGINE=epoll cargo test --workspace --all-targets

step "Test page in headless Chromium"
scripts/browser-test.sh

step "Client SDK (clients/js): tsc, its tests on Node >= 22 against the gateway, npm pack"
scripts/sdk-test.sh

step "/metrics read by the Prometheus client's OpenMetrics parser"
scripts/metrics-check.sh

step "Deploy files: hadolint, systemd-analyze, the binary run as the image runs it"
scripts/deploy-check.sh

step "Autobahn TestSuite against /echo (release build), over ws:// and wss:// (io_uring), ws:// (epoll)"
WSGATE_ENGINE=io_uring scripts/autobahn.sh
WSGATE_ENGINE=io_uring TLS=1 scripts/autobahn.sh
WSGATE_ENGINE=epoll scripts/autobahn.sh

step "Fuzz targets, ${FUZZ_SECONDS:-30}s each"
scripts/fuzz.sh
