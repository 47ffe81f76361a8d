//! Opens the backend connection for an authenticated client: TCP to a RabbitMQ node (and
//! TLS when `backend.tls` is on), then the AMQP handshake as a client, with the client's
//! identity in `connection_name`: [`open`] logs in with the service user (token sessions);
//! [`login`] then [`LoggedIn::open`] with the client's own credentials (internal users,
//! whose login is the broker's to judge, before the client names its vhost). At most `backend.max_connecting` connects to a
//! node are in progress at once; waiting for a slot, connecting and the handshake are each
//! bounded by the connect timeout.

use amq_protocol::protocol::{AMQPClass, connection};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::balancer::{Balancer, Lease};
use super::errors::TlsError;
use super::{read_certs, read_key};
use crate::amqp::frame::{self, PROTOCOL_HEADER};
use crate::amqp::handshake::Tuning;
use crate::amqp::method::{self, Close, Reader, id};
use crate::config::{BackendConfig, BackendTlsConfig};
use crate::telemetry::metrics::{GaugeGuard, Metrics};

/// Largest frame accepted from the backend before tune.
const MAX_HANDSHAKE_FRAME: usize = 128 * 1024;

/// Why the backend connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no backend node reachable: {0}")]
    Unreachable(String),
    #[error("backend handshake failed: {0}")]
    Protocol(String),
    /// The broker refused with `connection.close` (e.g. `530 NOT_ALLOWED - vhost nope
    /// not found`); the client gets the same close.
    #[error("backend refused: {code} {text}")]
    Refused {
        code: u16,
        text: String,
        class_id: u16,
        method_id: u16,
    },
    /// The broker refused the login itself (its `connection.close` in answer to
    /// `start-ok`: a wrong password, a loopback-only user).
    #[error("backend refused the login: {code} {text}")]
    LoginRefused {
        code: u16,
        text: String,
        class_id: u16,
        method_id: u16,
    },
}

/// A connection to a node: plain TCP or TLS over TCP.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS client for the nodes, built once per configuration: TLS 1.2 and 1.3 with the
/// aws-lc-rs provider, trusting only the CA(s) in `tls_ca`, with the client certificate
/// when one is configured.
pub fn tls_connector(t: &BackendTlsConfig) -> Result<TlsConnector, TlsError> {
    Ok(TlsConnector::from(Arc::new(tls_client_config(t)?)))
}

/// A rustls client config builder for TLS 1.3 and 1.2 with the aws-lc-rs provider, trusting
/// `roots`: the one way the gateway makes TLS clients.
pub(crate) fn client_builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Protocols(e.to_string()))?
        .with_root_certificates(roots))
}

/// The rustls client config of `backend.tls`: its CA, its client certificate.
pub fn tls_client_config(t: &BackendTlsConfig) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&t.ca)? {
        roots.add(ca).map_err(|e| TlsError::BadCa {
            path: t.ca.display().to_string(),
            why: e.to_string(),
        })?;
    }
    let builder = client_builder(roots)?;
    let config = match &t.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = read_certs(cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::ClientCertificateKey(e.to_string()))?
        }
    };
    Ok(config)
}

/// TCP to `addr`, then TLS when `tls` is set, checking the certificate against
/// `server_name`.
async fn connect(
    addr: &str,
    tls: Option<&TlsConnector>,
    server_name: &str,
) -> Result<BackendStream, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let Some(connector) = tls else {
        return Ok(BackendStream::Plain(stream));
    };
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
    let tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(BackendStream::Tls(Box::new(tls)))
}

/// An open backend connection.
pub struct Backend {
    pub stream: BackendStream,
    /// Counts this connection against its node until dropped.
    pub lease: Lease,
    /// Bytes read after `open-ok`, to be relayed.
    pub leftover: BytesMut,
    pub node: String,
    pub tuning: Tuning,
}

