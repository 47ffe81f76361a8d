//! Tables for `authz`: the §4.3 matching rules and scope_SUITE assertions, the live 3.10.8
//! direct calls, and the §6 method matrix with RabbitMQ 4.x's exact texts.

use super::decide::{ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED};
use super::*;

const ALL: [Perm; 3] = [Perm::Configure, Perm::Write, Perm::Read];

fn perms(scopes: &[&str]) -> Permissions {
    let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
    Permissions::from_scopes(&scopes)
}

// ---------------------------------------------------------------- §4.1 / §4.3 matching

const SUITE_VHOSTS: [&str; 5] = ["/", "foo", "*", "foo/bar", "юникод"];
const SUITE_RESOURCES: [&str; 5] = ["foo", "foo/bar", "*", "*/*", "юникод"];

/// scope_SUITE: `<perm>:*/*` and `<perm>:*/*/*` grant vhost access and that permission on
/// every resource, and nothing else.
#[test]
fn wildcard_scopes_grant_one_permission_everywhere() {
    for granted in ALL {
        for shape in ["*/*", "*/*/*"] {
            let scope = format!("{granted}:{shape}");
            let p = perms(&[&scope]);
            for vhost in SUITE_VHOSTS {
                assert!(p.vhost_access(vhost), "{scope} vhost {vhost}");
                for name in SUITE_RESOURCES {
                    for asked in ALL {
                        let want = asked == granted;
                        assert_eq!(
                            p.resource(asked, vhost, name),
                            want,
                            "{scope} {asked} {vhost} {name}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn vhost_scoped_grants() {
    for scope in ["read:foo/*", "read:foo/*/*"] {
        let p = perms(&[scope]);
        for vhost in SUITE_VHOSTS {
            let want = vhost == "foo";
            assert_eq!(p.vhost_access(vhost), want, "{scope} {vhost}");
            for name in SUITE_RESOURCES {
                assert_eq!(
                    p.resource(Perm::Read, vhost, name),
                    want,
                    "{scope} {vhost} {name}"
                );
            }
        }
    }
    // cow_qs:urlencode("foo/bar/*/") matches only that vhost.
    let p = perms(&["read:foo%2Fbar%2F%2A%2F/*"]);
    for vhost in SUITE_VHOSTS.iter().chain(&["foo/bar/*/", "foo/bar/x/"]) {
        assert_eq!(p.vhost_access(vhost), *vhost == "foo/bar/*/", "{vhost}");
    }
}

#[test]
fn encoded_resource_pattern() {
    let p = perms(&["read:*/bar%2A%2Fbaz"]);
    for vhost in SUITE_VHOSTS {
        for name in SUITE_RESOURCES
            .iter()
            .chain(&["bar*/baz", "barx/baz", "bar*/bazz"])
        {
            let want = *name == "bar*/baz";
            assert_eq!(p.resource(Perm::Read, vhost, name), want, "{vhost} {name}");
        }
    }
}

#[test]
fn topic_rows() {
    // (scope, vhost, exchange, routing key, expected)
    let rows: &[(&str, &str, &str, &str, bool)] = &[
        ("read:*/*/*", "any", "any", "any", true),
        ("read:*/*/*", "/", "", "", true),
        ("read:vhost/*/*", "vhost", "x", "rk", true),
        ("read:vhost/*/*", "other", "x", "rk", false),
        ("read:*/exchange/*", "v", "exchange", "rk", true),
        ("read:*/exchange/*", "v", "other", "rk", false),
        ("read:*/*/rout", "v", "x", "rout", true),
        ("read:*/*/rout", "v", "x", "foo", false),
        ("read:*/*/rout", "v", "x", "bar", false),
        ("read:*/*/*rout", "v", "x", "rout", true),
        ("read:*/*/*rout", "v", "x", "norout", true),
        ("read:*/*/*rout", "v", "x", "sprout", true),
        ("read:vhost/bar/%23%2Ffoo", "vhost", "bar", "#/foo", true),
        ("read:vhost/bar/%23%2Ffoo", "vhost", "bar", "#", false),
        // A 2-part scope never grants topic access; nor does another permission.
        ("read:*/*", "v", "x", "rk", false),
        ("write:*/*/*", "v", "x", "rk", false),
    ];
    let failed: Vec<String> = rows
        .iter()
        .filter(|&&(scope, v, x, rk, want)| perms(&[scope]).topic(Perm::Read, v, x, rk) != want)
        .map(|r| format!("{r:?}"))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The "live 3.10.8 direct calls" list of §4.3.
#[test]
fn live_direct_calls() {
    let p = perms(&[
        "read:vh1/q*",
        "write:vh2/x/rk.*",
        "configure:%2F/amq.gen-*",
        "read:vh3/a/b/c",
        "write:vh4",
        "READ:vh5/*",
        "tag:management",
    ]);
    for (vhost, want) in [
        ("vh1", true),
        ("vh2", true),
        ("/", true),
        ("vh3", false),
        ("vh4", false),
        ("vh5", false),
        ("other", false),
    ] {
        assert_eq!(p.vhost_access(vhost), want, "{vhost}");
    }
    assert!(p.resource(Perm::Read, "vh1", "q1"));
    assert!(!p.resource(Perm::Write, "vh1", "q1"));
    assert!(p.resource(Perm::Write, "vh2", "x"));
    assert!(!p.resource(Perm::Write, "vh2", "y"));
    assert!(p.resource(Perm::Configure, "/", "amq.gen-123"));
    assert!(p.topic(Perm::Write, "vh2", "x", "rk.a"));
    assert!(!p.topic(Perm::Write, "vh2", "x", "rk"));
    assert!(!p.topic(Perm::Read, "vh2", "x", "rk.a"));
    assert!(!perms(&["write:vh2/x"]).topic(Perm::Write, "vh2", "x", "rk.a"));
    assert!(p.has_tag("management"));
    assert_eq!(p.tags(), ["management".to_owned()]);
    assert_eq!(
        p.grants().len(),
        3,
        "only the 2- and 3-part lower-case scopes are grants"
    );
}

#[test]
fn grammar_edges() {
    let p = perms(&[
        "read:*",
        "read:a/b/c/d",
        "Read:a/b",
        "write:/",
        "tag:",
        "tag:x",
        "tag:x",
        "configure:a/b/",
    ]);
    // `write:/` is vhost "" and name "": valid, matches only empty strings.
    assert!(p.resource(Perm::Write, "", ""));
    // `configure:a/b/` is a 3-part scope with an empty routing-key pattern.
    assert!(p.topic(Perm::Configure, "a", "b", ""));
    assert!(!p.topic(Perm::Configure, "a", "b", "k"));
    assert!(!p.resource(Perm::Read, "a", "b"));
    assert_eq!(p.tags(), ["x".to_owned()]);
    assert_eq!(Perm::Configure.to_string(), "configure");
    assert_eq!(Perm::Write.to_string(), "write");
    assert_eq!(Perm::Read.to_string(), "read");
}

// ---------------------------------------------------------------- §6 decision matrix

enum Want {
    Permit,
    NeedKind,
    Deny {
        code: u16,
        text: &'static str,
        class_method: (u16, u16),
        perm: Option<Perm>,
    },
}

fn refused(text: &'static str, class_method: (u16, u16), perm: Perm) -> Want {
    Want::Deny {
        code: ACCESS_REFUSED,
        text,
        class_method,
        perm: Some(perm),
    }
}

fn not_found(text: &'static str, class_method: (u16, u16), perm: Perm) -> Want {
    Want::Deny {
        code: NOT_FOUND,
        text,
        class_method,
        perm: Some(perm),
    }
}

const CTX: Context<'static> = Context {
    vhost: "/",
    username: "alice",
    now: 0,
};

fn run(rows: &[(&str, &[&str], Operation, Want)]) {
    let mut failed = Vec::new();
    for (name, scopes, op, want) in rows {
        // The method's ids only travel into the refusal.
        let ids = match want {
            Want::Deny { class_method, .. } => *class_method,
            _ => (0, 0),
        };
        let got = decide(&perms(scopes), &CTX, op, ids);
        let ok = match (want, &got) {
            (Want::Permit, Verdict::Permit) => true,
            (Want::NeedKind, Verdict::NeedKind) => true,
            (
                Want::Deny {
                    code,
                    text,
                    class_method,
                    perm,
                },
                Verdict::Deny(d),
            ) => {
                d.reply_code == *code
                    && d.reply_text == *text
                    && (d.class_id, d.method_id) == *class_method
                    && d.permission == *perm
            }
            _ => false,
        };
        if !ok {
            failed.push(format!("{name}: got {got:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} rows failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

fn x_declare<'a>(exchange: &'a str, passive: bool, ae: Option<&'a str>) -> Operation<'a> {
    Operation::ExchangeDeclare {
        exchange,
        passive,
        alternate_exchange: ae.map(str::as_bytes),
    }
}

fn q_declare<'a>(
    queue: &'a str,
    passive: bool,
    server_named: bool,
    dlx: Option<&'a str>,
) -> Operation<'a> {
    Operation::QueueDeclare {
        queue,
        passive,
        server_named,
        dead_letter_exchange: dlx.map(str::as_bytes),
    }
}

/// `unbind` only tells the row apart: binds and unbinds are decided alike.
fn x_bind<'a>(
    destination: &'a str,
    source: &'a str,
    kind: ExchangeKind,
    unbind: bool,
) -> Operation<'a> {
    Operation::ExchangeBind {
        destination,
        source,
        routing_key: "a.b",
        source_kind: kind,
        unbind,
    }
}

fn q_bind<'a>(
    queue: &'a str,
    exchange: &'a str,
    kind: ExchangeKind,
    unbind: bool,
) -> Operation<'a> {
    Operation::QueueBind {
        queue,
        exchange,
        routing_key: "a.b",
        exchange_kind: kind,
        unbind,
    }
}

fn publish<'a>(
    exchange: &'a str,
    kind: ExchangeKind,
    user_id: Option<&'a str>,
    cc: &'a [&'a [u8]],
) -> Operation<'a> {
    Operation::BasicPublish {
        exchange,
        routing_key: b"a.b",
        exchange_kind: kind,
        user_id: user_id.map(str::as_bytes),
        extra_routing_keys: cc,
    }
}

// The matrices below are tables: one row per case, kept on one line each by hand.

#[test]
#[rustfmt::skip]
fn exchange_methods() {
    use ExchangeKind::*;
    let ae = ["configure:%2F/x1", "read:%2F/x1", "write:%2F/ae1"];
    let passive_denied = Want::Deny { code: 403, text: "ACCESS_REFUSED - access to exchange 'x1' in vhost '/' refused for user 'alice'", class_method: (40, 10), perm: None };
    run(&[
        ("declare: all granted", &ae, x_declare("x1", false, Some("ae1")), Want::Permit),
        ("declare: configure only", &["configure:%2F/x1"], x_declare("x1", false, None), Want::Permit),
        ("declare: no configure", &ae[1..], x_declare("x1", false, Some("ae1")),
            refused("ACCESS_REFUSED - configure access to exchange 'x1' in vhost '/' refused for user 'alice'", (40, 10), Perm::Configure)),
        ("declare: AE without read on X", &[ae[0], ae[2]], x_declare("x1", false, Some("ae1")),
            refused("ACCESS_REFUSED - read access to exchange 'x1' in vhost '/' refused for user 'alice'", (40, 10), Perm::Read)),
        ("declare: AE without write on AE", &ae[..2], x_declare("x1", false, Some("ae1")),
            refused("ACCESS_REFUSED - write access to exchange 'ae1' in vhost '/' refused for user 'alice'", (40, 10), Perm::Write)),
        ("declare: AE \"\" is amq.default", &ae[..2], x_declare("x1", false, Some("")),
            refused("ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'alice'", (40, 10), Perm::Write)),
        ("declare: default exchange is the broker's refusal", &[], x_declare("", false, None), Want::Permit),
        ("declare: amq.foo needs configure first", &[], x_declare("amq.foo", false, None),
            refused("ACCESS_REFUSED - configure access to exchange 'amq.foo' in vhost '/' refused for user 'alice'", (40, 10), Perm::Configure)),
        ("declare: amq.* after configure skips AE checks", &["configure:%2F/amq.*"], x_declare("amq.foo", false, Some("ae1")), Want::Permit),
        ("declare: CR/LF stripped", &["configure:%2F/x1"], x_declare("x\r\n1", false, None), Want::Permit),
        ("declare: stripped name in the text", &[], x_declare("x\n1", false, None),
            refused("ACCESS_REFUSED - configure access to exchange 'x1' in vhost '/' refused for user 'alice'", (40, 10), Perm::Configure)),
        ("passive: read", &["read:%2F/x1"], x_declare("x1", true, None), Want::Permit),
        ("passive: write", &["write:%2F/x1"], x_declare("x1", true, None), Want::Permit),
        ("passive: configure", &["configure:%2F/x1"], x_declare("x1", true, None), Want::Permit),
        ("passive: default exchange", &[], x_declare("", true, None), Want::Permit),
        ("passive: nothing on X", &["read:%2F/other", "read:other/x1"], x_declare("x1", true, None), passive_denied),
        ("delete: configure", &["configure:%2F/x1"], Operation::ExchangeDelete { exchange: "x1" }, Want::Permit),
        ("delete: no configure", &["read:%2F/x1", "write:%2F/x1"], Operation::ExchangeDelete { exchange: "x1" },
            refused("ACCESS_REFUSED - configure access to exchange 'x1' in vhost '/' refused for user 'alice'", (40, 20), Perm::Configure)),
        ("delete: default exchange", &[], Operation::ExchangeDelete { exchange: "" }, Want::Permit),
        ("delete: system exchange", &[], Operation::ExchangeDelete { exchange: "amq.direct" }, Want::Permit),
        ("bind: topic source, 3-part read", &["write:%2F/d", "read:%2F/xt/a.*"], x_bind("d", "xt", Topic, false), Want::Permit),
        ("bind: no write on destination", &["read:%2F/xt/a.*"], x_bind("d", "xt", Topic, false),
            refused("ACCESS_REFUSED - write access to exchange 'd' in vhost '/' refused for user 'alice'", (40, 30), Perm::Write)),
        ("bind: no read on source", &["write:%2F/d", "read:%2F/other/a.*"], x_bind("d", "xt", Topic, false),
            refused("ACCESS_REFUSED - read access to exchange 'xt' in vhost '/' refused for user 'alice'", (40, 30), Perm::Read)),
        ("bind: no topic read", &["write:%2F/d", "read:%2F/xt"], x_bind("d", "xt", Topic, false),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (40, 30), Perm::Read)),
        ("unbind: no topic read", &["write:%2F/d", "read:%2F/xt/c.*"], x_bind("d", "xt", Topic, true),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (40, 40), Perm::Read)),
        ("bind: unresolved kind, key not granted: ask", &["write:%2F/d", "read:%2F/xt"], x_bind("d", "xt", Unresolved, false), Want::NeedKind),
        ("bind: unresolved kind, key granted: no need to know", &["write:%2F/d", "read:%2F/xt/a.*"], x_bind("d", "xt", Unresolved, false), Want::Permit),
        ("unbind: unknown kind is topic", &["write:%2F/d", "read:%2F/xt"], x_bind("d", "xt", Unknown, true),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (40, 40), Perm::Read)),
        ("bind: missing source, topic refused: the broker's 404", &["write:%2F/d", "read:%2F/xt"], x_bind("d", "xt", Missing, false),
            not_found("NOT_FOUND - no exchange 'xt' in vhost '/'", (40, 30), Perm::Read)),
        ("bind: missing source, topic granted: forwarded", &["write:%2F/d", "read:%2F/xt/a.*"], x_bind("d", "xt", Missing, false), Want::Permit),
        ("bind: missing source, read refused first", &["write:%2F/d"], x_bind("d", "xt", Missing, false),
            refused("ACCESS_REFUSED - read access to exchange 'xt' in vhost '/' refused for user 'alice'", (40, 30), Perm::Read)),
        ("unbind: missing source is topic (fail closed)", &["write:%2F/d", "read:%2F/xt"], x_bind("d", "xt", Missing, true),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (40, 40), Perm::Read)),
        ("bind: other kind, no topic check", &["write:%2F/d", "read:%2F/xd"], x_bind("d", "xd", Other, false), Want::Permit),
        ("bind: \"\" destination checked as amq.default", &[], x_bind("", "xt", Topic, false),
            refused("ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'alice'", (40, 30), Perm::Write)),
        ("bind: \"\" destination then the broker's refusal", &["write:%2F/amq.default"], x_bind("", "xt", Topic, false), Want::Permit),
        ("bind: \"\" source is the broker's refusal", &["write:%2F/d"], x_bind("d", "", Topic, false), Want::Permit),
    ]);
}

