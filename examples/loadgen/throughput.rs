//! `throughput`: producers publish to one queue, consumers drain it; rates and
//! publish-to-consume latency are measured on the consumer side.
//!
//! The data path is hand-written over the crate's framing: a publish is three pre-encoded
//! pieces (method frame, content header, body frames) copied into one batch buffer with an
//! 8-byte send timestamp patched in, and deliveries are read in place from a 256 KiB read
//! buffer. Nothing is allocated per message, so the generator is not what is measured.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, confirm, queue};
use amq_protocol::types::FieldTable;
use amqp_iam_gateway::amqp::frame::{self, FRAME_END, HEADER_LEN};
use amqp_iam_gateway::amqp::method::{self, short};
use bytes::{Buf, BufMut, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, Error, Target, close_error, next_frame};
use crate::clock;

/// Read buffer of a consumer or producer connection: large reads, few syscalls.
const READ_BUFFER: usize = 256 * 1024;
/// A read is attempted only with at least this much room left in the buffer.
const MIN_READ_ROOM: usize = 64 * 1024;
/// Publishes are encoded into one buffer until it holds this much, then written at once.
const WRITE_BATCH: usize = 64 * 1024;
/// How long after the planned end the run is cut short, whatever the broker does.
const GRACE: Duration = Duration::from_secs(10);
/// How long producers may still wait for confirms once the consumers are done.
const CONFIRM_GRACE: Duration = Duration::from_secs(5);
/// With `--count`, the run ends when nothing was consumed for this long.
const STALL: Duration = Duration::from_secs(10);
/// The pacing tick with `--rate`: every tick sends what is due.
const TICK: Duration = Duration::from_millis(1);
/// Consumers on channel 1 of their own connections; so are producers.
const CH: u16 = 1;

pub struct Opts {
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub confirm_window: u64,
    pub prefetch: u16,
    pub duration: Option<f64>,
    pub count: Option<u64>,
    pub rate: f64,
    pub warmup: f64,
    pub queue: Option<String>,
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
struct Plan {
    start: Instant,
    /// Measurement window start: deliveries received before it are not measured.
    measure_from: u64,
    /// Planned end (duration mode): publishing and measuring stop here.
    end: Option<Instant>,
    /// Whatever happens, the run is over at this point.
    hard_end: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    consumed: AtomicU64,
}

pub async fn run(target: Arc<Target>, o: Opts) -> Result<Report, String> {
    let generated = o.queue.is_none();
    let qname = o.queue.clone().unwrap_or_else(|| {
        format!(
            "loadgen-{}-{}",
            std::process::id(),
            clock::now_ns() % 1_000_000
        )
    });
    let mut setup = connect_channel(&target)
        .await
        .map_err(|e| format!("setup connection: {e}"))?;
    let declare = queue::Declare {
        queue: short(&qname),
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

    let result = run_clients(&target, &o, &qname).await;
    debug("clients done");

    if generated {
        let delete = queue::Delete {
            queue: short(&qname),
            if_unused: false,
            if_empty: false,
            nowait: false,
        };
        let deleted = tokio::time::timeout(
            Duration::from_secs(5),
            setup.call(
                CH,
                AMQPClass::Queue(queue::AMQPMethod::Delete(delete)),
                |c| matches!(c, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))).then_some(()),
            ),
        )
        .await;
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("loadgen: could not delete queue {qname}");
        }
    }
    debug("queue deleted");
    let _ = setup.close().await;
    debug("setup closed");
    result
}

async fn connect_channel(target: &Target) -> Result<Conn, Error> {
    let mut c = target.connect(READ_BUFFER).await?;
    c.open_channel(CH).await?;
    Ok(c)
}

