//! A producer of the `throughput` mode: publishes to the default exchange in batches
//! (one buffer of up to [`WRITE_BATCH`] bytes per write), optionally paced to a rate and
//! limited to a window of unconfirmed messages, and counts the broker's confirms.

use std::collections::BTreeSet;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use amqp_iam_gateway::amqp::frame::{self, FRAME_END, HEADER_LEN};
use amqp_iam_gateway::amqp::method::{self, short};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, Error, next_frame};
use crate::clock;
use crate::consumer::other_method;
use crate::throughput::{CH, MIN_READ_ROOM, Plan};

/// Publishes are encoded into one buffer until it holds this much, then written at once.
const WRITE_BATCH: usize = 64 * 1024;
/// The pacing tick with `--rate`: every tick sends what is due.
const TICK: Duration = Duration::from_millis(1);

pub(crate) struct Producer {
    conn: Conn,
    plan: Plan,
    tpl: Template,
    limits: Limits,
}

/// What bounds publishing: a quota (`--count`), a rate (msgs/s, 0: none) counted from
/// `start`, and a window of unconfirmed messages (0: no confirms).
struct Limits {
    start: Instant,
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

pub(crate) struct ProducerResult {
    pub published: u64,
    pub acked: u64,
    pub nacked: u64,
    pub error: Option<String>,
    /// Returned for a clean close when the stream is at a frame boundary.
    pub conn: Option<Conn>,
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

impl Limits {
    /// How many more messages may be published now: what is left of the quota, of the
    /// confirm window, and of what the rate made due.
    fn allowed(&self, now: Instant, published: u64, resolved: u64) -> u64 {
        let mut allowed = u64::MAX;
        if let Some(q) = self.quota {
            allowed = q.saturating_sub(published);
        }
        if self.window > 0 {
            allowed = allowed.min(self.window.saturating_sub(published - resolved));
        }
        if self.rate > 0.0 {
            let due = ((now - self.start).as_secs_f64() * self.rate) as u64 + 1;
            allowed = allowed.min(due.saturating_sub(published));
        }
        allowed
    }
}

impl Producer {
    pub fn new(
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
            limits: Limits {
                start: plan.start,
                quota,
                rate,
                window,
            },
        }
    }

    pub async fn run(mut self, cancel: CancellationToken) -> ProducerResult {
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
                    || self.limits.quota.is_some_and(|q| r.published >= q)
                    || cancel.is_cancelled()
                {
                    publishing = false;
                } else {
                    let mut allowed = self.limits.allowed(now, r.published, confirms.resolved());
                    while allowed > 0 && out.len() < WRITE_BATCH {
                        self.tpl.encode(&mut out, clock::now_ns());
                        r.published += 1;
                        allowed -= 1;
                    }
                }
            }
            if !publishing && out.is_empty() && !unflushed {
                let waiting = self.limits.window > 0 && confirms.resolved() < r.published;
                if !waiting || cancel.is_cancelled() || Instant::now() >= hard_end {
                    return Ok(true);
                }
            }
            let paced = self.limits.rate > 0.0 && publishing && out.is_empty();
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
                    on_input(rbuf, frame_max, &mut confirms, r)?;
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

/// Handles the frames buffered from the broker: confirms (`basic.ack` / `basic.nack`,
/// read in place), and the broker closing the channel or connection.
fn on_input(
    rbuf: &mut BytesMut,
    frame_max: usize,
    confirms: &mut Confirms,
    r: &mut ProducerResult,
) -> Result<(), Error> {
    while let Some(h) = next_frame(rbuf, frame_max)? {
        let p = frame::payload(rbuf, &h);
        if h.frame_type == frame::METHOD {
            match method::ids(p) {
                Some(ids @ ((60, 80) | (60, 120))) => {
                    let tag = p
                        .get(4..12)
                        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                    let multiple = p.get(12).is_some_and(|b| b & 1 == 1);
                    let n = confirms.resolve(tag, multiple);
                    if ids.1 == 80 {
                        r.acked += n;
                    } else {
                        r.nacked += n;
                    }
                }
                _ => other_method(p)?,
            }
        }
        rbuf.advance(h.wire_len());
    }
    Ok(())
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
}
