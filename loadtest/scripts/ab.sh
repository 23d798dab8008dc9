#!/usr/bin/env bash
# A/B of two gateway binaries on echo and fan-out, runs alternated (A, B, A, B, ...) so drift on
# the machine hits both alike; prints each run's throughput per gateway CPU-second and the
# medians. Build the baseline from another commit first, e.g.:
#   git worktree add /tmp/base COMMIT && (cd /tmp/base && cargo build --release --bin wsgate)
#
# Usage: loadtest/scripts/ab.sh BINARY_A BINARY_B [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/../.."
a="$1"
b="$2"
rounds="${3:-3}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  for side in a b; do
    bin=$a
    [ "$side" = b ] && bin=$b
    GATEWAY_BIN="$bin" JSON="$out/echo-$side-$round.json" loadtest/scripts/echo.sh 100 20 10s >/dev/null 2>&1
    GATEWAY_BIN="$bin" JSON="$out/fanout-$side-$round.json" loadtest/scripts/fanout.sh 1000 10 10 100 10s >/dev/null 2>&1
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def per_cpu_second(kind, side):
    runs = [json.load(open(f"{out}/{kind}-{side}-{r}.json")) for r in range(1, rounds + 1)]
    if kind == "echo":
        return [run["messages_per_gateway_cpu_second"] for run in runs]
    return [run["received"] / run["measured"]["run"]["gateway_cpu_seconds"] for run in runs]
for kind, what in [("echo", "echo messages"), ("fanout", "fan-out deliveries")]:
    a, b = per_cpu_second(kind, "a"), per_cpu_second(kind, "b")
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{what} per gateway CPU-second: A {[round(x) for x in a]} median {ma:.0f}; "
          f"B {[round(x) for x in b]} median {mb:.0f}; B/A {mb / ma:.3f}")
PY
