//! Session tests: frames in, frames out, no sockets. Inputs are also fed in small pieces
//! to show that frame boundaries and read boundaries are independent. Each defect class of
//! the session (state from replies, duplicate keys, nesting, bounds, unnamed consumers,
//! large broker headers, backend identity, pipelining order) has its cases here; the same
//! attacks run end to end against RabbitMQ in `tests/integration/session_attacks.rs`.

use super::*;
use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, exchange, queue};
use amq_protocol::types::{FieldTable, ShortString};

fn perms(scopes: &[&str]) -> Permissions {
    Permissions::from_scopes(&scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

fn config() -> SessionConfig {
    SessionConfig {
        username: "alice".into(),
        service_user: "svc-gateway".into(),
        vhost: "/".into(),
        frame_max: 131_072,
        channel_max: 2047,
        limits: Limits::default(),
        seed: 7,
        epochs: ExchangeEpochs::new(),
        lookups: false,
        cancel_notify: true,
    }
}

fn session(scopes: &[&str]) -> Session {
    Session::new(config(), perms(scopes))
}

fn session_with(scopes: &[&str], f: impl FnOnce(&mut SessionConfig)) -> Session {
    let mut c = config();
    f(&mut c);
    Session::new(c, perms(scopes))
}

fn bytes(frame: AMQPFrame) -> Vec<u8> {
    cookie_factory::gen_simple(gen_frame(&frame), Vec::new()).unwrap()
}

fn method(ch: u16, m: AMQPClass) -> Vec<u8> {
    bytes(AMQPFrame::Method(ch, m))
}

fn raw_method(ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frame::write_frame(&mut b, frame::METHOD, ch, payload);
    b.to_vec()
}

fn channel_open(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
}

/// The client opens channel `ch` and the broker answers.
fn opened(s: &mut Session, ch: u16) {
    client(s, &channel_open(ch), 1 << 20);
    let ok = method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
    );
    assert_eq!(backend(s, &ok), ok);
}

fn channel_close(ch: u16, code: u16, text: &str) -> Vec<u8> {
    channel_close_for(ch, code, text, (50, 10))
}

/// A `channel.close` naming the method `(class, method)`.
fn channel_close_for(ch: u16, code: u16, text: &str, (class_id, method_id): (u16, u16)) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: code,
            reply_text: text.into(),
            class_id,
            method_id,
        })),
    )
}

fn close_ok(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
}

fn queue_declare_with(ch: u16, name: &str, passive: bool, nowait: bool) -> Vec<u8> {
    let d = queue::Declare {
        queue: ShortString::from(name),
        passive,
        nowait,
        arguments: FieldTable::default(),
        ..Default::default()
    };
    method(ch, AMQPClass::Queue(queue::AMQPMethod::Declare(d)))
}

fn queue_declare(ch: u16, name: &str) -> Vec<u8> {
    queue_declare_with(ch, name, false, false)
}

fn declare_ok(ch: u16, name: &str) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
            queue: name.into(),
            message_count: 0,
            consumer_count: 0,
        })),
    )
}

fn exchange_declare(ch: u16, name: &str, kind: &str) -> Vec<u8> {
    let d = exchange::Declare {
        exchange: name.into(),
        kind: kind.into(),
        arguments: FieldTable::default(),
        ..Default::default()
    };
    method(ch, AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)))
}

fn exchange_declare_ok(ch: u16) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
    )
}

fn queue_bind(ch: u16, q: &str, x: &str, rk: &str) -> Vec<u8> {
    let b = queue::Bind {
        queue: q.into(),
        exchange: x.into(),
        routing_key: rk.into(),
        nowait: false,
        arguments: FieldTable::default(),
    };
    method(ch, AMQPClass::Queue(queue::AMQPMethod::Bind(b)))
}

fn basic_get(ch: u16, q: &str) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: q.into(),
            no_ack: true,
        })),
    )
}

fn consume(ch: u16, q: &str, tag: &str, nowait: bool) -> Vec<u8> {
    consume_with(ch, q, tag, nowait, true)
}

fn consume_with(ch: u16, q: &str, tag: &str, nowait: bool, no_ack: bool) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.into(),
            consumer_tag: tag.into(),
            no_local: false,
            no_ack,
            exclusive: false,
            nowait,
            arguments: FieldTable::default(),
        })),
    )
}

fn consume_ok(ch: u16, tag: &str) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: tag.into(),
        })),
    )
}

fn cancel_ok(ch: u16, tag: &str) -> Vec<u8> {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
            consumer_tag: tag.into(),
        })),
    )
}

/// A `basic.deliver` for `tag` with its content header and one body frame.
fn delivery(ch: u16, tag: &str, delivery_tag: u64, body: &[u8]) -> Vec<u8> {
    let mut out = method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
        })),
    );
    out.extend(header_with_raw_headers(ch, body.len() as u64, &[]));
    out.extend(bytes(AMQPFrame::Body(ch, body.to_vec())));
    out
}

fn publish_method(ch: u16, exchange: &str, rk: &str) -> Vec<u8> {
    let p = basic::Publish {
        exchange: exchange.into(),
        routing_key: rk.into(),
        mandatory: false,
        immediate: false,
    };
    method(ch, AMQPClass::Basic(basic::AMQPMethod::Publish(p)))
}

fn publish(ch: u16, exchange: &str, rk: &str, body: &[u8], user_id: Option<&str>) -> Vec<u8> {
    let mut v = publish_method(ch, exchange, rk);
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

/// A content header whose properties are `headers` only, given as raw table entries.
fn header_with_raw_headers(ch: u16, body_size: u64, entries: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&body_size.to_be_bytes());
    p.extend_from_slice(&(1u16 << 13).to_be_bytes());
    p.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    p.extend_from_slice(entries);
    let mut b = BytesMut::new();
    frame::write_frame(&mut b, frame::HEADER, ch, &p);
    b.to_vec()
}

/// Raw table entries: (key, type, value bytes), duplicates allowed.
fn entries(list: &[(&str, u8, Vec<u8>)]) -> Vec<u8> {
    let mut e = Vec::new();
    for (k, t, v) in list {
        e.push(k.len() as u8);
        e.extend_from_slice(k.as_bytes());
        e.push(*t);
        e.extend_from_slice(v);
    }
    e
}

fn longstr(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// An array of long strings, as the value bytes of an `A` entry.
fn array_of(items: &[&str]) -> Vec<u8> {
    let mut a = Vec::new();
    for i in items {
        a.push(b'S');
        a.extend(longstr(i.as_bytes()));
    }
    longstr(&a)
}

/// `queue.declare` (or passive) with raw argument table entries.
fn queue_declare_raw(ch: u16, name: &str, bits: u8, args: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 50, 0, 10, 0, 0, name.len() as u8];
    p.extend_from_slice(name.as_bytes());
    p.push(bits);
    p.extend(longstr(args));
    raw_method(ch, &p)
}

fn exchange_declare_raw(ch: u16, name: &str, kind: &str, args: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 40, 0, 10, 0, 0, name.len() as u8];
    p.extend_from_slice(name.as_bytes());
    p.push(kind.len() as u8);
    p.extend_from_slice(kind.as_bytes());
    p.push(0);
    p.extend(longstr(args));
    raw_method(ch, &p)
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
    while let Some(h) = frame::check(rest, 1 << 24).unwrap() {
        if h.frame_type == frame::METHOD {
            let (_, m) = amq_protocol::protocol::parse_class(frame::payload(rest, &h)).unwrap();
            v.push((h.channel, m));
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

/// Feeds client bytes at once; returns the event, what went to the backend and to the
/// client, and what is left unprocessed.
fn client_event(s: &mut Session, input: &[u8]) -> (ClientEvent, Vec<u8>, Vec<u8>, Vec<u8>) {
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(input);
    let ev = s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    (ev, drain(&mut to_b), drain(&mut to_c), buf.to_vec())
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

/// The `channel.close` on `ch` among the frames in `buf`: code, text, class, method.
fn channel_closed(buf: &[u8], ch: u16) -> (u16, String, u16, u16) {
    methods(buf)
        .into_iter()
        .find_map(|(c, m)| match m {
            AMQPClass::Channel(channel::AMQPMethod::Close(x)) if c == ch => Some((
                x.reply_code,
                x.reply_text.to_string(),
                x.class_id,
                x.method_id,
            )),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no channel.close on {ch}: {:?}", methods(buf)))
}

fn backend(s: &mut Session, input: &[u8]) -> Vec<u8> {
    let mut to_c = Outbox::default();
    let mut buf = BytesMut::from(input);
    s.on_backend_input(&mut buf, &mut to_c).unwrap();
    assert!(buf.is_empty(), "backend input left over");
    drain(&mut to_c)
}

/// The broker closes channel `ch` with an error (a 404 for a missing queue).
fn broker_closed(s: &mut Session, ch: u16) -> Vec<u8> {
    backend(
        s,
        &channel_close(ch, 404, "NOT_FOUND - no queue 'x' in vhost '/'"),
    )
}

fn is_backend_close(buf: &[u8], ch: u16) -> bool {
    matches!(
        methods(buf).as_slice(),
        [(c, AMQPClass::Channel(channel::AMQPMethod::Close(_)))] if *c == ch
    )
}

/// Refuses on channel `ch`: the gateway's own close went to the backend; the broker
/// answers it; returns what the client got then.
fn broker_accepts_close(s: &mut Session, ch: u16) -> Vec<u8> {
    backend(s, &close_ok(ch))
}

const ALL: [&str; 3] = ["configure:*/*", "write:*/*", "read:*/*"];

// ------------------------------------------------------------------ basics, ported

#[test]
fn permitted_frames_are_forwarded_byte_for_byte() {
    for step in [1, 7, 100, 1 << 20] {
        let mut s = session(&ALL);
        let mut input = channel_open(1);
        input.extend(queue_declare(1, "q"));
        input.extend(publish(1, "", "q", &[42u8; 2500], Some("alice")));
        let (to_b, to_c) = client(&mut s, &input, step);
        assert_eq!(to_b, input, "step {step}");
        assert!(to_c.is_empty());
    }
}

#[test]
fn a_denial_reaches_the_client_after_the_broker_has_closed_its_channel() {
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let mut input = queue_declare(1, "q");
    input.extend(publish(1, "", "q", b"pipelined", None)); // discarded: channel is closing
    let (to_b, to_c) = client(&mut s, &input, 3);
    assert!(
        to_c.is_empty(),
        "the client is told once the broker answers"
    );
    assert!(is_backend_close(&to_b, 1), "{:?}", methods(&to_b));
    assert_eq!(s.take_denials().len(), 1);

    // Replies to earlier methods still reach the client, then the refusal.
    let mut from_b = declare_ok(1, "earlier");
    from_b.extend(channel_open(2)); // another channel's frame passes
    let to_c = backend(&mut s, &from_b);
    assert_eq!(to_c, from_b);
    let to_c = broker_accepts_close(&mut s, 1);
    assert_eq!(
        channel_closed(&to_c, 1),
        (
            403,
            "ACCESS_REFUSED - configure access to queue 'q' in vhost '/' refused for user 'alice'"
                .into(),
            50,
            10
        )
    );
    // The client answers close-ok and reopens at once: the broker is done, so it goes.
    let mut input = close_ok(1);
    input.extend(channel_open(1));
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert_eq!(to_b, channel_open(1));
}

#[test]
fn an_earlier_pipelined_failure_wins_over_the_gateways_refusal() {
    // RabbitMQ processes a channel's methods in order: a failing basic.get before a
    // refused declare gives the client the 404, not the 403.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let mut input = basic_get(1, "missing");
    input.extend(queue_declare(1, "forbidden"));
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(to_c.is_empty());
    assert!(to_b.starts_with(&basic_get(1, "missing")));
    // The broker's 404 for the get arrives, then its close-ok for the gateway's close.
    let not_found = channel_close(1, 404, "NOT_FOUND - no queue 'missing' in vhost '/'");
    assert_eq!(backend(&mut s, &not_found), not_found);
    assert!(broker_accepts_close(&mut s, 1).is_empty(), "swallowed");
    // The client answers the 404; the channel is then free again.
    let (to_b, _) = client(&mut s, &close_ok(1), 1 << 20);
    assert_eq!(to_b, close_ok(1));
    let (to_b, _) = client(&mut s, &channel_open(1), 1 << 20);
    assert_eq!(to_b, channel_open(1));
}

#[test]
fn a_refusal_still_waiting_for_the_broker_is_told_before_its_connection_close() {
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 2);
    let (to_b, to_c) = client(&mut s, &queue_declare(2, "forbidden"), 1 << 20);
    assert!(to_c.is_empty() && is_backend_close(&to_b, 2));
    // A frame on a channel the broker does not know ends the connection first.
    let close = bytes(AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 504,
            reply_text: "CHANNEL_ERROR - expected 'channel.open'".into(),
            class_id: 50,
            method_id: 50,
        })),
    ));
    let to_c = backend(&mut s, &close);
    let sent = methods(&to_c);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(channel_closed(&to_c, 2).0, 403);
    assert!(to_c.ends_with(&close), "the broker's close comes last");
    // Nothing more reaches the client about the channel.
    assert!(backend(&mut s, &close_ok(2)).is_empty());
}

