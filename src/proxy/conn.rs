//! One client connection: the handshake (under a deadline and a frame-size bound),
//! token verification, the backend connection, then the relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::Shared;
use super::backend::{self, BackendError, LoggedIn, Login};
use super::outcome::{BrokerClose, ConnectionEnd, InternalRefusal};
use super::relay::{self, ExchangeLookup, RelayEnd, SecretVerifier};
use crate::amqp::handshake::{ClientHandshake, ClientProperties, Credentials, Step};
use crate::amqp::method::reply;
use crate::amqp::session::{Limits, SecretRefused, Session, SessionConfig};
use crate::auth::exchange::{BackendMinter, Subject};
use crate::auth::{Identity, jwt_shaped, token_id};
use crate::authz::Denial;
use crate::config::AuthBackend;
use crate::telemetry::audit::AuditEvent;

/// How long a refused client may take to answer our `connection.close`.
const CLOSE_OK_WAIT: Duration = Duration::from_secs(3);

pub(super) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The deadline for a token's `exp`, on the tokio clock.
fn expiry_instant(exp: Option<i64>) -> Option<Instant> {
    exp.map(|e| Instant::now() + Duration::from_secs(e.saturating_sub(now_secs()).max(0) as u64))
}

/// Who the client is, and which backend said so.
enum Authenticated {
    /// A verified token: the gateway authorises every operation.
    Token(Identity),
    /// An internal user the broker accepted, on the backend connection it logged in on.
    Internal { username: String, login: LoggedIn },
}

/// A client connection during its handshake: the socket, the handshake's state machine,
/// the client's address and the gateway's state. What the handshake's steps share.
struct Handshaking<'a, S> {
    stream: &'a mut S,
    hs: &'a mut ClientHandshake,
    peer: SocketAddr,
    shared: &'a Shared,
}

/// Who an established session belongs to.
enum Who {
    Token(Box<Identity>),
    Internal(String),
}

struct Established {
    who: Who,
    vhost: String,
    backend: backend::Backend,
    client_leftover: BytesMut,
    /// The client understands `basic.cancel` from the server.
    cancel_notify: bool,
    /// The identity's connection slot, held for the life of the connection.
    _identity_slot: Option<super::limits::Slot<String>>,
}

/// Serves one connection to the end.
/// `secure`: the client came over TLS (`aws:SecureTransport`).
pub(super) async fn serve<S>(mut stream: S, peer: SocketAddr, shared: Arc<Shared>, secure: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + shared.cfg.listener.handshake_timeout;
    let closed = |end: ConnectionEnd| {
        shared
            .metrics
            .connections_closed
            .with_label_values(&[end.label()])
            .inc()
    };
    // Boxed, here and for the TLS handshake: the task's own allocation is as large as its
    // largest state, and the handshake's (about 5 KiB) would otherwise stay with every
    // connection for its whole life.
    let handshaking = Box::pin(handshake(&mut stream, peer, &shared, secure));
    let est = match tokio::time::timeout_at(deadline, handshaking).await {
        Ok(Ok(est)) => est,
        Ok(Err(cause)) => return closed(cause),
        Err(_) => {
            tracing::info!(%peer, "handshake timed out");
            return closed(ConnectionEnd::HandshakeTimeout);
        }
    };
    let Established {
        who,
        vhost,
        backend,
        client_leftover,
        cancel_notify,
        _identity_slot,
    } = est;
    let identity = match who {
        Who::Token(identity) => *identity,
        Who::Internal(username) => {
            // Boxed: the token relay's state and this one would otherwise add up.
            let end = Box::pin(relay_internal(
                stream,
                backend,
                client_leftover,
                &username,
                &vhost,
                peer,
                &shared,
            ))
            .await;
            return closed(end);
        }
    };
    tracing::info!(
        %peer, user = %identity.username, vhost = %vhost, node = %backend.node,
        jti = identity.jti.as_deref().unwrap_or("-"), token = %identity.token_id,
        "connection opened"
    );
    let on_denial = denial_reporter(&shared, peer, &identity, &vhost);
    let listener = &shared.cfg.listener;
    let session = Session::new(
        SessionConfig {
            username: identity.username.clone(),
            service_user: shared.cfg.backend.username.clone(),
            vhost: vhost.clone(),
            frame_max: backend.tuning.frame_max,
            channel_max: backend.tuning.channel_max,
            limits: Limits {
                consumers_per_channel: listener.consumer_max_per_channel,
                consumers_per_connection: listener.consumer_max_per_connection,
                ..Limits::default()
            },
            seed: rand::random::<u64>(),
            epochs: shared.exchange_epochs.clone(),
            lookups: shared.exchange_types.is_some(),
            cancel_notify,
        },
        identity.permissions,
    );
    #[cfg(feature = "test-switches")]
    let session = {
        let mut session = session;
        if !shared.cfg.testing.gateway_decisions {
            session.leave_decisions_to_broker();
        }
        session
    };
    // The principal's facts: the opening token's until an update-secret replaces them;
    // a reload binds the policies to the current ones.
    let facts = Arc::new(std::sync::Mutex::new(identity.facts.clone()));
    let verifier = secret_verifier(
        shared.clone(),
        identity.username.clone(),
        vhost.clone(),
        peer,
        secure,
        facts.clone(),
    );
    let expiry = expiry_instant(identity.exp);
    let (end, _) = relay::run(
        stream,
        backend.stream,
        client_leftover,
        backend.leftover,
        session,
        expiry,
        relay::Hooks {
            verifier,
            lookup: exchange_lookup(&shared, &vhost),
            forget_kinds_every: shared.cfg.backend.exchange_type_ttl,
            broker_close_timeout: shared.cfg.backend.close_timeout,
            on_denial,
            traffic: Some(relay::Traffic::new(&shared.metrics)),
            shutdown: Some(shutdown_signal(&shared)),
            policies: Some(policy_watch(&shared, facts, peer, secure)),
            busy_poll: shared.cfg.runtime.busy_poll,
        },
    )
    .await;
    closed(ConnectionEnd::from(&end));
    match end {
        RelayEnd::Expired => {
            tracing::info!(%peer, user = %identity.username, "credential expired; connection closed")
        }
        RelayEnd::Error(e) => {
            tracing::info!(%peer, user = %identity.username, error = %e, "connection ended")
        }
        other => {
            tracing::debug!(%peer, user = %identity.username, end = ?other, "connection closed")
        }
    }
}

