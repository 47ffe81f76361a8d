//! Zero-config development mode: `amqp-iam-gateway` with no arguments.
//!
//! Runs the embedded STS issuer and the gateway together, in front of RabbitMQ on
//! `127.0.0.1:5672` (as `guest`), with a self-signed CA and server certificate and the
//! issuer's signing keys created on first start in a state directory, so tokens and
//! trusted certificates survive restarts. Also the `token` command, which mints with the
//! same keys. Development only: the credentials and the listeners are for one machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{self, Config};
use crate::proxy::Gateway;
use crate::sts::{self, Issuer, IssuerConfig, Principal, SigningAlgorithm, TokenRequest};

/// Where the issuer listens and what `iss` says.
pub const DEFAULT_ISSUER_ADDR: &str = "127.0.0.1:8479";
/// The development gateway's AMQPS listener.
pub const DEFAULT_TLS_ADDR: &str = "127.0.0.1:5671";
/// The development gateway's plain listener.
pub const DEFAULT_PLAIN_ADDR: &str = "127.0.0.1:5674";
/// The management API listener (with backend tokens only).
pub const DEFAULT_MANAGEMENT_ADDR: &str = "127.0.0.1:15671";
/// The account of the built-in development principals.
pub const DEV_ACCOUNT: &str = "111122223333";
/// The `kid` of the development gateway's backend tokens.
pub const DEV_BACKEND_KID: &str = "amqp-iam-gateway-dev";
/// The role the Amazon MQ IAM tutorial uses; mapped to full access.
pub const ADMIN_ROLE: &str = "arn:aws:iam::111122223333:role/RabbitMqAdminRole";
/// A role mapped to read-only access.
pub const READONLY_ROLE: &str = "arn:aws:iam::111122223333:role/RabbitMqReadOnlyRole";

/// Settings of the development mode (all have defaults).
#[derive(Clone, Debug)]
pub struct DevSettings {
    pub state_dir: PathBuf,
    pub issuer_addr: SocketAddr,
    pub tls_addr: SocketAddr,
    pub plain_addr: Option<SocketAddr>,
    /// The management API listener, served when backend tokens are in use.
    pub management_addr: Option<SocketAddr>,
    pub backend: String,
    pub backend_user: String,
    pub backend_password: String,
    /// Whose credentials the backend connections carry (`AMQP_IAM_GATEWAY_BACKEND_AUTH`).
    pub backend_auth: DevBackendAuth,
    /// The backend tokens' signing key; `None`: `backend-token.pem` in the state
    /// directory, created on first start.
    pub backend_token_key: Option<PathBuf>,
    pub backend_token_kid: String,
}

/// `AMQP_IAM_GATEWAY_BACKEND_AUTH`: `auto` (the default), `token` or `service_user`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevBackendAuth {
    /// Backend tokens when the broker accepts them (asked at start), else the service
    /// user, saying so.
    Auto,
    Token,
    ServiceUser,
}

impl Default for DevSettings {
    fn default() -> Self {
        DevSettings {
            state_dir: default_state_dir(),
            issuer_addr: parse_addr(DEFAULT_ISSUER_ADDR),
            tls_addr: parse_addr(DEFAULT_TLS_ADDR),
            plain_addr: Some(parse_addr(DEFAULT_PLAIN_ADDR)),
            management_addr: Some(parse_addr(DEFAULT_MANAGEMENT_ADDR)),
            backend: "127.0.0.1:5672".into(),
            backend_user: "guest".into(),
            backend_password: "guest".into(),
            backend_auth: DevBackendAuth::Auto,
            backend_token_key: None,
            backend_token_kid: DEV_BACKEND_KID.into(),
        }
    }
}

