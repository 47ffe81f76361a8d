//! One channel as the gateway follows it, modelled on RabbitMQ's `rabbit_channel`.
//!
//! ```text
//!                 client channel.open (forwarded; a reopen waits for owed close-oks)
//!   (no entry) ───────────────────────────────────────────────▶ Open ◀──────────┐
//!        ▲                                                        │             │
//!        │ close handshakes done                                  │             │
//!        │                   ┌────────────────────────────────────┼─────────┐   │
//!        │                   │ gateway refuses a method:          │         │   │
//!        │                   │ channel.close → broker             │ broker  │   │
//!        │                   ▼                                    │ channel │   │
//!        │              Refusing ──broker close-ok──▶ ClientClosing│ .close  │   │
//!        │                   │    (client gets the refusal)       ▼         │   │
//!        │                   └──broker channel.close (an earlier ▶ BrokerClosing│
//!        │                       method failed: its error wins)   │         │   │
//!        │                                                        │         │   │
//!        │              client channel.close ──▶ ClientClosed ────┘         │   │
//!        └───────────── client close-ok / broker close-ok ◀─────────────────┘   │
//!                                                                              │
//!   Closed (owed close-oks from the broker are swallowed) ── channel.open ──────┘
//! ```
//!
//! What the channel holds follows what the client sent, in order, as RabbitMQ's channel
//! process handles it: the most recently declared queue is set when a `queue.declare` is
//! forwarded (passive and `nowait` ones too), consumers are registered when their
//! `basic.consume` is forwarded (the gateway names `""`-tagged ones itself), and replies
//! are matched to their own request through per-reply queues ([`Pending`]), never to "the
//! one pending request". Everything is bounded (see `ARCHITECTURE.md`, "Bounds").

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use rustc_hash::FxHashMap;

use crate::authz::{Denial, ExchangeKind};

/// Where a channel is in its life, from the gateway's view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Methods are decided and forwarded.
    Open,
    /// The gateway refused a method and sent `channel.close` to the broker. The client is
    /// told once the broker has answered: replies to methods before the refused one come
    /// first, and if one of those failed, the broker's own error reaches the client
    /// instead, as with RabbitMQ alone. The client's frames are dropped meanwhile; what
    /// RabbitMQ's closing channel would have answered to them is kept in
    /// [`Channel::deferred`].
    Refusing {
        denial: Denial,
        /// The refused method named the queue `""` (its ids): if an earlier method failed
        /// at the broker, RabbitMQ's closing channel expands it again (see [`Owed`]).
        refused_empty: Option<(u16, u16)>,
        /// The client sent `channel.close-ok` meanwhile (answering, say, a previous
        /// incarnation's late second close). RabbitMQ, whose own close would already be on
        /// its way, takes it as the answer to that close: the channel then ends when the
        /// broker answers the gateway's close, and a reopen waits for that.
        close_ok_seen: bool,
    },
    /// The client has the gateway's `channel.close`; its `close-ok` is awaited. The
    /// broker's channel is gone. The client's frames are dropped.
    ClientClosing,
    /// The broker's `channel.close` went to the client, whose `close-ok` is awaited. The
    /// client's frames are dropped as the broker would discard them, except `close-ok`
    /// (and `open`, which the broker answers); a `close`, and a `""` queue name, are
    /// answered as RabbitMQ's closing channel answers them, in its order (see
    /// [`Channel::deferred`]).
    BrokerClosing,
    /// The client sent `channel.close`; the broker's `close-ok` is awaited. The broker
    /// discards the client's frames, which go through unchecked.
    ClientClosed,
    /// Closed on the client's side; the broker may still owe `close-ok`s.
    Closed,
}

/// What RabbitMQ's channel, closing after an error, answers to a method the client sent
/// after it: `close-ok` to a `channel.close`, and a second `channel.close 404` to a method
/// that names the queue `""` when no queue declare succeeded on the channel (its channel
/// expands the name before it looks at its own state). Which of the `""` ones get it is
/// known only when the refusal ends: see [`Channel::declared_ok`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owed {
    CloseOk,
    EmptyName((u16, u16)),
}

/// Most answers owed to dropped frames that are kept; a client sending more is broken, and
/// the rest get none.
pub const MAX_OWED: usize = 16;

/// The text of RabbitMQ's `404` for `""` with no queue declared on the channel.
pub const NO_QUEUE_TEXT: &str = "NOT_FOUND - no previously declared queue";

/// RabbitMQ's text for `channel.open` on a channel that is open or closing (504).
pub const SECOND_OPEN_TEXT: &str = "CHANNEL_ERROR - second 'channel.open' seen";

/// [`State`] without its data, to branch on while the channel is borrowed elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Open,
    Refusing,
    ClientClosing,
    BrokerClosing,
    ClientClosed,
    Closed,
}

