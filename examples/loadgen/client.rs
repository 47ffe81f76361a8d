//! A minimal AMQP 0-9-1 client: URL, TCP or TLS, the connection handshake, and reading
//! frames in place from one read buffer.
//!
//! Only what the load generator needs: PLAIN login, one channel, no heartbeats (tune-ok
//! says 0), no recovery. Setup methods are encoded and decoded with amq-protocol through
//! the crate's `amqp::method`; the hot path (publish, deliver, ack, confirms) is encoded and
//! read by hand in `throughput.rs`. It must not allocate per frame once connected.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amqp_iam_gateway::amqp::frame::{self, FrameHeader};
use amqp_iam_gateway::amqp::method::{self, short};
use bytes::{Buf, BytesMut};
use percent_encoding::percent_decode_str;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Read buffer of a connection that only does handshakes (churn, idle): small, so that
/// thousands of idle connections cost the generator little.
pub const SMALL_READ_BUFFER: usize = 4 * 1024;
/// How long the close handshake may take before the socket is dropped anyway.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a connection failed.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// The server sent `connection.close` (or `channel.close`) with this code and text.
    Closed {
        what: &'static str,
        code: u16,
        text: String,
    },
    /// Bytes the client did not expect.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Closed { what, code, text } => write!(f, "server sent {what} {code} {text}"),
            Error::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where to connect and as whom, parsed once from the URL and options.
pub struct Target {
    pub addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    user: String,
    /// One or more: connection `n` uses `passwords[n % len]`.
    passwords: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
    pub vhost: String,
}