impl DevSettings {
    /// The defaults, overridden by environment variables (for containers):
    /// `AMQP_IAM_GATEWAY_LISTEN` (AMQPS address), `AMQP_IAM_GATEWAY_PLAIN_LISTEN` (plain
    /// address, `off` to disable), `AMQP_IAM_GATEWAY_MANAGEMENT_LISTEN` (the management API
    /// listener, `off` to disable), `AMQP_IAM_GATEWAY_ISSUER_LISTEN`,
    /// `AMQP_IAM_GATEWAY_BACKEND` (`host:port`), `AMQP_IAM_GATEWAY_BACKEND_USER`,
    /// `AMQP_IAM_GATEWAY_BACKEND_PASSWORD`, `AMQP_IAM_GATEWAY_BACKEND_AUTH` (`auto`, `token`,
    /// `service_user`), `AMQP_IAM_GATEWAY_BACKEND_TOKEN_KEY` (a PEM private key, mode 600)
    /// and `AMQP_IAM_GATEWAY_BACKEND_TOKEN_KID`; the state directory as in
    /// [`default_state_dir`].
    pub fn from_env() -> anyhow::Result<DevSettings> {
        let mut s = DevSettings::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let addr = |k: &str, v: String| {
            v.parse::<SocketAddr>()
                .map_err(|e| anyhow::anyhow!("{k}={v:?}: {e}"))
        };
        if let Some(v) = var("AMQP_IAM_GATEWAY_LISTEN") {
            s.tls_addr = addr("AMQP_IAM_GATEWAY_LISTEN", v)?;
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_PLAIN_LISTEN") {
            s.plain_addr = if v == "off" {
                None
            } else {
                Some(addr("AMQP_IAM_GATEWAY_PLAIN_LISTEN", v)?)
            };
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_MANAGEMENT_LISTEN") {
            s.management_addr = if v == "off" {
                None
            } else {
                Some(addr("AMQP_IAM_GATEWAY_MANAGEMENT_LISTEN", v)?)
            };
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_ISSUER_LISTEN") {
            s.issuer_addr = addr("AMQP_IAM_GATEWAY_ISSUER_LISTEN", v)?;
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_BACKEND") {
            s.backend = v;
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_BACKEND_USER") {
            s.backend_user = v;
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_BACKEND_PASSWORD") {
            s.backend_password = v;
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_BACKEND_AUTH") {
            s.backend_auth = match v.as_str() {
                "auto" => DevBackendAuth::Auto,
                "token" => DevBackendAuth::Token,
                "service_user" => DevBackendAuth::ServiceUser,
                _ => {
                    return Err(anyhow::anyhow!(
                        "AMQP_IAM_GATEWAY_BACKEND_AUTH={v:?}: auto, token or service_user"
                    ));
                }
            };
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_BACKEND_TOKEN_KEY") {
            s.backend_token_key = Some(PathBuf::from(v));
        }
        if let Some(v) = var("AMQP_IAM_GATEWAY_BACKEND_TOKEN_KID") {
            s.backend_token_kid = v;
        }
        Ok(s)
    }

    /// The management API of the backend node (for exchange types).
    fn management_url(&self) -> String {
        let host = self
            .backend
            .rsplit_once(':')
            .map_or(self.backend.as_str(), |(h, _)| h);
        format!("http://{host}:15672")
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// `$AMQP_IAM_GATEWAY_STATE`, else `$XDG_STATE_HOME/amqp-iam-gateway`, else
/// `~/.local/state/amqp-iam-gateway`, else `./.amqp-iam-gateway`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AMQP_IAM_GATEWAY_STATE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("amqp-iam-gateway");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/amqp-iam-gateway"),
        None => PathBuf::from(".amqp-iam-gateway"),
    }
}

/// The development callers of the STS API (AWS's documented example credentials).
pub fn dev_principals() -> Vec<Principal> {
    let p = |akid: &str, secret: &str, role: &str| Principal {
        access_key_id: akid.into(),
        secret_access_key: secret.into(),
        role_arn: role.into(),
        account: DEV_ACCOUNT.into(),
        org_id: Some("o-exampleorgid".into()),
        ou_path: vec!["o-exampleorgid/r-ab12/ou-ab12-11111111/".into()],
        principal_tags: BTreeMap::from([("team".to_owned(), "dev".to_owned())]),
    };
    vec![
        p(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            ADMIN_ROLE,
        ),
        p(
            "AKIAI44QH8DHBEXAMPLE",
            "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
            READONLY_ROLE,
        ),
    ]
}

