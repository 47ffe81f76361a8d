//! Condition operators, IAM's families: `String*`, `Numeric*`, `Date*`, `Bool`,
//! `IpAddress`/`NotIpAddress`, `Arn*` and `Null`; each (but `Null`) with `...IfExists`,
//! and the set operators `ForAnyValue:` and `ForAllValues:`.
//!
//! Semantics, as IAM documents them:
//! - several values for one key: any of them may match (OR); a negated operator
//!   (`StringNotEquals`, ...) holds when none matches;
//! - a key absent from the context: a positive operator is false, a negated one true,
//!   any `...IfExists` true; `ForAnyValue:` is false and `ForAllValues:` true on an absent
//!   or empty key;
//! - `Null: {"k": "true"}` holds when the key is absent, `"false"` when it is present.

use std::net::IpAddr;

use ipnet::IpNet;
use time::OffsetDateTime;
use time::format_description::well_known::{Iso8601, Rfc3339};

use super::glob::{ArnPattern, ArnTemplate, Pattern, Template};
use super::keys::{Key, Value};

/// The base operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    NumericEquals,
    NumericNotEquals,
    NumericLessThan,
    NumericLessThanEquals,
    NumericGreaterThan,
    NumericGreaterThanEquals,
    DateEquals,
    DateNotEquals,
    DateLessThan,
    DateLessThanEquals,
    DateGreaterThan,
    DateGreaterThanEquals,
    Bool,
    IpAddress,
    NotIpAddress,
    ArnEquals,
    ArnLike,
    ArnNotEquals,
    ArnNotLike,
    Null,
}

const OPS: &[(&str, Op)] = &[
    ("StringEquals", Op::StringEquals),
    ("StringNotEquals", Op::StringNotEquals),
    ("StringEqualsIgnoreCase", Op::StringEqualsIgnoreCase),
    ("StringNotEqualsIgnoreCase", Op::StringNotEqualsIgnoreCase),
    ("StringLike", Op::StringLike),
    ("StringNotLike", Op::StringNotLike),
    ("NumericEquals", Op::NumericEquals),
    ("NumericNotEquals", Op::NumericNotEquals),
    ("NumericLessThan", Op::NumericLessThan),
    ("NumericLessThanEquals", Op::NumericLessThanEquals),
    ("NumericGreaterThan", Op::NumericGreaterThan),
    ("NumericGreaterThanEquals", Op::NumericGreaterThanEquals),
    ("DateEquals", Op::DateEquals),
    ("DateNotEquals", Op::DateNotEquals),
    ("DateLessThan", Op::DateLessThan),
    ("DateLessThanEquals", Op::DateLessThanEquals),
    ("DateGreaterThan", Op::DateGreaterThan),
    ("DateGreaterThanEquals", Op::DateGreaterThanEquals),
    ("Bool", Op::Bool),
    ("IpAddress", Op::IpAddress),
    ("NotIpAddress", Op::NotIpAddress),
    ("ArnEquals", Op::ArnEquals),
    ("ArnLike", Op::ArnLike),
    ("ArnNotEquals", Op::ArnNotEquals),
    ("ArnNotLike", Op::ArnNotLike),
    ("Null", Op::Null),
];

impl Op {
    /// The negated operators: true when no value matches, and on an absent key.
    pub fn negated(self) -> bool {
        matches!(
            self,
            Op::StringNotEquals
                | Op::StringNotEqualsIgnoreCase
                | Op::StringNotLike
                | Op::NumericNotEquals
                | Op::DateNotEquals
                | Op::NotIpAddress
                | Op::ArnNotEquals
                | Op::ArnNotLike
        )
    }
}

/// `ForAnyValue:` / `ForAllValues:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOp {
    Single,
    AnyValue,
    AllValues,
}

/// A parsed operator name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operator {
    pub op: Op,
    pub set: SetOp,
    pub if_exists: bool,
}

impl Operator {
    /// `ForAllValues:StringLikeIfExists` and the like. Operator names are case-sensitive in
    /// IAM's grammar, and so they are here.
    pub fn parse(name: &str) -> Result<Operator, String> {
        let (set, rest) = if let Some(r) = name.strip_prefix("ForAnyValue:") {
            (SetOp::AnyValue, r)
        } else if let Some(r) = name.strip_prefix("ForAllValues:") {
            (SetOp::AllValues, r)
        } else {
            (SetOp::Single, name)
        };
        let (base, if_exists) = match rest.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (rest, false),
        };
        let op = OPS
            .iter()
            .find(|(n, _)| *n == base)
            .map(|(_, o)| *o)
            .ok_or_else(|| {
                if base == "BinaryEquals" {
                    "BinaryEquals: no condition key of the gateway is binary".to_owned()
                } else {
                    format!("unknown condition operator {name:?}")
                }
            })?;
        if op == Op::Null && (if_exists || set != SetOp::Single) {
            return Err(format!(
                "{name}: Null takes neither IfExists nor a set operator"
            ));
        }
        Ok(Operator { op, set, if_exists })
    }
}

