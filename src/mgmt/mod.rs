//! The management API's requests, judged without IO: where a request carries credentials,
//! how it is rewritten for the broker, what the audit log calls its path, and which
//! requests would change a protected user. The listener and the forwarding are
//! `proxy::management`.
//!
//! RabbitMQ 3.10.8's management plugin reads credentials from three places, and the
//! gateway owns all three, so that no client credential reaches the broker unless the
//! gateway chose to pass it on:
//! - the `Authorization` header, `Basic` (any user name, the token as the password) or
//!   `Bearer` (`rabbit_mgmt_util:is_authorized1`);
//! - on `/api/definitions[/vhost]`, the query parameters `auth` (base64 of `user:password`,
//!   the UI's download link and upload form) and `token`, which win over the header
//!   (`rabbit_mgmt_wm_definitions:is_authorized`);
//! - `POST /api/login`, a form with `username` and `password`; the broker answers with a
//!   cookie `auth` holding base64 of `user:password` (`rabbit_mgmt_wm_login`).

pub mod policy;
#[cfg(test)]
mod tests;

use base64::Engine;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The `WWW-Authenticate` value RabbitMQ's management plugin sends.
pub const AUTH_REALM: &str = "Basic realm=\"RabbitMQ Management\"";
/// RabbitMQ's body for a refused login (`not_authenticated(<<"Login failed">>)`).
pub const LOGIN_FAILED: &str = r#"{"error":"not_authorized","reason":"Login failed"}"#;
/// RabbitMQ 4.2's refusal for a change to a protected user (`400`).
pub const PROTECTED_USER: &str = "Protected users cannot be modified via the HTTP API";
/// The form `POST /api/login` takes.
pub const LOGIN_PATH: &str = "/api/login";

/// Where a request's credentials were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    Basic,
    Bearer,
    /// `?auth=` on `/api/definitions`.
    QueryAuth,
    /// `?token=` on `/api/definitions`.
    QueryToken,
    /// `POST /api/login`'s form.
    LoginForm,
}

impl Carrier {
    pub fn as_str(self) -> &'static str {
        match self {
            Carrier::Basic => "basic",
            Carrier::Bearer => "bearer",
            Carrier::QueryAuth => "query_auth",
            Carrier::QueryToken => "query_token",
            Carrier::LoginForm => "login_form",
        }
    }
}

/// Credentials a request presents. `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct Presented {
    pub username: String,
    /// The password: a token, or an internal user's password.
    pub secret: String,
    pub carrier: Carrier,
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented")
            .field("username", &self.username)
            .field("carrier", &self.carrier)
            .finish_non_exhaustive()
    }
}

/// Why a request's credentials could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Two `Authorization` headers: which one the broker reads is not the gateway's guess.
    TwoAuthorizations,
}

impl Malformed {
    pub fn reason(self) -> &'static str {
        match self {
            Malformed::TwoAuthorizations => "two_authorization_headers",
        }
    }
}

/// The path's segments, percent-decoded, without empty ones (`//`, a trailing `/`) and
/// with dot segments resolved (`.` dropped, `..` removing the one before): whatever the
/// broker's router makes of such a path, a protected user's route is recognised in it.
/// `None` for a segment that does not decode to UTF-8.
pub fn segments(path: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for s in path.split('/').filter(|s| !s.is_empty()) {
        let seg = percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()?
            .into_owned();
        match seg.as_str() {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    Some(out)
}

/// Whether `path` is `/api/definitions` or `/api/definitions/<vhost>`, where the broker
/// also reads credentials from the query.
fn is_definitions(segs: &[String]) -> bool {
    segs.len() >= 2 && segs.len() <= 3 && segs[0] == "api" && segs[1] == "definitions"
}

/// Whether the broker reads credentials from this path's query (`auth`, `token`): they
/// must go unless the gateway passes the client's credentials on by choice. An
/// undecodable path counts as one.
pub fn query_carries_credentials(path: &str) -> bool {
    segments(path).is_none_or(|s| is_definitions(&s))
}

/// The first value of query parameter `name`, decoded as `cow_qs:parse_qs` decodes it
/// (`+` is a space).
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k)? == name).then(|| form_decode(v)).flatten()
    })
}

