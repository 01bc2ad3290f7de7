#!/usr/bin/env bash
# The cost of authentication + quotas and the fairness they buy, on loopback with the release
# binaries: ingest throughput (hitctl load) and GetHits latency (the get_hits_latency example of
# hitcounter-client) without and with --tokens-file, alternating, 3 rounds; then a client at
# 50k hits/s (quota 60k) alone, next to a flood held to its 20k quota, and next to a flood
# without quota. Figures, not assertions: this machine is shared and noisy.
#
#   cargo build --release --bins && cargo build --release -p hitcounter-client --example get_hits_latency
#   bash crates/auth/bench/auth_cost.sh target/release
set -u
B=$1
D=$(mktemp -d /tmp/authbench.XXXX)
HITCTL=$B/hitctl
new() { $HITCTL --json token new "$@"; }
new --name bench --role admin --hits-per-second 100000000 --requests-per-second 10000000 > $D/bench.json
new --name flood --role write --hits-per-second 20000 --hits-burst 20000 > $D/flood.json
new --name fair --role write --hits-per-second 60000 --hits-burst 60000 > $D/fair.json
new --name flood-unlimited --role write > $D/unl.json
for f in bench flood fair unl; do python3 -c "import json,sys; print(json.load(open('$D/$f.json'))['entry'])" >> $D/tokens.toml; done
tok() { python3 -c "import json; print(json.load(open('$D/$1.json'))['token'])"; }
BENCH=$(tok bench); FLOOD=$(tok flood); FAIR=$(tok fair); UNL=$(tok unl)
PIDS=()
start() { # $1 = auth args (may be empty)
  rm -rf $D/agg $D/ing
  $B/hitcounter-aggregator --listen 127.0.0.1:51052 --data-dir $D/agg --metrics-listen off 2>>$D/agg.log & PIDS+=($!)
  sleep 0.5
  $B/hitcounter-ingest --listen 127.0.0.1:51051 --aggregator http://127.0.0.1:51052 --data-dir $D/ing --metrics-listen off $1 2>>$D/ing.log & PIDS+=($!)
  $B/hitcounter-query --listen 127.0.0.1:51053 --aggregator http://127.0.0.1:51052 --metrics-listen off $1 2>>$D/query.log & PIDS+=($!)
  for i in $(seq 1 100); do $HITCTL --token "$BENCH" health --addr 127.0.0.1:51053 >/dev/null 2>&1 && $HITCTL --token "$BENCH" health --addr 127.0.0.1:51051 >/dev/null 2>&1 && break; sleep 0.1; done
}
stop() { for p in "${PIDS[@]}"; do kill $p 2>/dev/null; done; for p in "${PIDS[@]}"; do wait $p 2>/dev/null; done; PIDS=(); }
load() { $HITCTL --ingest 127.0.0.1:51051 --json "$@" | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"accepted/s {r['accepted_per_second']:.0f}  ack p50 {r['latency_ms']['p50']:.2f} ms  p99 {r['latency_ms']['p99']:.2f} ms  error {r['error']}\")"; }
for round in 1 2 3; do
  for mode in off on; do
    if [ $mode = on ]; then start "--tokens-file $D/tokens.toml"; T="--token $BENCH"; else start ""; T=""; fi
    echo "== round $round, auth+quota $mode"
    echo -n "ingest max (hitctl load 4x1000, 10s): "; load $T load --duration 10s
    echo -n "query: "; $B/examples/get_hits_latency 127.0.0.1:51053 2000 10 ${T:+$BENCH}
    stop
  done
done
echo "== fairness (auth on): fair client at 50k hits/s (quota 60k), flood at max (quota 20k)"
start "--tokens-file $D/tokens.toml"
echo -n "fair alone:             "; load --token "$FAIR" load --rate 50000 --streams 2 --duration 10s --key-prefix fair/
( echo -n "flood (quota 20k/s):    "; load --token "$FLOOD" load --streams 4 --duration 10s --key-prefix flood/ ) > $D/flood.out & FP=$!
echo -n "fair with flood:        "; load --token "$FAIR" load --rate 50000 --streams 2 --duration 10s --key-prefix fair/
wait $FP; cat $D/flood.out
( echo -n "flood (no quota):       "; load --token "$UNL" load --streams 4 --duration 10s --key-prefix flood/ ) > $D/flood.out & FP=$!
echo -n "fair with unlimited flood: "; load --token "$FAIR" load --rate 50000 --streams 2 --duration 10s --key-prefix fair/
wait $FP; cat $D/flood.out
stop
grep -i "warn" $D/*.log | head -5
rm -rf $D
