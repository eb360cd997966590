#!/usr/bin/env bash
# Storage benchmark: streams objects of SIZES (default 1 GiB and 4 GiB) through PUT and GET
# /v1/artifacts/{key} on the local backend and on a local S3-compatible server (moto_server, as the
# tests use; TEST_S3_ENDPOINT), and reports MiB/s beside the disk's own speed measured in the same
# run (dd with conv=fsync on the same filesystem, and dd reads of that file from the disk and from
# the page cache), and the server's peak RSS growth over its idle size.
#
# Every write starts with nothing left to flush (sync), so neither dd nor the PUT shares the disk
# with the writeback of an earlier file. The disk's speed here moves by a factor of two within
# minutes, so on the local backend each size runs ROUNDS times, each round dd and then the object
# right after it, and the table gives the medians: of each speed, and of each round's ratio. Reads are measured twice: cold, after dropping the page
# cache (the disk's read speed; needs root, else those columns show -), and warm, from the page
# cache: the second read after the PUT (the local backend writes uploads with O_DIRECT, so the
# first read of a new object comes from the disk, as a cold one does).
#
#   scripts/bench/storage.sh [--write]     --write records the section in docs/benchmarks.md
#
#   SIZES        space-separated sizes in MiB (default "1024 4096")
#   BACKENDS     "local s3" (default)
#   ROUNDS       rounds per size on the local backend (default 3; the S3 server runs each once)
#   BENCH_DIR    where the local root and the source files go (default: a temp dir under $TMPDIR)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
. scripts/bench/record.sh
write=0
[[ ${1:-} == --write ]] && write=1

sizes=${SIZES:-1024 4096}
backends=${BACKENDS:-local s3}
rounds=${ROUNDS:-3}
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
  n=1
  [[ $backend == local ]] && n=$rounds
  for mib in $sizes; do
   src=$work/source.bin
   head -c $((mib << 20)) /dev/zero >"$src"
   for round in $(seq 1 "$n"); do
    echo "bench: disk (dd, $mib MiB, conv=fsync), round $round" >&2
    read -r disk_w disk_r disk_c < <(disk "$mib")
    [[ -n ${disk_c:-} ]] || { echo "bench: the dd baseline failed" >&2; exit 1; }
    # The source is read back into the page cache (dd's cold read dropped it), clean: curl reads
    # it from memory, and the PUT's writes have the disk to themselves.
    cat "$src" >/dev/null
    sync
    echo "bench: $backend, $mib MiB, round $round" >&2
    put=$(curl -fsS -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $key" \
      -H 'content-type: application/octet-stream' -T "$src" "http://127.0.0.1:$port/v1/artifacts/bench/$mib.bin")
    peak_put_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$server/status")
    get_once() {
      curl -fsS -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $key" \
        "http://127.0.0.1:$port/v1/artifacts/bench/$mib.bin"
    }
    get_once >/dev/null
    warm=$(get_once)
    get=-
    if [[ $backend == local ]] && ((cold)) && drop_cache; then
      get=$(mib_per_s $((mib << 20)) "$(get_once)")
    fi
    peak_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$server/status")
    # Each round stores the object anew, not over the one before.
    curl -fsS -o /dev/null -X DELETE -H "Authorization: Bearer $key" \
      "http://127.0.0.1:$port/v1/artifacts/bench/$mib.bin"
    printf '%s %s %s %s %s %s %s %s %s %s %s\n' "$backend" "$mib" "$disk_w" "$disk_r" "$disk_c" \
      "$(mib_per_s $((mib << 20)) "$put")" "$get" "$(mib_per_s $((mib << 20)) "$warm")" \
      "$(( (peak_put_kib - idle_kib) / 1024 ))" "$(( (peak_kib - idle_kib) / 1024 ))" \
      "$(( idle_kib / 1024 ))" >>"$results"
    tail -1 "$results" >&2
   done
   rm -f "$src"
  done
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=
done

table=$(python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    backend, mib, *rest = line.split()
    rows.setdefault((backend, int(mib)), []).append(rest)
def num(v):
    return None if v == "-" else float(v)
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
def cell(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)
print("| backend | size | rounds | disk write MiB/s | PUT MiB/s | PUT % | disk read (cold) MiB/s | GET (cold) MiB/s | GET % | page-cache read MiB/s | GET (warm) MiB/s | GET warm % | RSS growth after PUT MiB | after GET MiB | idle RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (backend, mib), runs in rows.items():
    col = lambda i: [num(r[i]) for r in runs]
    # Each round's ratio to the disk measured just before it; the median of those.
    ratio = lambda a, b: med([x / y * 100 if x is not None and y else None for x, y in zip(col(a), col(b))])
    dw, dr, dc, put, get, warm = (med(col(i)) for i in range(6))
    grow_put, grow, idle = (max(int(r[i]) for r in runs) for i in (6, 7, 8))
    print(f"| {backend} | {mib} MiB | {len(runs)} | {cell(dw)} | {cell(put)} | {cell(ratio(3, 0), '{:.0f}%')} | "
          f"{cell(dr)} | {cell(get)} | {cell(ratio(4, 1), '{:.0f}%')} | {cell(dc)} | {cell(warm)} | "
          f"{cell(ratio(5, 2), '{:.0f}%')} | {grow_put} | {grow} | {idle} |")
PY
)
echo
echo "$table"

if ((write)); then
  section=$work/section.md
  {
    echo "## Artifact storage: streaming through the API"
    echo
    echo "- command: \`scripts/bench/storage.sh --write\` (SIZES=\"$sizes\" MiB, BACKENDS=\"$backends\", ROUNDS=$rounds)"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit \`$(git describe --always --dirty --abbrev=12)\`"
    echo "- machine: $(nproc) CPUs, $(LC_ALL=C lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); filesystem $(df -T "$work" | awk 'NR==2 {print $2}')"
    echo "- disk in the same run, before each round of each size: write with \`dd bs=1M conv=fsync\` of that many MiB, after a \`sync\`; read with \`dd bs=1M\` of that file twice: just after the write (from the page cache) and after dropping the page cache (from the disk)"
    echo "- local backend: $rounds rounds per size; speeds are the medians over the rounds, each % the median of the rounds' own ratios (PUT to the dd write just before it, and so on); RSS growth the largest of the rounds. s3: one round"
    echo "- PUT: after a \`sync\`, so the source file (in the page cache) is not being written back meanwhile; GET (warm) the second GET after the PUT (from the page cache), GET (cold) after dropping the page cache (local backend only: moto keeps objects in its memory)"
    echo "- each object: one \`curl -T\` PUT (streamed, Content-Length set) then one GET to /dev/null, through \`cybernetic serve\` (release build) on 127.0.0.1; s3 is moto_server on the same machine (it keeps objects in its own memory)"
    echo
    echo "$table"
  } >"$section"
  record_section storage-bench "$section"
fi
