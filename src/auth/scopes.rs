//! Token claims → RabbitMQ scopes, following RabbitMQ 4.2's `normalize_token_scope/2`
//! (spec §3.2), plus the username (§3.5, 4.1+ rule) and tags (§3.6).
//!
//! Order: the `scope` claim; the Keycloak RPT path `authorization.permissions.scopes`
//! (prepended); every `additional_scopes_key` path (prepended); aliases applied once to the
//! combined list; the `scope_prefix` filter and strip; dedupe; then the 2048-scope limit.
//! Rich Authorization Requests (`authorization_details`) are not supported and are ignored.
//!
//! Each final scope also carries its [`Origin`]s (which claim or alias produced it), so an
//! operator can be told why a token holds a permission.
//!
//! Invariant: pure. It never verifies a token (that is `auth::verify`) and never reads
//! configuration: the caller passes already-resolved [`ScopeRules`].

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// RabbitMQ 4.2.6+ refuses a token with more scopes than this (counted after dedupe).
pub const MAX_SCOPES: usize = 2048;

/// The Keycloak Requesting Party Token location; always on in RabbitMQ, not configurable.
const RPT_PATH: [&str; 3] = ["authorization", "permissions", "scopes"];

/// The claim-processing settings, resolved by the config module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeRules {
    pub resource_server_id: String,
    /// Already resolved: default `"<rsid>."`; `""` disables filtering.
    pub scope_prefix: String,
    pub additional_scopes_key: Option<String>,
    /// Alias → the full scopes it expands to (prefix included).
    pub scope_aliases: BTreeMap<String, Vec<String>>,
    /// Already resolved: default `["sub", "client_id"]`; used as-is (4.1+).
    pub preferred_username_claims: Vec<String>,
}

