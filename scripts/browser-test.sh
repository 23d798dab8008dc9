#!/usr/bin/env bash
# End-to-end test of the test client page (GET /) in headless Chromium via playwright-core, over
# http and over https with a CA made for the run that Chromium trusts through its own NSS
# database (in a scratch HOME), as a browser trusts a company CA: no certificate errors ignored.
# Installs Debian's chromium, certutil and the npm package when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/test-ca.sh

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v certutil >/dev/null || missing+=(libnss3-tools)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --silent)
source scripts/lib/target-dir.sh
cargo build --release --bin wsgate

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
make_test_ca "$scratch"
mkdir -p "$scratch/home/.pki/nssdb"
certutil -N -d "sql:$scratch/home/.pki/nssdb" --empty-password
certutil -A -d "sql:$scratch/home/.pki/nssdb" -t "C,," -n wsgate-test-ca -i "$scratch/ca.pem"

GATEWAY_BIN="$TARGET_DIR/release/wsgate" TLS_CERT_FILE="$scratch/cert.pem" \
  TLS_KEY_FILE="$scratch/key.pem" BROWSER_HOME="$scratch/home" node --test tests/browser/
