//! Raw TOML values to typed ones: defaults applied, paths resolved, every problem collected.
//!
//! Each section builder always returns a value, substituting a placeholder where a key is
//! invalid, and records the problem in the [`Checker`]. The placeholders never escape: any
//! recorded problem turns the whole result into [`ConfigErrors`]. This keeps the builders
//! straight-line code while still reporting every bad key in one pass.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    RawAdmin, RawAliasValue, RawAuth, RawAuthorization, RawBackend, RawBackendToken, RawConfig,
    RawListener, RawLog, RawManagement, RawOAuth2, RawPolicy,
};
use super::{
    AdminConfig, AuditSink, AuthBackend, AuthConfig, AuthorizationConfig, BackendAuth,
    BackendConfig, BackendNode, BackendTlsConfig, BackendTokenConfig, BalancePolicy, CheckFiles,
    Config, ConfigError, ConfigErrors, DEFAULT_ADMIN_ADDRESS, DEFAULT_ALGORITHMS,
    DEFAULT_AUTH_FAILURE_DELAY_MS, DEFAULT_BACKEND_CLOSE_TIMEOUT_MS,
    DEFAULT_BACKEND_CONNECT_TIMEOUT_MS, DEFAULT_BACKEND_MAX_CONNECTING, DEFAULT_BACKEND_NODE,
    DEFAULT_CHANNEL_MAX, DEFAULT_CHECK_IAT, DEFAULT_CHECK_NBF, DEFAULT_DRAIN_DEADLINE_MS,
    DEFAULT_DRAIN_PERIOD_MS, DEFAULT_FRAME_MAX, DEFAULT_HANDSHAKE_TIMEOUT_MS,
    DEFAULT_HEARTBEAT_SECS, DEFAULT_HTTP_TIMEOUT_MS, DEFAULT_JWKS_MIN_REFETCH_INTERVAL_MS,
    DEFAULT_JWKS_REFRESH_SECONDS, DEFAULT_LEEWAY_SECONDS, DEFAULT_LISTENER_ADDRESS,
    DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PREAUTH_FRAME,
    DEFAULT_PREFERRED_USERNAME_CLAIMS, DEFAULT_REQUIRE_EXP, DEFAULT_VERIFY_AUD, JwtAlgorithm,
    ListenerConfig, LogConfig, LogFormat, MAX_AUTH_FAILURE_DELAY_MS, MAX_BACKEND_CLOSE_TIMEOUT_MS,
    MAX_BACKEND_CONNECT_TIMEOUT_MS, MAX_BACKEND_MAX_CONNECTING, MAX_DRAIN_MS, MAX_FRAME_MAX,
    MAX_HANDSHAKE_TIMEOUT_MS, MAX_HTTP_TIMEOUT_MS, MAX_JWKS_MIN_REFETCH_INTERVAL_MS,
    MAX_JWKS_REFRESH_SECONDS, MAX_LEEWAY_SECONDS, MAX_MAX_PREAUTH_FRAME,
    MIN_BACKEND_CLOSE_TIMEOUT_MS, MIN_FRAME_MAX, MIN_MAX_PREAUTH_FRAME, ManagementConfig,
    OAuth2Config, TlsListenerConfig,
};
use super::{
    DEFAULT_BACKEND_HEALTH_CHECK_INTERVAL_MS, DEFAULT_CONSUMER_MAX_PER_CHANNEL,
    DEFAULT_CONSUMER_MAX_PER_CONNECTION, DEFAULT_EXCHANGE_LOOKUPS_PER_SECOND,
    DEFAULT_EXCHANGE_TYPE_TTL_MS, MAX_BACKEND_HEALTH_CHECK_INTERVAL_MS, MAX_CONSUMER_MAX,
    MAX_EXCHANGE_LOOKUPS_PER_SECOND, MAX_EXCHANGE_TYPE_TTL_MS,
    MIN_BACKEND_HEALTH_CHECK_INTERVAL_MS, MIN_EXCHANGE_TYPE_TTL_MS,
};
use super::{
    DEFAULT_JWKS_STALE_GRACE_SECONDS, DEFAULT_TOKEN_CACHE_SIZE, MAX_JWKS_STALE_GRACE_SECONDS,
    MAX_TOKEN_CACHE_SIZE,
};
use super::{IssuerConfig, MAX_BUSY_POLL_US, MAX_WORKER_THREADS, RuntimeConfig};
use crate::auth::policy::{ClaimRule, ClaimTest, Policy};
use crate::auth::scopes;

pub(super) fn validate(
    raw: RawConfig,
    base_dir: &Path,
    check_files: CheckFiles,
) -> Result<Config, ConfigErrors> {
    let mut c = Checker {
        base_dir,
        check_files,
        errors: Vec::new(),
    };
    let listener = c.listener(raw.listener);
    let backend = c.backend(raw.backend);
    let oauth2 = c.oauth2(raw.oauth2);
    let admin = c.admin(raw.admin);
    let log = c.log(raw.log);
    let runtime = RuntimeConfig {
        worker_threads: raw
            .runtime
            .worker_threads
            .map(|n| c.bounded("runtime.worker_threads", Some(n), 1, 1, MAX_WORKER_THREADS)),
        per_core: raw.runtime.per_core.unwrap_or(false),
        busy_poll: std::time::Duration::from_micros(c.bounded(
            "runtime.busy_poll_us",
            raw.runtime.busy_poll_us,
            0,
            0,
            MAX_BUSY_POLL_US,
        )),
    };
    let auth = c.auth(raw.auth);
    let authorization = c.authorization(raw.authorization);
    let management = raw.management.map(|m| c.management(m, &listener, &backend));
    if authorization.mode == crate::authz::iam::Mode::Policies
        && matches!(backend.auth, super::BackendAuth::Token(_))
    {
        c.error(
            "authorization.mode",
            "\"policies\" cannot hold with backend.auth = \"token\": the broker checks the scopes of the backend tokens too; use \"both\"",
        );
    }
    #[cfg(feature = "test-switches")]
    let testing = {
        let gateway_decisions = raw.testing.gateway_decisions.unwrap_or(true);
        if !gateway_decisions && !matches!(backend.auth, super::BackendAuth::Token(_)) {
            c.error(
                "testing.gateway_decisions",
                "false needs backend.auth = \"token\": without it nothing would decide",
            );
        }
        super::TestingConfig { gateway_decisions }
    };
    c.address_conflicts(&listener, &admin);
    if let Some(m) = &management {
        let mine = Some(m.address);
        let taken = [
            listener.tls.as_ref().map(|t| t.address),
            listener.plain_address,
            Some(admin.address),
        ];
        if m.address.port() != 0 && taken.contains(&mine) {
            c.error(
                "management.address",
                "is the address of another listener of the gateway",
            );
        }
    }
    if c.errors.is_empty() {
        Ok(Config {
            listener,
            backend,
            oauth2,
            admin,
            log,
            runtime,
            auth,
            authorization,
            management,
            #[cfg(feature = "test-switches")]
            testing,
        })
    } else {
        Err(ConfigErrors(c.errors))
    }
}

