//! Configuration: the TOML file to a validated, typed [`Config`], every problem reported at once.
//!
//! Two stages. [`raw`] deserialises the file as written (every key optional, unknown keys
//! rejected at every level); [`validate`] applies the documented `DEFAULT_*` values, resolves
//! relative paths against the config file's directory and collects *every* semantic problem
//! into [`ConfigErrors`], so an operator fixes a broken file in one round instead of one error
//! per restart. The `[oauth2]` table keeps RabbitMQ's `auth_oauth2.*` key names so an Amazon MQ
//! or RabbitMQ configuration carries over line by line.
//!
//! **Invariant:** this module binds no socket and contacts no server. It only checks that
//! referenced files exist and can be opened (and that can be switched off with
//! [`CheckFiles::No`]); it never parses certificates or keys: that belongs to the code that
//! uses them.

pub mod import;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Defaults and bounds. Each is what an absent key means, or a limit validation enforces.
// ---------------------------------------------------------------------------------------------

/// `listener.address`: the AMQPS listener, on the IANA port for AMQP over TLS.
pub const DEFAULT_LISTENER_ADDRESS: &str = "0.0.0.0:5671";
/// `listener.max_connections`: client connections open at once; a connection accepted
/// beyond it is closed at once (counted as `connections_closed_total{cause="limit"}`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// `listener.handshake_timeout_ms`: TLS plus AMQP handshake up to authentication must finish
/// within this, so an idle or slow peer cannot hold a slot before it has authenticated.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Upper bound of `listener.handshake_timeout_ms`: five minutes is already generous for a
/// handshake; more lets idle unauthenticated sockets pile up.
pub const MAX_HANDSHAKE_TIMEOUT_MS: u64 = 300_000;
/// `listener.max_preauth_frame`: largest frame accepted before authentication. STS tokens with
/// session tags reach several KiB, so this is well above AMQP's 4096-byte `frame-min-size`.
pub const DEFAULT_MAX_PREAUTH_FRAME: u32 = 65_536;
/// Lower bound of `listener.max_preauth_frame`: below this, large STS tokens no longer fit.
pub const MIN_MAX_PREAUTH_FRAME: u32 = 16_384;
/// Upper bound of `listener.max_preauth_frame`: an unauthenticated peer must not make the
/// gateway buffer more than this per connection.
pub const MAX_MAX_PREAUTH_FRAME: u32 = 1_048_576;
/// `listener.auth_failure_delay_ms`: RabbitMQ closes the socket 3 s after a refused login when
/// the client lacks the `authentication_failure_close` capability; the gateway does the same,
/// which also slows down password guessing.
pub const DEFAULT_AUTH_FAILURE_DELAY_MS: u64 = 3_000;
/// `listener.drain_period_ms`: after SIGTERM, clients keep working this long (while a load
/// balancer stops sending new ones) before they are sent `connection.close 320`.
pub const DEFAULT_DRAIN_PERIOD_MS: u64 = 5_000;
/// `listener.drain_deadline_ms`: after SIGTERM, connections still open this long are cut.
pub const DEFAULT_DRAIN_DEADLINE_MS: u64 = 30_000;
/// Upper bound of the drain settings.
pub const MAX_DRAIN_MS: u64 = 3_600_000;
/// Upper bound of `listener.auth_failure_delay_ms`: each delayed socket holds a connection slot.
pub const MAX_AUTH_FAILURE_DELAY_MS: u64 = 60_000;
/// `listener.channel_max`: RabbitMQ's default `channel_max`.
pub const DEFAULT_CHANNEL_MAX: u16 = 2_047;
/// `listener.frame_max`: RabbitMQ's default `frame_max` (128 KiB).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;
/// Lower bound of `listener.frame_max`: AMQP 0-9-1's `frame-min-size`.
pub const MIN_FRAME_MAX: u32 = 4_096;
/// Upper bound of `listener.frame_max`: every relayed frame may be buffered whole, so this
/// bounds per-connection memory.
pub const MAX_FRAME_MAX: u32 = 16 * 1_048_576;
/// `listener.heartbeat`: seconds; RabbitMQ's default. `0` disables heartbeats.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 60;
/// `listener.consumer_max_per_channel`: RabbitMQ's `consumer_max_per_channel` (unlimited
/// there); the gateway tracks every consumer, so it sets one.
pub const DEFAULT_CONSUMER_MAX_PER_CHANNEL: usize = 1_024;
/// `listener.consumer_max_per_connection`: consumers on all channels of a connection.
pub const DEFAULT_CONSUMER_MAX_PER_CONNECTION: usize = 10_000;
/// Upper bound of both consumer limits.
pub const MAX_CONSUMER_MAX: u64 = 1_000_000;

