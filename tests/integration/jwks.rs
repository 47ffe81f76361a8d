//! Key fetching from an identity provider: the JWKS and OIDC discovery, served by a tiny
//! HTTP/1.1 server on loopback whose answers the tests change while they run.
//!
//! The `KeyStore` / `Authenticator` tests need no broker; the `gateway_*` tests connect with
//! lapin through a gateway in front of the RabbitMQ node on 127.0.0.1:5672. Every wait is
//! bounded: the server reads a request head for at most 5 s and delays an answer only when
//! a test asks it to, and the gateway's HTTP timeout ends any request the server holds.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use amqp_iam_gateway::auth::Authenticator;
use amqp_iam_gateway::auth::jwt::{AuthError, ClaimRules};
use amqp_iam_gateway::auth::keys::{KeySettings, KeyStore};
use amqp_iam_gateway::auth::scopes::ScopeRules;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const JWKS_PATH: &str = "/.well-known/jwks.json";
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Longest time the server waits for a request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------------
// The identity provider.
// ---------------------------------------------------------------------------------------------

/// What the server answers, changeable while it runs.
struct State {
    /// Body of `GET /.well-known/jwks.json`.
    jwks: String,
    /// Status of the JWKS answer.
    status: u16,
    /// How long to wait before answering a JWKS request.
    delay: Duration,
    /// Body of `GET /.well-known/openid-configuration`.
    discovery: String,
    jwks_requests: usize,
    discovery_requests: usize,
}

