//! The verified-token cache and the failed-token back-off: a storm of one valid token costs
//! one signature check, expiry is re-checked on every hit, and a bad token repeated from
//! one address is refused without checking its signature again. The counts are read from
//! the authenticator's counters and the gateway's `/metrics`, never from timing.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::common::*;
use amqp_iam_gateway::auth::Authenticator;
use jsonwebtoken::Algorithm;
use serde_json::json;

const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

fn verifications(auth: &Authenticator) -> u64 {
    auth.stats.signature_verifications.load(Relaxed)
}

async fn reason(auth: &Authenticator, token: &str, now: i64, source: IpAddr) -> &'static str {
    match auth.authenticate(token, now, Some(source)).await {
        Ok(_) => "ok",
        Err(e) => e.reason(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_authentications_of_one_token_verify_once() {
    let auth = Arc::new(authenticator(""));
    let token = sign(&claims(ADMIN_ROLE));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1_000u32 {
        let (auth, token) = (auth.clone(), token.clone());
        let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i % 50));
        set.spawn(async move { auth.authenticate(&token, now(), Some(source)).await });
    }
    while let Some(r) = set.join_next().await {
        let id = r.unwrap().expect("valid token");
        assert_eq!(id.username, ADMIN_ROLE);
        assert!(id.permissions.vhost_access("/"));
    }
    assert_eq!(verifications(&auth), 1, "one signature check for 1,000");
    assert_eq!(auth.stats.cache_misses.load(Relaxed), 1);
    assert_eq!(auth.stats.cache_hits.load(Relaxed), 999);
}

#[tokio::test]
async fn the_cache_can_be_disabled() {
    let auth = authenticator("token_cache_size = 0");
    let token = sign(&claims(ADMIN_ROLE));
    for _ in 0..3 {
        assert_eq!(reason(&auth, &token, now(), A).await, "ok");
    }
    assert_eq!(verifications(&auth), 3);
}

#[tokio::test]
async fn exp_and_nbf_are_checked_again_on_every_hit() {
    let auth = authenticator("");
    let t0 = now();
    let mut c = claims(ADMIN_ROLE);
    c["exp"] = json!(t0 + 10);
    let token = sign(&c);
    assert_eq!(reason(&auth, &token, t0, A).await, "ok");
    assert_eq!(reason(&auth, &token, t0 + 9, A).await, "ok");
    // Still cached (moka's clock has not reached exp), refused by the re-check.
    assert_eq!(reason(&auth, &token, t0 + 10, A).await, "expired");
    assert_eq!(reason(&auth, &token, t0 + 11, B).await, "expired");
    assert_eq!(verifications(&auth), 1, "every answer came from the cache");

    // nbf beyond the 60 s leeway: refused now, accepted later, verified once.
    let mut c = claims(ADMIN_ROLE);
    c["nbf"] = json!(t0 + 100);
    c["exp"] = json!(t0 + 300);
    let token = sign(&c);
    assert_eq!(reason(&auth, &token, t0, A).await, "not_yet_valid");
    assert_eq!(reason(&auth, &token, t0 + 50, B).await, "ok");
    assert_eq!(verifications(&auth), 2);
}

#[tokio::test]
async fn a_token_that_expires_while_cached_is_refused() {
    let auth = authenticator("");
    let mut c = claims(ADMIN_ROLE);
    c["exp"] = json!(now() + 2);
    let token = sign(&c);
    assert_eq!(reason(&auth, &token, now(), A).await, "ok");
    assert_eq!(reason(&auth, &token, now(), A).await, "ok");
    assert_eq!(verifications(&auth), 1);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(reason(&auth, &token, now(), B).await, "expired");
}

