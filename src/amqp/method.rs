//! The AMQP methods the gateway inspects or writes, and nothing more.
//!
//! [`ClientMethod::decode`] is the one table of the methods a client sends after login:
//! each (class, method) pair maps to exactly one variant, and everything the session does
//! not need to look at is [`ClientMethod::Relay`], forwarded as the bytes it came in.
//! Decoders follow RabbitMQ's generated codec (`rabbit_framing_amqp_0_9_1`): the arguments
//! must fill the payload exactly (anything else is RabbitMQ's `501 FRAME_ERROR - cannot
//! decode`), short strings of methods without content must be UTF-8 (`Malformed UTF-8 in
//! shortstr`), and field tables are read as RabbitMQ reads them ([`super::table`]: first
//! entry wins, one level at a time). Decoding borrows from the payload and allocates
//! nothing. Frames the gateway writes itself are encoded with amq-protocol.
//!
//! No IO here.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{LongString, ShortString};
use bytes::{BufMut, BytesMut};

use super::frame;
use super::table::{Table, TableError, Value};

/// AMQP 0-9-1 and RabbitMQ reply codes used by the gateway.
pub mod reply {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// (class id, method id) pairs of the methods the gateway cares about.
pub mod id {
    pub const CONNECTION_START: (u16, u16) = (10, 10);
    pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
    pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
    pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
    pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
    pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
    pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
    pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
    pub const CONNECTION_BLOCKED: (u16, u16) = (10, 60);
    pub const CONNECTION_UNBLOCKED: (u16, u16) = (10, 61);
    pub const CONNECTION_UPDATE_SECRET: (u16, u16) = (10, 70);
    pub const CONNECTION_UPDATE_SECRET_OK: (u16, u16) = (10, 71);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
    pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
    pub const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
    pub const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
    pub const EXCHANGE_DECLARE_OK: (u16, u16) = (40, 11);
    pub const EXCHANGE_DELETE: (u16, u16) = (40, 20);
    pub const EXCHANGE_BIND: (u16, u16) = (40, 30);
    pub const EXCHANGE_UNBIND: (u16, u16) = (40, 40);
    pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
    pub const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
    pub const QUEUE_BIND: (u16, u16) = (50, 20);
    pub const QUEUE_PURGE: (u16, u16) = (50, 30);
    pub const QUEUE_DELETE: (u16, u16) = (50, 40);
    pub const QUEUE_UNBIND: (u16, u16) = (50, 50);
    pub const BASIC_CONSUME: (u16, u16) = (60, 20);
    pub const BASIC_CONSUME_OK: (u16, u16) = (60, 21);
    pub const BASIC_CANCEL: (u16, u16) = (60, 30);
    pub const BASIC_CANCEL_OK: (u16, u16) = (60, 31);
    pub const BASIC_PUBLISH: (u16, u16) = (60, 40);
    pub const BASIC_DELIVER: (u16, u16) = (60, 60);
    pub const BASIC_GET: (u16, u16) = (60, 70);
}

/// `class.method` for the methods the gateway refuses or reports, e.g. `queue.declare`.
pub fn name(ids: (u16, u16)) -> &'static str {
    match ids {
        id::EXCHANGE_DECLARE => "exchange.declare",
        id::EXCHANGE_DELETE => "exchange.delete",
        id::EXCHANGE_BIND => "exchange.bind",
        id::EXCHANGE_UNBIND => "exchange.unbind",
        id::QUEUE_DECLARE => "queue.declare",
        id::QUEUE_BIND => "queue.bind",
        id::QUEUE_PURGE => "queue.purge",
        id::QUEUE_DELETE => "queue.delete",
        id::QUEUE_UNBIND => "queue.unbind",
        id::BASIC_CONSUME => "basic.consume",
        id::BASIC_PUBLISH => "basic.publish",
        id::BASIC_GET => "basic.get",
        id::CONNECTION_OPEN => "connection.open",
        id::CONNECTION_START_OK => "connection.start-ok",
        id::CONNECTION_UPDATE_SECRET => "connection.update-secret",
        _ => "other",
    }
}

