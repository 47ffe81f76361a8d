//! Issuer-level tests: token shape and signatures (checked with the gateway's own verifier
//! over the published JWKS), key persistence and rotation, and the HTTP answers through
//! `server::respond`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use super::server::{Reply, respond};
use super::sigv4::{self, SignedRequest};
use super::*;
use crate::auth::jwt;
use crate::auth::keys::key_from_jwk;

const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
const AKID: &str = "AKIAEMULATOR0000001";
const SECRET: &str = "emulator/secret/key/0000000000000000000";
const ROLE: &str = "arn:aws:iam::111122223333:role/RabbitMqAdminRole";

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("sts-unit-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn principal() -> Principal {
    Principal {
        access_key_id: AKID.into(),
        secret_access_key: SECRET.into(),
        role_arn: ROLE.into(),
        account: "111122223333".into(),
        org_id: Some("o-abc1234567".into()),
        ou_path: vec!["o-abc1234567/r-ab12/ou-ab12-11111111/".into()],
        principal_tags: [("team".to_owned(), "data".to_owned())].into(),
    }
}

fn config(dir: &Path) -> IssuerConfig {
    IssuerConfig {
        issuer_url: "http://127.0.0.1:8479/".into(),
        state_dir: dir.to_owned(),
        principals: vec![principal()],
        region: DEFAULT_REGION.into(),
    }
}

fn b64_json(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Verifies `token` against `jwks` with the gateway's verifier; returns the claims.
fn verify(token: &str, jwks: &Value) -> Result<Value, jwt::AuthError> {
    let header = jwt::read_header(token, &[Algorithm::RS256, Algorithm::ES384])?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let key = set
        .keys
        .iter()
        .filter_map(key_from_jwk)
        .find(|k| Some(&k.kid) == header.kid.as_ref())
        .ok_or_else(|| jwt::AuthError::UnknownKid(format!("{:?}", header.kid)))?;
    jwt::verify_signature(token, &header, &key)
}

#[test]
fn es384_token_has_the_aws_shape() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let mut req = TokenRequest::new("rabbitmq", SigningAlgorithm::Es384);
    req.tags.insert("scope".into(), "team-a".into());
    let m = issuer.mint(&principal(), &req, NOW).unwrap();
    assert_eq!(m.expiration, NOW + 300);
    assert_eq!(m.kid, "EC384_0");
    let parts: Vec<&str> = m.token.split('.').collect();
    assert_eq!(parts.len(), 3);
    // Byte for byte the header real STS sends.
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[0]).unwrap(),
        br#"{"kid":"EC384_0","typ":"JWT","alg":"ES384"}"#
    );
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(),
        96,
        "r || s"
    );
    let claims = verify(&m.token, &issuer.jwks()).unwrap();
    assert_eq!(claims, b64_json(parts[1]));
    assert_eq!(
        claims,
        json!({
            "iss": "http://127.0.0.1:8479",
            "aud": "rabbitmq",
            "sub": ROLE,
            "iat": NOW,
            "exp": NOW + 300,
            "jti": m.jti,
            "https://sts.amazonaws.com/": {
                "aws_account": "111122223333",
                "source_region": "us-east-1",
                "principal_id": ROLE,
                "org_id": "o-abc1234567",
                "ou_path": ["o-abc1234567/r-ab12/ou-ab12-11111111/"],
                "principal_tags": {"team": "data"},
                "request_tags": {"scope": "team-a"},
                "original_session_exp": "2026-01-01T01:00:00Z",
            }
        })
    );
    assert!(claims.get("nbf").is_none());
    // jti is a v4 UUID.
    let jti = m.jti.as_bytes();
    assert_eq!(
        (jti.len(), jti[8], jti[13], jti[14]),
        (36, b'-', b'-', b'4')
    );
}

#[test]
fn rs256_token_with_several_audiences() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let mut req = TokenRequest::new("rabbitmq", SigningAlgorithm::Rs256);
    req.audiences.push("https://api.example.com".into());
    req.duration_seconds = 3600;
    let bare = Principal {
        org_id: None,
        ou_path: vec![],
        principal_tags: Default::default(),
        ..principal()
    };
    let m = issuer.mint(&bare, &req, NOW).unwrap();
    assert_eq!(m.kid, "RSA_0");
    let header = b64_json(m.token.split('.').next().unwrap());
    assert_eq!(
        header,
        json!({"kid": "RSA_0", "typ": "JWT", "alg": "RS256"})
    );
    let claims = verify(&m.token, &issuer.jwks()).unwrap();
    assert_eq!(
        claims["aud"],
        json!(["rabbitmq", "https://api.example.com"])
    );
    assert_eq!(claims["exp"], json!(NOW + 3600));
    // Empty optional members are left out, as in real tokens.
    let sts = claims[STS_CLAIMS_KEY].as_object().unwrap();
    let mut keys: Vec<&str> = sts.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "aws_account",
            "original_session_exp",
            "principal_id",
            "source_region"
        ]
    );
}

