//! Choosing a backend node per connection: round robin or least connections over the
//! healthy nodes, failed nodes skipped with exponential back-off (and tried last rather than
//! never, so a cluster that is entirely down is still retried). Connects in progress to a
//! node are bounded (`backend.max_connecting`): a burst of clients queues here rather than in
//! the node's accept queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// First back-off after a failed connect.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the next node is chosen among healthy ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    LeastConnections,
}

struct Node {
    addr: String,
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
    /// (soonest available first).
    pub fn order(&self, now: Instant) -> Vec<usize> {
        let n = self.nodes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut healthy: Vec<usize> = Vec::with_capacity(n);
        let mut waiting: Vec<(Instant, usize)> = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            match self.health(i).1 {
                Some(until) if until > now => waiting.push((until, i)),
                _ => healthy.push(i),
            }
        }
        if self.policy == Policy::LeastConnections {
            // Stable: ties keep the round-robin rotation.
            healthy.sort_by_key(|&i| self.nodes[i].active.load(Ordering::Relaxed));
        }
        waiting.sort();
        healthy.extend(waiting.into_iter().map(|(_, i)| i));
        healthy
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