async fn run_clients(target: &Arc<Target>, o: &Opts, qname: &str) -> Result<Report, String> {
    let mut consumers = Vec::with_capacity(o.consumers);
    for i in 0..o.consumers {
        let c = start_consumer(target, o.prefetch, qname, i)
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
    let warmup = Duration::from_secs_f64(o.warmup);
    let end = o
        .duration
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
            let p = Producer::new(conn, qname, o.size, plan, quota, per_rate, o.confirm_window);
            tokio::spawn(p.run(cancel.clone()))
        })
        .collect();

    watchdog(
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
    debug("tasks joined");
    let closes: Vec<_> = closing
        .into_iter()
        .map(|c| tokio::spawn(c.close()))
        .collect();
    for c in closes {
        let _ = c.await;
    }

    report.seconds = match (o.duration, o.count) {
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
/// `--count`, when nothing was consumed for [`STALL`].
async fn watchdog(
    shared: &Shared,
    plan: Plan,
    count_mode: bool,
    cancel: &CancellationToken,
    consumers: &[JoinHandle<ConsumerResult>],
    producers: &[JoinHandle<ProducerResult>],
) {
    let mut progress = (0, Instant::now());
    let mut consumers_done: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        if finished(consumers) && finished(producers) {
            return;
        }
        if plan.hard_end.is_some_and(|h| now >= h) {
            eprintln!("loadgen: hard deadline reached, stopping");
            break;
        }
        if finished(consumers) && now - *consumers_done.get_or_insert(now) >= CONFIRM_GRACE {
            eprintln!("loadgen: producers still busy after the consumers ended, stopping");
            break;
        }
        let consumed = shared.consumed.load(Ordering::Relaxed);
        if consumed != progress.0 {
            progress = (consumed, now);
        } else if count_mode && now - progress.1 >= STALL {
            eprintln!(
                "loadgen: nothing consumed for {} s, stopping",
                STALL.as_secs()
            );
            break;
        }
    }
    cancel.cancel();
}

fn debug(what: &str) {
    if std::env::var_os("LOADGEN_DEBUG").is_some() {
        eprintln!("[{:.3}] {what}", clock::now_ns() as f64 / 1e9);
    }
}

fn finished<T>(tasks: &[JoinHandle<T>]) -> bool {
    tasks.iter().all(|t| t.is_finished())
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds")
}

async fn start_consumer(
    target: &Target,
    prefetch: u16,
    qname: &str,
    i: usize,
) -> Result<Conn, Error> {
    let mut c = connect_channel(target).await?;
    let qos = basic::Qos {
        prefetch_count: prefetch,
        global: false,
    };
    c.call(CH, AMQPClass::Basic(basic::AMQPMethod::Qos(qos)), |c| {
        matches!(c, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))).then_some(())
    })
    .await?;
    let consume = basic::Consume {
        queue: short(qname),
        consumer_tag: short(&format!("loadgen-{i}")),
        no_local: false,
        no_ack: false,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    };
    c.call(
        CH,
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
        |c| matches!(c, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))).then_some(()),
    )
    .await?;
    Ok(c)
}

struct Consumer {
    conn: Conn,
    plan: Plan,
    count: Option<u64>,
    ack_every: u64,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

struct ConsumerResult {
    consumed: u64,
    measured: u64,
    measured_bytes: u64,
    last_ns: u64,
    hist: Histogram<u64>,
    error: Option<String>,
    /// Returned for a clean close when the connection is still usable.
    conn: Option<Conn>,
}

/// Where the consumer is within a delivery.
enum Delivery {
    /// Waiting for `basic.deliver`.
    Idle,
    /// Deliver seen, waiting for the content header.
    Header,
    /// `remaining` body bytes to come; `first` until the first body frame.
    Body { remaining: u64, first: bool },
}

impl Consumer {
    async fn run(mut self) -> ConsumerResult {
        let mut r = ConsumerResult {
            consumed: 0,
            measured: 0,
            measured_bytes: 0,
            last_ns: 0,
            hist: new_histogram(),
            error: None,
            conn: None,
        };
        let outcome = self.pump(&mut r).await;
        match outcome {
            Ok(()) => r.conn = Some(self.conn),
            Err(e) => r.error = Some(format!("consumer: {e}")),
        }
        r
    }

