//! The method table: every client method decodes to its one variant, exactly as long as
//! RabbitMQ's decoder requires; properties and closes are read as RabbitMQ reads them.

use super::*;
use crate::amqp::frame;
use amq_protocol::protocol::{access, basic, confirm, exchange, queue, tx};
use amq_protocol::types::FieldTable;

fn payload(m: AMQPClass) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(&mut out, 1, m);
    let h = frame::check(&out, 1 << 20).unwrap().unwrap();
    frame::payload(&out, &h).to_vec()
}

/// Every method a client may send after login, with the variant it must decode to
/// (compared by discriminant and the fields the session uses).
#[test]
fn every_client_method_maps_to_one_variant() {
    let args = FieldTable::default();
    let cases: Vec<(AMQPClass, ClientMethod<'static>)> = vec![
        (
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "x".into(),
                class_id: 0,
                method_id: 0,
            })),
            ClientMethod::ConnectionClose,
        ),
        (
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            ClientMethod::ConnectionCloseOk,
        ),
        (
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
                connection::UpdateSecret {
                    new_secret: long("tok"),
                    reason: "r".into(),
                },
            )),
            ClientMethod::UpdateSecret { secret: b"tok" },
        ),
        (
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ClientMethod::ChannelOpen,
        ),
        (
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "x".into(),
                class_id: 0,
                method_id: 0,
            })),
            ClientMethod::ChannelClose,
        ),
        (
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            ClientMethod::ChannelCloseOk,
        ),
        (
            AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Access(access::AMQPMethod::Request(access::Request {
                realm: "/data".into(),
                exclusive: false,
                passive: true,
                active: true,
                write: true,
                read: true,
            })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                exchange: "x".into(),
                if_unused: false,
                nowait: false,
            })),
            ClientMethod::ExchangeDelete { exchange: "x" },
        ),
        (
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: "d".into(),
                source: "s".into(),
                routing_key: "k".into(),
                nowait: true,
                arguments: args.clone(),
            })),
            ClientMethod::ExchangeBind {
                destination: "d",
                source: "s",
                routing_key: "k",
                unbind: false,
            },
        ),
        (
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: "d".into(),
                source: "s".into(),
                routing_key: "k".into(),
                nowait: false,
                arguments: args.clone(),
            })),
            ClientMethod::ExchangeBind {
                destination: "d",
                source: "s",
                routing_key: "k",
                unbind: true,
            },
        ),
        (
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "k".into(),
                nowait: false,
                arguments: args.clone(),
            })),
            ClientMethod::QueueBind {
                queue: "q",
                exchange: "x",
                routing_key: "k",
                unbind: false,
            },
        ),
        (
            AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "k".into(),
                arguments: args.clone(),
            })),
            ClientMethod::QueueBind {
                queue: "q",
                exchange: "x",
                routing_key: "k",
                unbind: true,
            },
        ),
        (
            AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: "q".into(),
                nowait: false,
            })),
            ClientMethod::QueuePurge { queue: "q" },
        ),
        (
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: "q".into(),
                if_unused: true,
                if_empty: true,
                nowait: true,
            })),
            ClientMethod::QueueDelete { queue: "q" },
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "t".into(),
                nowait: false,
            })),
            ClientMethod::BasicCancel { consumer_tag: "t" },
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: "q".into(),
                no_ack: true,
            })),
            ClientMethod::BasicGet { queue: "q" },
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 10,
                global: false,
            })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1,
                multiple: false,
            })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 1,
                multiple: false,
                requeue: true,
            })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: 1,
                requeue: true,
            })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})),
            ClientMethod::Relay,
        ),
        (
            AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
            ClientMethod::Relay,
        ),
    ];
    for (m, want) in cases {
        let p = payload(m.clone());
        let got = ClientMethod::decode(&p).unwrap_or_else(|e| panic!("{m:?}: {e}"));
        assert_eq!(got, want, "{m:?}");
        // connection.close / close-ok go to the broker as they are; it decodes them.
        let decoded = !matches!(
            want,
            ClientMethod::Relay | ClientMethod::ConnectionClose | ClientMethod::ConnectionCloseOk
        );
        if decoded {
            // RabbitMQ requires the arguments to fill the payload exactly.
            let mut longer = p.clone();
            longer.push(0);
            assert_eq!(
                ClientMethod::decode(&longer),
                Err(MethodError::CannotDecode),
                "{m:?}"
            );
            for cut in 4..p.len() {
                assert!(
                    ClientMethod::decode(&p[..cut]).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
        }
    }
}

#[test]
fn declares_and_consume_keep_the_fields_the_session_needs() {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        amq_protocol::types::AMQPValue::LongString(long("dlx")),
    );
    let p = payload(AMQPClass::Queue(queue::AMQPMethod::Declare(
        queue::Declare {
            queue: "q".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: true,
            arguments: args.clone(),
        },
    )));
    let ClientMethod::QueueDeclare(d) = ClientMethod::decode(&p).unwrap() else {
        panic!()
    };
    assert_eq!((d.queue, d.passive, d.nowait), ("q", false, true));
    assert_eq!(
        d.arguments.get("x-dead-letter-exchange"),
        Some(Value::LongStr(b"dlx"))
    );
    assert_eq!(p[d.bits_at] & QUEUE_DECLARE_NOWAIT, QUEUE_DECLARE_NOWAIT);

    let p = payload(AMQPClass::Exchange(exchange::AMQPMethod::Declare(
        exchange::Declare {
            exchange: "x".into(),
            kind: "topic".into(),
            passive: true,
            durable: false,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        },
    )));
    let ClientMethod::ExchangeDeclare(d) = ClientMethod::decode(&p).unwrap() else {
        panic!()
    };
    assert_eq!(
        (d.exchange, d.kind, d.passive, d.nowait),
        ("x", "topic", true, false)
    );

    let p = payload(AMQPClass::Basic(basic::AMQPMethod::Consume(
        basic::Consume {
            queue: "q".into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: true,
            exclusive: true,
            nowait: true,
            arguments: args,
        },
    )));
    let ClientMethod::BasicConsume(c) = ClientMethod::decode(&p).unwrap() else {
        panic!()
    };
    assert_eq!((c.queue, c.consumer_tag, c.nowait), ("q", "", true));
    // Written again with a tag, everything else unchanged.
    let mut out = BytesMut::new();
    basic_consume_with_tag(&mut out, 1, &c, "amq.ctag-x");
    let h = frame::check(&out, 1 << 20).unwrap().unwrap();
    let (_, m) = amq_protocol::protocol::parse_class(frame::payload(&out, &h)).unwrap();
    let AMQPClass::Basic(basic::AMQPMethod::Consume(back)) = m else {
        panic!()
    };
    assert_eq!(back.consumer_tag.as_str(), "amq.ctag-x");
    assert!(back.no_ack && back.exclusive && back.nowait && !back.no_local);
    assert_eq!(back.queue.as_str(), "q");
    assert!(
        back.arguments
            .inner()
            .contains_key("x-dead-letter-exchange")
    );
}

