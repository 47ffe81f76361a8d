//! Authentication: from a token to an identity with RabbitMQ permissions.
//!
//! - [`jwt`]: pure verification (header, key binding, signature, claim rules).
//! - [`keys`]: static keys and the issuer's JWKS (the only module that does IdP IO).
//! - [`scopes`]: RabbitMQ 4.2 scope normalisation, pure.
//! - [`policy`]: the edge token policy, pure.
//! - [`exchange`]: backend tokens minted for verified clients.
//! - [`chain`]: internal users beside tokens (source rules, failed-password back-off).
//!
//! [`Authenticator`] ties them together. It never logs or stores a raw token: tokens are
//! identified by a short SHA-256 prefix ([`token_id`]), and its caches are keyed by the
//! full SHA-256.
//!
//! Two caches spare the signature check:
//! - **verified tokens**: token hash → the verified claims, the kid and the key set
//!   generation, bounded, each entry expiring at the token's `exp` (at most an hour). On
//!   every hit the claim rules (`exp`, `nbf`, ...) are applied again with the current time,
//!   the key must still be usable (not rotated out, not stale) and the [`Identity`] is
//!   built afresh; concurrent misses for one token verify once.
//! - **failed tokens**: (token hash, source address) → a back-off (1 s doubling to 60 s)
//!   after a failure that cost a signature check (a bad signature, or claims refused right
//!   after verifying, e.g. an expired token), during which the same token from the same
//!   address is refused as `cached_failure` without verifying again, so garbage tokens
//!   cannot make the gateway spend RSA at line rate.

pub mod chain;
pub mod exchange;
pub mod jwt;
pub mod keys;
pub mod policy;
pub mod scopes;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use moka::future::Cache;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::authz::Permissions;
use crate::authz::iam::Facts;
use jwt::{AuthError, ClaimRules};
use keys::KeyStore;
use policy::Policy;
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
    /// The name of the configured issuer entry that verified the token (`default` for the
    /// root `[oauth2]` keys).
    pub issuer_name: String,
    /// What broker policies can ask about the principal, from the claims
    /// ([`principal_facts`]); the connection's part is added when it is bound.
    pub facts: Arc<Facts>,
}

/// The STS claim object that holds the AWS identity and session context.
pub const STS_CLAIM: &str = "https://sts.amazonaws.com/";

