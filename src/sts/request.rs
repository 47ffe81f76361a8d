//! The Query API request: `application/x-www-form-urlencoded` parameters, the `Action` and
//! `Version` dispatch, and `GetWebIdentityToken`'s parameter rules (botocore's STS model:
//! `Audience` 1–10 items of 1–1000 characters, `SigningAlgorithm` `RS256` | `ES384`,
//! `DurationSeconds` 60–3600 (default 300), at most 50 `Tags` with keys of 1–128 and values
//! of 0–256 characters from `[\p{L}\p{Z}\p{N}_.:/=+\-@]`). Every broken rule is reported
//! at once, in AWS's `ValidationError` wording. Pure.

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use regex_syntax::hir::{Class, ClassUnicode, HirKind};

use super::{API_VERSION, ApiError};

pub const MIN_AUDIENCES: usize = 1;
pub const MAX_AUDIENCES: usize = 10;
pub const MAX_AUDIENCE_CHARS: usize = 1000;
pub const MIN_DURATION_SECONDS: i64 = 60;
pub const MAX_DURATION_SECONDS: i64 = 3600;
/// `DurationSeconds` when the request has none.
pub const DEFAULT_DURATION_SECONDS: i64 = 300;
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY_CHARS: usize = 128;
pub const MAX_TAG_VALUE_CHARS: usize = 256;
/// The character class of tag keys and values in the STS model.
pub const TAG_CHAR_CLASS: &str = r"[\p{L}\p{Z}\p{N}_.:/=+\-@]";

/// `RS256` (RSA 2048, kid `RSA_n`) or `ES384` (P-384, kid `EC384_n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    Rs256,
    Es384,
}

impl SigningAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::Rs256 => "RS256",
            SigningAlgorithm::Es384 => "ES384",
        }
    }

    /// Exactly `RS256` or `ES384`, as STS spells them.
    pub fn parse(s: &str) -> Option<SigningAlgorithm> {
        match s {
            "RS256" => Some(SigningAlgorithm::Rs256),
            "ES384" => Some(SigningAlgorithm::Es384),
            _ => None,
        }
    }
}

/// A valid `GetWebIdentityToken` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// 1–10 audiences: the `aud` claim (a string when there is one, else a list).
    pub audiences: Vec<String>,
    pub algorithm: SigningAlgorithm,
    pub duration_seconds: i64,
    /// Request tags: `request_tags` in the token.
    pub tags: BTreeMap<String, String>,
}

impl TokenRequest {
    /// One audience, the default duration, no tags.
    pub fn new(audience: impl Into<String>, algorithm: SigningAlgorithm) -> TokenRequest {
        TokenRequest {
            audiences: vec![audience.into()],
            algorithm,
            duration_seconds: DEFAULT_DURATION_SECONDS,
            tags: BTreeMap::new(),
        }
    }

    /// The rules the HTTP API applies, for requests built in code (the CLI).
    pub fn check(&self) -> Result<(), ApiError> {
        let mut errors = Vec::new();
        check_audiences(&self.audiences, &mut errors);
        check_duration(self.duration_seconds, &mut errors);
        let tags: Vec<(Option<String>, Option<String>)> = self
            .tags
            .iter()
            .map(|(k, v)| (Some(k.clone()), Some(v.clone())))
            .collect();
        check_tags(&tags, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(&errors))
        }
    }
}