/// One value of a condition, compiled for its operator.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Str(String),
    Lower(String),
    Glob(Pattern),
    Arn(ArnPattern),
    Num(f64),
    Date(i64),
    Bool(bool),
    Net(IpNet),
    /// `Null`'s `true` (the key must be absent) or `false`.
    Absent(bool),
    /// A variable without value: matches nothing.
    Never,
}

/// A condition value as written: compiled now, or once the variables are known.
#[derive(Clone, Debug, PartialEq)]
pub enum Written {
    Ready(Operand),
    Template(Template),
    Arn(ArnTemplate),
}

/// Compiles one written value (`text`: a JSON string, number or boolean as text).
pub fn compile_value(op: Op, text: &str, variables: bool) -> Result<Written, String> {
    if matches!(
        op,
        Op::ArnEquals | Op::ArnLike | Op::ArnNotEquals | Op::ArnNotLike
    ) {
        let t = ArnTemplate::parse(text, variables)?;
        return Ok(match t.pattern(&|_| None) {
            Some(p) if !t.has_vars() => Written::Ready(Operand::Arn(p)),
            _ => Written::Arn(t),
        });
    }
    let t = Template::parse(text, variables)?;
    if t.has_vars() {
        if matches!(op, Op::Null | Op::Bool) {
            return Err(format!("{text:?}: {op:?} takes no policy variables"));
        }
        return Ok(Written::Template(t));
    }
    let text = t.text(&|_| None).unwrap_or_default();
    operand(op, &text).map(Written::Ready)
}

/// A value for `op`, from its text (a variable already replaced).
pub fn operand(op: Op, text: &str) -> Result<Operand, String> {
    use Op::*;
    Ok(match op {
        StringEquals | StringNotEquals => Operand::Str(text.to_owned()),
        StringEqualsIgnoreCase | StringNotEqualsIgnoreCase => Operand::Lower(text.to_lowercase()),
        StringLike | StringNotLike => Operand::Glob(Pattern::wild(text)),
        NumericEquals | NumericNotEquals | NumericLessThan | NumericLessThanEquals
        | NumericGreaterThan | NumericGreaterThanEquals => Operand::Num(
            number(text).ok_or_else(|| format!("{text:?} is not a number"))?,
        ),
        DateEquals | DateNotEquals | DateLessThan | DateLessThanEquals | DateGreaterThan
        | DateGreaterThanEquals => Operand::Date(date(text).ok_or_else(|| {
            format!("{text:?} is not a date (ISO 8601, such as 2026-12-31T23:59:59Z, or seconds since the epoch)")
        })?),
        Bool => Operand::Bool(boolean(text).ok_or_else(|| format!("{text:?} is not true or false"))?),
        IpAddress | NotIpAddress => Operand::Net(
            cidr(text).ok_or_else(|| format!("{text:?} is not an IP address or CIDR block"))?,
        ),
        ArnEquals | ArnLike | ArnNotEquals | ArnNotLike => {
            let t = ArnTemplate::parse(text, false)?;
            Operand::Arn(t.pattern(&|_| None).expect("no variables"))
        }
        Null => Operand::Absent(boolean(text).ok_or_else(|| format!("{text:?} is not true or false"))?),
    })
}

/// A value with its variables replaced; one that cannot be read (a tag value that is not
/// a number, for a `Numeric` operator) matches nothing.
pub fn resolve(op: Op, w: &Written, lookup: &dyn Fn(&Key) -> Option<String>) -> Operand {
    match w {
        Written::Ready(o) => o.clone(),
        Written::Arn(t) => t.pattern(lookup).map_or(Operand::Never, Operand::Arn),
        Written::Template(t) => match op {
            Op::StringLike | Op::StringNotLike => {
                t.pattern(lookup).map_or(Operand::Never, Operand::Glob)
            }
            _ => t
                .text(lookup)
                .and_then(|s| operand(op, &s).ok())
                .unwrap_or(Operand::Never),
        },
    }
}

