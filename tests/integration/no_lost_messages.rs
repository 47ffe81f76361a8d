//! No lost messages (issue 7, point 6): under load through the gateway, with publisher
//! confirms, every confirmed message is consumed exactly once, with matching count and
//! checksum. (Across a gateway drain and restart: tests/python/test_faults.py.)

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use sha2::{Digest, Sha256};

const PRODUCERS: u64 = 2;
const PER_PRODUCER: u64 = 10_000;
const CONSUMERS: usize = 2;
/// Publishes in flight per producer before waiting for the oldest confirm.
const WINDOW: usize = 256;

/// Message `id`'s body: the id, then deterministic bytes; 0 B to 4 KiB of payload, and
/// every 500th message 300 KiB (several body frames at frame_max 128 KiB).
fn body(id: u64) -> Vec<u8> {
    let len = if id % 500 == 7 {
        300 * 1024
    } else {
        (id.wrapping_mul(2_654_435_761) % 4097) as usize
    };
    let mut b = id.to_be_bytes().to_vec();
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    b.extend((0..len).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    b
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// An order-independent checksum of a set of bodies: XOR of their SHA-256 and total length.
#[derive(Default, PartialEq, Debug)]
struct Checksum([u8; 32], u64);

impl Checksum {
    fn add(&mut self, d: &[u8; 32], len: usize) {
        for (a, b) in self.0.iter_mut().zip(d) {
            *a ^= b;
        }
        self.1 += len as u64;
    }
}

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_confirmed_message_is_consumed_exactly_once() {
    let gw = Arc::new(start_gateway("").await);
    let token = sign(&claims(ADMIN_ROLE));
    let q = unique("no-loss");
    let setup = gw.connect(&token, "/").await.unwrap();
    let sch = setup.create_channel().await.unwrap();
    sch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let hwm0 = peak_rss_kib();

    // Consumers first, so the queue never holds the whole load.
    let consumed: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let got = Arc::new(Mutex::new(Checksum::default()));
    let mut consumers = tokio::task::JoinSet::new();
    for c in 0..CONSUMERS {
        let (gw, token, q, consumed, got) = (
            gw.clone(),
            token.clone(),
            q.clone(),
            consumed.clone(),
            got.clone(),
        );
        let conn = gw.connect(&token, "/").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(200, BasicQosOptions::default()).await.unwrap();
        let mut stream = ch
            .basic_consume(
                q.as_str().into(),
                format!("c{c}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        consumers.spawn(async move {
            let total = PRODUCERS * PER_PRODUCER;
            let mut n = 0u64;
            // Ends when everything has arrived (at either consumer), or after 5 s without a
            // delivery.
            let mut last = Instant::now();
            while (consumed.lock().unwrap().len() as u64) < total
                && last.elapsed() < Duration::from_secs(5)
            {
                let d = match tokio::time::timeout(Duration::from_millis(100), stream.next()).await
                {
                    Ok(Some(d)) => d.expect("delivery"),
                    Ok(None) => break,
                    Err(_) => continue,
                };
                last = Instant::now();
                let id = u64::from_be_bytes(d.data[..8].try_into().unwrap());
                got.lock().unwrap().add(&digest(&d.data), d.data.len());
                d.ack(BasicAckOptions::default()).await.expect("ack");
                n += 1;
                *consumed.lock().unwrap().entry(id).or_default() += 1;
            }
            conn.close(200, "bye".into()).await.ok();
            n
        });
    }

    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let (gw, token, q) = (gw.clone(), token.clone(), q.clone());
        producers.spawn(async move {
            let conn = gw.connect(&token, "/").await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut confirmed = Checksum::default();
            let mut ids = Vec::new();
            let mut window = VecDeque::new();
            let mut settle = |id: u64, ok: bool, confirmed: &mut Checksum| {
                assert!(ok, "message {id} was nacked");
                let b = body(id);
                confirmed.add(&digest(&b), b.len());
                ids.push(id);
            };
            for seq in 0..PER_PRODUCER {
                let id = (p << 32) | seq;
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        &body(id),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish");
                window.push_back((id, confirm));
                if window.len() > WINDOW {
                    let (id, c) = window.pop_front().unwrap();
                    settle(id, c.await.expect("confirm").is_ack(), &mut confirmed);
                }
            }
            for (id, c) in window {
                settle(id, c.await.expect("confirm").is_ack(), &mut confirmed);
            }
            conn.close(200, "bye".into()).await.ok();
            (ids, confirmed)
        });
    }
    let produced = tokio::time::timeout(Duration::from_secs(120), producers.join_all())
        .await
        .expect("producers finish");
    let published_in = started.elapsed();
    let consumed_counts: Vec<u64> =
        tokio::time::timeout(Duration::from_secs(60), consumers.join_all())
            .await
            .expect("consumers finish");

    let mut expected = Checksum::default();
    let mut confirmed_ids = Vec::new();
    for (ids, c) in produced {
        confirmed_ids.extend(ids);
        for (a, b) in expected.0.iter_mut().zip(c.0) {
            *a ^= b;
        }
        expected.1 += c.1;
    }
    let seen = std::mem::take(&mut *consumed.lock().unwrap());
    let total = PRODUCERS * PER_PRODUCER;
    assert_eq!(confirmed_ids.len() as u64, total, "every publish confirmed");
    let missing = confirmed_ids
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
    let dups = seen.values().filter(|&&n| n > 1).count();
    assert_eq!(missing, 0, "confirmed but never consumed");
    assert_eq!(dups, 0, "consumed more than once");
    assert_eq!(seen.len() as u64, total, "nothing unknown consumed");
    assert_eq!(consumed_counts.iter().sum::<u64>(), total);
    assert_eq!(*got.lock().unwrap(), expected, "checksum of the bodies");
    eprintln!(
        "no lost messages: {total} messages ({:.1} MiB) from {PRODUCERS} producers with confirms, \
         {CONSUMERS} consumers {consumed_counts:?}; published and confirmed in {published_in:.1?}, \
         all consumed in {:.1?}; 0 missing, 0 duplicates, checksum equal; test process \
         (gateway in-process) VmHWM {:.1} MiB before, {:.1} MiB after",
        expected.1 as f64 / 1048576.0,
        started.elapsed(),
        hwm0 as f64 / 1024.0,
        peak_rss_kib() as f64 / 1024.0,
    );
    sch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    setup.close(200, "bye".into()).await.ok();
}
