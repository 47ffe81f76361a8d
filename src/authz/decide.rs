//! The per-method authorisation decision: `(Permissions, Context, Operation)` → permit or
//! a [`Denial`] carrying RabbitMQ 4.2's exact channel.close reply (spec §6).
//!
//! The gateway reaches RabbitMQ with a service user that may do everything, and the broker
//! still enforces every STRUCTURAL rule (default exchange, reserved `amq.` names, `amq.*`
//! deletion, 404, 405 exclusive, internal exchanges, `immediate`, ...) with its own texts.
//! So this module makes only the PERMISSION decisions, in RabbitMQ's order: wherever the
//! broker checks a structural rule before a permission, we permit, so that the first error
//! a client sees is the one RabbitMQ itself would have sent.
//!
//! Invariant: pure (no IO, no clock, no logging); the call site logs and counts. The
//! method → permission table lives here and nowhere else.

use std::borrow::Cow;
use std::cell::RefCell;

use super::iam::{self, Action, Decision, Mode, Request, ResourceKind};
use super::permissions::{Perm, Permissions};

/// AMQP reply code for `ACCESS_REFUSED`.
pub const ACCESS_REFUSED: u16 = 403;
/// AMQP reply code for `NOT_FOUND`.
pub const NOT_FOUND: u16 = 404;
/// AMQP reply code for `PRECONDITION_FAILED`.
pub const PRECONDITION_FAILED: u16 = 406;
/// The longest reply text an AMQP shortstr can carry.
const MAX_REPLY_TEXT: usize = 255;
/// RabbitMQ's name for the default exchange in permission checks.
const DEFAULT_EXCHANGE: &str = "amq.default";
/// The direct reply-to pseudo queue: consuming from it needs no permission.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// The tag that lets a user publish with someone else's `user_id` (§6.3).
pub const IMPERSONATOR_TAG: &str = "impersonator";

/// The type of the exchange an operation routes through, as far as the gateway knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    Topic,
    Other,
    /// The gateway could not learn the type. Treated as [`ExchangeKind::Topic`] (fail
    /// closed: the topic check is applied even where RabbitMQ might skip it).
    Unknown,
    /// Not known yet, but it can be learnt: when (and only when) the topic check fails,
    /// [`decide`] answers [`Verdict::NeedKind`] instead of deciding.
    Unresolved,
    /// The broker said it has no such exchange. RabbitMQ makes no topic check on a missing
    /// exchange: a publish or bind gets its `404 NOT_FOUND`. When the topic check fails,
    /// [`decide`] answers that 404 itself (nothing is forwarded, so an exchange made in the
    /// meantime is never reached unchecked). An unbind, which RabbitMQ would answer
    /// `unbind-ok`, is refused as for a topic exchange (fail closed).
    Missing,
}

/// Who is acting, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context<'a> {
    pub vhost: &'a str,
    pub username: &'a str,
    /// Seconds since the epoch, for policy conditions on the time.
    pub now: i64,
}

/// The decoded methods that need authorisation. Names are as sent by the client; CR and
/// LF are stripped here, like RabbitMQ's `strip_cr_lf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation<'a> {
    /// `alternate_exchange` is the first `alternate-exchange` argument that is a long
    /// string (bytes: RabbitMQ does not require UTF-8 in tables).
    ExchangeDeclare {
        exchange: &'a str,
        passive: bool,
        alternate_exchange: Option<&'a [u8]>,
    },
    ExchangeDelete {
        exchange: &'a str,
    },
    /// `exchange.bind`, or `exchange.unbind` with `unbind` (the same permissions).
    ExchangeBind {
        destination: &'a str,
        source: &'a str,
        routing_key: &'a str,
        source_kind: ExchangeKind,
        unbind: bool,
    },
    /// `queue` `""` must already be replaced by the caller: for a non-passive declare with
    /// a server-name probe (`amq.gen-…`) and `server_named: true`; for a passive declare
    /// with the channel's most recently declared queue. The caller also handles the
    /// direct reply-to pseudo queue, which RabbitMQ answers without any check.
    QueueDeclare {
        queue: &'a str,
        passive: bool,
        server_named: bool,
        /// The first `x-dead-letter-exchange` argument that is a long string.
        dead_letter_exchange: Option<&'a [u8]>,
    },
    QueueDelete {
        queue: &'a str,
    },
    QueuePurge {
        queue: &'a str,
    },
    /// `routing_key` after RabbitMQ's shortcut (`""` queue and key: the queue's name).
    QueueBind {
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        exchange_kind: ExchangeKind,
        /// `queue.unbind` (the same permissions).
        unbind: bool,
    },
    /// Routing keys and `user_id` are bytes: RabbitMQ does not require UTF-8 in a
    /// publish and compares them as binaries.
    BasicPublish {
        exchange: &'a str,
        routing_key: &'a [u8],
        exchange_kind: ExchangeKind,
        user_id: Option<&'a [u8]>,
        /// The values of the `CC` and `BCC` headers, topic-checked from 4.0.3.
        extra_routing_keys: &'a [&'a [u8]],
    },
    BasicConsume {
        queue: &'a str,
    },
    BasicGet {
        queue: &'a str,
    },
}

