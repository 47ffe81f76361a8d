//! `import-rabbitmq-conf`: turns the `auth_oauth2.*` lines of a `rabbitmq.conf` into the
//! gateway's TOML, so a RabbitMQ or Amazon MQ configuration carries over line by line.
//!
//! Every line is accounted for: converted, or reported with the reason it was not
//! (unsupported key, a key of another plugin, a malformed line). Nothing is dropped
//! silently. Pure: text in, text and notes out.

use std::collections::BTreeMap;

use serde::Serialize;

/// Why a line was not converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportNote {
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// The converted config and the notes about lines that were not converted.
#[derive(Debug, Clone)]
pub struct Imported {
    pub toml: String,
    pub notes: Vec<ImportNote>,
}

#[derive(Default)]
struct OAuth2 {
    scalars: BTreeMap<&'static str, Scalar>,
    username_claims: BTreeMap<String, String>,
    /// The root level's key settings (`auth_oauth2.issuer`, `jwks_uri`, `signing_keys`, …):
    /// the provider of the root resource server.
    root: Provider,
    aliases: Aliases,
    /// `auth_oauth2.oauth_providers.<name>.*` (3.13+).
    providers: BTreeMap<String, Provider>,
    /// `auth_oauth2.resource_servers.<name>.*` (3.13+).
    servers: BTreeMap<String, ResourceServer>,
    /// `auth_oauth2.default_oauth_provider`: the provider of the resource servers that name
    /// none.
    default_provider: Option<String>,
}

/// Both `scope_aliases` formats of one level (root or a resource server).
#[derive(Default)]
struct Aliases {
    by_name: BTreeMap<String, String>,
    indexed: BTreeMap<String, (Option<String>, Option<String>)>,
}

/// An OAuth 2.0 provider (or the root level): where the keys come from.
#[derive(Default)]
struct Provider {
    issuer: Option<String>,
    jwks_uri: Option<String>,
    default_key: Option<String>,
    signing_keys: BTreeMap<String, String>,
    algorithms: BTreeMap<String, String>,
    /// The first line that mentions it, for notes.
    line: usize,
}

/// A resource server: the audience, the scope settings and its provider.
#[derive(Default)]
struct ResourceServer {
    id: Option<String>,
    scope_prefix: Option<String>,
    additional_scopes_key: Option<String>,
    provider: Option<String>,
    aliases: Aliases,
    line: usize,
}

/// One `[[oauth2.issuers]]` entry to write.
struct Entry<'a> {
    name: String,
    issuer: &'a str,
    provider: &'a Provider,
    server: Option<&'a ResourceServer>,
}

#[derive(Clone)]
enum Scalar {
    Text(String),
    Bool(bool),
}

/// Keys of `auth_oauth2.*` that map one to one onto a gateway `[oauth2]` key.
const SCALARS: [(&str, &str, bool); 5] = [
    ("resource_server_id", "resource_server_id", false),
    ("scope_prefix", "scope_prefix", false),
    ("additional_scopes_key", "additional_scopes_key", false),
    ("verify_aud", "verify_aud", true),
    ("require_exp", "require_exp", true),
];

/// Converts `rabbitmq.conf` text.
pub fn import(conf: &str) -> Imported {
    let mut o = OAuth2::default();
    let mut chain = Chain::default();
    let mut notes = Vec::new();
    for (i, raw) in conf.lines().enumerate() {
        let line = i + 1;
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let Some((key, value)) = text.split_once('=') else {
            notes.push(note(line, text, "not a `key = value` line"));
            continue;
        };
        let (key, value) = (key.trim(), value.trim().to_owned());
        if let Some(r) = chain.take(key, &value, line) {
            if let Err(msg) = r {
                notes.push(note(line, key, msg));
            }
            continue;
        }
        let Some(k) = key.strip_prefix("auth_oauth2.") else {
            notes.push(note(
                line,
                key,
                "not an auth_oauth2 key: RabbitMQ-only, not imported",
            ));
            continue;
        };
        if let Err(msg) = o.take(k, value, line) {
            notes.push(note(line, key, msg));
        }
    }
    let (oauth2, root_id_note) = o.render(&mut notes);
    let doc = Document {
        listener: ListenerOut {
            address: "0.0.0.0:5671",
            tls_cert: "certs/server.pem",
            tls_key: "certs/server-key.pem",
        },
        backend: BackendOut {
            nodes: ["127.0.0.1:5672"],
            username: "iam-gateway",
            password: "change-me",
        },
        auth: chain.render(),
        oauth2,
    };
    let mut toml = String::from(
        "# Imported from rabbitmq.conf by `amqp-iam-gateway import-rabbitmq-conf`.\n\
         # Review the [listener] and [backend] sections: they are not part of rabbitmq.conf.\n",
    );
    if root_id_note {
        toml.push_str(
            "# [oauth2] resource_server_id is required at the root; every [[oauth2.issuers]] entry\n\
             # sets its own.\n",
        );
    }
    toml.push('\n');
    // Plain data of strings, booleans, arrays and tables: serialisation cannot fail.
    toml.push_str(&toml::to_string(&doc).unwrap_or_default());
    Imported { toml, notes }
}

