#!/usr/bin/env bash
# Compose smoke test: builds a local image from the binaries built here, brings the stack up with
# the user-facing docker-compose.yml, and checks it end to end with the real grpcurl and hitctl:
# health-ordered start-up, exact counts, aggregator killed → query UNAVAILABLE fast while ingest
# keeps accepting, aggregator started again → the hits accepted meanwhile are counted exactly.
# Always tears the stack down. Skips (exit 0, with the reason) when no Docker engine answers.
#
#   bash tests/compose/smoke.sh [--profile debug|release]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
profile=debug
[ "${1:-}" = "--profile" ] && profile=${2:-debug}

if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED compose smoke test: no Docker engine answers (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "SKIPPED compose smoke test: neither 'docker compose' nor 'docker-compose' is installed"
  exit 0
fi
project=hitcounter-smoke
dc() { "${compose[@]}" -p "$project" -f "$root/docker-compose.yml" "$@"; }
ctx=$(mktemp -d)
cleanup() {
  status=$?
  if [ $status -ne 0 ]; then
    echo "--- compose logs (failure) ---"
    dc logs --no-color --tail 50 || true
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$ctx"
  exit $status
}
trap cleanup EXIT

echo "==> building binaries ($profile) and the local image"
if [ "$profile" = release ]; then cargo build --release --bins; else cargo build --bins; fi
bins=(hitcounter-ingest hitcounter-aggregator hitcounter-query hitctl)
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/var/lib/hitcounter/data" "$ctx/rootfs/tmp"
for bin in "${bins[@]}"; do
  cp "target/$profile/$bin" "$ctx/rootfs/usr/local/bin/"
  # Every shared library the binary needs, at its absolute path, plus the loader.
  for lib in $(ldd "target/$profile/$bin" | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
done
cp tests/compose/Dockerfile.local "$ctx/Dockerfile"
# The service user (uid 10001) owns its state directory.
chmod -R a+rwx "$ctx/rootfs/var/lib/hitcounter" "$ctx/rootfs/tmp"
docker build -q -t hitcounter:latest "$ctx" >/dev/null

echo "==> docker compose up"
dc down -v --remove-orphans >/dev/null 2>&1 || true
dc up -d --no-build

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
for service in aggregator ingest query; do wait_healthy "$service"; done
echo "all services healthy"

hitctl=(target/$profile/hitctl --ingest 127.0.0.1:50051 --query 127.0.0.1:50053)
run_id=$(date +%s%N)
key="/smoke/$run_id"

echo "==> hits through grpcurl and hitctl, exact counts back through query"
grpcurl -plaintext -d "{\"key\": \"$key\", \"count\": 3}" 127.0.0.1:50051 hitcounter.v1.Ingest/RecordHit >/dev/null
"${hitctl[@]}" hit "$key" --count 4 >/dev/null
expect_count() {
  local key=$1 want=$2 deadline=$((SECONDS + ${3:-5})) got
  while :; do
    got=$(grpcurl -plaintext -d "{\"key\": \"$key\", \"window_seconds\": 300}" 127.0.0.1:50053 \
      hitcounter.v1.Query/GetHits 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", "0"))' || echo error)
    [ "$got" = "$want" ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "count of $key: want $want, got $got"
      return 1
    fi
    sleep 0.1
  done
}
expect_count "$key" 7
[ "$("${hitctl[@]}" get "$key" --window 5m --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')" = 7 ]
echo "count of $key is 7 through grpcurl and hitctl"

echo "==> aggregator killed: query fails fast with UNAVAILABLE, ingest keeps accepting"
dc kill aggregator >/dev/null
outage="/smoke/$run_id/outage"
accepted=0
for _ in $(seq 1 20); do
  "${hitctl[@]}" hit "$outage" --count 5 >/dev/null
  accepted=$((accepted + 5))
done
echo "ingest accepted $accepted hits while the aggregator was down"
deadline=$((SECONDS + 30))
while :; do
  start=$(date +%s%N)
  if out=$("${hitctl[@]}" get "$key" 2>&1); then
    echo "query still answered with the aggregator down: $out"; exit 1
  fi
  elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  if echo "$out" | grep -q "circuit open"; then break; fi
  echo "$out" | grep -q UNAVAILABLE || { echo "unexpected error: $out"; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "breaker never opened: $out"; exit 1; }
  sleep 0.2
done
echo "query answered '$out' in ${elapsed_ms} ms (hitctl process included)"

echo "==> aggregator started again: the hits accepted meanwhile are counted exactly"
dc start aggregator >/dev/null
wait_healthy aggregator
expect_count "$outage" "$accepted" 30
echo "count of $outage is $accepted"
# The aggregator keeps its window state in memory until durable checkpoints land (issue #4):
# the hits counted before the kill are gone after the restart, so they are not checked here.
echo "compose smoke test passed"