/// Runs the client handshake. `None` when the connection is over (refused or closed).
async fn handshake<S>(
    stream: &mut S,
    peer: SocketAddr,
    shared: &Shared,
    secure: bool,
) -> Result<Established, ConnectionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = ClientHandshake::new(shared.handshake.clone());
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let mut identity: Option<Authenticated> = None;
    let mut creds_props = None;
    loop {
        let step = hs.receive(&mut input, &mut out);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return Err(ConnectionEnd::ClientClosed);
            }
            out.clear();
        }
        match step {
            Err(e) => {
                tracing::info!(%peer, error = %e, "handshake failed");
                let _ = stream.shutdown().await;
                return Err(ConnectionEnd::HandshakeFailed);
            }
            Ok(Step::Closed) => return Err(ConnectionEnd::ClientClosed),
            Ok(Step::NeedMore) => {
                // The frame check bounds `input` to one pre-auth frame plus one read.
                input.reserve(4096);
                match stream.read_buf(&mut input).await {
                    Ok(0) | Err(_) => return Err(ConnectionEnd::ClientClosed),
                    Ok(_) => {}
                }
            }
            Ok(Step::Authenticate(creds)) => {
                let who = match login(peer, shared, &creds).await {
                    Ok(who) => who,
                    Err(refusal) => {
                        refuse(stream, &mut hs, &creds, shared, refusal.close.as_ref()).await;
                        return Err(ConnectionEnd::Refused);
                    }
                };
                let (username, backend) = match &who {
                    Authenticated::Token(id) => (id.username.as_str(), AuthBackend::OAuth2),
                    Authenticated::Internal { username, .. } => {
                        (username.as_str(), AuthBackend::Internal)
                    }
                };
                // RabbitMQ checks `loopback_users` after the login succeeded, whichever
                // backend accepted it; the refusal is the same as for a wrong password.
                if let Err(r) = shared.sources.check(username, peer.ip()) {
                    tracing::info!(
                        %peer, user = ?username, backend = backend.as_str(), reason = r.reason(),
                        "login refused from this source"
                    );
                    let label = match &who {
                        Authenticated::Token(id) => id.issuer_name.as_str(),
                        Authenticated::Internal { .. } => "internal",
                    };
                    shared
                        .metrics
                        .authentications
                        .with_label_values(&[label, "refused", r.reason()])
                        .inc();
                    shared.audit.record(&AuditEvent {
                        event: "authentication",
                        decision: "deny",
                        reason: r.reason(),
                        client: Some(peer),
                        username: Some(username),
                        method: Some("connection.start-ok"),
                        backend: Some(backend.as_str()),
                        ..Default::default()
                    });
                    drop(who);
                    refuse(stream, &mut hs, &creds, shared, None).await;
                    return Err(ConnectionEnd::Refused);
                }
                hs.accept(&mut out);
                creds_props = Some(creds.client_properties);
                identity = Some(who);
            }
            Ok(Step::Open { vhost }) => {
                let props = creds_props.take().unwrap_or_default();
                return match identity.take().ok_or(ConnectionEnd::HandshakeFailed)? {
                    Authenticated::Token(mut id) => {
                        id.permissions = crate::wiring::bind_policies(
                            std::mem::take(&mut id.permissions),
                            &shared.cfg.authorization,
                            &id.facts,
                            Some(peer.ip()),
                            secure,
                        );
                        let c = Handshaking {
                            stream,
                            hs: &mut hs,
                            peer,
                            shared,
                        };
                        open_vhost(c, id, vhost, props, input).await
                    }
                    Authenticated::Internal { username, login } => {
                        let c = Handshaking {
                            stream,
                            hs: &mut hs,
                            peer,
                            shared,
                        };
                        let opened = open_internal(c, username, login, &vhost).await?;
                        let (username, backend, slot) = opened;
                        Ok(Established {
                            who: Who::Internal(username),
                            vhost,
                            backend,
                            client_leftover: input,
                            cancel_notify: props.capability("consumer_cancel_notify"),
                            _identity_slot: slot,
                        })
                    }
                };
            }
        }
    }
}

