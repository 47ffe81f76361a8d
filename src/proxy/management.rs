//! The management API listener: HTTPS in front of RabbitMQ's management plugin.
//!
//! Each request's credentials (`mgmt::credentials`, or the login form) go through the same
//! chain as an AMQP login: a token verified by `auth` (issuers, claim rules, edge policy)
//! then `loopback_users` and `[auth.sources]`; with the `internal` backend, credentials
//! that are not a valid token go on unchanged, for the broker to judge. A verified request
//! reaches the broker with a backend token the gateway mints for the client
//! (`Authorization: Bearer`), so that the management plugin applies the client's tags and
//! permissions itself. Requests without credentials (the UI's files, `/cli/rabbitmqadmin`)
//! go on as they are, and the broker answers them.
//!
//! Bodies stream both ways. Bounds: the connection count, the requests in progress, the
//! header size and time, the request body's size and time, a pause inside a response
//! body. One audit record and one metric per request; no token is logged.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use super::{DrainState, Live, Shared, proxy_protocol, wait_state};
use crate::auth::exchange::BackendMinter;
use crate::auth::{Identity, jwt_shaped, token_id};
use crate::config::{AuthBackend, ManagementConfig};
use crate::mgmt::{self, Carrier, Presented, Protection};
use crate::telemetry::audit::AuditEvent;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type OutBody = BoxBody<Bytes, BoxError>;
type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, OutBody>;

/// Largest login form (`POST /api/login`): a user name and a token.
const MAX_LOGIN_FORM: usize = 64 * 1024;
/// Minted backend tokens kept for reuse (one per client token and identity).
const MINTED_CACHE_SIZE: u64 = 10_000;
/// How long a minted backend token is reused at most.
const MINTED_REUSE: Duration = Duration::from_secs(300);
/// A reused backend token has at least this long to live.
const MINTED_MARGIN_SECS: i64 = 30;

/// What the management listener needs, built with each configuration.
pub(crate) struct Management {
    pub cfg: ManagementConfig,
    pub tls: TlsAcceptor,
    client: HttpsClient,
    minter: Arc<BackendMinter>,
    /// Backend tokens by client token hash and identity, with their `exp`.
    minted: moka::future::Cache<String, (Arc<str>, i64)>,
}

impl Management {
    pub fn new(
        cfg: &ManagementConfig,
        minter: Arc<BackendMinter>,
        backend: &crate::config::BackendConfig,
    ) -> Result<Management, super::errors::TlsError> {
        let mut tls = super::tls_server_config(&cfg.cert, &cfg.key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client_tls = match &backend.tls {
            Some(t) => super::backend::tls_client_config(t)?,
            None => native_roots_config()?,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(backend.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Management {
            cfg: cfg.clone(),
            tls: TlsAcceptor::from(Arc::new(tls)),
            client,
            minter,
            minted: moka::future::Cache::builder()
                .max_capacity(MINTED_CACHE_SIZE)
                .time_to_live(MINTED_REUSE)
                .build(),
        })
    }

    /// A backend token for `id`: a recent one minted for the same token and identity, or
    /// a new one.
    async fn backend_token(&self, id: &Identity, now: i64) -> Result<Arc<str>, String> {
        let key = format!("{}\n{}\n{}", id.token_id, id.username, id.scopes.join(" "));
        if let Some((token, exp)) = self.minted.get(&key).await
            && exp - MINTED_MARGIN_SECS > now
        {
            return Ok(token);
        }
        let claims = self.minter.claims(
            &super::conn::subject(id),
            now,
            &crate::auth::exchange::jti(),
        );
        let exp = claims["exp"].as_i64().unwrap_or(now);
        let token: Arc<str> = self
            .minter
            .sign(&claims)
            .map_err(|e| format!("backend token not minted: {e}"))?
            .into();
        self.minted.insert(key, (token.clone(), exp)).await;
        Ok(token)
    }
}

/// A rustls client config with the system's CAs (an `https://` management API without
/// `backend.tls`).
fn native_roots_config() -> Result<rustls::ClientConfig, super::errors::TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    Ok(super::backend::client_builder(roots)?.with_no_client_auth())
}

/// Accepts management connections until the shutdown begins. The connection and request
/// bounds are the start-up configuration's (a reload changes the rest).
pub(crate) async fn serve(listener: TcpListener, live: Arc<Live>) {
    let (first, _) = live.snapshot();
    let Some(m) = first.management.clone() else {
        return;
    };
    let conns = Arc::new(Semaphore::new(m.cfg.max_connections));
    let requests = Arc::new(Semaphore::new(m.cfg.max_concurrent_requests));
    let mut drain = first.drain.clone();
    drop((first, m));
    loop {
        let accept = tokio::select! {
            a = listener.accept() => a,
            _ = wait_state(&mut drain, DrainState::Stopping) => return,
        };
        let (stream, peer) = match accept {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "management accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "management connection limit reached; closing");
            continue;
        };
        let live = live.clone();
        let requests = requests.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            connection(stream, peer, live, requests, drain).await;
            drop(permit);
        });
    }
}

