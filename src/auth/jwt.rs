//! JWT verification, pure: a token, a key and the rules in; claims or a reason out.
//!
//! Signature checking is jsonwebtoken's; what it leaves to callers is done here:
//! binding the key to the token's `alg` (no algorithm confusion, never `none`, never
//! HMAC), and the claim rules with RabbitMQ 4.2's semantics for `exp` and `aud`, plus the
//! gateway's deliberate additions (`iss` pinned, `nbf` / `iat` with a leeway).
//! Two header and JSON rules jsonwebtoken does not apply are applied here too: a `crit`
//! header is refused (RFC 7515 §4.1.11: the gateway understands no extension), and so is
//! a header or payload with a duplicate member name at any depth (RFC 7515 §5.2 allows
//! refusing; serde_json would silently keep the last value, and two parsers reading one
//! token differently is how claims get smuggled).
//!
//! **Invariant:** no IO and no clock: `now` is passed in.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Why a token was refused. Each variant has a stable `reason()` label for logs,
/// metrics and audit lines; the client only ever sees RabbitMQ's generic refusal.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("token is not a well-formed JWS compact serialisation: {0}")]
    Malformed(String),
    #[error("token header marks extensions {0:?} as critical; none is understood")]
    CriticalExtension(Vec<String>),
    #[error("token algorithm {0} is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("token has no kid and no default_key is configured")]
    NoKid,
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("key {kid:?} ({key}) cannot verify a {alg} token")]
    KeyMismatch {
        kid: String,
        key: String,
        alg: String,
    },
    #[error("signature verification failed")]
    BadSignature,
    #[error("token expired at {exp} (validated at {now})")]
    Expired { exp: i64, now: i64 },
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token has an invalid {0} claim: value is not a number")]
    InvalidNumericClaim(&'static str),
    #[error("token is not valid before {nbf} (now {now}, leeway {leeway}s)")]
    NotYetValid { nbf: i64, now: i64, leeway: i64 },
    #[error("token issued in the future at {iat} (now {now}, leeway {leeway}s)")]
    IssuedInFuture { iat: i64, now: i64, leeway: i64 },
    #[error("token has no aud claim")]
    MissingAudience,
    #[error("resource server id {expected:?} not found in aud")]
    WrongAudience { expected: String },
    #[error("token issuer {found:?} is not the configured issuer")]
    WrongIssuer { found: Option<String> },
    /// The `iss` of a token whose signature the configured issuer's key verified is not that
    /// issuer's (`WrongIssuer` is the answer before any signature check).
    #[error("token signed with the configured issuer's key names issuer {found:?}")]
    SignedWrongIssuer { found: Option<String> },
    #[error("token has more than {max} scopes")]
    TooManyScopes { max: usize },
    #[error("key set unavailable: {0}")]
    KeysUnavailable(String),
    #[error(
        "the same token failed verification from this address moments ago ({last}); refused without verifying it again"
    )]
    CachedFailure { last: &'static str },
    #[error("token refused by policy max_lifetime_seconds: {0}")]
    PolicyLifetime(String),
    #[error("token refused by policy required_claims: {0:?} is missing")]
    PolicyRequiredClaim(String),
    #[error("token refused by policy jti_deny: jti {0:?} is denied")]
    PolicyJti(String),
    #[error("token refused by policy rules[{rule}] ({description}): found {found:?}")]
    PolicyClaim {
        rule: usize,
        description: String,
        found: Option<String>,
    },
}

