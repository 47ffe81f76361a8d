//! Table tests from IAM's documented policy grammar and evaluation logic ("Policy
//! evaluation logic", "Condition operators", "Policy variables", "Single-valued vs.
//! multivalued context keys"), in the gateway's vocabulary.

use std::net::IpAddr;

use super::*;

const ROLE: &str = "arn:aws:iam::111122223333:role/App";

fn facts() -> Facts {
    let mut f = Facts {
        principal_arn: Some(ROLE.into()),
        account: Some("111122223333".into()),
        org_id: Some("o-abc1234567".into()),
        org_paths: vec!["o-abc1234567/r-ab12/ou-ab12-11111111/".into()],
        region: Some("us-east-1".into()),
        issued_at: Some(1_700_000_000),
        source_ip: Some("10.1.2.3".parse().unwrap()),
        secure_transport: true,
        ..Facts::default()
    };
    f.principal_tag("team", "orders");
    f.principal_tag("Level", "7");
    f.request_tag("job", "nightly");
    f.request_tag("env", "prod");
    f
}

fn doc(statements: &str) -> String {
    format!(r#"{{"Version": "2012-10-17", "Statement": [{statements}]}}"#)
}

fn set(text: &str) -> PolicySet {
    PolicySet::compile(&[("p.json".into(), text.to_owned())]).unwrap_or_else(|e| panic!("{e:?}"))
}

fn errors(text: &str) -> Vec<String> {
    PolicySet::compile(&[("p.json".into(), text.to_owned())])
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

const Q: &str = "arn:aws:rabbitmq:::vhost/%2F/queue/orders.eu";
const X: &str = "arn:aws:rabbitmq:::vhost/%2F/exchange/orders";

fn req<'a>(actions: &[Action], resource: &'a str) -> Request<'a> {
    Request {
        actions: actions.iter().fold(ActionSet::EMPTY, |s, a| s.with(*a)),
        resource,
        vhost: "/",
        routing_key: None,
        now: 1_750_000_000,
    }
}

/// The decision for `actions` on `resource` under one document, as `allow:Sid`,
/// `deny:Sid` or `implicit`.
fn decide_with(f: &Facts, text: &str, actions: &[Action], resource: &str) -> String {
    let b = Binding::new(&set(text), Mode::Policies, f);
    match b.evaluate(&req(actions, resource)) {
        Decision::Allow(id) => format!("allow:{}", id.trim_start_matches("p.json:")),
        Decision::Deny(id) => format!("deny:{}", id.trim_start_matches("p.json:")),
        Decision::Implicit => "implicit".into(),
    }
}

fn decision(text: &str, actions: &[Action], resource: &str) -> String {
    decide_with(&facts(), text, actions, resource)
}

fn allow_all(sid: &str) -> String {
    format!(
        r#"{{"Sid": "{sid}", "Effect": "Allow", "Principal": "*", "Action": "rabbitmq:*", "Resource": "*"}}"#
    )
}

#[test]
fn wildcards_match_as_iam_matches() {
    let cases: &[(&str, &str, bool)] = &[
        ("*", "", true),
        ("*", "anything/at:all", true),
        ("a*", "a", true),
        ("a*", "ba", false),
        ("*a", "ba", true),
        ("a?c", "abc", true),
        ("a?c", "ac", false),
        ("a?c", "abbc", false),
        ("a?c", "aéc", true),
        ("a??c", "aéc", false),
        ("é*", "é", true),
        ("*.eu.*", "orders.eu.new", true),
        ("*.eu.*", "orders.us.new", false),
        ("a*b*c", "aXbYbZc", true),
        ("a*b*c", "aXbYbZ", false),
        ("Orders", "orders", false),
        ("", "", true),
        ("", "a", false),
        ("**", "x", true),
        ("?*", "", false),
    ];
    for (p, s, want) in cases {
        assert_eq!(
            Pattern::wild(p).matches(s.as_bytes()),
            *want,
            "{p:?} ~ {s:?}"
        );
    }
    // A literal pattern takes `*` and `?` as themselves.
    assert!(!Pattern::literal("a*").matches(b"ab"));
    assert!(Pattern::literal("a*").matches(b"a*"));
    // No exponential backtracking: 40 stars against 10,000 characters that never match.
    let p = Pattern::wild(&"a*".repeat(40));
    let s = "a".repeat(10_000) + "b";
    let started = std::time::Instant::now();
    assert!(!Pattern::wild(&format!("{}c", "a*".repeat(40))).matches(s.as_bytes()));
    assert!(p.matches(s.as_bytes()));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn arns_match_segment_by_segment() {
    let arn = |p: &str| match glob::ArnTemplate::parse(p, false)
        .unwrap()
        .pattern(&|_| None)
        .unwrap()
    {
        ArnPattern::Any => ArnPattern::Any,
        other => other,
    };
    let cases: &[(&str, &str, bool)] = &[
        ("*", Q, true),
        ("arn:aws:rabbitmq:::vhost/*", Q, true),
        ("arn:aws:rabbitmq:::vhost/%2F/queue/orders.*", Q, true),
        ("arn:aws:rabbitmq:::vhost/%2F/queue/orders.*", X, false),
        ("arn:aws:rabbitmq:*:*:vhost/%2F/queue/*", Q, true),
        // A wildcard in the first five segments stays within its segment.
        (
            "arn:aws:iam::*:role/App",
            "arn:aws:iam::111122223333:x:role/App",
            false,
        ),
        ("arn:aws:rabbitmq:::vhost/%2F/queue/orders.e?", Q, true),
        // The resource segment keeps its own colons.
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/a:*",
            "arn:aws:rabbitmq:::vhost/%2F/queue/a:b:c",
            true,
        ),
        ("arn:aws:iam::*:role/App", ROLE, true),
        ("arn:aws:iam::111122223333:role/*", ROLE, true),
        ("arn:aws:iam::444455556666:role/*", ROLE, false),
    ];
    for (p, s, want) in cases {
        assert_eq!(arn(p).matches(s), *want, "{p} ~ {s}");
    }
    assert!(glob::ArnTemplate::parse("arn:aws:rabbitmq", false).is_err());
    assert!(glob::ArnTemplate::parse("arn:aws:*:vhost/%2F/queue/orders.eu", false).is_err());
}

