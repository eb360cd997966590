#!/usr/bin/env bash
# End to end through real HAProxy, on the local stack (scripts/local-stack.sh) in a scratch
# directory and database: TLS, events across replicas, a replica killed under a live event stream
# (nothing lost, marked down within 10 s), a SIGTERM drain under load (no failed request), and
# Prometheus reporting up == 1 for every target. Run by scripts/test.sh with the debug binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh
export BIN=${BIN:-$PWD/target/debug/cybernetic}
export LOCAL_STACK_DIR=${LOCAL_STACK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/cybernetic-e2e.XXXXXX")}
export LOCAL_STACK_DB=cybernetic_test_e2e_$$
# Ports of its own, so a local stack left running for development does not answer in its place.
export HTTP_PORT=${HTTP_PORT:-28080} HTTPS_PORT=${HTTPS_PORT:-28443} STATS_PORT=${STATS_PORT:-28404}
export APP1_PORT=${APP1_PORT:-28181} APP2_PORT=${APP2_PORT:-28182} WORKER_PORT=${WORKER_PORT:-28191}
export PROMETHEUS_PORT=${PROMETHEUS_PORT:-29090}
: "${PG_SUPERUSER_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
https_port=$HTTPS_PORT
stats_port=$STATS_PORT
app1_port=$APP1_PORT
app2_port=$APP2_PORT
prometheus_port=$PROMETHEUS_PORT
cleanup() {
  bash scripts/local-stack.sh down >/dev/null 2>&1 || true
  psql "$PG_SUPERUSER_URL" -qX -c "drop database if exists $LOCAL_STACK_DB with (force)" >/dev/null 2>&1 || true
  rm -rf "$LOCAL_STACK_DIR"
}
trap cleanup EXIT
fail() {
  echo "e2e: FAIL: $*" >&2
  for f in "$LOCAL_STACK_DIR"/*.log; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
  exit 1
}

bash scripts/local-stack.sh up >/dev/null || fail "the stack did not come up"

# Prometheus scrapes both replicas and the worker, and finds them up.
all_up() {
  curl -fsS "http://127.0.0.1:$prometheus_port/api/v1/query?query=up" | python3 -c '
import json, sys
r = json.load(sys.stdin)["data"]["result"]
sys.exit(0 if len(r) == 3 and all(x["value"][1] == "1" for x in r) else 1)'
}
wait_for 60 all_up || fail "Prometheus does not report up == 1 for the two replicas and the worker"
echo "e2e: Prometheus reports up == 1 for 3 targets"

out=$(python3 scripts/e2e/through_haproxy.py "$LOCAL_STACK_DIR" "$https_port" "$stats_port" \
  "$app1_port" "$app2_port") || fail "through HAProxy"
echo "$out" | sed '$d'
killed=$(echo "$out" | tail -n 1)
bash scripts/local-stack.sh restart-app "${killed#app}"
both_up() {
  [[ $(curl -fsS "http://127.0.0.1:$stats_port/stats;csv" | awk -F, '$1 == "app" && $18 == "UP"' | wc -l) == 2 ]]
}
wait_for 30 both_up || fail "$killed did not come back behind HAProxy"
python3 scripts/e2e/through_haproxy.py "$LOCAL_STACK_DIR" "$https_port" "$stats_port" \
  "$app1_port" "$app2_port" drain || fail "the drain"
echo "e2e: all checks passed"