#[tokio::test]
async fn a_bad_token_repeated_from_one_address_is_not_verified_again() {
    let auth = authenticator("");
    // The trusted kid, signed with another key.
    let bad = sign_with(
        &claims(ADMIN_ROLE),
        Algorithm::RS256,
        "test-rsa",
        "other-rsa-private.pem",
    );
    assert_eq!(reason(&auth, &bad, now(), A).await, "bad_signature");
    assert_eq!(verifications(&auth), 1);
    for _ in 0..100 {
        assert_eq!(reason(&auth, &bad, now(), A).await, "cached_failure");
    }
    assert_eq!(verifications(&auth), 1, "refused without verifying");
    assert_eq!(auth.stats.cached_failures.load(Relaxed), 100);
    // Another address is still verified, and so is another token from the same address.
    assert_eq!(reason(&auth, &bad, now(), B).await, "bad_signature");
    assert_eq!(verifications(&auth), 2);
    let good = sign(&claims(ADMIN_ROLE));
    assert_eq!(reason(&auth, &good, now(), A).await, "ok");
    assert_eq!(verifications(&auth), 3);
    // Without a source (explain, tests) there is no back-off.
    assert_eq!(
        auth.authenticate(&bad, now(), None)
            .await
            .unwrap_err()
            .reason(),
        "bad_signature"
    );
    assert_eq!(verifications(&auth), 4);

    // The back-off grows: 1 s after the first failure, 2 s after the second.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(reason(&auth, &bad, now(), A).await, "bad_signature");
    assert_eq!(verifications(&auth), 5);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(reason(&auth, &bad, now(), A).await, "cached_failure");
    assert_eq!(verifications(&auth), 5);
}

#[tokio::test]
async fn an_expired_token_repeated_from_one_address_is_verified_once() {
    let auth = authenticator("");
    let mut c = claims(ADMIN_ROLE);
    c["exp"] = json!(now() - 5);
    let token = sign(&c);
    assert_eq!(reason(&auth, &token, now(), A).await, "expired");
    assert_eq!(reason(&auth, &token, now(), A).await, "cached_failure");
    assert_eq!(verifications(&auth), 1);
}

// ---------------------------------------------------------------------------------------------
// Through the gateway.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_1000_connections_with_one_token_cost_one_signature_check() {
    const CONNECTIONS: usize = 1000;
    let gw = Arc::new(start_gateway("").await);
    let token = sign(&claims(ADMIN_ROLE));
    // Over the plain listener (TLS handshakes would only slow the test down; the cache is
    // the same), in waves of 50 concurrent connections.
    let uri = format!("amqp://:{token}@{}/%2f", gw.addrs.plain.unwrap());
    for _ in 0..CONNECTIONS / 50 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let uri = uri.clone();
            set.spawn(async move {
                let conn = lapin::Connection::connect(&uri, Default::default())
                    .await
                    .expect("connect");
                conn.close(200, "bye".into()).await.unwrap();
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
    let text = metrics(&gw).await;
    assert_eq!(
        sample(&text, "signature_verifications_total"),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, r#"token_cache_total{result="miss"}"#), 1.0);
    assert_eq!(
        sample(&text, r#"token_cache_total{result="hit"}"#),
        (CONNECTIONS - 1) as f64
    );
    assert_eq!(
        sample(
            &text,
            r#"authentications_total{issuer="default",outcome="accepted",reason="ok"}"#
        ),
        CONNECTIONS as f64
    );
}

#[tokio::test]
async fn gateway_refuses_a_repeated_bad_token_as_cached_failure() {
    let gw = start_gateway("").await;
    let bad = sign_with(
        &claims(ADMIN_ROLE),
        Algorithm::RS256,
        "test-rsa",
        "other-rsa-private.pem",
    );
    // Twice, well within the first 1 s back-off.
    for _ in 0..2 {
        gw.connect(&bad, "/").await.unwrap_err();
    }
    let text = metrics(&gw).await;
    assert_eq!(
        sample(&text, "signature_verifications_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"authentications_total{issuer="default",outcome="refused",reason="bad_signature"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"authentications_total{issuer="default",outcome="refused",reason="cached_failure"}"#
        ),
        1.0
    );
}