impl AuthError {
    /// The token's signature was verified with a configured issuer's key, and a claim rule
    /// or a token policy refused it: the token is that issuer's, not a password. Such a
    /// refusal ends the login chain (see `proxy::conn::login`): offered to the broker as an
    /// internal user's password, a broker running its own OAuth 2.0 plugin could accept the
    /// token by weaker rules (no `nbf`, no `iss`, no `jti_deny`, no token policies). Of the
    /// two issuer refusals only `SignedWrongIssuer` is among them: `WrongIssuer` is the
    /// answer for a token whose `iss` names no configured issuer, before any signature is
    /// checked.
    ///
    /// Every variant is named, with no catch-all: a new refusal must be placed on one side.
    pub fn of_a_verified_token(&self) -> bool {
        match self {
            AuthError::Expired { .. }
            | AuthError::MissingExp
            | AuthError::InvalidNumericClaim(_)
            | AuthError::NotYetValid { .. }
            | AuthError::IssuedInFuture { .. }
            | AuthError::MissingAudience
            | AuthError::WrongAudience { .. }
            | AuthError::SignedWrongIssuer { .. }
            | AuthError::TooManyScopes { .. }
            | AuthError::PolicyLifetime(_)
            | AuthError::PolicyRequiredClaim(_)
            | AuthError::PolicyJti(_)
            | AuthError::PolicyClaim { .. } => true,
            AuthError::Malformed(_)
            | AuthError::CriticalExtension(_)
            | AuthError::AlgorithmNotAllowed(_)
            | AuthError::NoKid
            | AuthError::UnknownKid(_)
            | AuthError::KeyMismatch { .. }
            | AuthError::BadSignature
            | AuthError::WrongIssuer { .. }
            | AuthError::KeysUnavailable(_)
            | AuthError::CachedFailure { .. } => false,
        }
    }

    /// A short label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "malformed",
            AuthError::CriticalExtension(_) => "crit",
            AuthError::AlgorithmNotAllowed(_) => "algorithm",
            AuthError::NoKid => "no_kid",
            AuthError::UnknownKid(_) => "unknown_kid",
            AuthError::KeyMismatch { .. } => "key_mismatch",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired { .. } => "expired",
            AuthError::MissingExp => "missing_exp",
            AuthError::InvalidNumericClaim(_) => "invalid_claim",
            AuthError::NotYetValid { .. } => "not_yet_valid",
            AuthError::IssuedInFuture { .. } => "issued_in_future",
            AuthError::MissingAudience | AuthError::WrongAudience { .. } => "audience",
            AuthError::WrongIssuer { .. } | AuthError::SignedWrongIssuer { .. } => "issuer",
            AuthError::TooManyScopes { .. } => "too_many_scopes",
            AuthError::KeysUnavailable(_) => "keys_unavailable",
            AuthError::CachedFailure { .. } => "cached_failure",
            AuthError::PolicyLifetime(_) => "policy_lifetime",
            AuthError::PolicyRequiredClaim(_) => "policy_required_claim",
            AuthError::PolicyJti(_) => "policy_jti",
            AuthError::PolicyClaim { .. } => "policy_claim",
        }
    }
}

/// The key family, with the curve for EC keys when it is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    /// An EC key; `None` when it came from a PEM file whose curve we do not inspect
    /// (the signature check then fails for the wrong curve anyway).
    Ec(Option<Curve>),
    Ed25519,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
}

/// A verification key with what it may be used for.
pub struct VerifyKey {
    pub kid: String,
    pub kind: KeyKind,
    /// The JWK's `alg`, when published: the key verifies only that algorithm.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// Whether this key may verify a token signed with `alg` (RFC 7517 §4.4 and RFC 8725
    /// §3.1: the key decides the algorithm, not the token).
    pub fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        use Algorithm::*;
        matches!(
            (self.kind, alg),
            (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::Ec(None), ES256 | ES384)
                | (KeyKind::Ec(Some(Curve::P256)), ES256)
                | (KeyKind::Ec(Some(Curve::P384)), ES384)
                | (KeyKind::Ed25519, EdDSA)
        )
    }
}

