//! What a management API request does to the broker, in the vocabulary of broker policies
//! (`authz::iam`): the actions and resources the gateway checks before forwarding it, and
//! how RabbitMQ 3.10.8's management plugin words a refusal of each.
//!
//! Covered: the routes that read or change queues, exchanges, bindings and messages, and
//! the vhost-scoped listings (`rabbitmq:Connect` on the vhost). Not covered: the
//! administrator's routes (users, permissions, vhosts, definitions, policies, parameters,
//! limits), which the broker guards with user tags, and the listings across vhosts, which
//! the broker filters by the scopes of the token the gateway mints.

use hyper::Method;

use super::segments;
use crate::authz::iam::{Action, ActionSet};

/// What a check is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Vhost,
    Queue(String),
    Exchange(String),
}

/// How RabbitMQ's management plugin answers a refusal of the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `401 {"error":"not_authorised","reason":"User not authorised to access virtual host"}`.
    Vhost,
    /// `401 {"error":"not_authorised","reason":"Access refused."}` (declares, deletes,
    /// bindings).
    AccessRefused,
    /// `401 {"error":"not_authorised","reason":"<the AMQP refusal text>"}` (get, purge).
    AmqpText,
    /// `400 {"error":"bad_request","reason":"403 <the AMQP refusal text>"}` (publish).
    Publish,
}

/// One permission check of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The permission and the route's operation (both `Connect` for vhost access).
    pub actions: ActionSet,
    /// The permission alone, for the refusal's words (`None` for vhost access).
    pub permission: Option<Action>,
    pub vhost: String,
    pub target: Target,
    pub answer: Answer,
}

/// A request's checks, in the order RabbitMQ makes them, and whether its JSON body's
/// `routing_key` is the operation's routing key (publish, bind).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checks {
    pub checks: Vec<Check>,
    pub routing_key_in_body: bool,
}

fn check(perm: Action, op: Action, vhost: &str, target: Target, answer: Answer) -> Check {
    Check {
        actions: perm.set().with(op),
        permission: Some(perm),
        vhost: vhost.to_owned(),
        target,
        answer,
    }
}

fn vhost_access(vhost: &str) -> Check {
    Check {
        actions: Action::Connect.set(),
        permission: None,
        vhost: vhost.to_owned(),
        target: Target::Vhost,
        answer: Answer::Vhost,
    }
}

