//! PROXY protocol v1/v2 (as AWS Network Load Balancers and HAProxy send it): the client's
//! real address, read before TLS. Parsing is the `ppp` crate's; this module only peeks at
//! the socket, bounded in size (and, by the caller, in time), and consumes exactly the
//! header so TLS starts at the next byte.

use std::net::SocketAddr;

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Largest PROXY header accepted (v1 is at most 107 bytes; v2 TLVs from load balancers are
/// small).
pub const MAX_HEADER: usize = 4096;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("closed before the PROXY header")]
    Closed,
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("invalid PROXY v2 header: {0}")]
    InvalidV2(String),
    #[error("invalid PROXY header: {0}")]
    InvalidV1(String),
}

/// Reads the PROXY header at the start of `stream`. Returns the client address it names,
/// or `None` for a `LOCAL` / `UNKNOWN` header (a load balancer's own health check: the
/// socket's peer address stands).
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let parsed = HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n == MAX_HEADER {
                return Err(ProxyHeaderError::TooLong);
            }
            // A load balancer sends the header in one segment, so this is rare; peeked
            // bytes keep the socket readable, hence a short sleep rather than `readable()`.
            // The caller's deadline bounds the wait.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        }
        let (len, addr) = match parsed {
            HeaderResult::V2(Ok(h)) => (h.len(), v2_source(&h)),
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_source(&h)),
            HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::InvalidV2(format!("{e:?}"))),
            HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::InvalidV1(format!("{e:?}"))),
        };
        let mut consumed = vec![0u8; len];
        stream.read_exact(&mut consumed).await?;
        return Ok(addr);
    }
}

fn v2_source(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match h.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    }
}

fn v1_source(h: &v1::Header<'_>) -> Option<SocketAddr> {
    match h.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}