/// Upper bound of `runtime.worker_threads`.
pub const MAX_WORKER_THREADS: u64 = 1_024;

/// `backend.nodes`: a RabbitMQ node on the same host, plain AMQP.
pub const DEFAULT_BACKEND_NODE: &str = "127.0.0.1:5672";
/// `backend.connect_timeout_ms`: TCP plus AMQP handshake with a backend node.
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Upper bound of `backend.connect_timeout_ms`: an authenticated client waits on it.
pub const MAX_BACKEND_CONNECT_TIMEOUT_MS: u64 = 300_000;
/// `backend.close_timeout_ms`: how long the broker may leave a `channel.close` of the
/// gateway's unanswered before the connection ends with `541` (RabbitMQ answers at once,
/// unless its channel crashed). Twice RabbitMQ's own `channel_operation_timeout`.
pub const DEFAULT_BACKEND_CLOSE_TIMEOUT_MS: u64 = 30_000;
/// `backend.health_check_interval_ms`: how often each backend node's port is checked in the
/// background (TCP connect). Nodes that fail the check are tried last by the balancer, and
/// `/readyz` reports the latest result instead of connecting on every probe.
pub const DEFAULT_BACKEND_HEALTH_CHECK_INTERVAL_MS: u64 = 2_000;
/// Bounds of `backend.health_check_interval_ms`.
pub const MIN_BACKEND_HEALTH_CHECK_INTERVAL_MS: u64 = 100;
pub const MAX_BACKEND_HEALTH_CHECK_INTERVAL_MS: u64 = 300_000;
/// Bounds of `backend.close_timeout_ms`.
pub const MIN_BACKEND_CLOSE_TIMEOUT_MS: u64 = 100;
pub const MAX_BACKEND_CLOSE_TIMEOUT_MS: u64 = 600_000;
/// `backend.max_connecting`: connects in progress to one node at a time. Well under
/// RabbitMQ's listen backlog (128), so a reconnection storm queues in the gateway instead of
/// overflowing the node's accept queue (dropped SYNs come back only after 1 s, 3 s, 7 s).
pub const DEFAULT_BACKEND_MAX_CONNECTING: usize = 32;
/// Upper bound of `backend.max_connecting`.
pub const MAX_BACKEND_MAX_CONNECTING: u64 = 10_000;
/// `backend.exchange_type_ttl_ms`: how long an exchange type learnt from the management API
/// (or a declare) is trusted when the management API is configured.
pub const DEFAULT_EXCHANGE_TYPE_TTL_MS: u64 = 10_000;
/// Bounds of `backend.exchange_type_ttl_ms`.
pub const MIN_EXCHANGE_TYPE_TTL_MS: u64 = 100;
pub const MAX_EXCHANGE_TYPE_TTL_MS: u64 = 3_600_000;
/// `backend.exchange_lookups_per_second`: management API requests one client connection
/// may cause per second (a burst of twice as many); more wait.
pub const DEFAULT_EXCHANGE_LOOKUPS_PER_SECOND: u32 = 10;
/// Upper bound of `backend.exchange_lookups_per_second`.
pub const MAX_EXCHANGE_LOOKUPS_PER_SECOND: u64 = 10_000;