/// Why every backend of the chain refused: the last refusal.
struct Refusal {
    /// The broker's close, when the broker refused last (an internal user).
    close: Option<BrokerClose>,
}

/// RabbitMQ's `rabbit_access_control:check_user_login`: each backend of `[auth] backends`
/// in order, the next tried only after a refusal, the first success wins; a JWT-shaped
/// password goes to `oauth2` first whatever the order ([`crate::config::AuthConfig::order_for`]).
/// Every refusal is
/// logged and counted with its backend and reason; the audit record names the last one.
/// A password that is not a valid token goes on to the next backend, whatever its shape,
/// with one exception: a token whose signature a configured issuer's key verified and that
/// a claim rule or a token policy then refused
/// ([`crate::auth::jwt::AuthError::of_a_verified_token`]) ends
/// the chain. Passed on as an internal user's password, it would reach a broker that may
/// run its own OAuth 2.0 plugin, which checks no `nbf`, no `jti_deny` and no token policy.
async fn login(
    peer: SocketAddr,
    shared: &Shared,
    creds: &Credentials,
) -> Result<Authenticated, Refusal> {
    let ip = peer.ip();
    // Only a JWT-shaped password is named (by a hash prefix) in logs: an internal user's
    // password must not be.
    let token = jwt_shaped(&creds.token).then(|| token_id(&creds.token));
    let mut last = (AuthBackend::OAuth2, "no_backend", None);
    for backend in shared.cfg.auth.order_for(token.is_some()) {
        match backend {
            AuthBackend::OAuth2 => {
                let timer = shared.metrics.phase("verify").start_timer();
                let (issuer, verified) = shared
                    .auth
                    .authenticate_named(&creds.token, now_secs(), Some(ip))
                    .await;
                timer.observe_duration();
                match verified {
                    Ok(id) => {
                        tracing::debug!(%peer, user = %id.username, token = %id.token_id, "token accepted");
                        return Ok(Authenticated::Token(id));
                    }
                    Err(e) => {
                        tracing::info!(
                            %peer, backend = "oauth2", reason = e.reason(), error = %e,
                            token = token.as_deref().unwrap_or("-"),
                            mechanism = creds.mechanism.as_str(), "login refused"
                        );
                        shared
                            .metrics
                            .authentications
                            .with_label_values(&[issuer, "refused", e.reason()])
                            .inc();
                        last = (backend, e.reason(), None);
                        if e.of_a_verified_token() {
                            break;
                        }
                    }
                }
            }
            AuthBackend::Internal => {
                let refused = match login_internal(peer, shared, creds).await {
                    Ok(login) => {
                        tracing::debug!(%peer, user = ?creds.username, node = login.node(), "internal user accepted by the broker");
                        return Ok(Authenticated::Internal {
                            username: creds.username.clone(),
                            login,
                        });
                    }
                    Err(refused) => refused,
                };
                let reason = refused.reason();
                // Debug-quoted: the name is the unauthenticated client's, newlines and all.
                tracing::info!(
                    %peer, backend = "internal", user = ?creds.username, reason,
                    mechanism = creds.mechanism.as_str(), "login refused"
                );
                shared
                    .metrics
                    .authentications
                    .with_label_values(&["internal", "refused", reason])
                    .inc();
                last = (backend, reason, refused.into_close());
            }
        }
    }
    let (backend, reason, close) = last;
    shared.audit.record(&AuditEvent {
        event: "authentication",
        decision: "deny",
        reason,
        client: Some(peer),
        username: (backend == AuthBackend::Internal).then_some(creds.username.as_str()),
        token: token.as_deref(),
        method: Some("connection.start-ok"),
        backend: Some(backend.as_str()),
        ..Default::default()
    });
    Err(Refusal { close })
}