#[test]
#[rustfmt::skip]
fn queue_methods() {
    use ExchangeKind::*;
    let dlx = ["configure:%2F/q1", "read:%2F/q1", "write:%2F/dlx"];
    let passive_denied = Want::Deny { code: 403, text: "ACCESS_REFUSED - access to queue 'amq.gen-x' in vhost '/' refused for user 'alice'", class_method: (50, 10), perm: None };
    run(&[
        ("declare: all granted", &dlx, q_declare("q1", false, false, Some("dlx")), Want::Permit),
        ("declare: no configure", &dlx[1..], q_declare("q1", false, false, Some("dlx")),
            refused("ACCESS_REFUSED - configure access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 10), Perm::Configure)),
        ("declare: DLX without read on Q", &[dlx[0], dlx[2]], q_declare("q1", false, false, Some("dlx")),
            refused("ACCESS_REFUSED - read access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 10), Perm::Read)),
        ("declare: DLX without write on DLX", &dlx[..2], q_declare("q1", false, false, Some("dlx")),
            refused("ACCESS_REFUSED - write access to exchange 'dlx' in vhost '/' refused for user 'alice'", (50, 10), Perm::Write)),
        ("declare: client-chosen amq.* is the broker's refusal", &[], q_declare("amq.foo", false, false, None), Want::Permit),
        ("declare: server-named probe", &["configure:%2F/amq.gen-*"], q_declare("amq.gen-abc", false, true, None), Want::Permit),
        ("declare: server-named probe refused", &["configure:%2F/q*"], q_declare("amq.gen-abc", false, true, None),
            refused("ACCESS_REFUSED - configure access to queue 'amq.gen-abc' in vhost '/' refused for user 'alice'", (50, 10), Perm::Configure)),
        ("passive: read", &["read:%2F/q1"], q_declare("q1", true, false, None), Want::Permit),
        ("passive: write", &["write:%2F/q1"], q_declare("q1", true, false, None), Want::Permit),
        ("passive: configure", &["configure:%2F/q1"], q_declare("q1", true, false, None), Want::Permit),
        ("passive: amq.gen name is checked", &["read:%2F/q1"], q_declare("amq.gen-x", true, false, None), passive_denied),
        ("delete: configure", &["configure:%2F/q1"], Operation::QueueDelete { queue: "q1" }, Want::Permit),
        ("delete: no configure", &["read:%2F/q1"], Operation::QueueDelete { queue: "q1" },
            refused("ACCESS_REFUSED - configure access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 40), Perm::Configure)),
        ("purge: read", &["read:%2F/q1"], Operation::QueuePurge { queue: "q1" }, Want::Permit),
        ("purge: no read", &["configure:%2F/q1"], Operation::QueuePurge { queue: "q1" },
            refused("ACCESS_REFUSED - read access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 30), Perm::Read)),
        ("bind: one 3-part read covers read X and topic", &["write:%2F/q1", "read:%2F/xt/a.*"], q_bind("q1", "xt", Topic, false), Want::Permit),
        ("bind: no write on queue", &["read:%2F/xt/a.*"], q_bind("q1", "xt", Topic, false),
            refused("ACCESS_REFUSED - write access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 20), Perm::Write)),
        ("bind: no read on exchange", &["write:%2F/q1"], q_bind("q1", "xt", Topic, false),
            refused("ACCESS_REFUSED - read access to exchange 'xt' in vhost '/' refused for user 'alice'", (50, 20), Perm::Read)),
        ("bind: no topic read", &["write:%2F/q1", "read:%2F/xt"], q_bind("q1", "xt", Topic, false),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (50, 20), Perm::Read)),
        ("unbind: no write on queue", &[], q_bind("q1", "xt", Topic, true),
            refused("ACCESS_REFUSED - write access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 50), Perm::Write)),
        ("unbind: unknown kind is topic", &["write:%2F/q1", "read:%2F/xt"], q_bind("q1", "xt", Unknown, true),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (50, 50), Perm::Read)),
        ("bind: missing exchange, topic refused: the broker's 404", &["write:%2F/q1", "read:%2F/xt"], q_bind("q1", "xt", Missing, false),
            not_found("NOT_FOUND - no exchange 'xt' in vhost '/'", (50, 20), Perm::Read)),
        ("unbind: missing exchange is topic (fail closed)", &["write:%2F/q1", "read:%2F/xt"], q_bind("q1", "xt", Missing, true),
            refused("ACCESS_REFUSED - read access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (50, 50), Perm::Read)),
        ("bind: other kind, no topic check", &["write:%2F/q1", "read:%2F/xd"], q_bind("q1", "xd", Other, false), Want::Permit),
        ("bind: \"\" exchange is the broker's refusal", &["write:%2F/q1"], q_bind("q1", "", Topic, false), Want::Permit),
        ("bind: write is checked before the \"\" exchange", &[], q_bind("q1", "", Topic, false),
            refused("ACCESS_REFUSED - write access to queue 'q1' in vhost '/' refused for user 'alice'", (50, 20), Perm::Write)),
    ]);
}

#[test]
#[rustfmt::skip]
fn basic_methods() {
    use ExchangeKind::*;
    let none: &[&[u8]] = &[];
    let cc: [&[u8]; 2] = [b"a.c", b"b.x"];
    let impersonation = Want::Deny { code: PRECONDITION_FAILED, text: "PRECONDITION_FAILED - user_id property set to 'bob' but authenticated user was 'alice'", class_method: (60, 40), perm: None };
    run(&[
        ("publish: write", &["write:%2F/x1"], publish("x1", Other, None, none), Want::Permit),
        ("publish: no write", &["read:%2F/x1"], publish("x1", Other, None, none),
            refused("ACCESS_REFUSED - write access to exchange 'x1' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: default exchange needs amq.default", &["write:%2F/x1"], publish("", Other, None, none),
            refused("ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: default exchange granted", &["write:%2F/amq.default"], publish("", Unknown, None, none), Want::Permit),
        ("publish: topic with 3-part write", &["write:%2F/xt/a.*"], publish("xt", Topic, None, none), Want::Permit),
        ("publish: topic with 2-part write", &["write:%2F/xt"], publish("xt", Topic, None, none),
            refused("ACCESS_REFUSED - write access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: unknown kind is topic", &["write:%2F/xt"], publish("xt", Unknown, None, none),
            refused("ACCESS_REFUSED - write access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: missing exchange, topic refused: the broker's 404", &["write:%2F/xt"], publish("xt", Missing, None, none),
            not_found("NOT_FOUND - no exchange 'xt' in vhost '/'", (60, 40), Perm::Write)),
        ("publish: missing exchange, a CC key refused: the broker's 404", &["write:%2F/xt/a.*"], publish("xt", Missing, None, &cc),
            not_found("NOT_FOUND - no exchange 'xt' in vhost '/'", (60, 40), Perm::Write)),
        ("publish: missing exchange, write refused first", &["read:%2F/xt"], publish("xt", Missing, None, none),
            refused("ACCESS_REFUSED - write access to exchange 'xt' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: missing exchange, 404 before user_id", &["write:%2F/xt"], publish("xt", Missing, Some("bob"), none),
            not_found("NOT_FOUND - no exchange 'xt' in vhost '/'", (60, 40), Perm::Write)),
        ("publish: CC/BCC keys are topic-checked", &["write:%2F/xt/a.*"], publish("xt", Topic, None, &cc),
            refused("ACCESS_REFUSED - write access to topic 'b.x' in exchange 'xt' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: CC/BCC keys granted", &["write:%2F/xt/a.*", "write:%2F/xt/b.*"], publish("xt", Topic, None, &cc), Want::Permit),
        ("publish: CC/BCC ignored for non-topic", &["write:%2F/xd"], publish("xd", Other, None, &cc), Want::Permit),
        ("publish: own user_id", &["write:%2F/x1"], publish("x1", Other, Some("alice"), none), Want::Permit),
        ("publish: other user_id", &["write:%2F/x1"], publish("x1", Other, Some("bob"), none), impersonation),
        ("publish: impersonator", &["write:%2F/x1", "tag:impersonator"], publish("x1", Other, Some("bob"), none), Want::Permit),
        ("publish: write is checked before user_id", &["tag:impersonator"], publish("x1", Other, Some("bob"), none),
            refused("ACCESS_REFUSED - write access to exchange 'x1' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: unresolved kind, key granted: no need to know", &["write:%2F/xt/a.*"], publish("xt", Unresolved, None, none), Want::Permit),
        ("publish: unresolved kind, key not granted: ask", &["write:%2F/xt"], publish("xt", Unresolved, None, none), Want::NeedKind),
        ("publish: unresolved kind, write refused first", &["read:%2F/xt"], publish("xt", Unresolved, None, none),
            refused("ACCESS_REFUSED - write access to exchange 'xt' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("publish: unresolved kind, a CC key not granted: ask", &["write:%2F/xt/a.*"], publish("xt", Unresolved, None, &cc), Want::NeedKind),
        ("publish: topic is checked before user_id", &["write:%2F/xt"], publish("xt", Topic, Some("bob"), none),
            refused("ACCESS_REFUSED - write access to topic 'a.b' in exchange 'xt' in vhost '/' refused for user 'alice'", (60, 40), Perm::Write)),
        ("consume: read", &["read:%2F/q1"], Operation::BasicConsume { queue: "q1" }, Want::Permit),
        ("consume: no read", &["write:%2F/q1", "configure:%2F/q1"], Operation::BasicConsume { queue: "q1" },
            refused("ACCESS_REFUSED - read access to queue 'q1' in vhost '/' refused for user 'alice'", (60, 20), Perm::Read)),
        ("consume: direct reply-to", &[], Operation::BasicConsume { queue: "amq.rabbitmq.reply-to" }, Want::Permit),
        ("consume: a reply-to suffix is an ordinary queue", &[], Operation::BasicConsume { queue: "amq.rabbitmq.reply-to.abc" },
            refused("ACCESS_REFUSED - read access to queue 'amq.rabbitmq.reply-to.abc' in vhost '/' refused for user 'alice'", (60, 20), Perm::Read)),
        ("get: read", &["read:%2F/q1"], Operation::BasicGet { queue: "q1" }, Want::Permit),
        ("get: no read", &[], Operation::BasicGet { queue: "q1" },
            refused("ACCESS_REFUSED - read access to queue 'q1' in vhost '/' refused for user 'alice'", (60, 70), Perm::Read)),
        ("get: reply-to is not exempt", &[], Operation::BasicGet { queue: "amq.rabbitmq.reply-to" },
            refused("ACCESS_REFUSED - read access to queue 'amq.rabbitmq.reply-to' in vhost '/' refused for user 'alice'", (60, 70), Perm::Read)),
        ("get: CR/LF stripped", &["read:%2F/q1"], Operation::BasicGet { queue: "\rq1\n" }, Want::Permit),
    ]);
}

#[test]
fn vhost_and_user_appear_in_texts() {
    let ctx = Context {
        vhost: "vh/1",
        username: "arn:aws:sts::1:assumed-role/R/s",
        now: 0,
    };
    let d = decide(
        &perms(&["read:vh%2F1/*"]),
        &ctx,
        &Operation::QueuePurge { queue: "q" },
        (50, 30),
    );
    assert_eq!(d, Verdict::Permit);
    let Verdict::Deny(d) = decide(
        &perms(&[]),
        &ctx,
        &Operation::QueuePurge { queue: "q" },
        (50, 30),
    ) else {
        panic!("denied")
    };
    assert_eq!(
        d.reply_text,
        "ACCESS_REFUSED - read access to queue 'q' in vhost 'vh/1' refused for user 'arn:aws:sts::1:assumed-role/R/s'"
    );
}

#[test]
fn reply_text_truncation() {
    assert_eq!(
        reply_text("NOT_FOUND", "no queue 'q'"),
        "NOT_FOUND - no queue 'q'"
    );
    let exact = "x".repeat(255 - "C - ".len());
    assert_eq!(reply_text("C", &exact).len(), 255);
    let long = reply_text("ACCESS_REFUSED", &"y".repeat(300));
    assert_eq!(long.len(), 255);
    assert!(long.starts_with("ACCESS_REFUSED - yyy") && long.ends_with("y..."));
    // Two-byte chars straddling byte 252: cut back to a char boundary.
    let wide = reply_text("AB", &"ю".repeat(200));
    assert!(wide.len() <= 255 && wide.ends_with("..."), "{}", wide.len());
    assert_eq!(wide.len(), 254);
    // A long queue name in a real denial.
    let name = "q".repeat(250);
    let Verdict::Deny(d) = decide(
        &perms(&[]),
        &CTX,
        &Operation::BasicGet { queue: &name },
        (60, 70),
    ) else {
        panic!("denied")
    };
    assert_eq!(d.reply_text.len(), 255);
    assert!(d.reply_text.ends_with("qqq..."));
}

// ---------------------------------------------------------------- broker policies

mod policies {
    use std::sync::Arc;

    use super::super::iam::{Binding, Facts, Mode, PolicySet};
    use super::*;

    const DOC: &str = r#"{"Version": "2012-10-17", "Statement": [
        {"Sid": "Orders", "Effect": "Allow", "Principal": "*",
         "Action": ["rabbitmq:Connect", "rabbitmq:Publish"],
         "Resource": ["arn:aws:rabbitmq:::vhost/%2F", "arn:aws:rabbitmq:::vhost/%2F/exchange/orders",
                      "arn:aws:rabbitmq:::vhost/%2F/topic/orders/eu.*"]},
        {"Sid": "Reads", "Effect": "Allow", "Principal": "*", "Action": "rabbitmq:Read",
         "Resource": "arn:aws:rabbitmq:::vhost/%2F/queue/*"},
        {"Sid": "NoAudit", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Consume",
         "Resource": "arn:aws:rabbitmq:::vhost/%2F/queue/audit.*"},
        {"Sid": "KeysAreEu", "Effect": "Deny", "Principal": "*", "Action": "rabbitmq:Publish",
         "Resource": "*", "Condition": {"StringNotLike": {"rabbitmq:RoutingKey": "eu.*"}}}
    ]}"#;

    fn with(scopes: &[&str], mode: Mode) -> Permissions {
        let set = PolicySet::compile(&[("p.json".into(), DOC.into())]).unwrap();
        perms(scopes).with_policy(Arc::new(Binding::new(&set, mode, &Facts::default())))
    }

    fn pub_to<'a>(x: &'a str, rk: &'static str, kind: ExchangeKind) -> Operation<'a> {
        Operation::BasicPublish {
            exchange: x,
            routing_key: rk.as_bytes(),
            exchange_kind: kind,
            user_id: None,
            extra_routing_keys: &[],
        }
    }

    /// `ok`, `deny:<statement or ->`, or `need-kind`.
    fn verdict(p: &Permissions, op: Operation) -> String {
        let ids = (60, 40);
        match decide(p, &CTX, &op, ids) {
            Verdict::Permit => "ok".into(),
            Verdict::Deny(d) => format!("deny:{}", d.statement.as_deref().unwrap_or("-")),
            Verdict::NeedKind => "need-kind".into(),
        }
    }

    #[test]
    fn the_mode_combines_scopes_and_policies() {
        let all = ["read:*/*", "write:*/*", "configure:*/*"];
        let consume = |q| Operation::BasicConsume { queue: q };
        let get = |q| Operation::BasicGet { queue: q };
        // (scopes, mode, operation, verdict)
        let rows: Vec<(&[&str], Mode, Operation, &str)> = vec![
            // scopes: the scopes decide, a Deny takes away.
            (
                &all,
                Mode::Scopes,
                pub_to("billing", "x", ExchangeKind::Other),
                "deny:p.json:KeysAreEu",
            ),
            (
                &all,
                Mode::Scopes,
                pub_to("billing", "eu.1", ExchangeKind::Other),
                "ok",
            ),
            (
                &all,
                Mode::Scopes,
                consume("audit.1"),
                "deny:p.json:NoAudit",
            ),
            (&all, Mode::Scopes, get("audit.1"), "ok"),
            (&[], Mode::Scopes, get("orders"), "deny:-"),
            // policies: an Allow is needed; scopes are not asked.
            (
                &[],
                Mode::Policies,
                pub_to("orders", "eu.1", ExchangeKind::Topic),
                "ok",
            ),
            (
                &[],
                Mode::Policies,
                pub_to("orders", "us.1", ExchangeKind::Topic),
                "deny:p.json:KeysAreEu",
            ),
            (
                &[],
                Mode::Policies,
                pub_to("billing", "eu.1", ExchangeKind::Other),
                "deny:-",
            ),
            (&[], Mode::Policies, get("orders"), "ok"),
            (
                &[],
                Mode::Policies,
                consume("audit.1"),
                "deny:p.json:NoAudit",
            ),
            // The routing key is the operation's: the exchange check sees it too.
            (
                &[],
                Mode::Policies,
                pub_to("orders", "eu", ExchangeKind::Other),
                "deny:p.json:KeysAreEu",
            ),
            // A topic check that fails on an exchange of unknown type: learn the type
            // (a 2-part scope grants no topic).
            (
                &["write:*/*"],
                Mode::Both,
                pub_to("orders", "eu.1", ExchangeKind::Unresolved),
                "need-kind",
            ),
            (
                &["write:*/*"],
                Mode::Both,
                pub_to("orders", "eu.1", ExchangeKind::Other),
                "ok",
            ),
            (
                &["write:*/*/*"],
                Mode::Both,
                pub_to("orders", "eu.1", ExchangeKind::Unresolved),
                "ok",
            ),
            // both: scopes and an Allow.
            (
                &all,
                Mode::Both,
                pub_to("orders", "eu.1", ExchangeKind::Other),
                "ok",
            ),
            // 2-part scopes grant no topic: a topic exchange needs a 3-part one in both.
            (
                &all,
                Mode::Both,
                pub_to("orders", "eu.1", ExchangeKind::Topic),
                "deny:-",
            ),
            (
                &all,
                Mode::Both,
                pub_to("billing", "eu.1", ExchangeKind::Other),
                "deny:-",
            ),
            (&["read:*/audit.*"], Mode::Both, get("orders"), "deny:-"),
            (&["read:*/*"], Mode::Both, get("orders"), "ok"),
            (
                &["read:*/*"],
                Mode::Both,
                consume("audit.1"),
                "deny:p.json:NoAudit",
            ),
        ];
        for (scopes, mode, op, want) in rows {
            assert_eq!(
                verdict(&with(scopes, mode), op),
                want,
                "{scopes:?} {mode:?} {op:?}"
            );
        }
    }

    #[test]
    fn refusals_keep_rabbitmq_texts_and_name_the_statement() {
        let p = with(&["read:*/*"], Mode::Scopes);
        let Verdict::Deny(d) = decide(
            &p,
            &CTX,
            &Operation::BasicConsume { queue: "audit.1" },
            (60, 20),
        ) else {
            panic!("permitted")
        };
        assert_eq!(d.reply_code, ACCESS_REFUSED);
        assert_eq!(
            d.reply_text,
            "ACCESS_REFUSED - read access to queue 'audit.1' in vhost '/' refused for user 'alice'"
        );
        assert_eq!(d.statement.as_deref(), Some("p.json:NoAudit"));
        assert_eq!((d.class_id, d.method_id), (60, 20));
    }

    #[test]
    fn connect_needs_the_vhost_in_both() {
        assert_eq!(connect(&with(&[], Mode::Policies), "/", 0), Ok(()));
        assert_eq!(connect(&with(&[], Mode::Policies), "prod", 0), Err(None));
        assert_eq!(
            connect(&with(&["read:prod/*"], Mode::Both), "prod", 0),
            Err(None)
        );
        assert_eq!(
            connect(&with(&["read:prod/*"], Mode::Scopes), "prod", 0),
            Ok(())
        );
        assert_eq!(connect(&with(&[], Mode::Scopes), "/", 0), Err(None));
    }

    #[test]
    fn passive_declares_take_any_permission_the_policy_allows() {
        let p = with(&[], Mode::Policies);
        let passive = |q| Operation::QueueDeclare {
            queue: q,
            passive: true,
            server_named: false,
            dead_letter_exchange: None,
        };
        assert_eq!(verdict(&p, passive("orders")), "ok");
        // A passive declare is not a consume: NoAudit does not apply, Reads allows.
        assert_eq!(verdict(&p, passive("audit.1")), "ok");
        let x = Operation::ExchangeDeclare {
            exchange: "billing",
            passive: true,
            alternate_exchange: None,
        };
        assert_eq!(verdict(&p, x), "deny:-");
    }

    #[test]
    fn traces_list_every_check_with_both_answers() {
        let p = with(&["write:*/*/*"], Mode::Both);
        let (v, trace) = decide_traced(
            &p,
            &CTX,
            &pub_to("orders", "eu.1", ExchangeKind::Topic),
            (60, 40),
        );
        assert_eq!(v, Verdict::Permit);
        let got: Vec<(String, bool, String)> = trace
            .iter()
            .map(|t| (t.resource.clone(), t.scopes, t.policy.clone().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "arn:aws:rabbitmq:::vhost/%2F/exchange/orders".into(),
                    true,
                    "allowed by p.json:Orders".into()
                ),
                (
                    "arn:aws:rabbitmq:::vhost/%2F/topic/orders/eu.1".into(),
                    true,
                    "allowed by p.json:Orders".into()
                ),
            ]
        );
        assert_eq!(trace[0].actions, ["rabbitmq:Write", "rabbitmq:Publish"]);
    }
}
