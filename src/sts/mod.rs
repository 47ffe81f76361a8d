//! The embedded AWS STS issuer: `GetWebIdentityToken` over the STS Query API, and the OIDC
//! discovery documents that let any verifier (this gateway, RabbitMQ, PyJWT) check its tokens.
//! It exists for development and integration tests, where no real STS is reachable.
//!
//! ```text
//!  boto3 / aws cli ──POST / (SigV4)──▶ server ──▶ sigv4 (pure) ──▶ request (pure) ──▶ Issuer::mint
//!  verifier ──GET /.well-known/openid-configuration, /.well-known/jwks.json──▶ Issuer::{discovery,jwks}
//! ```
//!
//! - [`sigv4`]: SigV4 signature verification, pure (time passed in).
//! - [`request`]: Query API form parsing and `GetWebIdentityToken` validation, pure.
//! - [`keys`]: signing keys: generated with aws-lc-rs, persisted as PKCS#8 PEM, rotation.
//! - [`issuer`]: [`Issuer`]: configuration, minting, JWKS and discovery, rotation.
//! - [`xml`]: the STS XML responses and `ErrorResponse`.
//! - [`server`]: routing ([`server::respond`], no IO) and the HTTP / HTTPS listener (hyper),
//!   bounded in body size, header and body time, TLS handshake time and connections.
//! - [`time`]: the two UTC timestamp forms STS uses.
//!
//! # What the emulator checks, and what it does not
//!
//! Checked, with the error code real STS uses:
//! - `Authorization` present (`MissingAuthenticationToken`, 403) and well formed: algorithm
//!   `AWS4-HMAC-SHA256`, `Credential`, `SignedHeaders` (must include `host`), `Signature`, and
//!   an `X-Amz-Date` header whose day equals the credential scope's (`IncompleteSignature`, 400).
//! - The access key id names a configured principal (`InvalidClientTokenId`, 403).
//! - The credential scope is `<date>/<region>/sts/aws4_request` with the issuer's region
//!   (`SignatureDoesNotMatch`, 403).
//! - The signature: canonical request (method, path, sorted query, the signed headers, the
//!   SHA-256 of the body as received), string to sign, the signing key derived from the
//!   configured secret; compared in constant time (`SignatureDoesNotMatch`, 403).
//! - `X-Amz-Date` within 15 minutes of the emulator's clock, as AWS allows
//!   (`SignatureDoesNotMatch`, "Signature expired" / "Signature not yet current").
//! - `Action` and `Version` (`MissingAction`, `InvalidAction`), and every
//!   `GetWebIdentityToken` parameter rule of the API model (`ValidationError`, 400, every
//!   broken rule in one message; duplicate tag keys `InvalidParameterValue`, 400). Tag
//!   characters `[\p{L}\p{Z}\p{N}_.:/=+\-@]` use Unicode general categories (regex-syntax's
//!   tables); lengths count characters, as AWS does.
//!
//! Not checked or not emulated:
//! - IAM policies: every configured principal may call `GetWebIdentityToken` with any
//!   audience, duration, algorithm and tags (no `sts:TagGetWebIdentityToken`, no condition
//!   keys), and outbound federation is always "enabled".
//! - Session tokens: an `X-Amz-Security-Token` header is accepted and ignored; the principal
//!   is the configured long-term key. Each call is modelled as a one-hour role session that
//!   starts at the request, so `original_session_exp` is `iat + 3600` and
//!   `SessionDurationEscalation` never happens.
//! - Presigned URLs (query-string authentication), SigV4a and the `Date` header (instead of
//!   `X-Amz-Date`) are not supported: such requests are refused as unsigned or incomplete.
//! - `X-Amz-Content-Sha256` is not required (STS does not use it); the body is always hashed.
//! - `SubjectMode=OriginIdentity` and `Scope` (botocore 1.44.7+) are refused with
//!   `ValidationError`: the emulated caller has no identity propagation context, which is
//!   when real STS refuses them too. `SubjectMode=AWSIdentity` is the default behaviour.
//! - `JWTPayloadSizeExceeded`: no payload limit is enforced (the API bounds tags anyway).
//!
//! **Invariant:** `sigv4` and `request` do no IO and read no clock; the server passes `now`.
//! **Invariant:** a secret access key, a private key or a minted token is never logged.