/// The policy condition keys a verified token answers: `aws:PrincipalArn` (the nested
/// `principal_id`, else an ARN `sub`), `aws:PrincipalAccount` (`aws_account`, else the
/// ARN's account), `aws:PrincipalOrgID` (`org_id`), `aws:PrincipalOrgPaths` (`ou_path`,
/// a string or a list), `aws:PrincipalTag/*` (`principal_tags`), `aws:RequestTag/*` and
/// `aws:TagKeys` (`request_tags`), `aws:RequestedRegion` (`source_region`) and
/// `aws:TokenIssueTime` (`iat`). Values that are not strings are ignored.
pub fn principal_facts(claims: &Value) -> Facts {
    let sts = claims.get(STS_CLAIM);
    let text = |v: Option<&Value>, k: &str| {
        v.and_then(|o| o.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut f = Facts {
        principal_arn: text(sts, "principal_id")
            .or_else(|| text(Some(claims), "sub").filter(|s| s.starts_with("arn:"))),
        org_id: text(sts, "org_id"),
        region: text(sts, "source_region"),
        issued_at: claims
            .get("iat")
            .and_then(Value::as_f64)
            .map(|t| t.floor() as i64),
        ..Facts::default()
    };
    f.account = text(sts, "aws_account").or_else(|| {
        f.principal_arn
            .as_deref()
            .and_then(|a| a.split(':').nth(4))
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
    });
    match sts.and_then(|o| o.get("ou_path")) {
        Some(Value::String(p)) => f.org_paths.push(p.clone()),
        Some(Value::Array(ps)) => f
            .org_paths
            .extend(ps.iter().filter_map(Value::as_str).map(str::to_owned)),
        _ => {}
    }
    let tags = |k: &str| {
        sts.and_then(|o| o.get(k))
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
    };
    for (k, v) in tags("principal_tags") {
        f.principal_tag(&k, &v);
    }
    for (k, v) in tags("request_tags") {
        f.request_tag(&k, &v);
    }
    f
}

/// Default `oauth2.token_cache_size`.
pub const DEFAULT_TOKEN_CACHE_SIZE: u64 = 10_000;
/// Longest a verified token stays cached (tokens without `exp`, or very long-lived ones).
pub const MAX_VERIFIED_TTL: Duration = Duration::from_secs(3_600);
/// Entries of the failed-token cache (token hash × source address).
pub const FAILED_TOKEN_CACHE_SIZE: u64 = 100_000;
/// First back-off after a failure; it doubles with each new failure, up to the maximum.
pub const FAILURE_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The back-off after the `failures`-th failure in a row (from 1): 1 s doubling to 60 s.
/// Failed tokens and failed internal passwords (`chain::PasswordBackoff`) share it.
pub(crate) fn backoff_after(failures: u32) -> Duration {
    FAILURE_BACKOFF_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(FAILURE_BACKOFF_MAX)
}

/// Counters of the authenticator, shared across reloads; the metrics scrape copies them.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Signature checks actually performed (RSA / EC / Ed25519 verifications).
    pub signature_verifications: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Tokens refused from the failed-token cache without verification.
    pub cached_failures: AtomicU64,
}

/// A token whose signature was verified.
struct Verified {
    claims: Value,
    /// The kid of the key that verified it.
    kid: String,
    /// [`KeyStore::generation`] when it was verified.
    generation: u64,
    ttl: Duration,
}

/// A token that failed verification from one address.
#[derive(Clone, Copy)]
struct Failure {
    failures: u32,
    until: Instant,
    reason: &'static str,
}

/// Expires verified tokens at their `exp`.
struct AtExp;

impl moka::Expiry<[u8; 32], Arc<Verified>> for AtExp {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        v: &Arc<Verified>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

type TokenHash = [u8; 32];

/// Verifies tokens for one issuer / resource server.
pub struct Authenticator {
    /// The issuer entry's name (`default` for the root `[oauth2]` keys).
    pub name: String,
    pub algorithms: Vec<Algorithm>,
    pub keys: Arc<KeyStore>,
    pub claims: ClaimRules,
    pub scopes: ScopeRules,
    /// The edge token policy, applied after the claim rules.
    pub policy: Policy,
    pub stats: Arc<AuthStats>,
    verified: Option<Cache<TokenHash, Arc<Verified>>>,
    failed: Cache<(TokenHash, IpAddr), Failure>,
}

impl Authenticator {
    /// An authenticator with a verified-token cache of [`DEFAULT_TOKEN_CACHE_SIZE`].
    pub fn new(
        algorithms: Vec<Algorithm>,
        keys: Arc<KeyStore>,
        claims: ClaimRules,
        scopes: ScopeRules,
    ) -> Authenticator {
        Authenticator {
            name: "default".into(),
            algorithms,
            keys,
            claims,
            scopes,
            policy: Policy::default(),
            stats: Arc::default(),
            verified: None,
            failed: Cache::builder()
                .max_capacity(FAILED_TOKEN_CACHE_SIZE)
                .time_to_live(FAILURE_BACKOFF_MAX * 2)
                .build(),
        }
        .with_token_cache(DEFAULT_TOKEN_CACHE_SIZE)
    }

    /// Sets the verified-token cache size (0 disables it).
    pub fn with_token_cache(mut self, size: u64) -> Authenticator {
        self.verified = (size > 0).then(|| {
            Cache::builder()
                .max_capacity(size)
                .expire_after(AtExp)
                .build()
        });
        self
    }

    /// Verifies `token` at time `now` (seconds since the epoch), presented from `source`
    /// (`None`: no failed-token back-off, e.g. `explain`).
    pub async fn authenticate(
        &self,
        token: &str,
        now: i64,
        source: Option<IpAddr>,
    ) -> Result<Identity, AuthError> {
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        if let Some(ip) = source
            && let Some(f) = self.failed.get(&(hash, ip)).await
            && Instant::now() < f.until
        {
            self.stats.cached_failures.fetch_add(1, Ordering::Relaxed);
            return Err(AuthError::CachedFailure { last: f.reason });
        }
        // Only failures that cost a signature check are remembered: the cheap ones
        // (malformed, unknown kid, ...) cost nothing to repeat, and an unknown kid may be a
        // key about to be published.
        let (result, spent) = match self.verified_claims(token, hash, now).await {
            Ok((v, fresh)) => (self.identity_for(&hash, &v.claims, now), fresh),
            Err(e) => {
                let spent = e == AuthError::BadSignature;
                (Err(e), spent)
            }
        };
        if let (Err(e), Some(ip), true) = (&result, source, spent) {
            let key = (hash, ip);
            let failures = self
                .failed
                .get(&key)
                .await
                .map_or(1, |f| f.failures.saturating_add(1));
            let failure = Failure {
                failures,
                until: Instant::now() + backoff_after(failures),
                reason: e.reason(),
            };
            self.failed.insert(key, failure).await;
        }
        result
    }

    /// The verified claims of `token`, from the cache when it holds them and the key that
    /// verified them is still usable; `true` when this call checked the signature.
    async fn verified_claims(
        &self,
        token: &str,
        hash: TokenHash,
        now: i64,
    ) -> Result<(Arc<Verified>, bool), AuthError> {
        let Some(cache) = &self.verified else {
            return self.verify(token, now).await.map(|v| (Arc::new(v), true));
        };
        for _ in 0..2 {
            let loaded = AtomicBool::new(false);
            let entry = cache
                .try_get_with(hash, async {
                    loaded.store(true, Ordering::Relaxed);
                    self.verify(token, now).await.map(Arc::new)
                })
                .await
                .map_err(|e| (*e).clone())?;
            if loaded.load(Ordering::Relaxed) {
                self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                return Ok((entry, true));
            }
            // A hit: the key must still be the one that verified it, and usable.
            match self.keys.current(&entry.kid) {
                Err(e @ AuthError::KeysUnavailable(_)) => return Err(e),
                Ok(_) if entry.generation == self.keys.generation() => {
                    self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok((entry, false));
                }
                // Rotated keys: verify again.
                _ => cache.invalidate(&hash).await,
            }
        }
        self.verify(token, now).await.map(|v| (Arc::new(v), true))
    }

    /// Header, key and signature, without the cache.
    async fn verify(&self, token: &str, now: i64) -> Result<Verified, AuthError> {
        let generation = self.keys.generation();
        let (claims, kid) = self.check_signature(token).await?;
        let ttl = match claims.get("exp").and_then(Value::as_f64) {
            Some(exp) if exp.is_finite() => {
                Duration::from_secs((exp.trunc() as i64).saturating_sub(now).max(0) as u64)
            }
            Some(_) => Duration::ZERO,
            None => MAX_VERIFIED_TTL,
        };
        Ok(Verified {
            claims,
            kid,
            generation,
            ttl: ttl.min(MAX_VERIFIED_TTL),
        })
    }

    async fn check_signature(&self, token: &str) -> Result<(Value, String), AuthError> {
        let header = jwt::read_header(token, &self.algorithms)?;
        let key = self.keys.find(header.kid.as_deref()).await?;
        self.stats
            .signature_verifications
            .fetch_add(1, Ordering::Relaxed);
        let kid = key.kid.clone();
        let claims = off_the_relay(token, header, key).await?;
        Ok((claims, kid))
    }

    /// Checks the header and signature only, returning the claims (no cache).
    pub async fn verify_signature(&self, token: &str) -> Result<Value, AuthError> {
        self.check_signature(token).await.map(|(claims, _)| claims)
    }

    /// The claim checks and scope mapping for already verified claims.
    pub fn identity(&self, token: &str, claims: &Value, now: i64) -> Result<Identity, AuthError> {
        self.identity_for(&Sha256::digest(token.as_bytes()).into(), claims, now)
    }

    fn identity_for(
        &self,
        hash: &TokenHash,
        claims: &Value,
        now: i64,
    ) -> Result<Identity, AuthError> {
        let exp = jwt::check_claims(claims, &self.claims, now)?;
        self.policy.check(claims)?;
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
            token_id: hex_prefix(hash),
            issuer_name: self.name.clone(),
            facts: Arc::new(principal_facts(claims)),
        })
    }
}

