//! The client-side connection handshake, as a sans-IO state machine.
//!
//! The gateway plays the broker until the client has authenticated and named its vhost:
//!
//! ```text
//! AwaitHeader ──header──▶ AwaitStartOk ──start-ok──▶ Authenticating
//!    (wrong header: our header back, close)             │ accept()       │ refuse()
//!                                                       ▼                ▼
//!                        AwaitOpen ◀──tune-ok── AwaitTuneOk           Refused
//!                           │ open(vhost)
//!                           ▼
//!                         Opening ── opened() / vhost_refused() ──▶ Done
//! ```
//!
//! [`ClientHandshake::receive`] consumes bytes from the client's read buffer and appends
//! what must be sent to `out`. It never waits, reads a clock or touches a socket; the
//! caller enforces the handshake timeout and does the verification in between. Every
//! frame before tune is bounded by `max_preauth_frame`, so nothing a client sends before
//! authenticating can make it allocate more than that.

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::{Buf, BytesMut};

use super::frame::{self, FrameError, PROTOCOL_HEADER};
use super::method::{self, MethodError, Reader, id, reply};
use super::table::{self, Table, TableWriter, Value};

/// RabbitMQ's minimum frame size; a client may not negotiate less.
pub const FRAME_MIN_SIZE: u32 = 4096;

/// What the gateway offers in `connection.tune` and how big pre-auth frames may be.
#[derive(Clone, Debug)]
pub struct HandshakeSettings {
    pub max_preauth_frame: usize,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub product: String,
    pub version: String,
}

/// The SASL mechanism a client used; it appears in RabbitMQ's refusal text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    AmqPlain,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::AmqPlain => "AMQPLAIN",
        }
    }
}

/// What the client presented in `connection.start-ok`.
pub struct Credentials {
    pub mechanism: Mechanism,
    /// The SASL username. RabbitMQ's OAuth 2.0 backend ignores it; so does the gateway.
    pub username: String,
    /// The password, taken as a token: never log it. Empty when the password is not UTF-8
    /// (no token is; an internal user's password may be).
    pub token: String,
    /// The SASL response exactly as the client sent it, for a login to the broker with the
    /// client's own credentials: never log it.
    pub response: Vec<u8>,
    pub client_properties: ClientProperties,
}

/// A client's `client-properties` table, checked one level deep (nested values are kept
/// as bytes and never parsed recursively, so no nesting can exhaust the stack).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientProperties(Vec<u8>);

/// The most of a client's properties passed on to the broker, in bytes: the backend's
/// `start-ok` must fit in RabbitMQ's 4096-byte frames before tuning, with the gateway's
/// own properties, credentials and locale.
pub const BACKEND_PROPERTIES_BUDGET: usize = 2048;

impl ClientProperties {
    /// Checks the table's entries (the bytes after its length prefix).
    pub fn new(entries: &[u8]) -> Result<ClientProperties, table::TableError> {
        Table::new(entries)?;
        Ok(ClientProperties(entries.to_vec()))
    }

