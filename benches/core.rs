//! Micro-benchmarks of the gateway's per-connection and per-frame work, without sockets.
//!
//! What each group measures, how to run it and the latest results: `benches/README.md`.
//! Run: `cargo bench --bench core` (add `-- --warm-up-time 1 --measurement-time 3` for a
//! short run). Inputs are built once outside the timed loop; only the library call is
//! timed.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel};
use amqp_iam_gateway::amqp::frame;
use amqp_iam_gateway::amqp::session::{Outbox, Session, SessionConfig};
use amqp_iam_gateway::auth::Authenticator;
use amqp_iam_gateway::auth::jwt::ClaimRules;
use amqp_iam_gateway::auth::keys::{KeySettings, KeyStore};
use amqp_iam_gateway::auth::scopes::{self, ScopeRules};
use amqp_iam_gateway::authz::wildcard;
use amqp_iam_gateway::authz::{self, Context, ExchangeKind, Operation, Permissions, Verdict};
use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::111122223333:role/Publisher";
const ISSUER: &str = "https://issuer.test";
const BODY_SIZE: usize = 1024;
const FRAME_MAX: u32 = 131_072;

/// Ten grants, the one a `amq.topic` / `orders.eu.1` publish needs last but one.
const GRANTS: [&str; 10] = [
    "configure:%2F/team-a.*",
    "read:%2F/team-a.*",
    "write:%2F/team-a.*",
    "read:%2F/amq.topic/audit.*",
    "write:staging/*",
    "read:staging/*",
    "configure:%2F/tmp-*",
    "write:%2F/amq.direct",
    "write:%2F/amq.topic/orders.*",
    "read:%2F/amq.topic/orders.*",
];

fn permissions() -> Permissions {
    Permissions::from_scopes(&GRANTS.map(str::to_owned))
}

fn wildcard_matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("wildcard");
    let cases = [
        ("prefix", "orders.*", "orders.eu.1"),
        ("star", "*", "orders.eu.1"),
        ("three_parts", "a*b*c", "a-long-middle-b-and-then-c"),
        ("url_encoded", "team%2Fa.*.q", "team/a.payments.q"),
        ("miss", "orders.*.us", "orders.eu.1"),
    ];
    for (name, pattern, subject) in cases {
        let p = wildcard::compile(pattern);
        g.bench_function(name, |b| {
            b.iter(|| black_box(&p).matches(black_box(subject.as_bytes())))
        });
    }
    g.finish();
}

fn authz_decide(c: &mut Criterion) {
    let perms = permissions();
    let ctx = Context {
        vhost: "/",
        username: ROLE,
        now: 0,
    };
    let publish = |routing_key| Operation::BasicPublish {
        exchange: "amq.topic",
        routing_key,
        exchange_kind: ExchangeKind::Topic,
        user_id: Some(ROLE.as_bytes()),
        extra_routing_keys: &[],
    };
    const PUBLISH: (u16, u16) = (60, 40);
    let permit = publish(b"orders.eu.1");
    assert_eq!(
        authz::decide(&perms, &ctx, &permit, PUBLISH),
        Verdict::Permit
    );
    let deny = publish(b"payments.eu.1");
    assert!(matches!(
        authz::decide(&perms, &ctx, &deny, PUBLISH),
        Verdict::Deny(_)
    ));
    let mut g = c.benchmark_group("authz_decide");
    g.bench_function("topic_publish_permit_10_grants", |b| {
        b.iter(|| authz::decide(black_box(&perms), &ctx, black_box(&permit), PUBLISH))
    });
    g.bench_function("topic_publish_deny_10_grants", |b| {
        b.iter(|| authz::decide(black_box(&perms), &ctx, black_box(&deny), PUBLISH))
    });
    g.finish();
}