#[test]
fn a_second_close_for_the_previous_incarnation_does_not_end_the_next() {
    // RabbitMQ 3.10.8 closes a channel a second time for a `""` method it dropped while
    // closing; that close may come after the client's close-ok and reopen, before the
    // new open-ok. It must not cancel the refusal pending in the new incarnation.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let gone = channel_close(1, 404, "NOT_FOUND - no queue 'q' in vhost '/'");
    assert_eq!(backend(&mut s, &gone), gone);
    let mut input = close_ok(1);
    input.extend(channel_open(1));
    input.extend(queue_declare(1, "forbidden"));
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(to_c.is_empty());
    assert!(
        matches!(
            methods(&to_b).last(),
            Some((1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) if c.reply_code == 200
        ),
        "{:?}",
        methods(&to_b)
    );
    let stale = channel_close(1, 404, "NOT_FOUND - no previously declared queue");
    assert_eq!(
        backend(&mut s, &stale),
        stale,
        "relayed as RabbitMQ sent it"
    );
    let ok = method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
    );
    assert_eq!(backend(&mut s, &ok), ok);
    let to_c = broker_accepts_close(&mut s, 1);
    assert_eq!(channel_closed(&to_c, 1).0, 403);
}

#[test]
fn a_client_close_during_a_refusal_is_answered_with_it() {
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let mut input = queue_declare(1, "q");
    input.extend(channel_close(1, 200, "bye"));
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(is_backend_close(&to_b, 1) && to_c.is_empty());
    let to_c = broker_accepts_close(&mut s, 1);
    let sent = methods(&to_c);
    assert!(
        matches!(
            sent.as_slice(),
            [
                (1, AMQPClass::Channel(channel::AMQPMethod::Close(_))),
                (1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
            ]
        ),
        "{sent:?}"
    );
}

#[test]
fn publish_is_held_until_its_header_then_checked() {
    let mut s = session(&["write:*/*"]);
    opened(&mut s, 1);
    let msg = publish(1, "", "q", b"hello", Some("mallory"));
    let (to_b, to_c) = client(&mut s, &msg, 5);
    assert!(
        is_backend_close(&to_b, 1),
        "nothing of a refused publish reaches the backend, only the gateway's close"
    );
    assert!(to_c.is_empty());
    let to_c = broker_accepts_close(&mut s, 1);
    assert_eq!(
        channel_closed(&to_c, 1),
        (
            406,
            "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'alice'".into(),
            60,
            40
        )
    );
}

#[test]
fn impersonator_tag_allows_user_id() {
    let mut s = session(&["write:*/*", "tag:impersonator"]);
    opened(&mut s, 1);
    let msg = publish(1, "", "q", b"hello", Some("mallory"));
    let (to_b, _) = client(&mut s, &msg, 9);
    assert_eq!(to_b, msg);
}

#[test]
fn user_id_is_compared_as_bytes() {
    // A user_id that is not UTF-8 and whose lossy text equals the user name is still
    // someone else (RabbitMQ compares binaries).
    let mut s = session_with(&["write:*/*"], |c| c.username = "a\u{fffd}".into());
    opened(&mut s, 1);
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&1u64.to_be_bytes());
    p.extend_from_slice(&(1u16 << 4).to_be_bytes());
    p.extend_from_slice(&[2, b'a', 0xff]);
    let mut hdr = BytesMut::new();
    frame::write_frame(&mut hdr, frame::HEADER, 1, &p);
    let mut input = publish_method(1, "", "q");
    input.extend_from_slice(&hdr);
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    assert_eq!(channel_closed(&broker_accepts_close(&mut s, 1), 1).0, 406);
}

#[test]
fn server_named_queue_needs_configure_on_amq_gen() {
    let mut s = session(&["configure:*/amq.gen-*"]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &queue_declare(1, ""), 1 << 20);
    assert_eq!(to_b, queue_declare(1, ""));
    let mut s = session(&["configure:*/app-*"]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &queue_declare(1, ""), 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    let (code, text, ..) = channel_closed(&broker_accepts_close(&mut s, 1), 1);
    assert_eq!(code, 403);
    assert!(text.contains("queue 'amq.gen-"), "{text}");
}

#[test]
fn oversized_client_frame_is_a_frame_error() {
    let mut s = session_with(&[], |c| c.frame_max = 4096);
    let (_, _, to_c) = client_fails(&mut s, &[3u8, 0, 1, 0, 0, 0x20, 0]);
    assert_eq!(connection_close(&to_c).reply_code, 501);
}

/// Regression (rabbitmq-client 5.0.8, frameMax 8192): body frames with a payload of exactly
/// frame_max bytes, frame_max + 8 on the wire, which RabbitMQ accepts (?FRAME_SIZE_FUDGE).
#[test]
fn client_body_frames_of_frame_max_payload_are_forwarded() {
    let body = vec![7u8; 2 * 4096 + 10];
    let mut input = channel_open(1);
    input.extend(publish_method(1, "", "q"));
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
    let first_body = input.len() - (4096 + 8) * 2 - (10 + 8);
    assert_eq!(
        &input[first_body..first_body + 7],
        &[3, 0, 1, 0, 0, 0x10, 0]
    );
    for step in [1, 100, 4104, 1 << 20] {
        let mut s = session_with(&["write:*/*"], |c| c.frame_max = 4096);
        let (to_b, to_c) = client(&mut s, &input, step);
        assert_eq!(to_b, input, "step {step}");
        assert!(to_c.is_empty());
    }
    let mut s = session_with(&[], |c| c.frame_max = 4096);
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
fn close_ok_after_a_gateway_close_is_acknowledged_and_a_broker_close_is_not_doubled() {
    let mut s = session(&["write:*/*"]);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.expire(&mut to_c, &mut to_b);
    assert_eq!(s.gateway_closed(), (true, false));
    let mut ok = BytesMut::new();
    method::connection_close_ok(&mut ok);
    s.on_client_input(&mut ok, &mut to_b, &mut to_c).unwrap();
    assert_eq!(s.gateway_closed(), (true, true));

    let mut s = session(&["write:*/*"]);
    let mut close = BytesMut::new();
    method::connection_close(
        &mut close,
        320,
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
        0,
        0,
    );
    assert_eq!(backend(&mut s, &close), close.to_vec());
    let mut to_c = Outbox::default();
    assert!(
        !s.backend_lost(&mut to_c),
        "no second close after the broker's own"
    );
    assert!(to_c.is_empty());
    // The client's close-ok goes to the broker; nothing else does any more.
    let mut ok = BytesMut::new();
    method::connection_close_ok(&mut ok);
    let mut input = channel_open(5);
    input.extend_from_slice(&ok);
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert_eq!(to_b, ok.to_vec());
}

/// A read full of publishes is forwarded as one chunk (one write), though each publish
/// method frame is held, cut out of the buffer, until its content header is checked.
#[test]
fn a_read_of_many_publishes_is_forwarded_as_one_chunk() {
    let mut s = session(&["write:*/*", "configure:*/*"]);
    opened(&mut s, 1);
    let mut input = Vec::new();
    for i in 0..500u32 {
        input.extend(publish(1, "", "q", &i.to_be_bytes(), None));
    }
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut buf = BytesMut::from(&input[..]);
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert!(buf.is_empty(), "{} left", buf.len());
    assert!(to_c.is_empty());
    assert_eq!(to_b.chunk_count(), 1, "one contiguous chunk");
    assert_eq!(drain(&mut to_b), input, "byte for byte");

    // A refused publish in the middle splits the forwarded bytes around it.
    let mut s = session(&["write:*/amq.default", "configure:*/*"]);
    opened(&mut s, 1);
    opened(&mut s, 2);
    let mut input = publish(1, "", "q", b"a", None);
    input.extend(publish(2, "amq.direct", "nope", b"b", None));
    input.extend(publish(1, "", "q", b"c", None));
    let (forwarded, _) = client(&mut s, &input, 1 << 20);
    assert!(forwarded.starts_with(&publish(1, "", "q", b"a", None)));
    assert!(forwarded.ends_with(&publish(1, "", "q", b"c", None)));
    assert!(!forwarded.windows(4).any(|w| w == b"nope"));
}

// -------------------------------- class 1: state follows what the client sent, in order

#[test]
fn a_failed_nowait_declare_leaves_no_queue_declared() {
    // RabbitMQ sets the most recently declared queue only when the declare succeeds: after
    // a failed passive nowait declare, its closing channel answers `""` with a second 404.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let mut input = queue_declare_with(1, "missing", true, true);
    input.extend(method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "".into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
    ));
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(to_c.is_empty());
    assert!(to_b.starts_with(&queue_declare_with(1, "missing", true, false)));
    let gone = channel_close(1, 404, "NOT_FOUND - no queue 'missing' in vhost '/'");
    let mut to_c = backend(&mut s, &gone);
    // The second 404 comes once the broker has answered the gateway's close.
    to_c.extend(backend(&mut s, &close_ok(1)));
    let closes: Vec<_> = methods(&to_c)
        .into_iter()
        .map(|(_, m)| match m {
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => (
                c.reply_code,
                c.reply_text.to_string(),
                c.class_id,
                c.method_id,
            ),
            m => panic!("{m:?}"),
        })
        .collect();
    assert_eq!(
        closes,
        [
            (
                404,
                "NOT_FOUND - no queue 'missing' in vhost '/'".into(),
                50,
                10
            ),
            (
                404,
                "NOT_FOUND - no previously declared queue".into(),
                50,
                40
            )
        ]
    );
}

#[test]
fn empty_queue_name_means_the_queue_declared_last_when_the_declare_was_processed() {
    // A passive nowait declare gets no reply, yet RabbitMQ sets the channel's most
    // recently declared queue when it processes it.
    let scopes = [
        "configure:*/mine-*",
        "write:*/mine-*",
        "read:*/mine-*",
        "write:*/secret-*",
    ];
    for (method_frame, ids) in [
        (basic_get(1, ""), (60, 70)),
        (
            method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                    queue: "".into(),
                    nowait: false,
                })),
            ),
            (50, 30),
        ),
    ] {
        let mut s = session(&scopes);
        opened(&mut s, 1);
        client(&mut s, &queue_declare(1, "mine-1"), 1 << 20);
        backend(&mut s, &declare_ok(1, "mine-1"));
        let mut input = queue_declare_with(1, "secret-1", true, true);
        input.extend(method_frame);
        let (to_b, _) = client(&mut s, &input, 1 << 20);
        // Sent without nowait: its declare-ok tells the gateway it succeeded, and is
        // kept from the client.
        assert!(to_b.starts_with(&queue_declare_with(1, "secret-1", true, false)));
        assert!(backend(&mut s, &declare_ok(1, "secret-1")).is_empty());
        let to_c = broker_accepts_close(&mut s, 1);
        assert_eq!(
            channel_closed(&to_c, 1),
            (
                403,
                "ACCESS_REFUSED - read access to queue 'secret-1' in vhost '/' refused for user 'alice'".into(),
                ids.0,
                ids.1
            )
        );
    }
}

