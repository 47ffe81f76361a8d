//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`, `Authorization` header form), verified the
//! way STS verifies it. Pure: the request's parts, the credential lookup and `now` are
//! passed in.
//!
//! The steps are AWS's: a canonical request (method, canonical URI, canonical query
//! string, the signed headers with trimmed values, the signed header list, the hex SHA-256
//! of the body), a string to sign (`AWS4-HMAC-SHA256`, the `X-Amz-Date`, the credential
//! scope, the hex SHA-256 of the canonical request), and the signing key
//! `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
//! The canonical URI is the path as received with dot segments removed, percent-encoded
//! once more (every service but S3 double-encodes).

use aws_lc_rs::{constant_time, digest, hmac};

use super::{ApiError, Principal};

/// The only signing algorithm accepted.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far `X-Amz-Date` may be from the emulator's clock, as AWS allows.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 15 * 60;
/// The SHA-256 of an empty body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The parts of an HTTP request that a signature covers.
#[derive(Clone, Copy, Debug)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path as received (still percent-encoded).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: &'a str,
    /// Header names (any case) and values; a name may repeat.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl SignedRequest<'_> {
    /// The values of header `name` (case-insensitive), in order.
    fn header_values<'h>(&'h self, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed `Authorization` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// The credential scope: `date/region/service/aws4_request`.
    pub scope_date: String,
    pub scope_region: String,
    pub scope_service: String,
    pub scope_terminator: String,
    /// Lower-case header names, in the order given.
    pub signed_headers: Vec<String>,
    /// Lower-case hex.
    pub signature: String,
}

impl Authorization {
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.scope_date, self.scope_region, self.scope_service, self.scope_terminator
        )
    }
}

fn incomplete(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "IncompleteSignature", message)
}

fn mismatch(message: impl Into<String>) -> ApiError {
    ApiError::new(403, "SignatureDoesNotMatch", message)
}

/// The message STS sends when the signature itself is wrong.
pub const MISMATCH_MESSAGE: &str = "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

/// Parses `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
pub fn parse_authorization(value: &str) -> Result<Authorization, ApiError> {
    let value = value.trim();
    let (algorithm, rest) = value.split_once(' ').unwrap_or((value, ""));
    if algorithm != ALGORITHM {
        return Err(incomplete(format!(
            "Unsupported AWS 'algorithm': '{algorithm}'"
        )));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(incomplete(format!(
                "Authorization header requires each component to be of the form key=value: '{part}'"
            )));
        };
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => continue,
        };
        *slot = Some(v.trim());
    }
    let mut missing = Vec::new();
    for (name, v) in [
        ("Credential", credential),
        ("Signature", signature),
        ("SignedHeaders", signed),
    ] {
        if v.is_none_or(str::is_empty) {
            missing.push(format!("Authorization header requires '{name}' parameter."));
        }
    }
    if !missing.is_empty() {
        return Err(incomplete(missing.join(" ")));
    }
    let (credential, signed, signature) = (
        credential.unwrap_or_default(),
        signed.unwrap_or_default(),
        signature.unwrap_or_default(),
    );
    let fields: Vec<&str> = credential.split('/').collect();
    let [akid, date, region, service, terminator] = fields[..] else {
        return Err(incomplete(format!(
            "Credential should be of the form <access key id>/<date>/<region>/<service>/aws4_request: '{credential}'"
        )));
    };
    if akid.is_empty() {
        return Err(incomplete("Credential has an empty access key id."));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(incomplete("Signature must be 64 hexadecimal characters."));
    }
    Ok(Authorization {
        access_key_id: akid.to_owned(),
        scope_date: date.to_owned(),
        scope_region: region.to_owned(),
        scope_service: service.to_owned(),
        scope_terminator: terminator.to_owned(),
        signed_headers: signed.split(';').map(str::to_ascii_lowercase).collect(),
        signature: signature.to_ascii_lowercase(),
    })
}