#[test]
fn resource_arns_escape_slashes_percent_and_bytes_that_are_not_utf8() {
    assert_eq!(vhost_arn("/"), "arn:aws:rabbitmq:::vhost/%2F");
    assert_eq!(vhost_arn("a%b"), "arn:aws:rabbitmq:::vhost/a%25b");
    assert_eq!(
        resource_arn("/", ResourceKind::Queue, b"q/1"),
        "arn:aws:rabbitmq:::vhost/%2F/queue/q%2F1"
    );
    assert_eq!(
        resource_arn("v", ResourceKind::Exchange, b"x\xff"),
        "arn:aws:rabbitmq:::vhost/v/exchange/x%FF"
    );
    assert_eq!(
        topic_arn("/", "amq.topic", b"eu/new"),
        "arn:aws:rabbitmq:::vhost/%2F/topic/amq.topic/eu%2Fnew"
    );
}

#[test]
fn action_names_match_without_regard_to_case_and_with_wildcards() {
    let cases: &[(&str, &[&str])] = &[
        ("rabbitmq:Publish", &["rabbitmq:Publish"]),
        ("RABBITMQ:publish", &["rabbitmq:Publish"]),
        (
            "rabbitmq:Queue*",
            &[
                "rabbitmq:QueueDeclare",
                "rabbitmq:QueueDelete",
                "rabbitmq:QueuePurge",
                "rabbitmq:QueueBind",
                "rabbitmq:QueueUnbind",
            ],
        ),
        (
            "rabbitmq:*Unbind",
            &["rabbitmq:ExchangeUnbind", "rabbitmq:QueueUnbind"],
        ),
        ("rabbitmq:Ge?", &["rabbitmq:Get"]),
        ("sqs:SendMessage", &[]),
    ];
    for (p, want) in cases {
        assert_eq!(Action::matching(p).names(), *want, "{p}");
    }
    assert_eq!(Action::matching("*").names().len(), 16);
    assert_eq!(Action::matching("rabbitmq:*").names(), Action::names());
}

#[test]
fn explicit_deny_wins_then_allow_then_implicit_deny() {
    let deny = r#"{"Sid": "NoEu", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Read", "Resource": "arn:aws:rabbitmq:::vhost/%2F/queue/*.eu"}"#;
    let allow = allow_all("All");
    let read = [Action::Read, Action::Consume];
    // Allow alone; deny alone (and nothing else); both, in either order.
    assert_eq!(decision(&doc(&allow), &read, Q), "allow:All");
    assert_eq!(decision(&doc(deny), &read, Q), "deny:NoEu");
    assert_eq!(
        decision(&doc(&format!("{allow},{deny}")), &read, Q),
        "deny:NoEu"
    );
    assert_eq!(
        decision(&doc(&format!("{deny},{allow}")), &read, Q),
        "deny:NoEu"
    );
    // The deny does not apply elsewhere: the allow decides.
    assert_eq!(
        decision(&doc(&format!("{deny},{allow}")), &read, X),
        "allow:All"
    );
    // Nothing applies: implicit.
    let other = r#"{"Sid": "Pub", "Effect": "Allow", "Principal": "*", "Action": "rabbitmq:Publish", "Resource": "*"}"#;
    assert_eq!(decision(&doc(other), &read, Q), "implicit");
    // The first Allow is the one named.
    assert_eq!(
        decision(
            &doc(&format!("{},{}", allow_all("A"), allow_all("B"))),
            &read,
            Q
        ),
        "allow:A"
    );
    // Deny statements in other documents win too.
    let ps = PolicySet::compile(&[
        ("a.json".into(), doc(&allow_all("All"))),
        ("b.json".into(), doc(deny)),
    ])
    .unwrap();
    let b = Binding::new(&ps, Mode::Policies, &facts());
    assert_eq!(b.evaluate(&req(&read, Q)), Decision::Deny("b.json:NoEu"));
}

#[test]
fn not_action_and_not_resource_apply_to_everything_else() {
    let not_action = r#"{"Sid": "OnlyConsume", "Effect": "Deny", "Principal": "*", "NotAction": ["rabbitmq:Consume", "rabbitmq:Connect"], "Resource": "*"}"#;
    let d = doc(&format!("{not_action},{}", allow_all("All")));
    // A check names the permission and the operation: NotAction applies when it names neither.
    assert_eq!(
        decision(&d, &[Action::Read, Action::Consume], Q),
        "allow:All"
    );
    assert_eq!(
        decision(&d, &[Action::Read, Action::Get], Q),
        "deny:OnlyConsume"
    );
    assert_eq!(
        decision(&d, &[Action::Write, Action::Publish], X),
        "deny:OnlyConsume"
    );
    assert_eq!(
        decision(&d, &[Action::Connect], "arn:aws:rabbitmq:::vhost/%2F"),
        "allow:All"
    );

    let not_resource = r#"{"Sid": "OnlyOrders", "Effect": "Deny", "Principal": "*", "Action": "*", "NotResource": ["arn:aws:rabbitmq:::vhost/%2F/queue/orders.*", "arn:aws:rabbitmq:::vhost/%2F/exchange/orders"]}"#;
    let d = doc(&format!("{not_resource},{}", allow_all("All")));
    assert_eq!(decision(&d, &[Action::Read, Action::Get], Q), "allow:All");
    assert_eq!(
        decision(&d, &[Action::Write, Action::Publish], X),
        "allow:All"
    );
    assert_eq!(
        decision(
            &d,
            &[Action::Read, Action::Get],
            "arn:aws:rabbitmq:::vhost/%2F/queue/audit.x"
        ),
        "deny:OnlyOrders"
    );
    // An Allow with NotResource.
    let allow_not = r#"{"Sid": "AllButAudit", "Effect": "Allow", "Principal": "*", "Action": "*", "NotResource": "arn:aws:rabbitmq:::vhost/*/queue/audit.*"}"#;
    assert_eq!(
        decision(&doc(allow_not), &[Action::Read], Q),
        "allow:AllButAudit"
    );
    assert_eq!(
        decision(
            &doc(allow_not),
            &[Action::Read],
            "arn:aws:rabbitmq:::vhost/v/queue/audit.1"
        ),
        "implicit"
    );
}