#[test]
fn empty_queue_name_without_a_declare_is_the_brokers_404() {
    let mut s = session(&[]);
    opened(&mut s, 1);
    let (to_b, to_c) = client(&mut s, &basic_get(1, ""), 1 << 20);
    assert_eq!(
        to_b,
        basic_get(1, ""),
        "nothing to check: the broker refuses"
    );
    assert!(to_c.is_empty());
}

#[test]
fn a_server_named_queue_is_resolved_from_its_own_declare_ok() {
    let mut s = session(&["configure:*/amq.gen-*", "read:*/amq.gen-real*"]);
    opened(&mut s, 1);
    let mut input = queue_declare(1, "");
    input.extend(basic_get(1, ""));
    let (ev, to_b, _, rest) = client_event(&mut s, &input);
    assert_eq!(ev, ClientEvent::None);
    assert_eq!(to_b, queue_declare(1, ""));
    assert_eq!(rest, basic_get(1, ""), "the get waits for the name");
    assert!(s.client_paused());
    let to_c = backend(&mut s, &declare_ok(1, "amq.gen-realname"));
    assert_eq!(to_c, declare_ok(1, "amq.gen-realname"));
    assert!(!s.client_paused());
    let (to_b, _) = client(&mut s, &rest, 1 << 20);
    assert_eq!(to_b, basic_get(1, ""), "read on amq.gen-real*: permitted");

    // With the name not readable, the refusal names the queue the broker chose.
    let mut s = session(&["configure:*/amq.gen-*"]);
    opened(&mut s, 1);
    let (_, _, _, rest) = client_event(&mut s, &[queue_declare(1, ""), basic_get(1, "")].concat());
    backend(&mut s, &declare_ok(1, "amq.gen-xyz"));
    client(&mut s, &rest, 1 << 20);
    let (_, text, ..) = channel_closed(&broker_accepts_close(&mut s, 1), 1);
    assert!(
        text.contains("read access to queue 'amq.gen-xyz'"),
        "{text}"
    );
}

#[test]
fn a_nowait_server_named_declare_is_asked_for_its_name_and_the_answer_kept_back() {
    let mut s = session(&["configure:*/amq.gen-*", "read:*/amq.gen-*"]);
    opened(&mut s, 1);
    let nowait = queue_declare_with(1, "", false, true);
    let (_, to_b, _, _) = client_event(&mut s, &nowait);
    assert_eq!(
        to_b,
        queue_declare_with(1, "", false, false),
        "nowait cleared"
    );
    let to_c = backend(&mut s, &declare_ok(1, "amq.gen-hidden"));
    assert!(to_c.is_empty(), "the client asked for no reply");
    let (to_b, _) = client(&mut s, &consume(1, "", "c1", false), 1 << 20);
    assert_eq!(to_b, consume(1, "", "c1", false));
    // The consumer is known under the real name.
    assert_eq!(s.held().1, 1);
}

#[test]
fn the_routing_key_shortcut_is_topic_checked_with_the_queues_name() {
    let mut s = session(&[
        "configure:*/q-*",
        "write:*/q-*",
        "read:*/q-*",
        "read:%2F/amq.topic/",
    ]);
    opened(&mut s, 1);
    client(&mut s, &queue_declare(1, "q-1"), 1 << 20);
    let (to_b, _) = client(&mut s, &queue_bind(1, "", "amq.topic", ""), 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    assert_eq!(
        channel_closed(&broker_accepts_close(&mut s, 1), 1),
        (
            403,
            "ACCESS_REFUSED - read access to topic 'q-1' in exchange 'amq.topic' in vhost '/' refused for user 'alice'".into(),
            50,
            20
        )
    );
    // A named queue with an empty key binds with the empty key: permitted.
    let mut s = session(&["write:*/q-*", "read:%2F/amq.topic/"]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &queue_bind(1, "q-1", "amq.topic", ""), 1 << 20);
    assert_eq!(to_b, queue_bind(1, "q-1", "amq.topic", ""));
}

#[test]
fn an_exchange_type_is_learnt_only_from_its_own_declare_ok() {
    // Two pipelined declares: the first succeeds, the second (an existing topic exchange
    // declared as direct) fails. The first declare-ok must not teach the second's type.
    let mut s = session(&["configure:*/*", "write:*/*", "read:*/*"]);
    opened(&mut s, 1);
    opened(&mut s, 2);
    let mut input = exchange_declare(1, "xd", "direct");
    input.extend(exchange_declare(1, "xt", "direct"));
    client(&mut s, &input, 1 << 20);
    backend(&mut s, &exchange_declare_ok(1));
    backend(
        &mut s,
        &channel_close(1, 406, "PRECONDITION_FAILED - inequivalent arg 'type'"),
    );
    let (to_b, _) = client(&mut s, &publish(2, "xt", "k", b"x", None), 1 << 20);
    assert!(is_backend_close(&to_b, 2), "xt is unknown: topic-checked");
    let (to_b, _) = client(
        &mut s,
        &[channel_open(3), publish(3, "xd", "k", b"x", None)].concat(),
        1 << 20,
    );
    assert_eq!(
        to_b,
        [channel_open(3), publish(3, "xd", "k", b"x", None)].concat(),
        "xd was learnt: direct"
    );
}

#[test]
fn a_declare_or_delete_on_another_connection_voids_a_learnt_type() {
    let epochs = ExchangeEpochs::new();
    let mut a = session_with(&ALL, |c| c.epochs = epochs.clone());
    let mut b = session_with(&ALL, |c| c.epochs = epochs.clone());
    client(&mut a, &channel_open(1), 1 << 20);
    client(&mut a, &exchange_declare(1, "x", "direct"), 1 << 20);
    backend(&mut a, &exchange_declare_ok(1));
    let (to_b, _) = client(&mut a, &publish(1, "x", "k", b"1", None), 1 << 20);
    assert_eq!(to_b, publish(1, "x", "k", b"1", None));
    // Connection b deletes it and declares it as a topic exchange.
    client(&mut b, &channel_open(1), 1 << 20);
    let delete = method(
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: "x".into(),
            if_unused: false,
            nowait: false,
        })),
    );
    client(&mut b, &delete, 1 << 20);
    let (to_b, _) = client(&mut a, &publish(1, "x", "k", b"2", None), 1 << 20);
    assert!(is_backend_close(&to_b, 1), "no longer known: fail closed");
}