/// The README's worked example: the statements a security team writes (tag, organisation,
/// source address, time window, variables), eight in all.
const BROKER_POLICY: &str = r#"{"Version": "2012-10-17", "Statement": [
    {"Sid": "AppPublishesOrders", "Effect": "Allow",
     "Principal": {"AWS": "arn:aws:iam::111122223333:role/Publisher"},
     "Action": ["rabbitmq:Connect", "rabbitmq:Publish"],
     "Resource": ["arn:aws:rabbitmq:::vhost/%2F", "arn:aws:rabbitmq:::vhost/%2F/exchange/amq.topic",
                  "arn:aws:rabbitmq:::vhost/%2F/topic/amq.topic/orders.*"],
     "Condition": {"StringEquals": {"aws:PrincipalTag/team": "orders"}}},
    {"Sid": "TeamQueues", "Effect": "Allow", "Principal": "*", "Action": "rabbitmq:*",
     "Resource": "arn:aws:rabbitmq:::vhost/%2F/queue/${aws:PrincipalTag/team}.*"},
    {"Sid": "JobTagged", "Effect": "Allow", "Principal": "*", "Action": "rabbitmq:Publish",
     "Resource": "arn:aws:rabbitmq:::vhost/%2F/exchange/jobs",
     "Condition": {"StringEquals": {"aws:RequestTag/job": "nightly"}}},
    {"Sid": "NoAuditOutsideOrg", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Read",
     "Resource": "arn:aws:rabbitmq:::vhost/*/queue/audit.*",
     "Condition": {"StringNotEquals": {"aws:PrincipalOrgID": "o-abc1234567"}}},
    {"Sid": "ConsumersInside", "Effect": "Deny", "Principal": "*",
     "Action": ["rabbitmq:Consume", "rabbitmq:Get"], "Resource": "*",
     "Condition": {"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}},
    {"Sid": "OfficeHours", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Publish",
     "Resource": "arn:aws:rabbitmq:::vhost/%2F/exchange/payroll",
     "Condition": {"DateGreaterThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}}},
    {"Sid": "NoPaymentsKeys", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Publish",
     "Resource": "*", "Condition": {"StringLike": {"rabbitmq:RoutingKey": "payments.*"}}},
    {"Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*",
     "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
]}"#;

/// `[authorization]` policies on the relay path: the decision for one publish (two checks:
/// the exchange and the topic) and one consume, against the scopes alone; and the binding
/// done once per connection.
fn policy_decide(c: &mut Criterion) {
    use amqp_iam_gateway::authz::iam::{Binding, Facts, Mode, PolicySet};
    let set = PolicySet::compile(&[("broker.json".into(), BROKER_POLICY.into())]).expect("policy");
    let mut facts = Facts {
        principal_arn: Some(ROLE.into()),
        account: Some("111122223333".into()),
        org_id: Some("o-abc1234567".into()),
        issued_at: Some(1_750_000_000),
        source_ip: Some("10.1.2.3".parse().unwrap()),
        secure_transport: true,
        ..Facts::default()
    };
    facts.principal_tag("team", "orders");
    facts.request_tag("job", "nightly");
    let scopes = permissions();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ctx = Context {
        vhost: "/",
        username: ROLE,
        now,
    };
    let publish = |routing_key| Operation::BasicPublish {
        exchange: "amq.topic",
        routing_key,
        exchange_kind: ExchangeKind::Topic,
        user_id: None,
        extra_routing_keys: &[],
    };
    const PUBLISH: (u16, u16) = (60, 40);
    const CONSUME: (u16, u16) = (60, 20);
    let permit = publish(b"orders.eu.1");
    let deny = publish(b"payments.eu.1");
    let consume = Operation::BasicConsume { queue: "orders.eu" };
    let mut g = c.benchmark_group("policy_decide");
    for mode in [Mode::Scopes, Mode::Both, Mode::Policies] {
        let perms = scopes
            .clone()
            .with_policy(Arc::new(Binding::new(&set, mode, &facts)));
        let m = mode.as_str();
        if mode != Mode::Scopes {
            assert_eq!(
                authz::decide(&perms, &ctx, &permit, PUBLISH),
                Verdict::Permit,
                "{m}"
            );
        }
        assert!(
            matches!(
                authz::decide(&perms, &ctx, &deny, PUBLISH),
                Verdict::Deny(_)
            ),
            "{m}"
        );
        g.bench_function(format!("topic_publish_permit_{m}"), |b| {
            b.iter(|| authz::decide(black_box(&perms), &ctx, black_box(&permit), PUBLISH))
        });
        g.bench_function(format!("topic_publish_deny_{m}"), |b| {
            b.iter(|| authz::decide(black_box(&perms), &ctx, black_box(&deny), PUBLISH))
        });
        g.bench_function(format!("consume_{m}"), |b| {
            b.iter(|| authz::decide(black_box(&perms), &ctx, black_box(&consume), CONSUME))
        });
    }
    g.bench_function("bind_per_connection_8_statements", |b| {
        b.iter(|| Binding::new(black_box(&set), Mode::Both, black_box(&facts)))
    });
    g.finish();
}

fn scope_normalisation(c: &mut Criterion) {
    let mut rules = ScopeRules::with_defaults("rabbitmq");
    rules.scope_prefix = "rabbitmq/".into();
    rules.additional_scopes_key =
        Some(r"sub https://sts\.amazonaws\.com/.request_tags.scope".into());
    rules.scope_aliases = BTreeMap::from([
        (
            ROLE.to_owned(),
            vec![
                "rabbitmq/read:*/*".to_owned(),
                "rabbitmq/write:%2F/amq.topic/orders.*".to_owned(),
                "rabbitmq/tag:monitoring".to_owned(),
            ],
        ),
        (
            "team-a".to_owned(),
            vec![
                "rabbitmq/configure:%2F/team-a.*".to_owned(),
                "rabbitmq/write:%2F/team-a.*".to_owned(),
            ],
        ),
    ]);
    let payload = sts_claims(0);
    let n = scopes::normalise(&payload, &rules).expect("normalise");
    assert_eq!(n.scopes.len(), 5, "{:?}", n.scopes);
    c.bench_function("scopes_normalise/sts_with_alias", |b| {
        b.iter(|| scopes::normalise(black_box(&payload), &rules))
    });
}

fn frame_check(c: &mut Criterion) {
    let mut buf = BytesMut::new();
    frame::write_frame(&mut buf, frame::BODY, 1, &[0x5a; BODY_SIZE]);
    let buf = buf.freeze();
    assert!(matches!(
        frame::check(&buf, FRAME_MAX as usize),
        Ok(Some(_))
    ));
    let mut g = c.benchmark_group("frame_check");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("body_1KiB", |b| {
        b.iter(|| frame::check(black_box(&buf), FRAME_MAX as usize))
    });
    g.finish();
}

fn wire(frame: AMQPFrame) -> Vec<u8> {
    cookie_factory::gen_simple(gen_frame(&frame), Vec::new()).expect("encode")
}

/// `basic.publish` to `amq.topic` + content header (with `user_id`) + one body frame of
/// `BODY_SIZE`.
fn publish_frames(ch: u16, routing_key: &str) -> Vec<u8> {
    let method = basic::Publish {
        exchange: "amq.topic".into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    };
    let mut v = wire(AMQPFrame::Method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Publish(method)),
    ));
    v.extend(wire(AMQPFrame::Header(
        ch,
        AMQPContentHeader {
            class_id: 60,
            body_size: BODY_SIZE as u64,
            properties: basic::AMQPProperties::default().with_user_id(ROLE.into()),
        },
    )));
    v.extend(wire(AMQPFrame::Body(ch, vec![0x5a; BODY_SIZE])));
    v
}

/// A session on which channel 1 is open: publishes on a channel the session has not seen
/// open are forwarded unchecked (the broker refuses them), which is not the path to time.
fn open_session() -> Session {
    let mut s = Session::new(
        SessionConfig {
            frame_max: FRAME_MAX,
            seed: 7,
            ..SessionConfig::new(ROLE, "/")
        },
        permissions(),
    );
    let open = wire(AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    ));
    let (mut input, mut to_b, mut to_c) = (
        BytesMut::from(&open[..]),
        Outbox::default(),
        Outbox::default(),
    );
    s.on_client_input(&mut input, &mut to_b, &mut to_c)
        .expect("channel.open");
    assert_eq!(to_b.len(), open.len());
    s
}

