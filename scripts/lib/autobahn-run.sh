#!/usr/bin/env bash
# autobahn-run.sh - install (on demand) and run the Autobahn|Testsuite fuzzingclient (RFC 6455
# conformance) against a WebSocket server listening on loopback. The project's own copy, so the
# test command works from any fresh clone; scripts/autobahn.sh drives it against wsgate.
#
# Usage:
#   autobahn-run.sh [options] ws[s]://127.0.0.1:PORT[/path] AGENT
#   autobahn-run.sh --install-only
#
# Options:
#   --cases LIST      comma-separated case patterns to run (default: "*")
#   --exclude LIST    comma-separated case patterns to exclude (default: none)
#   --no-deflate      exclude 12.* and 13.* (permessage-deflate cases)
#   --outdir DIR      report directory; results go to DIR/servers/index.json
#                     (default: $AUTOBAHN_HOME/reports/AGENT)
#   --timeout SECS    hard limit for the whole wstest run (default: 1800)
#   --wait SECS       wait up to SECS for the server port to accept (default: 30)
#   --strict-close    also fail when a case's closing behaviour is FAILED or UNCLEAN
#   --implemented     also fail on UNIMPLEMENTED cases (permessage-deflate must be negotiated)
#   --install-only    only install (idempotent) and exit
#
# Environment:
#   AUTOBAHN_HOME     where the Python 2.7 virtualenv and reports live (default: ~/.cache/autobahn-testsuite)
#   PYTHON27          use this python2.7 (with headers) instead of Debian bullseye's
#
# What it installs (idempotently, apt-get + pip only):
#   * python2.7 + python2.7-dev from Debian 11 "bullseye" (added as an apt source with
#     pin priority 100, so nothing from bookworm is ever replaced), gcc, libc6-dev;
#     fallback if bullseye is not served: a pyenv 2.7 under ~/.pyenv/versions/2.7*
#   * a Python 2.7 virtualenv (virtualenv 16.7.12, fetched from PyPI with python3's pip,
#     bundles pip 20.3.4/setuptools 44.1.1 for py2) with autobahntestsuite 0.8.2 and
#     a fully pinned set of py2-compatible dependencies.
#
# Exit status: 0 = no case FAILED; 1 = some case FAILED (or, with --strict-close,
# closed FAILED/UNCLEAN), or cases are missing from the results (server died);
# 2 = usage / setup / connection error.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AB_HOME="${AUTOBAHN_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/autobahn-testsuite}"
VENV="$AB_HOME/venv2"

log() { printf '[autobahn] %s\n' "$*" >&2; }
die() { printf '[autobahn] ERROR: %s\n' "$*" >&2; exit 2; }

usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

# ---------------------------------------------------------------- install ----

# Fully pinned, known-good set (resolved by pip 20.3.4 on CPython 2.7.18, 2026).
REQUIREMENTS='autobahntestsuite==0.8.2
autobahn==0.10.9
txaio==2.1.0
Twisted==20.3.0
zope.interface==5.5.2
Automat==22.10.0
attrs==21.4.0
constantly==15.1.0
hyperlink==21.0.0
idna==2.10
incremental==22.10.0
PyHamcrest==1.10.1
six==1.17.0
typing==3.10.0.0
wsaccel==0.6.6
ujson==2.0.3
cryptography==3.3.2
cffi==1.15.1
pycparser==2.21
enum34==1.1.10
ipaddress==1.0.23
pyOpenSSL==21.0.0
service-identity==21.1.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
klein==20.6.0
Tubes==0.2.1
Werkzeug==1.0.1
Jinja2==2.11.3
MarkupSafe==1.1.1
unittest2==1.1.0
linecache2==1.0.0
traceback2==1.4.0'

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "need root (or sudo) for apt-get"
  SUDO="sudo"
fi

pkgs_installed() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
  done
}

