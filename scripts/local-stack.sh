#!/usr/bin/env bash
# The Compose topology without Docker: the same binary, the same database roles and the same
# HAProxy configuration (docker/haproxy/haproxy.cfg), as processes on this machine, with services
# from Debian's packages (installed when missing): PostgreSQL, Redis (for Valkey), RabbitMQ, an
# S3-compatible server (moto, from PyPI), HAProxy, two `cybernetic serve` replicas, one
# `cybernetic worker`, and Prometheus scraping all three.
#
#   scripts/local-stack.sh up        start what is not running; wait until HAProxy reports both
#                                    replicas healthy; print the URLs and the admin token
#   scripts/local-stack.sh down      stop the stack's own processes (the shared services stay)
#   scripts/local-stack.sh status    what runs, and HAProxy's view of the replicas
#   scripts/local-stack.sh restart-app N   start replica N (1 or 2) again after it was stopped
#
# Environment (defaults in brackets):
#   BIN                 the cybernetic binary [target/release/cybernetic, built when missing]
#   LOCAL_STACK_DIR     pids, logs, certificate, secrets, Prometheus data [.local-stack]
#   LOCAL_STACK_DB      the database [cybernetic_stack]
#   PG_SUPERUSER_URL    [postgres://postgres@127.0.0.1:5432/postgres]
#   OWNER_PASSWORD, APP_PASSWORD   the two roles' passwords [owner, app: development values]
#   HTTP_PORT, HTTPS_PORT, STATS_PORT   HAProxy [18080, 18443, 18404]
#   APP1_PORT, APP2_PORT, WORKER_PORT   the replicas and the worker [18181, 18182, 18191]
#   PROMETHEUS_PORT     [19090]
#   S3_ENDPOINT         [http://127.0.0.1:5000]
# Everything listens on 127.0.0.1 only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib/services.sh