/// The gateway configuration the import writes, serialised by `toml` (which leaves out the
/// `None` fields; empty lists and tables are left out here, as the gateway refuses some).
#[derive(Serialize)]
struct Document {
    listener: ListenerOut,
    backend: BackendOut,
    auth: Option<AuthOut>,
    oauth2: OAuth2Out,
}

/// Placeholders to review: `rabbitmq.conf` has no equivalent.
#[derive(Serialize)]
struct ListenerOut {
    address: &'static str,
    tls_cert: &'static str,
    tls_key: &'static str,
}

#[derive(Serialize)]
struct BackendOut {
    nodes: [&'static str; 1],
    username: &'static str,
    password: &'static str,
}

#[derive(Serialize)]
struct AuthOut {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    backends: Vec<&'static str>,
    loopback_users: Option<Vec<String>>,
}

#[derive(Serialize, Default)]
struct OAuth2Out {
    resource_server_id: Option<String>,
    scope_prefix: Option<String>,
    additional_scopes_key: Option<String>,
    verify_aud: Option<bool>,
    require_exp: Option<bool>,
    issuer: Option<String>,
    jwks_uri: Option<String>,
    default_key: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    preferred_username_claims: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    algorithms: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    signing_keys: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    scope_aliases: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    issuers: Vec<IssuerOut>,
}

/// One `[[oauth2.issuers]]` entry.
#[derive(Serialize)]
struct IssuerOut {
    name: String,
    issuer: String,
    jwks_uri: Option<String>,
    default_key: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    algorithms: Vec<String>,
    resource_server_id: Option<String>,
    scope_prefix: Option<String>,
    additional_scopes_key: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    signing_keys: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    scope_aliases: BTreeMap<String, String>,
}

/// `auth_backends.N` and `loopback_users`: the gateway's `[auth]`.
#[derive(Default)]
struct Chain {
    /// By index, as cuttlefish orders them.
    backends: BTreeMap<u64, &'static str>,
    /// `loopback_users.<user> = true|false`, or `loopback_users = none` (an empty map).
    loopback: Option<BTreeMap<String, bool>>,
}

impl Chain {
    /// Takes a line of the chain's keys; `None` for any other key.
    fn take(&mut self, key: &str, value: &str, _line: usize) -> Option<Result<(), String>> {
        if let Some(rest) = key.strip_prefix("auth_backends.") {
            return Some(self.take_backend(rest, value));
        }
        if key == "loopback_users" {
            return Some(if value == "none" {
                self.loopback = Some(BTreeMap::new());
                Ok(())
            } else {
                Err(format!("{value:?} is not `none`"))
            });
        }
        let user = key.strip_prefix("loopback_users.")?;
        Some(match parse_bool(value) {
            Some(b) => {
                self.loopback
                    .get_or_insert_with(BTreeMap::new)
                    .insert(user.to_owned(), b);
                Ok(())
            }
            None => Err(format!("{value:?} is not true or false")),
        })
    }

    fn take_backend(&mut self, rest: &str, value: &str) -> Result<(), String> {
        let Ok(index) = rest.parse::<u64>() else {
            return Err(if rest.ends_with(".authn") || rest.ends_with(".authz") {
                "not supported: the gateway's backends authenticate and authorise together".into()
            } else {
                "not a `auth_backends.<number>` key".into()
            });
        };
        let backend = match value {
            "oauth2" | "rabbit_auth_backend_oauth2" => "oauth2",
            "internal" | "rabbit_auth_backend_internal" => "internal",
            other => {
                return Err(format!(
                    "not supported: the gateway's backends are oauth2 and internal, not {other:?}"
                ));
            }
        };
        if self.backends.values().any(|b| *b == backend) {
            return Err(format!("{backend} is listed already"));
        }
        self.backends.insert(index, backend);
        Ok(())
    }

