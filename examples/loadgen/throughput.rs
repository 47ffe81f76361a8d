//! `throughput`: producers publish to one queue, consumers drain it; rates and
//! publish-to-consume latency are measured on the consumer side.
//!
//! The data path is hand-written over the crate's framing: a publish is three pre-encoded
//! pieces (method frame, content header, body frames) copied into one batch buffer with an
//! 8-byte send timestamp patched in, and deliveries are read in place from a 256 KiB read
//! buffer. Nothing is allocated per message, so the generator is not what is measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, confirm, queue};
use amq_protocol::types::FieldTable;
use amqp_iam_gateway::amqp::method::short;
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, Error, Target};
use crate::clock;
use crate::consumer::{Consumer, ConsumerResult, start_consumer};
use crate::producer::{Producer, ProducerResult};

/// Read buffer of a consumer or producer connection: large reads, few syscalls.
pub(crate) const READ_BUFFER: usize = 256 * 1024;
/// A read is attempted only with at least this much room left in the buffer.
pub(crate) const MIN_READ_ROOM: usize = 64 * 1024;
/// How long after the planned end the run is cut short, whatever the broker does.
const GRACE: Duration = Duration::from_secs(10);
/// How long producers may still wait for confirms once the consumers are done.
const CONFIRM_GRACE: Duration = Duration::from_secs(5);
/// How long deleting the queue and closing the setup connection may take at the end.
const CLEANUP: Duration = Duration::from_secs(4);
/// With `--count`, the run ends when nothing was consumed for this long.
const STALL: Duration = Duration::from_secs(10);
/// Consumers on channel 1 of their own connections; so are producers.
pub(crate) const CH: u16 = 1;

/// The options of the `throughput` mode, parsed by clap (flattened into `Mode::Throughput`).
#[derive(Args)]
pub struct Opts {
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Message body size in bytes (latency needs at least 8).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Publisher confirms with at most this many unconfirmed messages per producer
    /// (0: no confirms).
    #[arg(long, default_value_t = 0)]
    pub confirm_window: u64,
    /// basic.qos prefetch count per consumer (0: unlimited).
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// Measured seconds (after the warm-up). Default 10 without --count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Publish this many messages in all and stop when they are consumed.
    #[arg(long)]
    pub count: Option<u64>,
    /// Aggregate publish rate in msgs/s (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds at the start that are not measured. Default 1, or 0 with --count.
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Queue to use (declared non-durable, kept); default a fresh `loadgen-<pid>-<n>`,
    /// deleted at the end. With `--queues N` above 1, `-<k>` is appended for each.
    #[arg(long)]
    pub queue: Option<String>,
    /// Queues: producer `i` publishes to queue `i mod N`, consumer `j` drains queue
    /// `j mod N` (100 producers and 100 consumers on 100 queues: one pair per queue).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
}

impl Opts {
    /// The measured seconds: `--duration`, or 10 when neither it nor `--count` is given.
    fn measured_seconds(&self) -> Option<f64> {
        match (self.duration, self.count) {
            (None, None) => Some(10.0),
            (d, _) => d,
        }
    }

    /// The warm-up seconds: `--warmup`, or 1 (0 with `--count`).
    fn warmup_seconds(&self) -> f64 {
        self.warmup
            .unwrap_or(if self.count.is_some() { 0.0 } else { 1.0 })
    }
}

pub struct Report {
    pub seconds: f64,
    pub published: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub consumed: u64,
    pub measured: u64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    /// p50, p99, p99.9 in microseconds; `None` when the body is too small for a timestamp
    /// or nothing was measured.
    pub latency_us: Option<[f64; 3]>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// The clock points of a run, as nanoseconds of the process-wide [`clock`].
#[derive(Clone, Copy)]
pub(crate) struct Plan {
    pub start: Instant,
    /// Measurement window start: deliveries received before it are not measured.
    pub measure_from: u64,
    /// Planned end (duration mode): publishing and measuring stop here.
    pub end: Option<Instant>,
    /// Whatever happens, the run is over at this point.
    pub hard_end: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct Shared {
    /// Messages consumed by all consumers, for `--count`.
    pub consumed: AtomicU64,
}

pub async fn run(target: Arc<Target>, o: Opts) -> Result<Report, String> {
    let generated = o.queue.is_none();
    let base = o.queue.clone().unwrap_or_else(|| {
        format!(
            "loadgen-{}-{}",
            std::process::id(),
            clock::now_ns() % 1_000_000
        )
    });
    let queues = o.queues.max(1);
    let names: Vec<String> = if queues == 1 {
        vec![base]
    } else {
        (0..queues).map(|k| format!("{base}-{k}")).collect()
    };
    let mut setup = connect_channel(&target)
        .await
        .map_err(|e| format!("setup connection: {e}"))?;
    for qname in &names {
        let declare = queue::Declare {
            queue: short(qname),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        setup
            .call(
                CH,
                AMQPClass::Queue(queue::AMQPMethod::Declare(declare)),
                |c| matches!(c, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))).then_some(()),
            )
            .await
            .map_err(|e| format!("queue.declare {qname}: {e}"))?;
    }

