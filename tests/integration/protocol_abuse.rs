//! Protocol abuse over raw sockets, answered as RabbitMQ answers it.
//!
//! Each post-authentication case is sent twice: to RabbitMQ directly (as `guest`, the
//! reference) and through a test gateway's plain listener (with a token); the connection
//! or channel close that comes back must carry the same reply code, and the gateway must
//! end or go on serving without hanging. Pre-authentication cases are checked against the
//! behaviour the gateway documents, since the gateway answers those itself.

use std::time::Duration;

use crate::common::*;
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable};
use amqp_iam_gateway::amqp::{frame, method};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Long enough for the broker and the gateway to answer; short enough for a test.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

fn method_frame(ch: u16, m: AMQPClass) -> Vec<u8> {
    let mut out = BytesMut::new();
    method::encode(&mut out, ch, m);
    out.to_vec()
}

fn raw_frame(t: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frame::write_frame(&mut out, t, ch, payload);
    out.to_vec()
}

fn start_ok(user: &str, password: &str) -> Vec<u8> {
    let mut caps = FieldTable::default();
    caps.insert(
        "authentication_failure_close".into(),
        AMQPValue::Boolean(true),
    );
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: format!("\0{user}\0{password}").into(),
            locale: "en_US".into(),
        })),
    )
}

fn channel_open(ch: u16) -> Vec<u8> {
    method_frame(
        ch,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
}

fn queue_declare(ch: u16, name: &str) -> Vec<u8> {
    method_frame(
        ch,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.into(),
            passive: false,
            durable: false,
            exclusive: true,
            auto_delete: true,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
}

/// Reads frames until `stop` accepts one, the peer closes, or the wait runs out.
/// Returns the decoded methods (channel, class) and whether the socket was closed.
async fn read_until(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    stop: impl Fn(u16, &AMQPClass) -> bool,
) -> (Vec<(u16, AMQPClass)>, bool) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    loop {
        while let Ok(Some(h)) = frame::check(buf, 0) {
            let f = buf.split_to(h.wire_len());
            if h.frame_type == frame::METHOD {
                let m = amq_protocol::protocol::parse_class(frame::payload(&f, &h))
                    .map(|(_, m)| m)
                    .expect("a method from the server");
                let done = stop(h.channel, &m);
                got.push((h.channel, m));
                if done {
                    return (got, false);
                }
            }
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(_)) => {}
            Err(_) => panic!("no answer within {ANSWER_WAIT:?}; got {got:?}"),
        }
    }
}

/// Collects what else arrives shortly after: the broker may answer an earlier frame after
/// a later one (a channel error is raised by the channel process, asynchronously).
async fn linger(s: &mut TcpStream, buf: &mut BytesMut, got: &mut Vec<(u16, AMQPClass)>) {
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    loop {
        while let Ok(Some(h)) = frame::check(buf, 0) {
            let f = buf.split_to(h.wire_len());
            if h.frame_type == frame::METHOD
                && let Ok(m) =
                    amq_protocol::protocol::parse_class(frame::payload(&f, &h)).map(|(_, m)| m)
            {
                got.push((h.channel, m));
            }
        }
        match tokio::time::timeout_at(until, s.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

fn is_connection_close(m: &AMQPClass) -> bool {
    matches!(m, AMQPClass::Connection(connection::AMQPMethod::Close(_)))
}

/// Connects and completes the handshake; returns the socket with leftover bytes.
async fn open_connection(addr: &str, user: &str, password: &str) -> (TcpStream, BytesMut) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    s.write_all(HEADER).await.unwrap();
    read_until(&mut s, &mut buf, |_, m| {
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::Start(_)))
    })
    .await;
    s.write_all(&start_ok(user, password)).await.unwrap();
    let (got, _) = read_until(&mut s, &mut buf, |_, _| true).await;
    let Some((_, AMQPClass::Connection(connection::AMQPMethod::Tune(t)))) = got.last() else {
        panic!("expected tune, got {got:?}");
    };
    let tune_ok = connection::TuneOk {
        channel_max: t.channel_max,
        frame_max: t.frame_max,
        heartbeat: 0,
    };
    let mut out = method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
    );
    out.extend(method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    ));
    s.write_all(&out).await.unwrap();
    let (got, _) = read_until(&mut s, &mut buf, |_, _| true).await;
    assert!(
        matches!(
            got.last(),
            Some((_, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))))
        ),
        "{got:?}"
    );
    (s, buf)
}

