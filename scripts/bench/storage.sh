#!/usr/bin/env bash
# Storage benchmark: streams objects of SIZES (default 1 GiB and 4 GiB) through PUT and GET
# /v1/artifacts/{key} on the local backend and on a local S3-compatible server (moto_server, as the
# tests use; TEST_S3_ENDPOINT), and reports MiB/s beside the disk's own speed measured in the same
# run (dd with conv=fsync on the same filesystem, and dd reads of that file from the disk and from
# the page cache), and the server's peak RSS growth over its idle size.
#
# Every write starts with nothing left to flush (sync), so neither dd nor the PUT shares the disk
# with the writeback of an earlier file. Reads are measured twice: cold, after dropping the page
# cache (the disk's read speed; needs root, else those columns show -), and warm, just after the
# write (an object read soon after it was stored).
#
#   scripts/bench/storage.sh [--write]     --write records the section in docs/benchmarks.md
#
#   SIZES        space-separated sizes in MiB (default "1024 4096")
#   BACKENDS     "local s3" (default)
#   BENCH_DIR    where the local root and the source files go (default: a temp dir under $TMPDIR)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
. scripts/bench/record.sh
write=0
[[ ${1:-} == --write ]] && write=1

sizes=${SIZES:-1024 4096}
backends=${BACKENDS:-local s3}
superuser=${PG_SUPERUSER_URL:-postgres://postgres@127.0.0.1:5432/postgres}
s3_endpoint=${TEST_S3_ENDPOINT:-http://127.0.0.1:5000}
command -v curl >/dev/null || { echo "bench: curl is needed" >&2; exit 1; }

cargo build --release --locked --bin cybernetic
bin=$root/target/release/cybernetic

work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/cybernetic-storage.XXXXXX")
server=
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  psql "$superuser" -qX -c "drop database if exists cybernetic_storagebench with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql "$superuser" -qX -c "drop database if exists cybernetic_storagebench with (force)" >/dev/null
DB_NAME=cybernetic_storagebench bash scripts/db-setup.sh
app_url="postgres://cybernetic_app:${APP_PASSWORD:-app}@127.0.0.1:5432/cybernetic_storagebench?sslmode=disable"
MIGRATION_DATABASE_URL="postgres://cybernetic_owner:${OWNER_PASSWORD:-owner}@127.0.0.1:5432/cybernetic_storagebench?sslmode=disable" \
  "$bin" migrate >/dev/null
DATABASE_URL=$app_url "$bin" tenant create --name Bench --slug bench >/dev/null
key=$(DATABASE_URL=$app_url "$bin" api-key create --tenant bench --name bench --role operator 2>/dev/null | tail -1)

mib_per_s() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1048576 / float(sys.argv[2]):.0f}')" "$1" "$2"; }
now() { python3 -c 'import time; print(time.time())'; }
since() { python3 -c "import sys, time; print(time.time() - float(sys.argv[1]))" "$1"; }

# Drops the page cache (clean pages only: everything is synced first); fails without root.
drop_cache() { sync && { echo 1 >/proc/sys/vm/drop_caches; } 2>/dev/null; }
cold=0
drop_cache && cold=1

# The disk's own speed for an object of $1 MiB, on the filesystem the local backend writes to:
# "write cold-read warm-read" in MiB/s (cold-read is - when the cache cannot be dropped).
disk() {
  local start write read=- warm
  sync
  start=$(now)
  dd if=/dev/zero of="$work/dd.bin" bs=1M count="$1" conv=fsync status=none
  write=$(mib_per_s $(($1 << 20)) "$(since "$start")")
  start=$(now)
  dd if="$work/dd.bin" of=/dev/null bs=1M status=none
  warm=$(mib_per_s $(($1 << 20)) "$(since "$start")")
  if ((cold)) && drop_cache; then
    start=$(now)
    dd if="$work/dd.bin" of=/dev/null bs=1M status=none
    read=$(mib_per_s $(($1 << 20)) "$(since "$start")")
  fi
  rm -f "$work/dd.bin"
  echo "$write $read $warm"
}
declare -A disk_write disk_read disk_warm
for mib in $sizes; do
  echo "bench: disk baseline (dd, $mib MiB, conv=fsync)" >&2
  read -r w r c < <(disk "$mib")
  disk_write[$mib]=$w
  disk_read[$mib]=$r
  disk_warm[$mib]=$c
done

results=$work/results.txt
: >"$results"
port=18090
for backend in $backends; do
  env=(STORAGE_BACKEND="$backend" STORAGE_LOCAL_ROOT="$work/objects" STORAGE_MAX_BYTES=$((8 << 30)))
  if [[ $backend == s3 ]]; then
    bucket=cyb-bench-$RANDOM$RANDOM
    python3 - "$s3_endpoint" "$bucket" <<'PY'
import sys, urllib.request
req = urllib.request.Request(f"{sys.argv[1]}/{sys.argv[2]}", method="PUT")
urllib.request.urlopen(req).read()
PY
    env+=(S3_BUCKET="$bucket" S3_ENDPOINT="$s3_endpoint" S3_FORCE_PATH_STYLE=true
      S3_ACCESS_KEY_ID=test S3_SECRET_ACCESS_KEY=test)
  fi
  port=$((port + 1))
  env "${env[@]}" DATABASE_URL="$app_url" LISTEN_ADDR=127.0.0.1:$port LOG_FORMAT=json RUST_LOG=warn \
    "$bin" serve --no-workers >"$work/server-$backend.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/health/ready" >/dev/null && break; sleep 0.1; done
  idle_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$server/status")
  for mib in $sizes; do
    src=$work/source.bin
    head -c $((mib << 20)) /dev/zero >"$src"
    # The source stays in the page cache, clean: curl reads it from memory, and the PUT's writes
    # have the disk to themselves.
    sync
    echo "bench: $backend, $mib MiB" >&2
    put=$(curl -fsS -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $key" \
      -H 'content-type: application/octet-stream' -T "$src" "http://127.0.0.1:$port/v1/artifacts/bench/$mib.bin")
    peak_put_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$server/status")
    get_once() {
      curl -fsS -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $key" \
        "http://127.0.0.1:$port/v1/artifacts/bench/$mib.bin"
    }
    warm=$(get_once)
    get=-
    if [[ $backend == local ]] && ((cold)) && drop_cache; then
      get=$(mib_per_s $((mib << 20)) "$(get_once)")
    fi
    peak_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$server/status")
    rm -f "$src"
    printf '%s %s %s %s %s %s %s %s\n' "$backend" "$mib" \
      "$(mib_per_s $((mib << 20)) "$put")" "$get" "$(mib_per_s $((mib << 20)) "$warm")" \
      "$(( (peak_put_kib - idle_kib) / 1024 ))" "$(( (peak_kib - idle_kib) / 1024 ))" \
      "$(( idle_kib / 1024 ))" >>"$results"
    tail -1 "$results" >&2
  done
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=
done

table=$(
  echo "| backend | size | disk write MiB/s | PUT MiB/s | PUT % | disk read (cold) MiB/s | GET (cold) MiB/s | GET % | page-cache read MiB/s | GET (warm) MiB/s | GET warm % | RSS growth after PUT MiB | after GET MiB | idle RSS MiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  pct() { [[ $1 == - || $2 == - ]] && echo - || echo "$(($1 * 100 / $2))%"; }
  while read -r backend mib put get warm growth_put growth idle; do
    w=${disk_write[$mib]} r=${disk_read[$mib]} c=${disk_warm[$mib]}
    printf '| %s | %s MiB | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$backend" "$mib" \
      "$w" "$put" "$(pct "$put" "$w")" "$r" "$get" "$(pct "$get" "$r")" \
      "$c" "$warm" "$(pct "$warm" "$c")" "$growth_put" "$growth" "$idle"
  done <"$results"
)
echo
echo "$table"

if ((write)); then
  section=$work/section.md
  {
    echo "## Artifact storage: streaming through the API"
    echo
    echo "- command: \`scripts/bench/storage.sh --write\` (SIZES=\"$sizes\" MiB, BACKENDS=\"$backends\")"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit \`$(git describe --always --dirty --abbrev=12)\`"
    echo "- machine: $(nproc) CPUs, $(LC_ALL=C lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); filesystem $(df -T "$work" | awk 'NR==2 {print $2}')"
    echo "- disk in the same run, per size: write with \`dd bs=1M conv=fsync\` of that many MiB, after a \`sync\`; read with \`dd bs=1M\` of that file twice: just after the write (from the page cache) and after dropping the page cache (from the disk)"
    echo "- PUT: after a \`sync\`, so the source file (in the page cache) is not being written back meanwhile; GET (warm) just after the PUT, GET (cold) after dropping the page cache (local backend only: moto keeps objects in its memory)"
    echo "- each object: one \`curl -T\` PUT (streamed, Content-Length set) then one GET to /dev/null, through \`cybernetic serve\` (release build) on 127.0.0.1; s3 is moto_server on the same machine (it keeps objects in its own memory)"
    echo
    echo "$table"
  } >"$section"
  record_section storage-bench "$section"
fi