    async fn pump(&mut self, r: &mut ConsumerResult) -> Result<(), Error> {
        let far = self.plan.start + Duration::from_secs(365 * 24 * 3600);
        let end = self.plan.end.unwrap_or(far);
        let mut state = Delivery::Idle;
        let (mut last_tag, mut unacked) = (0u64, 0u64);
        let mut out = BytesMut::with_capacity(64);
        loop {
            // Every frame of this read was received at the same time.
            let now = clock::now_ns();
            let measuring = now >= self.plan.measure_from;
            let before = r.consumed;
            while let Some(h) = next_frame(&self.conn.rbuf, self.conn.frame_max)? {
                let p = frame::payload(&self.conn.rbuf, &h);
                match (h.frame_type, &mut state) {
                    (frame::METHOD, _) => {
                        if let Some(tag) = deliver_tag(p) {
                            last_tag = tag;
                            state = Delivery::Header;
                        } else {
                            other_method(p)?;
                        }
                    }
                    (frame::HEADER, Delivery::Header) => {
                        let size = p
                            .get(4..12)
                            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                        state = Delivery::Body {
                            remaining: size,
                            first: true,
                        };
                    }
                    (frame::BODY, Delivery::Body { remaining, first }) => {
                        if *first && measuring && p.len() >= 8 {
                            let sent = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                            r.hist.saturating_record(now.saturating_sub(sent).max(1));
                        }
                        *first = false;
                        *remaining = remaining.saturating_sub(p.len() as u64);
                        if measuring {
                            r.measured_bytes += p.len() as u64;
                        }
                    }
                    (frame::HEARTBEAT, _) => {}
                    _ => {
                        return Err(Error::Protocol(format!(
                            "unexpected frame type {} on channel {}",
                            h.frame_type, h.channel
                        )));
                    }
                }
                if let Delivery::Body { remaining: 0, .. } = state {
                    state = Delivery::Idle;
                    r.consumed += 1;
                    unacked += 1;
                    if measuring {
                        r.measured += 1;
                        r.last_ns = now;
                    }
                }
                self.conn.rbuf.advance(h.wire_len());
            }
            if r.consumed > before {
                let total = self
                    .shared
                    .consumed
                    .fetch_add(r.consumed - before, Ordering::Relaxed)
                    + (r.consumed - before);
                if self.count.is_some_and(|n| total >= n) {
                    self.cancel.cancel();
                }
            }
            if self.cancel.is_cancelled() || Instant::now() >= end {
                return Ok(());
            }
            if unacked >= self.ack_every {
                out.clear();
                write_ack(&mut out, last_tag);
                tokio::select! {
                    res = self.conn.stream.write_all(&out) => res?,
                    _ = self.cancel.cancelled() => return Err(Error::Protocol("cancelled while writing an ack".into())),
                }
                unacked = 0;
            }
            tokio::select! {
                res = self.conn.fill(MIN_READ_ROOM) => res?,
                _ = self.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(end) => return Ok(()),
            }
        }
    }
}

/// The delivery tag of a `basic.deliver` payload, read in place:
/// `ids consumer-tag:shortstr delivery-tag:u64 redelivered exchange routing-key`.
fn deliver_tag(p: &[u8]) -> Option<u64> {
    if method::ids(p)? != (60, 60) {
        return None;
    }
    let at = 5 + *p.get(4)? as usize;
    Some(u64::from_be_bytes(p.get(at..at + 8)?.try_into().ok()?))
}

/// A method other than the hot ones: the server closing the connection or channel, or
/// cancelling the consumer, is an error; anything else is ignored.
fn other_method(p: &[u8]) -> Result<(), Error> {
    match method::ids(p) {
        Some(method::id::CONNECTION_CLOSE | method::id::CHANNEL_CLOSE) => {
            let class = method::decode(p).map_err(|e| Error::Protocol(e.to_string()))?;
            Err(close_error(&class).unwrap_or(Error::Protocol("bad close".into())))
        }
        Some(method::id::BASIC_CANCEL) => {
            Err(Error::Protocol("the server cancelled the consumer".into()))
        }
        _ => Ok(()),
    }
}

/// `basic.ack` with `multiple` set: acknowledges everything up to `tag`.
fn write_ack(out: &mut BytesMut, tag: u64) {
    let mut p = [0u8; 13];
    p[..4].copy_from_slice(&[0, 60, 0, 80]);
    p[4..12].copy_from_slice(&tag.to_be_bytes());
    p[12] = 1;
    frame::write_frame(out, frame::METHOD, CH, &p);
}

struct Producer {
    conn: Conn,
    plan: Plan,
    tpl: Template,
    quota: Option<u64>,
    rate: f64,
    window: u64,
}

/// One message, pre-encoded: publishing copies it and patches the timestamp in.
struct Template {
    /// The `basic.publish` and content header frames.
    publish: Vec<u8>,
    header: Vec<u8>,
    /// The body, split into frames of at most `chunk` payload bytes.
    body: Vec<u8>,
    chunk: usize,
}

impl Template {
    /// Appends one publish whose body starts with the 8-byte timestamp `ns`.
    fn encode(&self, out: &mut BytesMut, ns: u64) {
        out.extend_from_slice(&self.publish);
        out.extend_from_slice(&self.header);
        for (i, c) in self.body.chunks(self.chunk).enumerate() {
            out.put_u8(frame::BODY);
            out.put_u16(CH);
            out.put_u32(c.len() as u32);
            if i == 0 && c.len() >= 8 {
                out.put_u64(ns);
                out.extend_from_slice(&c[8..]);
            } else {
                out.extend_from_slice(c);
            }
            out.put_u8(FRAME_END);
        }
    }
}

struct ProducerResult {
    published: u64,
    acked: u64,
    nacked: u64,
    error: Option<String>,
    conn: Option<Conn>,
}

/// Tracks which publish sequence numbers the broker has confirmed (acked or nacked),
/// with `multiple` and out-of-order single confirms.
#[derive(Default)]
struct Confirms {
    /// Every sequence number up to this one is resolved.
    upto: u64,
    /// Resolved numbers above `upto`.
    above: BTreeSet<u64>,
}

impl Confirms {
    fn resolved(&self) -> u64 {
        self.upto + self.above.len() as u64
    }

