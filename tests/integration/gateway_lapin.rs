//! End-to-end tests with lapin over TLS, through the gateway, against the real RabbitMQ
//! on 127.0.0.1:5672.

use crate::common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use serde_json::json;

fn admin_token() -> String {
    sign(&claims(ADMIN_ROLE))
}

/// Declares the queue `name` with the default options on a new channel of `conn`.
async fn declare(conn: &Connection, name: &str) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    declare_queue(&ch, name).await
}

#[tokio::test]
async fn publish_consume_round_trip_with_confirms() {
    let gw = start_gateway("").await;
    let conn = gw
        .connect(&admin_token(), "/")
        .await
        .expect("connect with an empty username and a JWT");
    let ch = conn.create_channel().await.unwrap();
    let q = unique("roundtrip");
    declare_exclusive(&ch, &q).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..50u32)
        .map(|i| format!("message {i} {}", "x".repeat(i as usize * 97)).into_bytes())
        .collect();
    // One large message spans several body frames (frame_max 128 KiB).
    let mut bodies = bodies;
    bodies.push((0..600_000u32).map(|i| (i % 251) as u8).collect());
    for b in &bodies {
        let confirm = publish(&ch, "", &q, b).await.unwrap().await.unwrap();
        assert!(confirm.is_ack(), "publisher confirm");
    }
    let mut consumer = consume(&ch, &q, "c1").await;
    for expected in &bodies {
        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(&delivery.data, expected);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn read_only_token_gets_403_and_connection_stays_usable() {
    let gw = start_gateway("").await;
    let existing = unique("ro-existing");
    let admin = gw.connect(&admin_token(), "/").await.unwrap();
    declare(&admin, &existing).await.unwrap();
    let ach = admin.create_channel().await.unwrap();
    publish(&ach, "", &existing, b"hello").await.unwrap();

    let conn = gw
        .connect(&sign(&claims(READONLY_ROLE)), "/")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = unique("ro-new");
    let err = declare_queue(&ch, &q).await.unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((
            403,
            format!(
                "ACCESS_REFUSED - configure access to queue '{q}' in vhost '/' refused for user '{READONLY_ROLE}'"
            )
        ))
    );
    // Same connection, new channel: reading is allowed.
    let ch2 = conn.create_channel().await.unwrap();
    let got = poll_get(&ch2, &existing, std::time::Duration::from_millis(50)).await;
    assert_eq!(got.expect("message").delivery.data, b"hello");
    // And publishing is refused with the exact 4.x text, channel closed, connection alive.
    let ch3 = conn.create_channel().await.unwrap();
    let err = publish_refused(&ch3, "", existing.as_str(), BasicProperties::default()).await;
    assert_eq!(
        err,
        Some((
            403,
            format!(
                "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user '{READONLY_ROLE}'"
            )
        ))
    );
    assert!(conn.status().connected());
    let ch4 = conn.create_channel().await.unwrap();
    ch4.queue_declare(
        existing.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare with read permission");
    ch4.queue_delete(existing.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap_err();
    let ach2 = admin.create_channel().await.unwrap();
    ach2.queue_delete(existing.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// Publishes on `ch` in confirm mode and returns the close reason when the publish is
/// refused: a refused publish is never confirmed, and lapin fails the pending confirm
/// with the channel's close reason.
async fn publish_refused(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    props: BasicProperties,
) -> Option<(u16, String)> {
    if !ch.status().confirm() {
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
    }
    let confirm = match ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"x",
            props,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return close_reason(&e),
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), confirm).await {
        Ok(Err(e)) => close_reason(&e),
        Ok(Ok(c)) => panic!("publish was confirmed: {c:?}"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn wrong_vhost_gets_530() {
    let gw = start_gateway("").await;
    let mut c = claims("arn:aws:iam::111122223333:role/OtherVhost");
    c["scope"] = json!("rabbitmq/read:other/* rabbitmq/write:other/*");
    let err = gw.connect(&sign(&c), "/").await.unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((530, "NOT_ALLOWED - access to vhost '/' refused for user 'arn:aws:iam::111122223333:role/OtherVhost'".to_owned()))
    );
}

#[tokio::test]
async fn nested_sts_claim_alias_grants_access() {
    let gw = start_gateway("").await;
    let mut c = claims("arn:aws:iam::111122223333:role/NoAlias");
    c["https://sts.amazonaws.com/"]["request_tags"] = json!({ "scope": "team-a" });
    let conn = gw.connect(&sign(&c), "/").await.unwrap();
    let ok = unique("team-a.q");
    let ch = conn.create_channel().await.unwrap();
    declare_exclusive(&ch, &ok)
        .await
        .expect("alias from the nested STS request tag grants configure on team-a.*");
    let other = unique("other");
    let err = declare(&conn, &other).await.unwrap_err();
    assert_eq!(close_reason(&err).map(|r| r.0), Some(403));

    // Without the tag, the same role gets no vhost access at all.
    let err = gw
        .connect(
            &sign(&claims("arn:aws:iam::111122223333:role/NoAlias")),
            "/",
        )
        .await
        .unwrap_err();
    assert_eq!(close_reason(&err).map(|r| r.0), Some(530));
}

#[tokio::test]
async fn refused_tokens_never_reach_the_backend() {
    let gw = start_gateway("").await;
    let sub = unique("arn:aws:iam::111122223333:role/Refused");
    let now = now();
    let base = claims(&sub);
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let rsa_public = std::fs::read(fixtures().join("rsa-public.pem")).unwrap();
    let hs_header = json!({"alg": "HS256", "typ": "JWT", "kid": "test-rsa"});
    let hs_input = {
        let t = raw_token(&hs_header, &base, b"");
        t[..t.len() - 1].to_owned()
    };
    let cases: Vec<(&str, String)> = vec![
        ("expired", sign(&with("exp", json!(now - 10)))),
        ("wrong aud", sign(&with("aud", json!("not-rabbitmq")))),
        ("wrong iss", sign(&with("iss", json!("https://evil.test")))),
        (
            "bad signature",
            sign_with(
                &base,
                jsonwebtoken::Algorithm::RS256,
                "test-rsa",
                "other-rsa-private.pem",
            ),
        ),
        (
            "alg none",
            raw_token(&json!({"alg": "none", "typ": "JWT"}), &base, b""),
        ),
        (
            "HS256 with the RSA public key",
            format!("{hs_input}.{}", {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(hs256(&hs_input, &rsa_public))
            }),
        ),
        ("garbage", "not-a-jwt".to_owned()),
    ];
    for (name, token) in &cases {
        let err = gw.connect(token, "/").await.expect_err(name);
        assert_eq!(
            close_reason(&err),
            Some((
                403,
                "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.".to_owned()
            )),
            "{name}: {err:?}"
        );
    }
    // A valid token for the same subject works, proving the cases failed on the token.
    gw.connect(&sign(&with("scope", json!("rabbitmq/read:*/*"))), "/")
        .await
        .expect("valid token");
    // No backend connection was opened for a refused token: the broker's connection list
    // carries the gateway's identity in connection_name.
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "client_properties", "--quiet"])
        .output();
    if let Ok(out) = out
        && out.status.success()
    {
        let listing = String::from_utf8_lossy(&out.stdout);
        let tokens: Vec<String> = cases
            .iter()
            .map(|(_, t)| amqp_iam_gateway::auth::token_id(t))
            .collect();
        for t in tokens {
            assert!(
                !listing.contains(&t),
                "backend connection for refused token {t}"
            );
        }
    }
}

#[tokio::test]
async fn es384_tokens_and_topic_permissions() {
    let gw = start_gateway("").await;
    let mut c = claims("arn:aws:iam::111122223333:role/Topic");
    c["scope"] =
        json!("rabbitmq/write:%2F/amq.topic/orders.* rabbitmq/read:%2F/amq.topic/orders.*");
    let token = sign_with(
        &c,
        jsonwebtoken::Algorithm::ES384,
        "test-ec384",
        "ec384-private.pem",
    );
    let conn = gw.connect(&token, "/").await.expect("ES384 token");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let ok = publish(&ch, "amq.topic", "orders.eu", b"x")
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ok.is_ack());
    let err = publish_refused(&ch, "amq.topic", "payments.eu", BasicProperties::default()).await;
    assert_eq!(
        err,
        Some((403, "ACCESS_REFUSED - write access to topic 'payments.eu' in exchange 'amq.topic' in vhost '/' refused for user 'arn:aws:iam::111122223333:role/Topic'".to_owned()))
    );
    // user_id must match the authenticated user unless the token has the impersonator tag.
    let ch2 = conn.create_channel().await.unwrap();
    let props = BasicProperties::default().with_user_id(ShortString::from("someone-else"));
    let err = publish_refused(&ch2, "amq.topic", "orders.us", props).await;
    assert_eq!(
        err,
        Some((406, "PRECONDITION_FAILED - user_id property set to 'someone-else' but authenticated user was 'arn:aws:iam::111122223333:role/Topic'".to_owned()))
    );
    // CC headers are topic-checked too (RabbitMQ 4.0.3+).
    let ch3 = conn.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "CC".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongString("payments.x".into())].into()),
    );
    let err = publish_refused(
        &ch3,
        "amq.topic",
        "orders.us",
        BasicProperties::default().with_headers(headers),
    )
    .await;
    assert_eq!(err.map(|e| e.0), Some(403));
    assert!(conn.status().connected());
}