/// A method payload RabbitMQ would refuse to decode. The connection is closed with
/// [`MethodError::close`], RabbitMQ's own reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    /// The arguments do not fill the payload exactly, or a field table is malformed.
    #[error("cannot decode the method's arguments")]
    CannotDecode,
    /// A short string of a method without content is not UTF-8.
    #[error("malformed UTF-8 in a short string")]
    Utf8,
}

impl From<TableError> for MethodError {
    fn from(_: TableError) -> Self {
        MethodError::CannotDecode
    }
}

impl MethodError {
    /// The `connection.close` RabbitMQ sends for this error: code and text. `args` is the
    /// method payload after the class and method ids (RabbitMQ prints it with `~w`).
    pub fn close(self, args: &[u8]) -> (u16, String) {
        let text = match self {
            MethodError::Utf8 => "FRAME_ERROR - Malformed UTF-8 in shortstr".to_owned(),
            MethodError::CannotDecode => {
                let mut t = String::from("FRAME_ERROR - cannot decode <<");
                // Only the first 255 bytes of text survive (252 and "..."); stop early.
                for (i, b) in args.iter().enumerate() {
                    if t.len() > 256 {
                        break;
                    }
                    if i > 0 {
                        t.push(',');
                    }
                    t.push_str(&b.to_string());
                }
                t.push_str(">>");
                t
            }
        };
        (reply::FRAME_ERROR, truncate_reply(text))
    }
}

/// `rabbit_binary_generator:amqp_exception_explanation/2`: longer than 255 bytes is cut to
/// 252 bytes and `...` (on a character boundary, so the text stays UTF-8).
pub fn truncate_reply(mut text: String) -> String {
    if text.len() > 255 {
        let mut cut = 252;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// The class and method ids at the start of a method frame's payload.
pub fn ids(payload: &[u8]) -> Option<(u16, u16)> {
    let p = payload.get(..4)?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

/// Reads method arguments in order, as RabbitMQ's generated decoder matches them: the
/// whole layout first ([`Reader::end`]), the field checks (UTF-8, tables) after.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The arguments of a method payload (the ids skipped).
    pub fn new(payload: &'a [u8]) -> Reader<'a> {
        Reader {
            buf: payload.get(4..).unwrap_or_default(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MethodError> {
        let (head, rest) = self
            .buf
            .split_at_checked(n)
            .ok_or(MethodError::CannotDecode)?;
        self.buf = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, MethodError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, MethodError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, MethodError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, MethodError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().unwrap_or_default()))
    }

    /// A short string's bytes (no UTF-8 check).
    pub fn short_bytes(&mut self) -> Result<&'a [u8], MethodError> {
        let len = self.u8()? as usize;
        self.take(len)
    }

    /// A short string, checked for UTF-8 later with [`text`].
    pub fn short(&mut self) -> Result<Short<'a>, MethodError> {
        self.short_bytes().map(Short)
    }

    pub fn long(&mut self) -> Result<&'a [u8], MethodError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    /// A field table's bytes; the table itself is checked by [`Reader::table`]. RabbitMQ
    /// checks the layout first and parses tables after.
    pub fn table_bytes(&mut self) -> Result<&'a [u8], MethodError> {
        self.long()
    }

    /// Every argument has been read: nothing may follow.
    pub fn end(&self) -> Result<(), MethodError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(MethodError::CannotDecode)
        }
    }
}

/// A short string read but not yet checked.
#[derive(Clone, Copy)]
pub struct Short<'a>(pub &'a [u8]);

/// A checked field table from method arguments.
fn table_of(bytes: &[u8]) -> Result<Table<'_>, MethodError> {
    Ok(Table::new(bytes)?)
}

/// Reads a method's arguments with `f`, which reads every field and returns the raw
/// pieces; the layout must fill the payload exactly.
fn args<'a, T>(
    payload: &'a [u8],
    f: impl FnOnce(&mut Reader<'a>) -> Result<T, MethodError>,
) -> Result<T, MethodError> {
    let mut r = Reader::new(payload);
    let v = f(&mut r)?;
    r.end()?;
    Ok(v)
}

/// A short string of a method without content as text (`assert_utf8`).
fn text(s: Short<'_>) -> Result<&str, MethodError> {
    std::str::from_utf8(s.0).map_err(|_| MethodError::Utf8)
}

