//! The authorised session between a client and its backend connection, sans-IO.
//!
//! The relay hands [`Session`] whatever bytes arrived from either side; the session splits
//! them into frames and decides, frame by frame, what is forwarded (as the same bytes,
//! never re-encoded, but for the two rewrites below), what is held (a `basic.publish`
//! until its content header shows `user_id` and `CC`/`BCC`), what is dropped, and what the
//! gateway answers itself. Content body frames, and content headers from the broker, are
//! streamed: they are forwarded as their bytes arrive, so a large one never has to fit in a
//! buffer.
//!
//! The gateway's picture of each channel follows what the client sent, in the order
//! RabbitMQ's channel process handles it ([`channel`]): `""` means the queue most
//! recently declared when the method is processed, the routing-key shortcut of
//! `queue.bind` is expanded, field tables are read first-entry-wins ([`super::table`]),
//! and broker replies are matched to their own requests. Replies are needed only where the
//! client cannot be followed alone: the name of a server-named queue (a `nowait` declare
//! is sent with `nowait` cleared and its reply kept from the client) and the type of a
//! declared exchange. A `basic.consume` with an empty tag gets a tag from the gateway,
//! in RabbitMQ's `amq.ctag-…` form, so every consumer has a name the gateway knows.
//!
//! When [`crate::authz::decide`] refuses an operation on channel N, the gateway closes the
//! broker's channel N first and tells the client once the broker has answered: replies to
//! methods the client sent before the refused one reach it first, and if one of them
//! failed, the broker's own error reaches the client instead, as with RabbitMQ alone. The
//! connection stays usable.
//!
//! Every per-connection structure has a bound: channels (`channel_max`), consumers (per
//! channel and per connection, RabbitMQ's `530` beyond), replies awaited with something to
//! learn (client input waits beyond), learnt exchange types, one held publish per channel
//! (exactly its arguments). See `ARCHITECTURE.md`, "Bounds".
//!
//! **Invariant:** no IO and no clock. Decisions come from `authz`; this module only
//! tracks protocol state and routes bytes.

mod channel;
pub mod exchanges;
mod outbox;

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use bytes::{Buf, BytesMut};
use rustc_hash::FxHashMap;

use super::frame::{self, FrameError, FrameHeader};
use super::method::{
    self, ClientMethod, Close, ContentHeader, MethodError, PublishProps, PublishRef, id, reply,
};
use crate::authz::{
    self, Context, Denial, ExchangeKind, Operation, Permissions, REPLY_TO, Verdict, strip_cr_lf,
};
use channel::{
    Channel, Consumer, ConsumerState, ExchangeOk, LastQueue, MAX_OWED, NO_QUEUE_TEXT, Owed, Phase,
    QueueOk, Revoked, SECOND_OPEN_TEXT, State,
};
pub use exchanges::ExchangeEpochs;

/// The `no-ack` bit of `basic.consume`'s bits octet.
const NO_ACK_BIT: u8 = 0b10;
use exchanges::{Exchanges, kind_of};
pub use outbox::Outbox;

/// Per-connection bounds on what a client can make the session hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// RabbitMQ's `consumer_max_per_channel`: beyond it, `530 NOT_ALLOWED`.
    pub consumers_per_channel: usize,
    /// Consumers on all channels of a connection: beyond it, `530 NOT_ALLOWED`.
    pub consumers_per_connection: usize,
    /// Replies awaited with something to learn (server-named queues, declared exchange
    /// types) on all channels; beyond it, client input waits for replies.
    pub pending_replies: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            consumers_per_channel: 1024,
            consumers_per_connection: 10_000,
            pending_replies: 1024,
        }
    }
}

/// Everything a session is made of but its permissions.
pub struct SessionConfig {
    /// The client's RabbitMQ user name (from its token).
    pub username: String,
    /// The gateway's own user on the broker, never shown to the client.
    pub service_user: String,
    pub vhost: String,
    /// Negotiated with the client (frames from the client may exceed it by RabbitMQ's
    /// 8-byte fudge; frames from the broker may not, but content headers, which RabbitMQ
    /// never splits).
    pub frame_max: u32,
    /// Negotiated with the client; 0 is RabbitMQ's "no limit" and means 65535 here.
    pub channel_max: u16,
    pub limits: Limits,
    /// Randomness for server-named queue probes and consumer tags (this module has none).
    pub seed: u64,
    /// The gateway's exchange epochs, shared by all connections.
    pub epochs: Arc<ExchangeEpochs>,
    /// Whether exchange types can be looked up ([`ClientEvent::LookupExchange`]); without,
    /// an unknown type is treated as topic.
    pub lookups: bool,
    /// The client advertised `consumer_cancel_notify`: it is sent the broker's and the
    /// gateway's `basic.cancel`s (the backend connection always advertises it, so the
    /// gateway sees every consumer the broker cancels).
    pub cancel_notify: bool,
}

impl SessionConfig {
    /// A configuration with the gateway's defaults (RabbitMQ's `frame_max` and
    /// `channel_max`, the default [`Limits`], no lookups, no cancel notifications, a
    /// fresh set of epochs), for benches, fuzzing and tests.
    pub fn new(username: &str, vhost: &str) -> SessionConfig {
        SessionConfig {
            username: username.to_owned(),
            service_user: "gateway".to_owned(),
            vhost: vhost.to_owned(),
            frame_max: 131_072,
            channel_max: 2047,
            limits: Limits::default(),
            seed: 0,
            epochs: ExchangeEpochs::new(),
            lookups: false,
            cancel_notify: false,
        }
    }
}

/// A refused `update-secret`: the text of the `530 NOT_ALLOWED` close the client gets (and
/// the broker's connection with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretRefused(pub String);

/// A violation of AMQP framing: the byte stream cannot be followed any further. The
/// `connection.close` for the client is already queued.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client framing error: {0}")]
    ClientFrame(FrameError),
    #[error("backend framing error: {0}")]
    BackendFrame(FrameError),
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

/// Why client input waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    /// An exchange type lookup.
    Lookup,
    /// An update-secret token being verified.
    Secret,
    /// A method names `""` while the channel's most recent declare is server-named and
    /// unanswered: its name is needed.
    ServerName(u16),
    /// A `channel.open` on a channel whose previous incarnation the broker has not finished
    /// closing.
    Reopen(u16),
    /// As many replies are awaited as [`Limits::pending_replies`] allows.
    Pending,
    /// A method needs the type of an exchange whose declare on the same channel is still
    /// unanswered: RabbitMQ runs it after the declare, so its `declare-ok` tells the type.
    Declared(u16),
}

/// A body frame (or a broker content header) being streamed through.
#[derive(Clone, Copy)]
struct Streaming {
    remaining: usize,
    forward: bool,
}

/// What happens to one client frame.
enum Step {
    Forward,
    /// Forwarded with the `nowait` bit cleared in the octet at this payload offset.
    ForwardWaiting(usize),
    Drop,
    /// Replaced by these bytes.
    Replace(BytesMut),
    /// A `basic.publish` method frame, held for its content header.
    Hold,
    /// The content header of a held publish: both go.
    Release,
    /// Not processed: the frame stays in the input until the pause ends.
    Pause(Pause),
    Lookup(String),
    UpdateSecret(String),
}

/// What happens to one broker method frame.
enum BackendStep {
    Forward,
    Drop,
    Replace(BytesMut),
}

/// The per-connection session state. See the module docs.
pub struct Session {
    username: String,
    service_user: String,
    vhost: String,
    permissions: Permissions,
    /// Seconds since the epoch, as the relay last said ([`Session::set_clock`]): policy
    /// conditions on the time read it.
    now: i64,
    frame_max: usize,
    channel_max: usize,
    limits: Limits,
    /// Looked up several times per message: FxHash, not SipHash (the keys are channel
    /// numbers, bounded by `channel_max`, nothing to flood).
    /// Boxed: a map's buckets are allocated in fours, and most connections use one channel.
    channels: FxHashMap<u16, Box<Channel>>,
    /// Consumers on all channels.
    consumers: usize,
    /// Awaited replies with something to learn, on all channels.
    pending: usize,
    exchanges: Exchanges,
    /// The exchange whose type is being looked up and the epoch it was asked at.
    lookup: Option<(String, u64)>,
    cancel_notify: bool,
    client_stream: Option<Streaming>,
    backend_stream: Option<Streaming>,
    pause: Option<Pause>,
    /// The gateway closed the connection (expiry, refused secret, a protocol error): drop
    /// all client frames but its close-ok.
    closing: bool,
    /// A `connection.close` has passed in either direction: the end is orderly.
    connection_closing: bool,
    /// The client sent `connection.close`.
    client_closed: bool,
    /// The client answered the `connection.close` it was sent (the gateway's or the
    /// broker's).
    close_acknowledged: bool,
    /// The broker sent `connection.close`, relayed to the client.
    broker_closed: bool,
    /// Channels whose held publish was cut from the current read buffer: copied out at the
    /// end of the read, so a held frame never keeps a whole read buffer alive.
    fresh_holds: Vec<u16>,
    rng: u64,
    /// Sequence numbers of server-named declares, to match their `declare-ok`.
    next_seq: u32,
    denials: Vec<Denial>,
    /// Frames seen from the client and from the backend since the last `take_frame_counts`.
    frames: (u64, u64),
    /// Frames for the backend written while handling backend input (the cancel of a
    /// consumer whose `consume-ok` has just come); the relay sends them with
    /// [`Session::take_backend_output`]. At most one per consumer.
    backend_later: Outbox,
    /// The broker authorises this session (an internal user, logged in to the broker with
    /// its own credentials): frames are relayed unchecked, and only the connection's own
    /// close handshake and the gateway's closes (drain, a lost broker, a framing error) are
    /// followed.
    relay_only: bool,
    /// `channel.close-ok`s the broker owes for the gateway's own closes, on all channels
    /// (the sum of [`Channel::owed_close_oks`]): while any is owed, the relay bounds the
    /// wait (see [`Session::awaits_broker_close`]).
    owed_close_oks: usize,
    /// The broker sent `connection.blocked` (a resource alarm) and not yet `unblocked`:
    /// it reads nothing meanwhile, so its silence is no fault.
    broker_blocked: bool,
    /// Test builds only: every per-method decision is left to the broker.
    #[cfg(feature = "test-switches")]
    broker_decides: bool,
}

