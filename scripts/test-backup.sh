#!/usr/bin/env bash
# The backup and restore scripts, tested: a scratch platform (a database and a local artifact
# root) gets a tenant, a key, states, an episode, a policy and artifacts through the HTTP API;
# scripts/backup.sh backs it up while the server runs; scripts/restore.sh restores it into a
# second scratch database and root; every table's rows and every artifact's bytes are compared,
# and a server on the restored copy serves the same artifact. A damaged backup must be refused.
# Run by scripts/test.sh after the test suite (it uses target/debug/cybernetic).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PG_SUPERUSER_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
: "${TEST_PG_HOST:=127.0.0.1:5432}"
bin=./target/debug/cybernetic
[[ -x $bin ]] || { echo "test-backup: build first (cargo build)" >&2; exit 1; }
src_db=cybernetic_test_backup_src_$$
dst_db=cybernetic_test_backup_dst_$$
work=$(mktemp -d "${TMPDIR:-/tmp}/cybernetic-backup-test.XXXXXX")
server=""
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  for db in "$src_db" "$dst_db"; do
    psql "$PG_SUPERUSER_URL" -qX -c "drop database if exists $db with (force)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "test-backup: FAIL: $*" >&2; exit 1; }
su_url() { echo "${PG_SUPERUSER_URL%/*}/$1"; }

serve() { # DB ROOT -> starts a server, sets $server and $base
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  DATABASE_URL="postgres://cybernetic_app:${APP_PASSWORD:-app}@${TEST_PG_HOST}/$1" \
    LISTEN_ADDR="127.0.0.1:$port" ADMIN_TOKEN="$admin" STORAGE_BACKEND=local \
    STORAGE_LOCAL_ROOT="$2" RUST_LOG=warn "$bin" serve &
  server=$!
  base="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    curl -fsS "$base/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "the server on $1 did not become ready"
}
stop() { kill -TERM "$server"; wait "$server" || true; server=""; }
api() { # METHOD PATH TOKEN [BODY]
  curl -fsS -X "$1" -H "Authorization: Bearer $3" -H 'Content-Type: application/json' \
    ${4:+--data "$4"} "$base$2"
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

admin=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
DB_NAME=$src_db bash scripts/db-setup.sh >/dev/null
MIGRATION_DATABASE_URL="postgres://cybernetic_owner:${OWNER_PASSWORD:-owner}@${TEST_PG_HOST}/$src_db" \
  "$bin" migrate >/dev/null

# --- a platform with data -------------------------------------------------------------------------
serve "$src_db" "$work/src-data"
tenant=$(api POST /v1/tenants "$admin" '{"name": "Backup", "slug": "backup"}' | field id)
key=$(api POST "/v1/tenants/$tenant/api-keys" "$admin" '{"name": "ops", "role": "admin"}' | field key)
for s in 1 2 3; do
  api PUT "/v1/systems/$s/state" "$key" "{\"state\": {\"load\": 0.$s}}" >/dev/null
done
api POST /v1/episodes "$key" '{"title": "Restore drill", "content": "Backups are only real once restored."}' >/dev/null
api POST /v1/policies "$key" '{"name": "load", "rules": [{"system": 3, "path": "/load", "op": "gt", "threshold": 0.9, "severity": "warning"}]}' >/dev/null
head -c 300000 /dev/urandom >"$work/blob.bin"
curl -fsS -X PUT -H "Authorization: Bearer $key" -H 'Content-Type: application/octet-stream' \
  --data-binary @"$work/blob.bin" "$base/v1/artifacts/reports/blob.bin" >/dev/null
printf 'quarterly report\n' | curl -fsS -X PUT -H "Authorization: Bearer $key" \
  -H 'Content-Type: text/plain' --data-binary @- "$base/v1/artifacts/reports/q3.txt" >/dev/null

# --- back up while it runs, then restore next to it -----------------------------------------------
BACKUP_DATABASE_URL=$(su_url "$src_db") STORAGE_LOCAL_ROOT="$work/src-data" \
  bash scripts/backup.sh "$work/backup" >/dev/null
stop
DB_NAME=$dst_db bash scripts/db-setup.sh >/dev/null
RESTORE_DATABASE_URL=$(su_url "$dst_db") STORAGE_LOCAL_ROOT="$work/dst-data" \
  bash scripts/restore.sh "$work/backup"

# --- the same rows, the same bytes ----------------------------------------------------------------
tables=$(psql "$(su_url "$src_db")" -qAtX -c "select tablename from pg_tables where schemaname = 'public' order by 1")
[[ -n $tables ]] || fail "no tables in the source"
for t in $tables; do
  q="select count(*) || ' ' || md5(coalesce(string_agg(x::text, E'\n' order by x::text), '')) from public.\"$t\" x"
  a=$(psql "$(su_url "$src_db")" -qAtX -c "$q")
  b=$(psql "$(su_url "$dst_db")" -qAtX -c "$q")
  [[ $a == "$b" ]] || fail "table $t differs: source $a, restored $b"
done
rows=$(psql "$(su_url "$dst_db")" -qAtX -c "select count(*) from events")
((rows > 5)) || fail "the restored log holds only $rows events"
diff -r "$work/src-data/objects" "$work/dst-data/objects" >/dev/null || fail "artifacts differ"

# --- the restored copy serves, as the app role, under row-level security --------------------------
serve "$dst_db" "$work/dst-data"
curl -fsS -H "Authorization: Bearer $key" "$base/v1/artifacts/reports/blob.bin" -o "$work/back.bin"
cmp -s "$work/blob.bin" "$work/back.bin" || fail "the restored artifact's bytes differ"
[[ $(api GET /v1/episodes "$key" | python3 -c "import json,sys; print(len(json.load(sys.stdin)['items']))") == 1 ]] \
  || fail "the restored episode is not listed"
stop

# --- a damaged backup, or a target in use, is refused ---------------------------------------------
printf 'x' >>"$work/backup/artifacts.tar"
if RESTORE_DATABASE_URL=$(su_url "$dst_db") STORAGE_LOCAL_ROOT="$work/other" \
  bash scripts/restore.sh "$work/backup" 2>"$work/err"; then
  fail "a damaged backup was restored"
fi
grep -q "damaged" "$work/err" || fail "the damaged backup was refused for the wrong reason: $(cat "$work/err")"
echo "backup and restore: $(echo "$tables" | wc -w) tables and the artifacts round-tripped"
