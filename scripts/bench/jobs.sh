#!/usr/bin/env bash
# The job pool against graphile-worker, in one run, on the local PostgreSQL (each in a database
# of its own), with equal concurrency and the same phases (see scripts/bench/job_load.rs and the
# peer's gw_bench.mjs): enqueue latency with 1 and with 8 producers, drain throughput of JOBS no-op
# jobs, pickup latency enqueue -> handler start while idle.
#
#   scripts/bench/jobs.sh [--write]     --write records the results in docs/benchmarks.md
#
# Environment: JOBS (20000), CONCURRENCY (32), PREFETCH (500: our JOB_PREFETCH and the peer's
# localQueue), GW_DIR (the graphile-worker peer folder; default ../shared/peers/graphile-worker),
# PG_SUPERUSER_URL (postgres://postgres@127.0.0.1:5432/postgres). Needs node and npm for the peer.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
. scripts/bench/record.sh
write=0
[[ ${1:-} == --write ]] && write=1

jobs=${JOBS:-20000}
concurrency=${CONCURRENCY:-32}
prefetch=${PREFETCH:-500}
gw_dir=${GW_DIR:-$root/../shared/peers/graphile-worker}
superuser=${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}
[[ -f $gw_dir/gw_bench.mjs ]] || { echo "bench: no graphile-worker peer at $gw_dir (set GW_DIR)" >&2; exit 1; }
command -v npm >/dev/null || { echo "bench: npm is needed for the graphile-worker peer" >&2; exit 1; }

cargo build --release --locked --bin cybernetic --example job-load
bin=target/release/cybernetic
load=target/release/examples/job-load

work=$(mktemp -d "${TMPDIR:-/tmp}/cybernetic-jobs.XXXXXX")
cleanup() {
  for db in cybernetic_jobbench gwbench; do
    psql "$superuser" -qX -c "drop database if exists $db with (force)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Ours: a fresh database, migrated, with one tenant.
psql "$superuser" -qX -c "drop database if exists cybernetic_jobbench with (force)" >/dev/null
DB_NAME=cybernetic_jobbench bash scripts/db-setup.sh
app_url="postgres://cybernetic_app:${APP_PASSWORD:-app}@127.0.0.1:5432/cybernetic_jobbench?sslmode=disable"
MIGRATION_DATABASE_URL="postgres://cybernetic_owner:${OWNER_PASSWORD:-owner}@127.0.0.1:5432/cybernetic_jobbench?sslmode=disable" \
  "$bin" migrate >/dev/null
tenant=$(DATABASE_URL=$app_url "$bin" tenant create --name Bench --slug bench | sed -n 's/.* id=//p')

# The peer: its own database and folder.
psql "$superuser" -qX -c "drop database if exists gwbench with (force)" -c "create database gwbench" >/dev/null
cp "$gw_dir"/gw_bench.mjs "$gw_dir"/package.json "$work/"
(cd "$work" && npm install --silent --no-audit --no-fund >/dev/null)
gw_url="${superuser%/*}/gwbench"

ours() { # producers mode
  "$load" "$app_url" "$tenant" "$jobs" "$concurrency" "$1" "$prefetch" "$2"
}
peer() { # producers -> the same JSON shape as ours
  (cd "$work" && DATABASE_URL=$gw_url node gw_bench.mjs "$jobs" "$concurrency" "$1" "$prefetch") | python3 -c '
import json, re, sys
out = {}
for line in sys.stdin:
    nums = lambda s: {k: float(v) for k, v in re.findall(r"(p50|p95|p99|max)=([0-9.]+)", s)}
    if line.startswith("enqueue:"):
        out["jobs"] = int(re.search(r"enqueue: (\d+) jobs", line).group(1))
        out["enqueue_per_s"] = float(re.search(r"= (\d+)/s", line).group(1))
        out["enqueue_ms"] = nums(line)
    elif line.startswith("drain:"):
        out["drain_s"] = float(re.search(r"in ([0-9.]+)s", line).group(1))
        out["drain_jobs_per_s"] = float(re.search(r"= (\d+) jobs/s", line).group(1))
    elif line.startswith("pickup"):
        out["pickup_ms"] = nums(line)
print(json.dumps(out))'
}

results=$work/results.jsonl
for producers in 1 8; do
  for target in "cybernetic (tx)" "cybernetic (alone)" graphile-worker; do
    echo "bench: $target, $producers producer(s)" >&2
    case $target in
      "cybernetic (tx)") r=$(ours "$producers" tx) ;;
      "cybernetic (alone)") r=$(ours "$producers" alone) ;;
      *) r=$(peer "$producers") ;;
    esac
    echo "$r" >&2
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["target"]=sys.argv[2]; r["producers"]=int(sys.argv[3]); print(json.dumps(r))' \
      "$r" "$target" "$producers" >>"$results"
  done
done

table=$(python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| producers | queue | enqueue/s | enqueue p50 ms | enqueue p99 ms | enqueue call p50 ms | enqueue call p99 ms | drain jobs/s | pickup p50 ms | pickup p99 ms |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    # The peer's addJob is its whole enqueue: the call is all of it.
    e, c, p = r["enqueue_ms"], r.get("enqueue_call_ms", r["enqueue_ms"]), r["pickup_ms"]
    print(f"| {r['producers']} | {r['target']} | {r['enqueue_per_s']:.0f} | {e['p50']:.2f} | {e['p99']:.2f} | "
          f"{c['p50']:.2f} | {c['p99']:.2f} | {r['drain_jobs_per_s']:.0f} | {p['p50']:.2f} | {p['p99']:.2f} |")
PY
)
echo
echo "$table"

if ((write)); then
  section=$work/section.md
  {
    echo "## Background jobs: Cybernetic and graphile-worker"
    echo
    echo "- command: \`scripts/bench/jobs.sh --write\` (JOBS=$jobs, CONCURRENCY=$concurrency, PREFETCH=$prefetch)"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit \`$(git describe --always --dirty --abbrev=12)\`"
    echo "- machine: $(nproc) CPUs, $(LC_ALL=C lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); both queues, their producers and PostgreSQL share the 2 cores"
    echo "- Cybernetic: release build, one pool on the default queue (concurrency $concurrency, JOB_PREFETCH $prefetch), the app role under row-level security; (tx) each enqueue is \`jobs::enqueue\` in a tenant transaction of its own (begin, insert, commit: what a handler does with its write; \"enqueue\" times all three, \"enqueue call\" the \`jobs::enqueue\` call alone: the round trip that adding a job adds to a transaction that commits anyway), (alone) \`jobs::enqueue_alone\`, which commits by itself like graphile-worker's addJob, concurrent calls of the process gathered into one statement and one commit (src/db/enqueuer.rs); drain is timed from the pool's start until the database shows no unfinished job, looked up once every handler has run; each finished job also appends a job.completed event to the tenant's log"
    echo "- graphile-worker: $(cd "$work" && node -e 'console.log(require("./node_modules/graphile-worker/package.json").version)' 2>/dev/null || echo '?'), the peers folder's gw_bench.mjs (concurrency $concurrency, localQueue $prefetch), its own database, as superuser"
    echo
    echo "$table"
  } >"$section"
  record_section jobs-bench "$section"
fi