#[test]
fn a_type_lookup_is_asked_only_when_the_topic_check_fails_on_permissions() {
    let lookups = |c: &mut SessionConfig| c.lookups = true;
    // No write permission: refused without a lookup.
    let mut s = session_with(&["read:*/*"], lookups);
    opened(&mut s, 1);
    let (ev, to_b, ..) = client_event(&mut s, &publish(1, "ext", "rk", b"b", None));
    assert_eq!(ev, ClientEvent::None);
    assert!(is_backend_close(&to_b, 1));
    // A 3-part scope that grants the key: permitted whatever the type, no lookup.
    let mut s = session_with(&["write:*/*/rk"], lookups);
    opened(&mut s, 1);
    let (ev, to_b, ..) = client_event(&mut s, &publish(1, "ext", "rk", b"b", None));
    assert_eq!(ev, ClientEvent::None);
    assert_eq!(to_b, publish(1, "ext", "rk", b"b", None));
    // A 2-part write scope: the type decides.
    let mut s = session_with(&["write:*/*"], lookups);
    opened(&mut s, 1);
    let msg = publish(1, "ext", "rk", b"body", None);
    let (ev, to_b, _, rest) = client_event(&mut s, &msg);
    assert_eq!(ev, ClientEvent::LookupExchange("ext".into()));
    assert!(to_b.is_empty() && s.client_paused());
    s.exchange_kind_learned("ext".into(), Some(ExchangeKind::Other));
    let (_, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(to_b, msg, "a direct exchange needs no topic scope");
    // Forgotten after the time to live; a topic exchange then needs a 3-part scope.
    s.forget_looked_up_kinds();
    let (ev, _, _, rest) = client_event(&mut s, &msg);
    assert_eq!(ev, ClientEvent::LookupExchange("ext".into()));
    s.exchange_kind_learned("ext".into(), Some(ExchangeKind::Topic));
    let (_, to_b, ..) = client_event(&mut s, &rest);
    assert!(is_backend_close(&to_b, 1));
    let (_, text, ..) = channel_closed(&broker_accepts_close(&mut s, 1), 1);
    assert_eq!(
        text,
        "ACCESS_REFUSED - write access to topic 'rk' in exchange 'ext' in vhost '/' refused for user 'alice'"
    );
}

#[test]
fn a_type_declared_earlier_on_the_channel_is_awaited_not_looked_up() {
    // RabbitMQ runs the bind after the declare: its declare-ok tells the type, where a
    // lookup now would race with the broker creating the exchange.
    let mut s = session_with(&ALL, |c| c.lookups = true);
    opened(&mut s, 1);
    let mut input = exchange_declare(1, "xh", "headers");
    let bind = queue_bind(1, "q", "xh", "#");
    input.extend_from_slice(&bind);
    let (ev, to_b, _, rest) = client_event(&mut s, &input);
    assert_eq!(ev, ClientEvent::None, "no lookup");
    assert_eq!(to_b, exchange_declare(1, "xh", "headers"));
    assert!(s.client_paused());
    assert_eq!(
        backend(&mut s, &exchange_declare_ok(1)),
        exchange_declare_ok(1)
    );
    assert!(!s.client_paused());
    let (ev, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(ev, ClientEvent::None);
    assert_eq!(to_b, bind, "a headers exchange needs no topic scope");
    // Declared as a topic exchange: the topic check applies.
    let mut s = session_with(&["configure:*/*", "write:*/*", "read:*/*"], |c| {
        c.lookups = true
    });
    opened(&mut s, 1);
    let mut input = exchange_declare(1, "xt", "topic");
    input.extend(queue_bind(1, "q", "xt", "#"));
    let (_, _, _, rest) = client_event(&mut s, &input);
    backend(&mut s, &exchange_declare_ok(1));
    let (ev, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(ev, ClientEvent::None);
    assert!(is_backend_close(&to_b, 1));
}

// ------------------------------------------------- class 2: duplicate keys, first wins

#[test]
fn duplicate_cc_and_bcc_keys_are_read_first_entry_first() {
    for key in ["CC", "BCC"] {
        let mut s = session(&["write:%2F/amq.topic/ok.*"]);
        opened(&mut s, 1);
        let headers = entries(&[
            (key, b'A', array_of(&["forbidden"])),
            (key, b'A', array_of(&["ok.2"])),
        ]);
        let mut input = publish_method(1, "amq.topic", "ok.1");
        input.extend(header_with_raw_headers(1, 0, &headers));
        let (to_b, _) = client(&mut s, &input, 1 << 20);
        assert!(is_backend_close(&to_b, 1), "{key}");
        let (_, text, ..) = channel_closed(&broker_accepts_close(&mut s, 1), 1);
        assert!(text.contains("topic 'forbidden'"), "{key}: {text}");
        // The other order passes (the first entry grants).
        let mut s = session(&["write:%2F/amq.topic/ok.*"]);
        opened(&mut s, 1);
        let headers = entries(&[
            (key, b'A', array_of(&["ok.2"])),
            (key, b'A', array_of(&["forbidden"])),
        ]);
        let mut input = publish_method(1, "amq.topic", "ok.1");
        input.extend(header_with_raw_headers(1, 0, &headers));
        let (to_b, _) = client(&mut s, &input, 1 << 20);
        assert_eq!(to_b, input, "{key}");
    }
}

#[test]
fn cc_elements_that_are_not_long_strings_are_not_routes() {
    // RabbitMQ routes only the long-string elements of CC; others are ignored.
    let mut s = session(&["write:%2F/amq.topic/ok.*"]);
    opened(&mut s, 1);
    let mut arr = vec![b'I'];
    arr.extend_from_slice(&7i32.to_be_bytes());
    arr.push(b'S');
    arr.extend(longstr(b"ok.x"));
    let headers = entries(&[("CC", b'A', longstr(&arr))]);
    let mut input = publish_method(1, "amq.topic", "ok.1");
    input.extend(header_with_raw_headers(1, 0, &headers));
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert_eq!(to_b, input);
}

#[test]
fn duplicate_dead_letter_and_alternate_exchanges_are_read_first_entry_first() {
    let scopes = [
        "configure:*/q-*",
        "read:*/q-*",
        "configure:*/x-*",
        "read:*/x-*",
        "write:*/allowed",
    ];
    let dlx = entries(&[
        ("x-dead-letter-exchange", b'S', longstr(b"forbidden")),
        ("x-dead-letter-exchange", b'S', longstr(b"allowed")),
    ]);
    let ae = entries(&[
        ("alternate-exchange", b'S', longstr(b"forbidden")),
        ("alternate-exchange", b'S', longstr(b"allowed")),
    ]);
    for (frame_bytes, ids) in [
        (queue_declare_raw(1, "q-1", 0, &dlx), (50, 10)),
        (exchange_declare_raw(1, "x-1", "direct", &ae), (40, 10)),
    ] {
        let mut s = session(&scopes);
        opened(&mut s, 1);
        let (to_b, _) = client(&mut s, &frame_bytes, 1 << 20);
        assert!(is_backend_close(&to_b, 1));
        assert_eq!(
            channel_closed(&broker_accepts_close(&mut s, 1), 1),
            (
                403,
                "ACCESS_REFUSED - write access to exchange 'forbidden' in vhost '/' refused for user 'alice'".into(),
                ids.0,
                ids.1
            )
        );
    }
    // Not a long string: RabbitMQ refuses the argument itself (406), nothing to check.
    let mut s = session(&scopes);
    opened(&mut s, 1);
    let mut v = vec![];
    v.extend_from_slice(&5i16.to_be_bytes());
    let odd = entries(&[("x-dead-letter-exchange", b's', v)]);
    let f = queue_declare_raw(1, "q-2", 0, &odd);
    let (to_b, _) = client(&mut s, &f, 1 << 20);
    assert_eq!(to_b, f);
}

// --------------------------------------------------------------- class 3: no recursion

/// An array nested `depth` levels deep: level i holds the 5 bytes of each level inside it.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 * depth);
    for i in 0..depth {
        v.push(b'A');
        v.extend_from_slice(&((5 * (depth - 1 - i)) as u32).to_be_bytes());
    }
    v
}

#[test]
fn deeply_nested_arguments_and_headers_are_relayed_without_recursion() {
    // 26,000 levels fill a 128 KiB frame; each level costs 5 bytes.
    let nest = nested_arrays(26_000);
    let mut args = vec![5u8];
    args.extend_from_slice(b"x-foo");
    args.extend_from_slice(&nest);
    let declare = queue_declare_raw(1, "q-deep", 0, &args);
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let (to_b, to_c) = client(&mut s, &declare, 1 << 20);
    assert_eq!(to_b, declare);
    assert!(to_c.is_empty());

    let mut headers = vec![5u8];
    headers.extend_from_slice(b"x-foo");
    headers.extend_from_slice(&nested_arrays(20_000));
    let mut input = publish_method(1, "", "q");
    input.extend(header_with_raw_headers(1, 0, &headers));
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert_eq!(to_b, input);
}

// ----------------------------------------------------------------------- class 4: bounds

#[test]
fn a_publish_with_trailing_bytes_is_refused_as_rabbitmq_refuses_it() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let mut p = vec![0, 60, 0, 40, 0, 0, 0, 1, b'q', 0];
    p.extend_from_slice(&[0u8; 100_000]);
    let (to_b, to_c) = client(&mut s, &raw_method(1, &p), 1 << 20);
    let close = connection_close(&to_c);
    assert_eq!(
        (close.reply_code, close.class_id, close.method_id),
        (501, 60, 40)
    );
    assert!(
        close
            .reply_text
            .as_str()
            .starts_with("FRAME_ERROR - cannot decode <<0,0,0,1,113,0,0,"),
        "{}",
        close.reply_text
    );
    assert!(close.reply_text.as_str().len() <= 255);
    assert!(matches!(
        methods(&to_b).as_slice(),
        [(0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))]
    ));
    assert_eq!(s.held().0, 1);
}

#[test]
fn a_held_publish_is_copied_out_of_the_read_buffer() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.extend_from_slice(&publish_method(1, "", "q"));
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    let held = s.channels[&1].held.as_ref().unwrap();
    assert!(
        held.capacity() < 1024,
        "the held frame owns its bytes, not the 64 KiB read buffer"
    );
}

#[test]
fn consumers_are_bounded_per_channel_and_per_connection() {
    let mut s = session_with(&ALL, |c| {
        c.limits.consumers_per_channel = 3;
        c.limits.consumers_per_connection = 4;
    });
    opened(&mut s, 1);
    let input: Vec<u8> = (0..3)
        .flat_map(|i| consume(1, "q", &format!("t{i}"), true))
        .collect();
    client(&mut s, &input, 1 << 20);
    let (_, to_c) = client(&mut s, &consume(1, "q", "t3", true), 1 << 20);
    let c = connection_close(&to_c);
    assert_eq!(
        (c.reply_code, c.reply_text.as_str(), c.class_id, c.method_id),
        (
            530,
            "NOT_ALLOWED - reached maximum (3) of consumers per channel",
            60,
            20
        )
    );
    let mut s = session_with(&ALL, |c| {
        c.limits.consumers_per_channel = 3;
        c.limits.consumers_per_connection = 4;
    });
    client(
        &mut s,
        &[channel_open(1), channel_open(2)].concat(),
        1 << 20,
    );
    let input: Vec<u8> = (0..4)
        .flat_map(|i| consume(1 + (i % 2), "q", &format!("t{i}"), true))
        .collect();
    client(&mut s, &input, 1 << 20);
    let (_, to_c) = client(&mut s, &consume(2, "q", "t9", true), 1 << 20);
    assert_eq!(
        connection_close(&to_c).reply_text.as_str(),
        "NOT_ALLOWED - reached maximum (4) of consumers per connection"
    );
}