/// Verifies the request's signature and returns the calling principal.
///
/// `find` maps an access key id to its principal; `region` and `service` are what the
/// credential scope must name; `now` is Unix seconds.
pub fn verify<'p>(
    req: &SignedRequest<'_>,
    find: impl Fn(&str) -> Option<&'p Principal>,
    region: &str,
    service: &str,
    now: i64,
) -> Result<&'p Principal, ApiError> {
    let Some(header) = req.header("authorization") else {
        return Err(ApiError::new(
            403,
            "MissingAuthenticationToken",
            "Request is missing Authentication Token",
        ));
    };
    let auth = parse_authorization(header)?;
    let Some(amz_date) = req.header("x-amz-date") else {
        return Err(incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        ));
    };
    let Some(signed_at) = super::time::parse_amz_date(amz_date.trim()) else {
        return Err(incomplete(format!(
            "Invalid X-Amz-Date header: '{amz_date}' (expected YYYYMMDD'T'HHMMSS'Z')."
        )));
    };
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(incomplete(
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
        ));
    }
    let principal = find(&auth.access_key_id).ok_or_else(|| {
        ApiError::new(
            403,
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        )
    })?;
    check_scope(&auth, amz_date.trim(), region, service)?;
    check_skew(signed_at, now)?;
    let expected = signature(
        &principal.secret_access_key,
        req,
        &auth.signed_headers,
        amz_date.trim(),
        &auth.scope_region,
        &auth.scope_service,
    );
    constant_time::verify_slices_are_equal(expected.as_bytes(), auth.signature.as_bytes())
        .map_err(|_| mismatch(MISMATCH_MESSAGE))?;
    Ok(principal)
}

fn check_scope(
    auth: &Authorization,
    amz_date: &str,
    region: &str,
    service: &str,
) -> Result<(), ApiError> {
    if auth.scope_terminator != "aws4_request" {
        return Err(mismatch(
            "Credential should be scoped with a valid terminator: 'aws4_request', not '".to_owned()
                + &auth.scope_terminator
                + "'.",
        ));
    }
    if auth.scope_service != service {
        return Err(mismatch(format!(
            "Credential should be scoped to correct service: '{service}'."
        )));
    }
    if auth.scope_region != region {
        return Err(mismatch(format!(
            "Credential should be scoped to a valid region, not '{}'.",
            auth.scope_region
        )));
    }
    let day = &amz_date[..8];
    if auth.scope_date != day {
        return Err(mismatch(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{day}', from '{amz_date}'.",
            auth.scope_date
        )));
    }
    Ok(())
}

fn check_skew(signed_at: i64, now: i64) -> Result<(), ApiError> {
    use super::time::amz_date;
    let at = amz_date(signed_at);
    if signed_at < now - MAX_CLOCK_SKEW_SECONDS {
        return Err(mismatch(format!(
            "Signature expired: {at} is now earlier than {} ({} - 15 min.)",
            amz_date(now - MAX_CLOCK_SKEW_SECONDS),
            amz_date(now)
        )));
    }
    if signed_at > now + MAX_CLOCK_SKEW_SECONDS {
        return Err(mismatch(format!(
            "Signature not yet current: {at} is still later than {} ({} + 15 min.)",
            amz_date(now + MAX_CLOCK_SKEW_SECONDS),
            amz_date(now)
        )));
    }
    Ok(())
}

/// The hex signature of `req` over `signed_headers` with `secret`.
pub fn signature(
    secret: &str,
    req: &SignedRequest<'_>,
    signed_headers: &[String],
    amz_date: &str,
    region: &str,
    service: &str,
) -> String {
    let date = scope_date(amz_date);
    let scope = credential_scope(amz_date, region, service);
    let creq = canonical_request(req, signed_headers);
    let sts = string_to_sign(amz_date, &scope, &creq);
    let key = signing_key(secret, date, region, service);
    hex(hmac::sign(&key, sts.as_bytes()).as_ref())
}

/// The `Authorization` header value for `req` (which must already carry `host` and
/// `x-amz-date`), signing `signed_headers` (lower case). For clients and tests.
pub fn authorization_header(
    access_key_id: &str,
    secret: &str,
    req: &SignedRequest<'_>,
    signed_headers: &[String],
    amz_date: &str,
    region: &str,
    service: &str,
) -> String {
    let scope = credential_scope(amz_date, region, service);
    let sig = signature(secret, req, signed_headers, amz_date, region, service);
    format!(
        "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={sig}",
        signed_headers.join(";")
    )
}

/// The `YYYYMMDD` of an `X-Amz-Date` (all of it when shorter).
fn scope_date(amz_date: &str) -> &str {
    amz_date.get(..8).unwrap_or(amz_date)
}

/// The credential scope `date/region/service/aws4_request` for a request signed at
/// `amz_date`.
fn credential_scope(amz_date: &str, region: &str, service: &str) -> String {
    let date = scope_date(amz_date);
    format!("{date}/{region}/{service}/aws4_request")
}

/// The canonical request (step 1).
pub fn canonical_request(req: &SignedRequest<'_>, signed_headers: &[String]) -> String {
    let mut out = String::new();
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&canonical_uri(req.path));
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    for name in signed_headers {
        let values: Vec<String> = req.header_values(name).map(trim_all).collect();
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(&sha256_hex(req.body));
    out
}