impl Session {
    pub fn new(cfg: SessionConfig, permissions: Permissions) -> Self {
        Session {
            exchanges: Exchanges::new(cfg.epochs, &cfg.vhost, cfg.lookups),
            username: cfg.username,
            service_user: cfg.service_user,
            vhost: cfg.vhost,
            permissions,
            frame_max: cfg.frame_max as usize,
            channel_max: match cfg.channel_max {
                0 => u16::MAX as usize,
                n => n as usize,
            },
            limits: cfg.limits,
            channels: FxHashMap::default(),
            consumers: 0,
            pending: 0,
            lookup: None,
            cancel_notify: cfg.cancel_notify,
            client_stream: None,
            backend_stream: None,
            pause: None,
            closing: false,
            connection_closing: false,
            client_closed: false,
            close_acknowledged: false,
            broker_closed: false,
            fresh_holds: Vec::new(),
            now: 0,
            rng: cfg.seed,
            next_seq: 0,
            denials: Vec::new(),
            frames: (0, 0),
            backend_later: Outbox::default(),
            relay_only: false,
            owed_close_oks: 0,
            broker_blocked: false,
            #[cfg(feature = "test-switches")]
            broker_decides: false,
        }
    }

    /// A session the broker authorises: an internal user's, whose backend connection is
    /// logged in with the user's own credentials. The gateway makes no per-method decision
    /// (RabbitMQ enforces the user's permissions); framing, the bounds of the relay and the
    /// gateway's closes still apply.
    pub fn broker_authorised(cfg: SessionConfig) -> Self {
        let mut s = Session::new(cfg, Permissions::from_scopes(&[]));
        s.relay_only = true;
        s
    }

    /// Test builds only (the `test-switches` feature): the gateway makes no per-method
    /// decision, so that a test can show the broker refusing on its own.
    #[cfg(feature = "test-switches")]
    pub fn leave_decisions_to_broker(&mut self) {
        self.broker_decides = true;
    }

    /// [`authz::decide`], the one place the session asks for a decision.
    fn decide(&self, op: &Operation<'_>, ids: (u16, u16)) -> Verdict {
        #[cfg(feature = "test-switches")]
        if self.broker_decides {
            return Verdict::Permit;
        }
        authz::decide(&self.permissions, &self.context(), op, ids)
    }

    /// Frames the session wrote for the backend while handling backend input; the relay
    /// appends them to what goes to the backend after each [`Session::on_backend_input`].
    pub fn take_backend_output(&mut self, to_backend: &mut Outbox) {
        if !self.backend_later.is_empty() {
            to_backend.append(&mut self.backend_later);
        }
    }

    /// The answer to a [`ClientEvent::LookupExchange`]; `None` when the type could not be
    /// learnt (the exchange is then treated as a topic exchange).
    pub fn exchange_kind_learned(&mut self, name: String, kind: Option<ExchangeKind>) {
        if let Some((asked, epoch)) = self.lookup.take() {
            debug_assert_eq!(asked, name);
            self.exchanges.looked_up(&asked, kind, epoch);
        }
        if self.pause == Some(Pause::Lookup) {
            self.pause = None;
        }
    }

    /// The time to live of learnt exchange types has passed (called by the relay).
    pub fn forget_looked_up_kinds(&mut self) {
        self.exchanges.forget();
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

    /// Whether client input is paused.
    pub fn client_paused(&self) -> bool {
        self.pause.is_some()
    }

    /// How many channels, consumers and awaited replies the session holds (for tests and
    /// the bounds' measurements).
    pub fn held(&self) -> (usize, usize, usize) {
        (self.channels.len(), self.consumers, self.pending)
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
        // Frames the gateway writes itself while deciding a frame: they go after the bytes
        // accepted before it, so the broker sees everything in the client's order.
        let (mut own_b, mut own_c) = (Outbox::default(), Outbox::default());
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
                flush(input, &mut span, to_backend);
                break Err(self.client_frame_error(e, to_client));
            }
            if h.frame_type == frame::BODY {
                if self.publish_held(h.channel) {
                    flush(input, &mut span, to_backend);
                    self.unexpected_frame(None, to_client, to_backend);
                    input.clear();
                    break Ok(ClientEvent::None);
                }
                self.frames.0 += 1;
                let forward = self.client_frames_forwarded(h.channel);
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
            let end_octet = input[end - 1];
            if end_octet != frame::FRAME_END {
                flush(input, &mut span, to_backend);
                break Err(self.client_frame_error(FrameError::BadFrameEnd(end_octet), to_client));
            }
            let step = self.client_frame(&h, &input[span..end], &mut own_b, &mut own_c);
            if !matches!(step, Step::Pause(_) | Step::Lookup(_)) {
                self.frames.0 += 1;
            }
            let event = match step {
                Step::Forward => {
                    span = end;
                    None
                }
                Step::ForwardWaiting(at) => {
                    input[span + frame::HEADER_LEN + at] &= !method::QUEUE_DECLARE_NOWAIT;
                    span = end;
                    None
                }
                Step::Pause(p) => {
                    self.pause = Some(p);
                    Some(ClientEvent::None)
                }
                Step::Lookup(name) => {
                    self.pause = Some(Pause::Lookup);
                    let epoch = self.exchanges.epoch(&name);
                    self.lookup = Some((name.clone(), epoch));
                    Some(ClientEvent::LookupExchange(name))
                }
                other => {
                    flush(input, &mut span, to_backend);
                    let f = input.split_to(h.wire_len());
                    match other {
                        Step::Hold => {
                            if let Some(c) = self.channels.get_mut(&h.channel) {
                                c.held = Some(f);
                                self.fresh_holds.push(h.channel);
                            }
                            None
                        }
                        Step::Release => {
                            if let Some(held) = self
                                .channels
                                .get_mut(&h.channel)
                                .and_then(|c| c.held.take())
                            {
                                to_backend.push(held);
                            }
                            to_backend.push(f);
                            None
                        }
                        Step::Replace(b) => {
                            to_backend.push(b);
                            None
                        }
                        Step::UpdateSecret(token) => {
                            self.pause = Some(Pause::Secret);
                            Some(ClientEvent::UpdateSecret(token))
                        }
                        _ => None, // Drop
                    }
                }
            };
            if !own_b.is_empty() {
                flush(input, &mut span, to_backend);
                to_backend.append(&mut own_b);
            }
            to_client.append(&mut own_c);
            if let Some(ev) = event {
                break Ok(ev);
            }
        };
        flush(input, &mut span, to_backend);
        // A publish still held at the end of a read waits for a later one: its few
        // hundred bytes are copied out of the read buffer, which it would otherwise keep
        // alive whole. Publishes released within the read (the usual case) are not copied.
        for ch in self.fresh_holds.drain(..) {
            if let Some(held) = self.channels.get_mut(&ch).and_then(|c| c.held.as_mut()) {
                *held = BytesMut::from(&held[..]);
            }
        }
        result
    }