/// Whose credentials the backend connection logs in with.
#[derive(Clone, Copy)]
pub enum Login<'a> {
    /// The gateway's service user (token sessions): PLAIN with `backend.username`.
    Service,
    /// The client's own, as it sent them (internal-user sessions): the broker judges them.
    Client {
        mechanism: &'a str,
        response: &'a [u8],
    },
    /// A token the gateway minted for the client (`backend.auth = "token"`): PLAIN with an
    /// empty user name and the token as the password, as RabbitMQ's OAuth 2.0 plugin takes.
    Token(&'a str),
}

/// A backend connection past `connection.start-ok`: the broker accepted the login and sent
/// `connection.tune`. [`LoggedIn::open`] finishes the handshake.
pub struct LoggedIn {
    stream: BackendStream,
    buf: BytesMut,
    lease: Lease,
    node: String,
    index: usize,
    balancer: Arc<Balancer>,
    /// The broker's `channel_max` and `frame_max`.
    offered: (u16, u32),
}

impl Backend {
    /// Sends `connection.update-secret` with `token` and waits, within `timeout`, for the
    /// broker's `update-secret-ok`, before anything is relayed (the login with a minimal
    /// token, then the full one). A refusal is [`BackendError::Refused`].
    pub async fn update_secret(
        &mut self,
        token: &str,
        timeout: std::time::Duration,
    ) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        method::update_secret(
            &mut out,
            token.as_bytes(),
            "amqp-iam-gateway: full permissions",
        );
        let exchange = async {
            self.stream
                .write_all(&out)
                .await
                .map_err(|e| BackendError::Protocol(e.to_string()))?;
            expect(
                &mut self.stream,
                &mut self.leftover,
                id::CONNECTION_UPDATE_SECRET_OK,
            )
            .await
            .map(drop)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(BackendError::Protocol("update-secret timed out".into())))
    }
}

/// The backend nodes as one connect needs them: the configuration, the TLS connector
/// built from `cfg.tls` ([`tls_connector`], `None` for plain AMQP), the balancer and the
/// metrics.
pub struct Nodes<'a> {
    pub cfg: &'a BackendConfig,
    pub tls: Option<&'a TlsConnector>,
    pub balancer: &'a Arc<Balancer>,
    pub metrics: &'a Metrics,
}

/// Connects to the first reachable node, logs in as `who` and opens `vhost` on it.
pub async fn open(
    nodes: &Nodes<'_>,
    who: Login<'_>,
    vhost: &str,
    client: Tuning,
    client_properties: &[u8],
) -> Result<Backend, BackendError> {
    login(nodes, who, client_properties)
        .await?
        .open(vhost, client, nodes.cfg.connect_timeout, nodes.metrics)
        .await
}

