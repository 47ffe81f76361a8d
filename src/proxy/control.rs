//! What the admin listener serves, from the configuration in force ([`Live`]): the metrics
//! scrape (gauges owned by other modules caught up first), readiness, reload and the
//! backend-token JWKS. The admin listener (`admin`) knows only the [`Control`] trait.

use crate::admin::Control;
use crate::telemetry::metrics::Metrics;

use super::balancer::NoNodeReachable;
use super::token_probe::ProbeError;
use super::{DrainState, Live, SetupError, token_probe};

/// Why the gateway cannot serve new clients: the body of `/readyz`'s 503.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("draining: no new connections")]
    Draining,
    /// `which` is `issuer "name": ` when there are several issuers.
    #[error("{which}issuer keys no longer verify ({why})")]
    KeysStale { which: String, why: String },
    #[error("{which}no verification keys loaded ({detail})")]
    NoKeys { which: String, detail: String },
    #[error(transparent)]
    Backend(#[from] NoNodeReachable),
    /// With backend tokens: the broker does not accept them.
    #[error(transparent)]
    BackendTokens(#[from] ProbeError),
}

impl NotReady {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            NotReady::Draining => "draining",
            NotReady::KeysStale { .. } => "keys_stale",
            NotReady::NoKeys { .. } => "no_keys",
            NotReady::Backend(_) => "no_backend",
            NotReady::BackendTokens(_) => "backend_tokens",
        }
    }
}

impl Control for Live {
    type NotReady = NotReady;
    type ReloadError = SetupError;

    fn scrape(&self) -> String {
        let (shared, _) = self.snapshot();
        shared.metrics.scrape(|m| refresh_gauges(m, &shared.auth))
    }

    /// Why the gateway cannot serve clients, if it cannot.
    async fn ready(&self) -> Result<(), NotReady> {
        let (shared, _) = self.snapshot();
        // A load balancer (a Kubernetes readiness probe) stops sending new clients as soon as
        // the drain begins, while `/healthz` stays up until the process exits.
        if *shared.drain.borrow() != DrainState::Running {
            return Err(NotReady::Draining);
        }
        let several = shared.auth.all().len() > 1;
        for a in shared.auth.all() {
            let keys = &a.keys;
            let which = if several {
                format!("issuer {:?}: ", a.name)
            } else {
                String::new()
            };
            if let Some(why) = keys.stale() {
                return Err(NotReady::KeysStale { which, why });
            }
            if keys.key_count() == 0 {
                let detail = keys
                    .status()
                    .and_then(|s| s.last_error)
                    .unwrap_or_else(|| "no signing keys configured".into());
                return Err(NotReady::NoKeys { which, detail });
            }
        }
        // The latest background health checks (`proxy::health`): a probe opens no connection.
        shared.balancer.readiness()?;
        // With backend tokens: does the broker accept them? (Asked at most every
        // `PROBE_EVERY`.)
        if let Some(minter) = &shared.minter {
            let b = &shared.cfg.backend;
            let run = token_probe::probe(
                b,
                shared.backend_tls.as_ref(),
                &shared.balancer,
                minter,
                &shared.metrics,
            );
            shared.token_probe.get(run).await?;
        }
        Ok(())
    }

    async fn reload(&self) -> Result<(), SetupError> {
        self.reload_from_file().await
    }

    fn backend_jwks(&self) -> Option<String> {
        self.snapshot().0.backend_jwks.clone()
    }
}

/// Brings the gauges and counters owned by other modules up to date before a scrape.
fn refresh_gauges(m: &Metrics, auth: &crate::auth::Authenticators) {
    {
        // The authenticator counts in atomics (shared across reloads); catch up.
        use std::sync::atomic::Ordering::Relaxed;
        let s = &auth.stats;
        let v = s.signature_verifications.load(Relaxed);
        m.signature_verifications
            .inc_by(v.saturating_sub(m.signature_verifications.get()));
        for (label, total) in [("hit", &s.cache_hits), ("miss", &s.cache_misses)] {
            let c = m.token_cache.with_label_values(&[label]);
            c.inc_by(total.load(Relaxed).saturating_sub(c.get()));
        }
        // Per issuer; series of issuers removed by a reload disappear.
        m.jwks_keys.reset();
        m.jwks_last_success.reset();
        for a in auth.all() {
            let issuer = a.name.as_str();
            m.jwks_keys
                .with_label_values(&[issuer])
                .set(a.keys.key_count() as i64);
            let Some(status) = a.keys.status() else {
                continue;
            };
            if let Some(t) = status
                .last_success
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            {
                m.jwks_last_success
                    .with_label_values(&[issuer])
                    .set(t.as_secs_f64());
            }
            // The key store counts its fetches; catch the counters up.
            let ok = status.fetches.saturating_sub(status.failures);
            for (label, total) in [("ok", ok), ("error", status.failures)] {
                let c = m.jwks_fetches.with_label_values(&[issuer, label]);
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
    }
}