/// The token's header fields the gateway uses.
#[derive(Debug, Clone)]
pub struct TokenHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Reads the JOSE header without verifying anything, and refuses algorithms that are
/// not configured before any key is looked up.
pub fn read_header(token: &str, allowed: &[Algorithm]) -> Result<TokenHeader, AuthError> {
    if token.split('.').count() != 3 {
        return Err(AuthError::Malformed(
            "expected three dot-separated segments".into(),
        ));
    }
    // Segments are JSON with unique member names, checked before anything reads them.
    for (what, segment) in ["header", "payload"].into_iter().zip(token.split('.')) {
        unique_members(what, segment)?;
    }
    // `alg: none` and unknown algorithms fail to parse here: jsonwebtoken has no `none`.
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| AuthError::Malformed(format!("header: {e}")))?;
    if let Some(crit) = header.crit {
        // jsonwebtoken parses `crit` but does not act on it.
        return Err(AuthError::CriticalExtension(crit));
    }
    if !allowed.contains(&header.alg) {
        return Err(AuthError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
    }
    Ok(TokenHeader {
        alg: header.alg,
        kid: header.kid,
    })
}

/// Longest payload segment [`unverified_issuer`] decodes (base64url characters).
pub const MAX_UNVERIFIED_PAYLOAD: usize = 256 * 1024;

/// The `iss` claim of a token whose signature has not been checked, only to choose which
/// issuer verifies it: nothing else is read, and the value is trusted only once the chosen
/// issuer's key has verified the token (which pins `iss` again). Bounded: the payload
/// segment is at most [`MAX_UNVERIFIED_PAYLOAD`], and JSON nesting is bounded by
/// serde_json's recursion limit.
pub fn unverified_issuer(token: &str) -> Result<Option<String>, AuthError> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct Iss {
        #[serde(default)]
        iss: Option<String>,
    }
    let mut parts = token.splitn(3, '.');
    let (Some(_), Some(payload), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed(
            "expected three dot-separated segments".into(),
        ));
    };
    if payload.len() > MAX_UNVERIFIED_PAYLOAD {
        return Err(AuthError::Malformed("payload too large".into()));
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| AuthError::Malformed(format!("payload: {e}")))?;
    serde_json::from_slice::<Iss>(&json)
        .map(|p| p.iss)
        .map_err(|e| AuthError::Malformed(format!("payload: {e}")))
}

/// Refuses a base64url JSON segment that repeats a member name in any object. Nesting is
/// bounded by serde_json's recursion limit (128), so hostile depth is an error, not a
/// stack overflow.
fn unique_members(what: &str, segment: &str) -> Result<(), AuthError> {
    use base64::Engine;
    use serde::Deserialize;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| AuthError::Malformed(format!("{what}: {e}")))?;
    let mut de = serde_json::Deserializer::from_slice(&json);
    UniqueMembers::deserialize(&mut de)
        .and_then(|_| de.end())
        .map_err(|e| AuthError::Malformed(format!("{what}: {e}")))
}

/// A JSON value read only to check that no object repeats a member name.
struct UniqueMembers;

impl<'de> serde::Deserialize<'de> for UniqueMembers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueMembers)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueMembers {
    type Value = UniqueMembers;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueMembers>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate member name {key:?}"
                )));
            }
            map.next_value::<UniqueMembers>()?;
        }
        Ok(self)
    }
}

/// Checks the signature with `key` and returns the claims. Claim rules are applied
/// separately by [`check_claims`].
pub fn verify_signature(
    token: &str,
    header: &TokenHeader,
    key: &VerifyKey,
) -> Result<Value, AuthError> {
    if !key.fits(header.alg) {
        return Err(AuthError::KeyMismatch {
            kid: key.kid.clone(),
            key: format!("{:?}", key.kind),
            alg: format!("{:?}", header.alg),
        });
    }
    let mut v = Validation::new(header.alg);
    // Claims are checked by `check_claims` with RabbitMQ's rules, not jsonwebtoken's.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v.leeway = 0;
    match jsonwebtoken::decode::<Value>(token, &key.key, &v) {
        Ok(data) if data.claims.is_object() => Ok(data.claims),
        Ok(_) => Err(AuthError::Malformed("payload is not a JSON object".into())),
        Err(e) => Err(match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AuthError::KeyMismatch {
                kid: key.kid.clone(),
                key: format!("{:?}", key.kind),
                alg: format!("{:?}", header.alg),
            },
            _ => AuthError::Malformed(e.to_string()),
        }),
    }
}

