//! The issuer over HTTP (or HTTPS): `POST /` is the STS Query API,
//! `GET /.well-known/openid-configuration` and `GET /.well-known/jwks.json` the discovery
//! documents.
//!
//! Sockets only: [`respond`] turns a request's parts into a reply without IO, so the routing
//! and every answer are tested without a listener. Hostile clients are bounded: at most
//! [`MAX_CONNECTIONS`] at once, [`HEADER_READ_TIMEOUT`] for a request's headers,
//! [`MAX_BODY_BYTES`] and [`BODY_READ_TIMEOUT`] for its body, [`TLS_HANDSHAKE_TIMEOUT`] for
//! TLS, and [`MAX_CONNECTION_LIFETIME`] for a keep-alive connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::sigv4::{self, SignedRequest};
use super::time::iso8601;
use super::{ApiError, Issuer, issuer::uuid_v4, request, xml};

/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Time allowed for a request's headers to arrive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's body to arrive.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long, keep-alive or not.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// The service name in SigV4 credential scopes.
pub const SERVICE: &str = "sts";

/// A reply, before it becomes an HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// `x-amzn-RequestId` for STS answers.
    pub request_id: Option<String>,
}

impl Reply {
    fn json(value: &serde_json::Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: value.to_string(),
            request_id: None,
        }
    }

    fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            request_id: None,
        }
    }

    fn sts_error(error: &ApiError, request_id: String) -> Reply {
        Reply {
            status: error.status,
            content_type: "text/xml",
            body: xml::error_response(error, &request_id),
            request_id: Some(request_id),
        }
    }
}

/// Answers one request. `path` and `query` are as received; `now` is Unix seconds.
pub fn respond(issuer: &Issuer, req: &SignedRequest<'_>, now: i64) -> Reply {
    match (req.method, req.path) {
        ("GET" | "HEAD", "/.well-known/openid-configuration") => Reply::json(&issuer.discovery()),
        ("GET" | "HEAD", "/.well-known/jwks.json") => Reply::json(&issuer.jwks()),
        (_, "/.well-known/openid-configuration" | "/.well-known/jwks.json") => {
            Reply::text(405, "method not allowed")
        }
        ("POST" | "GET", "/") => sts(issuer, req, now),
        ("POST", ROTATE_PATH) => rotate(issuer, req, now),
        _ => Reply::text(404, "not found"),
    }
}

/// Emulator extension (not an AWS API): `POST /_emulator/rotate-keys`, signed with SigV4 by
/// any configured principal, generates the next RSA and EC keys; the JWKS then publishes
/// them beside the previous ones and new tokens are signed with them.
pub const ROTATE_PATH: &str = "/_emulator/rotate-keys";

fn rotate(issuer: &Issuer, req: &SignedRequest<'_>, now: i64) -> Reply {
    let request_id = uuid_v4();
    if let Err(e) = sigv4::verify(req, |k| issuer.principal(k), issuer.region(), SERVICE, now) {
        return Reply::sts_error(&e, request_id);
    }
    match issuer.rotate() {
        Ok(kids) => Reply::json(
            &serde_json::json!({ "signing_kids": kids, "published_kids": issuer.published_kids() }),
        ),
        Err(e) => Reply::sts_error(&e.to_api(), request_id),
    }
}

/// The STS Query API: signature, parameters, token.
fn sts(issuer: &Issuer, req: &SignedRequest<'_>, now: i64) -> Reply {
    let request_id = uuid_v4();
    let caller = match sigv4::verify(req, |k| issuer.principal(k), issuer.region(), SERVICE, now) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(request_id, code = e.code, reason = %e.message, "STS request refused");
            return Reply::sts_error(&e, request_id);
        }
    };
    let params = request::parse_form(req.query.as_bytes()).and_then(|mut q| {
        if req.method == "POST" {
            q.extend(request::parse_form(req.body)?);
        }
        Ok(q)
    });
    let minted = params
        .and_then(|p| request::parse_request(&p))
        .map_err(super::StsError::from)
        .and_then(|token_req| issuer.mint(caller, &token_req, now).map(|m| (m, token_req)));
    match minted {
        Ok((m, token_req)) => {
            tracing::info!(
                request_id,
                sub = %caller.role_arn,
                aud = ?token_req.audiences,
                kid = %m.kid,
                jti = %m.jti,
                exp = m.expiration,
                "issued web identity token"
            );
            Reply {
                status: 200,
                content_type: "text/xml",
                body: xml::token_response(&m.token, &iso8601(m.expiration), &request_id),
                request_id: Some(request_id),
            }
        }
        Err(e) => {
            let api = e.to_api();
            if api.status >= 500 {
                tracing::error!(request_id, error = %e, "STS request failed");
            } else {
                tracing::info!(request_id, sub = %caller.role_arn, code = api.code, reason = %api.message, "STS request refused");
            }
            Reply::sts_error(&api, request_id)
        }
    }
}

/// Serves the issuer over plain HTTP on `listener` until the task is dropped.
pub async fn serve(issuer: Arc<Issuer>, listener: TcpListener) -> std::io::Result<()> {
    accept_loop(issuer, listener, None).await
}

/// Serves the issuer over HTTPS on `listener` until the task is dropped.
pub async fn serve_tls(
    issuer: Arc<Issuer>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> std::io::Result<()> {
    accept_loop(issuer, listener, Some(acceptor)).await
}

async fn accept_loop(
    issuer: Arc<Issuer>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot before accepting, so excess clients wait in the kernel's backlog.
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "STS listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let issuer = issuer.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tls {
                None => serve_connection(issuer, stream).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => serve_connection(issuer, s).await,
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("TLS handshake timed out".to_owned()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "STS connection ended with an error");
            }
        });
    }
}

async fn serve_connection<S>(issuer: Arc<Issuer>, stream: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let issuer = issuer.clone();
        async move { Ok::<_, Infallible>(handle(&issuer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(MAX_CONNECTION_LIFETIME, conn).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Ok(()),
    }
}

async fn handle(issuer: &Issuer, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            let e = ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("Request body larger than {MAX_BODY_BYTES} bytes"),
            );
            return response(Reply::sts_error(&e, uuid_v4()), false);
        }
        Err(_) => {
            let e = ApiError::new(408, "RequestTimeout", "Request body not received in time");
            return response(Reply::sts_error(&e, uuid_v4()), false);
        }
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let signed = SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body: &body,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let reply = respond(issuer, &signed, now);
    response(reply, parts.method == Method::HEAD)
}

fn response(reply: Reply, head: bool) -> Response<Full<Bytes>> {
    let len = reply.body.len();
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(reply.body)
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(id) = reply
        .request_id
        .and_then(|id| HeaderValue::from_str(&id).ok())
    {
        h.insert("x-amzn-requestid", id);
    }
    resp
}