/// Signature checks running at once, at most: one per CPU. More would only queue in the
/// kernel's scheduler, and each holds a thread of tokio's blocking pool.
static SIGNATURE_SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    });

/// Checks a signature on tokio's blocking pool, not on the worker thread that relays
/// connections: a check is 25 µs (RS256) to 150 µs (ES384) of CPU, during which every
/// connection on that worker would otherwise wait (the default is one worker on
/// 2 CPUs: `runtime.worker_threads`). At most [`SIGNATURE_SLOTS`] run at once; the rest
/// wait here, in the order they came. A check keeps its slot until it ends, even when the
/// connection that asked for it is gone: a blocking task cannot be cancelled.
async fn off_the_relay(
    token: &str,
    header: jwt::TokenHeader,
    key: Arc<jwt::VerifyKey>,
) -> Result<Value, AuthError> {
    let slot = SIGNATURE_SLOTS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let token = token.to_owned();
    let check = move || {
        let _slot = slot;
        jwt::verify_signature(&token, &header, &key)
    };
    match tokio::task::spawn_blocking(check).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(AuthError::KeysUnavailable(
            "the gateway is shutting down".into(),
        )),
    }
}

/// One [`Authenticator`] per issuer, and the dispatch between them: with
/// `[[oauth2.issuers]]`, the token's `iss` (read from the unverified payload, and nothing
/// else from it) chooses the issuer before any key is tried; a token whose `iss` names no
/// configured issuer is refused as `issuer`. Without issuers, the one authenticator takes
/// every token, as before. The chosen authenticator pins `iss` again after verification.
pub struct Authenticators {
    list: Vec<Authenticator>,
    dispatch: bool,
    pub stats: Arc<AuthStats>,
}

