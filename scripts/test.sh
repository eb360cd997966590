#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run). On a fresh machine it installs and starts
# what the tests need, idempotently, then runs fmt, clippy (-D warnings), the whole test suite,
# and promtool against a running server.
#
#   TEST_PG_HOST      PostgreSQL host:port for the tests (default 127.0.0.1:5432)
#   PG_SUPERUSER_URL  superuser URL used to create roles and test databases
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

: "${TEST_PG_HOST:=127.0.0.1:5432}"
: "${PG_SUPERUSER_URL:=postgres://postgres@${TEST_PG_HOST}/postgres}"
export TEST_PG_HOST PG_SUPERUSER_URL

# --- packages ---------------------------------------------------------------------------------
need_pkgs=()
command -v promtool >/dev/null || need_pkgs+=(prometheus)
command -v psql >/dev/null || need_pkgs+=(postgresql-client)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# --- PostgreSQL -------------------------------------------------------------------------------
if ! psql "$PG_SUPERUSER_URL" -qAtX -c 'select 1' >/dev/null 2>&1; then
  log "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  fi
  for _ in $(seq 1 60); do
    psql "$PG_SUPERUSER_URL" -qAtX -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.5
  done
  psql "$PG_SUPERUSER_URL" -qAtX -c 'select 1' >/dev/null
fi

log "database roles"
bash scripts/db-setup.sh

drop_test_databases() {
  psql "$PG_SUPERUSER_URL" -qAtX -c \
    "select format('drop database if exists %I with (force);', datname) from pg_database
      where datname like 'cybernetic\_test\_%' or datname like 'cybernetic\_tpl\_%'" \
    | psql "$PG_SUPERUSER_URL" -qX >/dev/null
}
log "dropping databases left by earlier test runs"
drop_test_databases

# --- checks -----------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi

# --- promtool against the real binary -----------------------------------------------------------
log "promtool check metrics against a running server"
db=cybernetic_test_promtool
psql "$PG_SUPERUSER_URL" -qX -c "drop database if exists $db with (force)" -c "create database $db owner cybernetic_owner" >/dev/null
MIGRATION_DATABASE_URL="postgres://cybernetic_owner:owner@${TEST_PG_HOST}/$db" ./target/debug/cybernetic migrate
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DATABASE_URL="postgres://cybernetic_app:app@${TEST_PG_HOST}/$db" LISTEN_ADDR="127.0.0.1:$port" RUST_LOG=warn \
  ./target/debug/cybernetic serve &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null
curl -fsS -o /dev/null "http://127.0.0.1:$port/v1/systems" -w '' || true   # an error response, to label a 401
curl -fsS "http://127.0.0.1:$port/metrics" | promtool check metrics
kill -TERM $server
wait $server
trap - EXIT
echo "promtool: metrics ok"

drop_test_databases
log "all checks passed"
