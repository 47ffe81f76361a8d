use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

/// A fresh directory holding the files the configs below reference.
fn fixture_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "amqp-iam-gateway-config-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    for file in ["certs/server.pem", "certs/server-key.pem", "keys/k1.pem"] {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "not parsed here").unwrap();
    }
    dir
}

/// The smallest valid file: TLS files, service user, resource server and a key source.
const MINIMAL: &str = r#"
[listener]
tls_cert = "certs/server.pem"
tls_key = "certs/server-key.pem"

[backend]
username = "gateway"
password = "secret"

[oauth2]
resource_server_id = "rabbitmq"
jwks_uri = "https://idp.example/.well-known/jwks.json"
"#;

fn parse_ok(text: &str) -> (Config, PathBuf) {
    let dir = fixture_dir();
    match parse(text, &dir) {
        Ok(config) => (config, dir),
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn parse_err(text: &str) -> ConfigErrors {
    let dir = fixture_dir();
    match parse(text, &dir) {
        Ok(config) => panic!("expected errors, got {config:#?}"),
        Err(e) => e,
    }
}

/// `MINIMAL` with `extra` lines added to the end of `[table]` (a new table if not present).
fn minimal_with(table: &str, extra: &str) -> String {
    let header = format!("[{table}]\n");
    match MINIMAL.find(&header) {
        Some(at) => {
            let (head, tail) = MINIMAL.split_at(at + header.len());
            format!("{head}{extra}\n{tail}")
        }
        None => format!("{MINIMAL}\n{header}{extra}\n"),
    }
}

fn keys(errors: &ConfigErrors) -> Vec<&str> {
    errors.0.iter().filter_map(ConfigError::key).collect()
}

#[test]
fn defaults_apply_to_a_minimal_file() {
    let (c, dir) = parse_ok(MINIMAL);
    let tls = c.listener.tls.as_ref().unwrap();
    assert_eq!(
        tls.address,
        DEFAULT_LISTENER_ADDRESS.parse::<SocketAddr>().unwrap()
    );
    assert_eq!(tls.cert, dir.join("certs/server.pem"));
    assert_eq!(tls.key, dir.join("certs/server-key.pem"));
    let l = &c.listener;
    assert_eq!(l.plain_address, None);
    assert_eq!(l.max_connections, 10_000);
    assert_eq!(l.handshake_timeout, Duration::from_secs(10));
    assert_eq!(l.max_preauth_frame, 65_536);
    assert_eq!(l.auth_failure_delay, Duration::from_secs(3));
    assert_eq!(
        (l.channel_max, l.frame_max, l.heartbeat),
        (2047, 131_072, 60)
    );
    assert_eq!(
        (l.consumer_max_per_channel, l.consumer_max_per_connection),
        (1024, 10_000)
    );

    let b = &c.backend;
    assert_eq!(
        b.nodes,
        vec![BackendNode {
            host: "127.0.0.1".into(),
            port: 5672
        }]
    );
    assert_eq!(b.connect_timeout, Duration::from_secs(5));
    assert_eq!(b.close_timeout, Duration::from_secs(30));
    assert_eq!(b.max_connecting, 32);
    assert_eq!(b.health_check_interval, Duration::from_secs(2));
    assert_eq!(b.exchange_type_ttl, Duration::from_secs(10));
    assert_eq!(b.exchange_lookups_per_second, 10);

    let o = &c.oauth2;
    assert_eq!(o.issuers[0].scope_prefix, "rabbitmq.");
    assert_eq!(o.issuers[0].additional_scopes_key, None);
    assert_eq!(o.preferred_username_claims, ["sub", "client_id"]);
    assert!(o.verify_aud && o.require_exp && o.check_iat && o.check_nbf);
    assert_eq!(o.issuers[0].issuer, None);
    assert_eq!(
        o.issuers[0].algorithms,
        [JwtAlgorithm::RS256, JwtAlgorithm::ES384]
    );
    assert_eq!(o.issuers[0].default_key, None);
    assert!(o.issuers[0].signing_keys.is_empty() && o.issuers[0].scope_aliases.is_empty());
    assert_eq!(o.leeway, Duration::from_secs(60));
    assert_eq!(o.jwks_refresh, Duration::from_secs(600));
    assert_eq!(o.jwks_min_refetch_interval, Duration::from_secs(1));
    assert_eq!(o.http_timeout, Duration::from_secs(5));

    assert_eq!(
        c.admin.address,
        "127.0.0.1:15693".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
}

#[test]
fn a_full_file_is_read_into_typed_values() {
    let text = r#"
[listener]
address = "[::]:5671"
tls_cert = "certs/server.pem"
tls_key = "/abs/elsewhere/../server-key.pem"
plain_address = "127.0.0.1:5674"
max_connections = 50
handshake_timeout_ms = 2500
max_preauth_frame = 16384
auth_failure_delay_ms = 0
channel_max = 16
frame_max = 4096
heartbeat = 0

[backend]
nodes = ["rabbit-1.internal:5672", "10.0.0.2:5673", "[::1]:5672"]
username = "gateway"
password = "secret"
connect_timeout_ms = 750
close_timeout_ms = 2500
max_connecting = 8
management_url = "http://127.0.0.1:15672"

[oauth2]
resource_server_id = "rabbitmq"
scope_prefix = "rabbitmq/"
additional_scopes_key = 'sub https://sts\.amazonaws\.com/.request_tags.scope'
preferred_username_claims = ["client_id"]
verify_aud = false
require_exp = false
issuer = "https://abc.tokens.sts.global.api.aws"
algorithms = ["ES384", "EdDSA", "ES384"]
default_key = "k1"
leeway_seconds = 5
check_iat = false
check_nbf = false
jwks_refresh_seconds = 30
jwks_min_refetch_interval_ms = 0
http_timeout_ms = 100

[oauth2.signing_keys]
k1 = "keys/k1.pem"

[oauth2.scope_aliases]
admin = "rabbitmq/tag:administrator"

[admin]
address = "0.0.0.0:9000"

[log]
level = "info,amqp_iam_gateway=debug"
format = "json"
"#;
    let dir = fixture_dir();
    // The absolute key path does not exist, so file checks are off for this one.
    let c = parse_with(text, &dir, CheckFiles::No).unwrap_or_else(|e| panic!("{e}"));
    let tls = c.listener.tls.as_ref().unwrap();
    assert_eq!(tls.address, "[::]:5671".parse::<SocketAddr>().unwrap());
    assert_eq!(tls.key, PathBuf::from("/abs/elsewhere/../server-key.pem"));
    let l = &c.listener;
    assert_eq!(l.plain_address, Some("127.0.0.1:5674".parse().unwrap()));
    assert_eq!(l.max_connections, 50);
    assert_eq!(l.handshake_timeout, Duration::from_millis(2500));
    assert_eq!(l.auth_failure_delay, Duration::ZERO);
    assert_eq!(
        (l.max_preauth_frame, l.channel_max, l.frame_max, l.heartbeat),
        (16_384, 16, 4096, 0)
    );

    let b = &c.backend;
    let nodes: Vec<String> = b.nodes.iter().map(ToString::to_string).collect();
    assert_eq!(
        nodes,
        ["rabbit-1.internal:5672", "10.0.0.2:5673", "[::1]:5672"]
    );
    assert_eq!(b.nodes[2].host, "::1");
    assert_eq!(b.connect_timeout, Duration::from_millis(750));
    assert_eq!(b.close_timeout, Duration::from_millis(2500));
    assert_eq!(b.max_connecting, 8);
    assert!(
        !format!("{b:?}").contains("secret"),
        "the password must not be printed"
    );

    let o = &c.oauth2;
    assert_eq!(o.issuers[0].scope_prefix, "rabbitmq/");
    assert_eq!(
        o.issuers[0].additional_scopes_key.as_deref(),
        Some(r"sub https://sts\.amazonaws\.com/.request_tags.scope")
    );
    assert_eq!(o.preferred_username_claims, ["client_id"]);
    assert!(!o.verify_aud && !o.require_exp && !o.check_iat && !o.check_nbf);
    assert_eq!(
        o.issuers[0].issuer.as_deref(),
        Some("https://abc.tokens.sts.global.api.aws")
    );
    assert_eq!(o.issuers[0].jwks_uri, None);
    assert_eq!(
        o.issuers[0].algorithms,
        [JwtAlgorithm::ES384, JwtAlgorithm::EdDSA],
        "duplicates dropped"
    );
    assert_eq!(o.issuers[0].default_key.as_deref(), Some("k1"));
    assert_eq!(o.issuers[0].signing_keys["k1"], dir.join("keys/k1.pem"));
    assert_eq!(o.leeway, Duration::from_secs(5));
    assert_eq!(o.jwks_refresh, Duration::from_secs(30));
    assert_eq!(o.jwks_min_refetch_interval, Duration::ZERO);
    assert_eq!(o.http_timeout, Duration::from_millis(100));
    assert_eq!(
        o.issuers[0].scope_aliases["admin"],
        ["rabbitmq/tag:administrator"]
    );

    assert_eq!(
        c.admin.address,
        "0.0.0.0:9000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.log.level, "info,amqp_iam_gateway=debug");
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn unknown_keys_are_rejected_at_every_level() {
    let cases = [
        ("listener", "tls_certificate = \"x\""),
        ("backend", "passwd = \"x\""),
        ("oauth2", "verify_aub = false"),
        ("admin", "port = 1"),
        ("log", "colour = true"),
    ];
    for (table, line) in cases {
        let errors = parse_err(&minimal_with(table, line));
        let text = errors.to_string();
        let field = line.split(' ').next().unwrap();
        assert!(
            text.contains(&format!("unknown field `{field}`")),
            "{table}: {text}"
        );
        assert!(
            text.contains("line "),
            "toml's message carries the position: {text}"
        );
    }
    let errors = parse_err(&format!("{MINIMAL}\n[metrics]\nenabled = true\n"));
    assert!(
        errors.to_string().contains("unknown field `metrics`"),
        "{errors}"
    );
    // A nested table is a struct too.
    let errors = parse_err(&format!("{MINIMAL}\n[oauth2.https]\nverify = true\n"));
    assert!(
        errors.to_string().contains("unknown field `https`"),
        "{errors}"
    );
}

#[test]
fn syntax_errors_carry_the_position() {
    let errors = parse_err("[listener\naddress = 1");
    assert_eq!(errors.0.len(), 1);
    assert!(
        matches!(&errors.0[0], ConfigError::Syntax(m) if m.contains("line 1")),
        "{errors}"
    );
    let errors = parse_err(&minimal_with("listener", "heartbeat = -1"));
    assert!(errors.to_string().contains("heartbeat"), "{errors}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[listener]
address = "localhost:5671"
tls_key = "certs/missing-key.pem"
frame_max = 1024
max_preauth_frame = 4096
consumer_max_per_channel = 0
consumer_max_per_connection = 1000001

[backend]
nodes = ["amqp://rabbit:5672", "rabbit"]
password = ""
max_connecting = 0
health_check_interval_ms = 99
close_timeout_ms = 99
exchange_type_ttl_ms = 10
exchange_lookups_per_second = 0

[oauth2]
algorithms = ["RS256", "none", "HS256", "rs384"]
default_key = "k9"
scope_prefix = "x"

[oauth2.scope_aliases]
bad = ["ok", "two scopes"]

[log]
format = "yaml"
"#;
    let errors = parse_err(text);
    let expected = [
        "listener.address",
        "listener.tls_cert",
        "listener.tls_key",
        "listener.max_preauth_frame",
        "listener.frame_max",
        "backend.nodes[0]",
        "backend.nodes[1]",
        "backend.username",
        "backend.password",
        "backend.close_timeout_ms",
        "backend.max_connecting",
        "backend.health_check_interval_ms",
        "backend.exchange_type_ttl_ms",
        "backend.exchange_lookups_per_second",
        "listener.consumer_max_per_channel",
        "listener.consumer_max_per_connection",
        "oauth2.resource_server_id",
        "oauth2.algorithms[1]",
        "oauth2.algorithms[2]",
        "oauth2.algorithms[3]",
        "oauth2",
        "oauth2.default_key",
        "oauth2.scope_aliases.bad[1]",
        "log.format",
    ];
    let mut found = keys(&errors);
    found.sort_unstable();
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    assert_eq!(found, expected, "\n{errors}");

    // One per line, each starting with its key path.
    let text = errors.to_string();
    assert_eq!(text.lines().count(), errors.0.len());
    assert!(
        text.contains(r#"oauth2.algorithms[2]: "HS256" is not allowed"#),
        "{text}"
    );
    assert!(text.contains("did you mean RS384?"), "{text}");
    assert!(text.contains("missing-key.pem"), "{text}");
    assert!(text.contains("no key source"), "{text}");
}

#[test]
fn referenced_files_must_exist_unless_checks_are_off() {
    let text = minimal_with(
        "oauth2.signing_keys",
        "k2 = \"keys/nope.pem\"\nk3 = \"keys\"",
    );
    let errors = parse_err(&text);
    assert_eq!(
        keys(&errors),
        ["oauth2.signing_keys.k2", "oauth2.signing_keys.k3"],
        "{errors}"
    );
    assert!(errors.to_string().contains("is a directory"), "{errors}");
    assert!(parse_with(&text, &fixture_dir(), CheckFiles::No).is_ok());
}

#[test]
fn relative_paths_are_resolved_against_the_config_directory() {
    let dir = fixture_dir();
    let file = dir.join("gateway.toml");
    let text = minimal_with("oauth2.signing_keys", "k1 = \"keys/k1.pem\"");
    std::fs::write(&file, text).unwrap();
    // load() resolves against the file's directory, not the working directory.
    let c = load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listener.tls.unwrap().cert, dir.join("certs/server.pem"));
    assert_eq!(
        c.oauth2.issuers[0].signing_keys["k1"],
        dir.join("keys/k1.pem")
    );
    let missing = load(&dir.join("absent.toml")).unwrap_err();
    assert!(
        matches!(missing.0[..], [ConfigError::Read { .. }]),
        "{missing}"
    );
}

#[test]
fn the_tls_listener_is_optional_only_with_a_plain_listener() {
    let plain_only = r#"
[listener]
plain_address = "127.0.0.1:5674"
[backend]
username = "u"
password = "p"
[oauth2]
resource_server_id = "rabbitmq"
issuer = "http://127.0.0.1:8080"
"#;
    let (c, _) = parse_ok(plain_only);
    assert_eq!(c.listener.tls, None);
    assert_eq!(
        c.listener.plain_address,
        Some("127.0.0.1:5674".parse().unwrap())
    );

    // Saying anything about TLS turns it on, so a half-configured TLS listener is an error.
    let half = plain_only.replace("[backend]", "address = \"0.0.0.0:5671\"\n[backend]");
    let errors = parse_err(&half);
    assert_eq!(
        keys(&errors),
        ["listener.tls_cert", "listener.tls_key"],
        "{errors}"
    );
    assert!(
        errors
            .to_string()
            .contains("to run only the plain listener"),
        "{errors}"
    );

    let clash = plain_only.replace(
        "[backend]",
        "[admin]\naddress = \"127.0.0.1:5674\"\n[backend]",
    );
    assert_eq!(keys(&parse_err(&clash)), ["admin.address"]);
}

#[test]
fn jwks_url_is_an_alias_of_jwks_uri() {
    let url = "https://idp.example/jwks";
    let text = MINIMAL.replace(
        "jwks_uri = \"https://idp.example/.well-known/jwks.json\"",
        &format!("jwks_url = \"{url}\""),
    );
    let (c, _) = parse_ok(&text);
    assert_eq!(c.oauth2.issuers[0].jwks_uri.as_deref(), Some(url));

    let both = minimal_with("oauth2", &format!("jwks_url = \"{url}\""));
    assert_eq!(keys(&parse_err(&both)), ["oauth2.jwks_url"]);
}

#[test]
fn identity_provider_urls_need_https_except_on_loopback() {
    let remote = MINIMAL.replace("https://idp.example", "http://idp.example");
    let errors = parse_err(&remote);
    assert_eq!(keys(&errors), ["oauth2.jwks_uri"]);
    assert!(errors.to_string().contains("must use https"), "{errors}");
    for local in [
        "http://localhost:8080",
        "http://127.0.0.1:8080",
        "http://[::1]:8080",
    ] {
        parse_ok(&MINIMAL.replace("https://idp.example", local));
    }
    assert_eq!(
        keys(&parse_err(
            &MINIMAL.replace("https://idp.example", "idp.example")
        )),
        ["oauth2.jwks_uri"]
    );
}

#[test]
fn alias_values_accept_a_spaced_string_or_a_list() {
    let aliases = r#"
"arn:aws:iam::111122223333:role/Admin" = "rabbitmq.tag:administrator  rabbitmq.read:*/*"
multi = """
    rabbitmq.read:*/*
    rabbitmq.write:*/*"""
listed = ["rabbitmq.tag:management", "rabbitmq.read:vh/*"]
"#;
    let (c, _) = parse_ok(&minimal_with("oauth2.scope_aliases", aliases));
    let a = &c.oauth2.issuers[0].scope_aliases;
    assert_eq!(
        a["arn:aws:iam::111122223333:role/Admin"],
        ["rabbitmq.tag:administrator", "rabbitmq.read:*/*"]
    );
    assert_eq!(a["multi"], ["rabbitmq.read:*/*", "rabbitmq.write:*/*"]);
    assert_eq!(
        a["listed"],
        ["rabbitmq.tag:management", "rabbitmq.read:vh/*"]
    );

    let errors = parse_err(&minimal_with("oauth2.scope_aliases", "x = 3"));
    assert!(
        errors
            .to_string()
            .contains("space-separated scopes or a list"),
        "{errors}"
    );
    let errors = parse_err(&minimal_with("oauth2.scope_aliases", "\"a:b\" = [\"\"]"));
    assert_eq!(keys(&errors), [r#"oauth2.scope_aliases."a:b"[0]"#]);
}

#[test]
fn scope_prefix_defaults_to_the_resource_server_id_and_may_be_empty() {
    let (c, _) = parse_ok(&MINIMAL.replace("\"rabbitmq\"", "\"my-api\""));
    assert_eq!(c.oauth2.issuers[0].scope_prefix, "my-api.");
    let (c, _) = parse_ok(&minimal_with("oauth2", "scope_prefix = \"\""));
    assert_eq!(c.oauth2.issuers[0].scope_prefix, "");
    let (c, _) = parse_ok(&minimal_with("oauth2", "scope_prefix = \"api://\""));
    assert_eq!(c.oauth2.issuers[0].scope_prefix, "api://");
}

#[test]
fn default_key_needs_a_signing_key_only_without_a_jwks() {
    let signing_only = MINIMAL.replace(
        "jwks_uri = \"https://idp.example/.well-known/jwks.json\"",
        "default_key = \"k1\"\n[oauth2.signing_keys]\nk1 = \"keys/k1.pem\"",
    );
    parse_ok(&signing_only);
    let wrong = signing_only.replace("default_key = \"k1\"", "default_key = \"k2\"");
    assert_eq!(keys(&parse_err(&wrong)), ["oauth2.default_key"]);
    // With a JWKS the default kid may be one of its keys, as in RabbitMQ.
    parse_ok(&minimal_with("oauth2", "default_key = \"RSA_0\""));
}

#[test]
fn algorithm_names_round_trip() {
    for alg in JwtAlgorithm::ALL {
        assert_eq!(alg.as_str().parse::<JwtAlgorithm>(), Ok(alg));
        assert_eq!(alg.to_string(), alg.as_str());
    }
    for refused in ["HS256", "HS512", "none", "rs256", "ES512", ""] {
        assert!(refused.parse::<JwtAlgorithm>().is_err(), "{refused}");
    }
}

#[test]
fn the_example_files_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy-config");
    for name in [
        "gateway.example.toml",
        "amazon-mq-iam.toml",
        "docker.toml",
        "several-issuers.toml",
    ] {
        let path = dir.join(name);
        if let Err(e) = load_with(&path, CheckFiles::No) {
            panic!("{}:\n{e}", path.display());
        }
    }
    let c = load_with(&dir.join("amazon-mq-iam.toml"), CheckFiles::No).unwrap();
    use crate::config::AuthBackend::{Internal, OAuth2};
    assert_eq!(c.auth.backends, [OAuth2, Internal]);
    assert_eq!(c.auth.loopback_users, ["guest", "monitoring"]);
    let defaults = load_with(&dir.join("gateway.example.toml"), CheckFiles::No).unwrap();
    assert_eq!(defaults.auth, crate::config::AuthConfig::default());
    assert_eq!(
        defaults.authorization,
        crate::config::AuthorizationConfig::default()
    );
    // The README's worked example compiles.
    let doc = std::fs::read_to_string(dir.join("broker-policy.example.json")).unwrap();
    let set = crate::authz::iam::PolicySet::compile(&[("broker-policy.example.json".into(), doc)])
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(set.statements().len(), 6);
    let o = &c.oauth2;
    assert_eq!(
        (
            o.issuers[0].resource_server_id.as_str(),
            o.issuers[0].scope_prefix.as_str()
        ),
        ("rabbitmq", "rabbitmq/")
    );
    assert_eq!(o.issuers[0].additional_scopes_key.as_deref(), Some("sub"));
    assert_eq!(
        o.issuers[0].scope_aliases["arn:aws:iam::111122223333:role/RabbitMqAdminRole"],
        [
            "rabbitmq/tag:administrator",
            "rabbitmq/read:*/*",
            "rabbitmq/write:*/*",
            "rabbitmq/configure:*/*"
        ]
    );

    // The commented nested-claim line, in both of its spellings, means the same path.
    let basic =
        r#"additional_scopes_key = "sub https://sts\\.amazonaws\\.com/.request_tags.scope""#;
    let literal = r"additional_scopes_key = 'sub https://sts\.amazonaws\.com/.request_tags.scope'";
    let example = std::fs::read_to_string(dir.join("amazon-mq-iam.toml")).unwrap();
    for line in [basic, literal] {
        assert!(
            example.contains(&format!("# {line}")),
            "example shows {line}"
        );
        let text = example.replace("additional_scopes_key = \"sub\"", line);
        let c = parse_with(&text, &dir, CheckFiles::No).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.oauth2.issuers[0].additional_scopes_key.as_deref(),
            Some(r"sub https://sts\.amazonaws\.com/.request_tags.scope")
        );
    }
}

#[test]
fn backend_tls_is_off_by_default_and_checked_when_on() {
    let (c, _) = parse_ok(MINIMAL);
    assert_eq!(c.backend.tls, None);

    let (c, dir) = parse_ok(&minimal_with(
        "backend",
        r#"tls = true
tls_ca = "certs/server.pem"
tls_cert = "certs/server.pem"
tls_key = "certs/server-key.pem"
tls_server_name = "rabbit.internal""#,
    ));
    assert_eq!(
        c.backend.tls,
        Some(BackendTlsConfig {
            ca: dir.join("certs/server.pem"),
            client_cert: Some((
                dir.join("certs/server.pem"),
                dir.join("certs/server-key.pem")
            )),
            server_name: Some("rabbit.internal".into()),
        })
    );
    let (c, _) = parse_ok(&minimal_with(
        "backend",
        "tls = true\ntls_ca = \"certs/server.pem\"",
    ));
    let tls = c.backend.tls.unwrap();
    assert_eq!((tls.client_cert, tls.server_name), (None, None));

    // Every problem at once: no CA, half a client certificate, a bad name.
    let errors = parse_err(&minimal_with(
        "backend",
        "tls = true\ntls_cert = \"certs/server.pem\"\ntls_server_name = \"not a name\"",
    ));
    assert_eq!(
        keys(&errors),
        [
            "backend.tls_ca",
            "backend.tls_key",
            "backend.tls_server_name"
        ],
        "\n{errors}"
    );
    let errors = parse_err(&minimal_with(
        "backend",
        "tls = true\ntls_ca = \"certs/missing.pem\"\ntls_key = \"certs/server-key.pem\"",
    ));
    assert_eq!(
        keys(&errors),
        ["backend.tls_ca", "backend.tls_cert"],
        "\n{errors}"
    );

    // TLS keys without `tls = true` would silently do nothing.
    let errors = parse_err(&minimal_with(
        "backend",
        "tls_ca = \"certs/server.pem\"\ntls_server_name = \"rabbit.internal\"",
    ));
    assert_eq!(
        keys(&errors),
        ["backend.tls_ca", "backend.tls_server_name"],
        "\n{errors}"
    );
    let errors = parse_err(&minimal_with(
        "backend",
        "tls = false\ntls_cert = \"certs/server.pem\"\ntls_key = \"certs/server-key.pem\"",
    ));
    assert_eq!(
        keys(&errors),
        ["backend.tls_cert", "backend.tls_key"],
        "\n{errors}"
    );

    // A misspelt key is an error, not a silent default.
    let errors = parse_err(&minimal_with("backend", "tls = true\ntls_ca_file = \"x\""));
    assert!(errors.to_string().contains("tls_ca_file"), "{errors}");
}

/// `MINIMAL` without its root key source, plus `extra` at the end of the file.
fn issuers_config(extra: &str) -> String {
    format!(
        "{}\n{extra}",
        MINIMAL.replace(
            "jwks_uri = \"https://idp.example/.well-known/jwks.json\"\n",
            ""
        )
    )
}

#[test]
fn policy_is_parsed() {
    use crate::auth::policy::{ClaimRule, ClaimTest};
    let (c, _) = parse_ok(&format!(
        r#"{MINIMAL}
[oauth2.policy]
max_lifetime_seconds = 3600
required_claims = ["jti", 'https://sts\.amazonaws\.com/.aws_account']
jti_deny = ["a", "b"]

[[oauth2.policy.rules]]
claim = 'https://sts\.amazonaws\.com/.aws_account'
one_of = ["111122223333"]

[[oauth2.policy.rules]]
claim = "sub"
prefix = "arn:aws:iam::"
"#
    ));
    let p = &c.oauth2.issuers[0].policy;
    assert_eq!(p.max_lifetime_seconds, Some(3600));
    assert_eq!(p.required_claims.len(), 2);
    assert_eq!(p.jti_deny.len(), 2);
    assert_eq!(
        p.rules[1],
        ClaimRule {
            claim: "sub".into(),
            test: ClaimTest::Prefix("arn:aws:iam::".into())
        }
    );
    // Without [[oauth2.issuers]], the one issuer is the root's.
    assert_eq!(c.oauth2.issuers.len(), 1);
    assert!(!c.oauth2.dispatch_by_iss);
}

#[test]
fn policy_errors_are_reported() {
    let e = parse_err(&format!(
        r#"{MINIMAL}
[oauth2.policy]
max_lifetime_seconds = 0
required_claims = ["a b"]

[[oauth2.policy.rules]]
claim = "sub"

[[oauth2.policy.rules]]
claim = "sub"
equals = "x"
prefix = "y"

[[oauth2.policy.rules]]
equals = "x"

[[oauth2.policy.rules]]
claim = "org_id"
one_of = []
"#
    ));
    assert_eq!(
        keys(&e),
        [
            "oauth2.policy.max_lifetime_seconds",
            "oauth2.policy.required_claims[0]",
            "oauth2.policy.rules[0]",
            "oauth2.policy.rules[1]",
            "oauth2.policy.rules[2].claim",
            "oauth2.policy.rules[3].one_of",
        ],
        "{e}"
    );
    let e = parse_err(&format!("{MINIMAL}\n[oauth2.policy]\nmax_lifetime = 5\n"));
    assert!(e.to_string().contains("max_lifetime"), "{e}");
}

#[test]
fn issuers_inherit_the_root_keys() {
    let (c, _) = parse_ok(&issuers_config(
        r#"algorithms = ["RS256"]
additional_scopes_key = "sub"

[oauth2.scope_aliases]
root = "rabbitmq.read:*/*"

[oauth2.policy]
jti_deny = ["x"]

[[oauth2.issuers]]
name = "a"
issuer = "https://a.example"
jwks_uri = "https://a.example/jwks"

[[oauth2.issuers]]
name = "b"
issuer = "https://b.example"
signing_keys = { k1 = "keys/k1.pem" }
algorithms = ["ES384"]
resource_server_id = "other"
[oauth2.issuers.scope_aliases]
b = ["other.read:*/*"]
[oauth2.issuers.policy]
max_lifetime_seconds = 60
"#,
    ));
    let o = &c.oauth2;
    assert_eq!(o.issuers.len(), 2);
    assert!(o.dispatch_by_iss);
    let (a, b) = (&o.issuers[0], &o.issuers[1]);
    assert_eq!(a.issuer.as_deref(), Some("https://a.example"));
    assert_eq!(a.algorithms, [JwtAlgorithm::RS256]);
    assert_eq!(a.resource_server_id, "rabbitmq");
    assert_eq!(a.scope_prefix, "rabbitmq.");
    assert_eq!(a.additional_scopes_key.as_deref(), Some("sub"));
    assert!(a.scope_aliases.contains_key("root"));
    assert_eq!(a.policy.jti_deny.len(), 1, "the root policy is inherited");
    assert_eq!(b.algorithms, [JwtAlgorithm::ES384]);
    assert_eq!(b.resource_server_id, "other");
    assert_eq!(b.scope_prefix, "other.");
    assert_eq!(b.scope_aliases.keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(b.policy.max_lifetime_seconds, Some(60));
    assert!(
        b.policy.jti_deny.is_empty(),
        "a per-issuer policy replaces the root one"
    );
    assert!(b.jwks_uri.is_none() && b.signing_keys.contains_key("k1"));
}

#[test]
fn issuer_errors_are_reported() {
    let e = parse_err(&format!(
        r#"{MINIMAL}
[[oauth2.issuers]]
name = "a"
issuer = "https://a.example"

[[oauth2.issuers]]
name = "a"
issuer = "https://a.example"
jwks_uri = "http://remote.example/jwks"

[[oauth2.issuers]]
name = "c"
jwks_uri = "https://c.example/jwks"

[[oauth2.issuers]]
issuer = "https://d.example"
signing_keys = {{ "" = "keys/k1.pem" }}
algorithms = ["HS256"]
"#
    ));
    assert_eq!(
        keys(&e),
        [
            "oauth2.jwks_uri",
            "oauth2.issuers[1].name",
            "oauth2.issuers[1].issuer",
            "oauth2.issuers[1].jwks_uri",
            "oauth2.issuers[2].issuer",
            "oauth2.issuers[3].name",
            "oauth2.issuers[3].signing_keys.\"\"",
            "oauth2.issuers[3].algorithms[0]",
        ],
        "{e}"
    );
}

#[test]
fn worker_threads_default_to_the_runtime_and_are_bounded() {
    let (c, _) = parse_ok(MINIMAL);
    assert_eq!(c.runtime.worker_threads, None);
    let (c, _) = parse_ok(&minimal_with("runtime", "worker_threads = 3"));
    assert_eq!(c.runtime.worker_threads, Some(3));
    for bad in ["worker_threads = 0", "worker_threads = 1025"] {
        let errors = parse_err(&minimal_with("runtime", bad));
        assert_eq!(keys(&errors), ["runtime.worker_threads"], "{bad}: {errors}");
    }
}

#[test]
fn busy_polling_is_off_by_default_and_bounded() {
    let (c, _) = parse_ok(MINIMAL);
    assert_eq!(c.runtime.busy_poll, std::time::Duration::ZERO);
    let (c, _) = parse_ok(&minimal_with("runtime", "busy_poll_us = 50"));
    assert_eq!(c.runtime.busy_poll, std::time::Duration::from_micros(50));
    let errors = parse_err(&minimal_with("runtime", "busy_poll_us = 1001"));
    assert_eq!(keys(&errors), ["runtime.busy_poll_us"], "{errors}");
}

#[test]
fn the_auth_chain_is_checked() {
    let (c, _) = parse_ok(MINIMAL);
    assert_eq!(c.auth.backends, [crate::config::AuthBackend::OAuth2]);
    assert_eq!(c.auth.loopback_users, ["guest"]);
    let (c, _) = parse_ok(&format!(
        "{MINIMAL}\n[auth]\nbackends = [\"rabbit_auth_backend_internal\", \"oauth2\"]\nloopback_users = []\n[auth.sources]\nmon = [\"10.0.0.0/8\", \"::1\"]\n"
    ));
    use crate::config::AuthBackend::{Internal, OAuth2};
    assert_eq!(c.auth.backends, [Internal, OAuth2]);
    assert!(c.auth.loopback_users.is_empty());
    assert_eq!(c.auth.sources["mon"].len(), 2);
    let errors = parse_err(&format!(
        "{MINIMAL}\n[auth]\nbackends = [\"ldap\", \"oauth2\", \"oauth2\"]\n[auth.sources]\nmon = [\"10.0.0.0/33\"]\nnone = []\n"
    ))
    .to_string();
    for needle in [
        "\"ldap\" is not",
        "\"oauth2\" is listed twice",
        "\"10.0.0.0/33\" is not an IP address",
        "auth.sources.none: must list at least one network",
    ] {
        assert!(errors.contains(needle), "{needle} in:\n{errors}");
    }
    assert!(
        parse_err(&format!("{MINIMAL}\n[auth]\nbackends = []\n"))
            .to_string()
            .contains("at least one backend")
    );
}

#[test]
fn backend_token_mode_is_checked() {
    use crate::config::BackendAuth;
    let (c, _) = parse_ok(MINIMAL);
    assert_eq!(c.backend.auth, BackendAuth::ServiceUser);
    let token = |auth: &str, table: &str| {
        format!(
            "{}\n[backend.token]\n{table}",
            minimal_with("backend", &format!("auth = \"{auth}\"\n"))
        )
    };
    let (c, dir) = parse_ok(&token(
        "token",
        "signing_key = \"certs/server-key.pem\"\nkid = \"gw-1\"\n",
    ));
    // With backend tokens the broker checks the scopes too: "policies" cannot hold.
    let policies_mode = format!(
        "{}\n[authorization]\nmode = \"policies\"\n",
        token(
            "token",
            "signing_key = \"certs/server-key.pem\"\nkid = \"gw-1\"\n"
        )
    );
    let e = parse_err(&policies_mode).to_string();
    assert!(
        e.contains("authorization.mode: \"policies\" cannot hold with backend.auth = \"token\""),
        "{e}"
    );
    let BackendAuth::Token(t) = &c.backend.auth else {
        panic!("{:?}", c.backend.auth)
    };
    assert_eq!(t.signing_key, dir.join("certs/server-key.pem"));
    assert_eq!(
        (
            t.kid.as_str(),
            t.resource_server_id.as_str(),
            t.scope_prefix.as_str()
        ),
        ("gw-1", "rabbitmq", "rabbitmq.")
    );
    let errors = parse_err(&minimal_with("backend", "auth = \"token\"\n")).to_string();
    for needle in [
        "backend.token.signing_key: is required",
        "backend.token.kid",
    ] {
        assert!(errors.contains(needle), "{needle} in:\n{errors}");
    }
    let (c, dir) = parse_ok(&token(
        "token",
        "signing_key = \"certs/server-key.pem\"\nkid = \"gw-2\"\n\
         [backend.token.retired_keys]\ngw-1 = \"certs/server-key.pem\"\n",
    ));
    let BackendAuth::Token(t) = &c.backend.auth else {
        panic!("{:?}", c.backend.auth)
    };
    assert_eq!(t.retired_keys["gw-1"], dir.join("certs/server-key.pem"));
    let errors = parse_err(&token(
        "token",
        "signing_key = \"certs/server-key.pem\"\nkid = \"gw-2\"\n\
         [backend.token.retired_keys]\ngw-2 = \"certs/server-key.pem\"\n",
    ))
    .to_string();
    assert!(
        errors.contains("backend.token.retired_keys.gw-2: must be non-empty and differ"),
        "{errors}"
    );
    // `[backend.token]` without `backend.auth`: backend tokens.
    let (c, _) = parse_ok(&format!(
        "{MINIMAL}\n[backend.token]\nsigning_key = \"certs/server-key.pem\"\nkid = \"gw-1\"\n"
    ));
    assert!(matches!(c.backend.auth, BackendAuth::Token(_)));
    let errors = parse_err(&token("tokens", "kid = \"k\"\n")).to_string();
    assert!(errors.contains("\"tokens\" is not"), "{errors}");
    let errors = parse_err(&token("service_user", "kid = \"k\"\n")).to_string();
    assert!(errors.contains("only with backend.auth"), "{errors}");
}

#[cfg(feature = "test-switches")]
#[test]
fn the_test_switch_needs_backend_tokens() {
    let (c, _) = parse_ok(MINIMAL);
    assert!(c.testing.gateway_decisions, "on by default");
    let e = parse_err(&minimal_with("testing", "gateway_decisions = false"));
    assert!(e.to_string().contains("testing.gateway_decisions"), "{e}");
}

#[cfg(not(feature = "test-switches"))]
#[test]
fn the_test_switch_does_not_exist_outside_test_builds() {
    let e = parse_err(&minimal_with("testing", "gateway_decisions = false"));
    assert!(e.to_string().contains("testing"), "{e}");
}

#[test]
fn authorization_reads_and_compiles_the_policy_documents() {
    let dir = std::env::temp_dir().join(format!("gw-authz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("good.json"),
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Principal": "*", "Action": "rabbitmq:*", "Resource": "*"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.json"),
        r#"{"Version": "2012-10-17", "Statement": [{"Effect": "allow", "Principal": "*", "Action": "*", "Resource": "*"}]}"#,
    )
    .unwrap();
    let base = "[backend]\nnodes = [\"127.0.0.1:5672\"]\nusername = \"u\"\npassword = \"p\"\n[listener]\nplain_address = \"127.0.0.1:5673\"\n[oauth2]\nresource_server_id = \"rabbitmq\"\njwks_uri = \"https://issuer.test/jwks\"\n";
    let load = |extra: &str| parse(&format!("{base}{extra}"), &dir);
    let c = load("[authorization]\nmode = \"policies\"\npolicies = [\"good.json\"]\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.authorization.mode, crate::authz::iam::Mode::Policies);
    assert_eq!(c.authorization.set.statements().len(), 1);
    assert_eq!(c.authorization.policies, [dir.join("good.json")]);
    let errors = |extra: &str| load(extra).unwrap_err().to_string();
    let e = errors("[authorization]\npolicies = [\"good.json\", \"bad.json\"]\n");
    assert!(
        e.contains(r#"authorization.policies[1]: bad.json: $.Statement[0].Effect: expected "Allow" or "Deny", found "allow""#),
        "{e}"
    );
    let e = errors("[authorization]\nmode = \"iam\"\n");
    assert!(
        e.contains(r#"authorization.mode: "iam": expected "scopes", "policies" or "both""#),
        "{e}"
    );
    let e = errors("[authorization]\nmode = \"both\"\n");
    assert!(
        e.contains("authorization.policies: mode \"both\" needs at least one policy document"),
        "{e}"
    );
    let e = errors("[authorization]\npolicies = [\"missing.json\"]\n");
    assert!(e.contains("authorization.policies[0]: cannot read"), "{e}");
    let e = errors("[authorization]\npolicys = []\n");
    assert!(e.contains("policys"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A JWT-shaped password is checked as a token before any internal login, whatever the
/// configured order; any other password follows the configured order.
#[test]
fn a_token_is_tried_as_a_token_first() {
    use AuthBackend::{Internal, OAuth2};
    let cases: [(&[AuthBackend], bool, &[AuthBackend]); 8] = [
        (&[OAuth2], true, &[OAuth2]),
        (&[OAuth2], false, &[OAuth2]),
        (&[Internal], true, &[Internal]),
        (&[Internal], false, &[Internal]),
        (&[OAuth2, Internal], true, &[OAuth2, Internal]),
        (&[OAuth2, Internal], false, &[OAuth2, Internal]),
        (&[Internal, OAuth2], true, &[OAuth2, Internal]),
        (&[Internal, OAuth2], false, &[Internal, OAuth2]),
    ];
    for (backends, jwt, want) in cases {
        let auth = AuthConfig {
            backends: backends.to_vec(),
            ..AuthConfig::default()
        };
        let got: Vec<_> = auth.order_for(jwt).collect();
        assert_eq!(got, want, "{backends:?}, jwt-shaped {jwt}");
    }
}
