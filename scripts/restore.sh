#!/usr/bin/env bash
# Restores a backup made by scripts/backup.sh into an empty database (and the artifacts into the
# storage root), after checking the backup's SHA-256 manifest.
#
#   scripts/restore.sh DIR
#
# Environment:
#   RESTORE_DATABASE_URL  a superuser connection to the target database, which must exist and be
#                         empty, owned by cybernetic_owner (`createdb -O cybernetic_owner NAME`;
#                         do not migrate it). The cybernetic_owner and cybernetic_app roles the
#                         archive's owners and grants name must exist: on a new cluster create
#                         them with scripts/db-setup.sh, which also sets both roles' passwords
#                         (for the whole cluster, so not on one where they are in use). Default:
#                         postgres://postgres@127.0.0.1:5432/${DB_NAME:-cybernetic}
#   STORAGE_LOCAL_ROOT    where a local backend's artifacts go (default data); it must not hold
#                         objects yet
#
# Restoring into a database that is in use, or over existing objects, is refused: restore next to
# it, check, then point the platform at the restored copy.
set -euo pipefail
die() { echo "restore: $*" >&2; exit 1; }
[[ $# -eq 1 ]] || die "usage: scripts/restore.sh DIR"
dir=$1
url=${RESTORE_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/${DB_NAME:-cybernetic}}
for tool in pg_restore psql; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install postgresql-client)"
done
[[ -f $dir/database.dump && -f $dir/manifest.sha256 ]] || die "$dir is not a backup (no database.dump or manifest.sha256)"

echo "restore: checking $dir against its manifest" >&2
(cd "$dir" && sha256sum --quiet --check manifest.sha256) || die "the backup is damaged: a file does not match its checksum"

tables=$(psql "$url" -qAtX -c "select count(*) from pg_tables where schemaname = 'public'")
[[ $tables == 0 ]] || die "the target database is not empty ($tables tables); restore into a new one"

echo "restore: database <- $dir/database.dump" >&2
pg_restore --exit-on-error --single-transaction --no-password --dbname="$url" "$dir/database.dump"

if [[ -f $dir/artifacts.tar ]]; then
  root=${STORAGE_LOCAL_ROOT:-data}
  if [[ -d $root/objects && -n $(ls -A "$root/objects" 2>/dev/null) ]]; then
    die "$root/objects already holds objects; restore the artifacts into an empty root"
  fi
  mkdir -p "$root"
  echo "restore: artifacts -> $root" >&2
  tar -C "$root" -xf "$dir/artifacts.tar"
elif [[ -d $dir/artifacts ]]; then
  echo "restore: the bucket copy is in $dir/artifacts; copy it back with: mc mirror $dir/artifacts <alias>/<bucket>" >&2
fi
echo "restore: done" >&2
