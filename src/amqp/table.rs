//! AMQP field tables and arrays exactly as RabbitMQ reads them, zero-copy and without
//! recursion.
//!
//! RabbitMQ's `rabbit_binary_parser:parse_table/1` reads a table as an ordered list and
//! `rabbit_misc:table_lookup/2` takes the **first** entry with a key. A client can send a
//! key twice; a parser that keeps the last entry (a map) would show the gateway one value
//! while RabbitMQ acts on another. [`Table::get`] takes the first, like RabbitMQ.
//!
//! Nested tables and arrays carry their own length, so a table is walked one level at a
//! time: [`Value::Table`] and [`Value::Array`] hold their bytes and are read only when the
//! caller asks. Nothing here recurses, so no nesting depth can exhaust the stack, and
//! nothing is allocated. Each level is checked completely when it is opened
//! ([`Table::new`], [`Array::new`]): every entry's type is one RabbitMQ knows and every
//! length fits, or the whole level is refused, as RabbitMQ refuses the method.
//!
//! The types are RabbitMQ's (`rabbit_binary_parser`), which differ from the AMQP 0-9-1
//! specification: `s` is a signed 16-bit integer (not a short string), `l` and `L` are
//! both signed 64-bit, and `x` is a byte array.
//!
//! **Invariant:** no IO, no allocation while reading.

use std::fmt;

/// A table or array that RabbitMQ would refuse to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("field table truncated")]
    Truncated,
    #[error("unknown field type {0:#04x}")]
    UnknownType(u8),
}

/// A field value. Strings and nested containers borrow the bytes they came in.
#[derive(Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// `S`
    LongStr(&'a [u8]),
    /// `T`
    Timestamp(u64),
    /// `b`
    Byte(i8),
    /// `B`
    UByte(u8),
    /// `s` (a signed 16-bit integer in RabbitMQ)
    Short(i16),
    /// `u`
    UShort(u16),
    /// `I`
    Int(i32),
    /// `i`
    UInt(u32),
    /// `d`
    Double(f64),
    /// `f`
    Float(f32),
    /// `l` and `L`
    Long(i64),
    /// `t`
    Bool(bool),
    /// `D`: scale and unscaled value
    Decimal(u8, u32),
    /// `F`
    Table(Table<'a>),
    /// `A`
    Array(Array<'a>),
    /// `x`
    Bytes(&'a [u8]),
    /// `V`
    Void,
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::LongStr(s) => write!(f, "S{:?}", String::from_utf8_lossy(s)),
            Value::Table(t) => write!(f, "F({} bytes)", t.0.len()),
            Value::Array(a) => write!(f, "A({} bytes)", a.0.len()),
            Value::Bytes(b) => write!(f, "x({} bytes)", b.len()),
            Value::Timestamp(v) => write!(f, "T{v}"),
            Value::Byte(v) => write!(f, "b{v}"),
            Value::UByte(v) => write!(f, "B{v}"),
            Value::Short(v) => write!(f, "s{v}"),
            Value::UShort(v) => write!(f, "u{v}"),
            Value::Int(v) => write!(f, "I{v}"),
            Value::UInt(v) => write!(f, "i{v}"),
            Value::Double(v) => write!(f, "d{v}"),
            Value::Float(v) => write!(f, "f{v}"),
            Value::Long(v) => write!(f, "l{v}"),
            Value::Bool(v) => write!(f, "t{v}"),
            Value::Decimal(s, v) => write!(f, "D{s},{v}"),
            Value::Void => f.write_str("V"),
        }
    }
}

impl<'a> Value<'a> {
    /// The bytes of a long string (`S`), the only string type RabbitMQ's tables have.
    pub fn long_str(&self) -> Option<&'a [u8]> {
        match *self {
            Value::LongStr(s) => Some(s),
            _ => None,
        }
    }

    /// RabbitMQ's name for the value's type, as in its error texts (`longstr`, `table`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::LongStr(_) => "longstr",
            Value::Timestamp(_) => "timestamp",
            Value::Byte(_) => "byte",
            Value::UByte(_) => "unsignedbyte",
            Value::Short(_) => "short",
            Value::UShort(_) => "unsignedshort",
            Value::Int(_) => "signedint",
            Value::UInt(_) => "unsignedint",
            Value::Double(_) => "double",
            Value::Float(_) => "float",
            Value::Long(_) => "long",
            Value::Bool(_) => "bool",
            Value::Decimal(..) => "decimal",
            Value::Table(_) => "table",
            Value::Array(_) => "array",
            Value::Bytes(_) => "binary",
            Value::Void => "void",
        }
    }
}