    fn render(&self) -> Option<AuthOut> {
        if self.backends.is_empty() && self.loopback.is_none() {
            return None;
        }
        Some(AuthOut {
            backends: self.backends.values().copied().collect(),
            loopback_users: self.loopback.as_ref().map(|users| {
                users
                    .iter()
                    .filter(|(_, on)| **on)
                    .map(|(u, _)| u.clone())
                    .collect()
            }),
        })
    }
}

fn note(line: usize, key: &str, message: impl Into<String>) -> ImportNote {
    ImportNote {
        line,
        key: key.to_owned(),
        message: message.into(),
    }
}

impl OAuth2 {
    fn take(&mut self, k: &str, value: String, line: usize) -> Result<(), String> {
        if let Some(rest) = k.strip_prefix("oauth_providers.") {
            return self.take_provider(rest, value, line);
        }
        if let Some(rest) = k.strip_prefix("resource_servers.") {
            return self.take_server(rest, value, line);
        }
        if self.root.take(k, &value) {
            return Ok(());
        }
        let parts: Vec<&str> = k.splitn(3, '.').collect();
        match parts.as_slice() {
            ["jwks_url"] => {
                self.root.jwks_uri = Some(value);
                Ok(())
            }
            [name] if SCALARS.iter().any(|(n, _, _)| n == name) => {
                let (_, target, boolean) = SCALARS
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .copied()
                    .unwrap_or_default();
                let v = if boolean {
                    Scalar::Bool(
                        parse_bool(&value).ok_or(format!("{value:?} is not true or false"))?,
                    )
                } else {
                    Scalar::Text(value)
                };
                self.scalars.insert(target, v);
                Ok(())
            }
            ["preferred_username_claims"] => {
                self.username_claims.insert(String::new(), value);
                Ok(())
            }
            ["preferred_username_claims", n] => {
                self.username_claims.insert((*n).to_owned(), value);
                Ok(())
            }
            ["scope_aliases", _, ..] => {
                self.aliases.take(&k["scope_aliases.".len()..], value);
                Ok(())
            }
            ["default_oauth_provider"] => {
                self.default_provider = Some(value);
                Ok(())
            }
            _ => Err(not_imported(&parts).unwrap_or_else(|| "unknown auth_oauth2 key".into())),
        }
    }

    /// `oauth_providers.<name>.<key>`.
    fn take_provider(&mut self, rest: &str, value: String, line: usize) -> Result<(), String> {
        let (p, key) = named(&mut self.providers, rest, "oauth_providers", || Provider {
            line,
            ..Provider::default()
        })?;
        if p.take(key, &value) {
            return Ok(());
        }
        let parts: Vec<&str> = key.splitn(2, '.').collect();
        Err(not_imported(&parts).unwrap_or_else(|| "unknown oauth_providers key".into()))
    }

    /// `resource_servers.<name>.<key>`.
    fn take_server(&mut self, rest: &str, value: String, line: usize) -> Result<(), String> {
        let (r, key) = named(&mut self.servers, rest, "resource_servers", || {
            ResourceServer {
                line,
                ..ResourceServer::default()
            }
        })?;
        match key {
            "id" => r.id = Some(value),
            "scope_prefix" => r.scope_prefix = Some(value),
            "additional_scopes_key" => r.additional_scopes_key = Some(value),
            "oauth_provider_id" => r.provider = Some(value),
            _ if key.starts_with("scope_aliases.") => {
                r.aliases.take(&key["scope_aliases.".len()..], value);
            }
            _ if key == "verify_aud"
                || key == "require_exp"
                || key.starts_with("preferred_username_claims") =>
            {
                return Err(
                    "not imported per resource server: the gateway applies the root auth_oauth2 value to every issuer".into(),
                );
            }
            _ => {
                let parts: Vec<&str> = key.splitn(2, '.').collect();
                return Err(
                    not_imported(&parts).unwrap_or_else(|| "unknown resource_servers key".into())
                );
            }
        }
        Ok(())
    }

    fn text(&self, key: &str) -> Option<&str> {
        match self.scalars.get(key) {
            Some(Scalar::Text(s)) => Some(s),
            _ => None,
        }
    }

