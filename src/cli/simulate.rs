//! `simulate` and `explain --operation`: a table of broker operations decided for one
//! token, as the gateway would decide them (scopes, broker policies, the mode), each with
//! the checks it made and the statement that decided. Like AWS's policy simulator, a row
//! can also be a bare request: an action name and a resource ARN.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::ExplainError;
use crate::amqp::method::id;
use crate::auth::token_id;
use crate::authz::iam::{Action, Request};
use crate::authz::{self, Context, ExchangeKind, Operation, Permissions, Trace, Verdict};
use crate::config::Config;

/// One row of a simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The operation's name as written (`publish`, `queue-declare`, `request`, ...).
    pub operation: String,
    /// `key=value` arguments in the order written.
    pub args: Vec<(String, String)>,
}

/// The operations and the keys each takes (`vhost` everywhere, default `/`).
const OPERATIONS: &[(&str, &[&str])] = &[
    ("connect", &[]),
    (
        "exchange-declare",
        &["exchange", "passive", "alternate-exchange"],
    ),
    ("exchange-delete", &["exchange"]),
    (
        "exchange-bind",
        &["destination", "source", "routing-key", "source-type"],
    ),
    (
        "exchange-unbind",
        &["destination", "source", "routing-key", "source-type"],
    ),
    (
        "queue-declare",
        &["queue", "passive", "dead-letter-exchange"],
    ),
    ("queue-delete", &["queue"]),
    ("queue-purge", &["queue"]),
    (
        "queue-bind",
        &["queue", "exchange", "routing-key", "exchange-type"],
    ),
    (
        "queue-unbind",
        &["queue", "exchange", "routing-key", "exchange-type"],
    ),
    (
        "publish",
        &["exchange", "routing-key", "exchange-type", "user-id"],
    ),
    ("consume", &["queue"]),
    ("get", &["queue"]),
    ("request", &["action", "resource", "routing-key"]),
];

impl Row {
    /// `publish vhost=/ exchange=orders routing-key=eu.new`: an operation and `key=value`
    /// words (a value runs to the next space; `exchange=` is the default exchange).
    pub fn parse(line: &str) -> Result<Row, String> {
        let mut words = line.split_whitespace();
        let operation = words.next().ok_or("an empty line")?.to_owned();
        let Some((_, keys)) = OPERATIONS.iter().find(|(n, _)| *n == operation) else {
            let names: Vec<&str> = OPERATIONS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown operation {operation:?}; the operations are {}",
                names.join(", ")
            ));
        };
        let mut args: Vec<(String, String)> = Vec::new();
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("{w:?}: expected key=value"))?;
            if k != "vhost" && !keys.contains(&k) {
                return Err(format!(
                    "{operation} takes vhost{}, not {k:?}",
                    keys.iter().map(|k| format!(", {k}")).collect::<String>()
                ));
            }
            if args.iter().any(|(seen, _)| seen == k) {
                return Err(format!("{k} is given twice"));
            }
            args.push((k.to_owned(), v.to_owned()));
        }
        let row = Row { operation, args };
        if row.operation == "request"
            && (row.get("action").is_none() || row.get("resource").is_none())
        {
            return Err("request takes action= and resource=".to_owned());
        }
        Ok(row)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self, k: &str) -> &str {
        self.get(k).unwrap_or("")
    }

    fn vhost(&self) -> &str {
        self.get("vhost").unwrap_or("/")
    }

    fn flag(&self, k: &str) -> Result<bool, String> {
        match self.get(k) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(format!("{k}={v}: expected true or false")),
        }
    }

    /// The row as one line.
    pub fn display(&self) -> String {
        let mut s = self.operation.clone();
        for (k, v) in &self.args {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }
}

/// `topic` (the default, as the gateway treats a type it does not know) or any other type.
fn kind(v: Option<&str>) -> ExchangeKind {
    match v {
        None | Some("topic") => ExchangeKind::Topic,
        Some(_) => ExchangeKind::Other,
    }
}

/// Where the simulated client is and when.
#[derive(Clone, Copy, Debug)]
pub struct Situation {
    /// Seconds since the epoch (`aws:CurrentTime`).
    pub at: i64,
    pub source_ip: Option<IpAddr>,
    pub secure_transport: bool,
}

