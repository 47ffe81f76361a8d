//! Load generator for any AMQP 0-9-1 URL (issue #6): throughput and latency, connection
//! churn, many idle connections. Built to cost little CPU, because on the benchmark
//! machine it shares two cores with the broker and the proxy under test: its client is
//! written on the crate's own frame codec (`client.rs`), not on lapin.
//!
//! ```text
//! cargo build --release --example loadgen
//! target/release/examples/loadgen throughput --url amqp://guest:guest@127.0.0.1:5672/%2F --duration 5
//! target/release/examples/loadgen churn --url amqps://:TOKEN@localhost:5671/%2F --cacert ca.pem
//! target/release/examples/loadgen idle --url ... --connections 5000 --hold 10 --rate 500
//! ```
//!
//! `client.rs` is the AMQP client, `throughput.rs` the `throughput` mode, and
//! `connections.rs` the `churn` and `idle` modes. `benches/README.md` describes the modes
//! and what their numbers mean.

mod client;
mod connections;
mod consumer;
mod producer;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use client::Target;

/// The process-wide clock: message timestamps are nanoseconds since one `Instant`.
mod clock {
    use std::sync::OnceLock;
    use std::time::Instant;

    static BASE: OnceLock<Instant> = OnceLock::new();

    fn base() -> Instant {
        *BASE.get_or_init(Instant::now)
    }

    /// Nanoseconds since the base.
    pub fn now_ns() -> u64 {
        base().elapsed().as_nanos() as u64
    }

    /// Nanoseconds since the base at `t` (0 before the base).
    pub fn ns_at(t: tokio::time::Instant) -> u64 {
        t.into_std().saturating_duration_since(base()).as_nanos() as u64
    }
}