/// The TLS material of the development listener.
pub struct DevTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a CA and a server certificate for localhost / 127.0.0.1 in `state_dir/tls`
/// unless they exist.
pub fn ensure_tls(state_dir: &Path) -> anyhow::Result<DevTls> {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
    let dir = state_dir.join("tls");
    let tls = DevTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    if tls.ca.exists() && tls.cert.exists() && tls.key.exists() {
        return Ok(tls);
    }
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let err = |e: rcgen::Error| anyhow::anyhow!("certificate generation: {e}");
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "amqp-iam-gateway development CA");
    ca.distinguished_name = dn;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(err)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    write_private(&tls.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&tls.cert, cert.pem())
        .map_err(|e| anyhow::anyhow!("{}: {e}", tls.cert.display()))?;
    std::fs::write(&tls.ca, ca_cert.pem())
        .map_err(|e| anyhow::anyhow!("{}: {e}", tls.ca.display()))?;
    Ok(tls)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The backend tokens' signing key: the configured one, or `backend-token.pem` in the
/// state directory, created (P-256, mode 600) on first start, with its public key beside it
/// (`backend-token.pub.pem`) for the broker.
pub fn ensure_backend_key(s: &DevSettings) -> anyhow::Result<PathBuf> {
    if let Some(k) = &s.backend_token_key {
        return Ok(k.clone());
    }
    let key = s.state_dir.join("backend-token.pem");
    if !key.exists() {
        let pair =
            rcgen::KeyPair::generate().map_err(|e| anyhow::anyhow!("key generation: {e}"))?;
        write_private(&key, pair.serialize_pem().as_bytes())?;
        let public = s.state_dir.join("backend-token.pub.pem");
        std::fs::write(&public, pair.public_key_pem())
            .map_err(|e| anyhow::anyhow!("{}: {e}", public.display()))?;
    }
    Ok(key)
}

/// The issuer URL for an issuer bound at `addr`: a loopback URL for an unspecified address
/// (`0.0.0.0:8479` in a container), since the gateway in the same process reaches it there.
pub fn issuer_url(addr: SocketAddr) -> String {
    format!("http://{}", loopback_if_unspecified(addr))
}

fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// The development issuer's URL as `token` and `rotate-keys` should assume it: the
/// address in `AMQP_IAM_GATEWAY_ISSUER_LISTEN` when set, as development mode binds it.
pub fn default_issuer_url() -> anyhow::Result<String> {
    DevSettings::from_env().map(|s| issuer_url(s.issuer_addr))
}

