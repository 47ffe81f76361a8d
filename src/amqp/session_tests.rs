//! Session tests: frames in, frames out, no sockets. Inputs are also fed in small pieces
//! to show that frame boundaries and read boundaries are independent.

use super::*;
use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame};
use amq_protocol::protocol::{basic, channel, connection};
use amq_protocol::types::{FieldTable, ShortString};

fn perms(scopes: &[&str]) -> Permissions {
    Permissions::from_scopes(&scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

fn session(scopes: &[&str]) -> Session {
    Session::new("alice".into(), "/".into(), perms(scopes), 131_072, 7)
}

fn bytes(frame: AMQPFrame) -> Vec<u8> {
    cookie_factory::gen_simple(gen_frame(&frame), Vec::new()).unwrap()
}

fn method(ch: u16, m: AMQPClass) -> Vec<u8> {
    bytes(AMQPFrame::Method(ch, m))
}

fn channel_open(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
}

fn close_ok(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
}

fn queue_declare(ch: u16, name: &str) -> Vec<u8> {
    let d = queue::Declare {
        queue: ShortString::from(name),
        arguments: FieldTable::default(),
        ..Default::default()
    };
    method(ch, AMQPClass::Queue(queue::AMQPMethod::Declare(d)))
}

fn publish(ch: u16, exchange: &str, rk: &str, body: &[u8], user_id: Option<&str>) -> Vec<u8> {
    let p = basic::Publish {
        exchange: exchange.into(),
        routing_key: rk.into(),
        mandatory: false,
        immediate: false,
    };
    let mut v = method(ch, AMQPClass::Basic(basic::AMQPMethod::Publish(p)));
    let mut props = basic::AMQPProperties::default();
    if let Some(u) = user_id {
        props = props.with_user_id(u.into());
    }
    let header = AMQPContentHeader {
        class_id: 60,
        body_size: body.len() as u64,
        properties: props,
    };
    v.extend(bytes(AMQPFrame::Header(ch, header)));
    for chunk in body.chunks(1000) {
        v.extend(bytes(AMQPFrame::Body(ch, chunk.to_vec())));
    }
    v
}

fn drain(out: &mut Outbox) -> Vec<u8> {
    let v: Vec<u8> = out.chunks().flat_map(|b| b.iter().copied()).collect();
    out.consume(out.len());
    v
}

/// Decodes the method frames in `buf` (skipping content frames).
fn methods(buf: &[u8]) -> Vec<(u16, AMQPClass)> {
    let mut v = Vec::new();
    let mut rest = buf;
    while let Some(h) = frame::check(rest, 1 << 20).unwrap() {
        if h.frame_type == frame::METHOD {
            v.push((h.channel, method::decode(frame::payload(rest, &h)).unwrap()));
        }
        rest = &rest[h.wire_len()..];
    }
    assert!(rest.is_empty(), "trailing partial frame");
    v
}

/// Feeds client bytes in pieces of `step` bytes.
fn client(s: &mut Session, input: &[u8], step: usize) -> (Vec<u8>, Vec<u8>) {
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    }
    (drain(&mut to_b), drain(&mut to_c))
}

/// Feeds client bytes in one piece, which must end the connection: the error, then what
/// went to the backend and to the client.
fn client_fails(s: &mut Session, input: &[u8]) -> (SessionError, Vec<u8>, Vec<u8>) {
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(input);
    let err = s
        .on_client_input(&mut buf, &mut to_b, &mut to_c)
        .expect_err("the input ends the connection");
    (err, drain(&mut to_b), drain(&mut to_c))
}

/// The `connection.close` in `buf`, which must be its only method frame.
fn connection_close(buf: &[u8]) -> connection::Close {
    let sent = methods(buf);
    let [(0, AMQPClass::Connection(connection::AMQPMethod::Close(close)))] = sent.as_slice() else {
        panic!("expected one connection.close: {sent:?}")
    };
    close.clone()
}

fn backend(s: &mut Session, input: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(input);
    s.on_backend_input(&mut buf, &mut to_c, &mut to_b).unwrap();
    (drain(&mut to_c), drain(&mut to_b))
}

#[test]
fn permitted_frames_are_forwarded_byte_for_byte() {
    for step in [1, 7, 100, 1 << 20] {
        let mut s = session(&["configure:*/*", "write:*/*", "read:*/*"]);
        let mut input = channel_open(1);
        input.extend(queue_declare(1, "q"));
        input.extend(publish(1, "", "q", &[42u8; 2500], Some("alice")));
        let (to_b, to_c) = client(&mut s, &input, step);
        assert_eq!(to_b, input, "step {step}");
        assert!(to_c.is_empty());
    }
}

#[test]
fn denial_closes_the_channel_on_both_sides_and_discards_the_rest() {
    let mut s = session(&["read:*/*"]);
    let (_, _) = client(&mut s, &channel_open(1), 1 << 20);
    let mut input = queue_declare(1, "q");
    input.extend(publish(1, "", "q", b"pipelined", None)); // discarded: channel is closing
    let (to_b, to_c) = client(&mut s, &input, 3);
    let sent_c = methods(&to_c);
    assert_eq!(sent_c.len(), 1);
    let AMQPClass::Channel(channel::AMQPMethod::Close(c)) = &sent_c[0].1 else {
        panic!("{sent_c:?}")
    };
    assert_eq!((c.reply_code, c.class_id, c.method_id), (403, 50, 10));
    assert_eq!(
        c.reply_text.as_str(),
        "ACCESS_REFUSED - configure access to queue 'q' in vhost '/' refused for user 'alice'"
    );
    // The backend gets a channel.close of its own and nothing of the refused traffic.
    let sent_b = methods(&to_b);
    assert!(
        matches!(
            sent_b.as_slice(),
            [(1, AMQPClass::Channel(channel::AMQPMethod::Close(_)))]
        ),
        "{sent_b:?}"
    );
    assert_eq!(s.take_denials().len(), 1);

    // Backend frames on channel 1 are dropped until its close-ok; others pass.
    let mut from_b = publish(1, "", "late-delivery", b"x", None);
    from_b.extend(channel_open(2));
    let (to_c, _) = backend(&mut s, &from_b);
    assert_eq!(to_c, channel_open(2));

    // The client answers close-ok and reopens channel 1 before the backend's close-ok:
    // the open waits.
    let mut buf = BytesMut::from(&close_ok(1)[..]);
    buf.extend_from_slice(&channel_open(1));
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert!(to_b.is_empty());
    assert!(s.client_paused());
    assert_eq!(&buf[..], &channel_open(1)[..], "the open stays buffered");
    let (from_gw, _) = backend(&mut s, &close_ok(1));
    assert!(
        from_gw.is_empty(),
        "the gateway's own close-ok is not forwarded"
    );
    assert!(!s.client_paused());
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert_eq!(
        drain(&mut to_b),
        channel_open(1),
        "the held open goes out once the backend is done"
    );
}

#[test]
fn backend_close_crossing_a_denial_is_answered() {
    let mut s = session(&["read:*/*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let backend_close = method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 404,
            reply_text: "NOT_FOUND".into(),
            class_id: 50,
            method_id: 10,
        })),
    );
    // The backend closes channel 1 (forwarded), then the client's pipelined declare is refused.
    let (to_c, _) = backend(&mut s, &backend_close);
    assert_eq!(to_c, backend_close);
    let (to_b, _) = client(&mut s, &queue_declare(1, "q"), 1 << 20);
    // The gateway answers the backend's close instead of opening a second close.
    assert_eq!(to_b, close_ok(1));
}

