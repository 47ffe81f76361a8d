//! Byte-level handshake tests, fed one byte at a time as well as whole.

use super::*;
use amq_protocol::types::ShortString;

fn settings() -> HandshakeSettings {
    HandshakeSettings {
        max_preauth_frame: 16_384,
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60,
        product: "amqp-iam-gateway".into(),
        version: "test".into(),
    }
}

fn client_props(auth_failure_close: bool) -> FieldTable {
    let mut caps = FieldTable::default();
    caps.insert(
        "authentication_failure_close".into(),
        AMQPValue::Boolean(auth_failure_close),
    );
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}

fn start_ok(mechanism: &str, response: &[u8], afc: bool) -> BytesMut {
    let mut out = BytesMut::new();
    let m = connection::StartOk {
        client_properties: client_props(afc),
        mechanism: ShortString::from(mechanism),
        response: response.to_vec().into(),
        locale: ShortString::from("en_US"),
    };
    method::encode(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(m)),
    );
    out
}

fn tune_ok(frame_max: u32) -> BytesMut {
    let mut out = BytesMut::new();
    let m = connection::TuneOk {
        channel_max: 2047,
        frame_max,
        heartbeat: 30,
    };
    method::encode(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(m)),
    );
    out
}

fn open(vhost: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let m = connection::Open {
        virtual_host: ShortString::from(vhost),
    };
    method::encode(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(m)),
    );
    out
}

/// Feeds `bytes` one at a time, returning the first step that is not `NeedMore`.
fn feed_bytewise(
    hs: &mut ClientHandshake,
    bytes: &[u8],
    out: &mut BytesMut,
) -> Result<Step, HandshakeError> {
    let mut input = BytesMut::new();
    for b in bytes {
        input.extend_from_slice(&[*b]);
        match hs.receive(&mut input, out)? {
            Step::NeedMore => continue,
            step => {
                assert!(input.is_empty(), "step returned with bytes left over");
                return Ok(step);
            }
        }
    }
    Ok(Step::NeedMore)
}

fn decode_all(mut out: BytesMut) -> Vec<(u16, AMQPClass)> {
    let mut v = Vec::new();
    while let Some(h) = frame::check(&out, 1 << 20).unwrap() {
        let f = out.split_to(h.wire_len());
        let (_, m) = amq_protocol::protocol::parse_class(frame::payload(&f, &h)).unwrap();
        v.push((h.channel, m));
    }
    assert!(out.is_empty());
    v
}

#[test]
fn full_handshake_plain_bytewise() {
    let mut hs = ClientHandshake::new(settings());
    let mut out = BytesMut::new();
    let mut bytes = PROTOCOL_HEADER.to_vec();
    bytes.extend_from_slice(&start_ok("PLAIN", b"\0\0tok.en.sig", true));
    let step = feed_bytewise(&mut hs, &bytes, &mut out).unwrap();
    let Step::Authenticate(creds) = step else {
        panic!("{step:?}")
    };
    assert_eq!(
        (
            creds.mechanism,
            creds.username.as_str(),
            creds.token.as_str()
        ),
        (Mechanism::Plain, "", "tok.en.sig")
    );
    assert!(creds.capability("authentication_failure_close"));
    let sent = decode_all(out.split());
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = &sent[0].1 else {
        panic!()
    };
    assert_eq!(start.mechanisms.as_bytes(), b"PLAIN AMQPLAIN");
    let Some(AMQPValue::FieldTable(caps)) = start.server_properties.inner().get("capabilities")
    else {
        panic!()
    };
    for c in SERVER_CAPABILITIES {
        assert_eq!(caps.inner().get(c), Some(&AMQPValue::Boolean(true)), "{c}");
    }

    hs.accept(&mut out);
    let sent = decode_all(out.split());
    assert!(matches!(
        sent[0].1,
        AMQPClass::Connection(connection::AMQPMethod::Tune(_))
    ));

    let mut rest = tune_ok(131_072);
    rest.extend_from_slice(&open("/"));
    let step = feed_bytewise(&mut hs, &rest, &mut out).unwrap();
    assert!(
        matches!(step, Step::Open { ref vhost } if vhost == "/"),
        "{step:?}"
    );
    assert_eq!(
        hs.tuning(),
        Some(Tuning {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 30
        })
    );
    hs.opened(&mut out);
    assert!(matches!(
        decode_all(out)[0].1,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
    ));
}

