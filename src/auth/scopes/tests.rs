//! Tables for `auth::scopes`: every row of `tests/vectors/scopes.json`, the §3.4 and §3.5
//! rows, and the gateway's `\.` path escape.

use super::*;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Vectors {
    resource_server_id: String,
    paths: Vec<PathRow>,
    normalise: Vec<NormaliseRow>,
}

#[derive(Deserialize)]
struct PathRow {
    payload: Value,
    additional_scopes_key: String,
    values: Vec<String>,
}

#[derive(Deserialize)]
struct NormaliseRow {
    config: VectorConfig,
    payload: Value,
    scopes: Option<Vec<String>>,
    error: Option<String>,
}

/// The vector file's config: RabbitMQ's `rabbitmq.conf` shapes (alias values are
/// space-separated strings, as in the cuttlefish format 1).
#[derive(Deserialize)]
struct VectorConfig {
    resource_server_id: String,
    scope_prefix: Option<String>,
    additional_scopes_key: Option<String>,
    #[serde(default)]
    scope_aliases: BTreeMap<String, String>,
}

impl VectorConfig {
    fn rules(&self) -> ScopeRules {
        let mut rules = ScopeRules::with_defaults(&self.resource_server_id);
        if let Some(prefix) = &self.scope_prefix {
            rules.scope_prefix = prefix.clone();
        }
        rules.additional_scopes_key = self.additional_scopes_key.clone();
        rules.scope_aliases = self
            .scope_aliases
            .iter()
            .map(|(k, v)| (k.clone(), v.split(' ').map(str::to_owned).collect()))
            .collect();
        rules
    }
}

fn vectors() -> Vectors {
    serde_json::from_str(include_str!("../../../tests/vectors/scopes.json"))
        .expect("scopes.json parses")
}

fn set(v: &[String]) -> BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn rules_with(rsid: &str, key: Option<&str>, aliases: &[(&str, &[&str])]) -> ScopeRules {
    let mut rules = ScopeRules::with_defaults(rsid);
    rules.additional_scopes_key = key.map(str::to_owned);
    rules.scope_aliases = aliases
        .iter()
        .map(|(k, v)| ((*k).to_owned(), strs(v)))
        .collect();
    rules
}

fn scopes_of(payload: &Value, rules: &ScopeRules) -> Vec<String> {
    normalise(payload, rules).expect("normalises").scopes
}

