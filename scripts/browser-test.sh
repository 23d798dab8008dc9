#!/usr/bin/env bash
# End-to-end test of the test client page (GET /) in headless Chromium via playwright-core.
# Installs Debian's chromium and the npm package when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --silent)
source scripts/lib/target-dir.sh
cargo build --release --bin wsgate
GATEWAY_BIN="$TARGET_DIR/release/wsgate" node --test tests/browser/