impl State {
    pub fn phase(&self) -> Phase {
        match self {
            State::Open => Phase::Open,
            State::Refusing { .. } => Phase::Refusing,
            State::ClientClosing => Phase::ClientClosing,
            State::BrokerClosing => Phase::BrokerClosing,
            State::ClientClosed => Phase::ClientClosed,
            State::Closed => Phase::Closed,
        }
    }

    /// Whether client frames on the channel are forwarded (checked or not).
    pub fn forwards_client(&self) -> bool {
        !matches!(
            self,
            State::Refusing { .. } | State::ClientClosing | State::BrokerClosing
        )
    }
}

/// The most recently declared queue (`""` in later methods means it).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum LastQueue {
    /// None yet: RabbitMQ answers `404 no previously declared queue`.
    #[default]
    None,
    Named(Box<str>),
    /// A server-named declare whose name arrives with its `declare-ok`.
    ServerNamed {
        seq: u32,
    },
}

/// Replies the session must read, matched to their requests by position. Requests whose
/// reply teaches nothing are counted, not stored: only entries take memory.
#[derive(Debug)]
pub struct Pending<T> {
    q: VecDeque<Slot<T>>,
}

#[derive(Debug)]
enum Slot<T> {
    Skip(u64),
    Entry(T),
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending { q: VecDeque::new() }
    }
}

impl<T> Pending<T> {
    /// A request whose reply is only counted.
    pub fn skip(&mut self) {
        match self.q.back_mut() {
            Some(Slot::Skip(n)) => *n = n.saturating_add(1),
            _ => self.q.push_back(Slot::Skip(1)),
        }
    }

    pub fn push(&mut self, entry: T) {
        self.q.push_back(Slot::Entry(entry));
    }

    /// The next reply arrived: its entry, if its request had one. `None` when nothing is
    /// pending (a reply the gateway did not see requested is passed on).
    pub fn pop(&mut self) -> Option<Option<T>> {
        match self.q.front_mut()? {
            Slot::Skip(n) if *n > 1 => {
                *n -= 1;
                Some(None)
            }
            Slot::Skip(_) => {
                self.q.pop_front();
                Some(None)
            }
            Slot::Entry(_) => match self.q.pop_front() {
                Some(Slot::Entry(e)) => Some(Some(e)),
                _ => Some(None),
            },
        }
    }

    /// Whether an entry satisfies `f`.
    pub fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.q.iter().any(|s| matches!(s, Slot::Entry(e) if f(e)))
    }

    /// How many entries (not counted requests) are held.
    pub fn entries(&self) -> usize {
        self.q
            .iter()
            .filter(|s| matches!(s, Slot::Entry(_)))
            .count()
    }

    pub fn clear(&mut self) -> usize {
        let n = self.entries();
        self.q.clear();
        n
    }
}

/// A `queue.declare-ok` the session reads: the name of a server-named queue.
#[derive(Debug)]
pub struct QueueOk {
    pub seq: u32,
    /// The client sent the declare with `nowait`; the gateway asked for the reply to learn
    /// the name and keeps it from the client.
    pub hide: bool,
}

/// An `exchange.declare-ok` the session reads: the type of the declared exchange.
#[derive(Debug)]
pub struct ExchangeOk {
    pub name: Box<str>,
    pub kind: ExchangeKind,
    pub epoch: u64,
}

/// A consumer the gateway has seen asked for.
#[derive(Debug)]
pub struct Consumer {
    pub queue: Arc<str>,
    pub state: ConsumerState,
    /// Consumed with `no_ack`: nothing to give back for a delivery the gateway drops.
    pub no_ack: bool,
}

