#!/usr/bin/env bash
# SSE benchmark: Cybernetic and Nchan side by side, same scenarios, same run, same machine.
#
#   scripts/bench/sse.sh [--write]
#
# Scenarios (N connections, default 10000):
#   idle       N idle streams: server memory per connection
#   topics-10k N streams over 100 topics, 100 events/s  (~10k deliveries/s)
#   topics-50k N streams over 100 topics, 500 events/s  (~50k deliveries/s)
#   broadcast  N streams on one topic, 10 events/s      (~100k deliveries/s)
#   storm      N clients connect at once with a Last-Event-ID 20 events back
# Each scenario is one run of our load generator (scripts/bench/sse_load.rs): raw-TCP SSE clients
# spread over 127.0.0.1-4, each event carrying its publish time, so every delivery is timed.
# "publish ack" is how long a publish took to be answered: for Cybernetic, the event committed to
# the log (a durable PostgreSQL commit); for Nchan, the message stored in its memory (nginx
# answers once it has also written most of the deliveries: its ack comes after them).
#
# Before the scenarios, pgbench times PostgreSQL alone at topics-10k's publish pace (100/s): a
# round trip, a one-row insert with and without a durable commit, and `append_events`, the
# statement behind every publish: the floor under our publish latency on this machine.
# Environment: CONNECTIONS (10000), DURATION seconds per load scenario (20), FLOOR_SECONDS (15),
#   NCHAN_CONF (default ../shared/peers/nchan/nginx.conf beside the repository),
#   SCENARIOS and TARGETS (space-separated subsets, for a quick look at one scenario).
# Needs: nginx-light + libnginx-mod-nchan (installed if missing), PostgreSQL as for the tests, and
# pgbench (Debian postgresql-client).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
. scripts/bench/record.sh
write=0
[[ ${1:-} == --write ]] && write=1

connections=${CONNECTIONS:-10000}
duration=${DURATION:-20}
nchan_conf=${NCHAN_CONF:-$root/../shared/peers/nchan/nginx.conf}
# Published results come from the full run; these narrow a run while working on one scenario.
scenarios=${SCENARIOS:-idle topics-10k topics-50k broadcast storm}
targets=${TARGETS:-cybernetic nchan}
if ((write)) && [[ -n ${SCENARIOS:-}${TARGETS:-} ]]; then
  echo "bench: --write records the full run; unset SCENARIOS and TARGETS" >&2; exit 1
fi
ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) > connections + 1000 )) || { echo "bench: ulimit -n $(ulimit -n) is too low for $connections connections" >&2; exit 1; }

if [[ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]]; then
  echo "bench: installing nginx-light and libnginx-mod-nchan" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-nchan >/dev/null
fi
command -v pgbench >/dev/null || { echo "bench: pgbench not found (Debian: apt-get install postgresql-client)" >&2; exit 1; }
[[ -f $nchan_conf ]] || { echo "bench: no Nchan configuration at $nchan_conf (set NCHAN_CONF)" >&2; exit 1; }

cargo build --release --locked --bin cybernetic --example sse-load
bin=target/release/cybernetic
load=target/release/examples/sse-load

work=$(mktemp -d "${TMPDIR:-/tmp}/cybernetic-sse.XXXXXX")
server=""
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null || true
  [[ -f $work/nchan/logs/nginx.pid ]] && nginx -p "$work/nchan" -c nginx.conf -s quit 2>/dev/null || true
  psql "${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}" -qX -c "drop database if exists cybernetic_ssebench with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- Cybernetic ---------------------------------------------------------------------------------
