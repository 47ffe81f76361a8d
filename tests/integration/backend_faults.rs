//! What a client sees when the broker fails: never a hang, never a bare disconnect.

use crate::common::*;
use amq_protocol::protocol::{AMQPClass, connection};
use amqp_iam_gateway::amqp::frame;
use amqp_iam_gateway::amqp::method;
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one frame (the protocol header counts as one when `header` is set).
async fn read_frame(s: &mut TcpStream, buf: &mut BytesMut) {
    loop {
        if let Ok(Some(h)) = frame::check(buf, 1 << 20) {
            let _ = buf.split_to(h.wire_len());
            return;
        }
        assert!(
            s.read_buf(buf).await.unwrap() > 0,
            "gateway closed the backend socket early"
        );
    }
}

/// A fake broker: completes the handshake, then drops the socket without a close.
async fn flaky_broker() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        // The gateway's health checks connect and close without a byte: the first
        // connection that sends the protocol header is the one to serve.
        let mut header = [0u8; 8];
        let mut s = loop {
            let (mut s, _) = listener.accept().await.unwrap();
            if s.read_exact(&mut header).await.is_ok() {
                break s;
            }
        };
        assert_eq!(&header, frame::PROTOCOL_HEADER);
        let mut out = BytesMut::new();
        let start = connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: Default::default(),
            mechanisms: method::long("PLAIN"),
            locales: method::long("en_US"),
        };
        method::encode(
            &mut out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(start)),
        );
        s.write_all(&out.split()).await.unwrap();
        let mut buf = BytesMut::new();
        read_frame(&mut s, &mut buf).await; // start-ok
        let tune = connection::Tune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        };
        method::encode(
            &mut out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(tune)),
        );
        s.write_all(&out.split()).await.unwrap();
        read_frame(&mut s, &mut buf).await; // tune-ok
        read_frame(&mut s, &mut buf).await; // open
        method::encode(
            &mut out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        s.write_all(&out.split()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(s); // the broker vanishes
    });
    addr
}

#[tokio::test]
async fn lost_broker_closes_the_client_with_320() {
    let gw = start_gateway_with("", &flaky_broker().await).await;
    let conn = gw
        .connect(&sign(&claims(ADMIN_ROLE)), "/")
        .await
        .expect("handshake through the fake broker");
    let mut events = conn.events_listener();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let reason = loop {
        match tokio::time::timeout_at(deadline, futures_lite::StreamExt::next(&mut events)).await {
            Ok(Some(lapin::Event::Error(e))) => {
                eprintln!("event error: {e:?}");
                break close_reason(&e);
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break None,
        }
    };
    assert_eq!(
        reason,
        Some((320, "CONNECTION_FORCED - broker connection lost".to_owned()))
    );
    assert!(!conn.status().connected());
}

#[tokio::test]
async fn unreachable_broker_is_a_320_at_open() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gw = start_gateway_with("", &format!("127.0.0.1:{port}")).await;
    let err = gw
        .connect(&sign(&claims(ADMIN_ROLE)), "/")
        .await
        .unwrap_err();
    assert_broker_unavailable(&err);
}