/// Logs in to the broker with the client's own credentials, unless that user is in its
/// failed-login back-off from this address. A refusal is its reason and the broker's close.
async fn login_internal(
    peer: SocketAddr,
    shared: &Shared,
    creds: &Credentials,
) -> Result<LoggedIn, InternalRefusal> {
    if shared
        .password_backoff
        .blocked(&creds.username, peer.ip())
        .await
    {
        return Err(InternalRefusal::CachedFailure);
    }
    let name = format!(
        "{} via amqp-iam-gateway from {peer} (internal user)",
        creds.username
    );
    let props = creds
        .client_properties
        .for_backend(&name, &peer.to_string(), false);
    let timer = shared.metrics.phase("backend_login").start_timer();
    let logged_in = backend::login(
        &shared.nodes(),
        Login::Client {
            mechanism: creds.mechanism.as_str(),
            response: &creds.response,
        },
        &props,
    )
    .await;
    timer.observe_duration();
    match logged_in {
        Ok(l) => {
            shared
                .password_backoff
                .succeeded(&creds.username, peer.ip())
                .await;
            Ok(l)
        }
        Err(BackendError::LoginRefused {
            code,
            text,
            class_id,
            method_id,
        }) => {
            shared
                .password_backoff
                .failed(&creds.username, peer.ip())
                .await;
            let close = BrokerClose {
                code,
                text,
                class_id,
                method_id,
            };
            Err(InternalRefusal::Refused(close))
        }
        Err(e) => {
            tracing::warn!(%peer, user = ?creds.username, error = %e, "backend login failed");
            Err(InternalRefusal::BackendUnavailable)
        }
    }
}

/// Opens the vhost on an internal user's backend connection: the broker decides (its
/// `530` or `404` reaches the client as it sent it). Returns the user, the connection and
/// the user's connection slot.
async fn open_internal<S>(
    c: Handshaking<'_, S>,
    username: String,
    login: LoggedIn,
    vhost: &str,
) -> Result<
    (
        String,
        backend::Backend,
        Option<super::limits::Slot<String>>,
    ),
    ConnectionEnd,
>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Handshaking {
        stream,
        hs,
        peer,
        shared,
    } = c;
    let mut out = BytesMut::new();
    let audit = |decision: &str, reason: &str| {
        shared.audit.record(&AuditEvent {
            event: "authentication",
            decision,
            reason,
            client: Some(peer),
            username: Some(&username),
            vhost: Some(vhost),
            method: Some("connection.open"),
            backend: Some(AuthBackend::Internal.as_str()),
            ..Default::default()
        })
    };
    let count = |outcome: &str, reason: &str| {
        shared
            .metrics
            .authentications
            .with_label_values(&["internal", outcome, reason])
            .inc()
    };
    let slot = match shared.limits.admit_identity(&username) {
        Ok(slot) => slot,
        Err(limit) => {
            tracing::info!(%peer, user = %username, %vhost, limit, "identity connection limit reached");
            count("refused", "identity_limit");
            audit("deny", "identity_limit");
            let text = format!(
                "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{username}': connection limit ({limit}) is reached"
            );
            hs.vhost_refused(&mut out, &text);
            let _ = stream.write_all(&out).await;
            wait_close_ok(stream, hs, CLOSE_OK_WAIT).await;
            return Err(ConnectionEnd::IdentityLimit);
        }
    };
    let tuning = hs.tuning().ok_or(ConnectionEnd::HandshakeFailed)?;
    let timer = shared.metrics.phase("backend_connect").start_timer();
    let opened = login
        .open(
            vhost,
            tuning,
            shared.cfg.backend.connect_timeout,
            &shared.metrics,
        )
        .await;
    timer.observe_duration();
    match opened {
        Ok(backend) => {
            hs.opened(&mut out);
            stream
                .write_all(&out)
                .await
                .map_err(|_| ConnectionEnd::ClientClosed)?;
            count("accepted", "ok");
            audit("allow", "ok");
            Ok((username, backend, slot))
        }
        Err(e) => {
            let (code, text, class_id, method_id, cause) = match e {
                BackendError::Refused {
                    code,
                    text,
                    class_id,
                    method_id,
                } => {
                    tracing::info!(%peer, user = %username, %vhost, code, %text, "vhost refused by the broker");
                    count("refused", "vhost");
                    audit("deny", "vhost");
                    (code, text, class_id, method_id, ConnectionEnd::VhostRefused)
                }
                e => {
                    tracing::warn!(%peer, user = %username, %vhost, error = %e, "backend connection failed");
                    (
                        reply::CONNECTION_FORCED,
                        "CONNECTION_FORCED - broker unavailable".to_owned(),
                        10,
                        40,
                        ConnectionEnd::BackendUnavailable,
                    )
                }
            };
            hs.close(&mut out, code, &text, (class_id, method_id));
            let _ = stream.write_all(&out).await;
            wait_close_ok(stream, hs, CLOSE_OK_WAIT).await;
            Err(cause)
        }
    }
}

