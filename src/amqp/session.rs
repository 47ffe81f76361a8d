//! The authorised session between a client and its backend connection, sans-IO.
//!
//! The relay hands [`Session`] whatever bytes arrived from either side; the session
//! splits them into frames and decides, frame by frame, what is forwarded (as the same
//! bytes, never re-encoded), what is held (a `basic.publish` until its content header
//! shows `user_id` and `CC`/`BCC`), what is dropped, and what the gateway answers itself.
//! Content body frames are streamed: a body frame is forwarded as its bytes arrive, so a
//! large message never has to fit in a buffer.
//!
//! When [`crate::authz::decide`] refuses an operation on channel N, the gateway does what
//! RabbitMQ does to the client (a `channel.close` with the exact code and text, then it
//! discards everything on N until `channel.close-ok`) and keeps the backend consistent:
//! the backend's channel N is closed too, its frames on N are dropped until its
//! `close-ok`, and a client that reopens N waits for that. The connection stays usable.
//!
//! **Invariant:** no IO and no clock. Decisions come from `authz`; this module only
//! tracks protocol state and routes bytes.

use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;

use amq_protocol::protocol::{AMQPClass, exchange, queue};
use bytes::{Buf, BytesMut};

use super::frame::{self, FrameError, FrameHeader};
use super::method::{self, PublishRef, id, reply};
use crate::authz::{self, Context, Denial, ExchangeKind, Operation, Permissions};

/// Frames queued for one socket, written in order with vectored writes.
///
/// Chunks cut from the same read buffer that follow each other in memory are joined back
/// into one (`BytesMut::unsplit`, no copy): a read full of publishes, whose method frames
/// are cut out while their content header is awaited, is queued as one chunk again and
/// written with one system call.
#[derive(Default)]
pub struct Outbox {
    chunks: VecDeque<BytesMut>,
    len: usize,
    scratch: BytesMut,
}

impl Outbox {
    pub fn push(&mut self, b: BytesMut) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if let Some(last) = self.chunks.back_mut()
            && last.as_ptr_range().end == b.as_ptr()
        {
            // O(1) when both come from the same allocation (the only way they can be
            // adjacent but for chance, where `unsplit` copies: still correct).
            last.unsplit(b);
        } else {
            self.chunks.push_back(b);
        }
    }

    /// Appends a frame built by `f` (for frames the gateway writes itself).
    pub fn frame(&mut self, f: impl FnOnce(&mut BytesMut)) {
        f(&mut self.scratch);
        let b = self.scratch.split();
        self.push(b);
    }

    /// How many chunks are queued.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queued chunks, oldest first.
    pub fn chunks(&self) -> impl Iterator<Item = &BytesMut> {
        self.chunks.iter()
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// A violation that ends the connection; the close frame is already queued.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client framing error: {0}")]
    ClientFrame(FrameError),
    #[error("backend framing error: {0}")]
    BackendFrame(FrameError),
    #[error("client sent method {0:?} that must be checked but cannot be decoded")]
    Undecodable((u16, u16)),
    #[error("client sent a frame other than the content header after basic.publish on channel {0}")]
    ExpectedContentHeader(u16),
}

/// Something the relay must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Nothing to do.
    None,
    /// The client sent `connection.update-secret`: verify the token, then call
    /// [`Session::secret_updated`]. Client input is paused until then.
    UpdateSecret(String),
    /// An operation needs the type of this exchange: look it up, then call
    /// [`Session::exchange_kind_learned`]. Client input is paused until then.
    LookupExchange(String),
}

/// One side's view of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Side {
    #[default]
    Open,
    /// The gateway sent `channel.close` and waits for `close-ok`.
    GatewayClosing,
}

#[derive(Default)]
struct Channel {
    client: Side,
    backend: Side,
    /// The backend sent `channel.close`, forwarded to the client, not yet answered.
    backend_close_forwarded: bool,
    /// A permitted-so-far `basic.publish` waiting for its content header.
    held_publish: Option<HeldPublish>,
    /// The queue most recently declared on this channel (`""` in later methods means it).
    last_queue: Option<String>,
    /// An `exchange.declare` sent to the backend, learnt once `declare-ok` comes back.
    pending_exchange: Option<(String, ExchangeKind)>,
    /// Queues of `basic.consume` calls waiting for `consume-ok`, in order.
    pending_consumers: VecDeque<String>,
    /// Live consumers: tag → queue, re-checked when the token is refreshed.
    consumers: HashMap<String, String>,
}

/// The method frame of a publish waiting for its content header. The exchange and routing
/// key are read again from it then: copying them out would cost two allocations per message.
struct HeldPublish {
    frame: BytesMut,
}

/// A body frame being streamed through.
#[derive(Clone, Copy)]
struct Streaming {
    remaining: usize,
    forward: bool,
}

