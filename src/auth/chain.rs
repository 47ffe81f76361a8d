//! Logins beside tokens: who may log in from where, and the failed-login back-off for the
//! broker's internal users.
//!
//! - [`SourceRules`] (pure): RabbitMQ's `loopback_users`, judged against the client's real
//!   address (the PROXY header's when enabled; the broker sees only the gateway's), and
//!   the gateway's per-user source networks. RabbitMQ applies `loopback_users` after a
//!   successful login, whichever backend accepted it, and so does the gateway.
//! - [`PasswordBackoff`]: after an internal login the broker refused, further attempts for
//!   that username from that address are refused without asking the broker, for 1 s
//!   doubling to 60 s (the same schedule as failed tokens, [`super::FAILURE_BACKOFF_MIN`]),
//!   so a password cannot be guessed faster than the back-off allows.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use moka::future::Cache;
use sha2::{Digest, Sha256};

#[cfg(test)]
use super::FAILURE_BACKOFF_MIN;
use super::{FAILED_TOKEN_CACHE_SIZE, FAILURE_BACKOFF_MAX};

/// Why a login that a backend accepted is refused for its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    /// A `loopback_users` user from a non-loopback address.
    Loopback,
    /// A user with `[auth.sources]` from an address outside them.
    Network,
}

impl SourceRefusal {
    /// The reason in logs, metrics and the audit log.
    pub fn reason(self) -> &'static str {
        match self {
            SourceRefusal::Loopback => "loopback_only",
            SourceRefusal::Network => "source_network",
        }
    }
}

/// `loopback_users` and `[auth.sources]`.
#[derive(Debug, Clone, Default)]
pub struct SourceRules {
    loopback_users: Vec<String>,
    sources: BTreeMap<String, Vec<ipnet::IpNet>>,
}

impl SourceRules {
    /// Users that may log in from loopback addresses only, and users that may log in
    /// only from the given networks.
    pub fn new(
        loopback_users: Vec<String>,
        sources: BTreeMap<String, Vec<ipnet::IpNet>>,
    ) -> SourceRules {
        SourceRules {
            loopback_users,
            sources,
        }
    }

    /// Whether `username` may be logged in from `ip`.
    pub fn check(&self, username: &str, ip: IpAddr) -> Result<(), SourceRefusal> {
        // RabbitMQ's `rabbit_net:is_loopback`: 127.0.0.0/8, ::1 and IPv4-mapped 127.x.
        let ip = ip.to_canonical();
        if !ip.is_loopback() && self.loopback_users.iter().any(|u| u == username) {
            return Err(SourceRefusal::Loopback);
        }
        match self.sources.get(username) {
            Some(nets) if !nets.iter().any(|n| n.contains(&ip)) => Err(SourceRefusal::Network),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Copy)]
struct Failure {
    failures: u32,
    until: Instant,
}

/// Failed internal logins per (username, source address).
pub struct PasswordBackoff {
    failed: Cache<([u8; 32], IpAddr), Failure>,
}

impl Default for PasswordBackoff {
    fn default() -> Self {
        PasswordBackoff {
            failed: Cache::builder()
                .max_capacity(FAILED_TOKEN_CACHE_SIZE)
                .time_to_live(FAILURE_BACKOFF_MAX * 2)
                .build(),
        }
    }
}

fn key(username: &str, ip: IpAddr) -> ([u8; 32], IpAddr) {
    (
        Sha256::digest(username.as_bytes()).into(),
        ip.to_canonical(),
    )
}

impl PasswordBackoff {
    /// Whether logins for `username` from `ip` are in back-off now.
    pub async fn blocked(&self, username: &str, ip: IpAddr) -> bool {
        self.failed
            .get(&key(username, ip))
            .await
            .is_some_and(|f| Instant::now() < f.until)
    }

    /// The broker refused a login: the back-off starts, or doubles.
    pub async fn failed(&self, username: &str, ip: IpAddr) {
        let k = key(username, ip);
        let failures = self
            .failed
            .get(&k)
            .await
            .map_or(1, |f| f.failures.saturating_add(1));
        let until = Instant::now() + super::backoff_after(failures);
        self.failed.insert(k, Failure { failures, until }).await;
    }

    /// A login succeeded: its back-off is forgotten.
    pub async fn succeeded(&self, username: &str, ip: IpAddr) {
        self.failed.invalidate(&key(username, ip)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(loopback: &[&str], sources: &[(&str, &[&str])]) -> SourceRules {
        SourceRules {
            loopback_users: loopback.iter().map(|s| s.to_string()).collect(),
            sources: sources
                .iter()
                .map(|(u, nets)| {
                    (
                        u.to_string(),
                        nets.iter().map(|n| n.parse().unwrap()).collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn loopback_users_only_from_loopback_addresses() {
        let r = rules(&["guest"], &[]);
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(r.check("guest", ip.parse().unwrap()), Ok(()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.0.2.2",
            "::ffff:10.0.0.1",
            "fd00::2",
            "0.0.0.0",
        ] {
            assert_eq!(
                r.check("guest", ip.parse().unwrap()),
                Err(SourceRefusal::Loopback),
                "{ip}"
            );
        }
        // Names match exactly, as RabbitMQ's list membership does.
        assert_eq!(r.check("Guest", "10.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(r.check("guest2", "10.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(
            rules(&[], &[]).check("guest", "10.0.0.1".parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn source_networks_allow_only_their_addresses() {
        let r = rules(&[], &[("monitor", &["10.0.0.0/8", "2001:db8::/32"])]);
        assert_eq!(r.check("monitor", "10.9.8.7".parse().unwrap()), Ok(()));
        assert_eq!(
            r.check("monitor", "::ffff:10.9.8.7".parse().unwrap()),
            Ok(())
        );
        assert_eq!(r.check("monitor", "2001:db8::1".parse().unwrap()), Ok(()));
        assert_eq!(
            r.check("monitor", "127.0.0.1".parse().unwrap()),
            Err(SourceRefusal::Network)
        );
        assert_eq!(
            r.check("monitor", "11.0.0.1".parse().unwrap()),
            Err(SourceRefusal::Network)
        );
        assert_eq!(r.check("other", "11.0.0.1".parse().unwrap()), Ok(()));
        // Both rules apply: a loopback user with networks needs loopback and a network.
        let both = rules(&["m"], &[("m", &["127.0.0.1/32"])]);
        assert_eq!(both.check("m", "127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(
            both.check("m", "127.0.0.2".parse().unwrap()),
            Err(SourceRefusal::Network)
        );
    }

    #[tokio::test]
    async fn failed_logins_back_off_per_user_and_source() {
        let b = PasswordBackoff::default();
        let (ip, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(!b.blocked("u", ip).await);
        b.failed("u", ip).await;
        assert!(b.blocked("u", ip).await);
        assert!(!b.blocked("u", other).await, "another source");
        assert!(!b.blocked("v", ip).await, "another user");
        b.succeeded("u", ip).await;
        assert!(!b.blocked("u", ip).await);
        // The back-off doubles: after 3 failures it is 4 s.
        for _ in 0..3 {
            b.failed("u", ip).await;
        }
        let f = b.failed.get(&key("u", ip)).await.unwrap();
        assert_eq!(f.failures, 3);
        let left = f.until - Instant::now();
        assert!(left > std::time::Duration::from_millis(3_500) && left <= FAILURE_BACKOFF_MIN * 4);
    }
}