    /// Processes backend bytes, forwarding to `to_client`.
    pub fn on_backend_input(
        &mut self,
        input: &mut BytesMut,
        to_client: &mut Outbox,
    ) -> Result<(), SessionError> {
        let mut span = 0;
        // Frames the gateway writes to the client while handling a broker frame go after
        // the broker's frames before it.
        let mut own_c = Outbox::default();
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
            // Content headers are never split by RabbitMQ, whatever the client's frame_max
            // (a message published over a connection with a larger one): streamed, with no
            // size limit. Everything else is held to frame_max, which bounds our buffer.
            if h.frame_type == frame::BODY || h.frame_type == frame::HEADER {
                if let Err(e @ FrameError::BadType(_)) = frame::check_header(&h, self.frame_max) {
                    break Err(SessionError::BackendFrame(e));
                }
                if h.frame_type == frame::BODY
                    && let Err(e) = frame::check_header(&h, self.frame_max)
                {
                    break Err(SessionError::BackendFrame(e));
                }
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
            if let Err(e) = frame::check_header(&h, self.frame_max) {
                break Err(SessionError::BackendFrame(e));
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
            match self.backend_frame(&h, &input[span..end], &mut own_c) {
                BackendStep::Forward => span = end,
                step => {
                    flush(input, &mut span, to_client);
                    input.advance(h.wire_len());
                    if let BackendStep::Replace(b) = step {
                        to_client.push(b);
                    }
                }
            }
            if !own_c.is_empty() {
                flush(input, &mut span, to_client);
                to_client.append(&mut own_c);
            }
        };
        flush(input, &mut span, to_client);
        self.resume();
        result
    }

    /// Ends a pause whose reason the broker's frames have removed.
    fn resume(&mut self) {
        let over = match self.pause {
            Some(Pause::ServerName(ch)) => self.channels.get(&ch).is_none_or(|c| {
                c.state != State::Open || !matches!(c.last_queue, LastQueue::ServerNamed { .. })
            }),
            Some(Pause::Reopen(ch)) => self.channels.get(&ch).is_none_or(|c| c.finished()),
            Some(Pause::Pending) => self.pending < self.limits.pending_replies,
            Some(Pause::Declared(ch)) => self
                .channels
                .get(&ch)
                .is_none_or(|c| c.state != State::Open || c.exchange_oks.entries() == 0),
            _ => false,
        };
        if over {
            self.pause = None;
        }
    }

    fn client_frame_error(&mut self, e: FrameError, to_client: &mut Outbox) -> SessionError {
        let text = format!("FRAME_ERROR - {e}");
        to_client.frame(|b| method::connection_close(b, reply::FRAME_ERROR, &text, 0, 0));
        SessionError::ClientFrame(e)
    }

    /// Whether a `basic.publish` on `ch` is held for its content header.
    fn publish_held(&self, ch: u16) -> bool {
        !self.connection_over() && self.channels.get(&ch).is_some_and(|c| c.held.is_some())
    }

    /// The connection is closing: client frames no longer reach the broker.
    fn connection_over(&self) -> bool {
        self.closing || self.client_closed || self.broker_closed
    }

    fn client_frames_forwarded(&self, ch: u16) -> bool {
        !self.connection_over()
            && self
                .channels
                .get(&ch)
                .is_none_or(|c| c.state.forwards_client())
    }

    fn backend_frames_forwarded(&self, ch: u16) -> bool {
        !self.closing
            && self
                .channels
                .get(&ch)
                .is_none_or(|c| c.state != State::ClientClosing && !c.dropping)
    }

    /// Anything but the content header after a `basic.publish` is a connection error at
    /// RabbitMQ (`rabbit_command_assembler`). The gateway holds the publish, so it must
    /// answer itself: forwarding would show the broker another sequence. `class` is the
    /// class of a content header of the wrong class.
    fn unexpected_frame(
        &mut self,
        class: Option<u16>,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        let text = match class {
            Some(c) => format!(
                "UNEXPECTED_FRAME - expected content header for class 60, got one for class {c} instead"
            ),
            None => "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead".to_owned(),
        };
        self.close_both_with(
            reply::UNEXPECTED_FRAME,
            &text,
            id::BASIC_PUBLISH,
            to_client,
            to_backend,
        );
    }

    /// A method the broker would not decode: RabbitMQ's connection error.
    fn malformed(
        &mut self,
        ids: (u16, u16),
        payload: &[u8],
        e: MethodError,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) -> Step {
        let (code, text) = e.close(payload.get(4..).unwrap_or_default());
        self.close_both_with(code, &text, ids, to_client, to_backend);
        Step::Drop
    }

    /// Decides what to do with one complete client frame (not a body frame).
    fn client_frame(
        &mut self,
        h: &FrameHeader,
        f: &[u8],
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Step {
        let ch = h.channel;
        let payload = frame::payload(f, h);
        if self.connection_over() {
            // Only the client's close-ok matters now.
            if ch == 0
                && h.frame_type == frame::METHOD
                && method::ids(payload) == Some(id::CONNECTION_CLOSE_OK)
            {
                self.close_acknowledged = true;
                // Answers the broker's close; the gateway's own close needs no answer.
                if self.broker_closed && !self.closing {
                    return Step::Forward;
                }
            }
            return Step::Drop;
        }
        if self.relay_only {
            if ch == 0
                && h.frame_type == frame::METHOD
                && method::ids(payload) == Some(id::CONNECTION_CLOSE)
            {
                self.connection_closing = true;
                self.client_closed = true;
            }
            return Step::Forward;
        }
        match h.frame_type {
            frame::HEADER => return self.client_content_header(ch, payload, to_backend, to_client),
            frame::METHOD => {}
            // Heartbeats; one on a data channel is the broker's 505 to give.
            _ => return Step::Forward,
        }
        if self.publish_held(ch) {
            self.unexpected_frame(None, to_client, to_backend);
            return Step::Drop;
        }
        let Some(ids) = method::ids(payload) else {
            return Step::Forward; // too short to be a method: the broker's frame error
        };
        let m = match ClientMethod::decode(payload) {
            Ok(m) => m,
            Err(e) => return self.malformed(ids, payload, e, to_client, to_backend),
        };
        if ch == 0 {
            return self.channel_zero(m);
        }
        let Some(phase) = self.channels.get(&ch).map(|c| c.state.phase()) else {
            return self.unopened_channel(ch, &m, to_client, to_backend);
        };
        match phase {
            Phase::Open => self.open_channel(ch, ids, m, to_backend, to_client),
            Phase::Refusing => {
                let c = self.channel(ch);
                let State::Refusing { close_ok_seen, .. } = &mut c.state else {
                    return Step::Drop;
                };
                match m {
                    ClientMethod::ChannelCloseOk => {
                        *close_ok_seen = true;
                        return Step::Drop;
                    }
                    // Closed on both sides as RabbitMQ sees it: the reopen waits until the
                    // broker has answered the gateway's close.
                    ClientMethod::ChannelOpen if *close_ok_seen => {
                        return Step::Pause(Pause::Reopen(ch));
                    }
                    // The broker's channel is closing (the gateway's close went first): it
                    // answers with its own 504, after the earlier methods.
                    ClientMethod::ChannelOpen => return Step::Forward,
                    _ => {}
                }
                let owed = match m {
                    ClientMethod::ChannelClose => Some(Owed::CloseOk),
                    _ if names_empty_queue(&m) => Some(Owed::EmptyName(ids)),
                    _ => None,
                };
                let c = self.channel(ch);
                if let Some(o) = owed
                    && c.deferred.len() < MAX_OWED
                {
                    c.deferred.push(o);
                }
                Step::Drop
            }
            Phase::ClientClosing => {
                match m {
                    // RabbitMQ's closing channel: a hard error. The broker's channel is
                    // gone, so the gateway gives it.
                    ClientMethod::ChannelOpen => {
                        self.close_both_with(
                            reply::CHANNEL_ERROR,
                            SECOND_OPEN_TEXT,
                            id::CHANNEL_OPEN,
                            to_client,
                            to_backend,
                        );
                    }
                    ClientMethod::ChannelCloseOk => {
                        self.channel(ch).state = State::Closed;
                        self.forget_if_finished(ch);
                    }
                    // Both sides closing at once: answer as RabbitMQ does, keep waiting.
                    ClientMethod::ChannelClose => {
                        to_client.frame(|b| method::channel_close_ok(b, ch))
                    }
                    _ if names_empty_queue(&m) && self.no_queue_declared(ch) => {
                        to_client.frame(|b| {
                            method::channel_close(
                                b,
                                ch,
                                reply::NOT_FOUND,
                                NO_QUEUE_TEXT,
                                ids.0,
                                ids.1,
                            )
                        })
                    }
                    _ => {}
                }
                Step::Drop
            }
            Phase::BrokerClosing => match m {
                ClientMethod::ChannelCloseOk => {
                    self.channel(ch).state = State::Closed;
                    self.forget_if_finished(ch);
                    Step::Forward
                }
                // RabbitMQ's closing channel answers a second open with a 504 (an open
                // channel would too).
                ClientMethod::ChannelOpen => Step::Forward,
                // It answers close with close-ok, and still expands `""` (a second
                // channel.close): the gateway answers in its place, after the broker's
                // answers to what was forwarded before.
                ClientMethod::ChannelClose => {
                    self.defer(ch, Owed::CloseOk, to_backend);
                    Step::Drop
                }
                _ if names_empty_queue(&m) && self.no_queue_declared(ch) => {
                    self.defer(ch, Owed::EmptyName(ids), to_backend);
                    Step::Drop
                }
                // The broker would discard the rest; the gateway does not pass it on
                // unchecked, in case that close was not this channel's (RabbitMQ can send
                // a previous incarnation's second close after a reopen).
                _ => Step::Drop,
            },
            Phase::ClientClosed => match m {
                // The broker may already have let the channel go: a reopen must wait for
                // its close-ok, or what follows would not be checked.
                ClientMethod::ChannelOpen => Step::Pause(Pause::Reopen(ch)),
                // A close-ok for no close of this channel's (the client took a previous
                // incarnation's late second close for it): the broker must not see it, or
                // it may never answer the client's close and the reopen would wait for
                // ever. One for the broker's own crossing close goes through.
                ClientMethod::ChannelCloseOk if !self.channel(ch).broker_close_relayed => {
                    Step::Drop
                }
                _ => Step::Forward,
            },
            Phase::Closed => self.unopened_channel(ch, &m, to_client, to_backend),
        }
    }

    /// A method on a channel that is not open (no entry, or closed by both sides with
    /// close-oks still owed by the broker).
    fn unopened_channel(
        &mut self,
        ch: u16,
        m: &ClientMethod<'_>,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) -> Step {
        if *m != ClientMethod::ChannelOpen {
            // The broker has no such channel: it refuses the method itself (504), so no
            // check is needed.
            return Step::Forward;
        }
        match self.channels.get(&ch) {
            Some(c) if c.owed_close_oks > 0 => return Step::Pause(Pause::Reopen(ch)),
            Some(_) => {}
            None if self.channels.len() >= self.channel_max => {
                // RabbitMQ's `create_channel`: a connection error.
                let text = format!(
                    "NOT_ALLOWED - number of channels opened ({}) has reached the negotiated channel_max ({})",
                    self.channels.len(),
                    self.channel_max
                );
                self.close_both_with(reply::NOT_ALLOWED, &text, (0, 0), to_client, to_backend);
                return Step::Drop;
            }
            None => {}
        }
        self.channels.insert(ch, Box::new(Channel::open()));
        Step::Forward
    }

    /// Channel 0: the connection's own methods.
    fn channel_zero(&mut self, m: ClientMethod<'_>) -> Step {
        match m {
            ClientMethod::ConnectionClose => {
                self.connection_closing = true;
                self.client_closed = true;
                Step::Forward
            }
            ClientMethod::ConnectionCloseOk => {
                // Unsolicited (no close was sent): the broker's to judge.
                Step::Forward
            }
            ClientMethod::UpdateSecret { secret } => {
                Step::UpdateSecret(String::from_utf8_lossy(secret).into_owned())
            }
            _ => Step::Forward,
        }
    }

    /// No queue was declared on the channel as the gateway followed it (exact while every
    /// method the client sent before succeeded).
    fn no_queue_declared(&self, ch: u16) -> bool {
        self.channels
            .get(&ch)
            .is_some_and(|c| c.last_queue == LastQueue::None)
    }

    /// The queue a method names: `""` is the channel's most recently declared queue.
    fn resolve(&self, ch: u16, name: &str) -> Resolved {
        if !name.is_empty() {
            return Resolved::Name(name.into());
        }
        match self.channels.get(&ch).map(|c| &c.last_queue) {
            Some(LastQueue::Named(q)) => Resolved::Name(q.clone()),
            Some(LastQueue::ServerNamed { .. }) => Resolved::Wait,
            _ => Resolved::NoQueue,
        }
    }

    fn context(&self) -> Context<'_> {
        Context {
            vhost: &self.vhost,
            username: &self.username,
            now: self.now,
        }
    }

    /// The broker policies changed (a reload): decisions from now on use `binding`, and
    /// consumers it no longer lets read their queue are cancelled, as after update-secret.
    pub fn policies_changed(
        &mut self,
        binding: Option<Arc<crate::authz::iam::Binding>>,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        if self.relay_only || self.closing || self.connection_closing {
            return;
        }
        self.permissions = self.permissions.rebound(binding);
        if authz::connect(&self.permissions, &self.vhost, self.now).is_err() {
            // The vhost itself is now refused: the connection ends, as after an
            // update-secret whose token may not use the vhost.
            let text = format!(
                "NOT_ALLOWED - access to vhost '{}' refused for user '{}'",
                self.vhost, self.username
            );
            self.close_both_with(reply::NOT_ALLOWED, &text, (0, 0), to_client, to_backend);
            return;
        }
        self.cancel_unreadable_consumers(to_client, to_backend);
    }

    /// The time, in seconds since the epoch, for the decisions that follow (this module
    /// has no clock; the relay sets it before handing over input).
    pub fn set_clock(&mut self, now: i64) {
        self.now = now;
    }

    /// Whether decisions read the time: only broker policies do, so a session without
    /// them needs no clock reading per input.
    pub fn wants_clock(&self) -> bool {
        self.permissions.policy().is_some()
    }

    /// Decides `op`, the arguments of method `ids` on channel `ch`. On a refusal, the
    /// channel is closed (toward the broker now, the client later) and `None` returned.
    fn check(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        op: &Operation<'_>,
        named_empty: bool,
        to_backend: &mut Outbox,
    ) -> Result<(), Step> {
        let verdict = self.decide(op, ids);
        self.exchanges.decided();
        match verdict {
            Verdict::Permit => Ok(()),
            Verdict::Deny(d) => {
                self.refuse(ch, d, named_empty.then_some(ids), to_backend);
                Err(Step::Drop)
            }
            Verdict::NeedKind => Err(self.need_kind(
                ch,
                match *op {
                    Operation::ExchangeBind { source, .. } => strip_cr_lf(source).into_owned(),
                    Operation::QueueBind { exchange, .. } => strip_cr_lf(exchange).into_owned(),
                    Operation::BasicPublish { exchange, .. } => strip_cr_lf(exchange).into_owned(),
                    _ => String::new(),
                },
            )),
        }
    }

    /// A method on an open channel: the one table from method to operation.
    fn open_channel(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        m: ClientMethod<'_>,
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Step {
        macro_rules! resolve {
            ($name:expr) => {
                match self.resolve(ch, $name) {
                    Resolved::Name(q) => q,
                    // RabbitMQ: 404 "no previously declared queue"; nothing to check.
                    Resolved::NoQueue => return Step::Forward,
                    Resolved::Wait => return Step::Pause(Pause::ServerName(ch)),
                }
            };
        }
        macro_rules! check {
            ($op:expr) => {
                check!($op, false)
            };
            ($op:expr, $named_empty:expr) => {
                if let Err(step) = self.check(ch, ids, &$op, $named_empty, to_backend) {
                    return step;
                }
            };
        }
        match m {
            ClientMethod::ChannelClose => {
                let c = self.channel(ch);
                c.state = State::ClientClosed;
                let consumers = c.close_by_client();
                self.consumers -= consumers;
                Step::Forward
            }
            ClientMethod::ExchangeDeclare(d) => {
                let learns = !d.passive && !d.nowait;
                if learns && self.pending >= self.limits.pending_replies {
                    return Step::Pause(Pause::Pending);
                }
                let alternate_exchange = if d.passive {
                    None
                } else {
                    d.arguments
                        .get("alternate-exchange")
                        .and_then(|v| v.long_str())
                };
                check!(Operation::ExchangeDeclare {
                    exchange: d.exchange,
                    passive: d.passive,
                    alternate_exchange,
                });
                let name = strip_cr_lf(d.exchange);
                if d.passive {
                    if !d.nowait {
                        self.channel(ch).exchange_oks.skip();
                    }
                } else {
                    let epoch = self.exchanges.declaring(&name);
                    if !d.nowait {
                        self.channel(ch).exchange_oks.push(ExchangeOk {
                            name: name.into(),
                            kind: kind_of(d.kind),
                            epoch,
                        });
                        self.pending += 1;
                    }
                }
                Step::Forward
            }
            ClientMethod::ExchangeDelete { exchange } => {
                check!(Operation::ExchangeDelete { exchange });
                self.exchanges.changing(&strip_cr_lf(exchange));
                Step::Forward
            }
            ClientMethod::ExchangeBind {
                destination,
                source,
                routing_key,
                unbind,
            } => {
                let source_kind = self.exchanges.kind(&strip_cr_lf(source));
                check!(Operation::ExchangeBind {
                    destination,
                    source,
                    routing_key,
                    source_kind,
                    unbind,
                });
                Step::Forward
            }
            ClientMethod::QueueDeclare(d) => self.queue_declare(ch, ids, d, to_backend),
            ClientMethod::QueueBind {
                queue,
                exchange,
                routing_key,
                unbind,
            } => {
                let q = resolve!(queue);
                // RabbitMQ's routing-key shortcut: `""` queue and `""` key bind with the
                // queue's name as the key.
                let routing_key: &str = if queue.is_empty() && routing_key.is_empty() {
                    &q
                } else {
                    routing_key
                };
                let exchange_kind = self.exchanges.kind(&strip_cr_lf(exchange));
                check!(
                    Operation::QueueBind {
                        queue: &q,
                        exchange,
                        routing_key,
                        exchange_kind,
                        unbind,
                    },
                    queue.is_empty()
                );
                Step::Forward
            }
            ClientMethod::QueuePurge { queue } => {
                let q = resolve!(queue);
                check!(Operation::QueuePurge { queue: &q }, queue.is_empty());
                Step::Forward
            }
            ClientMethod::QueueDelete { queue } => {
                let q = resolve!(queue);
                check!(Operation::QueueDelete { queue: &q }, queue.is_empty());
                Step::Forward
            }
            ClientMethod::BasicGet { queue } => {
                let q = resolve!(queue);
                check!(Operation::BasicGet { queue: &q }, queue.is_empty());
                Step::Forward
            }
            ClientMethod::BasicConsume(c) => {
                let q = resolve!(c.queue);
                self.basic_consume(ch, ids, c, q, to_backend, to_client)
            }
            ClientMethod::BasicCancel { consumer_tag } => {
                if self.channel(ch).consumers.remove(consumer_tag).is_some() {
                    self.consumers -= 1;
                }
                Step::Forward
            }
            ClientMethod::BasicPublish(p) if p.immediate => {
                // RabbitMQ refuses it (540) before any check, once the content is in.
                Step::Forward
            }
            ClientMethod::BasicPublish(_) => Step::Hold,
            // channel.open on an open channel (the broker's 504), close-ok without a close,
            // connection methods on a data channel, and every method without authorisation.
            _ => Step::Forward,
        }
    }

    fn channel(&mut self, ch: u16) -> &mut Channel {
        self.channels
            .entry(ch)
            .or_insert_with(|| Box::new(Channel::open()))
    }

    fn queue_declare(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        d: method::QueueDeclare<'_>,
        to_backend: &mut Outbox,
    ) -> Step {
        let name = strip_cr_lf(d.queue);
        // Direct reply-to: no checks (RabbitMQ answers exists / not found); the name is
        // still the most recently declared queue.
        let server_named = !d.passive && name.is_empty() && !d.queue.starts_with(REPLY_TO);
        if (server_named || d.nowait) && self.pending >= self.limits.pending_replies {
            return Step::Pause(Pause::Pending);
        }
        if d.queue.starts_with(REPLY_TO) {
            self.channel(ch).last_queue = LastQueue::Named(name.into());
            return self.expect_queue_ok(ch, d);
        }
        let probe = if server_named {
            Cow::Owned(self.server_name_probe(ch))
        } else {
            Cow::Borrowed(&*name)
        };
        let dead_letter_exchange = if d.passive {
            None
        } else {
            d.arguments
                .get("x-dead-letter-exchange")
                .and_then(|v| v.long_str())
        };
        let op = Operation::QueueDeclare {
            queue: &probe,
            passive: d.passive,
            server_named,
            dead_letter_exchange,
        };
        if let Err(step) = self.check(ch, ids, &op, false, to_backend) {
            return step;
        }
        if server_named {
            // Never 0: that is a named declare's.
            self.next_seq = self.next_seq.wrapping_add(1).max(1);
            let seq = self.next_seq;
            let c = self.channel(ch);
            c.last_queue = LastQueue::ServerNamed { seq };
            c.queue_oks.push(QueueOk {
                seq,
                hide: d.nowait,
            });
            self.pending += 1;
            // The name comes only with declare-ok: ask for it, keep it from the client.
            if d.nowait {
                return Step::ForwardWaiting(d.bits_at);
            }
        } else {
            self.channel(ch).last_queue = LastQueue::Named(name.into());
            return self.expect_queue_ok(ch, d);
        }
        Step::Forward
    }

    /// A named `queue.declare` goes on: its `declare-ok` is read (to know whether it set
    /// RabbitMQ's most recently declared queue). One sent with `nowait` is sent without,
    /// and its `declare-ok` kept from the client.
    fn expect_queue_ok(&mut self, ch: u16, d: method::QueueDeclare<'_>) -> Step {
        let c = self.channel(ch);
        if d.nowait {
            c.queue_oks.push(QueueOk { seq: 0, hide: true });
            self.pending += 1;
            Step::ForwardWaiting(d.bits_at)
        } else {
            c.queue_oks.skip();
            Step::Forward
        }
    }

    fn basic_consume(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        c: method::BasicConsume<'_>,
        queue: Box<str>,
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Step {
        // The direct reply-to pseudo queue needs no permission and is not a consumer the
        // broker lists (RabbitMQ keeps it apart).
        if &*queue == REPLY_TO {
            return Step::Forward;
        }
        let (on_channel, tag_taken) = {
            let chan = self.channel(ch);
            (
                chan.consumers.len(),
                !c.consumer_tag.is_empty() && chan.consumers.contains_key(c.consumer_tag),
            )
        };
        // RabbitMQ checks these before the permission, as connection errors.
        let refusal = if tag_taken {
            Some(format!(
                "NOT_ALLOWED - attempt to reuse consumer tag '{}'",
                c.consumer_tag
            ))
        } else if on_channel >= self.limits.consumers_per_channel {
            Some(format!(
                "NOT_ALLOWED - reached maximum ({}) of consumers per channel",
                self.limits.consumers_per_channel
            ))
        } else if self.consumers >= self.limits.consumers_per_connection {
            Some(format!(
                "NOT_ALLOWED - reached maximum ({}) of consumers per connection",
                self.limits.consumers_per_connection
            ))
        } else {
            None
        };
        if let Some(text) = refusal {
            self.close_both_with(reply::NOT_ALLOWED, &text, ids, to_client, to_backend);
            return Step::Drop;
        }
        let op = Operation::BasicConsume { queue: &queue };
        if let Err(step) = self.check(ch, ids, &op, c.queue.is_empty(), to_backend) {
            return step;
        }
        let (tag, step) = if c.consumer_tag.is_empty() {
            // The broker would name it and tell only a client that waits: the gateway
            // names it, in RabbitMQ's form, so it can cancel it when the token changes.
            let tag = self.consumer_tag();
            let mut b = BytesMut::new();
            method::basic_consume_with_tag(&mut b, ch, &c, &tag);
            (tag, Step::Replace(b))
        } else {
            (c.consumer_tag.to_owned(), Step::Forward)
        };
        let state = if c.nowait {
            ConsumerState::Live
        } else {
            ConsumerState::Awaiting
        };
        self.channel(ch).consumers.insert(
            tag.into(),
            Consumer {
                queue: Arc::from(&*queue),
                state,
                no_ack: c.bits & NO_ACK_BIT != 0,
            },
        );
        self.consumers += 1;
        step
    }

    /// The content header of a publish (or of anything else, which the broker judges).
    fn client_content_header(
        &mut self,
        ch: u16,
        payload: &[u8],
        to_backend: &mut Outbox,
        to_client: &mut Outbox,
    ) -> Step {
        let Some(c) = self.channels.get(&ch) else {
            return Step::Forward;
        };
        if !c.state.forwards_client() {
            return Step::Drop;
        }
        let Some(held) = c.held.as_ref() else {
            return Step::Forward;
        };
        let header = match ContentHeader::parse(payload) {
            Some(h) if h.class_id == 60 && h.weight == 0 => h,
            Some(h) if h.weight == 0 => {
                self.unexpected_frame(Some(h.class_id), to_client, to_backend);
                return Step::Drop;
            }
            _ => {
                self.unexpected_frame(None, to_client, to_backend);
                return Step::Drop;
            }
        };
        let Ok(props) = PublishProps::parse(header.properties) else {
            self.close_both_with(
                reply::SYNTAX_ERROR,
                "SYNTAX_ERROR - malformed content header properties",
                id::BASIC_PUBLISH,
                to_client,
                to_backend,
            );
            return Step::Drop;
        };
        // Parsed when it was held; the bytes are the same.
        let Ok(p) = PublishRef::parse(
            held.get(frame::HEADER_LEN..held.len() - 1)
                .unwrap_or_default(),
        ) else {
            return Step::Drop;
        };
        let extra = props.extra_routing_keys();
        let op = Operation::BasicPublish {
            exchange: p.exchange,
            routing_key: p.routing_key,
            exchange_kind: self.exchanges.kind(&strip_cr_lf(p.exchange)),
            user_id: props.user_id,
            extra_routing_keys: &extra,
        };
        let verdict = self.decide(&op, id::BASIC_PUBLISH);
        let exchange = p.exchange.to_owned();
        self.exchanges.decided();
        match verdict {
            Verdict::Permit => Step::Release,
            Verdict::Deny(d) => {
                self.refuse(ch, d, None, to_backend);
                Step::Drop
            }
            Verdict::NeedKind => self.need_kind(ch, strip_cr_lf(&exchange).into_owned()),
        }
    }

    /// The decision needs exchange `name`'s type: from its declare pending on this
    /// channel, or else from a lookup.
    fn need_kind(&self, ch: u16, name: String) -> Step {
        let declared_here = self
            .channels
            .get(&ch)
            .is_some_and(|c| c.exchange_oks.any(|ok| *ok.name == *name));
        if declared_here {
            Step::Pause(Pause::Declared(ch))
        } else {
            Step::Lookup(name)
        }
    }

    /// Refuses a method on open channel `ch`: the broker's channel is closed now, the
    /// client is told when the broker has answered (see [`State::Refusing`]).
    /// `refused_empty`: the method's ids when it named the queue `""`.
    fn refuse(
        &mut self,
        ch: u16,
        d: Denial,
        refused_empty: Option<(u16, u16)>,
        to_backend: &mut Outbox,
    ) {
        self.denials.push(d.clone());
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
        self.owed_close_oks += 1;
        let c = self.channel(ch);
        c.owed_close_oks += 1;
        c.held = None;
        c.state = State::Refusing {
            denial: d,
            refused_empty,
            close_ok_seen: false,
        };
    }

    /// An answer for a frame dropped on channel `ch`, whose broker channel is closing:
    /// given once the broker has answered a close from the gateway, sent now if none is
    /// on its way. RabbitMQ's closing channel answers that close with close-ok after
    /// everything forwarded before it; should the channel not be closing after all (a
    /// previous incarnation's late error), the close ends it, and nothing is forwarded
    /// unchecked either way.
    fn defer(&mut self, ch: u16, o: Owed, to_backend: &mut Outbox) {
        let c = self.channel(ch);
        if c.owed_close_oks == 0 {
            to_backend.frame(|b| {
                method::channel_close(
                    b,
                    ch,
                    reply::REPLY_SUCCESS,
                    "gateway: channel closed after a broker error",
                    0,
                    0,
                )
            });
            c.owed_close_oks = 1;
            self.owed_close_oks += 1;
        }
        let c = self.channel(ch);
        if c.deferred.len() < MAX_OWED {
            c.deferred.push(o);
        }
    }

    /// The broker answered a close from the gateway on `ch`, which is closing (by the
    /// broker or by both sides): the answers deferred until then are due.
    fn gateway_close_answered(&mut self, ch: u16, to_client: &mut Outbox) {
        self.close_ok_came(ch);
        let c = self.channel(ch);
        if c.owed_close_oks == 0 && !c.deferred.is_empty() {
            let deferred = std::mem::take(&mut c.deferred);
            let no_queue = c.last_queue == LastQueue::None;
            write_owed(to_client, ch, &deferred, no_queue);
        }
        self.forget_if_finished(ch);
    }

    /// The broker ends the connection while refusals wait for its close-ok: the methods
    /// were refused all the same, and the client is told before the connection closes
    /// (RabbitMQ's channels report their errors while its reader closes the connection).
    fn tell_pending_refusals(&mut self, to_client: &mut Outbox) {
        let mut refusing: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Refusing { .. }))
            .map(|(&ch, _)| ch)
            .collect();
        refusing.sort_unstable();
        for ch in refusing {
            let c = self.channel(ch);
            let State::Refusing { denial, .. } =
                std::mem::replace(&mut c.state, State::ClientClosing)
            else {
                continue;
            };
            to_client.frame(|b| {
                method::channel_close(
                    b,
                    ch,
                    denial.reply_code,
                    &denial.reply_text,
                    denial.class_id,
                    denial.method_id,
                )
            });
        }
    }

    /// The broker answered one of the gateway's own closes on `ch` (if one was owed).
    fn close_ok_came(&mut self, ch: u16) {
        if let Some(c) = self.channels.get_mut(&ch)
            && c.owed_close_oks > 0
        {
            c.owed_close_oks -= 1;
            self.owed_close_oks = self.owed_close_oks.saturating_sub(1);
        }
    }

    fn forget_if_finished(&mut self, ch: u16) {
        if self.channels.get(&ch).is_some_and(|c| c.finished()) {
            self.channels.remove(&ch);
        }
    }

    /// The channel's data is gone with it: consumers and awaited replies.
    fn clear_channel(&mut self, ch: u16) {
        if let Some(c) = self.channels.get_mut(&ch) {
            let (consumers, pending) = c.clear();
            self.consumers -= consumers;
            self.pending -= pending;
        }
    }

    /// Handles one complete backend method frame (content is streamed elsewhere).
    fn backend_frame(&mut self, h: &FrameHeader, f: &[u8], to_client: &mut Outbox) -> BackendStep {
        if self.closing {
            return BackendStep::Drop; // the gateway closed both sides
        }
        let ch = h.channel;
        let payload = frame::payload(f, h);
        let ids = if h.frame_type == frame::METHOD {
            method::ids(payload)
        } else {
            None
        };
        if ch == 0 {
            if ids == Some(id::CONNECTION_CLOSE) {
                // The broker ends the connection itself: its close reaches the client, and
                // the gateway adds no "connection lost" of its own when the socket then
                // closes, but waits for the client's close-ok like a broker would.
                self.connection_closing = true;
                self.broker_closed = true;
                self.tell_pending_refusals(to_client);
                let step = self.hide_service_user(0, payload);
                if to_client.is_empty() {
                    return step;
                }
                let close = match step {
                    BackendStep::Replace(b) => b,
                    _ => BytesMut::from(payload_frame(0, payload).as_slice()),
                };
                to_client.push(close);
                return BackendStep::Drop;
            }
            match ids {
                Some(id::CONNECTION_BLOCKED) => self.broker_blocked = true,
                Some(id::CONNECTION_UNBLOCKED) => self.broker_blocked = false,
                _ => {}
            }
            return BackendStep::Forward;
        }
        let Some(ids) = ids else {
            return BackendStep::Forward;
        };
        let Some(c) = self.channels.get_mut(&ch) else {
            return BackendStep::Forward;
        };
        if c.awaiting_open_ok {
            if ids == id::CHANNEL_OPEN_OK {
                c.awaiting_open_ok = false;
            } else if ids == id::CHANNEL_CLOSE {
                // The previous incarnation's: it changes nothing in this one.
                return self.hide_service_user(ch, payload);
            } else if ids == id::CHANNEL_CLOSE_OK {
                // The previous incarnation's too: the broker answers every method in order,
                // so nothing of this one comes before its open-ok. No path forwards a
                // client's close that could leave one outstanding across a reopen (the
                // gateway answers closes on a closing channel itself and holds reopens
                // for its own); should one come anyway, it must not end a refusal here.
                return BackendStep::Forward;
            }
        }
        // Any method ends the content of a delivery being dropped.
        c.dropping = false;
        if !c.revoked.is_empty()
            && matches!(
                c.state.phase(),
                Phase::Open | Phase::Refusing | Phase::ClientClosed
            )
            && let Some(step) = self.revoked_consumer_frame(ch, ids, payload)
        {
            return step;
        }
        let Some(c) = self.channels.get_mut(&ch) else {
            return BackendStep::Forward;
        };
        match c.state.phase() {
            Phase::Open | Phase::Refusing => self.backend_reply(ch, ids, payload, to_client),
            Phase::ClientClosing => {
                if ids == id::CHANNEL_CLOSE_OK {
                    self.close_ok_came(ch);
                }
                // The client must see nothing more on a channel the gateway closed.
                BackendStep::Drop
            }
            Phase::BrokerClosing => {
                if ids == id::CHANNEL_CLOSE_OK && c.owed_close_oks > 0 {
                    // The broker's answer to the gateway's own close.
                    self.gateway_close_answered(ch, to_client);
                    return BackendStep::Drop;
                }
                if ids == id::CHANNEL_CLOSE {
                    return self.hide_service_user(ch, payload);
                }
                BackendStep::Forward
            }
            Phase::ClientClosed => {
                if ids == id::CHANNEL_CLOSE_OK {
                    c.state = State::Closed;
                    self.clear_channel(ch);
                    self.forget_if_finished(ch);
                } else if ids == id::CHANNEL_CLOSE {
                    c.broker_close_relayed = true;
                    self.clear_channel(ch);
                    return self.hide_service_user(ch, payload);
                } else if matches!(
                    ids,
                    id::BASIC_CONSUME_OK | id::QUEUE_DECLARE_OK | id::EXCHANGE_DECLARE_OK
                ) {
                    // Answers to methods before the client's close: read as on an open
                    // channel (a hidden `declare-ok` stays hidden).
                    return self.backend_reply(ch, ids, payload, to_client);
                }
                BackendStep::Forward
            }
            Phase::Closed => {
                if ids == id::CHANNEL_CLOSE_OK && c.owed_close_oks > 0 {
                    self.gateway_close_answered(ch, to_client);
                    return BackendStep::Drop;
                }
                BackendStep::Forward
            }
        }
    }

    /// A broker method on a channel that is open (or being refused: replies to methods
    /// before the refused one still reach the client).
    fn backend_reply(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        payload: &[u8],
        to_client: &mut Outbox,
    ) -> BackendStep {
        let Some(c) = self.channels.get_mut(&ch) else {
            return BackendStep::Forward;
        };
        match ids {
            id::CHANNEL_CLOSE => {
                // An error on the channel. If the gateway was refusing a later method, the
                // broker's error wins and the refusal is never sent; what its closing
                // channel would have answered to the frames dropped since follows.
                let (refused_empty, close_ok_seen) =
                    match std::mem::replace(&mut c.state, State::BrokerClosing) {
                        State::Refusing {
                            refused_empty,
                            close_ok_seen,
                            ..
                        } => (refused_empty, close_ok_seen),
                        _ => (None, false),
                    };
                if close_ok_seen {
                    // The client has answered already (see `State::Refusing`): the
                    // broker's close gets that answer, and the channel is closed on both
                    // sides but for the gateway's own close.
                    c.state = State::Closed;
                    self.backend_later
                        .frame(|b| method::channel_close_ok(b, ch));
                }
                // The declares without their declare-ok failed or came after the error:
                // RabbitMQ's most recently declared queue is empty unless one succeeded.
                let no_queue = !c.declared_ok;
                if no_queue {
                    c.last_queue = LastQueue::None;
                }
                // Never sent: the broker has nothing of it to discard.
                c.held = None;
                // The gateway's close is on its way: the answers owed (the refused
                // method's first) are given when it is answered, after the broker's own
                // to methods before the refused one.
                if let Some(ids) = refused_empty {
                    c.deferred.insert(0, Owed::EmptyName(ids));
                    c.deferred.truncate(MAX_OWED);
                }
                self.clear_channel(ch);
                self.hide_service_user(ch, payload)
            }
            id::CHANNEL_CLOSE_OK if matches!(c.state, State::Refusing { .. }) => {
                let State::Refusing {
                    denial,
                    close_ok_seen,
                    ..
                } = std::mem::replace(&mut c.state, State::ClientClosing)
                else {
                    return BackendStep::Forward;
                };
                // Everything the client sent before the refused method succeeded: the
                // channel's most recently declared queue is the gateway's.
                let no_queue = c.last_queue == LastQueue::None;
                // The broker has processed everything before the refused method: now the
                // client is told.
                if c.owed_close_oks > 0 {
                    c.owed_close_oks -= 1;
                    self.owed_close_oks = self.owed_close_oks.saturating_sub(1);
                }
                to_client.frame(|b| {
                    method::channel_close(
                        b,
                        ch,
                        denial.reply_code,
                        &denial.reply_text,
                        denial.class_id,
                        denial.method_id,
                    )
                });
                let owed = std::mem::take(&mut c.deferred);
                write_owed(to_client, ch, &owed, no_queue);
                if close_ok_seen {
                    // Its close-ok came first: the channel is over (a held reopen goes on).
                    c.state = State::Closed;
                }
                self.clear_channel(ch);
                self.forget_if_finished(ch);
                BackendStep::Drop
            }
            id::QUEUE_DECLARE_OK => match c.queue_oks.pop() {
                Some(None) => {
                    c.declared_ok = true;
                    BackendStep::Forward
                }
                Some(Some(ok)) => {
                    c.declared_ok = true;
                    self.pending -= 1;
                    if c.last_queue == (LastQueue::ServerNamed { seq: ok.seq })
                        && let Some(q) = method::declare_ok_queue(payload)
                    {
                        c.last_queue = LastQueue::Named(q.into());
                    }
                    if ok.hide {
                        BackendStep::Drop
                    } else {
                        BackendStep::Forward
                    }
                }
                _ => BackendStep::Forward,
            },
            id::EXCHANGE_DECLARE_OK => {
                if let Some(Some(ok)) = c.exchange_oks.pop() {
                    self.pending -= 1;
                    self.exchanges.declared(&ok.name, ok.kind, ok.epoch);
                }
                BackendStep::Forward
            }
            id::BASIC_CANCEL => {
                // The broker cancelled a consumer (its queue was deleted, ...).
                if let Some(tag) = method::cancel_tag(payload)
                    && c.consumers.remove(tag).is_some()
                {
                    self.consumers -= 1;
                }
                if self.cancel_notify {
                    BackendStep::Forward
                } else {
                    BackendStep::Drop
                }
            }
            id::BASIC_CONSUME_OK => {
                self.consume_ok(ch, payload, to_client);
                BackendStep::Forward
            }
            _ => BackendStep::Forward,
        }
    }

    /// A `consume-ok` (forwarded by the caller). The tag is the consumer's own: the
    /// gateway names every consumer whose tag the client left empty. A consumer the
    /// gateway revoked before it came is cancelled now, after it, as RabbitMQ orders them.
    fn consume_ok(&mut self, ch: u16, payload: &[u8], to_client: &mut Outbox) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        let Some(tag) = method::cancel_tag(payload) else {
            return;
        };
        match c.consumers.get_mut(tag) {
            Some(con) if con.state == ConsumerState::Awaiting => {
                con.state = ConsumerState::Live;
            }
            Some(con) if con.state == ConsumerState::Cancelled => {
                let no_ack = con.no_ack;
                let tag: Box<str> = tag.into();
                c.consumers.remove(&tag);
                // On a closing channel (the gateway's close or the client's is on its
                // way), the consumer ends with the channel, and a cancel behind that close
                // would be discarded or reach a channel the broker no longer has (504, a
                // connection error). Its deliveries meanwhile are dropped all the same.
                let to_backend = (c.state == State::Open).then_some(&mut self.backend_later);
                revoke(
                    c,
                    ch,
                    tag,
                    no_ack,
                    to_backend,
                    self.cancel_notify,
                    to_client,
                );
            }
            _ => {}
        }
    }

