# amqp-iam-gateway container image.
#
#   docker build -t amqp-iam-gateway .                      # builds the gateway (rust image)
#   docker run --rm -p 127.0.0.1:5671:5671 -v gateway-state:/var/lib/amqp-iam-gateway \
#     amqp-iam-gateway                                      # development mode, see below
#   docker run --rm -v "$PWD/gateway.toml:/etc/amqp-iam-gateway/gateway.toml:ro" ... \
#     amqp-iam-gateway serve --config /etc/amqp-iam-gateway/gateway.toml
#
# Base images are build arguments: the usual public ones by default, local ones where no
# registry is reachable (tests/containers/run.sh imports a debootstrapped Debian bookworm):
#   RUST_IMAGE     the builder       [rust:1-bookworm]
#   RUNTIME_IMAGE  the runtime base  [debian:bookworm-slim]
# Targets:
#   runtime     (the default, last) the gateway built in the `builder` stage, with
#               development mode and the STS emulator (the `sts-emulator` feature)
#   production  the lean gateway (`--no-default-features`: no development mode, no STS
#               emulator), running `serve --config /etc/amqp-iam-gateway/gateway.toml`
#   prebuilt    the runtime with a binary built outside, named by BINARY (a path in the
#               build context, default target/docker/amqp-iam-gateway; glibc of Debian 12
#               or older): what the tests build, since no Rust toolchain image can be
#               pulled there (the scale-out test builds it with the lean binary)
#
# The runtime runs as uid 10001 with no arguments in development mode (embedded issuer,
# self-signed CA) keeping its state in the volume /var/lib/amqp-iam-gateway, or with
# `serve --config FILE`. It drains on SIGTERM (`docker stop`; give it
# `--stop-timeout` above `drain_deadline_ms`) and reloads on SIGHUP (`docker kill -s HUP`).
# Mounted keys and certificates must be readable by uid 10001.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml names benches/core.rs and examples/loadgen.rs, and cargo reads every named
# target's path.
COPY benches ./benches
COPY examples ./examples
# The registry and target caches survive rebuilds (BuildKit); the binary is copied out of
# the cache mount because the mount is gone in later steps.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin amqp-iam-gateway \
    && cp target/release/amqp-iam-gateway /usr/local/bin/amqp-iam-gateway

FROM builder AS builder-production
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin amqp-iam-gateway \
    && cp target/release/amqp-iam-gateway /usr/local/bin/amqp-iam-gateway

FROM ${RUNTIME_IMAGE} AS base
# ca-certificates: the JWKS and OIDC discovery are fetched over HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/amqp-iam-gateway /etc/amqp-iam-gateway \
    && chown 10001:10001 /var/lib/amqp-iam-gateway
# Development mode keeps its CA, certificate, STS keys and backend-token key here.
ENV AMQP_IAM_GATEWAY_STATE=/var/lib/amqp-iam-gateway
VOLUME /var/lib/amqp-iam-gateway
USER 10001:10001
# AMQPS, the STS issuer (development mode), the management API, the admin listener.
EXPOSE 5671 8479 15671 15693
STOPSIGNAL SIGTERM
ENTRYPOINT ["amqp-iam-gateway"]

FROM base AS prebuilt
ARG BINARY=target/docker/amqp-iam-gateway
COPY ${BINARY} /usr/local/bin/amqp-iam-gateway

FROM base AS production
COPY --from=builder-production /usr/local/bin/amqp-iam-gateway /usr/local/bin/amqp-iam-gateway
CMD ["serve", "--config", "/etc/amqp-iam-gateway/gateway.toml"]

FROM base AS runtime
COPY --from=builder /usr/local/bin/amqp-iam-gateway /usr/local/bin/amqp-iam-gateway
