//! Broker resource policies in IAM's JSON grammar: what a principal may do on the broker,
//! decided from every claim of its token (the nested `https://sts.amazonaws.com/` object
//! included), its connection and the operation.
//!
//! Three stages, so that the relay path pays only for what changes per operation:
//! 1. [`PolicySet::compile`] (at load and reload): documents → statements, every error
//!    with its JSON path; actions become a bit set, patterns are compiled.
//! 2. [`Binding::new`] (once per connection and per refreshed token): statements whose
//!    `Principal` does not name the principal are dropped; policy variables are replaced;
//!    conditions on keys fixed for the connection (tags, account, organisation, source
//!    address, TLS, issue time) are decided, so statements they rule out are dropped too.
//! 3. [`Binding::evaluate`] (per permission check): the action bits, the resource ARN and
//!    the conditions left (time, vhost, routing key). IAM's logic: an explicit Deny wins,
//!    then any Allow; otherwise the request is implicitly denied.
//!
//! Invariant: pure, like the rest of `authz` (the caller passes the time).

mod condition;
mod glob;
mod json;
mod keys;
mod parse;

use std::fmt;
use std::sync::Arc;

pub use condition::{Condition, Op, Operator, SetOp, date, iso8601};
pub use glob::{ArnPattern, Pattern};
pub use keys::{Facts, Key, Value};
pub use parse::{Effect, MAX_DOCUMENT_BYTES, PrincipalPat, Statement};

/// The actions of the broker, each with the one-line meaning the documentation gives.
/// `Connect` is checked on a vhost; the three permissions and the per-operation actions on
/// queues, exchanges and topics. Every check carries two names: the permission RabbitMQ
/// would check (`rabbitmq:Write`) and the operation asking (`rabbitmq:Publish`); a
/// statement's `Action` applies when it names either, `NotAction` when it names neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Connect,
    Configure,
    Write,
    Read,
    ExchangeDeclare,
    ExchangeDelete,
    ExchangeBind,
    ExchangeUnbind,
    QueueDeclare,
    QueueDelete,
    QueuePurge,
    QueueBind,
    QueueUnbind,
    Publish,
    Consume,
    Get,
}

const ACTIONS: [(Action, &str); 16] = [
    (Action::Connect, "rabbitmq:Connect"),
    (Action::Configure, "rabbitmq:Configure"),
    (Action::Write, "rabbitmq:Write"),
    (Action::Read, "rabbitmq:Read"),
    (Action::ExchangeDeclare, "rabbitmq:ExchangeDeclare"),
    (Action::ExchangeDelete, "rabbitmq:ExchangeDelete"),
    (Action::ExchangeBind, "rabbitmq:ExchangeBind"),
    (Action::ExchangeUnbind, "rabbitmq:ExchangeUnbind"),
    (Action::QueueDeclare, "rabbitmq:QueueDeclare"),
    (Action::QueueDelete, "rabbitmq:QueueDelete"),
    (Action::QueuePurge, "rabbitmq:QueuePurge"),
    (Action::QueueBind, "rabbitmq:QueueBind"),
    (Action::QueueUnbind, "rabbitmq:QueueUnbind"),
    (Action::Publish, "rabbitmq:Publish"),
    (Action::Consume, "rabbitmq:Consume"),
    (Action::Get, "rabbitmq:Get"),
];

impl Action {
    /// Every action, in documentation order.
    pub const ALL: [Action; 16] = {
        let mut all = [Action::Connect; 16];
        let mut i = 0;
        while i < 16 {
            all[i] = ACTIONS[i].0;
            i += 1;
        }
        all
    };

    pub fn name(self) -> &'static str {
        ACTIONS[self as usize].1
    }

    /// Every action name, in documentation order.
    pub fn names() -> Vec<&'static str> {
        ACTIONS.iter().map(|(_, n)| *n).collect()
    }

    /// The actions a written pattern names: IAM matches action names without regard to
    /// case, with `*` and `?`.
    pub fn matching(pattern: &str) -> ActionSet {
        let p = Pattern::wild(&pattern.to_ascii_lowercase());
        ACTIONS
            .iter()
            .filter(|(_, n)| p.matches(n.to_ascii_lowercase().as_bytes()))
            .fold(ActionSet::EMPTY, |s, (a, _)| s.with(*a))
    }

    pub fn set(self) -> ActionSet {
        ActionSet(1 << self as u32)
    }
}

/// A set of actions, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActionSet(u32);

impl ActionSet {
    pub const EMPTY: ActionSet = ActionSet(0);

