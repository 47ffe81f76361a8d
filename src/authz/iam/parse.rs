//! Policy documents in IAM's JSON grammar → compiled statements, every problem reported
//! with the document and the JSON path of the value at fault.

use std::sync::Arc;

use super::condition::{Operator, SetOp, Written, compile_value};
use super::glob::{ArnPattern, ArnTemplate};
use super::json::{self, Json};
use super::keys::Key;
use super::{Action, ActionSet, PolicyError};

/// The largest policy document read (AWS allows 20 KiB for a resource policy).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// The versions IAM knows; only the newer one has policy variables.
const VERSIONS: [&str; 2] = ["2012-10-17", "2008-10-17"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// Who a statement is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrincipalPat {
    /// `"*"` or `{"AWS": "*"}`.
    Any,
    /// A 12-digit account id, or `arn:aws:iam::<account>:root`: every principal of it.
    Account(String),
    /// A principal ARN, wildcards allowed.
    Arn(ArnPattern),
}

/// A condition as written: operator, key, values (variables maybe still in them).
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenCondition {
    pub operator: Operator,
    pub key: Key,
    pub values: Vec<Written>,
    /// The JSON path, for explanations.
    pub path: String,
}

/// One compiled statement.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    /// `<document>:<Sid>`, or `<document>:Statement[i]` without a Sid.
    pub id: Arc<str>,
    pub effect: Effect,
    pub principals: Vec<PrincipalPat>,
    pub not_principal: bool,
    pub actions: ActionSet,
    pub not_action: bool,
    pub resources: Vec<ArnTemplate>,
    pub not_resource: bool,
    pub conditions: Vec<WrittenCondition>,
}

struct Doc<'a> {
    name: &'a str,
    errors: Vec<PolicyError>,
    variables: bool,
}

impl Doc<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(PolicyError {
            document: self.name.to_owned(),
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

/// Compiles one document; `name` names it in statement ids and errors.
pub fn document(name: &str, text: &str) -> Result<Vec<Statement>, Vec<PolicyError>> {
    let fail = |path: &str, message: String| {
        vec![PolicyError {
            document: name.to_owned(),
            path: path.to_owned(),
            message,
        }]
    };
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(fail(
            "$",
            format!(
                "{} bytes; a policy document may have at most {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        ));
    }
    let root = json::parse(text).map_err(|e| fail("$", format!("not JSON: {e}")))?;
    let Json::Object(entries) = &root else {
        return Err(fail(
            "$",
            format!("a policy document is an object, not {}", root.kind()),
        ));
    };
    let mut doc = Doc {
        name,
        errors: Vec::new(),
        variables: false,
    };
    let mut statements_json = None;
    for (k, v) in unique(&mut doc, "$", entries) {
        let path = format!("$.{k}");
        match k.as_str() {
            "Version" => match v {
                Json::String(s) if VERSIONS.contains(&s.as_str()) => {
                    doc.variables = s == VERSIONS[0];
                }
                other => doc.err(
                    &path,
                    format!(
                        "expected \"2012-10-17\" or \"2008-10-17\", found {}",
                        show(other)
                    ),
                ),
            },
            "Id" => {
                if !matches!(v, Json::String(_)) {
                    doc.err(&path, format!("expected a string, found {}", v.kind()));
                }
            }
            "Statement" => statements_json = Some(v),
            other => doc.err(
                &path,
                format!("unknown element {other:?}; a policy has Version, Id and Statement"),
            ),
        }
    }
    let mut statements = Vec::new();
    match statements_json {
        None => doc.err("$", "no Statement"),
        Some(Json::Object(_)) => {
            if let Some(s) = statement(&mut doc, "$.Statement", 0, statements_json.unwrap()) {
                statements.push(s);
            }
        }
        Some(Json::Array(items)) if items.is_empty() => doc.err("$.Statement", "no statements"),
        Some(Json::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(s) = statement(&mut doc, &format!("$.Statement[{i}]"), i, item) {
                    statements.push(s);
                }
            }
        }
        Some(other) => doc.err(
            "$.Statement",
            format!(
                "expected an object or an array of objects, found {}",
                other.kind()
            ),
        ),
    }
    let mut seen = std::collections::HashSet::new();
    for s in &statements {
        if !seen.insert(s.id.clone()) {
            doc.err(
                "$.Statement",
                format!(
                    "Sid {:?} is used twice",
                    s.id.split_once(':').map_or("", |x| x.1)
                ),
            );
        }
    }
    if doc.errors.is_empty() {
        Ok(statements)
    } else {
        Err(doc.errors)
    }
}

/// The entries of an object, each key once (a repeated key is an error).
fn unique<'j>(
    doc: &mut Doc,
    path: &str,
    entries: &'j [(String, Json)],
) -> Vec<(&'j String, &'j Json)> {
    let mut out: Vec<(&String, &Json)> = Vec::new();
    for (k, v) in entries {
        if out.iter().any(|(seen, _)| *seen == k) {
            doc.err(path, format!("{k:?} appears twice"));
        } else {
            out.push((k, v));
        }
    }
    out
}

fn show(v: &Json) -> String {
    match v {
        Json::String(s) => format!("{s:?}"),
        other => other.kind().to_owned(),
    }
}

/// A string or a non-empty array of strings.
fn strings(doc: &mut Doc, path: &str, v: &Json) -> Option<Vec<String>> {
    match v {
        Json::String(s) => Some(vec![s.clone()]),
        Json::Array(items) if !items.is_empty() => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Json::String(s) => out.push(s.clone()),
                    other => {
                        doc.err(
                            &format!("{path}[{i}]"),
                            format!("expected a string, found {}", other.kind()),
                        );
                        return None;
                    }
                }
            }
            Some(out)
        }
        Json::Array(_) => {
            doc.err(path, "an empty array");
            None
        }
        other => {
            doc.err(
                path,
                format!(
                    "expected a string or an array of strings, found {}",
                    other.kind()
                ),
            );
            None
        }
    }
}