#[test]
fn a_reused_consumer_tag_is_rabbitmqs_530() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    client(&mut s, &consume(1, "q", "t", true), 1 << 20);
    let (_, to_c) = client(&mut s, &consume(1, "q2", "t", true), 1 << 20);
    assert_eq!(
        connection_close(&to_c).reply_text.as_str(),
        "NOT_ALLOWED - attempt to reuse consumer tag 't'"
    );
}

#[test]
fn frames_on_a_channel_the_broker_closed_hold_nothing() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    broker_closed(&mut s, 1);
    let input: Vec<u8> = (0..10_000)
        .flat_map(|i| consume(1, "q", &format!("t{i}"), false))
        .collect();
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert!(to_b.is_empty(), "dropped, as the broker would discard them");
    assert_eq!(s.held(), (1, 0, 0), "no consumer and no reply tracked");
    // "" is answered as RabbitMQ's closing channel answers it, after what the broker
    // still owes for earlier methods: a close from the gateway marks that point. The
    // client's close-ok still goes.
    let (to_b, to_c) = client(&mut s, &basic_get(1, ""), 1 << 20);
    assert!(is_backend_close(&to_b, 1) && to_c.is_empty());
    let to_c = backend(&mut s, &close_ok(1));
    assert_eq!(
        channel_closed(&to_c, 1),
        (
            404,
            "NOT_FOUND - no previously declared queue".into(),
            60,
            70
        )
    );
    let (to_b, _) = client(&mut s, &close_ok(1), 1 << 20);
    assert_eq!(to_b, close_ok(1));
}

#[test]
fn answers_owed_on_a_closing_channel_are_bounded_and_cost_one_gateway_close() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    broker_closed(&mut s, 1);
    let input: Vec<u8> = (0..10_000).flat_map(|_| basic_get(1, "")).collect();
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(to_c.is_empty());
    assert!(
        is_backend_close(&to_b, 1),
        "one close marks the broker's answers"
    );
    let answers = methods(&backend(&mut s, &close_ok(1)));
    assert_eq!(answers.len(), MAX_OWED, "the rest get none");
}

#[test]
fn a_second_open_on_a_closing_channel_is_rabbitmqs_504() {
    // Broker closing: the broker answers it itself.
    let mut s = session(&ALL);
    opened(&mut s, 1);
    broker_closed(&mut s, 1);
    let (to_b, _) = client(&mut s, &channel_open(1), 1 << 20);
    assert_eq!(to_b, channel_open(1));
    // Refusing: the broker's channel is closing after the gateway's close.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    client(&mut s, &queue_declare(1, "forbidden"), 1 << 20);
    let (to_b, _) = client(&mut s, &channel_open(1), 1 << 20);
    assert_eq!(to_b, channel_open(1));
    // The refusal told, the broker's channel gone: the gateway gives the 504.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    client(&mut s, &queue_declare(1, "forbidden"), 1 << 20);
    broker_accepts_close(&mut s, 1);
    let (to_b, to_c) = client(&mut s, &channel_open(1), 1 << 20);
    let close = connection_close(&to_c);
    assert_eq!(
        (
            close.reply_code,
            close.reply_text.as_str(),
            close.class_id,
            close.method_id
        ),
        (504, "CHANNEL_ERROR - second 'channel.open' seen", 20, 10),
    );
    assert!(!to_b.is_empty(), "the broker connection is closed too");
}

#[test]
fn channels_beyond_channel_max_are_rabbitmqs_530() {
    let mut s = session_with(&ALL, |c| c.channel_max = 2);
    client(
        &mut s,
        &[channel_open(1), channel_open(2)].concat(),
        1 << 20,
    );
    let (_, to_c) = client(&mut s, &channel_open(3), 1 << 20);
    assert_eq!(
        connection_close(&to_c).reply_text.as_str(),
        "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)"
    );
}

#[test]
fn awaited_replies_are_bounded_by_making_the_client_wait() {
    let mut s = session_with(&ALL, |c| c.limits.pending_replies = 2);
    opened(&mut s, 1);
    let input: Vec<u8> = (0..3)
        .flat_map(|i| exchange_declare(1, &format!("x{i}"), "direct"))
        .collect();
    let (_, to_b, _, rest) = client_event(&mut s, &input);
    assert_eq!(to_b.len() * 3, input.len() * 2, "two declares went");
    assert!(s.client_paused());
    backend(&mut s, &exchange_declare_ok(1));
    assert!(!s.client_paused());
    let (_, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(to_b, rest);
    // Declares whose reply teaches nothing are only counted, never bounded.
    let input: Vec<u8> = (0..10_000)
        .flat_map(|i| queue_declare(1, &format!("q{i}")))
        .collect();
    let (_, to_b, ..) = client_event(&mut s, &input);
    assert_eq!(to_b.len(), input.len());
}

#[test]
fn a_reopen_waits_until_the_broker_has_closed_the_channel() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let mut input = channel_close(1, 200, "bye");
    input.extend(channel_open(1));
    input.extend(queue_declare(1, "q"));
    let (_, to_b, _, rest) = client_event(&mut s, &input);
    assert_eq!(to_b, channel_close(1, 200, "bye"));
    assert!(
        s.client_paused(),
        "the reopen waits for the broker's close-ok"
    );
    assert_eq!(backend(&mut s, &close_ok(1)), close_ok(1));
    let (_, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(to_b, rest);
}

// ------------------------------------------------------ class 5: every consumer is named

#[test]
fn an_empty_consumer_tag_is_named_by_the_gateway_and_cancelled_when_the_token_changes() {
    for nowait in [true, false] {
        let mut s = session(&ALL);
        opened(&mut s, 1);
        let (to_b, _) = client(&mut s, &consume(1, "q", "", nowait), 1 << 20);
        let sent = methods(&to_b);
        let [(1, AMQPClass::Basic(basic::AMQPMethod::Consume(c)))] = sent.as_slice() else {
            panic!("{sent:?}")
        };
        let tag = c.consumer_tag.to_string();
        assert!(tag.starts_with("amq.ctag-") && tag.len() == 31, "{tag}");
        assert_eq!((c.queue.as_str(), c.nowait, c.no_ack), ("q", nowait, true));
        // The token is refreshed without read on q.
        let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
        s.secret_updated(Ok(perms(&["write:*/*"])), &mut to_c, &mut to_b);
        let mut to_b = drain(&mut to_b);
        let mut to_c = drain(&mut to_c);
        if !nowait {
            assert!(
                to_b.is_empty(),
                "the broker's cancel waits for the consume-ok"
            );
            // The client learns the tag from consume-ok, which the broker sends before it
            // sees the cancel: the client's cancel follows it.
            assert_eq!(methods(&to_c).len(), 1, "only update-secret-ok so far");
            let ok = method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.as_str().into(),
                })),
            );
            let after = backend(&mut s, &ok);
            assert!(after.starts_with(&ok), "consume-ok first");
            to_c.extend(after);
            let mut later = Outbox::default();
            s.take_backend_output(&mut later);
            to_b = drain(&mut later);
        }
        let to_b = methods(&to_b);
        assert!(
            matches!(to_b.as_slice(), [(1, AMQPClass::Basic(basic::AMQPMethod::Cancel(x)))] if x.consumer_tag.as_str() == tag && !x.nowait),
            "{to_b:?}"
        );
        let sent = methods(&to_c);
        let cancels: Vec<_> = sent
            .iter()
            .filter_map(|(ch, m)| match m {
                AMQPClass::Basic(basic::AMQPMethod::Cancel(x)) => {
                    Some((*ch, x.consumer_tag.to_string()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(cancels, vec![(1, tag.clone())], "{sent:?}");
        assert!(matches!(
            sent[0],
            (
                0,
                AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(_))
            )
        ));
        assert_eq!(
            s.held().1,
            1,
            "counted until the broker confirms the cancel"
        );
        assert!(
            backend(&mut s, &cancel_ok(1, &tag)).is_empty(),
            "the gateway's own cancel-ok"
        );
        assert_eq!(s.held().1, 0);
    }
}

#[test]
fn a_consumer_waiting_for_consume_ok_is_cancelled_too() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    client(&mut s, &consume(1, "q", "mine", false), 1 << 20);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.secret_updated(Ok(perms(&["read:*/other"])), &mut to_c, &mut to_b);
    // RabbitMQ 3.10.8's channel crashes (541) on a consume-ok for a consumer cancelled
    // before it came: the cancel waits for the consume-ok.
    assert!(drain(&mut to_b).is_empty(), "nothing before its consume-ok");
    let ok = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: "mine".into(),
        })),
    );
    let to_c = backend(&mut s, &ok);
    assert!(
        to_c.starts_with(&ok),
        "the client sees its consume-ok, then the cancel"
    );
    assert!(matches!(
        methods(&to_c).as_slice(),
        [_, (1, AMQPClass::Basic(basic::AMQPMethod::Cancel(c)))] if c.consumer_tag.as_str() == "mine"
    ));
    let mut to_b = Outbox::default();
    s.take_backend_output(&mut to_b);
    assert!(matches!(
        methods(&drain(&mut to_b)).as_slice(),
        [(1, AMQPClass::Basic(basic::AMQPMethod::Cancel(c)))] if c.consumer_tag.as_str() == "mine" && !c.nowait
    ));

    // The channel is being refused when the consume-ok comes: the gateway's close went
    // first, so a cancel behind it would reach a channel the broker no longer has (504).
    let mut s = session(&ALL);
    opened(&mut s, 1);
    client(&mut s, &consume(1, "q", "mine", false), 1 << 20);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.secret_updated(Ok(perms(&["read:*/other"])), &mut to_c, &mut to_b);
    let (to_b, _) = client(&mut s, &queue_declare(1, "refused"), 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    backend(&mut s, &ok);
    let mut to_b = Outbox::default();
    s.take_backend_output(&mut to_b);
    assert!(drain(&mut to_b).is_empty(), "no cancel behind the close");
    let to_c = backend(&mut s, &close_ok(1));
    assert_eq!(channel_closed(&to_c, 1).0, 403);
    assert_eq!(s.held(), (1, 0, 0), "nothing left of the consumer");
}

