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
use super::method::{self, id, reply};

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
    /// The token: never log it.
    pub token: String,
    pub client_properties: FieldTable,
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
        capability(&self.client_properties, name)
    }
}

/// A capability advertised in a client's `client-properties.capabilities` table.
pub fn capability(client_properties: &FieldTable, name: &str) -> bool {
    match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => method::table_bool(caps, name),
        _ => false,
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
        let m = match method::decode(payload) {
            Ok(AMQPClass::Connection(m)) => m,
            _ => {
                self.close(
                    out,
                    reply::SYNTAX_ERROR,
                    "SYNTAX_ERROR - malformed method",
                    ids,
                );
                return Err(HandshakeError::Malformed(expected_name(expected)));
            }
        };
        match m {
            connection::AMQPMethod::StartOk(s) => self.on_start_ok(s, out).map(Some),
            connection::AMQPMethod::TuneOk(t) => {
                self.on_tune_ok(t, out)?;
                Ok(None)
            }
            connection::AMQPMethod::Open(o) => {
                self.state = State::Opening;
                Ok(Some(Step::Open {
                    vhost: o.virtual_host.as_str().to_owned(),
                }))
            }
            _ => Err(HandshakeError::Malformed("connection method")),
        }
    }

    fn on_start_ok(
        &mut self,
        s: connection::StartOk,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        let ids = id::CONNECTION_START_OK;
        let (mechanism, parsed) = match s.mechanism.as_str() {
            "PLAIN" => (Mechanism::Plain, parse_plain(s.response.as_bytes())),
            "AMQPLAIN" => (Mechanism::AmqPlain, parse_amqplain(s.response.as_bytes())),
            other => {
                let text = format!("COMMAND_INVALID - unknown authentication mechanism '{other}'");
                self.close(out, reply::COMMAND_INVALID, &text, ids);
                return Err(HandshakeError::Mechanism);
            }
        };
        let Some((username, token)) = parsed else {
            // RabbitMQ echoes the response here; the gateway never echoes a credential.
            let text = format!("SYNTAX_ERROR - {} response invalid", mechanism.as_str());
            self.close(out, reply::SYNTAX_ERROR, &text, ids);
            return Err(HandshakeError::Malformed("SASL response"));
        };
        self.state = State::Authenticating;
        Ok(Step::Authenticate(Credentials {
            mechanism,
            username,
            token,
            client_properties: s.client_properties,
        }))
    }

    fn on_tune_ok(
        &mut self,
        t: connection::TuneOk,
        out: &mut BytesMut,
    ) -> Result<(), HandshakeError> {
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

/// PLAIN: `authzid \0 user \0 password`, where RabbitMQ requires an empty authzid.
fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let rest = response.strip_prefix(b"\0")?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let user = std::str::from_utf8(&rest[..nul]).ok()?;
    let pass = std::str::from_utf8(&rest[nul + 1..]).ok()?;
    if pass.contains('\0') {
        return None;
    }
    Some((user.to_owned(), pass.to_owned()))
}

/// AMQPLAIN: a field table body (no length prefix) with `LOGIN` and `PASSWORD`.
fn parse_amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(framed.as_slice()).ok()?;
    let login = method::table_str(&table, "LOGIN")?;
    let password = method::table_str(&table, "PASSWORD")?;
    Some((login, password))
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
