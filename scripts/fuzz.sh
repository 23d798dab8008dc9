#!/usr/bin/env bash
# Runs every libFuzzer target (fuzz/) for a bounded time: FUZZ_SECONDS each (default 30).
# Installs cargo-fuzz when missing. The stable toolchain takes cargo-fuzz's sanitizer flags with
# RUSTC_BOOTSTRAP=1. Fails on the first crash; its input is left in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
  echo "fuzzing $target for ${seconds}s"
  # A corpus of its own per target, kept between runs on the same machine (gitignored).
  mkdir -p "corpus/$target"
  log=$(mktemp)
  if ! cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$seconds" \
    -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E "^(Done|stat::number_of_executed_units)" "$log" || true
  rm -f "$log"
done