/// The answer of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward to the broker, which may still refuse it for a structural reason.
    Permit,
    Deny(Denial),
    /// The topic check failed and the exchange's type is [`ExchangeKind::Unresolved`]:
    /// learn it, then decide again. Every check before the topic check has passed.
    NeedKind,
}

/// A refusal, ready to be sent as channel.close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reply_code: u16,
    pub reply_text: String,
    pub class_id: u16,
    pub method_id: u16,
    /// The permission that was missing; `None` for the any-of check of passive declares
    /// and for the `user_id` precondition.
    pub permission: Option<Perm>,
    /// What was refused, for audit records: `queue 'q'`, `topic 'a.b' in exchange 'x'`,
    /// `user_id 'bob'`.
    pub resource: String,
    /// The policy statement that denied it (`<document>:<Sid>`), when an explicit Deny
    /// decided; `None` when the scopes or an implicit deny did.
    pub statement: Option<String>,
}

/// `rabbit_binary_generator:amqp_exception_explanation/2`: `CONSTANT - explanation`, and
/// when longer than 255 bytes, the first 252 bytes plus `...`. RabbitMQ cuts bytes; we
/// back off to a char boundary so the text stays valid UTF-8.
pub fn reply_text(constant: &str, explanation: &str) -> String {
    let mut text = format!("{constant} - {explanation}");
    if text.len() > MAX_REPLY_TEXT {
        let mut cut = MAX_REPLY_TEXT - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[derive(Clone, Copy)]
enum Kind {
    Queue,
    Exchange,
}

impl Kind {
    fn iam(self) -> ResourceKind {
        match self {
            Kind::Queue => ResourceKind::Queue,
            Kind::Exchange => ResourceKind::Exchange,
        }
    }
}

/// One permission check of a decision, as `explain` and `simulate` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The permission and the operation's action.
    pub actions: Vec<&'static str>,
    pub resource: String,
    /// Whether the token's scopes grant it.
    pub scopes: bool,
    /// The policy's answer (`allowed by ...`, `denied by ...`, `no statement applies ...`),
    /// when policies are configured.
    pub policy: Option<String>,
    pub permitted: bool,
}

/// One decision in progress: the permissions, the context and the method being checked.
struct Check<'a> {
    perms: &'a Permissions,
    ctx: &'a Context<'a>,
    class_method: (u16, u16),
    /// The operation's own action (`rabbitmq:Publish`), beside each check's permission.
    action: Action,
    /// The operation's routing key (publish, bind, unbind), for `rabbitmq:RoutingKey`.
    routing_key: Option<&'a [u8]>,
    trace: Option<&'a RefCell<Vec<Trace>>>,
}

fn perm_action(perm: Perm) -> Action {
    match perm {
        Perm::Configure => Action::Configure,
        Perm::Write => Action::Write,
        Perm::Read => Action::Read,
    }
}

/// Scopes and policies combined by the mode: `Err(Some(id))` when a Deny statement
/// decided, `Err(None)` for any other refusal. `evaluate` asks the policies (not called
/// when the scopes alone decide).
fn gate<'b>(
    perms: &'b Permissions,
    scope_ok: bool,
    evaluate: impl FnOnce(&'b iam::Binding) -> Decision<'b>,
) -> Result<(), Option<String>> {
    let Some(b) = perms.policy() else {
        return if scope_ok { Ok(()) } else { Err(None) };
    };
    if !scope_ok && b.mode() != Mode::Policies {
        return Err(None);
    }
    match (b.mode(), evaluate(b)) {
        (_, Decision::Deny(id)) => Err(Some(id.to_owned())),
        (Mode::Scopes, _) | (_, Decision::Allow(_)) => Ok(()),
        (_, Decision::Implicit) => Err(None),
    }
}