fn session_publishes(c: &mut Criterion) {
    const BATCH: usize = 100;
    let batch: Vec<u8> = (0..BATCH)
        .flat_map(|_| publish_frames(1, "orders.eu.1"))
        .collect();
    {
        let mut s = open_session();
        let (mut input, mut to_b, mut to_c) = (
            BytesMut::from(&batch[..]),
            Outbox::default(),
            Outbox::default(),
        );
        s.on_client_input(&mut input, &mut to_b, &mut to_c)
            .expect("session");
        assert_eq!(to_b.len(), batch.len(), "every publish forwarded");
        assert!(to_c.is_empty() && input.is_empty());
        // The same frames with a routing key outside the grants are refused: the timed path
        // is the checked one.
        let denied = publish_frames(1, "payments.eu.1");
        let (mut input, mut to_b, mut to_c) = (
            BytesMut::from(&denied[..]),
            Outbox::default(),
            Outbox::default(),
        );
        s.on_client_input(&mut input, &mut to_b, &mut to_c)
            .expect("session");
        assert!(
            to_c.is_empty(),
            "the refusal waits for the broker's close-ok"
        );
        assert_eq!(to_b.chunk_count(), 1, "channel.close toward the broker");
        assert_eq!(s.take_denials().len(), 1);
    }
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("on_client_input_100_publishes_1KiB", |b| {
        b.iter_batched(
            || {
                (
                    open_session(),
                    BytesMut::from(&batch[..]),
                    Outbox::default(),
                    Outbox::default(),
                )
            },
            |(mut s, mut input, mut to_b, mut to_c)| {
                let r = s.on_client_input(&mut input, &mut to_b, &mut to_c);
                (r.is_ok(), to_b, to_c)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// STS-shaped claims; `now` 0 gives a payload for the pure scope benchmark.
fn sts_claims(now: i64) -> Value {
    json!({
        "iss": ISSUER,
        "aud": "rabbitmq",
        "sub": ROLE,
        "iat": now,
        "exp": now + 3600,
        "jti": "5b0c8d2e-bench",
        "https://sts.amazonaws.com/": {
            "aws_account": "111122223333",
            "source_region": "us-east-1",
            "request_tags": { "scope": "team-a" }
        }
    })
}

fn jwt_verification(c: &mut Criterion) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let keys = KeyStore::new(KeySettings {
        signing_keys: vec![
            ("RSA_0".into(), fixtures.join("rsa-public.pem")),
            ("EC384_0".into(), fixtures.join("ec384-public.pem")),
        ],
        refresh_interval: Duration::from_secs(600),
        min_refetch_interval: Duration::from_secs(1),
        http_timeout: Duration::from_secs(1),
        ..KeySettings::default()
    })
    .expect("static keys");
    let mut scope_rules = ScopeRules::with_defaults("rabbitmq");
    scope_rules.scope_prefix = "rabbitmq/".into();
    scope_rules.additional_scopes_key = Some("sub".into());
    scope_rules.scope_aliases = BTreeMap::from([(
        ROLE.to_owned(),
        GRANTS.iter().map(|g| format!("rabbitmq/{g}")).collect(),
    )]);
    let auth = Authenticator::new(
        vec![Algorithm::RS256, Algorithm::ES384],
        Arc::new(keys),
        ClaimRules {
            resource_server_id: "rabbitmq".into(),
            verify_aud: true,
            require_exp: true,
            issuer: Some(ISSUER.into()),
            check_nbf: true,
            check_iat: true,
            leeway_seconds: 60,
        },
        scope_rules,
    )
    // Measure the verification itself, not the verified-token cache.
    .with_token_cache(0);
    let now = now();
    let sign = |alg, kid: &str, file: &str| {
        let pem = std::fs::read(fixtures.join(file)).expect("fixture key");
        let key = match alg {
            Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("private key");
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &sts_claims(now), &key).expect("sign")
    };
    // `authenticate` is async only for a JWKS refetch; with known kids it never waits, so
    // a current-thread runtime's `block_on` adds only its own small, constant overhead.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("authenticate");
    for (name, alg, kid, file) in [
        ("rs256", Algorithm::RS256, "RSA_0", "rsa-private.pem"),
        ("es384", Algorithm::ES384, "EC384_0", "ec384-private.pem"),
    ] {
        let token = sign(alg, kid, file);
        let identity = rt
            .block_on(auth.authenticate(&token, now, None))
            .expect("valid token");
        assert_eq!(identity.permissions.grants().len(), GRANTS.len());
        g.bench_function(name, |b| {
            b.iter(|| rt.block_on(auth.authenticate(black_box(&token), now, None)))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    wildcard_matching,
    authz_decide,
    policy_decide,
    scope_normalisation,
    frame_check,
    session_publishes,
    jwt_verification
);
criterion_main!(benches);
