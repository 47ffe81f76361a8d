//! The relay: moves bytes between the client and its backend connection.
//!
//! One task per connection polls both sockets in a single future (as
//! `tokio::io::copy_bidirectional` does), so the session state needs no lock and no
//! frame is copied between tasks. Bytes read are handed to [`Session`], which returns
//! the spans to forward as `Bytes` cut from the read buffer (no copy); they are written
//! with vectored writes, so one read usually becomes one write. Each direction's queued
//! output is bounded: when the peer stops reading, the gateway stops reading from the
//! other side (back pressure instead of buffering).
//!
//! **Invariant:** no policy here. What to forward is the session's decision; whether a
//! refreshed token is acceptable is the authenticator's.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::amqp::session::{ClientEvent, Outbox, SecretRefused, Session, SessionError};
use prometheus::IntCounter;

use crate::authz::iam::Binding;
use crate::authz::{Denial, ExchangeKind, Permissions};
use crate::telemetry::metrics::Metrics;

/// Stop reading a side while this much is queued for its peer (by [`Outbox::weight`]).
pub const HIGH_WATER: usize = 256 * 1024;
/// Read buffer growth step.
pub const READ_CHUNK: usize = 64 * 1024;
/// Most chunks handed to one vectored write. The outbox joins adjacent chunks, so a read
/// forwarded whole is one chunk; more appear only around frames the gateway drops or writes.
const MAX_IOVECS: usize = 64;
/// How long a closing client gets to take its final `connection.close` before the socket
/// is closed anyway (a client that stops reading must not keep the task alive).
pub const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A refreshed token's outcome: new permissions, expiry and (with backend tokens) the
/// broker's new token, or the close text.
pub type SecretOutcome = Result<(Permissions, Option<Instant>, Option<String>), SecretRefused>;
/// Verifies an update-secret token.
pub type SecretVerifier =
    Box<dyn Fn(String) -> Pin<Box<dyn Future<Output = SecretOutcome> + Send>> + Send + Sync>;
/// Looks an exchange's type up in the broker.
pub type ExchangeLookup =
    Box<dyn Fn(String) -> Pin<Box<dyn Future<Output = Option<ExchangeKind>> + Send>> + Send + Sync>;

type PendingLookup = Pin<Box<dyn Future<Output = Option<ExchangeKind>> + Send>>;

/// Reports a refused operation (log, metrics, audit).
pub type DenialReporter = Box<dyn Fn(&Denial) + Send + Sync>;

/// What the relay calls out to, outside the session.
pub struct Hooks {
    pub verifier: SecretVerifier,
    pub lookup: Option<ExchangeLookup>,
    /// How often learnt exchange types are forgotten (their time to live), when `lookup`
    /// is set.
    pub forget_kinds_every: std::time::Duration,
    /// How long the broker may leave a `channel.close` of the gateway's unanswered (while
    /// it is not blocked by an alarm) before the connection ends with `541`
    /// (`backend.close_timeout_ms`; see `Session::awaits_broker_close`).
    pub broker_close_timeout: std::time::Duration,
    pub on_denial: DenialReporter,
    pub traffic: Option<Traffic>,
    /// Completes when the gateway shuts down: the client is sent `320` and the relay ends.
    pub shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The broker policies in force, and how this connection binds them to its principal:
    /// when a reload changes them, the session is given the new binding.
    pub policies: Option<PolicyWatch>,
    /// Bounded busy polling (`runtime.busy_poll_us`): for this long after the last bytes
    /// moved, the task asks to be polled again instead of sleeping until woken. Zero: off.
    pub busy_poll: std::time::Duration,
}

/// Binds a configuration's broker policies to the connection's principal.
pub type Rebind =
    Box<dyn Fn(&crate::config::AuthorizationConfig) -> Option<Arc<Binding>> + Send + Sync>;

/// What [`Hooks::policies`] watches.
pub struct PolicyWatch {
    pub updates: watch::Receiver<Arc<crate::config::AuthorizationConfig>>,
    pub rebind: Rebind,
}

