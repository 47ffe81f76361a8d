//! Verification keys: static PEM files and the issuer's JWKS.
//!
//! This is the only module that talks to an identity provider. The JWKS is fetched at
//! start, refreshed in the background, and refetched when a token names an unknown `kid`
//! (one fetch at a time, at most one per `min_refetch_interval`). A failed fetch keeps
//! the last good key set: known keys keep working while the issuer is down, unknown
//! kids fail closed. After `stale_grace` of failures since the last good fetch, the
//! fetched keys stop verifying too (fail closed); static keys are never stale.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;

use super::jwt::{AuthError, Curve, KeyKind, VerifyKey};

/// Largest JWKS or discovery document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// How soon a failed background refresh is retried.
pub const DEFAULT_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Where keys come from, already validated by the config.
#[derive(Clone, Debug, Default)]
pub struct KeySettings {
    /// `kid` → PEM file (`auth_oauth2.signing_keys`).
    pub signing_keys: Vec<(String, PathBuf)>,
    /// Key used for tokens without a `kid` (`auth_oauth2.default_key`).
    pub default_key: Option<String>,
    pub jwks_uri: Option<String>,
    /// Used for OIDC discovery when `jwks_uri` is not set.
    pub issuer: Option<String>,
    pub refresh_interval: Duration,
    pub min_refetch_interval: Duration,
    pub http_timeout: Duration,
    /// How long fetched keys keep verifying while the issuer fails (`None`: forever).
    pub stale_grace: Option<Duration>,
}

/// Outcome of the latest JWKS fetch, for logs and readiness.
#[derive(Clone, Debug, Default)]
pub struct FetchStatus {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    pub fetches: u64,
    pub failures: u64,
    pub keys: usize,
}

type KeyMap = HashMap<String, Arc<VerifyKey>>;

struct Remote {
    settings: KeySettings,
    http: reqwest::Client,
    keys: RwLock<Arc<KeyMap>>,
    /// Held while fetching: concurrent misses wait for one fetch instead of each fetching.
    fetch: Mutex<Option<Instant>>,
    status: RwLock<FetchStatus>,
    /// When the last good key set was stored (monotonic clock, for the stale grace).
    last_success_at: RwLock<Option<Instant>>,
    /// Hash of the last good JWKS body; a different body bumps `generation`.
    body_hash: RwLock<Option<[u8; 32]>>,
}

/// What a `kid` lookup found.
enum Found {
    Key(Arc<VerifyKey>),
    /// The kid is known, but the issuer has been failing for longer than the grace.
    Stale(String),
    Missing,
}

/// All keys of one issuer.
pub struct KeyStore {
    static_keys: KeyMap,
    default_key: Option<String>,
    remote: Option<Remote>,
    /// Bumped whenever the fetched key set changes, so caches of verified tokens know
    /// that the key that verified a token may be gone.
    generation: AtomicU64,
}

/// Why keys could not be loaded or fetched. The messages name the file or URL; `reason()`
/// is a stable label.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {why}")]
    ReadFile { path: String, why: String },
    #[error("{path}: not an RSA, EC or Ed25519 public key (PEM)")]
    NotAPublicKey { path: String },
    #[error("HTTP client: {0}")]
    HttpClient(String),
    #[error("no jwks_uri or issuer")]
    NoSource,
    #[error("{url}: {why}")]
    Transport { url: String, why: String },
    #[error("{url}: HTTP {status}")]
    HttpStatus { url: String, status: String },
    #[error("{url}: document larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: invalid JWKS: {why}")]
    InvalidJwks { url: String, why: String },
    #[error("{url}: JWKS has no usable signing keys")]
    NoUsableKeys { url: String },
    #[error("{url}: invalid discovery document: {why}")]
    InvalidDiscovery { url: String, why: String },
    #[error("{url}: discovery document names issuer {named:?}, expected {expected:?}")]
    WrongIssuer {
        url: String,
        named: Option<String>,
        expected: String,
    },
    #[error("{url}: discovery document has no jwks_uri")]
    NoJwksUri { url: String },
    #[error("{url}: jwks_uri {jwks_uri:?} must use https (http only on loopback)")]
    InsecureJwksUri { url: String, jwks_uri: String },
}