/// An HTTP/1.1 server on 127.0.0.1 with one connection per request (`Connection: close`).
struct Idp {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Idp {
    async fn start(jwks: &Value) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            jwks: jwks.to_string(),
            status: 200,
            delay: Duration::ZERO,
            discovery: json!({
                "issuer": format!("http://{addr}"),
                "jwks_uri": format!("http://{addr}{JWKS_PATH}"),
            })
            .to_string(),
            jwks_requests: 0,
            discovery_requests: 0,
        }));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, shared.clone()));
            }
        });
        Idp {
            addr,
            state,
            accept,
        }
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn jwks_uri(&self) -> String {
        format!("http://{}{JWKS_PATH}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn publish(&self, jwks: &Value) {
        self.with(|s| {
            s.jwks = jwks.to_string();
            s.status = 200;
            s.delay = Duration::ZERO;
        });
    }

    fn jwks_requests(&self) -> usize {
        self.with(|s| s.jwks_requests)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn answer(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut head = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    if !matches!(
        tokio::time::timeout(READ_TIMEOUT, read_head).await,
        Ok(Some(()))
    ) {
        return;
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body, delay) = {
        let mut s = state.lock().unwrap();
        match path {
            JWKS_PATH => {
                s.jwks_requests += 1;
                (s.status, s.jwks.clone(), s.delay)
            }
            DISCOVERY_PATH => {
                s.discovery_requests += 1;
                (200, s.discovery.clone(), Duration::ZERO)
            }
            _ => (404, "{}".to_owned(), Duration::ZERO),
        }
    };
    tokio::time::sleep(delay).await;
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Unknown",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Keys and tokens.
// ---------------------------------------------------------------------------------------------

/// The JWK of a fixture public key (PEM), with `kid`, `use` and an optional `alg`.
fn jwk_from_public(file: &str, kid: &str, alg: Option<&str>, key_use: &str) -> Value {
    let pem = std::fs::read(fixtures().join(file)).unwrap();
    let key = DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .unwrap();
    finish_jwk(
        Jwk::from_decoding_key(&key, None).unwrap(),
        kid,
        alg,
        key_use,
    )
}

/// The public JWK of a fixture RSA private key (for keys without a public PEM).
fn jwk_from_rsa_private(file: &str, kid: &str, alg: Option<&str>) -> Value {
    let pem = std::fs::read(fixtures().join(file)).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    finish_jwk(
        Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap(),
        kid,
        alg,
        "sig",
    )
}

fn finish_jwk(jwk: Jwk, kid: &str, alg: Option<&str>, key_use: &str) -> Value {
    let mut v = serde_json::to_value(jwk).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("alg");
    o.insert("kid".into(), json!(kid));
    o.insert("use".into(), json!(key_use));
    if let Some(a) = alg {
        o.insert("alg".into(), json!(a));
    }
    v
}

/// `RSA_0` as AWS publishes it (no `alg`), the test gateway's `test-rsa` key.
fn rsa_0() -> Value {
    jwk_from_public("rsa-public.pem", "RSA_0", None, "sig")
}

/// `EC384_0`, with `alg: ES384`.
fn ec384_0() -> Value {
    jwk_from_public("ec384-public.pem", "EC384_0", Some("ES384"), "sig")
}

/// `RSA_1`: the key rotated in (`other-rsa-private.pem`).
fn rsa_1() -> Value {
    jwk_from_rsa_private("other-rsa-private.pem", "RSA_1", None)
}

fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

fn rs256(kid: &str, key_file: &str) -> String {
    sign_with(&claims(ADMIN_ROLE), Algorithm::RS256, kid, key_file)
}

fn es384(kid: &str) -> String {
    sign_with(
        &claims(ADMIN_ROLE),
        Algorithm::ES384,
        kid,
        "ec384-private.pem",
    )
}

fn key_settings(idp: &Idp, min_refetch_ms: u64, http_timeout_ms: u64) -> KeySettings {
    KeySettings {
        jwks_uri: Some(idp.jwks_uri()),
        refresh_interval: Duration::from_secs(600),
        min_refetch_interval: Duration::from_millis(min_refetch_ms),
        http_timeout: Duration::from_millis(http_timeout_ms),
        ..KeySettings::default()
    }
}

/// An authenticator with the gateway's defaults (RS256 and ES384, `aud` rabbitmq, `iss`
/// pinned to [`ISSUER`]) over a key store that fetched the JWKS once.
async fn authenticator(settings: KeySettings) -> Arc<Authenticator> {
    let keys = Arc::new(KeyStore::new(settings).expect("key store"));
    keys.refresh().await.expect("initial JWKS fetch");
    Arc::new(Authenticator::new(
        vec![Algorithm::RS256, Algorithm::ES384],
        keys,
        ClaimRules {
            resource_server_id: "rabbitmq".into(),
            verify_aud: true,
            require_exp: true,
            issuer: Some(ISSUER.into()),
            check_nbf: true,
            check_iat: true,
            leeway_seconds: 60,
        },
        ScopeRules::with_defaults("rabbitmq"),
    ))
}

async fn verify(auth: &Authenticator, token: &str) -> Result<String, AuthError> {
    auth.authenticate(token, now(), None)
        .await
        .map(|i| i.username)
}

fn unknown_kid(kid: &str) -> Result<String, AuthError> {
    Err(AuthError::UnknownKid(kid.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Key store and authenticator.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rs256_and_es384_tokens_verify_with_keys_from_the_jwks() {
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0()])).await;
    let auth = authenticator(key_settings(&idp, 1_000, 2_000)).await;
    assert_eq!(auth.keys.key_count(), 2);
    assert_eq!(
        verify(&auth, &rs256("RSA_0", "rsa-private.pem")).await,
        Ok(ADMIN_ROLE.to_owned())
    );
    assert_eq!(
        verify(&auth, &es384("EC384_0")).await,
        Ok(ADMIN_ROLE.to_owned())
    );
    // The right kid with the wrong private key: the fetched key really is the one checked.
    assert_eq!(
        verify(&auth, &rs256("RSA_0", "other-rsa-private.pem")).await,
        Err(AuthError::BadSignature)
    );
    assert_eq!(idp.jwks_requests(), 1, "known kids need no refetch");
    let status = auth.keys.status().expect("remote keys");
    assert_eq!((status.fetches, status.keys), (1, 2));
    assert!(status.last_success.is_some() && status.last_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_is_fetched_once_for_200_concurrent_verifications() {
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    // No rate limit: only the single flight stands between 200 misses and 200 fetches.
    let auth = authenticator(key_settings(&idp, 0, 5_000)).await;
    let new_token = rs256("RSA_1", "other-rsa-private.pem");
    assert_eq!(verify(&auth, &new_token).await, unknown_kid("RSA_1"));
    assert_eq!(
        idp.jwks_requests(),
        2,
        "initial fetch + one refetch for RSA_1"
    );

    idp.publish(&jwks(&[rsa_0(), rsa_1()]));
    // A slow answer makes the 200 misses overlap the one fetch.
    idp.with(|s| s.delay = Duration::from_millis(300));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (auth, token) = (auth.clone(), new_token.clone());
        tasks.spawn(async move { verify(&auth, &token).await });
    }
    let results = tokio::time::timeout(Duration::from_secs(20), tasks.join_all())
        .await
        .expect("verifications finish");
    assert!(
        results.iter().all(|r| r.as_deref() == Ok(ADMIN_ROLE)),
        "{results:?}"
    );
    assert_eq!(idp.jwks_requests(), 3, "exactly one fetch for 200 misses");
    assert_eq!(
        verify(&auth, &rs256("RSA_0", "rsa-private.pem")).await,
        Ok(ADMIN_ROLE.to_owned()),
        "the old key still verifies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_within_the_refetch_interval_cause_at_most_one_fetch() {
    const INTERVAL_MS: u64 = 1_000;
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    let auth = authenticator(key_settings(&idp, INTERVAL_MS, 2_000)).await;
    // The initial fetch started the interval: misses right after it fetch nothing.
    for i in 0..10 {
        let kid = format!("forged-{i}");
        assert_eq!(
            verify(&auth, &rs256(&kid, "other-rsa-private.pem")).await,
            unknown_kid(&kid)
        );
    }
    assert_eq!(idp.jwks_requests(), 1);

    // Signed before the clock starts, so the burst is only verification.
    let forged: Vec<(String, String)> = (0..40)
        .map(|i| {
            let kid = format!("forged-again-{i}");
            let token = rs256(&kid, "other-rsa-private.pem");
            (kid, token)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(INTERVAL_MS + 200)).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (kid, token) in forged[..30].iter().cloned() {
        let auth = auth.clone();
        tasks.spawn(async move { (verify(&auth, &token).await, kid) });
    }
    for (got, kid) in tasks.join_all().await {
        assert_eq!(got, unknown_kid(&kid));
    }
    for (kid, token) in &forged[30..] {
        assert_eq!(verify(&auth, token).await, unknown_kid(kid));
    }
    assert!(
        started.elapsed() < Duration::from_millis(INTERVAL_MS),
        "the misses fell within one interval"
    );
    assert_eq!(
        idp.jwks_requests(),
        2,
        "50 misses in one interval: one fetch"
    );

    // The limit is per interval, not forever.
    tokio::time::sleep(Duration::from_millis(INTERVAL_MS + 200)).await;
    assert_eq!(
        verify(&auth, &rs256("forged-x", "other-rsa-private.pem")).await,
        unknown_kid("forged-x")
    );
    assert_eq!(idp.jwks_requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_good_keys_survive_failing_fetches_and_unknown_kids_fail_closed() {
    const TIMEOUT_MS: u64 = 300;
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0()])).await;
    // No rate limit, so every unknown kid really asks the failing server.
    let auth = authenticator(key_settings(&idp, 0, TIMEOUT_MS)).await;
    let known = rs256("RSA_0", "rsa-private.pem");
    let unknown = rs256("RSA_1", "other-rsa-private.pem");

    type Breakage = Box<dyn Fn(&mut State)>;
    let breakages: Vec<(&str, Breakage)> = vec![
        ("HTTP 500", Box::new(|s| s.status = 500)),
        (
            "not JSON",
            Box::new(|s| s.jwks = "<html>oops</html>".into()),
        ),
        ("no keys", Box::new(|s| s.jwks = r#"{"keys":[]}"#.into())),
        (
            "only unusable keys",
            Box::new(|s| {
                s.jwks = jwks(&[jwk_from_public("rsa-public.pem", "ENC", None, "enc")]).to_string()
            }),
        ),
        (
            "no answer within http_timeout",
            Box::new(|s| s.delay = Duration::from_secs(3)),
        ),
    ];
    for (name, breakage) in &breakages {
        idp.with(|s| breakage(s));
        let before = idp.jwks_requests();
        let started = Instant::now();
        assert!(auth.keys.refresh().await.is_err(), "{name}: refresh fails");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: bounded by http_timeout"
        );
        let status = auth.keys.status().unwrap();
        assert!(status.last_error.is_some(), "{name}");
        assert_eq!(auth.keys.key_count(), 2, "{name}: last good set kept");
        assert_eq!(
            verify(&auth, &known).await,
            Ok(ADMIN_ROLE.to_owned()),
            "{name}: known RS256 kid"
        );
        assert_eq!(
            verify(&auth, &es384("EC384_0")).await,
            Ok(ADMIN_ROLE.to_owned()),
            "{name}: known ES384 kid"
        );
        assert_eq!(
            verify(&auth, &unknown).await,
            unknown_kid("RSA_1"),
            "{name}: unknown kid"
        );
        assert_eq!(
            idp.jwks_requests(),
            before + 2,
            "{name}: the refresh and the refetch both reached the server"
        );
        idp.publish(&jwks(&[rsa_0(), ec384_0()]));
    }

    // While a refetch for an unknown kid hangs, known kids are not held up behind it.
    idp.with(|s| s.delay = Duration::from_secs(3));
    let hanging = {
        let (auth, unknown) = (auth.clone(), unknown.clone());
        tokio::spawn(async move { verify(&auth, &unknown).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!hanging.is_finished(), "the refetch is in flight");
    assert_eq!(verify(&auth, &known).await, Ok(ADMIN_ROLE.to_owned()));
    assert!(
        !hanging.is_finished(),
        "the known kid was verified while the refetch was still in flight"
    );
    assert_eq!(hanging.await.unwrap(), unknown_kid("RSA_1"));
}

#[tokio::test]
async fn jwks_keys_are_bound_to_their_type_use_and_alg() {
    let rsa_enc = jwk_from_public("rsa-public.pem", "RSA_ENC", None, "enc");
    let rsa_512 = jwk_from_public("rsa-public.pem", "RSA_512", Some("RS512"), "sig");
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0(), rsa_enc, rsa_512])).await;
    let auth = authenticator(key_settings(&idp, 0, 2_000)).await;
    assert_eq!(auth.keys.key_count(), 3, "the `use: enc` key is not loaded");

    let mismatch = |kid: &str, key: &str, alg: &str| {
        Err(AuthError::KeyMismatch {
            kid: kid.into(),
            key: key.into(),
            alg: alg.into(),
        })
    };
    // An RS256 token naming the EC P-384 key.
    assert_eq!(
        verify(&auth, &rs256("EC384_0", "rsa-private.pem")).await,
        mismatch("EC384_0", "Ec(Some(P384))", "RS256")
    );
    // An ES384 token naming an RSA key.
    assert_eq!(
        verify(&auth, &es384("RSA_0")).await,
        mismatch("RSA_0", "Rsa", "ES384")
    );
    // The right RSA key, published for RS512 only.
    assert_eq!(
        verify(&auth, &rs256("RSA_512", "rsa-private.pem")).await,
        mismatch("RSA_512", "Rsa", "RS256")
    );
    // An encryption key is not a verification key, even with a valid signature.
    assert_eq!(
        verify(&auth, &rs256("RSA_ENC", "rsa-private.pem")).await,
        unknown_kid("RSA_ENC")
    );
    // Same key material under RSA_0 (no alg published): accepted.
    assert_eq!(
        verify(&auth, &rs256("RSA_0", "rsa-private.pem")).await,
        Ok(ADMIN_ROLE.to_owned())
    );
}

// ---------------------------------------------------------------------------------------------
// Through the gateway, with lapin.
// ---------------------------------------------------------------------------------------------

/// Regression: the refetch interval counts from the end of the last fetch. It used to count
/// from its start, so while the issuer hung past `min_refetch_interval`, every client
/// waiting for the fetch lock with an unknown `kid` started a fetch of its own after the
/// previous one timed out: n such clients took n × `http_timeout`, the last one waiting
/// longest (found by `gateway_keeps_serving_known_keys_while_the_jwks_fails`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_behind_a_hanging_refetch_do_not_queue_their_own() {
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    let auth = authenticator(key_settings(&idp, 100, 300)).await;
    idp.with(|s| s.delay = Duration::from_secs(5));
    // Past the refetch interval of the initial fetch.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let before = idp.jwks_requests();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let auth = auth.clone();
        tasks.spawn(async move { auth.keys.find(Some("RSA_1")).await.map(|_| ()) });
    }
    for r in tasks.join_all().await {
        assert_eq!(r, Err(AuthError::UnknownKid("RSA_1".into())));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_millis(900), "5 waiters took {took:?}");
    assert_eq!(idp.jwks_requests(), before + 1, "one fetch for the five");
}

/// `[oauth2]` key-source lines: the JWKS at `idp`, `iss` pinned to [`ISSUER`].
fn jwks_source(idp: &Idp, min_refetch_ms: u64) -> String {
    format!(
        "issuer = \"{ISSUER}\"\njwks_uri = \"{}\"\njwks_min_refetch_interval_ms = {min_refetch_ms}\nhttp_timeout_ms = 2000\n",
        idp.jwks_uri()
    )
}

async fn use_connection(conn: lapin::Connection) {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(10, lapin::options::BasicQosOptions::default())
        .await
        .expect("basic.qos through the gateway");
    conn.close(200, "bye".into()).await.expect("close");
}

fn refused_login(err: &lapin::Error) -> bool {
    matches!(err.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 403)
}

#[tokio::test]
async fn gateway_accepts_rs256_and_es384_tokens_with_keys_from_the_jwks() {
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0()])).await;
    let gw = start_gateway_with_keys("", &jwks_source(&idp, 1_000)).await;
    assert_eq!(idp.jwks_requests(), 1, "fetched at start");
    for token in [rs256("RSA_0", "rsa-private.pem"), es384("EC384_0")] {
        use_connection(gw.connect(&token, "/").await.expect("JWKS key")).await;
    }
    // The static kid of the other tests is not configured here.
    let err = gw
        .connect(&rs256("test-rsa", "rsa-private.pem"), "/")
        .await
        .unwrap_err();
    assert!(refused_login(&err), "{err:?}");
}