/// Reads one value of type `t` from the front of `buf`; returns it and the bytes after it.
fn value(t: u8, buf: &[u8]) -> Result<(Value<'_>, &[u8]), TableError> {
    fn take<const N: usize>(buf: &[u8]) -> Result<([u8; N], &[u8]), TableError> {
        let (head, rest) = buf.split_at_checked(N).ok_or(TableError::Truncated)?;
        Ok((head.try_into().map_err(|_| TableError::Truncated)?, rest))
    }
    fn sized(buf: &[u8]) -> Result<(&[u8], &[u8]), TableError> {
        let (len, rest) = take::<4>(buf)?;
        rest.split_at_checked(u32::from_be_bytes(len) as usize)
            .ok_or(TableError::Truncated)
    }
    Ok(match t {
        b'S' => sized(buf).map(|(v, r)| (Value::LongStr(v), r))?,
        b'x' => sized(buf).map(|(v, r)| (Value::Bytes(v), r))?,
        b'F' => sized(buf).map(|(v, r)| (Value::Table(Table(v)), r))?,
        b'A' => sized(buf).map(|(v, r)| (Value::Array(Array(v)), r))?,
        b'T' => take::<8>(buf).map(|(v, r)| (Value::Timestamp(u64::from_be_bytes(v)), r))?,
        b'b' => take::<1>(buf).map(|(v, r)| (Value::Byte(v[0] as i8), r))?,
        b'B' => take::<1>(buf).map(|(v, r)| (Value::UByte(v[0]), r))?,
        b's' => take::<2>(buf).map(|(v, r)| (Value::Short(i16::from_be_bytes(v)), r))?,
        b'u' => take::<2>(buf).map(|(v, r)| (Value::UShort(u16::from_be_bytes(v)), r))?,
        b'I' => take::<4>(buf).map(|(v, r)| (Value::Int(i32::from_be_bytes(v)), r))?,
        b'i' => take::<4>(buf).map(|(v, r)| (Value::UInt(u32::from_be_bytes(v)), r))?,
        b'd' => take::<8>(buf).map(|(v, r)| (Value::Double(f64::from_be_bytes(v)), r))?,
        b'f' => take::<4>(buf).map(|(v, r)| (Value::Float(f32::from_be_bytes(v)), r))?,
        b'l' | b'L' => take::<8>(buf).map(|(v, r)| (Value::Long(i64::from_be_bytes(v)), r))?,
        b't' => take::<1>(buf).map(|(v, r)| (Value::Bool(v[0] != 0), r))?,
        b'D' => {
            let (scale, r) = take::<1>(buf)?;
            let (v, r) = take::<4>(r)?;
            (Value::Decimal(scale[0], u32::from_be_bytes(v)), r)
        }
        b'V' => (Value::Void, buf),
        other => return Err(TableError::UnknownType(other)),
    })
}

/// One entry at the front of a table's bytes: key, value, rest.
fn entry(buf: &[u8]) -> Result<(&[u8], Value<'_>, &[u8]), TableError> {
    let (&len, rest) = buf.split_first().ok_or(TableError::Truncated)?;
    let (key, rest) = rest
        .split_at_checked(len as usize)
        .ok_or(TableError::Truncated)?;
    let (&t, rest) = rest.split_first().ok_or(TableError::Truncated)?;
    let (v, rest) = value(t, rest)?;
    Ok((key, v, rest))
}

/// The entries of a field table (the bytes after its 32-bit length), one level.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Table<'a>(&'a [u8]);

impl fmt::Debug for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries().map(|(k, v)| (String::from_utf8_lossy(k), v)))
            .finish()
    }
}

impl<'a> Table<'a> {
    /// Checks every entry of this level (nested containers only for their length).
    pub fn new(entries: &'a [u8]) -> Result<Table<'a>, TableError> {
        let mut rest = entries;
        while !rest.is_empty() {
            rest = entry(rest)?.2;
        }
        Ok(Table(entries))
    }

    /// The entries in wire order, duplicates included.
    pub fn entries(&self) -> impl Iterator<Item = (&'a [u8], Value<'a>)> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            // Checked in `new`: every entry parses.
            let (k, v, r) = entry(rest).ok()?;
            rest = r;
            Some((k, v))
        })
    }

    /// The first entry with `key`, as `rabbit_misc:table_lookup/2`.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.entries()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }

    /// A nested table under `key`, checked; `None` when absent, of another type or
    /// malformed.
    pub fn table(&self, key: &str) -> Option<Table<'a>> {
        match self.get(key)? {
            Value::Table(t) => t.check().ok(),
            _ => None,
        }
    }

    /// `true` only for a boolean `true` under `key` (first entry).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some(Value::Bool(true)))
    }

    /// Checks this level, for a table found nested in another.
    pub fn check(self) -> Result<Table<'a>, TableError> {
        Table::new(self.0)
    }

    /// The entry bytes (no length prefix).
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The values of a field array (the bytes after its 32-bit length), one level.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Array<'a>(&'a [u8]);

