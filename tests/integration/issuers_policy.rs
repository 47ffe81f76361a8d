//! The edge token policy (`[oauth2.policy]`) and several issuers (`[[oauth2.issuers]]`):
//! each policy rule refused and allowed, with its own reason; tokens dispatched by `iss`
//! to their own issuer's keys and aliases. The `*_reasons` and `explain_*` tests need no
//! broker; the `gateway_*` tests connect with lapin through a test gateway to the RabbitMQ
//! node on 127.0.0.1:5672.

use crate::common::*;
use amqp_iam_gateway::auth::Authenticators;
use jsonwebtoken::Algorithm;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};

const LOGIN_REFUSED: &str = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.";
const ACCOUNT_PATH: &str = r"https://sts\.amazonaws\.com/.aws_account";

/// `[oauth2]` lines: a policy on the account, the role's account, the region, lifetime,
/// required `jti`, and a denied `jti`.
fn policy() -> String {
    format!(
        r#"policy = {{ max_lifetime_seconds = 600, required_claims = ["jti"], jti_deny = ["revoked-1"], rules = [ {{ claim = '{ACCOUNT_PATH}', equals = "111122223333" }}, {{ claim = "sub", prefix = "arn:aws:iam::111122223333:" }}, {{ claim = 'https://sts\.amazonaws\.com/.source_region', one_of = ["us-east-1", "eu-west-1"] }} ] }}"#
    )
}

fn with(mut claims: Value, path: &[&str], value: Option<Value>) -> Value {
    let mut at = &mut claims;
    for p in &path[..path.len() - 1] {
        at = at.get_mut(*p).unwrap();
    }
    let obj = at.as_object_mut().unwrap();
    match value {
        Some(v) => obj.insert(path[path.len() - 1].to_owned(), v),
        None => obj.remove(path[path.len() - 1]),
    };
    claims
}

fn policy_cases() -> Vec<(&'static str, Value, Result<(), &'static str>)> {
    let base = || claims(ADMIN_ROLE);
    let iat = base()["iat"].as_i64().unwrap();
    const NS: &str = "https://sts.amazonaws.com/";
    vec![
        ("allowed", base(), Ok(())),
        (
            "lifetime at the limit",
            with(base(), &["exp"], Some(json!(iat + 600))),
            Ok(()),
        ),
        (
            "lifetime too long",
            with(base(), &["exp"], Some(json!(iat + 601))),
            Err("policy_lifetime"),
        ),
        (
            "no iat",
            with(base(), &["iat"], None),
            Err("policy_lifetime"),
        ),
        (
            "no jti",
            with(base(), &["jti"], None),
            Err("policy_required_claim"),
        ),
        (
            "denied jti",
            with(base(), &["jti"], Some(json!("revoked-1"))),
            Err("policy_jti"),
        ),
        (
            "other account",
            with(base(), &[NS, "aws_account"], Some(json!("444455556666"))),
            Err("policy_claim"),
        ),
        (
            "no account",
            with(base(), &[NS, "aws_account"], None),
            Err("policy_claim"),
        ),
        (
            "role of another account",
            with(
                base(),
                &["sub"],
                Some(json!("arn:aws:iam::444455556666:role/RabbitMqAdminRole")),
            ),
            Err("policy_claim"),
        ),
        (
            "other allowed region",
            with(base(), &[NS, "source_region"], Some(json!("eu-west-1"))),
            Ok(()),
        ),
        (
            "region not allowed",
            with(base(), &[NS, "source_region"], Some(json!("ap-south-1"))),
            Err("policy_claim"),
        ),
        (
            "claim checks come first",
            with(
                with(base(), &["exp"], Some(json!(iat - 1))),
                &[NS, "aws_account"],
                Some(json!("444455556666")),
            ),
            Err("expired"),
        ),
    ]
}

#[tokio::test]
async fn policy_reasons() {
    let auth = authenticator(&policy());
    for (name, claims, expected) in policy_cases() {
        let token = sign(&claims);
        // Twice: the second time from the verified-token cache, where the policy applies too.
        for _ in 0..2 {
            let got = auth.authenticate(&token, now(), None).await;
            assert_eq!(got.map(|_| ()).map_err(|e| e.reason()), expected, "{name}");
        }
    }
    // Without a policy, every one of them passes but the expired one.
    let open = authenticator("");
    for (name, claims, expected) in policy_cases() {
        let got = open.authenticate(&sign(&claims), now(), None).await;
        assert_eq!(
            got.is_ok(),
            expected != Err("expired"),
            "{name} without a policy"
        );
    }
}

