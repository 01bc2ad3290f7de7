#!/usr/bin/env bash
# Certificates and a bearer token for docker-compose.secure.yml, made with openssl alone (no
# hitcounter binary needed):
#
#   bash deploy/compose/make-secrets.sh [DIR]        # DIR defaults to deploy/compose/secrets
#
# Two certificate authorities, so that a certificate made for the public side can never open the
# internal one:
#   ca.pem              public CA: give it to clients (hitctl --ca-cert, grpcurl -cacert)
#   server.pem/.key     ingest's and query's certificate (localhost, 127.0.0.1, ingest, query)
#   internal-ca.pem     internal CA: the aggregator trusts client certificates it signed, and
#                       ingest and query trust the aggregator's certificate by it
#   aggregator.pem/.key the aggregator's server certificate (aggregator)
#   internal-client.pem/.key  the client certificate ingest and query present to the aggregator
#   tokens.toml         the services' tokens file: one entry, "demo", roles write and read
#   token               the demo token itself (only the services' SHA-256 of it is in tokens.toml)
#
# The CA keys (ca.key, internal-ca.key) and the token stay readable by you only. The files the
# containers read must be readable by the image's user (uid 10001): run as root, the keys are
# given to uid 10001 (mode 0600); otherwise they are made readable by every user of this machine
# (mode 0644), which is fine for trying it out and not for production (use your secret store).
# Refuses to overwrite an existing DIR/ca.pem: remove DIR to start over. Certificates last 90 days.
# More tokens: `hitctl token new --name NAME --role write …`, appended to DIR/tokens.toml (the
# services re-read it within 2 s).
set -euo pipefail
# DIR is relative to where you run the script; the default sits next to it.
dir=${1:-$(dirname "$0")/secrets}
command -v openssl >/dev/null 2>&1 || { echo "openssl is not on PATH" >&2; exit 1; }
if [ -e "$dir/ca.pem" ]; then
  echo "$dir/ca.pem exists: remove $dir to make new secrets" >&2
  exit 1
fi
mkdir -p "$dir"
# The containers (uid 10001) must be able to enter it.
chmod 0755 "$dir"
cd "$dir"
umask 077
days=90

# ca NAME: a self-signed CA, NAME.pem and NAME.key.
ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=hitcounter $1" -keyout "$1.key" -out "$1.pem" 2>/dev/null
}
# leaf NAME CA USAGE SANS: NAME.pem/NAME.key signed by CA, for USAGE (serverAuth, clientAuth).
leaf() {
  local name=$1 ca=$2 usage=$3 sans=$4
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=hitcounter $name" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf 'extendedKeyUsage=%s\n%s' "$usage" "${sans:+subjectAltName=$sans}" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "$ca.key" -CAcreateserial \
    -days "$days" -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

ca ca
ca internal-ca
leaf server ca serverAuth "DNS:localhost,IP:127.0.0.1,DNS:ingest,DNS:query"
leaf aggregator internal-ca serverAuth "DNS:aggregator,DNS:localhost"
leaf internal-client internal-ca clientAuth ""
rm -f ./*.srl

# The token: hc_ and 43 base64url characters (32 random bytes), as `hitctl token new` makes them.
token="hc_$(openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n')"
sha=$(printf '%s' "$token" | openssl dgst -sha256 -r | cut -d' ' -f1)
printf '%s\n' "$token" >token
cat >tokens.toml <<TOML
# The services' tokens (bash deploy/compose/make-secrets.sh); add more with hitctl token new.
[[token]]
name = "demo"
sha256 = "$sha"
roles = ["write", "read"]
TOML

# What the containers read: certificates and the tokens file readable by all, keys by uid 10001.
chmod 0644 ./*.pem tokens.toml
for key in server.key aggregator.key internal-client.key; do
  if [ "$(id -u)" = 0 ]; then
    chown 10001 "$key"
  else
    chmod 0644 "$key"
  fi
done
echo "secrets written to $(pwd)"
echo "token (also in $(pwd)/token): $token"
