//! Token exchange, in the spirit of RFC 8693: for a client whose token the gateway has
//! verified, a short-lived token of the gateway's own that the broker's OAuth 2.0 plugin
//! verifies again, so that RabbitMQ enforces the same permissions behind the gateway.
//!
//! - `sub`: the client's RabbitMQ username;
//! - `aud`: the backend's resource server id;
//! - `scope`: the client's final scopes (after aliases, `additional_scopes_key` and the
//!   prefix filter), prefixed again with the backend's scope prefix; topic scopes and tags
//!   are kept as they are;
//! - `iat`, `exp` (the client token's, or `iat` + [`DEFAULT_LIFETIME`] without one), `jti`;
//! - signed with a key the gateway holds for this purpose alone, named by its `kid`.
//!
//! The claims are built by [`BackendMinter::claims`], which is pure; [`BackendMinter::sign`]
//! signs them. [`BackendMinter::mint`] is what a connection uses: a token already signed
//! for the same user, scopes, `exp` (the client token's) and kind is used again rather than
//! signed anew (an RSA signature costs about a millisecond of CPU per connection), so its
//! `iat` and `jti` may be an earlier connection's; everything the broker decides on is the
//! same. Neither logs anything: a minted token is a credential. [`read_private_key`]
//! is the only IO here (the key file, refused when others may read it); [`public_key_pem`]
//! (and `cli::rabbitmq_conf`) are the broker's side of the set-up.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Lifetime of a backend token for a client token without `exp` (`require_exp = false`).
pub const DEFAULT_LIFETIME: i64 = 3_600;

/// Bytes of signed tokens kept for reuse ([`BackendMinter::mint`]).
const REUSE_BYTES: u64 = 16 << 20;

/// What a reusable backend token was signed for: everything in its claims but `iat` and
/// `jti`. The minter's own settings (key, `kid`, audience, prefix) are the minter's: a
/// reload with other settings makes a new minter, with nothing to reuse.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct MintKey {
    username: Box<str>,
    scopes: Box<[String]>,
    exp: i64,
    /// `Some(vhost)` for the minimal token that only opens `vhost`.
    only_vhost: Option<Box<str>>,
}

/// A fresh `jti` for a backend token.
pub fn jti() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The PEM key mints tokens with RS256 (an RSA key) or ES256 (a P-256 key).
pub struct BackendMinter {
    key: EncodingKey,
    alg: Algorithm,
    kid: String,
    audience: String,
    prefix: String,
    /// Signed tokens by what they were signed for, bounded by [`REUSE_BYTES`].
    signed: moka::sync::Cache<MintKey, Arc<str>>,
}

impl std::fmt::Debug for BackendMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendMinter")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("audience", &self.audience)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What the backend token is minted for.
pub struct Subject<'a> {
    pub username: &'a str,
    /// Final scopes, without a prefix (`Identity::scopes`).
    pub scopes: &'a [String],
    pub exp: Option<i64>,
}

/// Why a backend-token key file could not be used. The caller names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read (or its mode could not be).
    #[error("{0}")]
    Read(String),
    /// Others may read it.
    #[error("readable by others (mode {mode:o}): run `chmod 600` on it")]
    ReadableByOthers { mode: u32 },
    /// Not a private key of a kind the gateway signs with.
    #[error("{0}")]
    NotAKey(String),
    /// It parses but cannot sign (a P-384 key for ES256).
    #[error("the key cannot sign {alg}: {why}")]
    CannotSign { alg: String, why: String },
}

impl KeyFileError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyFileError::Read(_) => "read",
            KeyFileError::ReadableByOthers { .. } => "readable_by_others",
            KeyFileError::NotAKey(_) => "not_a_key",
            KeyFileError::CannotSign { .. } => "cannot_sign",
        }
    }
}