    pub fn with(self, a: Action) -> ActionSet {
        ActionSet(self.0 | a.set().0)
    }
    pub fn union(self, o: ActionSet) -> ActionSet {
        ActionSet(self.0 | o.0)
    }
    pub fn intersects(self, o: ActionSet) -> bool {
        self.0 & o.0 != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn names(self) -> Vec<&'static str> {
        ACTIONS
            .iter()
            .filter(|(a, _)| self.intersects(a.set()))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// How policies and scopes combine (`[authorization] mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The token's scopes decide, as RabbitMQ's OAuth 2.0 plugin would; a policy can only
    /// take away (an explicit Deny).
    #[default]
    Scopes,
    /// Policies alone: an Allow is needed and no Deny may apply; scopes are not consulted.
    Policies,
    /// Both must allow: the policy is a permission boundary on the scopes.
    Both,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "scopes" => Some(Mode::Scopes),
            "policies" => Some(Mode::Policies),
            "both" => Some(Mode::Both),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Scopes => "scopes",
            Mode::Policies => "policies",
            Mode::Both => "both",
        }
    }
}

/// A problem in a policy document: which document, where in it (`$.Statement[2].Effect`),
/// and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{document}: {path}: {message}")]
pub struct PolicyError {
    pub document: String,
    pub path: String,
    pub message: String,
}

/// The compiled statements of every configured document, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    statements: Vec<Statement>,
}

/// Numbers in policies are finite (NaN cannot be written in JSON).
impl Eq for PolicySet {}

impl PolicySet {
    /// Compiles `(name, text)` documents; every error of every document at once.
    pub fn compile(documents: &[(String, String)]) -> Result<PolicySet, Vec<PolicyError>> {
        let mut statements = Vec::new();
        let mut errors = Vec::new();
        for (name, text) in documents {
            match parse::document(name, text) {
                Ok(s) => statements.extend(s),
                Err(e) => errors.extend(e),
            }
        }
        if errors.is_empty() {
            Ok(PolicySet { statements })
        } else {
            Err(errors)
        }
    }

    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }
}

/// What [`Binding::evaluate`] decided, naming the statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow(&'a str),
    Deny(&'a str),
    /// No statement applied.
    Implicit,
}

/// One permission check to decide.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The permission and the operation (see [`Action`]).
    pub actions: ActionSet,
    /// `arn:aws:rabbitmq:::vhost/...` (see [`resource_arn`]).
    pub resource: &'a str,
    pub vhost: &'a str,
    /// The routing key of the operation, when it has one.
    pub routing_key: Option<&'a [u8]>,
    /// Seconds since the epoch.
    pub now: i64,
}

#[derive(Clone, Debug, PartialEq)]
struct Bound {
    id: Arc<str>,
    effect: Effect,
    actions: ActionSet,
    not_action: bool,
    resources: Vec<ArnPattern>,
    not_resource: bool,
    /// Only conditions on per-operation keys; the rest were decided at binding.
    conditions: Vec<Condition>,
}

/// A policy set bound to one principal and connection: the statements that can still
/// apply to it, variables replaced and fixed conditions decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    mode: Mode,
    statements: Vec<Bound>,
}

/// Numbers in policies are finite (NaN cannot be written in JSON).
impl Eq for Binding {}

