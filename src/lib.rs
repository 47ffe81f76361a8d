//! amqp-iam-gateway: a TLS AMQP 0-9-1 gateway that authenticates RabbitMQ clients with
//! AWS STS web identity tokens (JWTs) and enforces RabbitMQ OAuth 2.0 permissions on every
//! operation before relaying the session to RabbitMQ.
//!
//! ```text
//!  client ──TLS──▶ proxy::listener ──▶ proxy::session
//!                                       │  amqp::handshake (sans-IO): header, start, start-ok
//!                                       │  auth::verify (pure) + auth::keys (JWKS, the only IdP IO)
//!                                       │  auth::scopes  (claims → scopes, RabbitMQ 4.2 rules)
//!                                       │  authz::Permissions (scopes → grants, wildcard matcher)
//!                                       ▼
//!                                     proxy::relay ──▶ RabbitMQ (service user, client's vhost)
//!                                       │  amqp::frame: check-then-split, content frames untouched
//!                                       │  amqp::method: decode only what authz needs
//!                                       │  authz::decide (pure): operation → permit | denial
//! ```
//!
//! Module map:
//! - [`amqp`]: sans-IO AMQP 0-9-1: framing, the methods the gateway inspects, reply codes,
//!   the client-side handshake state machine.
//! - [`auth`]: JWT verification (pure), key sets and JWKS fetching, scope normalisation,
//!   RabbitMQ's wildcard matcher.
//! - [`authz`]: the permission table and the per-method authorisation decision (pure).
//! - [`config`]: raw TOML to a validated typed config, every error reported at once; the
//!   `rabbitmq.conf` importer.
//! - [`cli`]: the operator commands `explain` and `import-rabbitmq-conf`.
//! - [`devmode`]: zero-config development mode (embedded issuer + gateway) and `token`.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`; the metrics and the audit log.
//! - [`mgmt`]: management API requests judged without IO: where credentials are, how a
//!   request is rewritten for the broker, route names, protected users.
//! - [`proxy`]: sockets only: listeners, TLS, the per-connection session and the relay.
//! - [`sts`]: the embedded AWS STS issuer for development and tests: `GetWebIdentityToken`
//!   over the STS Query API (SigV4 verified), tokens with the AWS shape, persisted keys with
//!   rotation, OIDC discovery and JWKS.
#![forbid(unsafe_code)]

pub mod admin;
pub mod amqp;
pub mod auth;
pub mod authz;
pub mod cli;
pub mod config;
pub mod devmode;
pub mod mgmt;
pub mod proxy;
pub mod sts;