impl BackendMinter {
    /// From a PKCS#8 (or PKCS#1 RSA / SEC1 EC) PEM private key: RSA → RS256, P-256 → ES256.
    pub fn from_pem(
        pem: &[u8],
        kid: &str,
        audience: &str,
        prefix: &str,
    ) -> Result<Self, KeyFileError> {
        let (key, alg) = match EncodingKey::from_rsa_pem(pem) {
            Ok(k) => (k, Algorithm::RS256),
            Err(_) => match EncodingKey::from_ec_pem(pem) {
                Ok(k) => (k, Algorithm::ES256),
                Err(e) => {
                    return Err(KeyFileError::NotAKey(format!(
                        "not an RSA or P-256 private key in PEM: {e}"
                    )));
                }
            },
        };
        let minter = BackendMinter {
            key,
            alg,
            kid: kid.to_owned(),
            audience: audience.to_owned(),
            prefix: prefix.to_owned(),
            signed: moka::sync::Cache::builder()
                .max_capacity(REUSE_BYTES)
                .weigher(|k: &MintKey, v: &Arc<str>| {
                    let scopes: usize = k.scopes.iter().map(|s| s.len() + 24).sum();
                    u32::try_from(v.len() + scopes + k.username.len() + 64).unwrap_or(u32::MAX)
                })
                .build(),
        };
        // A key of another curve (P-384 for ES256) parses but cannot sign: find out now.
        minter
            .sign(&json!({}))
            .map_err(|e| KeyFileError::CannotSign {
                alg: format!("{:?}", minter.alg),
                why: e.to_string(),
            })?;
        Ok(minter)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The `aud` of the minted tokens: the broker's `resource_server_id`.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The claims of the backend token for `who`, issued at `now` with `jti`.
    pub fn claims(&self, who: &Subject<'_>, now: i64, jti: &str) -> Value {
        let scope: Vec<String> = who
            .scopes
            .iter()
            .map(|s| format!("{}{s}", self.prefix))
            .collect();
        json!({
            "sub": who.username,
            "aud": self.audience,
            "scope": scope.join(" "),
            "iat": now,
            "exp": who.exp.unwrap_or(now + DEFAULT_LIFETIME),
            "jti": jti,
        })
    }

    /// The claims of a token that only opens `vhost`: one scope naming a resource nobody
    /// uses. For a login whose full token would not fit the broker's pre-tune frame limit
    /// (4096 bytes before RabbitMQ 4.1); the full token follows in `update-secret`.
    pub fn minimal_claims(&self, who: &Subject<'_>, vhost: &str, now: i64, jti: &str) -> Value {
        // As the management API lookups encode names: the matcher URL-decodes every part.
        let vhost =
            percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let only = [format!("read:{vhost}/amq.gateway.login-only")];
        self.claims(
            &Subject {
                username: who.username,
                scopes: &only,
                exp: who.exp,
            },
            now,
            jti,
        )
    }

    /// The backend token for `who` at `now`: with `only_vhost`, the minimal one of
    /// [`BackendMinter::minimal_claims`]. A token signed before for the same user, scopes
    /// and `exp` (and vhost, for a minimal one) that has not expired is used again. A
    /// client token without `exp` gets a fresh one each time (its `exp` is counted from
    /// `now`).
    pub fn mint(
        &self,
        who: &Subject<'_>,
        only_vhost: Option<&str>,
        now: i64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let fresh = || {
            let claims = match only_vhost {
                Some(v) => self.minimal_claims(who, v, now, &jti()),
                None => self.claims(who, now, &jti()),
            };
            self.sign(&claims)
        };
        let Some(exp) = who.exp.filter(|&e| e > now) else {
            return fresh();
        };
        let key = MintKey {
            username: who.username.into(),
            scopes: who.scopes.into(),
            exp,
            only_vhost: only_vhost.map(Into::into),
        };
        if let Some(t) = self.signed.get(&key) {
            return Ok(t.to_string());
        }
        let t = fresh()?;
        self.signed.insert(key, Arc::from(t.as_str()));
        Ok(t)
    }

    /// Signs `claims` as a JWT.
    pub fn sign(&self, claims: &Value) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

/// Reads the private key file of `[backend.token]`, refusing one its group or others may
/// read (the gateway's key for the broker is as sensitive as the service user's password).
pub fn read_private_key(path: &std::path::Path) -> Result<Vec<u8>, KeyFileError> {
    let read = |e: std::io::Error| KeyFileError::Read(e.to_string());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyFileError::ReadableByOthers { mode: mode & 0o777 });
        }
    }
    std::fs::read(path).map_err(read)
}

