//! One client connection: the handshake (under a deadline and a frame-size bound),
//! token verification, the backend connection, then the relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::Shared;
use super::backend::{self, BackendError};
use super::relay::{self, ExchangeLookup, RelayEnd, SecretVerifier};
use crate::admin::audit::AuditEvent;
use crate::amqp::handshake::{ClientHandshake, ClientProperties, Credentials, Step};
use crate::amqp::method::reply;
use crate::amqp::session::{Limits, Session, SessionConfig};
use crate::auth::{Identity, token_id};
use crate::authz::Denial;

/// How long a refused client may take to answer our `connection.close`.
const CLOSE_OK_WAIT: Duration = Duration::from_secs(3);

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The deadline for a token's `exp`, on the tokio clock.
fn expiry_instant(exp: Option<i64>) -> Option<Instant> {
    exp.map(|e| Instant::now() + Duration::from_secs(e.saturating_sub(now_secs()).max(0) as u64))
}

struct Established {
    identity: Identity,
    vhost: String,
    backend: backend::Backend,
    client_leftover: BytesMut,
    /// The client understands `basic.cancel` from the server.
    cancel_notify: bool,
    /// The identity's connection slot, held for the life of the connection.
    _identity_slot: Option<super::limits::Slot<String>>,
}

/// Serves one connection to the end.
pub(super) async fn serve<S>(mut stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + shared.cfg.listener.handshake_timeout;
    let closed = |cause: &str| {
        shared
            .metrics
            .connections_closed
            .with_label_values(&[cause])
            .inc()
    };
    let est = match tokio::time::timeout_at(deadline, handshake(&mut stream, peer, &shared)).await {
        Ok(Ok(est)) => est,
        Ok(Err(cause)) => return closed(cause),
        Err(_) => {
            tracing::info!(%peer, "handshake timed out");
            return closed("handshake_timeout");
        }
    };
    let Established {
        identity,
        vhost,
        backend,
        client_leftover,
        cancel_notify,
        _identity_slot,
    } = est;
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
    let verifier = secret_verifier(
        shared.clone(),
        identity.username.clone(),
        vhost.clone(),
        peer,
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
            on_denial,
            traffic: Some(relay::Traffic::new(&shared.metrics)),
            shutdown: Some(shutdown_signal(&shared)),
        },
    )
    .await;
    closed(match &end {
        RelayEnd::ClientClosed => "client_closed",
        RelayEnd::BackendClosed => "backend_closed",
        RelayEnd::Expired => "expired",
        RelayEnd::Error(_) => "error",
    });
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
) -> Result<Established, &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = ClientHandshake::new(shared.handshake.clone());
    let mut input = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let mut identity: Option<Identity> = None;
    let mut creds_props = None;
    loop {
        let step = hs.receive(&mut input, &mut out);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return Err("client_closed");
            }
            out.clear();
        }
        match step {
            Err(e) => {
                tracing::info!(%peer, error = %e, "handshake failed");
                let _ = stream.shutdown().await;
                return Err("handshake_failed");
            }
            Ok(Step::Closed) => return Err("client_closed"),
            Ok(Step::NeedMore) => {
                // The frame check bounds `input` to one pre-auth frame plus one read.
                input.reserve(4096);
                match stream.read_buf(&mut input).await {
                    Ok(0) | Err(_) => return Err("client_closed"),
                    Ok(_) => {}
                }
            }
            Ok(Step::Authenticate(creds)) => {
                let timer = shared.metrics.phase("verify").start_timer();
                let (issuer, verified) = shared
                    .auth
                    .authenticate_named(&creds.token, now_secs(), Some(peer.ip()))
                    .await;
                timer.observe_duration();
                match verified {
                    Ok(id) => {
                        tracing::debug!(%peer, user = %id.username, token = %id.token_id, "token accepted");
                        hs.accept(&mut out);
                        creds_props = Some(creds.client_properties);
                        identity = Some(id);
                    }
                    Err(e) => {
                        let token = token_id(&creds.token);
                        tracing::info!(
                            %peer, reason = e.reason(), error = %e, token = %token,
                            mechanism = creds.mechanism.as_str(), "login refused"
                        );
                        shared
                            .metrics
                            .authentications
                            .with_label_values(&[issuer, "refused", e.reason()])
                            .inc();
                        shared.audit.record(&AuditEvent {
                            event: "authentication",
                            decision: "deny",
                            reason: e.reason(),
                            client: Some(peer),
                            token: Some(&token),
                            method: Some("connection.start-ok"),
                            ..Default::default()
                        });
                        refuse(stream, &mut hs, &creds, shared).await;
                        return Err("refused");
                    }
                }
            }
            Ok(Step::Open { vhost }) => {
                let id = identity.take().ok_or("handshake_failed")?;
                let props = creds_props.take().unwrap_or_default();
                return open_vhost(stream, &mut hs, peer, shared, id, vhost, props, input).await;
            }
        }
    }
}