#[test]
fn every_paths_row() {
    let v = vectors();
    let mut failed = Vec::new();
    for (i, row) in v.paths.iter().enumerate() {
        let got: Vec<String> = additional_scopes(
            &row.payload,
            &row.additional_scopes_key,
            &v.resource_server_id,
        )
        .into_iter()
        .map(|(s, _)| s)
        .collect();
        if got != row.values {
            failed.push(format!(
                "row {i} key {:?}: got {got:?}, want {:?}",
                row.additional_scopes_key, row.values
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn every_normalise_row() {
    let v = vectors();
    let mut failed = Vec::new();
    for (i, row) in v.normalise.iter().enumerate() {
        let got = normalise(&row.payload, &row.config.rules());
        let ok = match (&row.scopes, &row.error, &got) {
            (Some(want), None, Ok(n)) => set(want) == set(&n.scopes),
            (None, Some(e), Err(ScopeError::TooManyScopes { .. })) => e == "too_many_scopes",
            _ => false,
        };
        if !ok {
            failed.push(format!("row {i}: got {got:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn split_paths_escapes_and_trims() {
    let cases: &[(&str, &[&[&str]])] = &[
        ("roles", &[&["roles"]]),
        ("a.b  roles", &[&["a", "b"], &["roles"]]),
        ("a..b.", &[&["a", "b"]]),
        (
            r"https://sts\.amazonaws\.com/.principal_tags.role",
            &[&["https://sts.amazonaws.com/", "principal_tags", "role"]],
        ),
        (r"a\.b", &[&["a.b"]]),
        (r"a\b.c", &[&[r"a\b", "c"]]),
        ("", &[]),
        (" . ", &[&[]]),
    ];
    for (key, want) in cases {
        let want: Vec<Vec<String>> = want.iter().map(|p| strs(p)).collect();
        assert_eq!(split_paths(key), want, "{key:?}");
    }
}

#[test]
fn sts_namespace_reached_with_escaped_dots() {
    let payload = json!({
        "sub": "arn:aws:iam::111122223333:role/App",
        "https://sts.amazonaws.com/": {
            "request_tags": {"scope": "rabbitmq.read:*/* rabbitmq.write:v/*"},
            "principal_tags": {"role": ["reader"]}
        }
    });
    let key = r"https://sts\.amazonaws\.com/.request_tags.scope https://sts\.amazonaws\.com/.principal_tags.role";
    let rules = rules_with("rabbitmq", Some(key), &[("reader", &["rabbitmq.read:r/*"])]);
    let n = normalise(&payload, &rules).expect("normalises");
    assert_eq!(n.scopes, strs(&["read:*/*", "read:r/*", "write:v/*"]));
    let reader = Origin::Alias {
        alias: "reader".to_owned(),
        from: Box::new(Origin::ClaimPath(
            r"https://sts\.amazonaws\.com/.principal_tags.role".to_owned(),
        )),
    };
    assert!(n.origins.contains(&("read:r/*".to_owned(), reader)));
    // Without the escape the dotted key cannot be addressed (RabbitMQ behaviour).
    let plain = "https://sts.amazonaws.com/.request_tags.scope";
    assert!(extract_path(&payload, &split_path(plain), "rabbitmq").is_empty());
}

#[test]
fn amazon_mq_tutorial_chain() {
    let arn = "arn:aws:iam::111122223333:role/RabbitMqAdminRole";
    let mut rules = rules_with(
        "rabbitmq",
        Some("sub"),
        &[(
            arn,
            &[
                "rabbitmq/tag:administrator",
                "rabbitmq/read:*/*",
                "rabbitmq/write:*/*",
                "rabbitmq/configure:*/*",
            ],
        )],
    );
    rules.scope_prefix = "rabbitmq/".to_owned();
    let n = normalise(&json!({"sub": arn, "aud": "rabbitmq"}), &rules).expect("normalises");
    assert_eq!(
        n.scopes,
        strs(&[
            "configure:*/*",
            "read:*/*",
            "tag:administrator",
            "write:*/*"
        ])
    );
    assert_eq!(tags(&n.scopes), strs(&["administrator"]));
    let from_sub = Origin::Alias {
        alias: arn.to_owned(),
        from: Box::new(Origin::ClaimPath("sub".to_owned())),
    };
    assert!(
        n.origins.iter().all(|(_, o)| *o == from_sub),
        "{:?}",
        n.origins
    );
    assert_eq!(n.origins.len(), 4);
}

/// §3.4 "Additional HEAD checks" and the 4.1+ fix of the 3.10.8 replacement bug.
#[test]
fn aliases_apply_once_to_the_combined_list() {
    let aliases: &[(&str, &[&str])] = &[
        (
            "admin",
            &["rabbitmq.read:*/*", "rabbitmq.tag:administrator"],
        ),
        ("dev", &["rabbitmq.write:dev/*"]),
        // An expansion is not expanded again.
        ("rabbitmq.write:dev/*", &["rabbitmq.configure:never/*"]),
    ];
    let rules = rules_with("rabbitmq", Some("roles"), aliases);
    let no_roles = json!({"scope": "admin rabbitmq.configure:*/*"});
    assert_eq!(
        scopes_of(&no_roles, &rules),
        strs(&["configure:*/*", "read:*/*", "tag:administrator"])
    );
    let roles = json!({"roles": "admin dev"});
    assert_eq!(
        scopes_of(&roles, &rules),
        strs(&["read:*/*", "tag:administrator", "write:dev/*"])
    );
    let roles_list = json!({"roles": ["dev", 7, null], "scope": ["admin", {"x": 1}]});
    assert_eq!(
        scopes_of(&roles_list, &rules),
        strs(&["read:*/*", "tag:administrator", "write:dev/*"])
    );
}

#[test]
fn rpt_permissions_are_prepended() {
    let payload = json!({
        "scope": "rabbitmq.configure:*/*",
        "authorization": {"permissions": [
            {"scopes": ["rabbitmq.read:*/*"]},
            {"scopes": "rabbitmq.write:a/* rabbitmq.write:b/*"},
            {"rsname": "only"},
            "not a map"
        ]}
    });
    let n = normalise(&payload, &ScopeRules::with_defaults("rabbitmq")).expect("normalises");
    assert_eq!(
        n.scopes,
        strs(&["configure:*/*", "read:*/*", "write:a/*", "write:b/*"])
    );
    assert!(n.origins.contains(&("read:*/*".to_owned(), Origin::Rpt)));
    assert!(
        n.origins
            .contains(&("configure:*/*".to_owned(), Origin::ScopeClaim))
    );
}

#[test]
fn prefix_filter_and_strip() {
    let payload =
        json!({"scope": "rabbitmq.read:*/* rabbitmqx.write:*/* read:a/b rabbitmq. tag:x"});
    assert_eq!(
        scopes_of(&payload, &ScopeRules::with_defaults("rabbitmq")),
        strs(&["", "read:*/*"])
    );
    // An empty resource server id means no prefix, so nothing is filtered.
    let scope = json!({"scope": ["read:*/*", "rabbitmq.write:*/*", "tag:management"]});
    assert_eq!(
        scopes_of(&scope, &ScopeRules::with_defaults("")),
        strs(&["rabbitmq.write:*/*", "read:*/*", "tag:management"])
    );
}

#[test]
fn limit_counts_distinct_final_scopes() {
    let rules = ScopeRules::with_defaults("rabbitmq");
    let distinct: Vec<String> = (0..=MAX_SCOPES)
        .map(|i| format!("rabbitmq.read:v{i}/*"))
        .collect();
    assert_eq!(
        normalise(&json!({ "scope": distinct }), &rules),
        Err(ScopeError::TooManyScopes {
            count: MAX_SCOPES + 1
        })
    );
    let exactly: Vec<String> = distinct[..MAX_SCOPES].to_vec();
    assert_eq!(
        scopes_of(&json!({ "scope": exactly }), &rules).len(),
        MAX_SCOPES
    );
    let identical = vec!["rabbitmq.read:*/*"; MAX_SCOPES + 1];
    assert_eq!(
        scopes_of(&json!({ "scope": identical }), &rules),
        strs(&["read:*/*"])
    );
    // Scopes dropped by the prefix filter do not count.
    let foreign: Vec<String> = (0..=MAX_SCOPES)
        .map(|i| format!("other.read:v{i}/*"))
        .collect();
    assert!(scopes_of(&json!({ "scope": foreign }), &rules).is_empty());
}

/// The walker's odd corners, transliterated from `extract_token_value_from_list`.
#[test]
fn walker_quirks() {
    let rsid = "rabbitmq";
    let p = |s: &str| split_path(s);
    // A scalar inside a list of maps is taken even though path segments remain.
    let v = json!({"a": [{"b": "x y"}]});
    assert_eq!(extract_path(&v, &p("a.b.c"), rsid), strs(&["x", "y"]));
    // Elements of a list reached with the path used up are leaves: strings are split.
    let v = json!({"a": [{"b": ["x y", {"rabbitmq": "r"}, 3]}]});
    assert_eq!(
        extract_path(&v, &p("a.b"), rsid),
        strs(&["x", "y", "rabbitmq.r"])
    );
    // A leaf list from a map is kept as is (no split), non-strings skipped.
    let v = json!({"a": {"b": ["x y", 3, null]}});
    assert_eq!(extract_path(&v, &p("a.b"), rsid), strs(&["x y"]));
    // A map reached from a list with no path left gives nothing.
    let v = json!({"a": [{"b": {"rabbitmq": ["r"]}}]});
    assert!(extract_path(&v, &p("a.b"), rsid).is_empty());
    // A map leaf reached from a map is read at the resource server id.
    let v = json!({"a": {"b": {"rabbitmq": ["r"], "other": ["o"]}}});
    assert_eq!(extract_path(&v, &p("a.b"), rsid), strs(&["rabbitmq.r"]));
    // Scalars and non-object payloads give nothing; so does an empty path.
    assert!(extract_path(&json!({"a": 1}), &p("a"), rsid).is_empty());
    assert!(extract_path(&json!({"a": {"b": 1}}), &p("a.b.c"), rsid).is_empty());
    assert!(extract_path(&json!(["a"]), &p("a"), rsid).is_empty());
    assert!(extract_path(&json!({"a": "x"}), &[], rsid).is_empty());
}

/// §3.5, 4.1+: the configured list as is; the first string value wins; else "unknown".
#[test]
fn username_rules() {
    let default = strs(&["sub", "client_id"]);
    let cases: &[(Value, &[String], &str)] = &[
        (json!({"sub": "S", "client_id": "C"}), &default, "S"),
        (json!({"client_id": "C"}), &default, "C"),
        (json!({"sub": 42, "client_id": "C"}), &default, "C"),
        (json!({"sub": ["S"]}), &default, "unknown"),
        (json!({}), &default, "unknown"),
        (
            json!({"preferred_username": "P", "sub": "S"}),
            &default,
            "S",
        ),
        (json!("not an object"), &default, "unknown"),
    ];
    for (payload, claims, want) in cases {
        assert_eq!(username(payload, claims), *want, "{payload}");
    }
    let preferred = strs(&["preferred_username"]);
    assert_eq!(
        username(&json!({"preferred_username": "P", "sub": "S"}), &preferred),
        "P"
    );
    // Not appended with the defaults (4.1+).
    assert_eq!(username(&json!({"sub": "S"}), &preferred), "unknown");
}

#[test]
fn tags_from_final_scopes() {
    let scopes = strs(&[
        "tag:monitoring",
        "tag:",
        "read:*/*",
        "tag:administrator",
        "tag:monitoring",
        "TAG:x",
    ]);
    assert_eq!(tags(&scopes), strs(&["administrator", "monitoring"]));
}
