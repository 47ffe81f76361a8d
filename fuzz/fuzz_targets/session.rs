//! The authorised session fed arbitrary client and backend bytes, with permissive or
//! restrictive permissions (first byte). Never panics; denials never forward the frame.
#![no_main]
use amqp_iam_gateway::amqp::session::{ClientEvent, Outbox, Session, SessionConfig};
use amqp_iam_gateway::authz::Permissions;
use bytes::BytesMut;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else { return };
    let scopes: Vec<String> = match knobs % 3 {
        0 => vec!["configure:*/*".into(), "read:*/*".into(), "write:*/*".into()],
        1 => vec!["read:%2F/q*".into(), "write:%2F/amq.topic/a.*".into()],
        _ => vec![],
    };
    let cfg = SessionConfig {
        lookups: knobs & 4 == 4,
        cancel_notify: knobs & 8 == 8,
        seed: 1,
        ..SessionConfig::new("u", "/")
    };
    let mut s = Session::new(cfg, Permissions::from_scopes(&scopes));
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let (mut client, mut backend) = (BytesMut::new(), BytesMut::new());
    // Pieces alternate between the client and the backend; a piece's first byte is its length.
    let mut rest = rest;
    let mut from_client = true;
    while let Some((&len, tail)) = rest.split_first() {
        let (piece, tail) = tail.split_at((len as usize).min(tail.len()));
        rest = tail;
        let r = if from_client {
            client.extend_from_slice(piece);
            match s.on_client_input(&mut client, &mut to_b, &mut to_c) {
                Ok(ClientEvent::LookupExchange(name)) => {
                    s.exchange_kind_learned(name, None);
                    Ok(())
                }
                Ok(ClientEvent::UpdateSecret(_)) => {
                    s.secret_updated(
                        Err(amqp_iam_gateway::amqp::session::SecretRefused("refused".into())),
                        &mut to_c,
                        &mut to_b,
                    );
                    Ok(())
                }
                Ok(ClientEvent::None) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            backend.extend_from_slice(piece);
            let r = s.on_backend_input(&mut backend, &mut to_c);
            s.take_backend_output(&mut to_b);
            r
        };
        if r.is_err() {
            return;
        }
        to_b.consume(to_b.len());
        to_c.consume(to_c.len());
        from_client = !from_client;
    }
});