/// Relays an internal user's session: the broker authorises it, so the session only
/// follows framing and the close handshakes (the gateway's closes still apply: drain, a
/// lost broker).
async fn relay_internal<S>(
    stream: S,
    backend: backend::Backend,
    client_leftover: BytesMut,
    username: &str,
    vhost: &str,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> ConnectionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tracing::info!(%peer, user = %username, %vhost, node = %backend.node, backend = "internal", "connection opened");
    let mut cfg = SessionConfig::new(username, vhost);
    cfg.frame_max = backend.tuning.frame_max;
    cfg.channel_max = backend.tuning.channel_max;
    let session = Session::broker_authorised(cfg);
    let (end, _) = relay::run(
        stream,
        backend.stream,
        client_leftover,
        backend.leftover,
        session,
        None,
        relay::Hooks {
            // The session forwards update-secret to the broker: never called.
            verifier: Box::new(|_| {
                Box::pin(async { Err(SecretRefused("NOT_ALLOWED".to_owned())) })
            }),
            lookup: None,
            forget_kinds_every: shared.cfg.backend.exchange_type_ttl,
            broker_close_timeout: shared.cfg.backend.close_timeout,
            on_denial: Box::new(|_| {}),
            traffic: Some(relay::Traffic::new(&shared.metrics)),
            shutdown: Some(shutdown_signal(shared)),
            policies: None,
            busy_poll: shared.cfg.runtime.busy_poll,
        },
    )
    .await;
    match &end {
        RelayEnd::Error(e) => {
            tracing::info!(%peer, user = %username, error = %e, "connection ended")
        }
        other => {
            tracing::debug!(%peer, user = %username, end = ?other, "connection closed")
        }
    }
    ConnectionEnd::from(&end)
}

/// RabbitMQ's refusal: a `connection.close 403` for clients with
/// `authentication_failure_close` (the broker's own when it refused an internal user's
/// login, else the gateway's, which has the same text), a silent close after a delay for
/// the others.
async fn refuse<S>(
    stream: &mut S,
    hs: &mut ClientHandshake,
    creds: &Credentials,
    shared: &Shared,
    brokers: Option<&BrokerClose>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    let closes = match brokers {
        Some(c) if creds.capability("authentication_failure_close") => {
            hs.close(&mut out, c.code, &c.text, (c.class_id, c.method_id));
            true
        }
        _ => hs.refuse(creds, &mut out),
    };
    if closes {
        if stream.write_all(&out).await.is_ok() {
            wait_close_ok(
                stream,
                hs,
                CLOSE_OK_WAIT.min(shared.cfg.listener.auth_failure_delay),
            )
            .await;
        }
    } else {
        tokio::time::sleep(shared.cfg.listener.auth_failure_delay).await;
    }
    let _ = stream.shutdown().await;
}