# Debian mirror that this machine uses for bookworm (reuse it for bullseye).
debian_mirror() {
  local m=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    m=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ {
             if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s = substr($0, RSTART, RLENGTH);
               sub(/URIs:[ \t]*/, "", s); print s; exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { u=$i; s=$(i+1); break }
             if (s=="bookworm") { print u; exit } }' /etc/apt/sources.list || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

PY27="${PYTHON27:-}"

py27_usable() {  # $1 = interpreter; needs ssl and C headers (wsaccel, zope.interface build from source)
  [ -x "$1" ] && "$1" -c 'import ssl, zlib, sysconfig, os, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_config_var("INCLUDEPY") or "", "Python.h")) else 1)' >/dev/null 2>&1
}

install_python27() {
  if [ -n "$PY27" ]; then py27_usable "$PY27" || die "PYTHON27=$PY27 is not a usable python2.7 with headers"; return 0; fi
  if pkgs_installed python2.7 python2.7-dev gcc libc6-dev && py27_usable /usr/bin/python2.7; then
    PY27=/usr/bin/python2.7; return 0
  fi
  local src=/etc/apt/sources.list.d/autobahn-bullseye.sources
  local pin=/etc/apt/preferences.d/autobahn-bullseye
  if [ ! -f "$src" ]; then
    local mirror; mirror=$(debian_mirror)
    log "adding Debian bullseye source ($mirror) with pin priority 100 (for python2.7 only)"
    printf 'Types: deb\nURIs: %s\nSuites: bullseye\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" | $SUDO tee "$src" >/dev/null
  fi
  if [ ! -f "$pin" ]; then
    printf 'Package: *\nPin: release n=bullseye\nPin-Priority: 100\n' | $SUDO tee "$pin" >/dev/null
  fi
  log "apt-get update"
  $SUDO apt-get update -qq || log "apt-get update reported errors"
  log "apt-get install python2.7 python2.7-dev gcc libc6-dev"
  local aptlog; aptlog=$(mktemp)
  if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       python2.7 python2.7-dev gcc libc6-dev >"$aptlog" 2>&1 && py27_usable /usr/bin/python2.7; then
    rm -f "$aptlog"; PY27=/usr/bin/python2.7; return 0
  fi
  tail -n 5 "$aptlog" >&2; rm -f "$aptlog"
  # Fallback: a pyenv-built 2.7 (this machine image ships ~/.pyenv/versions/2.7.18).
  local c
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    if py27_usable "$c"; then
      log "bullseye python2.7 unavailable; using $c"; PY27="$c"; return 0
    fi
  done
  die "no python2.7 available (bullseye not served by this mirror and no pyenv 2.7); set PYTHON27=/path/to/python2.7"
}

STAMP="$VENV/.autobahn-requirements"
venv_ok() {
  [ -x "$VENV/bin/wstest" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQUIREMENTS" ] \
    && PYTHONWARNINGS=ignore "$VENV/bin/wstest" --autobahnversion >/dev/null 2>&1
}

install_venv() {
  if [ ! -x "$VENV/bin/pip" ] || ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    local py3=python3
    if ! "$py3" -m pip --version >/dev/null 2>&1; then
      if [ -x /usr/bin/python3 ] && /usr/bin/python3 -m pip --version >/dev/null 2>&1; then
        py3=/usr/bin/python3
      else
        log "installing python3-pip (needed only to download virtualenv for py2.7)"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
        py3=/usr/bin/python3
      fi
    fi
    local tmp; tmp=$(mktemp -d)
    log "downloading virtualenv 16.7.12 (last single-file virtualenv with py2.7 seed wheels)"
    "$py3" -m pip download -q --no-deps --only-binary=:all: --python-version 2.7 \
      -d "$tmp" virtualenv==16.7.12
    "$PY27" -m zipfile -e "$tmp"/virtualenv-16.7.12-py2.py3-none-any.whl "$tmp/ve"
    rm -rf "$VENV"
    log "creating Python 2.7 virtualenv at $VENV"
    "$PY27" "$tmp/ve/virtualenv.py" -q --no-download "$VENV" >/dev/null
    rm -rf "$tmp"
  fi
  log "pip install autobahntestsuite==0.8.2 and pinned deps into $VENV"
  local req; req=$(mktemp)
  printf '%s\n' "$REQUIREMENTS" >"$req"
  PYTHONWARNINGS=ignore "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check \
    --no-python-version-warning -r "$req"
  rm -f "$req"
  PYTHONWARNINGS=ignore "$VENV/bin/wstest" --autobahnversion >/dev/null 2>&1 || die "wstest does not start"
  printf '%s' "$REQUIREMENTS" >"$STAMP"
}

install_all() {
  venv_ok && return 0
  install_python27
  install_venv
  venv_ok || die "installation incomplete"
}

# -------------------------------------------------------------------- args ---

CASES="*"; EXCLUDE=""; OUTDIR=""; TIMEOUT=1800; WAIT=30; STRICT_CLOSE=0; INSTALL_ONLY=0
IMPLEMENTED=0
POS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) CASES="${2:?}"; shift 2 ;;
    --exclude) EXCLUDE="${EXCLUDE:+$EXCLUDE,}${2:?}"; shift 2 ;;
    --no-deflate) EXCLUDE="${EXCLUDE:+$EXCLUDE,}12.*,13.*"; shift ;;
    --outdir) OUTDIR="${2:?}"; shift 2 ;;
    --timeout) TIMEOUT="${2:?}"; shift 2 ;;
    --wait) WAIT="${2:?}"; shift 2 ;;
    --strict-close) STRICT_CLOSE=1; shift ;;
    --implemented) IMPLEMENTED=1; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; POS+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) POS+=("$1"); shift ;;
  esac
done

if [ "$INSTALL_ONLY" = 1 ]; then
  install_all
  log "installed: $(PYTHONWARNINGS=ignore "$VENV/bin/wstest" --autobahnversion 2>/dev/null | tr '\n' ' ')"
  exit 0
fi