impl KeyError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::ReadFile { .. } => "read_file",
            KeyError::NotAPublicKey { .. } => "not_a_public_key",
            KeyError::HttpClient(_) => "http_client",
            KeyError::NoSource => "no_source",
            KeyError::Transport { .. } => "transport",
            KeyError::HttpStatus { .. } => "http_status",
            KeyError::TooLarge { .. } => "too_large",
            KeyError::InvalidJwks { .. } => "invalid_jwks",
            KeyError::NoUsableKeys { .. } => "no_usable_keys",
            KeyError::InvalidDiscovery { .. } => "invalid_discovery",
            KeyError::WrongIssuer { .. } => "wrong_issuer",
            KeyError::NoJwksUri { .. } => "no_jwks_uri",
            KeyError::InsecureJwksUri { .. } => "insecure_jwks_uri",
        }
    }
}

impl KeyStore {
    /// Loads the static keys. Remote keys are fetched by [`KeyStore::refresh`].
    pub fn new(settings: KeySettings) -> Result<Self, KeyError> {
        let mut static_keys = KeyMap::new();
        for (kid, path) in &settings.signing_keys {
            let pem = std::fs::read(path).map_err(|e| KeyError::ReadFile {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
            let key = key_from_pem(kid, &pem).ok_or_else(|| KeyError::NotAPublicKey {
                path: path.display().to_string(),
            })?;
            static_keys.insert(kid.clone(), Arc::new(key));
        }
        let remote = if settings.jwks_uri.is_some() || settings.issuer.is_some() {
            let http = reqwest::Client::builder()
                // A key source that redirects elsewhere is a misconfiguration or an attack.
                .redirect(reqwest::redirect::Policy::none())
                .timeout(settings.http_timeout)
                .connect_timeout(settings.http_timeout)
                .build()
                .map_err(|e| KeyError::HttpClient(e.to_string()))?;
            Some(Remote {
                settings: settings.clone(),
                http,
                keys: RwLock::new(Arc::new(KeyMap::new())),
                fetch: Mutex::new(None),
                status: RwLock::new(FetchStatus::default()),
                last_success_at: RwLock::new(None),
                body_hash: RwLock::new(None),
            })
        } else {
            None
        };
        Ok(KeyStore {
            static_keys,
            default_key: settings.default_key,
            remote,
            generation: AtomicU64::new(0),
        })
    }

    /// Whether keys come from the network (then `refresh` and the background task apply).
    pub fn has_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The latest fetch outcome, if keys come from the network.
    pub fn status(&self) -> Option<FetchStatus> {
        self.remote.as_ref().map(|r| read(&r.status).clone())
    }

    /// Number of keys currently usable (fetched keys past the stale grace are not).
    pub fn key_count(&self) -> usize {
        let remote = match &self.remote {
            Some(r) if r.stale().is_none() => read(&r.keys).len(),
            _ => 0,
        };
        self.static_keys.len() + remote
    }

    /// Why the fetched keys no longer verify, when the issuer has been failing for longer
    /// than the stale grace since the last good fetch.
    pub fn stale(&self) -> Option<String> {
        self.remote.as_ref().and_then(Remote::stale)
    }

    /// Changes whenever the fetched key set changes (a cache of verified tokens compares it).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The key for `kid` as it is now, without fetching: what a cache of verified tokens
    /// re-checks on every hit (a key gone or stale must stop a cached token too).
    pub fn current(&self, kid: &str) -> Result<Arc<VerifyKey>, AuthError> {
        match self.lookup(kid) {
            Found::Key(k) => Ok(k),
            Found::Stale(why) => Err(AuthError::KeysUnavailable(why)),
            Found::Missing => Err(AuthError::UnknownKid(kid.to_owned())),
        }
    }

    /// The kid a token with header `kid` is verified with (the default key when it has none).
    pub fn resolve_kid<'a>(&'a self, kid: Option<&'a str>) -> Result<&'a str, AuthError> {
        kid.or(self.default_key.as_deref()).ok_or(AuthError::NoKid)
    }

    /// Finds the key for a token's `kid` (or the default key when it has none),
    /// refetching the JWKS once when the kid is unknown.
    pub async fn find(&self, kid: Option<&str>) -> Result<Arc<VerifyKey>, AuthError> {
        let kid = self.resolve_kid(kid)?;
        match self.lookup(kid) {
            Found::Key(k) => return Ok(k),
            Found::Stale(why) => return Err(AuthError::KeysUnavailable(why)),
            Found::Missing => {}
        }
        let Some(remote) = &self.remote else {
            return Err(AuthError::UnknownKid(kid.to_owned()));
        };
        let mut last = remote.fetch.lock().await;
        // Someone else's fetch may have brought the key while we waited.
        if let Found::Key(k) = self.lookup(kid) {
            return Ok(k);
        }
        if last.is_some_and(|t| t.elapsed() < remote.settings.min_refetch_interval) {
            return Err(AuthError::UnknownKid(kid.to_owned()));
        }
        // Set before too: a fetch cancelled with its caller (handshake timeout) still counts.
        *last = Some(Instant::now());
        // A failed refetch keeps the old set; the kid is then still unknown.
        let _ = self.fetch_and_store(remote).await;
        // The interval counts from the end of the fetch: when the issuer hangs, the clients
        // queued behind this fetch must not each start another one.
        *last = Some(Instant::now());
        drop(last);
        self.current(kid)
    }

    fn lookup(&self, kid: &str) -> Found {
        if let Some(k) = self.static_keys.get(kid) {
            return Found::Key(k.clone());
        }
        let Some(r) = &self.remote else {
            return Found::Missing;
        };
        let Some(k) = read(&r.keys).get(kid).cloned() else {
            return Found::Missing;
        };
        match r.stale() {
            Some(why) => Found::Stale(why),
            None => Found::Key(k),
        }
    }

    async fn fetch_and_store(&self, remote: &Remote) -> Result<usize, KeyError> {
        let result = remote.fetch_and_store().await;
        if matches!(result, Ok((_, true))) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        result.map(|(n, _)| n)
    }

    /// Fetches the JWKS now (serialised with kid-miss refetches). Errors keep the last
    /// good key set.
    pub async fn refresh(&self) -> Result<usize, KeyError> {
        let Some(remote) = &self.remote else {
            return Ok(self.static_keys.len());
        };
        let mut last = remote.fetch.lock().await;
        *last = Some(Instant::now());
        let result = self.fetch_and_store(remote).await;
        *last = Some(Instant::now());
        result
    }

    /// Refreshes the JWKS in the background for as long as the store is alive.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let Some(remote) = &self.remote else { return };
        let every = remote.settings.refresh_interval;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                let Some(store) = weak.upgrade() else { return };
                wait = match store.refresh().await {
                    Ok(_) => every,
                    Err(_) => DEFAULT_RETRY_AFTER_FAILURE.min(every),
                };
            }
        });
    }
}

