//! Operator commands that are not the gateway itself: `explain` and
//! `import-rabbitmq-conf`. Each returns its output as text so it can be tested; `main.rs`
//! prints it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::auth::scopes::{self, Origin};
use crate::auth::{Authenticator, token_id};
use crate::config::{Config, import};

/// What `explain` found: the report and whether the token is accepted.
pub struct Explained {
    pub text: String,
    pub accepted: bool,
}

/// Verifies `token` against `cfg` as the gateway would, and says why each scope is there.
pub async fn explain(cfg: &Config, token: &str, as_json: bool) -> Result<Explained, String> {
    let auth = Authenticator::from_config(&cfg.oauth2)?;
    if auth.keys.has_remote() {
        // A failed fetch is reported through the verification error below.
        let _ = auth.keys.refresh().await;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let outcome = match auth.verify_signature(token).await {
        Ok(claims) => auth.identity(token, &claims, now).map(|id| (claims, id)),
        Err(e) => Err(e),
    };
    let report = match outcome {
        Err(e) => json!({
            "token": token_id(token),
            "accepted": false,
            "reason": e.reason(),
            "detail": e.to_string(),
        }),
        Ok((claims, id)) => {
            let normalised = scopes::normalise(&claims, &auth.scopes).map_err(|e| e.to_string())?;
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
            })
        }
    };
    let accepted = report["accepted"].as_bool() == Some(true);
    let text = if as_json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    } else {
        render(&report)
    };
    Ok(Explained { text, accepted })
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
        return out;
    }
    let text = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
    out.push_str("accepted:  yes\n");
    out.push_str(&format!("username:  {}\n", text("username")));
    out.push_str(&format!("issuer:    {}\n", text("iss")));
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
