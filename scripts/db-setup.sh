#!/usr/bin/env bash
# Creates the owner and app roles and the database on a local PostgreSQL, idempotently.
# Connects as a superuser through PG_SUPERUSER_URL (default: postgres on 127.0.0.1:5432).
#   OWNER_PASSWORD, APP_PASSWORD: role passwords (default: development values)
#   DB_NAME: database to create (default: cybernetic)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
: "${PG_SUPERUSER_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
psql "$PG_SUPERUSER_URL" -q -X \
  -v owner_password="${OWNER_PASSWORD:-owner}" \
  -v app_password="${APP_PASSWORD:-app}" \
  -v database="${DB_NAME:-cybernetic}" \
  -f "$here/docker/postgres/create-roles.sql"