/// `oauth2.preferred_username_claims`: RabbitMQ 4.1+'s default.
pub const DEFAULT_PREFERRED_USERNAME_CLAIMS: [&str; 2] = ["sub", "client_id"];
/// `oauth2.verify_aud`: RabbitMQ's default.
pub const DEFAULT_VERIFY_AUD: bool = true;
/// `oauth2.require_exp`: RabbitMQ's default (4.2.9+).
pub const DEFAULT_REQUIRE_EXP: bool = true;
/// `oauth2.algorithms`: the two algorithms STS `GetWebIdentityToken` signs with.
pub const DEFAULT_ALGORITHMS: [JwtAlgorithm; 2] = [JwtAlgorithm::RS256, JwtAlgorithm::ES384];
/// `oauth2.leeway_seconds`: clock skew tolerated on `nbf` and `iat` (RabbitMQ checks neither).
pub const DEFAULT_LEEWAY_SECONDS: u64 = 60;
/// Upper bound of `oauth2.leeway_seconds`: more would quietly disable the checks, and usually
/// means milliseconds were written where seconds were meant.
pub const MAX_LEEWAY_SECONDS: u64 = 3_600;
/// `oauth2.check_iat`: reject tokens issued in the future (beyond the leeway).
pub const DEFAULT_CHECK_IAT: bool = true;
/// `oauth2.check_nbf`: reject tokens not yet valid (beyond the leeway).
pub const DEFAULT_CHECK_NBF: bool = true;
/// `oauth2.jwks_refresh_seconds`: periodic JWKS refresh, so rotated keys are picked up
/// without waiting for a token with an unknown `kid`.
pub const DEFAULT_JWKS_REFRESH_SECONDS: u64 = 600;
/// Upper bound of `oauth2.jwks_refresh_seconds`: a revoked key must not linger for days.
pub const MAX_JWKS_REFRESH_SECONDS: u64 = 86_400;
/// `oauth2.jwks_min_refetch_interval_ms`: minimum time between JWKS fetches triggered by an
/// unknown `kid`. The `kid` is chosen by an unauthenticated client, so without this limit every
/// forged token would cost a request to the identity provider.
pub const DEFAULT_JWKS_MIN_REFETCH_INTERVAL_MS: u64 = 1_000;
/// Upper bound of `oauth2.jwks_min_refetch_interval_ms`: a key rotated at the identity
/// provider must still be picked up within the hour.
pub const MAX_JWKS_MIN_REFETCH_INTERVAL_MS: u64 = 3_600_000;
/// `oauth2.http_timeout_ms`: timeout of each JWKS or OIDC discovery request.
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 5_000;
/// Upper bound of `oauth2.http_timeout_ms`: clients wait on this during a key refetch.
pub const MAX_HTTP_TIMEOUT_MS: u64 = 120_000;
/// `oauth2.token_cache_size`: verified tokens cached (by SHA-256), so a reconnect storm of
/// one token costs one signature check; 0 disables the cache.
pub const DEFAULT_TOKEN_CACHE_SIZE: u64 = crate::auth::DEFAULT_TOKEN_CACHE_SIZE;
/// Upper bound of `oauth2.token_cache_size` (an entry is a token's claims, about 1 KiB).
pub const MAX_TOKEN_CACHE_SIZE: u64 = 10_000_000;
/// `oauth2.jwks_stale_grace_seconds`: how long keys fetched from the issuer keep verifying
/// while every fetch fails, counted from the last successful fetch.
pub const DEFAULT_JWKS_STALE_GRACE_SECONDS: u64 = 86_400;
/// Upper bound of `oauth2.jwks_stale_grace_seconds`: 30 days.
pub const MAX_JWKS_STALE_GRACE_SECONDS: u64 = 2_592_000;

/// `admin.address`: `/metrics`, `/healthz`, `/readyz`; loopback so metrics are not public.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15693";
/// `log.level`: a level or a `tracing_subscriber::EnvFilter` directive list.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// `log.format`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

/// The validated configuration. Every field holds a checked value with defaults applied and
/// paths resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listener: ListenerConfig,
    pub backend: BackendConfig,
    pub oauth2: OAuth2Config,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub auth: AuthConfig,
    pub authorization: AuthorizationConfig,
    /// `[management]`; `None`: no management listener.
    pub management: Option<ManagementConfig>,
    #[cfg(feature = "test-switches")]
    pub testing: TestingConfig,
}