/// Waits (bounded) for the client's `close-ok` to our `connection.close`.
async fn wait_close_ok<S>(stream: &mut S, hs: &mut ClientHandshake, wait: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(wait, async {
        let mut input = BytesMut::with_capacity(512);
        let mut out = BytesMut::new();
        loop {
            let step = hs.receive(&mut input, &mut out);
            if !out.is_empty() {
                let _ = stream.write_all(&out).await;
                out.clear();
            }
            if !matches!(step, Ok(Step::NeedMore)) {
                break;
            }
            input.reserve(512);
            match stream.read_buf(&mut input).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn open_vhost<S>(
    c: Handshaking<'_, S>,
    identity: Identity,
    vhost: String,
    client_props: ClientProperties,
    leftover: BytesMut,
) -> Result<Established, ConnectionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Handshaking {
        stream,
        hs,
        peer,
        shared,
    } = c;
    let mut out = BytesMut::new();
    let cancel_notify = client_props.capability("consumer_cancel_notify");
    // Vhost access, then the identity's connection limit: either refusal is answered the
    // same way (`refuse_open`), with its own reason and text.
    let connect = crate::authz::connect(&identity.permissions, &vhost, now_secs());
    let admitted = if connect.is_ok() {
        let who = identity
            .sub
            .clone()
            .unwrap_or_else(|| identity.username.clone());
        shared.limits.admit_identity(&who).map_err(|limit| {
            tracing::info!(%peer, user = %identity.username, %vhost, limit, "identity connection limit reached");
            let text = format!(
                "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}': connection limit ({limit}) is reached",
                identity.username
            );
            ("identity_limit", text, ConnectionEnd::IdentityLimit)
        })
    } else {
        let statement = connect.as_ref().err().cloned().flatten();
        tracing::info!(%peer, user = %identity.username, %vhost, reason = "vhost", statement = statement.as_deref().unwrap_or("-"), "vhost access refused");
        let text = format!(
            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}'",
            identity.username
        );
        Err(("vhost", text, ConnectionEnd::VhostRefused))
    };
    let identity_slot = match admitted {
        Ok(slot) => slot,
        Err((reason, text, end)) => {
            let c = Handshaking {
                stream,
                hs,
                peer,
                shared,
            };
            let statement = connect.err().flatten();
            refuse_open(c, &identity, &vhost, reason, &text, statement.as_deref()).await;
            return Err(end);
        }
    };
    let tuning = hs.tuning().ok_or(ConnectionEnd::HandshakeFailed)?;
    let name = format!(
        "{} via amqp-iam-gateway from {peer} (token {})",
        identity.username, identity.token_id
    );
    let props = client_props.for_backend(&name, &peer.to_string(), true);
    // With backend tokens: the client's own token, exchanged; a minimal one for the login
    // when the full one would not fit RabbitMQ's 4096-byte frames before tuning (before
    // 4.1), the full one then follows in update-secret.
    let tokens = shared
        .minter
        .as_ref()
        .map(|m| backend_tokens(m, &identity, &vhost, props.len()));
    let who = match &tokens {
        None => Login::Service,
        Some(Ok((login, _))) => Login::Token(login),
        Some(Err(e)) => {
            tracing::error!(%peer, user = %identity.username, error = %e, "backend token not minted");
            Login::Service
        }
    };
    let timer = shared.metrics.phase("backend_connect").start_timer();
    let opened = match (who, &tokens) {
        (Login::Service, Some(Err(_))) => Err(BackendError::Protocol(
            "no backend token could be minted".into(),
        )),
        (who, _) => {
            let mut opened = backend::open(&shared.nodes(), who, &vhost, tuning, &props).await;
            if let (Ok(b), Some(Ok((_, Some(full))))) = (&mut opened, &tokens)
                && let Err(e) = b
                    .update_secret(full, shared.cfg.backend.connect_timeout)
                    .await
            {
                opened = Err(e);
            }
            opened
        }
    };
    timer.observe_duration();
    match opened {
        Ok(backend) => {
            hs.opened(&mut out);
            stream
                .write_all(&out)
                .await
                .map_err(|_| ConnectionEnd::ClientClosed)?;
            shared
                .metrics
                .authentications
                .with_label_values(&[&identity.issuer_name, "accepted", "ok"])
                .inc();
            audit_identity(shared, peer, &identity, &vhost, "allow", "ok", None);
            Ok(Established {
                who: Who::Token(Box::new(identity)),
                vhost,
                backend,
                client_leftover: leftover,
                cancel_notify,
                _identity_slot: identity_slot,
            })
        }
        Err(e) => {
            tracing::warn!(%peer, user = %identity.username, %vhost, error = %e, "backend connection failed");
            let (code, text, class_id, method_id) = match e {
                // The broker's refusal is about the gateway's own user: the client sees
                // its own name there.
                BackendError::Refused {
                    code,
                    text,
                    class_id,
                    method_id,
                } => (
                    code,
                    crate::amqp::method::hide_service_user(
                        text.as_bytes(),
                        &shared.cfg.backend.username,
                        &identity.username,
                    )
                    .unwrap_or(text),
                    class_id,
                    method_id,
                ),
                _ => (
                    reply::CONNECTION_FORCED,
                    "CONNECTION_FORCED - broker unavailable".to_owned(),
                    10,
                    40,
                ),
            };
            hs.close(&mut out, code, &text, (class_id, method_id));
            let _ = stream.write_all(&out).await;
            wait_close_ok(stream, hs, CLOSE_OK_WAIT).await;
            Err(ConnectionEnd::BackendUnavailable)
        }
    }
}

/// Refuses `connection.open` to an authenticated client: counts the refusal in
/// `authentications_total` and writes the audit record, both with `reason`, sends
/// `connection.close` with `text` and waits (bounded) for the client's `close-ok`.
async fn refuse_open<S>(
    c: Handshaking<'_, S>,
    identity: &Identity,
    vhost: &str,
    reason: &str,
    text: &str,
    statement: Option<&str>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Handshaking {
        stream,
        hs,
        peer,
        shared,
    } = c;
    shared
        .metrics
        .authentications
        .with_label_values(&[&identity.issuer_name, "refused", reason])
        .inc();
    audit_identity(shared, peer, identity, vhost, "deny", reason, statement);
    let mut out = BytesMut::new();
    hs.vhost_refused(&mut out, text);
    let _ = stream.write_all(&out).await;
    wait_close_ok(stream, hs, CLOSE_OK_WAIT).await;
}

/// What a backend token is minted for.
pub(super) fn subject(id: &Identity) -> Subject<'_> {
    Subject {
        username: &id.username,
        scopes: &id.scopes,
        exp: id.exp,
    }
}

/// RabbitMQ before 4.1 takes frames of at most 4096 bytes until the connection is tuned.
const PRE_TUNE_FRAME_MAX: usize = 4096;

/// The backend tokens for `id`: the one to log in with, and the full one to send in
/// `update-secret` right after when the login token is the minimal one (the full one
/// would not fit a pre-tune frame next to `properties_len` bytes of client properties).
fn backend_tokens(
    m: &BackendMinter,
    id: &Identity,
    vhost: &str,
    properties_len: usize,
) -> Result<(String, Option<String>), jsonwebtoken::errors::Error> {
    let now = now_secs();
    let who = subject(id);
    let full = m.mint(&who, None, now)?;
    // start-ok: frame header and end (8), ids (4), "PLAIN" and "en_US" with their lengths
    // (12), the response's length and its two NULs (6).
    if full.len() + properties_len + 30 <= PRE_TUNE_FRAME_MAX {
        return Ok((full, None));
    }
    let minimal = m.mint(&who, Some(vhost), now)?;
    Ok((minimal, Some(full)))
}

/// An audit record about an authenticated client.
fn audit_identity(
    shared: &Shared,
    peer: SocketAddr,
    id: &Identity,
    vhost: &str,
    decision: &str,
    reason: &str,
    statement: Option<&str>,
) {
    shared.audit.record(&AuditEvent {
        event: "authentication",
        statement,
        decision,
        reason,
        client: Some(peer),
        username: Some(&id.username),
        sub: id.sub.as_deref(),
        jti: id.jti.as_deref(),
        issuer: id.iss.as_deref(),
        token: Some(&id.token_id),
        vhost: Some(vhost),
        method: Some("connection.open"),
        backend: Some(AuthBackend::OAuth2.as_str()),
        ..Default::default()
    });
}

/// Watches the broker policies for this connection: a reload that changes them binds the
/// new ones to the same principal and connection. The policies the connection opened with
/// come from its configuration snapshot; should a reload have changed them since, the
/// watch starts as changed.
fn policy_watch(
    shared: &Shared,
    facts: Arc<std::sync::Mutex<Arc<crate::authz::iam::Facts>>>,
    peer: SocketAddr,
    secure: bool,
) -> relay::PolicyWatch {
    let mut updates = shared.policy_updates.subscribe();
    if **updates.borrow() != shared.cfg.authorization {
        updates.mark_changed();
    }
    relay::PolicyWatch {
        updates,
        rebind: Box::new(move |authorization| {
            let facts = facts.lock().unwrap_or_else(|e| e.into_inner()).clone();
            crate::wiring::bind_policies(
                crate::authz::Permissions::default(),
                authorization,
                &facts,
                Some(peer.ip()),
                secure,
            )
            .policy()
            .map(|b| Arc::new(b.clone()))
        }),
    }
}

/// Verifies update-secret tokens for this connection: fully (signature, claims, `exp`),
/// for the same username, with vhost access re-checked by the session.
fn secret_verifier(
    shared: Arc<Shared>,
    username: String,
    vhost: String,
    peer: SocketAddr,
    secure: bool,
    facts: Arc<std::sync::Mutex<Arc<crate::authz::iam::Facts>>>,
) -> SecretVerifier {
    Box::new(move |token: String| {
        let shared = shared.clone();
        let username = username.clone();
        let vhost = vhost.clone();
        let facts = facts.clone();
        Box::pin(async move {
            let refused = SecretRefused(
                "NOT_ALLOWED - New secret was refused by one of the backends".to_owned(),
            );
            match shared
                .auth
                .authenticate(&token, now_secs(), Some(peer.ip()))
                .await
            {
                Ok(id) if id.username == username => {
                    tracing::info!(%peer, user = %username, %vhost, token = %id.token_id, "secret updated");
                    let backend_secret = match &shared.minter {
                        None => None,
                        Some(m) => match m.mint(&subject(&id), None, now_secs()) {
                            Ok(t) => Some(t),
                            Err(e) => {
                                tracing::error!(%peer, user = %username, error = %e, "backend token not minted");
                                return Err(refused);
                            }
                        },
                    };
                    // The policies in force now, which a reload may have changed, bound to
                    // the new token's principal, which later reloads bind to as well.
                    let authorization = shared.policy_updates.borrow().clone();
                    *facts.lock().unwrap_or_else(|e| e.into_inner()) = id.facts.clone();
                    let permissions = crate::wiring::bind_policies(
                        id.permissions,
                        &authorization,
                        &id.facts,
                        Some(peer.ip()),
                        secure,
                    );
                    Ok((permissions, expiry_instant(id.exp), backend_secret))
                }
                Ok(id) => {
                    tracing::info!(%peer, user = %username, new_user = %id.username, "update-secret refused: username changed");
                    Err(refused)
                }
                Err(e) => {
                    tracing::info!(%peer, user = %username, reason = e.reason(), "update-secret refused");
                    Err(refused)
                }
            }
        })
    })
}

/// Looks exchange types up in the broker for this connection's vhost, when configured,
/// within this connection's budget of management API requests.
fn exchange_lookup(shared: &Arc<Shared>, vhost: &str) -> Option<ExchangeLookup> {
    let types = shared.exchange_types.clone()?;
    let budget = Arc::new(types.budget());
    let vhost = vhost.to_owned();
    Some(Box::new(move |name: String| {
        let types = types.clone();
        let budget = budget.clone();
        let vhost = vhost.clone();
        Box::pin(async move { types.lookup(&vhost, &name, &budget).await })
    }))
}

/// Logs, counts and audits each refused operation (the session decides; this reports).
fn denial_reporter(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    id: &Identity,
    vhost: &str,
) -> relay::DenialReporter {
    let shared = shared.clone();
    let (username, sub, jti, iss, token, vhost) = (
        id.username.clone(),
        id.sub.clone(),
        id.jti.clone(),
        id.iss.clone(),
        id.token_id.clone(),
        vhost.to_owned(),
    );
    Box::new(move |d: &Denial| {
        let method = crate::amqp::method::name((d.class_id, d.method_id));
        let permission = d.permission.map_or("any", |p| p.as_str());
        tracing::info!(
            %peer, user = %username, %vhost, method, code = d.reply_code, text = %d.reply_text,
            statement = d.statement.as_deref().unwrap_or("-"), "operation refused"
        );
        shared
            .metrics
            .denials
            .with_label_values(&[method, permission])
            .inc();
        shared.audit.record(&AuditEvent {
            event: "authorization",
            decision: "deny",
            reason: &d.reply_text,
            client: Some(peer),
            username: Some(&username),
            sub: sub.as_deref(),
            jti: jti.as_deref(),
            issuer: iss.as_deref(),
            token: Some(&token),
            vhost: Some(&vhost),
            method: Some(method),
            resource: Some(&d.resource),
            statement: d.statement.as_deref(),
            backend: Some(AuthBackend::OAuth2.as_str()),
            ..Default::default()
        });
    })
}

/// Completes when the gateway starts closing connections for a shutdown.
fn shutdown_signal(
    shared: &Shared,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let mut rx = shared.drain.clone();
    Box::pin(async move {
        super::wait_state(&mut rx, super::DrainState::Closing).await;
    })
}
