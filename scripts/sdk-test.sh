#!/usr/bin/env bash
# The TypeScript client SDK (clients/js): type-checked and built with tsc, its tests run by
# Node's test runner against the gateway's release binary (and a real redis-server for the
# cluster test) and against a scripted socket, on Node >= 22 — installed from the npm registry (the node-linux-* package) when
# the machine's Node is older — and `npm pack` checked to ship the built files and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/target-dir.sh
cargo build --release --bin wsgate

node_bin=node
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 22 ]; then
  arch=$(uname -m | sed 's/x86_64/x64/; s/aarch64/arm64/')
  npm install --no-save --no-audit --no-fund --silent --prefix "$TARGET_DIR/node22" "node-linux-$arch@22"
  node_bin="$TARGET_DIR/node22/node_modules/node-linux-$arch/bin/node"
fi
echo "SDK tests on Node $("$node_bin" --version)"

cd clients/js
npm ci --no-audit --no-fund --silent
npm run build --silent
# The gateway serves the SDK as one module (src/page/wsgate-client.js, built into the binary):
# it must be the bundle of these sources.
npm run bundle --silent
git diff --exit-code -- ../../src/page/wsgate-client.js || {
  echo "src/page/wsgate-client.js is not the bundle of clients/js: run npm run bundle there" >&2
  exit 1
}
GATEWAY_BIN="$TARGET_DIR/release/wsgate" "$node_bin" --test test/*.test.mjs

npm pack --dry-run --json --silent | "$node_bin" -e '
  const [pack] = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const files = pack.files.map((f) => f.path);
  const wanted = ["package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/client.js"];
  const missing = wanted.filter((f) => !files.includes(f));
  const stray = files.filter((f) => !/^(package\.json|README\.md|dist\/)/.test(f));
  if (missing.length || stray.length) {
    console.error("npm pack: missing", missing, "stray", stray);
    process.exit(1);
  }
  console.log(`npm pack: ${pack.filename}, ${files.length} files, ${pack.size} bytes`);
'
