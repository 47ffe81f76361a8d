//! Whether the broker accepts the gateway's backend tokens (`backend.auth = "token"`), for
//! `check-config` and `/readyz`: rather than failing client logins one by one, the gateway
//! says what is missing.
//!
//! The probe logs in to the first reachable node with a token minted for
//! [`PROBE_USER`], which holds no permission and lives a minute, and hangs up once the
//! broker has answered `connection.start-ok`. RabbitMQ tells a client only that a login
//! was refused (the reason is in its log), so when it refuses, the gateway asks the
//! management API (when `backend.management_url` is set) which plugins each node runs,
//! and otherwise names every cause that fits. `/readyz` keeps an answer for
//! [`PROBE_EVERY`], so that probes from several systems do not become broker load.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::amqp::handshake::ClientProperties;
use crate::auth::exchange::{BackendMinter, Subject};
use crate::config::BackendConfig;
use crate::telemetry::metrics::Metrics;

use super::backend::{self, BackendError, Login};
use super::balancer::Balancer;

/// The `sub` of the probe's token: the name the broker's log shows for it.
pub const PROBE_USER: &str = "amqp-iam-gateway-probe";
/// How long `/readyz` reuses an answer.
pub const PROBE_EVERY: Duration = Duration::from_secs(30);
/// The plugin that verifies tokens in RabbitMQ.
const PLUGIN: &str = "rabbitmq_auth_backend_oauth2";

/// Why the broker does not accept the gateway's backend tokens, or could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The configuration could not be set up for the probe (its key, its TLS).
    #[error("{0}")]
    Setup(String),
    #[error("no backend token could be minted: {0}")]
    Mint(String),
    /// The broker refused the probe's token: what is missing, as precisely as it can be
    /// told ([`explain_refusal`]).
    #[error("{0}")]
    Refused(String),
    #[error("the broker could not be asked: {0}")]
    Unreachable(String),
}

impl ProbeError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeError::Setup(_) => "setup",
            ProbeError::Mint(_) => "mint",
            ProbeError::Refused(_) => "refused",
            ProbeError::Unreachable(_) => "unreachable",
        }
    }
}

/// Each node's name and enabled plugins (the management API's `/api/nodes`).
pub type NodePlugins = Vec<(String, Vec<String>)>;

/// Logs in with a fresh probe token: `Ok(node)` when the broker accepted it, otherwise
/// why not, as precisely as the broker lets the gateway know.
pub async fn probe(
    cfg: &BackendConfig,
    tls: Option<&tokio_rustls::TlsConnector>,
    balancer: &Arc<Balancer>,
    minter: &BackendMinter,
    metrics: &Metrics,
) -> Result<String, ProbeError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let claims = minter.claims(
        &Subject {
            username: PROBE_USER,
            scopes: &[],
            exp: Some(now + 60),
        },
        now,
        &format!("probe-{now}"),
    );
    let token = minter
        .sign(&claims)
        .map_err(|e| ProbeError::Mint(e.to_string()))?;
    let props = ClientProperties::new(&[])
        .map(|p| p.for_backend("amqp-iam-gateway token probe", "-", false))
        .unwrap_or_default();
    let nodes = backend::Nodes {
        cfg,
        tls,
        balancer,
        metrics,
    };
    match backend::login(&nodes, Login::Token(&token), &props).await {
        Ok(logged_in) => Ok(logged_in.node().to_owned()),
        Err(BackendError::LoginRefused { code, text, .. }) => {
            let plugins = match &cfg.management_url {
                Some(url) => Some(node_plugins(url, cfg).await),
                None => None,
            };
            Err(ProbeError::Refused(explain_refusal(
                &format!("{code} {text}"),
                plugins.as_ref(),
                minter.kid(),
                minter.audience(),
            )))
        }
        Err(e) => Err(ProbeError::Unreachable(e.to_string())),
    }
}

/// [`probe`] for `check-config`: `None` when `cfg` does not use backend tokens.
pub async fn probe_config(cfg: &crate::config::Config) -> Option<Result<String, ProbeError>> {
    let crate::config::BackendAuth::Token(t) = &cfg.backend.auth else {
        return None;
    };
    let b = &cfg.backend;
    let setup = async {
        let setup = |e: &dyn std::fmt::Display| ProbeError::Setup(e.to_string());
        let minter = super::backend_minter(t).map_err(|e| setup(&e))?;
        let tls = match &b.tls {
            Some(t) => Some(backend::tls_connector(t).map_err(|e| setup(&e))?),
            None => None,
        };
        let nodes = b.nodes.iter().map(|n| n.to_string()).collect();
        let balancer = Arc::new(Balancer::new(nodes, b.balance, b.max_connecting));
        probe(b, tls.as_ref(), &balancer, &minter, &Metrics::new()).await
    };
    Some(setup.await)
}