fn form_decode(s: &str) -> Option<String> {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The query without the credential parameters `auth` and `token` (every occurrence);
/// `None` when nothing is left.
pub fn strip_query_credentials(query: Option<&str>) -> Option<String> {
    let query = query?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !matches!(form_decode(key).as_deref(), Some("auth" | "token"))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// `base64(user:password)` as `rabbit_web_dispatch_util:parse_auth_header` reads it: the
/// first `:` splits.
fn basic_pair(b64: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// The credentials of a request, from its headers and query (a login form is read apart,
/// with [`login_form`]). On `/api/definitions`, `?auth=` then `?token=` win over the
/// header, as in the broker. An `Authorization` header that is not readable Basic or
/// Bearer is no credentials: the UI sends `authorization: null` to the routes that need
/// none (`/api/auth`), which the broker ignores; the gateway removes it
/// ([`Authorization::Remove`]), and the broker answers as to a request without one.
pub fn credentials(
    headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Result<Option<Presented>, Malformed> {
    if segments(path).is_some_and(|s| is_definitions(&s)) {
        if let Some(auth) = query_value(query, "auth") {
            // A value the broker cannot split answers 401 with the realm: no credentials.
            return Ok(basic_pair(&auth).map(|(username, secret)| Presented {
                username,
                secret,
                carrier: Carrier::QueryAuth,
            }));
        }
        if let Some(token) = query_value(query, "token") {
            return Ok(Some(Presented {
                username: String::new(),
                secret: token,
                carrier: Carrier::QueryToken,
            }));
        }
    }
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Malformed::TwoAuthorizations);
    }
    let Some((scheme, rest)) = value.to_str().ok().and_then(|t| t.split_once(' ')) else {
        return Ok(None);
    };
    let rest = rest.trim_start();
    if scheme.eq_ignore_ascii_case("basic") {
        Ok(basic_pair(rest).map(|(username, secret)| Presented {
            username,
            secret,
            carrier: Carrier::Basic,
        }))
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.trim_end().is_empty() {
        Ok(Some(Presented {
            username: String::new(),
            secret: rest.trim_end().to_owned(),
            carrier: Carrier::Bearer,
        }))
    } else {
        Ok(None)
    }
}

/// `username` and `password` of a login form (`application/x-www-form-urlencoded`), the
/// first of each, as `proplists:get_value` reads them.
pub fn login_form(body: &[u8]) -> Option<Presented> {
    let text = std::str::from_utf8(body).ok()?;
    let username = query_value(Some(text), "username")?;
    let secret = query_value(Some(text), "password")?;
    Some(Presented {
        username,
        secret,
        carrier: Carrier::LoginForm,
    })
}

/// A login form carrying `username` and `password`, encoded.
pub fn encode_login_form(username: &str, password: &str) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!("username={}&password={}", enc(username), enc(password))
}

/// The value of the `auth` cookie the UI keeps: base64 of `user:password`.
pub fn auth_cookie_value(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
}

/// A `Set-Cookie` value with the `auth` cookie's value replaced (its attributes kept);
/// `None` when it sets another cookie.
pub fn replace_auth_cookie(set_cookie: &str, value: &str) -> Option<String> {
    let (pair, attrs) = set_cookie
        .split_once(';')
        .map_or((set_cookie, None), |(p, a)| (p, Some(a)));
    let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
    if name != "auth" {
        return None;
    }
    Some(match attrs {
        Some(a) => format!("auth={value};{a}"),
        None => format!("auth={value}"),
    })
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), never forwarded, plus those the
/// gateway sets itself.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// What the gateway says about the request it forwards.
pub struct Forwarding<'a> {
    /// The client's address (behind a load balancer: the PROXY header's).
    pub client: std::net::IpAddr,
    /// The `Host` the client asked for.
    pub host: Option<&'a str>,
    /// What becomes of the client's `Authorization`.
    pub authorization: Authorization,
}

/// The `Authorization` header the broker gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// The gateway's own (a backend token).
    Replace(HeaderValue),
    /// The client's, unchanged (an internal user's credentials).
    Keep,
    /// None (a request without credentials the gateway could read).
    Remove,
}

