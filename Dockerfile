# syntax=docker/dockerfile:1
# amqp-iam-gateway container image.
#
# UNTESTED HERE: no Docker engine runs on the machine where this file was written, so it has
# never been built. It follows the usual two-stage pattern; report what breaks.
#
#   docker build -t amqp-iam-gateway .
#   docker run --rm -v "$PWD/proxy-config/docker.toml:/etc/amqp-iam-gateway/gateway.toml:ro" \
#     -v "$PWD/.dev:/etc/amqp-iam-gateway/certs:ro" -p 127.0.0.1:5671:5671 amqp-iam-gateway
#
# The gateway runs as uid 10001: mounted keys and certificates must be readable by it.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml names benches/core.rs, and cargo reads every named target's path.
COPY benches ./benches
# The registry and target caches survive rebuilds (BuildKit); the binary is copied out of
# the cache mount because the mount is gone in later steps.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin amqp-iam-gateway \
    && cp target/release/amqp-iam-gateway /usr/local/bin/amqp-iam-gateway

FROM debian:bookworm-slim
# ca-certificates: the JWKS and OIDC discovery are fetched over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/amqp-iam-gateway && chown 10001:10001 /var/lib/amqp-iam-gateway
# Development mode keeps its CA, certificate and STS keys here (a volume in docker-compose.yml).
ENV AMQP_IAM_GATEWAY_STATE=/var/lib/amqp-iam-gateway
COPY --from=builder /usr/local/bin/amqp-iam-gateway /usr/local/bin/amqp-iam-gateway
USER 10001:10001
EXPOSE 5671 8479 15671
ENTRYPOINT ["amqp-iam-gateway"]
CMD ["serve", "--config", "/etc/amqp-iam-gateway/gateway.toml"]
