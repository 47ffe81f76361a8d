//! The token attack corpus: hostile and broken tokens, each refused for the right reason
//! (`Authenticator::authenticate(..).reason()`), answered through the gateway with
//! RabbitMQ's login refusal (or the vhost refusal, where RabbitMQ accepts the token and
//! refuses the vhost), and never given a backend connection.
//!
//! The `*_reasons` tests need no broker; the `gateway_*` tests connect with lapin through
//! a test gateway to the RabbitMQ node on 127.0.0.1:5672.

use crate::common::*;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

const LOGIN_REFUSED: &str = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn encoding_key(alg: Algorithm, key_file: &str) -> EncodingKey {
    let pem = std::fs::read(fixtures().join(key_file)).unwrap();
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

/// A compact JWS over the header and payload exactly as written (so they may hold
/// duplicate keys or anything else), signed with `key_file`.
fn sign_raw(header: &str, payload: &str, alg: Algorithm, key_file: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig =
        jsonwebtoken::crypto::sign(input.as_bytes(), &encoding_key(alg, key_file), alg).unwrap();
    format!("{input}.{sig}")
}

/// `claims` signed by the trusted RSA key with the given header (which must name `alg`
/// RS256 for the signature to be valid).
fn sign_header(header: &Value, claims: &Value) -> String {
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        Algorithm::RS256,
        "rsa-private.pem",
    )
}

/// The attacker's public key as a JWK, to embed in a `jwk` header.
fn attacker_jwk() -> Value {
    let jwk = Jwk::from_encoding_key(
        &encoding_key(Algorithm::RS256, "other-rsa-private.pem"),
        Algorithm::RS256,
    )
    .unwrap();
    serde_json::to_value(jwk).unwrap()
}

/// HMAC-signed with the trusted RSA public key's PEM as the secret (key confusion).
fn hmac_with_public_key(alg: Algorithm, claims: &Value) -> String {
    let secret = std::fs::read(fixtures().join("rsa-public.pem")).unwrap();
    let header = json!({"alg": format!("{alg:?}"), "typ": "JWT", "kid": "test-rsa"});
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &EncodingKey::from_secret(&secret), alg)
        .unwrap();
    format!("{input}.{sig}")
}

fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut c = base.clone();
    c[key] = value;
    c
}

