//! Sockets: listeners, TLS, the per-connection task, the relay.
//!
//! - [`Gateway`]: built from a validated config; binds the listeners and serves.
//! - `conn`: one connection from accept to close: TLS, the client handshake, token
//!   verification, the backend connection, then the relay.
//! - [`backend`]: opening the backend connection.
//! - [`relay`]: the byte pump.
//!
//! **Invariant:** no policy decisions here: tokens are judged by `auth`, operations by
//! `authz`, and what is forwarded by `amqp::session`. **Invariant:** every wait before
//! authentication has a deadline, and every pre-auth buffer a size bound.

pub mod backend;
pub mod balancer;
mod conn;
mod control;
pub mod errors;
pub mod exchange_types;
pub mod health;
pub mod limits;
mod management;
pub mod outcome;
pub mod proxy_protocol;
pub mod readahead;
pub mod relay;
pub mod token_probe;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::amqp::handshake::HandshakeSettings;
use crate::amqp::session::ExchangeEpochs;
use crate::auth::Authenticators;
use crate::auth::chain::{PasswordBackoff, SourceRules};
use crate::auth::exchange::BackendMinter;
use crate::config::Config;
use crate::telemetry::audit::Audit;
use crate::telemetry::metrics::Metrics;
pub use errors::{SetupError, TlsError};
use exchange_types::ExchangeTypes;
use readahead::ReadAhead;

/// State shared by every connection.
pub(crate) struct Shared {
    pub cfg: Config,
    pub auth: Authenticators,
    pub handshake: HandshakeSettings,
    pub exchange_types: Option<Arc<ExchangeTypes>>,
    /// Exchange type epochs, shared by every connection and kept across reloads.
    pub exchange_epochs: Arc<ExchangeEpochs>,
    /// The broker policies in force, shared by every configuration since the start: a
    /// reload that changes them sends the new ones, and every open connection binds them
    /// to its principal again.
    pub policy_updates: Arc<watch::Sender<Arc<crate::config::AuthorizationConfig>>>,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
    pub drain: watch::Receiver<DrainState>,
    pub limits: Arc<limits::Limits>,
    pub balancer: Arc<balancer::Balancer>,
    /// The TLS client for the backend nodes, when `backend.tls` is on.
    pub backend_tls: Option<tokio_rustls::TlsConnector>,
    /// `loopback_users` and `[auth.sources]`.
    pub sources: SourceRules,
    /// Failed internal logins, kept across reloads.
    pub password_backoff: Arc<PasswordBackoff>,
    /// Mints the backend tokens (`backend.auth = "token"`).
    pub minter: Option<Arc<BackendMinter>>,
    /// Whether the broker accepts those tokens, as `/readyz` last found out.
    pub token_probe: Arc<token_probe::ProbeCache>,
    /// The public keys of the backend tokens (the signing key and the retired ones) as a
    /// JWKS, served on the admin listener at `/backend-jwks.json`.
    pub backend_jwks: Option<String>,
    /// The management API listener's TLS, client and minted tokens (`[management]`).
    pub management: Option<Arc<management::Management>>,
}

/// Where a graceful shutdown is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainState {
    Running,
    /// No new connections; established ones go on.
    Stopping,
    /// Established connections are sent `connection.close 320`.
    Closing,
}

/// Drives a graceful shutdown: stop accepting, let clients go on for the drain period,
/// send them `320`, cut what is left at the deadline.
pub struct Drainer {
    tx: watch::Sender<DrainState>,
    metrics: Arc<Metrics>,
    period: std::time::Duration,
    deadline: std::time::Duration,
}