/// Only ever returned alongside a recorded error, so it is never bound.
const PLACEHOLDER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

struct Checker<'a> {
    base_dir: &'a Path,
    check_files: CheckFiles,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        });
    }

    // --- sections ----------------------------------------------------------------------------

    /// `[authorization]`: the documents are read and compiled now, so that `check-config`
    /// and a reload report every policy error with its JSON path.
    fn authorization(&mut self, raw: RawAuthorization) -> AuthorizationConfig {
        use crate::authz::iam::{MAX_DOCUMENT_BYTES, Mode, PolicySet};
        let mode = match raw.mode.as_deref() {
            None => Mode::Scopes,
            Some(m) => Mode::parse(m).unwrap_or_else(|| {
                self.error(
                    "authorization.mode",
                    format!("{m:?}: expected \"scopes\", \"policies\" or \"both\""),
                );
                Mode::Scopes
            }),
        };
        let written = raw.policies.unwrap_or_default();
        if mode != Mode::Scopes && written.is_empty() {
            self.error(
                "authorization.policies",
                format!("mode \"{}\" needs at least one policy document: without one every operation would be refused", mode.as_str()),
            );
        }
        let mut policies = Vec::new();
        let mut documents = Vec::new();
        for (i, w) in written.iter().enumerate() {
            let key = format!("authorization.policies[{i}]");
            let path = self.file(&key, w);
            if self.check_files == CheckFiles::Yes && !path.as_os_str().is_empty() {
                match std::fs::read(&path) {
                    Ok(bytes) if bytes.len() > MAX_DOCUMENT_BYTES => self.error(
                        &key,
                        format!(
                            "{}: {} bytes; a policy document may have at most {MAX_DOCUMENT_BYTES}",
                            path.display(),
                            bytes.len()
                        ),
                    ),
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(text) => documents.push((w.clone(), text)),
                        Err(_) => self.error(&key, format!("{}: not UTF-8", path.display())),
                    },
                    // `file` has reported it.
                    Err(_) => {}
                }
            }
            policies.push(path);
        }
        let set = match PolicySet::compile(&documents) {
            Ok(set) => set,
            Err(errors) => {
                for e in errors {
                    let i = written.iter().position(|w| *w == e.document).unwrap_or(0);
                    self.error(format!("authorization.policies[{i}]"), e.to_string());
                }
                PolicySet::default()
            }
        };
        AuthorizationConfig {
            mode,
            policies,
            set: std::sync::Arc::new(set),
        }
    }

    fn listener(&mut self, raw: RawListener) -> ListenerConfig {
        let plain_address = raw
            .plain_address
            .map(|a| self.socket_addr("listener.plain_address", &a));
        // The TLS listener is the default; it is left out only when the operator asked for a
        // plain listener and said nothing at all about TLS, so a half-configured TLS listener
        // is an error rather than silently missing.
        let wants_tls = raw.address.is_some()
            || raw.tls_cert.is_some()
            || raw.tls_key.is_some()
            || plain_address.is_none();
        let tls = wants_tls.then(|| {
            let address = self.socket_addr(
                "listener.address",
                raw.address.as_deref().unwrap_or(DEFAULT_LISTENER_ADDRESS),
            );
            let cert = self.required_file("listener.tls_cert", raw.tls_cert, plain_address);
            let key = self.required_file("listener.tls_key", raw.tls_key, plain_address);
            TlsListenerConfig { address, cert, key }
        });
        ListenerConfig {
            tls,
            plain_address,
            max_connections: self.bounded(
                "listener.max_connections",
                raw.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                1,
                u32::MAX.into(),
            ),
            max_connections_per_source: self.bounded(
                "listener.max_connections_per_source",
                raw.max_connections_per_source,
                0,
                0,
                u32::MAX.into(),
            ),
            max_connections_per_identity: self.bounded(
                "listener.max_connections_per_identity",
                raw.max_connections_per_identity,
                0,
                0,
                u32::MAX.into(),
            ),
            handshakes_per_second_per_source: self.bounded(
                "listener.handshakes_per_second_per_source",
                raw.handshakes_per_second_per_source,
                0,
                0,
                1_000_000,
            ),
            handshake_timeout: self.millis(
                "listener.handshake_timeout_ms",
                raw.handshake_timeout_ms,
                DEFAULT_HANDSHAKE_TIMEOUT_MS,
                1,
                MAX_HANDSHAKE_TIMEOUT_MS,
            ),
            max_preauth_frame: self.bounded(
                "listener.max_preauth_frame",
                raw.max_preauth_frame,
                DEFAULT_MAX_PREAUTH_FRAME,
                MIN_MAX_PREAUTH_FRAME.into(),
                MAX_MAX_PREAUTH_FRAME.into(),
            ),
            auth_failure_delay: self.millis(
                "listener.auth_failure_delay_ms",
                raw.auth_failure_delay_ms,
                DEFAULT_AUTH_FAILURE_DELAY_MS,
                0,
                MAX_AUTH_FAILURE_DELAY_MS,
            ),
            proxy_protocol: raw.proxy_protocol.unwrap_or(false),
            drain_period: self.millis(
                "listener.drain_period_ms",
                raw.drain_period_ms,
                DEFAULT_DRAIN_PERIOD_MS,
                0,
                MAX_DRAIN_MS,
            ),
            drain_deadline: self.millis(
                "listener.drain_deadline_ms",
                raw.drain_deadline_ms,
                DEFAULT_DRAIN_DEADLINE_MS,
                0,
                MAX_DRAIN_MS,
            ),
            // 0 would mean "no limit" in connection.tune; the gateway always sets one.
            channel_max: self.bounded(
                "listener.channel_max",
                raw.channel_max,
                DEFAULT_CHANNEL_MAX,
                1,
                u16::MAX.into(),
            ),
            frame_max: self.bounded(
                "listener.frame_max",
                raw.frame_max,
                DEFAULT_FRAME_MAX,
                MIN_FRAME_MAX.into(),
                MAX_FRAME_MAX.into(),
            ),
            heartbeat: self.bounded(
                "listener.heartbeat",
                raw.heartbeat,
                DEFAULT_HEARTBEAT_SECS,
                0,
                u16::MAX.into(),
            ),
            consumer_max_per_channel: self.bounded(
                "listener.consumer_max_per_channel",
                raw.consumer_max_per_channel,
                DEFAULT_CONSUMER_MAX_PER_CHANNEL,
                1,
                MAX_CONSUMER_MAX,
            ),
            consumer_max_per_connection: self.bounded(
                "listener.consumer_max_per_connection",
                raw.consumer_max_per_connection,
                DEFAULT_CONSUMER_MAX_PER_CONNECTION,
                1,
                MAX_CONSUMER_MAX,
            ),
        }
    }

    fn backend(&mut self, raw: RawBackend) -> BackendConfig {
        let raw_tls = raw_tls(&raw);
        let nodes = match raw.nodes {
            None => parse_node(DEFAULT_BACKEND_NODE).into_iter().collect(),
            Some(nodes) => {
                if nodes.is_empty() {
                    self.error("backend.nodes", "must list at least one \"host:port\"");
                }
                let mut parsed = Vec::with_capacity(nodes.len());
                for (i, node) in nodes.iter().enumerate() {
                    match parse_node(node) {
                        Ok(n) => parsed.push(n),
                        Err(why) => {
                            self.error(format!("backend.nodes[{i}]"), format!("{node:?} {why}"))
                        }
                    }
                }
                parsed
            }
        };
        // RabbitMQ's internal backend refuses blank passwords, so an empty one is a mistake.
        let username = self.required_text("backend.username", raw.username);
        let password = self.required_text("backend.password", raw.password);
        let balance = match raw.balance.as_deref() {
            None | Some("round_robin") => BalancePolicy::RoundRobin,
            Some("least_connections") => BalancePolicy::LeastConnections,
            Some(other) => {
                self.error(
                    "backend.balance",
                    format!("{other:?} is not \"round_robin\" or \"least_connections\""),
                );
                BalancePolicy::RoundRobin
            }
        };
        let management_url = raw.management_url.inspect(|url| {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.contains(char::is_whitespace)
            {
                self.error(
                    "backend.management_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                );
            }
        });
        let tls = self.backend_tls(&raw_tls, &nodes);
        let auth = self.backend_auth(raw.auth.as_deref(), raw.token);
        BackendConfig {
            auth,
            nodes,
            username,
            password,
            connect_timeout: self.millis(
                "backend.connect_timeout_ms",
                raw.connect_timeout_ms,
                DEFAULT_BACKEND_CONNECT_TIMEOUT_MS,
                1,
                MAX_BACKEND_CONNECT_TIMEOUT_MS,
            ),
            close_timeout: self.millis(
                "backend.close_timeout_ms",
                raw.close_timeout_ms,
                DEFAULT_BACKEND_CLOSE_TIMEOUT_MS,
                MIN_BACKEND_CLOSE_TIMEOUT_MS,
                MAX_BACKEND_CLOSE_TIMEOUT_MS,
            ),
            max_connecting: self.bounded(
                "backend.max_connecting",
                raw.max_connecting,
                DEFAULT_BACKEND_MAX_CONNECTING,
                1,
                MAX_BACKEND_MAX_CONNECTING,
            ),
            health_check_interval: self.millis(
                "backend.health_check_interval_ms",
                raw.health_check_interval_ms,
                DEFAULT_BACKEND_HEALTH_CHECK_INTERVAL_MS,
                MIN_BACKEND_HEALTH_CHECK_INTERVAL_MS,
                MAX_BACKEND_HEALTH_CHECK_INTERVAL_MS,
            ),
            management_url,
            exchange_type_ttl: self.millis(
                "backend.exchange_type_ttl_ms",
                raw.exchange_type_ttl_ms,
                DEFAULT_EXCHANGE_TYPE_TTL_MS,
                MIN_EXCHANGE_TYPE_TTL_MS,
                MAX_EXCHANGE_TYPE_TTL_MS,
            ),
            exchange_lookups_per_second: self.bounded(
                "backend.exchange_lookups_per_second",
                raw.exchange_lookups_per_second,
                DEFAULT_EXCHANGE_LOOKUPS_PER_SECOND,
                1,
                MAX_EXCHANGE_LOOKUPS_PER_SECOND,
            ),
            balance,
            tls,
        }
    }

    /// `backend.tls*`: the other keys only with `tls = true`, which needs `tls_ca`;
    /// `tls_cert` and `tls_key` together or not at all.
    fn backend_tls(
        &mut self,
        raw: &RawBackendTls,
        nodes: &[BackendNode],
    ) -> Option<BackendTlsConfig> {
        if !raw.enabled {
            for (key, set) in [
                ("backend.tls_ca", raw.ca.is_some()),
                ("backend.tls_cert", raw.cert.is_some()),
                ("backend.tls_key", raw.key.is_some()),
                ("backend.tls_server_name", raw.server_name.is_some()),
            ] {
                if set {
                    self.error(key, "has no effect unless backend.tls = true");
                }
            }
            return None;
        }
        let ca = match &raw.ca {
            Some(ca) => self.file("backend.tls_ca", ca),
            None => {
                self.error(
                    "backend.tls_ca",
                    "is required with backend.tls = true (the PEM CA certificate(s) that signed the nodes' certificates)",
                );
                PathBuf::new()
            }
        };
        let client_cert = match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => Some((
                self.file("backend.tls_cert", cert),
                self.file("backend.tls_key", key),
            )),
            (None, None) => None,
            (Some(_), None) => {
                self.error(
                    "backend.tls_key",
                    "is required when backend.tls_cert is set",
                );
                None
            }
            (None, Some(_)) => {
                self.error(
                    "backend.tls_cert",
                    "is required when backend.tls_key is set",
                );
                None
            }
        };
        let server_name = raw.server_name.clone();
        match &server_name {
            Some(name) => {
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    self.error(
                        "backend.tls_server_name",
                        format!("{name:?} is not a valid DNS name or IP address"),
                    );
                }
            }
            None => {
                for (i, node) in nodes.iter().enumerate() {
                    if rustls::pki_types::ServerName::try_from(node.host.as_str()).is_err() {
                        self.error(
                            format!("backend.nodes[{i}]"),
                            format!(
                                "{:?} cannot be checked against a TLS certificate; set backend.tls_server_name",
                                node.host
                            ),
                        );
                    }
                }
            }
        }
        Some(BackendTlsConfig {
            ca,
            client_cert,
            server_name,
        })
    }

    fn oauth2(&mut self, raw: RawOAuth2) -> OAuth2Config {
        let resource_server_id =
            self.resource_server_id("oauth2", raw.resource_server_id.clone(), None);
        let scope_prefix = raw
            .scope_prefix
            .clone()
            .unwrap_or_else(|| format!("{resource_server_id}."));
        self.additional_scopes_key("oauth2", raw.additional_scopes_key.as_deref());
        let preferred_username_claims = self.username_claims(raw.preferred_username_claims);
        let algorithms = self.algorithms("oauth2", raw.algorithms, &DEFAULT_ALGORITHMS);
        let raw_issuers = raw.issuers.unwrap_or_default();
        let dispatch_by_iss = !raw_issuers.is_empty();
        let keys = if raw_issuers.is_empty() {
            self.key_sources(
                "oauth2",
                raw.issuer,
                raw.jwks_uri,
                raw.jwks_url,
                raw.signing_keys.unwrap_or_default(),
                raw.default_key.as_deref(),
            )
        } else {
            // Tokens are dispatched by `iss`, so keys belong to an issuer entry.
            for (key, set) in [
                ("issuer", raw.issuer.is_some()),
                ("jwks_uri", raw.jwks_uri.is_some()),
                ("jwks_url", raw.jwks_url.is_some()),
                ("signing_keys", raw.signing_keys.is_some()),
                ("default_key", raw.default_key.is_some()),
            ] {
                if set {
                    self.error(
                        format!("oauth2.{key}"),
                        "must be set in each [[oauth2.issuers]] entry, not in [oauth2], when issuers are configured",
                    );
                }
            }
            KeySources {
                issuer: None,
                jwks_uri: None,
                signing_keys: BTreeMap::new(),
            }
        };
        let scope_aliases = self.scope_aliases("oauth2", raw.scope_aliases.unwrap_or_default());
        let policy = self.policy("oauth2.policy", raw.policy);
        let mut issuers: Vec<IssuerConfig> = Vec::new();
        for (i, entry) in raw_issuers.into_iter().enumerate() {
            let table = format!("oauth2.issuers[{i}]");
            let name = self.required_text(&format!("{table}.name"), entry.name);
            if issuers.iter().any(|e| e.name == name) {
                self.error(
                    format!("{table}.name"),
                    format!("{name:?} names another issuer too"),
                );
            }
            let Some(iss) = entry.issuer.clone() else {
                self.error(
                    format!("{table}.issuer"),
                    "is required: a token's `iss` selects its issuer entry",
                );
                continue;
            };
            if issuers
                .iter()
                .any(|e| e.issuer.as_deref() == Some(iss.as_str()))
            {
                self.error(
                    format!("{table}.issuer"),
                    format!("{iss:?} is the issuer of another entry too"),
                );
            }
            let keys = self.key_sources(
                &table,
                entry.issuer,
                entry.jwks_uri,
                entry.jwks_url,
                entry.signing_keys.unwrap_or_default(),
                entry.default_key.as_deref(),
            );
            let rsid = self.resource_server_id(
                &table,
                entry.resource_server_id,
                Some(&resource_server_id),
            );
            self.additional_scopes_key(&table, entry.additional_scopes_key.as_deref());
            issuers.push(IssuerConfig {
                name,
                issuer: keys.issuer,
                jwks_uri: keys.jwks_uri,
                signing_keys: keys.signing_keys,
                default_key: entry.default_key,
                algorithms: self.algorithms(&table, entry.algorithms, &algorithms),
                // Unset: the root prefix, or `<resource_server_id>.` of this entry when the
                // root leaves it to its default.
                scope_prefix: entry
                    .scope_prefix
                    .or_else(|| raw.scope_prefix.clone())
                    .unwrap_or_else(|| format!("{rsid}.")),
                resource_server_id: rsid,
                additional_scopes_key: entry
                    .additional_scopes_key
                    .or_else(|| raw.additional_scopes_key.clone()),
                scope_aliases: match entry.scope_aliases {
                    Some(a) => self.scope_aliases(&table, a),
                    None => scope_aliases.clone(),
                },
                policy: match entry.policy {
                    Some(p) => self.policy(&format!("{table}.policy"), Some(p)),
                    None => policy.clone(),
                },
            });
        }
        if !dispatch_by_iss {
            // Without `[[oauth2.issuers]]`, the root keys are the one issuer.
            issuers.push(IssuerConfig {
                name: "default".into(),
                issuer: keys.issuer,
                jwks_uri: keys.jwks_uri,
                signing_keys: keys.signing_keys,
                default_key: raw.default_key,
                algorithms,
                resource_server_id,
                scope_prefix,
                additional_scopes_key: raw.additional_scopes_key,
                scope_aliases,
                policy,
            });
        }
        OAuth2Config {
            issuers,
            dispatch_by_iss,
            preferred_username_claims,
            verify_aud: raw.verify_aud.unwrap_or(DEFAULT_VERIFY_AUD),
            require_exp: raw.require_exp.unwrap_or(DEFAULT_REQUIRE_EXP),
            leeway: Duration::from_secs(self.bounded(
                "oauth2.leeway_seconds",
                raw.leeway_seconds,
                DEFAULT_LEEWAY_SECONDS,
                0,
                MAX_LEEWAY_SECONDS,
            )),
            check_iat: raw.check_iat.unwrap_or(DEFAULT_CHECK_IAT),
            check_nbf: raw.check_nbf.unwrap_or(DEFAULT_CHECK_NBF),
            jwks_refresh: Duration::from_secs(self.bounded(
                "oauth2.jwks_refresh_seconds",
                raw.jwks_refresh_seconds,
                DEFAULT_JWKS_REFRESH_SECONDS,
                1,
                MAX_JWKS_REFRESH_SECONDS,
            )),
            jwks_min_refetch_interval: self.millis(
                "oauth2.jwks_min_refetch_interval_ms",
                raw.jwks_min_refetch_interval_ms,
                DEFAULT_JWKS_MIN_REFETCH_INTERVAL_MS,
                0,
                MAX_JWKS_MIN_REFETCH_INTERVAL_MS,
            ),
            http_timeout: self.millis(
                "oauth2.http_timeout_ms",
                raw.http_timeout_ms,
                DEFAULT_HTTP_TIMEOUT_MS,
                1,
                MAX_HTTP_TIMEOUT_MS,
            ),
            token_cache_size: self.bounded(
                "oauth2.token_cache_size",
                raw.token_cache_size,
                DEFAULT_TOKEN_CACHE_SIZE,
                0,
                MAX_TOKEN_CACHE_SIZE,
            ),
            jwks_stale_grace: Duration::from_secs(self.bounded(
                "oauth2.jwks_stale_grace_seconds",
                raw.jwks_stale_grace_seconds,
                DEFAULT_JWKS_STALE_GRACE_SECONDS,
                1,
                MAX_JWKS_STALE_GRACE_SECONDS,
            )),
        }
    }

    /// RabbitMQ 4.1+ rejects every token when the id is empty, and `aud` values are split
    /// on spaces, so an id that is empty or contains whitespace can never match.
    fn resource_server_id(
        &mut self,
        table: &str,
        raw: Option<String>,
        inherited: Option<&str>,
    ) -> String {
        let key = format!("{table}.resource_server_id");
        let id = match (raw, inherited) {
            (None, Some(i)) => return i.to_owned(),
            (raw, _) => self.required_text(&key, raw),
        };
        if id.contains(char::is_whitespace) {
            self.error(
                key,
                "must not contain whitespace: `aud` values are split on spaces",
            );
        }
        id
    }

    fn additional_scopes_key(&mut self, table: &str, key: Option<&str>) {
        if let Some(key) = key
            && key.trim().is_empty()
        {
            self.error(
                format!("{table}.additional_scopes_key"),
                "must name at least one claim path; remove the key to read no extra claim",
            );
        }
    }

    /// `[oauth2.policy]` (or an issuer's): every rule names a claim and exactly one test.
    fn policy(&mut self, table: &str, raw: Option<RawPolicy>) -> Policy {
        let Some(raw) = raw else {
            return Policy::default();
        };
        let max_lifetime_seconds = raw.max_lifetime_seconds.map(|s| {
            if s == 0 || s > i64::MAX as u64 {
                self.error(
                    format!("{table}.max_lifetime_seconds"),
                    "must be at least 1 (remove the key for no limit)",
                );
            }
            s.min(i64::MAX as u64) as i64
        });
        let required_claims = raw.required_claims.unwrap_or_default();
        for (i, c) in required_claims.iter().enumerate() {
            if scopes::split_paths(c).len() != 1 {
                self.error(
                    format!("{table}.required_claims[{i}]"),
                    format!("{c:?} must be one claim path (no spaces, not empty)"),
                );
            }
        }
        let mut rules = Vec::new();
        for (i, r) in raw.rules.unwrap_or_default().into_iter().enumerate() {
            let key = format!("{table}.rules[{i}]");
            let claim = self.required_text(&format!("{key}.claim"), r.claim);
            if !claim.is_empty() && scopes::split_paths(&claim).len() != 1 {
                self.error(
                    format!("{key}.claim"),
                    format!("{claim:?} must be one claim path (no spaces)"),
                );
            }
            let tests: Vec<ClaimTest> = [
                r.equals.map(ClaimTest::Equals),
                r.one_of.map(ClaimTest::OneOf),
                r.prefix.map(ClaimTest::Prefix),
            ]
            .into_iter()
            .flatten()
            .collect();
            match <[ClaimTest; 1]>::try_from(tests) {
                Ok([test]) => {
                    if test == ClaimTest::OneOf(Vec::new()) {
                        self.error(format!("{key}.one_of"), "must list at least one value");
                    }
                    rules.push(ClaimRule { claim, test });
                }
                Err(_) => self.error(key, "must set exactly one of equals, one_of, prefix"),
            }
        }
        Policy {
            max_lifetime_seconds,
            required_claims,
            jti_deny: raw.jti_deny.unwrap_or_default().into_iter().collect(),
            rules,
        }
    }

    fn auth(&mut self, raw: RawAuth) -> AuthConfig {
        let mut auth = AuthConfig::default();
        if let Some(names) = raw.backends {
            auth.backends.clear();
            if names.is_empty() {
                self.error("auth.backends", "must name at least one backend");
            }
            for name in &names {
                // RabbitMQ's module names and its short aliases both work.
                let backend = match name.as_str() {
                    "oauth2" | "rabbit_auth_backend_oauth2" => AuthBackend::OAuth2,
                    "internal" | "rabbit_auth_backend_internal" => AuthBackend::Internal,
                    other => {
                        self.error(
                            "auth.backends",
                            format!("{other:?} is not \"oauth2\" or \"internal\" (the gateway supports no other backend)"),
                        );
                        continue;
                    }
                };
                if auth.backends.contains(&backend) {
                    self.error(
                        "auth.backends",
                        format!("{:?} is listed twice", backend.as_str()),
                    );
                    continue;
                }
                auth.backends.push(backend);
            }
        }
        if let Some(users) = raw.loopback_users {
            auth.loopback_users = users;
        }
        for (user, nets) in raw.sources.unwrap_or_default() {
            let key = table_key("auth.sources", &user);
            if nets.is_empty() {
                self.error(
                    &key,
                    "must list at least one network (an address or a CIDR block)",
                );
            }
            let mut parsed = Vec::new();
            for n in &nets {
                // A bare address is a network of one.
                let net = n
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(ipnet::IpNet::from));
                match net {
                    Ok(net) => parsed.push(net),
                    Err(_) => self.error(
                        &key,
                        format!("{n:?} is not an IP address or a CIDR block such as 10.0.0.0/8"),
                    ),
                }
            }
            auth.sources.insert(user, parsed);
        }
        auth
    }

    fn backend_auth(&mut self, auth: Option<&str>, raw: Option<RawBackendToken>) -> BackendAuth {
        // `[backend.token]` alone means backend tokens: the default wherever the broker can
        // take them, which a key for it says.
        let auth = auth.or(raw.as_ref().map(|_| "token"));
        match auth {
            None | Some("service_user") => {
                if raw.is_some() {
                    self.error(
                        "backend.token",
                        "is used only with backend.auth = \"token\"",
                    );
                }
                BackendAuth::ServiceUser
            }
            Some("token") => {
                let raw = raw.unwrap_or_default();
                let signing_key = match raw.signing_key {
                    Some(p) => self.file("backend.token.signing_key", &p),
                    None => {
                        self.error(
                            "backend.token.signing_key",
                            "is required with backend.auth = \"token\"",
                        );
                        PathBuf::new()
                    }
                };
                let kid = self.required_text("backend.token.kid", raw.kid);
                let resource_server_id = raw
                    .resource_server_id
                    .unwrap_or_else(|| "rabbitmq".to_owned());
                if resource_server_id.is_empty() || resource_server_id.contains(char::is_whitespace)
                {
                    self.error(
                        "backend.token.resource_server_id",
                        "must be non-empty, without whitespace",
                    );
                }
                let scope_prefix = raw
                    .scope_prefix
                    .unwrap_or_else(|| format!("{resource_server_id}."));
                if scope_prefix.contains(char::is_whitespace) {
                    self.error("backend.token.scope_prefix", "must not contain whitespace");
                }
                let mut retired_keys = std::collections::BTreeMap::new();
                for (k, p) in raw.retired_keys.unwrap_or_default() {
                    let key = format!("backend.token.retired_keys.{k}");
                    if k == kid || k.is_empty() {
                        self.error(key, "must be non-empty and differ from backend.token.kid");
                        continue;
                    }
                    let path = self.file(&key, &p);
                    retired_keys.insert(k, path);
                }
                BackendAuth::Token(BackendTokenConfig {
                    signing_key,
                    kid,
                    resource_server_id,
                    scope_prefix,
                    retired_keys,
                })
            }
            Some(other) => {
                self.error(
                    "backend.auth",
                    format!("{other:?} is not \"service_user\" or \"token\""),
                );
                BackendAuth::ServiceUser
            }
        }
    }

    fn management(
        &mut self,
        raw: RawManagement,
        listener: &ListenerConfig,
        backend: &BackendConfig,
    ) -> ManagementConfig {
        use super::{
            DEFAULT_MANAGEMENT_ADDRESS, DEFAULT_MANAGEMENT_HEADER_TIMEOUT_MS,
            DEFAULT_MANAGEMENT_IDLE_TIMEOUT_MS, DEFAULT_MANAGEMENT_MAX_BODY,
            DEFAULT_MANAGEMENT_MAX_CONCURRENT, DEFAULT_MANAGEMENT_MAX_CONNECTIONS,
            DEFAULT_MANAGEMENT_MAX_HEADER, DEFAULT_MANAGEMENT_REQUEST_TIMEOUT_MS,
            MAX_MANAGEMENT_MAX_BODY, MAX_MANAGEMENT_MAX_HEADER, MIN_MANAGEMENT_MAX_HEADER,
        };
        let address = self.socket_addr(
            "management.address",
            raw.address.as_deref().unwrap_or(DEFAULT_MANAGEMENT_ADDRESS),
        );
        let (cert, key) = match (raw.tls_cert, raw.tls_key, &listener.tls) {
            (Some(c), Some(k), _) => (
                self.file("management.tls_cert", &c),
                self.file("management.tls_key", &k),
            ),
            (None, None, Some(t)) => (t.cert.clone(), t.key.clone()),
            (None, None, None) => {
                self.error(
                    "management.tls_cert",
                    "is required: the listener is HTTPS only, and there is no AMQPS listener \
                     certificate to share",
                );
                (PathBuf::new(), PathBuf::new())
            }
            _ => {
                self.error(
                    "management.tls_cert",
                    "and management.tls_key go together: set both, or neither to share the \
                     AMQPS listener's",
                );
                (PathBuf::new(), PathBuf::new())
            }
        };
        let backend_url = match raw.backend_url.or_else(|| backend.management_url.clone()) {
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || url.contains(char::is_whitespace)
                    || url.parse::<hyper::Uri>().is_err()
                {
                    self.error(
                        "management.backend_url",
                        format!("{url:?} is not an http:// or https:// URL"),
                    );
                }
                url.trim_end_matches('/').to_owned()
            }
            None => {
                self.error(
                    "management.backend_url",
                    "is required (or backend.management_url): where the broker's management \
                     API listens, e.g. \"http://127.0.0.1:15672\"",
                );
                String::new()
            }
        };
        if !matches!(backend.auth, BackendAuth::Token(_)) {
            self.error(
                "management",
                "needs backend.auth = \"token\": requests reach the management API with a \
                 token the gateway mints for the client, and RabbitMQ checks its tags and \
                 permissions (see docs/backend-tokens.md)",
            );
        }
        let protected_users = raw.protected_users.unwrap_or_default();
        if protected_users.iter().any(|u| u.is_empty()) {
            self.error(
                "management.protected_users",
                "a user name must not be empty",
            );
        }
        ManagementConfig {
            address,
            cert,
            key,
            backend_url,
            proxy_protocol: raw.proxy_protocol.unwrap_or(false),
            max_body_bytes: self.bounded(
                "management.max_body_bytes",
                raw.max_body_bytes,
                DEFAULT_MANAGEMENT_MAX_BODY,
                0,
                MAX_MANAGEMENT_MAX_BODY,
            ),
            max_header_bytes: self.bounded(
                "management.max_header_bytes",
                raw.max_header_bytes,
                DEFAULT_MANAGEMENT_MAX_HEADER as usize,
                MIN_MANAGEMENT_MAX_HEADER,
                MAX_MANAGEMENT_MAX_HEADER,
            ),
            header_timeout: self.millis(
                "management.header_timeout_ms",
                raw.header_timeout_ms,
                DEFAULT_MANAGEMENT_HEADER_TIMEOUT_MS,
                100,
                600_000,
            ),
            request_timeout: self.millis(
                "management.request_timeout_ms",
                raw.request_timeout_ms,
                DEFAULT_MANAGEMENT_REQUEST_TIMEOUT_MS,
                100,
                3_600_000,
            ),
            idle_timeout: self.millis(
                "management.idle_timeout_ms",
                raw.idle_timeout_ms,
                DEFAULT_MANAGEMENT_IDLE_TIMEOUT_MS,
                100,
                3_600_000,
            ),
            max_connections: self.bounded(
                "management.max_connections",
                raw.max_connections,
                DEFAULT_MANAGEMENT_MAX_CONNECTIONS as usize,
                1,
                1_000_000,
            ),
            max_concurrent_requests: self.bounded(
                "management.max_concurrent_requests",
                raw.max_concurrent_requests,
                DEFAULT_MANAGEMENT_MAX_CONCURRENT as usize,
                1,
                100_000,
            ),
            protected_users,
        }
    }

    fn admin(&mut self, raw: RawAdmin) -> AdminConfig {
        AdminConfig {
            address: self.socket_addr(
                "admin.address",
                raw.address.as_deref().unwrap_or(DEFAULT_ADMIN_ADDRESS),
            ),
        }
    }

    fn log(&mut self, raw: RawLog) -> LogConfig {
        let level = raw.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        // A bare word must be a level; anything with `=` or `,` is an EnvFilter directive list
        // and is left for tracing_subscriber to judge.
        let is_directives = level.contains('=') || level.contains(',');
        if level.trim().is_empty() {
            self.error("log.level", "must not be empty");
        } else if !is_directives && !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            self.error(
                "log.level",
                format!(
                    "{level:?} is not one of {} (or an EnvFilter directive list)",
                    LOG_LEVELS.join(", ")
                ),
            );
        }
        let format = match raw.format.as_deref() {
            None => DEFAULT_LOG_FORMAT,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.error(
                    "log.format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                DEFAULT_LOG_FORMAT
            }
        };
        let audit = raw.audit.map(|a| match a.as_str() {
            "stdout" | "-" => AuditSink::Stdout,
            path => AuditSink::File(self.base_dir.join(path)),
        });
        LogConfig {
            level,
            format,
            audit,
        }
    }

    /// Two listeners on one address would fail at bind time, after part of the gateway started.
    fn address_conflicts(&mut self, listener: &ListenerConfig, admin: &AdminConfig) {
        let tls = listener.tls.as_ref().map(|t| t.address);
        let clash = |a: Option<SocketAddr>, b: Option<SocketAddr>| matches!((a, b), (Some(a), Some(b)) if a == b && a.port() != 0);
        if clash(tls, listener.plain_address) {
            self.error(
                "listener.plain_address",
                "is the same address as listener.address",
            );
        }
        if clash(tls, Some(admin.address)) {
            self.error("admin.address", "is the same address as listener.address");
        }
        if clash(listener.plain_address, Some(admin.address)) {
            self.error(
                "admin.address",
                "is the same address as listener.plain_address",
            );
        }
    }

    // --- oauth2 pieces -----------------------------------------------------------------------

    /// Where verification keys come from, checked together: at least one source, and a
    /// `default_key` that can be found.
    fn key_sources(
        &mut self,
        table: &str,
        issuer: Option<String>,
        jwks_uri: Option<String>,
        jwks_url: Option<String>,
        signing_keys: BTreeMap<String, String>,
        default_key: Option<&str>,
    ) -> KeySources {
        let issuer = self.idp_url(&format!("{table}.issuer"), issuer);
        let jwks_uri = match (jwks_uri, jwks_url) {
            (Some(uri), Some(_)) => {
                self.error(
                    format!("{table}.jwks_url"),
                    format!("is the deprecated name of {table}.jwks_uri; set only jwks_uri"),
                );
                // Kept, so the checks below do not report a second, spurious error.
                self.idp_url(&format!("{table}.jwks_uri"), Some(uri))
            }
            (Some(uri), None) => self.idp_url(&format!("{table}.jwks_uri"), Some(uri)),
            (None, Some(url)) => self.idp_url(&format!("{table}.jwks_url"), Some(url)),
            (None, None) => None,
        };
        let signing_keys = self.signing_keys(table, signing_keys);
        let has_jwks = jwks_uri.is_some() || issuer.is_some();
        if !has_jwks && signing_keys.is_empty() {
            self.error(
                table,
                "no key source: set jwks_uri, issuer (keys found through OIDC discovery) or signing_keys",
            );
        }
        if let Some(kid) = default_key {
            // RabbitMQ looks an unknown kid up in the JWKS too, so with a JWKS the default key
            // may legitimately live there; without one it must be a configured signing key.
            if kid.is_empty() {
                self.error(format!("{table}.default_key"), "must not be empty");
            } else if !has_jwks && !signing_keys.contains_key(kid) {
                self.error(
                    format!("{table}.default_key"),
                    format!("{kid:?} is not a key in {table}.signing_keys and there is no jwks_uri or issuer to find it in"),
                );
            }
        }
        KeySources {
            issuer,
            jwks_uri,
            signing_keys,
        }
    }

    fn username_claims(&mut self, raw: Option<Vec<String>>) -> Vec<String> {
        let Some(claims) = raw else {
            return DEFAULT_PREFERRED_USERNAME_CLAIMS
                .map(str::to_owned)
                .to_vec();
        };
        // RabbitMQ 4.1+ uses the list as-is, so an empty list would name every user "unknown".
        if claims.is_empty() {
            self.error(
                "oauth2.preferred_username_claims",
                "must name at least one claim",
            );
        }
        for (i, claim) in claims.iter().enumerate() {
            if claim.is_empty() {
                self.error(
                    format!("oauth2.preferred_username_claims[{i}]"),
                    "must not be empty",
                );
            }
        }
        claims
    }

    fn algorithms(
        &mut self,
        table: &str,
        raw: Option<Vec<String>>,
        default: &[JwtAlgorithm],
    ) -> Vec<JwtAlgorithm> {
        let Some(names) = raw else {
            return default.to_vec();
        };
        if names.is_empty() {
            self.error(
                format!("{table}.algorithms"),
                "must list at least one algorithm",
            );
        }
        let mut algorithms = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            match name.parse::<JwtAlgorithm>() {
                // A repeated name is harmless, so it is dropped rather than reported.
                Ok(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                Ok(_) => {}
                Err(why) => self.error(format!("{table}.algorithms[{i}]"), why.to_string()),
            }
        }
        algorithms
    }

    fn signing_keys(
        &mut self,
        table: &str,
        raw: BTreeMap<String, String>,
    ) -> BTreeMap<String, PathBuf> {
        let mut keys = BTreeMap::new();
        for (kid, path) in raw {
            let key = table_key(&format!("{table}.signing_keys"), &kid);
            if kid.is_empty() {
                self.error(key.clone(), "a key id must not be empty");
            }
            let path = self.file(&key, &path);
            keys.insert(kid, path);
        }
        keys
    }

    fn scope_aliases(
        &mut self,
        table: &str,
        raw: BTreeMap<String, RawAliasValue>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut aliases = BTreeMap::new();
        for (alias, value) in raw {
            let key = table_key(&format!("{table}.scope_aliases"), &alias);
            if alias.is_empty() {
                self.error(key.clone(), "an alias must not be empty");
            }
            let scopes = match value {
                // Whitespace rather than only ' ', so a multi-line TOML string also works.
                RawAliasValue::Spaced(s) => s.split_whitespace().map(str::to_owned).collect(),
                RawAliasValue::List(list) => {
                    for (i, scope) in list.iter().enumerate() {
                        // Token scopes are space-separated, so such an entry could never be
                        // granted as written.
                        if scope.is_empty() || scope.contains(char::is_whitespace) {
                            self.error(
                                format!("{key}[{i}]"),
                                format!("{scope:?} must be one non-empty scope without whitespace"),
                            );
                        }
                    }
                    list
                }
            };
            aliases.insert(alias, scopes);
        }
        aliases
    }

    /// `issuer` and `jwks_uri`: the keys fetched from here decide who may log in, so they
    /// must come over HTTPS unless the identity provider is on this host.
    fn idp_url(&mut self, key: &str, value: Option<String>) -> Option<String> {
        let url = value?;
        if let Err(why) = check_url(&url) {
            self.error(key, format!("{url:?} {why}"));
        }
        Some(url)
    }

    // --- scalar helpers ----------------------------------------------------------------------

    fn socket_addr(&mut self, key: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.error(
                key,
                format!("{value:?} is not an IP socket address such as \"0.0.0.0:5671\" or \"[::]:5671\""),
            );
            PLACEHOLDER_ADDR
        })
    }

    fn required_text(&mut self, key: &str, value: Option<String>) -> String {
        match value {
            None => self.error(key, "is required"),
            Some(ref v) if v.is_empty() => self.error(key, "must not be empty"),
            Some(_) => {}
        }
        value.unwrap_or_default()
    }

    /// A TLS listener file: required, with an explanation of how to run without TLS.
    fn required_file(
        &mut self,
        key: &str,
        value: Option<String>,
        plain: Option<SocketAddr>,
    ) -> PathBuf {
        match value {
            Some(path) => self.file(key, &path),
            None => {
                let how = if plain.is_some() {
                    "to run only the plain listener, remove listener.address, tls_cert and tls_key"
                } else {
                    "the TLS listener is the only listener unless listener.plain_address is set"
                };
                self.error(key, format!("is required for the TLS listener ({how})"));
                PathBuf::new()
            }
        }
    }

    /// Resolves `value` against the config file's directory and, if asked, checks it can be
    /// opened now, so a typo fails `check-config` rather than the first TLS handshake.
    fn file(&mut self, key: &str, value: &str) -> PathBuf {
        if value.is_empty() {
            self.error(key, "must not be empty");
            return PathBuf::new();
        }
        let path = self.base_dir.join(value);
        if self.check_files == CheckFiles::Yes {
            let opened = std::fs::File::open(&path).and_then(|f| f.metadata());
            match opened {
                Ok(meta) if meta.is_dir() => {
                    self.error(
                        key,
                        format!("{} is a directory, not a file", path.display()),
                    );
                }
                Ok(_) => {}
                Err(e) => self.error(key, format!("cannot read {}: {e}", path.display())),
            }
        }
        path
    }

    /// An integer key within `[min, max]`, converted to the field's type.
    fn bounded<T>(&mut self, key: &str, value: Option<u64>, default: T, min: u64, max: u64) -> T
    where
        T: TryFrom<u64>,
    {
        let Some(v) = value else { return default };
        if v < min || v > max {
            self.error(
                key,
                format!("{v} is out of range: must be between {min} and {max}"),
            );
            return default;
        }
        // Cannot fail: every caller's `max` fits in `T`.
        T::try_from(v).unwrap_or(default)
    }

    fn millis(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: u64,
        min: u64,
        max: u64,
    ) -> Duration {
        Duration::from_millis(self.bounded(key, value, default, min, max))
    }
}

