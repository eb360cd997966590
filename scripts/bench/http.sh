#!/usr/bin/env bash
# HTTP throughput benchmark: GET /health and GET /v1/systems against one local `cybernetic serve`.
#
#   scripts/bench/http.sh [--write]
#
# Builds the release binary (unless BIN names one), creates a throw-away database
# (cybernetic_bench) with scripts/db-setup.sh, migrates it, starts the server on 127.0.0.1:18080,
# seeds one tenant with an admin key and a state for each of the five systems, then runs wrk
# against each scenario and measures the server's CPU time. Prints a markdown table; with
# --write it also replaces the http-bench section of docs/benchmarks.md.
#
# Environment:
#   BIN               server binary to use instead of building target/release/cybernetic
#   DURATION          seconds per measured wrk run (default 15)
#   WARMUP            seconds of unmeasured load before each run (default 2; 0 skips it)
#   PG_SUPERUSER_URL  superuser connection (default postgres://postgres@127.0.0.1:5432/postgres)
#   OWNER_PASSWORD, APP_PASSWORD  role passwords, as for scripts/db-setup.sh (default owner, app)
#
# Needs: wrk, curl, psql. The bench database is dropped on exit, also after a failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

usage() {
  sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

write=0
for arg in "$@"; do
  case "$arg" in
    --write) write=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

die() {
  echo "bench: $*" >&2
  exit 1
}

for tool in wrk curl psql; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    case "$tool" in
      wrk) die "wrk is not installed (apt-get install wrk)" ;;
      psql) die "psql is not installed (apt-get install postgresql-client)" ;;
      *) die "$tool is not installed (apt-get install $tool)" ;;
    esac
  fi
done