/// `exchange.declare`
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExchangeDeclare<'a> {
    pub exchange: &'a str,
    pub kind: &'a str,
    pub passive: bool,
    pub nowait: bool,
    pub arguments: Table<'a>,
}

/// The `nowait` bit in `queue.declare`'s bits octet.
pub const QUEUE_DECLARE_NOWAIT: u8 = 16;

/// `queue.declare`
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueDeclare<'a> {
    pub queue: &'a str,
    pub passive: bool,
    pub nowait: bool,
    pub arguments: Table<'a>,
    /// Offset of the bits octet in the payload (the gateway may clear `nowait`).
    pub bits_at: usize,
}

/// `basic.consume`
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BasicConsume<'a> {
    pub queue: &'a str,
    pub consumer_tag: &'a str,
    pub nowait: bool,
    /// The bits octet as sent (no-local, no-ack, exclusive, nowait).
    pub bits: u8,
    /// The arguments table as sent, length prefix included.
    pub raw_arguments: &'a [u8],
}

/// A client method after login, decoded as far as the session needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientMethod<'a> {
    /// Everything the session neither authorises nor tracks: relayed untouched.
    Relay,
    ConnectionClose,
    ConnectionCloseOk,
    UpdateSecret {
        secret: &'a [u8],
    },
    ChannelOpen,
    ChannelClose,
    ChannelCloseOk,
    ExchangeDeclare(ExchangeDeclare<'a>),
    ExchangeDelete {
        exchange: &'a str,
    },
    ExchangeBind {
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        unbind: bool,
    },
    QueueDeclare(QueueDeclare<'a>),
    QueueBind {
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        unbind: bool,
    },
    QueuePurge {
        queue: &'a str,
    },
    QueueDelete {
        queue: &'a str,
    },
    BasicConsume(BasicConsume<'a>),
    BasicCancel {
        consumer_tag: &'a str,
    },
    BasicGet {
        queue: &'a str,
    },
    BasicPublish(PublishRef<'a>),
}

impl<'a> ClientMethod<'a> {
    /// Decodes the payload of a method frame (ids included). Methods the session does not
    /// inspect are not decoded at all.
    pub fn decode(payload: &'a [u8]) -> Result<ClientMethod<'a>, MethodError> {
        let Some(ids) = ids(payload) else {
            return Ok(ClientMethod::Relay);
        };
        Ok(match ids {
            id::CONNECTION_CLOSE => ClientMethod::ConnectionClose,
            id::CONNECTION_CLOSE_OK => ClientMethod::ConnectionCloseOk,
            id::CONNECTION_UPDATE_SECRET => {
                let (secret, reason) = args(payload, |r| Ok((r.long()?, r.short()?)))?;
                text(reason)?;
                ClientMethod::UpdateSecret { secret }
            }
            id::CHANNEL_OPEN => {
                let out_of_band = args(payload, |r| r.short())?;
                text(out_of_band)?;
                ClientMethod::ChannelOpen
            }
            id::CHANNEL_CLOSE => {
                let reply_text = args(payload, |r| {
                    r.u16()?;
                    let t = r.short()?;
                    r.u16()?;
                    r.u16()?;
                    Ok(t)
                })?;
                text(reply_text)?;
                ClientMethod::ChannelClose
            }
            id::CHANNEL_CLOSE_OK => {
                args(payload, |_| Ok(()))?;
                ClientMethod::ChannelCloseOk
            }
            id::EXCHANGE_DECLARE => {
                let (x, kind, bits, t) = args(payload, |r| {
                    r.u16()?;
                    Ok((r.short()?, r.short()?, r.u8()?, r.table_bytes()?))
                })?;
                let (exchange, kind) = (text(x)?, text(kind)?);
                ClientMethod::ExchangeDeclare(ExchangeDeclare {
                    exchange,
                    kind,
                    passive: bits & 1 != 0,
                    nowait: bits & 16 != 0,
                    arguments: table_of(t)?,
                })
            }
            id::EXCHANGE_DELETE => {
                let x = args(payload, |r| {
                    r.u16()?;
                    let x = r.short()?;
                    r.u8()?;
                    Ok(x)
                })?;
                ClientMethod::ExchangeDelete { exchange: text(x)? }
            }
            id::EXCHANGE_BIND | id::EXCHANGE_UNBIND => {
                let (d, s, rk, t) = args(payload, |r| {
                    r.u16()?;
                    let v = (r.short()?, r.short()?, r.short()?);
                    r.u8()?;
                    Ok((v.0, v.1, v.2, r.table_bytes()?))
                })?;
                let (destination, source, routing_key) = (text(d)?, text(s)?, text(rk)?);
                table_of(t)?;
                ClientMethod::ExchangeBind {
                    destination,
                    source,
                    routing_key,
                    unbind: ids == id::EXCHANGE_UNBIND,
                }
            }
            id::QUEUE_DECLARE => {
                let (q, bits, t) = args(payload, |r| {
                    r.u16()?;
                    Ok((r.short()?, r.u8()?, r.table_bytes()?))
                })?;
                ClientMethod::QueueDeclare(QueueDeclare {
                    queue: text(q)?,
                    passive: bits & 1 != 0,
                    nowait: bits & QUEUE_DECLARE_NOWAIT != 0,
                    arguments: table_of(t)?,
                    bits_at: 4 + 2 + 1 + q.0.len(),
                })
            }
            id::QUEUE_BIND => {
                let (q, x, rk, t) = args(payload, |r| {
                    r.u16()?;
                    let v = (r.short()?, r.short()?, r.short()?);
                    r.u8()?;
                    Ok((v.0, v.1, v.2, r.table_bytes()?))
                })?;
                let (queue, exchange, routing_key) = (text(q)?, text(x)?, text(rk)?);
                table_of(t)?;
                ClientMethod::QueueBind {
                    queue,
                    exchange,
                    routing_key,
                    unbind: false,
                }
            }
            // queue.unbind has no nowait bit.
            id::QUEUE_UNBIND => {
                let (q, x, rk, t) = args(payload, |r| {
                    r.u16()?;
                    Ok((r.short()?, r.short()?, r.short()?, r.table_bytes()?))
                })?;
                let (queue, exchange, routing_key) = (text(q)?, text(x)?, text(rk)?);
                table_of(t)?;
                ClientMethod::QueueBind {
                    queue,
                    exchange,
                    routing_key,
                    unbind: true,
                }
            }
            id::QUEUE_PURGE => {
                let q = args(payload, |r| {
                    r.u16()?;
                    let q = r.short()?;
                    r.u8()?;
                    Ok(q)
                })?;
                ClientMethod::QueuePurge { queue: text(q)? }
            }
            id::QUEUE_DELETE => {
                let q = args(payload, |r| {
                    r.u16()?;
                    let q = r.short()?;
                    r.u8()?;
                    Ok(q)
                })?;
                ClientMethod::QueueDelete { queue: text(q)? }
            }
            id::BASIC_CONSUME => {
                let (q, tag, bits, t) = args(payload, |r| {
                    r.u16()?;
                    let v = (r.short()?, r.short()?, r.u8()?);
                    // Kept with its length prefix, to be written again unchanged.
                    let start = r.buf;
                    let t = r.table_bytes()?;
                    Ok((v.0, v.1, v.2, (&start[..4 + t.len()], t)))
                })?;
                let (queue, consumer_tag) = (text(q)?, text(tag)?);
                table_of(t.1)?;
                ClientMethod::BasicConsume(BasicConsume {
                    queue,
                    consumer_tag,
                    nowait: bits & 8 != 0,
                    bits,
                    raw_arguments: t.0,
                })
            }
            id::BASIC_CANCEL => {
                let tag = args(payload, |r| {
                    let t = r.short()?;
                    r.u8()?;
                    Ok(t)
                })?;
                ClientMethod::BasicCancel {
                    consumer_tag: text(tag)?,
                }
            }
            id::BASIC_GET => {
                let q = args(payload, |r| {
                    r.u16()?;
                    let q = r.short()?;
                    r.u8()?;
                    Ok(q)
                })?;
                ClientMethod::BasicGet { queue: text(q)? }
            }
            id::BASIC_PUBLISH => ClientMethod::BasicPublish(PublishRef::parse(payload)?),
            _ => ClientMethod::Relay,
        })
    }
}

/// `basic.publish` read in place: `ticket:u16 exchange:shortstr routing-key:shortstr bits`.
/// RabbitMQ does not check UTF-8 in methods with content; the gateway needs the exchange
/// name as text and refuses one that is not (a documented difference); the routing key
/// stays bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishRef<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a [u8],
    pub mandatory: bool,
    pub immediate: bool,
}

impl<'a> PublishRef<'a> {
    /// Parses the payload of a `basic.publish` method frame (ids included); the arguments
    /// must fill it exactly.
    pub fn parse(payload: &'a [u8]) -> Result<Self, MethodError> {
        let mut r = Reader::new(payload);
        r.u16()?;
        let exchange = r.short_bytes()?;
        let routing_key = r.short_bytes()?;
        let bits = r.u8()?;
        r.end()?;
        Ok(PublishRef {
            exchange: std::str::from_utf8(exchange).map_err(|_| MethodError::Utf8)?,
            routing_key,
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        })
    }
}

/// The fixed part of a content header frame's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentHeader<'a> {
    pub class_id: u16,
    pub weight: u16,
    pub body_size: u64,
    /// Property flags and the properties.
    pub properties: &'a [u8],
}

impl<'a> ContentHeader<'a> {
    /// `None` when shorter than the fixed part (RabbitMQ: not a content header at all).
    pub fn parse(payload: &'a [u8]) -> Option<ContentHeader<'a>> {
        let f = payload.get(..12)?;
        Some(ContentHeader {
            class_id: u16::from_be_bytes([f[0], f[1]]),
            weight: u16::from_be_bytes([f[2], f[3]]),
            body_size: u64::from_be_bytes(f[4..12].try_into().ok()?),
            properties: &payload[12..],
        })
    }
}

/// The content-header properties authorisation needs: `user_id` (bytes: RabbitMQ compares
/// it with the user name as a binary) and the `headers` table (for `CC` / `BCC`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PublishProps<'a> {
    pub user_id: Option<&'a [u8]>,
    pub headers: Option<Table<'a>>,
}

/// Property flag bits of the basic class, highest bit first, as RabbitMQ's generated
/// `decode_properties(60, …)` reads them: 14 flags; the two low bits (including the
/// continuation flag) are ignored.
const FLAG_HEADERS: u16 = 1 << 13;
const FLAG_USER_ID: u16 = 1 << 4;

impl<'a> PublishProps<'a> {
    /// Reads the properties of a basic content header (flags first). Only decodes the
    /// fields when `user-id` or `headers` is present: nothing else matters to
    /// authorisation. The present fields must fill the properties exactly.
    pub fn parse(properties: &'a [u8]) -> Result<PublishProps<'a>, MethodError> {
        let err = MethodError::CannotDecode;
        let flags = properties.get(..2).ok_or(err)?;
        let flags = u16::from_be_bytes([flags[0], flags[1]]);
        if flags & (FLAG_HEADERS | FLAG_USER_ID) == 0 {
            return Ok(PublishProps::default());
        }
        let mut r = Reader {
            buf: &properties[2..],
        };
        let mut props = PublishProps::default();
        // Bit 15 content-type ... bit 2 cluster-id.
        for bit in (2..16).rev() {
            if flags & (1 << bit) == 0 {
                continue;
            }
            match bit {
                // delivery-mode, priority
                12 | 11 => {
                    r.u8()?;
                }
                // timestamp
                6 => {
                    r.u64()?;
                }
                13 => props.headers = Some(table_of(r.table_bytes()?)?),
                4 => props.user_id = Some(r.short_bytes()?),
                // every other property is a short string
                _ => {
                    r.short_bytes()?;
                }
            }
        }
        r.end()?;
        Ok(props)
    }

    /// The extra routing keys of `CC` and `BCC` (`rabbit_basic:header_routes/1`): the first
    /// entry of each, when it is an array; its long-string elements, in order. A header of
    /// another type makes the broker refuse the message (`406`), so it adds no key here.
    pub fn extra_routing_keys(&self) -> Vec<&'a [u8]> {
        let mut keys = Vec::new();
        if let Some(h) = self.headers {
            for name in ["CC", "BCC"] {
                if let Some(Value::Array(a)) = h.get(name)
                    && let Ok(a) = a.check()
                {
                    keys.extend(a.values().filter_map(|v| v.long_str()));
                }
            }
        }
        keys
    }
}

/// A `connection.close` or `channel.close`: code, text, failing class and method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close<'a> {
    pub code: u16,
    pub text: &'a [u8],
    pub class_id: u16,
    pub method_id: u16,
}

impl<'a> Close<'a> {
    /// Reads a close method from a trusted peer (the broker); `None` when malformed.
    pub fn parse(payload: &'a [u8]) -> Option<Close<'a>> {
        let mut r = Reader::new(payload);
        let code = r.u16().ok()?;
        let text = r.short_bytes().ok()?;
        let class_id = r.u16().ok()?;
        let method_id = r.u16().ok()?;
        r.end().ok()?;
        Some(Close {
            code,
            text,
            class_id,
            method_id,
        })
    }
}

/// The queue name of a `queue.declare-ok` from the broker.
pub fn declare_ok_queue(payload: &[u8]) -> Option<&str> {
    let mut r = Reader::new(payload);
    let q = r.short_bytes().ok()?;
    std::str::from_utf8(q).ok()
}

/// The consumer tag of a `basic.cancel` or `basic.cancel-ok` from the broker.
pub fn cancel_tag(payload: &[u8]) -> Option<&str> {
    let mut r = Reader::new(payload);
    std::str::from_utf8(r.short_bytes().ok()?).ok()
}

/// Broker texts that name the user of a connection: `… refused for user 'u'`, `…
/// authenticated user was 'u'`, `number of channels opened for user 'u' …`, `user 'u' is
/// deleted`. When `service` (the gateway's service user) appears there, it is replaced by
/// the client's own user name: a client must never learn the service user's name.
/// Returns `None` when the text does not mention it.
pub fn hide_service_user(text: &[u8], service: &str, client: &str) -> Option<String> {
    let text = String::from_utf8_lossy(text);
    let quoted = format!("'{service}'");
    if service.is_empty() || !text.contains(&quoted) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    while let Some(at) = rest.find(&quoted) {
        let before = &rest[..at];
        out.push_str(before);
        let names_user = ["user ", "user was ", "User "]
            .iter()
            .any(|p| before.ends_with(p));
        if names_user {
            out.push('\'');
            out.push_str(client);
            out.push('\'');
        } else {
            out.push_str(&quoted);
        }
        rest = &rest[at + quoted.len()..];
    }
    out.push_str(rest);
    (out != text).then(|| truncate_reply(out))
}

/// Appends a method frame to `out`.
pub fn encode(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    let frame = AMQPFrame::Method(channel, method);
    // Serialising into a Vec cannot fail for want of space; an error would be a bug in
    // the generated code, and the frame is then simply not written.
    if let Ok(bytes) = cookie_factory::gen_simple(gen_frame(&frame), Vec::with_capacity(64)) {
        out.extend_from_slice(&bytes);
    }
}

/// Appends `connection.close` (10.50).
pub fn connection_close(out: &mut BytesMut, code: u16, text: &str, class_id: u16, method_id: u16) {
    let m = connection::Close {
        reply_code: code,
        reply_text: short(text),
        class_id,
        method_id,
    };
    encode(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(m)),
    );
}

/// Appends `connection.start-ok` (10.11) with `client_properties` as a table on the wire
/// (length prefix included), written as it is.
pub fn connection_start_ok(
    out: &mut BytesMut,
    client_properties: &[u8],
    mechanism: &str,
    response: &[u8],
    locale: &str,
) {
    let mut p = Vec::with_capacity(16 + client_properties.len() + response.len());
    p.extend_from_slice(&[0, 10, 0, 11]);
    p.extend_from_slice(client_properties);
    put_short(&mut p, mechanism.as_bytes());
    p.extend_from_slice(&(response.len() as u32).to_be_bytes());
    p.extend_from_slice(response);
    put_short(&mut p, locale.as_bytes());
    frame::write_frame(out, frame::METHOD, 0, &p);
}

/// Appends `connection.close-ok` (10.51).
pub fn connection_close_ok(out: &mut BytesMut) {
    encode(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    );
}

/// Appends `connection.update-secret` (10.70): `secret` as the new secret (a long
/// string, so a token of any size fits the negotiated frame size), `reason` as given.
pub fn update_secret(out: &mut BytesMut, secret: &[u8], reason: &str) {
    let mut p = Vec::with_capacity(16 + secret.len() + reason.len());
    p.extend_from_slice(&[0, 10, 0, 70]);
    p.extend_from_slice(&(secret.len() as u32).to_be_bytes());
    p.extend_from_slice(secret);
    put_short(&mut p, reason.as_bytes());
    frame::write_frame(out, frame::METHOD, 0, &p);
}

/// Appends `connection.update-secret-ok` (10.71).
pub fn update_secret_ok(out: &mut BytesMut) {
    encode(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
            connection::UpdateSecretOk {},
        )),
    );
}