type PolicyChange = Pin<
    Box<
        dyn Future<
                Output = (
                    bool,
                    watch::Receiver<Arc<crate::config::AuthorizationConfig>>,
                ),
            > + Send,
    >,
>;

/// Waits for the next change; `false` when the sender is gone (no more changes).
fn next_change(mut rx: watch::Receiver<Arc<crate::config::AuthorizationConfig>>) -> PolicyChange {
    Box::pin(async move {
        let ok = rx.changed().await.is_ok();
        (ok, rx)
    })
}

/// Byte and frame counters of both directions, resolved once per connection so the relay
/// touches only atomics, once per read.
pub struct Traffic {
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    frames_in: IntCounter,
    frames_out: IntCounter,
}

impl Traffic {
    pub fn new(m: &Metrics) -> Traffic {
        Traffic {
            bytes_in: m.relayed_bytes.with_label_values(&["client_to_broker"]),
            bytes_out: m.relayed_bytes.with_label_values(&["broker_to_client"]),
            frames_in: m.relayed_frames.with_label_values(&["client_to_broker"]),
            frames_out: m.relayed_frames.with_label_values(&["broker_to_client"]),
        }
    }
}

/// How the relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    ClientClosed,
    BackendClosed,
    Expired,
    Error(RelayError),
}

/// Why a relay ended in error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client read: {0}")]
    ClientRead(io::Error),
    #[error("client write: {0}")]
    ClientWrite(io::Error),
    /// A protocol violation the session answered with a connection close.
    #[error(transparent)]
    Session(SessionError),
}

/// Relays until either side closes. `c_in` / `b_in` hold bytes already read.
///
/// Not an `async fn`: the relay's state is built before the future and moved into it once.
/// An `async fn` would keep its arguments as well as the state built from them for the
/// life of the connection, twice the memory per idle connection.
pub fn run<C, B>(
    client: C,
    backend: B,
    c_in: BytesMut,
    b_in: BytesMut,
    session: Session,
    expiry: Option<Instant>,
    hooks: Hooks,
) -> impl Future<Output = (RelayEnd, Session)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut r = Relay {
        client: Side::new(client, c_in),
        backend: Side::new(backend, b_in),
        session,
        expiry: expiry.map(|at| Box::pin(tokio::time::sleep_until(at))),
        expired: false,
        fail: None,
        close_deadline: None,
        broker_close_wait: None,
        secret: None,
        lookup: None,
        forget: hooks.lookup.as_ref().map(|_| {
            let every = hooks.forget_kinds_every;
            tokio::time::interval_at(Instant::now() + every, every)
        }),
        policy_change: None,
        last_progress: None,
        hooks,
    };
    if let Some(w) = r.hooks.policies.take() {
        r.policy_change = Some((next_change(w.updates), w.rebind));
    }
    let mut r = Some(r);
    std::future::poll_fn(move |cx| {
        let relay = r.as_mut().expect("a relay is not polled after it ended");
        let end = std::task::ready!(relay.poll(cx));
        let relay = r.take().expect("taken once");
        Poll::Ready((end, relay.session))
    })
}

struct Side<S> {
    io: S,
    input: BytesMut,
    out: Outbox,
    eof: bool,
    needs_flush: bool,
    /// A write failed: the socket is gone, and whatever is queued for it is dropped.
    broken: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Side<S> {
    fn new(io: S, input: BytesMut) -> Self {
        Side {
            io,
            input,
            out: Outbox::default(),
            eof: false,
            needs_flush: false,
            broken: false,
        }
    }

    /// Reads once if possible. Ready(true) when bytes (or EOF) arrived.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.input.capacity() - self.input.len() < READ_CHUNK / 4 {
            self.input.reserve(READ_CHUNK);
        }
        let Poll::Ready(read) =
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.input)
        else {
            // Nothing to read: hold no read buffer while waiting, so an idle connection
            // costs a few KiB instead of two read chunks. A busy side pays one allocation
            // per wait, not per frame.
            if self.input.is_empty() {
                self.input = BytesMut::new();
            }
            return Poll::Pending;
        };
        match read {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            // Many clients close TCP without a TLS close_notify: that is a close, not an error.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.eof = true,
            Err(e) => return Poll::Ready(Err(e)),
        }
        Poll::Ready(Ok(true))
    }

    /// Writes queued output until done or the socket would block. Ready(true) if any
    /// progress was made.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.broken {
            self.out.consume(self.out.len());
            return Poll::Pending;
        }
        let mut progressed = false;
        while !self.out.is_empty() {
            // On the stack: no allocation per write.
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (slot, chunk) in slices.iter_mut().zip(self.out.chunks()) {
                *slot = IoSlice::new(chunk);
                n += 1;
            }
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out.consume(n);
                    self.needs_flush = true;
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.needs_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if progressed {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }
}

