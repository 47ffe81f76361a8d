//! Token lifecycle through the gateway with lapin: refresh with update-secret, consumers
//! cancelled when the new token no longer reads their queue, expiry moved by a refresh.

use std::time::Duration;

use crate::common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use serde_json::json;

fn token(sub: &str, scope: &str, ttl: i64) -> String {
    let mut c = claims(sub);
    c["scope"] = json!(scope);
    c["exp"] = json!(now() + ttl);
    sign(&c)
}

#[tokio::test]
async fn refresh_without_read_cancels_the_consumer() {
    let gw = start_gateway("").await;
    let sub = "arn:aws:iam::111122223333:role/Consumer";
    let conn = gw
        .connect(
            &token(
                sub,
                "rabbitmq/configure:*/* rabbitmq/read:*/* rabbitmq/write:*/*",
                300,
            ),
            "/",
        )
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = unique("consumed");
    declare_queue(&ch, &q).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "tag-1".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish(&ch, "", &q, b"before").await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"before");

    // The new token still grants the vhost, but no longer reads this queue.
    conn.update_secret(
        token(sub, "rabbitmq/read:%2F/other-* rabbitmq/write:*/*", 300)
            .as_str()
            .into(),
        "refresh".into(),
    )
    .await
    .expect("update-secret-ok");
    // lapin ends the consumer's stream when the server cancels it (consumer_cancel_notify).
    let end = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("consumer cancelled");
    assert!(
        end.is_none(),
        "no more deliveries after the cancel: {end:?}"
    );
    // The broker side is cancelled too: a new message stays in the queue.
    publish(&ch, "", &q, b"after").await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let got = ch2
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await;
    assert!(got.is_err(), "basic.get refused after the refresh");
    // The backend consumer is gone too: the message waits in the queue instead of going to
    // a consumer the client no longer has.
    let admin = gw.connect(&sign(&claims(ADMIN_ROLE)), "/").await.unwrap();
    let ach = admin.create_channel().await.unwrap();
    let left = poll_get(&ach, &q, Duration::from_millis(20)).await;
    assert_eq!(left.expect("message kept").delivery.data, b"after");
    ach.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(conn.status().connected());
}

#[tokio::test]
async fn refresh_with_a_later_exp_outlives_the_first_token() {
    let gw = start_gateway("").await;
    let sub = "arn:aws:iam::111122223333:role/LongLived";
    let scopes = "rabbitmq/configure:*/* rabbitmq/read:*/* rabbitmq/write:*/*";
    let conn = gw.connect(&token(sub, scopes, 2), "/").await.unwrap();
    conn.update_secret(token(sub, scopes, 60).as_str().into(), "refresh".into())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        conn.status().connected(),
        "still open past the first token's exp"
    );
    let ch = conn
        .create_channel()
        .await
        .expect("usable past the first exp");
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
}

#[tokio::test]
async fn refresh_with_an_expired_token_is_refused() {
    let gw = start_gateway("").await;
    let sub = "arn:aws:iam::111122223333:role/Stale";
    let scopes = "rabbitmq/read:*/*";
    let conn = gw.connect(&token(sub, scopes, 300), "/").await.unwrap();
    let err = conn
        .update_secret(token(sub, scopes, -5).as_str().into(), "stale".into())
        .await
        .unwrap_err();
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => {
            assert_eq!(
                (e.get_id(), e.get_message().as_str()),
                (
                    530,
                    "NOT_ALLOWED - New secret was refused by one of the backends"
                )
            );
        }
        other => panic!("{other:?}"),
    }
}
