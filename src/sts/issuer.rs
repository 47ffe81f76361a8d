//! [`Issuer`]: the configured principals, the key ring, and what is made from them: tokens
//! with the AWS shape, the JWKS and the OIDC discovery document.
//!
//! A token looks like one from STS `GetWebIdentityToken`:
//!
//! ```text
//! header  {"kid":"EC384_0","typ":"JWT","alg":"ES384"}      (kid RSA_<n> for RS256)
//! claims  iss, aud (a string for one audience, else a list), sub (role ARN), iat, exp, jti,
//!         "https://sts.amazonaws.com/": { aws_account, source_region, principal_id,
//!             org_id?, ou_path? [..], principal_tags? {..}, request_tags? {..},
//!             original_session_exp }
//! ```
//!
//! No `nbf`. Optional members are left out when empty, as in real tokens ("all these claims
//! may not be present in a token at the same time").

use std::sync::{RwLock, RwLockReadGuard};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use super::keys::KeyRing;
use super::request::TokenRequest;
use super::time::iso8601;
use super::{IssuerConfig, Principal, STS_CLAIMS_KEY, StsError};

/// How long the caller's (modelled) role session lasts from the request:
/// `original_session_exp = iat + SESSION_SECONDS`.
pub const SESSION_SECONDS: i64 = 3600;

/// A minted token.
#[derive(Clone)]
pub struct Minted {
    pub token: String,
    /// `exp`, Unix seconds.
    pub expiration: i64,
    pub jti: String,
    pub kid: String,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("expiration", &self.expiration)
            .field("jti", &self.jti)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The embedded STS issuer.
pub struct Issuer {
    issuer_url: String,
    region: String,
    principals: Vec<Principal>,
    keys: RwLock<KeyRing>,
}

impl Issuer {
    /// Checks the config (every problem at once) and loads or creates the signing keys.
    pub fn open(cfg: IssuerConfig) -> Result<Issuer, StsError> {
        let issuer_url = cfg.issuer_url.trim_end_matches('/').to_owned();
        let mut problems = Vec::new();
        if !(issuer_url.starts_with("http://") || issuer_url.starts_with("https://"))
            || issuer_url.contains(['?', '#'])
        {
            problems.push(format!(
                "issuer_url {issuer_url:?} must be an http:// or https:// URL without query or fragment"
            ));
        }
        if cfg.region.is_empty() {
            problems.push("region must not be empty".to_owned());
        }
        for (i, p) in cfg.principals.iter().enumerate() {
            if p.access_key_id.is_empty() || p.secret_access_key.is_empty() {
                problems.push(format!(
                    "principal {}: access_key_id and secret_access_key must not be empty",
                    i + 1
                ));
            }
            if !p.role_arn.starts_with("arn:") {
                problems.push(format!(
                    "principal {}: role_arn {:?} is not an ARN",
                    i + 1,
                    p.role_arn
                ));
            }
            if cfg.principals[..i]
                .iter()
                .any(|q| q.access_key_id == p.access_key_id)
            {
                problems.push(format!(
                    "principal {}: access_key_id {:?} is configured twice",
                    i + 1,
                    p.access_key_id
                ));
            }
        }
        if !problems.is_empty() {
            return Err(StsError::Config(problems.join("; ")));
        }
        let keys = KeyRing::open(&cfg.state_dir)?;
        Ok(Issuer {
            issuer_url,
            region: cfg.region,
            principals: cfg.principals,
            keys: RwLock::new(keys),
        })
    }

    /// The issuer URL (no trailing `/`): `iss` and the base of the discovery URLs.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/.well-known/jwks.json", self.issuer_url)
    }

    pub fn principals(&self) -> &[Principal] {
        &self.principals
    }

    /// The principal with this access key id.
    pub fn principal(&self, access_key_id: &str) -> Option<&Principal> {
        self.principals
            .iter()
            .find(|p| p.access_key_id == access_key_id)
    }

    fn keys(&self) -> RwLockReadGuard<'_, KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Mints a token for `caller` at `now` (Unix seconds). `req` is checked with the API's
    /// rules first.
    pub fn mint(
        &self,
        caller: &Principal,
        req: &TokenRequest,
        now: i64,
    ) -> Result<Minted, StsError> {
        req.check()?;
        let jti = uuid_v4();
        let claims = self.claims(caller, req, now, &jti);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let keys = self.keys();
        let kid = match req.algorithm {
            super::SigningAlgorithm::Rs256 => keys.current().rsa_kid(),
            super::SigningAlgorithm::Es384 => keys.current().ec_kid(),
        };
        // The member order of real STS headers.
        let header = format!(
            "{{\"kid\":{},\"typ\":\"JWT\",\"alg\":\"{}\"}}",
            Value::String(kid.clone()),
            req.algorithm.as_str()
        );
        let input = format!("{}.{payload}", URL_SAFE_NO_PAD.encode(header));
        let (signed_kid, sig) = keys.sign(req.algorithm, input.as_bytes())?;
        debug_assert_eq!(signed_kid, kid);
        Ok(Minted {
            token: format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)),
            expiration: now + req.duration_seconds,
            jti,
            kid,
        })
    }

    /// The claims of a token for `caller` (pure apart from the issuer's settings).
    pub fn claims(&self, caller: &Principal, req: &TokenRequest, now: i64, jti: &str) -> Value {
        let mut sts = Map::new();
        sts.insert("aws_account".into(), json!(caller.account));
        sts.insert("source_region".into(), json!(self.region));
        sts.insert("principal_id".into(), json!(caller.role_arn));
        if let Some(org) = &caller.org_id {
            sts.insert("org_id".into(), json!(org));
        }
        if !caller.ou_path.is_empty() {
            sts.insert("ou_path".into(), json!(caller.ou_path));
        }
        if !caller.principal_tags.is_empty() {
            sts.insert("principal_tags".into(), json!(caller.principal_tags));
        }
        if !req.tags.is_empty() {
            sts.insert("request_tags".into(), json!(req.tags));
        }
        sts.insert(
            "original_session_exp".into(),
            json!(iso8601(now + SESSION_SECONDS)),
        );
        let aud = match req.audiences.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "iss": self.issuer_url,
            "aud": aud,
            "sub": caller.role_arn,
            "iat": now,
            "exp": now + req.duration_seconds,
            "jti": jti,
            STS_CLAIMS_KEY: Value::Object(sts),
        })
    }

    /// `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        self.keys().jwks()
    }

    /// The kids the JWKS publishes, oldest first.
    pub fn published_kids(&self) -> Vec<String> {
        self.keys()
            .published()
            .iter()
            .flat_map(|g| [g.rsa_kid(), g.ec_kid()])
            .collect()
    }

    /// `/.well-known/openid-configuration`, as the real issuer serves it.
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer_url,
            "jwks_uri": self.jwks_uri(),
            "id_token_signing_alg_values_supported": ["RS256", "ES384"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "jti", STS_CLAIMS_KEY],
            "subject_types_supported": ["public"],
        })
    }

    /// Adds and persists a new key generation; new tokens use it, and the JWKS publishes
    /// it beside the previous one. Returns the new kids.
    pub fn rotate(&self) -> Result<[String; 2], StsError> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let kids = keys.rotate()?;
        tracing::info!(rsa = %kids[0], ec = %kids[1], "rotated STS signing keys");
        Ok(kids)
    }
}

/// A random (version 4) UUID, as STS uses for `jti` and request ids.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
