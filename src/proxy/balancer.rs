//! Choosing a backend node per connection: round robin or least connections over the
//! healthy nodes. A node is skipped while it is in back-off after a failed connect
//! (exponential) or while the background health check (`proxy::health`) last found its port
//! closed; skipped nodes are tried last rather than never, so a cluster that is entirely
//! down is still retried. The health checks' latest results are also the readiness latch of
//! `/readyz`. Connects in progress to a node are bounded (`backend.max_connecting`): a burst
//! of clients queues here rather than in the node's accept queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// First back-off after a failed connect.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the next node is chosen among healthy ones (`backend.balance`).
pub use crate::config::BalancePolicy as Policy;

/// No backend node passed its latest health check: why not, node by node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no backend node reachable ({0})")]
pub struct NoNodeReachable(pub String);

/// What the latest background health check of a node found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Not checked yet.
    Unknown,
    /// The port accepted a connection.
    Up,
    /// It did not: why.
    Down(String),
}

struct Node {
    addr: String,
    check: Mutex<Check>,
    active: AtomicUsize,
    /// Consecutive failures and the time before which the node is skipped.
    health: Mutex<(u32, Option<Instant>)>,
    /// One permit per connect allowed in progress.
    connecting: Semaphore,
}

/// The nodes and their state, shared by every connection.
pub struct Balancer {
    nodes: Vec<Node>,
    next: AtomicUsize,
    policy: Policy,
}

/// A connection counted against a node (for least connections); released on drop.
pub struct Lease {
    balancer: Arc<Balancer>,
    node: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.balancer.nodes[self.node]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// `max_connecting`: connects in progress per node (at least 1).
    pub fn new(addrs: Vec<String>, policy: Policy, max_connecting: usize) -> Balancer {
        let nodes = addrs
            .into_iter()
            .map(|addr| Node {
                addr,
                check: Mutex::new(Check::Unknown),
                active: AtomicUsize::new(0),
                health: Mutex::new((0, None)),
                connecting: Semaphore::new(max_connecting.max(1)),
            })
            .collect();
        Balancer {
            nodes,
            next: AtomicUsize::new(0),
            policy,
        }
    }

