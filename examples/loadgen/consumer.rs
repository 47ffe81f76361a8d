//! A consumer of the `throughput` mode: `basic.consume` with manual acks, deliveries read
//! in place from the read buffer (deliver, header, body frames), latency from the
//! timestamp in the first 8 body bytes, batched `basic.ack` with `multiple`. It must not
//! allocate per message: it is what measures, and must not be what is measured.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::FieldTable;
use amqp_iam_gateway::amqp::frame;
use amqp_iam_gateway::amqp::method::{self, short};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, Error, Target, close_error, next_frame};
use crate::clock;
use crate::throughput::{CH, MIN_READ_ROOM, Plan, Shared, connect_channel, new_histogram};

pub(crate) async fn start_consumer(
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

pub(crate) struct Consumer {
    pub conn: Conn,
    pub plan: Plan,
    /// `--count`: all consumers stop once they consumed this many together.
    pub count: Option<u64>,
    /// Acknowledge (with `multiple`) once this many deliveries are unacknowledged.
    pub ack_every: u64,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
}

pub(crate) struct ConsumerResult {
    pub consumed: u64,
    /// Deliveries and body bytes received in the measurement window.
    pub measured: u64,
    pub measured_bytes: u64,
    /// When the last measured delivery arrived ([`clock`] nanoseconds).
    pub last_ns: u64,
    /// Publish-to-consume latency in nanoseconds.
    pub hist: Histogram<u64>,
    pub error: Option<String>,
    /// Returned for a clean close when the connection is still usable.
    pub conn: Option<Conn>,
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
    pub async fn run(mut self) -> ConsumerResult {
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
        let mut cursor = Cursor {
            state: Delivery::Idle,
            last_tag: 0,
            unacked: 0,
        };
        let mut out = BytesMut::with_capacity(64);
        loop {
            // Every frame of this read was received at the same time.
            let now = clock::now_ns();
            let measuring = now >= self.plan.measure_from;
            let before = r.consumed;
            while let Some(h) = next_frame(&self.conn.rbuf, self.conn.frame_max)? {
                let p = frame::payload(&self.conn.rbuf, &h);
                cursor.on_frame(h.frame_type, h.channel, p, now, measuring, r)?;
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
            if cursor.unacked >= self.ack_every {
                out.clear();
                write_ack(&mut out, cursor.last_tag);
                tokio::select! {
                    res = self.conn.stream.write_all(&out) => res?,
                    _ = self.cancel.cancelled() => return Err(Error::Protocol("cancelled while writing an ack".into())),
                }
                cursor.unacked = 0;
            }
            tokio::select! {
                res = self.conn.fill(MIN_READ_ROOM) => res?,
                _ = self.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(end) => return Ok(()),
            }
        }
    }
}

/// The consumer's place in the stream of deliveries.
struct Cursor {
    state: Delivery,
    /// The tag of the last delivery, and how many are not acknowledged yet.
    last_tag: u64,
    unacked: u64,
}

impl Cursor {
    /// One frame received at `now`; `measuring`: inside the measurement window.
    fn on_frame(
        &mut self,
        frame_type: u8,
        channel: u16,
        p: &[u8],
        now: u64,
        measuring: bool,
        r: &mut ConsumerResult,
    ) -> Result<(), Error> {
        match (frame_type, &mut self.state) {
            (frame::METHOD, _) => {
                if let Some(tag) = deliver_tag(p) {
                    self.last_tag = tag;
                    self.state = Delivery::Header;
                } else {
                    other_method(p)?;
                }
            }
            (frame::HEADER, Delivery::Header) => {
                let size = p
                    .get(4..12)
                    .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                self.state = Delivery::Body {
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
                    "unexpected frame type {frame_type} on channel {channel}"
                )));
            }
        }
        // A body of 0 bytes is complete with its header.
        if let Delivery::Body { remaining: 0, .. } = self.state {
            self.state = Delivery::Idle;
            r.consumed += 1;
            self.unacked += 1;
            if measuring {
                r.measured += 1;
                r.last_ns = now;
            }
        }
        Ok(())
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
pub(crate) fn other_method(p: &[u8]) -> Result<(), Error> {
    match method::ids(p) {
        Some(method::id::CONNECTION_CLOSE | method::id::CHANNEL_CLOSE) => {
            let class = amq_protocol::protocol::parse_class(p)
                .map(|(_, c)| c)
                .map_err(|e| Error::Protocol(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_tag_in_place() {
        let mut p = vec![0, 60, 0, 60, 3, b'a', b'b', b'c'];
        p.extend_from_slice(&42u64.to_be_bytes());
        p.push(0);
        assert_eq!(deliver_tag(&p), Some(42));
        assert_eq!(deliver_tag(&p[..10]), None);
    }
}