# A fresh database each run (one left by an interrupted run already holds the bench tenant).
psql "${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}" -qX -c "drop database if exists cybernetic_ssebench with (force)" >/dev/null
DB_NAME=cybernetic_ssebench bash scripts/db-setup.sh
MIGRATION_DATABASE_URL="postgres://cybernetic_owner:${OWNER_PASSWORD:-owner}@127.0.0.1:5432/cybernetic_ssebench?sslmode=disable" "$bin" migrate >/dev/null
admin=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
DATABASE_URL="postgres://cybernetic_app:${APP_PASSWORD:-app}@127.0.0.1:5432/cybernetic_ssebench?sslmode=disable" \
  ADMIN_TOKEN=$admin LISTEN_ADDR=127.0.0.1:18081 RUST_LOG=warn LOG_FORMAT=json DATABASE_MAX_CONNECTIONS=8 \
  "$bin" serve >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:18081/health/ready >/dev/null && break; sleep 0.1; done
tenant=$(curl -fs -X POST http://127.0.0.1:18081/v1/tenants -H "authorization: Bearer $admin" \
  -H 'content-type: application/json' -d '{"name": "Bench", "slug": "bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
token=$(curl -fs -X POST "http://127.0.0.1:18081/v1/tenants/$tenant/api-keys" -H "authorization: Bearer $admin" \
  -H 'content-type: application/json' -d '{"name": "bench", "role": "operator"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

# --- PostgreSQL alone at topics-10k's publish pace ----------------------------------------------
# What a publish's commit costs on this machine before any HTTP or fan-out: pgbench, one client,
# 100 transactions/s (topics-10k's publish rate), each timed without pgbench's own schedule lag.
floor_s=${FLOOR_SECONDS:-15}
super_url="${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
bench_super_url="${super_url%/*}/cybernetic_ssebench"
app_url="postgres://cybernetic_app:${APP_PASSWORD:-app}@127.0.0.1:5432/cybernetic_ssebench?sslmode=disable"
psql "$bench_super_url" -qX -c "create table bench_floor (id bigserial primary key, data jsonb not null)" >/dev/null
echo "select 1;" >"$work/round-trip.sql"
echo "insert into bench_floor (data) values ('{\"n\": 1}');" >"$work/insert.sql"
echo "select * from append_events('$tenant', array['bench.floor'], array['{\"n\": 1}'::jsonb]);" >"$work/append.sql"
floor() { # label url script [PGOPTIONS]
  echo "bench: postgresql $1" >&2
  rm -f "$work"/pgbench-log*
  PGOPTIONS=${4:-} pgbench -n -c 1 -R 100 -T "$floor_s" -f "$work/$3" --log --log-prefix="$work/pgbench-log" "$2" >/dev/null 2>&1
  cat "$work"/pgbench-log* | python3 -c '
import sys
# client, transaction, time (us, from the scheduled start), script, epoch s, us, schedule lag (us)
ms = sorted((int(f[2]) - int(f[6])) / 1000 for f in (l.split() for l in sys.stdin))
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
print(f"| {sys.argv[1]} | {len(ms)} | {q(0.5):.2f} | {q(0.99):.2f} |")' "$1" >>"$work/floor.md"
}
printf '| statement (pgbench, 100/s) | transactions | p50 ms | p99 ms |\n|---|---:|---:|---:|\n' >"$work/floor.md"
floor "\`select 1\` (a round trip)" "$bench_super_url" round-trip.sql
floor "one-row insert, commit not flushed (\`synchronous_commit=off\`)" "$bench_super_url" insert.sql "-c synchronous_commit=off"
floor "one-row insert, durable commit" "$bench_super_url" insert.sql
floor "\`append_events\`, one event, durable commit (a publish, as the app role)" "$app_url" append.sql
cat "$work/floor.md" >&2

# --- Nchan --------------------------------------------------------------------------------------
mkdir -p "$work/nchan/logs"
sed "s#PEERS/nchan#$work/nchan#" "$nchan_conf" >"$work/nchan/nginx.conf"
nginx -p "$work/nchan" -c nginx.conf 2>/dev/null
for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:8081/nchan_status && break; sleep 0.1; done
nchan_pids=$(pgrep -d, -P "$(cat "$work/nchan/logs/nginx.pid")")

run() { # target scenario args...
  local target=$1 scenario=$2; shift 2
  local addr pids
  if [[ $target == cybernetic ]]; then addr=127.0.0.1:18081; pids=$server; else addr=127.0.0.1:8081; pids=$nchan_pids; fi
  echo "bench: $target $scenario" >&2
  local out
  out=$("$load" --target "$target" --addr "$addr" --token "$token" --pids "$pids" --connections "$connections" "$@")
  echo "bench: $out" >&2
  echo "{\"target\":\"$target\",\"scenario\":\"$scenario\",\"result\":$out}" >>"$work/results.jsonl"
  sleep 3 # let the closed connections drain before the next scenario
}
: >"$work/results.jsonl"
wanted() { [[ " $scenarios " == *" $1 "* ]]; }
for target in $targets; do
  if wanted idle; then run "$target" idle --topics 100 --rate 0 --seconds 0; fi
  if wanted topics-10k; then run "$target" topics-10k --topics 100 --rate 100 --seconds "$duration"; fi
  if wanted topics-50k; then run "$target" topics-50k --topics 100 --rate 500 --seconds "$duration"; fi
  if wanted broadcast; then run "$target" broadcast --topics 1 --rate 10 --seconds "$duration"; fi
  if wanted storm; then run "$target" storm --topics 1 --storm 20 --rate 0 --seconds 0; fi
done

table=$(python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["target"], r["scenario"]): r["result"] for r in rows}
def cell(r, key, fmt):
    v = r.get(key)
    return fmt.format(v) if isinstance(v, (int, float)) and v == v else "-"
print("| scenario | server | connected | deliveries/s | p50 ms | p99 ms | p99.9 ms | publish ack p50 / p99 ms | KiB/conn (idle) | server CPU s | loadgen CPU s | storm s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for scenario in ["idle", "topics-10k", "topics-50k", "broadcast", "storm"]:
    for target in ["cybernetic", "nchan"]:
        r = by.get((target, scenario))
        if not r:
            continue
        print(f"| {scenario} | {target} | {r['connected']} | {cell(r,'deliveries_per_s','{:.0f}')} | {cell(r,'p50_ms','{:.2f}')} | "
              f"{cell(r,'p99_ms','{:.2f}')} | {cell(r,'p999_ms','{:.2f}')} | "
              f"{cell(r,'ack_p50_ms','{:.2f}')} / {cell(r,'ack_p99_ms','{:.2f}')} | "
              f"{cell(r,'kib_per_conn','{:.2f}') if scenario == 'idle' else '-'} | {cell(r,'server_cpu_s','{:.1f}')} | "
              f"{cell(r,'loadgen_cpu_s','{:.1f}')} | {cell(r,'storm_s','{:.2f}') if scenario == 'storm' else '-'} |")
PY
)
echo
echo "$table"
echo
cat "$work/floor.md"

if ((write)); then
  section=$work/section.md
  {
    echo "## Event streams (SSE): Cybernetic and Nchan"
    echo
    echo "- command: \`CONNECTIONS=$connections DURATION=$duration scripts/bench/sse.sh --write\`"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit \`$(git describe --always --dirty --abbrev=12)\`"
    echo "- machine: $(nproc) CPUs, $(LC_ALL=C lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); load generator, servers and PostgreSQL share the 2 cores"
    echo "- Cybernetic: release build, RUST_LOG=warn, one process, PostgreSQL over loopback; every published event is a committed write to the event log"
    echo "- Nchan: $(nginx -v 2>&1 | sed 's/.*: //'), Debian libnginx-mod-nchan, configuration from the peers folder (2 workers, in-memory buffer)"
    echo
    echo "$table"
    echo
    echo "PostgreSQL alone on the same machine in the same run, at topics-10k's publish pace: what one publish's commit costs before HTTP and fan-out."
    echo
    cat "$work/floor.md"
  } >"$section"
  record_section sse-bench "$section"
fi