/// The gateway config of the development mode, as TOML (also written next to the state
/// so it can be copied and edited).
/// `backend_key`: with backend tokens, their signing key.
pub fn config_toml(s: &DevSettings, tls: &DevTls, backend_key: Option<&Path>) -> String {
    let plain = s
        .plain_addr
        .map(|a| format!("plain_address = \"{a}\"\n"))
        .unwrap_or_default();
    let tokens = backend_key
        .map(|k| {
            format!(
                "# RabbitMQ checks every operation too, with a token the gateway mints per client.\n\
                 auth = \"token\"\n\n[backend.token]\nsigning_key = {key:?}\nkid = {kid:?}\n\
                 resource_server_id = \"rabbitmq\"\n{management}",
                key = k.display().to_string(),
                kid = s.backend_token_kid,
                management = s
                    .management_addr
                    .map(|a| format!(
                        "\n# RabbitMQ's management API (HTTPS, the listener's certificate), with the \
                         same tokens.\n[management]\naddress = \"{a}\"\n"
                    ))
                    .unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    format!(
        r#"# Generated by `amqp-iam-gateway` (development mode). A starting point for a real config:
# see proxy-config/gateway.example.toml for every key.
[listener]
address = "{tls_addr}"
tls_cert = "{cert}"
tls_key = "{key}"
{plain}
[backend]
nodes = ["{backend}"]
username = "{user}"
password = "{password}"
management_url = "{management}"
{tokens}
[oauth2]
resource_server_id = "rabbitmq"
scope_prefix = "rabbitmq/"
issuer = "{issuer}"
# The role ARN in `sub`, and a `scope` request tag inside the STS namespace object.
additional_scopes_key = 'sub https://sts\.amazonaws\.com/.request_tags.scope'

[oauth2.scope_aliases]
"{ADMIN_ROLE}" = "rabbitmq/tag:administrator rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*"
# `monitoring`: the management UI and API, read-only (AMQP is unaffected by tags).
"{READONLY_ROLE}" = "rabbitmq/tag:monitoring rabbitmq/read:*/*"
# A request tag `scope=team-a` (amqp-iam-gateway token --tag scope=team-a) grants team-a.*.
"team-a" = "rabbitmq/configure:%2F/team-a.* rabbitmq/write:%2F/team-a.* rabbitmq/read:%2F/team-a.*"
"#,
        tls_addr = s.tls_addr,
        cert = tls.cert.display(),
        key = tls.key.display(),
        backend = s.backend,
        user = s.backend_user,
        password = s.backend_password,
        issuer = issuer_url(s.issuer_addr),
        management = s.management_url(),
    )
}

/// Opens the issuer with the development principals.
pub fn open_issuer(state_dir: &Path, issuer_url: &str) -> anyhow::Result<Issuer> {
    Issuer::open(IssuerConfig {
        issuer_url: issuer_url.to_owned(),
        state_dir: state_dir.to_owned(),
        principals: dev_principals(),
        region: sts::DEFAULT_REGION.to_owned(),
    })
    .map_err(anyhow::Error::msg)
}

/// Runs the issuer and the gateway until `shutdown` completes, then drains the gateway
/// (SIGHUP meanwhile reloads the generated config file).
pub async fn run(
    s: DevSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&s.state_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", s.state_dir.display()))?;
    let tls = ensure_tls(&s.state_dir)?;
    let listener = tokio::net::TcpListener::bind(s.issuer_addr)
        .await
        .map_err(|e| anyhow::anyhow!("STS issuer on {}: {e}", s.issuer_addr))?;
    // The issuer is reached over loopback by the gateway in the same process, whatever
    // address it listens on, so `iss` names a loopback URL.
    let bound = listener.local_addr().map_err(anyhow::Error::msg)?;
    let url = issuer_url(bound);
    let issuer = Arc::new(open_issuer(&s.state_dir, &url)?);
    tokio::spawn(sts::serve(issuer, listener));
    let settings = DevSettings {
        issuer_addr: url
            .trim_start_matches("http://")
            .parse()
            .unwrap_or(s.issuer_addr),
        ..s
    };
    let (toml, backend) = choose_backend(&settings, &tls).await?;
    let config_path = settings.state_dir.join("gateway.toml");
    std::fs::write(&config_path, &toml)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    let cfg: Config = config::parse(&toml, &settings.state_dir).map_err(anyhow::Error::msg)?;
    let gateway = Gateway::new(cfg)
        .await?
        .with_config_path(config_path.clone());
    let drainer = gateway.drainer();
    let live = gateway.live();
    let bound = gateway
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("binding listeners: {e}"))?;
    print_banner(&settings, &tls, &config_path, &url, bound, &backend);
    // SIGHUP reloads the generated config file (edit it to try a setting), as in `serve`.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("installing the SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = live.reload_from_file().await {
                tracing::error!("{e}");
            }
        }
    });
    shutdown.await;
    // As `serve`: no new connections, clients keep going for the drain period, then 320.
    tracing::info!("shutting down gracefully");
    let cut = drainer.drain().await;
    if cut > 0 {
        tracing::warn!(
            connections = cut,
            "drain deadline reached; closing the rest"
        );
    }
    Ok(())
}