/// The plugins each node runs, from the management API: `Ok([(node, plugins)])`, or why
/// the API did not say.
async fn node_plugins(
    base: &str,
    cfg: &BackendConfig,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let http = reqwest::Client::builder()
        .timeout(cfg.connect_timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/api/nodes", base.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .basic_auth(&cfg.username, Some(&cfg.password))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let nodes: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    Ok(nodes
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|n| {
            let name = n.get("name").and_then(|v| v.as_str()).unwrap_or("?");
            let plugins = n
                .get("enabled_plugins")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (name.to_owned(), plugins)
        })
        .collect())
}

/// What the broker's refusal of the probe token means. `plugins`: the nodes' enabled
/// plugins, when the management API was asked.
pub fn explain_refusal(
    text: &str,
    plugins: Option<&Result<NodePlugins, String>>,
    kid: &str,
    audience: &str,
) -> String {
    let head = format!("the broker refuses the gateway's backend tokens ({text})");
    let setup = "`amqp-iam-gateway backend-setup --config <file>` prints the broker's lines";
    let rest = format!(
        "RabbitMQ must list {PLUGIN} in auth_backends, know the public key of \
         [backend.token] as signing key {kid:?}, and have resource_server_id = {audience:?}"
    );
    match plugins {
        Some(Ok(nodes)) => {
            let without: Vec<&str> = nodes
                .iter()
                .filter(|(_, p)| !p.iter().any(|x| x == PLUGIN))
                .map(|(n, _)| n.as_str())
                .collect();
            if !without.is_empty() {
                return format!(
                    "{head}: the plugin {PLUGIN} is not enabled on {} \
                     (rabbitmq-plugins enable {PLUGIN}); {setup}",
                    without.join(", ")
                );
            }
            format!(
                "{head}: {PLUGIN} is enabled, so it is not in auth_backends, or it does not \
                 know signing key {kid:?} (the public key of [backend.token]), or its \
                 resource_server_id is not {audience:?} (the broker's log says which); {setup}"
            )
        }
        Some(Err(e)) => {
            format!("{head}: {rest} (the management API did not say which: {e}); {setup}")
        }
        None => format!("{head}: {rest}; {setup}"),
    }
}

/// The last probe's answer, kept for [`PROBE_EVERY`]; one probe runs at a time and the
/// callers meanwhile wait for it.
#[derive(Default)]
pub struct ProbeCache {
    last: tokio::sync::Mutex<Option<(Instant, Result<String, ProbeError>)>>,
}

impl ProbeCache {
    /// The cached answer if fresh, else the one `run` gives now.
    pub async fn get<F>(&self, run: F) -> Result<String, ProbeError>
    where
        F: std::future::Future<Output = Result<String, ProbeError>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < PROBE_EVERY
        {
            return answer.clone();
        }
        let answer = run.await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = "ACCESS_REFUSED - Login was refused using authentication mechanism \
                           PLAIN. For details see the broker logfile.";

    #[test]
    fn a_node_without_the_plugin_is_named() {
        let nodes = Ok(vec![
            ("rabbit@a".to_owned(), vec![PLUGIN.to_owned()]),
            (
                "rabbit@b".to_owned(),
                vec!["rabbitmq_management".to_owned()],
            ),
        ]);
        let why = explain_refusal(REFUSED, Some(&nodes), "gw-1", "rabbitmq");
        assert!(
            why.contains("not enabled on rabbit@b (rabbitmq-plugins enable"),
            "{why}"
        );
        assert!(!why.contains("rabbit@a"), "{why}");
    }

    #[test]
    fn with_the_plugin_enabled_the_key_and_the_audience_are_named() {
        let nodes = Ok(vec![("rabbit@a".to_owned(), vec![PLUGIN.to_owned()])]);
        let why = explain_refusal(REFUSED, Some(&nodes), "gw-1", "rabbitmq");
        assert!(why.contains("signing key \"gw-1\""), "{why}");
        assert!(
            why.contains("resource_server_id is not \"rabbitmq\""),
            "{why}"
        );
        assert!(why.contains("auth_backends"), "{why}");
    }

    #[test]
    fn without_the_management_api_every_cause_is_named() {
        let why = explain_refusal(REFUSED, None, "gw-1", "rs");
        for part in [
            PLUGIN,
            "auth_backends",
            "\"gw-1\"",
            "\"rs\"",
            "backend-setup",
        ] {
            assert!(why.contains(part), "{part}: {why}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_kept_for_a_while() {
        let cache = ProbeCache::default();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let run = || async {
            runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err::<String, _>(ProbeError::Refused("refused".to_owned()))
        };
        assert!(cache.get(run()).await.is_err());
        assert!(cache.get(run()).await.is_err());
        assert_eq!(runs.load(std::sync::atomic::Ordering::Relaxed), 1);
        tokio::time::advance(PROBE_EVERY).await;
        assert!(cache.get(run()).await.is_err());
        assert_eq!(runs.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
