#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run). On a fresh machine it installs and starts
# what the tests need, idempotently, then checks the deployment files, runs fmt, clippy
# (-D warnings), the whole test suite, promtool against a running server, a backup and restore
# round trip, and the end-to-end test through HAProxy on the local stack.
#
#   TEST_PG_HOST      PostgreSQL host:port for the tests (default 127.0.0.1:5432)
#   PG_SUPERUSER_URL  superuser URL used to create roles and test databases
#   TEST_S3_ENDPOINT  the S3-compatible server for the storage tests (default http://127.0.0.1:5000;
#                     moto_server is installed and started there when nothing answers)
set -euo pipefail
cd "$(dirname "$0")/.."


: "${TEST_PG_HOST:=127.0.0.1:5432}"
: "${PG_SUPERUSER_URL:=postgres://postgres@${TEST_PG_HOST}/postgres}"
export TEST_PG_HOST PG_SUPERUSER_URL

. scripts/lib/services.sh
ensure_pkgs promtool=prometheus psql=postgresql-client
ensure_postgres "$PG_SUPERUSER_URL"
ensure_rabbitmq                       # the event fan-out tests
: "${TEST_S3_ENDPOINT:=http://127.0.0.1:5000}"
export TEST_S3_ENDPOINT
ensure_s3 "$TEST_S3_ENDPOINT"         # the storage tests

log "database roles"
bash scripts/db-setup.sh

# Test databases are cybernetic_test_<uuid>, cloned from cybernetic_tpl_<migrations hash>. Only
# idle ones are swept, so a run never pulls a database from under another run on the cluster.
drop_idle_test_databases() {
  psql "$PG_SUPERUSER_URL" -qAtX -c \
    "select format('drop database if exists %I;', d.datname) from pg_database d
      where (d.datname like 'cybernetic\_test\_%' or d.datname like 'cybernetic\_tpl\_%')
        and not exists (select from pg_stat_activity a where a.datname = d.datname)" \
    | psql "$PG_SUPERUSER_URL" -qX >/dev/null 2>&1 || true
}
log "dropping idle databases left by earlier test runs"
drop_idle_test_databases

# --- checks -----------------------------------------------------------------------------------
log "deployment files: compose (base, dev, prod), HAProxy and Prometheus configs"
bash scripts/check-compose.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

log "tests"
# nextest runs every test in its own process: each gets its own metrics recorder and runtime.
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
cargo nextest run --locked --no-fail-fast

# --- promtool against the real binary -----------------------------------------------------------
log "promtool check metrics against a running server"
db="cybernetic_test_promtool_$$"
psql "$PG_SUPERUSER_URL" -qX -c "drop database if exists $db with (force)" -c "create database $db owner cybernetic_owner" >/dev/null
MIGRATION_DATABASE_URL="postgres://cybernetic_owner:${OWNER_PASSWORD:-owner}@${TEST_PG_HOST}/$db" ./target/debug/cybernetic migrate
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DATABASE_URL="postgres://cybernetic_app:${APP_PASSWORD:-app}@${TEST_PG_HOST}/$db" LISTEN_ADDR="127.0.0.1:$port" RUST_LOG=warn \
  ./target/debug/cybernetic serve &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null
curl -sS -o /dev/null "http://127.0.0.1:$port/v1/systems"   # a 401, so error labels appear too
curl -fsS "http://127.0.0.1:$port/metrics" | promtool check metrics
kill -TERM $server
wait $server
trap - EXIT
echo "promtool: metrics ok"
psql "$PG_SUPERUSER_URL" -qX -c "drop database if exists $db" >/dev/null

log "backup and restore (scripts/backup.sh, scripts/restore.sh)"
bash scripts/test-backup.sh

log "end to end through HAProxy on the local stack (scripts/test-e2e.sh)"
bash scripts/test-e2e.sh

drop_idle_test_databases
log "all checks passed"
