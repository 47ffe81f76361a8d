//! Test harness: a gateway in-process on ephemeral ports, in front of the RabbitMQ node on
//! 127.0.0.1:5672, with throw-away TLS material and signing keys, and a token minter.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amqp_iam_gateway::config;
use amqp_iam_gateway::proxy::{BoundAddrs, Gateway};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://issuer.test";
pub const ADMIN_ROLE: &str = "arn:aws:iam::111122223333:role/RabbitMqAdminRole";
pub const READONLY_ROLE: &str = "arn:aws:iam::111122223333:role/ReadOnly";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The reply code and text of a lapin error caused by a channel or connection close.
pub fn close_reason(err: &lapin::Error) -> Option<(u16, String)> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some((e.get_id(), e.get_message().to_string())),
        other => {
            eprintln!("not a protocol error: {other:?}");
            None
        }
    }
}

/// A unique suffix for resource names, so tests can run in parallel and repeatedly.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", rand::random::<u64>())
}

/// Asserts that `err` is the connection close a client gets when the gateway cannot open a
/// backend connection: 320 "CONNECTION_FORCED - broker unavailable".
#[track_caller]
pub fn assert_broker_unavailable(err: &lapin::Error) {
    assert_eq!(
        close_reason(err),
        Some((320, "CONNECTION_FORCED - broker unavailable".to_owned()))
    );
}

/// Declares `queue` on `ch` with the default options (not durable, not exclusive, not
/// auto-delete).
pub async fn declare_queue(ch: &lapin::Channel, queue: &str) -> lapin::Result<()> {
    declare_queue_with(ch, queue, lapin::options::QueueDeclareOptions::default()).await
}

/// Declares `queue` on `ch` as an exclusive queue (deleted when the connection closes).
pub async fn declare_exclusive(ch: &lapin::Channel, queue: &str) -> lapin::Result<()> {
    let options = lapin::options::QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    declare_queue_with(ch, queue, options).await
}

/// Declares `queue` on `ch` with `options` and no arguments.
async fn declare_queue_with(
    ch: &lapin::Channel,
    queue: &str,
    options: lapin::options::QueueDeclareOptions,
) -> lapin::Result<()> {
    ch.queue_declare(queue.into(), options, lapin::types::FieldTable::default())
        .await?;
    Ok(())
}

/// Publishes `body` on `ch` to `exchange` with `routing_key`, with the default options and
/// properties. The returned confirm resolves when the broker confirms the message (on a
/// channel in confirm mode; at once otherwise).
pub async fn publish(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> lapin::Result<lapin::PublisherConfirm> {
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    )
    .await
}

/// Starts a consumer tagged `tag` on `queue`, with the default options (deliveries must be
/// acked).
pub async fn consume(ch: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        lapin::options::BasicConsumeOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap()
}

/// The next delivery to `consumer`; panics when none comes within 10 s or the stream ends.
pub async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(
        Duration::from_secs(10),
        futures_lite::StreamExt::next(consumer),
    )
    .await
    .expect("delivery in time")
    .unwrap()
    .unwrap()
}

/// Gets a message from `queue` with basic.get (no ack), trying up to 50 times with `pause`
/// between tries, for a message that may not have reached the queue yet. None when no try
/// got one.
pub async fn poll_get(
    ch: &lapin::Channel,
    queue: &str,
    pause: Duration,
) -> Option<lapin::message::BasicGetMessage> {
    for _ in 0..50 {
        let got = ch
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap();
        if got.is_some() {
            return got;
        }
        tokio::time::sleep(pause).await;
    }
    None
}