#[test]
fn short_strings_must_be_utf8_except_in_a_publish() {
    let p = [0, 60, 0, 70, 0, 0, 2, 0xff, 0xfe, 0];
    assert_eq!(ClientMethod::decode(&p), Err(MethodError::Utf8));
    // The layout is checked before the text: a truncated one is a decode error.
    assert_eq!(
        ClientMethod::decode(&p[..8]),
        Err(MethodError::CannotDecode)
    );
    let p = [0, 60, 0, 40, 0, 0, 1, b'x', 2, 0xff, 0xfe, 0];
    let ClientMethod::BasicPublish(pr) = ClientMethod::decode(&p).unwrap() else {
        panic!()
    };
    assert_eq!(pr.routing_key, &[0xff, 0xfe]);
}

#[test]
fn method_errors_are_rabbitmqs_frame_errors() {
    assert_eq!(
        MethodError::CannotDecode.close(&[0, 0, 3, 113]),
        (501, "FRAME_ERROR - cannot decode <<0,0,3,113>>".to_owned())
    );
    let (_, long_text) = MethodError::CannotDecode.close(&[200; 1000]);
    assert_eq!(long_text.len(), 255);
    assert!(long_text.ends_with("..."));
    assert_eq!(
        MethodError::Utf8.close(&[]),
        (501, "FRAME_ERROR - Malformed UTF-8 in shortstr".to_owned())
    );
}