/// Connects to the first reachable node and logs in with `who`: the broker's answer to
/// `connection.start-ok`. A refusal is [`BackendError::Refused`] (the client properties
/// advertise `authentication_failure_close`, so the broker says so rather than hanging up).
pub async fn login(
    nodes: &Nodes<'_>,
    who: Login<'_>,
    client_properties: &[u8],
) -> Result<LoggedIn, BackendError> {
    let Nodes {
        cfg,
        tls,
        balancer,
        metrics,
    } = *nodes;
    let mut errors = Vec::new();
    for i in balancer.order(Instant::now()) {
        let addr = balancer.addr(i).to_owned();
        // The node's host, unless the certificate name is configured; the balancer's nodes
        // are `cfg.nodes` in order.
        let host = cfg.nodes.get(i).map_or("", |n| n.host.as_str());
        let server_name = cfg
            .tls
            .as_ref()
            .and_then(|t| t.server_name.as_deref())
            .unwrap_or(host);
        // Held until the handshake is over, whatever its outcome.
        let waiting = GaugeGuard::new(metrics.backend_connects_waiting.with_label_values(&[&addr]));
        let slot = tokio::time::timeout(cfg.connect_timeout, balancer.connect_slot(i)).await;
        drop(waiting);
        let Ok(_slot) = slot else {
            // The node is busy, not failed: no back-off.
            metrics
                .backend_connect_queue_timeouts
                .with_label_values(&[&addr])
                .inc();
            errors.push(format!(
                "{addr}: {} connects already in progress (backend.max_connecting) for {} ms",
                cfg.max_connecting,
                cfg.connect_timeout.as_millis()
            ));
            continue;
        };
        let connected = tokio::time::timeout(cfg.connect_timeout, connect(&addr, tls, server_name))
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_owned()));
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                errors.push(format!("{addr}: {e}"));
                metrics
                    .backend_connect_failures
                    .with_label_values(&[&addr])
                    .inc();
                balancer.failure(i, Instant::now());
                continue;
            }
        };
        let start = start_ok(stream, cfg, who, client_properties);
        return match tokio::time::timeout(cfg.connect_timeout, start).await {
            Ok(Ok((stream, buf, offered))) => Ok(LoggedIn {
                stream,
                buf,
                lease: balancer.success(i),
                node: addr,
                index: i,
                balancer: balancer.clone(),
                offered,
            }),
            // A refusal (e.g. a wrong password) is the answer, not a node failure.
            Ok(Err(e)) => Err(e),
            Err(_) => {
                balancer.failure(i, Instant::now());
                Err(BackendError::Protocol(format!(
                    "{addr}: handshake timed out"
                )))
            }
        };
    }
    Err(BackendError::Unreachable(errors.join("; ")))
}

impl LoggedIn {
    /// The node it is connected to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sends `tune-ok` (the client's values within the broker's) and `open(vhost)`, within
    /// `timeout`. A refusal (`530`, an unknown vhost) is [`BackendError::Refused`].
    pub async fn open(
        self,
        vhost: &str,
        client: Tuning,
        timeout: std::time::Duration,
        metrics: &Metrics,
    ) -> Result<Backend, BackendError> {
        let LoggedIn {
            mut stream,
            mut buf,
            lease,
            node,
            index,
            balancer,
            offered,
        } = self;
        let opened = tokio::time::timeout(
            timeout,
            tune_and_open(&mut stream, &mut buf, vhost, client, offered),
        )
        .await;
        match opened {
            Ok(Ok(tuning)) => {
                metrics
                    .backend_connections
                    .with_label_values(&[&node])
                    .inc();
                Ok(Backend {
                    stream,
                    leftover: buf,
                    lease,
                    node,
                    tuning,
                })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                balancer.failure(index, Instant::now());
                Err(BackendError::Protocol(format!(
                    "{node}: handshake timed out"
                )))
            }
        }
    }
}

/// The protocol header, `start`, and our `start-ok`; returns the broker's `tune` values.
async fn start_ok(
    mut s: BackendStream,
    cfg: &BackendConfig,
    who: Login<'_>,
    client_properties: &[u8],
) -> Result<(BackendStream, BytesMut, (u16, u32)), BackendError> {
    let io = |e: std::io::Error| BackendError::Protocol(e.to_string());
    let mut buf = BytesMut::with_capacity(4096);
    s.write_all(PROTOCOL_HEADER).await.map_err(io)?;
    expect(&mut s, &mut buf, id::CONNECTION_START).await?;

    let mut out = BytesMut::new();
    match who {
        Login::Service => {
            let mut response = Vec::with_capacity(cfg.username.len() + cfg.password.len() + 2);
            response.push(0);
            response.extend_from_slice(cfg.username.as_bytes());
            response.push(0);
            response.extend_from_slice(cfg.password.as_bytes());
            method::connection_start_ok(&mut out, client_properties, "PLAIN", &response, "en_US");
        }
        Login::Client {
            mechanism,
            response,
        } => method::connection_start_ok(&mut out, client_properties, mechanism, response, "en_US"),
        Login::Token(token) => {
            let mut response = Vec::with_capacity(token.len() + 2);
            response.extend_from_slice(b"\0\0");
            response.extend_from_slice(token.as_bytes());
            method::connection_start_ok(&mut out, client_properties, "PLAIN", &response, "en_US");
        }
    }
    s.write_all(&out).await.map_err(io)?;

    let tune = match expect(&mut s, &mut buf, id::CONNECTION_TUNE).await {
        Ok(tune) => tune,
        Err(BackendError::Refused {
            code,
            text,
            class_id,
            method_id,
        }) => {
            return Err(BackendError::LoginRefused {
                code,
                text,
                class_id,
                method_id,
            });
        }
        Err(e) => return Err(e),
    };
    let bad_tune = || BackendError::Protocol("malformed connection.tune".into());
    let mut r = Reader::new(&tune);
    let offered = (
        r.u16().map_err(|_| bad_tune())?,
        r.u32().map_err(|_| bad_tune())?,
    );
    Ok((s, buf, offered))
}