    pub fn table(&self) -> Table<'_> {
        // Checked when made; an empty table would do if it were not.
        Table::new(&self.0).unwrap_or_default()
    }

    /// A capability advertised in `capabilities` (first entries win, as in RabbitMQ).
    pub fn capability(&self, name: &str) -> bool {
        self.table()
            .table("capabilities")
            .is_some_and(|caps| caps.flag(name))
    }

    /// A string property, such as `connection_name`.
    pub fn text(&self, key: &str) -> Option<String> {
        let v = self.table().get(key)?.long_str()?;
        Some(String::from_utf8_lossy(v).into_owned())
    }

    /// The `client-properties` for the gateway's backend connection (the table with its
    /// length prefix): the client's, first entry of each key only, without
    /// `connection_name` and `client_address` (which the gateway sets: the client's own
    /// name with `identity` appended, and `peer`), within [`BACKEND_PROPERTIES_BUDGET`]
    /// (entries that do not fit are left out), and with `authentication_failure_close`
    /// among the capabilities. With `follow_cancels` (token sessions), also with
    /// `consumer_cancel_notify`, so that the broker tells the gateway about every consumer
    /// it cancels (the session passes those on only to clients that asked); without (a
    /// session relayed unchecked), the client's own value stands.
    pub fn for_backend(&self, identity: &str, peer: &str, follow_cancels: bool) -> Vec<u8> {
        let t = self.table();
        let name = match self.text("connection_name") {
            Some(own) => format!("{own} [{identity}]"),
            None => identity.to_owned(),
        };
        let mut caps = TableWriter::default();
        let client_caps = t.table("capabilities").unwrap_or_default();
        let mut seen: Vec<&[u8]> = Vec::new();
        for (k, v) in client_caps.entries() {
            if seen.contains(&k)
                || (follow_cancels && k == b"consumer_cancel_notify")
                || k == b"authentication_failure_close"
            {
                continue;
            }
            seen.push(k);
            if let (Ok(k), Value::Bool(b)) = (std::str::from_utf8(k), v) {
                caps.bool(k, b);
            }
            if caps.entries().len() > 512 {
                break;
            }
        }
        if follow_cancels {
            caps.bool("consumer_cancel_notify", true);
        }
        // A refused login (an internal user's password) is then a `connection.close` the
        // gateway can pass on, not a silent hang-up.
        caps.bool("authentication_failure_close", true);
        let mut w = TableWriter::default();
        w.table("capabilities", &caps);
        w.long_str("connection_name", cut(name.as_bytes(), 255));
        w.long_str("client_address", peer.as_bytes());
        let mut seen: Vec<&[u8]> = vec![b"capabilities", b"connection_name", b"client_address"];
        for (k, v) in t.entries() {
            if seen.contains(&k) {
                continue;
            }
            seen.push(k);
            let Ok(key) = std::str::from_utf8(k) else {
                continue;
            };
            let mut one = TableWriter::default();
            one.value(key, &v);
            if w.entries().len() + one.entries().len() <= BACKEND_PROPERTIES_BUDGET {
                w.value(key, &v);
            }
        }
        w.into_wire()
    }
}