#[test]
fn deliveries_on_their_way_to_a_revoked_consumer_are_dropped_and_given_back() {
    for acked in [true, false] {
        let mut s = session(&ALL);
        opened(&mut s, 1);
        let subscribe = if acked {
            [
                consume_with(1, "q", "gone", true, false),
                consume_with(1, "other", "kept", true, false),
            ]
            .concat()
        } else {
            [
                consume(1, "q", "gone", true),
                consume(1, "other", "kept", true),
            ]
            .concat()
        };
        client(&mut s, &subscribe, 1 << 20);
        let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
        s.secret_updated(Ok(perms(&["read:*/other"])), &mut to_c, &mut to_b);
        assert!(matches!(
            methods(&drain(&mut to_b)).as_slice(),
            [(1, AMQPClass::Basic(basic::AMQPMethod::Cancel(c)))] if c.consumer_tag.as_str() == "gone" && !c.nowait
        ));
        // Sent by the broker before it saw the cancel: dropped with their content, in
        // pieces of every size; the other consumer's get through.
        let input = [
            delivery(1, "gone", 7, b"secret"),
            delivery(1, "kept", 8, b"fine"),
            delivery(1, "gone", 9, &[b'x'; 3000]),
        ]
        .concat();
        for step in [1, 7, 1 << 20] {
            let mut s2 = session(&ALL);
            opened(&mut s2, 1);
            client(&mut s2, &subscribe, 1 << 20);
            let (mut b, mut c) = (Outbox::default(), Outbox::default());
            s2.secret_updated(Ok(perms(&["read:*/other"])), &mut c, &mut b);
            let mut out = Outbox::default();
            let mut buf = BytesMut::new();
            let mut later = Outbox::default();
            for piece in input.chunks(step) {
                buf.extend_from_slice(piece);
                s2.on_backend_input(&mut buf, &mut out).unwrap();
                s2.take_backend_output(&mut later);
            }
            assert_eq!(
                drain(&mut out),
                delivery(1, "kept", 8, b"fine"),
                "step {step}"
            );
            let rejects: Vec<_> = methods(&drain(&mut later))
                .into_iter()
                .map(|(ch, m)| match m {
                    AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => {
                        (ch, r.delivery_tag, r.requeue)
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            let expected = if acked {
                vec![(1, 7, true), (1, 9, true)]
            } else {
                vec![]
            };
            assert_eq!(rejects, expected, "back to the queue, step {step}");
        }
        // The broker's own cancel for it (its queue deleted meanwhile) was told already.
        let server_cancel = method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "gone".into(),
                nowait: true,
            })),
        );
        assert!(backend(&mut s, &server_cancel).is_empty());
        // Its cancel-ok ends it: then the tag is the client's again.
        assert_eq!(s.held().1, 2);
        assert!(backend(&mut s, &cancel_ok(1, "gone")).is_empty());
        assert_eq!(s.held().1, 1);
        assert_eq!(backend(&mut s, &cancel_ok(1, "gone")), cancel_ok(1, "gone"));
        let d = delivery(1, "gone", 10, b"new consumer, same tag");
        assert_eq!(backend(&mut s, &d), d);
    }
}

#[test]
fn a_revoked_consumer_on_a_channel_the_client_closes_is_still_announced_and_muted() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    client(&mut s, &consume(1, "q", "mine", false), 1 << 20);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.secret_updated(Ok(perms(&["read:*/other"])), &mut to_c, &mut to_b);
    let (to_b, _) = client(&mut s, &channel_close(1, 200, "bye"), 1 << 20);
    assert_eq!(to_b, channel_close(1, 200, "bye"));
    // RabbitMQ 4.2 cancels it before it reads the close: the client hears of it.
    let to_c = backend(&mut s, &consume_ok(1, "mine"));
    assert!(matches!(
        methods(&to_c).as_slice(),
        [_, (1, AMQPClass::Basic(basic::AMQPMethod::Cancel(c)))] if c.consumer_tag.as_str() == "mine"
    ));
    let mut later = Outbox::default();
    s.take_backend_output(&mut later);
    assert!(
        drain(&mut later).is_empty(),
        "no cancel behind the client's close"
    );
    assert!(backend(&mut s, &delivery(1, "mine", 1, b"secret")).is_empty());
    s.take_backend_output(&mut later);
    assert!(drain(&mut later).is_empty(), "requeued by the close itself");
    assert_eq!(backend(&mut s, &close_ok(1)), close_ok(1));
    assert_eq!(s.held(), (0, 0, 0), "nothing left of the channel");
}

#[test]
fn consumers_cancelled_by_the_broker_are_forgotten_and_shown_only_to_clients_that_asked() {
    let cancel = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "t".into(),
            nowait: true,
        })),
    );
    for notify in [true, false] {
        let mut s = session_with(&ALL, |c| c.cancel_notify = notify);
        opened(&mut s, 1);
        client(&mut s, &consume(1, "q", "t", true), 1 << 20);
        let to_c = backend(&mut s, &cancel);
        assert_eq!(to_c.is_empty(), !notify);
        assert_eq!(s.held().1, 0);
    }
}

// ------------------------------------------- class 6: large content headers from the broker

#[test]
fn a_broker_content_header_larger_than_frame_max_is_relayed() {
    let mut s = session_with(&ALL, |c| c.frame_max = 4096);
    opened(&mut s, 1);
    let headers = entries(&[("big", b'S', longstr(&[b'x'; 20_000]))]);
    let mut input = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 1,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
            message_count: 0,
        })),
    );
    input.extend(header_with_raw_headers(1, 2, &headers));
    input.extend(bytes(AMQPFrame::Body(1, b"hi".to_vec())));
    for step in [1, 1000, 1 << 20] {
        let mut to_c = Outbox::default();
        let mut buf = BytesMut::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            s.on_backend_input(&mut buf, &mut to_c).unwrap();
        }
        assert_eq!(drain(&mut to_c), input, "step {step}");
    }
}

// --------------------------------------------------- class 7: no backend identity shown

#[test]
fn the_service_users_name_never_reaches_the_client() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let close = channel_close(
        1,
        403,
        "ACCESS_REFUSED - configure access to queue 'q' in vhost '/' refused for user 'svc-gateway'",
    );
    let to_c = backend(&mut s, &close);
    assert_eq!(
        channel_closed(&to_c, 1).1,
        "ACCESS_REFUSED - configure access to queue 'q' in vhost '/' refused for user 'alice'"
    );
    // A resource that happens to carry the name in quotes is left alone.
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let close = channel_close(1, 404, "NOT_FOUND - no queue 'svc-gateway' in vhost '/'");
    assert_eq!(backend(&mut s, &close), close);
    // The connection's own close too.
    let mut s = session(&ALL);
    let mut c = BytesMut::new();
    method::connection_close(
        &mut c,
        320,
        "CONNECTION_FORCED - user 'svc-gateway' is deleted",
        0,
        0,
    );
    assert_eq!(
        connection_close(&backend(&mut s, &c)).reply_text.as_str(),
        "CONNECTION_FORCED - user 'alice' is deleted"
    );
}

// ------------------------------------------------------------------- other protocol rules

#[test]
fn malformed_checked_methods_get_rabbitmqs_frame_errors() {
    // Truncated queue.declare: the arguments do not fill the payload.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let (to_b, to_c) = client(
        &mut s,
        &raw_method(1, &[0, 50, 0, 10, 0, 0, 5, b'a']),
        1 << 20,
    );
    let c = connection_close(&to_c);
    assert_eq!((c.reply_code, c.class_id, c.method_id), (501, 50, 10));
    assert_eq!(
        c.reply_text.as_str(),
        "FRAME_ERROR - cannot decode <<0,0,5,97>>"
    );
    assert!(matches!(
        methods(&to_b).as_slice(),
        [(0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))]
    ));
    // A queue name that is not UTF-8 (RabbitMQ's assert_utf8).
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let (_, to_c) = client(
        &mut s,
        &raw_method(1, &[0, 60, 0, 70, 0, 0, 1, 0xff, 0]),
        1 << 20,
    );
    assert_eq!(
        connection_close(&to_c).reply_text.as_str(),
        "FRAME_ERROR - Malformed UTF-8 in shortstr"
    );
}

#[test]
fn a_routing_key_that_is_not_utf8_is_checked_as_bytes() {
    // RabbitMQ does not require UTF-8 in a publish; a read-only token must still not
    // publish.
    let mut payload = vec![0, 60, 0, 40, 0, 0, 10];
    payload.extend_from_slice(b"amq.fanout");
    payload.extend_from_slice(&[2, 0xff, 0xfe, 0]);
    let mut input = raw_method(1, &payload);
    input.extend(bytes(AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 0,
            properties: basic::AMQPProperties::default(),
        },
    )));
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    let mut s = session(&["write:*/*"]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert_eq!(to_b, input);
}

#[test]
fn only_the_content_header_may_follow_a_publish() {
    let body = bytes(AMQPFrame::Body(1, b"x".to_vec()));
    for (name, next) in [
        ("body", body),
        ("publish", publish_method(1, "", "q")),
        ("queue.declare", queue_declare(1, "q")),
    ] {
        let mut s = session(&["write:*/*", "configure:*/*"]);
        opened(&mut s, 1);
        let (to_b, to_c) = client(
            &mut s,
            &[publish_method(1, "", "q"), next].concat(),
            1 << 20,
        );
        let close = connection_close(&to_c);
        assert_eq!(
            (close.reply_code, close.class_id, close.method_id),
            (505, 60, 40),
            "{name}"
        );
        assert_eq!(
            close.reply_text.as_str(),
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
        );
        assert!(
            matches!(
                methods(&to_b).as_slice(),
                [(0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))]
            ),
            "{name}: the backend gets only the gateway's close"
        );
    }
}

