//! The AMQP methods the gateway inspects or writes itself, and nothing more.
//!
//! Method payloads are identified by their class and method ids first ([`ids`]); only the
//! methods that authorisation or session bookkeeping needs are decoded, with amq-protocol's
//! generated parsers. `basic.publish`, the hot method, is read in place without
//! allocating ([`PublishRef`]). Everything else is forwarded as the bytes it came in.
//! No IO here.

use amq_protocol::frame::{AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;

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
    pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
    pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
    pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
    pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
    pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
    pub const CONNECTION_UPDATE_SECRET: (u16, u16) = (10, 70);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
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

/// A method payload that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {0} method payload")]
pub struct MethodError(pub &'static str);

/// The class and method ids at the start of a method frame's payload.
pub fn ids(payload: &[u8]) -> Option<(u16, u16)> {
    let p = payload.get(..4)?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

/// Decodes a whole method payload with amq-protocol's parsers.
pub fn decode(payload: &[u8]) -> Result<AMQPClass, MethodError> {
    match amq_protocol::protocol::parse_class(payload) {
        Ok((_, class)) => Ok(class),
        Err(_) => Err(MethodError("AMQP")),
    }
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

/// Appends `connection.close-ok` (10.51).
pub fn connection_close_ok(out: &mut BytesMut) {
    encode(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
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

/// A short string, cut to the 255-byte limit on a character boundary.
pub fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

/// `basic.publish` read in place: `ticket:u16 exchange:shortstr routing-key:shortstr bits`.
#[derive(Debug, PartialEq, Eq)]
pub struct PublishRef<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub mandatory: bool,
    pub immediate: bool,
}

impl<'a> PublishRef<'a> {
    /// Parses the payload of a `basic.publish` method frame (ids included).
    pub fn parse(payload: &'a [u8]) -> Result<Self, MethodError> {
        let err = || MethodError("basic.publish");
        let rest = payload.get(6..).ok_or_else(err)?; // class, method, ticket
        let (exchange, rest) = short_str(rest).ok_or_else(err)?;
        let (routing_key, rest) = short_str(rest).ok_or_else(err)?;
        let bits = *rest.first().ok_or_else(err)?;
        Ok(PublishRef {
            exchange,
            routing_key,
            mandatory: bits & 1 != 0,
            immediate: bits & 2 != 0,
        })
    }
}

fn short_str(buf: &[u8]) -> Option<(&str, &[u8])> {
    let len = *buf.first()? as usize;
    let bytes = buf.get(1..1 + len)?;
    Some((std::str::from_utf8(bytes).ok()?, &buf[1 + len..]))
}

/// The content-header properties authorisation needs: `user_id`, and the `CC` / `BCC`
/// headers that carry extra routing keys.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PublishProps {
    pub user_id: Option<String>,
    pub extra_routing_keys: Vec<String>,
}

/// Property flag bits (AMQP 0-9-1 basic class), highest bit first.
const FLAG_HEADERS: u16 = 1 << 13;
const FLAG_USER_ID: u16 = 1 << 4;

/// Reads a content header frame's payload. Only decodes the properties when `user-id` or
/// `headers` is present, because nothing else matters to authorisation.
pub fn publish_props(payload: &[u8]) -> Result<PublishProps, MethodError> {
    let err = || MethodError("content header");
    let flags = payload.get(12..14).ok_or_else(err)?;
    let flags = u16::from_be_bytes([flags[0], flags[1]]);
    if flags & (FLAG_HEADERS | FLAG_USER_ID) == 0 {
        return Ok(PublishProps::default());
    }
    let (_, header) =
        amq_protocol::frame::parsing::parse_content_header(payload).map_err(|_| err())?;
    let props = header.properties;
    let mut extra = Vec::new();
    if let Some(headers) = props.headers() {
        for key in ["CC", "BCC"] {
            collect_routing_keys(headers, key, &mut extra);
        }
    }
    Ok(PublishProps {
        user_id: props.user_id().as_ref().map(|u| u.as_str().to_owned()),
        extra_routing_keys: extra,
    })
}

fn collect_routing_keys(headers: &FieldTable, key: &str, out: &mut Vec<String>) {
    // RabbitMQ routes on CC/BCC only when the value is an array of long strings.
    if let Some(AMQPValue::FieldArray(values)) = headers.inner().get(key) {
        for v in values.as_slice() {
            if let Some(s) = value_str(v) {
                out.push(s);
            }
        }
    }
}

/// A string-valued field (long or short string), as text.
pub fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A boolean field from a table, `false` when absent or of another type.
pub fn table_bool(t: &FieldTable, key: &str) -> bool {
    matches!(t.inner().get(key), Some(AMQPValue::Boolean(true)))
}

/// A string field from an arguments table (`alternate-exchange`, `x-dead-letter-exchange`).
pub fn table_str(t: &FieldTable, key: &str) -> Option<String> {
    t.inner().get(key).and_then(value_str)
}

/// A long string from text.
pub fn long(s: &str) -> LongString {
    LongString::from(s.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::frame;
    use amq_protocol::protocol::basic::{self, AMQPProperties};

    fn publish_payload(exchange: &str, rk: &str, bits: u8) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 40, 0, 0];
        p.push(exchange.len() as u8);
        p.extend_from_slice(exchange.as_bytes());
        p.push(rk.len() as u8);
        p.extend_from_slice(rk.as_bytes());
        p.push(bits);
        p
    }

    #[test]
    fn publish_is_read_in_place() {
        let p = publish_payload("amq.topic", "a.b", 1);
        let m = PublishRef::parse(&p).unwrap();
        assert_eq!(
            m,
            PublishRef {
                exchange: "amq.topic",
                routing_key: "a.b",
                mandatory: true,
                immediate: false
            }
        );
        // Agrees with amq-protocol's own parser.
        match decode(&p).unwrap() {
            AMQPClass::Basic(basic::AMQPMethod::Publish(d)) => {
                assert_eq!(d.exchange.as_str(), "amq.topic");
                assert_eq!(d.routing_key.as_str(), "a.b");
            }
            other => panic!("{other:?}"),
        }
        for cut in 0..p.len() {
            assert!(PublishRef::parse(&p[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn content_header_props() {
        let mut headers = FieldTable::default();
        headers.insert(
            "CC".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString(long("x.y"))].into()),
        );
        let props = AMQPProperties::default()
            .with_user_id("bob".into())
            .with_headers(headers);
        let frame = AMQPFrame::Header(
            1,
            amq_protocol::frame::AMQPContentHeader {
                class_id: 60,
                body_size: 3,
                properties: props,
            },
        );
        let bytes = cookie_factory::gen_simple(gen_frame(&frame), Vec::new()).unwrap();
        let h = frame::check(&bytes, 4096).unwrap().unwrap();
        let p = publish_props(frame::payload(&bytes, &h)).unwrap();
        assert_eq!(p.user_id.as_deref(), Some("bob"));
        assert_eq!(p.extra_routing_keys, vec!["x.y".to_owned()]);

        let plain = AMQPFrame::Header(
            1,
            amq_protocol::frame::AMQPContentHeader {
                class_id: 60,
                body_size: 3,
                properties: AMQPProperties::default().with_delivery_mode(2),
            },
        );
        let bytes = cookie_factory::gen_simple(gen_frame(&plain), Vec::new()).unwrap();
        let h = frame::check(&bytes, 4096).unwrap().unwrap();
        assert_eq!(
            publish_props(frame::payload(&bytes, &h)).unwrap(),
            PublishProps::default()
        );
    }

    #[test]
    fn close_round_trips() {
        let mut out = BytesMut::new();
        channel_close(&mut out, 3, 403, "ACCESS_REFUSED - x", 50, 10);
        let h = frame::check(&out, 4096).unwrap().unwrap();
        assert_eq!(h.channel, 3);
        match decode(frame::payload(&out, &h)).unwrap() {
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                assert_eq!((c.reply_code, c.class_id, c.method_id), (403, 50, 10));
                assert_eq!(c.reply_text.as_str(), "ACCESS_REFUSED - x");
            }
            other => panic!("{other:?}"),
        }
    }
}