/// Every token the gateway must refuse at login, with the audit reason. All are for the
/// admin role, so each would be granted everything if it got through.
fn login_attacks() -> Vec<(&'static str, String, &'static str)> {
    let now = now();
    let base = claims(ADMIN_ROLE);
    let rs = json!({"alg": "RS256", "typ": "JWT", "kid": "test-rsa"});
    let valid = sign(&base);
    let (head, rest) = valid.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    // A space-separated string keeps the token under the pre-auth frame bound.
    let many_scopes = (0..2049)
        .map(|i| format!("rabbitmq/{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let short_signature = {
        let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .unwrap();
        sig.pop();
        b64(&sig)
    };
    let deep = format!(
        r#"{{"iss":"{ISSUER}","aud":"rabbitmq","sub":"{ADMIN_ROLE}","exp":{},"x":{}1{}}}"#,
        now + 300,
        "[".repeat(200),
        "]".repeat(200)
    );
    let base_text = base.to_string();
    let body = &base_text[1..base_text.len() - 1];
    vec![
        (
            "alg none",
            raw_token(&json!({"alg": "none", "typ": "JWT"}), &base, b""),
            "malformed",
        ),
        (
            "alg none, with a signature",
            raw_token(&json!({"alg": "none", "kid": "test-rsa"}), &base, b"sig"),
            "malformed",
        ),
        (
            "alg None",
            raw_token(&json!({"alg": "None", "kid": "test-rsa"}), &base, b""),
            "malformed",
        ),
        (
            "HS256 with the RSA public key",
            hmac_with_public_key(Algorithm::HS256, &base),
            "algorithm",
        ),
        (
            "HS384 with the RSA public key",
            hmac_with_public_key(Algorithm::HS384, &base),
            "algorithm",
        ),
        (
            "PS256, not configured",
            sign_with(&base, Algorithm::PS256, "test-rsa", "rsa-private.pem"),
            "algorithm",
        ),
        (
            "RS256 for the ES384-only key",
            sign_with(&base, Algorithm::RS256, "test-ec384", "rsa-private.pem"),
            "key_mismatch",
        ),
        (
            "ES384 for the RSA key",
            sign_with(&base, Algorithm::ES384, "test-rsa", "ec384-private.pem"),
            "key_mismatch",
        ),
        (
            "kid of the trusted key, signed by another",
            sign_with(&base, Algorithm::RS256, "test-rsa", "other-rsa-private.pem"),
            "bad_signature",
        ),
        (
            "no kid",
            sign_header(&json!({"alg": "RS256"}), &base),
            "no_kid",
        ),
        (
            "empty kid",
            sign_header(&json!({"alg": "RS256", "kid": ""}), &base),
            "unknown_kid",
        ),
        (
            "kid path",
            sign_header(
                &json!({"alg": "RS256", "kid": "../../../../etc/passwd"}),
                &base,
            ),
            "unknown_kid",
        ),
        (
            "kid path to a key",
            sign_header(
                &json!({"alg": "RS256", "kid": "../fixtures/rsa-public.pem"}),
                &base,
            ),
            "unknown_kid",
        ),
        (
            "kid SQL",
            sign_header(&json!({"alg": "RS256", "kid": "' OR '1'='1' --"}), &base),
            "unknown_kid",
        ),
        (
            "kid NUL",
            sign_header(&json!({"alg": "RS256", "kid": "test-rsa\u{0}"}), &base),
            "unknown_kid",
        ),
        (
            "kid case",
            sign_header(&json!({"alg": "RS256", "kid": "TEST-RSA"}), &base),
            "unknown_kid",
        ),
        (
            "kid not a string",
            sign_header(&json!({"alg": "RS256", "kid": 1}), &base),
            "malformed",
        ),
        (
            "jwk header with the attacker's key, attacker kid",
            sign_with_header_fields("attacker", &base),
            "unknown_kid",
        ),
        (
            "jwk header with the attacker's key, trusted kid",
            sign_with_header_fields("test-rsa", &base),
            "bad_signature",
        ),
        (
            "crit exp",
            sign_header(
                &json!({"alg": "RS256", "kid": "test-rsa", "crit": ["exp"], "exp": 1}),
                &base,
            ),
            "crit",
        ),
        (
            "crit b64",
            sign_header(
                &json!({"alg": "RS256", "kid": "test-rsa", "crit": ["b64"], "b64": false}),
                &base,
            ),
            "crit",
        ),
        (
            "crit empty",
            sign_header(
                &json!({"alg": "RS256", "kid": "test-rsa", "crit": []}),
                &base,
            ),
            "crit",
        ),
        (
            "expired",
            sign(&with(&base, "exp", json!(now - 10))),
            "expired",
        ),
        (
            "expires now",
            sign(&with(&base, "exp", json!(now))),
            "expired",
        ),
        (
            "no exp",
            sign(&{
                let mut c = base.clone();
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
            "missing_exp",
        ),
        (
            "nbf in the future",
            sign(&with(&base, "nbf", json!(now + 3600))),
            "not_yet_valid",
        ),
        (
            "iat in the future",
            sign(&with(&base, "iat", json!(now + 3600))),
            "issued_in_future",
        ),
        (
            "wrong aud",
            sign(&with(&base, "aud", json!("not-rabbitmq"))),
            "audience",
        ),
        (
            "aud prefix",
            sign(&with(&base, "aud", json!("rabbitmq2"))),
            "audience",
        ),
        (
            "aud list without us",
            sign(&with(&base, "aud", json!(["a", "b"]))),
            "audience",
        ),
        (
            "wrong iss",
            sign(&with(&base, "iss", json!("https://evil.test"))),
            "issuer",
        ),
        (
            "iss with a trailing slash",
            sign(&with(&base, "iss", json!(format!("{ISSUER}/")))),
            "issuer",
        ),
        (
            "tampered payload",
            format!(
                "{head}.{}.{signature}",
                b64(with(&base, "scope", json!("rabbitmq/tag:impersonator"))
                    .to_string()
                    .as_bytes())
            ),
            "bad_signature",
        ),
        (
            "tampered header",
            format!(
                "{}.{payload}.{signature}",
                b64(json!({"alg": "RS256", "kid": "test-rsa", "typ": "at+jwt"})
                    .to_string()
                    .as_bytes())
            ),
            "bad_signature",
        ),
        (
            "truncated signature",
            format!("{head}.{payload}.{short_signature}"),
            "bad_signature",
        ),
        (
            "empty signature",
            format!("{head}.{payload}."),
            "bad_signature",
        ),
        (
            "signature of a lone byte",
            format!("{head}.{payload}.{}", &signature[..1]),
            "malformed",
        ),
        ("extra segment", format!("{valid}.e30"), "malformed"),
        (
            "JWE shape",
            format!("{head}.e30.e30.e30.{signature}"),
            "malformed",
        ),
        ("two segments", format!("{head}.{payload}"), "malformed"),
        ("empty", String::new(), "malformed"),
        ("dots", "..".to_owned(), "malformed"),
        (
            "padded base64",
            format!("{head}=.{payload}.{signature}"),
            "malformed",
        ),
        (
            "standard base64 alphabet",
            format!("{head}.{payload}.{}", signature.replace(['-', '_'], "+")),
            "malformed",
        ),
        ("not base64", format!("{head}.{payload}.*sig*"), "malformed"),
        (
            "header not JSON",
            format!("{}.{payload}.{signature}", b64(b"RS256")),
            "malformed",
        ),
        (
            "payload not JSON",
            sign_raw(
                &rs.to_string(),
                "admin",
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "payload a JSON array",
            sign_raw(&rs.to_string(), "[1]", Algorithm::RS256, "rsa-private.pem"),
            "malformed",
        ),
        (
            "payload with trailing JSON",
            sign_raw(
                &rs.to_string(),
                &format!("{base_text}{{}}"),
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "deeply nested payload",
            sign_raw(&rs.to_string(), &deep, Algorithm::RS256, "rsa-private.pem"),
            "malformed",
        ),
        (
            "duplicate sub",
            sign_raw(
                &rs.to_string(),
                &format!(r#"{{"sub":"{READONLY_ROLE}",{body}}}"#),
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "duplicate exp, escaped",
            sign_raw(
                &rs.to_string(),
                &format!(r#"{{{body},"\u0065xp":{}}}"#, now + 99_999),
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "duplicate nested claim",
            sign_raw(
                &rs.to_string(),
                &format!(r#"{{{body},"x":{{"scope":"a","scope":"b"}}}}"#),
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "duplicate kid",
            sign_raw(
                r#"{"alg":"RS256","kid":"nope","kid":"test-rsa"}"#,
                &base_text,
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "duplicate alg",
            sign_raw(
                r#"{"alg":"HS256","kid":"test-rsa","alg":"RS256"}"#,
                &base_text,
                Algorithm::RS256,
                "rsa-private.pem",
            ),
            "malformed",
        ),
        (
            "2,049 scopes",
            sign(&with(&base, "scope", json!(many_scopes))),
            "too_many_scopes",
        ),
        (
            "exp a string",
            sign(&with(&base, "exp", json!((now + 300).to_string()))),
            "invalid_claim",
        ),
        (
            "exp null",
            sign(&with(&base, "exp", Value::Null)),
            "invalid_claim",
        ),
        // jsonwebtoken's own claim pre-parse refuses an `exp`/`nbf` that is neither a
        // number nor a string before our rules run: refused, labelled malformed.
        (
            "nbf an object",
            sign(&with(&base, "nbf", json!({"t": now}))),
            "malformed",
        ),
        (
            "aud a number",
            sign(&with(&base, "aud", json!(1))),
            "audience",
        ),
        (
            "aud an object",
            sign(&with(&base, "aud", json!({"rabbitmq": true}))),
            "audience",
        ),
        (
            "iss a list",
            sign(&with(&base, "iss", json!([ISSUER]))),
            "issuer",
        ),
    ]
}

/// Signed by the attacker's key, with `jwk`, `jku` and `x5u` all pointing at it.
fn sign_with_header_fields(kid: &str, claims: &Value) -> String {
    let header = json!({
        "alg": "RS256", "kid": kid, "jwk": attacker_jwk(),
        "jku": "https://attacker.example/jwks.json", "x5u": "https://attacker.example/cert.pem",
    });
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        Algorithm::RS256,
        "other-rsa-private.pem",
    )
}

/// Tokens that pass verification but grant nothing for the requested vhost: RabbitMQ
/// accepts them at login and refuses the vhost (530), and so does the gateway.
fn vhost_refusals() -> Vec<(&'static str, String, &'static str, String)> {
    let sub_number = {
        let mut c = claims(ADMIN_ROLE);
        c["sub"] = json!(111122223333u64);
        c
    };
    let scope_object = {
        let mut c = claims("arn:aws:iam::111122223333:role/ScopeObject");
        c["scope"] = json!({"rabbitmq": "read:*/*"});
        c
    };
    let scoped = |sub: &str, scope: &str| {
        let mut c = claims(sub);
        c["scope"] = json!(scope);
        sign(&c)
    };
    let denied = |vhost: &str, user: &str| {
        format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'")
    };
    let homoglyph = "arn:aws:iam::111122223333:role/Homoglyph";
    let nfc = "arn:aws:iam::111122223333:role/Nfc";
    vec![
        // No alias applies to a number and the username falls back to "unknown" (4.1+).
        (
            "sub a number",
            sign(&sub_number),
            "/",
            denied("/", "unknown"),
        ),
        (
            "scope an object",
            sign(&scope_object),
            "/",
            denied("/", "arn:aws:iam::111122223333:role/ScopeObject"),
        ),
        // Cyrillic 'р' (U+0440) where the scope says Latin 'p'.
        (
            "homoglyph vhost",
            scoped(homoglyph, "rabbitmq/read:prod/*"),
            "\u{440}rod",
            denied("\u{440}rod", homoglyph),
        ),
        // NFC scope, NFD vhost: bytewise different, as on the broker.
        (
            "NFD vhost for an NFC scope",
            scoped(nfc, "rabbitmq/read:caf\u{e9}/*"),
            "cafe\u{301}",
            denied("cafe\u{301}", nfc),
        ),
        (
            "NFC vhost for an NFD scope",
            scoped(nfc, "rabbitmq/read:cafe\u{301}/*"),
            "caf\u{e9}",
            denied("caf\u{e9}", nfc),
        ),
        (
            "percent-encoded homoglyph",
            scoped(homoglyph, "rabbitmq/read:%D1%80rod/*"),
            "prod",
            denied("prod", homoglyph),
        ),
    ]
}

#[tokio::test]
async fn attack_reasons() {
    let auth = authenticator("");
    for (name, token, reason) in login_attacks() {
        let got = auth.authenticate(&token, now(), None).await;
        assert_eq!(
            got.map(|_| ()).map_err(|e| e.reason()),
            Err(reason),
            "{name}"
        );
    }
}

#[tokio::test]
async fn accepted_neighbours_of_the_attacks() {
    let auth = authenticator("");
    let base = claims(ADMIN_ROLE);
    // jku / x5u / jwk are ignored: a token signed by a trusted key is accepted with them.
    let header = json!({
        "alg": "RS256", "kid": "test-rsa", "jwk": attacker_jwk(),
        "jku": "https://attacker.example/jwks.json", "x5u": "https://attacker.example/cert.pem",
    });
    let id = auth
        .authenticate(&sign_header(&header, &base), now(), None)
        .await
        .expect("jku/x5u/jwk headers are ignored");
    assert_eq!(id.username, ADMIN_ROLE);
    // 2,048 scopes is the limit, not past it.
    let scopes: Vec<String> = (0..2048)
        .map(|i| format!("rabbitmq/read:%2F/q{i}"))
        .collect();
    let mut c = with(&base, "scope", json!(scopes));
    c["sub"] = json!("arn:aws:iam::111122223333:role/Many");
    assert_eq!(
        auth.authenticate(&sign(&c), now(), None)
            .await
            .unwrap()
            .scopes
            .len(),
        2048
    );
    // nbf / iat within the leeway, and the ES384 key for an ES384 token.
    let near = with(
        &with(&base, "nbf", json!(now() + 30)),
        "iat",
        json!(now() + 30),
    );
    auth.authenticate(&sign(&near), now(), None)
        .await
        .expect("within leeway");
    auth.authenticate(
        &sign_with(&base, Algorithm::ES384, "test-ec384", "ec384-private.pem"),
        now(),
        None,
    )
    .await
    .expect("ES384");
    // Tokens for the vhost refusals pass verification; the refusal is the vhost's.
    for (name, token, vhost, _) in vhost_refusals() {
        let id = auth.authenticate(&token, now(), None).await.expect(name);
        assert!(!id.permissions.vhost_access(vhost), "{name}");
    }
}

/// The broker's connection list (client properties carry each backend connection's
/// token id), or `None` where `rabbitmqctl` cannot be run.
fn broker_connections() -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "client_properties", "--quiet"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn assert_no_backend_connection(tokens: &[String]) {
    let Some(listing) = broker_connections() else {
        eprintln!("rabbitmqctl unavailable: backend connections not checked");
        return;
    };
    for t in tokens {
        let id = amqp_iam_gateway::auth::token_id(t);
        assert!(
            !listing.contains(&id),
            "backend connection for refused token {id}"
        );
    }
}

#[tokio::test]
async fn gateway_refuses_every_attack_at_login() {
    let gw = start_gateway("").await;
    let attacks = login_attacks();
    for (name, token, _) in &attacks {
        let err = gw.connect(token, "/").await.expect_err(name);
        assert_eq!(
            close_reason(&err),
            Some((403, LOGIN_REFUSED.to_owned())),
            "{name}: {err:?}"
        );
    }
    // Still serving, and a valid token for the same role works.
    let conn = gw
        .connect(&sign(&claims(ADMIN_ROLE)), "/")
        .await
        .expect("valid token");
    let tokens: Vec<String> = attacks.into_iter().map(|(_, t, _)| t).collect();
    assert_no_backend_connection(&tokens);
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn gateway_refuses_the_vhost_bytewise() {
    let gw = start_gateway("").await;
    let cases = vhost_refusals();
    for (name, token, vhost, text) in &cases {
        let err = gw.connect(token, vhost).await.expect_err(name);
        assert_eq!(
            close_reason(&err),
            Some((530, text.clone())),
            "{name}: {err:?}"
        );
    }
    let tokens: Vec<String> = cases.into_iter().map(|(_, t, _, _)| t).collect();
    assert_no_backend_connection(&tokens);
}

#[tokio::test]
async fn huge_token_is_refused_by_the_frame_bound() {
    // Past the default pre-auth bound of 64 KiB: the start-ok frame is refused from its
    // header, before the token is read, let alone verified.
    let gw = start_gateway("").await;
    let mut c = claims(ADMIN_ROLE);
    c["pad"] = json!("x".repeat(70_000));
    let token = sign(&c);
    let err = gw.connect(&token, "/").await.expect_err("huge token");
    assert_ne!(
        close_reason(&err).map(|r| r.0),
        Some(200),
        "not a normal close: {err:?}"
    );
    assert_no_backend_connection(&[token]);
    // The gateway is still serving.
    gw.connect(&sign(&claims(ADMIN_ROLE)), "/")
        .await
        .expect("valid token after the huge one");
}