/// `[authorization]`: the broker policies (IAM JSON documents, compiled) and how they
/// combine with the scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizationConfig {
    pub mode: crate::authz::iam::Mode,
    /// The documents' paths, resolved against the config file's directory.
    pub policies: Vec<PathBuf>,
    /// Their statements, compiled; empty without documents (or when files were not read).
    pub set: std::sync::Arc<crate::authz::iam::PolicySet>,
}

impl AuthorizationConfig {
    /// Whether policies take part in decisions at all.
    pub fn active(&self) -> bool {
        !self.set.is_empty() || self.mode != crate::authz::iam::Mode::Scopes
    }
}

/// Default `management.address`: the management plugin's TLS port.
pub const DEFAULT_MANAGEMENT_ADDRESS: &str = "0.0.0.0:15671";
/// Default `management.max_body_bytes`: RabbitMQ's own `management.http_max_body_size`.
pub const DEFAULT_MANAGEMENT_MAX_BODY: u64 = 20_000_000;
pub const MAX_MANAGEMENT_MAX_BODY: u64 = 1 << 30;
/// Default `management.max_header_bytes` (the request line and headers together; a
/// token in a Basic header is a few KiB). hyper takes no less than 8 KiB.
pub const DEFAULT_MANAGEMENT_MAX_HEADER: u64 = 32 * 1024;
pub const MIN_MANAGEMENT_MAX_HEADER: u64 = 8 * 1024;
pub const MAX_MANAGEMENT_MAX_HEADER: u64 = 1024 * 1024;
pub const DEFAULT_MANAGEMENT_HEADER_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MANAGEMENT_REQUEST_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_MANAGEMENT_IDLE_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MANAGEMENT_MAX_CONNECTIONS: u64 = 1_024;
pub const DEFAULT_MANAGEMENT_MAX_CONCURRENT: u64 = 128;

/// `[management]`: the HTTPS listener in front of RabbitMQ's management API. Requests with
/// a valid token go on with a backend token the gateway mints (`backend.auth = "token"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementConfig {
    pub address: SocketAddr,
    /// Certificate and key (default: the AMQPS listener's).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The broker's management API (default: `backend.management_url`).
    pub backend_url: String,
    /// A PROXY v1/v2 header before TLS, as on the AMQPS listener.
    pub proxy_protocol: bool,
    /// Largest request body (a definitions import), in bytes.
    pub max_body_bytes: u64,
    /// Largest request line plus headers, in bytes.
    pub max_header_bytes: usize,
    /// Time to receive a request's headers (and, between requests, how long an idle
    /// keep-alive connection is kept).
    pub header_timeout: Duration,
    /// Time from a request's headers to the broker's response headers, the request body
    /// included.
    pub request_timeout: Duration,
    /// Longest pause inside a response body.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Requests in progress at once; more get `503`.
    pub max_concurrent_requests: usize,
    /// Users that cannot be changed or deleted through the gateway (RabbitMQ 4.2's
    /// `protected` tag): Amazon MQ's monitoring user, the service user.
    pub protected_users: Vec<String>,
}

/// `[testing]`: switches that exist in test builds only (the `test-switches` feature).
#[cfg(feature = "test-switches")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestingConfig {
    /// `false`: token sessions skip the gateway's per-method decisions, leaving them to the
    /// broker (which then must verify backend tokens: `backend.auth = "token"` is required).
    /// Default `true`.
    pub gateway_decisions: bool,
}

/// An authentication backend of the chain, RabbitMQ's `auth_backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthBackend {
    /// Tokens, verified by the gateway (`rabbit_auth_backend_oauth2`); the gateway
    /// authorises every operation and relays with its service user.
    OAuth2,
    /// The broker's own users (`rabbit_auth_backend_internal`): the gateway logs in to the
    /// broker with the client's credentials, and the broker authorises the session.
    Internal,
}

impl AuthBackend {
    /// The name in the configuration, the metrics and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthBackend::OAuth2 => "oauth2",
            AuthBackend::Internal => "internal",
        }
    }
}

