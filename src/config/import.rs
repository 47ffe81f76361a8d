//! `import-rabbitmq-conf`: turns the `auth_oauth2.*` lines of a `rabbitmq.conf` into the
//! gateway's TOML, so a RabbitMQ or Amazon MQ configuration carries over line by line.
//!
//! Every line is accounted for: converted, or reported with the reason it was not
//! (unsupported key, a key of another plugin, a malformed line). Nothing is dropped
//! silently. Pure: text in, text and notes out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

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
    algorithms: BTreeMap<String, String>,
    username_claims: BTreeMap<String, String>,
    signing_keys: BTreeMap<String, String>,
    aliases_by_name: BTreeMap<String, String>,
    aliases_indexed: BTreeMap<String, (Option<String>, Option<String>)>,
}

#[derive(Clone)]
enum Scalar {
    Text(String),
    Bool(bool),
}

/// Keys of `auth_oauth2.*` that map one to one onto a gateway `[oauth2]` key.
const SCALARS: [(&str, &str, bool); 8] = [
    ("resource_server_id", "resource_server_id", false),
    ("scope_prefix", "scope_prefix", false),
    ("additional_scopes_key", "additional_scopes_key", false),
    ("default_key", "default_key", false),
    ("issuer", "issuer", false),
    ("jwks_uri", "jwks_uri", false),
    ("verify_aud", "verify_aud", true),
    ("require_exp", "require_exp", true),
];

/// Converts `rabbitmq.conf` text.
pub fn import(conf: &str) -> Imported {
    let mut o = OAuth2::default();
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
        let Some(k) = key.strip_prefix("auth_oauth2.") else {
            notes.push(note(
                line,
                key,
                "not an auth_oauth2 key: RabbitMQ-only, not imported",
            ));
            continue;
        };
        if let Err(msg) = o.take(k, value) {
            notes.push(note(line, key, msg));
        }
    }
    let toml = o.render(&mut notes);
    Imported { toml, notes }
}

fn note(line: usize, key: &str, message: impl Into<String>) -> ImportNote {
    ImportNote {
        line,
        key: key.to_owned(),
        message: message.into(),
    }
}

impl OAuth2 {
    fn take(&mut self, k: &str, value: String) -> Result<(), String> {
        let parts: Vec<&str> = k.splitn(3, '.').collect();
        match parts.as_slice() {
            ["jwks_url"] => {
                self.scalars.insert("jwks_uri", Scalar::Text(value));
                Ok(())
            }
            [name] if SCALARS.iter().any(|(n, _, _)| n == name) => {
                let (_, target, boolean) = SCALARS.iter().find(|(n, _, _)| n == name).copied().unwrap_or_default();
                let v = if boolean {
                    Scalar::Bool(parse_bool(&value).ok_or(format!("{value:?} is not true or false"))?)
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
            ["algorithms", n] => {
                self.algorithms.insert((*n).to_owned(), value);
                Ok(())
            }
            ["signing_keys", kid] => {
                self.signing_keys.insert((*kid).to_owned(), value);
                Ok(())
            }
            ["scope_aliases", idx, field @ ("alias" | "scope")] => {
                let e = self.aliases_indexed.entry((*idx).to_owned()).or_default();
                if *field == "alias" { e.0 = Some(value) } else { e.1 = Some(value) }
                Ok(())
            }
            ["scope_aliases", rest @ ..] => {
                self.aliases_by_name.insert(rest.join("."), value);
                Ok(())
            }
            ["https", ..] => Err(
                "not imported: the gateway fetches keys with the system's CA roots and always verifies the host name".into(),
            ),
            ["resource_servers" | "oauth_providers" | "default_oauth_provider", ..] => Err(
                "not supported yet: several resource servers or providers (one issuer per gateway config)".into(),
            ),
            ["resource_server_type", ..] => Err("not supported: rich authorization requests (RAR)".into()),
            ["scope_pattern_syntax", ..] => Err("not supported: only the wildcard syntax".into()),
            [
                "token_endpoint" | "authorization_endpoint" | "end_session_endpoint" | "discovery_endpoint_path"
                | "discovery_endpoint_params",
                ..,
            ] => Err("not used by the gateway (management UI or token endpoint settings)".into()),
            _ => Err("unknown auth_oauth2 key".into()),
        }
    }

    fn render(self, notes: &mut Vec<ImportNote>) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# Imported from rabbitmq.conf by `amqp-iam-gateway import-rabbitmq-conf`."
        );
        let _ = writeln!(
            t,
            "# Review the [listener] and [backend] sections: they are not part of rabbitmq.conf.\n"
        );
        let _ = writeln!(
            t,
            "[listener]\naddress = \"0.0.0.0:5671\"\ntls_cert = \"certs/server.pem\"\ntls_key = \"certs/server-key.pem\"\n"
        );
        let _ = writeln!(
            t,
            "[backend]\nnodes = [\"127.0.0.1:5672\"]\nusername = \"iam-gateway\"\npassword = \"change-me\"\n"
        );
        let _ = writeln!(t, "[oauth2]");
        for (key, v) in &self.scalars {
            match v {
                Scalar::Text(s) => {
                    let _ = writeln!(t, "{key} = {}", quote(s));
                }
                Scalar::Bool(b) => {
                    let _ = writeln!(t, "{key} = {b}");
                }
            }
        }
        // The scalar form (3.11.6+) and the list form (3.11.10+) may both appear; the list
        // entries are ordered by their index as cuttlefish orders them.
        if !self.username_claims.is_empty() {
            let list: Vec<String> = self.username_claims.values().map(|v| quote(v)).collect();
            let _ = writeln!(t, "preferred_username_claims = [{}]", list.join(", "));
        }
        if !self.algorithms.is_empty() {
            let list: Vec<String> = self.algorithms.values().map(|v| quote(v)).collect();
            let _ = writeln!(t, "algorithms = [{}]", list.join(", "));
        }
        if !self.signing_keys.is_empty() {
            let _ = writeln!(t, "\n[oauth2.signing_keys]");
            for (kid, path) in &self.signing_keys {
                let _ = writeln!(t, "{} = {}", quote(kid), quote(path));
            }
        }
        let aliases = self.aliases(notes);
        if !aliases.is_empty() {
            let _ = writeln!(t, "\n[oauth2.scope_aliases]");
            for (alias, scopes) in &aliases {
                let _ = writeln!(t, "{} = {}", quote(alias), quote(scopes));
            }
        }
        t
    }

    /// Both alias formats; on a collision the indexed form wins, as in RabbitMQ
    /// (`maps:merge(Format1, Format2)`).
    fn aliases(&self, notes: &mut Vec<ImportNote>) -> BTreeMap<String, String> {
        let mut out = self.aliases_by_name.clone();
        for (idx, (alias, scope)) in &self.aliases_indexed {
            match (alias, scope) {
                (Some(a), Some(s)) => {
                    out.insert(a.clone(), s.clone());
                }
                _ => notes.push(note(
                    0,
                    &format!("auth_oauth2.scope_aliases.{idx}"),
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

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
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
                "auth_backends.1",
                "auth_backends.2",
                "auth_oauth2.https.hostname_verification",
                "management.oauth_enabled"
            ]
        );
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
        assert!(msgs[1].1.contains("not supported"));
        assert!(msgs[2].1.contains("key = value"));
    }
}