pub mod issuer;
pub mod keys;
pub mod request;
pub mod server;
pub mod sigv4;
pub mod time;
pub mod xml;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use issuer::{Issuer, Minted};
pub use request::{SigningAlgorithm, TokenRequest};
pub use server::{serve, serve_tls};

/// The Query API version of STS.
pub const API_VERSION: &str = "2011-06-15";
/// The XML namespace of STS responses.
pub const XML_NAMESPACE: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
/// The key of the nested claims object in every token.
pub const STS_CLAIMS_KEY: &str = "https://sts.amazonaws.com/";
/// The region used when none is configured.
pub const DEFAULT_REGION: &str = "us-east-1";

/// What the issuer needs to run.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    /// The issuer URL: the `iss` claim and the base of the discovery URLs
    /// (e.g. `http://127.0.0.1:8479`). A trailing `/` is ignored.
    pub issuer_url: String,
    /// Where the signing keys live (`<state_dir>/sts-keys/`), created if missing.
    pub state_dir: PathBuf,
    /// The callers, by access key id.
    pub principals: Vec<Principal>,
    /// The region this endpoint serves: requests must be signed for it, and it is the
    /// tokens' `source_region`.
    pub region: String,
}

/// A caller: long-term test credentials and the IAM identity they stand for.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The role ARN: the token's `sub` and `principal_id`.
    pub role_arn: String,
    /// The account id (`aws_account`), a 12-digit string.
    pub account: String,
    #[serde(default)]
    pub org_id: Option<String>,
    /// `ou_path` entries, e.g. `o-a1b2c3d4e5/r-ab12/ou-ab12-11111111/`.
    #[serde(default)]
    pub ou_path: Vec<String>,
    #[serde(default)]
    pub principal_tags: BTreeMap<String, String>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("role_arn", &self.role_arn)
            .field("account", &self.account)
            .field("org_id", &self.org_id)
            .field("ou_path", &self.ou_path)
            .field("principal_tags", &self.principal_tags)
            .finish()
    }
}

/// Reads principals from a TOML file of `[[principal]]` tables (the fields of
/// [`Principal`]; unknown keys are errors).
pub fn load_principals(path: &std::path::Path) -> Result<Vec<Principal>, StsError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        principal: Vec<Principal>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| StsError::State {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let file: File =
        toml::from_str(&text).map_err(|e| StsError::Config(format!("{}: {e}", path.display())))?;
    Ok(file.principal)
}

/// An error in the shape STS answers with: HTTP status, code, message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// `ValidationError` with AWS's "N validation error(s) detected: …" message.
    pub fn validation(errors: &[String]) -> ApiError {
        let n = errors.len();
        let plural = if n == 1 { "" } else { "s" };
        ApiError::new(
            400,
            "ValidationError",
            format!(
                "{n} validation error{plural} detected: {}",
                errors.join("; ")
            ),
        )
    }

    /// `Sender` for client errors, `Receiver` for the emulator's own failures.
    pub fn fault_type(&self) -> &'static str {
        if self.status >= 500 {
            "Receiver"
        } else {
            "Sender"
        }
    }
}

/// Why an issuer operation failed, by cause.
#[derive(Debug, thiserror::Error)]
pub enum StsError {
    /// The request was refused; answered to the caller as it is.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The state directory or a key file could not be read or written.
    #[error("{}: {reason}", path.display())]
    State { path: PathBuf, reason: String },
    /// A key file exists but holds no usable key.
    #[error("{}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// Signing or key generation failed inside the crypto library.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}

impl StsError {
    /// What the caller of the HTTP API sees: the API error itself, or `InternalFailure`
    /// (the details stay in the log).
    pub fn to_api(&self) -> ApiError {
        match self {
            StsError::Api(e) => e.clone(),
            _ => ApiError::new(
                500,
                "InternalFailure",
                "The request processing has failed because of an unknown error, exception or failure.",
            ),
        }
    }
}