/// `[auth]`: RabbitMQ's `auth_backends` chain and `loopback_users`, plus per-user source
/// networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Tried in order until one accepts; never empty, no repeats. Default: tokens only.
    pub backends: Vec<AuthBackend>,
    /// Users who may log in only from a loopback address (the client's real address, the
    /// PROXY header's when enabled). Default: `guest`, as in RabbitMQ.
    pub loopback_users: Vec<String>,
    /// Users who may log in only from these networks (a gateway addition).
    pub sources: BTreeMap<String, Vec<ipnet::IpNet>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            backends: vec![AuthBackend::OAuth2],
            loopback_users: vec![DEFAULT_LOOPBACK_USER.to_owned()],
            sources: BTreeMap::new(),
        }
    }
}

impl AuthConfig {
    /// The backends in the order a password is tried: as configured, except that a
    /// JWT-shaped password goes to `oauth2` first when the chain has it. With `internal`
    /// before `oauth2`, a token would otherwise reach the broker as a password before the
    /// gateway had checked it, and a broker running its own OAuth 2.0 plugin could accept a
    /// token the gateway refuses (RabbitMQ checks no `nbf`, no `iss` and no token policy).
    /// Any other password keeps the configured order.
    pub fn order_for(&self, jwt_shaped: bool) -> impl Iterator<Item = AuthBackend> + '_ {
        let first = (jwt_shaped && self.backends.contains(&AuthBackend::OAuth2))
            .then_some(AuthBackend::OAuth2);
        first.into_iter().chain(
            self.backends
                .iter()
                .copied()
                .filter(move |b| Some(*b) != first),
        )
    }
}

/// RabbitMQ's default `loopback_users`.
pub const DEFAULT_LOOPBACK_USER: &str = "guest";

/// `[runtime]`: the process's threads. `worker_threads` and `per_core` are read at start
/// only (a reload that changes them is logged as taking effect at the next restart);
/// `busy_poll` applies to the connections opened after a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Worker threads of the async runtime that relays connections. `None`: the
    /// `TOKIO_WORKER_THREADS` environment variable if set (1 to 1,024, else the gateway
    /// does not start), else one per CPU and one on 2 CPUs or fewer (`per_core`: one per
    /// CPU).
    pub worker_threads: Option<usize>,
    /// One single-threaded runtime per worker, each relaying the connections handed to
    /// it by the acceptor: a connection's client and backend sockets are served by one
    /// thread. `false`: one multi-thread runtime (tokio's work stealing).
    pub per_core: bool,
    /// Bounded busy polling: after moving bytes, a connection's task keeps polling its
    /// sockets for this long before it sleeps, instead of waiting to be woken
    /// (`runtime.busy_poll_us`, default 0: off). It trades a core kept busy for fewer
    /// wake-ups.
    pub busy_poll: std::time::Duration,
}

/// The longest `runtime.busy_poll_us`.
pub const MAX_BUSY_POLL_US: u64 = 1_000;

/// `[listener]`: where clients connect and the limits applied to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The AMQPS listener. `None` only when `plain_address` is set and none of `address`,
    /// `tls_cert`, `tls_key` is; so there is always at least one listener.
    pub tls: Option<TlsListenerConfig>,
    /// The plain AMQP listener, for development and tests only.
    pub plain_address: Option<SocketAddr>,
    pub max_connections: usize,
    /// Connections open at once from one client IP address; 0: no limit.
    pub max_connections_per_source: u32,
    /// Connections open at once for one identity (the token's `sub`); 0: no limit.
    pub max_connections_per_identity: u32,
    /// New connections per second from one client IP address (a token bucket with a burst
    /// of the same size); 0: no limit.
    pub handshakes_per_second_per_source: u32,
    pub handshake_timeout: Duration,
    /// Bytes: the largest frame accepted before authentication.
    pub max_preauth_frame: u32,
    pub auth_failure_delay: Duration,
    /// After SIGTERM: how long established clients may go on before they are sent
    /// `connection.close 320`.
    pub drain_period: Duration,
    /// After SIGTERM: when the remaining connections are cut and the process exits.
    pub drain_deadline: Duration,
    /// Expect a PROXY protocol v1/v2 header before TLS on every listener (behind an AWS
    /// NLB or HAProxy `send-proxy`); its source address is the client's in logs, metrics and
    /// the audit log.
    pub proxy_protocol: bool,
    /// Offered in `connection.tune`; never 0 (which would mean "no limit").
    pub channel_max: u16,
    /// Bytes, offered in `connection.tune`.
    pub frame_max: u32,
    /// Seconds, offered in `connection.tune`; 0 disables heartbeats.
    pub heartbeat: u16,
    /// Consumers on one channel; beyond, `530 NOT_ALLOWED` (RabbitMQ's text).
    pub consumer_max_per_channel: usize,
    /// Consumers on all channels of one connection; beyond, `530 NOT_ALLOWED`.
    pub consumer_max_per_connection: usize,
}

