# syntax=docker/dockerfile:1
#
# One image for the three services: ingest, rater and ledger-writer (the command picks one).
#
#   docker build -t credits:dev .
#   docker run --rm credits:dev ingest --help
#
# Every setting is an environment variable (README.md, "Configuration"). The services bind
# 127.0.0.1 by default; in a container set INGEST_LISTEN, INGEST_METRICS_LISTEN,
# RATER_METRICS_LISTEN and LEDGER_WRITER_METRICS_LISTEN to 0.0.0.0:PORT (this image does, with
# the default ports). No Docker engine runs in our CI: tests/deploy_manifests.rs in `shared`
# checks this file statically (multi-stage, non-root final stage, the --help smoke).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build -------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder

# rdkafka-sys builds librdkafka from source with its mklove `configure` (bash, make, a C/C++
# compiler, perl, pkg-config) and links the system's OpenSSL (feature ssl) and zlib (feature
# libz); zstd and lz4 are built in from the crates' own sources.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential perl pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The cache mounts keep the registry and the build directory between builds; the binaries are
# copied out of the mount, which does not outlive this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins -p ingest -p rater -p ledger-writer \
    && mkdir -p /out \
    && cp target/release/ingest target/release/rater target/release/ledger-writer /out/

# --- run ---------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# libssl3 and zlib1g: what librdkafka links dynamically; ca-certificates: TLS to managed Kafka,
# Postgres and Redis (rustls reads the system's roots too).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*

# A numeric user, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN groupadd --system --gid 10001 credits \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin credits

COPY --from=builder /out/ingest /out/rater /out/ledger-writer /usr/local/bin/

# Listen on every interface inside the container (the binaries' defaults are loopback).
ENV INGEST_LISTEN=0.0.0.0:8080 \
    INGEST_METRICS_LISTEN=0.0.0.0:9100 \
    RATER_METRICS_LISTEN=0.0.0.0:9101 \
    LEDGER_WRITER_METRICS_LISTEN=0.0.0.0:9102

USER 10001:10001

# Smoke: the binaries start and their shared libraries resolve in this image.
RUN ingest --help && rater --help && ledger-writer --help

# 8080: ingest's HTTP API; 9100-9102: /healthz, /readyz, /metrics of ingest, rater, ledger-writer.
EXPOSE 8080 9100 9101 9102

# No entrypoint: the command names the service, e.g. `ingest`, `rater`, `ledger-writer`,
# `ledger-writer migrate`.
CMD ["ingest"]