#[test]
fn immediate_publishes_are_left_to_the_broker() {
    let p = basic::Publish {
        exchange: "x".into(),
        routing_key: "rk".into(),
        mandatory: false,
        immediate: true,
    };
    let mut input = method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p)));
    input.extend(bytes(AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 0,
            properties: basic::AMQPProperties::default(),
        },
    )));
    let mut s = session(&[]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &input, 1 << 20);
    assert_eq!(
        to_b, input,
        "RabbitMQ answers 540 before any permission check"
    );
}

#[test]
fn a_publish_held_when_the_broker_closes_the_channel_is_dropped_whole() {
    let mut s = session(&["write:*/*"]);
    opened(&mut s, 1);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let msg = publish(1, "x", "k", b"body", None);
    let method_len = publish_method(1, "x", "k").len();
    let mut buf = BytesMut::from(&msg[..method_len]);
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert!(to_b.is_empty(), "held");
    backend(
        &mut s,
        &channel_close(1, 404, "NOT_FOUND - no exchange 'y' in vhost '/'"),
    );
    let mut buf = BytesMut::from(&msg[method_len..]);
    s.on_client_input(&mut buf, &mut to_b, &mut to_c).unwrap();
    assert!(
        drain(&mut to_b).is_empty(),
        "neither method, header nor body: the broker would discard them"
    );
    assert!(drain(&mut to_c).is_empty(), "and no frame error");
    // The next publish on a reopened channel is checked as usual.
    let (to_b, _) = client(&mut s, &close_ok(1), 1 << 20);
    assert_eq!(to_b, close_ok(1));
    opened(&mut s, 1);
    let msg = publish(1, "amq.direct", "k", b"body", None);
    let (to_b, _) = client(&mut s, &msg, 1 << 20);
    assert_eq!(to_b, msg);
}

#[test]
fn a_stray_close_ok_from_the_broker_changes_nothing() {
    let mut s = session(&ALL);
    opened(&mut s, 1);
    assert_eq!(backend(&mut s, &close_ok(1)), close_ok(1));
    let (to_b, _) = client(&mut s, &queue_declare(1, "q"), 1 << 20);
    assert_eq!(
        to_b,
        queue_declare(1, "q"),
        "the channel is still open and checked"
    );
}

/// Found by the `session` fuzz target: a bad frame-end octet after frames already accepted
/// in the same read indexed the input after it had been split.
#[test]
fn a_bad_frame_end_after_accepted_frames_is_a_frame_error() {
    let mut s = session(&ALL);
    let mut input = channel_open(1);
    let mut bad = queue_declare(1, "q");
    *bad.last_mut().unwrap() = 0;
    input.extend(bad);
    let (_, to_b, to_c) = client_fails(&mut s, &input);
    assert_eq!(to_b, channel_open(1));
    assert_eq!(connection_close(&to_c).reply_code, 501);
}

/// RabbitMQ's closing channel still expands `""`: a method naming it with no queue declared
/// gets a second `channel.close 404` (found by the differential session fuzzer).
#[test]
fn a_closing_channel_answers_an_empty_queue_name_as_rabbitmq_does() {
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let mut input = queue_declare(1, "forbidden");
    input.extend(basic_get(1, ""));
    input.extend(channel_close(1, 200, "bye"));
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(is_backend_close(&to_b, 1) && to_c.is_empty());
    let sent = methods(&broker_accepts_close(&mut s, 1));
    let codes: Vec<String> = sent
        .iter()
        .map(|(_, m)| match m {
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                format!("close {} {}.{}", c.reply_code, c.class_id, c.method_id)
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => "close-ok".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, ["close 403 50.10", "close 404 60.70", "close-ok"]);
    // Told already: the next one is answered at once.
    let (_, to_c) = client(&mut s, &basic_get(1, ""), 1 << 20);
    assert_eq!(
        channel_closed(&to_c, 1),
        (
            404,
            "NOT_FOUND - no previously declared queue".into(),
            60,
            70
        )
    );
    // With a queue declared before, nothing is owed.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let input = [
        queue_declare_with(1, "q", true, true),
        queue_declare(1, "forbidden"),
        basic_get(1, ""),
    ]
    .concat();
    client(&mut s, &input, 1 << 20);
    assert_eq!(methods(&broker_accepts_close(&mut s, 1)).len(), 1);
}

#[test]
fn a_close_ok_sent_during_a_refusal_ends_the_channel_as_at_rabbitmq() {
    // RabbitMQ's close for a refused method is on its way at once; the gateway's waits
    // for the broker. A client close-ok meanwhile (answering, say, a previous
    // incarnation's late second close) is what RabbitMQ would take as the answer to its
    // close, so a reopen right after it is no second open: it waits for the broker.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &queue_declare(1, "refused"), 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    let mut input = close_ok(1);
    input.extend(channel_open(1));
    input.extend(basic_get(1, "q"));
    let (ev, to_b, to_c, rest) = client_event(&mut s, &input);
    assert_eq!(ev, ClientEvent::None);
    assert!(to_b.is_empty() && to_c.is_empty(), "nothing goes yet");
    assert!(s.client_paused(), "the reopen waits for the broker");
    let to_c = backend(&mut s, &close_ok(1));
    assert_eq!(channel_closed(&to_c, 1).0, 403, "the refusal is told");
    assert!(!s.client_paused());
    let (_, to_b, to_c, rest) = client_event(&mut s, &rest);
    assert!(to_c.is_empty() && rest.is_empty());
    assert_eq!(to_b, [channel_open(1), basic_get(1, "q")].concat());

    // The broker's own error comes first: it gets the client's close-ok, and the
    // reopen goes once the broker has answered the gateway's close too.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    client(&mut s, &queue_declare(1, "refused"), 1 << 20);
    let (_, _, _, rest) = client_event(&mut s, &[close_ok(1), channel_open(1)].concat());
    let error = channel_close(1, 404, "NOT_FOUND - no queue 'x' in vhost '/'");
    assert_eq!(backend(&mut s, &error), error);
    let mut later = Outbox::default();
    s.take_backend_output(&mut later);
    assert_eq!(
        drain(&mut later),
        close_ok(1),
        "the broker's close is answered"
    );
    assert!(s.client_paused());
    assert!(
        backend(&mut s, &close_ok(1)).is_empty(),
        "the gateway's own"
    );
    assert!(!s.client_paused());
    let (_, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(to_b, channel_open(1));
}

#[test]
fn a_close_ok_for_no_close_of_a_closing_channel_never_reaches_the_broker() {
    // The client closes and reopens at once, and answers a previous incarnation's late
    // second close as if it were this channel's: the broker must not see that close-ok
    // (it might then never answer the client's close, and the reopen would wait for ever).
    let mut s = session(&ALL);
    opened(&mut s, 1);
    let (to_b, _) = client(&mut s, &channel_close(1, 200, "bye"), 1 << 20);
    assert_eq!(to_b, channel_close(1, 200, "bye"));
    let (ev, to_b, _, rest) = client_event(
        &mut s,
        &[close_ok(1), channel_open(1), basic_get(1, "q")].concat(),
    );
    assert_eq!(ev, ClientEvent::None);
    assert!(
        to_b.is_empty(),
        "the stray close-ok is dropped, the reopen held"
    );
    assert_eq!(backend(&mut s, &close_ok(1)), close_ok(1));
    let (_, to_b, ..) = client_event(&mut s, &rest);
    assert_eq!(to_b, [channel_open(1), basic_get(1, "q")].concat());

    // The broker's own close crossing the client's is answered through.
    let mut s = session(&ALL);
    opened(&mut s, 1);
    client(&mut s, &channel_close(1, 200, "bye"), 1 << 20);
    let error = channel_close(1, 404, "NOT_FOUND - no queue 'x' in vhost '/'");
    assert_eq!(backend(&mut s, &error), error);
    let (to_b, _) = client(&mut s, &close_ok(1), 1 << 20);
    assert_eq!(to_b, close_ok(1));
}

#[test]
fn a_close_crossing_the_brokers_error_is_answered_before_a_reopen() {
    // The broker's error and the client's close cross. RabbitMQ's closing channel answers
    // the close with close-ok; the gateway sends a close of its own in its place and
    // gives the close-ok when the broker answers it, holding the reopen until then. The
    // reopened channel is checked: its refusal comes after its open-ok.
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    client(&mut s, &queue_declare_with(1, "q", true, false), 1 << 20);
    backend(&mut s, &channel_close(1, 404, "NOT_FOUND - no queue 'q'"));
    let mut input = channel_close(1, 200, "bye");
    input.extend(close_ok(1));
    input.extend(channel_open(1));
    input.extend(queue_declare(1, "refused"));
    let (ev, to_b, to_c, rest) = client_event(&mut s, &input);
    assert_eq!(ev, ClientEvent::None);
    assert!(to_c.is_empty());
    let sent = methods(&to_b);
    assert!(
        matches!(
            sent.as_slice(),
            [
                (1, AMQPClass::Channel(channel::AMQPMethod::Close(c))),
                (1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))),
            ] if c.reply_code == 200 && c.reply_text.as_str().starts_with("gateway:")
        ),
        "{sent:?}"
    );
    assert!(s.client_paused(), "the reopen waits for the close-ok");
    assert_eq!(backend(&mut s, &close_ok(1)), close_ok(1));
    assert!(!s.client_paused());
    let (_, to_b, to_c, rest) = client_event(&mut s, &rest);
    assert!(to_c.is_empty() && rest.is_empty());
    let sent = methods(&to_b);
    assert!(
        matches!(
            sent.as_slice(),
            [
                (1, AMQPClass::Channel(channel::AMQPMethod::Open(_))),
                (1, AMQPClass::Channel(channel::AMQPMethod::Close(_))),
            ]
        ),
        "{sent:?}"
    );
    let open_ok = method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
    );
    assert_eq!(backend(&mut s, &open_ok), open_ok);
    let to_c = backend(&mut s, &close_ok(1));
    let (code, text, ..) = channel_closed(&to_c, 1);
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("configure access to queue 'refused'"),
        "{text}"
    );
}