/// The string to sign (step 2).
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The signing key (step 3).
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> hmac::Key {
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k_date = mac(format!("AWS4{secret}").as_bytes(), date);
    let k_region = mac(k_date.as_ref(), region);
    let k_service = mac(k_region.as_ref(), service);
    let k_signing = mac(k_service.as_ref(), "aws4_request");
    hmac::Key::new(hmac::HMAC_SHA256, k_signing.as_ref())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Leading and trailing spaces removed, runs of spaces collapsed to one.
fn trim_all(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// RFC 3986 unreserved characters stay, every other byte is `%XX` (upper case).
fn uri_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_uri(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let trailing = path.len() > 1 && path.ends_with('/');
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalised = format!("/{}", segments.join("/"));
    if trailing && normalised != "/" {
        normalised.push('/');
    }
    uri_encode(normalised.as_bytes(), true)
}

fn canonical_query(query: &str) -> String {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).collect::<Vec<u8>>();
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(&decode(k), false), uri_encode(&decode(v), false))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The AWS SigV4 test suite's credentials and instant.
    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const AMZ_DATE: &str = "20150830T123600Z";
    const AT: i64 = 1_440_938_160;

    fn suite_headers() -> Vec<(String, String)> {
        vec![
            ("Host".into(), "example.amazonaws.com".into()),
            ("X-Amz-Date".into(), AMZ_DATE.into()),
        ]
    }

    fn signed() -> Vec<String> {
        vec!["host".into(), "x-amz-date".into()]
    }

    /// A request of the test suite: `method` on `/` with `query`, `headers` and no body.
    fn suite_request<'a>(
        method: &'a str,
        query: &'a str,
        headers: &'a [(String, String)],
    ) -> SignedRequest<'a> {
        SignedRequest {
            method,
            path: "/",
            query,
            headers,
            body: b"",
        }
    }

    /// The signature of the test suite's request `method` on `/` with `query`, in the
    /// suite's scope (`us-east-1`, `service`).
    fn suite_signature(method: &str, query: &str) -> String {
        let headers = suite_headers();
        let req = suite_request(method, query, &headers);
        signature(SECRET, &req, &signed(), AMZ_DATE, "us-east-1", "service")
    }

    /// A `POST /` with `headers` and `body`, as STS clients send.
    fn post<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> SignedRequest<'a> {
        SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers,
            body,
        }
    }

    /// The body of the STS requests below.
    const STS_BODY: &[u8] = b"Action=GetWebIdentityToken&Version=2011-06-15";

    /// aws-sig-v4-test-suite `get-vanilla`: every intermediate value.
    #[test]
    fn get_vanilla_vector() {
        let headers = suite_headers();
        let req = suite_request("GET", "", &headers);
        let creq = canonical_request(&req, &signed());
        assert_eq!(
            creq,
            format!(
                "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:{AMZ_DATE}\n\nhost;x-amz-date\n{EMPTY_SHA256}"
            )
        );
        let sts = string_to_sign(AMZ_DATE, "20150830/us-east-1/service/aws4_request", &creq);
        assert_eq!(
            sts,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n\
             bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
        assert_eq!(
            authorization_header(
                AKID,
                SECRET,
                &req,
                &signed(),
                AMZ_DATE,
                "us-east-1",
                "service"
            ),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    /// `get-vanilla-query-order-key-case`: the query is sorted by key.
    #[test]
    fn get_vanilla_query_order_vector() {
        assert_eq!(
            suite_signature("GET", "Param2=value2&Param1=value1"),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    /// `post-vanilla`.
    #[test]
    fn post_vanilla_vector() {
        assert_eq!(
            suite_signature("POST", ""),
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a/./b/../c/"), "/a/c/");
        assert_eq!(canonical_uri("/a%20b"), "/a%2520b");
        assert_eq!(canonical_query("b=2&a=%2F&a=1&c"), "a=%2F&a=1&b=2&c=");
        assert_eq!(trim_all("  a   b  c "), "a b c");
    }

    fn principal() -> Principal {
        Principal {
            access_key_id: AKID.into(),
            secret_access_key: SECRET.into(),
            role_arn: "arn:aws:iam::111122223333:role/R".into(),
            account: "111122223333".into(),
            org_id: None,
            ou_path: vec![],
            principal_tags: Default::default(),
        }
    }

    fn sts_request(headers: &mut Vec<(String, String)>, secret: &str, region: &str) {
        let req = post(headers, STS_BODY);
        let signed = vec!["content-type".into(), "host".into(), "x-amz-date".into()];
        let auth = authorization_header(AKID, secret, &req, &signed, AMZ_DATE, region, "sts");
        headers.push(("Authorization".into(), auth));
    }

    fn verify_with(headers: &[(String, String)], now: i64) -> Result<String, ApiError> {
        let p = principal();
        let req = post(headers, STS_BODY);
        verify(&req, |k| (k == AKID).then_some(&p), "us-east-1", "sts", now)
            .map(|p| p.role_arn.clone())
    }

    fn base_headers() -> Vec<(String, String)> {
        let mut h = suite_headers();
        h.push((
            "Content-Type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        ));
        h
    }

    #[test]
    fn verifies_a_good_signature_and_finds_the_principal() {
        let mut h = base_headers();
        sts_request(&mut h, SECRET, "us-east-1");
        assert_eq!(
            verify_with(&h, AT).unwrap(),
            "arn:aws:iam::111122223333:role/R"
        );
        // Within the allowed skew either way.
        verify_with(&h, AT + MAX_CLOCK_SKEW_SECONDS).unwrap();
        verify_with(&h, AT - MAX_CLOCK_SKEW_SECONDS).unwrap();
    }

    fn code(r: Result<String, ApiError>) -> (u16, &'static str) {
        let e = r.unwrap_err();
        (e.status, e.code)
    }

    #[test]
    fn refusals_have_sts_codes() {
        // No Authorization at all.
        assert_eq!(
            code(verify_with(&base_headers(), AT)),
            (403, "MissingAuthenticationToken")
        );
        // Wrong secret.
        let mut h = base_headers();
        sts_request(&mut h, "not-the-secret", "us-east-1");
        assert_eq!(code(verify_with(&h, AT)), (403, "SignatureDoesNotMatch"));
        // Body changed after signing.
        let mut h = base_headers();
        sts_request(&mut h, SECRET, "us-east-1");
        let p = principal();
        let req = post(&h, b"Action=GetWebIdentityToken&Version=2011-06-16");
        let e = verify(&req, |_| Some(&p), "us-east-1", "sts", AT).unwrap_err();
        assert_eq!((e.status, e.code), (403, "SignatureDoesNotMatch"));
        assert_eq!(e.message, MISMATCH_MESSAGE);
        // Another region.
        let mut h = base_headers();
        sts_request(&mut h, SECRET, "eu-west-1");
        assert_eq!(code(verify_with(&h, AT)), (403, "SignatureDoesNotMatch"));
        // Clock skew beyond 15 minutes.
        let mut h = base_headers();
        sts_request(&mut h, SECRET, "us-east-1");
        let e = verify_with(&h, AT + MAX_CLOCK_SKEW_SECONDS + 1).unwrap_err();
        assert!(
            e.message.starts_with("Signature expired: 20150830T123600Z"),
            "{}",
            e.message
        );
        assert_eq!(
            code(verify_with(&h, AT - MAX_CLOCK_SKEW_SECONDS - 1)),
            (403, "SignatureDoesNotMatch")
        );
        // Unknown access key id.
        let req = post(&h, b"");
        let e = verify(&req, |_| None, "us-east-1", "sts", AT).unwrap_err();
        assert_eq!((e.status, e.code), (403, "InvalidClientTokenId"));
        // No X-Amz-Date.
        let h: Vec<_> = h.into_iter().filter(|(n, _)| n != "X-Amz-Date").collect();
        assert_eq!(code(verify_with(&h, AT)), (400, "IncompleteSignature"));
    }

    #[test]
    fn malformed_authorization_headers() {
        let ok = "AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/sts/aws4_request, SignedHeaders=host;x-amz-date, Signature=".to_owned()
            + &"a".repeat(64);
        let a = parse_authorization(&ok).unwrap();
        assert_eq!(a.access_key_id, "AK");
        assert_eq!(a.scope(), "20150830/us-east-1/sts/aws4_request");
        assert_eq!(a.signed_headers, vec!["host", "x-amz-date"]);
        for bad in [
            "",
            "AWS4-HMAC-SHA512 Credential=AK/20150830/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=aa",
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=aa",
            "AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/sts, SignedHeaders=host, Signature="
                .to_owned()
                .as_str(),
            "AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=zz",
            "AWS4-HMAC-SHA256 Credential",
        ] {
            let e = parse_authorization(bad).unwrap_err();
            assert_eq!((e.status, e.code), (400, "IncompleteSignature"), "{bad}");
        }
    }
}