/// One connection: PROXY header, TLS, then HTTP/1.1 with keep-alive until either side
/// closes, the idle time runs out, or the shutdown begins (the request in progress ends
/// first).
async fn connection(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    live: Arc<Live>,
    requests: Arc<Semaphore>,
    mut drain: tokio::sync::watch::Receiver<DrainState>,
) {
    let (shared, _) = live.snapshot();
    let Some(m) = shared.management.clone() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let peer = if m.cfg.proxy_protocol {
        match tokio::time::timeout(
            m.cfg.header_timeout,
            proxy_protocol::read_header(&mut stream),
        )
        .await
        {
            Ok(Ok(Some(client))) => client,
            Ok(Ok(None)) => peer,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "management: PROXY protocol header refused");
                return;
            }
            Err(_) => return,
        }
    } else {
        peer
    };
    let tls = match tokio::time::timeout(m.cfg.header_timeout, m.tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "management: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let cfg = m.cfg.clone();
    drop((shared, m));
    let service = hyper::service::service_fn(move |req| {
        let live = live.clone();
        let requests = requests.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, &live, &requests).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = wait_state(&mut drain, DrainState::Stopping) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(cfg.request_timeout, conn).await;
        }
    }
}

/// What happened to one request, for the audit log and the metrics.
struct Outcome {
    label: &'static str,
    decision: &'static str,
    reason: String,
    username: Option<String>,
    identity: Option<Identity>,
    backend: Option<&'static str>,
    /// The broker policy statement that refused the request, when one did.
    statement: Option<String>,
}

impl Outcome {
    fn new(label: &'static str, decision: &'static str, reason: impl Into<String>) -> Self {
        Outcome {
            label,
            decision,
            reason: reason.into(),
            username: None,
            identity: None,
            backend: None,
            statement: None,
        }
    }
}

/// Serves one request, and records it.
async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    live: &Live,
    requests: &Arc<Semaphore>,
) -> Response<OutBody> {
    let (shared, _) = live.snapshot();
    let method = req.method().clone();
    let template = mgmt::path_template(req.uri().path());
    let (response, outcome) = match shared.management.clone() {
        None => (
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &mgmt::error_body(
                    "service_unavailable",
                    "gateway: the management listener is off",
                ),
            ),
            Outcome::new("overloaded", "deny", "listener_off"),
        ),
        Some(m) => match requests.clone().try_acquire_owned() {
            Err(_) => (
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &mgmt::error_body(
                        "service_unavailable",
                        "gateway: too many management requests in progress",
                    ),
                ),
                Outcome::new("overloaded", "deny", "max_concurrent_requests"),
            ),
            Ok(permit) => {
                let _in_flight = crate::telemetry::metrics::GaugeGuard::new(
                    shared.metrics.management_in_flight.clone(),
                );
                let (resp, outcome) = forward(req, peer, &shared, &m).await;
                (resp.map(|b| hold_permit(b, permit)), outcome)
            }
        },
    };
    record(
        &shared,
        peer,
        &method,
        &template,
        response.status(),
        &outcome,
    );
    response
}