/// A consumer the gateway cancelled at the broker because a refreshed token may no
/// longer read its queue, until the broker is known to have stopped it. Deliveries for it
/// that were already on their way are dropped (an acknowledged-mode one is rejected back
/// to its queue): after `update-secret-ok`, the client reads nothing more from that
/// queue. Counted with the connection's consumers until then.
#[derive(Debug)]
pub struct Revoked {
    pub tag: Box<str>,
    pub no_ack: bool,
    /// The gateway's `basic.cancel` (not `nowait`) went to the broker: its `cancel-ok`,
    /// which only the gateway awaits, ends the entry. Without one (the channel was already
    /// closing), the entry ends with the channel.
    pub cancel_sent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerState {
    /// Its `consume-ok` has not come yet (the client does not know a tag the broker or
    /// the gateway chose yet).
    Awaiting,
    Live,
    /// Cancelled by the gateway (a refreshed token) before its `consume-ok`: the client is
    /// told once the `consume-ok` has passed, as RabbitMQ would order them.
    Cancelled,
}

/// One channel.
#[derive(Debug)]
pub struct Channel {
    pub state: State,
    pub last_queue: LastQueue,
    pub queue_oks: Pending<QueueOk>,
    pub exchange_oks: Pending<ExchangeOk>,
    /// Consumers: tag → queue and state, re-checked when the token is refreshed.
    pub consumers: FxHashMap<Box<str>, Consumer>,
    /// Consumers cancelled by the gateway whose deliveries are still dropped.
    pub revoked: Vec<Revoked>,
    /// The content of a dropped delivery follows: its header and body frames go too.
    pub dropping: bool,
    /// A permitted-so-far `basic.publish` method frame waiting for its content header
    /// (at most 527 bytes: the arguments must fill the frame exactly).
    pub held: Option<BytesMut>,
    /// `channel.close-ok`s the broker owes for closes the gateway sent.
    pub owed_close_oks: u8,
    /// What RabbitMQ's closing channel would have answered to frames the gateway dropped
    /// while refusing or after the broker's `channel.close`, given when the broker answers
    /// the gateway's close: only then is every method forwarded before them answered
    /// (RabbitMQ 3.10.8's second closes for `""` methods among them), so the client sees
    /// RabbitMQ's order. At most [`MAX_OWED`]; empty while the channel is open.
    pub deferred: Vec<Owed>,
    /// A `queue.declare` on this channel is known to have succeeded (its `declare-ok`
    /// came, or it was sent `nowait` and is assumed to have). When the broker closes the
    /// channel with an error, RabbitMQ's own most recently declared queue is empty unless
    /// one did: declares without their `declare-ok` failed or came after the error.
    pub declared_ok: bool,
    /// The broker has not answered this incarnation's `channel.open` yet: a
    /// `channel.close` now is the previous incarnation's (RabbitMQ 3.10.8 sends a second
    /// one for a `""` method it dropped while closing, possibly after the client's
    /// close-ok and reopen).
    pub awaiting_open_ok: bool,
    /// While the client closes the channel, the broker closed it too (an error crossing
    /// the client's close): the client's `close-ok` then answers it and goes to the broker.
    pub broker_close_relayed: bool,
}

impl Channel {
    pub fn open() -> Channel {
        Channel {
            state: State::Open,
            last_queue: LastQueue::None,
            queue_oks: Pending::default(),
            exchange_oks: Pending::default(),
            consumers: FxHashMap::default(),
            revoked: Vec::new(),
            dropping: false,
            held: None,
            owed_close_oks: 0,
            deferred: Vec::new(),
            declared_ok: false,
            awaiting_open_ok: true,
            broker_close_relayed: false,
        }
    }

    /// The channel is over on the broker's side or soon will be: forget what it held.
    /// Returns (consumers, pending entries) dropped, for the connection's counts. The
    /// most recently declared queue stays: a closing channel still expands `""` with it.
    pub fn clear(&mut self) -> (usize, usize) {
        let consumers = self.consumers.len() + self.revoked.len();
        self.consumers = FxHashMap::default();
        self.revoked = Vec::new();
        self.dropping = false;
        let pending = self.queue_oks.clear() + self.exchange_oks.clear();
        (consumers, pending)
    }

    /// The client sent `channel.close`: the consumers go with the channel, but the
    /// consumers the gateway revoked stay until the broker's `close-ok`, so that
    /// deliveries still on their way for them are dropped and one whose `consume-ok` is
    /// still to come is announced cancelled. The replies the gateway awaits stay too: the
    /// broker answers the methods before the close first (a hidden `declare-ok` must not
    /// reach the client), and they go with the broker's `close-ok` or its own
    /// `channel.close`. Returns the consumers dropped, for the connection's count.
    pub fn close_by_client(&mut self) -> usize {
        let before = self.consumers.len();
        self.consumers
            .retain(|_, c| c.state == ConsumerState::Cancelled);
        before - self.consumers.len()
    }

    /// Nothing left to wait for: the entry can go.
    pub fn finished(&self) -> bool {
        self.state == State::Closed && self.owed_close_oks == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_replies_match_their_own_requests() {
        let mut p: Pending<u32> = Pending::default();
        p.skip();
        p.push(7);
        p.skip();
        p.skip();
        p.push(8);
        assert_eq!(p.entries(), 2);
        assert_eq!(p.q.len(), 4, "consecutive skips are one slot");
        assert_eq!(p.pop(), Some(None));
        assert_eq!(p.pop(), Some(Some(7)));
        assert_eq!(p.pop(), Some(None));
        assert_eq!(p.pop(), Some(None));
        assert_eq!(p.pop(), Some(Some(8)));
        assert_eq!(p.pop(), None);
    }

    #[test]
    fn a_million_skipped_requests_take_one_slot() {
        let mut p: Pending<u32> = Pending::default();
        for _ in 0..1_000_000 {
            p.skip();
        }
        assert_eq!(p.q.len(), 1);
    }
}
