#!/usr/bin/env bash
# Writes a self-signed certificate and its key, as one PEM file for HAProxy, for local use only:
# CN localhost, SAN DNS:localhost, IP:127.0.0.1 and IP:::1, valid 825 days.
#   scripts/gen-dev-cert.sh [PATH]     (default docker/haproxy/certs/cybernetic.pem)
# An existing file is kept (FORCE=1 replaces it). The file is mode 0644: HAProxy in the Compose
# stack runs as its own user (uid 99) and reads it through a bind mount. A self-signed localhost
# key is no secret worth more; a real certificate's PEM should be readable by uid 99 only
# (see docs/deployment.md#tls).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docker/haproxy/certs/cybernetic.pem}

if [ -s "$out" ] && [ "${FORCE:-0}" != 1 ]; then
  exit 0
fi
command -v openssl >/dev/null || { echo "gen-dev-cert: openssl is required" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 825 \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
  -addext "basicConstraints=critical,CA:FALSE" \
  -addext "keyUsage=critical,digitalSignature" \
  -addext "extendedKeyUsage=serverAuth" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" >"$work/bundle.pem"
chmod 0644 "$work/bundle.pem"
mv -f "$work/bundle.pem" "$out"
echo "gen-dev-cert: wrote $out (self-signed, localhost)"