    /// With `oauth_providers` or `resource_servers` (RabbitMQ 3.13+): one issuer entry per
    /// resource server (and one for the root `resource_server_id` when set), carrying its
    /// provider's keys. The gateway chooses an entry by the token's `iss` where RabbitMQ
    /// chooses the resource server by `aud`, so each entry needs its own issuer; what cannot
    /// be carried over is noted.
    fn entries(&self, notes: &mut Vec<ImportNote>) -> Vec<Entry<'_>> {
        if self.providers.is_empty() && self.servers.is_empty() {
            if self.default_provider.is_some() {
                notes.push(note(
                    0,
                    "auth_oauth2.default_oauth_provider",
                    "no oauth_providers are defined: not imported",
                ));
            }
            return Vec::new();
        }
        let root_name = if self.servers.contains_key("default") {
            "root"
        } else {
            "default"
        };
        let mut candidates: Vec<(String, Option<&ResourceServer>, usize, String)> = Vec::new();
        if self.text("resource_server_id").is_some() {
            candidates.push((
                root_name.to_owned(),
                None,
                0,
                "auth_oauth2.resource_server_id".to_owned(),
            ));
        }
        for (name, server) in &self.servers {
            candidates.push((
                name.clone(),
                Some(server),
                server.line,
                format!("auth_oauth2.resource_servers.{name}"),
            ));
        }
        let mut used: Vec<&str> = Vec::new();
        let mut entries: Vec<Entry<'_>> = Vec::new();
        for (name, server, line, key) in candidates {
            let wanted = server
                .and_then(|s| s.provider.as_ref())
                .or(self.default_provider.as_ref());
            let (provider_key, provider) = match wanted {
                None => ("auth_oauth2".to_owned(), &self.root),
                Some(p) => match self.providers.get_key_value(p) {
                    Some((p, provider)) => {
                        used.push(p);
                        (format!("auth_oauth2.oauth_providers.{p}"), provider)
                    }
                    None => {
                        notes.push(note(
                            line,
                            &key,
                            format!("not imported: its oauth provider {p:?} is not defined"),
                        ));
                        continue;
                    }
                },
            };
            let Some(issuer) = provider.issuer.as_deref() else {
                notes.push(note(
                    line,
                    &key,
                    format!("not imported: the gateway chooses an issuer entry by the token's `iss`, and {provider_key}.issuer is not set"),
                ));
                continue;
            };
            if let Some(other) = entries.iter().find(|e| e.issuer == issuer) {
                notes.push(note(
                    line,
                    &key,
                    format!(
                        "not imported: it shares the issuer {issuer} with `{}`, and the gateway chooses by `iss`, not by `aud`",
                        other.name
                    ),
                ));
                continue;
            }
            entries.push(Entry {
                name,
                issuer,
                provider,
                server,
            });
        }
        for (name, provider) in &self.providers {
            if !used.contains(&name.as_str()) {
                notes.push(note(
                    provider.line,
                    &format!("auth_oauth2.oauth_providers.{name}"),
                    "not imported: no resource server uses it",
                ));
            }
        }
        entries
    }

    /// The `[oauth2]` table, and whether its `resource_server_id` was taken from the first
    /// issuer entry (the root needs one).
    fn render(self, notes: &mut Vec<ImportNote>) -> (OAuth2Out, bool) {
        let root = &self.root;
        let entries = self.entries(notes);
        let root_has_keys = root.issuer.is_some()
            || root.jwks_uri.is_some()
            || root.default_key.is_some()
            || !root.signing_keys.is_empty();
        if !entries.is_empty()
            && root_has_keys
            && !entries.iter().any(|e| std::ptr::eq(e.provider, root))
        {
            notes.push(note(
                0,
                "auth_oauth2.{issuer,jwks_uri,jwks_url,signing_keys,default_key}",
                "not imported: no issuer entry uses the root provider (set auth_oauth2.resource_server_id, or move them into an oauth_providers entry)",
            ));
        }
        let text = |k: &str| match self.scalars.get(k) {
            Some(Scalar::Text(s)) => Some(s.clone()),
            _ => None,
        };
        let flag = |k: &str| match self.scalars.get(k) {
            Some(Scalar::Bool(b)) => Some(*b),
            _ => None,
        };
        let mut out = OAuth2Out {
            resource_server_id: text("resource_server_id"),
            scope_prefix: text("scope_prefix"),
            additional_scopes_key: text("additional_scopes_key"),
            verify_aud: flag("verify_aud"),
            require_exp: flag("require_exp"),
            // The scalar form (3.11.6+) and the list form (3.11.10+) may both appear; the
            // list entries are ordered by their index as cuttlefish orders them.
            preferred_username_claims: self.username_claims.values().cloned().collect(),
            // Every entry inherits the root algorithms.
            algorithms: root.algorithms.values().cloned().collect(),
            scope_aliases: self.aliases.merged("auth_oauth2.scope_aliases", notes),
            ..OAuth2Out::default()
        };
        // With issuer entries, the root provider's keys move into its entry.
        if entries.is_empty() {
            out.issuer = root.issuer.clone();
            out.jwks_uri = root.jwks_uri.clone();
            out.default_key = root.default_key.clone();
            out.signing_keys = root.signing_keys.clone();
        }
        let mut root_id_from_entry = false;
        if let Some(first) = entries.first()
            && out.resource_server_id.is_none()
        {
            out.resource_server_id =
                Some(first.resource_server_id().unwrap_or_default().to_owned());
            root_id_from_entry = true;
        }
        for e in &entries {
            let p = e.provider;
            out.issuers.push(IssuerOut {
                name: e.name.clone(),
                issuer: e.issuer.to_owned(),
                jwks_uri: p.jwks_uri.clone(),
                default_key: p.default_key.clone(),
                algorithms: if std::ptr::eq(p, root) {
                    Vec::new()
                } else {
                    p.algorithms.values().cloned().collect()
                },
                resource_server_id: e
                    .server
                    .and_then(|_| e.resource_server_id())
                    .map(str::to_owned),
                scope_prefix: e.server.and_then(|s| s.scope_prefix.clone()),
                additional_scopes_key: e.server.and_then(|s| s.additional_scopes_key.clone()),
                signing_keys: p.signing_keys.clone(),
                scope_aliases: match e.server.filter(|s| !s.aliases.is_empty()) {
                    Some(s) => s.aliases.merged(
                        &format!("auth_oauth2.resource_servers.{}.scope_aliases", e.name),
                        notes,
                    ),
                    None => BTreeMap::new(),
                },
            });
        }
        (out, root_id_from_entry)
    }
}