/// `connection.open` (and a refreshed token's vhost): any scope for the vhost, and
/// `rabbitmq:Connect` on `arn:aws:rabbitmq:::vhost/<vhost>` under the policies.
/// `Err(Some(id))` names the Deny statement that refused.
pub fn connect(perms: &Permissions, vhost: &str, now: i64) -> Result<(), Option<String>> {
    gate(perms, perms.vhost_access(vhost), |b| {
        b.evaluate(&Request {
            actions: Action::Connect.set(),
            resource: &iam::vhost_arn(vhost),
            vhost,
            routing_key: None,
            now,
        })
    })
}

/// [`connect`] with its trace, for `explain` and `simulate`.
pub fn connect_traced(
    perms: &Permissions,
    vhost: &str,
    now: i64,
) -> (Result<(), Option<String>>, Trace) {
    let arn = iam::vhost_arn(vhost);
    let req = Request {
        actions: Action::Connect.set(),
        resource: &arn,
        vhost,
        routing_key: None,
        now,
    };
    let outcome = connect(perms, vhost, now);
    let trace = Trace {
        actions: vec![Action::Connect.name()],
        resource: arn.clone(),
        scopes: perms.vhost_access(vhost),
        policy: perms.policy().map(|b| b.evaluate(&req).to_string()),
        permitted: outcome.is_ok(),
    };
    (outcome, trace)
}

/// Why a check did not pass.
enum Stop {
    Deny(Denial),
    NeedKind,
}

impl From<Denial> for Stop {
    fn from(d: Denial) -> Stop {
        Stop::Deny(d)
    }
}

impl<'a> Check<'a> {
    fn deny(
        &self,
        code: u16,
        constant: &str,
        text: String,
        perm: Option<Perm>,
        resource: String,
    ) -> Denial {
        let (class_id, method_id) = self.class_method;
        Denial {
            reply_code: code,
            reply_text: reply_text(constant, &text),
            class_id,
            method_id,
            permission: perm,
            resource,
            statement: None,
        }
    }

    /// One permission check: the scopes' answer, combined with the policies' on the
    /// resource `arn` (built only when the policies are asked or a trace is kept).
    /// `routing_key` is the topic check's key; other checks get the operation's.
    fn check(
        &self,
        perm: Perm,
        scope_ok: bool,
        arn: impl Fn() -> String,
        routing_key: Option<&[u8]>,
    ) -> Result<(), Option<String>> {
        let actions = perm_action(perm).set().with(self.action);
        let routing_key = routing_key.or(self.routing_key);
        let (vhost, now) = (self.ctx.vhost, self.ctx.now);
        let ask = |b: &'a iam::Binding, resource: &str| -> Decision<'a> {
            b.evaluate(&Request {
                actions,
                resource,
                vhost,
                routing_key,
                now,
            })
        };
        let outcome = gate(self.perms, scope_ok, |b| ask(b, &arn()));
        if let Some(trace) = self.trace {
            let resource = arn();
            trace.borrow_mut().push(Trace {
                actions: actions.names(),
                policy: self.perms.policy().map(|b| ask(b, &resource).to_string()),
                resource,
                scopes: scope_ok,
                permitted: outcome.is_ok(),
            });
        }
        outcome
    }

    /// `check_resource_access`, including the `""` → `amq.default` rewrite for exchanges.
    fn resource(&self, perm: Perm, kind: Kind, name: &str) -> Result<(), Denial> {
        self.resource_bytes(perm, kind, name.as_bytes())
    }

    /// [`Check::resource`] for a name from a table argument, which need not be UTF-8.
    fn resource_bytes(&self, perm: Perm, kind: Kind, name: &[u8]) -> Result<(), Denial> {
        let (kind_word, name) = resource_name(kind, name);
        let scope_ok = self.perms.resource(perm, self.ctx.vhost, name);
        let arn = || iam::resource_arn(self.ctx.vhost, kind.iam(), name);
        let Err(statement) = self.check(perm, scope_ok, arn, None) else {
            return Ok(());
        };
        let name = String::from_utf8_lossy(name);
        let text = format!(
            "{perm} access to {kind_word} '{name}' in vhost '{}' refused for user '{}'",
            self.ctx.vhost, self.ctx.username
        );
        let resource = format!("{kind_word} '{name}'");
        let mut d = self.deny(ACCESS_REFUSED, "ACCESS_REFUSED", text, Some(perm), resource);
        d.statement = statement;
        Err(d)
    }