impl<'a> Array<'a> {
    /// Checks every value of this level (nested containers only for their length).
    pub fn new(values: &'a [u8]) -> Result<Array<'a>, TableError> {
        let mut rest = values;
        while let Some((&t, r)) = rest.split_first() {
            rest = value(t, r)?.1;
        }
        Ok(Array(values))
    }

    /// Checks this level, for an array found in a table.
    pub fn check(self) -> Result<Array<'a>, TableError> {
        Array::new(self.0)
    }

    /// The values in order. Yields nothing past a malformed value: check arrays that come
    /// from a table with [`Array::check`] first.
    pub fn values(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (&t, r) = rest.split_first()?;
            let (v, r) = value(t, r).ok()?;
            rest = r;
            Some(v)
        })
    }
}

/// Reads a table with its 32-bit length prefix from the front of `buf`; returns the table
/// (this level checked) and the bytes after it.
pub fn read(buf: &[u8]) -> Result<(Table<'_>, &[u8]), TableError> {
    let (len, rest) = buf.split_at_checked(4).ok_or(TableError::Truncated)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let (t, rest) = rest.split_at_checked(len).ok_or(TableError::Truncated)?;
    Ok((Table::new(t)?, rest))
}

/// Builds a field table, entry by entry, in wire order.
#[derive(Default)]
pub struct TableWriter {
    buf: Vec<u8>,
}

impl TableWriter {
    fn key(&mut self, key: &str) -> &mut Self {
        let k = &key.as_bytes()[..key.len().min(255)];
        self.buf.push(k.len() as u8);
        self.buf.extend_from_slice(k);
        self
    }

    fn sized(&mut self, t: u8, v: &[u8]) {
        self.buf.push(t);
        self.buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(v);
    }

    /// A long string entry.
    pub fn long_str(&mut self, key: &str, v: &[u8]) -> &mut Self {
        self.key(key).sized(b'S', v);
        self
    }

    /// A boolean entry.
    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.key(key).buf.extend_from_slice(&[b't', v as u8]);
        self
    }

    /// A nested table entry.
    pub fn table(&mut self, key: &str, t: &TableWriter) -> &mut Self {
        self.key(key).sized(b'F', &t.buf);
        self
    }

    /// An entry copied as it came: the value's type and bytes are written again unchanged.
    /// Only containers and strings are copied by reference to their bytes; scalars are
    /// re-encoded from their value (the same bytes).
    pub fn value(&mut self, key: &str, v: &Value<'_>) -> &mut Self {
        self.key(key);
        match *v {
            Value::LongStr(s) => self.sized(b'S', s),
            Value::Bytes(s) => self.sized(b'x', s),
            Value::Table(t) => self.sized(b'F', t.0),
            Value::Array(a) => self.sized(b'A', a.0),
            Value::Timestamp(x) => self.scalar(b'T', &x.to_be_bytes()),
            Value::Byte(x) => self.scalar(b'b', &x.to_be_bytes()),
            Value::UByte(x) => self.scalar(b'B', &[x]),
            Value::Short(x) => self.scalar(b's', &x.to_be_bytes()),
            Value::UShort(x) => self.scalar(b'u', &x.to_be_bytes()),
            Value::Int(x) => self.scalar(b'I', &x.to_be_bytes()),
            Value::UInt(x) => self.scalar(b'i', &x.to_be_bytes()),
            Value::Double(x) => self.scalar(b'd', &x.to_be_bytes()),
            Value::Float(x) => self.scalar(b'f', &x.to_be_bytes()),
            Value::Long(x) => self.scalar(b'l', &x.to_be_bytes()),
            Value::Bool(x) => self.scalar(b't', &[x as u8]),
            Value::Decimal(s, x) => {
                self.buf.extend_from_slice(&[b'D', s]);
                self.buf.extend_from_slice(&x.to_be_bytes());
            }
            Value::Void => self.buf.push(b'V'),
        }
        self
    }

    fn scalar(&mut self, t: u8, v: &[u8]) {
        self.buf.push(t);
        self.buf.extend_from_slice(v);
    }

    /// The entries written so far (no length prefix).
    pub fn entries(&self) -> &[u8] {
        &self.buf
    }

    /// The table with its 32-bit length prefix, ready to be put in a method.
    pub fn into_wire(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.buf.len());
        out.extend_from_slice(&(self.buf.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.buf);
        out
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