    /// Resolves `tag` (and all below with `multiple`); returns how many were new.
    fn resolve(&mut self, tag: u64, multiple: bool) -> u64 {
        let before = self.resolved();
        if multiple {
            if tag > self.upto {
                self.above = self.above.split_off(&(tag + 1));
                self.upto = tag;
            }
        } else if tag > self.upto {
            self.above.insert(tag);
        }
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
        self.resolved() - before
    }
}

impl Producer {
    fn new(
        conn: Conn,
        qname: &str,
        size: usize,
        plan: Plan,
        quota: Option<u64>,
        rate: f64,
        window: u64,
    ) -> Producer {
        let mut publish = BytesMut::new();
        let m = basic::Publish {
            exchange: short(""),
            routing_key: short(qname),
            mandatory: false,
            immediate: false,
        };
        method::encode(
            &mut publish,
            CH,
            AMQPClass::Basic(basic::AMQPMethod::Publish(m)),
        );
        // Content header: class 60, weight 0, body size, no properties.
        let mut hp = Vec::with_capacity(14);
        hp.extend_from_slice(&60u16.to_be_bytes());
        hp.extend_from_slice(&0u16.to_be_bytes());
        hp.extend_from_slice(&(size as u64).to_be_bytes());
        hp.extend_from_slice(&0u16.to_be_bytes());
        let mut header = BytesMut::new();
        frame::write_frame(&mut header, frame::HEADER, CH, &hp);
        let chunk = conn.frame_max - HEADER_LEN - 1;
        Producer {
            conn,
            plan,
            tpl: Template {
                publish: publish.to_vec(),
                header: header.to_vec(),
                body: vec![b'x'; size],
                chunk,
            },
            quota,
            rate,
            window,
        }
    }

    async fn run(mut self, cancel: CancellationToken) -> ProducerResult {
        let mut r = ProducerResult {
            published: 0,
            acked: 0,
            nacked: 0,
            error: None,
            conn: None,
        };
        match self.pump(&mut r, &cancel).await {
            Ok(true) => r.conn = Some(self.conn),
            Ok(false) => {}
            Err(e) => r.error = Some(format!("producer: {e}")),
        }
        r
    }