impl Entry<'_> {
    /// The resource server's `id`, which defaults to its name as in RabbitMQ; `None` for
    /// the root entry, which inherits the root `resource_server_id`.
    fn resource_server_id(&self) -> Option<&str> {
        self.server
            .map(|s| s.id.as_deref().unwrap_or(self.name.as_str()))
    }
}

impl Provider {
    /// Takes `key` (what follows `auth_oauth2.` or `auth_oauth2.oauth_providers.<name>.`)
    /// when it is one of a provider's: `issuer`, `jwks_uri`, `default_key`,
    /// `signing_keys.<kid>`, `algorithms.<n>`.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let value = value.to_owned();
        match key.split_once('.') {
            None if key == "issuer" => self.issuer = Some(value),
            None if key == "jwks_uri" => self.jwks_uri = Some(value),
            None if key == "default_key" => self.default_key = Some(value),
            Some(("signing_keys", kid)) => {
                self.signing_keys.insert(kid.to_owned(), value);
            }
            Some(("algorithms", n)) => {
                self.algorithms.insert(n.to_owned(), value);
            }
            _ => return false,
        }
        true
    }
}

/// For `rest` = `<name>.<key>` of `auth_oauth2.<table>.`: the entry `<name>` of `map`
/// (made by `new` when it is the first line about it) and `<key>`.
fn named<'m, 'r, T>(
    map: &'m mut BTreeMap<String, T>,
    rest: &'r str,
    table: &str,
    new: impl FnOnce() -> T,
) -> Result<(&'m mut T, &'r str), String> {
    let (name, key) = rest
        .split_once('.')
        .ok_or_else(|| format!("expected {table}.<name>.<key>"))?;
    Ok((map.entry(name.to_owned()).or_insert_with(new), key))
}

/// Why a known key of another purpose is not imported; `None` for an unknown key.
fn not_imported(parts: &[&str]) -> Option<String> {
    let why = match *parts.first()? {
        "https" => {
            "not imported: the gateway fetches keys with the system's CA roots and always verifies the host name"
        }
        "resource_server_type" => "not supported: rich authorization requests (RAR)",
        "scope_pattern_syntax" => "not supported: only the wildcard syntax",
        "token_endpoint"
        | "authorization_endpoint"
        | "end_session_endpoint"
        | "discovery_endpoint_path"
        | "discovery_endpoint_params" => {
            "not used by the gateway (management UI or token endpoint settings)"
        }
        _ => return None,
    };
    Some(why.to_owned())
}