fn cut(b: &[u8], n: usize) -> &[u8] {
    &b[..b.len().min(n)]
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("token_len", &self.token.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// A capability the client advertised in `client-properties.capabilities`.
    pub fn capability(&self, name: &str) -> bool {
        self.client_properties.capability(name)
    }
}

/// What the client agreed to in `connection.tune-ok`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// What the caller has to do next.
#[derive(Debug)]
pub enum Step {
    /// Read more bytes from the client.
    NeedMore,
    /// Verify these credentials, then call `accept` or `refuse`.
    Authenticate(Credentials),
    /// The client asked for this vhost: check access, connect the backend, then call
    /// `opened` or `vhost_refused`.
    Open { vhost: String },
    /// The client answered our `connection.close`: flush and close the socket.
    Closed,
}

/// Why the handshake failed. `out` holds whatever should be sent before closing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent a protocol header other than AMQP 0-9-1")]
    BadProtocolHeader,
    #[error("framing error: {0}")]
    Frame(#[from] FrameError),
    #[error("unexpected frame during the handshake: {0}")]
    Unexpected(String),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unsupported authentication mechanism")]
    Mechanism,
    #[error("tune-ok out of range: {0}")]
    Tune(String),
    #[error("client closed the connection during the handshake")]
    ClientClosed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHeader,
    AwaitStartOk,
    Authenticating,
    AwaitTuneOk,
    AwaitOpen,
    Opening,
    /// We sent `connection.close`; only `close-ok` is of interest.
    Closing,
    Done,
}

/// A method frame's ids and its payload.
type MethodFrame = ((u16, u16), BytesMut);

/// The client handshake. See the module docs for the states.
pub struct ClientHandshake {
    settings: HandshakeSettings,
    state: State,
    tuning: Option<Tuning>,
}

impl ClientHandshake {
    pub fn new(settings: HandshakeSettings) -> Self {
        ClientHandshake {
            settings,
            state: State::AwaitHeader,
            tuning: None,
        }
    }

    /// The values the client agreed to, once `tune-ok` has arrived.
    pub fn tuning(&self) -> Option<Tuning> {
        self.tuning
    }

    /// Consumes what it can from `input`, appending replies to `out`.
    pub fn receive(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        loop {
            match self.state {
                State::AwaitHeader => {
                    if input.len() < PROTOCOL_HEADER.len() {
                        // A client that starts with something else entirely gets the
                        // header back as soon as a byte disagrees, as RabbitMQ does.
                        if !PROTOCOL_HEADER.starts_with(input) {
                            out.extend_from_slice(PROTOCOL_HEADER);
                            return Err(HandshakeError::BadProtocolHeader);
                        }
                        return Ok(Step::NeedMore);
                    }
                    if &input[..8] != PROTOCOL_HEADER {
                        out.extend_from_slice(PROTOCOL_HEADER);
                        return Err(HandshakeError::BadProtocolHeader);
                    }
                    input.advance(8);
                    self.write_start(out);
                    self.state = State::AwaitStartOk;
                }
                State::Authenticating | State::Opening | State::Done => return Ok(Step::NeedMore),
                _ => {
                    let Some((ids, payload)) = self.next_method(input)? else {
                        return Ok(Step::NeedMore);
                    };
                    if let Some(step) = self.on_method(ids, &payload, out)? {
                        return Ok(step);
                    }
                }
            }
        }
    }

    /// Takes the next method frame on channel 0, skipping heartbeats.
    fn next_method(&self, input: &mut BytesMut) -> Result<Option<MethodFrame>, HandshakeError> {
        loop {
            let Some(h) = frame::check(input, self.settings.max_preauth_frame)? else {
                return Ok(None);
            };
            let mut f = input.split_to(h.wire_len());
            if h.frame_type == frame::HEARTBEAT {
                continue;
            }
            if h.frame_type != frame::METHOD || h.channel != 0 {
                return Err(HandshakeError::Unexpected(format!(
                    "frame type {} on channel {}",
                    h.frame_type, h.channel
                )));
            }
            f.advance(frame::HEADER_LEN);
            f.truncate(h.size as usize);
            let ids = method::ids(&f).ok_or(HandshakeError::Malformed("method frame"))?;
            return Ok(Some((ids, f)));
        }
    }

    fn on_method(
        &mut self,
        ids: (u16, u16),
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<Option<Step>, HandshakeError> {
        if self.state == State::Closing {
            return match ids {
                id::CONNECTION_CLOSE_OK => {
                    self.state = State::Done;
                    Ok(Some(Step::Closed))
                }
                id::CONNECTION_CLOSE => {
                    method::connection_close_ok(out);
                    self.state = State::Done;
                    Ok(Some(Step::Closed))
                }
                _ => Ok(None), // RabbitMQ discards everything else while closing
            };
        }
        if ids == id::CONNECTION_CLOSE {
            method::connection_close_ok(out);
            self.state = State::Done;
            return Err(HandshakeError::ClientClosed);
        }
        let expected = match self.state {
            State::AwaitStartOk => id::CONNECTION_START_OK,
            State::AwaitTuneOk => id::CONNECTION_TUNE_OK,
            _ => id::CONNECTION_OPEN,
        };
        if ids != expected {
            let text = format!(
                "COMMAND_INVALID - expected '{}' but got {}.{}",
                expected_name(expected),
                ids.0,
                ids.1
            );
            self.close(out, reply::COMMAND_INVALID, &text, ids);
            return Err(HandshakeError::Unexpected(text));
        }
        let malformed = |hs: &mut Self, out: &mut BytesMut| {
            // RabbitMQ prints the payload here; the gateway never echoes a credential.
            hs.close(
                out,
                reply::SYNTAX_ERROR,
                "SYNTAX_ERROR - malformed method",
                ids,
            );
            Err(HandshakeError::Malformed(expected_name(expected)))
        };
        let mut r = Reader::new(payload);
        match ids {
            id::CONNECTION_START_OK => {
                let Ok(fields) = read_start_ok(&mut r) else {
                    return malformed(self, out);
                };
                self.on_start_ok(fields, out).map(Some)
            }
            id::CONNECTION_TUNE_OK => {
                let Ok(t) = (|| {
                    let t = Tuning {
                        channel_max: r.u16()?,
                        frame_max: r.u32()?,
                        heartbeat: r.u16()?,
                    };
                    r.end()?;
                    Ok::<_, MethodError>(t)
                })() else {
                    return malformed(self, out);
                };
                self.on_tune_ok(t, out)?;
                Ok(None)
            }
            _ => {
                let Ok(vhost) = (|| {
                    let vhost = r.short()?;
                    r.short()?;
                    r.u8()?;
                    r.end()?;
                    std::str::from_utf8(vhost.0).map_err(|_| MethodError::Utf8)
                })() else {
                    return malformed(self, out);
                };
                self.state = State::Opening;
                Ok(Some(Step::Open {
                    vhost: vhost.to_owned(),
                }))
            }
        }
    }

    fn on_start_ok(&mut self, s: StartOk<'_>, out: &mut BytesMut) -> Result<Step, HandshakeError> {
        let ids = id::CONNECTION_START_OK;
        let (mechanism, parsed) = match s.mechanism {
            "PLAIN" => (Mechanism::Plain, parse_plain(s.response)),
            "AMQPLAIN" => (Mechanism::AmqPlain, parse_amqplain(s.response)),
            other => {
                let text = format!("COMMAND_INVALID - unknown authentication mechanism '{other}'");
                self.close(out, reply::COMMAND_INVALID, &text, ids);
                return Err(HandshakeError::Mechanism);
            }
        };
        let Some((username, password)) = parsed else {
            // RabbitMQ echoes the response here; the gateway never echoes a credential.
            let text = format!("SYNTAX_ERROR - {} response invalid", mechanism.as_str());
            self.close(out, reply::SYNTAX_ERROR, &text, ids);
            return Err(HandshakeError::Malformed("SASL response"));
        };
        self.state = State::Authenticating;
        Ok(Step::Authenticate(Credentials {
            mechanism,
            username,
            token: String::from_utf8(password).unwrap_or_default(),
            response: s.response.to_vec(),
            client_properties: s.client_properties,
        }))
    }

    fn on_tune_ok(&mut self, t: Tuning, out: &mut BytesMut) -> Result<(), HandshakeError> {
        let ours = &self.settings;
        let frame_max = if t.frame_max == 0 {
            ours.frame_max
        } else {
            t.frame_max
        };
        let channel_max = if t.channel_max == 0 {
            ours.channel_max
        } else {
            t.channel_max
        };
        let problem = if frame_max < FRAME_MIN_SIZE {
            Some(format!("frame_max={frame_max} < {FRAME_MIN_SIZE} min size"))
        } else if frame_max > ours.frame_max {
            Some(format!(
                "frame_max={frame_max} > {} max size",
                ours.frame_max
            ))
        } else if channel_max > ours.channel_max {
            Some(format!(
                "channel_max={channel_max} > {} max",
                ours.channel_max
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            self.close(
                out,
                reply::NOT_ALLOWED,
                &format!("NOT_ALLOWED - {p}"),
                id::CONNECTION_TUNE_OK,
            );
            return Err(HandshakeError::Tune(p));
        }
        self.tuning = Some(Tuning {
            channel_max,
            frame_max,
            heartbeat: t.heartbeat,
        });
        self.state = State::AwaitOpen;
        Ok(())
    }

    /// The token was valid: send `connection.tune`.
    pub fn accept(&mut self, out: &mut BytesMut) {
        let s = &self.settings;
        let tune = connection::Tune {
            channel_max: s.channel_max,
            frame_max: s.frame_max,
            heartbeat: s.heartbeat,
        };
        method::encode(
            out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)),
        );
        self.state = State::AwaitTuneOk;
    }

    /// The login was refused. As RabbitMQ does, a client that advertised
    /// `authentication_failure_close` gets a single `connection.close 403`; any other
    /// client gets nothing and is disconnected after a delay. Returns whether a close
    /// was written (then the caller may wait briefly for `close-ok`).
    pub fn refuse(&mut self, creds: &Credentials, out: &mut BytesMut) -> bool {
        if creds.capability("authentication_failure_close") {
            let text = format!(
                "ACCESS_REFUSED - Login was refused using authentication mechanism {}. For details see the broker logfile.",
                creds.mechanism.as_str()
            );
            self.close(out, reply::ACCESS_REFUSED, &text, (0, 0));
            true
        } else {
            self.state = State::Done;
            false
        }
    }

    /// The vhost was opened on the backend: send `connection.open-ok`.
    pub fn opened(&mut self, out: &mut BytesMut) {
        let ok = connection::OpenOk {};
        method::encode(
            out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(ok)),
        );
        self.state = State::Done;
    }

    /// Access to the vhost is refused (530), as RabbitMQ words it.
    pub fn vhost_refused(&mut self, out: &mut BytesMut, text: &str) {
        self.close(out, reply::NOT_ALLOWED, text, id::CONNECTION_OPEN);
    }

    /// Sends `connection.close` and waits for `close-ok`.
    pub fn close(&mut self, out: &mut BytesMut, code: u16, text: &str, ids: (u16, u16)) {
        method::connection_close(out, code, text, ids.0, ids.1);
        self.state = State::Closing;
    }

    fn write_start(&self, out: &mut BytesMut) {
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(&self.settings),
            mechanisms: method::long("PLAIN AMQPLAIN"),
            locales: method::long("en_US"),
        };
        method::encode(
            out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(start)),
        );
    }
}

