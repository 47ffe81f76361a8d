//! Topic checks need the exchange type. Exchanges declared outside the gateway's view are
//! looked up in the management API when `backend.management_url` is set; without it they
//! are treated as topic exchanges (fail closed).

use crate::common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;

const MANAGEMENT: &str = r#"management_url = "http://127.0.0.1:15672""#;

/// Declares a direct and a topic exchange straight on RabbitMQ, outside the gateway.
async fn declare_outside(direct: &str, topic: &str) {
    let conn =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", Default::default())
            .await
            .expect("direct connection to RabbitMQ");
    let ch = conn.create_channel().await.unwrap();
    let opts = ExchangeDeclareOptions {
        auto_delete: false,
        ..Default::default()
    };
    ch.exchange_declare(
        direct.into(),
        ExchangeKind::Direct,
        opts,
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        topic.into(),
        ExchangeKind::Topic,
        opts,
        FieldTable::default(),
    )
    .await
    .unwrap();
    conn.close(200, "done".into()).await.unwrap();
}

async fn delete_outside(names: &[&str]) {
    let conn =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", Default::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for n in names {
        ch.exchange_delete((*n).into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
}

/// Publishes with confirms; `Ok` when confirmed, else the close reason.
async fn publish(
    conn: &lapin::Connection,
    exchange: &str,
    rk: &str,
) -> Result<(), Option<(u16, String)>> {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            exchange.into(),
            rk.into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .map_err(|e| close_reason(&e))?;
    match tokio::time::timeout(std::time::Duration::from_secs(5), confirm).await {
        Ok(Ok(c)) if c.is_ack() => Ok(()),
        Ok(Err(e)) => Err(close_reason(&e)),
        _ => Err(None),
    }
}

#[tokio::test]
async fn types_of_exchanges_declared_elsewhere_are_looked_up() {
    let direct = unique("ext-direct");
    let topic = unique("ext-topic");
    declare_outside(&direct, &topic).await;
    let user = "arn:aws:iam::111122223333:role/TwoPart";
    let mut c = claims(user);
    c["scope"] = json!("rabbitmq/write:%2F/ext-*");
    let token = sign(&c);

    let gw = start_gateway_full("", "127.0.0.1:5672", MANAGEMENT).await;
    let conn = gw.connect(&token, "/").await.unwrap();
    publish(&conn, &direct, "any.key")
        .await
        .expect("a 2-part write scope is enough for a direct exchange");
    assert_eq!(
        publish(&conn, &topic, "a.b").await,
        Err(Some((
            403,
            format!(
                "ACCESS_REFUSED - write access to topic 'a.b' in exchange '{topic}' in vhost '/' refused for user '{user}'"
            )
        ))),
        "a topic exchange needs a 3-part scope"
    );

    // Without the management API the type is unknown: treated as topic, fail closed.
    let gw = start_gateway("").await;
    let conn = gw.connect(&token, "/").await.unwrap();
    assert_eq!(
        publish(&conn, &direct, "k").await.unwrap_err().map(|r| r.0),
        Some(403)
    );
    delete_outside(&[&direct, &topic]).await;
}
