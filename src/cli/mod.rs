//! Operator commands that are not the gateway itself: `explain`, `simulate` and
//! `import-rabbitmq-conf`. Each returns its output as text so it can be tested; `main.rs`
//! prints it.

pub mod simulate;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::auth::jwt::AuthError;
use crate::auth::policy::Policy;
use crate::auth::scopes::{self, Origin};
use crate::auth::token_id;
use crate::config::{BackendTokenConfig, Config, import};

/// Seconds since the epoch.
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What `explain` found: the report and whether the token is accepted.
pub struct Explained {
    pub text: String,
    pub accepted: bool,
}

/// Verifies `token` against `cfg` as the gateway would, and says why each scope is there.
/// Why `explain` could not give its report (a refused token is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The configuration's issuers could not be set up.
    #[error(transparent)]
    Setup(#[from] crate::wiring::WiringError),
    /// The token's scopes could not be normalised (more than RabbitMQ allows).
    #[error(transparent)]
    Scopes(#[from] scopes::ScopeError),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Verifies `token` with `auth` as the gateway would (the keys refreshed first when they
/// come from the issuer): its claims and the identity they give.
async fn verify(
    auth: &crate::auth::Authenticator,
    token: &str,
) -> Result<(Value, crate::auth::Identity), AuthError> {
    if auth.keys.has_remote() {
        // A failed fetch is reported through the verification error.
        let _ = auth.keys.refresh().await;
    }
    let claims = auth.verify_signature(token).await?;
    let id = auth.identity(token, &claims, now())?;
    Ok((claims, id))
}

pub async fn explain(cfg: &Config, token: &str, as_json: bool) -> Result<Explained, ExplainError> {
    let all = crate::wiring::authenticators(&cfg.oauth2)?;
    let auth = match all.select(token) {
        Ok(auth) => auth,
        Err(e) => {
            let report = json!({
                "token": token_id(token),
                "accepted": false,
                "reason": e.reason(),
                "detail": e.to_string(),
                "decided_by": "issuer selection: the token's iss names no [[oauth2.issuers]] entry",
            });
            return finish(report, as_json);
        }
    };
    let now = now();
    let outcome = verify(auth, token).await;
    let report = match outcome {
        Err(e) => json!({
            "token": token_id(token),
            "accepted": false,
            "issuer_entry": auth.name,
            "reason": e.reason(),
            "detail": e.to_string(),
            "decided_by": decided_by(&e),
        }),
        Ok((claims, id)) => {
            let normalised = scopes::normalise(&claims, &auth.scopes)?;
            let origins: Vec<Value> = normalised
                .origins
                .iter()
                .map(|(scope, origin)| json!({ "scope": scope, "from": describe(origin) }))
                .collect();
            json!({
                "token": id.token_id,
                "accepted": true,
                "username": id.username,
                "sub": id.sub,
                "iss": id.iss,
                "jti": id.jti,
                "exp": id.exp,
                "expires_in_seconds": id.exp.map(|e| e - now),
                "tags": id.permissions.tags(),
                "scopes": id.scopes,
                "origins": origins,
                "issuer_entry": auth.name,
                "policy": policy_summary(&auth.policy),
            })
        }
    };
    finish(report, as_json)
}

fn finish(report: Value, as_json: bool) -> Result<Explained, ExplainError> {
    let accepted = report["accepted"].as_bool() == Some(true);
    let text = if as_json {
        serde_json::to_string_pretty(&report)?
    } else {
        render(&report)
    };
    Ok(Explained { text, accepted })
}

/// The rule that refused a token: the edge policy rule, or the check named by the reason.
fn decided_by(e: &AuthError) -> String {
    match e {
        AuthError::PolicyLifetime(_) => "policy max_lifetime_seconds".to_owned(),
        AuthError::PolicyRequiredClaim(c) => format!("policy required_claims ({c})"),
        AuthError::PolicyJti(_) => "policy jti_deny".to_owned(),
        AuthError::PolicyClaim {
            rule, description, ..
        } => format!("policy rules[{rule}] ({description})"),
        other => format!("{} check", other.reason()),
    }
}

/// What the policy an accepted token passed consists of.
fn policy_summary(p: &Policy) -> Value {
    let mut checks = Vec::new();
    if let Some(max) = p.max_lifetime_seconds {
        checks.push(format!("max_lifetime_seconds = {max}"));
    }
    for c in &p.required_claims {
        checks.push(format!("required claim {c}"));
    }
    if !p.jti_deny.is_empty() {
        checks.push(format!("jti not in jti_deny ({} values)", p.jti_deny.len()));
    }
    for (i, r) in p.rules.iter().enumerate() {
        checks.push(format!("rules[{i}]: {r}"));
    }
    json!(checks)
}

/// "alias 'x' ← claim path 'sub'".
fn describe(origin: &Origin) -> String {
    match origin {
        Origin::ScopeClaim => "scope claim".to_owned(),
        Origin::Rpt => "authorization.permissions.scopes (RPT)".to_owned(),
        Origin::ClaimPath(p) => format!("claim path '{p}'"),
        Origin::Alias { alias, from } => format!("alias '{alias}' ← {}", describe(from)),
    }
}

fn render(r: &Value) -> String {
    let mut out = format!("token:     {}\n", r["token"].as_str().unwrap_or("-"));
    if r["accepted"].as_bool() != Some(true) {
        out.push_str(&format!(
            "accepted:  no\nreason:    {} ({})\n",
            r["detail"].as_str().unwrap_or("-"),
            r["reason"].as_str().unwrap_or("-")
        ));
        if let Some(entry) = r["issuer_entry"].as_str() {
            out.push_str(&format!("issuer entry: {entry}\n"));
        }
        if let Some(rule) = r["decided_by"].as_str() {
            out.push_str(&format!("decided by: {rule}\n"));
        }
        return out;
    }
    let text = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
    out.push_str("accepted:  yes\n");
    out.push_str(&format!("username:  {}\n", text("username")));
    out.push_str(&format!(
        "issuer:    {} (entry {})\n",
        text("iss"),
        text("issuer_entry")
    ));
    out.push_str(&format!("jti:       {}\n", text("jti")));
    if let Some(s) = r["expires_in_seconds"].as_i64() {
        out.push_str(&format!("expires:   in {s} s\n"));
    }
    let tags: Vec<&str> = r["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str(&format!(
        "tags:      {}\n",
        if tags.is_empty() {
            "-".to_owned()
        } else {
            tags.join(", ")
        }
    ));
    let policy: Vec<&str> = r["policy"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !policy.is_empty() {
        out.push_str("policy passed:\n");
        for p in policy {
            out.push_str(&format!("  {p}\n"));
        }
    }
    out.push_str("scopes:\n");
    let origins = r["origins"].as_array().cloned().unwrap_or_default();
    if origins.is_empty() {
        out.push_str("  (none: the token grants nothing)\n");
    }
    for o in origins {
        out.push_str(&format!(
            "  {:<30} ← {}\n",
            o["scope"].as_str().unwrap_or("-"),
            o["from"].as_str().unwrap_or("-")
        ));
    }
    out
}

/// Converts a `rabbitmq.conf`; returns the TOML and the report of what was not converted.
pub fn import_rabbitmq_conf(conf: &str) -> (String, String) {
    let out = import::import(conf);
    let mut report = String::new();
    for n in &out.notes {
        if n.line > 0 {
            report.push_str(&format!("line {}: {}: {}\n", n.line, n.key, n.message));
        } else {
            report.push_str(&format!("{}: {}\n", n.key, n.message));
        }
    }
    (out.toml, report)
}

/// The `rabbitmq.conf` lines that make a broker accept the gateway's backend tokens, with
/// the public key at `public_key_path` and `internal` users after tokens when they log in
/// too.
pub fn rabbitmq_conf(
    cfg: &BackendTokenConfig,
    public_key_path: &std::path::Path,
    internal_users: bool,
) -> String {
    let mut t = String::from(
        "## Backend tokens from amqp-iam-gateway (backend.auth = \"token\"). Also run:\n\
         ##   rabbitmq-plugins enable rabbitmq_auth_backend_oauth2\n\
         auth_backends.1 = rabbit_auth_backend_oauth2\n",
    );
    if internal_users {
        t.push_str("auth_backends.2 = internal\n");
    }
    t.push_str(&format!(
        "auth_oauth2.resource_server_id = {}\n",
        cfg.resource_server_id
    ));
    if cfg.scope_prefix != format!("{}.", cfg.resource_server_id) {
        t.push_str(&format!(
            "auth_oauth2.scope_prefix = {}\n",
            cfg.scope_prefix
        ));
    }
    t.push_str(&format!(
        "auth_oauth2.signing_keys.{} = {}\n",
        cfg.kid,
        public_key_path.display()
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brokers_set_up_lines_name_the_kid_and_the_public_key_file() {
        let cfg = BackendTokenConfig {
            signing_key: "k.pem".into(),
            kid: "gw-1".into(),
            resource_server_id: "rabbitmq".into(),
            scope_prefix: "rabbitmq.".into(),
            retired_keys: Default::default(),
        };
        let conf = rabbitmq_conf(&cfg, std::path::Path::new("/etc/rabbitmq/gw-1.pem"), true);
        let lines: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "auth_backends.1 = rabbit_auth_backend_oauth2",
                "auth_backends.2 = internal",
                "auth_oauth2.resource_server_id = rabbitmq",
                "auth_oauth2.signing_keys.gw-1 = /etc/rabbitmq/gw-1.pem",
            ]
        );
        let other = BackendTokenConfig {
            scope_prefix: "rabbitmq/".into(),
            ..cfg
        };
        assert!(
            rabbitmq_conf(&other, std::path::Path::new("p"), false)
                .contains("\nauth_oauth2.scope_prefix = rabbitmq/\n")
        );
        // The importer reads these lines back into the same settings.
        let imported = import::import(&conf);
        assert!(imported.toml.contains("resource_server_id = \"rabbitmq\""));
    }
}