/// Keeps the request's slot until its response body has been sent (or dropped).
fn hold_permit(body: OutBody, permit: tokio::sync::OwnedSemaphorePermit) -> OutBody {
    Held {
        inner: body,
        _permit: permit,
    }
    .boxed()
}

struct Held<B> {
    inner: B,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn record(
    shared: &Shared,
    peer: SocketAddr,
    method: &Method,
    template: &str,
    status: StatusCode,
    o: &Outcome,
) {
    let class = match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    shared
        .metrics
        .management_requests
        .with_label_values(&[o.label, class])
        .inc();
    let id = o.identity.as_ref();
    shared.audit.record(&AuditEvent {
        event: "http",
        decision: o.decision,
        reason: &o.reason,
        client: Some(peer),
        username: o.username.as_deref().or(id.map(|i| i.username.as_str())),
        sub: id.and_then(|i| i.sub.as_deref()),
        jti: id.and_then(|i| i.jti.as_deref()),
        issuer: id.and_then(|i| i.iss.as_deref()),
        token: id.map(|i| i.token_id.as_str()),
        method: Some(method.as_str()),
        path: Some(template),
        status: Some(status.as_u16()),
        backend: o.backend,
        statement: o.statement.as_deref(),
        ..Default::default()
    });
}

/// How the request goes on, once its credentials are judged.
enum Pass {
    /// No credentials: as it came.
    Anonymous,
    /// A verified token: with a backend token.
    Token(Arc<str>),
    /// Not a valid token, with the internal backend on: as it came, for the broker.
    Internal,
}

async fn forward(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    m: &Management,
) -> (Response<OutBody>, Outcome) {
    let cfg = &m.cfg;
    let deadline = Instant::now() + cfg.request_timeout;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if !path.starts_with('/') {
        // `OPTIONS *`, CONNECT's authority form: nothing the management API serves.
        let resp = json_response(
            StatusCode::BAD_REQUEST,
            &mgmt::error_body(
                "bad_request",
                "gateway: not a path the management API serves",
            ),
        );
        return (resp, Outcome::new("bad_request", "deny", "not_a_path"));
    }
    let query = parts.uri.query().map(str::to_owned);
    let is_login = parts.method == Method::POST
        && mgmt::segments(&path).is_some_and(|s| s == ["api", "login"]);

    let presented = match mgmt::credentials(&parts.headers, &path, query.as_deref()) {
        Ok(p) => p,
        Err(bad) => {
            tracing::info!(%peer, reason = bad.reason(), "management request refused");
            return (
                login_failed(),
                Outcome::new("bad_request", "deny", bad.reason()),
            );
        }
    };
    // The login form's body is read whole (it is small) before anything else.
    let (presented, body) = match presented {
        Some(p) => (Some(p), Either::Streaming(body)),
        None if is_login => {
            let form = match read_body(body, MAX_LOGIN_FORM as u64, deadline).await {
                Ok(b) => b,
                Err(e) => return body_error(e, MAX_LOGIN_FORM as u64),
            };
            match mgmt::login_form(&form) {
                Some(p) => (Some(p), Either::Buffered(form)),
                // A form the gateway cannot read is not passed on for the broker to read
                // differently: RabbitMQ refuses a login without both fields the same way.
                None => {
                    return (
                        login_failed(),
                        Outcome::new("bad_request", "deny", "login_form"),
                    );
                }
            }
        }
        None => (None, Either::Streaming(body)),
    };

    let (pass, mut outcome) = match judge(presented.as_ref(), peer, shared, m).await {
        Ok(x) => x,
        Err(outcome) => return (login_failed(), *outcome),
    };

    // Protected users: for anyone who could change them.
    let mut body = body;
    if !matches!(pass, Pass::Anonymous) {
        match mgmt::protection(&parts.method, &path, &cfg.protected_users) {
            Protection::Clear => {}
            Protection::Refuse(user) => return protected(&user, outcome),
            Protection::ReadBody(kind) => {
                let bytes = match body {
                    Either::Buffered(b) => b,
                    Either::Streaming(s) => {
                        match read_body(s, cfg.max_body_bytes, deadline).await {
                            Ok(b) => b,
                            Err(e) => return body_error(e, cfg.max_body_bytes),
                        }
                    }
                };
                let ct = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                match mgmt::check_body(kind, ct, &bytes, &cfg.protected_users) {
                    Ok(None) => {}
                    Ok(Some(user)) => return protected(&user, outcome),
                    Err(why) => {
                        outcome.decision = "deny";
                        outcome.label = "protected";
                        outcome.reason = why.to_owned();
                        let text = format!(
                            "gateway: with protected users configured, an import must be \
                             readable: {why}"
                        );
                        let resp = json_response(
                            StatusCode::BAD_REQUEST,
                            &mgmt::error_body("bad_request", &text),
                        );
                        return (resp, outcome);
                    }
                }
                body = Either::Buffered(bytes);
            }
        }
    }

    // Broker policies: the checks of the route, before the broker sees it.
    if matches!(pass, Pass::Token(_)) && shared.cfg.authorization.active() {
        let checks = mgmt::policy::checks(&parts.method, &path);
        if let Some(id) = outcome
            .identity
            .as_ref()
            .filter(|_| !checks.checks.is_empty())
        {
            let mut routing_key = None;
            if checks.routing_key_in_body {
                let bytes = match body {
                    Either::Buffered(b) => b,
                    Either::Streaming(s) => {
                        match read_body(s, cfg.max_body_bytes, deadline).await {
                            Ok(b) => b,
                            Err(e) => return body_error(e, cfg.max_body_bytes),
                        }
                    }
                };
                routing_key = mgmt::policy::body_routing_key(&bytes);
                body = Either::Buffered(bytes);
            }
            let perms = crate::wiring::bind_policies(
                crate::authz::Permissions::default(),
                &shared.cfg.authorization,
                &id.facts,
                Some(peer.ip()),
                true,
            );
            if let Some(b) = perms.policy() {
                let now = super::conn::now_secs();
                for c in &checks.checks {
                    if let Err(statement) = policy_check(b, c, routing_key.as_deref(), now) {
                        return policy_refused(c, statement, &id.username.clone(), outcome);
                    }
                }
            }
        }
    }

    // The request for the broker.
    let mut authorization = match pass {
        Pass::Anonymous => mgmt::Authorization::Remove,
        Pass::Internal | Pass::Token(_) => mgmt::Authorization::Keep,
    };
    let mut query = query;
    let mut login_cookie = None;
    if !matches!(pass, Pass::Internal) && mgmt::query_carries_credentials(&path) {
        // Whatever the gateway could not read there must not reach the broker either.
        query = mgmt::strip_query_credentials(query.as_deref());
    }
    if let Pass::Token(backend_token) = &pass {
        let bearer = format!("Bearer {backend_token}");
        authorization = match HeaderValue::from_str(&bearer) {
            Ok(v) => mgmt::Authorization::Replace(v),
            Err(_) => mgmt::Authorization::Remove,
        };
        if let Some(p) = &presented {
            match p.carrier {
                // Removed above with any other query credentials.
                Carrier::QueryAuth | Carrier::QueryToken => {}
                Carrier::LoginForm => {
                    body = Either::Buffered(
                        mgmt::encode_login_form(&p.username, backend_token).into(),
                    );
                    login_cookie = Some(mgmt::auth_cookie_value(&p.username, &p.secret));
                }
                Carrier::Basic | Carrier::Bearer => {}
            }
        }
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    mgmt::forward_headers(
        &mut parts.headers,
        &mgmt::Forwarding {
            client: peer.ip(),
            host: host.as_deref(),
            authorization,
        },
    );
    // hyper answers `Expect: 100-continue` itself when the body is first read.
    parts.headers.remove(header::EXPECT);
    let target = match query {
        Some(q) => format!("{}{path}?{q}", cfg.backend_url),
        None => format!("{}{path}", cfg.backend_url),
    };
    parts.uri = match target.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => {
            outcome.label = "bad_request";
            return (
                json_response(
                    StatusCode::BAD_REQUEST,
                    &mgmt::error_body("bad_request", "gateway: a path the gateway cannot forward"),
                ),
                outcome,
            );
        }
    };
    parts.version = hyper::Version::HTTP_11;
    let out_body: OutBody = match body {
        Either::Buffered(b) => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            Full::new(b).map_err(|e| match e {}).boxed()
        }
        Either::Streaming(s) => Timed::new(
            Limited::new(s, cfg.max_body_bytes as usize),
            Some(deadline),
            None,
        )
        .boxed(),
    };
    let sent = tokio::time::timeout_at(
        deadline,
        m.client.request(Request::from_parts(parts, out_body)),
    )
    .await;
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            if has_source::<http_body_util::LengthLimitError>(&e) {
                return body_error(BodyError::TooLarge, cfg.max_body_bytes);
            }
            if has_source::<Elapsed>(&e) {
                return body_error(BodyError::Timeout, cfg.max_body_bytes);
            }
            tracing::warn!(%peer, error = %e, "management API request failed");
            outcome.label = "bad_gateway";
            outcome.reason = "backend_unavailable".into();
            let resp = json_response(
                StatusCode::BAD_GATEWAY,
                &mgmt::error_body(
                    "bad_gateway",
                    "gateway: the management API could not be reached",
                ),
            );
            return (resp, outcome);
        }
        Err(_) => {
            outcome.label = "timeout";
            outcome.reason = "backend_timeout".into();
            let text = format!(
                "gateway: the management API did not answer within {} ms",
                cfg.request_timeout.as_millis()
            );
            return (
                json_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &mgmt::error_body("gateway_timeout", &text),
                ),
                outcome,
            );
        }
    };
    if matches!(pass, Pass::Internal)
        && let Some(p) = &presented
    {
        // The broker's verdict on an internal user's password.
        if resp.status() == StatusCode::UNAUTHORIZED {
            shared.password_backoff.failed(&p.username, peer.ip()).await;
        } else if resp.status().is_success() {
            shared
                .password_backoff
                .succeeded(&p.username, peer.ip())
                .await;
        }
    }
    let (mut rparts, rbody) = resp.into_parts();
    mgmt::remove_hop_by_hop(&mut rparts.headers);
    if let Some(value) = login_cookie {
        let cookies: Vec<HeaderValue> = rparts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| {
                let text = v.to_str().ok()?;
                let replaced = mgmt::replace_auth_cookie(text, &value);
                match replaced {
                    Some(r) => HeaderValue::from_str(&r).ok(),
                    None => Some(v.clone()),
                }
            })
            .collect();
        rparts.headers.remove(header::SET_COOKIE);
        for c in cookies {
            rparts.headers.append(header::SET_COOKIE, c);
        }
    }
    let body = Timed::new(rbody, None, Some(cfg.idle_timeout)).boxed();
    (Response::from_parts(rparts, body), outcome)
}

