//! Authentication: from a token to an identity with RabbitMQ permissions.
//!
//! - [`jwt`]: pure verification (header, key binding, signature, claim rules).
//! - [`keys`]: static keys and the issuer's JWKS (the only module that does IdP IO).
//! - [`scopes`]: RabbitMQ 4.2 scope normalisation, pure.
//! - [`wildcard`]: RabbitMQ's wildcard matcher, pure.
//!
//! [`Authenticator`] ties them together. It never logs or stores a raw token: tokens are
//! identified by a short SHA-256 prefix ([`token_id`]).

pub mod jwt;
pub mod keys;
pub mod scopes;
pub mod wildcard;

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::authz::Permissions;
use jwt::{AuthError, ClaimRules};
use keys::KeyStore;
use scopes::ScopeRules;

/// Who a verified token says the client is, and what it may do.
#[derive(Debug)]
pub struct Identity {
    /// The RabbitMQ username (`preferred_username_claims`, default `sub`, `client_id`).
    pub username: String,
    pub sub: Option<String>,
    pub jti: Option<String>,
    pub iss: Option<String>,
    /// Expiry in seconds since the epoch, when the token has one.
    pub exp: Option<i64>,
    /// Normalised scopes (prefix stripped, sorted, deduplicated).
    pub scopes: Vec<String>,
    pub permissions: Permissions,
    /// A short hash of the token, safe to log.
    pub token_id: String,
}

/// Verifies tokens for one issuer / resource server.
pub struct Authenticator {
    pub algorithms: Vec<Algorithm>,
    pub keys: Arc<KeyStore>,
    pub claims: ClaimRules,
    pub scopes: ScopeRules,
}

impl Authenticator {
    /// Verifies `token` at time `now` (seconds since the epoch).
    pub async fn authenticate(&self, token: &str, now: i64) -> Result<Identity, AuthError> {
        let claims = self.verify_signature(token).await?;
        self.identity(token, &claims, now)
    }

    /// Checks the header and signature only, returning the claims.
    pub async fn verify_signature(&self, token: &str) -> Result<Value, AuthError> {
        let header = jwt::read_header(token, &self.algorithms)?;
        let key = self.keys.find(header.kid.as_deref()).await?;
        jwt::verify_signature(token, &header, &key)
    }

    /// Builds the authenticator for a validated `[oauth2]` config (keys loaded, nothing
    /// fetched yet: see [`KeyStore::refresh`]).
    pub fn from_config(o: &crate::config::OAuth2Config) -> Result<Authenticator, String> {
        let keys = Arc::new(KeyStore::new(keys::KeySettings {
            signing_keys: o
                .signing_keys
                .iter()
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect(),
            default_key: o.default_key.clone(),
            jwks_uri: o.jwks_uri.clone(),
            // The issuer is pinned in any case; it is used for OIDC discovery only when
            // no other key source is configured (as RabbitMQ does).
            issuer: o
                .issuer
                .clone()
                .filter(|_| o.jwks_uri.is_none() && o.signing_keys.is_empty()),
            refresh_interval: o.jwks_refresh,
            min_refetch_interval: o.jwks_min_refetch_interval,
            http_timeout: o.http_timeout,
        })?);
        let algorithms = o
            .algorithms
            .iter()
            .map(|a| {
                a.as_str()
                    .parse::<Algorithm>()
                    .map_err(|e| format!("{a}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Authenticator {
            algorithms,
            keys,
            claims: ClaimRules {
                resource_server_id: o.resource_server_id.clone(),
                verify_aud: o.verify_aud,
                require_exp: o.require_exp,
                issuer: o.issuer.clone(),
                check_nbf: o.check_nbf,
                check_iat: o.check_iat,
                leeway_seconds: o.leeway.as_secs() as i64,
            },
            scopes: ScopeRules {
                resource_server_id: o.resource_server_id.clone(),
                scope_prefix: o.scope_prefix.clone(),
                additional_scopes_key: o.additional_scopes_key.clone(),
                scope_aliases: o.scope_aliases.clone(),
                preferred_username_claims: o.preferred_username_claims.clone(),
            },
        })
    }

    /// The claim checks and scope mapping for already verified claims.
    pub fn identity(&self, token: &str, claims: &Value, now: i64) -> Result<Identity, AuthError> {
        let exp = jwt::check_claims(claims, &self.claims, now)?;
        let normalised =
            scopes::normalise(claims, &self.scopes).map_err(|_| AuthError::TooManyScopes {
                max: scopes::MAX_SCOPES,
            })?;
        let text = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Identity {
            username: scopes::username(claims, &self.scopes.preferred_username_claims),
            sub: text("sub"),
            jti: text("jti"),
            iss: text("iss"),
            exp,
            permissions: Permissions::from_scopes(&normalised.scopes),
            scopes: normalised.scopes,
            token_id: token_id(token),
        })
    }
}

/// A short, non-reversible identifier of a token for logs: the first 12 hex digits of
/// its SHA-256.
pub fn token_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}
