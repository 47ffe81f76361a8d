//! Background health checks of the backend nodes: every `backend.health_check_interval_ms`
//! each node's port gets a TCP connect (name resolution included), bounded by
//! [`BACKEND_HEALTH_CHECK_TIMEOUT`] and `backend.connect_timeout_ms`. The results feed the
//! balancer (nodes found down are tried last, so a client does not pay for a node that is
//! gone) and are the readiness latch of `/readyz` (which no longer opens connections itself:
//! probes from several systems every few seconds would otherwise become backend load).
//! Changes are logged once and exported as `backend_node_up`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::balancer::{Balancer, Check};
use crate::config::BackendConfig;

/// Longest health check of one node (shorter when `backend.connect_timeout_ms` is).
pub const BACKEND_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
use crate::telemetry::metrics::Metrics;

/// How long one check of one node may take under `cfg`.
pub fn check_timeout(cfg: &BackendConfig) -> Duration {
    BACKEND_HEALTH_CHECK_TIMEOUT.min(cfg.connect_timeout)
}

/// Checks every node once, at the same time, and records the results.
pub async fn check_all(balancer: &Arc<Balancer>, timeout: Duration, metrics: &Metrics) {
    let mut checks = JoinSet::new();
    for i in 0..balancer.len() {
        let addr = balancer.addr(i).to_owned();
        checks.spawn(async move {
            let result = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Check::Up,
                Ok(Err(e)) => Check::Down(e.to_string()),
                Err(_) => Check::Down(format!("no answer within {} ms", timeout.as_millis())),
            };
            (i, result)
        });
    }
    while let Some(done) = checks.join_next().await {
        let Ok((i, result)) = done else { continue };
        let addr = balancer.addr(i);
        let up = result == Check::Up;
        metrics
            .backend_node_up
            .with_label_values(&[addr])
            .set(i64::from(up));
        match (balancer.record_check(i, result.clone()), &result) {
            (Check::Down(_) | Check::Unknown, Check::Up) => {
                tracing::info!(node = %addr, "backend node up (health check)");
            }
            (Check::Up | Check::Unknown, Check::Down(why)) => {
                tracing::warn!(node = %addr, error = %why, "backend node down (health check): tried last until it answers");
            }
            _ => {}
        }
    }
}

/// Checks the nodes every `interval` until the balancer is dropped (a reload that changes
/// the nodes builds a new one, with its own checks).
pub fn spawn(
    balancer: Weak<Balancer>,
    interval: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(b) = balancer.upgrade() else { return };
            check_all(&b, timeout, &metrics).await;
        }
    });
}