    /// Passive declares (4.2.7+): any of read, write or configure. The refusal text has no
    /// permission word; it is derived from the code, not verified against a live 4.2.7.
    fn any(&self, kind: Kind, name: &str) -> Result<(), Denial> {
        let (kind_word, name) = resource_name(kind, name.as_bytes());
        let vhost = self.ctx.vhost;
        let all = [Perm::Read, Perm::Write, Perm::Configure];
        let arn = || iam::resource_arn(vhost, kind.iam(), name);
        let mut statement = None;
        for p in all {
            match self.check(p, self.perms.resource(p, vhost, name), arn, None) {
                Ok(()) => return Ok(()),
                Err(s) => statement = statement.or(s),
            }
        }
        let name = String::from_utf8_lossy(name);
        let text = format!(
            "access to {kind_word} '{name}' in vhost '{vhost}' refused for user '{}'",
            self.ctx.username
        );
        let resource = format!("{kind_word} '{name}'");
        let mut d = self.deny(ACCESS_REFUSED, "ACCESS_REFUSED", text, None, resource);
        d.statement = statement;
        Err(d)
    }

    /// `check_topic_authorisation`: only for topic exchanges (or unknown ones, fail
    /// closed). The default exchange is always direct, so it never gets a topic check.
    /// The type matters only when the permissions do not grant the key: a granted key is
    /// granted whatever the type, so the type is asked for ([`Stop::NeedKind`]) only then.
    fn topic(&self, perm: Perm, kind: ExchangeKind, x: &str, rk: &[u8]) -> Result<(), Stop> {
        if x.is_empty() || kind == ExchangeKind::Other {
            return Ok(());
        }
        let scope_ok = self.perms.topic(perm, self.ctx.vhost, x, rk);
        let arn = || iam::topic_arn(self.ctx.vhost, x, rk);
        let Err(statement) = self.check(perm, scope_ok, arn, Some(rk)) else {
            return Ok(());
        };
        if kind == ExchangeKind::Unresolved {
            return Err(Stop::NeedKind);
        }
        let unbind = matches!(self.action, Action::QueueUnbind | Action::ExchangeUnbind);
        if kind == ExchangeKind::Missing && !unbind {
            // RabbitMQ looks the exchange up before the topic check and stops there.
            let text = format!("no exchange '{x}' in vhost '{}'", self.ctx.vhost);
            let resource = format!("exchange '{x}'");
            let mut d = self.deny(NOT_FOUND, "NOT_FOUND", text, Some(perm), resource);
            d.statement = statement;
            return Err(d.into());
        }
        let rk = String::from_utf8_lossy(rk);
        let text = format!(
            "{perm} access to topic '{rk}' in exchange '{x}' in vhost '{}' refused for user '{}'",
            self.ctx.vhost, self.ctx.username
        );
        let resource = format!("topic '{rk}' in exchange '{x}'");
        let mut d = self.deny(ACCESS_REFUSED, "ACCESS_REFUSED", text, Some(perm), resource);
        d.statement = statement;
        Err(d.into())
    }

    /// §6.3: a `user_id` other than the authenticated user needs the `impersonator` tag.
    /// Compared as bytes, as RabbitMQ compares binaries.
    fn user_id(&self, user_id: Option<&[u8]>) -> Result<(), Denial> {
        match user_id {
            Some(id)
                if id != self.ctx.username.as_bytes() && !self.perms.has_tag(IMPERSONATOR_TAG) =>
            {
                let id = String::from_utf8_lossy(id);
                let text = format!(
                    "user_id property set to '{id}' but authenticated user was '{}'",
                    self.ctx.username
                );
                let resource = format!("user_id '{id}'");
                Err(self.deny(
                    PRECONDITION_FAILED,
                    "PRECONDITION_FAILED",
                    text,
                    None,
                    resource,
                ))
            }
            _ => Ok(()),
        }
    }
}

fn resource_name(kind: Kind, name: &[u8]) -> (&'static str, &[u8]) {
    match kind {
        Kind::Queue => ("queue", name),
        Kind::Exchange if name.is_empty() => ("exchange", DEFAULT_EXCHANGE.as_bytes()),
        Kind::Exchange => ("exchange", name),
    }
}