/// The config to run with, and the banner's line about the backend: backend tokens when
/// the broker accepts them (or when asked for), else the service user, saying why the
/// gateway is then the only guard.
async fn choose_backend(s: &DevSettings, tls: &DevTls) -> anyhow::Result<(String, String)> {
    let service = || {
        let user = &s.backend_user;
        format!("service user {user:?}: the gateway is the only guard")
    };
    if s.backend_auth == DevBackendAuth::ServiceUser {
        return Ok((config_toml(s, tls, None), service()));
    }
    let key = ensure_backend_key(s)?;
    let toml = config_toml(s, tls, Some(&key));
    let tokens = "tokens: RabbitMQ checks every operation too".to_owned();
    if s.backend_auth == DevBackendAuth::Token {
        return Ok((toml, tokens));
    }
    let cfg: Config = config::parse(&toml, &s.state_dir).map_err(anyhow::Error::msg)?;
    match crate::proxy::token_probe::probe_config(&cfg).await {
        Some(Ok(_)) => Ok((toml, tokens)),
        Some(Err(why)) => {
            let tokens_config = s.state_dir.join("gateway-tokens.toml");
            tracing::warn!(
                "backend tokens not in use, the gateway is the only guard: {why}. To let \
                 RabbitMQ check every operation too: `amqp-iam-gateway backend-setup --config \
                 {} --public-key <file the broker reads>` writes the public key and prints \
                 the broker's lines",
                tokens_config.display()
            );
            std::fs::write(&tokens_config, &toml)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tokens_config.display()))?;
            Ok((config_toml(s, tls, None), service()))
        }
        None => Ok((toml, tokens)),
    }
}

