#!/usr/bin/env bash
# Creates the owner and app roles and the database on a local PostgreSQL, idempotently.
# Connects as a superuser through PG_SUPERUSER_URL (default: postgres on 127.0.0.1:5432).
#   OWNER_PASSWORD, APP_PASSWORD: role passwords (default: the development values owner / app;
#                                 set both for anything but a local development database)
#   DB_NAME: database to create (default: cybernetic)
# The passwords reach psql through the environment, never its command line (visible in ps).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
: "${PG_SUPERUSER_URL:=postgres://postgres@127.0.0.1:5432/postgres}"
export OWNER_PASSWORD="${OWNER_PASSWORD:-owner}" APP_PASSWORD="${APP_PASSWORD:-app}"
psql "$PG_SUPERUSER_URL" -q -X -v database="${DB_NAME:-cybernetic}" -f "$here/docker/postgres/create-roles.sql"