#[test]
fn amqplain_credentials() {
    let mut table = FieldTable::default();
    table.insert(
        "LOGIN".into(),
        AMQPValue::LongString(method::long("someone")),
    );
    table.insert(
        "PASSWORD".into(),
        AMQPValue::LongString(method::long("the.token")),
    );
    let encoded = cookie_factory::gen_simple(
        amq_protocol::types::generation::gen_field_table(&table),
        Vec::new(),
    )
    .unwrap();
    let mut hs = ClientHandshake::new(settings());
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    input.extend_from_slice(&start_ok("AMQPLAIN", &encoded[4..], false));
    let mut out = BytesMut::new();
    let Step::Authenticate(c) = hs.receive(&mut input, &mut out).unwrap() else {
        panic!()
    };
    assert_eq!(
        (c.mechanism, c.username.as_str(), c.token.as_str()),
        (Mechanism::AmqPlain, "someone", "the.token")
    );
    assert!(!c.capability("authentication_failure_close"));
}

#[test]
fn wrong_protocol_header_gets_ours_back() {
    for bad in [
        &b"AMQP\x00\x00\x08\x00"[..],
        b"GET / HTTP/1.1\r\n",
        b"AMQP\x01\x01\x00\x0a",
    ] {
        let mut hs = ClientHandshake::new(settings());
        let mut out = BytesMut::new();
        let r = hs.receive(&mut BytesMut::from(bad), &mut out);
        assert_eq!(r.unwrap_err(), HandshakeError::BadProtocolHeader);
        assert_eq!(&out[..], PROTOCOL_HEADER);
    }
}

#[test]
fn refusal_with_and_without_capability() {
    for (afc, mech, expect) in [(true, "PLAIN", Some("PLAIN")), (false, "PLAIN", None)] {
        let mut hs = ClientHandshake::new(settings());
        let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
        input.extend_from_slice(&start_ok(mech, b"\0\0bad", afc));
        let mut out = BytesMut::new();
        let Step::Authenticate(c) = hs.receive(&mut input, &mut out).unwrap() else {
            panic!()
        };
        out.clear();
        assert_eq!(hs.refuse(&c, &mut out), expect.is_some());
        match expect {
            None => assert!(out.is_empty()),
            Some(m) => {
                let sent = decode_all(out);
                assert_eq!(sent.len(), 1);
                let AMQPClass::Connection(connection::AMQPMethod::Close(close)) = &sent[0].1 else {
                    panic!()
                };
                assert_eq!(
                    (close.reply_code, close.class_id, close.method_id),
                    (403, 0, 0)
                );
                assert_eq!(
                    close.reply_text.as_str(),
                    format!(
                        "ACCESS_REFUSED - Login was refused using authentication mechanism {m}. For details see the broker logfile."
                    )
                );
                // The client's close-ok ends it.
                let mut ok = BytesMut::new();
                method::connection_close_ok(&mut ok);
                assert!(matches!(
                    hs.receive(&mut ok, &mut BytesMut::new()),
                    Ok(Step::Closed)
                ));
            }
        }
    }
}

#[test]
fn plain_with_authzid_is_a_syntax_error() {
    let mut hs = ClientHandshake::new(settings());
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    input.extend_from_slice(&start_ok("PLAIN", b"admin\0user\0secret-token", true));
    let mut out = BytesMut::new();
    assert!(hs.receive(&mut input, &mut out).is_err());
    let sent = decode_all(out);
    let AMQPClass::Connection(connection::AMQPMethod::Close(close)) = &sent.last().unwrap().1
    else {
        panic!()
    };
    assert_eq!(close.reply_code, 502);
    assert!(
        !close.reply_text.as_str().contains("secret"),
        "the credential must not be echoed"
    );
}