fn statement(doc: &mut Doc, path: &str, index: usize, v: &Json) -> Option<Statement> {
    let Json::Object(entries) = v else {
        doc.err(path, format!("a statement is an object, not {}", v.kind()));
        return None;
    };
    let before = doc.errors.len();
    let mut sid = None;
    let mut effect = None;
    let mut effect_written = false;
    let mut principal = None;
    let mut action = None;
    let mut resource = None;
    let mut conditions = Vec::new();
    for (k, v) in unique(doc, path, entries) {
        let p = format!("{path}.{k}");
        match k.as_str() {
            "Sid" => match v {
                Json::String(s) if !s.is_empty() && !s.contains(':') => sid = Some(s.clone()),
                other => doc.err(&p, format!("expected a non-empty string without ':', found {}", show(other))),
            },
            "Effect" => match (effect_written = true, v).1 {
                Json::String(s) if s == "Allow" => effect = Some(Effect::Allow),
                Json::String(s) if s == "Deny" => effect = Some(Effect::Deny),
                other => doc.err(&p, format!("expected \"Allow\" or \"Deny\", found {}", show(other))),
            },
            "Principal" | "NotPrincipal" => {
                if principal.is_some() {
                    doc.err(&p, "a statement has Principal or NotPrincipal, not both");
                }
                principal = Some((principals(doc, &p, v), k == "NotPrincipal"));
            }
            "Action" | "NotAction" => {
                if action.is_some() {
                    doc.err(&p, "a statement has Action or NotAction, not both");
                }
                action = Some((actions(doc, &p, v), k == "NotAction"));
            }
            "Resource" | "NotResource" => {
                if resource.is_some() {
                    doc.err(&p, "a statement has Resource or NotResource, not both");
                }
                resource = Some((resources(doc, &p, v), k == "NotResource"));
            }
            "Condition" => conditions = condition_block(doc, &p, v),
            other => doc.err(
                &p,
                format!("unknown element {other:?}; a statement has Sid, Effect, Principal or NotPrincipal, Action or NotAction, Resource or NotResource, and Condition"),
            ),
        }
    }
    if !effect_written {
        doc.err(path, "no Effect");
    }
    if principal.is_none() {
        doc.err(path, "no Principal or NotPrincipal: a broker policy names whom each statement is about (\"*\" for everyone)");
    }
    if action.is_none() {
        doc.err(path, "no Action or NotAction");
    }
    if resource.is_none() {
        doc.err(path, "no Resource or NotResource");
    }
    if doc.errors.len() > before {
        return None;
    }
    if let (Some(Effect::Allow), Some((_, true))) = (effect, &principal) {
        doc.err(
            &format!("{path}.NotPrincipal"),
            "NotPrincipal goes with \"Deny\" only (IAM does not support it with \"Allow\")",
        );
        return None;
    }
    let (principals, not_principal) = principal?;
    let (actions, not_action) = action?;
    let (resources, not_resource) = resource?;
    let id = match sid {
        Some(s) => format!("{}:{s}", doc.name),
        None => format!("{}:Statement[{index}]", doc.name),
    };
    Some(Statement {
        id: id.into(),
        effect: effect?,
        principals: principals?,
        not_principal,
        actions: actions?,
        not_action,
        resources: resources?,
        not_resource,
        conditions,
    })
}