/// The request headers for the broker: hop-by-hop ones removed, `X-Forwarded-*` and
/// `Forwarded` set by the gateway (a client's own are dropped: the gateway is the edge),
/// `Authorization` replaced when the gateway vouches for the client.
pub fn forward_headers(headers: &mut HeaderMap, f: &Forwarding<'_>) {
    remove_hop_by_hop(headers);
    for n in [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    ] {
        headers.remove(n);
    }
    headers.remove(header::HOST);
    match &f.authorization {
        Authorization::Replace(v) => {
            headers.insert(header::AUTHORIZATION, v.clone());
        }
        Authorization::Keep => {}
        Authorization::Remove => {
            headers.remove(header::AUTHORIZATION);
        }
    }
    let ip = f.client.to_canonical();
    let node = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut forwarded = format!("for={node};proto=https");
    if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    if let Some(host) = f.host.filter(|h| is_token_text(h)) {
        forwarded.push_str(";host=");
        forwarded.push_str(host);
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert("x-forwarded-host", v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert("forwarded", v);
    }
}

/// A `Host` value that can go in `Forwarded` unquoted.
fn is_token_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// The path as the audit log and the metrics name it: the management API route with its
/// variables (`/api/queues/{vhost}/{queue}`), so that resource names stay out of metric
/// labels; `/api/{other}` for a route the gateway does not know (a plugin's), `{static}`
/// for the UI's files.
pub fn path_template(path: &str) -> String {
    let Some(segs) = segments(path) else {
        return "{undecodable}".into();
    };
    if segs.first().map(String::as_str) != Some("api") {
        return if segs.first().map(String::as_str) == Some("cli") {
            "/cli/{file}".into()
        } else {
            "{static}".into()
        };
    }
    let rest = &segs[1..];
    for route in ROUTES {
        let parts: Vec<&str> = route.split('/').filter(|s| !s.is_empty()).collect();
        if parts.len() != rest.len() {
            continue;
        }
        if parts
            .iter()
            .zip(rest)
            .all(|(p, s)| p.starts_with(':') || *p == s)
        {
            let named: Vec<String> = parts
                .iter()
                .map(|p| match p.strip_prefix(':') {
                    Some(v) => format!("{{{v}}}"),
                    None => (*p).to_owned(),
                })
                .collect();
            return format!("/api/{}", named.join("/"));
        }
    }
    if rest.is_empty() {
        "/api".into()
    } else {
        "/api/{other}".into()
    }
}

/// The management plugin's routes (`rabbit_mgmt_dispatcher`, 3.10.8), under `/api`; the
/// first that matches names the path, so literal routes come before variable ones.
const ROUTES: &[&str] = &[
    "/overview",
    "/cluster-name",
    "/nodes",
    "/nodes/:node",
    "/nodes/:node/memory",
    "/nodes/:node/memory/relative",
    "/nodes/:node/memory/ets",
    "/nodes/:node/memory/ets/relative",
    "/nodes/:node/memory/ets/:filter",
    "/nodes/:node/memory/ets/:filter/relative",
    "/extensions",
    "/all-configuration",
    "/definitions",
    "/definitions/:vhost",
    "/parameters",
    "/parameters/:component",
    "/parameters/:component/:vhost",
    "/parameters/:component/:vhost/:name",
    "/global-parameters",
    "/global-parameters/:name",
    "/policies",
    "/policies/:vhost",
    "/policies/:vhost/:name",
    "/operator-policies",
    "/operator-policies/:vhost",
    "/operator-policies/:vhost/:name",
    "/vhost-limits",
    "/vhost-limits/:vhost",
    "/vhost-limits/:vhost/:name",
    "/connections",
    "/connections/username/:username",
    "/connections/:connection",
    "/connections/:connection/channels",
    "/channels",
    "/channels/:channel",
    "/consumers",
    "/consumers/:vhost",
    "/exchanges",
    "/exchanges/:vhost",
    "/exchanges/:vhost/:exchange",
    "/exchanges/:vhost/:exchange/publish",
    "/exchanges/:vhost/:exchange/bindings/source",
    "/exchanges/:vhost/:exchange/bindings/destination",
    "/queues",
    "/queues/:vhost",
    "/queues/:vhost/:queue",
    "/queues/:vhost/:queue/bindings",
    "/queues/:vhost/:queue/contents",
    "/queues/:vhost/:queue/get",
    "/queues/:vhost/:queue/actions",
    "/bindings",
    "/bindings/:vhost",
    "/bindings/:vhost/e/:source/:dtype/:destination",
    "/bindings/:vhost/e/:source/:dtype/:destination/:props",
    "/vhosts",
    "/vhosts/:vhost",
    "/vhosts/:vhost/start/:node",
    "/vhosts/:vhost/permissions",
    "/vhosts/:vhost/topic-permissions",
    "/vhosts/:vhost/connections",
    "/vhosts/:vhost/channels",
    "/users/bulk-delete",
    "/users/without-permissions",
    "/users",
    "/users/:user",
    "/users/:user/permissions",
    "/users/:user/topic-permissions",
    "/user-limits",
    "/user-limits/:user",
    "/user-limits/:user/:name",
    "/feature-flags",
    "/feature-flags/:name/enable",
    "/whoami",
    "/permissions",
    "/permissions/:vhost/:user",
    "/topic-permissions",
    "/topic-permissions/:vhost/:user",
    "/topic-permissions/:vhost/:user/:exchange",
    "/aliveness-test/:vhost",
    "/healthchecks/node",
    "/healthchecks/node/:node",
    "/health/checks/alarms",
    "/health/checks/local-alarms",
    "/health/checks/certificate-expiration/:within/:unit",
    "/health/checks/port-listener/:port",
    "/health/checks/protocol-listener/:protocol",
    "/health/checks/virtual-hosts",
    "/health/checks/node-is-mirror-sync-critical",
    "/health/checks/node-is-quorum-critical",
    "/reset",
    "/reset/:node",
    "/rebalance/queues",
    "/auth",
    "/auth/attempts/:node",
    "/auth/attempts/:node/source",
    "/login",
];

/// What a request would do to the users protected from changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// Nothing.
    Clear,
    /// It changes or deletes this protected user, its permissions or its limits.
    Refuse(String),
    /// Its body says which users it touches: read it (within the body limit), then
    /// [`check_body`].
    ReadBody(BodyKind),
}

