#!/bin/sh
# One-shot (service minio-init, image minio/mc): creates the artifact bucket and the app's own
# MinIO user, allowed only that bucket, so the server never holds the root credentials.
# Idempotent: safe on every `docker compose up`. Reads every credential from Docker secrets.
set -eu

secret() {
  eval "file=\${$1:-}"
  if [ -z "$file" ] || [ ! -s "$file" ]; then
    echo "minio-init: $1 must name a non-empty file (a Docker secret)" >&2
    exit 1
  fi
  # Trailing whitespace is dropped, as MinIO does for its own *_FILE variables.
  sed -e 's/[[:space:]]*$//' "$file"
}

bucket=${S3_BUCKET:?S3_BUCKET is not set}
root_user=$(secret MINIO_ROOT_USER_FILE)
root_password=$(secret MINIO_ROOT_PASSWORD_FILE)
app_key=$(secret S3_ACCESS_KEY_ID_FILE)
app_secret=$(secret S3_SECRET_ACCESS_KEY_FILE)

# The alias comes from the environment, so the root password is never on a command line.
# (scripts/gen-secrets.sh makes URL-safe credentials.)
export MC_HOST_cyb="http://${root_user}:${root_password}@${MINIO_HOST:-minio:9000}"

mc mb --ignore-existing "cyb/${bucket}"

policy=$(mktemp)
cat >"$policy" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::${bucket}"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::${bucket}/*"]
    }
  ]
}
JSON
mc admin policy create cyb cybernetic-app "$policy" >/dev/null
rm -f "$policy"

# Creates the user or resets its secret to the one in the secret file.
mc admin user add cyb "$app_key" "$app_secret" >/dev/null
err=$(mktemp)
if ! mc admin policy attach cyb cybernetic-app --user "$app_key" >/dev/null 2>"$err"; then
  # Attaching a policy the user already has is reported as an error; that is the steady state.
  if ! grep -qi 'already' "$err"; then
    cat "$err" >&2
    exit 1
  fi
fi
rm -f "$err"
echo "minio-init: bucket ${bucket} and its user are in place"