/// RabbitMQ's refusal: a `connection.close 403` for clients with
/// `authentication_failure_close`, a silent close after a delay for the others.
async fn refuse<S>(stream: &mut S, hs: &mut ClientHandshake, creds: &Credentials, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    if hs.refuse(creds, &mut out) {
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

#[allow(clippy::too_many_arguments)]
async fn open_vhost<S>(
    stream: &mut S,
    hs: &mut ClientHandshake,
    peer: SocketAddr,
    shared: &Shared,
    identity: Identity,
    vhost: String,
    client_props: ClientProperties,
    leftover: BytesMut,
) -> Result<Established, &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    let cancel_notify = client_props.capability("consumer_cancel_notify");
    if !identity.permissions.vhost_access(&vhost) {
        tracing::info!(%peer, user = %identity.username, %vhost, reason = "vhost", "vhost access refused");
        let text = format!(
            "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}'",
            identity.username
        );
        refuse_open(stream, hs, peer, shared, &identity, &vhost, "vhost", &text).await;
        return Err("vhost_refused");
    }
    let who = identity
        .sub
        .clone()
        .unwrap_or_else(|| identity.username.clone());
    let identity_slot = match shared.limits.admit_identity(&who) {
        Ok(slot) => slot,
        Err(limit) => {
            tracing::info!(%peer, user = %identity.username, %vhost, limit, "identity connection limit reached");
            let text = format!(
                "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}': connection limit ({limit}) is reached",
                identity.username
            );
            refuse_open(
                stream,
                hs,
                peer,
                shared,
                &identity,
                &vhost,
                "identity_limit",
                &text,
            )
            .await;
            return Err("identity_limit");
        }
    };
    let tuning = hs.tuning().ok_or("handshake_failed")?;
    let name = format!(
        "{} via amqp-iam-gateway from {peer} (token {})",
        identity.username, identity.token_id
    );
    let props = client_props.for_backend(&name, &peer.to_string());
    let timer = shared.metrics.phase("backend_connect").start_timer();
    let opened = backend::open(
        &shared.cfg.backend,
        shared.backend_tls.as_ref(),
        &shared.balancer,
        &vhost,
        tuning,
        &props,
        &shared.metrics,
    )
    .await;
    timer.observe_duration();
    match opened {
        Ok(backend) => {
            hs.opened(&mut out);
            stream.write_all(&out).await.map_err(|_| "client_closed")?;
            shared
                .metrics
                .authentications
                .with_label_values(&[&identity.issuer_name, "accepted", "ok"])
                .inc();
            audit_identity(shared, peer, &identity, &vhost, "allow", "ok");
            Ok(Established {
                identity,
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
            Err("backend_unavailable")
        }
    }
}

/// Refuses `connection.open` to an authenticated client: counts the refusal in
/// `authentications_total` and writes the audit record, both with `reason`, sends
/// `connection.close` with `text` and waits (bounded) for the client's `close-ok`.
#[allow(clippy::too_many_arguments)]
async fn refuse_open<S>(
    stream: &mut S,
    hs: &mut ClientHandshake,
    peer: SocketAddr,
    shared: &Shared,
    identity: &Identity,
    vhost: &str,
    reason: &str,
    text: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    shared
        .metrics
        .authentications
        .with_label_values(&[&identity.issuer_name, "refused", reason])
        .inc();
    audit_identity(shared, peer, identity, vhost, "deny", reason);
    let mut out = BytesMut::new();
    hs.vhost_refused(&mut out, text);
    let _ = stream.write_all(&out).await;
    wait_close_ok(stream, hs, CLOSE_OK_WAIT).await;
}

/// An audit record about an authenticated client.
fn audit_identity(
    shared: &Shared,
    peer: SocketAddr,
    id: &Identity,
    vhost: &str,
    decision: &str,
    reason: &str,
) {
    shared.audit.record(&AuditEvent {
        event: "authentication",
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
        ..Default::default()
    });
}

/// Verifies update-secret tokens for this connection: fully (signature, claims, `exp`),
/// for the same username, with vhost access re-checked by the session.
fn secret_verifier(
    shared: Arc<Shared>,
    username: String,
    vhost: String,
    peer: SocketAddr,
) -> SecretVerifier {
    Box::new(move |token: String| {
        let shared = shared.clone();
        let username = username.clone();
        let vhost = vhost.clone();
        Box::pin(async move {
            let refused = "NOT_ALLOWED - New secret was refused by one of the backends".to_owned();
            match shared
                .auth
                .authenticate(&token, now_secs(), Some(peer.ip()))
                .await
            {
                Ok(id) if id.username == username => {
                    tracing::info!(%peer, user = %username, %vhost, token = %id.token_id, "secret updated");
                    Ok((id.permissions, expiry_instant(id.exp)))
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
            "operation refused"
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