/// Judges the presented credentials: how the request goes on, or why it is refused.
async fn judge(
    presented: Option<&Presented>,
    peer: SocketAddr,
    shared: &Shared,
    m: &Management,
) -> Result<(Pass, Outcome), Box<Outcome>> {
    let Some(p) = presented else {
        return Ok((
            Pass::Anonymous,
            Outcome::new("anonymous", "pass", "no_credentials"),
        ));
    };
    let backends = &shared.cfg.auth.backends;
    let mut internal_on = backends.contains(&AuthBackend::Internal);
    let ip = peer.ip();
    let mut reason = "no_backend";
    if backends.contains(&AuthBackend::OAuth2) {
        let (issuer, verified) = shared
            .auth
            .authenticate_named(&p.secret, super::conn::now_secs(), Some(ip))
            .await;
        let issuer = issuer.to_owned();
        match verified {
            Ok(id) => match shared.sources.check(&id.username, ip) {
                Ok(()) => {
                    return match m.backend_token(&id, super::conn::now_secs()).await {
                        Ok(token) => {
                            shared
                                .metrics
                                .authentications
                                .with_label_values(&[&issuer, "accepted", "ok"])
                                .inc();
                            let mut o = Outcome::new("token", "allow", "ok");
                            o.backend = Some(AuthBackend::OAuth2.as_str());
                            o.identity = Some(id);
                            Ok((Pass::Token(token), o))
                        }
                        Err(e) => {
                            tracing::error!(%peer, user = %id.username, error = %e, "management: backend token not minted");
                            let mut o = Outcome::new("refused", "deny", "backend_token");
                            o.identity = Some(id);
                            Err(Box::new(o))
                        }
                    };
                }
                Err(r) => {
                    tracing::info!(%peer, user = ?id.username, reason = r.reason(), carrier = p.carrier.as_str(), "management login refused from this source");
                    shared
                        .metrics
                        .authentications
                        .with_label_values(&[&issuer, "refused", r.reason()])
                        .inc();
                    let mut o = Outcome::new("refused", "deny", r.reason());
                    o.backend = Some(AuthBackend::OAuth2.as_str());
                    o.identity = Some(id);
                    return Err(Box::new(o));
                }
            },
            Err(e) => {
                reason = e.reason();
                // A verified token that a claim rule or a policy refused is not offered to
                // the broker as a password (as for AMQP: `conn::login`): it is refused here,
                // as with the token backend alone.
                if e.of_a_verified_token() {
                    internal_on = false;
                }
                if !internal_on {
                    let token = jwt_shaped(&p.secret).then(|| token_id(&p.secret));
                    tracing::info!(
                        %peer, backend = "oauth2", reason, error = %e,
                        token = token.as_deref().unwrap_or("-"),
                        carrier = p.carrier.as_str(), "management login refused"
                    );
                    shared
                        .metrics
                        .authentications
                        .with_label_values(&[&issuer, "refused", reason])
                        .inc();
                }
            }
        }
    }
    if internal_on {
        // The broker sees every request come from the gateway, so its own `loopback_users`
        // check cannot tell: the gateway's, on the client's real address, is the one that
        // counts (as for AMQP). So is the failed-password back-off (fed from the broker's
        // answers in `forward`).
        let refused = match shared.sources.check(&p.username, ip) {
            Err(r) => Some(r.reason()),
            Ok(()) if shared.password_backoff.blocked(&p.username, ip).await => {
                Some("cached_failure")
            }
            Ok(()) => None,
        };
        if let Some(why) = refused {
            tracing::info!(%peer, user = ?p.username, backend = "internal", reason = why, carrier = p.carrier.as_str(), "management login refused");
            shared
                .metrics
                .authentications
                .with_label_values(&["internal", "refused", why])
                .inc();
            let mut o = Outcome::new("refused", "deny", why);
            o.username = Some(p.username.clone());
            o.backend = Some(AuthBackend::Internal.as_str());
            return Err(Box::new(o));
        }
        // Why the token backend did not take it, for a JWT-shaped password.
        let why = if reason != "no_backend" && jwt_shaped(&p.secret) {
            format!("internal_user (token refused: {reason})")
        } else {
            "internal_user".to_owned()
        };
        let mut o = Outcome::new("internal", "pass", why);
        o.username = Some(p.username.clone());
        o.backend = Some(AuthBackend::Internal.as_str());
        return Ok((Pass::Internal, o));
    }
    let mut o = Outcome::new("refused", "deny", reason);
    o.backend = Some(AuthBackend::OAuth2.as_str());
    Err(Box::new(o))
}