impl Remote {
    /// `Some(why)` when the latest fetch failed and the last good one is older than the
    /// grace. (Without a good fetch there are no fetched keys to be stale.)
    fn stale(&self) -> Option<String> {
        let grace = self.settings.stale_grace?;
        let error = read(&self.status).last_error.clone()?;
        let since = (*read(&self.last_success_at))?;
        let age = since.elapsed();
        (age > grace).then(|| {
            format!(
                "JWKS stale: last successful fetch {}s ago, more than the {}s grace; latest error: {error}",
                age.as_secs(),
                grace.as_secs()
            )
        })
    }

    /// Fetches and stores the key set; `Ok((keys, changed))`.
    async fn fetch_and_store(&self) -> Result<(usize, bool), KeyError> {
        let result = self.fetch_keys().await;
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        status.fetches += 1;
        match result {
            Ok((keys, hash)) => {
                let n = keys.len();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                let mut last_hash = self.body_hash.write().unwrap_or_else(|e| e.into_inner());
                let changed = *last_hash != Some(hash);
                *last_hash = Some(hash);
                *self
                    .last_success_at
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                status.last_success = Some(SystemTime::now());
                status.last_error = None;
                status.keys = n;
                tracing::info!(keys = n, "JWKS fetched");
                Ok((n, changed))
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS fetch failed; keeping the last good key set");
                status.last_error = Some(e.to_string());
                status.failures += 1;
                Err(e)
            }
        }
    }

