//! The audit log: one JSON line per authentication decision and per refused operation,
//! to its own sink (stdout or a file), apart from the operational log. Never the raw
//! token: its `jti`, its `sub` and a short hash identify it.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::AuditSink;

/// One audit record.
#[derive(Debug, Default, Serialize)]
pub struct AuditEvent<'a> {
    /// `authentication` or `authorization`.
    pub event: &'a str,
    /// `allow` or `deny`.
    pub decision: &'a str,
    /// Why: `ok`, an authentication reason (`expired`, `bad_signature`, …), `vhost`, or
    /// the refusal text of an operation.
    pub reason: &'a str,
    /// The client's address (behind a load balancer: the one the PROXY header gives).
    pub client: Option<SocketAddr>,
    pub username: Option<&'a str>,
    pub sub: Option<&'a str>,
    pub jti: Option<&'a str>,
    pub issuer: Option<&'a str>,
    /// A short SHA-256 prefix of the token.
    pub token: Option<&'a str>,
    pub vhost: Option<&'a str>,
    /// `class.method` of a refused operation, e.g. `queue.declare`.
    pub method: Option<&'a str>,
    /// The resource of a refused operation, e.g. `queue 'q'`.
    pub resource: Option<&'a str>,
    /// The authentication backend whose decision it is (`oauth2`, `internal`): the one
    /// that accepted the login, or the last one that refused it.
    pub backend: Option<&'a str>,
    /// A management API request: its path as a route (`/api/queues/{vhost}/{queue}`).
    pub path: Option<&'a str>,
    /// A management API request: the status sent to the client.
    pub status: Option<u16>,
    /// The broker policy statement that decided (`<document>:<Sid>`), when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent<'a>,
}

/// Where audit records go.
pub struct Audit {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
}

impl Audit {
    /// No audit log.
    pub fn disabled() -> Audit {
        Audit { sink: None }
    }

    /// Opens the sink (a file is appended to).
    pub fn open(sink: Option<&AuditSink>) -> std::io::Result<Audit> {
        let writer: Box<dyn Write + Send> = match sink {
            None => return Ok(Audit::disabled()),
            Some(AuditSink::Stdout) => Box::new(std::io::stdout()),
            Some(AuditSink::File(path)) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Ok(Audit {
            sink: Some(Mutex::new(writer)),
        })
    }

    /// Writes one record. Audit records are rare (connections, refusals), so a lock and a
    /// write per record are fine; a failing sink is reported in the operational log.
    pub fn record(&self, event: &AuditEvent<'_>) {
        let Some(sink) = &self.sink else { return };
        let line = Line {
            time: rfc3339(SystemTime::now()),
            event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.write_all(text.as_bytes()).and_then(|()| w.flush()) {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}

/// `2026-11-27T06:01:02.345Z`.
fn rfc3339(t: SystemTime) -> String {
    const RFC3339_MILLIS: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    // Cannot fail: the format has only calendar fields, and a SystemTime of this process is
    // within the years 1–9999.
    time::OffsetDateTime::from(t)
        .format(RFC3339_MILLIS)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_749_812_345);
        assert_eq!(rfc3339(t), "2026-11-27T03:23:32.345Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
