//! Adapters from the validated configuration to the runtime objects built from it: the
//! composition root's helpers (the gateway's `proxy::build`, the CLI, the tests). The modules
//! they build (`auth`) know nothing of `config`.

use std::sync::Arc;

use jsonwebtoken::Algorithm;

use crate::auth::chain::SourceRules;
use crate::auth::jwt::ClaimRules;
use crate::auth::keys::KeyError;
use crate::auth::keys::{KeySettings, KeyStore};
use crate::auth::scopes::ScopeRules;
use crate::auth::{Authenticator, Authenticators};
use crate::authz::Permissions;
use crate::authz::iam::{Binding, Facts};
use crate::config::{AuthConfig, AuthorizationConfig, IssuerConfig, OAuth2Config};

/// Why the authenticators of a configuration could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WiringError {
    /// An issuer's static keys could not be loaded (or its HTTP client built).
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// An algorithm name `jsonwebtoken` does not know.
    #[error("{alg}: {why}")]
    Algorithm { alg: String, why: String },
}

/// The authenticators of every issuer of a validated `[oauth2]`, sharing one set of
/// counters; the token's `iss` chooses among them when `[[oauth2.issuers]]` are configured.
pub fn authenticators(o: &OAuth2Config) -> Result<Authenticators, WiringError> {
    let list = o
        .issuers
        .iter()
        .map(|i| authenticator(o, i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Authenticators::new(list, o.dispatch_by_iss))
}

/// The authenticator of the first issuer of a validated `[oauth2]` (the only one without
/// `[[oauth2.issuers]]`).
pub fn first_authenticator(o: &OAuth2Config) -> Result<Authenticator, WiringError> {
    authenticator(o, o.first_issuer())
}

/// Builds the authenticator for one issuer entry (keys loaded, nothing fetched yet:
/// see [`KeyStore::refresh`]); `o` supplies the settings every issuer shares.
pub fn authenticator(o: &OAuth2Config, i: &IssuerConfig) -> Result<Authenticator, WiringError> {
    let keys = Arc::new(KeyStore::new(KeySettings {
        stale_grace: Some(o.jwks_stale_grace),
        signing_keys: i
            .signing_keys
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect(),
        default_key: i.default_key.clone(),
        jwks_uri: i.jwks_uri.clone(),
        // The issuer is pinned in any case; it is used for OIDC discovery only when
        // no other key source is configured (as RabbitMQ does).
        issuer: i
            .issuer
            .clone()
            .filter(|_| i.jwks_uri.is_none() && i.signing_keys.is_empty()),
        refresh_interval: o.jwks_refresh,
        min_refetch_interval: o.jwks_min_refetch_interval,
        http_timeout: o.http_timeout,
    })?);
    let algorithms = i
        .algorithms
        .iter()
        .map(|a| {
            a.as_str()
                .parse::<Algorithm>()
                .map_err(|e| WiringError::Algorithm {
                    alg: a.as_str().to_owned(),
                    why: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut auth = Authenticator::new(
        algorithms,
        keys,
        ClaimRules {
            resource_server_id: i.resource_server_id.clone(),
            verify_aud: o.verify_aud,
            require_exp: o.require_exp,
            issuer: i.issuer.clone(),
            check_nbf: o.check_nbf,
            check_iat: o.check_iat,
            leeway_seconds: o.leeway.as_secs() as i64,
        },
        ScopeRules {
            resource_server_id: i.resource_server_id.clone(),
            scope_prefix: i.scope_prefix.clone(),
            additional_scopes_key: i.additional_scopes_key.clone(),
            scope_aliases: i.scope_aliases.clone(),
            preferred_username_claims: o.preferred_username_claims.clone(),
        },
    )
    .with_token_cache(o.token_cache_size);
    auth.name = i.name.clone();
    auth.policy = i.policy.clone();
    Ok(auth)
}

/// `loopback_users` and `[auth.sources]`.
pub fn source_rules(cfg: &AuthConfig) -> SourceRules {
    SourceRules::new(cfg.loopback_users.clone(), cfg.sources.clone())
}

/// A verified token's permissions with the broker policies of `[authorization]` bound to
/// its principal (`facts`, from the token) and its connection (the client's address, TLS
/// or not). Unchanged when no policy is configured.
pub fn bind_policies(
    permissions: Permissions,
    authorization: &AuthorizationConfig,
    facts: &Facts,
    source_ip: Option<std::net::IpAddr>,
    secure_transport: bool,
) -> Permissions {
    if !authorization.active() {
        return permissions;
    }
    let facts = Facts {
        source_ip,
        secure_transport,
        ..facts.clone()
    };
    let binding = Binding::new(&authorization.set, authorization.mode, &facts);
    permissions.with_policy(Arc::new(binding))
}