/// Appends `channel.close` (20.40).
pub fn channel_close(
    out: &mut BytesMut,
    ch: u16,
    code: u16,
    text: &str,
    class_id: u16,
    method_id: u16,
) {
    let m = channel::Close {
        reply_code: code,
        reply_text: short(text),
        class_id,
        method_id,
    };
    encode(out, ch, AMQPClass::Channel(channel::AMQPMethod::Close(m)));
}

/// Appends `channel.close-ok` (20.41).
pub fn channel_close_ok(out: &mut BytesMut, ch: u16) {
    encode(
        out,
        ch,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    );
}

/// Appends `basic.cancel` (60.30) with `nowait` set.
pub fn basic_cancel(out: &mut BytesMut, ch: u16, tag: &str) {
    basic_cancel_with(out, ch, tag, true);
}

/// Appends `basic.cancel` (60.30) with the given `nowait`.
pub fn basic_cancel_with(out: &mut BytesMut, ch: u16, tag: &str, nowait: bool) {
    let mut p = Vec::with_capacity(6 + tag.len());
    p.extend_from_slice(&[0, 60, 0, 30]);
    put_short(&mut p, tag.as_bytes());
    p.push(u8::from(nowait));
    frame::write_frame(out, frame::METHOD, ch, &p);
}