impl Target {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost]`, percent-decoding user,
    /// password and vhost (an absent or empty vhost is `/`). `password_file` replaces the
    /// URL's password: its non-empty lines, used in turn by successive connections (one
    /// token per line, so that each connection can present one the gateway has not seen);
    /// `cacert` is the PEM CA trusted for amqps, else the
    /// system's roots. TLS sessions are never resumed, so every connection pays a full
    /// handshake.
    pub fn parse(
        url: &str,
        cacert: Option<&Path>,
        password_file: Option<&Path>,
        tls_kx: Option<&str>,
    ) -> std::result::Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("amqps://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("amqp://") {
            (false, r)
        } else {
            return Err(format!("URL must start with amqp:// or amqps://: {url}"));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (u, h),
            None => ("guest:guest", authority),
        };
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|e| format!("bad percent-encoding in URL: {e}"))
        };
        let (host, port) = split_host_port(hostport, if tls { 5671 } else { 5672 })?;
        let vhost = match decode(path.split('?').next().unwrap_or(""))? {
            v if v.is_empty() => "/".to_string(),
            v => v,
        };
        let passwords = match password_file {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                let lines: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                if lines.is_empty() {
                    vec![String::new()]
                } else {
                    lines
                }
            }
            None => vec![decode(password)?],
        };
        let tls = if tls {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("bad TLS server name {host}: {e}"))?;
            Some((tls_connector(cacert, tls_kx)?, name))
        } else {
            None
        };
        Ok(Target {
            addr: format!("{}:{port}", bracket_v6(&host)),
            tls,
            user: decode(user)?,
            passwords,
            next: std::sync::atomic::AtomicUsize::new(0),
            vhost,
        })
    }

    /// TCP (+ TLS) and the AMQP handshake through `connection.open-ok`.
    pub async fn connect(&self, read_buffer: usize) -> Result<Conn> {
        let tcp = TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                Stream::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        };
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(read_buffer),
            frame_max: 4096,
        };
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let password = &self.passwords[n % self.passwords.len()];
        conn.handshake(&self.user, password, &self.vhost).await?;
        Ok(conn)
    }
}

fn split_host_port(
    hostport: &str,
    default_port: u16,
) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or_else(|| format!("bad IPv6 host in URL: {hostport}"))?;
        (h, rest.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port in URL: {p}"))?,
        None => default_port,
    };
    if host.is_empty() {
        return Err("URL has no host".into());
    }
    Ok((host.to_string(), port))
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `tls_kx`: comma-separated key exchange groups in order of preference, as rustls names
/// them (`X25519`, `X25519MLKEM768`, `secp256r1`, `secp384r1`); default rustls's own order,
/// which puts the post-quantum hybrid first.
fn tls_connector(
    cacert: Option<&Path>,
    tls_kx: Option<&str>,
) -> std::result::Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate found", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(names) = tls_kx {
        let all = std::mem::take(&mut provider.kx_groups);
        for name in names.split(',').map(str::trim) {
            let group = all
                .iter()
                .find(|g| format!("{:?}", g.name()).eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|g| format!("{:?}", g.name())).collect();
                    format!(
                        "--tls-kx: unknown group {name} (known: {})",
                        known.join(", ")
                    )
                })?;
            provider.kx_groups.push(*group);
        }
    }
    let provider = Arc::new(provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Churn measures the full handshake; a resumed session would hide its cost.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Plain TCP or TLS over TCP.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An open AMQP connection: the stream, its read buffer, and the negotiated `frame_max`.
pub struct Conn {
    pub stream: Stream,
    /// Bytes read and not yet consumed; frames are parsed in place from its front.
    pub rbuf: BytesMut,
    pub frame_max: usize,
}

/// Parses the first complete frame of `buf`, if there is one. Frames from the server are
/// held to `frame_max` (0 before tune: any size).
pub fn next_frame(buf: &[u8], frame_max: usize) -> Result<Option<FrameHeader>> {
    if buf.starts_with(b"AMQP") {
        return Err(Error::Protocol(
            "the server answered with a protocol header: it does not speak AMQP 0-9-1".into(),
        ));
    }
    frame::check(buf, frame_max).map_err(|e| Error::Protocol(e.to_string()))
}

/// The error for the server's `connection.close` / `channel.close`, if `class` is one.
pub fn close_error(class: &AMQPClass) -> Option<Error> {
    match class {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => Some(Error::Closed {
            what: "connection.close",
            code: c.reply_code,
            text: c.reply_text.to_string(),
        }),
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => Some(Error::Closed {
            what: "channel.close",
            code: c.reply_code,
            text: c.reply_text.to_string(),
        }),
        _ => None,
    }
}

impl Conn {
    /// Reads more bytes into the read buffer, keeping at least `min_room` free so that a
    /// read can fill a large part of it. EOF is an error.
    pub async fn fill(&mut self, min_room: usize) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < min_room {
            self.rbuf.reserve(min_room);
        }
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ))),
            _ => Ok(()),
        }
    }

    /// The next method on any channel, skipping heartbeats and content frames (which the
    /// setup path never expects). The server's `connection.close` is answered with
    /// close-ok and returned as an error; so is `channel.close` (answered too).
    pub async fn recv_method(&mut self) -> Result<(u16, AMQPClass)> {
        loop {
            let Some(h) = next_frame(&self.rbuf, self.frame_max)? else {
                self.fill(self.frame_max.max(4096)).await?;
                continue;
            };
            let frame = self.rbuf.split_to(h.wire_len());
            if h.frame_type != frame::METHOD {
                continue;
            }
            let class = amq_protocol::protocol::parse_class(frame::payload(&frame, &h))
                .map(|(_, c)| c)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            if let Some(err) = close_error(&class) {
                let mut out = BytesMut::new();
                match &class {
                    AMQPClass::Connection(_) => method::connection_close_ok(&mut out),
                    _ => method::channel_close_ok(&mut out, h.channel),
                }
                let _ = self.stream.write_all(&out).await;
                return Err(err);
            }
            return Ok((h.channel, class));
        }
    }

    /// Encodes and sends one method.
    pub async fn send(&mut self, channel: u16, class: AMQPClass) -> Result<()> {
        let mut out = BytesMut::with_capacity(256);
        method::encode(&mut out, channel, class);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Sends `m` and waits for the method `want` accepts, ignoring anything else.
    pub async fn call<T>(
        &mut self,
        channel: u16,
        m: AMQPClass,
        want: impl Fn(AMQPClass) -> Option<T>,
    ) -> Result<T> {
        self.send(channel, m).await?;
        loop {
            let (_, class) = self.recv_method().await?;
            if let Some(t) = want(class) {
                return Ok(t);
            }
        }
    }

    async fn handshake(&mut self, user: &str, password: &str, vhost: &str) -> Result<()> {
        self.stream.write_all(frame::PROTOCOL_HEADER).await?;
        self.frame_max = 0;
        match self.recv_method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {}
            (_, other) => return Err(unexpected("connection.start", &other)),
        }
        let mut response = Vec::with_capacity(user.len() + password.len() + 2);
        response.push(0);
        response.extend_from_slice(user.as_bytes());
        response.push(0);
        response.extend_from_slice(password.as_bytes());
        let start_ok = connection::StartOk {
            client_properties: client_properties(),
            mechanism: short("PLAIN"),
            response: LongString::from(response),
            locale: short("en_US"),
        };
        let tune = self
            .call(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
                |c| match c {
                    AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => Some(t),
                    _ => None,
                },
            )
            .await?;
        let tune_ok = connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        };
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
        )
        .await?;
        self.frame_max = match tune.frame_max {
            0 => 131_072,
            n => n as usize,
        };
        let open = connection::Open {
            virtual_host: short(vhost),
        };
        self.call(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(open)),
            |c| matches!(c, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))).then_some(()),
        )
        .await
    }

    /// `channel.open` on `channel`, waiting for open-ok.
    pub async fn open_channel(&mut self, ch: u16) -> Result<()> {
        self.call(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            |c| matches!(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))).then_some(()),
        )
        .await
    }

    /// `connection.close` (200), then waits (bounded) for close-ok, discarding whatever
    /// else arrives, and shuts the stream down.
    pub async fn close(mut self) -> Result<()> {
        let mut out = BytesMut::new();
        method::connection_close(&mut out, method::reply::REPLY_SUCCESS, "bye", 0, 0);
        let handshake = async {
            self.stream.write_all(&out).await?;
            loop {
                while let Some(h) = next_frame(&self.rbuf, self.frame_max)? {
                    let is_close_ok = h.frame_type == frame::METHOD
                        && method::ids(frame::payload(&self.rbuf, &h))
                            == Some(method::id::CONNECTION_CLOSE_OK);
                    self.rbuf.advance(h.wire_len());
                    if is_close_ok {
                        return Ok(());
                    }
                }
                self.fill(self.frame_max).await?;
            }
        };
        let res = tokio::time::timeout(CLOSE_TIMEOUT, handshake)
            .await
            .unwrap_or_else(|_| Err(Error::Protocol("no close-ok within 3 s".into())));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
        res
    }
}

fn unexpected(want: &str, got: &AMQPClass) -> Error {
    Error::Protocol(format!("expected {want}, got {got:?}"))
}

/// Client properties as the common clients send them, with the capabilities RabbitMQ
/// looks at, `authentication_failure_close` above all (a refused login is then a
/// `connection.close 403`, not a silent close).
fn client_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        caps.insert(short(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(
        short("product"),
        AMQPValue::LongString(method::long("loadgen")),
    );
    props.insert(
        short("platform"),
        AMQPValue::LongString(method::long("Rust, amqp-iam-gateway examples")),
    );
    props.insert(short("capabilities"), AMQPValue::FieldTable(caps));
    props.insert(
        short("connection_name"),
        AMQPValue::LongString(method::long("loadgen")),
    );
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("127.0.0.1:5671", 1).unwrap(),
            ("127.0.0.1".into(), 5671)
        );
        assert_eq!(
            split_host_port("localhost", 5672).unwrap(),
            ("localhost".into(), 5672)
        );
        assert_eq!(split_host_port("[::1]:9", 1).unwrap(), ("::1".into(), 9));
        assert!(split_host_port(":5672", 1).is_err());
    }

    #[test]
    fn url_parts_are_percent_decoded() {
        let t = Target::parse("amqp://:tok%2Fen@127.0.0.1:5674/%2F", None, None, None).unwrap();
        assert_eq!(
            (t.user.as_str(), t.passwords.as_slice()),
            ("", &["tok/en".to_owned()][..])
        );
        assert_eq!((t.addr.as_str(), t.vhost.as_str()), ("127.0.0.1:5674", "/"));
        let t = Target::parse("amqp://u:p@h/my%20vhost?heartbeat=5", None, None, None).unwrap();
        assert_eq!((t.addr.as_str(), t.vhost.as_str()), ("h:5672", "my vhost"));
        let t = Target::parse("amqp://localhost", None, None, None).unwrap();
        assert_eq!((t.user.as_str(), t.vhost.as_str()), ("guest", "/"));
        assert!(Target::parse("http://h/", None, None, None).is_err());
    }
}