    /// A broker method on a channel with revoked consumers that concerns one of them:
    /// a delivery still on its way (dropped with its content; in acknowledged mode rejected
    /// back to its queue while the channel is open, else requeued when it closes), the
    /// `cancel-ok` for the gateway's cancel (the end of the entry: the broker sends nothing
    /// more for it), or the broker's own cancel (the client was told already). `None` for
    /// anything else.
    fn revoked_consumer_frame(
        &mut self,
        ch: u16,
        ids: (u16, u16),
        payload: &[u8],
    ) -> Option<BackendStep> {
        let c = self.channels.get_mut(&ch)?;
        match ids {
            id::BASIC_DELIVER => {
                let (tag, delivery_tag) = method::deliver_tags(payload)?;
                let r = c.revoked.iter().find(|r| &*r.tag == tag)?;
                if !r.no_ack && c.state == State::Open {
                    self.backend_later
                        .frame(|b| method::basic_reject(b, ch, delivery_tag, true));
                }
                c.dropping = true;
                Some(BackendStep::Drop)
            }
            id::BASIC_CANCEL_OK => {
                let tag = method::cancel_tag(payload)?;
                // The broker answers in order: the first cancel-ok for the tag is for the
                // gateway's cancel, sent before anything the client sent after the refresh.
                let i = c
                    .revoked
                    .iter()
                    .position(|r| r.cancel_sent && &*r.tag == tag)?;
                c.revoked.remove(i);
                self.consumers -= 1;
                Some(BackendStep::Drop)
            }
            id::BASIC_CANCEL => {
                let tag = method::cancel_tag(payload)?;
                c.revoked
                    .iter()
                    .any(|r| &*r.tag == tag)
                    .then_some(BackendStep::Drop)
            }
            _ => None,
        }
    }