    async fn fetch_keys(&self) -> Result<(KeyMap, [u8; 32]), KeyError> {
        let uri = match (&self.settings.jwks_uri, &self.settings.issuer) {
            (Some(u), _) => u.clone(),
            (None, Some(issuer)) => self.discover(issuer).await?,
            (None, None) => return Err(KeyError::NoSource),
        };
        let body = self.get(&uri).await?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| KeyError::InvalidJwks {
            url: uri.clone(),
            why: e.to_string(),
        })?;
        let keys: KeyMap = set
            .keys
            .iter()
            .filter_map(key_from_jwk)
            .map(|k| (k.kid.clone(), Arc::new(k)))
            .collect();
        if keys.is_empty() {
            return Err(KeyError::NoUsableKeys { url: uri });
        }
        use sha2::Digest;
        Ok((keys, sha2::Sha256::digest(&body).into()))
    }

    async fn discover(&self, issuer: &str) -> Result<String, KeyError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let body = self.get(&url).await?;
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| KeyError::InvalidDiscovery {
                url: url.clone(),
                why: e.to_string(),
            })?;
        // OpenID Connect Discovery §4.3: the document must name the issuer it was fetched for.
        let named = doc.get("issuer").and_then(|v| v.as_str());
        if named.map(|n| n.trim_end_matches('/')) != Some(issuer.trim_end_matches('/')) {
            return Err(KeyError::WrongIssuer {
                url,
                named: named.map(str::to_owned),
                expected: issuer.to_owned(),
            });
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| KeyError::NoJwksUri { url: url.clone() })?;
        if !secure_or_loopback(jwks_uri) {
            return Err(KeyError::InsecureJwksUri {
                url,
                jwks_uri: jwks_uri.to_owned(),
            });
        }
        Ok(jwks_uri.to_owned())
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, KeyError> {
        let transport = |e: reqwest::Error| KeyError::Transport {
            url: url.to_owned(),
            why: e.to_string(),
        };
        let mut resp = self.http.get(url).send().await.map_err(transport)?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(KeyError::HttpStatus {
                url: url.to_owned(),
                status: resp.status().to_string(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(KeyError::TooLarge {
                    url: url.to_owned(),
                    limit: MAX_DOCUMENT_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The rule config validation applies to key URLs: https, or http to a loopback host.
fn secure_or_loopback(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(h, _)| h),
        None => host_port.split_once(':').map_or(host_port, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// A key from a PEM file: RSA, EC or Ed25519 public key (or certificate).
pub fn key_from_pem(kid: &str, pem: &[u8]) -> Option<VerifyKey> {
    let (kind, key) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        (KeyKind::Rsa, k)
    } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        (KeyKind::Ec(None), k)
    } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        (KeyKind::Ed25519, k)
    } else {
        return None;
    };
    Some(VerifyKey {
        kid: kid.to_owned(),
        kind,
        alg: None,
        key,
    })
}

/// A signing key from a JWK, or `None` for keys that cannot verify JWS signatures
/// (encryption keys, symmetric keys, unknown types, no `kid`).
pub fn key_from_jwk(jwk: &Jwk) -> Option<VerifyKey> {
    let kid = jwk.common.key_id.clone()?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::Ec(Some(Curve::P256)),
            EllipticCurve::P384 => KeyKind::Ec(Some(Curve::P384)),
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            KeyKind::Ed25519
        }
        _ => return None,
    };
    let alg = match &jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(format!("{a:?}").parse::<Algorithm>().ok()?),
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid,
        kind,
        alg,
        key,
    })
}