fn principals(doc: &mut Doc, path: &str, v: &Json) -> Option<Vec<PrincipalPat>> {
    match v {
        Json::String(s) if s == "*" => Some(vec![PrincipalPat::Any]),
        Json::Object(entries) => {
            let mut out = Vec::new();
            for (k, v) in unique(doc, path, entries) {
                let p = format!("{path}.{k}");
                if k != "AWS" {
                    doc.err(&p, format!("{k:?} principals never reach the broker: only \"AWS\" principals (role ARNs, account ids, \"*\") do"));
                    continue;
                }
                for (i, s) in strings(doc, &p, v)?.into_iter().enumerate() {
                    match principal(&s) {
                        Ok(pp) => out.push(pp),
                        Err(e) => doc.err(&format!("{p}[{i}]"), e),
                    }
                }
            }
            if out.is_empty() && entries.is_empty() {
                doc.err(path, "names no principal: write \"*\" for everyone");
            }
            (!out.is_empty()).then_some(out)
        }
        other => {
            doc.err(
                path,
                format!("expected \"*\" or {{\"AWS\": ...}}, found {}", show(other)),
            );
            None
        }
    }
}

fn principal(s: &str) -> Result<PrincipalPat, String> {
    if s == "*" {
        return Ok(PrincipalPat::Any);
    }
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(PrincipalPat::Account(s.to_owned()));
    }
    let t = ArnTemplate::parse(s, false)?;
    if let Some(account) = s
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.strip_suffix(":root"))
        .filter(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()))
    {
        return Ok(PrincipalPat::Account(account.to_owned()));
    }
    Ok(PrincipalPat::Arn(
        t.pattern(&|_| None).expect("no variables"),
    ))
}

fn actions(doc: &mut Doc, path: &str, v: &Json) -> Option<ActionSet> {
    let mut set = ActionSet::EMPTY;
    for (i, a) in strings(doc, path, v)?.into_iter().enumerate() {
        // IAM's grammar: "*", or vendor:action with a literal vendor (or "*").
        let vendor_ok = a == "*"
            || a.split_once(':')
                .is_some_and(|(v, _)| v == "*" || (!v.is_empty() && !v.contains(['*', '?'])));
        if !vendor_ok {
            doc.err(
                &format!("{path}[{i}]"),
                format!("{a:?}: an action is \"*\" or vendor:action (rabbitmq:Publish), with no wildcard in part of the vendor"),
            );
            continue;
        }
        let matched = Action::matching(&a);
        if matched.is_empty() {
            doc.err(
                &format!("{path}[{i}]"),
                format!(
                    "{a:?} names no action of the gateway; they are {}",
                    Action::names().join(", ")
                ),
            );
        }
        set = set.union(matched);
    }
    Some(set)
}

