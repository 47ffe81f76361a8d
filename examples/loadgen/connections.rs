//! `churn` (connect, authenticate, open, close, over and over) and `idle` (many open
//! connections held still). Both measure connection setup, the part of the gateway's
//! cost that the data path does not show: TLS, token verification, the backend handshake.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{Conn, Error, SMALL_READ_BUFFER, Target};

/// One connection attempt may take this long before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed attempt a churn task waits this long, so that a refusing server is not
/// hammered in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How many idle connections are being opened (or closed) at once.
const IDLE_CONCURRENCY: usize = 32;
const IDLE_CLOSE_CONCURRENCY: usize = 64;

pub struct ChurnReport {
    pub seconds: f64,
    pub connections: u64,
    pub conns_per_s: f64,
    /// p50 and p99 of TCP connect → `connection.open-ok`, in milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

async fn connect_bounded(target: &Target) -> Result<Conn, Error> {
    tokio::time::timeout(CONNECT_TIMEOUT, target.connect(SMALL_READ_BUFFER))
        .await
        .unwrap_or_else(|_| Err(Error::Protocol("connection not open within 10 s".into())))
}

/// One connection through open-ok and closed cleanly first: a refused login or a wrong
/// address is reported once and ends the run, instead of becoming thousands of errors.
pub async fn probe(target: &Target) -> Result<(), String> {
    let c = connect_bounded(target).await.map_err(|e| e.to_string())?;
    c.close().await.map_err(|e| format!("close: {e}"))
}

pub async fn churn(target: Arc<Target>, duration: f64, concurrency: usize) -> ChurnReport {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration);
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                // Microseconds, 1 µs .. 100 s.
                let mut hist = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3)
                    .expect("static histogram bounds");
                let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < end {
                    let t = Instant::now();
                    let res = match connect_bounded(&target).await {
                        Ok(c) => {
                            hist.saturating_record(t.elapsed().as_micros() as u64);
                            c.close().await
                        }
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(()) => done += 1,
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e.to_string());
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                }
                (done, errors, first_error, hist)
            })
        })
        .collect();
    let mut r = ChurnReport {
        seconds: 0.0,
        connections: 0,
        conns_per_s: 0.0,
        p50_ms: None,
        p99_ms: None,
        errors: 0,
        first_error: None,
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).expect("static bounds");
    for t in tasks {
        match t.await {
            Ok((done, errors, first, h)) => {
                r.connections += done;
                r.errors += errors;
                if r.first_error.is_none() {
                    r.first_error = first;
                }
                let _ = hist.add(&h);
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e.to_string());
            }
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    r.conns_per_s = r.connections as f64 / r.seconds;
    if !hist.is_empty() {
        r.p50_ms = Some(hist.value_at_quantile(0.5) as f64 / 1e3);
        r.p99_ms = Some(hist.value_at_quantile(0.99) as f64 / 1e3);
    }
    r
}

pub struct IdleReport {
    pub connections: u64,
    pub opened: u64,
    pub failed: u64,
    pub open_seconds: f64,
    pub first_error: Option<String>,
}

/// Opens `n` connections (through `channel.open` on channel 1) at `rate` per second
/// (0: as fast as [`IDLE_CONCURRENCY`] allows), says `ready` on stderr, holds them for
/// `hold` seconds, then closes them all.
pub async fn idle(target: Arc<Target>, n: u64, hold: f64, rate: f64) -> IdleReport {
    let start = Instant::now();
    let slots = Arc::new(Semaphore::new(IDLE_CONCURRENCY));
    let mut pace = (rate > 0.0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    let mut tasks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let res = async {
                let mut c = connect_bounded(&target).await?;
                tokio::time::timeout(CONNECT_TIMEOUT, c.open_channel(1))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Protocol("no channel.open-ok within 10 s".into()))
                    })?;
                Ok::<_, Error>(c)
            }
            .await;
            drop(slot);
            res
        }));
    }
    let mut held = Vec::with_capacity(n as usize);
    let mut r = IdleReport {
        connections: n,
        opened: 0,
        failed: 0,
        open_seconds: 0.0,
        first_error: None,
    };
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(e)) => {
                r.failed += 1;
                r.first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert(e.to_string());
            }
        }
    }
    r.opened = held.len() as u64;
    r.open_seconds = start.elapsed().as_secs_f64();
    if r.failed == 0 {
        eprintln!("all {} open", r.opened);
    } else {
        eprintln!("{} open, {} failed", r.opened, r.failed);
    }
    eprintln!("ready");
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;

    let slots = Arc::new(Semaphore::new(IDLE_CLOSE_CONCURRENCY));
    let closes: Vec<_> = held
        .into_iter()
        .map(|c| {
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await;
                c.close().await
            })
        })
        .collect();
    let mut close_errors = 0;
    for c in closes {
        if !matches!(c.await, Ok(Ok(()))) {
            close_errors += 1;
        }
    }
    if close_errors > 0 {
        eprintln!("loadgen: {close_errors} connections did not close cleanly");
    }
    r
}