/// The claim rules of one resource server.
#[derive(Clone, Debug)]
pub struct ClaimRules {
    pub resource_server_id: String,
    pub verify_aud: bool,
    pub require_exp: bool,
    pub issuer: Option<String>,
    pub check_nbf: bool,
    pub check_iat: bool,
    pub leeway_seconds: i64,
}

/// Applies the claim rules at time `now` (seconds since the epoch). Returns the token's
/// `exp`, truncated to whole seconds, when it has one.
pub fn check_claims(claims: &Value, r: &ClaimRules, now: i64) -> Result<Option<i64>, AuthError> {
    // exp: RabbitMQ 4.2.9 semantics: floats truncated, `exp == now` is already expired,
    // no leeway (RabbitMQ has none for exp).
    let exp = numeric(claims, "exp")?;
    match exp {
        Some(exp) if exp <= now => return Err(AuthError::Expired { exp, now }),
        None if r.require_exp => return Err(AuthError::MissingExp),
        _ => {}
    }
    if r.check_nbf
        && let Some(nbf) = numeric(claims, "nbf")?
        && nbf > now + r.leeway_seconds
    {
        return Err(AuthError::NotYetValid {
            nbf,
            now,
            leeway: r.leeway_seconds,
        });
    }
    if r.check_iat
        && let Some(iat) = numeric(claims, "iat")?
        && iat > now + r.leeway_seconds
    {
        return Err(AuthError::IssuedInFuture {
            iat,
            now,
            leeway: r.leeway_seconds,
        });
    }
    if let Some(issuer) = &r.issuer {
        let found = claims.get("iss").and_then(Value::as_str);
        if found != Some(issuer.as_str()) {
            return Err(AuthError::SignedWrongIssuer {
                found: found.map(str::to_owned),
            });
        }
    }
    if r.verify_aud {
        check_audience(claims, &r.resource_server_id)?;
    }
    Ok(exp)
}

fn numeric(claims: &Value, name: &'static str) -> Result<Option<i64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.is_finite() => Ok(Some(f.trunc() as i64)),
            _ => Err(AuthError::InvalidNumericClaim(name)),
        },
        Some(_) => Err(AuthError::InvalidNumericClaim(name)),
    }
}