#[tokio::test]
async fn expired_token_closes_the_connection_with_320() {
    let gw = start_gateway("").await;
    let mut c = claims(ADMIN_ROLE);
    c["exp"] = json!(now() + 3);
    let conn = gw.connect(&sign(&c), "/").await.unwrap();
    let mut events = conn.events_listener();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("usable before exp");
    let start = std::time::Instant::now();
    let reason = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(8), events.next()).await {
            Ok(Some(lapin::Event::Error(e))) => break close_reason(&e),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break None,
        }
    };
    assert_eq!(
        reason,
        Some((320, "CONNECTION_FORCED - credential expired".to_owned()))
    );
    let waited = start.elapsed();
    assert!(
        waited > std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(5),
        "closed at about exp: {waited:?}"
    );
    assert!(!conn.status().connected());
}

#[tokio::test]
async fn update_secret_replaces_permissions_and_refuses_another_user() {
    let gw = start_gateway("").await;
    let sub = "arn:aws:iam::111122223333:role/Refreshing";
    let mut full = claims(sub);
    full["scope"] = json!("rabbitmq/configure:*/* rabbitmq/read:*/* rabbitmq/write:*/*");
    let conn = gw.connect(&sign(&full), "/").await.unwrap();
    declare(&conn, &unique("before-refresh"))
        .await
        .expect("configure granted by the first token");

    let mut reduced = claims(sub);
    reduced["scope"] = json!("rabbitmq/read:*/*");
    reduced["exp"] = json!(now() + 600);
    conn.update_secret(sign(&reduced).as_str().into(), "refresh".into())
        .await
        .expect("update-secret-ok");
    let q = unique("after-refresh");
    let err = declare(&conn, &q).await.unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((
            403,
            format!(
                "ACCESS_REFUSED - configure access to queue '{q}' in vhost '/' refused for user '{sub}'"
            )
        )),
        "nothing of the old token's permissions survives"
    );

    let other = sign(&claims("arn:aws:iam::111122223333:role/SomeoneElse"));
    let err = conn
        .update_secret(other.as_str().into(), "swap".into())
        .await
        .unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((
            530,
            "NOT_ALLOWED - New secret was refused by one of the backends".to_owned()
        ))
    );
}