/// Decodes a form body (or a query string): `+` is a space, `%XX` a byte, UTF-8 required.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |s: &[u8]| -> Result<String, ApiError> {
        let plus: Vec<u8> = s
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let bytes: Vec<u8> = percent_encoding::percent_decode(&plus).collect();
        String::from_utf8(bytes).map_err(|_| {
            ApiError::new(
                400,
                "MalformedQueryString",
                "The request parameters are not valid UTF-8.",
            )
        })
    };
    body.split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|&b| b == b'=') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p, &b""[..]),
            };
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// Dispatches on `Action` / `Version` and validates `GetWebIdentityToken`'s parameters.
pub fn parse_request(params: &[(String, String)]) -> Result<TokenRequest, ApiError> {
    let get = |name: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(action) = get("Action") else {
        return Err(ApiError::new(400, "MissingAction", "Missing Action"));
    };
    let version = get("Version").unwrap_or("");
    if action != "GetWebIdentityToken" || version != API_VERSION {
        return Err(ApiError::new(
            400,
            "InvalidAction",
            format!("Could not find operation {action} for version {version}"),
        ));
    }
    let mut errors = Vec::new();

    // `Audience=` alone is how botocore sends an empty list: no members.
    let audiences: Vec<String> =
        members(params, "Audience.member.", |rest| rest.parse::<u32>().ok())
            .into_values()
            .map(|(_, v)| v)
            .collect();
    check_audiences(&audiences, &mut errors);

    match get("SubjectMode") {
        None | Some("AWSIdentity") => {}
        Some("OriginIdentity") => errors.push(
            "Value 'OriginIdentity' at 'subjectMode' failed to satisfy constraint: the caller's \
             session has no trusted identity propagation context"
                .to_owned(),
        ),
        Some(other) => errors.push(format!(
            "Value '{other}' at 'subjectMode' failed to satisfy constraint: Member must satisfy \
             enum value set: [AWSIdentity, OriginIdentity]"
        )),
    }
    if let Some(scope) = get("Scope") {
        errors.push(format!(
            "Value '{scope}' at 'scope' failed to satisfy constraint: Scope is allowed only with \
             SubjectMode OriginIdentity"
        ));
    }

    let duration = match get("DurationSeconds") {
        None => Some(DEFAULT_DURATION_SECONDS),
        Some(s) => match s.trim().parse::<i64>() {
            Ok(d) => {
                check_duration(d, &mut errors);
                Some(d)
            }
            Err(_) => {
                errors.push(format!(
                    "Value '{s}' at 'durationSeconds' failed to satisfy constraint: Member must be an integer"
                ));
                None
            }
        },
    };

    let algorithm = match get("SigningAlgorithm") {
        None => {
            errors.push(null_at("signingAlgorithm"));
            None
        }
        Some(s) => {
            let alg = SigningAlgorithm::parse(s);
            if alg.is_none() {
                errors.push(format!(
                    "Value '{s}' at 'signingAlgorithm' failed to satisfy constraint: Member must \
                     satisfy enum value set: [RS256, ES384]"
                ));
            }
            alg
        }
    };

    // Tags.member.N.Key / Tags.member.N.Value, grouped by N.
    let mut tag_slots: BTreeMap<u32, (Option<String>, Option<String>)> = BTreeMap::new();
    for (n, (field, v)) in members(params, "Tags.member.", |rest| {
        let (n, field) = rest.split_once('.')?;
        let field = match field {
            "Key" => 0u8,
            "Value" => 1u8,
            _ => return None,
        };
        Some((n.parse::<u32>().ok()?, field))
    })
    .into_iter()
    .map(|((n, f), (_, v))| (n, (f, v)))
    {
        let slot = tag_slots.entry(n).or_default();
        if field == 0 {
            slot.0 = Some(v);
        } else {
            slot.1 = Some(v);
        }
    }
    let tag_list: Vec<(Option<String>, Option<String>)> = tag_slots.into_values().collect();
    check_tags(&tag_list, &mut errors);

    if !errors.is_empty() {
        return Err(ApiError::validation(&errors));
    }
    let mut tags = BTreeMap::new();
    let mut seen = HashSet::new();
    for (k, v) in tag_list {
        let (k, v) = (k.unwrap_or_default(), v.unwrap_or_default());
        // STS compares tag keys case-insensitively.
        if !seen.insert(k.to_lowercase()) {
            return Err(ApiError::new(
                400,
                "InvalidParameterValue",
                "Duplicate tag keys found. Please note that Tag keys are case insensitive.",
            ));
        }
        tags.insert(k, v);
    }
    let (Some(algorithm), Some(duration_seconds)) = (algorithm, duration) else {
        // Unreachable: a missing value has pushed an error above.
        return Err(ApiError::validation(&[null_at("signingAlgorithm")]));
    };
    Ok(TokenRequest {
        audiences,
        algorithm,
        duration_seconds,
        tags,
    })
}

/// Parameters named `prefix` + something `index` understands, ordered by that index (the
/// last of duplicates wins), with the parameter name kept for messages.
fn members<K: Ord>(
    params: &[(String, String)],
    prefix: &str,
    index: impl Fn(&str) -> Option<K>,
) -> BTreeMap<K, (String, String)> {
    params
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix(prefix)?;
            let key = index(rest)?;
            Some((key, (k.clone(), v.clone())))
        })
        .collect()
}

