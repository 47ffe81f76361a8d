//! The TOML file exactly as written: every key optional, no defaults applied, no meaning checked.
//!
//! Every struct denies unknown fields: a misspelt security setting (`verify_aub = false`) must
//! stop the gateway instead of silently leaving the default in force. Required keys are
//! `Option`s here too, so a missing key is reported by validation together with every other
//! problem rather than by serde, which stops at the first one.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub listener: RawListener,
    #[serde(default)]
    pub backend: RawBackend,
    #[serde(default)]
    pub oauth2: RawOAuth2,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub authorization: RawAuthorization,
    /// `[management]`: absent, no management listener.
    pub management: Option<RawManagement>,
    /// Test builds only (the `test-switches` feature): elsewhere `[testing]` is an unknown
    /// section, an error.
    #[cfg(feature = "test-switches")]
    #[serde(default)]
    pub testing: RawTesting,
}

/// `[testing]` (the `test-switches` feature only).
#[cfg(feature = "test-switches")]
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTesting {
    pub gateway_decisions: Option<bool>,
}

/// `[auth]`: the authentication backend chain and the users restricted by source.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub backends: Option<Vec<String>>,
    pub loopback_users: Option<Vec<String>>,
    pub sources: Option<BTreeMap<String, Vec<String>>>,
}

/// `[authorization]`: broker policies in IAM's JSON grammar, and how they combine with
/// the token's scopes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuthorization {
    pub mode: Option<String>,
    pub policies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub worker_threads: Option<u64>,
    pub per_core: Option<bool>,
    pub busy_poll_us: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub address: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub plain_address: Option<String>,
    pub max_connections: Option<u64>,
    pub max_connections_per_source: Option<u64>,
    pub max_connections_per_identity: Option<u64>,
    pub handshakes_per_second_per_source: Option<u64>,
    pub handshake_timeout_ms: Option<u64>,
    pub max_preauth_frame: Option<u64>,
    pub auth_failure_delay_ms: Option<u64>,
    pub drain_period_ms: Option<u64>,
    pub proxy_protocol: Option<bool>,
    pub drain_deadline_ms: Option<u64>,
    pub channel_max: Option<u64>,
    pub frame_max: Option<u64>,
    pub heartbeat: Option<u64>,
    pub consumer_max_per_channel: Option<u64>,
    pub consumer_max_per_connection: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub nodes: Option<Vec<String>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub close_timeout_ms: Option<u64>,
    pub max_connecting: Option<u64>,
    pub health_check_interval_ms: Option<u64>,
    pub management_url: Option<String>,
    pub exchange_type_ttl_ms: Option<u64>,
    pub exchange_lookups_per_second: Option<u64>,
    pub balance: Option<String>,
    pub tls: Option<bool>,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_server_name: Option<String>,
    pub auth: Option<String>,
    pub token: Option<RawBackendToken>,
}

/// `[backend.token]`: the gateway's own tokens for the broker (`backend.auth = "token"`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackendToken {
    pub signing_key: Option<String>,
    pub kid: Option<String>,
    pub resource_server_id: Option<String>,
    pub scope_prefix: Option<String>,
    pub retired_keys: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth2 {
    pub resource_server_id: Option<String>,
    pub scope_prefix: Option<String>,
    pub additional_scopes_key: Option<String>,
    pub preferred_username_claims: Option<Vec<String>>,
    pub verify_aud: Option<bool>,
    pub require_exp: Option<bool>,
    pub issuer: Option<String>,
    pub jwks_uri: Option<String>,
    /// RabbitMQ's pre-4.1 name for `jwks_uri`, accepted so old configurations carry over.
    pub jwks_url: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub default_key: Option<String>,
    pub signing_keys: Option<BTreeMap<String, String>>,
    pub leeway_seconds: Option<u64>,
    pub check_iat: Option<bool>,
    pub check_nbf: Option<bool>,
    pub jwks_refresh_seconds: Option<u64>,
    pub jwks_min_refetch_interval_ms: Option<u64>,
    pub http_timeout_ms: Option<u64>,
    pub token_cache_size: Option<u64>,
    pub jwks_stale_grace_seconds: Option<u64>,
    pub scope_aliases: Option<BTreeMap<String, RawAliasValue>>,
    pub policy: Option<RawPolicy>,
    pub issuers: Option<Vec<RawIssuer>>,
}

/// `[oauth2.policy]` and `[oauth2.issuers.policy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub max_lifetime_seconds: Option<u64>,
    pub required_claims: Option<Vec<String>>,
    pub jti_deny: Option<Vec<String>>,
    pub rules: Option<Vec<RawRule>>,
}

/// `[[oauth2.policy.rules]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub claim: Option<String>,
    pub equals: Option<String>,
    pub one_of: Option<Vec<String>>,
    pub prefix: Option<String>,
}

/// `[[oauth2.issuers]]`: one issuer with its keys; unset keys inherit `[oauth2]`'s.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub name: Option<String>,
    pub issuer: Option<String>,
    pub jwks_uri: Option<String>,
    pub jwks_url: Option<String>,
    pub signing_keys: Option<BTreeMap<String, String>>,
    pub default_key: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub resource_server_id: Option<String>,
    pub scope_prefix: Option<String>,
    pub additional_scopes_key: Option<String>,
    pub scope_aliases: Option<BTreeMap<String, RawAliasValue>>,
    pub policy: Option<RawPolicy>,
}

/// RabbitMQ's `rabbitmq.conf` form is one space-separated string; its `advanced.config` form
/// is a list. Both are accepted so either carries over unchanged.
///
/// Deserialised by hand rather than with `#[serde(untagged)]`, whose error ("data did not
/// match any variant") would not tell the operator what was expected.
#[derive(Debug)]
pub(super) enum RawAliasValue {
    Spaced(String),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for RawAliasValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AliasVisitor;

        impl<'de> serde::de::Visitor<'de> for AliasVisitor {
            type Value = RawAliasValue;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string of space-separated scopes or a list of scope strings")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawAliasValue::Spaced(v.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut scopes = Vec::new();
                while let Some(scope) = seq.next_element::<String>()? {
                    scopes.push(scope);
                }
                Ok(RawAliasValue::List(scopes))
            }
        }

        deserializer.deserialize_any(AliasVisitor)
    }
}

/// `[management]`: the HTTPS listener in front of RabbitMQ's management API.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManagement {
    pub address: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub backend_url: Option<String>,
    pub proxy_protocol: Option<bool>,
    pub max_body_bytes: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub header_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_concurrent_requests: Option<u64>,
    pub protected_users: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    pub audit: Option<String>,
}