#[test]
fn mint_applies_the_api_rules() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let mut req = TokenRequest::new("rabbitmq", SigningAlgorithm::Es384);
    req.duration_seconds = 3601;
    match issuer.mint(&principal(), &req, NOW) {
        Err(StsError::Api(e)) => assert_eq!(e.code, "ValidationError"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn jwks_and_discovery_match_the_real_issuer() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let jwks = issuer.jwks();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let rsa = &keys[0];
    assert_eq!(
        (
            rsa["kty"].as_str(),
            rsa["kid"].as_str(),
            rsa["use"].as_str()
        ),
        (Some("RSA"), Some("RSA_0"), Some("sig"))
    );
    assert!(rsa.get("alg").is_none(), "the RSA key has no alg");
    assert_eq!(rsa["e"], "AQAB");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(rsa["n"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
    let ec = &keys[1];
    assert_eq!(ec["kty"], "EC");
    assert_eq!(ec["kid"], "EC384_0");
    assert_eq!(ec["alg"], "ES384");
    assert_eq!(ec["crv"], "P-384");
    assert_eq!(ec["use"], "sig");
    for c in ["x", "y"] {
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(ec[c].as_str().unwrap())
                .unwrap()
                .len(),
            48
        );
    }
    assert_eq!(
        issuer.discovery(),
        json!({
            "issuer": "http://127.0.0.1:8479",
            "jwks_uri": "http://127.0.0.1:8479/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": ["RS256", "ES384"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "jti", "https://sts.amazonaws.com/"],
            "subject_types_supported": ["public"],
        })
    );
}

#[test]
fn keys_persist_across_restarts() {
    let dir = TempDir::new();
    let first = Issuer::open(config(&dir.0)).unwrap();
    let m = first
        .mint(
            &principal(),
            &TokenRequest::new("rabbitmq", SigningAlgorithm::Es384),
            NOW,
        )
        .unwrap();
    let r = first
        .mint(
            &principal(),
            &TokenRequest::new("rabbitmq", SigningAlgorithm::Rs256),
            NOW,
        )
        .unwrap();
    let jwks = first.jwks();
    drop(first);
    let second = Issuer::open(config(&dir.0)).unwrap();
    assert_eq!(second.jwks(), jwks);
    verify(&m.token, &second.jwks()).unwrap();
    verify(&r.token, &second.jwks()).unwrap();

    let key_dir = dir.0.join(keys::KEY_DIR);
    assert_eq!(
        std::fs::metadata(&key_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut names: Vec<String> = std::fs::read_dir(&key_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["EC384_0.pem", "RSA_0.pem"],
        "no temporary files left"
    );
    for n in &names {
        let p = key_dir.join(n);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pem = std::fs::read_to_string(&p).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "PKCS#8 PEM"
        );
    }
    // A fresh state directory means new keys: the old token no longer verifies there.
    let other = TempDir::new();
    let third = Issuer::open(config(&other.0)).unwrap();
    assert!(verify(&m.token, &third.jwks()).is_err());
}

#[test]
fn a_corrupt_key_file_is_an_error_naming_it() {
    let dir = TempDir::new();
    let key_dir = dir.0.join(keys::KEY_DIR);
    std::fs::create_dir_all(&key_dir).unwrap();
    std::fs::write(key_dir.join("RSA_0.pem"), "not a key").unwrap();
    let err = Issuer::open(config(&dir.0)).err().expect("refused");
    assert!(matches!(err, StsError::Key { .. }), "{err:?}");
    assert!(err.to_string().contains("RSA_0.pem"), "{err}");
}

#[test]
fn rotation_publishes_old_and_new() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let old = issuer
        .mint(
            &principal(),
            &TokenRequest::new("rabbitmq", SigningAlgorithm::Es384),
            NOW,
        )
        .unwrap();
    assert_eq!(
        issuer.rotate().unwrap(),
        ["RSA_1".to_owned(), "EC384_1".to_owned()]
    );
    assert_eq!(
        issuer.published_kids(),
        ["RSA_0", "EC384_0", "RSA_1", "EC384_1"]
    );
    let new = issuer
        .mint(
            &principal(),
            &TokenRequest::new("rabbitmq", SigningAlgorithm::Es384),
            NOW,
        )
        .unwrap();
    assert_eq!(new.kid, "EC384_1");
    let jwks = issuer.jwks();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 4);
    verify(&old.token, &jwks).unwrap();
    verify(&new.token, &jwks).unwrap();
    let rsa = issuer
        .mint(
            &principal(),
            &TokenRequest::new("rabbitmq", SigningAlgorithm::Rs256),
            NOW,
        )
        .unwrap();
    assert_eq!(rsa.kid, "RSA_1");

    // A restart keeps the rotation.
    drop(issuer);
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    assert_eq!(
        issuer.published_kids(),
        ["RSA_0", "EC384_0", "RSA_1", "EC384_1"]
    );
    verify(&new.token, &issuer.jwks()).unwrap();

    // A second rotation retires generation 0.
    issuer.rotate().unwrap();
    assert_eq!(
        issuer.published_kids(),
        ["RSA_1", "EC384_1", "RSA_2", "EC384_2"]
    );
    assert!(matches!(
        verify(&old.token, &issuer.jwks()),
        Err(jwt::AuthError::UnknownKid(_))
    ));
    verify(&new.token, &issuer.jwks()).unwrap();
}

#[test]
fn a_rotation_cut_short_is_completed() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    issuer.rotate().unwrap();
    drop(issuer);
    std::fs::remove_file(dir.0.join(keys::KEY_DIR).join("EC384_1.pem")).unwrap();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    assert_eq!(
        issuer.published_kids(),
        ["RSA_0", "EC384_0", "RSA_1", "EC384_1"]
    );
}