#[test]
fn the_brokers_second_closes_come_before_the_gateways_answers_for_refused_methods() {
    // RabbitMQ 3.10.8's closing channel sends a second close for each forwarded `""`
    // method after the failed one; the gateway's own answer for the `""` method it refused
    // after them must follow those, not overtake them.
    let mut s = session(&["read:*/amq.topic/qa", "configure:*/*"]);
    opened(&mut s, 1);
    let mut input = exchange_declare(1, "amq.direct", "direct");
    input.extend(consume(1, "", "c1", false));
    input.extend(queue_declare(1, "qa"));
    input.extend(queue_bind(1, "", "xc", ""));
    let (to_b, to_c) = client(&mut s, &input, 1 << 20);
    assert!(to_c.is_empty());
    assert_eq!(
        methods(&to_b).len(),
        4,
        "the bind is refused: no write on qa"
    );
    let failed = channel_close(1, 406, "PRECONDITION_FAILED - inequivalent arg 'durable'");
    assert_eq!(backend(&mut s, &failed), failed);
    let second = channel_close_for(1, 404, NO_QUEUE_TEXT, (60, 20));
    assert_eq!(backend(&mut s, &second), second);
    let to_c = backend(&mut s, &close_ok(1));
    assert_eq!(
        channel_closed(&to_c, 1),
        (404, NO_QUEUE_TEXT.into(), 50, 20),
        "the refused bind's, last"
    );
}

/// An internal user's session: the broker authorises it, so everything the client sends is
/// relayed as it came, whatever a token session would refuse or rewrite (no permissions at
/// all here), and the broker's frames come back unchanged, closes naming the user included.
#[test]
fn a_broker_authorised_session_relays_every_frame_unchanged() {
    let mut input = channel_open(1);
    input.extend(queue_declare(1, "q"));
    input.extend(publish(
        1,
        "amq.topic",
        "a.b",
        &[7u8; 2500],
        Some("someone-else"),
    ));
    input.extend(method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
            connection::UpdateSecret {
                new_secret: "new-password".into(),
                reason: "refresh".into(),
            },
        )),
    ));
    input.extend(channel_close(1, 200, "bye"));
    for step in [input.len(), 7, 1] {
        let mut s = Session::broker_authorised(config());
        let (to_b, to_c) = client(&mut s, &input, step);
        assert_eq!(to_b, input, "relayed as sent (step {step})");
        assert!(to_c.is_empty(), "the gateway answers nothing itself");
        let refused = channel_close(
            1,
            403,
            "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'alice'",
        );
        assert_eq!(backend(&mut s, &refused), refused);
        assert!(s.take_denials().is_empty());
    }
    // The connection's own close is followed: afterwards only the close-ok is relayed.
    let mut s = Session::broker_authorised(config());
    let close = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    let (to_b, _) = client(&mut s, &close, 1 << 20);
    assert_eq!(to_b, close);
    let (to_b, _) = client(&mut s, &queue_declare(1, "late"), 1 << 20);
    assert!(
        to_b.is_empty(),
        "nothing after the client's connection.close"
    );
    // The gateway's own closes still apply: a drain closes both sides.
    let mut s = Session::broker_authorised(config());
    let (mut to_c, mut to_b) = (Outbox::default(), Outbox::default());
    s.force_close("CONNECTION_FORCED - shutdown", &mut to_c, &mut to_b);
    assert!(!drain(&mut to_c).is_empty() && !drain(&mut to_b).is_empty());
    let (to_b, _) = client(&mut s, &channel_open(2), 1 << 20);
    assert!(to_b.is_empty());
}

/// With backend tokens, a refreshed client token becomes an update-secret to the broker
/// with the gateway's new token, and the client's answer is the broker's: the gateway
/// writes no update-secret-ok of its own, and the broker's is relayed unchanged.
#[test]
fn with_backend_tokens_the_broker_gets_the_new_secret_and_answers_the_client() {
    let mut s = session(&ALL);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.secret_updated_with(
        Ok(perms(&ALL)),
        Some("minted.backend.token".into()),
        &mut to_c,
        &mut to_b,
    );
    assert!(
        drain(&mut to_c).is_empty(),
        "the broker answers, not the gateway"
    );
    let sent = methods(&drain(&mut to_b));
    let [(0, AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(u)))] = sent.as_slice()
    else {
        panic!("{sent:?}")
    };
    assert_eq!(u.new_secret.as_bytes(), b"minted.backend.token");
    let ok = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
            connection::UpdateSecretOk {},
        )),
    );
    assert_eq!(backend(&mut s, &ok), ok);
    // Without a backend token the gateway answers itself, as before.
    let mut s = session(&ALL);
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    s.secret_updated(Ok(perms(&ALL)), &mut to_c, &mut to_b);
    assert!(drain(&mut to_b).is_empty());
    assert_eq!(drain(&mut to_c), ok);
}

/// Regression (session fuzzer, seed 505050): RabbitMQ 3.10.8's channel crashes without a
/// word when a `basic.cancel` with `nowait` overtakes its consumer's `consume-ok`
/// (`badkey` in `consumer_monitor`) while a close of the gateway's is on its way, so that
/// close is never answered. The wait is bounded by the relay: then the client gets the
/// refusal it was owed, and the connection ends with 541.
#[test]
fn a_broker_that_never_answers_a_refusals_close_still_lets_the_client_hear_of_it() {
    let mut s = session(&["read:*/*", "configure:*/*", "write:*/q*"]);
    assert!(!s.awaits_broker_close());
    opened(&mut s, 1);
    let (to_b, to_c) = client(&mut s, &publish(1, "amq.topic", "a.b", b"m", None), 1 << 20);
    assert!(to_c.is_empty() && is_backend_close(&to_b, 1));
    assert!(s.awaits_broker_close());
    let (mut to_c, mut to_b) = (Outbox::default(), Outbox::default());
    s.broker_silent("30 s", &mut to_c, &mut to_b);
    let (to_c, to_b) = (drain(&mut to_c), drain(&mut to_b));
    let sent = methods(&to_c);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(channel_closed(&to_c, 1).0, 403, "the refusal first");
    match &sent[1] {
        (0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            assert_eq!(c.reply_code, 541);
            assert!(
                c.reply_text
                    .as_str()
                    .contains("did not answer channel.close")
            );
        }
        other => panic!("expected connection.close: {other:?}"),
    }
    assert_eq!(connection_close(&to_b).reply_code, 200);
    assert!(!s.awaits_broker_close(), "the connection is over");
}

#[test]
fn an_answered_close_ends_the_wait_and_an_alarm_suspends_it() {
    let mut s = session(&["read:*/*"]);
    opened(&mut s, 1);
    opened(&mut s, 2);
    client(&mut s, &queue_declare(1, "forbidden"), 1 << 20);
    client(&mut s, &queue_declare(2, "forbidden"), 1 << 20);
    assert!(s.awaits_broker_close());
    let blocked = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
            reason: "low on memory".into(),
        })),
    );
    assert_eq!(backend(&mut s, &blocked), blocked);
    assert!(
        !s.awaits_broker_close(),
        "a blocked broker reads nothing: no fault"
    );
    let unblocked = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
    );
    assert_eq!(backend(&mut s, &unblocked), unblocked);
    assert!(s.awaits_broker_close());
    assert_eq!(channel_closed(&backend(&mut s, &close_ok(1)), 1).0, 403);
    assert!(s.awaits_broker_close(), "channel 2's close is still owed");
    assert_eq!(channel_closed(&backend(&mut s, &close_ok(2)), 2).0, 403);
    assert!(!s.awaits_broker_close());
    // The gateway's close after a broker error (a second close) is owed too.
    opened_again(&mut s, 1);
    backend(
        &mut s,
        &channel_close(1, 404, "NOT_FOUND - no queue 'x' in vhost '/'"),
    );
    let (to_b, _) = client(&mut s, &channel_close(1, 200, "bye"), 1 << 20);
    assert!(is_backend_close(&to_b, 1));
    assert!(s.awaits_broker_close());
    backend(&mut s, &close_ok(1));
    assert!(!s.awaits_broker_close());
}

/// The client takes the gateway's refusal (close-ok) and opens the channel again.
fn opened_again(s: &mut Session, ch: u16) {
    client(s, &close_ok(ch), 1 << 20);
    opened(s, ch);
}

/// Regression (session fuzzer, seed 616161): a client's `channel.close` made the gateway
/// forget the `declare-ok`s it awaited, so the one it had asked for in place of a
/// `nowait` declare reached the client, which took it for the answer to its next declare.
#[test]
fn a_hidden_declare_ok_stays_hidden_when_the_client_closes_the_channel() {
    let mut s = session(&["configure:*/*", "read:*/*", "write:*/*"]);
    opened(&mut s, 1);
    let mut input = queue_declare(1, "qc");
    input.extend(queue_declare_with(1, "qc", false, true));
    input.extend(queue_declare(1, "qb"));
    input.extend(channel_close(1, 200, "bye"));
    let (to_b, to_c) = client(&mut s, &input, 7);
    assert!(to_c.is_empty());
    assert_eq!(methods(&to_b).len(), 4);
    assert_eq!(backend(&mut s, &declare_ok(1, "qc")), declare_ok(1, "qc"));
    assert!(
        backend(&mut s, &declare_ok(1, "qc")).is_empty(),
        "asked by the gateway"
    );
    assert_eq!(backend(&mut s, &declare_ok(1, "qb")), declare_ok(1, "qb"));
    assert_eq!(backend(&mut s, &close_ok(1)), close_ok(1));
    assert!(s.channels.is_empty());
    assert_eq!(s.pending, 0);
}

/// The broker's error crossing the client's close ends the awaited replies with it.
#[test]
fn a_broker_error_crossing_the_clients_close_forgets_the_awaited_replies() {
    let mut s = session(&["configure:*/*", "read:*/*", "write:*/*"]);
    opened(&mut s, 1);
    let mut input = queue_declare_with(1, "qb", false, true);
    input.extend(exchange_declare(1, "xa", "fanout"));
    input.extend(channel_close(1, 200, "bye"));
    client(&mut s, &input, 1 << 20);
    assert_eq!(s.pending, 2);
    let gone = channel_close(1, 406, "PRECONDITION_FAILED - inequivalent arg 'durable'");
    assert_eq!(backend(&mut s, &gone), gone);
    assert_eq!(s.pending, 0);
}

/// Test builds only: with the decisions left to the broker, a method the token does not
/// grant goes through (the broker refuses it, verifying its own token).
#[cfg(feature = "test-switches")]
#[test]
fn with_decisions_left_to_the_broker_nothing_is_refused_here() {
    let mut s = session(&["read:*/*"]);
    s.leave_decisions_to_broker();
    opened(&mut s, 1);
    let declare = queue_declare(1, "forbidden");
    let (to_b, to_c) = client(&mut s, &declare, 1 << 20);
    assert_eq!(to_b, declare);
    assert!(to_c.is_empty());
    assert!(s.take_denials().is_empty());
}
