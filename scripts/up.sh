#!/usr/bin/env bash
# The platform in one command, on a fresh machine:
#   - where a Docker engine answers: creates what is missing of the development secrets
#     (scripts/gen-secrets.sh) and the self-signed certificate (scripts/gen-dev-cert.sh), then
#     `docker compose up -d --wait` (docker-compose.yml; HTTPS_PORT from the shell or .env);
#   - where none does: the same topology as local processes (scripts/local-stack.sh up, which
#     keeps its own token and certificate in .local-stack/).
# It says which it chose, and ends with the URL and how to get a first API key.
#
#   scripts/up.sh            (DOCKER=0 forces the local stack; DOCKER=1 fails without an engine)
set -euo pipefail
cd "$(dirname "$0")/.."

use_docker=${DOCKER:-auto}
if [[ $use_docker == auto ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then use_docker=1; else use_docker=0; fi
fi

if [[ $use_docker == 1 ]]; then
  echo "up: a Docker engine answers: starting the Compose stack (docker compose up -d --wait)"
  bash scripts/gen-secrets.sh
  bash scripts/gen-dev-cert.sh
  docker compose up -d --wait
  port=${HTTPS_PORT:-$(sed -n 's/^HTTPS_PORT=//p' .env 2>/dev/null | tail -n 1)}
  port=${port:-443}
  url=https://localhost$([[ $port == 443 ]] || echo ":$port")
  cat <<EOT
The platform is up at $url (self-signed certificate: curl -k).
A first API key:
  curl -k -X POST $url/v1/tenants -H "Authorization: Bearer \$(cat secrets/admin_token)" \\
    -H 'Content-Type: application/json' -d '{"name": "Acme", "slug": "acme"}'
  then POST $url/v1/tenants/<id>/api-keys with {"name": "first", "role": "admin"} (docs/api.md)
Stop it with: docker compose down   (data stays in the named volumes)
EOT
else
  echo "up: no Docker engine answers here: starting the same topology as local processes (scripts/local-stack.sh up)"
  bash scripts/local-stack.sh up
  echo "Stop it with: scripts/local-stack.sh down"
fi