async fn tune_and_open(
    s: &mut BackendStream,
    buf: &mut BytesMut,
    vhost: &str,
    client: Tuning,
    (channel_max, frame_max): (u16, u32),
) -> Result<Tuning, BackendError> {
    let io = |e: std::io::Error| BackendError::Protocol(e.to_string());
    let tuning = Tuning {
        channel_max: min_nonzero(client.channel_max as u32, channel_max as u32) as u16,
        frame_max: min_nonzero(client.frame_max, frame_max),
        heartbeat: client.heartbeat,
    };
    let mut out = BytesMut::new();
    let tune_ok = connection::TuneOk {
        channel_max: tuning.channel_max,
        frame_max: tuning.frame_max,
        heartbeat: tuning.heartbeat,
    };
    method::encode(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
    );
    let open = connection::Open {
        virtual_host: method::short(vhost),
    };
    method::encode(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(open)),
    );
    s.write_all(&out).await.map_err(io)?;
    expect(s, buf, id::CONNECTION_OPEN_OK).await?;
    Ok(tuning)
}

fn min_nonzero(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// Reads the next method on channel 0 and checks it is `ids`; returns its payload. A
/// `connection.close` becomes [`BackendError::Refused`].
async fn expect(
    s: &mut BackendStream,
    buf: &mut BytesMut,
    ids: (u16, u16),
) -> Result<BytesMut, BackendError> {
    loop {
        if let Some(h) = frame::check(buf, MAX_HANDSHAKE_FRAME)
            .map_err(|e| BackendError::Protocol(e.to_string()))?
        {
            let mut f = buf.split_to(h.wire_len());
            if h.frame_type != frame::METHOD {
                continue;
            }
            let payload = f.split_off(frame::HEADER_LEN).split_to(h.size as usize);
            let got = method::ids(&payload);
            if got == Some(id::CONNECTION_CLOSE) {
                let c = Close::parse(&payload)
                    .ok_or_else(|| BackendError::Protocol("malformed connection.close".into()))?;
                let refused = BackendError::Refused {
                    code: c.code,
                    text: String::from_utf8_lossy(c.text).into_owned(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                };
                let mut ok = BytesMut::new();
                method::connection_close_ok(&mut ok);
                let _ = s.write_all(&ok).await;
                return Err(refused);
            }
            return match got {
                Some(got) if got == ids => Ok(payload),
                other => Err(BackendError::Protocol(format!(
                    "expected {}.{}, got {other:?}",
                    ids.0, ids.1
                ))),
            };
        }
        if buf.len() >= 8 && &buf[..4] == b"AMQP" {
            return Err(BackendError::Protocol(
                "backend does not speak AMQP 0-9-1".into(),
            ));
        }
        buf.reserve(4096);
        let n = s
            .read_buf(buf)
            .await
            .map_err(|e| BackendError::Protocol(e.to_string()))?;
        if n == 0 {
            return Err(BackendError::Protocol(
                "backend closed the connection during the handshake".into(),
            ));
        }
    }
}
