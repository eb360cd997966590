#!/bin/sh
# Entrypoint wrapper for the postgres image: prepares the WAL archive volume, then hands over to
# the image's own entrypoint. A fresh named volume mounted at /wal-archive belongs to root, and
# archive_command runs as postgres: without this every WAL segment would fail to archive and
# pile up in pg_wal.
set -eu
if [ "$(id -u)" = 0 ]; then
  mkdir -p /wal-archive
  chown postgres:postgres /wal-archive
  chmod 0700 /wal-archive
fi
exec docker-entrypoint.sh "$@"
