//! Duplicate table keys where they decide a permission: `CC` / `BCC` in a publish's headers,
//! `x-dead-letter-exchange` in `queue.declare`, `alternate-exchange` in `exchange.declare`.
//! The input gives the entries (key, type, value) in order; the session must decide on the
//! FIRST entry of each key, as RabbitMQ routes and declares with it. Asserted: whatever the
//! later entries say, the method is forwarded exactly when a model that reads only the
//! first entries permits it.
#![no_main]
use amqp_iam_gateway::amqp::frame;
use amqp_iam_gateway::amqp::session::{Outbox, Session, SessionConfig};
use amqp_iam_gateway::authz::Permissions;
use bytes::{BufMut, BytesMut};

const NAMES: [&str; 4] = ["ok.a", "ok.b", "no.a", "no.b"];

fn permitted(name: &[u8]) -> bool {
    name.starts_with(b"ok.")
}

fn longstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn method(ch: u16, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    frame::write_frame(&mut b, frame::METHOD, ch, payload);
    b
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&what, rest)) = data.split_first() else { return };
    let key = match what % 3 {
        0 => ["CC", "BCC"][(what as usize / 3) % 2],
        1 => "x-dead-letter-exchange",
        _ => "alternate-exchange",
    };
    // Entries: each input byte picks a value: a name (as a long string, or for CC/BCC an
    // array of one), or another type; bit 7 picks another key.
    let mut table = Vec::new();
    let mut first: Option<Option<&str>> = None; // the first entry of `key`: its name if a string
    for &b in rest.iter().take(64) {
        let k = if b & 0x80 == 0 { key } else { "other" };
        let name = NAMES[(b & 3) as usize];
        table.push(k.len() as u8);
        table.extend_from_slice(k.as_bytes());
        let string = b & 0x40 == 0;
        if string {
            if key.ends_with("CC") {
                let mut arr = vec![b'S'];
                longstr(&mut arr, name.as_bytes());
                table.push(b'A');
                longstr(&mut table, &arr);
            } else {
                table.push(b'S');
                longstr(&mut table, name.as_bytes());
            }
        } else {
            table.push(b'I');
            table.extend_from_slice(&7i32.to_be_bytes());
        }
        if k == key && first.is_none() {
            first = Some(string.then_some(name));
        }
    }
    // Permissions: configure/read on the declared names; write on `ok.*` exchanges and
    // topic write on `ok.*` keys of amq.topic.
    let scopes: Vec<String> = [
        "configure:*/q",
        "read:*/q",
        "configure:*/x",
        "read:*/x",
        "write:*/ok.*",
        "write:*/amq.topic/ok.*",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut s = Session::new(SessionConfig::new("u", "/"), Permissions::from_scopes(&scopes));
    let (mut to_b, mut to_c) = (Outbox::default(), Outbox::default());
    let mut input = method(1, &[0, 20, 0, 10, 0]);
    let checked = match key {
        "CC" | "BCC" => {
            input.extend_from_slice(&method(1, &[0, 60, 0, 40, 0, 0, 9, b'a', b'm', b'q', b'.', b't', b'o', b'p', b'i', b'c', 4, b'o', b'k', b'.', b'r', 0]));
            let mut p = vec![0, 60, 0, 0];
            p.extend_from_slice(&0u64.to_be_bytes());
            p.put_u16(1 << 13);
            longstr(&mut p, &table);
            let mut h = BytesMut::new();
            frame::write_frame(&mut h, frame::HEADER, 1, &p);
            input.extend_from_slice(&h);
            h
        }
        "x-dead-letter-exchange" => {
            let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
            longstr(&mut p, &table);
            let m = method(1, &p);
            input.extend_from_slice(&m);
            m
        }
        _ => {
            let mut p = vec![0, 40, 0, 10, 0, 0, 1, b'x', 6];
            p.extend_from_slice(b"direct");
            p.push(0);
            longstr(&mut p, &table);
            let m = method(1, &p);
            input.extend_from_slice(&m);
            m
        }
    };
    s.on_client_input(&mut input, &mut to_b, &mut to_c).expect("well framed");
    let out: Vec<u8> = to_b.chunks().flat_map(|c| c.iter().copied()).collect();
    let forwarded = out.windows(checked.len()).any(|w| w == &checked[..]);
    // The model: only the first entry counts; a non-string one names nothing to check.
    let want = match first {
        Some(Some(name)) => permitted(name.as_bytes()),
        _ => true,
    };
    assert_eq!(forwarded, want, "key {key}, first entry {first:?}");
});