impl ScopeRules {
    /// RabbitMQ's defaults for `resource_server_id`: prefix `"<rsid>."` (none for an empty
    /// id), no extra claim, no aliases, username from `sub` then `client_id`.
    pub fn with_defaults(resource_server_id: &str) -> ScopeRules {
        let scope_prefix = if resource_server_id.is_empty() {
            String::new()
        } else {
            format!("{resource_server_id}.")
        };
        ScopeRules {
            resource_server_id: resource_server_id.to_owned(),
            scope_prefix,
            additional_scopes_key: None,
            scope_aliases: BTreeMap::new(),
            preferred_username_claims: vec!["sub".to_owned(), "client_id".to_owned()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// RabbitMQ answers `{error, too_many_scopes}`; the login is refused.
    #[error("token carries {count} distinct scopes, more than the limit of {MAX_SCOPES}")]
    TooManyScopes { count: usize },
}

/// Where a final scope came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// The `scope` claim.
    ScopeClaim,
    /// The Keycloak RPT path `authorization.permissions.scopes`.
    Rpt,
    /// One `additional_scopes_key` path, as configured (escapes included).
    ClaimPath(String),
    /// Expanded from the alias `alias`, which itself came from `from`.
    Alias { alias: String, from: Box<Origin> },
}

/// The result of [`normalise`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    /// Sorted, deduplicated, prefix stripped.
    pub scopes: Vec<String>,
    /// Every (final scope, origin) pair, sorted and deduplicated; a scope produced by two
    /// claims appears twice.
    pub origins: Vec<(String, Origin)>,
}

/// Splits `additional_scopes_key` into paths: paths are separated by spaces, segments by
/// dots. `\.` is a literal dot (a gateway extension with the syntax of rabbitmq-server
/// PR #16985), so that namespaced claims such as `https://sts.amazonaws.com/` can be
/// reached. Empty paths and segments are dropped, like Erlang's `trim_all`.
pub fn split_paths(additional_scopes_key: &str) -> Vec<Vec<String>> {
    raw_paths(additional_scopes_key).map(split_path).collect()
}

fn raw_paths(key: &str) -> impl Iterator<Item = &str> {
    // Only the space character separates, as in `binary:split(Key, <<" ">>, ...)`.
    key.split(' ').filter(|p| !p.is_empty())
}

fn split_path(path: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Only `\.` is an escape; any other backslash is literal, so existing
            // configurations that contain backslashes keep their meaning.
            '\\' if chars.peek() == Some(&'.') => {
                current.push('.');
                chars.next();
            }
            '.' => segments.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    segments.push(current);
    segments.retain(|s| !s.is_empty());
    segments
}

/// RabbitMQ's claim walker (`extract_token_value`): descends through maps, iterates over
/// lists of maps, and maps each leaf with [`leaf_values`].
pub fn extract_path(payload: &Value, path: &[String], resource_server_id: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Value::Object(map) = payload {
        walk_map(map, path, resource_server_id, &mut out);
    }
    out
}

fn walk_map(map: &Map<String, Value>, path: &[String], rsid: &str, out: &mut Vec<String>) {
    let Some((key, rest)) = path.split_first() else {
        return;
    };
    let Some(value) = map.get(key) else {
        return;
    };
    match value {
        _ if rest.is_empty() => leaf_values(value, rsid, out),
        Value::Object(inner) => walk_map(inner, rest, rsid, out),
        Value::Array(list) => walk_list(list, rest, rsid, out),
        _ => {}
    }
}

fn walk_list(list: &[Value], path: &[String], rsid: &str, out: &mut Vec<String>) {
    for element in list {
        let Some((key, rest)) = path.split_first() else {
            // The path is used up inside a list: every element is a leaf (so a string
            // element is split on spaces, unlike a string inside a leaf list).
            leaf_values(element, rsid, out);
            continue;
        };
        let Value::Object(map) = element else {
            continue;
        };
        match map.get(key) {
            // A map reached with no path left yields nothing (`walk_map` on `[]`), unlike
            // a map leaf reached from a map: RabbitMQ's asymmetry, kept on purpose.
            Some(Value::Object(inner)) => walk_map(inner, rest, rsid, out),
            Some(Value::Array(inner)) => walk_list(inner, rest, rsid, out),
            // RabbitMQ maps a scalar found in a list element even when path segments
            // remain (`{ok, Value} -> Acc ++ Mapper(R, Value)`); reproduced as is.
            Some(scalar) => leaf_values(scalar, rsid, out),
            None => {}
        }
    }
}

/// `extract_scope_list_from_token_value`: a list is taken as is (non-strings skipped), a
/// string is split on spaces, a map is read at `resource_server_id` and each value is
/// prefixed `"<rsid>."`, anything else gives nothing.
fn leaf_values(value: &Value, rsid: &str, out: &mut Vec<String>) {
    match value {
        Value::Array(list) => out.extend(strings(list).map(str::to_owned)),
        Value::String(s) => out.extend(split_spaces(s).map(str::to_owned)),
        Value::Object(map) => match map.get(rsid) {
            Some(Value::Array(list)) => out.extend(strings(list).map(|k| format!("{rsid}.{k}"))),
            Some(Value::String(s)) => out.extend(split_spaces(s).map(|k| format!("{rsid}.{k}"))),
            _ => {}
        },
        _ => {}
    }
}

fn strings(list: &[Value]) -> impl Iterator<Item = &str> {
    list.iter().filter_map(Value::as_str)
}

/// `binary:split(S, <<" ">>, [global, trim_all])`: only the space character separates.
fn split_spaces(s: &str) -> impl Iterator<Item = &str> {
    s.split(' ').filter(|p| !p.is_empty())
}

/// The values of every `additional_scopes_key` path, in order, with the path as written.
fn additional_scopes(payload: &Value, key: &str, rsid: &str) -> Vec<(String, Origin)> {
    let mut out = Vec::new();
    for raw in raw_paths(key) {
        let origin = Origin::ClaimPath(raw.to_owned());
        let values = extract_path(payload, &split_path(raw), rsid);
        out.extend(values.into_iter().map(|v| (v, origin.clone())));
    }
    out
}

/// The `scope` claim: a string is split on spaces, a list is kept (non-strings ignored),
/// anything else or a missing claim gives nothing.
fn scope_claim(payload: &Value) -> Vec<String> {
    match payload.get("scope") {
        Some(Value::String(s)) => split_spaces(s).map(str::to_owned).collect(),
        Some(Value::Array(list)) => strings(list).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn tagged(values: Vec<String>, origin: &Origin) -> impl Iterator<Item = (String, Origin)> + '_ {
    values.into_iter().map(move |v| (v, origin.clone()))
}

/// Claims → final scopes (spec §3.2, RabbitMQ 4.2, no RAR).
pub fn normalise(payload: &Value, rules: &ScopeRules) -> Result<Normalised, ScopeError> {
    let rsid = rules.resource_server_id.as_str();
    let rpt_path: Vec<String> = RPT_PATH.iter().map(|s| (*s).to_owned()).collect();

    // Each step prepends, as RabbitMQ does (`New ++ Existing`).
    let mut combined: Vec<(String, Origin)> =
        tagged(extract_path(payload, &rpt_path, rsid), &Origin::Rpt).collect();
    combined.extend(tagged(scope_claim(payload), &Origin::ScopeClaim));
    if let Some(key) = rules.additional_scopes_key.as_deref() {
        let mut additional = additional_scopes(payload, key, rsid);
        additional.append(&mut combined);
        combined = additional;
    }

    let expanded = expand_aliases(combined, &rules.scope_aliases);
    let origins: BTreeSet<(String, Origin)> = expanded
        .into_iter()
        .filter_map(|(scope, origin)| {
            strip_scope_prefix(&scope, &rules.scope_prefix).map(|s| (s.to_owned(), origin))
        })
        .collect();
    let scopes: Vec<String> = origins
        .iter()
        .map(|(s, _)| s.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if scopes.len() > MAX_SCOPES {
        return Err(ScopeError::TooManyScopes {
            count: scopes.len(),
        });
    }
    Ok(Normalised {
        scopes,
        origins: origins.into_iter().collect(),
    })
}

/// Aliases are looked up once, over the combined list; originals are kept and the
/// expansions appended (4.1+, which fixed 3.10.8's replacement bug). Expansions are not
/// themselves expanded again.
fn expand_aliases(
    scopes: Vec<(String, Origin)>,
    aliases: &BTreeMap<String, Vec<String>>,
) -> Vec<(String, Origin)> {
    let mut expansions = Vec::new();
    for (scope, origin) in &scopes {
        if let Some(targets) = aliases.get(scope) {
            let from = Origin::Alias {
                alias: scope.clone(),
                from: Box::new(origin.clone()),
            };
            expansions.extend(targets.iter().map(|t| (t.clone(), from.clone())));
        }
    }
    let mut all = scopes;
    all.append(&mut expansions);
    all
}

/// Keeps scopes that start with `prefix` and strips it; an empty prefix keeps everything.
fn strip_scope_prefix<'a>(scope: &'a str, prefix: &str) -> Option<&'a str> {
    scope.strip_prefix(prefix)
}

/// The username (4.1+): the first configured claim whose value is a string, else
/// `"unknown"` (RabbitMQ never falls back to the SASL username after 3.10.x).
pub fn username(payload: &Value, claims: &[String]) -> String {
    claims
        .iter()
        .find_map(|c| payload.get(c).and_then(Value::as_str))
        .unwrap_or("unknown")
        .to_owned()
}

/// User tags from final scopes of the form `tag:<name>` (non-empty names), sorted and
/// deduplicated. Unlike 4.2.6+ (which keeps only already-known atoms) every name is kept;
/// the gateway only ever asks about specific tags such as `impersonator`.
pub fn tags(scopes: &[String]) -> Vec<String> {
    scopes
        .iter()
        .filter_map(|s| s.strip_prefix("tag:"))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests;
