#!/usr/bin/env bash
# Creates the secret files the Compose stack reads (docker-compose.yml, `secrets:`), idempotently:
# a file that exists is never overwritten, so running it again only fills in what is missing.
#   scripts/gen-secrets.sh            (SECRETS_DIR=path to write elsewhere; default secrets/)
#
# Random values are hex from openssl (URL-safe, so they go into the URLs as they are):
#   postgres_superuser_password  postgres_owner_password  postgres_app_password
#   rabbitmq_password  minio_root_user  minio_root_password
#   s3_access_key_id  s3_secret_access_key        (the app's own MinIO user, made by minio-init)
#   admin_token  metrics_token  telegram_webhook_secret
# Derived from them (delete one to have it derived again after changing a password):
#   database_url            postgres://cybernetic_app:…@postgres:5432/cybernetic
#   migration_database_url  postgres://cybernetic_owner:…@postgres:5432/cybernetic
#   amqp_url                amqp://cybernetic:…@rabbitmq:5672/%2f
# Left empty for you to fill in: telegram_bot_token (see .env.example to turn Telegram on).
#
# Permissions: the directory is 0700 (only you can reach the files on this host) and the files
# 0644. Compose bind-mounts file secrets as they are on disk and ignores uid/gid/mode for them, so
# the services that run as their own users (the app as 10001, PostgreSQL as 999, Prometheus as
# 65534) could not read a 0600 file owned by you. SECRETS_FILE_MODE=0600 keeps them private for
# setups that map ownership themselves (e.g. Swarm secrets).
#
# The passwords take effect when the services first create their data (PostgreSQL roles,
# RabbitMQ user, MinIO root); changing them later is described in docs/deployment.md#secrets.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${SECRETS_DIR:-secrets}
file_mode=${SECRETS_FILE_MODE:-0644}
db_name=cybernetic

command -v openssl >/dev/null || { echo "gen-secrets: openssl is required" >&2; exit 1; }

umask 077
mkdir -p "$dir"
chmod 0700 "$dir"

created=()

# put NAME VALUE: writes $dir/NAME (value plus one newline) unless it exists.
put() {
  local path="$dir/$1"
  if [ -e "$path" ]; then
    return 0
  fi
  local tmp
  tmp=$(mktemp "$dir/.$1.XXXXXX")
  printf '%s\n' "$2" >"$tmp"
  chmod "$file_mode" "$tmp"
  mv "$tmp" "$path"
  created+=("$1")
}

# value NAME: the file's contents without trailing newlines.
value() {
  local v
  v=$(cat "$dir/$1")
  if [ -z "$v" ]; then
    echo "gen-secrets: $dir/$1 is empty; delete it to have it generated again" >&2
    exit 1
  fi
  printf '%s' "$v"
}

hex() { openssl rand -hex "$1"; }

# Passwords and keys. Lengths respect each service's limits: MinIO access keys are 3-20
# characters and secret keys 8-40; the app's tokens need at least 32 characters.
put postgres_superuser_password "$(hex 32)"
put postgres_owner_password "$(hex 32)"
put postgres_app_password "$(hex 32)"
put rabbitmq_password "$(hex 32)"
put minio_root_user "root$(hex 8)"
put minio_root_password "$(hex 16)"
put s3_access_key_id "cyb$(hex 8)"
put s3_secret_access_key "$(hex 16)"
put admin_token "$(hex 32)"
put metrics_token "$(hex 32)"
put telegram_webhook_secret "$(hex 32)"

# The bot token comes from BotFather; an empty file keeps Compose's secret mount valid.
if [ ! -e "$dir/telegram_bot_token" ]; then
  install -m "$file_mode" /dev/null "$dir/telegram_bot_token"
  created+=(telegram_bot_token)
fi

# URLs built from the passwords above.
app_url="postgres://cybernetic_app:$(value postgres_app_password)@postgres:5432/$db_name"
owner_url="postgres://cybernetic_owner:$(value postgres_owner_password)@postgres:5432/$db_name"
amqp_url="amqp://cybernetic:$(value rabbitmq_password)@rabbitmq:5672/%2f"
put database_url "$app_url"
put migration_database_url "$owner_url"
put amqp_url "$amqp_url"

# A derived file kept from an earlier run may name an old password.
for pair in "database_url=$app_url" "migration_database_url=$owner_url" "amqp_url=$amqp_url"; do
  name=${pair%%=*}
  if [ "$(value "$name")" != "${pair#*=}" ]; then
    echo "gen-secrets: warning: $dir/$name does not match the current password files;" \
      "delete it and run this again to derive it anew" >&2
  fi
done

if [ ${#created[@]} -gt 0 ]; then
  echo "gen-secrets: created in $dir/: ${created[*]}"
fi
