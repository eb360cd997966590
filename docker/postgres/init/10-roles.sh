#!/bin/sh
# First start of the Compose stack's PostgreSQL (run by the image from /docker-entrypoint-initdb.d,
# as the postgres superuser over the local socket): creates the roles cybernetic_owner (owns the
# database, runs migrations) and cybernetic_app (what the server logs in as: no superuser, no
# BYPASSRLS, owns nothing) and the database, with the same SQL as scripts/db-setup.sh.
# Passwords come from the Docker secrets named by CYBERNETIC_OWNER_PASSWORD_FILE and
# CYBERNETIC_APP_PASSWORD_FILE and reach psql through its environment (\getenv), never argv.
# Idempotent: after changing a password file, run it again with
#   docker compose exec postgres sh /docker-entrypoint-initdb.d/10-roles.sh
set -eu

read_secret() {
  # $1: variable naming the file. One trailing newline is dropped, as the app does.
  eval "file=\${$1:-}"
  if [ -z "$file" ] || [ ! -s "$file" ]; then
    echo "10-roles.sh: $1 must name a non-empty file (a Docker secret)" >&2
    return 1
  fi
  cat "$file"
}

OWNER_PASSWORD=$(read_secret CYBERNETIC_OWNER_PASSWORD_FILE)
APP_PASSWORD=$(read_secret CYBERNETIC_APP_PASSWORD_FILE)
export OWNER_PASSWORD APP_PASSWORD

psql -v ON_ERROR_STOP=1 -X -q \
  --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v database="${CYBERNETIC_DB:-cybernetic}" \
  -f "${CYBERNETIC_ROLES_SQL:-/etc/cybernetic/postgres/create-roles.sql}"
echo "10-roles.sh: roles cybernetic_owner, cybernetic_app and database ${CYBERNETIC_DB:-cybernetic} are in place"
