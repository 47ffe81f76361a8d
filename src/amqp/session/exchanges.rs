//! What a session knows about exchange types, and for how long.
//!
//! RabbitMQ applies topic permission checks only to topic exchanges, and it looks at the
//! exchange's live type at each operation. An exchange can be deleted and declared again
//! with another type by anyone, so what the gateway learnt about a type is only good while
//! nothing can have changed it:
//!
//! - **Built-in exchanges** (`amq.topic`, `amq.direct`, ...) cannot be deleted or declared:
//!   their types are fixed.
//! - **Learnt types** (from this connection's own `exchange.declare-ok`, matched to its
//!   own request, or from the management API) are tagged with an *epoch*: a counter in
//!   [`ExchangeEpochs`], shared by every connection of the gateway, that every
//!   `exchange.declare` (not passive) and `exchange.delete` of that name through the
//!   gateway moves on, before the method reaches the broker. A type learnt under an older
//!   epoch is not used. Changes made outside the gateway are not seen this way: when the
//!   management API is configured, every learnt type is also forgotten after a time to
//!   live (the relay calls [`Exchanges::forget`]), so such a change is seen within it.
//! - Anything else is [`ExchangeKind::Unresolved`] (ask the management API) when lookups
//!   are possible, else [`ExchangeKind::Unknown`] (treated as topic: fail closed).
//! - The management API may say an exchange is missing ([`ExchangeKind::Missing`]); that
//!   is not believed for a name this connection itself declared under the current epoch,
//!   since the broker may not have made it yet.
//!
//! **Invariant:** no IO; reading an epoch is one atomic load, with no lock.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use crate::authz::ExchangeKind;

/// Epoch slots: names share a slot by hash. A shared slot only makes a type be learnt
/// again more often; it never keeps a stale one. Fixed size: no growth with names. The
/// hash is keyed at random per process, so a client cannot pick names that share a slot
/// with someone else's exchange to make their types be looked up again and again.
const SLOTS: usize = 4096;

/// Most learnt types a session keeps; when full, it starts again from nothing.
pub const MAX_KNOWN: usize = 512;

/// One counter per (vhost, name) slot, moved on by every declare or delete of an exchange
/// with that name through the gateway. Shared by all connections.
pub struct ExchangeEpochs {
    slots: Box<[AtomicU64]>,
    hasher: RandomState,
}

