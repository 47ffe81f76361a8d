//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (ready, or 503 with a short reason), `POST /reload` and, with backend
//! tokens, `/backend-jwks.json`. It knows nothing of the gateway beyond [`Control`], which
//! the gateway implements (`proxy::control`): what to scrape, whether it is ready, how to
//! reload.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Bound on reading a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin listener asks of the gateway.
pub trait Control: Send + Sync + 'static {
    /// Why new clients cannot be served (the body of a 503 from `/readyz`).
    type NotReady: std::fmt::Display + Send;
    /// Why a reload failed (the body of a 422 from `POST /reload`).
    type ReloadError: std::fmt::Display + Send;
    /// The Prometheus text exposition of every metric.
    fn scrape(&self) -> String;
    /// Whether new clients can be served; why not, when not.
    fn ready(&self) -> impl Future<Output = Result<(), Self::NotReady>> + Send;
    /// Reloads the configuration file; why not, when it cannot.
    fn reload(&self) -> impl Future<Output = Result<(), Self::ReloadError>> + Send;
    /// The JWKS of the backend-token keys (public halves), with backend tokens.
    fn backend_jwks(&self) -> Option<String>;
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve<C: Control>(listener: TcpListener, control: Arc<C>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let control = control.clone();
                async move { Ok::<_, Infallible>(route(&*control, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

async fn route<C: Control>(c: &C, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/reload" {
        if req.method() != hyper::Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST /reload\n".into(),
            );
        }
        return match c.reload().await {
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
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", c.scrape()),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        // Public keys only: what RabbitMQ's `auth_oauth2.jwks_url` reads.
        "/backend-jwks.json" => match c.backend_jwks() {
            Some(jwks) => text(StatusCode::OK, "application/json", jwks),
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no backend tokens\n".into(),
            ),
        },
        "/readyz" => match c.ready().await {
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

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