/// The result of a simulation.
pub struct Simulated {
    pub text: String,
    /// The token was accepted (a refused token is reported, with no rows).
    pub accepted: bool,
    /// Every row was permitted.
    pub all_permitted: bool,
    /// A row could not be decided (a request row without policies, a bad value).
    pub row_errors: bool,
}

/// Decides `rows` for `token` under `cfg`.
pub async fn simulate(
    cfg: &Config,
    token: &str,
    rows: &[Row],
    at: Situation,
    as_json: bool,
) -> Result<Simulated, ExplainError> {
    let all = crate::wiring::authenticators(&cfg.oauth2)?;
    let verified = match all.select(token) {
        Err(e) => Err(e),
        Ok(auth) => super::verify(auth, token).await.map(|(_, id)| id),
    };
    let id = match verified {
        Ok(id) => id,
        Err(e) => {
            let report = json!({
                "token": token_id(token),
                "accepted": false,
                "reason": e.reason(),
                "detail": e.to_string(),
            });
            let text = if as_json {
                serde_json::to_string_pretty(&report)?
            } else {
                format!(
                    "token:     {}\naccepted:  no\nreason:    {} ({})\n",
                    token_id(token),
                    e,
                    e.reason()
                )
            };
            return Ok(Simulated {
                text,
                accepted: false,
                all_permitted: false,
                row_errors: false,
            });
        }
    };
    let perms = crate::wiring::bind_policies(
        id.permissions.clone(),
        &cfg.authorization,
        &id.facts,
        at.source_ip,
        at.secure_transport,
    );
    let results: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| decide_row(&perms, &id.username, row, at.at).map(|mut v| {
            v["row"] = json!(i + 1);
            v
        }).unwrap_or_else(|e| json!({"row": i + 1, "operation": row.display(), "error": e, "permitted": false})))
        .collect();
    let all_permitted = results.iter().all(|r| r["permitted"] == json!(true));
    let row_errors = results.iter().any(|r| r.get("error").is_some());
    let bound = perms.policy().map(|b| b.len());
    let report = json!({
        "token": id.token_id,
        "accepted": true,
        "username": id.username,
        "principal_arn": id.facts.principal_arn,
        "mode": cfg.authorization.mode.as_str(),
        "statements": cfg.authorization.set.statements().len(),
        "statements_bound": bound,
        "at": crate::authz::iam::iso8601(at.at),
        "source_ip": at.source_ip.map(|ip| ip.to_string()),
        "secure_transport": at.secure_transport,
        "results": results,
    });
    let text = if as_json {
        serde_json::to_string_pretty(&report)?
    } else {
        render(&report)
    };
    Ok(Simulated {
        text,
        accepted: true,
        all_permitted,
        row_errors,
    })
}

/// One row: the verdict, the checks, and what decided.
fn decide_row(perms: &Permissions, username: &str, row: &Row, now: i64) -> Result<Value, String> {
    let vhost = row.vhost();
    let ctx = Context {
        vhost,
        username,
        now,
    };
    let (permitted, reply, statement, traces) = match row.operation.as_str() {
        "connect" => {
            let (outcome, trace) = authz::decide::connect_traced(perms, vhost, now);
            let reply = outcome.is_err().then(|| {
                format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{username}'")
            });
            (outcome.is_ok(), reply, outcome.err().flatten(), vec![trace])
        }
        "request" => {
            let Some(b) = perms.policy() else {
                return Err(
                    "a request row needs broker policies ([authorization] policies)".into(),
                );
            };
            let name = row.text("action");
            let matched = Action::matching(name);
            let Some(action) = Action::ALL.into_iter().find(|a| matched == a.set()) else {
                return Err(format!(
                    "action={name}: expected one action of {}",
                    Action::names().join(", ")
                ));
            };
            let resource = row.text("resource");
            let decision = b.evaluate(&Request {
                actions: action.set(),
                resource,
                vhost,
                routing_key: row.get("routing-key").map(str::as_bytes),
                now,
            });
            let statement = match decision {
                authz::iam::Decision::Allow(s) | authz::iam::Decision::Deny(s) => {
                    Some(s.to_owned())
                }
                authz::iam::Decision::Implicit => None,
            };
            let permitted = matches!(decision, authz::iam::Decision::Allow(_));
            let trace = Trace {
                actions: vec![action.name()],
                resource: resource.to_owned(),
                scopes: false,
                policy: Some(decision.to_string()),
                permitted,
            };
            (permitted, None, statement, vec![trace])
        }
        _ => {
            let (verdict, traces) = decide_op(perms, &ctx, row)?;
            match verdict {
                Verdict::Permit => (true, None, None, traces),
                Verdict::Deny(d) => (false, Some(d.reply_text), d.statement, traces),
                Verdict::NeedKind => unreachable!("simulated exchange types are known"),
            }
        }
    };
    let decided_by = decided_by(
        perms,
        permitted,
        statement.as_deref(),
        &traces,
        row.operation == "request",
    );
    Ok(json!({
        "operation": row.display(),
        "permitted": permitted,
        "decided_by": decided_by,
        "statement": statement,
        "reply": reply,
        "checks": traces.iter().map(|t| json!({
            "actions": t.actions,
            "resource": t.resource,
            "scopes": t.scopes,
            "policy": t.policy,
            "permitted": t.permitted,
        })).collect::<Vec<_>>(),
    }))
}

