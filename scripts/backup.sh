#!/usr/bin/env bash
# Backs up the platform: the database as a pg_dump custom-format archive, and the artifacts' bytes
# (the local storage root as a tar; an S3/MinIO bucket with `mc mirror` when `mc` is installed).
# A manifest of SHA-256 sums lets scripts/restore.sh check the backup before it restores anything.
#
#   scripts/backup.sh [DIR]          DIR defaults to backups/<UTC time>
#
# Environment:
#   BACKUP_DATABASE_URL  a superuser (or BYPASSRLS) connection to the database. Tables force
#                        row-level security, so the owner role alone would dump no tenant rows;
#                        pg_dump refuses rather than dump a partial copy. Default:
#                        postgres://postgres@127.0.0.1:5432/${DB_NAME:-cybernetic}
#   STORAGE_BACKEND      local (default), s3 or memory, as the server's
#   STORAGE_LOCAL_ROOT   the local backend's root (default data)
#   S3_ENDPOINT, S3_BUCKET, S3_ACCESS_KEY_ID(_FILE), S3_SECRET_ACCESS_KEY(_FILE)  for s3
#
# Take it while the platform runs: pg_dump reads one consistent snapshot. Artifacts written while
# the backup runs may be in the tar without their row (reconciliation removes them after a
# restore) or have a row without bytes (the storage_reconciliation job reports it after the
# restore, as a dead job naming the keys; take the backup again).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "backup: $*" >&2; exit 1; }
command -v pg_dump >/dev/null || die "pg_dump is not installed (apt-get install postgresql-client)"

dir=${1:-backups/$(date -u +%Y%m%dT%H%M%SZ)}
url=${BACKUP_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/${DB_NAME:-cybernetic}}
backend=${STORAGE_BACKEND:-local}
[[ -e $dir && -n $(ls -A "$dir" 2>/dev/null) ]] && die "$dir exists and is not empty"
mkdir -p "$dir"

secret() { # NAME: the value of NAME, or of the file NAME_FILE names
  local file_var="${1}_FILE"
  if [[ -n ${!file_var:-} ]]; then cat "${!file_var}"; else printf '%s' "${!1:-}"; fi
}

echo "backup: database -> $dir/database.dump" >&2
pg_dump --format=custom --compress=6 --no-password --file="$dir/database.dump" "$url"

case $backend in
  local)
    root=${STORAGE_LOCAL_ROOT:-data}
    if [[ -d $root/objects ]]; then
      echo "backup: artifacts in $root -> $dir/artifacts.tar" >&2
      # Only finished objects: .tmp holds uploads in progress.
      tar -C "$root" -cf "$dir/artifacts.tar" objects
    else
      echo "backup: no artifacts under $root/objects" >&2
      tar -cf "$dir/artifacts.tar" -T /dev/null
    fi
    ;;
  s3)
    mc --version 2>/dev/null | grep -qi minio || die "STORAGE_BACKEND=s3: install MinIO's mc to copy the bucket, or back it up with the object store's own tooling (versioning, replication)"
    : "${S3_ENDPOINT:?S3_ENDPOINT is needed}" "${S3_BUCKET:?S3_BUCKET is needed}"
    export MC_HOST_cybernetic_backup
    MC_HOST_cybernetic_backup="$(printf '%s' "$S3_ENDPOINT" | sed 's#://#://'"$(secret S3_ACCESS_KEY_ID)"':'"$(secret S3_SECRET_ACCESS_KEY)"'@#')"
    echo "backup: bucket $S3_BUCKET -> $dir/artifacts/" >&2
    mc mirror --quiet "cybernetic_backup/$S3_BUCKET" "$dir/artifacts"
    ;;
  memory) echo "backup: STORAGE_BACKEND=memory keeps no artifacts to back up" >&2 ;;
  *) die "STORAGE_BACKEND=$backend is not one of local, s3, memory" ;;
esac

(cd "$dir" && find . -type f ! -name manifest.sha256 -print0 | sort -z | xargs -0 sha256sum >manifest.sha256)
{
  echo "created_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "storage_backend=$backend"
  echo "migrations=$(ls "$here/migrations" | tail -1)"
} >"$dir/backup.info"
echo "backup: done: $dir" >&2
echo "$dir"