impl Drainer {
    /// Returns the number of connections still open at the deadline (cut when the
    /// process exits).
    pub async fn drain(self) -> i64 {
        let start = tokio::time::Instant::now();
        let open = || self.metrics.connections_open.get();
        let _ = self.tx.send(DrainState::Stopping);
        tracing::info!(open = open(), "draining: no new connections");
        wait_until(|| open() == 0, start + self.period).await;
        let _ = self.tx.send(DrainState::Closing);
        tracing::info!(open = open(), "draining: closing client connections");
        wait_until(|| open() == 0, start + self.deadline.max(self.period)).await;
        open()
    }
}

/// Completes once the drain state reaches `at_least`; never, if nobody can drain (the
/// `Drainer` was not taken).
pub(crate) async fn wait_state(rx: &mut watch::Receiver<DrainState>, at_least: DrainState) {
    let reached = |s: &DrainState| match at_least {
        DrainState::Running => true,
        DrainState::Stopping => *s != DrainState::Running,
        DrainState::Closing => *s == DrainState::Closing,
    };
    if rx.wait_for(reached).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn wait_until(done: impl Fn() -> bool, deadline: tokio::time::Instant) {
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A configured gateway, ready to bind.
pub struct Gateway {
    live: Arc<Live>,
    drain: watch::Sender<DrainState>,
    /// `runtime.per_core`: the runtimes accepted connections are handed to.
    workers: Option<Arc<Workers>>,
}

/// The addresses actually bound (useful with port 0).
#[derive(Clone, Copy, Debug)]
pub struct BoundAddrs {
    pub tls: Option<SocketAddr>,
    pub plain: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub management: Option<SocketAddr>,
}

/// The configuration in force and everything built from it. A reload builds a new one and
/// swaps it in: new connections use it, established ones keep the one they started with.
pub struct Live {
    current: std::sync::RwLock<(Arc<Shared>, Option<TlsAcceptor>)>,
    config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The backend nodes, as a connect needs them.
    pub(crate) fn nodes(&self) -> backend::Nodes<'_> {
        backend::Nodes {
            cfg: &self.cfg.backend,
            tls: self.backend_tls.as_ref(),
            balancer: &self.balancer,
            metrics: &self.metrics,
        }
    }
}

impl Live {
    pub(crate) fn snapshot(&self) -> (Arc<Shared>, Option<TlsAcceptor>) {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the configuration. On error nothing changes and the old one keeps serving.
    pub async fn reload(&self, cfg: Config) -> Result<(), SetupError> {
        let _one = self.reloading.lock().await;
        let (old, _) = self.snapshot();
        let l = &old.cfg.listener;
        if cfg.listener.tls.as_ref().map(|t| t.address) != l.tls.as_ref().map(|t| t.address)
            || cfg.listener.plain_address != l.plain_address
            || cfg.admin.address != old.cfg.admin.address
        {
            tracing::warn!("listener addresses changed: they take effect at the next restart");
        }
        if cfg.runtime.worker_threads != old.cfg.runtime.worker_threads {
            tracing::warn!("runtime.worker_threads changed: it takes effect at the next restart");
        }
        if cfg.runtime.per_core != old.cfg.runtime.per_core {
            tracing::warn!("runtime.per_core changed: it takes effect at the next restart");
        }
        let result = build(cfg, Some(&old), old.drain.clone()).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        old.metrics.config_reloads.with_label_values(&[label]).inc();
        let (shared, tls) = result?;
        let authorization = Arc::new(shared.cfg.authorization.clone());
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(shared), tls);
        let changed = old.policy_updates.send_if_modified(|current| {
            let changed = **current != *authorization;
            if changed {
                *current = authorization.clone();
            }
            changed
        });
        if changed {
            tracing::info!(
                statements = authorization.set.statements().len(),
                mode = authorization.mode.as_str(),
                "broker policies changed: open connections bind the new ones"
            );
        }
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Reloads the config file the gateway was started with (SIGHUP, `POST /reload`).
    /// Every error of an invalid file is reported at once.
    pub async fn reload_from_file(&self) -> Result<(), SetupError> {
        let path = self
            .config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(path) = path else {
            return Err(SetupError::NoConfigFile);
        };
        match crate::config::load(&path) {
            Ok(cfg) => self.reload(cfg).await,
            Err(errors) => {
                let (old, _) = self.snapshot();
                old.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                Err(SetupError::InvalidFile {
                    path: path.display().to_string(),
                    errors,
                })
            }
        }
    }
}

/// Builds the state for `cfg`, reusing what must survive a reload from `prev` (metrics,
/// connection counts, node health when the nodes are unchanged).
async fn build(
    cfg: Config,
    prev: Option<&Shared>,
    drain: watch::Receiver<DrainState>,
) -> Result<(Shared, Option<TlsAcceptor>), SetupError> {
    let tls = match &cfg.listener.tls {
        Some(t) => Some(tls_acceptor(&t.cert, &t.key)?),
        None => None,
    };
    let backend_tls = match &cfg.backend.tls {
        Some(t) => Some(backend::tls_connector(t)?),
        None => None,
    };
    let mut auth = crate::wiring::authenticators(&cfg.oauth2)?;
    if let Some(p) = prev {
        // Counters survive a reload (the caches do not: the keys may have changed).
        auth.set_stats(p.auth.stats.clone());
    }
    for a in auth.all() {
        let keys = &a.keys;
        if keys.has_remote() {
            if let Err(e) = keys.refresh().await {
                tracing::error!(issuer = %a.name, error = %e, "initial JWKS fetch failed; retrying in the background");
            }
            keys.spawn_refresh();
        }
    }
    let l = &cfg.listener;
    let handshake = HandshakeSettings {
        max_preauth_frame: l.max_preauth_frame as usize,
        channel_max: l.channel_max,
        frame_max: l.frame_max,
        heartbeat: l.heartbeat,
        product: "amqp-iam-gateway".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let metrics = prev.map_or_else(
        || {
            let m = Metrics::new();
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            m.runtime_worker_threads.set(workers as i64);
            Arc::new(m)
        },
        |p| p.metrics.clone(),
    );
    let exchange_epochs = prev.map_or_else(ExchangeEpochs::new, |p| p.exchange_epochs.clone());
    // Sent to the open connections only once the whole reload has succeeded (`reload`).
    let policy_updates = prev.map_or_else(
        || Arc::new(watch::channel(Arc::new(cfg.authorization.clone())).0),
        |p| p.policy_updates.clone(),
    );
    let exchange_types = match &cfg.backend.management_url {
        Some(url) => Some(Arc::new(ExchangeTypes::new(
            url,
            &cfg.backend,
            exchange_epochs.clone(),
            metrics.clone(),
        )?)),
        None => None,
    };
    let audit = Audit::open(cfg.log.audit.as_ref()).map_err(SetupError::Audit)?;
    let nodes: Vec<String> = cfg.backend.nodes.iter().map(|n| n.to_string()).collect();
    let balancer = match prev {
        Some(p)
            if p.cfg.backend.nodes == cfg.backend.nodes
                && p.cfg.backend.balance == cfg.backend.balance
                && p.cfg.backend.max_connecting == cfg.backend.max_connecting
                && p.cfg.backend.health_check_interval == cfg.backend.health_check_interval
                && p.cfg.backend.connect_timeout == cfg.backend.connect_timeout =>
        {
            p.balancer.clone()
        }
        _ => {
            let b = Arc::new(balancer::Balancer::new(
                nodes,
                cfg.backend.balance,
                cfg.backend.max_connecting,
            ));
            // One round before serving, so `/readyz` and the first clients know; then in
            // the background.
            let timeout = health::check_timeout(&cfg.backend);
            health::check_all(&b, timeout, &metrics).await;
            health::spawn(
                Arc::downgrade(&b),
                cfg.backend.health_check_interval,
                timeout,
                metrics.clone(),
            );
            b
        }
    };
    let limits = match prev {
        Some(p) => p.limits.clone(),
        None => Arc::new(limits::Limits::new(0, 0, 0)),
    };
    limits.set(
        l.max_connections_per_source,
        l.max_connections_per_identity,
        l.handshakes_per_second_per_source,
    );
    let password_backoff = prev.map_or_else(Arc::default, |p| p.password_backoff.clone());
    let (minter, backend_jwks) = match &cfg.backend.auth {
        crate::config::BackendAuth::ServiceUser => (None, None),
        crate::config::BackendAuth::Token(t) => {
            (Some(Arc::new(backend_minter(t)?)), Some(backend_jwks(t)?))
        }
    };
    #[cfg(feature = "test-switches")]
    if !cfg.testing.gateway_decisions {
        tracing::warn!(
            "TEST BUILD: [testing] gateway_decisions = false: the gateway makes no per-method \
             decision; the broker alone authorises token sessions"
        );
    }
    let management = match (&cfg.management, &minter) {
        (Some(m), Some(minter)) => Some(Arc::new(
            management::Management::new(m, minter.clone(), &cfg.backend)
                .map_err(SetupError::Management)?,
        )),
        _ => None,
    };
    let shared = Shared {
        management,
        minter,
        token_probe: Arc::default(),
        backend_jwks,
        sources: crate::wiring::source_rules(&cfg.auth),
        password_backoff,
        cfg,
        auth,
        handshake,
        exchange_types,
        exchange_epochs,
        policy_updates,
        metrics,
        audit,
        drain,
        limits,
        balancer,
        backend_tls,
    };
    Ok((shared, tls))
}

/// The backend token minter of `[backend.token]`.
pub(crate) fn backend_minter(
    t: &crate::config::BackendTokenConfig,
) -> Result<BackendMinter, SetupError> {
    let what = |source| SetupError::BackendTokenKey {
        setting: "backend.token.signing_key",
        path: t.signing_key.display().to_string(),
        source,
    };
    let pem = crate::auth::exchange::read_private_key(&t.signing_key).map_err(what)?;
    BackendMinter::from_pem(&pem, &t.kid, &t.resource_server_id, &t.scope_prefix).map_err(what)
}

/// The JWKS of `[backend.token]`: the signing key's public key and the retired keys'.
fn backend_jwks(t: &crate::config::BackendTokenConfig) -> Result<String, SetupError> {
    let mut keys = Vec::new();
    let current = std::iter::once((&t.kid, &t.signing_key, "backend.token.signing_key"));
    let retired = t
        .retired_keys
        .iter()
        .map(|(k, p)| (k, p, "backend.token.retired_keys"));
    for (kid, path, key) in current.chain(retired) {
        let what = |source| SetupError::BackendTokenKey {
            setting: key,
            path: path.display().to_string(),
            source,
        };
        let pem = crate::auth::exchange::read_private_key(path).map_err(what)?;
        keys.push(crate::auth::exchange::public_jwk(&pem, kid).map_err(what)?);
    }
    Ok(serde_json::json!({ "keys": keys }).to_string())
}

impl Gateway {
    /// Loads TLS material and keys, and fetches the JWKS once (a failure is logged; the
    /// background refresh keeps trying and unknown kids fail closed meanwhile).
    pub async fn new(cfg: Config) -> Result<Gateway, SetupError> {
        let (drain_tx, drain) = watch::channel(DrainState::Running);
        let (shared, tls) = build(cfg, None, drain).await?;
        let live = Arc::new(Live {
            current: std::sync::RwLock::new((Arc::new(shared), tls)),
            config_path: std::sync::Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
        });
        Ok(Gateway {
            live,
            drain: drain_tx,
            workers: None,
        })
    }

    /// Remembers the config file, for reloads on SIGHUP and `POST /reload`.
    pub fn with_config_path(self, path: std::path::PathBuf) -> Self {
        *self
            .live
            .config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(path);
        self
    }

    /// The handle for reloads (SIGHUP).
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// The handle for a graceful shutdown (take it before `start`).
    pub fn drainer(&self) -> Drainer {
        let (shared, _) = self.live.snapshot();
        Drainer {
            tx: self.drain.clone(),
            metrics: shared.metrics.clone(),
            period: shared.cfg.listener.drain_period,
            deadline: shared.cfg.listener.drain_deadline,
        }
    }

    /// Binds the listeners and serves connections in the background.
    /// Relays connections on these runtimes (`runtime.per_core`), handing each accepted
    /// connection to the next; without, on the runtime that accepts.
    pub fn with_workers(mut self, workers: Vec<tokio::runtime::Handle>) -> Self {
        self.workers = (!workers.is_empty()).then(|| {
            Arc::new(Workers {
                handles: workers,
                next: std::sync::atomic::AtomicUsize::new(0),
            })
        });
        self
    }

    pub async fn start(self) -> std::io::Result<BoundAddrs> {
        let (shared, _) = self.live.snapshot();
        let l = &shared.cfg.listener;
        let limit = Arc::new(Semaphore::new(l.max_connections));
        let mut bound = BoundAddrs {
            tls: None,
            plain: None,
            admin: None,
            management: None,
        };
        let admin = TcpListener::bind(shared.cfg.admin.address).await?;
        bound.admin = Some(admin.local_addr()?);
        tracing::info!(address = %admin.local_addr()?, "admin listener (/metrics, /healthz, /readyz, POST /reload)");
        tokio::spawn(crate::admin::serve(admin, self.live.clone()));
        if let Some(m) = &shared.cfg.management {
            let listener = TcpListener::bind(m.address).await?;
            bound.management = Some(listener.local_addr()?);
            tracing::info!(address = %listener.local_addr()?, backend = %m.backend_url, "management API listener (HTTPS)");
            tokio::spawn(management::serve(listener, self.live.clone()));
        }
        if let Some(t) = &l.tls {
            let listener = TcpListener::bind(t.address).await?;
            bound.tls = Some(listener.local_addr()?);
            tracing::info!(address = %listener.local_addr()?, "AMQPS listener");
            tokio::spawn(accept_loop(
                listener,
                true,
                self.live.clone(),
                limit.clone(),
                "tls",
                self.workers.clone(),
            ));
        }
        if let Some(addr) = l.plain_address {
            let listener = TcpListener::bind(addr).await?;
            bound.plain = Some(listener.local_addr()?);
            tracing::warn!(address = %listener.local_addr()?, "plain AMQP listener (development only: tokens travel unencrypted)");
            tokio::spawn(accept_loop(
                listener,
                false,
                self.live.clone(),
                limit,
                "plain",
                self.workers.clone(),
            ));
        }
        Ok(bound)
    }
}

/// The single-threaded runtimes connections are handed to (`runtime.per_core`).
pub(crate) struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    /// Round robin.
    fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

async fn accept_loop(
    listener: TcpListener,
    is_tls: bool,
    live: Arc<Live>,
    limit: Arc<Semaphore>,
    name: &'static str,
    workers: Option<Arc<Workers>>,
) {
    let (first, _) = live.snapshot();
    let accepted = first
        .metrics
        .connections_accepted
        .with_label_values(&[name]);
    let mut drain = first.drain.clone();
    drop(first);
    loop {
        let accept = tokio::select! {
            a = listener.accept() => a,
            _ = wait_state(&mut drain, DrainState::Stopping) => {
                tracing::info!(listener = name, "listener closed for the shutdown");
                return;
            }
        };
        let (stream, peer) = match accept {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        accepted.inc();
        // The configuration in force now (a reload does not touch established connections).
        let (shared, tls) = live.snapshot();
        let tls = if is_tls {
            match tls {
                Some(t) => Some(t),
                None => continue, // TLS was removed by a reload; the listener stays until restart
            }
        } else {
            None
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing");
            shared
                .metrics
                .connections_closed
                .with_label_values(&[outcome::ConnectionEnd::Limit.label()])
                .inc();
            drop(stream);
            continue;
        };
        let Some(workers) = &workers else {
            tokio::spawn(async move {
                shared.metrics.connections_open.inc();
                serve_socket(stream, peer, tls, shared.clone()).await;
                shared.metrics.connections_open.dec();
                drop(permit);
            });
            continue;
        };
        // Handed off: the socket leaves this runtime's IO driver and joins the worker's,
        // where the backend socket will be too.
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "handing the connection to a worker failed");
                continue;
            }
        };
        workers.next().spawn(async move {
            let Ok(stream) = TcpStream::from_std(std_stream) else {
                return;
            };
            shared.metrics.connections_open.inc();
            serve_socket(stream, peer, tls, shared.clone()).await;
            shared.metrics.connections_open.dec();
            drop(permit);
        });
    }
}

async fn serve_socket(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    let peer = if shared.cfg.listener.proxy_protocol {
        let deadline = shared.cfg.listener.handshake_timeout;
        match tokio::time::timeout(deadline, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(Some(client))) => client,
            Ok(Ok(None)) => peer,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "PROXY protocol header refused");
                shared
                    .metrics
                    .connections_closed
                    .with_label_values(&[outcome::ConnectionEnd::ProxyHeader.label()])
                    .inc();
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "no PROXY protocol header in time");
                shared
                    .metrics
                    .connections_closed
                    .with_label_values(&[outcome::ConnectionEnd::HandshakeTimeout.label()])
                    .inc();
                return;
            }
        }
    } else {
        peer
    };
    let _source_slot = match shared
        .limits
        .admit_source(peer.ip(), std::time::Instant::now())
    {
        Ok(slot) => slot,
        Err(end) => {
            let reason = end.label();
            tracing::info!(%peer, reason, "connection refused by a source limit");
            shared
                .metrics
                .connections_closed
                .with_label_values(&[reason])
                .inc();
            shared.audit.record(&crate::telemetry::audit::AuditEvent {
                event: "limit",
                decision: "deny",
                reason,
                client: Some(peer),
                ..Default::default()
            });
            return;
        }
    };
    match tls {
        None => conn::serve(stream, peer, shared, false).await,
        Some(acceptor) => {
            let deadline = shared.cfg.listener.handshake_timeout;
            let timer = shared.metrics.phase("tls").start_timer();
            // Boxed: see `conn::serve`.
            let accepting = Box::pin(acceptor.accept(ReadAhead::new(stream)));
            match tokio::time::timeout(deadline, accepting).await {
                Ok(Ok(tls_stream)) => {
                    timer.observe_duration();
                    // Boxed: the TLS state is over 1 KiB, and the futures it passes through
                    // on its way into the relay would each keep a slot of that size.
                    conn::serve(Box::new(tls_stream), peer, shared, true).await
                }
                Ok(Err(e)) => {
                    timer.stop_and_discard();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    shared
                        .metrics
                        .connections_closed
                        .with_label_values(&[outcome::ConnectionEnd::TlsFailed.label()])
                        .inc();
                }
                Err(_) => {
                    timer.stop_and_discard();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    shared
                        .metrics
                        .connections_closed
                        .with_label_values(&[outcome::ConnectionEnd::HandshakeTimeout.label()])
                        .inc();
                }
            }
        }
    }
}

/// A rustls acceptor for TLS 1.2 and 1.3 with the aws-lc-rs provider.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(Arc::new(tls_server_config(cert, key)?)))
}

/// The certificates of a PEM file, at least one (a chain, leaf first, or a CA bundle).
pub(crate) fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub(crate) fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The rustls server config of [`tls_acceptor`].
pub(crate) fn tls_server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs = read_certs(cert)?;
    let key = read_key(key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Protocols(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::CertificateKey(e.to_string()))?;
    Ok(config)
}
