//! Field tables: RabbitMQ's types and sizes, first entry wins, no recursion.

use super::*;

fn entry(key: &str, t: u8, v: &[u8]) -> Vec<u8> {
    let mut e = vec![key.len() as u8];
    e.extend_from_slice(key.as_bytes());
    e.push(t);
    e.extend_from_slice(v);
    e
}

fn sized(v: &[u8]) -> Vec<u8> {
    let mut e = (v.len() as u32).to_be_bytes().to_vec();
    e.extend_from_slice(v);
    e
}

/// Every type of `rabbit_binary_parser:parse_table/1`, with its wire bytes and value.
#[test]
fn every_rabbitmq_type_reads_as_rabbitmq_reads_it() {
    let cases: Vec<(u8, Vec<u8>, Value<'static>)> = vec![
        (b'S', sized(b"abc"), Value::LongStr(b"abc")),
        (b'T', 7u64.to_be_bytes().to_vec(), Value::Timestamp(7)),
        (b'b', vec![0xff], Value::Byte(-1)),
        (b'B', vec![0xff], Value::UByte(255)),
        // RabbitMQ's `s` is a signed 16-bit integer, not the specification's short string.
        (b's', vec![0xff, 0xfe], Value::Short(-2)),
        (b'u', vec![0xff, 0xfe], Value::UShort(0xfffe)),
        (b'I', (-5i32).to_be_bytes().to_vec(), Value::Int(-5)),
        (b'i', 5u32.to_be_bytes().to_vec(), Value::UInt(5)),
        (b'd', 1.5f64.to_be_bytes().to_vec(), Value::Double(1.5)),
        (b'f', 1.5f32.to_be_bytes().to_vec(), Value::Float(1.5)),
        (b'l', (-9i64).to_be_bytes().to_vec(), Value::Long(-9)),
        // `L` is read as signed too (rabbitmq-server#1093).
        (b'L', (-9i64).to_be_bytes().to_vec(), Value::Long(-9)),
        (b't', vec![2], Value::Bool(true)),
        (b't', vec![0], Value::Bool(false)),
        (b'D', vec![2, 0, 0, 1, 0], Value::Decimal(2, 256)),
        (b'x', sized(b"\0\x01"), Value::Bytes(b"\0\x01")),
        (b'V', vec![], Value::Void),
    ];
    for (t, wire, want) in cases {
        let bytes = entry("k", t, &wire);
        let table = Table::new(&bytes).unwrap_or_else(|e| panic!("type {}: {e}", t as char));
        assert_eq!(table.get("k"), Some(want), "type {}", t as char);
        assert_eq!(table.entries().count(), 1);
        // Any cut inside the entry is a truncated table, never a shorter valid one.
        for cut in 1..bytes.len() {
            assert_eq!(
                Table::new(&bytes[..cut]),
                Err(TableError::Truncated),
                "type {} cut at {cut}",
                t as char
            );
        }
        // The same value in an array.
        let mut a = vec![t];
        a.extend_from_slice(&wire);
        let array = Array::new(&a).unwrap();
        assert_eq!(array.values().collect::<Vec<_>>(), vec![want]);
    }
}

#[test]
fn unknown_types_are_refused() {
    // The specification's short string and others RabbitMQ does not read.
    for t in [b'c', b'U', b'n', b'N', b'0', 0xff] {
        assert_eq!(
            Table::new(&entry("k", t, b"\x00")),
            Err(TableError::UnknownType(t))
        );
        assert_eq!(Array::new(&[t, 0]), Err(TableError::UnknownType(t)));
    }
}

#[test]
fn the_first_entry_with_a_key_wins() {
    let mut bytes = entry("x-dead-letter-exchange", b'S', &sized(b"first"));
    bytes.extend(entry("x-dead-letter-exchange", b'S', &sized(b"second")));
    bytes.extend(entry("other", b't', &[1]));
    let t = Table::new(&bytes).unwrap();
    assert_eq!(
        t.get("x-dead-letter-exchange"),
        Some(Value::LongStr(b"first"))
    );
    assert_eq!(t.entries().count(), 3);
    assert!(t.flag("other"));
    assert_eq!(t.get("missing"), None);
}

#[test]
fn keys_are_bytes_and_case_sensitive() {
    let bytes = entry("CC", b'S', &sized(b"a"));
    let t = Table::new(&bytes).unwrap();
    assert!(t.get("cc").is_none());
    assert!(t.get("CC").is_some());
}