    /// Node indexes in the order to try: healthy nodes by the policy, then nodes in back-off
    /// (soonest available first), then nodes whose health check failed.
    pub fn order(&self, now: Instant) -> Vec<usize> {
        let n = self.nodes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut healthy: Vec<usize> = Vec::with_capacity(n);
        let mut waiting: Vec<(bool, Instant, usize)> = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let down = matches!(self.check(i), Check::Down(_));
            match self.health(i).1 {
                Some(until) if until > now => waiting.push((down, until, i)),
                _ if down => waiting.push((true, now, i)),
                _ => healthy.push(i),
            }
        }
        if self.policy == Policy::LeastConnections {
            // Stable: ties keep the round-robin rotation.
            healthy.sort_by_key(|&i| self.nodes[i].active.load(Ordering::Relaxed));
        }
        waiting.sort();
        healthy.extend(waiting.into_iter().map(|(_, _, i)| i));
        healthy
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a balancer has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records a health check of node `i`; returns the previous result (to log changes).
    pub fn record_check(&self, i: usize, result: Check) -> Check {
        let mut c = self.nodes[i]
            .check
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *c, result)
    }

    /// The latest health check of node `i`.
    pub fn check(&self, i: usize) -> Check {
        self.nodes[i]
            .check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The readiness latch: ready while the latest check found at least one node up;
    /// otherwise why not, node by node.
    pub fn readiness(&self) -> Result<(), NoNodeReachable> {
        let mut why = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            match self.check(i) {
                Check::Up => return Ok(()),
                Check::Down(e) => why.push(format!("{}: {e}", node.addr)),
                Check::Unknown => why.push(format!("{}: not checked yet", node.addr)),
            }
        }
        Err(NoNodeReachable(why.join("; ")))
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.nodes[i].addr
    }

    /// Waits for a connect slot on node `i`; the connect holds it until dropped.
    pub async fn connect_slot(&self, i: usize) -> SemaphorePermit<'_> {
        // The semaphore is never closed, so acquiring cannot fail.
        self.nodes[i]
            .connecting
            .acquire()
            .await
            .expect("connect semaphore is never closed")
    }

    /// A connection to node `i` succeeded: the node is healthy; the lease counts it.
    pub fn success(self: &Arc<Self>, i: usize) -> Lease {
        *self.nodes[i]
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (0, None);
        self.nodes[i].active.fetch_add(1, Ordering::Relaxed);
        Lease {
            balancer: self.clone(),
            node: i,
        }
    }

    /// A connection to node `i` failed: skip it for a growing while.
    pub fn failure(&self, i: usize, now: Instant) {
        let mut h = self.nodes[i]
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.0 = h.0.saturating_add(1);
        let backoff = BACKOFF_BASE
            .saturating_mul(1 << (h.0 - 1).min(5))
            .min(BACKOFF_MAX);
        h.1 = Some(now + backoff);
    }

    fn health(&self, i: usize) -> (u32, Option<Instant>) {
        *self.nodes[i]
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(policy: Policy) -> Arc<Balancer> {
        Arc::new(Balancer::new(
            vec!["a".into(), "b".into(), "c".into()],
            policy,
            2,
        ))
    }

    #[test]
    fn round_robin_rotates() {
        let b = b(Policy::RoundRobin);
        let now = Instant::now();
        let firsts: Vec<usize> = (0..6).map(|_| b.order(now)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn failed_nodes_back_off_and_come_back() {
        let b = b(Policy::RoundRobin);
        let now = Instant::now();
        b.failure(1, now);
        for _ in 0..6 {
            let o = b.order(now);
            assert_eq!(*o.last().unwrap(), 1, "a failed node is tried last: {o:?}");
        }
        assert!(
            b.order(now + BACKOFF_BASE + Duration::from_millis(1))
                .iter()
                .take(3)
                .any(|&i| i == 1)
        );
        b.failure(1, now);
        // The second failure doubles the back-off.
        assert_eq!(
            *b.order(now + BACKOFF_BASE + Duration::from_millis(500))
                .last()
                .unwrap(),
            1
        );
        drop(b.success(1));
        let firsts: Vec<usize> = (0..3).map(|_| b.order(now)[0]).collect();
        assert!(
            firsts.contains(&1),
            "a success clears the back-off: {firsts:?}"
        );
    }

    #[test]
    fn nodes_that_fail_their_health_check_are_tried_last_and_decide_readiness() {
        let b = b(Policy::RoundRobin);
        let now = Instant::now();
        assert_eq!(
            b.readiness().unwrap_err().to_string(),
            "no backend node reachable (a: not checked yet; b: not checked yet; c: not checked yet)"
        );
        // Unchecked nodes are tried as usual.
        assert_eq!(b.order(now), [0, 1, 2]);
        assert_eq!(
            b.record_check(1, Check::Down("refused".into())),
            Check::Unknown
        );
        assert_eq!(
            b.record_check(0, Check::Down("timed out".into())),
            Check::Unknown
        );
        assert!(b.readiness().is_err());
        b.record_check(2, Check::Up);
        assert_eq!(b.readiness(), Ok(()));
        for _ in 0..4 {
            let o = b.order(now);
            assert_eq!(o[0], 2, "the one node up comes first: {o:?}");
            assert_eq!(o.len(), 3, "down nodes are still tried, last: {o:?}");
        }
        // A node in back-off comes before nodes that are down.
        b.record_check(0, Check::Up);
        b.failure(0, now);
        assert_eq!(b.order(now)[1..], [0, 1]);
        b.record_check(2, Check::Down("refused".into()));
        b.record_check(0, Check::Down("refused".into()));
        assert_eq!(
            b.readiness().unwrap_err().to_string(),
            "no backend node reachable (a: refused; b: refused; c: refused)"
        );
    }

    #[test]
    fn least_connections_prefers_idle_nodes() {
        let b = b(Policy::LeastConnections);
        let now = Instant::now();
        let _l0 = b.success(0);
        let _l0b = b.success(0);
        let _l2 = b.success(2);
        assert_eq!(b.order(now)[0], 1);
    }

    #[tokio::test]
    async fn connect_slots_are_bounded_per_node() {
        let b = b(Policy::RoundRobin);
        let first = b.connect_slot(0).await;
        let _second = b.connect_slot(0).await;
        let wait = Duration::from_millis(50);
        assert!(
            tokio::time::timeout(wait, b.connect_slot(0)).await.is_err(),
            "a third connect to node 0 waits"
        );
        let _other = tokio::time::timeout(wait, b.connect_slot(1))
            .await
            .expect("another node has its own slots");
        drop(first);
        let _third = tokio::time::timeout(wait, b.connect_slot(0))
            .await
            .expect("a released slot is taken");
    }
}