dir=${LOCAL_STACK_DIR:-$root/.local-stack}
db=${LOCAL_STACK_DB:-cybernetic_stack}
superuser=${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}
http_port=${HTTP_PORT:-18080}
https_port=${HTTPS_PORT:-18443}
stats_port=${STATS_PORT:-18404}
app1_port=${APP1_PORT:-18181}
app2_port=${APP2_PORT:-18182}
worker_port=${WORKER_PORT:-18191}
prometheus_port=${PROMETHEUS_PORT:-19090}
s3_endpoint=${S3_ENDPOINT:-http://127.0.0.1:5000}
bucket=cybernetic-local
bin=${BIN:-$root/target/release/cybernetic}

die() { echo "local-stack: $*" >&2; exit 1; }

pid_of() { [[ -f $dir/$1.pid ]] && cat "$dir/$1.pid"; }
running() { local pid; pid=$(pid_of "$1") && kill -0 "$pid" 2>/dev/null; }

# start NAME COMMAND...: runs COMMAND in the background, logging to $dir/NAME.log.
start() {
  local name=$1
  shift
  running "$name" && return 0
  nohup "$@" >>"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

stop() { # NAME [SIGNAL]
  local pid
  pid=$(pid_of "$1") || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/$1.pid"
}

secret_file() { # NAME: a random secret kept in $dir/secrets/NAME
  local f=$dir/secrets/$1
  if [[ ! -s $f ]]; then
    mkdir -p "$dir/secrets"
    (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$f")
  fi
  echo "$f"
}

# The roles are the cluster's, shared with scripts/db-setup.sh and the tests: the same development
# passwords unless OWNER_PASSWORD / APP_PASSWORD say otherwise.
owner_pw=${OWNER_PASSWORD:-owner}
app_pw=${APP_PASSWORD:-app}

app_env() { # the environment every cybernetic process of the stack gets
  printf '%s\n' \
    "PATH=$PATH" \
    "DATABASE_URL=postgres://cybernetic_app:$app_pw@127.0.0.1:5432/$db" \
    "MIGRATION_DATABASE_URL=postgres://cybernetic_owner:$owner_pw@127.0.0.1:5432/$db" \
    "ADMIN_TOKEN_FILE=$(secret_file admin-token)" \
    "AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f" \
    "STORAGE_BACKEND=s3" "S3_ENDPOINT=$s3_endpoint" "S3_BUCKET=$bucket" \
    "S3_FORCE_PATH_STYLE=true" "S3_ACCESS_KEY_ID=local" "S3_SECRET_ACCESS_KEY=local-secret" \
    "SHUTDOWN_READINESS_DELAY=5s" "SHUTDOWN_TIMEOUT=20s" \
    "LOG_FORMAT=json" "RUST_LOG=${RUST_LOG:-info}"
}

run_cybernetic() { # NAME PORT ARGS...
  local name=$1 port=$2
  shift 2
  local env_args
  mapfile -t env_args < <(app_env)
  start "$name" env -i "${env_args[@]}" "LISTEN_ADDR=127.0.0.1:$port" "$bin" "$@"
}

haproxy_env() {
  printf '%s\n' \
    "HAPROXY_HTTP_BIND=127.0.0.1:$http_port" "HAPROXY_HTTPS_BIND=127.0.0.1:$https_port" \
    "HAPROXY_HTTPS_PORT=$https_port" "HAPROXY_CERT=$dir/cybernetic.pem" \
    "HAPROXY_STATS_BIND=127.0.0.1:$stats_port" \
    "LOCAL_APP1=127.0.0.1:$app1_port" "LOCAL_APP2=127.0.0.1:$app2_port"
}

# HAProxy's state of each app server: "app1 UP", "app2 DOWN", ...
backend_states() {
  curl -fsS --max-time 2 "http://127.0.0.1:$stats_port/stats;csv" 2>/dev/null \
    | awk -F, '$1 == "app" && $2 != "BACKEND" { print $2, $18 }'
}

both_up() { [[ $(backend_states | grep -c ' UP$') == 2 ]]; }

# free_or_ours NAME PORT...: the ports are free, unless NAME (one of ours) runs and holds them.
free_or_ours() {
  local name=$1 port
  shift
  running "$name" && return 0
  for port in "$@"; do
    if tcp_up 127.0.0.1 "$port"; then
      die "port $port is in use by another process; stop it or choose other ports (see the header)"
    fi
  done
}

up() {
  mkdir -p "$dir"
  free_or_ours app1 "$app1_port"
  free_or_ours app2 "$app2_port"
  free_or_ours worker "$worker_port"
  free_or_ours haproxy "$http_port" "$https_port" "$stats_port"
  free_or_ours prometheus "$prometheus_port"
  ensure_pkgs haproxy=haproxy prometheus=prometheus psql=postgresql-client openssl=openssl curl=curl
  ensure_postgres "$superuser"
  ensure_redis
  ensure_rabbitmq
  ensure_s3 "$s3_endpoint"
  if [[ ! -x $bin ]]; then
    log "building $bin"
    cargo build --release --locked --bin cybernetic
  fi

  # The database and its two roles, as docker/postgres creates them, with the stack's passwords.
  OWNER_PASSWORD=$owner_pw APP_PASSWORD=$app_pw DB_NAME=$db PG_SUPERUSER_URL=$superuser \
    bash scripts/db-setup.sh >/dev/null
  local env_args
  mapfile -t env_args < <(app_env)
  env -i "${env_args[@]}" "$bin" migrate >/dev/null
  # The bucket (moto accepts an unsigned create; an existing one answers 409).
  curl -s -o /dev/null -X PUT "$s3_endpoint/$bucket" || true

  run_cybernetic app1 "$app1_port" serve
  run_cybernetic app2 "$app2_port" serve
  run_cybernetic worker "$worker_port" worker

  bash scripts/gen-dev-cert.sh "$dir/cybernetic.pem"
  local haproxy_args
  mapfile -t haproxy_args < <(haproxy_env)
  env -i "PATH=$PATH" "${haproxy_args[@]}" haproxy -c -q -f docker/haproxy/haproxy.cfg \
    || die "haproxy -c refused docker/haproxy/haproxy.cfg"
  start haproxy env -i "PATH=$PATH" "${haproxy_args[@]}" haproxy -db -f docker/haproxy/haproxy.cfg

  mkdir -p "$dir/prometheus/targets" "$dir/prometheus/data"
  cp docker/prometheus/prometheus.local.yml "$dir/prometheus/prometheus.yml"
  printf '[{"targets": ["127.0.0.1:%s", "127.0.0.1:%s"]}]\n' "$app1_port" "$app2_port" \
    >"$dir/prometheus/targets/app.json"
  printf '[{"targets": ["127.0.0.1:%s"]}]\n' "$worker_port" >"$dir/prometheus/targets/worker.json"
  start prometheus prometheus --config.file="$dir/prometheus/prometheus.yml" \
    --storage.tsdb.path="$dir/prometheus/data" \
    --web.listen-address="127.0.0.1:$prometheus_port"

  log "waiting for HAProxy to report both replicas healthy"
  if ! wait_for 60 both_up; then
    backend_states >&2 || true
    for name in app1 app2 haproxy; do tail -n 5 "$dir/$name.log" >&2 || true; done
    die "the replicas did not become healthy behind HAProxy"
  fi
  cat <<EOT
The stack is up (logs in $dir):
  API            https://localhost:$https_port  (self-signed: curl -k, or trust $dir/cybernetic.pem)
  HAProxy stats  http://127.0.0.1:$stats_port/stats
  Prometheus     http://127.0.0.1:$prometheus_port
  replicas       127.0.0.1:$app1_port, 127.0.0.1:$app2_port; worker 127.0.0.1:$worker_port
  admin token    $(cat "$(secret_file admin-token)")
A first API key:
  curl -k -X POST https://localhost:$https_port/v1/tenants -H "Authorization: Bearer \$(cat $dir/secrets/admin-token)" \\
    -H 'Content-Type: application/json' -d '{"name": "Acme", "slug": "acme"}'
  then POST /v1/tenants/<id>/api-keys with {"name": "first", "role": "admin"} (see docs/api.md)
EOT
}

down() {
  for name in haproxy app1 app2 worker prometheus; do stop "$name"; done
  echo "local-stack: stopped (PostgreSQL, Redis, RabbitMQ and the S3 server keep running)"
}

status() {
  local name
  for name in app1 app2 worker haproxy prometheus; do
    if running "$name"; then echo "$name: running (pid $(pid_of "$name"))"; else echo "$name: stopped"; fi
  done
  backend_states | sed 's/^/haproxy backend: /' || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  restart-app)
    case ${2:-} in
      1) run_cybernetic app1 "$app1_port" serve ;;
      2) run_cybernetic app2 "$app2_port" serve ;;
      *) die "restart-app takes 1 or 2" ;;
    esac
    ;;
  *) sed -n '2,25s/^# \{0,1\}//p' "$0"; exit 2 ;;
esac
