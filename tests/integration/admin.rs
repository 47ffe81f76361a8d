//! The admin listener: `/metrics` counters move as connections succeed, fail and get
//! denied, and the text passes `promtool check metrics`; `/healthz` and `/readyz`.

use crate::common::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn metrics_move_with_connections_refusals_and_denials() {
    let gw = start_gateway("").await;
    assert_eq!(admin_get(&gw, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(admin_get(&gw, "/readyz").await, (200, "ready\n".to_owned()));

    // One accepted connection with a denial, one refused login.
    let mut c = claims("arn:aws:iam::111122223333:role/Metrics");
    c["scope"] = json!("rabbitmq/read:*/*");
    let conn = gw.connect(&sign(&c), "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, &unique("m")).await.unwrap_err();
    let mut bad = claims("arn:aws:iam::111122223333:role/Metrics");
    bad["exp"] = json!(now() - 5);
    gw.connect(&sign(&bad), "/").await.unwrap_err();
    conn.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let (status, text) = admin_get(&gw, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &text,
            r#"authentications_total{issuer="default",outcome="accepted",reason="ok"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"authentications_total{issuer="default",outcome="refused",reason="expired"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"authorization_denials_total{method="queue.declare",permission="configure"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&text, r#"connections_accepted_total{listener="tls"}"#),
        2.0
    );
    assert_eq!(
        sample(&text, r#"connections_closed_total{cause="refused"}"#),
        1.0
    );
    assert!(
        sample(
            &text,
            r#"relayed_bytes_total{direction="client_to_broker"}"#
        ) > 0.0
    );
    assert!(
        sample(
            &text,
            r#"relayed_frames_total{direction="broker_to_client"}"#
        ) > 0.0
    );
    assert!(sample(&text, r#"handshake_duration_seconds_count{phase="verify"}"#) >= 2.0);
    assert!(text.contains(&format!(
        r#"amqp_iam_gateway_build_info{{version="{}"}} 1"#,
        env!("CARGO_PKG_VERSION")
    )));

    // The exposition text passes Prometheus' own checker.
    let dir = std::env::temp_dir().join(unique("metrics"));
    std::fs::write(&dir, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&dir).unwrap())
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&dir);
}

#[tokio::test]
async fn readyz_says_why_when_no_backend_is_reachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gw = start_gateway_with("", &format!("127.0.0.1:{port}")).await;
    let (status, body) = admin_get(&gw, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("not ready: no backend node reachable"),
        "{body}"
    );
    assert_eq!(admin_get(&gw, "/healthz").await.0, 200);
}

#[tokio::test]
async fn audit_log_has_a_line_per_decision_and_never_the_token() {
    let path = std::env::temp_dir()
        .join(unique("audit"))
        .with_extension("jsonl");
    let extra = format!("\n[log]\naudit = \"{}\"\n", path.display());
    let gw = start_gateway_full("", "127.0.0.1:5672", &extra).await;
    let sub = "arn:aws:iam::111122223333:role/Audited";
    let mut c = claims(sub);
    c["scope"] = json!("rabbitmq/read:*/*");
    let good = sign(&c);
    let conn = gw.connect(&good, "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = unique("audited");
    declare_queue(&ch, &q).await.unwrap_err();
    let bad = sign_with(
        &c,
        jsonwebtoken::Algorithm::RS256,
        "test-rsa",
        "other-rsa-private.pem",
    );
    gw.connect(&bad, "/").await.unwrap_err();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    for token in [&good, &bad] {
        assert!(
            !text.contains(token.as_str()),
            "a raw token reached the audit log"
        );
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let allow = &lines[0];
    assert_eq!(
        (allow["event"].as_str(), allow["decision"].as_str()),
        (Some("authentication"), Some("allow"))
    );
    assert_eq!(allow["sub"].as_str(), Some(sub));
    assert_eq!(allow["vhost"].as_str(), Some("/"));
    assert_eq!(allow["jti"], c["jti"]);
    assert_eq!(
        allow["token"].as_str(),
        Some(amqp_iam_gateway::auth::token_id(&good).as_str())
    );
    assert!(allow["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(allow["time"].as_str().unwrap().ends_with('Z'));
    let denied = &lines[1];
    assert_eq!(
        (denied["event"].as_str(), denied["decision"].as_str()),
        (Some("authorization"), Some("deny"))
    );
    assert_eq!(denied["method"].as_str(), Some("queue.declare"));
    assert_eq!(
        denied["resource"].as_str(),
        Some(format!("queue '{q}'").as_str())
    );
    let refused = &lines[2];
    assert_eq!(
        (refused["decision"].as_str(), refused["reason"].as_str()),
        (Some("deny"), Some("bad_signature"))
    );
}

/// Accepts what is pending on `l` (non-blocking) and returns how many.
fn drain_accepts(l: &std::net::TcpListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn readyz_reads_the_health_checks_and_opens_no_connection() {
    // A node we watch: every connection to it is counted. The first health check runs
    // before the gateway serves; the next one only after a long interval.
    let node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    node.set_nonblocking(true).unwrap();
    let addr = node.local_addr().unwrap();
    let gw = start_gateway_full(
        "",
        &format!("{addr}\", \"127.0.0.1:5672"),
        "health_check_interval_ms = 300000",
    )
    .await;
    for _ in 0..20 {
        assert_eq!(admin_get(&gw, "/readyz").await, (200, "ready\n".to_owned()));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        drain_accepts(&node),
        1,
        "one health check at start, none per probe"
    );
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, &format!("backend_node_up{{node=\"{addr}\"}}")),
        1.0
    );
    assert_eq!(sample(&m, "backend_node_up{node=\"127.0.0.1:5672\"}"), 1.0);
}

#[tokio::test]
async fn readyz_follows_a_node_that_goes_down_and_comes_back() {
    let node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = node.local_addr().unwrap();
    let gw = start_gateway_full("", &addr.to_string(), "health_check_interval_ms = 100").await;
    assert_eq!(admin_get(&gw, "/readyz").await.0, 200);

    drop(node);
    let started = std::time::Instant::now();
    let body = loop {
        let (status, body) = admin_get(&gw, "/readyz").await;
        if status == 503 {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still ready 3 s after the node went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        body.starts_with(&format!("not ready: no backend node reachable ({addr}: ")),
        "{body}"
    );
    let m = metrics(&gw).await;
    assert_eq!(
        sample(&m, &format!("backend_node_up{{node=\"{addr}\"}}")),
        0.0
    );

    // The same port listens again: ready again after the next check.
    let _node = std::net::TcpListener::bind(addr).unwrap();
    let started = std::time::Instant::now();
    while admin_get(&gw, "/readyz").await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "not ready 3 s after the node came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
