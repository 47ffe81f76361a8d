//! Why a configuration cannot be put in force, at start or on reload: the operator's side
//! of the error taxonomy (a client's side is `outcome`, `auth::jwt::AuthError` and
//! `backend::BackendError`). Each error has a stable `reason()` and a message that names
//! the setting or file at fault.

use crate::auth::exchange::KeyFileError;
use crate::config::ConfigErrors;
use crate::wiring::WiringError;

/// Why TLS material could not be loaded, or a TLS configuration built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    Read { path: String, why: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: String },
    #[error("backend.tls_ca {path}: {why}")]
    BadCa { path: String, why: String },
    #[error("{0}")]
    Protocols(String),
    #[error("TLS certificate/key: {0}")]
    CertificateKey(String),
    #[error("backend TLS client certificate/key: {0}")]
    ClientCertificateKey(String),
}

/// Why a configuration could not be put in force; on reload, the old one keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Auth(#[from] WiringError),
    /// `[backend.token]`'s signing key or a retired key.
    #[error("{setting} {path}: {source}")]
    BackendTokenKey {
        setting: &'static str,
        path: String,
        source: KeyFileError,
    },
    /// An HTTP client could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(String),
    #[error("log.audit: {0}")]
    Audit(std::io::Error),
    /// The management listener's TLS (`[management]`).
    #[error("management: {0}")]
    Management(TlsError),
    #[error("no config file to reload (the gateway was not started from one)")]
    NoConfigFile,
    #[error("{path}: invalid configuration, keeping the current one:\n{errors}")]
    InvalidFile { path: String, errors: ConfigErrors },
}

impl SetupError {
    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            SetupError::Tls(_) => "tls",
            SetupError::Auth(_) => "issuer_keys",
            SetupError::BackendTokenKey { .. } => "backend_token_key",
            SetupError::HttpClient(_) => "http_client",
            SetupError::Audit(_) => "audit_log",
            SetupError::Management(_) => "management_tls",
            SetupError::NoConfigFile => "no_config_file",
            SetupError::InvalidFile { .. } => "invalid_config",
        }
    }
}