fn decide_op(
    perms: &Permissions,
    ctx: &Context,
    row: &Row,
) -> Result<(Verdict, Vec<Trace>), String> {
    let t = |k| row.text(k);
    let bytes = |k| row.get(k).map(str::as_bytes);
    let (op, ids) = match row.operation.as_str() {
        "exchange-declare" => (
            Operation::ExchangeDeclare {
                exchange: t("exchange"),
                passive: row.flag("passive")?,
                alternate_exchange: bytes("alternate-exchange"),
            },
            id::EXCHANGE_DECLARE,
        ),
        "exchange-delete" => (
            Operation::ExchangeDelete {
                exchange: t("exchange"),
            },
            id::EXCHANGE_DELETE,
        ),
        "exchange-bind" | "exchange-unbind" => {
            let unbind = row.operation == "exchange-unbind";
            (
                Operation::ExchangeBind {
                    destination: t("destination"),
                    source: t("source"),
                    routing_key: t("routing-key"),
                    source_kind: kind(row.get("source-type")),
                    unbind,
                },
                if unbind {
                    id::EXCHANGE_UNBIND
                } else {
                    id::EXCHANGE_BIND
                },
            )
        }
        "queue-declare" => {
            let queue = t("queue");
            if queue.is_empty() {
                return Err("queue-declare: give the queue's name (a server-named queue is checked as amq.gen-...)".into());
            }
            (
                Operation::QueueDeclare {
                    queue,
                    passive: row.flag("passive")?,
                    server_named: queue.starts_with("amq.gen-"),
                    dead_letter_exchange: bytes("dead-letter-exchange"),
                },
                id::QUEUE_DECLARE,
            )
        }
        "queue-delete" => (
            Operation::QueueDelete { queue: t("queue") },
            id::QUEUE_DELETE,
        ),
        "queue-purge" => (Operation::QueuePurge { queue: t("queue") }, id::QUEUE_PURGE),
        "queue-bind" | "queue-unbind" => {
            let unbind = row.operation == "queue-unbind";
            (
                Operation::QueueBind {
                    queue: t("queue"),
                    exchange: t("exchange"),
                    routing_key: t("routing-key"),
                    exchange_kind: kind(row.get("exchange-type")),
                    unbind,
                },
                if unbind {
                    id::QUEUE_UNBIND
                } else {
                    id::QUEUE_BIND
                },
            )
        }
        "publish" => (
            Operation::BasicPublish {
                exchange: t("exchange"),
                routing_key: t("routing-key").as_bytes(),
                exchange_kind: if t("exchange").is_empty() {
                    ExchangeKind::Other
                } else {
                    kind(row.get("exchange-type"))
                },
                user_id: bytes("user-id"),
                extra_routing_keys: &[],
            },
            id::BASIC_PUBLISH,
        ),
        "consume" => (
            Operation::BasicConsume { queue: t("queue") },
            id::BASIC_CONSUME,
        ),
        "get" => (Operation::BasicGet { queue: t("queue") }, id::BASIC_GET),
        other => return Err(format!("unknown operation {other:?}")),
    };
    Ok(authz::decide_traced(perms, ctx, &op, ids))
}