#[tokio::test]
async fn explain_shows_the_deciding_rule() {
    let (cfg, _dir) = config(&policy());
    let wrong = sign(&with(
        claims(ADMIN_ROLE),
        &["https://sts.amazonaws.com/", "aws_account"],
        Some(json!("444455556666")),
    ));
    let e = amqp_iam_gateway::cli::explain(&cfg, &wrong, true)
        .await
        .unwrap();
    assert!(!e.accepted);
    let report: Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(report["reason"], "policy_claim");
    assert_eq!(
        report["decided_by"],
        format!("policy rules[0] ({ACCOUNT_PATH} equals \"111122223333\")")
    );
    let text = amqp_iam_gateway::cli::explain(&cfg, &wrong, false)
        .await
        .unwrap()
        .text;
    assert!(text.contains("decided by: policy rules[0]"), "{text}");

    let revoked = sign(&with(
        claims(ADMIN_ROLE),
        &["jti"],
        Some(json!("revoked-1")),
    ));
    let e = amqp_iam_gateway::cli::explain(&cfg, &revoked, true)
        .await
        .unwrap();
    let report: Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(
        (report["reason"].as_str(), report["decided_by"].as_str()),
        (Some("policy_jti"), Some("policy jti_deny"))
    );

    let e = amqp_iam_gateway::cli::explain(&cfg, &sign(&claims(ADMIN_ROLE)), false)
        .await
        .unwrap();
    assert!(e.accepted, "{}", e.text);
    assert!(e.text.contains("policy passed:"), "{}", e.text);
    assert!(e.text.contains("rules[2]:"), "{}", e.text);
}

#[tokio::test]
async fn gateway_policy_refuses_the_wrong_account() {
    let gw = start_gateway(&format!(
        r#"policy = {{ rules = [ {{ claim = '{ACCOUNT_PATH}', equals = "111122223333" }} ] }}"#
    ))
    .await;
    let wrong = sign(&with(
        claims(ADMIN_ROLE),
        &["https://sts.amazonaws.com/", "aws_account"],
        Some(json!("444455556666")),
    ));
    let err = gw.connect(&wrong, "/").await.expect_err("wrong account");
    assert_eq!(
        close_reason(&err),
        Some((403, LOGIN_REFUSED.to_owned())),
        "{err:?}"
    );
    let conn = gw
        .connect(&sign(&claims(ADMIN_ROLE)), "/")
        .await
        .expect("right account");
    conn.close(200, "bye".into()).await.unwrap();
}

// --- several issuers ------------------------------------------------------------------------

const ISS_A: &str = "https://issuer-a.test";
const ISS_B: &str = "https://issuer-b.test";
/// The same role name in both accounts' tokens; each issuer's aliases give it other rights.
const ROLE: &str = "shared-role";

/// Issuer A trusts `rsa-public.pem` (kid `key-a`), issuer B `other-rsa-public.pem`
/// (kid `key-b`) and the EC key; each maps [`ROLE`] to its own queues; B has a policy.
fn issuers() -> String {
    let f = fixtures();
    format!(
        r#"
[[oauth2.issuers]]
name = "a"
issuer = "{ISS_A}"
algorithms = ["RS256"]
[oauth2.issuers.signing_keys]
key-a = "{a}"
[oauth2.issuers.scope_aliases]
{ROLE} = "rabbitmq/configure:%2F/iss-a.* rabbitmq/write:%2F/iss-a.* rabbitmq/read:%2F/iss-a.*"

[[oauth2.issuers]]
name = "b"
issuer = "{ISS_B}"
[oauth2.issuers.signing_keys]
key-b = "{b}"
test-ec384 = "{ec}"
[oauth2.issuers.scope_aliases]
{ROLE} = "rabbitmq/configure:%2F/iss-b.* rabbitmq/write:%2F/iss-b.* rabbitmq/read:%2F/iss-b.*"
[oauth2.issuers.policy]
rules = [ {{ claim = '{ACCOUNT_PATH}', equals = "444455556666" }} ]
"#,
        a = f.join("rsa-public.pem").display(),
        b = f.join("other-rsa-public.pem").display(),
        ec = f.join("ec384-public.pem").display(),
    )
}

fn issuer_claims(iss: &str, account: &str) -> Value {
    let c = with(claims(ROLE), &["iss"], Some(json!(iss)));
    with(
        c,
        &["https://sts.amazonaws.com/", "aws_account"],
        Some(json!(account)),
    )
}

fn token_a() -> String {
    sign_with(
        &issuer_claims(ISS_A, "111122223333"),
        Algorithm::RS256,
        "key-a",
        "rsa-private.pem",
    )
}

fn token_b() -> String {
    sign_with(
        &issuer_claims(ISS_B, "444455556666"),
        Algorithm::RS256,
        "key-b",
        "other-rsa-private.pem",
    )
}

