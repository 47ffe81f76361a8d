//! The embedded STS issuer end to end: tokens minted through its HTTP Query API (signed
//! with SigV4 like an SDK signs), verified by the gateway's own key store found through OIDC
//! discovery, and used by lapin to connect through a gateway to the real RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use amqp_iam_gateway::auth::jwt::{self, ClaimRules};
use amqp_iam_gateway::auth::keys::{KeySettings, KeyStore};
use amqp_iam_gateway::sts::{self, Issuer, IssuerConfig, Principal, sigv4};
use jsonwebtoken::Algorithm;
use lapin::Connection;
use lapin::options::*;
use lapin::types::FieldTable;
use serde_json::Value;

const ADMIN_KEY: &str = "AKIAADMIN0000000001";
const TEAM_KEY: &str = "AKIATEAM00000000001";
const SECRET: &str = "test/secret/0123456789abcdefghijklmnopqrstu";
const TEAM_ROLE: &str = "arn:aws:iam::111122223333:role/TeamAWorker";

struct Emulator {
    url: String,
    issuer: Arc<Issuer>,
    _dir: tempdir::Dir,
}

fn principal(akid: &str, role: &str) -> Principal {
    Principal {
        access_key_id: akid.into(),
        secret_access_key: SECRET.into(),
        role_arn: role.into(),
        account: "111122223333".into(),
        org_id: None,
        ou_path: vec![],
        principal_tags: Default::default(),
    }
}

async fn start_emulator() -> Emulator {
    let dir = tempdir::Dir::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let issuer = Arc::new(
        Issuer::open(IssuerConfig {
            issuer_url: url.clone(),
            state_dir: dir.path().to_owned(),
            principals: vec![
                principal(ADMIN_KEY, ADMIN_ROLE),
                principal(TEAM_KEY, TEAM_ROLE),
            ],
            region: "us-east-1".into(),
        })
        .unwrap(),
    );
    tokio::spawn(sts::serve(issuer.clone(), listener));
    Emulator {
        url,
        issuer,
        _dir: dir,
    }
}

/// Calls the Query API as an SDK would: form body, SigV4 over content-type, host and
/// x-amz-date. Returns the HTTP status and the XML body.
async fn call(em: &Emulator, akid: &str, secret: &str, body: &str) -> (u16, String) {
    let host = em.url.trim_start_matches("http://").to_owned();
    let amz_date = sts::time::amz_date(now());
    let mut headers = vec![
        (
            "content-type".to_owned(),
            "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
        ),
        ("host".to_owned(), host),
        ("x-amz-date".to_owned(), amz_date.clone()),
    ];
    let names: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
    let req = sigv4::SignedRequest {
        method: "POST",
        path: "/",
        query: "",
        headers: &headers,
        body: body.as_bytes(),
    };
    let auth =
        sigv4::authorization_header(akid, secret, &req, &names, &amz_date, "us-east-1", "sts");
    headers.push(("authorization".to_owned(), auth));
    let mut builder = reqwest::Client::new().post(format!("{}/", em.url));
    for (n, v) in &headers {
        builder = builder.header(n, v);
    }
    let resp = builder.body(body.to_owned()).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].to_owned())
}

async fn mint(em: &Emulator, akid: &str, alg: &str, tags: &[(&str, &str)]) -> String {
    let mut body = format!(
        "Action=GetWebIdentityToken&Version=2011-06-15&Audience.member.1=rabbitmq&SigningAlgorithm={alg}&DurationSeconds=300"
    );
    for (i, (k, v)) in tags.iter().enumerate() {
        body.push_str(&format!(
            "&Tags.member.{n}.Key={k}&Tags.member.{n}.Value={v}",
            n = i + 1
        ));
    }
    let (status, xml) = call(em, akid, SECRET, &body).await;
    assert_eq!(status, 200, "{xml}");
    xml_text(&xml, "WebIdentityToken").expect("a token")
}