impl Default for ExchangeEpochs {
    fn default() -> Self {
        ExchangeEpochs {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl ExchangeEpochs {
    pub fn new() -> Arc<ExchangeEpochs> {
        Arc::new(ExchangeEpochs::default())
    }

    fn slot(&self, vhost: &str, name: &str) -> usize {
        (self.hasher.hash_one((vhost, name)) as usize) % SLOTS
    }

    /// The epoch of exchange `name` in `vhost`.
    pub fn current(&self, vhost: &str, name: &str) -> u64 {
        self.at(self.slot(vhost, name))
    }

    /// The epoch in slot `slot` (one atomic load: what a session does per message).
    fn at(&self, slot: usize) -> u64 {
        self.slots[slot].load(Ordering::Acquire)
    }

    /// Exchange `name` may change type: every type learnt for it before is void.
    pub fn bump(&self, vhost: &str, name: &str) -> u64 {
        self.slots[self.slot(vhost, name)].fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Exchanges every vhost has, with their types. They cannot be deleted or redeclared
/// (`amq.` is reserved).
fn builtin(name: &str) -> Option<ExchangeKind> {
    match name {
        "" | "amq.direct" | "amq.fanout" | "amq.headers" | "amq.match" => Some(ExchangeKind::Other),
        "amq.topic" | "amq.rabbitmq.trace" => Some(ExchangeKind::Topic),
        _ => None,
    }
}

/// The type named in `exchange.declare`, as the topic check sees it.
pub fn kind_of(exchange_type: &str) -> ExchangeKind {
    if exchange_type == "topic" {
        ExchangeKind::Topic
    } else {
        ExchangeKind::Other
    }
}

struct Known {
    kind: ExchangeKind,
    epoch: u64,
    /// The name's epoch slot, so a message costs one atomic load and no hashing.
    slot: usize,
}

/// One session's knowledge of exchange types, bounded by [`MAX_KNOWN`].
pub struct Exchanges {
    epochs: Arc<ExchangeEpochs>,
    vhost: String,
    known: FxHashMap<Box<str>, Known>,
    /// Whether types can be looked up (management API configured).
    lookups: bool,
    /// The answer of the lookup that just finished, for the one decision waiting on it
    /// even if a declare or delete moved the epoch on meanwhile (it is then `Unknown`):
    /// a decision never waits twice.
    fresh: Option<(Box<str>, ExchangeKind)>,
    /// Names this connection declared (not passive), with the epoch the declare began:
    /// while that epoch lasts, a lookup's "missing" may only mean the broker has not made
    /// the exchange yet (a `nowait` declare, or one on another channel), so it is not
    /// believed. Bounded by [`MAX_KNOWN`].
    declaring: FxHashMap<Box<str>, u64>,
}

impl Exchanges {
    pub fn new(epochs: Arc<ExchangeEpochs>, vhost: &str, lookups: bool) -> Exchanges {
        Exchanges {
            epochs,
            vhost: vhost.to_owned(),
            known: FxHashMap::default(),
            lookups,
            fresh: None,
            declaring: FxHashMap::default(),
        }
    }

    /// The type of `name` as far as it is known now.
    pub fn kind(&self, name: &str) -> ExchangeKind {
        if let Some(k) = builtin(name) {
            return k;
        }
        if let Some((n, k)) = &self.fresh
            && **n == *name
        {
            return *k;
        }
        match self.known.get(name) {
            Some(k) if k.epoch == self.epochs.at(k.slot) => k.kind,
            _ if self.lookups => ExchangeKind::Unresolved,
            _ => ExchangeKind::Unknown,
        }
    }

    /// Ends the use of a finished lookup's answer (called after each decision).
    pub fn decided(&mut self) {
        self.fresh = None;
    }

    /// The epoch to tag a lookup of `name` with, read when it starts.
    pub fn epoch(&self, name: &str) -> u64 {
        self.epochs.current(&self.vhost, name)
    }

    /// A lookup of `name` started at `epoch` answered `kind` (`None`: it could not be
    /// learnt; treated as topic, and remembered as such until forgotten).
    /// A "missing" answer under the epoch of this connection's own declare of `name` is
    /// not believed: it is `Unknown`.
    pub fn looked_up(&mut self, name: &str, kind: Option<ExchangeKind>, epoch: u64) {
        let mut kind = kind.unwrap_or(ExchangeKind::Unknown);
        if kind == ExchangeKind::Missing && self.declaring.get(name) == Some(&epoch) {
            kind = ExchangeKind::Unknown;
        }
        if epoch == self.epoch(name) {
            self.learn(name, kind, epoch);
            self.fresh = Some((name.into(), kind));
        } else {
            // Declared or deleted meanwhile: the answer may be stale.
            self.fresh = Some((name.into(), ExchangeKind::Unknown));
        }
    }

    /// An `exchange.declare` of `name` (not passive) or an `exchange.delete` is on its way
    /// to the broker: every connection's knowledge of the name is void. Returns the new
    /// epoch, under which this connection's own `declare-ok` may teach the type.
    pub fn changing(&mut self, name: &str) -> u64 {
        self.known.remove(name);
        self.declaring.remove(name);
        self.epochs.bump(&self.vhost, name)
    }

    /// [`Exchanges::changing`] for an `exchange.declare`: until the epoch moves on again,
    /// the management API saying the exchange is missing is not believed (the broker may
    /// not have made it yet).
    pub fn declaring(&mut self, name: &str) -> u64 {
        let epoch = self.changing(name);
        if self.declaring.len() >= MAX_KNOWN {
            self.declaring.clear();
        }
        self.declaring.insert(name.into(), epoch);
        epoch
    }

    /// `declare-ok` for a declare of `name` as `kind` made under `epoch`.
    pub fn declared(&mut self, name: &str, kind: ExchangeKind, epoch: u64) {
        if epoch == self.epoch(name) {
            self.learn(name, kind, epoch);
        }
    }

    fn learn(&mut self, name: &str, kind: ExchangeKind, epoch: u64) {
        if self.known.len() >= MAX_KNOWN && !self.known.contains_key(name) {
            self.known.clear();
        }
        let slot = self.epochs.slot(&self.vhost, name);
        self.known.insert(name.into(), Known { kind, epoch, slot });
    }

    /// The time to live of learnt types has passed. With lookups available, every learnt
    /// type is forgotten (changes made outside the gateway are seen within the time to
    /// live). Without them, a forgotten type could only be treated as topic, so this
    /// connection's own declares are kept, still voided by any change through the gateway.
    pub fn forget(&mut self) {
        if self.lookups {
            self.known.clear();
        }
    }

    /// How many types are known (for tests and bounds).
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_fixed_and_others_need_learning() {
        let e = Exchanges::new(ExchangeEpochs::new(), "/", true);
        assert_eq!(e.kind("amq.topic"), ExchangeKind::Topic);
        assert_eq!(e.kind(""), ExchangeKind::Other);
        assert_eq!(e.kind("x"), ExchangeKind::Unresolved);
        let e = Exchanges::new(ExchangeEpochs::new(), "/", false);
        assert_eq!(e.kind("x"), ExchangeKind::Unknown);
    }

    #[test]
    fn a_declare_or_delete_anywhere_voids_what_every_session_learnt() {
        let epochs = ExchangeEpochs::new();
        let mut a = Exchanges::new(epochs.clone(), "/", false);
        let mut b = Exchanges::new(epochs.clone(), "/", false);
        let e = a.changing("x");
        a.declared("x", ExchangeKind::Other, e);
        assert_eq!(a.kind("x"), ExchangeKind::Other);
        // Another connection deletes and redeclares it.
        b.changing("x");
        assert_eq!(a.kind("x"), ExchangeKind::Unknown);
        // Same name in another vhost: a separate epoch (unless the slots collide, which
        // only ever voids more).
        let mut c = Exchanges::new(epochs, "other", false);
        let e = c.changing("y");
        c.declared("y", ExchangeKind::Topic, e);
        assert_eq!(c.kind("y"), ExchangeKind::Topic);
    }

    #[test]
    fn a_declare_ok_after_a_change_teaches_nothing() {
        let epochs = ExchangeEpochs::new();
        let mut a = Exchanges::new(epochs.clone(), "/", true);
        let e = a.changing("x");
        epochs.bump("/", "x");
        a.declared("x", ExchangeKind::Other, e);
        assert_eq!(a.kind("x"), ExchangeKind::Unresolved);
    }

    #[test]
    fn a_stale_lookup_is_used_once_as_unknown() {
        let epochs = ExchangeEpochs::new();
        let mut a = Exchanges::new(epochs.clone(), "/", true);
        let e = a.epoch("x");
        epochs.bump("/", "x");
        a.looked_up("x", Some(ExchangeKind::Other), e);
        assert_eq!(a.kind("x"), ExchangeKind::Unknown);
        a.decided();
        assert_eq!(a.kind("x"), ExchangeKind::Unresolved);
        // A current one is kept.
        let e = a.epoch("x");
        a.looked_up("x", Some(ExchangeKind::Other), e);
        a.decided();
        assert_eq!(a.kind("x"), ExchangeKind::Other);
        // Failed lookups are remembered (as unknown) until forgotten.
        let e = a.epoch("y");
        a.looked_up("y", None, e);
        a.decided();
        assert_eq!(a.kind("y"), ExchangeKind::Unknown);
        a.forget();
        assert_eq!(a.kind("x"), ExchangeKind::Unresolved);
        assert_eq!(a.kind("y"), ExchangeKind::Unresolved);
    }

    #[test]
    fn missing_is_believed_unless_this_connection_declared_the_name() {
        let epochs = ExchangeEpochs::new();
        let mut a = Exchanges::new(epochs.clone(), "/", true);
        let e = a.epoch("x");
        a.looked_up("x", Some(ExchangeKind::Missing), e);
        assert_eq!(a.kind("x"), ExchangeKind::Missing);
        a.decided();
        // Its own declare (a `nowait` one, say) may not have reached the broker yet.
        let e = a.declaring("y");
        a.looked_up("y", Some(ExchangeKind::Missing), e);
        assert_eq!(a.kind("y"), ExchangeKind::Unknown);
        a.decided();
        // After its own delete, "missing" is the truth again.
        a.changing("y");
        let e = a.epoch("y");
        a.looked_up("y", Some(ExchangeKind::Missing), e);
        assert_eq!(a.kind("y"), ExchangeKind::Missing);
        a.decided();
        // Another connection's declare does not make this one disbelieve.
        let mut b = Exchanges::new(epochs, "/", true);
        b.declaring("z");
        let e = a.epoch("z");
        a.looked_up("z", Some(ExchangeKind::Missing), e);
        assert_eq!(a.kind("z"), ExchangeKind::Missing);
    }

    #[test]
    fn without_lookups_own_declares_survive_the_ttl() {
        let mut a = Exchanges::new(ExchangeEpochs::new(), "/", false);
        let e = a.changing("x");
        a.declared("x", ExchangeKind::Other, e);
        a.forget();
        assert_eq!(a.kind("x"), ExchangeKind::Other);
    }

    #[test]
    fn knowledge_is_bounded() {
        let mut a = Exchanges::new(ExchangeEpochs::new(), "/", true);
        for i in 0..(MAX_KNOWN * 3) {
            let name = format!("x{i}");
            let e = a.epoch(&name);
            a.looked_up(&name, Some(ExchangeKind::Other), e);
            assert!(a.len() <= MAX_KNOWN);
        }
    }
}