/// Appends `basic.reject` (60.90).
pub fn basic_reject(out: &mut BytesMut, ch: u16, delivery_tag: u64, requeue: bool) {
    let mut p = Vec::with_capacity(13);
    p.extend_from_slice(&[0, 60, 0, 90]);
    p.extend_from_slice(&delivery_tag.to_be_bytes());
    p.push(u8::from(requeue));
    frame::write_frame(out, frame::METHOD, ch, &p);
}

/// The consumer tag and delivery tag of a `basic.deliver` payload (ids included).
pub fn deliver_tags(payload: &[u8]) -> Option<(&str, u64)> {
    let mut r = Reader::new(payload);
    let tag = std::str::from_utf8(r.short_bytes().ok()?).ok()?;
    Some((tag, r.u64().ok()?))
}

/// Appends a `basic.consume` with `tag` in place of the client's empty consumer tag; every
/// other argument is written again as the client sent it.
pub fn basic_consume_with_tag(out: &mut BytesMut, ch: u16, c: &BasicConsume<'_>, tag: &str) {
    let mut p = Vec::with_capacity(12 + c.queue.len() + tag.len() + c.raw_arguments.len());
    p.extend_from_slice(&[0, 60, 0, 20, 0, 0]);
    put_short(&mut p, c.queue.as_bytes());
    put_short(&mut p, tag.as_bytes());
    p.push(c.bits);
    p.extend_from_slice(c.raw_arguments);
    frame::write_frame(out, frame::METHOD, ch, &p);
}

fn put_short(p: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(255)];
    p.put_u8(s.len() as u8);
    p.extend_from_slice(s);
}

/// A short string, cut to the 255-byte limit on a character boundary.
pub fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

/// A long string from text.
pub fn long(s: &str) -> LongString {
    LongString::from(s.as_bytes().to_vec())
}

#[cfg(test)]
#[path = "method_tests.rs"]
mod tests;