#[test]
fn preauth_frame_bound() {
    let mut hs = ClientHandshake::new(settings());
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    // Only the 7-byte header of a 1 MiB frame: refused before the payload arrives.
    input.extend_from_slice(&[1, 0, 0, 0, 0x10, 0, 0]);
    let err = hs.receive(&mut input, &mut BytesMut::new()).unwrap_err();
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::TooLarge { .. })),
        "{err:?}"
    );

    // A 12 KiB token fits in the 16 KiB bound.
    let mut hs = ClientHandshake::new(settings());
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    let mut response = b"\0\0".to_vec();
    response.extend(std::iter::repeat_n(b'a', 12 * 1024));
    input.extend_from_slice(&start_ok("PLAIN", &response, true));
    assert!(matches!(
        hs.receive(&mut input, &mut BytesMut::new()),
        Ok(Step::Authenticate(_))
    ));
}

#[test]
fn unknown_mechanism_and_wrong_method() {
    let mut hs = ClientHandshake::new(settings());
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    input.extend_from_slice(&start_ok("EXTERNAL", b"", true));
    assert_eq!(
        hs.receive(&mut input, &mut BytesMut::new()).unwrap_err(),
        HandshakeError::Mechanism
    );

    let mut hs = ClientHandshake::new(settings());
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    input.extend_from_slice(&open("/"));
    let mut out = BytesMut::new();
    assert!(matches!(
        hs.receive(&mut input, &mut out),
        Err(HandshakeError::Unexpected(_))
    ));
    let sent = decode_all(out);
    let AMQPClass::Connection(connection::AMQPMethod::Close(close)) = &sent.last().unwrap().1
    else {
        panic!()
    };
    assert_eq!(close.reply_code, 503);
}

#[test]
fn tune_ok_out_of_range() {
    for bad in [1024u32, 1 << 20] {
        let mut hs = ClientHandshake::new(settings());
        let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
        input.extend_from_slice(&start_ok("PLAIN", b"\0\0t", true));
        let mut out = BytesMut::new();
        let Step::Authenticate(_) = hs.receive(&mut input, &mut out).unwrap() else {
            panic!()
        };
        hs.accept(&mut out);
        let mut t = tune_ok(bad);
        assert!(matches!(
            hs.receive(&mut t, &mut out),
            Err(HandshakeError::Tune(_))
        ));
    }
}

#[test]
fn start_parses_as_a_whole_frame() {
    let mut hs = ClientHandshake::new(settings());
    let mut out = BytesMut::new();
    let _ = hs.receive(&mut BytesMut::from(&PROTOCOL_HEADER[..]), &mut out);
    let r = amq_protocol::frame::parsing::parse_frame(&out[..]);
    assert!(r.is_ok(), "{:?} {:x?}", r.err(), &out[..40]);
    let mut out = BytesMut::new();
    hs.accept(&mut out);
    assert!(amq_protocol::frame::parsing::parse_frame(&out[..]).is_ok());
}

/// Client properties nested far deeper than any stack could recurse are read one level at
/// a time (this aborted the whole process before: amq-protocol's parser recursed).
#[test]
fn deeply_nested_client_properties_do_not_recurse() {
    const DEPTH: usize = 12_000;
    let mut inner: Vec<u8> = Vec::with_capacity(5 * DEPTH);
    for i in 0..DEPTH {
        inner.push(b'A');
        inner.extend_from_slice(&((5 * (DEPTH - 1 - i)) as u32).to_be_bytes());
    }
    let mut props = vec![4u8];
    props.extend_from_slice(b"deep");
    props.extend_from_slice(&inner);
    let mut p = vec![0, 10, 0, 11];
    p.extend_from_slice(&(props.len() as u32).to_be_bytes());
    p.extend_from_slice(&props);
    p.push(5);
    p.extend_from_slice(b"PLAIN");
    p.extend_from_slice(&6u32.to_be_bytes());
    p.extend_from_slice(b"\0\0tok!");
    p.push(5);
    p.extend_from_slice(b"en_US");
    let mut frame = BytesMut::new();
    frame::write_frame(&mut frame, frame::METHOD, 0, &p);
    let mut hs = ClientHandshake::new(HandshakeSettings {
        max_preauth_frame: 65_536,
        ..settings()
    });
    let mut input = BytesMut::from(&PROTOCOL_HEADER[..]);
    input.extend_from_slice(&frame);
    let mut out = BytesMut::new();
    let Ok(Step::Authenticate(creds)) = hs.receive(&mut input, &mut out) else {
        panic!("the login goes on")
    };
    assert_eq!(creds.token, "tok!");
    assert!(!creds.capability("authentication_failure_close"));
}

