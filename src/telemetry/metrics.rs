//! Prometheus metrics, registered once in the gateway's own registry.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` durations, base
//! units). Nothing here is touched per frame: the relay adds bytes and frames in batches,
//! once per read.

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: a scrape rebuilds the per-issuer series before rendering.
    scrape: std::sync::Mutex<()>,
    pub connections_open: IntGauge,
    /// Worker threads of the runtime the gateway runs on.
    pub runtime_worker_threads: IntGauge,
    pub connections_accepted: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub authentications: IntCounterVec,
    pub denials: IntCounterVec,
    pub handshake_duration: HistogramVec,
    /// By issuer (the configured name) and result.
    pub jwks_fetches: IntCounterVec,
    /// By issuer: static keys plus fetched keys still usable.
    pub jwks_keys: IntGaugeVec,
    /// By issuer, for issuers with a JWKS that has been fetched.
    pub jwks_last_success: GaugeVec,
    pub relayed_bytes: IntCounterVec,
    pub relayed_frames: IntCounterVec,
    pub backend_connect_failures: IntCounterVec,
    pub backend_connections: IntCounterVec,
    /// By node: 1 when the latest background health check reached its port.
    pub backend_node_up: IntGaugeVec,
    /// Clients waiting for a connect slot (`backend.max_connecting`), by node.
    pub backend_connects_waiting: IntGaugeVec,
    /// Clients that gave up waiting for a connect slot, by node.
    pub backend_connect_queue_timeouts: IntCounterVec,
    pub exchange_lookups: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub token_cache: IntCounterVec,
    pub signature_verifications: IntCounter,
    pub exchange_lookup_requests: IntCounter,
    /// Management API requests, by outcome (`token`, `internal`, `anonymous`, `refused`,
    /// `protected`, …) and status class (`2xx`, …).
    pub management_requests: IntCounterVec,
    /// Management API requests in progress.
    pub management_in_flight: IntGauge,
}

const NS: &str = "amqp_iam_gateway";

/// `name` in the gateway's namespace, with `help`.
fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NS)
}

/// Registers `metric` (as its constructor returned it) in `registry` and returns it.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let m = metric.expect("valid metric");
    registry
        .register(Box::new(m.clone()))
        .expect("unique metric");
    m
}

/// A registered counter with `labels`.
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(opts(name, help), labels))
}

/// A registered counter without labels.
fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::with_opts(opts(name, help)))
}

/// Adds one to a gauge for as long as it lives (also when the future holding it is
/// dropped half-way).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A registered gauge with `labels`.
fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(opts(name, help), labels))
}

/// A registered gauge without labels.
fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::with_opts(opts(name, help)))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build = register(
            &registry,
            IntGauge::with_opts(
                opts("build_info", "Build information; always 1.")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            ),
        );
        build.set(1);
        Metrics {
            token_cache: counter(
                &registry,
                "token_cache_total",
                "Verified-token cache lookups, by result (hit, miss).",
                &["result"],
            ),
            signature_verifications: int_counter(
                &registry,
                "signature_verifications_total",
                "Token signature checks performed (cache misses and uncached tokens).",
            ),
            exchange_lookup_requests: int_counter(
                &registry,
                "exchange_type_lookup_requests_total",
                "Requests made to the management API for exchange types (cache misses).",
            ),
            management_requests: counter(
                &registry,
                "management_requests_total",
                "Requests to the management API listener, by outcome (token, internal, anonymous, refused, protected, too_large, overloaded, bad_request, bad_gateway, timeout) and status class.",
                &["outcome", "status"],
            ),
            management_in_flight: register(
                &registry,
                IntGauge::with_opts(opts(
                    "management_requests_in_flight",
                    "Management API requests in progress.",
                )),
            ),
            connections_accepted: counter(
                &registry,
                "connections_accepted_total",
                "Client connections accepted, by listener.",
                &["listener"],
            ),
            connections_closed: counter(
                &registry,
                "connections_closed_total",
                "Client connections closed, by cause.",
                &["cause"],
            ),
            authentications: counter(
                &registry,
                "authentications_total",
                "Authentication decisions, by issuer (the configured name, none when the token's iss matches none, internal for the broker's internal users), outcome and reason.",
                &["issuer", "outcome", "reason"],
            ),
            denials: counter(
                &registry,
                "authorization_denials_total",
                "Operations refused, by AMQP method and missing permission.",
                &["method", "permission"],
            ),
            jwks_fetches: counter(
                &registry,
                "jwks_fetches_total",
                "JWKS fetches, by issuer and result.",
                &["issuer", "result"],
            ),
            relayed_bytes: counter(
                &registry,
                "relayed_bytes_total",
                "Bytes relayed, by direction.",
                &["direction"],
            ),
            relayed_frames: counter(
                &registry,
                "relayed_frames_total",
                "AMQP frames relayed, by direction.",
                &["direction"],
            ),
            backend_connect_failures: counter(
                &registry,
                "backend_connect_failures_total",
                "Failed backend connection attempts, by node.",
                &["node"],
            ),
            backend_connections: counter(
                &registry,
                "backend_connections_total",
                "Backend connections opened, by node.",
                &["node"],
            ),
            backend_node_up: gauge(
                &registry,
                "backend_node_up",
                "1 when the latest background health check reached the node's port, else 0.",
                &["node"],
            ),
            jwks_keys: gauge(
                &registry,
                "jwks_keys",
                "Verification keys currently usable, by issuer.",
                &["issuer"],
            ),
            backend_connects_waiting: gauge(
                &registry,
                "backend_connects_waiting",
                "Clients waiting for a connect slot on a node (backend.max_connecting).",
                &["node"],
            ),
            backend_connect_queue_timeouts: counter(
                &registry,
                "backend_connect_queue_timeouts_total",
                "Clients that waited connect_timeout_ms for a connect slot on a node and moved on.",
                &["node"],
            ),
            config_reloads: counter(
                &registry,
                "config_reloads_total",
                "Configuration reloads, by result.",
                &["result"],
            ),
            exchange_lookups: counter(
                &registry,
                "exchange_type_lookups_total",
                "Exchange type lookups in the management API, by result.",
                &["result"],
            ),
            connections_open: int_gauge(
                &registry,
                "connections_open",
                "Client connections open now.",
            ),
            runtime_worker_threads: int_gauge(
                &registry,
                "runtime_worker_threads",
                "Worker threads of the async runtime (runtime.worker_threads).",
            ),
            handshake_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "handshake_duration_seconds",
                        "Time spent in each phase of opening a connection.",
                    )
                    .namespace(NS)
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ]),
                    &["phase"],
                ),
            ),
            jwks_last_success: register(
                &registry,
                GaugeVec::new(
                    opts(
                        "jwks_last_success_timestamp_seconds",
                        "Unix time of the last successful JWKS fetch, by issuer.",
                    ),
                    &["issuer"],
                ),
            ),
            registry,
            scrape: std::sync::Mutex::new(()),
        }
    }

    /// `refresh` (which brings gauges owned elsewhere up to date), then [`Metrics::render`],
    /// with no other scrape in between.
    pub fn scrape(&self, refresh: impl FnOnce(&Metrics)) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        refresh(self);
        self.render()
    }

    /// The text exposition format.
    fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for I/O reasons.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Records how long a phase took.
    pub fn phase(&self, phase: &str) -> Histogram {
        self.handshake_duration.with_label_values(&[phase])
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