/// `aud` as a space-separated string or a list of strings must contain the resource
/// server id (RabbitMQ splits a string `aud` on spaces).
fn check_audience(claims: &Value, rsid: &str) -> Result<(), AuthError> {
    let found = match claims.get("aud") {
        None => return Err(AuthError::MissingAudience),
        Some(Value::String(s)) => s.split(' ').any(|a| a == rsid),
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(rsid)),
        Some(_) => false,
    };
    if found {
        Ok(())
    } else {
        Err(AuthError::WrongAudience {
            expected: rsid.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Which refusals end the login chain: those of a token whose signature was verified
    /// (claims and policies), not those that say nothing about who signed it.
    #[test]
    fn only_refusals_of_a_verified_token_end_the_chain() {
        let ends = [
            AuthError::Expired { exp: 1, now: 2 },
            AuthError::MissingExp,
            AuthError::InvalidNumericClaim("nbf"),
            AuthError::NotYetValid {
                nbf: 9,
                now: 1,
                leeway: 0,
            },
            AuthError::IssuedInFuture {
                iat: 9,
                now: 1,
                leeway: 0,
            },
            AuthError::MissingAudience,
            AuthError::WrongAudience {
                expected: "rabbitmq".into(),
            },
            AuthError::SignedWrongIssuer {
                found: Some("https://elsewhere".into()),
            },
            AuthError::TooManyScopes { max: 1 },
            AuthError::PolicyLifetime("1 h".into()),
            AuthError::PolicyRequiredClaim("jti".into()),
            AuthError::PolicyJti("x".into()),
            AuthError::PolicyClaim {
                rule: 0,
                description: "d".into(),
                found: None,
            },
        ];
        let goes_on = [
            AuthError::Malformed("x".into()),
            AuthError::CriticalExtension(vec![]),
            AuthError::AlgorithmNotAllowed("HS256".into()),
            AuthError::NoKid,
            AuthError::UnknownKid("k".into()),
            AuthError::KeyMismatch {
                kid: "k".into(),
                key: "RSA".into(),
                alg: "ES256".into(),
            },
            AuthError::BadSignature,
            // Also the answer before any signature check, for an `iss` no issuer has.
            AuthError::WrongIssuer { found: None },
            AuthError::KeysUnavailable("down".into()),
            AuthError::CachedFailure {
                last: "bad_signature",
            },
        ];
        for e in &ends {
            assert!(e.of_a_verified_token(), "{e:?} must end the chain");
        }
        for e in &goes_on {
            assert!(
                !e.of_a_verified_token(),
                "{e:?} must go on to the next backend"
            );
        }
    }

    fn rules() -> ClaimRules {
        ClaimRules {
            resource_server_id: "rabbitmq".into(),
            verify_aud: true,
            require_exp: true,
            issuer: Some("https://issuer.example".into()),
            check_nbf: true,
            check_iat: true,
            leeway_seconds: 60,
        }
    }

    #[test]
    fn claim_rules_table() {
        let now = 1_000_000;
        let base = || json!({"iss": "https://issuer.example", "aud": "rabbitmq", "exp": now + 300, "iat": now});
        let cases: Vec<(Value, Result<(), &str>)> = vec![
            (base(), Ok(())),
            (
                json!({"iss": "https://issuer.example", "aud": ["x", "rabbitmq"], "exp": now + 1}),
                Ok(()),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "foo rabbitmq", "exp": (now as f64) + 0.5}),
                Err("expired"),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "rabbitmq", "exp": now}),
                Err("expired"),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "rabbitmq", "exp": "soon"}),
                Err("invalid_claim"),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "rabbitmq"}),
                Err("missing_exp"),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "other", "exp": now + 5}),
                Err("audience"),
            ),
            (
                json!({"iss": "https://issuer.example", "exp": now + 5}),
                Err("audience"),
            ),
            (
                json!({"iss": "https://evil.example", "aud": "rabbitmq", "exp": now + 5}),
                Err("issuer"),
            ),
            (json!({"aud": "rabbitmq", "exp": now + 5}), Err("issuer")),
            (
                json!({"iss": "https://issuer.example", "aud": "rabbitmq", "exp": now + 500, "nbf": now + 61}),
                Err("not_yet_valid"),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "rabbitmq", "exp": now + 500, "nbf": now + 60}),
                Ok(()),
            ),
            (
                json!({"iss": "https://issuer.example", "aud": "rabbitmq", "exp": now + 500, "iat": now + 120}),
                Err("issued_in_future"),
            ),
        ];
        for (claims, expected) in cases {
            let got = check_claims(&claims, &rules(), now)
                .map(|_| ())
                .map_err(|e| e.reason());
            assert_eq!(got, expected, "{claims}");
        }
    }

    #[test]
    fn switches_relax_rules() {
        let r = ClaimRules {
            verify_aud: false,
            require_exp: false,
            issuer: None,
            ..rules()
        };
        assert_eq!(check_claims(&json!({}), &r, 10), Ok(None));
    }

    #[test]
    fn key_binding() {
        let key = |kind, alg| VerifyKey {
            kid: "k".into(),
            kind,
            alg,
            key: DecodingKey::from_secret(b"unused"),
        };
        assert!(key(KeyKind::Rsa, None).fits(Algorithm::RS256));
        assert!(key(KeyKind::Rsa, None).fits(Algorithm::PS512));
        assert!(!key(KeyKind::Rsa, None).fits(Algorithm::HS256));
        assert!(!key(KeyKind::Rsa, None).fits(Algorithm::ES384));
        assert!(!key(KeyKind::Rsa, Some(Algorithm::RS256)).fits(Algorithm::RS512));
        assert!(key(KeyKind::Ec(Some(Curve::P384)), Some(Algorithm::ES384)).fits(Algorithm::ES384));
        assert!(!key(KeyKind::Ec(Some(Curve::P384)), None).fits(Algorithm::ES256));
        assert!(key(KeyKind::Ed25519, None).fits(Algorithm::EdDSA));
    }

    #[test]
    fn header_refuses_none_and_unlisted() {
        use base64::Engine;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"x"}"#));
        assert_eq!(
            read_header(&none, &[Algorithm::RS256])
                .unwrap_err()
                .reason(),
            "malformed"
        );
        let hs = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"HS256"}"#),
            b64(r#"{"sub":"x"}"#)
        );
        assert_eq!(
            read_header(&hs, &[Algorithm::RS256]).unwrap_err().reason(),
            "algorithm"
        );
        assert_eq!(
            read_header("a.b", &[Algorithm::RS256])
                .unwrap_err()
                .reason(),
            "malformed"
        );
        assert_eq!(
            read_header("a.b.c.d", &[Algorithm::RS256])
                .unwrap_err()
                .reason(),
            "malformed"
        );
    }

    fn b64(v: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn header_reason(header: &str, payload: &str) -> Result<(), &'static str> {
        let token = format!("{}.{}.c2ln", b64(header), b64(payload));
        read_header(&token, &[Algorithm::RS256])
            .map(|_| ())
            .map_err(|e| e.reason())
    }

    #[test]
    fn crit_is_refused() {
        // Regression: jsonwebtoken parses `crit` and ignores it (RFC 7515 §4.1.11).
        assert_eq!(
            header_reason(r#"{"alg":"RS256","crit":["exp"],"exp":1}"#, "{}"),
            Err("crit")
        );
        assert_eq!(
            header_reason(r#"{"alg":"RS256","crit":[]}"#, "{}"),
            Err("crit")
        );
        assert_eq!(
            header_reason(r#"{"alg":"RS256","crit":"b64"}"#, "{}"),
            Err("malformed")
        );
        assert_eq!(
            header_reason(r#"{"alg":"RS256","kid":"k"}"#, r#"{"a":[1,{"b":2}]}"#),
            Ok(())
        );
    }

    #[test]
    fn duplicate_member_names_are_refused() {
        // Regression: serde_json keeps the last of two equal keys without a word.
        let cases = [
            (r#"{"alg":"RS256","kid":"a","kid":"b"}"#, "{}"),
            (r#"{"alg":"RS256","alg":"RS256"}"#, "{}"),
            (r#"{"alg":"RS256"}"#, r#"{"sub":"a","sub":"b"}"#),
            (r#"{"alg":"RS256"}"#, r#"{"sub":"a","s\u0075b":"b"}"#),
            (r#"{"alg":"RS256"}"#, r#"{"x":{"scope":"a","scope":"b"}}"#),
            (r#"{"alg":"RS256"}"#, r#"{"x":[{"k":1,"k":2}]}"#),
        ];
        for (h, p) in cases {
            assert_eq!(header_reason(h, p), Err("malformed"), "{h} {p}");
        }
        // Equal names in different objects are fine.
        assert_eq!(
            header_reason(r#"{"alg":"RS256"}"#, r#"{"k":{"k":{"k":1}}}"#),
            Ok(())
        );
    }

    #[test]
    fn hostile_json_is_malformed_not_a_crash() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        for p in [
            deep.as_str(),
            deep_obj.as_str(),
            "not json",
            "{} {}",
            "{\"a\":1",
        ] {
            assert_eq!(header_reason(r#"{"alg":"RS256"}"#, p), Err("malformed"));
        }
        let token = format!("{}.{}=.c2ln", b64(r#"{"alg":"RS256"}"#), b64("{}"));
        assert_eq!(
            read_header(&token, &[Algorithm::RS256])
                .unwrap_err()
                .reason(),
            "malformed",
            "padding is not base64url"
        );
    }
}