#[test]
fn capabilities_and_credentials_take_the_first_entry_of_a_key() {
    // capabilities: authentication_failure_close false, then true: RabbitMQ reads false.
    let caps = [
        &[28u8][..],
        b"authentication_failure_close",
        &[b't', 0],
        &[28u8],
        b"authentication_failure_close",
        &[b't', 1],
    ]
    .concat();
    let mut props = vec![12u8];
    props.extend_from_slice(b"capabilities");
    props.push(b'F');
    props.extend_from_slice(&(caps.len() as u32).to_be_bytes());
    props.extend_from_slice(&caps);
    let p = ClientProperties::new(&props).unwrap();
    assert!(!p.capability("authentication_failure_close"));
    // AMQPLAIN: the first PASSWORD counts.
    let entry = |k: &str, v: &str| {
        let mut e = vec![k.len() as u8];
        e.extend_from_slice(k.as_bytes());
        e.push(b'S');
        e.extend_from_slice(&(v.len() as u32).to_be_bytes());
        e.extend_from_slice(v.as_bytes());
        e
    };
    let response = [
        entry("LOGIN", "u"),
        entry("PASSWORD", "first"),
        entry("PASSWORD", "second"),
    ]
    .concat();
    assert_eq!(
        parse_amqplain(&response),
        Some(("u".to_owned(), b"first".to_vec()))
    );
}

#[test]
fn backend_properties_keep_first_entries_within_a_budget() {
    let mut w = TableWriter::default();
    w.long_str("product", b"client");
    w.long_str("product", b"shadow");
    w.long_str("connection_name", b"app");
    w.long_str("client_address", b"spoofed");
    w.long_str("junk", &[b'x'; 5000]);
    let mut caps = TableWriter::default();
    caps.bool("publisher_confirms", true);
    caps.bool("consumer_cancel_notify", false);
    caps.bool("authentication_failure_close", false);
    w.table("capabilities", &caps);
    let p = ClientProperties::new(w.entries()).unwrap();
    let wire = p.for_backend("alice via gw", "10.0.0.1:5555", true);
    assert!(wire.len() <= 4 + BACKEND_PROPERTIES_BUDGET);
    let (t, _) = table::read(&wire).unwrap();
    assert_eq!(t.get("product"), Some(Value::LongStr(b"client")));
    assert_eq!(t.entries().filter(|(k, _)| *k == b"product").count(), 1);
    assert_eq!(
        t.get("connection_name"),
        Some(Value::LongStr(b"app [alice via gw]"))
    );
    assert_eq!(
        t.get("client_address"),
        Some(Value::LongStr(b"10.0.0.1:5555"))
    );
    assert!(t.get("junk").is_none(), "too big for the budget");
    let caps = t.table("capabilities").unwrap();
    assert!(caps.flag("publisher_confirms"));
    assert!(
        caps.flag("consumer_cancel_notify"),
        "the gateway always asks the broker for cancel notifications"
    );
    assert!(
        caps.flag("authentication_failure_close"),
        "a refused login of an internal user comes as a close to pass on"
    );
    // A session relayed unchecked keeps the client's own cancel-notify choice.
    let wire = p.for_backend("alice", "10.0.0.1:5555", false);
    let (t, _) = table::read(&wire).unwrap();
    let caps = t.table("capabilities").unwrap();
    assert_eq!(caps.get("consumer_cancel_notify"), Some(Value::Bool(false)));
    assert!(caps.flag("authentication_failure_close"));
}