#[test]
fn bad_configs_are_reported_together() {
    let dir = TempDir::new();
    let mut cfg = config(&dir.0);
    cfg.issuer_url = "127.0.0.1:8479".into();
    cfg.region = String::new();
    cfg.principals.push(principal());
    cfg.principals.push(Principal {
        access_key_id: "AK2".into(),
        role_arn: "RabbitMqAdminRole".into(),
        ..principal()
    });
    let Err(StsError::Config(msg)) = Issuer::open(cfg) else {
        panic!("accepted a bad config")
    };
    for needle in ["issuer_url", "region", "configured twice", "not an ARN"] {
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
}

#[test]
fn principals_load_from_toml() {
    let dir = TempDir::new();
    let path = dir.0.join("principals.toml");
    std::fs::write(
        &path,
        r#"
[[principal]]
access_key_id = "AKIA1"
secret_access_key = "s1"
role_arn = "arn:aws:iam::111122223333:role/A"
account = "111122223333"
principal_tags = { team = "a" }

[[principal]]
access_key_id = "AKIA2"
secret_access_key = "s2"
role_arn = "arn:aws:iam::111122223333:role/B"
account = "111122223333"
org_id = "o-abc1234567"
ou_path = ["o-abc1234567/r-ab12/"]
"#,
    )
    .unwrap();
    let ps = load_principals(&path).unwrap();
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0].principal_tags["team"], "a");
    assert_eq!(ps[1].ou_path, ["o-abc1234567/r-ab12/"]);
    assert!(
        !format!("{:?}", ps[0]).contains("s1"),
        "secrets are not in Debug output"
    );
    std::fs::write(
        &path,
        "[[principal]]\naccess_key_id = \"A\"\nsecret = \"typo\"\n",
    )
    .unwrap();
    assert!(matches!(load_principals(&path), Err(StsError::Config(_))));
}

// ---------------------------------------------------------------- HTTP answers

const BODY: &str = "Action=GetWebIdentityToken&Version=2011-06-15&Audience.member.1=rabbitmq&SigningAlgorithm=ES384&Tags.member.1.Key=scope&Tags.member.1.Value=team-a";

/// A POST / signed like botocore signs it.
fn signed_headers(body: &str, secret: &str, at: i64) -> Vec<(String, String)> {
    let mut headers = vec![
        (
            "content-type".to_owned(),
            "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
        ),
        ("host".to_owned(), "127.0.0.1:8479".to_owned()),
        ("x-amz-date".to_owned(), time::amz_date(at)),
    ];
    let req = SignedRequest {
        method: "POST",
        path: "/",
        query: "",
        headers: &headers,
        body: body.as_bytes(),
    };
    let names: Vec<String> = headers.iter().map(|(n, _)| n.clone()).collect();
    let auth = sigv4::authorization_header(
        AKID,
        secret,
        &req,
        &names,
        &time::amz_date(at),
        "us-east-1",
        "sts",
    );
    headers.push(("authorization".to_owned(), auth));
    headers
}