fn verifications(auth: &Authenticators) -> u64 {
    auth.stats
        .signature_verifications
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn issuer_reasons() {
    let (cfg, _dir) = config_with_keys("", &issuers());
    let auth = amqp_iam_gateway::wiring::authenticators(&cfg.oauth2).unwrap();
    assert_eq!(auth.all().len(), 2);

    let a = auth.authenticate(&token_a(), now(), None).await.expect("A");
    assert_eq!(a.iss.as_deref(), Some(ISS_A));
    assert!(
        a.scopes.iter().all(|s| s.contains("iss-a.*")),
        "{:?}",
        a.scopes
    );
    assert_eq!(a.scopes.len(), 3);
    let b = auth.authenticate(&token_b(), now(), None).await.expect("B");
    assert!(
        b.scopes.iter().all(|s| s.contains("iss-b.*")),
        "{:?}",
        b.scopes
    );
    assert_eq!(b.scopes.len(), 3);
    let b_ec = sign_with(
        &issuer_claims(ISS_B, "444455556666"),
        Algorithm::ES384,
        "test-ec384",
        "ec384-private.pem",
    );
    auth.authenticate(&b_ec, now(), None)
        .await
        .expect("B, EC key");

    let a_claims = issuer_claims(ISS_A, "111122223333");
    let b_claims = issuer_claims(ISS_B, "444455556666");
    let cases: Vec<(&str, String, &str)> = vec![
        // A's iss signed with B's key: B's kid is unknown to A, and A's kid does not verify.
        (
            "A's iss, B's key and kid",
            sign_with(
                &a_claims,
                Algorithm::RS256,
                "key-b",
                "other-rsa-private.pem",
            ),
            "unknown_kid",
        ),
        (
            "A's iss, B's key under A's kid",
            sign_with(
                &a_claims,
                Algorithm::RS256,
                "key-a",
                "other-rsa-private.pem",
            ),
            "bad_signature",
        ),
        (
            "A's iss, B's EC key",
            sign_with(
                &a_claims,
                Algorithm::ES384,
                "test-ec384",
                "ec384-private.pem",
            ),
            "algorithm",
        ),
        (
            "B's iss, A's key and kid",
            sign_with(&b_claims, Algorithm::RS256, "key-a", "rsa-private.pem"),
            "unknown_kid",
        ),
        (
            "B's per-issuer policy",
            sign_with(
                &issuer_claims(ISS_B, "111122223333"),
                Algorithm::RS256,
                "key-b",
                "other-rsa-private.pem",
            ),
            "policy_claim",
        ),
    ];
    for (name, token, reason) in cases {
        let got = auth.authenticate(&token, now(), None).await;
        assert_eq!(
            got.map(|_| ()).map_err(|e| e.reason()),
            Err(reason),
            "{name}"
        );
    }

    // An `iss` that names no issuer is refused before any key is tried.
    let before = verifications(&auth);
    let unknown = [
        sign_with(
            &issuer_claims("https://evil.test", "111122223333"),
            Algorithm::RS256,
            "key-a",
            "rsa-private.pem",
        ),
        sign_with(
            &with(a_claims.clone(), &["iss"], None),
            Algorithm::RS256,
            "key-a",
            "rsa-private.pem",
        ),
        sign_with(
            &with(a_claims.clone(), &["iss"], Some(json!(format!("{ISS_A}/")))),
            Algorithm::RS256,
            "key-a",
            "rsa-private.pem",
        ),
    ];
    for token in &unknown {
        let got = auth.authenticate(token, now(), None).await;
        assert_eq!(got.map(|_| ()).map_err(|e| e.reason()), Err("issuer"));
    }
    let not_a_string = sign_with(
        &with(a_claims, &["iss"], Some(json!(["https://issuer-a.test"]))),
        Algorithm::RS256,
        "key-a",
        "rsa-private.pem",
    );
    let got = auth.authenticate(&not_a_string, now(), None).await;
    assert_eq!(got.map(|_| ()).map_err(|e| e.reason()), Err("malformed"));
    assert_eq!(
        verifications(&auth),
        before,
        "no key tried for an unknown iss"
    );

    // explain names the entry, or says the selection refused the token.
    let e = amqp_iam_gateway::cli::explain(&cfg, &token_b(), true)
        .await
        .unwrap();
    let report: Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(report["issuer_entry"], "b", "{}", e.text);
    let e = amqp_iam_gateway::cli::explain(&cfg, &unknown[0], true)
        .await
        .unwrap();
    let report: Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(report["reason"], "issuer");
    assert!(
        report["decided_by"]
            .as_str()
            .unwrap()
            .starts_with("issuer selection"),
        "{}",
        e.text
    );
}

async fn declare(conn: &lapin::Connection, name: &str) -> Result<(), (u16, String)> {
    let ch = conn.create_channel().await.unwrap();
    let res = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match res {
        Ok(_) => {
            ch.close(200, "ok".into()).await.unwrap();
            Ok(())
        }
        Err(e) => Err(close_reason(&e).unwrap_or((0, format!("{e:?}")))),
    }
}

#[tokio::test]
async fn gateway_each_issuer_grants_its_own_permissions() {
    let gw = start_gateway_with_keys("", &issuers()).await;
    let a = gw.connect(&token_a(), "/").await.expect("A");
    let b = gw.connect(&token_b(), "/").await.expect("B");
    declare(&a, &unique("iss-a.q"))
        .await
        .expect("A in A's queues");
    declare(&b, &unique("iss-b.q"))
        .await
        .expect("B in B's queues");
    for (who, conn, queue) in [("A", &a, "iss-b.q"), ("B", &b, "iss-a.q")] {
        let err = declare(conn, &unique(queue)).await.expect_err(who);
        assert_eq!(err.0, 403, "{who}: {err:?}");
    }
    a.close(200, "bye".into()).await.unwrap();
    b.close(200, "bye".into()).await.unwrap();

    // A's iss signed with B's key, and an unknown issuer: refused at login.
    let forged = [
        sign_with(
            &issuer_claims(ISS_A, "111122223333"),
            Algorithm::RS256,
            "key-a",
            "other-rsa-private.pem",
        ),
        sign_with(
            &issuer_claims(ISS_A, "111122223333"),
            Algorithm::RS256,
            "key-b",
            "other-rsa-private.pem",
        ),
        sign_with(
            &issuer_claims("https://evil.test", "111122223333"),
            Algorithm::RS256,
            "key-a",
            "rsa-private.pem",
        ),
    ];
    for token in &forged {
        let err = gw.connect(token, "/").await.expect_err("forged");
        assert_eq!(
            close_reason(&err),
            Some((403, LOGIN_REFUSED.to_owned())),
            "{err:?}"
        );
    }
    // Each issuer's keys and decisions are counted apart; the unknown issuer as `none`.
    let text = metrics(&gw).await;
    assert_eq!(sample(&text, r#"jwks_keys{issuer="a"}"#), 1.0);
    assert_eq!(sample(&text, r#"jwks_keys{issuer="b"}"#), 2.0);
    let auth = |labels: &str| sample(&text, &format!("authentications_total{{{labels}}}"));
    assert_eq!(auth(r#"issuer="a",outcome="accepted",reason="ok""#), 1.0);
    assert_eq!(auth(r#"issuer="b",outcome="accepted",reason="ok""#), 1.0);
    assert_eq!(
        auth(r#"issuer="a",outcome="refused",reason="bad_signature""#),
        1.0
    );
    assert_eq!(
        auth(r#"issuer="a",outcome="refused",reason="unknown_kid""#),
        1.0
    );
    assert_eq!(
        auth(r#"issuer="none",outcome="refused",reason="issuer""#),
        1.0
    );
}

#[tokio::test]
async fn gateway_policy_is_reloaded() {
    let (cfg, _dir) = config("");
    let gw = amqp_iam_gateway::proxy::Gateway::new(cfg)
        .await
        .expect("gateway");
    let live = gw.live();
    let addrs = gw.start().await.expect("bind");
    let connect = |token: String| async move {
        lapin::DefaultConnectionBuilder::new()?
            .with_uri_str(format!(
                "amqp://:{token}@127.0.0.1:{}/%2f",
                addrs.plain.unwrap().port()
            ))
            .connect()
            .await
    };
    let wrong = || {
        sign(&with(
            claims(ADMIN_ROLE),
            &["https://sts.amazonaws.com/", "aws_account"],
            Some(json!("444455556666")),
        ))
    };
    let conn = connect(wrong()).await.expect("no policy yet");
    conn.close(200, "bye".into()).await.unwrap();

    let (with_policy, _dir2) = config(&format!(
        r#"policy = {{ rules = [ {{ claim = '{ACCOUNT_PATH}', one_of = ["111122223333"] }} ] }}"#
    ));
    live.reload(with_policy).await.expect("reload");
    let err = connect(wrong()).await.expect_err("policy after reload");
    assert_eq!(
        close_reason(&err),
        Some((403, LOGIN_REFUSED.to_owned())),
        "{err:?}"
    );
    let conn = connect(sign(&claims(ADMIN_ROLE)))
        .await
        .expect("right account");
    conn.close(200, "bye".into()).await.unwrap();
}