fn key_store(issuer_url: &str) -> KeyStore {
    KeyStore::new(KeySettings {
        issuer: Some(issuer_url.to_owned()),
        refresh_interval: Duration::from_secs(3600),
        min_refetch_interval: Duration::ZERO,
        http_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap()
}

/// Verifies like the gateway: header, key by kid (discovery → JWKS), signature, claims.
async fn verify(store: &KeyStore, issuer_url: &str, token: &str) -> Result<Value, jwt::AuthError> {
    let header = jwt::read_header(token, &[Algorithm::RS256, Algorithm::ES384])?;
    let key = store.find(header.kid.as_deref()).await?;
    let claims = jwt::verify_signature(token, &header, &key)?;
    let rules = ClaimRules {
        resource_server_id: "rabbitmq".into(),
        verify_aud: true,
        require_exp: true,
        issuer: Some(issuer_url.to_owned()),
        check_nbf: true,
        check_iat: true,
        leeway_seconds: 30,
    };
    jwt::check_claims(&claims, &rules, now())?;
    Ok(claims)
}

#[tokio::test]
async fn tokens_from_the_http_api_verify_with_the_gateway_key_store() {
    let em = start_emulator().await;
    let store = key_store(&em.url);
    assert_eq!(
        store.refresh().await.unwrap(),
        2,
        "RSA_0 and EC384_0 by discovery"
    );
    for alg in ["ES384", "RS256"] {
        let token = mint(&em, TEAM_KEY, alg, &[("scope", "team-a")]).await;
        let claims = verify(&store, &em.url, &token).await.unwrap();
        assert_eq!(claims["iss"], em.url.as_str());
        assert_eq!(claims["sub"], TEAM_ROLE);
        assert_eq!(claims["aud"], "rabbitmq");
        assert_eq!(
            claims["https://sts.amazonaws.com/"]["request_tags"]["scope"],
            "team-a"
        );
    }
    // After a rotation the store finds the new kid by refetching the JWKS.
    let kids = em.issuer.rotate().unwrap();
    let token = mint(&em, TEAM_KEY, "ES384", &[]).await;
    let header = jwt::read_header(&token, &[Algorithm::ES384]).unwrap();
    assert_eq!(header.kid.as_deref(), Some(kids[1].as_str()));
    verify(&store, &em.url, &token).await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_sts_errors_over_http() {
    let em = start_emulator().await;
    let base = "Action=GetWebIdentityToken&Version=2011-06-15";
    let many: String = (1..=11)
        .map(|i| format!("&Audience.member.{i}=a{i}"))
        .collect();
    let cases = [
        (
            format!("{base}&SigningAlgorithm=ES384"),
            SECRET,
            400,
            "ValidationError",
        ),
        (
            format!("{base}{many}&SigningAlgorithm=ES384"),
            SECRET,
            400,
            "ValidationError",
        ),
        (
            format!("{base}&Audience.member.1=rabbitmq&SigningAlgorithm=HS256"),
            SECRET,
            400,
            "ValidationError",
        ),
        (
            format!("{base}&Audience.member.1=rabbitmq&SigningAlgorithm=ES384&DurationSeconds=59"),
            SECRET,
            400,
            "ValidationError",
        ),
        (
            format!(
                "{base}&Audience.member.1=rabbitmq&SigningAlgorithm=ES384&DurationSeconds=3601"
            ),
            SECRET,
            400,
            "ValidationError",
        ),
        (
            format!(
                "{base}&Audience.member.1=rabbitmq&SigningAlgorithm=ES384&Tags.member.1.Key=k&Tags.member.1.Value=a%2Ab"
            ),
            SECRET,
            400,
            "ValidationError",
        ),
        (
            format!("{base}&Audience.member.1=rabbitmq&SigningAlgorithm=ES384"),
            "wrong",
            403,
            "SignatureDoesNotMatch",
        ),
    ];
    for (body, secret, status, code) in cases {
        let (got, xml) = call(&em, TEAM_KEY, secret, &body).await;
        assert_eq!(
            (got, xml_text(&xml, "Code").as_deref()),
            (status, Some(code)),
            "{body}"
        );
        assert!(xml.contains("<ErrorResponse"), "{xml}");
        assert!(xml_text(&xml, "WebIdentityToken").is_none());
    }
    // No signature at all.
    let resp = reqwest::Client::new()
        .post(format!("{}/", em.url))
        .body(format!(
            "{base}&Audience.member.1=rabbitmq&SigningAlgorithm=ES384"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let xml = resp.text().await.unwrap();
    assert_eq!(
        xml_text(&xml, "Code").as_deref(),
        Some("MissingAuthenticationToken")
    );
    // Bodies are bounded.
    let resp = reqwest::Client::new()
        .post(format!("{}/", em.url))
        .body(vec![b'a'; sts::server::MAX_BODY_BYTES + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
}

async fn round_trip(conn: &Connection, queue: &str) {
    let ch = conn.create_channel().await.unwrap();
    declare_exclusive(&ch, queue).await.unwrap();
    // Through an exchange of our own: the default exchange needs write on `amq.default`,
    // which a `team-a.*` scope does not grant.
    let exchange = format!("{queue}.x");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, &exchange, "", b"hello from an emulated STS token")
        .await
        .unwrap()
        .await
        .unwrap();
    let got = poll_get(&ch, queue, Duration::from_millis(20)).await;
    assert_eq!(
        got.expect("the message comes back").delivery.data,
        b"hello from an emulated STS token"
    );
    // Closed here: a channel dropped while the connection closes races with it in lapin.
    ch.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn lapin_connects_through_the_gateway_with_emulator_tokens() {
    let em = start_emulator().await;
    let gw = start_gateway_with_issuer(&em.url, "").await;

    // The role ARN in `sub` maps to full access through a scope alias (ES384).
    let token = mint(&em, ADMIN_KEY, "ES384", &[]).await;
    let conn = gw.connect(&token, "/").await.expect("admin connects");
    round_trip(&conn, &unique("sts-admin")).await;
    conn.close(200, "bye".into()).await.unwrap();

    // A role with no alias gets its permissions from a request tag read through the nested
    // `https://sts.amazonaws.com/` path (RS256).
    let token = mint(&em, TEAM_KEY, "RS256", &[("scope", "team-a")]).await;
    let conn = gw.connect(&token, "/").await.expect("team-a connects");
    round_trip(&conn, &unique("team-a.sts")).await;
    let ch = conn.create_channel().await.unwrap();
    let err = declare_queue(&ch, &unique("other"))
        .await
        .expect_err("outside team-a.*");
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => assert_eq!(e.get_id(), 403),
        other => panic!("expected a channel close 403, got {other:?}"),
    }
    // lapin may still be closing the refused channel; the close result is not the point.
    let _ = conn.close(200, "bye".into()).await;

    // The same role without the tag has no access to the vhost.
    let token = mint(&em, TEAM_KEY, "ES384", &[]).await;
    assert!(
        gw.connect(&token, "/").await.is_err(),
        "530 without the tag"
    );
}

/// GETs `url` with `client` and parses the body as JSON.
async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let resp = client.get(url).send().await.unwrap();
    resp.json().await.unwrap()
}

#[tokio::test]
async fn discovery_over_https() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &rcgen::Issuer::new(ca, ca_key))
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();

    let dir = tempdir::Dir::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let issuer = Arc::new(
        Issuer::open(IssuerConfig {
            issuer_url: url.clone(),
            state_dir: dir.path().to_owned(),
            principals: vec![],
            region: "us-east-1".into(),
        })
        .unwrap(),
    );
    tokio::spawn(sts::serve_tls(
        issuer,
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    ));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_cert.pem().as_bytes()).unwrap())
        .resolve("localhost", std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .build()
        .unwrap();
    let doc = get_json(&client, &format!("{url}/.well-known/openid-configuration")).await;
    assert_eq!(doc["issuer"], url.as_str());
    let jwks = get_json(&client, doc["jwks_uri"].as_str().unwrap()).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
}
