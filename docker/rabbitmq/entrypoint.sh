#!/bin/sh
# Entrypoint wrapper for the rabbitmq image: the default user's password comes from a Docker
# secret. The 3.13 image refuses RABBITMQ_DEFAULT_PASS_FILE (its entrypoint lists it as
# deprecated), while RabbitMQ itself still reads RABBITMQ_DEFAULT_USER/RABBITMQ_DEFAULT_PASS when
# it creates its database on first start. So the secret is read here, at run time, and never
# appears in the Compose file or the container's configuration (docker inspect).
set -eu
if [ -n "${RABBITMQ_PASSWORD_FILE:-}" ]; then
  if [ ! -s "$RABBITMQ_PASSWORD_FILE" ]; then
    echo "rabbitmq entrypoint: RABBITMQ_PASSWORD_FILE ($RABBITMQ_PASSWORD_FILE) is missing or empty" >&2
    exit 1
  fi
  RABBITMQ_DEFAULT_PASS=$(cat "$RABBITMQ_PASSWORD_FILE")
  export RABBITMQ_DEFAULT_PASS
  unset RABBITMQ_PASSWORD_FILE
fi
exec docker-entrypoint.sh "$@"