/// What came back for `bytes`: the first close (connection or channel) as
/// (channel, code, class, method), and whether the connection still answers afterwards.
async fn answer(addr: &str, user: &str, password: &str, bytes: &[u8]) -> (Option<Close>, bool) {
    let (mut s, mut buf) = open_connection(addr, user, password).await;
    // A channel.open after the abuse shows whether the connection still serves.
    s.write_all(&[bytes, &channel_open(PROBE)].concat())
        .await
        .unwrap();
    let (mut got, _) = read_until(&mut s, &mut buf, |ch, m| {
        is_connection_close(m)
            || (ch == PROBE && matches!(m, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
    })
    .await;
    linger(&mut s, &mut buf, &mut got).await;
    let close = got.iter().find_map(|(ch, m)| match m {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            Some((*ch, c.reply_code, c.class_id, c.method_id))
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            Some((*ch, c.reply_code, c.class_id, c.method_id))
        }
        _ => None,
    });
    let alive = close.is_none_or(|c| c.0 != 0)
        && got.iter().any(|(ch, m)| {
            *ch == PROBE && matches!(m, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
        });
    (close, alive)
}

/// The channel opened to see whether a connection survived.
const PROBE: u16 = 2000;

type Close = (u16, u16, u16, u16);

fn update_secret(ch: u16, secret: &str) -> Vec<u8> {
    method_frame(
        ch,
        AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
            connection::UpdateSecret {
                new_secret: secret.into(),
                reason: "abuse".into(),
            },
        )),
    )
}