[ ${#POS[@]} -eq 2 ] || { usage >&2; exit 2; }
URL="${POS[0]}"; AGENT="${POS[1]}"

# Loopback only.
if [[ "$URL" =~ ^wss?://(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost|\[::1\]):([0-9]+)(/.*)?$ ]]; then
  HOST="${BASH_REMATCH[1]}"; PORT="${BASH_REMATCH[2]}"
else
  die "URL must be ws[s]://127.x.x.x:PORT[/path], ws[s]://localhost:PORT or ws[s]://[::1]:PORT (loopback only)"
fi
HOST="${HOST#[}"; HOST="${HOST%]}"
[[ "$AGENT" =~ ^[A-Za-z0-9._-]+$ ]] || die "agent name must match [A-Za-z0-9._-]+"

install_all

OUTDIR="${OUTDIR:-$AB_HOME/reports/$AGENT}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
# Clear previous results of this report dir (only if it looks like a wstest output dir).
if [ -d "$OUTDIR/servers" ]; then
  if [ -f "$OUTDIR/servers/index.json" ] || [ -z "$(ls -A "$OUTDIR/servers")" ]; then
    rm -rf "$OUTDIR/servers"
  else
    die "$OUTDIR/servers exists and is not a wstest report dir; choose another --outdir"
  fi
fi

# Wait for the server to accept TCP connections.
deadline=$(( $(date +%s) + WAIT ))
until (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || die "nothing accepts connections on $HOST:$PORT"
  sleep 0.2
done

SPEC="$OUTDIR/fuzzingclient.json"
PYTHONWARNINGS=ignore "$VENV/bin/python" - "$SPEC" "$OUTDIR/servers" "$URL" "$AGENT" "$CASES" "$EXCLUDE" <<'EOF'
import json, sys
spec_path, outdir, url, agent, cases, exclude = sys.argv[1:7]
split = lambda s: [c.strip() for c in s.split(",") if c.strip()]
spec = {
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": split(cases),
    "exclude-cases": split(exclude),
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
EOF

LOG="$OUTDIR/wstest.log"
log "running wstest -m fuzzingclient against $URL (agent $AGENT); log: $LOG"
t0=$(date +%s.%N)
set +e
( cd "$OUTDIR" && PYTHONWARNINGS=ignore timeout --kill-after=10 "$TIMEOUT" \
    "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC" ) >"$LOG" 2>&1
rc=$?
set -e
t1=$(date +%s.%N)
WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then log "wstest hit the --timeout of ${TIMEOUT}s"
elif [ "$rc" -ne 0 ]; then log "wstest exited with status $rc"; fi

EXPECTED=$(sed -n 's/^Ok, will run \([0-9]*\) test cases.*/\1/p' "$LOG" | head -n1)
if grep -q '^Connection to .* failed' "$LOG"; then log "$(grep '^Connection to .* failed' "$LOG" | head -n1)"; fi

set +e
PYTHONWARNINGS=ignore "$VENV/bin/python" - "$OUTDIR/servers/index.json" "$AGENT" "${EXPECTED:-0}" \
  "$STRICT_CLOSE" "$WALL" "$OUTDIR" "$IMPLEMENTED" <<'EOF'
import json, sys
index_path, agent, expected, strict_close, wall, outdir, implemented = sys.argv[1:8]
expected, strict_close, implemented = int(expected), strict_close == "1", implemented == "1"
try:
    with open(index_path) as f:
        results = json.load(f).get(agent, {})
except (IOError, ValueError) as e:
    print("no results: %s" % e)
    sys.exit(2)
if not results:
    print("no results for agent %r (server unreachable or handshake failed); see %s/wstest.log" % (agent, outdir))
    sys.exit(2)

def key(c):
    return [int(x) for x in c.split(".")]

order = ["OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED"]
counts = dict((b, 0) for b in order)
close_counts = {}
for case, r in results.items():
    counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
    close_counts[r["behaviorClose"]] = close_counts.get(r["behaviorClose"], 0) + 1

print("Autobahn fuzzingclient results for %s: %d cases in %ss" % (agent, len(results), wall))
for b in order + sorted(set(counts) - set(order)):
    print("  %-14s %d" % (b, counts[b]))
print("  closing behaviour: " + ", ".join("%s=%d" % kv for kv in sorted(close_counts.items())))

passing = ("OK", "NON-STRICT", "INFORMATIONAL") + (() if implemented else ("UNIMPLEMENTED",))
bad = sorted((c for c, r in results.items() if r["behavior"] not in passing), key=key)
bad_close = sorted((c for c, r in results.items() if r["behaviorClose"] in ("FAILED", "UNCLEAN")), key=key)
status = 0
if bad:
    print("FAILED cases: " + " ".join("%s(%s)" % (c, results[c]["behavior"]) for c in bad))
    status = 1
if bad_close:
    print("cases with FAILED/UNCLEAN close: " + " ".join("%s(%s)" % (c, results[c]["behaviorClose"]) for c in bad_close))
    if strict_close:
        status = 1
if expected and len(results) < expected:
    print("MISSING: %d of %d cases have no result (server crashed or stopped accepting?)" % (expected - len(results), expected))
    status = 1
print("report: %s/servers/index.html" % outdir)
print("RESULT: %s" % ("PASS" if status == 0 else "FAIL"))
sys.exit(status)
EOF
status=$?
set -e
exit "$status"