fn resources(doc: &mut Doc, path: &str, v: &Json) -> Option<Vec<ArnTemplate>> {
    let mut out = Vec::new();
    for (i, r) in strings(doc, path, v)?.into_iter().enumerate() {
        let p = format!("{path}[{i}]");
        if !doc.variables && r.contains("${") {
            doc.err(
                &p,
                "a policy variable needs \"Version\": \"2012-10-17\" (IAM would read it as text)",
            );
            continue;
        }
        match ArnTemplate::parse(&r, doc.variables) {
            Ok(t) => {
                let seg = |i: usize| r.split(':').nth(i).unwrap_or("");
                let wild = |s: &str| s.contains(['*', '?']);
                // IAM takes `*` for a whole partition, but no wildcard in part of one and
                // none in the service.
                if r != "*" && ((wild(seg(1)) && seg(1) != "*") || wild(seg(2))) {
                    doc.err(&p, format!("{r:?}: no wildcard in an ARN's service or in part of its partition (IAM refuses them)"));
                } else if let Some(service) = t.literal_segment(2).filter(|s| s != "rabbitmq") {
                    doc.err(&p, format!("{r:?} is a resource of service {service:?}; the broker's are arn:aws:rabbitmq:::vhost/..."));
                } else if let Some(bad) = resource_prefix_problem(&r) {
                    doc.err(&p, bad);
                } else {
                    out.push(t);
                }
            }
            Err(e) => doc.err(&p, e),
        }
    }
    Some(out)
}

/// The resource part must be able to start with `vhost/`.
fn resource_prefix_problem(r: &str) -> Option<String> {
    if r == "*" {
        return None;
    }
    let res = r.splitn(6, ':').nth(5)?;
    let literal: String = res
        .chars()
        .take_while(|c| !matches!(c, '*' | '?' | '$'))
        .collect();
    let n = literal.len().min(6);
    (literal.as_bytes()[..n] != b"vhost/"[..n]).then(|| {
        format!("{r:?} can match no resource of the broker: they are vhost/<vhost>, vhost/<vhost>/queue/<name>, vhost/<vhost>/exchange/<name> and vhost/<vhost>/topic/<exchange>/<routing key>")
    })
}

fn condition_block(doc: &mut Doc, path: &str, v: &Json) -> Vec<WrittenCondition> {
    let Json::Object(entries) = v else {
        doc.err(
            path,
            format!("expected an object of operators, found {}", v.kind()),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (op_name, block) in unique(doc, path, entries) {
        let p = format!("{path}.{op_name}");
        let operator = match Operator::parse(op_name) {
            Ok(o) => o,
            Err(e) => {
                doc.err(&p, e);
                continue;
            }
        };
        let Json::Object(keys) = block else {
            doc.err(
                &p,
                format!(
                    "expected an object of condition keys, found {}",
                    block.kind()
                ),
            );
            continue;
        };
        if keys.is_empty() {
            doc.err(&p, "no condition keys");
        }
        for (key_name, values) in unique(doc, &p, keys) {
            let kp = format!("{p}[{key_name:?}]");
            let key = match Key::parse(key_name) {
                Ok(k) => k,
                Err(e) => {
                    doc.err(&kp, e);
                    continue;
                }
            };
            if key.multivalued()
                && operator.set == SetOp::Single
                && operator.op != super::condition::Op::Null
            {
                doc.err(&kp, format!("{} has several values: use ForAnyValue:{op_name} or ForAllValues:{op_name}", key.name()));
                continue;
            }
            let texts = match values {
                Json::Array(items) if items.is_empty() => {
                    doc.err(&kp, "an empty array");
                    continue;
                }
                Json::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("{kp}[{i}]"), v))
                    .collect(),
                one => vec![(kp.clone(), one)],
            };
            let mut written = Vec::new();
            for (vp, v) in texts {
                let text = match v {
                    Json::String(s) => s.clone(),
                    Json::Number(n) => n.to_string(),
                    Json::Bool(b) => b.to_string(),
                    other => {
                        doc.err(
                            &vp,
                            format!(
                                "expected a string, number or boolean, found {}",
                                other.kind()
                            ),
                        );
                        continue;
                    }
                };
                if !doc.variables && text.contains("${") {
                    doc.err(&vp, "a policy variable needs \"Version\": \"2012-10-17\" (IAM would read it as text)");
                    continue;
                }
                match compile_value(operator.op, &text, doc.variables) {
                    Ok(w) => written.push(w),
                    Err(e) => doc.err(&vp, e),
                }
            }
            out.push(WrittenCondition {
                operator,
                key,
                values: written,
                path: kp,
            });
        }
    }
    out
}