    /// Publishes until the end, the quota or cancellation, then waits for the outstanding
    /// confirms. `Ok(true)`: the connection is at a frame boundary and can be closed.
    async fn pump(
        &mut self,
        r: &mut ProducerResult,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let far = self.plan.start + Duration::from_secs(365 * 24 * 3600);
        let end = self.plan.end.unwrap_or(far);
        let hard_end = self.plan.hard_end.unwrap_or(far);
        let mut out = BytesMut::with_capacity(WRITE_BATCH * 2);
        let mut confirms = Confirms::default();
        let mut next_tick = Instant::now();
        let (rd, wr) = tokio::io::split(&mut self.conn.stream);
        let (mut rd, mut wr) = (rd, wr);
        let rbuf = &mut self.conn.rbuf;
        let frame_max = self.conn.frame_max;
        let mut publishing = true;
        let mut unflushed = false;
        loop {
            // Refill the batch with what the quota, the window and the rate allow.
            if publishing && out.len() < WRITE_BATCH {
                let now = Instant::now();
                if now >= end
                    || self.quota.is_some_and(|q| r.published >= q)
                    || cancel.is_cancelled()
                {
                    publishing = false;
                } else {
                    let mut allowed = u64::MAX;
                    if let Some(q) = self.quota {
                        allowed = q - r.published;
                    }
                    if self.window > 0 {
                        allowed = allowed.min(self.window - (r.published - confirms.resolved()));
                    }
                    if self.rate > 0.0 {
                        let due = ((now - self.plan.start).as_secs_f64() * self.rate) as u64 + 1;
                        allowed = allowed.min(due.saturating_sub(r.published));
                    }
                    while allowed > 0 && out.len() < WRITE_BATCH {
                        let ns = clock::now_ns();
                        self.tpl.encode(&mut out, ns);
                        r.published += 1;
                        allowed -= 1;
                    }
                }
            }
            if !publishing && out.is_empty() && !unflushed {
                let waiting = self.window > 0 && confirms.resolved() < r.published;
                if !waiting || cancel.is_cancelled() || Instant::now() >= hard_end {
                    return Ok(true);
                }
            }
            let paced = self.rate > 0.0 && publishing && out.is_empty();
            if paced {
                next_tick = (next_tick + TICK).max(Instant::now());
            }
            if rbuf.capacity() - rbuf.len() < 1024 {
                rbuf.reserve(MIN_READ_ROOM);
            }
            tokio::select! {
                res = rd.read_buf(rbuf) => {
                    if res? == 0 {
                        return Err(Error::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection")));
                    }
                    while let Some(h) = next_frame(rbuf, frame_max)? {
                        let p = frame::payload(rbuf, &h);
                        if h.frame_type == frame::METHOD {
                            match method::ids(p) {
                                Some((60, 80)) | Some((60, 120)) => {
                                    let tag = p.get(4..12).map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                                    let multiple = p.get(12).is_some_and(|b| b & 1 == 1);
                                    let n = confirms.resolve(tag, multiple);
                                    if p[3] == 80 { r.acked += n } else { r.nacked += n }
                                }
                                _ => other_method(p)?,
                            }
                        }
                        rbuf.advance(h.wire_len());
                    }
                }
                // One branch for both: write and flush both need the write half. Either
                // is cancel-safe (a write that returns nothing took nothing).
                res = write_or_flush(&mut wr, &out), if !out.is_empty() || unflushed => {
                    match res? {
                        Some(n) => {
                            out.advance(n);
                            unflushed = true;
                        }
                        None => unflushed = false,
                    }
                }
                _ = tokio::time::sleep_until(next_tick), if paced => {}
                _ = tokio::time::sleep_until(end), if publishing && out.is_empty() && !paced => {}
                _ = cancel.cancelled(), if !cancel.is_cancelled() => {}
                _ = tokio::time::sleep_until(hard_end) => return Ok(out.is_empty()),
            }
            if cancel.is_cancelled() && !out.is_empty() {
                // Cut short mid-batch: the stream may end inside a frame.
                return Ok(false);
            }
        }
    }
}

/// Writes from `out` when it holds anything (`Some(bytes written)`), else flushes.
async fn write_or_flush<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &[u8],
) -> std::io::Result<Option<usize>> {
    if out.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(out).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_in_and_out_of_order() {
        let mut c = Confirms::default();
        assert_eq!(c.resolve(2, false), 1);
        assert_eq!(c.resolve(1, false), 1);
        assert_eq!(c.upto, 2);
        assert_eq!(c.resolve(5, false), 1);
        assert_eq!(c.resolve(6, true), 3);
        assert_eq!(c.resolved(), 6);
        assert_eq!(c.resolve(3, true), 0);
    }

    #[test]
    fn deliver_tag_in_place() {
        let mut p = vec![0, 60, 0, 60, 3, b'a', b'b', b'c'];
        p.extend_from_slice(&42u64.to_be_bytes());
        p.push(0);
        assert_eq!(deliver_tag(&p), Some(42));
        assert_eq!(deliver_tag(&p[..10]), None);
    }
}
