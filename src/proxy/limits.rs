//! Connection limits by client address and by identity, and a handshake rate limit by
//! client address. Counted at accept (address) and at `connection.open` (identity); the
//! returned guards give the slot back when the connection ends. Maps are bounded by the
//! number of open connections (entries at zero are removed) and, for the rate limiter, by
//! a periodic sweep.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::outcome::ConnectionEnd;

/// Most addresses the rate limiter remembers; beyond it idle entries are swept.
const MAX_RATE_ENTRIES: usize = 65_536;

/// Limits shared by every connection.
pub struct Limits {
    per_source: AtomicU32,
    per_identity: AtomicU32,
    rate: AtomicU32,
    sources: Mutex<HashMap<IpAddr, u32>>,
    identities: Mutex<HashMap<String, u32>>,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// A held slot; dropping it releases the slot.
pub struct Slot<K: std::hash::Hash + Eq + Clone> {
    map: Arc<Limits>,
    key: K,
    release: fn(&Limits, &K),
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        (self.release)(&self.map, &self.key);
    }
}

impl Limits {
    pub fn new(per_source: u32, per_identity: u32, rate: u32) -> Limits {
        Limits {
            per_source: AtomicU32::new(per_source),
            per_identity: AtomicU32::new(per_identity),
            rate: AtomicU32::new(rate),
            sources: Mutex::default(),
            identities: Mutex::default(),
            buckets: Mutex::default(),
        }
    }

    /// Changes the limits (a reload); connections already counted stay counted.
    pub fn set(&self, per_source: u32, per_identity: u32, rate: u32) {
        self.per_source.store(per_source, Ordering::Relaxed);
        self.per_identity.store(per_identity, Ordering::Relaxed);
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// A new connection from `ip`: `Err` with the reason when it must be closed.
    pub fn admit_source(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Option<Slot<IpAddr>>, ConnectionEnd> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate > 0 && !self.take_token(ip, rate, now) {
            return Err(ConnectionEnd::HandshakeRate);
        }
        let limit = self.per_source.load(Ordering::Relaxed);
        if limit == 0 {
            return Ok(None);
        }
        let mut m = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return Err(ConnectionEnd::SourceLimit);
        }
        *n += 1;
        Ok(Some(Slot {
            map: self.clone(),
            key: ip,
            release: |l, k| release(&l.sources, k),
        }))
    }

    /// An authenticated connection for `sub`: `Err(limit)` when it has too many.
    pub fn admit_identity(self: &Arc<Self>, sub: &str) -> Result<Option<Slot<String>>, u32> {
        let limit = self.per_identity.load(Ordering::Relaxed);
        if limit == 0 {
            return Ok(None);
        }
        let mut m = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(sub.to_owned()).or_insert(0);
        if *n >= limit {
            return Err(limit);
        }
        *n += 1;
        Ok(Some(Slot {
            map: self.clone(),
            key: sub.to_owned(),
            release: |l, k| release(&l.identities, k),
        }))
    }

    fn take_token(&self, ip: IpAddr, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate);
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= MAX_RATE_ENTRIES {
            // Entries that have refilled completely carry no information.
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
        }
        let (tokens, at) = b.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn release<K: std::hash::Hash + Eq>(m: &Mutex<HashMap<K, u32>>, key: &K) {
    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = m.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            m.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_source_slots_are_released() {
        let l = Arc::new(Limits::new(2, 0, 0));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let a = l.admit_source(ip, now).unwrap();
        let _b = l.admit_source(ip, now).unwrap();
        assert_eq!(
            l.admit_source(ip, now).err().map(ConnectionEnd::label),
            Some("source_limit")
        );
        assert!(
            l.admit_source("192.0.2.2".parse().unwrap(), now).is_ok(),
            "other addresses are not affected"
        );
        drop(a);
        assert!(l.admit_source(ip, now).is_ok());
    }

    #[test]
    fn per_identity() {
        let l = Arc::new(Limits::new(0, 1, 0));
        let s = l.admit_identity("arn:x").unwrap();
        assert_eq!(l.admit_identity("arn:x").err(), Some(1));
        drop(s);
        assert!(l.admit_identity("arn:x").is_ok());
    }

    #[test]
    fn handshake_rate_refills() {
        let l = Arc::new(Limits::new(0, 0, 5));
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.admit_source(ip, t0).is_ok());
        }
        assert_eq!(
            l.admit_source(ip, t0).err().map(ConnectionEnd::label),
            Some("handshake_rate")
        );
        assert!(
            l.admit_source(ip, t0 + Duration::from_millis(250)).is_ok(),
            "one token back after 200 ms"
        );
        assert_eq!(
            l.admit_source(ip, t0 + Duration::from_millis(250))
                .err()
                .map(ConnectionEnd::label),
            Some("handshake_rate")
        );
    }
}
