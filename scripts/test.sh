#!/usr/bin/env bash
# The one test command (CI runs it through .ci/run). On a fresh machine it installs and starts
# what the tests need, idempotently, then runs fmt, clippy (-D warnings), the whole test suite,
# and promtool against a running server.
#
#   TEST_PG_HOST      PostgreSQL host:port for the tests (default 127.0.0.1:5432)
#   PG_SUPERUSER_URL  superuser URL used to create roles and test databases
#   TEST_S3_ENDPOINT  the S3-compatible server for the storage tests (default http://127.0.0.1:5000;
#                     moto_server is installed and started there when nothing answers)
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

# --- RabbitMQ (the event fan-out tests) --------------------------------------------------------
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing rabbitmq-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
  fi
  log "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    amqp_up && break
    sleep 0.5
  done
  amqp_up || { echo "RabbitMQ did not start on 127.0.0.1:5672" >&2; exit 1; }
fi

# --- S3-compatible server (the storage tests): moto, from PyPI, in its own virtualenv -----------
: "${TEST_S3_ENDPOINT:=http://127.0.0.1:5000}"
export TEST_S3_ENDPOINT
s3_hostport=${TEST_S3_ENDPOINT#*://}
s3_hostport=${s3_hostport%%/*}
s3_host=${s3_hostport%:*}
s3_port=${s3_hostport##*:}
[ "$s3_port" = "$s3_hostport" ] && s3_port=80
s3_up() { (exec 3<>"/dev/tcp/$s3_host/$s3_port") 2>/dev/null; }
if ! s3_up; then
  moto_home=${MOTO_HOME:-/opt/moto}
  if [ ! -x "$moto_home/bin/moto_server" ]; then
    log "installing moto (a local S3-compatible server)"
    if ! python3 -m venv "$moto_home" 2>/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends python3-venv python3-pip >/dev/null
      python3 -m venv "$moto_home"
    fi
    "$moto_home/bin/pip" install -q 'moto[server]'
  fi
  log "starting moto_server on port $s3_port"
  nohup "$moto_home/bin/moto_server" -H "$s3_host" -p "$s3_port" >"${TMPDIR:-/tmp}/moto_server.log" 2>&1 &
  for _ in $(seq 1 120); do
    s3_up && break
    sleep 0.5
  done
  s3_up || { echo "moto_server did not start on port $s3_port" >&2; exit 1; }
fi

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

drop_idle_test_databases
log "all checks passed"