/// What decided, in words: the statement, the scopes, or the implicit deny.
fn decided_by(
    perms: &Permissions,
    permitted: bool,
    statement: Option<&str>,
    traces: &[Trace],
    raw: bool,
) -> String {
    let mode = perms.policy().map(|b| b.mode());
    if let Some(s) = statement {
        return if permitted {
            format!("allowed by {s}")
        } else {
            format!("denied by {s}")
        };
    }
    if raw {
        return "no statement applies (implicit deny)".to_owned();
    }
    use crate::authz::iam::Mode;
    if permitted {
        let allows: Vec<&str> = traces
            .iter()
            .filter_map(|t| t.policy.as_deref())
            .filter_map(|p| p.strip_prefix("allowed by "))
            .collect();
        let mut allows: Vec<&str> = allows.into_iter().fold(Vec::new(), |mut v, s| {
            if !v.contains(&s) {
                v.push(s);
            }
            v
        });
        return match mode {
            None | Some(Mode::Scopes) => "scopes".to_owned(),
            Some(Mode::Policies) => format!("allowed by {}", join(&mut allows)),
            Some(Mode::Both) => format!("scopes and {}", join(&mut allows)),
        };
    }
    if traces.is_empty() {
        return "the user_id check".to_owned();
    }
    match (mode, traces.iter().rev().find(|t| !t.permitted)) {
        (Some(Mode::Policies), _) => "no statement allows it (implicit deny)".to_owned(),
        (_, Some(t)) if !t.scopes => "scopes: no scope grants it".to_owned(),
        (Some(Mode::Both), _) => "no statement allows it (implicit deny)".to_owned(),
        _ => "the user_id check".to_owned(),
    }
}

fn join(v: &mut [&str]) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(", ")
    }
}

fn render(r: &Value) -> String {
    let s = |k: &str| r[k].as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let mut out = format!(
        "token:     {}\nusername:  {}\nprincipal: {}\n",
        s("token"),
        s("username"),
        s("principal_arn")
    );
    out.push_str(&format!(
        "mode:      {} ({} statement{}, {} apply to this principal)\n",
        s("mode"),
        r["statements"],
        if r["statements"] == json!(1) { "" } else { "s" },
        r["statements_bound"]
            .as_u64()
            .map_or_else(|| "none".to_owned(), |n| n.to_string()),
    ));
    out.push_str(&format!(
        "at:        {}, source {}, {}\n\n",
        s("at"),
        s("source_ip"),
        if r["secure_transport"] == json!(true) {
            "TLS"
        } else {
            "no TLS"
        }
    ));
    for row in r["results"].as_array().into_iter().flatten() {
        let verdict = match (row["permitted"].as_bool(), row["error"].as_str()) {
            (_, Some(_)) => "ERROR",
            (Some(true), _) => "ALLOW",
            _ => "DENY",
        };
        out.push_str(&format!(
            "{:>3}. {verdict:<5}  {}\n",
            row["row"],
            row["operation"].as_str().unwrap_or("")
        ));
        if let Some(e) = row["error"].as_str() {
            out.push_str(&format!("       error: {e}\n"));
            continue;
        }
        out.push_str(&format!(
            "       decided by: {}\n",
            row["decided_by"].as_str().unwrap_or("-")
        ));
        if let Some(reply) = row["reply"].as_str() {
            out.push_str(&format!("       reply: {reply}\n"));
        }
        for c in row["checks"].as_array().into_iter().flatten() {
            let actions: Vec<&str> = c["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            out.push_str(&format!(
                "       - {} on {}: scopes {}, policy {} -> {}\n",
                actions.join(" + "),
                c["resource"].as_str().unwrap_or(""),
                if c["scopes"] == json!(true) {
                    "grant"
                } else {
                    "do not grant"
                },
                c["policy"].as_str().unwrap_or("-"),
                if c["permitted"] == json!(true) {
                    "pass"
                } else {
                    "fail"
                },
            ));
        }
    }
    out
}