fn post_auth_cases() -> Vec<(&'static str, Vec<u8>)> {
    let heartbeats: Vec<u8> = (0..10_000)
        .flat_map(|_| raw_frame(frame::HEARTBEAT, 0, &[]))
        .collect();
    let mut header_without_method = channel_open(1);
    header_without_method.extend(raw_frame(
        frame::HEADER,
        1,
        &[0, 60, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    ));
    let mut body_without_method = channel_open(1);
    body_without_method.extend(raw_frame(frame::BODY, 1, b"x"));
    let mut publish_then_body = channel_open(1);
    publish_then_body.extend(method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    publish_then_body.extend(raw_frame(frame::BODY, 1, b"x"));
    let mut secret_on_data_channel = channel_open(1);
    secret_on_data_channel.extend(update_secret(1, "not-a-token"));
    let mut bad_end = channel_open(1);
    let mut f = queue_declare(1, "abuse-bad-end");
    *f.last_mut().unwrap() = 0;
    bad_end.extend(f);
    let mut oversized = channel_open(1);
    oversized.extend(&[frame::BODY, 0, 1, 0x00, 0x10, 0x00, 0x00]);
    vec![
        (
            "method on an unopened channel",
            queue_declare(5, "abuse-unopened"),
        ),
        ("channel.open past channel_max", channel_open(4000)),
        (
            "channel.open twice",
            [channel_open(1), channel_open(1)].concat(),
        ),
        ("content header without a method", header_without_method),
        ("content body without a method", body_without_method),
        ("body where the header belongs", publish_then_body),
        ("heartbeat flood", heartbeats),
        (
            "heartbeat on a data channel",
            raw_frame(frame::HEARTBEAT, 1, &[]),
        ),
        ("update-secret on a data channel", secret_on_data_channel),
        ("frame-end byte missing", bad_end),
        ("frame past frame_max", oversized),
        ("unknown frame type", raw_frame(9, 0, b"")),
        (
            "unknown method",
            raw_frame(frame::METHOD, 0, &[0, 99, 0, 1]),
        ),
        ("short method frame", raw_frame(frame::METHOD, 0, &[0, 10])),
    ]
}

#[tokio::test]
async fn post_auth_abuse_is_answered_as_rabbitmq_answers_it() {
    let gw = start_gateway("").await;
    let gateway = gw.addrs.plain.unwrap().to_string();
    let token = sign(&claims(ADMIN_ROLE));
    let mut differences = Vec::new();
    for (name, bytes) in post_auth_cases() {
        let reference = answer("127.0.0.1:5672", "guest", "guest", &bytes).await;
        let through = answer(&gateway, "", &token, &bytes).await;
        eprintln!("{name}: broker {reference:?}, gateway {through:?}");
        if name == "unknown method" {
            // RabbitMQ drops the socket without a close frame; the gateway, losing its
            // backend, tells the client 320 rather than vanishing (documented).
            assert_eq!(reference, (None, false), "{name}");
            assert_eq!(through, (Some((0, 320, 0, 0)), false), "{name}");
            continue;
        }
        if reference != through {
            differences.push(format!("{name}: broker {reference:?}, gateway {through:?}"));
        }
    }
    assert!(differences.is_empty(), "{differences:#?}");
}

/// A pre-authentication case: the bytes after the protocol header, and what the gateway
/// sends back after `connection.start` (a close code, or nothing).
async fn preauth(addr: &str, bytes: &[u8]) -> (Option<u16>, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(HEADER).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = BytesMut::new();
    let (got, closed) = read_until(&mut s, &mut buf, |_, m| is_connection_close(m)).await;
    let code = got.iter().find_map(|(_, m)| match m {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => Some(c.reply_code),
        _ => None,
    });
    (code, closed)
}

#[tokio::test]
async fn preauth_abuse_ends_the_connection_without_a_backend() {
    let gw = start_gateway("").await;
    let addr = gw.addrs.plain.unwrap().to_string();
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        // RabbitMQ resets the socket after 3 s without a frame for all of these; the gateway
        // closes at once, and names the expected method for a wrong one on channel 0.
        ("channel.open before start-ok", channel_open(1), None),
        (
            "body frame before start-ok",
            raw_frame(frame::BODY, 1, b"abc"),
            None,
        ),
        (
            "header frame before start-ok",
            raw_frame(frame::HEADER, 0, b"abc"),
            None,
        ),
        (
            "frame-end missing",
            {
                let mut f = start_ok("", "x");
                *f.last_mut().unwrap() = 0;
                f
            },
            None,
        ),
        ("oversized frame", vec![1, 0, 0, 0x10, 0, 0, 0], None),
        ("unknown frame type", raw_frame(9, 0, b""), None),
        (
            "start-ok on channel 1",
            {
                let mut f = start_ok("", "x");
                f[2] = 1;
                f
            },
            None,
        ),
        (
            "update-secret before start-ok",
            update_secret(0, "x"),
            Some(503),
        ),
    ];
    for (name, bytes, expected) in cases {
        let (code, closed) = preauth(&addr, &bytes).await;
        assert_eq!(code, expected, "{name}");
        assert!(closed || code.is_some(), "{name}: the connection ends");
    }
    // A heartbeat flood before start-ok is skipped, and the handshake goes on.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(HEADER).await.unwrap();
    let flood: Vec<u8> = (0..5_000)
        .flat_map(|_| raw_frame(frame::HEARTBEAT, 0, &[]))
        .collect();
    s.write_all(&flood).await.unwrap();
    s.write_all(&start_ok("", &sign(&claims(ADMIN_ROLE))))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let (got, _) = read_until(&mut s, &mut buf, |_, m| {
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))
    })
    .await;
    assert!(matches!(
        got.last(),
        Some((_, AMQPClass::Connection(connection::AMQPMethod::Tune(_))))
    ));
}