/// The AMQPS listener: address and PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListenerConfig {
    pub address: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `backend.balance`: how a node is chosen for each connection among the healthy ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalancePolicy {
    /// In turn.
    RoundRobin,
    /// The node with the fewest open gateway connections (ties in turn).
    LeastConnections,
}

/// `[backend]`: the RabbitMQ node(s) the gateway relays to, and its service user.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Tried in order; never empty.
    pub nodes: Vec<BackendNode>,
    pub username: String,
    pub password: String,
    pub connect_timeout: Duration,
    /// How long the broker may leave a `channel.close` of the gateway's unanswered (while
    /// it is not blocked by an alarm) before the client is told its refusal and the
    /// connection ends with `541 INTERNAL_ERROR`.
    pub close_timeout: Duration,
    /// Connects (TCP, TLS and AMQP handshake) in progress to one node at a time; more wait
    /// for a slot, for at most `connect_timeout`.
    pub max_connecting: usize,
    /// How often each node's port is checked in the background (TCP connect, bounded by
    /// 1 s and `connect_timeout`).
    pub health_check_interval: Duration,
    /// Base URL of the management HTTP API (`http://host:15672`), used to look up the types
    /// of exchanges the gateway has not seen declared (topic checks apply to topic
    /// exchanges only). `None`: such exchanges are treated as topic exchanges.
    pub management_url: Option<String>,
    /// How long a learnt exchange type is trusted when `management_url` is set.
    pub exchange_type_ttl: Duration,
    /// Management API requests one client connection may cause per second (burst: twice).
    pub exchange_lookups_per_second: u32,
    /// How a node is chosen for each connection among the healthy ones.
    pub balance: BalancePolicy,
    /// TLS to the nodes (`backend.tls = true`); `None`: plain AMQP.
    pub tls: Option<BackendTlsConfig>,
    /// How token sessions log in to the broker.
    pub auth: BackendAuth,
}

/// `backend.auth`: whose credentials a token session's backend connection carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackendAuth {
    /// The service user (`backend.username`), which holds every right: the gateway is the
    /// only guard.
    #[default]
    ServiceUser,
    /// A token the gateway mints for each client (`[backend.token]`), which the broker's
    /// OAuth 2.0 plugin verifies: RabbitMQ enforces the same permissions behind the gateway.
    Token(BackendTokenConfig),
}

/// `[backend.token]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTokenConfig {
    /// PEM private key (RSA, or EC P-256), readable by its owner only.
    pub signing_key: PathBuf,
    /// The `kid` of the minted tokens: the name the broker knows the public key by.
    pub kid: String,
    /// The broker's `auth_oauth2.resource_server_id`: the `aud` of the minted tokens.
    pub resource_server_id: String,
    /// The broker's scope prefix; default `<resource_server_id>.`.
    pub scope_prefix: String,
    /// Keys the gateway signed with before (`kid` → PEM private key, owner-only): no longer
    /// used to sign, still published in the admin listener's JWKS (`/backend-jwks.json`)
    /// while tokens minted with them may be alive, so that a rotation never leaves the
    /// broker without a key.
    pub retired_keys: BTreeMap<String, PathBuf>,
}