/// The nine capabilities RabbitMQ advertises, all true.
pub const SERVER_CAPABILITIES: [&str; 9] = [
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
    "direct_reply_to",
];

fn server_properties(s: &HandshakeSettings) -> FieldTable {
    let mut caps = FieldTable::default();
    for c in SERVER_CAPABILITIES {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props.insert(
        "product".into(),
        AMQPValue::LongString(method::long(&s.product)),
    );
    props.insert(
        "version".into(),
        AMQPValue::LongString(method::long(&s.version)),
    );
    props.insert(
        "platform".into(),
        AMQPValue::LongString(method::long("Rust")),
    );
    props.insert(
        "information".into(),
        AMQPValue::LongString(method::long(
            "AMQP gateway: AWS STS web identity tokens for RabbitMQ",
        )),
    );
    props
}

fn expected_name(ids: (u16, u16)) -> &'static str {
    match ids {
        id::CONNECTION_START_OK => "connection.start_ok",
        id::CONNECTION_TUNE_OK => "connection.tune_ok",
        _ => "connection.open",
    }
}

/// PLAIN: `authzid \0 user \0 password`, where RabbitMQ requires an empty authzid. The
/// user name must be UTF-8; the password is bytes (an internal user's may be anything).
fn parse_plain(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let rest = response.strip_prefix(b"\0")?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let user = std::str::from_utf8(&rest[..nul]).ok()?;
    let pass = &rest[nul + 1..];
    if pass.contains(&0) {
        return None;
    }
    Some((user.to_owned(), pass.to_vec()))
}