#[tokio::test]
async fn gateway_finds_keys_through_oidc_discovery() {
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0()])).await;
    let issuer = idp.issuer();
    let gw = start_gateway_with_keys("", &format!("issuer = \"{issuer}\"\n")).await;
    assert_eq!(
        idp.with(|s| (s.discovery_requests, s.jwks_requests)),
        (1, 1),
        "discovery document, then the jwks_uri it names"
    );
    let mut c = claims(ADMIN_ROLE);
    c["iss"] = json!(issuer);
    for token in [
        sign_with(&c, Algorithm::RS256, "RSA_0", "rsa-private.pem"),
        sign_with(&c, Algorithm::ES384, "EC384_0", "ec384-private.pem"),
    ] {
        use_connection(gw.connect(&token, "/").await.expect("discovered key")).await;
    }
    // The issuer is pinned: the same key with another `iss` is refused.
    let err = gw
        .connect(&rs256("RSA_0", "rsa-private.pem"), "/")
        .await
        .unwrap_err();
    assert!(refused_login(&err), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_picks_up_a_rotated_key_with_one_fetch_for_200_connections() {
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    // What is measured is the key fetch; the 200 backend connections behind it queue for
    // connect slots (max_connecting), which on this 2-core machine took up to 16 s in all,
    // past the default 5 s connect timeout for the last ones.
    let gw = Arc::new(
        start_gateway_with_keys_and_backend(
            "",
            // The one fetch must not time out while 200 clients load this 2-core machine.
            &jwks_source(&idp, 0).replace("http_timeout_ms = 2000", "http_timeout_ms = 15000"),
            "connect_timeout_ms = 30000",
        )
        .await,
    );
    let new_token = rs256("RSA_1", "other-rsa-private.pem");
    let err = gw.connect(&new_token, "/").await.unwrap_err();
    assert!(refused_login(&err), "RSA_1 not published yet: {err:?}");
    assert_eq!(idp.jwks_requests(), 2, "start + one refetch for RSA_1");

    idp.publish(&jwks(&[rsa_0(), rsa_1()]));
    idp.with(|s| s.delay = Duration::from_millis(300));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (gw, token) = (gw.clone(), new_token.clone());
        tasks.spawn(async move {
            let conn = gw.connect(&token, "/").await?;
            conn.close(200, "bye".into()).await
        });
    }
    let results = tokio::time::timeout(Duration::from_secs(60), tasks.join_all())
        .await
        .expect("connections finish");
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    if !failed.is_empty() {
        // Who refused: the gateway counts its own refusals by reason; a refusal it did not
        // count is the broker's (the backend login).
        let url = format!("http://{}/metrics", gw.addrs.admin.unwrap());
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let refusals: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("authentications_total") && l.contains("refused"))
            .collect();
        panic!(
            "{} of 200 failed; gateway refusals {refusals:?}; JWKS fetches {}; {failed:?}",
            failed.len(),
            idp.jwks_requests()
        );
    }
    assert_eq!(
        idp.jwks_requests(),
        3,
        "exactly one fetch for 200 connections"
    );
}