/// `backend.tls_*`: TLS from the gateway to the RabbitMQ nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTlsConfig {
    /// PEM file of the CA certificate(s) the nodes' certificates must chain to.
    pub ca: PathBuf,
    /// PEM certificate chain and private key presented to the nodes (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name checked against the nodes' certificates (and sent as SNI); `None`: each
    /// node's own host. Checked to be a valid DNS name or IP address.
    pub server_name: Option<String>,
}

/// Written by hand so the service user's password never reaches a log line.
impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("nodes", &self.nodes)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("max_connecting", &self.max_connecting)
            .field("health_check_interval", &self.health_check_interval)
            .field("management_url", &self.management_url)
            .field("exchange_type_ttl", &self.exchange_type_ttl)
            .field(
                "exchange_lookups_per_second",
                &self.exchange_lookups_per_second,
            )
            .field("balance", &self.balance)
            .field("tls", &self.tls)
            .field("auth", &self.auth)
            .finish()
    }
}

/// One backend node. The host may be a name, so it is resolved when connecting, not here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendNode {
    /// A DNS name or IP address; an IPv6 address is stored without brackets.
    pub host: String,
    pub port: u16,
}

/// `host:port`, with brackets around an IPv6 host: the form `TcpStream::connect` accepts.
impl fmt::Display for BackendNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `[oauth2]`: token verification and scope normalisation, with RabbitMQ's key names. The
/// settings every issuer shares, and the issuers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Config {
    /// Never empty: the `[[oauth2.issuers]]` entries with what they inherit from `[oauth2]`
    /// filled in, or, without them, the root `[oauth2]` keys as the one issuer (named
    /// `default`).
    pub issuers: Vec<IssuerConfig>,
    /// Whether `[[oauth2.issuers]]` are configured: a token's `iss` then chooses its issuer
    /// (otherwise the one issuer takes every token).
    pub dispatch_by_iss: bool,
    /// Never empty.
    pub preferred_username_claims: Vec<String>,
    pub verify_aud: bool,
    pub require_exp: bool,
    /// Clock skew tolerated on `nbf` and `iat`.
    pub leeway: Duration,
    pub check_iat: bool,
    pub check_nbf: bool,
    pub jwks_refresh: Duration,
    pub jwks_min_refetch_interval: Duration,
    pub http_timeout: Duration,
    /// Verified-token cache entries; 0 disables the cache.
    pub token_cache_size: u64,
    /// After this long without a successful fetch (and the latest one failed), fetched
    /// keys stop verifying.
    pub jwks_stale_grace: Duration,
}

/// One `[[oauth2.issuers]]` entry with every inherited value filled in from `[oauth2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// For logs, metrics and `explain`; unique.
    pub name: String,
    /// When set, a token's `iss` must equal it exactly; it selects this entry among
    /// `[[oauth2.issuers]]`, and is the OIDC discovery base when no other key source is
    /// set. `None` only for the one issuer of a config without `[[oauth2.issuers]]` whose
    /// `[oauth2]` sets no `issuer`.
    pub issuer: Option<String>,
    /// From `jwks_uri` or its deprecated alias `jwks_url`.
    pub jwks_uri: Option<String>,
    /// `kid` → PEM file, resolved against the config file's directory.
    pub signing_keys: BTreeMap<String, PathBuf>,
    /// The `kid` assumed for tokens whose header has none.
    pub default_key: Option<String>,
    /// Never empty, no duplicates, in the configured order.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Non-empty, without whitespace: the expected `aud`.
    pub resource_server_id: String,
    /// Resolved: `<resource_server_id>.` when unset; `""` disables prefix filtering.
    pub scope_prefix: String,
    /// Space-separated claim paths, as written (parsing paths is the scope module's job).
    pub additional_scopes_key: Option<String>,
    /// Alias → full scopes (including the prefix), a string value split on whitespace.
    pub scope_aliases: BTreeMap<String, Vec<String>>,
    /// The edge token policy (`[oauth2.policy]`, or the entry's own).
    pub policy: crate::auth::policy::Policy,
}

impl OAuth2Config {
    /// The first issuer: the only one without `[[oauth2.issuers]]`.
    pub fn first_issuer(&self) -> &IssuerConfig {
        &self.issuers[0]
    }
}