#[test]
fn principals_name_roles_accounts_and_everyone() {
    let with = |principal: &str| {
        doc(&format!(
            r#"{{"Sid": "S", "Effect": "Allow", "Principal": {principal}, "Action": "*", "Resource": "*"}}"#
        ))
    };
    let cases: &[(&str, &str)] = &[
        (r#""*""#, "allow:S"),
        (r#"{"AWS": "*"}"#, "allow:S"),
        (&format!(r#"{{"AWS": "{ROLE}"}}"#), "allow:S"),
        (
            r#"{"AWS": "arn:aws:iam::111122223333:role/Other"}"#,
            "implicit",
        ),
        (
            r#"{"AWS": ["arn:aws:iam::111122223333:role/Other", "arn:aws:iam::111122223333:role/A*"]}"#,
            "allow:S",
        ),
        (r#"{"AWS": "111122223333"}"#, "allow:S"),
        (r#"{"AWS": "arn:aws:iam::111122223333:root"}"#, "allow:S"),
        (r#"{"AWS": "444455556666"}"#, "implicit"),
    ];
    for (p, want) in cases {
        assert_eq!(decision(&with(p), &[Action::Read], Q), *want, "{p}");
    }
    // NotPrincipal: everyone but those named.
    let not = |p: &str| {
        doc(&format!(
            r#"{{"Sid": "N", "Effect": "Deny", "NotPrincipal": {{"AWS": "{p}"}}, "Action": "*", "Resource": "*"}},{}"#,
            allow_all("All")
        ))
    };
    assert_eq!(decision(&not(ROLE), &[Action::Read], Q), "allow:All");
    assert_eq!(
        decision(
            &not("arn:aws:iam::111122223333:role/Admin"),
            &[Action::Read],
            Q
        ),
        "deny:N"
    );
    // A token without an ARN (another issuer): only "*" names it.
    let anonymous = Facts::default();
    assert_eq!(
        decide_with(&anonymous, &with(r#""*""#), &[Action::Read], Q),
        "allow:S"
    );
    assert_eq!(
        decide_with(
            &anonymous,
            &with(r#"{"AWS": "111122223333"}"#),
            &[Action::Read],
            Q
        ),
        "implicit"
    );
    assert_eq!(
        decide_with(&anonymous, &not(ROLE), &[Action::Read], Q),
        "deny:N"
    );
}

/// One condition block, decided for the default facts and request (routing key `eu.new`
/// at 2025-06-15T15:06:40Z, vhost `/`).
fn cond(block: &str) -> bool {
    let text = doc(&format!(
        r#"{{"Sid": "C", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {block}}}"#
    ));
    let b = Binding::new(&set(&text), Mode::Policies, &facts());
    let mut r = req(&[Action::Write, Action::Publish], X);
    r.routing_key = Some(b"eu.new");
    matches!(b.evaluate(&r), Decision::Allow(_))
}

#[test]
fn string_operators() {
    let cases: &[(&str, bool)] = &[
        (
            r#"{"StringEquals": {"aws:PrincipalTag/team": "orders"}}"#,
            true,
        ),
        (
            r#"{"StringEquals": {"aws:PrincipalTag/team": "Orders"}}"#,
            false,
        ),
        (
            r#"{"StringEquals": {"aws:PrincipalTag/team": ["billing", "orders"]}}"#,
            true,
        ),
        // Condition key names, tag keys included, without regard to case.
        (
            r#"{"StringEquals": {"AWS:principaltag/TEAM": "orders"}}"#,
            true,
        ),
        (r#"{"StringEquals": {"aws:PrincipalTag/level": "7"}}"#, true),
        (
            r#"{"StringNotEquals": {"aws:PrincipalTag/team": "billing"}}"#,
            true,
        ),
        (
            r#"{"StringNotEquals": {"aws:PrincipalTag/team": ["billing", "orders"]}}"#,
            false,
        ),
        (
            r#"{"StringEqualsIgnoreCase": {"aws:PrincipalTag/team": "ORDERS"}}"#,
            true,
        ),
        (
            r#"{"StringNotEqualsIgnoreCase": {"aws:PrincipalTag/team": "ORDERS"}}"#,
            false,
        ),
        (r#"{"StringLike": {"rabbitmq:RoutingKey": "eu.*"}}"#, true),
        (r#"{"StringLike": {"rabbitmq:RoutingKey": "us.*"}}"#, false),
        (
            r#"{"StringNotLike": {"rabbitmq:RoutingKey": "us.*"}}"#,
            true,
        ),
        (
            r#"{"StringLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/App"}}"#,
            true,
        ),
        (r#"{"StringEquals": {"rabbitmq:Vhost": "/"}}"#, true),
        (
            r#"{"StringEquals": {"aws:RequestTag/job": "nightly"}}"#,
            true,
        ),
        (
            r#"{"StringEquals": {"aws:PrincipalAccount": "111122223333"}}"#,
            true,
        ),
        (
            r#"{"StringEquals": {"aws:PrincipalOrgID": "o-abc1234567"}}"#,
            true,
        ),
        (
            r#"{"StringEquals": {"aws:RequestedRegion": "us-east-1"}}"#,
            true,
        ),
        // Several keys in one operator: all must hold; several operators: all must hold.
        (
            r#"{"StringEquals": {"aws:PrincipalTag/team": "orders", "aws:RequestTag/job": "daily"}}"#,
            false,
        ),
        (
            r#"{"StringEquals": {"aws:PrincipalTag/team": "orders"}, "StringLike": {"rabbitmq:RoutingKey": "us.*"}}"#,
            false,
        ),
        // Numbers and booleans written as JSON compare as their text.
        (r#"{"StringEquals": {"aws:PrincipalTag/level": 7}}"#, true),
        // aws:CurrentTime as text.
        (
            r#"{"StringLike": {"aws:CurrentTime": "2025-06-15T*"}}"#,
            true,
        ),
    ];
    for (block, want) in cases {
        assert_eq!(cond(block), *want, "{block}");
    }
}

#[test]
fn numeric_date_bool_ip_and_arn_operators() {
    let cases: &[(&str, bool)] = &[
        (
            r#"{"NumericEquals": {"aws:PrincipalTag/level": "7"}}"#,
            true,
        ),
        (
            r#"{"NumericEquals": {"aws:PrincipalTag/level": "7.0"}}"#,
            true,
        ),
        (
            r#"{"NumericNotEquals": {"aws:PrincipalTag/level": "7"}}"#,
            false,
        ),
        (
            r#"{"NumericLessThan": {"aws:PrincipalTag/level": 8}}"#,
            true,
        ),
        (
            r#"{"NumericLessThan": {"aws:PrincipalTag/level": 7}}"#,
            false,
        ),
        (
            r#"{"NumericLessThanEquals": {"aws:PrincipalTag/level": 7}}"#,
            true,
        ),
        (
            r#"{"NumericGreaterThan": {"aws:PrincipalTag/level": 6.5}}"#,
            true,
        ),
        (
            r#"{"NumericGreaterThanEquals": {"aws:PrincipalTag/level": 8}}"#,
            false,
        ),
        // A value that is not a number matches no numeric operator.
        (
            r#"{"NumericLessThan": {"aws:PrincipalTag/team": 8}}"#,
            false,
        ),
        (
            r#"{"NumericGreaterThan": {"aws:EpochTime": 1749999999}}"#,
            true,
        ),
        (
            r#"{"NumericLessThan": {"aws:EpochTime": 1749999999}}"#,
            false,
        ),
        (
            r#"{"DateGreaterThan": {"aws:CurrentTime": "2025-06-15T00:00:00Z"}}"#,
            true,
        ),
        (
            r#"{"DateLessThan": {"aws:CurrentTime": "2025-06-15T00:00:00Z"}}"#,
            false,
        ),
        (
            r#"{"DateLessThan": {"aws:CurrentTime": "2025-06-16"}}"#,
            true,
        ),
        (
            r#"{"DateEquals": {"aws:CurrentTime": "2025-06-15T15:06:40Z"}}"#,
            true,
        ),
        (
            r#"{"DateEquals": {"aws:CurrentTime": "2025-06-15T17:06:40+02:00"}}"#,
            true,
        ),
        (
            r#"{"DateNotEquals": {"aws:CurrentTime": "2025-06-15T15:06:40Z"}}"#,
            false,
        ),
        (
            r#"{"DateGreaterThanEquals": {"aws:CurrentTime": 1750000000}}"#,
            true,
        ),
        (
            r#"{"DateLessThanEquals": {"aws:EpochTime": "1750000000"}}"#,
            true,
        ),
        (
            r#"{"DateLessThan": {"aws:TokenIssueTime": "2023-11-14T22:13:21Z"}}"#,
            true,
        ),
        (
            r#"{"DateGreaterThan": {"aws:TokenIssueTime": "2023-11-14T22:13:21Z"}}"#,
            false,
        ),
        (r#"{"Bool": {"aws:SecureTransport": "true"}}"#, true),
        (r#"{"Bool": {"aws:SecureTransport": false}}"#, false),
        (r#"{"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}"#, true),
        (
            r#"{"IpAddress": {"aws:SourceIp": ["192.168.0.0/16", "10.1.2.3"]}}"#,
            true,
        ),
        (
            r#"{"IpAddress": {"aws:SourceIp": "192.168.0.0/16"}}"#,
            false,
        ),
        (
            r#"{"NotIpAddress": {"aws:SourceIp": "192.168.0.0/16"}}"#,
            true,
        ),
        (
            r#"{"NotIpAddress": {"aws:SourceIp": ["192.168.0.0/16", "10.0.0.0/8"]}}"#,
            false,
        ),
        (r#"{"IpAddress": {"aws:SourceIp": "::/0"}}"#, false),
        (
            r#"{"ArnEquals": {"aws:PrincipalArn": "arn:aws:iam::111122223333:role/App"}}"#,
            true,
        ),
        (
            r#"{"ArnLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/*"}}"#,
            true,
        ),
        (
            r#"{"ArnLike": {"aws:PrincipalArn": "arn:aws:iam::*:user/*"}}"#,
            false,
        ),
        (
            r#"{"ArnNotLike": {"aws:PrincipalArn": "arn:aws:iam::*:user/*"}}"#,
            true,
        ),
        (
            r#"{"ArnNotEquals": {"aws:PrincipalArn": "arn:aws:iam::111122223333:role/App"}}"#,
            false,
        ),
    ];
    for (block, want) in cases {
        assert_eq!(cond(block), *want, "{block}");
    }
    let v6 = Facts {
        source_ip: Some("2001:db8::1".parse::<IpAddr>().unwrap()),
        ..facts()
    };
    let d = doc(
        r#"{"Sid": "C", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {"IpAddress": {"aws:SourceIp": "2001:db8::/32"}}}"#,
    );
    assert_eq!(decide_with(&v6, &d, &[Action::Read], Q), "allow:C");
}

#[test]
fn missing_keys_if_exists_and_null() {
    let cases: &[(&str, bool)] = &[
        // Absent key: positive operators false, negated ones true.
        (
            r#"{"StringEquals": {"aws:PrincipalTag/missing": "x"}}"#,
            false,
        ),
        (
            r#"{"StringNotEquals": {"aws:PrincipalTag/missing": "x"}}"#,
            true,
        ),
        (
            r#"{"StringLike": {"aws:PrincipalTag/missing": "*"}}"#,
            false,
        ),
        (
            r#"{"StringNotLike": {"aws:PrincipalTag/missing": "*"}}"#,
            true,
        ),
        (
            r#"{"NumericLessThan": {"aws:PrincipalTag/missing": 1}}"#,
            false,
        ),
        (
            r#"{"NumericNotEquals": {"aws:PrincipalTag/missing": 1}}"#,
            true,
        ),
        (
            r#"{"ArnNotLike": {"aws:PrincipalTag/missing": "arn:*:*:*:*:*"}}"#,
            true,
        ),
        // ...IfExists: true when absent, the operator otherwise.
        (
            r#"{"StringEqualsIfExists": {"aws:PrincipalTag/missing": "x"}}"#,
            true,
        ),
        (
            r#"{"StringEqualsIfExists": {"aws:PrincipalTag/team": "x"}}"#,
            false,
        ),
        (
            r#"{"StringEqualsIfExists": {"aws:PrincipalTag/team": "orders"}}"#,
            true,
        ),
        (
            r#"{"NumericLessThanIfExists": {"aws:PrincipalTag/missing": 1}}"#,
            true,
        ),
        (
            r#"{"DateLessThanIfExists": {"aws:PrincipalTag/missing": "2020-01-01"}}"#,
            true,
        ),
        (
            r#"{"BoolIfExists": {"aws:PrincipalTag/missing": "true"}}"#,
            true,
        ),
        (
            r#"{"IpAddressIfExists": {"aws:PrincipalTag/missing": "10.0.0.0/8"}}"#,
            true,
        ),
        (
            r#"{"ArnLikeIfExists": {"aws:PrincipalTag/missing": "arn:*:*:*:*:*"}}"#,
            true,
        ),
        // Null: "true" holds when the key is absent, "false" when present.
        (r#"{"Null": {"aws:PrincipalTag/missing": "true"}}"#, true),
        (r#"{"Null": {"aws:PrincipalTag/team": "true"}}"#, false),
        (r#"{"Null": {"aws:PrincipalTag/team": "false"}}"#, true),
        (r#"{"Null": {"aws:PrincipalTag/missing": false}}"#, false),
        (r#"{"Null": {"aws:TagKeys": "false"}}"#, true),
    ];
    for (block, want) in cases {
        assert_eq!(cond(block), *want, "{block}");
    }
    // No routing key (consume): a RoutingKey condition sees the key absent.
    let d = doc(
        r#"{"Sid": "C", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {"StringLikeIfExists": {"rabbitmq:RoutingKey": "eu.*"}}}"#,
    );
    assert_eq!(decision(&d, &[Action::Read, Action::Consume], Q), "allow:C");
    // A token without an organisation: "nobody from outside our organisation" denies it.
    let no_org = Facts {
        org_id: None,
        ..facts()
    };
    let d = doc(&format!(
        r#"{{"Sid": "Outsiders", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Read", "Resource": "*", "Condition": {{"StringNotEquals": {{"aws:PrincipalOrgID": "o-abc1234567"}}}}}},{}"#,
        allow_all("All")
    ));
    assert_eq!(decide_with(&facts(), &d, &[Action::Read], Q), "allow:All");
    assert_eq!(
        decide_with(&no_org, &d, &[Action::Read], Q),
        "deny:Outsiders"
    );
}

#[test]
fn set_operators() {
    // aws:TagKeys is ["job", "env"]; aws:PrincipalOrgPaths has one path.
    let cases: &[(&str, bool)] = &[
        (
            r#"{"ForAnyValue:StringEquals": {"aws:TagKeys": ["env", "owner"]}}"#,
            true,
        ),
        (
            r#"{"ForAnyValue:StringEquals": {"aws:TagKeys": ["owner"]}}"#,
            false,
        ),
        (
            r#"{"ForAllValues:StringEquals": {"aws:TagKeys": ["env", "job", "owner"]}}"#,
            true,
        ),
        (
            r#"{"ForAllValues:StringEquals": {"aws:TagKeys": ["env"]}}"#,
            false,
        ),
        (
            r#"{"ForAllValues:StringLike": {"aws:TagKeys": ["*"]}}"#,
            true,
        ),
        (
            r#"{"ForAnyValue:StringNotEquals": {"aws:TagKeys": ["env"]}}"#,
            true,
        ),
        (
            r#"{"ForAllValues:StringNotEquals": {"aws:TagKeys": ["env"]}}"#,
            false,
        ),
        (
            r#"{"ForAnyValue:StringLike": {"aws:PrincipalOrgPaths": "o-abc1234567/r-ab12/*"}}"#,
            true,
        ),
        // A set operator on a single-valued key treats it as a set of one.
        (
            r#"{"ForAnyValue:StringEquals": {"aws:PrincipalTag/team": "orders"}}"#,
            true,
        ),
        // Absent key: ForAnyValue false, ForAllValues true (IAM's documented trap).
        (
            r#"{"ForAnyValue:StringEquals": {"aws:PrincipalTag/missing": "x"}}"#,
            false,
        ),
        (
            r#"{"ForAllValues:StringEquals": {"aws:PrincipalTag/missing": "x"}}"#,
            true,
        ),
        (
            r#"{"ForAnyValue:StringEqualsIfExists": {"aws:PrincipalTag/missing": "x"}}"#,
            true,
        ),
    ];
    for (block, want) in cases {
        assert_eq!(cond(block), *want, "{block}");
    }
    // An empty set (no request tags): ForAllValues holds, ForAnyValue does not.
    let none = Facts {
        tag_keys: Vec::new(),
        request_tags: Default::default(),
        ..facts()
    };
    let with = |block: &str| {
        doc(&format!(
            r#"{{"Sid": "C", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {block}}}"#
        ))
    };
    assert_eq!(
        decide_with(
            &none,
            &with(r#"{"ForAllValues:StringEquals": {"aws:TagKeys": "env"}}"#),
            &[Action::Read],
            Q
        ),
        "allow:C"
    );
    assert_eq!(
        decide_with(
            &none,
            &with(r#"{"ForAnyValue:StringEquals": {"aws:TagKeys": "env"}}"#),
            &[Action::Read],
            Q
        ),
        "implicit"
    );
    assert_eq!(
        decide_with(
            &none,
            &with(r#"{"Null": {"aws:TagKeys": "true"}}"#),
            &[Action::Read],
            Q
        ),
        "allow:C"
    );
}

#[test]
fn policy_variables() {
    let res = |resource: &str| {
        doc(&format!(
            r#"{{"Sid": "V", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "{resource}"}}"#
        ))
    };
    let q = |name: &str| format!("arn:aws:rabbitmq:::vhost/%2F/queue/{name}");
    let cases: &[(&str, &str, &str)] = &[
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/team}.*",
            "orders.eu",
            "allow:V",
        ),
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/team}.*",
            "billing.eu",
            "implicit",
        ),
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:principaltag/TEAM}.*",
            "orders.eu",
            "allow:V",
        ),
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalAccount}-*",
            "111122223333-x",
            "allow:V",
        ),
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:RequestTag/job}",
            "nightly",
            "allow:V",
        ),
        // A variable without a value and without a default: the resource matches nothing.
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/missing}*",
            "orders.eu",
            "implicit",
        ),
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/missing, 'shared'}.*",
            "shared.x",
            "allow:V",
        ),
        // ${*}, ${?} and ${$} are the characters themselves.
        ("arn:aws:rabbitmq:::vhost/%2F/queue/a${*}", "a*", "allow:V"),
        ("arn:aws:rabbitmq:::vhost/%2F/queue/a${*}", "ab", "implicit"),
        (
            "arn:aws:rabbitmq:::vhost/%2F/queue/a${?}${$}",
            "a?$",
            "allow:V",
        ),
    ];
    for (resource, name, want) in cases {
        assert_eq!(
            decision(&res(resource), &[Action::Read], &q(name)),
            *want,
            "{resource} ~ {name}"
        );
    }
    // A variable without a value fails closed: a Deny applies as if it were `*` there (and
    // its condition held); an Allow does not apply.
    let deny_res = |resource: &str| {
        doc(&format!(
            r#"{{"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "{resource}"}},{}"#,
            allow_all("All")
        ))
    };
    let d = deny_res("arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/missing}.eu");
    assert_eq!(decision(&d, &[Action::Read], &q("orders.eu")), "deny:D");
    assert_eq!(decision(&d, &[Action::Read], &q("orders.us")), "allow:All");
    // Under NotResource the same rule holds: the Deny covers more, the Allow less.
    let not_res = |effect: &str| {
        doc(&format!(
            r#"{{"Sid": "N", "Effect": "{effect}", "Principal": "*", "Action": "*", "NotResource": "arn:aws:rabbitmq:::vhost/%2F/queue/${{aws:PrincipalTag/missing}}.eu"}}"#
        ))
    };
    assert_eq!(
        decision(&not_res("Deny"), &[Action::Read], &q("orders.eu")),
        "deny:N"
    );
    assert_eq!(
        decision(&not_res("Allow"), &[Action::Read], &q("orders.us")),
        "allow:N"
    );
    assert_eq!(
        decision(&not_res("Allow"), &[Action::Read], &q("orders.eu")),
        "implicit"
    );
    let cond = |effect: &str, op: &str| {
        doc(&format!(
            r#"{{"Sid": "C", "Effect": "{effect}", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {{"{op}": {{"aws:PrincipalOrgID": "${{aws:PrincipalTag/org}}"}}}}}}"#
        ))
    };
    for op in [
        "StringEquals",
        "StringNotEquals",
        "StringLike",
        "StringNotLike",
    ] {
        assert_eq!(
            decision(&cond("Allow", op), &[Action::Read], Q),
            "implicit",
            "Allow {op}"
        );
        assert_eq!(
            decision(&cond("Deny", op), &[Action::Read], Q),
            "deny:C",
            "Deny {op}"
        );
    }
    // A value a Numeric operator cannot read counts as missing.
    let numeric = |effect: &str| {
        doc(&format!(
            r#"{{"Sid": "N", "Effect": "{effect}", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {{"NumericLessThan": {{"aws:PrincipalTag/level": "${{aws:PrincipalTag/team}}"}}}}}}"#
        ))
    };
    assert_eq!(decision(&numeric("Allow"), &[Action::Read], Q), "implicit");
    assert_eq!(decision(&numeric("Deny"), &[Action::Read], Q), "deny:N");
    // A variable's value is literal text: a tag value `*` is not a wildcard.
    let mut star = facts();
    star.principal_tags.insert("team".into(), "*".into());
    let d = res("arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/team}");
    assert_eq!(
        decide_with(&star, &d, &[Action::Read], &q("orders.eu")),
        "implicit"
    );
    assert_eq!(decide_with(&star, &d, &[Action::Read], &q("*")), "allow:V");
    // In condition values.
    let c = doc(
        r#"{"Sid": "V", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {"StringLike": {"rabbitmq:RoutingKey": "${aws:PrincipalTag/team}.*"}}}"#,
    );
    let b = Binding::new(&set(&c), Mode::Policies, &facts());
    let mut r = req(&[Action::Publish], X);
    r.routing_key = Some(b"orders.new");
    assert_eq!(b.evaluate(&r), Decision::Allow("p.json:V"));
    r.routing_key = Some(b"billing.new");
    assert_eq!(b.evaluate(&r), Decision::Implicit);
    // Version 2008-10-17 (or none) has no variables: an error rather than literal text.
    let old = r#"{"Version": "2008-10-17", "Statement": {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "arn:aws:rabbitmq:::vhost/${aws:PrincipalTag/team}"}}"#;
    assert_eq!(
        errors(old),
        [
            "p.json: $.Statement.Resource[0]: a policy variable needs \"Version\": \"2012-10-17\" (IAM would read it as text)"
        ]
    );
}

#[test]
fn documents_errors_name_their_json_path() {
    let s = |body: &str| {
        doc(&format!(
            r#"{{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", {body}}}"#
        ))
    };
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "p.json: $: not JSON: expected ident at line 1 column 2"),
        ("[]".into(), "p.json: $: a policy document is an object, not an array"),
        (r#"{"Version": "2012-10-17"}"#.into(), "p.json: $: no Statement"),
        (r#"{"Version": "2012-10-17", "Statement": []}"#.into(), "p.json: $.Statement: no statements"),
        (r#"{"Version": "2012-10-17", "Version": "2012-10-17", "Statement": {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"}}"#.into(), "p.json: $: \"Version\" appears twice"),
        (r#"{"Version": "2019-01-01", "Statement": {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"}}"#.into(), "p.json: $.Version: expected \"2012-10-17\" or \"2008-10-17\", found \"2019-01-01\""),
        (doc(r#"{"Effect": "allow", "Principal": "*", "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0].Effect: expected \"Allow\" or \"Deny\", found \"allow\""),
        (doc(r#"{"Principal": "*", "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0]: no Effect"),
        (doc(r#"{"Effect": "Allow", "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0]: no Principal or NotPrincipal: a broker policy names whom each statement is about (\"*\" for everyone)"),
        (doc(r#"{"Effect": "Allow", "Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0]: \"Effect\" appears twice"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*", "NotAction": "*", "Resource": "*"}"#), "p.json: $.Statement[0].NotAction: a statement has Action or NotAction, not both"),
        (s(r#""Resources": "*""#), "p.json: $.Statement[0].Resources: unknown element \"Resources\"; a statement has Sid, Effect, Principal or NotPrincipal, Action or NotAction, Resource or NotResource, and Condition"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": ["rabbitmq:Publish", "rabbitmq:Publsh"], "Resource": "*"}"#), "p.json: $.Statement[0].Action[1]: \"rabbitmq:Publsh\" names no action of the gateway; they are rabbitmq:Connect, rabbitmq:Configure, rabbitmq:Write, rabbitmq:Read, rabbitmq:ExchangeDeclare, rabbitmq:ExchangeDelete, rabbitmq:ExchangeBind, rabbitmq:ExchangeUnbind, rabbitmq:QueueDeclare, rabbitmq:QueueDelete, rabbitmq:QueuePurge, rabbitmq:QueueBind, rabbitmq:QueueUnbind, rabbitmq:Publish, rabbitmq:Consume, rabbitmq:Get"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "arn:aws:sqs:::orders"}"#), "p.json: $.Statement[0].Resource[0]: \"arn:aws:sqs:::orders\" is a resource of service \"sqs\"; the broker's are arn:aws:rabbitmq:::vhost/..."),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "arn:aws:rabbitmq:::queue/orders"}"#), "p.json: $.Statement[0].Resource[0]: \"arn:aws:rabbitmq:::queue/orders\" can match no resource of the broker: they are vhost/<vhost>, vhost/<vhost>/queue/<name>, vhost/<vhost>/exchange/<name> and vhost/<vhost>/topic/<exchange>/<routing key>"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "rabbit*:Get", "Resource": "*"}"#), "p.json: $.Statement[0].Action[0]: \"rabbit*:Get\": an action is \"*\" or vendor:action (rabbitmq:Publish), with no wildcard in part of the vendor"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*Publish", "Resource": "*"}"#), "p.json: $.Statement[0].Action[0]: \"*Publish\": an action is \"*\" or vendor:action (rabbitmq:Publish), with no wildcard in part of the vendor"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "arn:aws*:rabbitmq:::vhost/x"}"#), "p.json: $.Statement[0].Resource[0]: \"arn:aws*:rabbitmq:::vhost/x\": no wildcard in an ARN's service or in part of its partition (IAM refuses them)"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "arn:aws:*:::vhost/x"}"#), "p.json: $.Statement[0].Resource[0]: \"arn:aws:*:::vhost/x\": no wildcard in an ARN's service or in part of its partition (IAM refuses them)"),
        (doc(r#"{"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "orders"}"#), "p.json: $.Statement[0].Resource[0]: \"orders\" is not an ARN: expected arn:partition:service:region:account:resource (six parts separated by colons)"),
        (doc(r#"{"Effect": "Allow", "Principal": {"Service": "sqs.amazonaws.com"}, "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0].Principal.Service: \"Service\" principals never reach the broker: only \"AWS\" principals (role ARNs, account ids, \"*\") do"),
        (s(r#""Condition": {"StringEqual": {"aws:PrincipalTag/team": "x"}}"#), "p.json: $.Statement[0].Condition.StringEqual: unknown condition operator \"StringEqual\""),
        (s(r#""Condition": {"StringEquals": {"aws:PrincipalTeg/team": "x"}}"#), "p.json: $.Statement[0].Condition.StringEquals[\"aws:PrincipalTeg/team\"]: unknown condition key \"aws:PrincipalTeg/team\"; the gateway knows aws:PrincipalArn, aws:PrincipalAccount, aws:PrincipalOrgID, aws:PrincipalOrgPaths, aws:TagKeys, aws:RequestedRegion, aws:SourceIp, aws:SecureTransport, aws:TokenIssueTime, aws:CurrentTime, aws:EpochTime, rabbitmq:Vhost, rabbitmq:RoutingKey, aws:PrincipalTag/<key> and aws:RequestTag/<key>"),
        (s(r#""Condition": {"StringEquals": {"aws:TagKeys": "env"}}"#), "p.json: $.Statement[0].Condition.StringEquals[\"aws:TagKeys\"]: aws:TagKeys has several values: use ForAnyValue:StringEquals or ForAllValues:StringEquals"),
        (s(r#""Condition": {"NumericLessThan": {"aws:EpochTime": "soon"}}"#), "p.json: $.Statement[0].Condition.NumericLessThan[\"aws:EpochTime\"]: \"soon\" is not a number"),
        (s(r#""Condition": {"DateLessThan": {"aws:CurrentTime": ["2026-01-01", "tomorrow"]}}"#), "p.json: $.Statement[0].Condition.DateLessThan[\"aws:CurrentTime\"][1]: \"tomorrow\" is not a date (ISO 8601, such as 2026-12-31T23:59:59Z, or seconds since the epoch)"),
        (s(r#""Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/33"}}"#), "p.json: $.Statement[0].Condition.IpAddress[\"aws:SourceIp\"]: \"10.0.0.0/33\" is not an IP address or CIDR block"),
        (s(r#""Condition": {"NullIfExists": {"aws:SourceIp": "true"}}"#), "p.json: $.Statement[0].Condition.NullIfExists: NullIfExists: Null takes neither IfExists nor a set operator"),
        (s(r#""Condition": {"StringLike": {"aws:PrincipalArn": {"a": 1}}}"#), "p.json: $.Statement[0].Condition.StringLike[\"aws:PrincipalArn\"]: expected a string, number or boolean, found an object"),
        (s(r#""Condition": {"StringLike": {"rabbitmq:RoutingKey": "${aws:CurrentTime}"}}"#), "p.json: $.Statement[0].Condition.StringLike[\"rabbitmq:RoutingKey\"]: policy variable ${aws:CurrentTime}: aws:CurrentTime changes with every operation; use it in a condition instead"),
        (s(r#""Condition": {"StringLike": {"rabbitmq:RoutingKey": "${aws:TagKeys}"}}"#), "p.json: $.Statement[0].Condition.StringLike[\"rabbitmq:RoutingKey\"]: policy variable ${aws:TagKeys}: aws:TagKeys has several values and cannot be a variable"),
        (doc(&format!("{},{}", allow_all("Same"), allow_all("Same"))), "p.json: $.Statement: Sid \"Same\" is used twice"),
        (doc(r#"{"Effect": "Deny", "Principal": {}, "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0].Principal: names no principal: write \"*\" for everyone"),
        (doc(r#"{"Effect": "Allow", "NotPrincipal": {"AWS": "111122223333"}, "Action": "*", "Resource": "*"}"#), "p.json: $.Statement[0].NotPrincipal: NotPrincipal goes with \"Deny\" only (IAM does not support it with \"Allow\")"),
    ];
    for (text, want) in cases {
        let got = errors(&text);
        assert_eq!(
            got.first().map(String::as_str),
            Some(want),
            "{text}\n{got:#?}"
        );
    }
    // Every error of a document at once.
    let many = doc(r#"{"Effect": "Maybe", "Action": "rabbitmq:Nope", "Resource": "x"}"#);
    assert_eq!(errors(&many).len(), 4, "{:#?}", errors(&many));
}

#[test]
fn binding_decides_fixed_conditions_once_and_keeps_the_rest() {
    let d = doc(r#"
        {"Sid": "Tag", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {"StringEquals": {"aws:PrincipalTag/team": "billing"}}},
        {"Sid": "Other", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:role/Other"}, "Action": "*", "Resource": "*"},
        {"Sid": "Window", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", "Condition": {"DateLessThan": {"aws:CurrentTime": "2025-07-01T00:00:00Z"}, "Bool": {"aws:SecureTransport": "true"}}}
    "#);
    let b = Binding::new(&set(&d), Mode::Policies, &facts());
    assert_eq!(b.len(), 1, "only the time window can still apply");
    let mut r = req(&[Action::Read], Q);
    assert_eq!(b.evaluate(&r), Decision::Allow("p.json:Window"));
    r.now = 1_751_328_000; // 2025-07-01T00:00:00Z
    assert_eq!(b.evaluate(&r), Decision::Implicit);
    // Without TLS, the window statement is gone at binding.
    let plain = Facts {
        secure_transport: false,
        ..facts()
    };
    assert!(Binding::new(&set(&d), Mode::Policies, &plain).is_empty());
}
