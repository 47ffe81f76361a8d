//! PROXY protocol v1 and v2 before the AMQP (or TLS) bytes: the client address they carry
//! is the one in the audit log.

use crate::common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A load balancer in miniature: accepts on a local port, connects to `target`, sends
/// `header`, then relays both ways.
async fn shim(target: std::net::SocketAddr, header: Vec<u8>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let header = header.clone();
            tokio::spawn(async move {
                let mut upstream = TcpStream::connect(target).await.unwrap();
                upstream.write_all(&header).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

fn v2_header(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_v2_and_v1_client_addresses_reach_the_audit_log() {
    for (header, expected) in [
        (
            v2_header([203, 0, 113, 7], 4242, [192, 0, 2, 1], 5672),
            "203.0.113.7:4242",
        ),
        (
            b"PROXY TCP4 198.51.100.9 192.0.2.1 5151 5672\r\n".to_vec(),
            "198.51.100.9:5151",
        ),
    ] {
        let path = std::env::temp_dir()
            .join(unique("audit-pp"))
            .with_extension("jsonl");
        let gw = start_gateway_listener(
            "proxy_protocol = true",
            &format!("\n[log]\naudit = \"{}\"\n", path.display()),
        )
        .await;
        let lb = shim(gw.addrs.plain.unwrap(), header).await;
        let uri = format!(
            "amqp://:{}@127.0.0.1:{}/%2f",
            sign(&claims(ADMIN_ROLE)),
            lb.port()
        );
        let conn = lapin::Connection::connect(&uri, Default::default())
            .await
            .expect("connect through the PROXY shim");
        conn.close(200, "bye".into()).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["client"].as_str(), Some(expected), "{text}");

        // Without a header the connection is refused before any AMQP byte.
        let direct = format!(
            "amqp://:{}@{}/%2f",
            sign(&claims(ADMIN_ROLE)),
            gw.addrs.plain.unwrap()
        );
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            lapin::Connection::connect(&direct, Default::default()),
        )
        .await;
        assert!(
            matches!(r, Ok(Err(_))),
            "a connection without a PROXY header must fail"
        );
    }
}