fn post(issuer: &Issuer, body: &str, headers: &[(String, String)]) -> Reply {
    let req = SignedRequest {
        method: "POST",
        path: "/",
        query: "",
        headers,
        body: body.as_bytes(),
    };
    respond(issuer, &req, NOW)
}

fn xml_text<'a>(xml: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .map(|i| i + open.len())
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"));
    let end = start + xml[start..].find(&format!("</{tag}>")).unwrap();
    &xml[start..end]
}

#[test]
fn http_mints_through_the_query_api() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let reply = post(&issuer, BODY, &signed_headers(BODY, SECRET, NOW));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.content_type, "text/xml");
    assert!(reply.body.starts_with(
        "<GetWebIdentityTokenResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"
    ));
    assert_eq!(xml_text(&reply.body, "Expiration"), "2026-01-01T00:05:00Z");
    assert_eq!(
        xml_text(&reply.body, "RequestId"),
        reply.request_id.as_deref().unwrap()
    );
    let token = xml_text(&reply.body, "WebIdentityToken");
    let claims = verify(token, &issuer.jwks()).unwrap();
    assert_eq!(claims["sub"], ROLE);
    assert_eq!(
        claims[STS_CLAIMS_KEY]["request_tags"],
        json!({"scope": "team-a"})
    );
}

#[test]
fn http_errors_have_the_sts_shape() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    // (body, headers (empty: signed with the right secret), status, code)
    type Case = (String, Vec<(String, String)>, u16, &'static str);
    let cases: Vec<Case> = vec![
        (
            BODY.into(),
            vec![("host".into(), "127.0.0.1:8479".into())],
            403,
            "MissingAuthenticationToken",
        ),
        (
            BODY.into(),
            signed_headers(BODY, "wrong-secret", NOW),
            403,
            "SignatureDoesNotMatch",
        ),
        (
            BODY.into(),
            signed_headers(BODY, SECRET, NOW - 3600),
            403,
            "SignatureDoesNotMatch",
        ),
        (
            "Action=GetWebIdentityToken&Version=2011-06-15&SigningAlgorithm=ES384".into(),
            vec![],
            400,
            "ValidationError",
        ),
        (
            BODY.replace("ES384", "HS256"),
            vec![],
            400,
            "ValidationError",
        ),
        (
            format!("{BODY}&DurationSeconds=3601"),
            vec![],
            400,
            "ValidationError",
        ),
        (
            "Action=AssumeRole&Version=2011-06-15".into(),
            vec![],
            400,
            "InvalidAction",
        ),
    ];
    for (body, headers, status, code) in cases {
        let headers = if headers.is_empty() {
            signed_headers(&body, SECRET, NOW)
        } else {
            headers
        };
        let reply = post(&issuer, &body, &headers);
        assert_eq!(
            (reply.status, xml_text(&reply.body, "Code")),
            (status, code),
            "{body}: {}",
            reply.body
        );
        assert!(
            reply
                .body
                .starts_with("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">")
        );
        assert_eq!(xml_text(&reply.body, "Type"), "Sender");
        assert!(!reply.body.contains("WebIdentityToken>"), "nothing issued");
    }
    // Another access key id.
    let mut headers = signed_headers(BODY, SECRET, NOW);
    let auth = headers.last_mut().unwrap();
    auth.1 = auth.1.replace(AKID, "AKIAUNKNOWN");
    let reply = post(&issuer, BODY, &headers);
    assert_eq!(
        (reply.status, xml_text(&reply.body, "Code")),
        (403, "InvalidClientTokenId")
    );
}

#[test]
fn http_discovery_routes() {
    let dir = TempDir::new();
    let issuer = Issuer::open(config(&dir.0)).unwrap();
    let get = |method: &str, path: &str| {
        respond(
            &issuer,
            &SignedRequest {
                method,
                path,
                query: "",
                headers: &[],
                body: b"",
            },
            NOW,
        )
    };
    let d = get("GET", "/.well-known/openid-configuration");
    assert_eq!((d.status, d.content_type), (200, "application/json"));
    assert_eq!(
        serde_json::from_str::<Value>(&d.body).unwrap(),
        issuer.discovery()
    );
    let j = get("GET", "/.well-known/jwks.json");
    assert_eq!(
        serde_json::from_str::<Value>(&j.body).unwrap(),
        issuer.jwks()
    );
    assert_eq!(get("POST", "/.well-known/jwks.json").status, 405);
    assert_eq!(get("GET", "/elsewhere").status, 404);
    assert_eq!(
        get("GET", "/").status,
        403,
        "STS over GET still needs a signature"
    );
}
