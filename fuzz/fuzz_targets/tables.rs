//! Field tables as RabbitMQ reads them: arbitrary bytes, and tables nested far deeper than a
//! stack could recurse, built from the input (first byte: depth multiplier). Never panics
//! and never recurses; `get` is the first entry with its key (`rabbit_misc:table_lookup`);
//! a checked level walks to its end; every nested level can be opened one at a time.
#![no_main]
use amqp_iam_gateway::amqp::table::{Array, Table, Value};

/// Walks every level of `t` with an explicit stack (never recursion), checking each level
/// it opens; returns how many levels it opened.
fn walk(t: Table<'_>) -> usize {
    enum Level<'a> {
        T(Table<'a>),
        A(Array<'a>),
    }
    let mut stack = vec![Level::T(t)];
    let mut opened = 0;
    while let Some(level) = stack.pop() {
        opened += 1;
        fn visit(v: Value<'_>) -> Value<'_> {
            let _ = v.type_name();
            v
        }
        let values: Vec<Value<'_>> = match level {
            Level::T(t) => {
                // The first entry with a key is what `get` answers.
                let entries: Vec<_> = t.entries().collect();
                for (i, (k, v)) in entries.iter().enumerate() {
                    if let Ok(key) = std::str::from_utf8(k)
                        && entries[..i].iter().all(|(k2, _)| k2 != k)
                    {
                        assert_eq!(t.get(key).as_ref(), Some(v));
                    }
                }
                entries.into_iter().map(|(_, v)| visit(v)).collect()
            }
            Level::A(a) => a.values().map(visit).collect(),
        };
        for v in values {
            match v {
                Value::Table(inner) => {
                    if let Ok(inner) = inner.check() {
                        stack.push(Level::T(inner));
                    }
                }
                Value::Array(inner) => {
                    if let Ok(inner) = inner.check() {
                        stack.push(Level::A(inner));
                    }
                }
                _ => {}
            }
        }
    }
    opened
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else { return };
    if knobs & 1 == 0 {
        // Arbitrary bytes as a table's entries.
        if let Ok(t) = Table::new(rest) {
            let n = t.entries().count();
            assert!(n <= rest.len() / 3 + 1, "every entry takes at least 3 bytes");
            walk(t);
        }
        return;
    }
    // A table nested `depth` levels deep (entries `k` holding arrays of tables ...),
    // with the input as the innermost content: exercises depth without the fuzzer having to
    // find lengths. Built in one pass, outside in: each level's length is known.
    let depth = 1 + (knobs as usize >> 1) * 80;
    // Level i (0 outermost) is a table entry `k: A` when i is even, an array value `F`
    // when odd: 7 or 5 bytes of header, then the levels inside it.
    let header = |i: usize| if i % 2 == 0 { 7 } else { 5 };
    let mut inside = vec![0usize; depth + 1];
    inside[depth] = rest.len();
    for i in (0..depth).rev() {
        inside[i] = inside[i + 1] + header(i);
    }
    let mut inner = Vec::with_capacity(inside[0]);
    for i in 0..depth {
        if i % 2 == 0 {
            inner.extend_from_slice(&[1, b'k', b'A']);
        } else {
            inner.push(b'F');
        }
        inner.extend_from_slice(&(inside[i + 1] as u32).to_be_bytes());
    }
    inner.extend_from_slice(rest);
    if let Ok(t) = Table::new(&inner) {
        walk(t);
    } else if let Ok(a) = Array::new(&inner) {
        let _ = a.values().count();
    }
});