/// GETs `path` (such as `/metrics`) from the gateway's admin listener; returns the HTTP
/// status and the body.
pub async fn admin_get(gw: &TestGateway, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", gw.addrs.admin.expect("admin listener"));
    let resp = reqwest::get(&url).await.expect("admin request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The gateway's `/metrics` text (the Prometheus exposition format).
pub async fn metrics(gw: &TestGateway) -> String {
    admin_get(gw, "/metrics").await.1
}

/// The value of the sample `amqp_iam_gateway_{name_and_labels}` in the exposition text
/// `text`, where `name_and_labels` is a metric name without the `amqp_iam_gateway_` prefix,
/// with its labels as they are written there (`name{label="value"}`); 0 when absent.
pub fn sample(text: &str, name_and_labels: &str) -> f64 {
    let name_and_labels = format!("amqp_iam_gateway_{name_and_labels}");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&name_and_labels)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

pub struct TestGateway {
    pub addrs: BoundAddrs,
    pub ca_pem: String,
    _dir: tempdir::Dir,
}

impl TestGateway {
    pub fn tls(&self) -> SocketAddr {
        self.addrs.tls.unwrap()
    }

    /// An `amqps://` URI with an empty username and the token as password.
    pub fn uri(&self, token: &str, vhost: &str) -> String {
        let vhost = if vhost == "/" {
            "%2f".to_owned()
        } else {
            vhost.to_owned()
        };
        format!("amqps://:{token}@localhost:{}/{vhost}", self.tls().port())
    }

    pub async fn connect(&self, token: &str, vhost: &str) -> lapin::Result<lapin::Connection> {
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(self.ca_pem.clone()),
        };
        lapin::DefaultConnectionBuilder::new()?
            .with_uri_str(self.uri(token, vhost))
            .with_tls_config(tls)
            .connect()
            .await
    }
}

/// Starts a gateway with the standard test config plus `extra_oauth2` lines, trusting the
/// fixture keys `test-rsa` and `test-ec384` as static signing keys, with `iss` pinned to
/// [`ISSUER`].
pub async fn start_gateway(extra_oauth2: &str) -> TestGateway {
    start_gateway_full(extra_oauth2, "127.0.0.1:5672", "").await
}

/// As [`start_gateway`], with the backend node given (`host:port`).
pub async fn start_gateway_with(extra_oauth2: &str, backend_node: &str) -> TestGateway {
    start_gateway_full(extra_oauth2, backend_node, "").await
}

/// As [`start_gateway_with`], plus `extra_backend` lines in `[backend]`.
pub async fn start_gateway_full(
    extra_oauth2: &str,
    backend_node: &str,
    extra_backend: &str,
) -> TestGateway {
    build_gateway(
        extra_oauth2,
        &static_keys(),
        backend_node,
        extra_backend,
        "",
    )
    .await
}

/// The standard gateway with `extra_listener` lines in `[listener]` and `extra_backend`
/// lines in `[backend]`.
pub async fn start_gateway_listener(extra_listener: &str, extra_backend: &str) -> TestGateway {
    build_gateway(
        "",
        &static_keys(),
        "127.0.0.1:5672",
        extra_backend,
        extra_listener,
    )
    .await
}

/// `issuer` pinned to [`ISSUER`] and the fixture keys `test-rsa` and `test-ec384`.
fn static_keys() -> String {
    let f = fixtures();
    format!(
        r#"issuer = "{ISSUER}"

[oauth2.signing_keys]
test-rsa = "{rsa}"
test-ec384 = "{ec}"
"#,
        rsa = f.join("rsa-public.pem").display(),
        ec = f.join("ec384-public.pem").display(),
    )
}

/// Starts a gateway with the standard test config plus `extra_oauth2` lines, taking its keys
/// from `key_source`: `[oauth2]` lines such as `issuer` and `jwks_uri`, optionally followed
/// by an `[oauth2.signing_keys]` table (it is placed last in `[oauth2]`, before the scope
/// aliases).
pub async fn start_gateway_with_keys(extra_oauth2: &str, key_source: &str) -> TestGateway {
    build_gateway(extra_oauth2, key_source, "127.0.0.1:5672", "", "").await
}

/// [`start_gateway_with_keys`] with extra `[backend]` lines.
pub async fn start_gateway_with_keys_and_backend(
    extra_oauth2: &str,
    key_source: &str,
    extra_backend: &str,
) -> TestGateway {
    build_gateway(
        extra_oauth2,
        key_source,
        "127.0.0.1:5672",
        extra_backend,
        "",
    )
    .await
}

/// Starts a gateway whose keys come only from `issuer`'s OIDC discovery document (no
/// static keys), with the standard aliases plus `extra_oauth2` lines.
pub async fn start_gateway_with_issuer(issuer: &str, extra_oauth2: &str) -> TestGateway {
    start_gateway_with_keys(extra_oauth2, &format!("issuer = \"{issuer}\"\n")).await
}

async fn build_gateway(
    extra_oauth2: &str,
    key_source: &str,
    backend_node: &str,
    extra_backend: &str,
    extra_listener: &str,
) -> TestGateway {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (cfg, ca_pem, dir) = test_config(
        extra_oauth2,
        key_source,
        backend_node,
        extra_backend,
        extra_listener,
    );
    let gateway = Gateway::new(cfg).await.expect("gateway");
    let addrs = gateway.start().await.expect("bind");
    TestGateway {
        addrs,
        ca_pem,
        _dir: dir,
    }
}

/// The [`Authenticator`] of a gateway started with [`start_gateway`]`(extra_oauth2)`, for
/// tests of the reason a token is refused.
pub fn authenticator(extra_oauth2: &str) -> amqp_iam_gateway::auth::Authenticator {
    let (cfg, _, _dir) = test_config(extra_oauth2, &static_keys(), "127.0.0.1:5672", "", "");
    amqp_iam_gateway::wiring::first_authenticator(&cfg.oauth2).expect("authenticator")
}

/// The standard test config with keys from `key_source` (as [`start_gateway_with_keys`]),
/// and the temporary directory its TLS files live in.
pub fn config_with_keys(extra_oauth2: &str, key_source: &str) -> (config::Config, tempdir::Dir) {
    let (cfg, _, dir) = test_config(extra_oauth2, key_source, "127.0.0.1:5672", "", "");
    (cfg, dir)
}

/// The standard test config with the fixture keys (as [`start_gateway`]).
pub fn config(extra_oauth2: &str) -> (config::Config, tempdir::Dir) {
    config_with_keys(extra_oauth2, &static_keys())
}

/// The standard test config (TLS material written to a new temporary directory); returns
/// it with the CA PEM and the directory.
fn test_config(
    extra_oauth2: &str,
    key_source: &str,
    backend_node: &str,
    extra_backend: &str,
    extra_listener: &str,
) -> (config::Config, String, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let ca_pem = write_tls(dir.path());
    let toml = format!(
        r#"
[listener]
address = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server-key.pem"
plain_address = "127.0.0.1:0"
auth_failure_delay_ms = 200
{extra_listener}

[backend]
nodes = ["{backend_node}"]
username = "guest"
password = "guest"
{extra_backend}

[oauth2]
resource_server_id = "rabbitmq"
scope_prefix = "rabbitmq/"
additional_scopes_key = 'sub https://sts\.amazonaws\.com/.request_tags.scope'
{extra_oauth2}
{key_source}

[admin]
address = "127.0.0.1:0"

[oauth2.scope_aliases]
"{ADMIN_ROLE}" = "rabbitmq/tag:administrator rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*"
"{READONLY_ROLE}" = "rabbitmq/read:*/*"
"team-a" = "rabbitmq/configure:%2F/team-a.* rabbitmq/write:%2F/team-a.* rabbitmq/read:%2F/team-a.*"
"#
    );
    let cfg = config::parse(&toml, dir.path()).unwrap_or_else(|e| panic!("test config: {e}"));
    (cfg, ca_pem, dir)
}

/// Writes a CA and a server certificate for localhost / 127.0.0.1; returns the CA PEM.
fn write_tls(dir: &Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    ca_cert.pem()
}

/// Standard STS-shaped claims for `sub`, valid for 5 minutes.
pub fn claims(sub: &str) -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "aud": "rabbitmq",
        "sub": sub,
        "iat": now,
        "exp": now + 300,
        "jti": unique("jti"),
        "https://sts.amazonaws.com/": { "aws_account": "111122223333", "source_region": "us-east-1" }
    })
}

/// Signs `claims` with the trusted RSA key (kid `test-rsa`).
pub fn sign(claims: &Value) -> String {
    sign_with(claims, Algorithm::RS256, "test-rsa", "rsa-private.pem")
}

pub fn sign_with(claims: &Value, alg: Algorithm, kid: &str, key_file: &str) -> String {
    let pem = std::fs::read(fixtures().join(key_file)).unwrap();
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A compact JWS with an arbitrary header and signature bytes (for hostile tokens).
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// HS256 over `header.payload` with `secret` (to forge "HMAC with the RSA public key").
pub fn hs256(signing_input: &str, secret: &[u8]) -> Vec<u8> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    aws_lc_rs::hmac::sign(&key, signing_input.as_bytes())
        .as_ref()
        .to_vec()
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(super::unique("amqp-iam-gateway-test"));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
