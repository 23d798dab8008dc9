#!/usr/bin/env bash
# Redis CPU per call of wsgate's publish and presence scripts, this tree's against another
# revision's (default: the one before Redis generations), alternated: `INFO commandstats`'s
# usec_per_call of EVALSHA over N calls of `redis-benchmark -c 10` on one room's keys.
# Usage: loadtest/scripts/redis-script-cost.sh [BASE_REV] [CALLS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:-c40ac9f}
calls=${2:-50000}
rounds=${3:-3}
port=$((20000 + RANDOM % 10000))
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
cli() { redis-cli -p "$port" "$@"; }
until cli ping >/dev/null 2>&1; do sleep 0.05; done
load() { cli script load "$(cat "$1"; echo; cat "$2")"; }
lua=src/broker/lua
git show "$base:$lua/lib.lua" >"$dir/old-lib.lua"
git show "$base:$lua/publish.lua" >"$dir/old-publish.lua"
git show "$base:$lua/presence.lua" >"$dir/old-presence.lua"
old_publish=$(load "$dir/old-lib.lua" "$dir/old-publish.lua")
old_presence=$(load "$dir/old-lib.lua" "$dir/old-presence.lua")
new_publish=$(load $lua/lib.lua $lua/publish.lua)
new_presence=$(load $lua/lib.lua $lua/presence.lua)
cli hset wsgate:era gen 1-bench clock 0 >/dev/null
cli hset wsgate:nodes n1 99999999999999 >/dev/null
msg='{"type":"chat_message","room":"r","userId":"u","username":"u","message":"hello there","timestamp":1}'
entry='{"user":"u","name":"u","conns":1}'
cost() { # label, then the EVALSHA arguments
  local label=$1; shift
  cli config resetstat >/dev/null
  redis-benchmark -p "$port" -q -n "$calls" -c 10 EVALSHA "$@" >/dev/null
  printf '%s %s\n' "$label" "$(cli info commandstats | tr -d '\r' |
    sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')"
}
for _ in $(seq "$rounds"); do
  cost publish-old "$old_publish" 2 'wsgate:meta:{r}' 'wsgate:history:{r}' "$msg" 100 300 86400 'wsgate:room:{r}' e1
  cost publish-new "$new_publish" 4 'wsgate:1-bench:meta:{r}' 'wsgate:1-bench:history:{r}' wsgate:era \
    'wsgate:1-bench:members:{r}' "$msg" 100 300 86400 'wsgate:room:{r}' e1 1-bench 0
  cost presence-old "$old_presence" 3 'wsgate:presence:{r}' 'wsgate:members:{r}' wsgate:rooms \
    n1 u "$entry" 1 7 'wsgate:room:{r}' 86400 r
  cost presence-new "$new_presence" 6 'wsgate:1-bench:presence:{r}' 'wsgate:1-bench:members:{r}' \
    wsgate:1-bench:rooms wsgate:era 'wsgate:1-bench:meta:{r}' 'wsgate:1-bench:node-rooms:n1' \
    n1 u "$entry" 1 7 'wsgate:room:{r}' 86400 r 1-bench 300 0
done