/// The `backend.tls*` keys, taken out of [`RawBackend`].
struct RawBackendTls {
    enabled: bool,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    server_name: Option<String>,
}

fn raw_tls(raw: &RawBackend) -> RawBackendTls {
    RawBackendTls {
        enabled: raw.tls.unwrap_or(false),
        ca: raw.tls_ca.clone(),
        cert: raw.tls_cert.clone(),
        key: raw.tls_key.clone(),
        server_name: raw.tls_server_name.clone(),
    }
}

/// The validated key-source fields of `[oauth2]`.
struct KeySources {
    issuer: Option<String>,
    jwks_uri: Option<String>,
    signing_keys: BTreeMap<String, PathBuf>,
}

const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `table.key`, quoting the key as TOML would when it is not a bare key (`"arn:aws:…"`).
fn table_key(table: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        format!("{table}.{key}")
    } else {
        format!("{table}.{key:?}")
    }
}

/// `host:port` with a DNS name, an IPv4 address or a bracketed IPv6 address.
fn parse_node(node: &str) -> Result<BackendNode, &'static str> {
    if node.contains("://") {
        return Err("is a URL; expected \"host:port\"");
    }
    let (host, port) = if let Some(rest) = node.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or("expected \"[ipv6]:port\"")?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| "has an invalid IPv6 address between the brackets")?;
        (host, port)
    } else {
        let (host, port) = node
            .rsplit_once(':')
            .ok_or("has no port; expected \"host:port\"")?;
        if host.contains(':') {
            return Err("looks like an IPv6 address: write it as \"[addr]:port\"");
        }
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Err("has an invalid host name");
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(BackendNode {
            host: host.to_owned(),
            port,
        }),
        _ => Err("has an invalid port (1-65535)"),
    }
}

/// A light check of `scheme://host[:port][/path]`: enough to catch typos and plain HTTP to a
/// remote identity provider, without pulling in a URL parser the rest of the crate lacks.
fn check_url(url: &str) -> Result<(), &'static str> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("is not a URL: expected http:// or https://")?;
    if url.contains(char::is_whitespace) {
        return Err("must not contain whitespace");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host_of(authority);
    if host.is_empty() {
        return Err("has no host");
    }
    match scheme {
        "https" => Ok(()),
        "http" if is_loopback(host) => Ok(()),
        "http" => Err(
            "must use https: signing keys fetched over plain HTTP could be replaced in transit (http is allowed only for localhost)",
        ),
        _ => Err("must use http:// or https://"),
    }
}

/// The host part of `userinfo@host:port`, without IPv6 brackets.
fn host_of(authority: &str) -> &str {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split_once(']').map_or("", |(h, _)| h);
    }
    host_port.split_once(':').map_or(host_port, |(h, _)| h)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
