//! The `amqp-iam-gateway` command line: parse arguments, load and validate the config,
//! set up logging, run.

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use amqp_iam_gateway::config;
#[cfg(feature = "sts-emulator")]
use amqp_iam_gateway::devmode;
use amqp_iam_gateway::proxy::Gateway;

#[derive(Parser)]
#[command(
    version,
    about = "AMQP 0-9-1 gateway: AWS STS web identity tokens (JWT) for RabbitMQ"
)]
struct Cli {
    /// Without a command: development mode, with the embedded STS issuer, a self-signed
    /// certificate and RabbitMQ on 127.0.0.1:5672 as guest.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a config file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file, reporting every problem at once; with backend tokens, also
    /// ask the broker whether it accepts them (`--offline`: the file only).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Do not ask the broker whether it accepts the gateway's backend tokens
        /// (`backend.auth = "token"`): check the file only.
        #[arg(long)]
        offline: bool,
    },
    /// Verify a token against a config and show the username, tags and scopes it gets, and
    /// which claim or alias produced each scope. Exit 1 when the token is refused.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// The token; read from standard input when absent.
        token: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also decide one operation for the token and show the checks and the statement
        /// that decided: connect, publish, consume, get, queue-declare, queue-delete,
        /// queue-purge, queue-bind, queue-unbind, exchange-declare, exchange-delete,
        /// exchange-bind, exchange-unbind, or request (--action and --resource).
        #[arg(long)]
        operation: Option<String>,
        #[command(flatten)]
        op: Box<OperationArgs>,
        #[command(flatten)]
        situation: SituationArgs,
    },
    /// Decide a table of operations for a token, as the gateway would (scopes, broker
    /// policies, the mode), like AWS's policy simulator: one operation per line,
    /// `publish vhost=/ exchange=orders routing-key=eu.new`. Exit 1 when the token is
    /// refused or a line is wrong (or, with --fail-on-deny, an operation is refused).
    Simulate {
        #[arg(long, short)]
        config: PathBuf,
        /// The operations file (`-`: standard input); `#` starts a comment.
        #[arg(long)]
        operations: PathBuf,
        /// The token; read from --token-file when absent.
        token: Option<String>,
        /// A file holding the token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Exit 1 when any operation is refused.
        #[arg(long)]
        fail_on_deny: bool,
        #[command(flatten)]
        situation: SituationArgs,
    },
    #[cfg(feature = "sts-emulator")]
    /// Mint a token with the development issuer's keys (the ones `amqp-iam-gateway` with no
    /// arguments trusts), shaped like an AWS STS GetWebIdentityToken token.
    Token {
        /// The role ARN: the token's `sub`.
        #[arg(long, default_value = amqp_iam_gateway::devmode::ADMIN_ROLE)]
        role_arn: String,
        /// A request tag, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// An audience (repeatable; default rabbitmq).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// Lifetime in seconds (60..=3600).
        #[arg(long, default_value_t = 300)]
        duration: i64,
        /// RS256 or ES384.
        #[arg(long, default_value = "ES384")]
        alg: String,
        /// The development state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The issuer URL (`iss`) [default: the development issuer's, at
        /// `AMQP_IAM_GATEWAY_ISSUER_LISTEN` or 127.0.0.1:8479].
        #[arg(long)]
        issuer_url: Option<String>,
        /// Mint this many tokens, one per line, each with its own `jti` (1..=1000000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
        /// A principal tag, KEY=VALUE (repeatable): replaces the development principal's
        /// tags (`team=dev` for the development roles, none for other ARNs).
        #[arg(long = "principal-tag", value_parser = parse_tag)]
        principal_tags: Vec<(String, String)>,
        /// The principal's organisation id (`org_id`); an empty value leaves it out
        /// [default: o-exampleorgid for the development roles, none for other ARNs].
        #[arg(long)]
        org_id: Option<String>,
    },
    #[cfg(feature = "sts-emulator")]
    /// Ask the running development issuer to rotate its signing keys (new kids are published
    /// beside the old ones; new tokens are signed with them).
    RotateKeys {
        /// The issuer URL.
        #[arg(long)]
        issuer_url: Option<String>,
    },
    /// With `backend.auth = "token"`: write the public key of `[backend.token]`'s signing
    /// key to --public-key, and print the rabbitmq.conf lines that make the broker accept
    /// the gateway's backend tokens.
    BackendSetup {
        #[arg(long, short)]
        config: PathBuf,
        /// Where to write the public key (PEM), as the broker will read it.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Convert the auth_oauth2.* lines of a rabbitmq.conf into gateway TOML (standard
    /// output); lines that are not converted are reported on standard error.
    ImportRabbitmqConf {
        /// The rabbitmq.conf file.
        file: PathBuf,
    },
    #[cfg(feature = "sts-emulator")]
    /// Run the STS emulator alone (the Query API, discovery and JWKS) and print its URL on
    /// the first line of standard output; HTTPS with --tls-cert and --tls-key.
    StsEmulator {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Where the signing keys are kept (created if missing).
        #[arg(long)]
        state_dir: PathBuf,
        /// TOML file of `[[principal]]` tables.
        #[arg(long)]
        principals: PathBuf,
        #[arg(long, default_value = amqp_iam_gateway::sts::DEFAULT_REGION)]
        region: String,
        /// The issuer URL; default `http://<bound address>` (`https://` with --tls-cert).
        #[arg(long)]
        issuer_url: Option<String>,
        /// Serve HTTPS with this PEM certificate chain (and --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return dev_mode();
    };
    match command {
        Command::CheckConfig { config, offline } => match config::load(&config) {
            Ok(cfg) => {
                println!("{}: OK", config.display());
                if offline {
                    return ExitCode::SUCCESS;
                }
                let probed = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| {
                        rt.block_on(amqp_iam_gateway::proxy::token_probe::probe_config(&cfg))
                    });
                match probed {
                    Ok(None) => ExitCode::SUCCESS,
                    Ok(Some(Ok(node))) => {
                        println!("backend tokens: {node} accepts them");
                        ExitCode::SUCCESS
                    }
                    Ok(Some(Err(why))) => {
                        eprintln!("backend tokens: {why}");
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(errors) => {
                eprintln!("{}: invalid configuration:\n{errors}", config.display());
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "sts-emulator")]
        Command::Token {
            role_arn,
            tags,
            audiences,
            duration,
            alg,
            state_dir,
            issuer_url,
            count,
            principal_tags,
            org_id,
        } => {
            let issuer_url = match issuer_url.map_or_else(devmode::default_issuer_url, Ok) {
                Ok(url) => url,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let args = devmode::TokenArgs {
                role_arn,
                tags,
                audiences,
                duration_seconds: duration,
                algorithm: alg,
                state_dir: state_dir.unwrap_or_else(devmode::default_state_dir),
                issuer_url,
                principal_tags: (!principal_tags.is_empty()).then_some(principal_tags),
                org_id,
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            match devmode::mint_many(&args, now, count as usize) {
                Ok(tokens) => {
                    use std::io::Write;
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for token in tokens {
                        if writeln!(out, "{token}").is_err() {
                            return ExitCode::FAILURE;
                        }
                    }
                    if out.flush().is_err() {
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "sts-emulator")]
        Command::RotateKeys { issuer_url } => {
            let url = match issuer_url.map_or_else(devmode::default_issuer_url, Ok) {
                Ok(url) => url,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let Some(rt) = command_runtime() else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(devmode::rotate_keys(&url, now)) {
                Ok(answer) => {
                    println!("{answer}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain {
            config,
            token,
            json,
            operation,
            op,
            situation,
        } => {
            // Read once: the operation's decision needs the same token.
            let token = match token.or_else(|| read_stdin("the token").map(|t| t.trim().to_owned()))
            {
                Some(t) => t,
                None => return ExitCode::FAILURE,
            };
            match operation {
                // With --json, one document: the decision's report carries the token's.
                Some(name) if json => {
                    let line = op.line(&name);
                    simulate(
                        &config,
                        Some(token),
                        None,
                        Source::Line(line),
                        true,
                        false,
                        &situation,
                    )
                }
                Some(name) => match explain(&config, Some(token.clone()), false) {
                    code if code == ExitCode::SUCCESS => {
                        println!();
                        let line = op.line(&name);
                        simulate(
                            &config,
                            Some(token),
                            None,
                            Source::Line(line),
                            false,
                            false,
                            &situation,
                        )
                    }
                    code => code,
                },
                None => explain(&config, Some(token), json),
            }
        }
        Command::Simulate {
            config,
            operations,
            token,
            token_file,
            json,
            fail_on_deny,
            situation,
        } => simulate(
            &config,
            token,
            token_file,
            Source::File(operations),
            json,
            fail_on_deny,
            &situation,
        ),
        Command::BackendSetup { config, public_key } => backend_setup(&config, &public_key),
        Command::ImportRabbitmqConf { file } => match std::fs::read_to_string(&file) {
            Ok(conf) => {
                let (toml, report) = amqp_iam_gateway::cli::import_rabbitmq_conf(&conf);
                print!("{toml}");
                eprint!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "sts-emulator")]
        Command::StsEmulator {
            listen,
            state_dir,
            principals,
            region,
            issuer_url,
            tls_cert,
            tls_key,
        } => {
            init_logging("info", config::LogFormat::Text);
            let tls = tls_cert.zip(tls_key);
            match sts_emulator(listen, state_dir, &principals, region, issuer_url, tls) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve { config } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{}: invalid configuration:\n{errors}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&cfg.log.level, cfg.log.format);
            match serve(cfg, config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn explain(config: &std::path::Path, token: Option<String>, json: bool) -> ExitCode {
    let cfg = match config::load(config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: invalid configuration:\n{errors}", config.display());
            return ExitCode::FAILURE;
        }
    };
    let token = match token {
        Some(t) => t,
        None => match read_stdin("the token") {
            Some(t) => t.trim().to_owned(),
            None => return ExitCode::FAILURE,
        },
    };
    let Some(rt) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(amqp_iam_gateway::cli::explain(&cfg, &token, json)) {
        Ok(e) => {
            print!("{}", e.text);
            if e.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments of `explain --operation`, each a `key=value` of the operation.
#[derive(clap::Args, Debug, Default)]
struct OperationArgs {
    /// The vhost [default: /].
    #[arg(long)]
    vhost: Option<String>,
    #[arg(long)]
    exchange: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    routing_key: Option<String>,
    /// The exchange's type (topic exchanges get topic checks) [default: topic].
    #[arg(long)]
    exchange_type: Option<String>,
    /// exchange-bind: the destination and source exchanges, and the source's type.
    #[arg(long)]
    destination: Option<String>,
    #[arg(long)]
    source: Option<String>,
    #[arg(long)]
    source_type: Option<String>,
    /// A passive declare.
    #[arg(long)]
    passive: bool,
    #[arg(long)]
    user_id: Option<String>,
    #[arg(long)]
    alternate_exchange: Option<String>,
    #[arg(long)]
    dead_letter_exchange: Option<String>,
    /// request: an action name and a resource ARN.
    #[arg(long)]
    action: Option<String>,
    #[arg(long)]
    resource: Option<String>,
}

impl OperationArgs {
    fn line(&self, operation: &str) -> String {
        let mut line = operation.to_owned();
        let pairs = [
            ("vhost", &self.vhost),
            ("exchange", &self.exchange),
            ("queue", &self.queue),
            ("routing-key", &self.routing_key),
            ("exchange-type", &self.exchange_type),
            ("destination", &self.destination),
            ("source", &self.source),
            ("source-type", &self.source_type),
            ("user-id", &self.user_id),
            ("alternate-exchange", &self.alternate_exchange),
            ("dead-letter-exchange", &self.dead_letter_exchange),
            ("action", &self.action),
            ("resource", &self.resource),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        if self.passive {
            line.push_str(" passive=true");
        }
        line
    }
}

/// Where and when a simulated client connects.
#[derive(clap::Args, Debug, Default)]
struct SituationArgs {
    /// The client's address (`aws:SourceIp`) [default: none, the key is absent].
    #[arg(long)]
    source_ip: Option<std::net::IpAddr>,
    /// The client connects without TLS (`aws:SecureTransport` false).
    #[arg(long)]
    no_tls: bool,
    /// The time of the operations (`aws:CurrentTime`): ISO 8601 or seconds since the
    /// epoch [default: now].
    #[arg(long)]
    at: Option<String>,
}

enum Source {
    File(PathBuf),
    Line(String),
}

fn simulate(
    config: &std::path::Path,
    token: Option<String>,
    token_file: Option<PathBuf>,
    source: Source,
    json: bool,
    fail_on_deny: bool,
    situation: &SituationArgs,
) -> ExitCode {
    use amqp_iam_gateway::cli::simulate::{Row, Situation};
    let cfg = match config::load(config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: invalid configuration:\n{errors}", config.display());
            return ExitCode::FAILURE;
        }
    };
    let token = match (token, token_file) {
        (Some(t), _) => t,
        (None, Some(f)) => match std::fs::read_to_string(&f) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::FAILURE;
            }
        },
        (None, None) => match read_stdin("the token") {
            Some(t) => t.trim().to_owned(),
            None => return ExitCode::FAILURE,
        },
    };
    let text = match source {
        Source::Line(l) => l,
        Source::File(f) if f.as_os_str() == "-" => match read_stdin("the operations") {
            Some(t) => t,
            None => return ExitCode::FAILURE,
        },
        Source::File(f) => match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        // `#` starts a comment at the start of a line or after a space; elsewhere it is
        // part of a value (a topic key such as `orders.#`).
        let line = match line
            .find(" #")
            .or_else(|| line.trim_start().starts_with('#').then_some(0))
        {
            Some(at) => &line[..at],
            None => line,
        }
        .trim();
        if line.is_empty() {
            continue;
        }
        match Row::parse(line) {
            Ok(r) => rows.push(r),
            Err(e) => {
                eprintln!("line {}: {e}", n + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    let at = match situation.at.as_deref() {
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        Some(t) => match amqp_iam_gateway::authz::iam::date(t) {
            Some(t) => t,
            None => {
                eprintln!("--at {t:?}: expected ISO 8601 or seconds since the epoch");
                return ExitCode::FAILURE;
            }
        },
    };
    let situation = Situation {
        at,
        source_ip: situation.source_ip,
        secure_transport: !situation.no_tls,
    };
    let Some(rt) = command_runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(amqp_iam_gateway::cli::simulate::simulate(
        &cfg, &token, &rows, situation, json,
    )) {
        Ok(s) => {
            print!("{}", s.text);
            if !s.accepted || s.row_errors || (fail_on_deny && !s.all_permitted) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// All of standard input; `None` (and a message naming `what`) when it cannot be read.
fn read_stdin(what: &str) -> Option<String> {
    let mut t = String::new();
    match std::io::Read::read_to_string(&mut std::io::stdin(), &mut t) {
        Ok(_) => Some(t),
        Err(_) => {
            eprintln!("cannot read {what} from standard input");
            None
        }
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C) and says which.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("waiting for a signal"),
    }
}

#[cfg(feature = "sts-emulator")]
fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

#[cfg(not(feature = "sts-emulator"))]
fn dev_mode() -> ExitCode {
    eprintln!(
        "this build has no development mode (built without the `sts-emulator` feature): \
         run `amqp-iam-gateway serve --config FILE`; `--help` lists the commands"
    );
    ExitCode::from(2)
}

#[cfg(feature = "sts-emulator")]
fn dev_mode() -> ExitCode {
    init_logging("info", config::LogFormat::Text);
    let rt = match server_runtime(None) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGTERM (a container's stop) or SIGINT (Ctrl-C): drain, as `serve` does.
    let shutdown = async {
        match shutdown_signal().await {
            Ok(signal) => tracing::info!(signal, "signal received"),
            Err(e) => tracing::error!("{e:#}"),
        }
    };
    let settings = match devmode::DevSettings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(devmode::run(settings, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime of a short client command (`token`, `explain`, `rotate-keys`): one thread.
/// `None` after printing why it could not be built.
fn command_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

/// The runtime of a server: `workers` threads, or when `None` what `TOKIO_WORKER_THREADS`
/// says, else [`default_workers`]. An unusable `TOKIO_WORKER_THREADS` is an error here,
/// where tokio, left to read it, would panic.
fn server_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let n = match workers {
        Some(n) => n,
        None => env_workers()?.unwrap_or_else(|| {
            default_workers(std::thread::available_parallelism().map_or(1, |n| n.get()))
        }),
    };
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(n)
        .enable_all()
        .build()?)
}

/// `TOKIO_WORKER_THREADS`, read once for every runtime the gateway builds: `None` when it
/// is not set, an error unless it is a whole number from 1 to `runtime.worker_threads`'s
/// bound.
fn env_workers() -> anyhow::Result<Option<usize>> {
    parse_workers(std::env::var_os("TOKIO_WORKER_THREADS").as_deref())
}

fn parse_workers(value: Option<&std::ffi::OsStr>) -> anyhow::Result<Option<usize>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let max = config::MAX_WORKER_THREADS as usize;
    match value.to_str().map(|v| v.trim().parse::<usize>()) {
        Some(Ok(n)) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => anyhow::bail!(
            "TOKIO_WORKER_THREADS must be a whole number from 1 to {max}, not {value:?}"
        ),
    }
}

/// Worker threads when neither the config nor the environment names a number: one per CPU,
/// except with 2 CPUs or fewer, where one thread relays more than two. With two workers on
/// two CPUs, tokio wakes the idle worker to steal each task the other is woken for, and the
/// broker beside the gateway loses the CPU it needs (docs/performance.md, "One worker on 2
/// CPUs"). Signature checks run on the blocking pool, so the second CPU still serves them.
fn default_workers(cpus: usize) -> usize {
    if cpus <= 2 { 1 } else { cpus }
}

fn init_logging(level: &str, format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
}

/// `runtime.per_core`: `n` threads, each running a single-threaded runtime until `stop`
/// says so; their handles, to spawn connections on.
fn per_core_workers(
    n: usize,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Vec<tokio::runtime::Handle>> {
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        let mut stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("relay-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
            })?;
    }
    Ok(handles)
}

fn serve(cfg: config::Config, path: PathBuf) -> anyhow::Result<()> {
    let (stop_workers, stop) = tokio::sync::watch::channel(false);
    let (rt, workers) = if cfg.runtime.per_core {
        let n = cfg
            .runtime
            .worker_threads
            .map_or_else(env_workers, |n| Ok(Some(n)))?
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // The acceptor, the admin listener and the background tasks: one more thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        (rt, per_core_workers(n, &stop)?)
    } else {
        (server_runtime(cfg.runtime.worker_threads)?, Vec::new())
    };
    let result = serve_on(&rt, cfg, path, workers);
    let _ = stop_workers.send(true);
    result
}

fn serve_on(
    rt: &tokio::runtime::Runtime,
    cfg: config::Config,
    path: PathBuf,
    workers: Vec<tokio::runtime::Handle>,
) -> anyhow::Result<()> {
    rt.block_on(async {
        let gateway = Gateway::new(cfg)
            .await
            .map_err(anyhow::Error::msg)
            .context("starting the gateway")?;
        let gateway = gateway.with_config_path(path).with_workers(workers);
        let drainer = gateway.drainer();
        let live = gateway.live();
        gateway.start().await.context("binding listeners")?;
        // SIGHUP: reload the config file; an invalid one is reported and the current one
        // keeps serving.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = live.reload_from_file().await {
                    tracing::error!("{e}");
                }
            }
        });
        let signal = shutdown_signal().await?;
        tracing::info!(signal, "shutting down gracefully");
        let cut = drainer.drain().await;
        if cut > 0 {
            tracing::warn!(
                connections = cut,
                "drain deadline reached; closing the rest"
            );
        }
        Ok(())
    })
}

#[cfg(feature = "sts-emulator")]
fn sts_emulator(
    listen: std::net::SocketAddr,
    state_dir: PathBuf,
    principals: &std::path::Path,
    region: String,
    issuer_url: Option<String>,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::sync::Arc;

    use amqp_iam_gateway::sts;

    let principals = sts::load_principals(principals)?;
    let rt = server_runtime(None)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let issuer_url = issuer_url.unwrap_or_else(|| format!("{scheme}://{bound}"));
        let acceptor = match &tls {
            Some((cert, key)) => {
                Some(amqp_iam_gateway::proxy::tls_acceptor(cert, key).map_err(anyhow::Error::msg)?)
            }
            None => None,
        };
        let issuer = sts::Issuer::open(sts::IssuerConfig {
            issuer_url,
            state_dir,
            principals,
            region,
        })?;
        // The first stdout line is the issuer URL, for scripts and tests.
        println!("{}", issuer.issuer_url());
        std::io::stdout().flush()?;
        tracing::info!(issuer = issuer.issuer_url(), %bound, "STS emulator listening");
        let issuer = Arc::new(issuer);
        let served = async move {
            match acceptor {
                Some(a) => sts::server::serve_tls(issuer, listener, a).await,
                None => sts::serve(issuer, listener).await,
            }
        };
        tokio::select! {
            r = served => r.context("serving"),
            r = tokio::signal::ctrl_c() => {
                tracing::info!("shutting down");
                r.context("waiting for a signal")
            }
        }
    })
}

/// `backend-setup`: the broker's side of `backend.auth = "token"`.
fn backend_setup(config: &std::path::Path, public_key: &std::path::Path) -> ExitCode {
    use amqp_iam_gateway::auth::exchange;
    let run = || -> Result<String, String> {
        let cfg = config::load(config)
            .map_err(|e| format!("{}: invalid configuration:\n{e}", config.display()))?;
        let config::BackendAuth::Token(t) = &cfg.backend.auth else {
            return Err(format!(
                "{}: backend.auth is not \"token\": the broker needs no key",
                config.display()
            ));
        };
        let private = exchange::read_private_key(&t.signing_key)
            .map_err(|e| format!("backend.token.signing_key {e}"))?;
        let pem = exchange::public_key_pem(&private)
            .map_err(|e| format!("backend.token.signing_key {}: {e}", t.signing_key.display()))?;
        std::fs::write(public_key, pem).map_err(|e| format!("{}: {e}", public_key.display()))?;
        let internal = cfg.auth.backends.contains(&config::AuthBackend::Internal);
        let mut conf = amqp_iam_gateway::cli::rabbitmq_conf(t, public_key, internal);
        // The alternative that follows rotations by itself: the admin listener's JWKS.
        conf.push_str(&format!(
            "## Or, instead of the signing key (the broker then follows key rotations):\n\
             ## auth_oauth2.jwks_url = http://{}/backend-jwks.json\n",
            cfg.admin.address
        ));
        Ok(conf)
    };
    match run() {
        Ok(conf) => {
            print!("{conf}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_from_the_environment() {
        use std::ffi::OsStr;
        let ok: [(Option<&str>, Option<usize>); 4] = [
            (None, None),
            (Some("1"), Some(1)),
            (Some(" 3 "), Some(3)),
            (Some("1024"), Some(1024)),
        ];
        for (value, want) in ok {
            assert_eq!(
                parse_workers(value.map(OsStr::new)).unwrap(),
                want,
                "{value:?}"
            );
        }
        for bad in [
            "",
            "0",
            "-1",
            "1.5",
            "two",
            "1025",
            "99999999999999999999999",
        ] {
            let e = parse_workers(Some(OsStr::new(bad)))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("TOKIO_WORKER_THREADS must be a whole number from 1 to 1024"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn one_worker_on_two_cpus_or_fewer() {
        let got: Vec<_> = [1, 2, 3, 8].into_iter().map(default_workers).collect();
        assert_eq!(got, [1, 1, 3, 8]);
    }
}