    let result = run_clients(&target, &o, &names).await;

    // Bounded as a whole: when the broker or proxy has stopped answering, the run still
    // ends by itself.
    let cleanup = async {
        let delete_all = if generated { &names[..] } else { &[] };
        for qname in delete_all {
            let delete = queue::Delete {
                queue: short(qname),
                if_unused: false,
                if_empty: false,
                nowait: false,
            };
            let deleted = setup
                .call(
                    CH,
                    AMQPClass::Queue(queue::AMQPMethod::Delete(delete)),
                    |c| matches!(c, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))).then_some(()),
                )
                .await;
            if deleted.is_err() {
                eprintln!("loadgen: could not delete queue {qname}");
                break;
            }
        }
        let _ = setup.close().await;
    };
    // Deleting many queues takes longer: a round trip each.
    let cleanup_time = CLEANUP + Duration::from_millis(10) * queues as u32;
    if tokio::time::timeout(cleanup_time, cleanup).await.is_err() {
        eprintln!("loadgen: no answer to queue.delete / connection.close, giving up");
    }
    result
}

pub(crate) async fn connect_channel(target: &Target) -> Result<Conn, Error> {
    let mut c = target.connect(READ_BUFFER).await?;
    c.open_channel(CH).await?;
    Ok(c)
}

