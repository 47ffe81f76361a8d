//! The client handshake fed an arbitrary byte stream in arbitrary pieces; the first byte
//! decides the verification outcomes. Never panics; output stays bounded.
#![no_main]
use amqp_iam_gateway::amqp::handshake::{ClientHandshake, HandshakeSettings, Step};
use bytes::BytesMut;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else { return };
    let mut hs = ClientHandshake::new(HandshakeSettings {
        max_preauth_frame: 4096,
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60,
        product: "fuzz".into(),
        version: "0".into(),
    });
    let (mut input, mut out) = (BytesMut::new(), BytesMut::new());
    // Real clients send the protocol header first; most inputs should get past it.
    if knobs & 1 == 1 {
        input.extend_from_slice(amqp_iam_gateway::amqp::frame::PROTOCOL_HEADER);
    }
    let piece = 1 + (knobs as usize >> 2);
    for chunk in rest.chunks(piece) {
        input.extend_from_slice(chunk);
        match hs.receive(&mut input, &mut out) {
            Ok(Step::Authenticate(_)) if knobs & 2 == 0 => hs.accept(&mut out),
            Ok(Step::Authenticate(creds)) => _ = hs.refuse(&creds, &mut out),
            Ok(Step::Open { .. }) => hs.opened(&mut out),
            Ok(_) => {}
            Err(_) => return,
        }
        assert!(input.len() <= 4096 + piece + 8, "pre-auth input is bounded");
        assert!(out.len() < 64 * 1024, "replies are bounded");
    }
});
