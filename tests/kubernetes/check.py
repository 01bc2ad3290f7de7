"""Consistency checks of the rendered Kubernetes manifests that schemas cannot make.

Usage: python3 check.py RENDERED.yaml OUT_DIR. Writes OUT_DIR/nats-server.conf (the ConfigMap's
NATS config) and OUT_DIR/env-vars ("binary VARIABLE" lines) for validate.sh, and exits non-zero
with a message on the first failed check.
"""

import sys

import yaml

rendered, out_dir = sys.argv[1], sys.argv[2]
objects = [o for o in yaml.safe_load_all(open(rendered)) if o]
by_kind = {}
for o in objects:
    by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o


def fail(message):
    print(f"FAILED: {message}")
    sys.exit(1)


def need(condition, message):
    if not condition:
        fail(message)


def container(workload):
    containers = workload["spec"]["template"]["spec"]["containers"]
    need(len(containers) == 1, f"{workload['metadata']['name']}: one container expected")
    return containers[0]


def env(workload):
    return {e["name"]: e for e in container(workload).get("env", [])}


workloads = {**by_kind.get("StatefulSet", {}), **by_kind.get("Deployment", {})}
for name in ("nats", "aggregator", "ingest", "query"):
    need(name in workloads, f"no workload named {name}")

# Membership: each aggregator announces itself under its pod name (downward API) at its stable
# name through the headless Service; query finds them in the membership (no static list).
agg = workloads["aggregator"]
agg_container = container(agg)
agg_env = env(agg)
replicas = agg["spec"]["replicas"]
for var in ("HITCOUNTER_NODE_INDEX", "HITCOUNTER_NODES"):
    need(var not in agg_env, f"aggregator sets {var} (static placement; the membership replaces it)")
names = [e["name"] for e in agg_container.get("env", [])]
need("POD_NAME" in agg_env and agg_env["POD_NAME"].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
     == "metadata.name", "aggregator: POD_NAME is not the pod's name (downward API metadata.name)")
need(agg_env.get("HITCOUNTER_NODE_ID", {}).get("value") == "$(POD_NAME)",
     "aggregator: HITCOUNTER_NODE_ID is not $(POD_NAME)")
service = agg["spec"]["serviceName"]
need(by_kind["Service"][service]["spec"].get("clusterIP") == "None", "aggregator service not headless")
agg_port = next(p["containerPort"] for p in agg_container["ports"] if p["name"] == "grpc")
advertise = f"http://$(POD_NAME).{service}:{agg_port}"
need(agg_env.get("HITCOUNTER_ADVERTISE", {}).get("value") == advertise,
     f"aggregator: HITCOUNTER_ADVERTISE {agg_env.get('HITCOUNTER_ADVERTISE', {}).get('value')} != {advertise}")
# Kubernetes expands $(VAR) only from variables defined earlier in the list.
for var in ("HITCOUNTER_NODE_ID", "HITCOUNTER_ADVERTISE"):
    need(names.index("POD_NAME") < names.index(var), f"aggregator: POD_NAME must come before {var}")
listen = agg_env.get("HITCOUNTER_LISTEN", {}).get("value", "")
need(listen.endswith(f":{agg_port}"), f"aggregator listens on {listen}, advertises port {agg_port}")
query_env = env(workloads["query"])
for var in ("HITCOUNTER_AGGREGATOR", "HITCOUNTER_NODE_INDEX", "HITCOUNTER_NODES"):
    need(var not in query_env, f"query sets {var} (static placement; it reads the membership)")
need(query_env.get("HITCOUNTER_MEMBERSHIP", {}).get("value") == "true",
     "query: HITCOUNTER_MEMBERSHIP is not \"true\" (without it query uses a static --aggregator list)")
need(query_env["HITCOUNTER_REPLICAS"]["value"] == agg_env["HITCOUNTER_REPLICAS"]["value"],
     "query and aggregators disagree on HITCOUNTER_REPLICAS")
need(int(agg_env["HITCOUNTER_REPLICAS"]["value"]) <= replicas, "more replicas than aggregators")
# A stopping aggregator hands its partitions over, then drains (30 s): the grace must cover both.
grace = agg["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
handoff = int(agg_env.get("HITCOUNTER_HANDOFF_TIMEOUT_SECONDS", {}).get("value", "60"))
need(grace > handoff + 30,
     f"aggregator terminationGracePeriodSeconds {grace}: not above the hand-over ({handoff} s) plus the 30 s drain")
print(f"membership: {replicas} aggregators as $(POD_NAME), advertising {advertise}; query reads the membership")

# NATS: 3 servers, routes and client URLs by the StatefulSet's stable names.
nats = workloads["nats"]
nats_replicas = nats["spec"]["replicas"]
nats_service = nats["spec"]["serviceName"]
need(nats_replicas == 3, "NATS needs 3 servers for R=3")
need(nats["spec"].get("podManagementPolicy") == "Parallel", "NATS pods must start in parallel (quorum)")
need(by_kind["Service"][nats_service]["spec"].get("publishNotReadyAddresses") is True,
     "NATS headless service must publish not-ready addresses (cluster formation)")
conf = by_kind["ConfigMap"]["nats-config"]["data"]["nats-server.conf"]
need("sync_interval: always" in conf, "NATS config lacks sync_interval: always")
for i in range(nats_replicas):
    need(f"nats://nats-{i}.{nats_service}:6222" in conf, f"no route to nats-{i}")
urls = ",".join(f"nats://nats-{i}.{nats_service}:4222" for i in range(nats_replicas))
for name in ("aggregator", "ingest", "query"):
    need(env(workloads[name])["HITCOUNTER_NATS"]["value"] == urls, f"{name}: HITCOUNTER_NATS != {urls}")
open(f"{out_dir}/nats-server.conf", "w").write(conf)
print(f"NATS: {nats_replicas} servers, routes and client URLs {urls}")

# Every workload: hardened, probed, bounded, protected by a PodDisruptionBudget.
pdb_selectors = [p["spec"]["selector"]["matchLabels"] for p in by_kind.get("PodDisruptionBudget", {}).values()]
env_lines = []
for name, workload in workloads.items():
    pod = workload["spec"]["template"]["spec"]
    c = container(workload)
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    need(psc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot")
    need(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
    need(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation")
    need(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities drop ALL")
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            need(resource in c.get("resources", {}).get(kind, {}), f"{name}: {kind}.{resource}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        need(probe in c, f"{name}: no {probe}")
        if name != "nats":
            need(c[probe].get("grpc", {}).get("port") == ports["grpc"],
                 f"{name}: {probe} is not a grpc probe on the grpc port {ports['grpc']}")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    need(any(all(labels.get(k) == v for k, v in s.items()) for s in pdb_selectors),
         f"{name}: no PodDisruptionBudget selects it")
    if name != "nats":
        need(c["image"].startswith("hitcounter:"), f"{name}: image {c['image']}")
        for var in env(workload):
            if var.startswith("HITCOUNTER_"):
                env_lines.append(f"{c['command'][0]} {var}")
need("ingest" in [h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", {}).values()],
     "no HorizontalPodAutoscaler on ingest")
need("replicas" not in workloads["ingest"]["spec"], "ingest sets replicas (the HPA owns it)")
open(f"{out_dir}/env-vars", "w").write("\n".join(env_lines) + "\n")
print(f"hardening, probes, resources, PodDisruptionBudgets: {', '.join(sorted(workloads))}")