/// `println!` that ignores a closed stdout (`loadgen ... | head -1`) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "AMQP 0-9-1 load generator: throughput, churn, idle"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args)]
struct Common {
    /// amqp://user:pass@host:port/vhost or amqps://...; user, password and vhost are
    /// percent-decoded, the vhost defaults to `/`.
    #[arg(long)]
    url: String,
    /// PEM CA certificate(s) trusted for amqps (default: the system's roots).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Read the password (e.g. a JWT) from this file instead of the URL; with several
    /// lines, successive connections use them in turn (one token per connection).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// TLS key exchange groups, comma-separated, in order of preference (e.g. `X25519`);
    /// default rustls's order, post-quantum hybrid `X25519MLKEM768` first.
    #[arg(long)]
    tls_kx: Option<String>,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print exactly one JSON object on stdout instead of the summary lines.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Mode {
    /// Producers publish to one queue, consumers drain it; msgs/s, MB/s and
    /// publish-to-consume latency, measured by the consumers.
    Throughput {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        opts: throughput::Opts,
    },
    /// Connect, authenticate, open, close, in a loop: connections per second.
    Churn {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Connections in progress at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Open many connections, hold them idle (`ready` on stderr), close them.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        connections: u64,
        /// Seconds to hold them all open.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Connections opened per second (0: as fast as possible).
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
    },
}

impl Mode {
    fn common(&self) -> &Common {
        match self {
            Mode::Throughput { common, .. }
            | Mode::Churn { common, .. }
            | Mode::Idle { common, .. } => common,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = cli.mode.common();
    raise_nofile_limit();
    let target = match Target::parse(
        &common.url,
        common.cacert.as_deref(),
        common.password_file.as_deref(),
        common.tls_kx.as_deref(),
    ) {
        Ok(t) => Arc::new(t),
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("tokio runtime: {e}")),
    };
    clock::now_ns();
    let json = common.json;
    runtime.block_on(run(cli.mode, target, json))
}

async fn run(mode: Mode, target: Arc<Target>, json: bool) -> ExitCode {
    match mode {
        Mode::Throughput { opts, .. } => {
            let consumers = opts.consumers;
            match throughput::run(target, opts).await {
                // Publish-only runs (no consumers) succeed when something was published.
                Ok(r) if consumers == 0 => {
                    print_throughput(&r, json);
                    status(r.published, &r.first_error, json)
                }
                Ok(r) => {
                    print_throughput(&r, json);
                    status(r.consumed, &r.first_error, json)
                }
                Err(e) => fail(&e),
            }
        }
        Mode::Churn {
            duration,
            concurrency,
            ..
        } => {
            if let Err(e) = connections::probe(&target).await {
                return fail(&e);
            }
            let r = connections::churn(target, duration, concurrency).await;
            print_churn(&r, json)
        }
        Mode::Idle {
            connections,
            hold,
            rate,
            ..
        } => {
            if let Err(e) = connections::probe(&target).await {
                return fail(&e);
            }
            let r = connections::idle(target, connections, hold, rate).await;
            print_idle(&r, json)
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("loadgen: {msg}");
    ExitCode::FAILURE
}

/// Exit status of a run that completed: failure when nothing got through.
fn status(succeeded: u64, first_error: &Option<String>, json: bool) -> ExitCode {
    if !json {
        say!("loadgen itself: {:.2} s CPU", cpu_seconds());
    }
    if let Some(e) = first_error {
        eprintln!("loadgen: first error: {e}");
    }
    if succeeded == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_throughput(r: &throughput::Report, json: bool) {
    let [p50, p99, p999] = match r.latency_us {
        Some(l) => l.map(Some),
        None => [None; 3],
    };
    if json {
        let v = json!({
            "mode": "throughput",
            "seconds": r.seconds,
            "published": r.published,
            "confirmed": r.confirmed,
            "nacked": r.nacked,
            "consumed": r.consumed,
            "measured": r.measured,
            "msgs_per_s": r.msgs_per_s,
            "mb_per_s": r.mb_per_s,
            "p50_us": p50,
            "p99_us": p99,
            "p999_us": p999,
            "errors": r.errors,
            "loadgen_cpu_s": cpu_seconds(),
        });
        say!("{v}");
    } else {
        say!(
            "throughput: {:.0} msgs/s, {:.2} MB/s over {:.2} s ({} messages measured)",
            r.msgs_per_s,
            r.mb_per_s,
            r.seconds,
            r.measured
        );
        match r.latency_us {
            Some([a, b, c]) => say!("latency: p50 {a:.0} us, p99 {b:.0} us, p99.9 {c:.0} us"),
            None => say!("latency: not measured"),
        }
        say!(
            "published {}, confirmed {}, nacked {}, consumed {}, errors {}",
            r.published,
            r.confirmed,
            r.nacked,
            r.consumed,
            r.errors
        );
    }
}

fn print_churn(r: &connections::ChurnReport, json: bool) -> ExitCode {
    if json {
        let v = json!({
            "mode": "churn",
            "seconds": r.seconds,
            "connections": r.connections,
            "conns_per_s": r.conns_per_s,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "errors": r.errors,
            "loadgen_cpu_s": cpu_seconds(),
        });
        say!("{v}");
    } else {
        say!(
            "churn: {} connections in {:.2} s = {:.1} conns/s, errors {}",
            r.connections,
            r.seconds,
            r.conns_per_s,
            r.errors
        );
        if let (Some(a), Some(b)) = (r.p50_ms, r.p99_ms) {
            say!("connect to open-ok: p50 {a:.2} ms, p99 {b:.2} ms");
        }
    }
    status(r.connections, &r.first_error, json)
}

fn print_idle(r: &connections::IdleReport, json: bool) -> ExitCode {
    if json {
        let v = json!({
            "mode": "idle",
            "connections": r.connections,
            "opened": r.opened,
            "failed": r.failed,
            "open_seconds": r.open_seconds,
            "loadgen_cpu_s": cpu_seconds(),
        });
        say!("{v}");
    } else {
        say!(
            "idle: {} of {} opened in {:.2} s, {} failed",
            r.opened,
            r.connections,
            r.open_seconds,
            r.failed
        );
    }
    status(r.opened, &r.first_error, json)
}

/// CPU time (user + system) this process has used so far, in seconds: how much of the
/// shared machine the generator itself took.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the struct passed by pointer, which outlives the
    // call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Raises the soft open-files limit to the hard one: 5,000 idle connections need more
/// than the usual 1,024 descriptors.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer, which
    // lives on this stack frame for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!("loadgen: could not raise the open-files limit");
            }
        }
    }
}