impl Aliases {
    /// `rest` is what follows `scope_aliases.`: `<alias>` or `<index>.alias|scope`.
    fn take(&mut self, rest: &str, value: String) {
        match rest.split_once('.') {
            Some((idx, field @ ("alias" | "scope"))) => {
                let e = self.indexed.entry(idx.to_owned()).or_default();
                if field == "alias" {
                    e.0 = Some(value);
                } else {
                    e.1 = Some(value);
                }
            }
            _ => {
                self.by_name.insert(rest.to_owned(), value);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.indexed.is_empty()
    }

    /// Both formats merged; on a collision the indexed form wins, as in RabbitMQ
    /// (`maps:merge(Format1, Format2)`). `key` names the level in notes.
    fn merged(&self, key: &str, notes: &mut Vec<ImportNote>) -> BTreeMap<String, String> {
        let mut out = self.by_name.clone();
        for (idx, (alias, scope)) in &self.indexed {
            match (alias, scope) {
                (Some(a), Some(s)) => {
                    out.insert(a.clone(), s.clone());
                }
                _ => notes.push(note(
                    0,
                    &format!("{key}.{idx}"),
                    "skipped: an indexed alias needs both .alias and .scope (RabbitMQ skips it too)",
                )),
            }
        }
        out
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Amazon MQ IAM tutorial's rabbitmq.conf, with the variables filled in.
    pub const TUTORIAL: &str = r#"auth_backends.1 = oauth2
auth_backends.2 = internal

auth_oauth2.jwks_url = https://abc-123.tokens.sts.global.api.aws/.well-known/jwks.json
auth_oauth2.resource_server_id = rabbitmq
auth_oauth2.scope_prefix = rabbitmq/

auth_oauth2.additional_scopes_key = sub
auth_oauth2.scope_aliases.1.alias = arn:aws:iam::111122223333:role/RabbitMqAdminRole
auth_oauth2.scope_aliases.1.scope = rabbitmq/tag:administrator rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*
auth_oauth2.https.hostname_verification = wildcard

management.oauth_enabled = true
"#;

    #[test]
    fn tutorial_converts_and_reports_the_rest() {
        let out = import(TUTORIAL);
        let doc: toml::Table = out.toml.parse().expect("valid TOML");
        let o = doc["oauth2"].as_table().unwrap();
        assert_eq!(
            o["jwks_uri"].as_str(),
            Some("https://abc-123.tokens.sts.global.api.aws/.well-known/jwks.json")
        );
        assert_eq!(o["resource_server_id"].as_str(), Some("rabbitmq"));
        assert_eq!(o["scope_prefix"].as_str(), Some("rabbitmq/"));
        assert_eq!(o["additional_scopes_key"].as_str(), Some("sub"));
        let aliases = o["scope_aliases"].as_table().unwrap();
        assert_eq!(
            aliases["arn:aws:iam::111122223333:role/RabbitMqAdminRole"].as_str(),
            Some(
                "rabbitmq/tag:administrator rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*"
            )
        );
        let noted: Vec<&str> = out.notes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(
            noted,
            [
                "auth_oauth2.https.hostname_verification",
                "management.oauth_enabled"
            ]
        );
        // The chain carries over: tokens first, then the broker's internal users.
        assert_eq!(
            doc["auth"]["backends"].as_array().unwrap(),
            &vec![toml::Value::from("oauth2"), toml::Value::from("internal")]
        );
        assert!(
            doc["auth"].get("loopback_users").is_none(),
            "RabbitMQ's default stays"
        );
    }

    #[test]
    fn the_chain_and_loopback_users_convert() {
        let conf = "auth_backends.2 = rabbit_auth_backend_internal\n\
                    auth_backends.1 = rabbit_auth_backend_oauth2\n\
                    auth_backends.3 = ldap\n\
                    auth_backends.4.authn = internal\n\
                    loopback_users.guest = false\n\
                    loopback_users.monitor = true\n\
                    loopback_users.x = maybe\n\
                    auth_oauth2.resource_server_id = rabbitmq\n\
                    auth_oauth2.jwks_url = https://idp.example/jwks\n";
        let out = import(conf);
        let doc: toml::Table = out.toml.parse().unwrap();
        let cfg = gateway_config(&out.toml);
        use crate::config::AuthBackend::*;
        assert_eq!(cfg.auth.backends, [OAuth2, Internal]);
        assert_eq!(cfg.auth.loopback_users, ["monitor"]);
        assert_eq!(doc["auth"]["loopback_users"].as_array().unwrap().len(), 1);
        let noted: Vec<&str> = out.notes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(
            noted,
            [
                "auth_backends.3",
                "auth_backends.4.authn",
                "loopback_users.x"
            ]
        );
        let none = import(
            "loopback_users = none\nauth_oauth2.resource_server_id = r\nauth_oauth2.jwks_url = https://i/j\n",
        );
        assert!(gateway_config(&none.toml).auth.loopback_users.is_empty());
        assert!(none.notes.is_empty());
    }

    #[test]
    fn both_alias_formats_indexed_wins() {
        let conf = "auth_oauth2.scope_aliases.admin = rabbitmq.tag:administrator\n\
                    auth_oauth2.scope_aliases.developer = rabbitmq.tag:management rabbitmq.read:*/*\n\
                    auth_oauth2.scope_aliases.1.alias = admin\n\
                    auth_oauth2.scope_aliases.1.scope = rabbitmq.read:*/*\n\
                    auth_oauth2.scope_aliases.2.alias = lonely\n";
        let out = import(conf);
        let doc: toml::Table = out.toml.parse().unwrap();
        let a = doc["oauth2"]["scope_aliases"].as_table().unwrap();
        assert_eq!(a["admin"].as_str(), Some("rabbitmq.read:*/*"));
        assert_eq!(
            a["developer"].as_str(),
            Some("rabbitmq.tag:management rabbitmq.read:*/*")
        );
        assert!(!a.contains_key("lonely"));
        assert!(
            out.notes
                .iter()
                .any(|n| n.key == "auth_oauth2.scope_aliases.2")
        );
    }

    #[test]
    fn lists_keys_and_unsupported() {
        let conf = "auth_oauth2.algorithms.1 = RS256\nauth_oauth2.algorithms.2 = ES384\n\
                    auth_oauth2.preferred_username_claims.1 = client_id\n\
                    auth_oauth2.signing_keys.k1 = /etc/keys/k1.pem\nauth_oauth2.default_key = k1\n\
                    auth_oauth2.verify_aud = false\nauth_oauth2.verify_aud_typo = x\n\
                    auth_oauth2.resource_servers.a.id = x\nnonsense\n";
        let out = import(conf);
        let doc: toml::Table = out.toml.parse().unwrap();
        let o = doc["oauth2"].as_table().unwrap();
        assert_eq!(o["algorithms"].as_array().unwrap().len(), 2);
        assert_eq!(
            o["preferred_username_claims"].as_array().unwrap()[0].as_str(),
            Some("client_id")
        );
        assert_eq!(o["signing_keys"]["k1"].as_str(), Some("/etc/keys/k1.pem"));
        assert_eq!(o["verify_aud"].as_bool(), Some(false));
        let msgs: Vec<(&str, &str)> = out
            .notes
            .iter()
            .map(|n| (n.key.as_str(), n.message.as_str()))
            .collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs[0].1.contains("unknown"));
        assert!(msgs[1].1.contains("key = value"));
        assert_eq!(msgs[2].0, "auth_oauth2.resource_servers.a");
        assert!(
            msgs[2].1.contains("auth_oauth2.issuer is not set"),
            "{msgs:?}"
        );
    }

    #[test]
    fn values_and_keys_come_out_as_written_whatever_they_hold() {
        // Quotes, backslashes, brackets, `#`, `=` and non-ASCII text in keys and values:
        // the TOML is written by serialisation, so each reads back as it was.
        let conf = "auth_oauth2.resource_server_id = rabbit\"mq\n\
                    auth_oauth2.jwks_url = https://idp.example/j?a=1#frag\n\
                    auth_oauth2.scope_aliases.we\"ird]\\key = a\"b\\c [x] # not a comment\n\
                    auth_oauth2.scope_aliases.rôle = rabbitmq.read:*/*\n";
        let out = import(conf);
        assert!(out.notes.is_empty(), "{:?}", out.notes);
        let doc: toml::Table = out
            .toml
            .parse()
            .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
        let o = doc["oauth2"].as_table().unwrap();
        assert_eq!(o["resource_server_id"].as_str(), Some("rabbit\"mq"));
        assert_eq!(
            o["jwks_uri"].as_str(),
            Some("https://idp.example/j?a=1#frag")
        );
        let a = o["scope_aliases"].as_table().unwrap();
        assert_eq!(
            a["we\"ird]\\key"].as_str(),
            Some("a\"b\\c [x] # not a comment")
        );
        assert_eq!(a["rôle"].as_str(), Some("rabbitmq.read:*/*"));
    }

    /// Parses the imported TOML as the gateway would (without looking for the files).
    fn gateway_config(toml: &str) -> crate::config::Config {
        crate::config::parse_with(
            toml,
            std::path::Path::new("/"),
            crate::config::CheckFiles::No,
        )
        .unwrap_or_else(|e| panic!("{e}\n{toml}"))
    }

    const PROD: &str = "https://11111111-2222-3333-4444-555555555555.tokens.sts.global.api.aws";
    const STAGING: &str = "https://66666666-7777-8888-9999-000000000000.tokens.sts.global.api.aws";

    #[test]
    fn providers_and_resource_servers_become_issuer_entries() {
        let conf = format!(
            "auth_oauth2.scope_prefix = rabbitmq/\n\
             auth_oauth2.additional_scopes_key = sub\n\
             auth_oauth2.default_oauth_provider = prod\n\
             auth_oauth2.oauth_providers.prod.issuer = {PROD}\n\
             auth_oauth2.oauth_providers.prod.algorithms.1 = RS256\n\
             auth_oauth2.oauth_providers.staging.issuer = {STAGING}\n\
             auth_oauth2.oauth_providers.staging.jwks_uri = {STAGING}/.well-known/jwks.json\n\
             auth_oauth2.oauth_providers.staging.signing_keys.k1 = /etc/keys/k1.pem\n\
             auth_oauth2.oauth_providers.staging.default_key = k1\n\
             auth_oauth2.resource_servers.prod-mq.id = rabbitmq-prod\n\
             auth_oauth2.resource_servers.prod-mq.scope_aliases.1.alias = arn:aws:iam::111122223333:role/Producer\n\
             auth_oauth2.resource_servers.prod-mq.scope_aliases.1.scope = rabbitmq/write:prod/*\n\
             auth_oauth2.resource_servers.staging-mq.oauth_provider_id = staging\n\
             auth_oauth2.resource_servers.staging-mq.scope_prefix = staging/\n"
        );
        let out = import(&conf);
        assert!(out.notes.is_empty(), "{:?}", out.notes);
        let cfg = gateway_config(&out.toml);
        let o = &cfg.oauth2;
        let issuers = &o.issuers;
        let names: Vec<&str> = issuers.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["prod-mq", "staging-mq"]);
        let (prod, staging) = (&issuers[0], &issuers[1]);

        assert_eq!(prod.issuer.as_deref(), Some(PROD));
        assert_eq!(prod.resource_server_id, "rabbitmq-prod");
        assert_eq!(prod.scope_prefix, "rabbitmq/", "inherited from the root");
        assert_eq!(prod.additional_scopes_key.as_deref(), Some("sub"));
        assert_eq!(prod.algorithms, [crate::config::JwtAlgorithm::RS256]);
        assert_eq!(
            prod.scope_aliases["arn:aws:iam::111122223333:role/Producer"],
            ["rabbitmq/write:prod/*"]
        );
        assert_eq!(
            prod.jwks_uri, None,
            "keys by OIDC discovery from the issuer"
        );

        assert_eq!(staging.issuer.as_deref(), Some(STAGING));
        assert_eq!(
            staging.resource_server_id, "staging-mq",
            "the id defaults to the name"
        );
        assert_eq!(staging.scope_prefix, "staging/");
        assert_eq!(
            staging.jwks_uri.as_deref(),
            Some(format!("{STAGING}/.well-known/jwks.json").as_str())
        );
        assert_eq!(
            staging.signing_keys["k1"],
            std::path::PathBuf::from("/etc/keys/k1.pem")
        );
        assert_eq!(staging.default_key.as_deref(), Some("k1"));
    }

    #[test]
    fn the_root_resource_server_is_an_entry_with_the_root_provider() {
        let conf = format!(
            "auth_oauth2.resource_server_id = rabbitmq\n\
             auth_oauth2.issuer = {PROD}\n\
             auth_oauth2.jwks_url = {PROD}/.well-known/jwks.json\n\
             auth_oauth2.oauth_providers.staging.issuer = {STAGING}\n\
             auth_oauth2.resource_servers.staging-mq.oauth_provider_id = staging\n"
        );
        let out = import(&conf);
        assert!(out.notes.is_empty(), "{:?}", out.notes);
        let cfg = gateway_config(&out.toml);
        let issuers = &cfg.oauth2.issuers;
        let got: Vec<(&str, Option<&str>, &str)> = issuers
            .iter()
            .map(|i| {
                (
                    i.name.as_str(),
                    i.issuer.as_deref(),
                    i.resource_server_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("default", Some(PROD), "rabbitmq"),
                ("staging-mq", Some(STAGING), "staging-mq")
            ]
        );
        assert_eq!(
            issuers[0].jwks_uri.as_deref(),
            Some(format!("{PROD}/.well-known/jwks.json").as_str())
        );
    }

    #[test]
    fn what_cannot_be_an_issuer_entry_is_noted() {
        let conf = format!(
            "auth_oauth2.resource_server_id = rabbitmq\n\
             auth_oauth2.jwks_url = {PROD}/.well-known/jwks.json\n\
             auth_oauth2.oauth_providers.prod.issuer = {PROD}\n\
             auth_oauth2.oauth_providers.keyless.jwks_uri = {STAGING}/jwks\n\
             auth_oauth2.oauth_providers.spare.issuer = {STAGING}\n\
             auth_oauth2.oauth_providers.prod.https.verify = true\n\
             auth_oauth2.resource_servers.a.oauth_provider_id = prod\n\
             auth_oauth2.resource_servers.b.oauth_provider_id = prod\n\
             auth_oauth2.resource_servers.c.oauth_provider_id = keyless\n\
             auth_oauth2.resource_servers.d.oauth_provider_id = missing\n\
             auth_oauth2.resource_servers.a.verify_aud = false\n\
             auth_oauth2.resource_servers.a.resource_server_type = rar\n"
        );
        let out = import(&conf);
        let noted: Vec<(&str, &str)> = out
            .notes
            .iter()
            .map(|n| (n.key.as_str(), n.message.as_str()))
            .collect();
        let expect = [
            (
                "auth_oauth2.oauth_providers.prod.https.verify",
                "system's CA roots",
            ),
            (
                "auth_oauth2.resource_servers.a.verify_aud",
                "root auth_oauth2 value",
            ),
            ("auth_oauth2.resource_servers.a.resource_server_type", "RAR"),
            (
                "auth_oauth2.resource_server_id",
                "auth_oauth2.issuer is not set",
            ),
            ("auth_oauth2.resource_servers.b", "shares the issuer"),
            (
                "auth_oauth2.resource_servers.c",
                "oauth_providers.keyless.issuer is not set",
            ),
            (
                "auth_oauth2.resource_servers.d",
                "\"missing\" is not defined",
            ),
            (
                "auth_oauth2.oauth_providers.spare",
                "no resource server uses it",
            ),
            (
                "auth_oauth2.{issuer,jwks_uri,jwks_url,signing_keys,default_key}",
                "root provider",
            ),
        ];
        assert_eq!(noted.len(), expect.len(), "{noted:#?}");
        for ((key, msg), (want_key, want_msg)) in noted.iter().zip(expect) {
            assert_eq!(*key, want_key, "{noted:#?}");
            assert!(msg.contains(want_msg), "{key}: {msg}");
        }
        let cfg = gateway_config(&out.toml);
        let names: Vec<String> = cfg.oauth2.issuers.into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a"]);
    }
}