impl Binding {
    pub fn new(set: &PolicySet, mode: Mode, facts: &Facts) -> Binding {
        let lookup = |k: &Key| keys::variable_text(facts, k);
        let statements = set
            .statements
            .iter()
            .filter(|s| principal_applies(s, facts))
            .filter_map(|s| {
                // A variable without a value fails closed: an Allow statement cannot
                // apply there, a Deny statement applies as if its condition held and its
                // resource had `*` in the variable's place.
                let deny = s.effect == Effect::Deny;
                let mut conditions = Vec::new();
                for c in &s.conditions {
                    let compiled = Condition {
                        operator: c.operator,
                        key: c.key.clone(),
                        values: c
                            .values
                            .iter()
                            .map(|w| condition::resolve(c.operator.op, w, &lookup))
                            .collect(),
                    };
                    if compiled
                        .values
                        .iter()
                        .any(|v| matches!(v, condition::Operand::Never))
                    {
                        if deny {
                            continue;
                        }
                        return None;
                    }
                    if c.key.per_request() {
                        conditions.push(compiled);
                    } else if !compiled.holds(keys::fixed_values(facts, &c.key).as_deref()) {
                        return None;
                    }
                }
                Some(Bound {
                    id: s.id.clone(),
                    effect: s.effect,
                    actions: s.actions,
                    not_action: s.not_action,
                    resources: s
                        .resources
                        .iter()
                        // Under NotResource, the wider pattern is the narrower statement.
                        .filter_map(|r| r.pattern_or_wild(&lookup, deny != s.not_resource))
                        .collect(),
                    not_resource: s.not_resource,
                    conditions,
                })
            })
            .collect();
        Binding { mode, statements }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The statements left after binding.
    pub fn len(&self) -> usize {
        self.statements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// The policies' answer on their own, by the mode (for the management API, where the
    /// broker checks the scopes itself): a Deny refuses, naming its statement; in
    /// `policies` and `both` an Allow is needed, in `scopes` it is not.
    pub fn permits(&self, req: &Request) -> Result<(), Option<&str>> {
        match self.evaluate(req) {
            Decision::Deny(id) => Err(Some(id)),
            Decision::Allow(_) => Ok(()),
            Decision::Implicit if self.mode == Mode::Scopes => Ok(()),
            Decision::Implicit => Err(None),
        }
    }

    /// IAM's evaluation: the first Deny that applies wins; else the first Allow; else
    /// an implicit deny.
    pub fn evaluate(&self, req: &Request) -> Decision<'_> {
        let mut allow = None;
        for s in &self.statements {
            if s.actions.intersects(req.actions) == s.not_action {
                continue;
            }
            let hit = s.resources.iter().any(|r| r.matches(req.resource));
            if hit == s.not_resource {
                continue;
            }
            if !s.conditions.iter().all(|c| {
                let v = per_request(&c.key, req);
                c.holds(v.as_ref().map(std::slice::from_ref))
            }) {
                continue;
            }
            match s.effect {
                Effect::Deny => return Decision::Deny(&s.id),
                Effect::Allow => {
                    allow.get_or_insert(&*s.id);
                }
            }
        }
        allow.map_or(Decision::Implicit, Decision::Allow)
    }
}

fn per_request<'a>(key: &Key, req: &Request<'a>) -> Option<Value<'a>> {
    match key {
        Key::CurrentTime => Some(Value::Time(req.now)),
        Key::EpochTime => Some(Value::Int(req.now)),
        Key::Vhost => Some(Value::Str(req.vhost.into())),
        Key::RoutingKey => req
            .routing_key
            .map(|k| Value::Str(String::from_utf8_lossy(k))),
        _ => None,
    }
}

fn principal_applies(s: &Statement, facts: &Facts) -> bool {
    let named = s.principals.iter().any(|p| match p {
        PrincipalPat::Any => true,
        PrincipalPat::Account(a) => facts.account.as_deref() == Some(a.as_str()),
        PrincipalPat::Arn(pat) => facts
            .principal_arn
            .as_deref()
            .is_some_and(|arn| pat.matches(arn)),
    });
    named != s.not_principal
}

/// The kinds of resource a check is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    Queue,
    Exchange,
}

/// Writes a name into an ARN: `/` and `%` as `%2F` and `%25` (as RabbitMQ's management
/// API writes the default vhost `/`), and bytes that are not UTF-8 as `%XX`.
fn push_escaped(out: &mut String, name: &[u8]) {
    if name.iter().all(|&b| b != b'/' && b != b'%' && b < 0x80) {
        // ASCII without '/' or '%': as it is (the common case, on every check).
        out.push_str(std::str::from_utf8(name).unwrap_or_default());
        return;
    }
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '/' => out.push_str("%2F"),
                '%' => out.push_str("%25"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// `arn:aws:rabbitmq:::vhost/<vhost>`.
pub fn vhost_arn(vhost: &str) -> String {
    vhost_arn_with_room(vhost, 0)
}

/// The vhost's ARN in a string with room for `more` bytes after it.
fn vhost_arn_with_room(vhost: &str, more: usize) -> String {
    let mut s = String::with_capacity(40 + vhost.len() + more);
    s.push_str("arn:aws:rabbitmq:::vhost/");
    push_escaped(&mut s, vhost.as_bytes());
    s
}

/// `arn:aws:rabbitmq:::vhost/<vhost>/queue/<name>` or `.../exchange/<name>`.
pub fn resource_arn(vhost: &str, kind: ResourceKind, name: &[u8]) -> String {
    let mut s = vhost_arn_with_room(vhost, name.len());
    s.push_str(match kind {
        ResourceKind::Queue => "/queue/",
        ResourceKind::Exchange => "/exchange/",
    });
    push_escaped(&mut s, name);
    s
}

/// `arn:aws:rabbitmq:::vhost/<vhost>/topic/<exchange>/<routing key>`.
pub fn topic_arn(vhost: &str, exchange: &str, routing_key: &[u8]) -> String {
    let mut s = vhost_arn_with_room(vhost, exchange.len() + routing_key.len());
    s.push_str("/topic/");
    push_escaped(&mut s, exchange.as_bytes());
    s.push('/');
    push_escaped(&mut s, routing_key);
    s
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow(id) => write!(f, "allowed by {id}"),
            Decision::Deny(id) => write!(f, "denied by {id}"),
            Decision::Implicit => f.write_str("no statement applies (implicit deny)"),
        }
    }
}

#[cfg(test)]
mod tests;
