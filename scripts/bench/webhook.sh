#!/usr/bin/env bash
# The Telegram webhook's intake: wrk posts valid, distinct updates (a Lua script numbers them) to
# POST /telegram/webhook of one local `cybernetic serve`, with the secret-token header, and reports
# accepted updates per second and the acknowledgement latency. Two runs:
#   - intake only (`serve --no-workers`): what answering Telegram costs;
#   - with the in-process job pool running the commands at the same time (replies go to a small
#     local stand-in for the Bot API), as a single-process deployment runs.
# After each run the script checks that every acknowledged update became exactly one job.
#
#   scripts/bench/webhook.sh [--write]     --write records the results in docs/benchmarks.md
#
# Environment: BIN (a server binary instead of building target/release/cybernetic), DURATION
# (seconds per run, default 15), PG_SUPERUSER_URL, OWNER_PASSWORD,
# APP_PASSWORD (as for scripts/db-setup.sh). Needs wrk, curl, psql, python3.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
. scripts/bench/record.sh
write=0
[[ ${1:-} == --write ]] && write=1

die() { echo "bench: $*" >&2; exit 1; }
for tool in wrk curl psql python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

duration=${DURATION:-15}
db_name=cybernetic_webhookbench
superuser=${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}
migration_url="postgres://cybernetic_owner:${OWNER_PASSWORD:-owner}@127.0.0.1:5432/${db_name}?sslmode=disable"
database_url="postgres://cybernetic_app:${APP_PASSWORD:-app}@127.0.0.1:5432/${db_name}?sslmode=disable"
listen=127.0.0.1:18081
fake_port=18082
secret=bench_webhook_secret_0123456789
work=$(mktemp -d "${TMPDIR:-/tmp}/cybernetic-webhook.XXXXXX")
server_pid=""
fake_pid=""

stop() {
  local pid=$1
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$server_pid"
  stop "$fake_pid"
  psql "$superuser" -qX -c "drop database if exists $db_name with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if [[ -n ${BIN:-} ]]; then
  bin=$BIN
else
  cargo build --release --locked --bin cybernetic
  bin=target/release/cybernetic
fi

# A stand-in for the Bot API: every sendMessage succeeds.
cat >"$work/fake_bot.py" <<'PY'
import http.server, itertools, json, sys
ids = itertools.count(1)
class Bot(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"ok": True, "result": {"message_id": next(ids)}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Bot).serve_forever()
PY
python3 "$work/fake_bot.py" "$fake_port" &
fake_pid=$!

# Distinct update ids across wrk's threads: each thread counts from its own billion.
cat >"$work/updates.lua" <<EOF2
local threads = 0
function setup(thread)
  thread:set("base", threads * 1000000000)
  threads = threads + 1
end
function init(args)
  n = base
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Telegram-Bot-Api-Secret-Token"] = "$secret"
function request()
  n = n + 1
  local chat = 10000 + (n % 5000)
  local body = string.format('{"update_id":%d,"message":{"message_id":%d,"date":1700000000,'
    .. '"from":{"id":%d,"is_bot":false,"first_name":"Bench"},'
    .. '"chat":{"id":%d,"type":"private"},"text":"/help"}}', n, n, chat, chat)
  return wrk.format(nil, "/telegram/webhook", nil, body)
end
EOF2

fresh_database() {
  psql "$superuser" -qX -c "drop database if exists $db_name with (force)" >/dev/null
  DB_NAME=$db_name bash scripts/db-setup.sh >/dev/null
  env -i PATH="$PATH" MIGRATION_DATABASE_URL="$migration_url" "$bin" migrate >/dev/null
}

start_server() { # extra serve arguments...
  env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
    DATABASE_URL="$database_url" LISTEN_ADDR="$listen" DATABASE_MAX_CONNECTIONS=16 \
    TELEGRAM_BOT_TOKEN=bench:token TELEGRAM_WEBHOOK_SECRET="$secret" \
    TELEGRAM_API_BASE="http://127.0.0.1:$fake_port" TELEGRAM_GLOBAL_RATE=100000 \
    LOG_FORMAT=json RUST_LOG=warn \
    "$bin" serve "$@" 2>"$work/server.log" &
  server_pid=$!
  for _ in $(seq 1 150); do
    curl -fs -o /dev/null --max-time 1 "http://$listen/health/ready" && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  tail -n 20 "$work/server.log" >&2
  die "the server did not become ready"
}

results=$work/rows.md
run() { # label, connections, serve arguments...
  local label=$1 connections=$2
  shift 2
  fresh_database
  start_server "$@"
  wrk -t2 -c"$connections" -d2s -s "$work/updates.lua" "http://$listen" >/dev/null # warm-up
  psql "${superuser%/*}/$db_name" -qAtX -c "delete from jobs" >/dev/null
  echo "bench: $label, ${duration}s, $connections connections" >&2
  wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$work/updates.lua" "http://$listen" \
    >"$work/wrk.txt"
  stop "$server_pid"
  server_pid=""
  cat "$work/wrk.txt" >&2
  local requests rps p50 p90 p99 non2xx jobs
  requests=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$work/wrk.txt")
  rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$work/wrk.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.txt")
  p90=$(awk '$1 == "90%" {print $2}' "$work/wrk.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
  non2xx=$(sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$work/wrk.txt")
  jobs=$(psql "${superuser%/*}/$db_name" -qAtX -c \
    "select count(*) from jobs where kind = 'telegram_update'")
  # wrk counts requests it sent whose answer was still in flight at the end as not done; every
  # answered one must be a job, and no update may be a job twice (the key is unique).
  printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$label" "$connections" "$rps" "$p50" "$p90" "$p99" \
    "${non2xx:-0}" "$jobs / $requests" >>"$results"
}

: >"$results"
run "intake only (serve --no-workers)" 32 --no-workers
run "intake only (serve --no-workers)" 64 --no-workers
run "intake with the job pool running the commands" 32

section=$work/section.md
{
  echo "### Telegram webhook intake (\`scripts/bench/webhook.sh\`)"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores (wrk, the server and PostgreSQL share them), wrk -t2 -d${duration}s, one \`serve\` on the local PostgreSQL;"
  echo "each request a distinct valid update (\`/help\` from one of 5000 private chats). Target: >= 5k updates/s, p99 < 50 ms."
  echo
  echo "| run | connections | updates/s | p50 | p90 | p99 | non-2xx | jobs / requests |"
  echo "|---|---|---|---|---|---|---|---|"
  cat "$results"
  echo
  echo "Command: \`scripts/bench/webhook.sh --write\`"
} >"$section"
cat "$section"
((write)) && record_section webhook-bench "$section"
exit 0