/// The checks of `method path` (empty: nothing the policies judge).
pub fn checks(method: &Method, path: &str) -> Checks {
    use Action::*;
    use Answer::*;
    let Some(segs) = segments(path) else {
        return Checks::default();
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get = *method == Method::GET || *method == Method::HEAD;
    let (put, post, delete) = (
        *method == Method::PUT,
        *method == Method::POST,
        *method == Method::DELETE,
    );
    let q = |n: &str| Target::Queue(n.to_owned());
    let x = |n: &str| Target::Exchange(n.to_owned());
    let (checks, routing_key_in_body) = match s.as_slice() {
        ["api", "queues", v]
        | ["api", "exchanges", v]
        | ["api", "bindings", v]
        | ["api", "consumers", v]
        | ["api", "queues", v, _, "bindings"]
        | ["api", "exchanges", v, _, "bindings", _]
        | ["api", "vhosts", v, "channels"]
        | ["api", "vhosts", v, "connections"]
            if get =>
        {
            (vec![vhost_access(v)], false)
        }
        ["api", "queues", v, _] | ["api", "exchanges", v, _] if get => {
            (vec![vhost_access(v)], false)
        }
        ["api", "queues", v, n] if put => (
            vec![check(Configure, QueueDeclare, v, q(n), AccessRefused)],
            false,
        ),
        ["api", "queues", v, n] if delete => (
            vec![check(Configure, QueueDelete, v, q(n), AccessRefused)],
            false,
        ),
        ["api", "queues", v, n, "contents"] if delete => {
            (vec![check(Read, QueuePurge, v, q(n), AmqpText)], false)
        }
        ["api", "queues", v, n, "get"] if post => {
            (vec![check(Read, Get, v, q(n), AmqpText)], false)
        }
        ["api", "queues", v, n, "actions"] if post => (
            vec![check(Configure, Configure, v, q(n), AccessRefused)],
            false,
        ),
        ["api", "exchanges", v, n] if put => (
            vec![check(Configure, ExchangeDeclare, v, x(n), AccessRefused)],
            false,
        ),
        ["api", "exchanges", v, n] if delete => (
            vec![check(Configure, ExchangeDelete, v, x(n), AccessRefused)],
            false,
        ),
        ["api", "exchanges", v, n, "publish"] if post => (
            vec![check(Write, Action::Publish, v, x(n), Answer::Publish)],
            true,
        ),
        ["api", "bindings", v, "e", src, "q", dst] if post => (
            vec![
                check(Write, QueueBind, v, q(dst), AccessRefused),
                check(Read, QueueBind, v, x(src), AccessRefused),
            ],
            true,
        ),
        ["api", "bindings", v, "e", src, "e", dst] if post => (
            vec![
                check(Write, ExchangeBind, v, x(dst), AccessRefused),
                check(Read, ExchangeBind, v, x(src), AccessRefused),
            ],
            true,
        ),
        ["api", "bindings", v, "e", src, "q", dst, _] if delete => (
            vec![
                check(Write, QueueUnbind, v, q(dst), AccessRefused),
                check(Read, QueueUnbind, v, x(src), AccessRefused),
            ],
            false,
        ),
        ["api", "bindings", v, "e", src, "e", dst, _] if delete => (
            vec![
                check(Write, ExchangeUnbind, v, x(dst), AccessRefused),
                check(Read, ExchangeUnbind, v, x(src), AccessRefused),
            ],
            false,
        ),
        ["api", "bindings", v, "e", _, _, _] | ["api", "bindings", v, "e", _, _, _, _] if get => {
            (vec![vhost_access(v)], false)
        }
        _ => (Vec::new(), false),
    };
    Checks {
        checks,
        routing_key_in_body,
    }
}

/// The `routing_key` of a publish or binding body (JSON), if it has one.
pub fn body_routing_key(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("routing_key")?.as_str().map(str::to_owned)
}

/// The status and JSON body of a refusal, as the management plugin sends them; `text` is
/// RabbitMQ's AMQP refusal text for the check.
pub fn refusal(answer: Answer, text: &str) -> (u16, String) {
    let body = |error: &str, reason: &str| {
        serde_json::json!({"error": error, "reason": reason}).to_string()
    };
    match answer {
        Answer::Vhost => (
            401,
            body(
                "not_authorised",
                "User not authorised to access virtual host",
            ),
        ),
        Answer::AccessRefused => (401, body("not_authorised", "Access refused.")),
        Answer::AmqpText => (401, body("not_authorised", text)),
        Answer::Publish => (400, body("bad_request", &format!("403 {text}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_rabbitmqs_checks() {
        let names = |m: Method, p: &str| -> Vec<(Vec<&'static str>, String)> {
            checks(&m, p)
                .checks
                .iter()
                .map(|c| {
                    let t = match &c.target {
                        Target::Vhost => format!("vhost {}", c.vhost),
                        Target::Queue(q) => format!("queue {}/{q}", c.vhost),
                        Target::Exchange(x) => format!("exchange {}/{x}", c.vhost),
                    };
                    (c.actions.names(), t)
                })
                .collect()
        };
        assert_eq!(
            names(Method::GET, "/api/queues/%2F"),
            [(vec!["rabbitmq:Connect"], "vhost /".into())]
        );
        assert_eq!(
            names(Method::PUT, "/api/queues/%2F/orders.eu"),
            [(
                vec!["rabbitmq:Configure", "rabbitmq:QueueDeclare"],
                "queue //orders.eu".into()
            )]
        );
        assert_eq!(
            names(Method::POST, "/api/exchanges/prod/orders/publish"),
            [(
                vec!["rabbitmq:Write", "rabbitmq:Publish"],
                "exchange prod/orders".into()
            )]
        );
        assert!(checks(&Method::POST, "/api/exchanges/prod/orders/publish").routing_key_in_body);
        assert_eq!(
            names(Method::POST, "/api/bindings/%2F/e/amq.topic/q/orders"),
            [
                (
                    vec!["rabbitmq:Write", "rabbitmq:QueueBind"],
                    "queue //orders".into()
                ),
                (
                    vec!["rabbitmq:Read", "rabbitmq:QueueBind"],
                    "exchange //amq.topic".into()
                ),
            ]
        );
        assert_eq!(
            names(Method::DELETE, "/api/bindings/%2F/e/a/e/b/~"),
            [
                (
                    vec!["rabbitmq:Write", "rabbitmq:ExchangeUnbind"],
                    "exchange //b".into()
                ),
                (
                    vec!["rabbitmq:Read", "rabbitmq:ExchangeUnbind"],
                    "exchange //a".into()
                ),
            ]
        );
        assert_eq!(
            names(Method::POST, "/api/queues/v/q/get"),
            [(vec!["rabbitmq:Read", "rabbitmq:Get"], "queue v/q".into())]
        );
        assert_eq!(
            names(Method::DELETE, "/api/queues/v/q/contents"),
            [(
                vec!["rabbitmq:Read", "rabbitmq:QueuePurge"],
                "queue v/q".into()
            )]
        );
        // Dot segments are resolved as for protected users.
        assert_eq!(
            names(Method::DELETE, "/api/x/../queues/v/q"),
            names(Method::DELETE, "/api/queues/v/q")
        );
        // Administrator routes and listings across vhosts: the broker's.
        for (m, p) in [
            (Method::GET, "/api/queues"),
            (Method::PUT, "/api/users/bob"),
            (Method::PUT, "/api/vhosts/v"),
            (Method::POST, "/api/definitions"),
            (Method::GET, "/api/overview"),
        ] {
            assert!(checks(&m, p).checks.is_empty(), "{m} {p}");
        }
    }

    #[test]
    fn refusals_are_worded_as_the_management_plugin_words_them() {
        let t = "ACCESS_REFUSED - read access to queue 'q' in vhost '/' refused for user 'u'";
        assert_eq!(
            refusal(Answer::AmqpText, t),
            (
                401,
                format!(r#"{{"error":"not_authorised","reason":"{t}"}}"#)
            )
        );
        assert_eq!(refusal(Answer::Publish, t).0, 400);
        assert_eq!(
            refusal(Answer::Vhost, t).1,
            r#"{"error":"not_authorised","reason":"User not authorised to access virtual host"}"#
        );
        assert_eq!(
            body_routing_key(br#"{"routing_key": "eu.new", "payload": ""}"#).as_deref(),
            Some("eu.new")
        );
        assert_eq!(body_routing_key(b"not json"), None);
    }
}