/// Nesting costs nothing until a level is opened, and opening one level never descends:
/// a million levels are read without recursion (the old parser overflowed the stack at a
/// few thousand).
#[test]
fn deep_nesting_is_read_one_level_at_a_time() {
    const DEPTH: usize = 1_000_000;
    // A[A[A[...]]]: level i holds the 5 bytes of each level inside it.
    let mut inner: Vec<u8> = Vec::with_capacity(5 * DEPTH);
    for i in 0..DEPTH {
        inner.push(b'A');
        inner.extend_from_slice(&((5 * (DEPTH - 1 - i)) as u32).to_be_bytes());
    }
    let bytes = [vec![1, b'k'], inner].concat();
    let t = Table::new(&bytes).unwrap();
    let mut level = match t.get("k") {
        Some(Value::Array(a)) => a,
        other => panic!("{other:?}"),
    };
    for _ in 1..DEPTH {
        let Some(Value::Array(next)) = Array::new(level.0).unwrap().values().next() else {
            panic!("level ends early");
        };
        level = next;
    }
    assert_eq!(level.values().count(), 0);
}

#[test]
fn a_malformed_nested_level_does_not_hide_the_outer_entries() {
    // The nested table's length is right but its content is garbage: the outer level is
    // still valid (RabbitMQ would refuse the whole method; the broker sees the same bytes).
    let mut bytes = entry("bad", b'F', &sized(&[5, b'x']));
    bytes.extend(entry("ok", b'S', &sized(b"v")));
    let t = Table::new(&bytes).unwrap();
    assert_eq!(t.get("ok"), Some(Value::LongStr(b"v")));
    assert!(t.table("bad").is_none());
}

#[test]
fn lengths_beyond_the_buffer_are_truncation_not_panics() {
    for t in [b'S', b'x', b'F', b'A'] {
        let bytes = entry("k", t, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(Table::new(&bytes), Err(TableError::Truncated));
    }
    assert_eq!(read(&[0, 0, 0, 9, 1]), Err(TableError::Truncated));
}

#[test]
fn the_writer_round_trips_every_value() {
    let values = [
        Value::LongStr(b"s"),
        Value::Bytes(b"x"),
        Value::Timestamp(1),
        Value::Byte(-1),
        Value::UByte(1),
        Value::Short(-1),
        Value::UShort(1),
        Value::Int(-1),
        Value::UInt(1),
        Value::Double(0.5),
        Value::Float(0.5),
        Value::Long(-1),
        Value::Bool(true),
        Value::Decimal(1, 2),
        Value::Void,
    ];
    let mut w = TableWriter::default();
    for (i, v) in values.iter().enumerate() {
        w.value(&format!("k{i}"), v);
    }
    let mut nested = TableWriter::default();
    nested.bool("b", true);
    w.table("t", &nested);
    let wire = w.into_wire();
    let (t, rest) = read(&wire).unwrap();
    assert!(rest.is_empty());
    for (i, v) in values.iter().enumerate() {
        assert_eq!(t.get(&format!("k{i}")).as_ref(), Some(v));
    }
    assert!(t.table("t").unwrap().flag("b"));
}

/// Where amq-protocol and RabbitMQ agree on a type, both read the same value; a table
/// amq-protocol wrote is read back entry for entry.
#[test]
fn agrees_with_amq_protocol_on_shared_types() {
    use amq_protocol::types::{AMQPValue, FieldTable, LongString};
    let mut ft = FieldTable::default();
    ft.insert(
        "a".into(),
        AMQPValue::LongString(LongString::from(b"x".to_vec())),
    );
    ft.insert("b".into(), AMQPValue::Boolean(true));
    ft.insert("c".into(), AMQPValue::LongInt(-7));
    let mut caps = FieldTable::default();
    caps.insert("n".into(), AMQPValue::Boolean(true));
    ft.insert("d".into(), AMQPValue::FieldTable(caps));
    let wire = cookie_factory::gen_simple(
        amq_protocol::types::generation::gen_field_table(&ft),
        Vec::new(),
    )
    .unwrap();
    let (t, _) = read(&wire).unwrap();
    assert_eq!(t.get("a"), Some(Value::LongStr(b"x")));
    assert_eq!(t.get("b"), Some(Value::Bool(true)));
    assert_eq!(t.get("c"), Some(Value::Int(-7)));
    assert!(t.table("d").unwrap().flag("n"));
}