impl Authenticators {
    /// The authenticators of the issuers in order, sharing one set of counters; with
    /// `dispatch`, the token's `iss` chooses among them (`[[oauth2.issuers]]`), otherwise
    /// the first takes every token.
    pub fn new(mut list: Vec<Authenticator>, dispatch: bool) -> Authenticators {
        let stats = Arc::new(AuthStats::default());
        for a in &mut list {
            a.stats = stats.clone();
        }
        Authenticators {
            list,
            dispatch,
            stats,
        }
    }

    /// Shares `stats` (counters that survive a reload) with every authenticator.
    pub fn set_stats(&mut self, stats: Arc<AuthStats>) {
        for a in &mut self.list {
            a.stats = stats.clone();
        }
        self.stats = stats;
    }

    /// Every issuer's authenticator, in the configured order.
    pub fn all(&self) -> &[Authenticator] {
        &self.list
    }

    /// The authenticator of the token's issuer.
    pub fn select(&self, token: &str) -> Result<&Authenticator, AuthError> {
        if !self.dispatch {
            return Ok(&self.list[0]);
        }
        let iss = jwt::unverified_issuer(token)?;
        self.list
            .iter()
            .find(|a| a.claims.issuer.is_some() && a.claims.issuer == iss)
            .ok_or(AuthError::WrongIssuer { found: iss })
    }

    /// [`Authenticator::authenticate`] by the token's issuer, with the name of the issuer
    /// entry the token went to (for metrics about a refusal): `none` when its `iss` names
    /// no configured issuer or cannot be read.
    pub async fn authenticate_named(
        &self,
        token: &str,
        now: i64,
        source: Option<IpAddr>,
    ) -> (&str, Result<Identity, AuthError>) {
        match self.select(token) {
            Ok(a) => (&a.name, a.authenticate(token, now, source).await),
            Err(e) => ("none", Err(e)),
        }
    }

    /// [`Authenticator::authenticate`] by the token's issuer.
    pub async fn authenticate(
        &self,
        token: &str,
        now: i64,
        source: Option<IpAddr>,
    ) -> Result<Identity, AuthError> {
        self.authenticate_named(token, now, source).await.1
    }
}

/// A short, non-reversible identifier of a token for logs: the first 12 hex digits of
/// its SHA-256.
/// Whether `password` has a JWT's shape: three dot-separated segments, the first of which
/// is base64url for a JSON object. Only such passwords are named by [`token_id`] in logs:
/// a hash prefix of an internal user's password could be searched offline.
pub fn jwt_shaped(password: &str) -> bool {
    use base64::Engine;
    let mut parts = password.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    // The first bytes are enough to see `{`; a header of a few KiB would be odd anyway.
    let head = &header.as_bytes()[..header.len().min(8) / 4 * 4];
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .is_ok_and(|h| h.first() == Some(&b'{'))
}

pub fn token_id(token: &str) -> String {
    hex_prefix(&Sha256::digest(token.as_bytes()).into())
}

fn hex_prefix(hash: &TokenHash) -> String {
    hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
}