/// `[admin]`: the HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A level (`info`) or an `EnvFilter` directive list (`info,amqp_iam_gateway=debug`).
    pub level: String,
    pub format: LogFormat,
    /// Where audit records (one JSON line per authentication decision and per refused
    /// operation) go; `None`: no audit log.
    pub audit: Option<AuditSink>,
}

/// `log.audit`: `"stdout"` or a file path (appended to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The JWS algorithms a token may be signed with. Only asymmetric ones exist here: with an
/// HMAC algorithm the verification key could also mint tokens, and `none` is no signature.
#[allow(clippy::upper_case_acronyms)] // the JOSE names, exactly as they appear in `alg`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JwtAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    /// Every supported algorithm, in the order error messages list them.
    pub const ALL: [JwtAlgorithm; 9] = [
        JwtAlgorithm::RS256,
        JwtAlgorithm::RS384,
        JwtAlgorithm::RS512,
        JwtAlgorithm::PS256,
        JwtAlgorithm::PS384,
        JwtAlgorithm::PS512,
        JwtAlgorithm::ES256,
        JwtAlgorithm::ES384,
        JwtAlgorithm::EdDSA,
    ];

    /// The JOSE `alg` name.
    pub const fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::PS384 => "PS384",
            JwtAlgorithm::PS512 => "PS512",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a [`JwtAlgorithm`]; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseAlgorithmError(String);

/// Exact, case-sensitive match on the JOSE name, as `alg` header values are compared.
impl FromStr for JwtAlgorithm {
    type Err = ParseAlgorithmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(alg) = JwtAlgorithm::ALL.into_iter().find(|a| a.as_str() == s) {
            return Ok(alg);
        }
        let allowed = JwtAlgorithm::ALL.map(JwtAlgorithm::as_str).join(", ");
        let upper = s.to_ascii_uppercase();
        let reason = if upper.starts_with("HS") {
            "is not allowed: with an HMAC algorithm the verification key can also mint tokens"
                .to_owned()
        } else if upper == "NONE" {
            "is not allowed: unsigned tokens are never accepted".to_owned()
        } else if let Some(alg) = JwtAlgorithm::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
        {
            format!("is not an algorithm name (names are case-sensitive: did you mean {alg}?)")
        } else {
            "is not a supported algorithm".to_owned()
        };
        Err(ParseAlgorithmError(format!(
            "{s:?} {reason}; allowed: {allowed}"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The config file itself could not be read.
    #[error("{}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// Not TOML, a value of the wrong type, or an unknown key: the toml crate's message,
    /// which gives the line and column. Parsing stops at the first such error.
    #[error("{0}")]
    Syntax(String),
    /// Well-formed TOML with an unacceptable value. `key` is the dotted path
    /// (`oauth2.algorithms[2]`, `oauth2.signing_keys.k1`).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// The dotted key path for [`ConfigError::Invalid`], `None` otherwise.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax(_) => None,
        }
    }
}

/// Every problem found; never empty. Displays one problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------

/// Whether validation checks that referenced files (TLS certificate and key, signing keys)
/// exist and can be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFiles {
    Yes,
    /// For checking a config on another machine than the one that runs it, and for tests of
    /// example files.
    No,
}

/// Reads, parses and validates the config file at `path`; relative paths inside it are
/// resolved against its directory. Referenced files must exist.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, CheckFiles::Yes)
}

/// [`load`], choosing whether referenced files must exist.
pub fn load_with(path: &Path, check_files: CheckFiles) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let base_dir = path.parent().unwrap_or(Path::new(""));
    parse_with(&text, base_dir, check_files)
}

/// Parses and validates `text`, resolving relative paths against `base_dir`. Referenced files
/// must exist.
pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
    parse_with(text, base_dir, CheckFiles::Yes)
}

/// [`parse`], choosing whether referenced files must exist.
pub fn parse_with(
    text: &str,
    base_dir: &Path,
    check_files: CheckFiles,
) -> Result<Config, ConfigErrors> {
    let raw: raw::RawConfig = toml::from_str(text)
        .map_err(|e| ConfigError::Syntax(e.to_string().trim_end().to_owned()))?;
    validate::validate(raw, base_dir, check_files)
}