/// Bodies that name users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `POST /api/users/bulk-delete`: `{"users": [...]}`.
    BulkDelete,
    /// `POST /api/definitions[/vhost]`: JSON, or a multipart form with the JSON in a part.
    Definitions,
}

/// Whether `method path` could change one of `protected`. RabbitMQ 4.2 refuses `PUT` and
/// `DELETE` of a protected user; the gateway also keeps its permissions, topic permissions
/// and limits, and refuses a bulk delete or a definitions import that names one.
pub fn protection(method: &hyper::Method, path: &str, protected: &[String]) -> Protection {
    use hyper::Method;
    if protected.is_empty() {
        return Protection::Clear;
    }
    let Some(segs) = segments(path) else {
        return Protection::Clear;
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let is = |u: &str| protected.iter().any(|p| p == u);
    let changes = matches!(*method, Method::PUT | Method::DELETE | Method::POST);
    if !changes || s.first() != Some(&"api") {
        return Protection::Clear;
    }
    let user = match s[1..] {
        ["users", "bulk-delete"] if *method == Method::POST => {
            return Protection::ReadBody(BodyKind::BulkDelete);
        }
        ["definitions"] | ["definitions", _] if *method == Method::POST => {
            return Protection::ReadBody(BodyKind::Definitions);
        }
        ["users", u] if u != "bulk-delete" && u != "without-permissions" => Some(u),
        ["permissions", _, u] | ["topic-permissions", _, u] | ["topic-permissions", _, u, _] => {
            Some(u)
        }
        ["user-limits", u, _] => Some(u),
        _ => None,
    };
    match user {
        Some(u) if is(u) => Protection::Refuse(u.to_owned()),
        _ => Protection::Clear,
    }
}

/// The protected user a body names, if any; `Err` for a body that cannot be read (it
/// is refused: with protected users configured, what the broker would apply must be known).
pub fn check_body(
    kind: BodyKind,
    content_type: Option<&str>,
    body: &[u8],
    protected: &[String],
) -> Result<Option<String>, &'static str> {
    let is = |u: &str| protected.iter().any(|p| p == u);
    let docs: Vec<serde_json::Value> = match content_type.map(|c| c.to_ascii_lowercase()) {
        Some(c) if c.starts_with("multipart/form-data") => {
            let boundary = c
                .split(';')
                .filter_map(|p| p.trim().strip_prefix("boundary="))
                .next()
                .map(|b| b.trim_matches('"').to_owned())
                .ok_or("a multipart body without a boundary")?;
            // The boundary as sent (its case may differ from the lowered header).
            let sent = content_type
                .and_then(|c| {
                    let at = c.to_ascii_lowercase().find(&boundary)?;
                    c.get(at..at + boundary.len())
                })
                .unwrap_or(&boundary)
                .to_owned();
            multipart_parts(body, &sent)
                .iter()
                .filter_map(|p| serde_json::from_slice(p).ok())
                .collect()
        }
        _ if body.iter().all(u8::is_ascii_whitespace) => Vec::new(),
        _ => vec![serde_json::from_slice(body).map_err(|_| "a body that is not JSON")?],
    };
    for doc in &docs {
        let names: Vec<&str> = match kind {
            BodyKind::BulkDelete => doc
                .get("users")
                .and_then(|u| u.as_array())
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str())
                .collect(),
            BodyKind::Definitions => {
                let field = |list: &str, key: &str| -> Vec<&str> {
                    doc.get(list)
                        .and_then(|l| l.as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e.get(key).and_then(|n| n.as_str()))
                        .collect::<Vec<_>>()
                };
                let mut all = field("users", "name");
                all.extend(field("permissions", "user"));
                all.extend(field("topic_permissions", "user"));
                all
            }
        };
        if let Some(u) = names.into_iter().find(|u| is(u)) {
            return Ok(Some(u.to_owned()));
        }
    }
    Ok(None)
}

/// The bodies of a multipart form's parts (RFC 7578), headers cut off.
fn multipart_parts<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let mut parts = Vec::new();
    let mut starts = memchr::memmem::find_iter(body, d).collect::<Vec<_>>();
    starts.push(body.len());
    for w in starts.windows(2) {
        let chunk = &body[(w[0] + d.len()).min(body.len())..w[1]];
        if chunk.starts_with(b"--") {
            break;
        }
        if let Some(at) = memchr::memmem::find(chunk, b"\r\n\r\n") {
            let content = &chunk[at + 4..];
            parts.push(content.strip_suffix(b"\r\n").unwrap_or(content));
        }
    }
    parts
}

/// A JSON error body as the management plugin writes them (`halt_response`).
pub fn error_body(error: &str, reason: &str) -> String {
    serde_json::json!({ "error": error, "reason": reason }).to_string()
}
