//! Exchange types from the broker's management HTTP API, for topic permission checks.
//!
//! RabbitMQ applies topic checks only to topic exchanges. The session knows the built-in
//! exchanges and those its connection declared; for any other it asks this service, which
//! asks `GET /api/exchanges/{vhost}/{name}` with the service user's credentials and caches
//! the answer briefly (one request per exchange at a time, however many connections ask).
//! Anything but a clear answer (not found, HTTP error, timeout) yields `None`, and the
//! session then treats the exchange as a topic exchange: fail closed.

use std::time::Duration;

use moka::future::Cache;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use std::sync::Arc;

use crate::admin::metrics::Metrics;
use crate::authz::ExchangeKind;

/// How long a looked-up type is trusted, here and in each session.
pub const TYPE_TTL: Duration = Duration::from_secs(10);
/// Most exchange types cached.
const MAX_CACHED: u64 = 10_000;

/// The lookup service, shared by all connections.
pub struct ExchangeTypes {
    http: reqwest::Client,
    base: String,
    username: String,
    password: String,
    cache: Cache<(String, String), ExchangeKind>,
    metrics: Arc<Metrics>,
}

impl ExchangeTypes {
    pub fn new(
        base: &str,
        username: &str,
        password: &str,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(ExchangeTypes {
            http,
            base: base.trim_end_matches('/').to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
            cache: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(TYPE_TTL)
                .build(),
            metrics,
        })
    }

    /// The type of exchange `name` in `vhost`, or `None` when it cannot be learnt.
    pub async fn lookup(&self, vhost: &str, name: &str) -> Option<ExchangeKind> {
        let key = (vhost.to_owned(), name.to_owned());
        // Failures are not cached (`optionally_get_with`), so a broker that comes back is
        // asked again at once.
        let kind = self
            .cache
            .optionally_get_with(key, self.fetch(vhost, name))
            .await;
        let result = if kind.is_some() { "ok" } else { "unknown" };
        self.metrics
            .exchange_lookups
            .with_label_values(&[result])
            .inc();
        kind
    }

    async fn fetch(&self, vhost: &str, name: &str) -> Option<ExchangeKind> {
        let url = format!(
            "{}/api/exchanges/{}/{}",
            self.base,
            utf8_percent_encode(vhost, NON_ALPHANUMERIC),
            utf8_percent_encode(name, NON_ALPHANUMERIC)
        );
        let resp = self
            .http
            .get(&url)
            .basic_auth(&self.username, Some(&self.password))
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status() == reqwest::StatusCode::OK => r,
            Ok(r) => {
                tracing::debug!(%url, status = %r.status(), "exchange type lookup: no answer");
                return None;
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, "exchange type lookup failed");
                return None;
            }
        };
        let body: serde_json::Value = resp.json().await.ok()?;
        match body.get("type").and_then(|t| t.as_str()) {
            Some("topic") => Some(ExchangeKind::Topic),
            Some(_) => Some(ExchangeKind::Other),
            None => None,
        }
    }
}