/// The per-connection session state. See the module docs.
pub struct Session {
    username: String,
    vhost: String,
    permissions: Permissions,
    frame_max: usize,
    /// Looked up several times per message: FxHash, not SipHash (the keys are channel
    /// numbers bounded by `channel_max`, nothing to flood).
    channels: FxHashMap<u16, Channel>,
    /// Exchange types known for the life of the connection: built-ins, and exchanges this
    /// connection declared (learnt from `declare-ok`).
    exchange_kinds: HashMap<String, ExchangeKind>,
    /// Types looked up in the broker; forgotten periodically by the relay so a type that
    /// changed (delete and redeclare elsewhere) is looked up again.
    looked_up: HashMap<String, ExchangeKind>,
    /// Whether the relay can look exchange types up; without it, unknown types are
    /// treated as topic (fail closed).
    lookups: bool,
    /// A lookup is in flight: client input waits.
    looking_up: bool,
    /// The client advertised `consumer_cancel_notify`: it is told when the gateway
    /// cancels its consumers.
    cancel_notify: bool,
    client_stream: Option<Streaming>,
    backend_stream: Option<Streaming>,
    /// Client input waits for the backend to finish closing this channel.
    blocked_on: Option<u16>,
    /// An update-secret is being verified.
    verifying_secret: bool,
    /// The gateway closed the connection (expiry): drop all client frames.
    closing: bool,
    /// A `connection.close` has passed in either direction: the end is orderly.
    connection_closing: bool,
    /// The client answered the `connection.close` it was sent (the gateway's or the
    /// broker's).
    close_acknowledged: bool,
    /// The broker sent `connection.close`, relayed to the client.
    broker_closed: bool,
    probe_seed: u64,
    denials: Vec<Denial>,
    /// Frames seen from the client and from the backend since the last `take_frame_counts`.
    frames: (u64, u64),
}

/// Exchanges every vhost has, with their types.
const BUILTIN_EXCHANGES: [(&str, ExchangeKind); 7] = [
    ("", ExchangeKind::Other),
    ("amq.direct", ExchangeKind::Other),
    ("amq.fanout", ExchangeKind::Other),
    ("amq.headers", ExchangeKind::Other),
    ("amq.match", ExchangeKind::Other),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.rabbitmq.trace", ExchangeKind::Topic),
];

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

impl Session {
    /// `probe_seed` makes the names used to check server-named queue declarations
    /// unpredictable (the caller supplies randomness; this module has none).
    pub fn new(
        username: String,
        vhost: String,
        permissions: Permissions,
        frame_max: u32,
        probe_seed: u64,
    ) -> Self {
        Session {
            username,
            vhost,
            permissions,
            frame_max: frame_max as usize,
            channels: FxHashMap::default(),
            exchange_kinds: BUILTIN_EXCHANGES
                .iter()
                .map(|(n, k)| (n.to_string(), *k))
                .collect(),
            looked_up: HashMap::new(),
            lookups: false,
            looking_up: false,
            cancel_notify: false,
            client_stream: None,
            backend_stream: None,
            blocked_on: None,
            verifying_secret: false,
            closing: false,
            connection_closing: false,
            close_acknowledged: false,
            broker_closed: false,
            probe_seed,
            denials: Vec::new(),
            frames: (0, 0),
        }
    }

    /// Lets the session ask (with [`ClientEvent::LookupExchange`]) for the type of an
    /// exchange it has not seen, instead of treating it as a topic exchange.
    pub fn with_exchange_lookups(mut self) -> Self {
        self.lookups = true;
        self
    }

    /// Whether the client advertised `consumer_cancel_notify`.
    pub fn with_consumer_cancel_notify(mut self, enabled: bool) -> Self {
        self.cancel_notify = enabled;
        self
    }

    /// The answer to a [`ClientEvent::LookupExchange`]; `None` when the type could not be
    /// learnt (the exchange is then treated as a topic exchange).
    pub fn exchange_kind_learned(&mut self, name: String, kind: Option<ExchangeKind>) {
        self.looked_up
            .insert(name, kind.unwrap_or(ExchangeKind::Unknown));
        self.looking_up = false;
    }

    /// Forgets looked-up exchange types (called periodically by the relay).
    pub fn forget_looked_up_kinds(&mut self) {
        self.looked_up.clear();
    }

    /// The type of `name`, or `None` when it must be looked up first.
    fn exchange_kind(&self, name: &str) -> Option<ExchangeKind> {
        match self
            .exchange_kinds
            .get(name)
            .or_else(|| self.looked_up.get(name))
        {
            Some(k) => Some(*k),
            None if self.lookups => None,
            None => Some(ExchangeKind::Unknown),
        }
    }

    fn start_lookup(&mut self, name: &str) -> Action {
        self.looking_up = true;
        Action::Lookup(name.to_owned())
    }

