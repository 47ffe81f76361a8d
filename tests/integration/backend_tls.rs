//! TLS from the gateway to the backend (`backend.tls`): a TLS terminator written here
//! (tokio-rustls, a throw-away CA, optionally requiring a client certificate) stands in
//! front of the RabbitMQ node on 127.0.0.1:5672, so no broker TLS setup is needed.

use std::sync::Arc;

use crate::common::*;
use lapin::Connection;
use lapin::options::BasicAckOptions;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

/// A throw-away certificate authority.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS terminator on an ephemeral port with a certificate for `names` signed by
/// `server_ca`, relaying each connection to RabbitMQ; with `client_ca`, a client
/// certificate signed by it is required. Returns its address.
async fn terminator(server_ca: &Ca, names: &[&str], client_ca: Option<&Ca>) -> String {
    let (cert, key) = server_ca.leaf(names);
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // refused: wrong CA on the gateway's side, or no client cert
                };
                let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    addr
}

/// Writes `contents` to `name` in `dir`; returns the absolute path for the config.
fn write(dir: &tempdir::Dir, name: &str, contents: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

async fn connect(gw: &TestGateway) -> lapin::Result<Connection> {
    gw.connect(&sign(&claims(ADMIN_ROLE)), "/").await
}

/// Starts a gateway whose backend is `node` over TLS, trusting certificates from `ca` and
/// presenting no client certificate. Returns it with the directory that holds the CA file.
async fn start_gateway_trusting(node: &str, ca: &Ca) -> (TestGateway, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let backend = format!(
        "tls = true\ntls_ca = \"{}\"\n",
        write(&dir, "ca.pem", &ca.pem)
    );
    (start_gateway_full("", node, &backend).await, dir)
}

/// Asserts that a client's connection through a gateway whose backend is `node` over TLS,
/// trusting only `trusted` and presenting no client certificate, is refused at
/// connection.open with a 320.
async fn assert_320_at_open(node: &str, trusted: &Ca) {
    let (gw, _dir) = start_gateway_trusting(node, trusted).await;
    assert_broker_unavailable(&connect(&gw).await.unwrap_err());
}

/// Declares an exclusive queue, publishes to it and consumes the message back.
async fn round_trip(conn: &Connection) {
    let ch = conn.create_channel().await.unwrap();
    let q = unique("backend-tls");
    declare_exclusive(&ch, &q).await.unwrap();
    publish(&ch, "", &q, b"over TLS to the broker")
        .await
        .unwrap();
    let mut consumer = consume(&ch, &q, "c").await;
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(&delivery.data[..], b"over TLS to the broker");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test]
async fn round_trip_over_tls_checking_the_node_address() {
    let ca = Ca::new();
    let node = terminator(&ca, &["127.0.0.1"], None).await;
    let (gw, _dir) = start_gateway_trusting(&node, &ca).await;
    let conn = connect(&gw).await.expect("connect through the TLS backend");
    round_trip(&conn).await;
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn round_trip_over_mutual_tls_with_a_configured_server_name() {
    let server_ca = Ca::new();
    let client_ca = Ca::new();
    let node = terminator(&server_ca, &["rabbit.internal"], Some(&client_ca)).await;
    let (cert, key) = client_ca.leaf(&["amqp-iam-gateway"]);
    let dir = tempdir::Dir::new();
    let backend = format!(
        "tls = true\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_server_name = \"rabbit.internal\"\n",
        write(&dir, "ca.pem", &server_ca.pem),
        write(&dir, "client.pem", &cert),
        write(&dir, "client-key.pem", &key),
    );
    let gw = start_gateway_full("", &node, &backend).await;
    let conn = connect(&gw)
        .await
        .expect("connect through the mTLS backend");
    round_trip(&conn).await;
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn an_untrusted_backend_certificate_is_a_320_at_open() {
    let ca = Ca::new();
    let node = terminator(&ca, &["127.0.0.1"], None).await;
    assert_320_at_open(&node, &Ca::new()).await;
}

#[tokio::test]
async fn a_certificate_for_another_name_is_a_320_at_open() {
    let ca = Ca::new();
    let node = terminator(&ca, &["rabbit.internal"], None).await;
    assert_320_at_open(&node, &ca).await;
}

#[tokio::test]
async fn a_missing_client_certificate_is_a_320_at_open() {
    let server_ca = Ca::new();
    let client_ca = Ca::new();
    let node = terminator(&server_ca, &["127.0.0.1"], Some(&client_ca)).await;
    assert_320_at_open(&node, &server_ca).await;
}
