# The hitcounter image: `hitcounter` (all roles in one process), the three service binaries and
# `hitctl` in one image; compose picks the command (it runs the services separately).
# Multi-stage: build in the official Rust image, run in slim Debian as a non-root user.
# Needs internet (Docker Hub). Without it: `bash tests/compose/up-offline.sh` builds an image of
# the same name from the binaries built on this machine (tests/compose/Dockerfile.local).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/hitcounter target/release/hitcounter-ingest target/release/hitcounter-aggregator \
       target/release/hitcounter-query target/release/hitctl /out/

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/hitcounter --create-home hitcounter \
 && mkdir -p /var/lib/hitcounter/data && chown hitcounter /var/lib/hitcounter/data
COPY --from=build /out/ /usr/local/bin/
USER hitcounter
WORKDIR /var/lib/hitcounter
# gRPC: ingest 50051, aggregator 50052, query 50053; /metrics: 9101, 9102, 9103.
EXPOSE 50051 50052 50053 9101 9102 9103
CMD ["hitcounter-ingest", "--help"]