async fn run_clients(target: &Arc<Target>, o: &Opts, names: &[String]) -> Result<Report, String> {
    let mut consumers = Vec::with_capacity(o.consumers);
    for i in 0..o.consumers {
        let c = start_consumer(target, o.prefetch, &names[i % names.len()], i)
            .await
            .map_err(|e| format!("consumer {i}: {e}"))?;
        consumers.push(c);
    }
    let mut producers = Vec::with_capacity(o.producers);
    for i in 0..o.producers {
        let mut c = connect_channel(target)
            .await
            .map_err(|e| format!("producer {i}: {e}"))?;
        if o.confirm_window > 0 {
            let select = confirm::Select { nowait: false };
            c.call(
                CH,
                AMQPClass::Confirm(confirm::AMQPMethod::Select(select)),
                |c| matches!(c, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))).then_some(()),
            )
            .await
            .map_err(|e| format!("producer {i}: confirm.select: {e}"))?;
        }
        producers.push(c);
    }

    let start = Instant::now();
    let warmup = Duration::from_secs_f64(o.warmup_seconds());
    let end = o
        .measured_seconds()
        .map(|d| start + warmup + Duration::from_secs_f64(d));
    let plan = Plan {
        start,
        measure_from: clock::ns_at(start + warmup),
        end,
        hard_end: end.map(|e| e + GRACE),
    };
    let shared = Arc::new(Shared::default());
    let cancel = CancellationToken::new();
    // Reaching `--count` stops the consumers; the producers may still collect confirms.
    let consumers_stop = cancel.child_token();

    let consumer_tasks: Vec<JoinHandle<ConsumerResult>> = consumers
        .into_iter()
        .map(|conn| {
            let c = Consumer {
                conn,
                plan,
                count: o.count,
                ack_every: if o.prefetch == 0 {
                    256
                } else {
                    (o.prefetch as u64 / 2).max(1)
                },
                shared: shared.clone(),
                cancel: consumers_stop.clone(),
            };
            tokio::spawn(c.run())
        })
        .collect();
    let per_rate = o.rate / o.producers.max(1) as f64;
    let producer_tasks: Vec<JoinHandle<ProducerResult>> = producers
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let quota = o.count.map(|n| {
                let p = o.producers as u64;
                n / p + u64::from((i as u64) < n % p)
            });
            let qname = &names[i % names.len()];
            let p = Producer::new(conn, qname, o.size, plan, quota, per_rate, o.confirm_window);
            tokio::spawn(p.run(cancel.clone()))
        })
        .collect();

    let cut_short = watchdog(
        &shared,
        plan,
        o.count.is_some(),
        &cancel,
        &consumer_tasks,
        &producer_tasks,
    )
    .await;

    let mut report = Report {
        seconds: 0.0,
        published: 0,
        confirmed: 0,
        nacked: 0,
        consumed: 0,
        measured: 0,
        msgs_per_s: 0.0,
        mb_per_s: 0.0,
        latency_us: None,
        errors: 0,
        first_error: None,
    };
    let note = |e: Option<String>, r: &mut Report| {
        if let Some(e) = e {
            r.errors += 1;
            r.first_error.get_or_insert(e);
        }
    };
    let mut hist = new_histogram();
    let mut bytes = 0u64;
    let mut last_ns = 0u64;
    let mut closing = Vec::new();
    for t in producer_tasks {
        let r = t.await.map_err(|e| e.to_string())?;
        report.published += r.published;
        report.confirmed += r.acked;
        report.nacked += r.nacked;
        note(r.error, &mut report);
        closing.extend(r.conn);
    }
    for t in consumer_tasks {
        let r = t.await.map_err(|e| e.to_string())?;
        report.consumed += r.consumed;
        report.measured += r.measured;
        bytes += r.measured_bytes;
        last_ns = last_ns.max(r.last_ns);
        let _ = hist.add(&r.hist);
        note(r.error, &mut report);
        closing.extend(r.conn);
    }
    match cut_short {
        // The peer has stopped answering: the close handshakes would only time out.
        Some(reason) => note(Some(reason), &mut report),
        None => {
            let closes: Vec<_> = closing
                .into_iter()
                .map(|c| tokio::spawn(c.close()))
                .collect();
            for c in closes {
                let _ = c.await;
            }
        }
    }

    report.seconds = match (o.measured_seconds(), o.count) {
        (Some(d), None) => d,
        _ => last_ns.saturating_sub(plan.measure_from) as f64 / 1e9,
    };
    if report.seconds > 0.0 {
        report.msgs_per_s = report.measured as f64 / report.seconds;
        report.mb_per_s = bytes as f64 / 1e6 / report.seconds;
    }
    if o.size >= 8 && !hist.is_empty() {
        let q = |p: f64| hist.value_at_quantile(p) as f64 / 1e3;
        report.latency_us = Some([q(0.5), q(0.99), q(0.999)]);
    }
    Ok(report)
}

/// Waits for the clients to finish. Everything is cancelled at the hard deadline, when
/// the producers still wait for confirms 5 s after the consumers are done, or, with
/// `--count`, when nothing was consumed for [`STALL`]; then the reason is returned.
async fn watchdog(
    shared: &Shared,
    plan: Plan,
    count_mode: bool,
    cancel: &CancellationToken,
    consumers: &[JoinHandle<ConsumerResult>],
    producers: &[JoinHandle<ProducerResult>],
) -> Option<String> {
    let mut progress = (0, Instant::now());
    let mut consumers_done: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        if finished(consumers) && finished(producers) {
            return None;
        }
        let reason = if plan.hard_end.is_some_and(|h| now >= h) {
            Some("cut short: hard deadline reached".to_string())
        } else if finished(consumers)
            // With no consumers at all, the grace starts at the planned end.
            && (!consumers.is_empty() || plan.end.is_some_and(|e| now >= e))
            && now - *consumers_done.get_or_insert(now) >= CONFIRM_GRACE
        {
            Some("cut short: producers still waiting for confirms after the consumers ended".into())
        } else {
            let consumed = shared.consumed.load(Ordering::Relaxed);
            if consumed != progress.0 {
                progress = (consumed, now);
            }
            (count_mode && now - progress.1 >= STALL)
                .then(|| format!("cut short: nothing consumed for {} s", STALL.as_secs()))
        };
        if let Some(reason) = reason {
            eprintln!("loadgen: {reason}");
            cancel.cancel();
            return Some(reason);
        }
    }
}

fn finished<T>(tasks: &[JoinHandle<T>]) -> bool {
    tasks.iter().all(|t| t.is_finished())
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds")
}