/// The value of the metric sample `sample` (name and labels, as written in the text format)
/// on the gateway's admin listener; 0 when absent.
async fn jwks_metric(gw: &TestGateway, sample: &str) -> f64 {
    let url = format!("http://{}/metrics", gw.addrs.admin.unwrap());
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn jwks_metrics_are_kept_per_issuer() {
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0()])).await;
    let gw = start_gateway_with_keys("", &jwks_source(&idp, 0)).await;
    let m = |name: &str| format!("amqp_iam_gateway_{name}");
    let keys = m(r#"jwks_keys{issuer="default"}"#);
    let ok = m(r#"jwks_fetches_total{issuer="default",result="ok"}"#);
    let error = m(r#"jwks_fetches_total{issuer="default",result="error"}"#);
    let last = m(r#"jwks_last_success_timestamp_seconds{issuer="default"}"#);
    assert_eq!(jwks_metric(&gw, &keys).await, 2.0);
    assert_eq!(jwks_metric(&gw, &ok).await, 1.0, "the fetch at start");
    assert_eq!(jwks_metric(&gw, &error).await, 0.0);
    let fetched_at = jwks_metric(&gw, &last).await;
    assert!(
        (now() as f64 - fetched_at).abs() < 60.0,
        "last success {fetched_at} is about now"
    );

    // The issuer fails; an unknown kid makes the gateway ask it.
    idp.with(|s| s.status = 500);
    let err = gw
        .connect(&rs256("RSA_1", "other-rsa-private.pem"), "/")
        .await
        .unwrap_err();
    assert!(refused_login(&err), "{err:?}");
    assert_eq!(jwks_metric(&gw, &error).await, 1.0, "the failed refetch");
    assert_eq!(jwks_metric(&gw, &ok).await, 1.0);
    assert_eq!(
        jwks_metric(&gw, &keys).await,
        2.0,
        "the known keys are kept"
    );
    assert_eq!(jwks_metric(&gw, &last).await, fetched_at);
}

// ---------------------------------------------------------------------------------------------
// Stale grace.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn fetched_keys_stop_verifying_after_the_stale_grace() {
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    let settings = KeySettings {
        stale_grace: Some(Duration::from_secs(1)),
        ..key_settings(&idp, 0, 2_000)
    };
    let auth = authenticator(settings).await;
    let cached = rs256("RSA_0", "rsa-private.pem");
    assert_eq!(verify(&auth, &cached).await, Ok(ADMIN_ROLE.to_owned()));

    // The issuer fails from now on: known keys keep working within the grace.
    idp.with(|s| s.status = 500);
    let failed_at = Instant::now();
    auth.keys.refresh().await.unwrap_err();
    assert_eq!(verify(&auth, &cached).await, Ok(ADMIN_ROLE.to_owned()));
    assert!(auth.keys.stale().is_none());

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Past the grace, a failed fetch since: the kid stops verifying, cached or not.
    auth.keys.refresh().await.unwrap_err();
    let refused = |r: Result<String, AuthError>| match r {
        Err(AuthError::KeysUnavailable(why)) => assert!(why.contains("stale"), "{why}"),
        other => panic!("expected keys_unavailable, got {other:?}"),
    };
    refused(verify(&auth, &cached).await);
    refused(verify(&auth, &rs256("RSA_0", "rsa-private.pem")).await);
    assert!(auth.keys.stale().is_some());
    assert_eq!(auth.keys.key_count(), 0);
    assert!(failed_at.elapsed() >= Duration::from_secs(1));

    // The issuer is back: so are its keys.
    idp.publish(&jwks(&[rsa_0()]));
    auth.keys.refresh().await.expect("fetch");
    assert_eq!(verify(&auth, &cached).await, Ok(ADMIN_ROLE.to_owned()));
}

#[tokio::test]
async fn without_a_failed_fetch_keys_are_not_stale() {
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    let settings = KeySettings {
        stale_grace: Some(Duration::from_secs(1)),
        ..key_settings(&idp, 0, 2_000)
    };
    let auth = authenticator(settings).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(auth.keys.stale().is_none());
    assert_eq!(
        verify(&auth, &rs256("RSA_0", "rsa-private.pem")).await,
        Ok(ADMIN_ROLE.to_owned())
    );
}

#[tokio::test]
async fn gateway_fails_closed_and_not_ready_after_the_stale_grace() {
    let idp = Idp::start(&jwks(&[rsa_0()])).await;
    let gw = start_gateway_with_keys(
        "jwks_stale_grace_seconds = 1\njwks_refresh_seconds = 1\n",
        &jwks_source(&idp, 0),
    )
    .await;
    let token = rs256("RSA_0", "rsa-private.pem");
    use_connection(gw.connect(&token, "/").await.expect("JWKS key")).await;
    let readyz = || async {
        let url = format!("http://{}/readyz", gw.addrs.admin.unwrap());
        let resp = reqwest::get(&url).await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(readyz().await.0, 200);

    idp.with(|s| s.status = 500);
    // The background refresh (every 1 s, failing) marks the keys stale after the grace.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz().await;
        if status == 503 {
            assert!(body.contains("stale"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never stale: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = gw.connect(&token, "/").await.unwrap_err();
    assert!(refused_login(&err), "stale key refused: {err:?}");
}

// ---------------------------------------------------------------------------------------------
// Issuer faults while clients connect (issue 7, point 5).
// ---------------------------------------------------------------------------------------------

/// While the JWKS endpoint fails (HTTP 500, garbage, a hang past `http_timeout`), clients
/// with known keys keep connecting through the gateway, and a client with an unknown `kid`
/// is refused in bounded time: nothing waits on the broken issuer for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keeps_serving_known_keys_while_the_jwks_fails() {
    let idp = Idp::start(&jwks(&[rsa_0(), ec384_0()])).await;
    // The default refetch interval (1 s); http_timeout_ms = 2000 (jwks_source).
    let gw = Arc::new(start_gateway_with_keys("", &jwks_source(&idp, 1_000)).await);
    type Breakage = Box<dyn Fn(&mut State)>;
    let breakages: Vec<(&str, Breakage)> = vec![
        (
            "HTTP 500 with garbage",
            Box::new(|s| {
                s.status = 500;
                s.jwks = "\u{0}\u{1}<html>{{{".into()
            }),
        ),
        (
            "wrong JSON",
            Box::new(|s| s.jwks = r#"{"keys":"nope"}"#.into()),
        ),
        ("hangs", Box::new(|s| s.delay = Duration::from_secs(30))),
    ];
    for (name, breakage) in &breakages {
        idp.with(|s| breakage(s));
        // Past the refetch interval, so this breakage is really fetched.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let before = idp.jwks_requests();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..12 {
            let gw = gw.clone();
            tasks.spawn(async move {
                let token = match i % 4 {
                    0 => rs256("RSA_1", "other-rsa-private.pem"), // unknown: refetch
                    1 => es384("EC384_0"),
                    _ => rs256("RSA_0", "rsa-private.pem"),
                };
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(10), gw.connect(&token, "/"))
                    .await
                    .expect("connect attempt bounded");
                let ok = match r {
                    Ok(conn) => {
                        use_connection(conn).await;
                        true
                    }
                    Err(e) => {
                        assert!(refused_login(&e), "{e:?}");
                        false
                    }
                };
                (i, ok, t.elapsed())
            });
        }
        let results = tasks.join_all().await;
        for (i, ok, took) in &results {
            assert_eq!(*ok, i % 4 != 0, "{name}: client {i} ({took:?})");
            // http_timeout 2 s + auth_failure_delay 0.2 s, with slack for a loaded machine.
            assert!(
                *took < Duration::from_secs(5),
                "{name}: client {i} took {took:?}"
            );
        }
        eprintln!(
            "{name}: 12 clients (3 unknown kid) in {:?}, slowest {:?}",
            started.elapsed(),
            results.iter().map(|r| r.2).max().unwrap()
        );
        assert!(
            idp.jwks_requests() > before,
            "{name}: the broken issuer was asked"
        );
        idp.publish(&jwks(&[rsa_0(), ec384_0()]));
    }
}