fn null_at(field: &str) -> String {
    format!("Value null at '{field}' failed to satisfy constraint: Member must not be null")
}

fn check_audiences(list: &[String], errors: &mut Vec<String>) {
    if list.len() < MIN_AUDIENCES {
        errors.push(null_at("audience"));
    }
    if list.len() > MAX_AUDIENCES {
        errors.push(format!(
            "Value '[{}]' at 'audience' failed to satisfy constraint: Member must have length less than or equal to {MAX_AUDIENCES}",
            list.join(", ")
        ));
    }
    for (i, a) in list.iter().enumerate() {
        let at = format!("audience.{}.member", i + 1);
        check_length(a, &at, 1, MAX_AUDIENCE_CHARS, errors);
    }
}

fn check_duration(d: i64, errors: &mut Vec<String>) {
    check_range(
        &d.to_string(),
        "durationSeconds",
        "value",
        d,
        MIN_DURATION_SECONDS,
        MAX_DURATION_SECONDS,
        errors,
    );
}

fn check_tags(tags: &[(Option<String>, Option<String>)], errors: &mut Vec<String>) {
    if tags.len() > MAX_TAGS {
        errors.push(format!(
            "Value '[{} tags]' at 'tags' failed to satisfy constraint: Member must have length less than or equal to {MAX_TAGS}",
            tags.len()
        ));
    }
    for (i, (k, v)) in tags.iter().enumerate() {
        let n = i + 1;
        // The key, then the value, each with its length bounds and pattern repetition.
        for (member, text, min, max, repeat) in [
            ("key", k, 1, MAX_TAG_KEY_CHARS, '+'),
            ("value", v, 0, MAX_TAG_VALUE_CHARS, '*'),
        ] {
            let at = format!("tags.{n}.member.{member}");
            match text {
                None => errors.push(null_at(&at)),
                Some(text) => {
                    check_length(text, &at, min, max, errors);
                    check_chars(text, &at, repeat, errors);
                }
            }
        }
    }
}

fn check_length(s: &str, at: &str, min: usize, max: usize, errors: &mut Vec<String>) {
    check_range(s, at, "length", s.chars().count(), min, max, errors);
}

/// Pushes AWS's message when `n`, the `what` (`length` or `value`) of the member at `at`
/// (quoted as `shown`), is below `min` or above `max`.
fn check_range<T: PartialOrd + std::fmt::Display>(
    shown: &str,
    at: &str,
    what: &str,
    n: T,
    min: T,
    max: T,
    errors: &mut Vec<String>,
) {
    if n < min {
        errors.push(format!(
            "Value '{shown}' at '{at}' failed to satisfy constraint: Member must have {what} greater than or equal to {min}"
        ));
    }
    if n > max {
        errors.push(format!(
            "Value '{shown}' at '{at}' failed to satisfy constraint: Member must have {what} less than or equal to {max}"
        ));
    }
}

fn check_chars(s: &str, at: &str, repeat: char, errors: &mut Vec<String>) {
    if !s.chars().all(is_tag_char) {
        errors.push(format!(
            "Value '{s}' at '{at}' failed to satisfy constraint: Member must satisfy regular expression pattern: {TAG_CHAR_CLASS}{repeat}"
        ));
    }
}

/// `\p{L}\p{Z}\p{N}` from Unicode's general categories (regex-syntax's tables), plus
/// `_.:/=+-@`.
static TAG_CHARS: LazyLock<ClassUnicode> = LazyLock::new(|| {
    let hir = regex_syntax::Parser::new()
        .parse(TAG_CHAR_CLASS)
        .expect("TAG_CHAR_CLASS is a valid character class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.clone(),
        // A constant pattern: covered by the tests below.
        _ => ClassUnicode::empty(),
    }
});

/// Whether `c` may appear in a tag key or value.
pub fn is_tag_char(c: char) -> bool {
    TAG_CHARS
        .ranges()
        .binary_search_by(|r| {
            if r.end() < c {
                std::cmp::Ordering::Less
            } else if r.start() > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests;