#[tokio::test]
async fn failed_nodes_are_skipped_and_healthy_ones_share_the_load() {
    // A node that answers the gateway's first health check and is gone before the clients
    // come (the next check is far away): only a connect finds out.
    let dying = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = dying.local_addr().unwrap().to_string();
    // Two names for the running node, and the node that dies.
    let nodes = format!(r#"{dead}", "127.0.0.1:5672", "localhost:5672"#);
    let gw = start_gateway_full("", &nodes, "health_check_interval_ms = 300000").await;
    drop(dying);
    let token = sign(&claims(ADMIN_ROLE));
    let mut conns = Vec::new();
    for _ in 0..6 {
        conns.push(
            gw.connect(&token, "/")
                .await
                .expect("a healthy node is chosen"),
        );
    }
    let text = metrics(&gw).await;
    let failures = sample(
        &text,
        &format!(r#"backend_connect_failures_total{{node="{dead}"}}"#),
    );
    assert_eq!(
        failures, 1.0,
        "the dead node is tried once, then skipped during its back-off"
    );
    let a = sample(&text, r#"backend_connections_total{node="127.0.0.1:5672"}"#);
    let b = sample(&text, r#"backend_connections_total{node="localhost:5672"}"#);
    assert_eq!(a + b, 6.0);
    assert!(
        a >= 2.0 && b >= 2.0,
        "round robin over the healthy nodes: {a} / {b}"
    );
}

#[tokio::test]
async fn a_node_the_health_check_found_down_costs_no_client_a_connect() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let nodes = format!(r#"{dead}", "127.0.0.1:5672"#);
    let gw = start_gateway_with("", &nodes).await;
    let token = sign(&claims(ADMIN_ROLE));
    for _ in 0..4 {
        gw.connect(&token, "/")
            .await
            .expect("the node that is up is chosen");
    }
    let text = metrics(&gw).await;
    assert_eq!(
        sample(
            &text,
            &format!(r#"backend_connect_failures_total{{node="{dead}"}}"#)
        ),
        0.0,
        "the check before serving found it down: no client tried it"
    );
    assert_eq!(
        sample(&text, &format!(r#"backend_node_up{{node="{dead}"}}"#)),
        0.0
    );
    assert_eq!(
        sample(&text, r#"backend_connections_total{node="127.0.0.1:5672"}"#),
        4.0
    );
}

/// A node that accepts connections and closes each after `hold` without a word; returns its
/// address, the connections it accepted and the most it held open at once.
async fn slow_node(
    hold: Duration,
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (accepted, open, peak) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (acc, pk) = (accepted.clone(), peak.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let (accepted, open, peak) = (accepted.clone(), open.clone(), peak.clone());
            tokio::spawn(async move {
                // A connect of the gateway's sends the protocol header; its background health
                // checks connect and close without a byte, and are not counted.
                let mut header = [0u8; 8];
                if s.read_exact(&mut header).await.is_err() {
                    return;
                }
                accepted.fetch_add(1, Ordering::SeqCst);
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                open.fetch_sub(1, Ordering::SeqCst);
                drop(s);
            });
        }
    });
    (addr, acc, pk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_a_node_are_bounded_by_max_connecting() {
    use std::sync::atomic::Ordering;
    // Each connect lasts 1 s, so clients arriving within a second of each other overlap
    // even on a loaded machine.
    let (node, accepted, peak) = slow_node(Duration::from_secs(1)).await;
    let gw = start_gateway_full("", &node, "max_connecting = 2\nconnect_timeout_ms = 5000").await;
    let gw = std::sync::Arc::new(gw);
    let token = sign(&claims(ADMIN_ROLE));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (gw, token) = (gw.clone(), token.clone());
        tasks.spawn(async move { gw.connect(&token, "/").await.map(|_| ()).unwrap_err() });
    }
    for err in tasks.join_all().await {
        assert_broker_unavailable(&err);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        6,
        "every client reached the node"
    );
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "never more than max_connecting connects at once"
    );
}

#[tokio::test]
async fn a_client_waiting_too_long_for_a_connect_slot_gets_320() {
    use std::sync::atomic::Ordering;
    // Every connect holds the only slot for the whole timeout (the node never answers), so
    // of three clients arriving within 2 s of each other, the third in the queue cannot get
    // the slot in time.
    let (node, accepted, _) = slow_node(Duration::from_secs(10)).await;
    let gw = start_gateway_full("", &node, "max_connecting = 1\nconnect_timeout_ms = 2000").await;
    let token = sign(&claims(ADMIN_ROLE));
    let (a, b, c) = tokio::join!(
        gw.connect(&token, "/"),
        gw.connect(&token, "/"),
        gw.connect(&token, "/")
    );
    for r in [a, b, c] {
        assert_broker_unavailable(&r.map(|_| ()).unwrap_err());
    }
    let reached = accepted.load(Ordering::SeqCst);
    assert!(
        (1..3).contains(&reached),
        "a client that timed out waiting for the slot never reaches the node: {reached} of 3 did"
    );
    let text = metrics(&gw).await;
    let timeouts = sample(
        &text,
        &format!(r#"backend_connect_queue_timeouts_total{{node="{node}"}}"#),
    );
    assert_eq!(
        timeouts,
        (3 - reached) as f64,
        "each client that never reached the node"
    );
    let waiting = sample(
        &text,
        &format!(r#"backend_connects_waiting{{node="{node}"}}"#),
    );
    assert_eq!(waiting, 0.0, "nobody waits any more");
}