fn number(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.is_empty() || t.contains(['x', 'X', 'e', 'E', 'n', 'N', 'i', 'I']) {
        return None;
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

fn boolean(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A date: ISO 8601 (`2026-12-31T23:59:59Z`, with an offset or fractions, or a bare
/// `2026-12-31`, which is midnight UTC) or seconds since the epoch.
pub fn date(text: &str) -> Option<i64> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().ok();
    }
    if let Ok(d) = OffsetDateTime::parse(t, &Rfc3339) {
        return Some(d.unix_timestamp());
    }
    if let Ok(d) = OffsetDateTime::parse(t, &Iso8601::DEFAULT) {
        return Some(d.unix_timestamp());
    }
    if let Ok(d) = time::Date::parse(t, &Iso8601::DEFAULT) {
        return Some(d.midnight().assume_utc().unix_timestamp());
    }
    None
}

/// `aws:CurrentTime`'s text form: `2026-12-06T10:21:53Z`.
pub fn iso8601(epoch: i64) -> String {
    OffsetDateTime::from_unix_timestamp(epoch)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Whether one context value matches one operand, the operator taken positively
/// (`StringNotEquals` compares as `StringEquals`; the caller negates).
fn matches_one(op: Op, v: &Value, o: &Operand) -> bool {
    use Op::*;
    match (op, o) {
        (_, Operand::Never) => false,
        (StringEquals | StringNotEquals, Operand::Str(s)) => text(v).as_deref() == Some(s.as_str()),
        (StringEqualsIgnoreCase | StringNotEqualsIgnoreCase, Operand::Lower(s)) => {
            text(v).is_some_and(|t| t.to_lowercase() == *s)
        }
        (StringLike | StringNotLike, Operand::Glob(p)) => {
            text(v).is_some_and(|t| p.matches(t.as_bytes()))
        }
        (ArnEquals | ArnLike | ArnNotEquals | ArnNotLike, Operand::Arn(p)) => {
            text(v).is_some_and(|t| p.matches(&t))
        }
        (_, Operand::Num(n)) => num(v).is_some_and(|x| compare(op, x.partial_cmp(n))),
        (_, Operand::Date(d)) => when(v).is_some_and(|x| compare(op, Some(x.cmp(d)))),
        (Bool, Operand::Bool(b)) => match v {
            Value::Bool(x) => x == b,
            Value::Str(s) => boolean(s) == Some(*b),
            _ => false,
        },
        (IpAddress | NotIpAddress, Operand::Net(net)) => match v {
            Value::Ip(ip) => net.contains(ip),
            Value::Str(s) => s.parse::<IpAddr>().is_ok_and(|ip| net.contains(&ip)),
            _ => false,
        },
        _ => false,
    }
}

fn compare(op: Op, ord: Option<std::cmp::Ordering>) -> bool {
    use Op::*;
    use std::cmp::Ordering::*;
    let Some(ord) = ord else { return false };
    match op {
        NumericEquals | NumericNotEquals | DateEquals | DateNotEquals => ord == Equal,
        NumericLessThan | DateLessThan => ord == Less,
        NumericLessThanEquals | DateLessThanEquals => ord != Greater,
        NumericGreaterThan | DateGreaterThan => ord == Greater,
        NumericGreaterThanEquals | DateGreaterThanEquals => ord != Less,
        _ => false,
    }
}

fn text<'v>(v: &'v Value) -> Option<std::borrow::Cow<'v, str>> {
    Some(match v {
        Value::Str(s) => std::borrow::Cow::Borrowed(s.as_ref()),
        Value::Time(t) => iso8601(*t).into(),
        Value::Int(n) => n.to_string().into(),
        Value::Bool(b) => b.to_string().into(),
        Value::Ip(ip) => ip.to_string().into(),
    })
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Int(n) | Value::Time(n) => Some(*n as f64),
        Value::Str(s) => number(s),
        _ => None,
    }
}

fn when(v: &Value) -> Option<i64> {
    match v {
        Value::Time(t) | Value::Int(t) => Some(*t),
        Value::Str(s) => date(s),
        _ => None,
    }
}

/// One `"Operator": {"key": values}` entry, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub operator: Operator,
    pub key: Key,
    pub values: Vec<Operand>,
}

impl Condition {
    /// Evaluates against the key's values in the context (`None`: absent).
    pub fn holds(&self, values: Option<&[Value]>) -> bool {
        let Operator { op, set, if_exists } = self.operator;
        let present = values.filter(|v| !v.is_empty());
        if op == Op::Null {
            return self
                .values
                .iter()
                .any(|o| matches!(o, Operand::Absent(want) if *want == present.is_none()));
        }
        let one = |v: &Value| {
            let any = self.values.iter().any(|o| matches_one(op, v, o));
            if op.negated() { !any } else { any }
        };
        match (set, present) {
            (_, None) if if_exists => true,
            (SetOp::Single, None) => op.negated(),
            (SetOp::AnyValue, None) => false,
            (SetOp::AllValues, None) => true,
            (SetOp::Single | SetOp::AnyValue, Some(vs)) => vs.iter().any(one),
            (SetOp::AllValues, Some(vs)) => vs.iter().all(one),
        }
    }
}
