//! Exchange types from the broker's management HTTP API, for topic permission checks.
//!
//! RabbitMQ applies topic checks only to topic exchanges. A session knows the built-in
//! exchanges and those its connection declared; for any other it asks this service, which
//! asks `GET /api/exchanges/{vhost}/{name}` with the service user's credentials. A session
//! asks only when a topic check fails on permissions alone and the type would decide it
//! (`authz::Verdict::NeedKind`), never before the write or read permission is known.
//!
//! Answers, failures included, are cached for `backend.exchange_type_ttl_ms` under the
//! exchange's epoch ([`ExchangeEpochs`]): a declare or delete of the name through the
//! gateway starts a new epoch, so no answer from before it is used again. One request per
//! exchange and epoch at a time, however many connections ask. The API's own 404 says the
//! exchange is missing ([`ExchangeKind::Missing`]: the session then answers RabbitMQ's
//! `404 NOT_FOUND` itself); anything else but a clear answer (an HTTP error, a 404 that is
//! not the API's, a timeout) yields `None`, and the session then treats the exchange as a
//! topic exchange: fail closed.
//!
//! Each client connection has a budget ([`LookupBudget`]): requests it causes (cache
//! misses) are spaced to `backend.exchange_lookups_per_second`, with a burst of twice as
//! many; beyond, its lookup waits (and its input with it), so one connection cannot turn
//! into a stream of requests to the management API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::future::Cache;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::time::Instant;

use crate::amqp::session::ExchangeEpochs;
use crate::authz::ExchangeKind;
use crate::config::BackendConfig;
use crate::telemetry::metrics::Metrics;

/// Most exchange types cached.
const MAX_CACHED: u64 = 10_000;

/// One client connection's allowance of management API requests: a token bucket.
pub struct LookupBudget {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl LookupBudget {
    pub fn new(per_second: u32) -> LookupBudget {
        let per_second = f64::from(per_second.max(1));
        let burst = 2.0 * per_second;
        LookupBudget {
            per_second,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until a request may be made, and takes it.
    pub async fn take(&self) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * self.per_second).min(self.burst);
            // Taken now, even if it is owed: the wait pays for it.
            *s = (tokens - 1.0, now);
            if tokens >= 1.0 {
                None
            } else {
                Some(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
            }
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

/// The lookup service, shared by all connections.
pub struct ExchangeTypes {
    http: reqwest::Client,
    base: String,
    username: String,
    password: String,
    cache: Cache<(String, String, u64), Option<ExchangeKind>>,
    epochs: Arc<ExchangeEpochs>,
    per_second: u32,
    metrics: Arc<Metrics>,
}

impl ExchangeTypes {
    pub fn new(
        base: &str,
        backend: &BackendConfig,
        epochs: Arc<ExchangeEpochs>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, super::errors::SetupError> {
        let timeout = backend.connect_timeout;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| super::errors::SetupError::HttpClient(e.to_string()))?;
        Ok(ExchangeTypes {
            http,
            base: base.trim_end_matches('/').to_owned(),
            username: backend.username.clone(),
            password: backend.password.clone(),
            cache: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(backend.exchange_type_ttl)
                .build(),
            epochs,
            per_second: backend.exchange_lookups_per_second,
            metrics,
        })
    }

    /// A budget for one client connection.
    pub fn budget(&self) -> LookupBudget {
        LookupBudget::new(self.per_second)
    }

    /// The type of exchange `name` in `vhost`, or `None` when it cannot be learnt. A
    /// request to the management API, if one is needed, is paid from `budget`.
    pub async fn lookup(
        &self,
        vhost: &str,
        name: &str,
        budget: &LookupBudget,
    ) -> Option<ExchangeKind> {
        let key = (
            vhost.to_owned(),
            name.to_owned(),
            self.epochs.current(vhost, name),
        );
        let kind = self
            .cache
            .get_with(key, async {
                budget.take().await;
                self.fetch(vhost, name).await
            })
            .await;
        let result = match kind {
            Some(ExchangeKind::Missing) => "missing",
            Some(_) => "ok",
            None => "unknown",
        };
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
        self.metrics.exchange_lookup_requests.inc();
        let resp = self
            .http
            .get(&url)
            .basic_auth(&self.username, Some(&self.password))
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status() == reqwest::StatusCode::OK => r,
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                // The management API's own "not found" body, not a proxy's or a wrong
                // base path's: only then is the exchange known to be missing.
                let body: serde_json::Value = r.json().await.ok()?;
                let missing =
                    body.get("error").and_then(|e| e.as_str()) == Some("Object Not Found");
                return missing.then_some(ExchangeKind::Missing);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_budget_spaces_requests_after_its_burst() {
        let b = LookupBudget::new(10);
        let start = Instant::now();
        for _ in 0..20 {
            b.take().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "the burst is free"
        );
        for _ in 0..10 {
            b.take().await;
        }
        let spent = start.elapsed();
        assert!(
            spent >= Duration::from_millis(990) && spent <= Duration::from_millis(1100),
            "{spent:?}"
        );
    }
}
