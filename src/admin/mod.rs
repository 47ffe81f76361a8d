//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (not draining, keys loaded, a backend node reachable by the latest
//! background health check, TLS material loaded, and with backend tokens the broker
//! accepting them), with a short body that says why when not ready. Also the metrics and the
//! audit log.

pub mod audit;
pub mod metrics;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::proxy::{Live, token_probe};

/// Bound on reading a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Arc<Live>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(route(&readiness, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

async fn route(r: &Live, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/reload" {
        if req.method() != hyper::Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST /reload\n".into(),
            );
        }
        return match r.reload_from_file().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "reloaded\n".into()),
            Err(e) => {
                tracing::error!("{e}");
                text(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "text/plain",
                    format!("{e}\n"),
                )
            }
        };
    }
    match req.uri().path() {
        "/metrics" => {
            let (shared, _) = r.snapshot();
            let body = shared.metrics.scrape(|m| refresh_gauges(m, &shared.auth));
            text(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        // Public keys only: what RabbitMQ's `auth_oauth2.jwks_url` reads.
        "/backend-jwks.json" => match &r.snapshot().0.backend_jwks {
            Some(jwks) => text(StatusCode::OK, "application/json", jwks.clone()),
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no backend tokens\n".into(),
            ),
        },
        "/readyz" => match ready(r).await {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Why the gateway cannot serve clients, if it cannot.
async fn ready(r: &Live) -> Result<(), String> {
    let (shared, _) = r.snapshot();
    // A load balancer (a Kubernetes readiness probe) stops sending new clients as soon as
    // the drain begins, while `/healthz` stays up until the process exits.
    if *shared.drain.borrow() != crate::proxy::DrainState::Running {
        return Err("draining: no new connections".into());
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
            return Err(format!("{which}issuer keys no longer verify ({why})"));
        }
        if keys.key_count() == 0 {
            let detail = keys
                .status()
                .and_then(|s| s.last_error)
                .unwrap_or_else(|| "no signing keys configured".into());
            return Err(format!("{which}no verification keys loaded ({detail})"));
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

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Brings the gauges and counters owned by other modules up to date before a scrape.
fn refresh_gauges(m: &metrics::Metrics, auth: &crate::auth::Authenticators) {
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
