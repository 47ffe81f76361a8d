//! Condition keys: what a policy can ask about the principal, its connection and the
//! operation, and where each value comes from.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// A condition key the gateway can answer. Names are matched without regard to case, as
/// IAM matches them; so are the tag keys after `aws:PrincipalTag/` and `aws:RequestTag/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    PrincipalArn,
    PrincipalAccount,
    PrincipalOrgId,
    PrincipalOrgPaths,
    /// The tag key, in lower case.
    PrincipalTag(String),
    RequestTag(String),
    TagKeys,
    RequestedRegion,
    SourceIp,
    SecureTransport,
    TokenIssueTime,
    CurrentTime,
    EpochTime,
    Vhost,
    RoutingKey,
}

/// The keys with fixed names, as documented (the canonical spelling).
const NAMED: &[(&str, Key)] = &[
    ("aws:PrincipalArn", Key::PrincipalArn),
    ("aws:PrincipalAccount", Key::PrincipalAccount),
    ("aws:PrincipalOrgID", Key::PrincipalOrgId),
    ("aws:PrincipalOrgPaths", Key::PrincipalOrgPaths),
    ("aws:TagKeys", Key::TagKeys),
    ("aws:RequestedRegion", Key::RequestedRegion),
    ("aws:SourceIp", Key::SourceIp),
    ("aws:SecureTransport", Key::SecureTransport),
    ("aws:TokenIssueTime", Key::TokenIssueTime),
    ("aws:CurrentTime", Key::CurrentTime),
    ("aws:EpochTime", Key::EpochTime),
    ("rabbitmq:Vhost", Key::Vhost),
    ("rabbitmq:RoutingKey", Key::RoutingKey),
];

impl Key {
    pub fn parse(name: &str) -> Result<Key, String> {
        let lower = name.to_ascii_lowercase();
        for (prefix, make) in [
            ("aws:principaltag/", Key::PrincipalTag as fn(String) -> Key),
            ("aws:requesttag/", Key::RequestTag),
        ] {
            if let Some(tag) = lower.strip_prefix(prefix) {
                if tag.is_empty() {
                    return Err(format!("{name}: the tag key is missing"));
                }
                return Ok(make(tag.to_owned()));
            }
        }
        NAMED
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, k)| k.clone())
            .ok_or_else(|| {
                let known: Vec<&str> = NAMED.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown condition key {name:?}; the gateway knows {}, aws:PrincipalTag/<key> and aws:RequestTag/<key>",
                    known.join(", ")
                )
            })
    }

    /// The canonical name.
    pub fn name(&self) -> String {
        match self {
            Key::PrincipalTag(t) => format!("aws:PrincipalTag/{t}"),
            Key::RequestTag(t) => format!("aws:RequestTag/{t}"),
            other => NAMED
                .iter()
                .find(|(_, k)| k == other)
                .map_or_else(String::new, |(n, _)| (*n).to_owned()),
        }
    }

    /// Keys with several values, which need `ForAnyValue:` or `ForAllValues:`.
    pub fn multivalued(&self) -> bool {
        matches!(self, Key::TagKeys | Key::PrincipalOrgPaths)
    }

    /// Keys whose value differs from one operation to the next; every other key is fixed
    /// for a connection, and conditions on them are decided once, when it opens.
    pub fn per_request(&self) -> bool {
        matches!(
            self,
            Key::CurrentTime | Key::EpochTime | Key::Vhost | Key::RoutingKey
        )
    }
}

/// What is known about a connection's principal and the connection itself, fixed while it
/// lasts: read from the verified token's claims (the nested `https://sts.amazonaws.com/`
/// object included) and from the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub principal_arn: Option<String>,
    pub account: Option<String>,
    pub org_id: Option<String>,
    pub org_paths: Vec<String>,
    /// Keys in lower case.
    pub principal_tags: BTreeMap<String, String>,
    /// Keys in lower case.
    pub request_tags: BTreeMap<String, String>,
    /// The request tags' keys as the token spells them (`aws:TagKeys`).
    pub tag_keys: Vec<String>,
    pub region: Option<String>,
    /// The token's `iat`.
    pub issued_at: Option<i64>,
    /// The client's address (the PROXY header's, when the listener reads one).
    pub source_ip: Option<IpAddr>,
    /// Whether the client reached the gateway over TLS.
    pub secure_transport: bool,
}

impl Facts {
    /// Adds a principal tag (the key is matched in lower case).
    pub fn principal_tag(&mut self, k: &str, v: &str) {
        self.principal_tags
            .entry(k.to_ascii_lowercase())
            .or_insert_with(|| v.to_owned());
    }

    /// Adds a request tag, also to `aws:TagKeys`.
    pub fn request_tag(&mut self, k: &str, v: &str) {
        self.tag_keys.push(k.to_owned());
        self.request_tags
            .entry(k.to_ascii_lowercase())
            .or_insert_with(|| v.to_owned());
    }
}

/// One value of a key, in its natural type; operators convert (a time is an ISO 8601
/// string to `StringLike` and a number of seconds to `DateLessThan`).
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    Str(std::borrow::Cow<'a, str>),
    /// Seconds since the epoch, a date.
    Time(i64),
    /// Seconds since the epoch, a number (`aws:EpochTime`).
    Int(i64),
    Bool(bool),
    Ip(IpAddr),
}

/// The fixed part of the context: `None` when the key is absent (or per-request).
pub fn fixed_values<'a>(facts: &'a Facts, key: &Key) -> Option<Vec<Value<'a>>> {
    let s = |v: &'a Option<String>| v.as_deref().map(|v| vec![Value::Str(v.into())]);
    match key {
        Key::PrincipalArn => s(&facts.principal_arn),
        Key::PrincipalAccount => s(&facts.account),
        Key::PrincipalOrgId => s(&facts.org_id),
        Key::RequestedRegion => s(&facts.region),
        Key::PrincipalOrgPaths => Some(
            facts
                .org_paths
                .iter()
                .map(|p| Value::Str(p.as_str().into()))
                .collect(),
        ),
        Key::TagKeys => Some(
            facts
                .tag_keys
                .iter()
                .map(|p| Value::Str(p.as_str().into()))
                .collect(),
        ),
        Key::PrincipalTag(t) => facts
            .principal_tags
            .get(t)
            .map(|v| vec![Value::Str(v.as_str().into())]),
        Key::RequestTag(t) => facts
            .request_tags
            .get(t)
            .map(|v| vec![Value::Str(v.as_str().into())]),
        Key::SourceIp => facts.source_ip.map(|ip| vec![Value::Ip(ip)]),
        Key::SecureTransport => Some(vec![Value::Bool(facts.secure_transport)]),
        Key::TokenIssueTime => facts.issued_at.map(|t| vec![Value::Time(t)]),
        Key::CurrentTime | Key::EpochTime | Key::Vhost | Key::RoutingKey => None,
    }
}

/// A key's value as text, for policy variables (single-valued keys only).
pub fn variable_text(facts: &Facts, key: &Key) -> Option<String> {
    let values = fixed_values(facts, key)?;
    let v = values.first()?;
    Some(match v {
        Value::Str(s) => s.to_string(),
        Value::Time(t) => super::condition::iso8601(*t),
        Value::Int(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Ip(ip) => ip.to_string(),
    })
}