enum Either {
    Buffered(Bytes),
    Streaming(Incoming),
}

#[derive(Debug)]
enum BodyError {
    TooLarge,
    Timeout,
    Broken,
}

/// Reads a whole request body, within `max` bytes and the deadline.
async fn read_body(body: Incoming, max: u64, deadline: Instant) -> Result<Bytes, BodyError> {
    let limited = Limited::new(body, max as usize);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Broken),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

fn body_error(e: BodyError, max: u64) -> (Response<OutBody>, Outcome) {
    let (status, label, text) = match e {
        BodyError::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("gateway: the request body is larger than management.max_body_bytes ({max})"),
        ),
        BodyError::Timeout => (
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "gateway: the request body did not arrive within management.request_timeout_ms".into(),
        ),
        BodyError::Broken => (
            StatusCode::BAD_REQUEST,
            "bad_request",
            "gateway: the request body could not be read".into(),
        ),
    };
    let reason = format!("{e:?}").to_ascii_lowercase();
    (
        json_response(status, &mgmt::error_body("bad_request", &text)),
        Outcome::new(label, "deny", reason),
    )
}

fn protected(user: &str, mut outcome: Outcome) -> (Response<OutBody>, Outcome) {
    tracing::info!(user = ?user, "management: a change to a protected user refused");
    outcome.label = "protected";
    outcome.decision = "deny";
    outcome.reason = format!("protected_user {user}");
    (
        json_response(
            StatusCode::BAD_REQUEST,
            &mgmt::error_body("bad_request", mgmt::PROTECTED_USER),
        ),
        outcome,
    )
}