    /// Frames seen (from the client, from the backend) since the last call.
    pub fn take_frame_counts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.frames)
    }

    /// Denials since the last call, for the caller to log and count.
    pub fn take_denials(&mut self) -> Vec<Denial> {
        std::mem::take(&mut self.denials)
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// Whether client input is paused (waiting for a backend close-ok or a secret check).
    pub fn client_paused(&self) -> bool {
        self.blocked_on.is_some() || self.verifying_secret || self.looking_up
    }

    /// Processes client bytes. Forwarded frames go to `to_backend`; the gateway's own
    /// replies to `to_client`.
    pub fn on_client_input(
        &mut self,
        input: &mut BytesMut,
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Result<ClientEvent, SessionError> {
        let mut span = 0; // bytes at the front of `input` already accepted for forwarding
        let result = loop {
            if self.client_paused() {
                break Ok(ClientEvent::None);
            }
            if let Some(s) = self.client_stream {
                span = stream_through(input, span, s, &mut self.client_stream, to_backend);
                if self.client_stream.is_some() {
                    break Ok(ClientEvent::None);
                }
                continue;
            }
            let Some(h) = frame::peek_header(&input[span..]) else {
                break Ok(ClientEvent::None);
            };
            // RabbitMQ's fudge: clients that take frame_max as the payload limit work.
            if let Err(e) = frame::check_client_header(&h, self.frame_max) {
                break Err(self.client_frame_error(e, to_client));
            }
            if h.frame_type == frame::BODY {
                if self.awaits_content_header(h.channel) {
                    break Err(self.expected_content_header(h.channel, to_client, to_backend));
                }
                self.frames.0 += 1;
                let forward = self.client_body_forwarded(h.channel);
                span = begin_stream(
                    input,
                    span,
                    &h,
                    forward,
                    &mut self.client_stream,
                    to_backend,
                );
                continue;
            }
            let end = span + h.wire_len();
            if input.len() < end {
                break Ok(ClientEvent::None);
            }
            if input[end - 1] != frame::FRAME_END {
                break Err(
                    self.client_frame_error(FrameError::BadFrameEnd(input[end - 1]), to_client)
                );
            }
            self.frames.0 += 1;
            match self.client_frame(&h, &input[span..end], to_backend, to_client) {
                Action::Forward => span = end,
                action => {
                    flush(input, &mut span, to_backend);
                    let f = input.split_to(h.wire_len());
                    match action {
                        Action::Hold => self.hold_publish(h.channel, f),
                        Action::Release => self.release_publish(h.channel, f, to_backend),
                        Action::Pause | Action::Lookup(_) => {
                            self.frames.0 -= 1; // counted again when processed
                            // Put it back: it is processed again once unblocked.
                            let mut back = BytesMut::from(&f[..]);
                            back.extend_from_slice(input);
                            *input = back;
                            if let Action::Lookup(name) = action {
                                break Ok(ClientEvent::LookupExchange(name));
                            }
                        }
                        Action::UpdateSecret(token) => break Ok(ClientEvent::UpdateSecret(token)),
                        Action::Undecodable(ids) => {
                            break Err(self.undecodable(ids, to_client, to_backend));
                        }
                        Action::ExpectedContentHeader => {
                            break Err(
                                self.expected_content_header(h.channel, to_client, to_backend)
                            );
                        }
                        Action::Drop | Action::Forward => {}
                    }
                }
            }
        };
        flush(input, &mut span, to_backend);
        result
    }

    /// Processes backend bytes, forwarding to `to_client` and answering the backend in
    /// `to_backend` where the gateway owns the exchange (its own channel closes).
    pub fn on_backend_input(
        &mut self,
        input: &mut BytesMut,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) -> Result<(), SessionError> {
        let mut span = 0;
        let result = loop {
            if let Some(s) = self.backend_stream {
                span = stream_through(input, span, s, &mut self.backend_stream, to_client);
                if self.backend_stream.is_some() {
                    break Ok(());
                }
                continue;
            }
            let Some(h) = frame::peek_header(&input[span..]) else {
                break Ok(());
            };
            // The backend negotiated the same frame_max with us; it is trusted to keep it,
            // but the check still bounds our buffer.
            if let Err(e) = frame::check_header(&h, self.frame_max) {
                break Err(SessionError::BackendFrame(e));
            }
            if h.frame_type == frame::BODY {
                self.frames.1 += 1;
                let forward = self.backend_frames_forwarded(h.channel);
                span = begin_stream(
                    input,
                    span,
                    &h,
                    forward,
                    &mut self.backend_stream,
                    to_client,
                );
                continue;
            }
            let end = span + h.wire_len();
            if input.len() < end {
                break Ok(());
            }
            if input[end - 1] != frame::FRAME_END {
                break Err(SessionError::BackendFrame(FrameError::BadFrameEnd(
                    input[end - 1],
                )));
            }
            self.frames.1 += 1;
            if self.backend_frame(&h, &input[span..end], to_backend) {
                span = end;
            } else {
                flush(input, &mut span, to_client);
                input.advance(h.wire_len());
            }
        };
        flush(input, &mut span, to_client);
        result
    }

    /// Closes the connection over a method that must be checked but cannot be decoded.
    fn undecodable(
        &mut self,
        ids: (u16, u16),
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) -> SessionError {
        let text = format!(
            "SYNTAX_ERROR - the gateway cannot decode method {}.{} (names must be valid UTF-8)",
            ids.0, ids.1
        );
        self.close_both_with(reply::SYNTAX_ERROR, &text, ids, to_client, to_backend);
        SessionError::Undecodable(ids)
    }

    /// Whether a `basic.publish` on `ch` is held for its content header.
    fn awaits_content_header(&self, ch: u16) -> bool {
        !self.closing
            && self
                .channels
                .get(&ch)
                .is_some_and(|c| c.held_publish.is_some())
    }

    /// Anything but the content header after a `basic.publish` is a connection error at
    /// the broker (505, with RabbitMQ's text). The gateway must say so itself: the publish
    /// is held here, so forwarding the frame would show the broker another sequence
    /// (a body before its method, or a second publish replacing the first).
    fn expected_content_header(
        &mut self,
        ch: u16,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) -> SessionError {
        self.close_both_with(
            reply::UNEXPECTED_FRAME,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
            id::BASIC_PUBLISH,
            to_client,
            to_backend,
        );
        SessionError::ExpectedContentHeader(ch)
    }

    fn client_frame_error(&mut self, e: FrameError, to_client: &mut Outbox) -> SessionError {
        let text = format!("FRAME_ERROR - {e}");
        to_client.frame(|b| method::connection_close(b, reply::FRAME_ERROR, &text, 0, 0));
        SessionError::ClientFrame(e)
    }

    fn client_body_forwarded(&self, ch: u16) -> bool {
        !self.closing
            && self
                .channels
                .get(&ch)
                .is_none_or(|c| c.client == Side::Open)
    }

    fn backend_frames_forwarded(&self, ch: u16) -> bool {
        self.channels
            .get(&ch)
            .is_none_or(|c| c.backend == Side::Open && c.client == Side::Open)
    }

    /// Decides what to do with one complete client frame (not a body frame).
    fn client_frame(
        &mut self,
        h: &FrameHeader,
        f: &[u8],
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Action {
        let payload = frame::payload(f, h);
        if self.closing {
            // The gateway closed the connection: only the client's close-ok matters.
            if h.channel == 0
                && h.frame_type == frame::METHOD
                && method::ids(payload) == Some(id::CONNECTION_CLOSE_OK)
            {
                self.close_acknowledged = true;
            }
            return Action::Drop;
        }
        let chan_state = self.channels.get(&h.channel).map(|c| c.client);
        if h.frame_type == frame::HEADER {
            return match (
                chan_state,
                self.channels
                    .get(&h.channel)
                    .map(|c| c.held_publish.is_some()),
            ) {
                (Some(Side::GatewayClosing), _) => Action::Drop,
                (_, Some(true)) => {
                    self.check_held_publish(h.channel, payload, to_backend, to_client)
                }
                _ => Action::Forward,
            };
        }
        if h.frame_type != frame::METHOD {
            // Heartbeats; one on a data channel is the broker's 505 to give, before any
            // content check (as RabbitMQ orders them).
            return Action::Forward;
        }
        if self.awaits_content_header(h.channel) {
            return Action::ExpectedContentHeader;
        }
        let Some(ids) = method::ids(payload) else {
            return Action::Forward;
        };
        if chan_state == Some(Side::GatewayClosing) {
            return self.client_frame_on_closing_channel(h.channel, ids, to_backend, to_client);
        }
        match ids {
            id::CONNECTION_CLOSE if h.channel == 0 => {
                self.connection_closing = true;
                Action::Forward
            }
            id::CONNECTION_CLOSE_OK if h.channel == 0 => {
                // The client answered the broker's connection.close.
                self.close_acknowledged = true;
                Action::Forward
            }
            id::CONNECTION_UPDATE_SECRET if h.channel == 0 => match method::decode(payload) {
                Ok(AMQPClass::Connection(
                    amq_protocol::protocol::connection::AMQPMethod::UpdateSecret(u),
                )) => {
                    self.verifying_secret = true;
                    Action::UpdateSecret(
                        String::from_utf8_lossy(u.new_secret.as_bytes()).into_owned(),
                    )
                }
                _ => Action::Forward,
            },
            id::CHANNEL_OPEN => {
                if self
                    .channels
                    .get(&h.channel)
                    .is_some_and(|c| c.backend == Side::GatewayClosing)
                {
                    self.blocked_on = Some(h.channel);
                    return Action::Pause;
                }
                self.channels.insert(h.channel, Channel::default());
                Action::Forward
            }
            id::CHANNEL_CLOSE_OK => {
                if let Some(c) = self.channels.get_mut(&h.channel) {
                    c.backend_close_forwarded = false;
                }
                Action::Forward
            }
            id::BASIC_PUBLISH => self.check_publish_method(h.channel, payload),
            _ => self.check_method(h.channel, ids, payload, to_backend, to_client),
        }
    }

    fn client_frame_on_closing_channel(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Action {
        let _ = to_backend;
        match ids {
            id::CHANNEL_CLOSE_OK => {
                if let Some(c) = self.channels.get_mut(&ch) {
                    c.client = Side::Open;
                    c.held_publish = None;
                }
                self.forget_if_closed(ch);
            }
            // Both sides closing at once: answer as RabbitMQ does, keep waiting.
            id::CHANNEL_CLOSE => to_client.frame(|b| method::channel_close_ok(b, ch)),
            _ => {}
        }
        Action::Drop
    }

    fn forget_if_closed(&mut self, ch: u16) {
        if self
            .channels
            .get(&ch)
            .is_some_and(|c| c.client == Side::Open && c.backend == Side::Open)
        {
            // Both sides are done with the gateway's close: the channel number is free.
            self.channels.remove(&ch);
        }
    }

    /// Decides a complete client method that is not `basic.publish`.
    fn check_method(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        payload: &[u8],
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Action {
        // A method on a channel that is not open is a connection error at the broker
        // (504) before anything is done, so it needs no decision here.
        if !needs_decoding(ids) || !self.channels.contains_key(&ch) {
            return Action::Forward;
        }
        let Ok(class) = method::decode(payload) else {
            // RabbitMQ accepts some payloads amq-protocol does not (names that are not
            // UTF-8, for one); forwarding what was not checked would bypass the checks.
            return Action::Undecodable(ids);
        };
        let last_queue = self.channels.get(&ch).and_then(|c| c.last_queue.clone());
        let Some(op) = OwnedOp::from_class(&class, last_queue, || self.server_name_probe(ch))
        else {
            return Action::Forward;
        };
        if let AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) = &class
            && !d.passive
        {
            // Learnt only from declare-ok, which proves the exchange has this type; a
            // nowait declare proves nothing (it may fail on an existing exchange).
            if !d.nowait
                && let Some(c) = self.channels.get_mut(&ch)
            {
                c.pending_exchange =
                    Some((d.exchange.as_str().to_owned(), kind_of(d.kind.as_str())));
            }
        }
        if matches!(
            op.method,
            id::EXCHANGE_BIND | id::EXCHANGE_UNBIND | id::QUEUE_BIND | id::QUEUE_UNBIND
        ) && self.exchange_kind(&op.b).is_none()
        {
            return self.start_lookup(&op.b);
        }
        if op.method == id::EXCHANGE_DELETE {
            // Whatever is declared under this name next may have another type.
            self.exchange_kinds.remove(&op.a);
            self.looked_up.remove(&op.a);
        }
        let kind = |name: &str| self.exchange_kind(name).unwrap_or(ExchangeKind::Unknown);
        let ctx = Context {
            vhost: &self.vhost,
            username: &self.username,
        };
        match authz::decide(&self.permissions, &ctx, &op.as_operation(kind)) {
            Ok(()) => {
                if let AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Consume(c)) =
                    &class
                    && let Some(chan) = self.channels.get_mut(&ch)
                {
                    if c.nowait {
                        chan.consumers
                            .insert(c.consumer_tag.to_string(), op.a.clone());
                    } else {
                        chan.pending_consumers.push_back(op.a.clone());
                    }
                }
                Action::Forward
            }
            Err(d) => {
                self.refuse(ch, d, to_backend, to_client);
                Action::Drop
            }
        }
    }

    fn check_publish_method(&mut self, ch: u16, payload: &[u8]) -> Action {
        if !self.channels.contains_key(&ch) {
            return Action::Forward; // the broker refuses publishes on unopened channels
        }
        let Ok(p) = PublishRef::parse(payload) else {
            return Action::Undecodable(id::BASIC_PUBLISH);
        };
        if self.exchange_kind(p.exchange).is_none() {
            return self.start_lookup(p.exchange);
        }
        // Everything except the content-dependent checks could be decided now, but
        // RabbitMQ decides once the whole message is in; holding the method frame until
        // the header keeps the order of checks identical.
        let held = HeldPublish {
            frame: BytesMut::new(),
        };
        if let Some(c) = self.channels.get_mut(&ch) {
            c.held_publish = Some(held);
        }
        Action::Hold
    }

    fn hold_publish(&mut self, ch: u16, f: BytesMut) {
        if let Some(held) = self
            .channels
            .get_mut(&ch)
            .and_then(|c| c.held_publish.as_mut())
        {
            held.frame = f;
        }
    }

    fn check_held_publish(
        &mut self,
        ch: u16,
        payload: &[u8],
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Action {
        let Ok(props) = method::publish_props(payload) else {
            return Action::Undecodable(id::BASIC_PUBLISH);
        };
        let Some(held) = self.channels.get(&ch).and_then(|c| c.held_publish.as_ref()) else {
            return Action::Forward;
        };
        // Parsed once already when the method arrived; the bytes are the same.
        let Ok(p) = PublishRef::parse(held.frame.get(frame::HEADER_LEN..).unwrap_or_default())
        else {
            return Action::Undecodable(id::BASIC_PUBLISH);
        };
        let kind = self
            .exchange_kind(p.exchange)
            .unwrap_or(ExchangeKind::Unknown);
        let op = Operation::BasicPublish {
            exchange: p.exchange,
            routing_key: p.routing_key,
            exchange_kind: kind,
            user_id: props.user_id.as_deref(),
            extra_routing_keys: &props.extra_routing_keys,
        };
        let ctx = Context {
            vhost: &self.vhost,
            username: &self.username,
        };
        match authz::decide(&self.permissions, &ctx, &op) {
            Ok(()) => Action::Release,
            Err(d) => {
                self.refuse(ch, d, to_backend, to_client);
                Action::Drop
            }
        }
    }

    /// Forwards the held publish method and its content header.
    fn release_publish(&mut self, ch: u16, header: BytesMut, to_backend: &mut Outbox) {
        if let Some(held) = self
            .channels
            .get_mut(&ch)
            .and_then(|c| c.held_publish.take())
        {
            to_backend.push(held.frame);
        }
        to_backend.push(header);
    }

    /// Closes channel `ch` toward the client with the denial, and toward the backend.
    fn refuse(&mut self, ch: u16, d: Denial, to_backend: &mut Outbox, to_client: &mut Outbox) {
        to_client.frame(|b| {
            method::channel_close(b, ch, d.reply_code, &d.reply_text, d.class_id, d.method_id)
        });
        let c = self.channels.entry(ch).or_default();
        c.client = Side::GatewayClosing;
        c.held_publish = None;
        if c.backend_close_forwarded {
            // The backend is already closing this channel: answer its close instead.
            to_backend.frame(|b| method::channel_close_ok(b, ch));
            c.backend_close_forwarded = false;
        } else if c.backend == Side::Open {
            to_backend.frame(|b| {
                method::channel_close(
                    b,
                    ch,
                    reply::REPLY_SUCCESS,
                    "gateway: channel closed after access refusal",
                    0,
                    0,
                )
            });
            c.backend = Side::GatewayClosing;
        }
        self.denials.push(d);
    }

    /// Handles one complete backend frame; returns whether it is forwarded to the client.
    fn backend_frame(&mut self, h: &FrameHeader, f: &[u8], to_backend: &mut Outbox) -> bool {
        if self.closing {
            return false; // the gateway closed both sides; the backend's answers are its own
        }
        let payload = frame::payload(f, h);
        let ids = if h.frame_type == frame::METHOD {
            method::ids(payload)
        } else {
            None
        };
        if h.channel == 0 && ids == Some(id::CONNECTION_CLOSE) {
            // The broker ends the connection itself: its close reaches the client, and
            // the gateway adds no "connection lost" of its own when the socket then closes,
            // but waits for the client's close-ok like a broker would.
            self.connection_closing = true;
            self.broker_closed = true;
        }
        let Some(c) = self.channels.get_mut(&h.channel) else {
            return true;
        };
        if c.backend == Side::GatewayClosing {
            match ids {
                Some(id::CHANNEL_CLOSE_OK) => {
                    c.backend = Side::Open;
                    if self.blocked_on == Some(h.channel) {
                        self.blocked_on = None;
                    }
                    self.forget_if_closed(h.channel);
                }
                Some(id::CHANNEL_CLOSE) => {
                    to_backend.frame(|b| method::channel_close_ok(b, h.channel))
                }
                _ => {}
            }
            return false;
        }
        if c.client == Side::GatewayClosing {
            return false; // the client must see nothing more on a channel we closed
        }
        match ids {
            Some(id::CHANNEL_CLOSE) => c.backend_close_forwarded = true,
            Some(id::QUEUE_DECLARE_OK) => {
                if let Ok(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) =
                    method::decode(payload)
                {
                    c.last_queue = Some(ok.queue.as_str().to_owned());
                }
            }
            Some(id::EXCHANGE_DECLARE_OK) => {
                if let Some((name, kind)) = c.pending_exchange.take() {
                    self.exchange_kinds.insert(name, kind);
                }
            }
            Some(id::BASIC_CONSUME_OK | id::BASIC_CANCEL | id::BASIC_CANCEL_OK) => {
                use amq_protocol::protocol::basic::AMQPMethod as B;
                match method::decode(payload) {
                    Ok(AMQPClass::Basic(B::ConsumeOk(ok))) => {
                        if let Some(q) = c.pending_consumers.pop_front() {
                            c.consumers.insert(ok.consumer_tag.to_string(), q);
                        }
                    }
                    Ok(AMQPClass::Basic(B::Cancel(x))) => {
                        c.consumers.remove(x.consumer_tag.as_str());
                    }
                    Ok(AMQPClass::Basic(B::CancelOk(x))) => {
                        c.consumers.remove(x.consumer_tag.as_str());
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        true
    }

    /// Cancels the consumers the current permissions no longer allow to read their
    /// queue (RabbitMQ 4.2.6+ after update-secret): toward the backend, and toward the
    /// client when it understands `basic.cancel` from the server.
    fn cancel_unreadable_consumers(&mut self, to_client: &mut Outbox, to_backend: &mut Outbox) {
        use amq_protocol::protocol::basic;
        for (&ch, chan) in self.channels.iter_mut() {
            let lost: Vec<String> = chan
                .consumers
                .iter()
                .filter(|(_, q)| {
                    !q.starts_with(REPLY_TO)
                        && !self.permissions.resource(authz::Perm::Read, &self.vhost, q)
                })
                .map(|(tag, _)| tag.clone())
                .collect();
            for tag in lost {
                chan.consumers.remove(&tag);
                let cancel = || {
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: tag.as_str().into(),
                        nowait: true,
                    }))
                };
                to_backend.frame(|b| method::encode(b, ch, cancel()));
                if self.cancel_notify {
                    to_client.frame(|b| method::encode(b, ch, cancel()));
                }
            }
        }
    }

    /// Closes the client connection because the token expired (RabbitMQ 4.2.6+), and the
    /// backend connection with it. Nothing the client sends afterwards is relayed.
    pub fn expire(&mut self, to_client: &mut Outbox, to_backend: &mut Outbox) {
        self.force_close(
            "CONNECTION_FORCED - credential expired",
            to_client,
            to_backend,
        );
    }

    /// Closes the client with `320 CONNECTION_FORCED` and `text`, and the backend with it;
    /// nothing the client sends afterwards is relayed.
    pub fn force_close(&mut self, text: &str, to_client: &mut Outbox, to_backend: &mut Outbox) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.connection_closing = true;
        to_client.frame(|b| method::connection_close(b, reply::CONNECTION_FORCED, text, 0, 0));
        to_backend.frame(|b| {
            method::connection_close(
                b,
                reply::REPLY_SUCCESS,
                "gateway: client connection closed",
                0,
                0,
            )
        });
    }

    /// Whether the client was sent a `connection.close` (by the gateway: expiry, refused
    /// secret, lost backend; or by the broker), and whether it has answered with `close-ok`.
    /// The relay keeps the client socket open until then (bounded), so a client still
    /// sending does not get a reset that loses the close.
    pub fn gateway_closed(&self) -> (bool, bool) {
        (self.closing || self.broker_closed, self.close_acknowledged)
    }

    /// The backend connection ended without a `connection.close`: the client gets
    /// `320 CONNECTION_FORCED` instead of a bare disconnect. Returns whether a close was
    /// written.
    pub fn backend_lost(&mut self, to_client: &mut Outbox) -> bool {
        if self.connection_closing || self.closing {
            return false;
        }
        self.closing = true;
        self.connection_closing = true;
        to_client.frame(|b| {
            method::connection_close(
                b,
                reply::CONNECTION_FORCED,
                "CONNECTION_FORCED - broker connection lost",
                0,
                0,
            )
        });
        true
    }

    /// The outcome of verifying an update-secret token. On success the permissions are
    /// replaced entirely (nothing of the old token survives).
    pub fn secret_updated(
        &mut self,
        outcome: Result<Permissions, String>,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        self.verifying_secret = false;
        match outcome {
            Ok(p) if p.vhost_access(&self.vhost) => {
                self.permissions = p;
                self.cancel_unreadable_consumers(to_client, to_backend);
                to_client.frame(|b| {
                    method::encode(
                        b,
                        0,
                        AMQPClass::Connection(
                            amq_protocol::protocol::connection::AMQPMethod::UpdateSecretOk(
                                amq_protocol::protocol::connection::UpdateSecretOk {},
                            ),
                        ),
                    )
                });
            }
            Ok(_) => {
                let text = format!(
                    "NOT_ALLOWED - access to vhost '{}' refused for user '{}'",
                    self.vhost, self.username
                );
                self.close_both(reply::NOT_ALLOWED, &text, to_client, to_backend);
            }
            Err(text) => self.close_both(reply::NOT_ALLOWED, &text, to_client, to_backend),
        }
    }

    fn close_both(
        &mut self,
        code: u16,
        text: &str,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        self.close_both_with(
            code,
            text,
            id::CONNECTION_UPDATE_SECRET,
            to_client,
            to_backend,
        );
    }

    /// Closes the client connection with `code`/`text` and the backend connection with it.
    fn close_both_with(
        &mut self,
        code: u16,
        text: &str,
        ids: (u16, u16),
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        self.closing = true;
        self.connection_closing = true;
        to_client.frame(|b| method::connection_close(b, code, text, ids.0, ids.1));
        to_backend.frame(|b| {
            method::connection_close(
                b,
                reply::REPLY_SUCCESS,
                "gateway: client connection closed",
                0,
                0,
            )
        });
    }

    /// A plausible server-generated queue name, used to check `configure` for
    /// `queue.declare` with an empty name before the broker picks the real one.
    fn server_name_probe(&mut self, ch: u16) -> String {
        use base64::Engine;
        self.probe_seed = self
            .probe_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407 ^ ch as u64);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.probe_seed.to_be_bytes());
        bytes[8..].copy_from_slice(&self.probe_seed.rotate_left(29).to_le_bytes());
        format!(
            "amq.gen-{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }
}

enum Action {
    Forward,
    Drop,
    Hold,
    Release,
    Pause,
    Lookup(String),
    /// A method the gateway must check but cannot decode: the connection is closed.
    Undecodable((u16, u16)),
    /// Not the content header a held `basic.publish` waits for: the connection is closed.
    ExpectedContentHeader,
    UpdateSecret(String),
}

/// Methods whose arguments authorisation needs.
fn needs_decoding(ids: (u16, u16)) -> bool {
    matches!(
        ids,
        id::EXCHANGE_DECLARE
            | id::EXCHANGE_DELETE
            | id::EXCHANGE_BIND
            | id::EXCHANGE_UNBIND
            | id::QUEUE_DECLARE
            | id::QUEUE_BIND
            | id::QUEUE_PURGE
            | id::QUEUE_DELETE
            | id::QUEUE_UNBIND
            | id::BASIC_CONSUME
            | id::BASIC_GET
    )
}

fn kind_of(exchange_type: &str) -> ExchangeKind {
    if exchange_type == "topic" {
        ExchangeKind::Topic
    } else {
        ExchangeKind::Other
    }
}

/// Moves the accepted span at the front of `input` to `out`, without copying.
fn flush(input: &mut BytesMut, span: &mut usize, out: &mut Outbox) {
    if *span > 0 {
        out.push(input.split_to(*span));
        *span = 0;
    }
}

/// Starts streaming a body frame whose header is at `input[span..]`.
fn begin_stream(
    input: &mut BytesMut,
    mut span: usize,
    h: &FrameHeader,
    forward: bool,
    state: &mut Option<Streaming>,
    out: &mut Outbox,
) -> usize {
    if !forward {
        flush(input, &mut span, out);
    }
    *state = Some(Streaming {
        remaining: h.wire_len(),
        forward,
    });
    span
}

/// Passes as much of the streaming body frame as is buffered.
fn stream_through(
    input: &mut BytesMut,
    mut span: usize,
    s: Streaming,
    state: &mut Option<Streaming>,
    out: &mut Outbox,
) -> usize {
    let available = input.len() - span;
    let n = s.remaining.min(available);
    if s.forward {
        span += n;
    } else {
        input.advance(n);
    }
    let remaining = s.remaining - n;
    *state = if remaining == 0 {
        None
    } else {
        Some(Streaming { remaining, ..s })
    };
    if remaining > 0 {
        flush(input, &mut span, out);
    }
    span
}

/// An authorisation-relevant method with owned names (amq-protocol decodes into owned
/// strings; the borrowed [`Operation`] is built from this).
struct OwnedOp {
    method: (u16, u16),
    a: String,
    b: String,
    rk: String,
    passive: bool,
    extra: Option<String>,
    server_named: bool,
}

impl OwnedOp {
    /// `probe` is called only for a server-named `queue.declare`.
    fn from_class(
        class: &AMQPClass,
        last_queue: Option<String>,
        probe: impl FnOnce() -> String,
    ) -> Option<OwnedOp> {
        let q = |name: &str| -> String {
            if name.is_empty() {
                last_queue.clone().unwrap_or_default()
            } else {
                name.to_owned()
            }
        };
        let op = |method, a: String, b: String, rk: &str| OwnedOp {
            method,
            a,
            b,
            rk: rk.to_owned(),
            passive: false,
            extra: None,
            server_named: false,
        };
        use amq_protocol::protocol::basic;
        Some(match class {
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) => OwnedOp {
                passive: d.passive,
                extra: method::table_str(&d.arguments, "alternate-exchange"),
                ..op(
                    id::EXCHANGE_DECLARE,
                    d.exchange.to_string(),
                    String::new(),
                    "",
                )
            },
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(d)) => op(
                id::EXCHANGE_DELETE,
                d.exchange.to_string(),
                String::new(),
                "",
            ),
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(b)) => op(
                id::EXCHANGE_BIND,
                b.destination.to_string(),
                b.source.to_string(),
                b.routing_key.as_str(),
            ),
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(b)) => op(
                id::EXCHANGE_UNBIND,
                b.destination.to_string(),
                b.source.to_string(),
                b.routing_key.as_str(),
            ),
            // The direct reply-to pseudo queue needs no permission.
            AMQPClass::Queue(queue::AMQPMethod::Declare(d))
                if d.queue.as_str().starts_with(REPLY_TO) =>
            {
                return None;
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                let server_named = d.queue.as_str().is_empty();
                OwnedOp {
                    passive: d.passive,
                    extra: method::table_str(&d.arguments, "x-dead-letter-exchange"),
                    server_named,
                    ..op(
                        id::QUEUE_DECLARE,
                        if server_named {
                            probe()
                        } else {
                            d.queue.to_string()
                        },
                        String::new(),
                        "",
                    )
                }
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => {
                op(id::QUEUE_DELETE, q(d.queue.as_str()), String::new(), "")
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(d)) => {
                op(id::QUEUE_PURGE, q(d.queue.as_str()), String::new(), "")
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => op(
                id::QUEUE_BIND,
                q(b.queue.as_str()),
                b.exchange.to_string(),
                b.routing_key.as_str(),
            ),
            AMQPClass::Queue(queue::AMQPMethod::Unbind(b)) => op(
                id::QUEUE_UNBIND,
                q(b.queue.as_str()),
                b.exchange.to_string(),
                b.routing_key.as_str(),
            ),
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                op(id::BASIC_CONSUME, q(c.queue.as_str()), String::new(), "")
            }
            AMQPClass::Basic(basic::AMQPMethod::Get(g)) => {
                op(id::BASIC_GET, q(g.queue.as_str()), String::new(), "")
            }
            _ => return None,
        })
    }

    fn as_operation<'a>(&'a self, kind: impl Fn(&str) -> ExchangeKind) -> Operation<'a> {
        let extra = self.extra.as_deref();
        match self.method {
            id::EXCHANGE_DECLARE => Operation::ExchangeDeclare {
                exchange: &self.a,
                passive: self.passive,
                alternate_exchange: extra,
            },
            id::EXCHANGE_DELETE => Operation::ExchangeDelete { exchange: &self.a },
            id::EXCHANGE_BIND | id::EXCHANGE_UNBIND => Operation::ExchangeBind {
                destination: &self.a,
                source: &self.b,
                routing_key: &self.rk,
                source_kind: kind(&self.b),
                unbind: self.method == id::EXCHANGE_UNBIND,
            },
            id::QUEUE_DECLARE => Operation::QueueDeclare {
                queue: &self.a,
                passive: self.passive,
                dead_letter_exchange: extra,
                server_named: self.server_named,
            },
            id::QUEUE_DELETE => Operation::QueueDelete { queue: &self.a },
            id::QUEUE_PURGE => Operation::QueuePurge { queue: &self.a },
            id::QUEUE_BIND | id::QUEUE_UNBIND => Operation::QueueBind {
                queue: &self.a,
                exchange: &self.b,
                routing_key: &self.rk,
                exchange_kind: kind(&self.b),
                unbind: self.method == id::QUEUE_UNBIND,
            },
            id::BASIC_GET => Operation::BasicGet { queue: &self.a },
            _ => Operation::BasicConsume { queue: &self.a },
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