#[test]
fn publish_is_read_in_place() {
    let p = [
        0, 60, 0, 40, 0, 0, 9, b'a', b'm', b'q', b'.', b't', b'o', b'p', b'i', b'c', 3, b'a', b'.',
        b'b', 1,
    ];
    let m = PublishRef::parse(&p).unwrap();
    assert_eq!(
        m,
        PublishRef {
            exchange: "amq.topic",
            routing_key: b"a.b",
            mandatory: true,
            immediate: false
        }
    );
    for cut in 0..p.len() {
        assert!(PublishRef::parse(&p[..cut]).is_err(), "cut {cut}");
    }
    let mut longer = p.to_vec();
    longer.push(0);
    assert_eq!(PublishRef::parse(&longer), Err(MethodError::CannotDecode));
}

#[test]
fn content_header_props() {
    use amq_protocol::protocol::basic::AMQPProperties;
    use amq_protocol::types::AMQPValue;
    let mut headers = FieldTable::default();
    headers.insert(
        "CC".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongString(long("x.y"))].into()),
    );
    headers.insert(
        "BCC".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongString(long("z"))].into()),
    );
    // Every property present, so the reader skips each type correctly.
    let props = AMQPProperties::default()
        .with_content_type("text/plain".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("c".into())
        .with_reply_to("r".into())
        .with_expiration("1000".into())
        .with_message_id("m".into())
        .with_timestamp(7)
        .with_type("t".into())
        .with_user_id("bob".into())
        .with_app_id("a".into())
        .with_cluster_id("cl".into());
    let frame = AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: props,
        },
    );
    let bytes = cookie_factory::gen_simple(gen_frame(&frame), Vec::new()).unwrap();
    let h = frame::check(&bytes, 4096).unwrap().unwrap();
    let header = ContentHeader::parse(frame::payload(&bytes, &h)).unwrap();
    assert_eq!(
        (header.class_id, header.weight, header.body_size),
        (60, 0, 3)
    );
    let p = PublishProps::parse(header.properties).unwrap();
    assert_eq!(p.user_id, Some(&b"bob"[..]));
    assert_eq!(p.extra_routing_keys(), vec![&b"x.y"[..], &b"z"[..]]);
    // Trailing bytes after the last property: not what RabbitMQ decodes.
    let mut longer = header.properties.to_vec();
    longer.push(0);
    assert!(PublishProps::parse(&longer).is_err());
    // No user-id and no headers: nothing is decoded.
    assert_eq!(
        PublishProps::parse(&[0x10, 0x00, 2]).unwrap(),
        PublishProps::default()
    );
}

#[test]
fn service_user_is_hidden_only_where_a_user_is_named() {
    let h = |t: &str| hide_service_user(t.as_bytes(), "gw", "alice");
    assert_eq!(
        h("ACCESS_REFUSED - access to vhost 'v' refused for user 'gw'").as_deref(),
        Some("ACCESS_REFUSED - access to vhost 'v' refused for user 'alice'")
    );
    assert_eq!(
        h("PRECONDITION_FAILED - user_id property set to 'x' but authenticated user was 'gw'")
            .as_deref(),
        Some(
            "PRECONDITION_FAILED - user_id property set to 'x' but authenticated user was 'alice'"
        )
    );
    assert_eq!(h("NOT_FOUND - no queue 'gw' in vhost '/'"), None);
    assert_eq!(h("nothing here"), None);
    assert_eq!(hide_service_user(b"user ''", "", "alice"), None);
}

#[test]
fn close_round_trips() {
    let mut out = BytesMut::new();
    channel_close(&mut out, 3, 403, "ACCESS_REFUSED - x", 50, 10);
    let h = frame::check(&out, 4096).unwrap().unwrap();
    assert_eq!(h.channel, 3);
    let c = Close::parse(frame::payload(&out, &h)).unwrap();
    assert_eq!(
        (c.code, c.text, c.class_id, c.method_id),
        (403, &b"ACCESS_REFUSED - x"[..], 50, 10)
    );
}