fn print_banner(
    s: &DevSettings,
    tls: &DevTls,
    config: &Path,
    issuer: &str,
    bound: crate::proxy::BoundAddrs,
    backend_auth: &str,
) {
    let tls_addr = bound.tls.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let port = bound.tls.map_or(5671, |a| a.port());
    println!(
        r#"amqp-iam-gateway (development mode)
  AMQPS listener   {tls_addr}  (plain AMQP: {plain})
  backend          {backend}  ({backend_auth})
  management API   {management}
  STS issuer       {issuer}  (discovery: {issuer}/.well-known/openid-configuration)
  CA certificate   {ca}
  server cert/key  {cert}  {key}
  gateway config   {config}
  state            {state}

Mint a token (role ARN in `sub`, full access through a scope alias):
  TOKEN=$(amqp-iam-gateway token --role-arn {ADMIN_ROLE})
or read-only:       amqp-iam-gateway token --role-arn {READONLY_ROLE}
or with boto3:      boto3.client("sts", endpoint_url="{issuer}", region_name="us-east-1",
                      aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                      aws_secret_access_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
                    .get_web_identity_token(Audience=["rabbitmq"], SigningAlgorithm="ES384")

Connect with an empty username and the token as password, trusting the CA above:
  amqps://:$TOKEN@localhost:{port}/%2f
{management_hint}"#,
        management = bound.management.map_or_else(
            || "off (it needs backend tokens)".to_owned(),
            |a| format!("https://{a}  (RabbitMQ's management API and UI, with the same tokens)"),
        ),
        management_hint = bound.management.map_or_else(String::new, |a| format!(
            "\nThe management API and UI, with the token as the password (any user name):\n  \
             curl --cacert {ca} -u \":$TOKEN\" https://localhost:{port}/api/overview\n",
            ca = tls.ca.display(),
            port = a.port(),
        )),
        plain = s
            .plain_addr
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        backend = s.backend,
        ca = tls.ca.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
        config = config.display(),
        state = s.state_dir.display(),
    );
}

/// What `token` mints.
#[derive(Clone, Debug)]
pub struct TokenArgs {
    pub role_arn: String,
    pub tags: Vec<(String, String)>,
    pub audiences: Vec<String>,
    pub duration_seconds: i64,
    pub algorithm: String,
    pub state_dir: PathBuf,
    pub issuer_url: String,
    /// Replaces the principal's tags (`principal_tags`), when given.
    pub principal_tags: Option<Vec<(String, String)>>,
    /// Replaces the principal's organisation (`org_id`; empty: none), when given.
    pub org_id: Option<String>,
}

/// Mints a token with the development issuer's keys, for any role ARN.
pub fn mint(args: &TokenArgs, now: i64) -> anyhow::Result<String> {
    mint_many(args, now, 1).map(|mut tokens| tokens.remove(0))
}

/// Mints `count` tokens (at least one) like [`mint`], each with its own `jti`: a benchmark's
/// connections each with a token the gateway has not verified before.
pub fn mint_many(args: &TokenArgs, now: i64, count: usize) -> anyhow::Result<Vec<String>> {
    let issuer = open_issuer(&args.state_dir, &args.issuer_url)?;
    let algorithm = SigningAlgorithm::parse(&args.algorithm)
        .ok_or_else(|| anyhow::anyhow!("--alg {:?}: expected RS256 or ES384", args.algorithm))?;
    let caller = dev_principals()
        .into_iter()
        .find(|p| p.role_arn == args.role_arn)
        .unwrap_or_else(|| Principal {
            access_key_id: "AKIADEVTOKENCOMMAND".into(),
            secret_access_key: String::new(),
            role_arn: args.role_arn.clone(),
            account: args
                .role_arn
                .split(':')
                .nth(4)
                .filter(|a| !a.is_empty())
                .unwrap_or(DEV_ACCOUNT)
                .into(),
            org_id: None,
            ou_path: Vec::new(),
            principal_tags: BTreeMap::new(),
        });
    let mut caller = caller;
    if let Some(tags) = &args.principal_tags {
        caller.principal_tags = tags.iter().cloned().collect();
    }
    if let Some(org) = &args.org_id {
        caller.org_id = (!org.is_empty()).then(|| org.clone());
        caller
            .ou_path
            .retain(|p| !org.is_empty() && p.starts_with(org.as_str()));
    }
    let mut req = TokenRequest::new("rabbitmq", algorithm);
    if !args.audiences.is_empty() {
        req.audiences = args.audiences.clone();
    }
    req.duration_seconds = args.duration_seconds;
    req.tags = args.tags.iter().cloned().collect();
    (0..count.max(1))
        .map(|_| {
            issuer
                .mint(&caller, &req, now)
                .map(|m| m.token)
                .map_err(anyhow::Error::msg)
        })
        .collect()
}

/// Asks a running issuer (development mode or `sts-emulator`) to rotate its signing keys:
/// a SigV4-signed `POST /_emulator/rotate-keys` with the first development principal.
/// Returns the issuer's answer (the new signing kids and the published ones).
pub async fn rotate_keys(issuer_url: &str, now: i64) -> anyhow::Result<String> {
    use crate::sts::server::{ROTATE_PATH, SERVICE};
    use crate::sts::sigv4::{SignedRequest, authorization_header};
    let base = issuer_url.trim_end_matches('/');
    let host = base.split_once("://").map_or(base, |(_, h)| h).to_owned();
    let p = &dev_principals()[0];
    let date = sts::time::amz_date(now);
    let headers = vec![
        ("host".to_owned(), host),
        ("x-amz-date".to_owned(), date.clone()),
    ];
    let req = SignedRequest {
        method: "POST",
        path: ROTATE_PATH,
        query: "",
        headers: &headers,
        body: b"",
    };
    let signed = ["host".to_owned(), "x-amz-date".to_owned()];
    let auth = authorization_header(
        &p.access_key_id,
        &p.secret_access_key,
        &req,
        &signed,
        &date,
        sts::DEFAULT_REGION,
        SERVICE,
    );
    let resp = reqwest::Client::new()
        .post(format!("{base}{ROTATE_PATH}"))
        .header("x-amz-date", date)
        .header("authorization", auth)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(anyhow::Error::msg)?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(anyhow::anyhow!("{base}: HTTP {status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_url_names_a_loopback_address_for_an_unspecified_one() {
        // `token` in a container whose issuer listens on 0.0.0.0 must mint the `iss` the
        // gateway in that container expects (found by the container tests).
        for (bound, url) in [
            ("0.0.0.0:8479", "http://127.0.0.1:8479"),
            ("[::]:8479", "http://[::1]:8479"),
            ("127.0.0.1:9000", "http://127.0.0.1:9000"),
            ("10.1.2.3:8479", "http://10.1.2.3:8479"),
        ] {
            assert_eq!(issuer_url(bound.parse().unwrap()), url, "{bound}");
        }
    }
}
