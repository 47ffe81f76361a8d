//! The permission table built from a token's final scopes (spec §4.1, §4.3).
//!
//! `<perm>:<vhost>/<name>[/<routing key>]`, each part a RabbitMQ wildcard pattern
//! ([`Pattern`]). Scopes that do not fit the grammar are ignored, as RabbitMQ ignores them.
//!
//! Invariant: pure and read-only after construction; it answers "is this granted?" and
//! knows nothing about AMQP methods (that is `authz::decide`).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use super::iam::Binding;

use super::wildcard::Pattern;

/// A RabbitMQ permission. Scopes spell them in lower case, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Perm {
    Configure,
    Write,
    Read,
}

impl Perm {
    /// The word used in scopes and in RabbitMQ's refusal texts.
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Configure => "configure",
            Perm::Write => "write",
            Perm::Read => "read",
        }
    }

    /// Case-sensitive, like `rabbit_oauth2_scope` (`READ:` is not a permission).
    fn parse(word: &str) -> Option<Perm> {
        match word {
            "configure" => Some(Perm::Configure),
            "write" => Some(Perm::Write),
            "read" => Some(Perm::Read),
            _ => None,
        }
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed permission scope. `routing_key` is `Some` only for 3-part scopes, which are
/// the only ones that grant topic access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub perm: Perm,
    pub vhost: Pattern,
    pub name: Pattern,
    pub routing_key: Option<Pattern>,
}

impl Grant {
    /// `rabbit_oauth2_scope:parse_permission_pattern/1`: split on **every** `/`; exactly 2
    /// parts is a resource grant, exactly 3 a resource and topic grant, anything else is
    /// ignored (a literal `/` must be written `%2F`).
    pub fn parse(scope: &str) -> Option<Grant> {
        let (word, rest) = scope.split_once(':')?;
        let perm = Perm::parse(word)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (vhost, name, routing_key) = match parts.as_slice() {
            [v, n] => (v, n, None),
            [v, n, rk] => (v, n, Some(Pattern::compile(rk))),
            _ => return None,
        };
        Some(Grant {
            perm,
            vhost: Pattern::compile(vhost),
            name: Pattern::compile(name),
            routing_key,
        })
    }
}

/// What a token may do: its grants and its user tags, and the broker policies bound to
/// its principal when `[authorization]` has any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    grants: Vec<Grant>,
    tags: Vec<String>,
    policy: Option<Arc<Binding>>,
}

impl Permissions {
    /// Builds the table from final scopes (prefix already stripped). `tag:<name>` scopes
    /// (non-empty names) become tags; every other scope is parsed as a grant or ignored.
    pub fn from_scopes(scopes: &[String]) -> Permissions {
        let mut tags = BTreeSet::new();
        let mut grants = Vec::new();
        for scope in scopes {
            if let Some(tag) = scope.strip_prefix("tag:") {
                if !tag.is_empty() {
                    tags.insert(tag.to_owned());
                }
            } else if let Some(grant) = Grant::parse(scope) {
                grants.push(grant);
            }
        }
        Permissions {
            grants,
            tags: tags.into_iter().collect(),
            policy: None,
        }
    }

    /// The same scopes, decided together with `policy` ([`crate::authz::decide`]).
    pub fn with_policy(mut self, policy: Arc<Binding>) -> Permissions {
        self.policy = Some(policy);
        self
    }

    /// The same scopes with another binding of the broker policies (`None`: none).
    pub fn rebound(&self, policy: Option<Arc<Binding>>) -> Permissions {
        Permissions {
            grants: self.grants.clone(),
            tags: self.tags.clone(),
            policy,
        }
    }

    /// The broker policies bound to this principal, if any.
    pub fn policy(&self) -> Option<&Binding> {
        self.policy.as_deref()
    }

    /// The parsed grants, in scope order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// `connection.open`: any grant (of any permission, 2- or 3-part) whose vhost pattern
    /// matches. The name is irrelevant, and tags do not count.
    pub fn vhost_access(&self, vhost: &str) -> bool {
        self.grants
            .iter()
            .any(|g| g.vhost.matches(vhost.as_bytes()))
    }

    /// Queue or exchange access: the same permission, a matching vhost and name. A 3-part
    /// grant counts too and its routing-key part is ignored; the resource kind is not
    /// distinguished (one pattern covers queues and exchanges).
    pub fn resource(&self, perm: Perm, vhost: &str, name: impl AsRef<[u8]>) -> bool {
        let name = name.as_ref();
        self.grants
            .iter()
            .any(|g| g.perm == perm && g.vhost.matches(vhost.as_bytes()) && g.name.matches(name))
    }

    /// Topic access: only 3-part grants with the same permission and matching vhost,
    /// exchange and routing key.
    pub fn topic(
        &self,
        perm: Perm,
        vhost: &str,
        exchange: &str,
        routing_key: impl AsRef<[u8]>,
    ) -> bool {
        let routing_key = routing_key.as_ref();
        self.grants.iter().any(|g| {
            g.perm == perm
                && g.routing_key
                    .as_ref()
                    .is_some_and(|rk| rk.matches(routing_key))
                && g.vhost.matches(vhost.as_bytes())
                && g.name.matches(exchange.as_bytes())
        })
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Sorted and deduplicated.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }
}