/// `strip_cr_lf`: RabbitMQ removes CR and LF from queue and exchange names before any
/// check, so a name containing them can never exist; the texts use the stripped name.
pub fn strip_cr_lf(name: &str) -> Cow<'_, str> {
    if name.contains(['\r', '\n']) {
        Cow::Owned(name.replace(['\r', '\n'], ""))
    } else {
        Cow::Borrowed(name)
    }
}

/// Names starting with `amq.` are reserved; RabbitMQ refuses a client-chosen one itself.
fn is_reserved(name: &str) -> bool {
    name.starts_with("amq.")
}

/// Decides whether `op`, the arguments of the client method `method` (class and method
/// ids, for the refusal), is permitted.
pub fn decide(perms: &Permissions, ctx: &Context, op: &Operation, method: (u16, u16)) -> Verdict {
    decide_with(perms, ctx, op, method, None)
}

/// [`decide`], and every permission check it made, in order.
pub fn decide_traced(
    perms: &Permissions,
    ctx: &Context,
    op: &Operation,
    method: (u16, u16),
) -> (Verdict, Vec<Trace>) {
    let trace = RefCell::new(Vec::new());
    let verdict = decide_with(perms, ctx, op, method, Some(&trace));
    (verdict, trace.into_inner())
}

/// The operation's own action, beside the permission of each check.
fn action_of(op: &Operation) -> Action {
    match op {
        Operation::ExchangeDeclare { .. } => Action::ExchangeDeclare,
        Operation::ExchangeDelete { .. } => Action::ExchangeDelete,
        Operation::ExchangeBind { unbind: false, .. } => Action::ExchangeBind,
        Operation::ExchangeBind { unbind: true, .. } => Action::ExchangeUnbind,
        Operation::QueueDeclare { .. } => Action::QueueDeclare,
        Operation::QueueDelete { .. } => Action::QueueDelete,
        Operation::QueuePurge { .. } => Action::QueuePurge,
        Operation::QueueBind { unbind: false, .. } => Action::QueueBind,
        Operation::QueueBind { unbind: true, .. } => Action::QueueUnbind,
        Operation::BasicPublish { .. } => Action::Publish,
        Operation::BasicConsume { .. } => Action::Consume,
        Operation::BasicGet { .. } => Action::Get,
    }
}

fn decide_with(
    perms: &Permissions,
    ctx: &Context,
    op: &Operation,
    method: (u16, u16),
    trace: Option<&RefCell<Vec<Trace>>>,
) -> Verdict {
    let check = Check {
        perms,
        ctx,
        class_method: method,
        action: action_of(op),
        routing_key: match *op {
            Operation::BasicPublish { routing_key, .. } => Some(routing_key),
            Operation::ExchangeBind { routing_key, .. }
            | Operation::QueueBind { routing_key, .. } => Some(routing_key.as_bytes()),
            _ => None,
        },
        trace,
    };
    let outcome: Result<(), Stop> = match *op {
        Operation::ExchangeDeclare {
            exchange,
            passive,
            alternate_exchange,
        } => exchange_declare(&check, &strip_cr_lf(exchange), passive, alternate_exchange)
            .map_err(Stop::from),
        Operation::ExchangeDelete { exchange } => {
            exchange_delete(&check, &strip_cr_lf(exchange)).map_err(Stop::from)
        }
        Operation::ExchangeBind {
            destination,
            source,
            routing_key,
            source_kind,
            unbind: _,
        } => exchange_bind(&check, destination, source, routing_key, source_kind),
        Operation::QueueDeclare {
            queue,
            passive,
            server_named,
            dead_letter_exchange,
        } => {
            let q = strip_cr_lf(queue);
            queue_declare(&check, &q, passive, server_named, dead_letter_exchange)
                .map_err(Stop::from)
        }
        Operation::QueueDelete { queue } => check
            .resource(Perm::Configure, Kind::Queue, &strip_cr_lf(queue))
            .map_err(Stop::from),
        Operation::QueuePurge { queue } => check
            .resource(Perm::Read, Kind::Queue, &strip_cr_lf(queue))
            .map_err(Stop::from),
        Operation::QueueBind {
            queue,
            exchange,
            routing_key,
            exchange_kind,
            unbind: _,
        } => queue_bind(&check, queue, exchange, routing_key, exchange_kind),
        Operation::BasicPublish {
            exchange,
            routing_key,
            exchange_kind,
            user_id,
            extra_routing_keys,
        } => {
            let x = strip_cr_lf(exchange);
            let keys = std::iter::once(routing_key).chain(extra_routing_keys.iter().copied());
            basic_publish(&check, &x, exchange_kind, keys, user_id)
        }
        Operation::BasicConsume { queue } if queue == REPLY_TO => Ok(()),
        Operation::BasicConsume { queue } | Operation::BasicGet { queue } => check
            .resource(Perm::Read, Kind::Queue, &strip_cr_lf(queue))
            .map_err(Stop::from),
    };
    match outcome {
        Ok(()) => Verdict::Permit,
        Err(Stop::Deny(d)) => Verdict::Deny(d),
        Err(Stop::NeedKind) => Verdict::NeedKind,
    }
}