/// The client compatibility scenario (as in tests/python/test_clients_*.py and tests/node)
/// for lapin: URL form with an empty username, a direct exchange, a bound queue, confirmed
/// publishes, consume and ack, a 403 on one channel while another keeps working, and
/// update-secret to a read-only token of the same user.
#[tokio::test]
async fn compat_scenario_bind_confirm_consume_refuse_update_secret() {
    let gw = start_gateway("").await;
    let sub = unique("compat-lapin");
    let token = |scope: &str| {
        let mut c = claims(&sub);
        c["scope"] = json!(scope);
        sign(&c)
    };
    let full = token(
        "rabbitmq/configure:%2F/compat.* rabbitmq/write:%2F/compat.* rabbitmq/read:%2F/compat.*",
    );
    let conn = gw.connect(&full, "%2f").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let (ex, q) = (unique("compat.lapin.x"), unique("compat.lapin.q"));
    ch.exchange_declare(
        ex.as_str().into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, &q).await.unwrap();
    ch.queue_bind(
        q.as_str().into(),
        ex.as_str().into(),
        "rk".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..20 {
        let confirm = publish(&ch, &ex, "rk", format!("m{i}").as_bytes())
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let mut consumer = consume(&ch, &q, "c").await;
    for i in 0..20 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, format!("m{i}").into_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }

    let refused = |kind: &str, name: &str| {
        format!(
            "ACCESS_REFUSED - {kind} access to queue '{name}' in vhost '/' refused for user '{sub}'"
        )
    };
    let forbidden = unique("forbidden.lapin");
    let err = declare(&conn, &forbidden).await.unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((403, refused("configure", &forbidden)))
    );
    assert!(conn.status().connected());
    let ch2 = conn.create_channel().await.unwrap();
    ch2.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch2.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();

    conn.update_secret(
        token("rabbitmq/read:%2F/compat.*").as_str().into(),
        "refresh".into(),
    )
    .await
    .expect("update-secret-ok");
    let again = unique("compat.lapin.q");
    let err = declare(&conn, &again).await.unwrap_err();
    assert_eq!(
        close_reason(&err),
        Some((403, refused("configure", &again)))
    );
    assert!(conn.status().connected());
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn user_id_equal_to_the_username_passes_to_the_broker() {
    // The broker checks user_id against the service user unless it has the `impersonator`
    // tag (scripts/setup.sh gives it to guest, as the README advises for the service user).
    let gw = start_gateway("").await;
    let conn = gw.connect(&admin_token(), "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let props = BasicProperties::default().with_user_id(ShortString::from(ADMIN_ROLE));
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions::default(),
            b"x",
            props,
        )
        .await
        .unwrap()
        .await
        .expect("the broker accepts the validated user_id");
    assert!(confirm.is_ack());
}
