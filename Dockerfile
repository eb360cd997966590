# syntax=docker/dockerfile:1
#
# The `cybernetic` image: one binary for every role (serve, worker, migrate, operator commands).
#   docker build -t cybernetic:local .
# Stages: chef (toolchain + cargo-chef) -> planner (dependency recipe) -> builder (dependencies
# cached in their own layer, then the crate) -> runtime (debian slim, the binary only).
# See docs/deployment.md.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS chef
# Pinned so a new cargo-chef release cannot change the recipe format under a cached layer.
ARG CARGO_CHEF_VERSION=0.1.77
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

# The recipe lists only what decides the dependency build (manifests, lock file, target
# skeletons), so the cook layer below is reused until one of those changes.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The build never reaches for a database: the queries are checked at run time (no compile-time
# query macros, so there is no .sqlx/ data), and SQLX_OFFLINE keeps it that way if one is added.
ENV SQLX_OFFLINE=true
COPY --from=planner /src/recipe.json recipe.json
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo chef cook --release --locked --bin cybernetic --recipe-path recipe.json
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked --bin cybernetic \
 && install -D -m 0755 target/release/cybernetic /out/cybernetic

FROM ${RUNTIME_IMAGE} AS runtime
# TLS (PostgreSQL verify-full, S3, Telegram, webhooks) uses the system roots through rustls.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cybernetic \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin cybernetic \
 && install -d -o 10001 -g 10001 -m 0750 /app /app/data
COPY --from=builder /out/cybernetic /usr/local/bin/cybernetic
# The migrations are compiled into the binary; the SQL is shipped too so operators can read
# exactly what `cybernetic migrate` applies.
COPY migrations/ /app/migrations/
WORKDIR /app
USER 10001:10001
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080
# `cybernetic healthcheck` asks /health/ready on LISTEN_ADDR: no curl needed in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["cybernetic", "healthcheck"]
ENTRYPOINT ["cybernetic"]
CMD ["serve"]