    /// A broker close (channel or connection) whose text names the gateway's service user
    /// gets the client's user name instead.
    fn hide_service_user(&self, ch: u16, payload: &[u8]) -> BackendStep {
        if self.relay_only {
            return BackendStep::Forward; // the broker's user is the client's own
        }
        let Some(close) = Close::parse(payload) else {
            return BackendStep::Forward;
        };
        match method::hide_service_user(close.text, &self.service_user, &self.username) {
            Some(text) => {
                let mut b = BytesMut::new();
                if ch == 0 {
                    method::connection_close(
                        &mut b,
                        close.code,
                        &text,
                        close.class_id,
                        close.method_id,
                    );
                } else {
                    method::channel_close(
                        &mut b,
                        ch,
                        close.code,
                        &text,
                        close.class_id,
                        close.method_id,
                    );
                }
                BackendStep::Replace(b)
            }
            None => BackendStep::Forward,
        }
    }

    /// Cancels the consumers the current permissions no longer allow to read their
    /// queue (RabbitMQ 4.2.6+ after update-secret): toward the backend, and toward the
    /// client when it understands `basic.cancel` from the server.
    fn cancel_unreadable_consumers(&mut self, to_client: &mut Outbox, to_backend: &mut Outbox) {
        let ctx = Context {
            vhost: &self.vhost,
            username: &self.username,
            now: self.now,
        };
        for (&ch, chan) in self.channels.iter_mut() {
            if chan.state != State::Open {
                continue;
            }
            let lost: Vec<Box<str>> = chan
                .consumers
                .iter()
                .filter(|(_, c)| {
                    let consume = Operation::BasicConsume { queue: &c.queue };
                    c.state != ConsumerState::Cancelled
                        && authz::decide(&self.permissions, &ctx, &consume, id::BASIC_CONSUME)
                            != Verdict::Permit
                })
                .map(|(tag, _)| tag.clone())
                .collect();
            for tag in lost {
                let Some(c) = chan.consumers.get_mut(&tag) else {
                    continue;
                };
                if c.state == ConsumerState::Awaiting {
                    // Cancelled once its consume-ok has come: RabbitMQ 3.10.8's channel
                    // crashes (541) on a consume-ok for a consumer cancelled before it.
                    // The client is told then too, as the broker sends consume-ok first.
                    c.state = ConsumerState::Cancelled;
                    continue;
                }
                let no_ack = c.no_ack;
                chan.consumers.remove(&tag);
                revoke(
                    chan,
                    ch,
                    tag,
                    no_ack,
                    Some(&mut *to_backend),
                    self.cancel_notify,
                    to_client,
                );
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
        self.close_both_with(
            reply::CONNECTION_FORCED,
            text,
            (0, 0),
            to_client,
            to_backend,
        );
    }

    /// Whether the gateway waits for the broker to answer a `channel.close` of its own (a
    /// refusal, or the answers owed after a broker error), on a connection the broker
    /// is reading. RabbitMQ answers one at once, but a channel process that crashed while
    /// closing is never heard from again (3.10.8's `consumer_monitor` `badkey` when a
    /// `basic.cancel` with `nowait` overtakes its consumer's `consume-ok`): the refused
    /// client would wait for ever, and a reopen of the channel with it. The relay times
    /// the wait and then calls [`Session::broker_silent`].
    pub fn awaits_broker_close(&self) -> bool {
        self.owed_close_oks > 0 && !self.broker_blocked && !self.connection_over()
    }

    /// The broker left a close of the gateway's unanswered for `waited`: the refusals it
    /// held reach the client, and the connection ends with `541 INTERNAL_ERROR` (what
    /// RabbitMQ gives when a channel fails), its channels being in a state nobody knows.
    pub fn broker_silent(&mut self, waited: &str, to_client: &mut Outbox, to_backend: &mut Outbox) {
        if self.connection_over() {
            return;
        }
        self.tell_pending_refusals(to_client);
        let text = format!(
            "INTERNAL_ERROR - gateway: the broker did not answer channel.close within {waited}"
        );
        self.close_both_with(reply::INTERNAL_ERROR, &text, (0, 0), to_client, to_backend);
    }

    /// Whether the client was sent a `connection.close` (by the gateway: expiry, refused
    /// secret, lost backend, a protocol error; or by the broker), and whether it has
    /// answered with `close-ok`. The relay keeps the client socket open until then
    /// (bounded), so a client still sending does not get a reset that loses the close.
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
        outcome: Result<Permissions, SecretRefused>,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        self.secret_updated_with(outcome, None, to_client, to_backend)
    }

    /// [`Session::secret_updated`], with the backend's own new token when the broker
    /// verifies one too (`backend.auth = "token"`): then the broker gets `update-secret`
    /// with it, and its answer (`update-secret-ok`, or its refusal) is the client's.
    pub fn secret_updated_with(
        &mut self,
        outcome: Result<Permissions, SecretRefused>,
        backend_secret: Option<String>,
        to_client: &mut Outbox,
        to_backend: &mut Outbox,
    ) {
        if self.pause == Some(Pause::Secret) {
            self.pause = None;
        }
        let ids = id::CONNECTION_UPDATE_SECRET;
        match outcome {
            Ok(p) if authz::connect(&p, &self.vhost, self.now).is_ok() => {
                // RabbitMQ answers first, then each channel re-checks its consumers.
                self.permissions = p;
                match backend_secret {
                    Some(token) => to_backend
                        .frame(|b| method::update_secret(b, token.as_bytes(), "client refresh")),
                    None => to_client.frame(method::update_secret_ok),
                }
                self.cancel_unreadable_consumers(to_client, to_backend);
            }
            Ok(_) => {
                let text = format!(
                    "NOT_ALLOWED - access to vhost '{}' refused for user '{}'",
                    self.vhost, self.username
                );
                self.close_both_with(reply::NOT_ALLOWED, &text, ids, to_client, to_backend);
            }
            Err(SecretRefused(text)) => {
                self.close_both_with(reply::NOT_ALLOWED, &text, ids, to_client, to_backend)
            }
        }
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

    fn random(&mut self) -> u64 {
        // SplitMix64: the caller's seed spread over every value drawn.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 16 random bytes in RabbitMQ's `rabbit_guid:binary/2` form: `<prefix>-<base64url>`.
    fn guid(&mut self, prefix: &str) -> String {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.random().to_be_bytes());
        bytes[8..].copy_from_slice(&self.random().to_be_bytes());
        format!(
            "{prefix}-{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// A plausible server-generated queue name, used to check `configure` for
    /// `queue.declare` with an empty name before the broker picks the real one.
    fn server_name_probe(&mut self, _ch: u16) -> String {
        self.guid("amq.gen")
    }

    /// A consumer tag as RabbitMQ generates them.
    fn consumer_tag(&mut self) -> String {
        self.guid("amq.ctag")
    }
}

/// Whether `m` names the queue `""`, which RabbitMQ expands even on a closing channel.
fn names_empty_queue(m: &ClientMethod<'_>) -> bool {
    match m {
        ClientMethod::BasicGet { queue }
        | ClientMethod::QueuePurge { queue }
        | ClientMethod::QueueDelete { queue }
        | ClientMethod::QueueBind { queue, .. } => queue.is_empty(),
        ClientMethod::BasicConsume(c) => c.queue.is_empty(),
        _ => false,
    }
}

fn write_no_queue(to_client: &mut Outbox, ch: u16, (class, meth): (u16, u16)) {
    to_client.frame(|b| method::channel_close(b, ch, reply::NOT_FOUND, NO_QUEUE_TEXT, class, meth));
}

/// What a closing channel answers to frames the gateway dropped (see [`Owed`]); `no_queue`
/// is whether RabbitMQ's most recently declared queue is empty then.
/// Revokes consumer `tag` of channel `ch` (already out of its consumers): the gateway's
/// `basic.cancel` goes to `to_backend` when the broker's channel is open (not `nowait`: its
/// cancel-ok marks the end of the consumer's deliveries), the client is told when it asked
/// for `consumer_cancel_notify`, and the consumer stays [`Revoked`] (still counted with the
/// connection's consumers) until that cancel-ok or the channel's end.
fn revoke(
    c: &mut Channel,
    ch: u16,
    tag: Box<str>,
    no_ack: bool,
    to_backend: Option<&mut Outbox>,
    notify: bool,
    to_client: &mut Outbox,
) {
    let cancel_sent = to_backend.is_some();
    if let Some(b) = to_backend {
        b.frame(|b| method::basic_cancel_with(b, ch, &tag, false));
    }
    if notify {
        to_client.frame(|b| method::basic_cancel(b, ch, &tag));
    }
    c.revoked.push(Revoked {
        tag,
        no_ack,
        cancel_sent,
    });
}

fn write_owed(to_client: &mut Outbox, ch: u16, owed: &[Owed], no_queue: bool) {
    for o in owed {
        match *o {
            Owed::CloseOk => to_client.frame(|b| method::channel_close_ok(b, ch)),
            Owed::EmptyName(ids) if no_queue => write_no_queue(to_client, ch, ids),
            Owed::EmptyName(_) => {}
        }
    }
}

/// A method frame on `ch` with `payload`, as it came.
fn payload_frame(ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frame::write_frame(&mut b, frame::METHOD, ch, payload);
    b.to_vec()
}

/// A queue name after `""` is resolved.
enum Resolved {
    Name(Box<str>),
    /// `""` with no queue declared yet on the channel.
    NoQueue,
    /// `""` while the most recent declare is server-named and unanswered.
    Wait,
}

/// Moves the accepted span at the front of `input` to `out`, without copying.
fn flush(input: &mut BytesMut, span: &mut usize, out: &mut Outbox) {
    if *span > 0 {
        out.push(input.split_to(*span));
        *span = 0;
    }
}

/// Starts streaming a frame whose header is at `input[span..]`.
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

/// Passes as much of the streaming frame as is buffered.
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

#[cfg(test)]
mod tests;