duration=${DURATION:-15}
warmup=${WARMUP:-2}
[[ $duration =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a whole number of seconds, got '$duration'"
[[ $warmup =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds, got '$warmup'"

db_name=cybernetic_bench
pg_superuser_url=${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}
owner_password=${OWNER_PASSWORD:-owner}
app_password=${APP_PASSWORD:-app}
migration_url="postgres://cybernetic_owner:${owner_password}@127.0.0.1:5432/${db_name}?sslmode=disable"
database_url="postgres://cybernetic_app:${app_password}@127.0.0.1:5432/${db_name}?sslmode=disable"
listen=127.0.0.1:18080
base="http://${listen}"
connections=64
threads=2
clk_tck=$(getconf CLK_TCK)

workdir=$(mktemp -d "${TMPDIR:-/tmp}/cybernetic-bench.XXXXXX")
server_pid=""
db_created=0

stop_server() {
  [[ -n $server_pid ]] || return 0
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$server_pid" 2>/dev/null && ((waited < 100)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "bench: server did not stop within 10 s; killing it" >&2
      kill -KILL "$server_pid" 2>/dev/null || true
    fi
  fi
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

drop_database() {
  psql "$pg_superuser_url" -qX -v ON_ERROR_STOP=1 -c 'set client_min_messages = warning' \
    -c "drop database if exists ${db_name} with (force)" >/dev/null
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_server
  if ((db_created)); then
    drop_database || echo "bench: could not drop database ${db_name}" >&2
  fi
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- binary -------------------------------------------------------------------------------------

if [[ -n ${BIN:-} ]]; then
  bin=$BIN
  build="BIN=$BIN"
else
  echo "bench: cargo build --release" >&2
  cargo build --release
  bin="${CARGO_TARGET_DIR:-$root/target}/release/cybernetic"
  build="release (cargo build --release)"
fi
[[ -x $bin ]] || die "no executable at $bin"

# Only what the benchmark sets: an inherited *_FILE or replica URL would change what is measured.
run_cybernetic() {
  env -i PATH="$PATH" HOME="${HOME:-/tmp}" "$@"
}

# --- database -----------------------------------------------------------------------------------

echo "bench: creating database ${db_name}" >&2
drop_database
db_created=1
DB_NAME=$db_name PG_SUPERUSER_URL=$pg_superuser_url \
  OWNER_PASSWORD=$owner_password APP_PASSWORD=$app_password \
  "$root/scripts/db-setup.sh"
run_cybernetic MIGRATION_DATABASE_URL="$migration_url" LOG_FORMAT=json RUST_LOG=warn \
  "$bin" migrate >/dev/null || die "cybernetic migrate failed"

# --- server -------------------------------------------------------------------------------------

admin_token=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
((${#admin_token} == 40)) || die "could not generate an admin token"

if curl -s -o /dev/null --max-time 1 "$base/health"; then
  die "something already answers on $listen; stop it first"
fi

server_log="$workdir/server.log"
# Not through run_cybernetic: a function would run in a subshell, and $! must be the server itself
# (env execs it) for the kill and the CPU accounting.
env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
  DATABASE_URL="$database_url" \
  LISTEN_ADDR="$listen" \
  ADMIN_TOKEN="$admin_token" \
  DATABASE_MAX_CONNECTIONS=8 \
  LOG_FORMAT=json \
  RUST_LOG=warn \
  "$bin" serve 2>"$server_log" &
server_pid=$!

deadline=$((SECONDS + 30))
until curl -fs -o /dev/null --max-time 2 "$base/health/ready"; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    tail -n 20 "$server_log" >&2 || true
    die "the server exited before it became ready"
  fi
  if ((SECONDS >= deadline)); then
    tail -n 20 "$server_log" >&2 || true
    die "the server was not ready within 30 s"
  fi
  sleep 0.2
done

# --- seed data ----------------------------------------------------------------------------------

# api METHOD PATH TOKEN [JSON]: prints the response body; fails on any status but 2xx.
api() {
  local method=$1 path=$2 token=$3 body=${4:-}
  local out="$workdir/response" status
  local args=(-sS -o "$out" -w '%{http_code}' -X "$method" -H "Authorization: Bearer $token")
  if [[ -n $body ]]; then
    args+=(-H 'Content-Type: application/json' --data "$body")
  fi
  status=$(curl "${args[@]}" "$base$path") || die "$method $path: request failed"
  if [[ $status != 2?? ]]; then
    die "$method $path answered $status: $(head -c 500 "$out")"
  fi
  cat "$out"
}

# json_string FIELD: the first string value of FIELD in a flat JSON object on stdin.
json_string() {
  sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" | head -n 1
}

slug="bench-$(date +%s)-$$"
tenant_id=$(api POST /v1/tenants "$admin_token" \
  "{\"name\":\"Benchmark $slug\",\"slug\":\"$slug\"}" | json_string id)
[[ -n $tenant_id ]] || die "no tenant id in the response"
api_key=$(api POST "/v1/tenants/$tenant_id/api-keys" "$admin_token" \
  '{"name":"bench","role":"admin"}' | json_string key)
[[ $api_key == cyb_* ]] || die "no API key in the response"
for system in 1 2 3 4 5; do
  api PUT "/v1/systems/$system/state" "$api_key" \
    "{\"state\":{\"status\":\"ok\",\"load\":0.$system,\"units\":[1,2,3],\"note\":\"bench\"}}" \
    >/dev/null
done

# --- measurement --------------------------------------------------------------------------------

# CPU ticks (user + system) of the server so far. Field 2 of /proc/PID/stat may contain spaces,
# so split after its closing parenthesis; utime and stime are fields 14 and 15.
server_ticks() {
  local stat rest
  stat=$(<"/proc/$server_pid/stat")
  rest=${stat##*) }
  local -a f
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}

# to_ms VALUE: wrk's latency (e.g. 812.00us, 1.20ms, 2.01s) in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n = n / 1000
    else if (v ~ /ms$/) n = n
    else if (v ~ /m$/) n = n * 60000
    else if (v ~ /s$/) n = n * 1000
    printf "%.2f", n
  }'
}

rows=()
failed=0

# scenario NAME PATH MIN_RPS MAX_P99_MS TARGET_LABEL [wrk header args...]
scenario() {
  local name=$1 path=$2 min_rps=$3 max_p99=$4 target=$5
  shift 5
  local out="$workdir/wrk.txt"
  if ((warmup > 0)); then
    wrk -t"$threads" -c"$connections" -d"${warmup}s" "$@" "$base$path" >/dev/null
  fi
  echo "bench: $name for ${duration}s" >&2
  local before after
  before=$(server_ticks)
  wrk -t"$threads" -c"$connections" -d"${duration}s" --latency "$@" "$base$path" >"$out"
  after=$(server_ticks)
  kill -0 "$server_pid" 2>/dev/null || die "the server died during $name"

  local rps p50 p99 non2xx socket_errors cpu
  rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
  p50=$(awk '$1 == "50%" {print $2}' "$out")
  p99=$(awk '$1 == "99%" {print $2}' "$out")
  [[ -n $rps && -n $p50 && -n $p99 ]] || {
    cat "$out" >&2
    die "could not read wrk's output for $name"
  }
  p50=$(to_ms "$p50")
  p99=$(to_ms "$p99")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
  socket_errors=$(awk '/Socket errors:/ {sub(/.*Socket errors: */, ""); print}' "$out")
  cpu=$(awk -v t=$((after - before)) -v hz="$clk_tck" 'BEGIN {printf "%.1f", t / hz}')

  local met=yes
  if ! awk -v r="$rps" -v p="$p99" -v mr="$min_rps" -v mp="$max_p99" \
    'BEGIN {exit !(r >= mr && p < mp)}'; then
    met=no
  fi
  if [[ -n $non2xx ]]; then
    met="no ($non2xx non-2xx answers)"
    failed=1
  fi
  if [[ -n $socket_errors ]]; then
    echo "bench: $name: wrk socket errors: $socket_errors" >&2
  fi
  rows+=("| \`$name\` | $rps | $p50 ms | $p99 ms | $cpu | $target | $met |")
}

scenario "GET /health" /health 50000 5 "≥ 50k rps, p99 < 5 ms"
scenario "GET /v1/systems" /v1/systems 5000 20 "≥ 5k rps, p99 < 20 ms" \
  -H "Authorization: Bearer $api_key"

stop_server

# --- report -------------------------------------------------------------------------------------

table() {
  echo "| scenario | rps | p50 | p99 | server CPU s | target | met |"
  echo "|---|---:|---:|---:|---:|---|---|"
  printf '%s\n' "${rows[@]}"
}

echo
table

if ((write)); then
  command_line="DURATION=$duration"
  [[ -n ${BIN:-} ]] && command_line+=" BIN=$BIN"
  ((warmup != 2)) && command_line+=" WARMUP=$warmup"
  command_line+=" scripts/bench/http.sh --write"
  model=$(LC_ALL=C lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
  memory=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
  commit=$(git -C "$root" describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)

  section="$workdir/section.md"
  {
    echo "## HTTP API"
    echo
    echo "- command: \`$command_line\`"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $(nproc) CPUs, ${model:-unknown CPU}, $memory memory"
    echo "- commit: \`$commit\`"
    echo "- binary: $build"
    echo "- load: wrk -t$threads -c$connections -d${duration}s --latency (after ${warmup}s warm-up)," \
      "on the same machine as the server and PostgreSQL"
    echo "- server: LOG_FORMAT=json RUST_LOG=warn DATABASE_MAX_CONNECTIONS=8, PostgreSQL 15 over loopback" \
      "without TLS (sslmode=disable); one tenant, one state per system"
    echo
    table
  } >"$section"

  file="$root/docs/benchmarks.md"
  start='<!-- http-bench:start -->'
  end='<!-- http-bench:end -->'
  mkdir -p "$(dirname "$file")"
  if [[ ! -f $file ]]; then
    printf '# Benchmarks\n\n%s\n%s\n' "$start" "$end" >"$file"
  elif ! grep -qxF "$start" "$file" || ! grep -qxF "$end" "$file"; then
    printf '\n%s\n%s\n' "$start" "$end" >>"$file"
  fi
  awk -v start="$start" -v end="$end" -v section="$section" '
    $0 == start { print; while ((getline line < section) > 0) print line; skipping = 1; next }
    $0 == end { skipping = 0 }
    !skipping { print }
  ' "$file" >"$workdir/benchmarks.md"
  mv "$workdir/benchmarks.md" "$file"
  echo "bench: wrote $file" >&2
fi

if ((failed)); then
  die "some requests failed; the numbers above are not valid"
fi