/// The public key of a PEM private key, as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo): what
/// the broker's `auth_oauth2.signing_keys.<kid>` names.
pub fn public_key_pem(private_pem: &[u8]) -> Result<String, KeyFileError> {
    let text = std::str::from_utf8(private_pem)
        .map_err(|_| KeyFileError::NotAKey("not a PEM file".to_owned()))?;
    rcgen::KeyPair::from_pem(text)
        .map(|k| k.public_key_pem())
        .map_err(|e| KeyFileError::NotAKey(format!("not a private key rcgen can read: {e}")))
}

/// The public key of a PEM private key (PKCS#8, or PKCS#1 RSA / SEC1 P-256) as a JWK named
/// `kid`, for the JWKS the admin listener serves to the broker (`auth_oauth2.jwks_url`).
pub fn public_jwk(private_pem: &[u8], kid: &str) -> Result<Value, KeyFileError> {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RsaKeyPair,
    };
    use base64::Engine;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let der = PrivateKeyDer::from_pem_slice(private_pem)
        .map_err(|e| KeyFileError::NotAKey(format!("not a PEM private key: {e}")))?;
    let rsa = match &der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).ok(),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()).ok(),
        _ => None,
    };
    if let Some(rsa) = rsa {
        let public = rsa.public_key();
        return Ok(json!({
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
            "n": b64(public.modulus().big_endian_without_leading_zero()),
            "e": b64(public.exponent().big_endian_without_leading_zero()),
        }));
    }
    let ec = match &der {
        PrivateKeyDer::Pkcs8(k) => {
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, k.secret_pkcs8_der())
        }
        PrivateKeyDer::Sec1(k) => EcdsaKeyPair::from_private_key_der(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            k.secret_sec1_der(),
        ),
        _ => {
            return Err(KeyFileError::NotAKey(
                "not an RSA or P-256 private key".into(),
            ));
        }
    }
    .map_err(|e| KeyFileError::NotAKey(format!("not an RSA or P-256 private key: {e}")))?;
    // Uncompressed SEC 1 point: 0x04 || x || y, 32 bytes each.
    let point = ec.public_key().as_ref();
    let (x, y) = point
        .get(1..)
        .unwrap_or_default()
        .split_at(32.min(point.len().saturating_sub(1)));
    Ok(json!({
        "kty": "EC",
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
        "crv": "P-256",
        "x": b64(x),
        "y": b64(y),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Permissions;

    fn minter() -> BackendMinter {
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rsa-private.pem"
        ))
        .unwrap();
        BackendMinter::from_pem(&pem, "gw-1", "rabbitmq", "rabbitmq.").unwrap()
    }

    fn payload(token: &str) -> Value {
        use base64::Engine as _;
        let part = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_token_is_reused_only_for_the_same_user_scopes_exp_and_kind() {
        let m = minter();
        let scopes = vec!["read:%2F/*".to_owned()];
        let who = Subject {
            username: "alice",
            scopes: &scopes,
            exp: Some(2_000),
        };
        // A token signed anew has a `jti` of its own: a reused one is the same string.
        let first = m.mint(&who, None, 1_000).unwrap();
        let again = m.mint(&who, None, 1_100).unwrap();
        assert_eq!(first, again);
        assert_eq!(payload(&again)["scope"], "rabbitmq.read:%2F/*");
        // Anything the broker decides on differs: signed anew.
        let other_scopes = vec!["read:%2F/q".to_owned()];
        let differing = [
            Subject {
                username: "bob",
                scopes: &scopes,
                exp: Some(2_000),
            },
            Subject {
                username: "alice",
                scopes: &other_scopes,
                exp: Some(2_000),
            },
            Subject {
                username: "alice",
                scopes: &scopes,
                exp: Some(2_001),
            },
        ];
        for d in &differing {
            let t = m.mint(d, None, 1_100).unwrap();
            assert_ne!(t, first);
            let p = payload(&t);
            assert_eq!(p["sub"], d.username);
            assert_eq!(p["exp"], d.exp.unwrap());
        }
        // The minimal token is another kind, per vhost.
        let min = m.mint(&who, Some("/"), 1_100).unwrap();
        assert_ne!(min, first);
        assert_eq!(
            payload(&min)["scope"],
            "rabbitmq.read:%2F/amq.gateway.login-only"
        );
        assert_eq!(m.mint(&who, Some("/"), 1_100).unwrap(), min);
        assert_ne!(m.mint(&who, Some("v2"), 1_100).unwrap(), min);
        // Expired, or without exp (counted from now): never reused.
        assert_ne!(m.mint(&who, None, 2_000).unwrap(), first);
        let forever = Subject {
            username: "alice",
            scopes: &scopes,
            exp: None,
        };
        let earlier = m.mint(&forever, None, 1_000).unwrap();
        let t = m.mint(&forever, None, 1_500).unwrap();
        assert_ne!(t, earlier);
        assert_eq!(payload(&t)["exp"], 1_500 + DEFAULT_LIFETIME);
    }

    /// A token the minter signs verifies with the JWK of its key: RSA and P-256.
    #[test]
    fn the_public_jwk_verifies_what_the_minter_signs() {
        let rsa = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rsa-private.pem"
        ))
        .unwrap();
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        for (pem, alg) in [(rsa, Algorithm::RS256), (ec.into_bytes(), Algorithm::ES256)] {
            let m = BackendMinter::from_pem(&pem, "gw-1", "rabbitmq", "rabbitmq.").unwrap();
            let token = m.sign(&json!({"sub": "alice", "aud": "rabbitmq"})).unwrap();
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(public_jwk(&pem, "gw-1").unwrap()).unwrap();
            let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["rabbitmq"]);
            v.required_spec_claims.clear();
            jsonwebtoken::decode::<Value>(&token, &key, &v).unwrap();
        }
        assert!(public_jwk(b"not a key", "k").is_err());
    }

    #[test]
    fn claims_carry_the_final_scopes_prefixed_again() {
        let scopes: Vec<String> = ["read:*/*", "write:%2F/orders/eu.*", "tag:monitoring"]
            .map(String::from)
            .to_vec();
        let who = Subject {
            username: "alice",
            scopes: &scopes,
            exp: Some(2_000),
        };
        let c = minter().claims(&who, 1_000, "j-1");
        assert_eq!(
            c,
            json!({
                "sub": "alice", "aud": "rabbitmq", "iat": 1_000, "exp": 2_000, "jti": "j-1",
                "scope": "rabbitmq.read:*/* rabbitmq.write:%2F/orders/eu.* rabbitmq.tag:monitoring",
            })
        );
        let no_exp = Subject { exp: None, ..who };
        assert_eq!(
            minter().claims(&no_exp, 1_000, "j")["exp"],
            1_000 + DEFAULT_LIFETIME
        );
    }

    #[test]
    fn the_minimal_token_opens_only_its_vhost() {
        let who = Subject {
            username: "alice",
            scopes: &[],
            exp: Some(2_000),
        };
        let m = minter();
        for vhost in ["/", "team a/*", "100%"] {
            let c = m.minimal_claims(&who, vhost, 1_000, "j");
            let scopes: Vec<String> = c["scope"]
                .as_str()
                .unwrap()
                .split(' ')
                .map(|s| s.strip_prefix("rabbitmq.").unwrap().to_owned())
                .collect();
            assert_eq!(scopes.len(), 1, "{c}");
            let p = Permissions::from_scopes(&scopes);
            assert!(p.vhost_access(vhost), "{vhost}: {scopes:?}");
            assert!(!p.vhost_access(&format!("{vhost}x")), "{vhost}");
        }
    }

    #[test]
    fn the_public_key_pem_is_the_signing_keys() {
        let private = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rsa-private.pem"
        ))
        .unwrap();
        let public = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rsa-public.pem"
        ))
        .unwrap();
        let squash = |s: &str| s.split_whitespace().collect::<String>();
        assert_eq!(squash(&public_key_pem(&private).unwrap()), squash(&public));
    }

    #[test]
    fn a_minted_token_verifies_with_the_public_key() {
        let pem = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rsa-public.pem"
        ))
        .unwrap();
        let token = minter()
            .sign(&json!({"sub": "alice", "aud": "rabbitmq", "exp": 4_000_000_000i64}))
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::RS256, Some("gw-1"))
        );
        let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
        v.set_audience(&["rabbitmq"]);
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap();
        let data = jsonwebtoken::decode::<Value>(&token, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], "alice");
        assert!(BackendMinter::from_pem(b"not a key", "k", "a", "a.").is_err());
    }
}
