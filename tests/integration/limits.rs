//! Per-identity and per-source connection limits and the handshake rate limit.

use crate::common::*;

#[tokio::test]
async fn identity_limit_refuses_with_530_and_frees_the_slot() {
    let gw = start_gateway_listener("max_connections_per_identity = 1", "").await;
    let token = sign(&claims(ADMIN_ROLE));
    let first = gw.connect(&token, "/").await.unwrap();
    let err = gw.connect(&token, "/").await.unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((
            530,
            format!(
                "NOT_ALLOWED - access to vhost '/' refused for user '{ADMIN_ROLE}': connection limit (1) is reached"
            )
        ))
    );
    // Another identity is not affected.
    gw.connect(&sign(&claims(READONLY_ROLE)), "/")
        .await
        .expect("other identity");
    first.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    gw.connect(&token, "/").await.expect("the slot was freed");
}

#[tokio::test]
async fn source_limit_and_handshake_rate_close_extra_connections() {
    let gw = start_gateway_listener("max_connections_per_source = 2", "").await;
    let token = sign(&claims(ADMIN_ROLE));
    let a = gw.connect(&token, "/").await.unwrap();
    let _b = gw.connect(&token, "/").await.unwrap();
    assert!(
        gw.connect(&token, "/").await.is_err(),
        "a third connection from 127.0.0.1"
    );
    a.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    gw.connect(&token, "/").await.expect("a slot was freed");

    // A burst of 1 and one token a second: the second of three back-to-back handshakes is
    // refused unless the first took a whole second (a loaded machine does not hide it).
    let gw = start_gateway_listener("handshakes_per_second_per_source = 1", "").await;
    let mut refused = 0;
    for _ in 0..3 {
        if gw.connect(&token, "/").await.is_err() {
            refused += 1;
        }
    }
    assert!(
        refused >= 1,
        "more than 1 handshake in a second from one address"
    );
}