fn exchange_declare(
    check: &Check,
    x: &str,
    passive: bool,
    ae: Option<&[u8]>,
) -> Result<(), Denial> {
    // The default exchange is refused by the broker before any permission check.
    if x.is_empty() {
        return Ok(());
    }
    if passive {
        return check.any(Kind::Exchange, x);
    }
    check.resource(Perm::Configure, Kind::Exchange, x)?;
    // After configure, RabbitMQ either finds the exchange (no AE check) or, for a new
    // `amq.*` name, refuses the reserved prefix before the AE checks: nothing left for us.
    if is_reserved(x) {
        return Ok(());
    }
    match ae {
        // RabbitMQ checks the alternate exchange only when the exchange is new. The
        // gateway cannot know that, so it always checks: stricter, never looser.
        Some(ae) => {
            check.resource(Perm::Read, Kind::Exchange, x)?;
            check.resource_bytes(Perm::Write, Kind::Exchange, ae)
        }
        None => Ok(()),
    }
}

fn exchange_delete(check: &Check, x: &str) -> Result<(), Denial> {
    // The broker refuses the default exchange and `amq.*` before the permission check.
    if x.is_empty() || is_reserved(x) {
        return Ok(());
    }
    check.resource(Perm::Configure, Kind::Exchange, x)
}

fn exchange_bind(
    check: &Check,
    destination: &str,
    source: &str,
    rk: &str,
    source_kind: ExchangeKind,
) -> Result<(), Stop> {
    let (dest, src) = (strip_cr_lf(destination), strip_cr_lf(source));
    check.resource(Perm::Write, Kind::Exchange, &dest)?;
    // The broker refuses the default exchange on either side right after the write check.
    if dest.is_empty() || src.is_empty() {
        return Ok(());
    }
    check.resource(Perm::Read, Kind::Exchange, &src)?;
    check.topic(Perm::Read, source_kind, &src, rk.as_bytes())
}

fn queue_declare(
    check: &Check,
    q: &str,
    passive: bool,
    server_named: bool,
    dlx: Option<&[u8]>,
) -> Result<(), Denial> {
    if passive {
        return check.any(Kind::Queue, q);
    }
    // A client-chosen `amq.*` name is refused by the broker BEFORE the permission check;
    // a server-named probe (`amq.gen-…`) is what the broker would check configure on.
    if !server_named && is_reserved(q) {
        return Ok(());
    }
    check.resource(Perm::Configure, Kind::Queue, q)?;
    match dlx {
        // As for alternate exchanges: RabbitMQ checks only for a new queue; we always do.
        Some(dlx) => {
            check.resource(Perm::Read, Kind::Queue, q)?;
            check.resource_bytes(Perm::Write, Kind::Exchange, dlx)
        }
        None => Ok(()),
    }
}

fn queue_bind(
    check: &Check,
    queue: &str,
    exchange: &str,
    rk: &str,
    kind: ExchangeKind,
) -> Result<(), Stop> {
    let (q, x) = (strip_cr_lf(queue), strip_cr_lf(exchange));
    check.resource(Perm::Write, Kind::Queue, &q)?;
    // The broker refuses binding to the default exchange right after the write check.
    if x.is_empty() {
        return Ok(());
    }
    check.resource(Perm::Read, Kind::Exchange, &x)?;
    check.topic(Perm::Read, kind, &x, rk.as_bytes())
}

fn basic_publish<'k>(
    check: &Check,
    x: &str,
    kind: ExchangeKind,
    routing_keys: impl Iterator<Item = &'k [u8]>,
    user_id: Option<&[u8]>,
) -> Result<(), Stop> {
    check.resource(Perm::Write, Kind::Exchange, x)?;
    // 4.0.3+: the routing key, then every CC and BCC key, each topic-checked.
    for rk in routing_keys {
        check.topic(Perm::Write, kind, x, rk)?;
    }
    Ok(check.user_id(user_id)?)
}