struct Relay<C, B> {
    client: Side<C>,
    backend: Side<B>,
    session: Session,
    expiry: Option<Pin<Box<Sleep>>>,
    expired: bool,
    /// A fatal session error: the close frame is queued, the relay ends once it is sent.
    fail: Option<RelayError>,
    close_deadline: Option<Pin<Box<Sleep>>>,
    /// Runs while the broker owes the gateway a `close-ok` (see
    /// [`Hooks::broker_close_timeout`]).
    broker_close_wait: Option<Pin<Box<Sleep>>>,
    secret: Option<Pin<Box<dyn Future<Output = SecretOutcome> + Send>>>,
    lookup: Option<(String, PendingLookup)>,
    /// Ticks every `forget_kinds_every` to make the session forget learnt exchange types.
    forget: Option<tokio::time::Interval>,
    /// The next change of the broker policies, and the binder.
    policy_change: Option<(PolicyChange, Rebind)>,
    /// When bytes last moved, with busy polling on.
    last_progress: Option<std::time::Instant>,
    hooks: Hooks,
}

impl<C, B> Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let mut moved = false;
        loop {
            let mut progress = false;
            if let Some(s) = &mut self.hooks.shutdown
                && s.as_mut().poll(cx).is_ready()
            {
                self.hooks.shutdown = None;
                // RabbitMQ's own text when a node shuts down.
                let text =
                    "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'";
                self.session
                    .force_close(text, &mut self.client.out, &mut self.backend.out);
                progress = true;
            }
            if let Some(t) = &mut self.expiry
                && t.as_mut().poll(cx).is_ready()
            {
                self.expiry = None;
                self.expired = true;
                self.session
                    .expire(&mut self.client.out, &mut self.backend.out);
                progress = true;
            }
            if let Some((f, _)) = &mut self.policy_change
                && let Poll::Ready((alive, mut rx)) = f.as_mut().poll(cx)
            {
                let (_, rebind) = self.policy_change.take().expect("polled above");
                if alive {
                    let binding = rebind(&rx.borrow_and_update());
                    self.session.set_clock(super::conn::now_secs());
                    self.session.policies_changed(
                        binding,
                        &mut self.client.out,
                        &mut self.backend.out,
                    );
                    self.policy_change = Some((next_change(rx), rebind));
                    progress = true;
                }
            }
            if let Some(f) = &mut self.secret
                && let Poll::Ready(outcome) = f.as_mut().poll(cx)
            {
                self.secret = None;
                let mut backend_secret = None;
                let outcome = outcome.map(|(perms, exp, secret)| {
                    self.expiry = exp.map(|at| Box::pin(tokio::time::sleep_until(at)));
                    backend_secret = secret;
                    perms
                });
                self.session.set_clock(super::conn::now_secs());
                self.session.secret_updated_with(
                    outcome,
                    backend_secret,
                    &mut self.client.out,
                    &mut self.backend.out,
                );
                progress = true;
            }
            if let Some((_, f)) = &mut self.lookup
                && let Poll::Ready(kind) = f.as_mut().poll(cx)
            {
                if let Some((name, _)) = self.lookup.take() {
                    self.session.exchange_kind_learned(name, kind);
                }
                progress = true;
            }
            if let Some(t) = &mut self.forget
                && t.poll_tick(cx).is_ready()
            {
                self.session.forget_looked_up_kinds();
            }
            match self.pump_client(cx) {
                Ok(p) => progress |= p,
                Err(end) => return Poll::Ready(end),
            }
            match self.pump_backend(cx) {
                Ok(p) => progress |= p,
                Err(end) => return Poll::Ready(end),
            }
            match self.backend.poll_write(cx) {
                Poll::Ready(Ok(p)) => progress |= p,
                Poll::Ready(Err(e)) => {
                    // As for a failed read: a broker that reset the connection may have sent
                    // its connection.close first (RabbitMQ's 320 on shutdown), and the client
                    // gets that or the gateway's 320, not a bare disconnect.
                    tracing::warn!(error = %e, "backend connection failed (write)");
                    self.backend.broken = true;
                    self.backend.eof = true;
                    // Before `finished` looks: the gateway now answers for the broker and
                    // waits for the client to take the close, rather than closing the
                    // socket under a client that is still sending (a reset would lose it).
                    self.session.backend_lost(&mut self.client.out);
                    progress = true;
                }
                Poll::Pending => {}
            }
            match self.client.poll_write(cx) {
                Poll::Ready(Ok(p)) => progress |= p,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(RelayEnd::Error(RelayError::ClientWrite(e)));
                }
                Poll::Pending => {}
            }
            progress |= self.bound_broker_close_wait(cx);
            if let Some(t) = &self.hooks.traffic {
                let (c, b) = self.session.take_frame_counts();
                t.frames_in.inc_by(c);
                t.frames_out.inc_by(b);
            }
            if let Some(end) = self.finished(cx) {
                return Poll::Ready(end);
            }
            if !progress {
                self.busy_poll(moved, cx);
                return Poll::Pending;
            }
            moved = true;
        }
    }

    /// Bounded busy polling: within `busy_poll` of the last progress, the task wakes itself
    /// and is polled again after the runtime's other tasks (the runtime checks the sockets
    /// without sleeping every few dozen polls), rather than waiting to be woken.
    /// `moved`: this poll made progress (the clock is read once per poll, and only then).
    fn busy_poll(&mut self, moved: bool, cx: &mut Context<'_>) {
        if self.hooks.busy_poll.is_zero() {
            return;
        }
        if moved {
            self.last_progress = Some(std::time::Instant::now());
        }
        if let Some(at) = self.last_progress {
            if at.elapsed() < self.hooks.busy_poll {
                cx.waker().wake_by_ref();
            } else {
                self.last_progress = None;
            }
        }
    }

    fn pump_client(&mut self, cx: &mut Context<'_>) -> Result<bool, RelayEnd> {
        let mut progress = false;
        if !self.client.eof
            && self.backend.out.weight() < HIGH_WATER
            && !self.session.client_paused()
        {
            match self.client.poll_read(cx) {
                Poll::Ready(Ok(p)) => progress = p,
                Poll::Ready(Err(e)) => return Err(RelayEnd::Error(RelayError::ClientRead(e))),
                Poll::Pending => {}
            }
        }
        if !self.client.input.is_empty() && !self.session.client_paused() {
            let before = self.client.input.len();
            // Policy conditions on the time read the clock the session is given.
            if self.session.wants_clock() {
                self.session.set_clock(super::conn::now_secs());
            }
            match self.session.on_client_input(
                &mut self.client.input,
                &mut self.backend.out,
                &mut self.client.out,
            ) {
                Ok(ClientEvent::None) => {}
                // A new future must be polled before this task sleeps, or nothing wakes it:
                // the event may come from input read earlier (resumed after a pause) with
                // no byte consumed now, so it counts as progress itself.
                Ok(ClientEvent::UpdateSecret(token)) => {
                    self.secret = Some((self.hooks.verifier)(token));
                    progress = true;
                }
                Ok(ClientEvent::LookupExchange(name)) => {
                    match &self.hooks.lookup {
                        Some(lookup) => self.lookup = Some((name.clone(), lookup(name))),
                        None => self.session.exchange_kind_learned(name, None),
                    }
                    progress = true;
                }
                Err(e) => {
                    self.fatal(e);
                    return Ok(true);
                }
            }
            for d in self.session.take_denials() {
                (self.hooks.on_denial)(&d);
            }
            progress |= self.client.input.len() != before;
            if let Some(t) = &self.hooks.traffic {
                t.bytes_in
                    .inc_by(before.saturating_sub(self.client.input.len()) as u64);
            }
        }
        Ok(progress)
    }

    fn pump_backend(&mut self, cx: &mut Context<'_>) -> Result<bool, RelayEnd> {
        let mut progress = false;
        if self.fail.is_some() {
            return Ok(false);
        }
        if !self.backend.eof && self.client.out.weight() < HIGH_WATER {
            match self.backend.poll_read(cx) {
                Poll::Ready(Ok(p)) => progress = p,
                Poll::Ready(Err(e)) => {
                    // A lost broker is reported to the client (320), not dropped on it.
                    tracing::warn!(error = %e, "backend connection failed");
                    self.backend.eof = true;
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        if !self.backend.input.is_empty() {
            let before = self.backend.input.len();
            if let Err(e) = self
                .session
                .on_backend_input(&mut self.backend.input, &mut self.client.out)
            {
                self.fatal(e);
                return Ok(true);
            }
            self.session.take_backend_output(&mut self.backend.out);
            progress |= self.backend.input.len() != before;
            if let Some(t) = &self.hooks.traffic {
                t.bytes_out
                    .inc_by(before.saturating_sub(self.backend.input.len()) as u64);
            }
        }
        if self.backend.eof && self.session.backend_lost(&mut self.client.out) {
            progress = true;
        }
        Ok(progress)
    }

    /// Times the broker's answer to the gateway's own `channel.close`s; when it is overdue,
    /// the session tells the client and closes both sides. Returns whether it did.
    fn bound_broker_close_wait(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.session.awaits_broker_close() {
            self.broker_close_wait = None;
            return false;
        }
        let timeout = self.hooks.broker_close_timeout;
        let wait = self
            .broker_close_wait
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if wait.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.broker_close_wait = None;
        tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            "the broker did not answer the gateway's channel.close: closing the connection"
        );
        let ms = timeout.as_millis();
        let waited = if ms.is_multiple_of(1000) {
            format!("{} s", ms / 1000)
        } else {
            format!("{ms} ms")
        };
        self.session
            .broker_silent(&waited, &mut self.client.out, &mut self.backend.out);
        true
    }

    /// Ends the relay after a protocol violation, once the close frame the session
    /// queued for the client is sent.
    fn fatal(&mut self, e: SessionError) {
        self.fail = Some(RelayError::Session(e));
    }

    /// Whether the relay is over: a side closed and what was owed to the client is sent
    /// (or the client had [`CLOSE_FLUSH_TIMEOUT`] to take it).
    fn finished(&mut self, cx: &mut Context<'_>) -> Option<RelayEnd> {
        if self.client.eof {
            return Some(if self.expired {
                RelayEnd::Expired
            } else {
                RelayEnd::ClientClosed
            });
        }
        if !self.backend.eof && self.fail.is_none() {
            return None;
        }
        let deadline = self
            .close_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_FLUSH_TIMEOUT)));
        let flushed = self.client.out.is_empty() && !self.client.needs_flush;
        // After its own connection.close the gateway waits for the client's close-ok, as a
        // broker does, so the client reads the reason rather than a reset.
        let (closed_by_gateway, acknowledged) = self.session.gateway_closed();
        let done = flushed && (self.fail.is_some() || !closed_by_gateway || acknowledged);
        if !done && deadline.as_mut().poll(cx).is_pending() {
            return None;
        }
        // Send TLS close_notify; a shutdown error changes nothing now.
        let _ = Pin::new(&mut self.client.io).poll_shutdown(cx);
        Some(match self.fail.take() {
            Some(e) => RelayEnd::Error(e),
            None if self.expired => RelayEnd::Expired,
            None => RelayEnd::BackendClosed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::method;
    use crate::authz::Permissions;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};

    /// Hooks that call out to nothing, and a session with `scopes`.
    fn hooks_and_session(scopes: &[&str]) -> (Hooks, Session) {
        let hooks = Hooks {
            verifier: Box::new(|_| Box::pin(async { Err(SecretRefused("unused".to_owned())) })),
            lookup: None,
            forget_kinds_every: std::time::Duration::from_secs(3600),
            broker_close_timeout: BROKER_CLOSE_TIMEOUT,
            on_denial: Box::new(|_| {}),
            traffic: None,
            shutdown: None,
            policies: None,
            busy_poll: std::time::Duration::ZERO,
        };
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let session = Session::new(
            crate::amqp::session::SessionConfig {
                username: "u".into(),
                service_user: "svc".into(),
                vhost: "/".into(),
                frame_max: 131_072,
                channel_max: 2047,
                limits: Default::default(),
                seed: 0,
                epochs: crate::amqp::session::ExchangeEpochs::new(),
                lookups: false,
                cancel_notify: false,
            },
            Permissions::from_scopes(&scopes),
        );
        (hooks, session)
    }

    /// A relay between two in-memory streams, nothing read on either side yet.
    fn relay_between(
        client: tokio::io::DuplexStream,
        backend: tokio::io::DuplexStream,
        (hooks, session): (Hooks, Session),
    ) -> impl Future<Output = (RelayEnd, Session)> {
        run(
            client,
            backend,
            BytesMut::new(),
            BytesMut::new(),
            session,
            None,
            hooks,
        )
    }

    /// Idle memory: the relay's future holds its state once. An `async fn` would also
    /// keep the streams, session and hooks it was given, about twice the size.
    #[tokio::test]
    async fn the_relay_future_holds_its_state_once() {
        let (client, _c) = tokio::io::duplex(64);
        let (backend, _b) = tokio::io::duplex(64);
        let relay = relay_between(client, backend, hooks_and_session(&[]));
        let state = std::mem::size_of::<Relay<tokio::io::DuplexStream, tokio::io::DuplexStream>>();
        let future = std::mem::size_of_val(&relay);
        assert!(
            future <= state + 64,
            "the relay future is {future} bytes for {state} bytes of state"
        );
    }

    /// Busy polling is bounded: while bytes move the task polls itself again, and once
    /// they stop for longer than `busy_poll` it sleeps until woken.
    #[tokio::test]
    async fn busy_polling_stops_after_its_bound() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut app) = tokio::io::duplex(1024);
        let (backend, mut broker) = tokio::io::duplex(1024);
        let (mut hooks, session) = hooks_and_session(&[]);
        hooks.busy_poll = std::time::Duration::from_millis(20);
        let mut relay = Box::pin(relay_between(client, backend, (hooks, session)));
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let task = tokio::spawn(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            relay.as_mut().poll(cx).map(|_| ())
        }));
        let heartbeat = [8u8, 0, 0, 0, 0, 0, 0, 0xCE];
        app.write_all(&heartbeat).await.unwrap();
        let mut got = [0u8; 8];
        broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, heartbeat);
        // Within the bound the task keeps polling itself; past it, it sleeps.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let spinning = polls.load(Ordering::Relaxed);
        assert!(spinning > 10, "{spinning} polls while busy polling");
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        let settled = polls.load(Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(
            polls.load(Ordering::Relaxed),
            settled,
            "still polling after the bound"
        );
        // And it still relays once woken.
        app.write_all(&heartbeat).await.unwrap();
        broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, heartbeat);
        task.abort();
    }

    /// The broker-close bound the tests run with.
    const BROKER_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

    /// A broker that has sent `data` (its connection.close) and reset the connection: reads
    /// yield `data`, then ECONNRESET; every write fails with ECONNRESET.
    struct ResetBackend(Option<Vec<u8>>);

    impl AsyncRead for ResetBackend {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.0.take() {
                Some(d) => {
                    buf.put_slice(&d);
                    Poll::Ready(Ok(()))
                }
                None => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    impl AsyncWrite for ResetBackend {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Regression: a failed write to the backend ended the relay at once, so a publishing
    /// client lost the broker's `320` (read in the same turn) and saw a bare disconnect;
    /// and then, the client's socket was closed as soon as the 320 was written, under a
    /// client still publishing, whose kernel dropped the unread 320 on the reset (found by
    /// tests/python/test_faults.py, broker stopped under load).
    #[tokio::test]
    async fn a_backend_write_error_still_delivers_the_brokers_close() {
        let text = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'";
        let mut close = BytesMut::new();
        method::connection_close(&mut close, 320, text, 0, 0);
        let (client, mut peer) = tokio::io::duplex(64 * 1024);
        // A heartbeat from the client is queued for the broker when its write fails.
        let heartbeat = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        let (hooks, session) = hooks_and_session(&[]);
        let relay = tokio::spawn(run(
            client,
            ResetBackend(Some(close.to_vec())),
            heartbeat,
            BytesMut::new(),
            session,
            None,
            hooks,
        ));
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(text.len()).any(|w| w == text.as_bytes()) {
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), peer.read(&mut buf))
                .await
                .expect("the client gets the broker's 320")
                .unwrap();
            assert!(n > 0, "closed without the broker's 320: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !relay.is_finished(),
            "the socket stays open until the client has taken the close"
        );
        drop(peer); // the client closes
        let (end, _) = relay.await.unwrap();
        assert!(matches!(end, RelayEnd::ClientClosed), "{end:?}");
    }

    /// The broker's channel crashed while a refusal's close was on its way (RabbitMQ
    /// 3.10.8, found by the session fuzzer): the close is never answered. After
    /// `broker_close_timeout` the client gets its refusal and a `541`, instead of
    /// waiting for ever.
    #[tokio::test(start_paused = true)]
    async fn a_close_the_broker_never_answers_ends_the_connection_after_the_timeout() {
        use amq_protocol::protocol::{AMQPClass, channel, queue};
        let (client, mut peer) = tokio::io::duplex(64 * 1024);
        let (backend, mut broker) = tokio::io::duplex(64 * 1024);
        let (hooks, session) = hooks_and_session(&["rabbitmq.read:*/*"]);
        let relay = tokio::spawn(run(
            client,
            backend,
            BytesMut::new(),
            BytesMut::new(),
            session,
            None,
            hooks,
        ));
        let mut b = BytesMut::new();
        method::encode(
            &mut b,
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        );
        peer.write_all(&b).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = broker.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &b[..], "the open goes to the broker");
        let mut ok = BytesMut::new();
        method::encode(
            &mut ok,
            1,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
        broker.write_all(&ok).await.unwrap();
        let n = peer.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &ok[..]);
        let mut declare = BytesMut::new();
        method::encode(
            &mut declare,
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "forbidden".into(),
                ..Default::default()
            })),
        );
        let started = Instant::now();
        peer.write_all(&declare).await.unwrap();
        let n = broker.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].windows(14).any(|w| w == b"access refusal"),
            "the gateway's close goes to the broker"
        );
        // The broker says nothing more. The client hears of its refusal, then of the end.
        let mut got = Vec::new();
        let heard = tokio::time::timeout(4 * BROKER_CLOSE_TIMEOUT, async {
            while !got.windows(14).any(|w| w == b"INTERNAL_ERROR") {
                let n = peer.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed without a word: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(heard.is_ok(), "the client waits for ever: {got:?}");
        assert!(started.elapsed() >= BROKER_CLOSE_TIMEOUT);
        let refusal = got
            .windows(14)
            .position(|w| w == b"ACCESS_REFUSED")
            .expect("the refusal reaches the client");
        let end = got
            .windows(14)
            .position(|w| w == b"INTERNAL_ERROR")
            .unwrap();
        assert!(refusal < end, "the refusal comes first");
        let n = broker.read(&mut buf).await.unwrap();
        assert!(n > 0, "the broker gets a connection.close");
        drop(peer);
        let (end, _) = relay.await.unwrap();
        assert!(matches!(end, RelayEnd::ClientClosed), "{end:?}");
    }
}
