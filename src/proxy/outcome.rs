//! How a client connection ends and why a login is refused, as types: each has the stable
//! label that metrics, logs and the audit log use, mapped in one place.

use super::relay::RelayEnd;

/// How a client connection ended: the `cause` label of `connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// Accepted beyond `listener.max_connections`: closed at once.
    Limit,
    /// More connections from the client's address than `max_connections_per_source`.
    SourceLimit,
    /// Faster handshakes from the client's address than `handshakes_per_second_per_source`.
    HandshakeRate,
    /// A missing or malformed PROXY protocol header.
    ProxyHeader,
    /// The TLS handshake failed.
    TlsFailed,
    /// The handshake did not finish within `listener.handshake_timeout`.
    HandshakeTimeout,
    /// The client broke the handshake's protocol.
    HandshakeFailed,
    /// The client went away (before or after the handshake).
    ClientClosed,
    /// Every backend of `[auth] backends` refused the login, or its source was refused.
    Refused,
    /// The token grants no access to the vhost.
    VhostRefused,
    /// The identity's connection limit.
    IdentityLimit,
    /// No backend node could be reached (or it failed the handshake).
    BackendUnavailable,
    /// The broker closed the connection.
    BackendClosed,
    /// The token expired during the session (`320 credential expired`).
    Expired,
    /// The relay ended in error (I/O, or a protocol violation answered with a close).
    Error,
}

impl ConnectionEnd {
    /// The label in `connections_closed_total{cause}`.
    pub fn label(self) -> &'static str {
        match self {
            ConnectionEnd::Limit => "limit",
            ConnectionEnd::SourceLimit => "source_limit",
            ConnectionEnd::HandshakeRate => "handshake_rate",
            ConnectionEnd::ProxyHeader => "proxy_header",
            ConnectionEnd::TlsFailed => "tls_failed",
            ConnectionEnd::HandshakeTimeout => "handshake_timeout",
            ConnectionEnd::HandshakeFailed => "handshake_failed",
            ConnectionEnd::ClientClosed => "client_closed",
            ConnectionEnd::Refused => "refused",
            ConnectionEnd::VhostRefused => "vhost_refused",
            ConnectionEnd::IdentityLimit => "identity_limit",
            ConnectionEnd::BackendUnavailable => "backend_unavailable",
            ConnectionEnd::BackendClosed => "backend_closed",
            ConnectionEnd::Expired => "expired",
            ConnectionEnd::Error => "error",
        }
    }
}

impl From<&RelayEnd> for ConnectionEnd {
    fn from(end: &RelayEnd) -> ConnectionEnd {
        match end {
            RelayEnd::ClientClosed => ConnectionEnd::ClientClosed,
            RelayEnd::BackendClosed => ConnectionEnd::BackendClosed,
            RelayEnd::Expired => ConnectionEnd::Expired,
            RelayEnd::Error(_) => ConnectionEnd::Error,
        }
    }
}

/// Why the `internal` backend of the chain refused a login.
#[derive(Debug)]
pub enum InternalRefusal {
    /// The user is in its failed-password back-off from this address: the broker is not
    /// asked.
    CachedFailure,
    /// The broker refused the credentials: its close, passed on to the client as it is.
    Refused(BrokerClose),
    /// No node could be asked.
    BackendUnavailable,
}

impl InternalRefusal {
    /// The `reason` label of `authentications_total` and the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            InternalRefusal::CachedFailure => "cached_failure",
            InternalRefusal::Refused(_) => "refused",
            InternalRefusal::BackendUnavailable => "backend_unavailable",
        }
    }

    /// The broker's close, when the broker refused.
    pub fn into_close(self) -> Option<BrokerClose> {
        match self {
            InternalRefusal::Refused(close) => Some(close),
            _ => None,
        }
    }
}

/// The broker's `connection.close` refusing a login, passed on to the client as it is.
#[derive(Debug)]
pub struct BrokerClose {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable() {
        // Dashboards and alerts use these: a rename is a breaking change.
        let all = [
            (ConnectionEnd::Limit, "limit"),
            (ConnectionEnd::SourceLimit, "source_limit"),
            (ConnectionEnd::HandshakeRate, "handshake_rate"),
            (ConnectionEnd::ProxyHeader, "proxy_header"),
            (ConnectionEnd::TlsFailed, "tls_failed"),
            (ConnectionEnd::HandshakeTimeout, "handshake_timeout"),
            (ConnectionEnd::HandshakeFailed, "handshake_failed"),
            (ConnectionEnd::ClientClosed, "client_closed"),
            (ConnectionEnd::Refused, "refused"),
            (ConnectionEnd::VhostRefused, "vhost_refused"),
            (ConnectionEnd::IdentityLimit, "identity_limit"),
            (ConnectionEnd::BackendUnavailable, "backend_unavailable"),
            (ConnectionEnd::BackendClosed, "backend_closed"),
            (ConnectionEnd::Expired, "expired"),
            (ConnectionEnd::Error, "error"),
        ];
        for (end, label) in all {
            assert_eq!(end.label(), label);
        }
        assert_eq!(InternalRefusal::CachedFailure.reason(), "cached_failure");
        assert_eq!(
            InternalRefusal::BackendUnavailable.reason(),
            "backend_unavailable"
        );
    }
}
