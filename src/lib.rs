//! amqp-iam-gateway: a TLS AMQP 0-9-1 gateway that authenticates RabbitMQ clients with
//! AWS STS web identity tokens (JWTs) and enforces RabbitMQ OAuth 2.0 permissions on every
//! operation before relaying the session to RabbitMQ.
//!
//! ```text
//!  client ──TLS──▶ proxy (accept, PROXY header, TLS) ──▶ proxy::conn (one connection)
//!                    │  amqp::handshake (sans-IO): header, start, start-ok
//!                    │  auth::jwt (pure) + auth::keys (JWKS, the only IdP IO)
//!                    │  auth::scopes (claims → scopes, RabbitMQ 4.2 rules)
//!                    │  authz::permissions (scopes → grants, wildcard matcher)
//!                    ▼
//!                  proxy::relay ──▶ RabbitMQ (service user or backend token, client's vhost)
//!                    │  amqp::frame: check-then-split, content frames untouched
//!                    │  amqp::session: decode only what authorisation needs
//!                    │  authz::decide (pure): operation → permit | denial
//! ```
//!
//! Module map (the dependency graph between them, which has no cycles, is in
//! `ARCHITECTURE.md`; `scripts/module-graph.py` checks it in the test command):
//! - [`amqp`]: sans-IO AMQP 0-9-1: framing, field tables, the methods the gateway inspects,
//!   reply codes, the client-side handshake and the authorised session.
//! - [`auth`]: JWT verification (pure), key sets and JWKS fetching, scope normalisation, the
//!   edge token policy, backend tokens, internal users' source rules.
//! - [`authz`]: the permission table, RabbitMQ's wildcard matcher and the per-method
//!   authorisation decision (pure).
//! - [`config`]: raw TOML to a validated typed config, every error reported at once; the
//!   `rabbitmq.conf` importer.
//! - [`wiring`]: adapters from the validated config to the runtime objects (`auth`).
//! - [`telemetry`]: the Prometheus metrics and the audit log (a leaf).
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`, `POST /reload`),
//!   which knows the gateway only through [`admin::Control`].
//! - [`mgmt`]: management API requests judged without IO: where credentials are, how a
//!   request is rewritten for the broker, route names, protected users.
//! - [`proxy`]: sockets and the composition root: listeners, TLS, the per-connection
//!   session and the relay, backend nodes and their health checks, the management API
//!   listener.
//! - [`cli`]: the operator commands `explain`, `import-rabbitmq-conf` and `backend-setup`'s
//!   broker lines.
//! - `devmode` and `sts` (the default `sts-emulator` feature): zero-config development mode
//!   (embedded issuer + gateway) and `token`; the embedded AWS STS issuer
//!   (`GetWebIdentityToken` over the STS Query API, SigV4 verified, tokens with the AWS
//!   shape, persisted keys with rotation, OIDC discovery and JWKS).
#![forbid(unsafe_code)]

pub mod admin;
pub mod amqp;
pub mod auth;
pub mod authz;
pub mod cli;
pub mod config;
#[cfg(feature = "sts-emulator")]
pub mod devmode;
pub mod mgmt;
pub mod proxy;
#[cfg(feature = "sts-emulator")]
pub mod sts;
pub mod telemetry;
pub mod wiring;