#[test]
fn publish_is_held_until_its_header_then_checked() {
    let mut s = session(&["write:*/*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let msg = publish(1, "", "q", b"hello", Some("mallory"));
    let (to_b, to_c) = client(&mut s, &msg, 5);
    let sent_b = methods(&to_b);
    assert!(
        matches!(
            sent_b.as_slice(),
            [(1, AMQPClass::Channel(channel::AMQPMethod::Close(_)))]
        ),
        "nothing of a refused publish reaches the backend, only the gateway's close: {sent_b:?}"
    );
    let c = methods(&to_c);
    let AMQPClass::Channel(channel::AMQPMethod::Close(close)) = &c[0].1 else {
        panic!()
    };
    assert_eq!(close.reply_code, 406);
    assert_eq!(
        close.reply_text.as_str(),
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'alice'"
    );
    assert_eq!((close.class_id, close.method_id), (60, 40));
}

#[test]
fn impersonator_tag_allows_user_id() {
    let mut s = session(&["write:*/*", "tag:impersonator"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let msg = publish(1, "", "q", b"hello", Some("mallory"));
    let (to_b, _) = client(&mut s, &msg, 9);
    assert_eq!(to_b, msg);
}

#[test]
fn server_named_queue_needs_configure_on_amq_gen() {
    let mut s = session(&["configure:*/amq.gen-*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let (to_b, _) = client(&mut s, &queue_declare(1, ""), 1 << 20);
    assert_eq!(to_b, queue_declare(1, ""));
    let mut s = session(&["configure:*/app-*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let (_, to_c) = client(&mut s, &queue_declare(1, ""), 1 << 20);
    assert!(matches!(
        methods(&to_c)[0].1,
        AMQPClass::Channel(channel::AMQPMethod::Close(_))
    ));
}

#[test]
fn oversized_client_frame_is_a_frame_error() {
    let mut s = Session::new("alice".into(), "/".into(), perms(&[]), 4096, 1);
    let (_, _, to_c) = client_fails(&mut s, &[3u8, 0, 1, 0, 0, 0x20, 0]);
    assert_eq!(connection_close(&to_c).reply_code, 501);
}

/// Regression (rabbitmq-client 5.0.8, frameMax 8192): body frames with a payload of exactly
/// frame_max bytes, frame_max + 8 on the wire, which RabbitMQ accepts (?FRAME_SIZE_FUDGE).
/// The gateway closed the connection with "frame of 8200 bytes exceeds the negotiated
/// frame_max of 8192"; they must be forwarded byte for byte.
#[test]
fn client_body_frames_of_frame_max_payload_are_forwarded() {
    let p = basic::Publish {
        exchange: "".into(),
        routing_key: "q".into(),
        mandatory: false,
        immediate: false,
    };
    let body = vec![7u8; 2 * 4096 + 10];
    let mut input = channel_open(1);
    input.extend(method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))));
    input.extend(bytes(AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: basic::AMQPProperties::default(),
        },
    )));
    for chunk in body.chunks(4096) {
        input.extend(bytes(AMQPFrame::Body(1, chunk.to_vec())));
    }
    // The first body frame: type 3, channel 1, size 4096 (0x1000), 4104 bytes in all.
    let first_body = input.len() - (4096 + 8) * 2 - (10 + 8);
    assert_eq!(
        &input[first_body..first_body + 7],
        &[3, 0, 1, 0, 0, 0x10, 0]
    );
    for step in [1, 100, 4104, 1 << 20] {
        let mut s = Session::new("alice".into(), "/".into(), perms(&["write:*/*"]), 4096, 1);
        let (to_b, to_c) = client(&mut s, &input, step);
        assert_eq!(to_b, input, "step {step}");
        assert!(to_c.is_empty());
    }
    // One byte more than RabbitMQ accepts: 501 FRAME_ERROR, as before.
    let mut s = Session::new("alice".into(), "/".into(), perms(&[]), 4096, 1);
    let (_, _, to_c) = client_fails(&mut s, &bytes(AMQPFrame::Body(1, vec![0u8; 4097])));
    assert_eq!(connection_close(&to_c).reply_code, 501);
}

#[test]
fn expiry_closes_with_320_and_stops_relaying() {
    let mut s = session(&["write:*/*"]);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.expire(&mut to_c, &mut to_b);
    let close = connection_close(&drain(&mut to_c));
    assert_eq!(
        (close.reply_code, close.reply_text.as_str()),
        (320, "CONNECTION_FORCED - credential expired")
    );
    drain(&mut to_b);
    let (to_b, _) = client(&mut s, &channel_open(3), 1 << 20);
    assert!(to_b.is_empty(), "nothing is relayed after exp");
}

#[test]
fn unknown_exchange_type_is_looked_up_before_deciding() {
    let mut s = session(&["write:*/*"]).with_exchange_lookups();
    client(&mut s, &channel_open(1), 1 << 20);
    let msg = publish(1, "ext", "rk", b"body", None);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(&msg[..]);
    let ev = s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert_eq!(ev, ClientEvent::LookupExchange("ext".into()));
    assert!(to_b.is_empty() && s.client_paused());
    s.exchange_kind_learned("ext".into(), Some(ExchangeKind::Other));
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert_eq!(
        drain(&mut to_b),
        msg,
        "a direct exchange needs no topic scope"
    );

    // The same publish to a topic exchange is refused for want of a 3-part scope.
    s.forget_looked_up_kinds();
    let mut buf = BytesMut::from(&msg[..]);
    assert_eq!(
        s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap(),
        ClientEvent::LookupExchange("ext".into())
    );
    s.exchange_kind_learned("ext".into(), Some(ExchangeKind::Topic));
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    let sent = methods(&drain(&mut to_c));
    let AMQPClass::Channel(channel::AMQPMethod::Close(c)) = &sent[0].1 else {
        panic!("{sent:?}")
    };
    assert_eq!(
        c.reply_text.as_str(),
        "ACCESS_REFUSED - write access to topic 'rk' in exchange 'ext' in vhost '/' refused for user 'alice'"
    );
}

#[test]
fn undecodable_checked_methods_close_the_connection_instead_of_passing() {
    // basic.publish to amq.fanout with a routing key that is not UTF-8: RabbitMQ accepts
    // it, so forwarding it unchecked would let a read-only token publish.
    let mut payload = vec![0, 60, 0, 40, 0, 0];
    payload.push(10);
    payload.extend_from_slice(b"amq.fanout");
    payload.extend_from_slice(&[2, 0xff, 0xfe, 0]);
    let mut frame = BytesMut::new();
    frame::write_frame(&mut frame, frame::METHOD, 1, &payload);
    let mut s = session(&["read:*/*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let (_, to_b, to_c) = client_fails(&mut s, &frame);
    let c = connection_close(&to_c);
    assert_eq!((c.reply_code, c.class_id, c.method_id), (502, 60, 40));
    let to_backend = methods(&to_b);
    assert!(
        matches!(
            to_backend.as_slice(),
            [(0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))]
        ),
        "nothing of the publish reaches the broker: {to_backend:?}"
    );
    // The same for a checked method amq-protocol cannot decode (queue.declare, truncated).
    let mut s = session(&["read:*/*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let mut frame = BytesMut::new();
    frame::write_frame(&mut frame, frame::METHOD, 1, &[0, 50, 0, 10, 0, 0, 5, b'a']);
    client_fails(&mut s, &frame);
}

#[test]
fn only_the_content_header_may_follow_a_publish() {
    // Regression: the held publish let a body frame, or another method, overtake it to the
    // backend (which then saw a body without its method), and a second publish silently
    // replaced the first. RabbitMQ answers all of these with the same 505.
    let p = basic::Publish {
        exchange: "".into(),
        routing_key: "q".into(),
        mandatory: false,
        immediate: false,
    };
    let publish_method = method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p)));
    let body = bytes(AMQPFrame::Body(1, b"x".to_vec()));
    for (name, next) in [
        ("body", body),
        ("publish", publish_method.clone()),
        ("queue.declare", queue_declare(1, "q")),
    ] {
        let mut s = session(&["write:*/*", "configure:*/*"]);
        client(&mut s, &channel_open(1), 1 << 20);
        let (err, to_b, to_c) = client_fails(&mut s, &[publish_method.clone(), next].concat());
        assert!(
            matches!(err, SessionError::ExpectedContentHeader(1)),
            "{name}"
        );
        let c = methods(&to_c);
        let [(0, AMQPClass::Connection(connection::AMQPMethod::Close(close)))] = c.as_slice()
        else {
            panic!("{name}: {c:?}")
        };
        assert_eq!(
            (close.reply_code, close.class_id, close.method_id),
            (505, 60, 40),
            "{name}"
        );
        assert_eq!(
            close.reply_text.as_str(),
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
        );
        let b = methods(&to_b);
        assert!(
            matches!(
                b.as_slice(),
                [(0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))]
            ),
            "{name}: the backend gets only the gateway's close: {b:?}"
        );
    }
}

#[test]
fn close_ok_after_a_gateway_close_is_acknowledged_and_a_broker_close_is_not_doubled() {
    let mut s = session(&["write:*/*"]);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.expire(&mut to_c, &mut to_b);
    assert_eq!(s.gateway_closed(), (true, false));
    let mut ok = BytesMut::new();
    method::connection_close_ok(&mut ok);
    s.on_client_input(&mut ok, &mut to_b, &mut to_c).unwrap();
    assert_eq!(s.gateway_closed(), (true, true));

    // The broker closes first: the gateway relays that close and adds none of its own.
    let mut s = session(&["write:*/*"]);
    let mut close = BytesMut::new();
    method::connection_close(
        &mut close,
        320,
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        0,
        0,
    );
    let (forwarded, _) = backend(&mut s, &close);
    assert_eq!(forwarded, close.to_vec());
    let mut to_c = Outbox::default();
    assert!(
        !s.backend_lost(&mut to_c),
        "no second close after the broker's own"
    );
    assert!(to_c.is_empty());
}

/// A read full of publishes is forwarded as one chunk (one write), though each publish
/// method frame is held, cut out of the buffer, until its content header is checked.
#[test]
fn a_read_of_many_publishes_is_forwarded_as_one_chunk() {
    let mut s = session(&["write:*/*", "configure:*/*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    let mut input = Vec::new();
    for i in 0..500u32 {
        input.extend(publish(1, "", "q", &i.to_be_bytes(), None));
    }
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(&input[..]);
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert!(buf.is_empty(), "{} left", buf.len());
    assert!(to_c.is_empty(), "{:?}", methods(&drain(&mut to_c)));
    assert_eq!(to_b.chunk_count(), 1, "one contiguous chunk");
    assert_eq!(drain(&mut to_b), input, "byte for byte");

    // A refused publish in the middle splits the forwarded bytes around it.
    let mut s = session(&["write:*/amq.default", "configure:*/*"]);
    client(&mut s, &channel_open(1), 1 << 20);
    client(&mut s, &channel_open(2), 1 << 20);
    let mut input = publish(1, "", "q", b"a", None);
    input.extend(publish(2, "amq.direct", "nope", b"b", None));
    input.extend(publish(1, "", "q", b"c", None));
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(&input[..]);
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    let forwarded = drain(&mut to_b);
    assert!(forwarded.starts_with(&publish(1, "", "q", b"a", None)));
    assert!(
        forwarded.ends_with(&publish(1, "", "q", b"c", None)),
        "the refused publish is not forwarded, the next one is"
    );
    assert!(!forwarded.windows(4).any(|w| w == b"nope"));
    assert_eq!(
        methods(&drain(&mut to_c)).len(),
        1,
        "channel.close for channel 2"
    );
}
