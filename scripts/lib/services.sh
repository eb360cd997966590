# Sourced by scripts/test.sh and scripts/local-stack.sh: installs (from Debian's packages or PyPI)
# and starts the services the platform talks to, each only when it does not answer already.
# Idempotent. Each function fails (exit 1) with a message when its service cannot be brought up.

log() { printf '\n==> %s\n' "$*" >&2; }

# tcp_up HOST PORT: something accepts connections there.
tcp_up() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for SECONDS COMMAND...: runs COMMAND every half second until it succeeds.
wait_for() {
  local tries=$(($1 * 2))
  shift
  for _ in $(seq 1 "$tries"); do
    "$@" && return 0
    sleep 0.5
  done
  "$@"
}

# ensure_pkgs CMD=PACKAGE...: installs the packages whose command is missing.
ensure_pkgs() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || need+=("${pair#*=}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# ensure_postgres SUPERUSER_URL
ensure_postgres() {
  psql "$1" -qAtX -c 'select 1' >/dev/null 2>&1 && return 0
  log "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  fi
  wait_for 30 psql "$1" -qAtX -c 'select 1' >/dev/null 2>&1 \
    || { echo "PostgreSQL does not answer at $1" >&2; exit 1; }
}

# ensure_rabbitmq: RabbitMQ on 127.0.0.1:5672 (guest/guest).
ensure_rabbitmq() {
  tcp_up 127.0.0.1 5672 && return 0
  ensure_pkgs rabbitmq-server=rabbitmq-server
  log "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for 60 tcp_up 127.0.0.1 5672 \
    || { echo "RabbitMQ did not start on 127.0.0.1:5672" >&2; exit 1; }
}

# ensure_redis: Redis (the stand-in for Valkey) on 127.0.0.1:6379.
ensure_redis() {
  tcp_up 127.0.0.1 6379 && return 0
  ensure_pkgs redis-server=redis-server
  log "starting Redis"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' >/dev/null
  wait_for 20 tcp_up 127.0.0.1 6379 \
    || { echo "Redis did not start on 127.0.0.1:6379" >&2; exit 1; }
}

# ensure_s3 ENDPOINT: an S3-compatible server (moto, from PyPI, in its own virtualenv at
# MOTO_HOME, default /opt/moto) answering at ENDPOINT (http://host:port).
ensure_s3() {
  local hostport host port moto_home
  hostport=${1#*://}
  hostport=${hostport%%/*}
  host=${hostport%:*}
  port=${hostport##*:}
  [ "$port" = "$hostport" ] && port=80
  tcp_up "$host" "$port" && return 0
  moto_home=${MOTO_HOME:-/opt/moto}
  if [ ! -x "$moto_home/bin/moto_server" ]; then
    log "installing moto (a local S3-compatible server)"
    if ! python3 -m venv "$moto_home" 2>/dev/null; then
      ensure_pkgs pip3=python3-pip
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      python3 -m venv "$moto_home"
    fi
    "$moto_home/bin/pip" install -q 'moto[server]'
  fi
  log "starting moto_server on $host:$port"
  nohup "$moto_home/bin/moto_server" -H "$host" -p "$port" >"${TMPDIR:-/tmp}/moto_server.log" 2>&1 &
  wait_for 60 tcp_up "$host" "$port" \
    || { echo "moto_server did not start on $host:$port" >&2; exit 1; }
}