/// AMQPLAIN: a field table body (no length prefix) with `LOGIN` and `PASSWORD`, the first
/// entry of each, long strings or byte arrays (`rabbit_auth_mechanism_amqplain`).
fn parse_amqplain(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let table = Table::new(response).ok()?;
    let bytes = |key: &str| -> Option<Vec<u8>> {
        match table.get(key)? {
            Value::LongStr(s) | Value::Bytes(s) => Some(s.to_vec()),
            _ => None,
        }
    };
    let login = String::from_utf8(bytes("LOGIN")?).ok()?;
    Some((login, bytes("PASSWORD")?))
}

/// The arguments of `connection.start-ok`.
struct StartOk<'a> {
    client_properties: ClientProperties,
    mechanism: &'a str,
    response: &'a [u8],
}

fn read_start_ok<'a>(r: &mut Reader<'a>) -> Result<StartOk<'a>, MethodError> {
    let props = r.table_bytes()?;
    let mechanism = r.short()?;
    let response = r.long()?;
    let locale = r.short()?;
    r.end()?;
    // The layout matched: now the fields, in order.
    let client_properties = ClientProperties::new(props)?;
    let mechanism = std::str::from_utf8(mechanism.0).map_err(|_| MethodError::Utf8)?;
    std::str::from_utf8(locale.0).map_err(|_| MethodError::Utf8)?;
    Ok(StartOk {
        client_properties,
        mechanism,
        response,
    })
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