/// One check of a management request against the broker policies alone (the broker
/// checks the minted token's scopes itself).
fn policy_check(
    b: &crate::authz::iam::Binding,
    c: &mgmt::policy::Check,
    routing_key: Option<&str>,
    now: i64,
) -> Result<(), Option<String>> {
    use crate::authz::iam::{self, ResourceKind};
    use mgmt::policy::Target;
    let resource = match &c.target {
        Target::Vhost => iam::vhost_arn(&c.vhost),
        Target::Queue(q) => iam::resource_arn(&c.vhost, ResourceKind::Queue, q.as_bytes()),
        Target::Exchange(x) => iam::resource_arn(&c.vhost, ResourceKind::Exchange, x.as_bytes()),
    };
    b.permits(&iam::Request {
        actions: c.actions,
        resource: &resource,
        vhost: &c.vhost,
        routing_key: routing_key.map(str::as_bytes),
        now,
    })
    .map_err(|s| s.map(str::to_owned))
}

/// The management plugin's answer to a refused check, and the audit outcome.
fn policy_refused(
    c: &mgmt::policy::Check,
    statement: Option<String>,
    username: &str,
    mut outcome: Outcome,
) -> (Response<OutBody>, Outcome) {
    use mgmt::policy::Target;
    let perm = match c.permission {
        Some(crate::authz::iam::Action::Configure) => "configure",
        Some(crate::authz::iam::Action::Write) => "write",
        _ => "read",
    };
    let explanation = match &c.target {
        Target::Vhost => format!(
            "access to vhost '{}' refused for user '{username}'",
            c.vhost
        ),
        Target::Queue(q) => format!(
            "{perm} access to queue '{q}' in vhost '{}' refused for user '{username}'",
            c.vhost
        ),
        Target::Exchange(x) => format!(
            "{perm} access to exchange '{x}' in vhost '{}' refused for user '{username}'",
            c.vhost
        ),
    };
    let text = crate::authz::reply_text("ACCESS_REFUSED", &explanation);
    let (status, body) = mgmt::policy::refusal(c.answer, &text);
    tracing::info!(user = %username, statement = statement.as_deref().unwrap_or("-"), text = %text, "management request refused by the broker policies");
    outcome.label = "policy";
    outcome.decision = "deny";
    outcome.reason = text;
    outcome.statement = statement;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
    (json_response(status, &body), outcome)
}

/// RabbitMQ's answer to credentials it refuses.
fn login_failed() -> Response<OutBody> {
    let mut r = json_response(StatusCode::UNAUTHORIZED, mgmt::LOGIN_FAILED);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(mgmt::AUTH_REALM),
    );
    r
}

fn json_response(status: StatusCode, body: &str) -> Response<OutBody> {
    let mut r = Response::new(
        Full::new(Bytes::copy_from_slice(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn has_source<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A body that ran out of time.
#[derive(Debug)]
struct Elapsed(&'static str);

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Elapsed {}

/// A body with a deadline for the whole of it and a bound on each pause.
struct Timed<B> {
    inner: B,
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl<B> Timed<B> {
    fn new(inner: B, deadline: Option<Instant>, idle: Option<Duration>) -> Self {
        Timed {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some((d, sleep)) = &mut this.idle {
                sleep.as_mut().reset(Instant::now() + *d);
            }
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if let Some(d) = &mut this.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(Elapsed("request body deadline")))));
        }
        if let Some((_, sleep)) = &mut this.idle
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(Elapsed("body idle timeout")))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;
