use super::*;

fn params(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut p = vec![
        ("Action".to_owned(), "GetWebIdentityToken".to_owned()),
        ("Version".to_owned(), "2011-06-15".to_owned()),
    ];
    p.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    p
}

fn ok(extra: &[(&str, &str)]) -> TokenRequest {
    parse_request(&params(extra)).unwrap_or_else(|e| panic!("{extra:?}: {e}"))
}

fn refused(extra: &[(&str, &str)]) -> ApiError {
    parse_request(&params(extra)).expect_err("should be refused")
}

fn minimal<'a>() -> Vec<(&'a str, &'a str)> {
    vec![
        ("Audience.member.1", "rabbitmq"),
        ("SigningAlgorithm", "ES384"),
    ]
}

fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut p = minimal();
    p.extend_from_slice(extra);
    p
}

#[test]
fn parses_form_bodies() {
    let form = parse_form(
        b"Action=GetWebIdentityToken&Version=2011-06-15&Audience.member.1=https%3A%2F%2Fapi.example.com\
          &Tags.member.1.Key=team&Tags.member.1.Value=data+eng%C3%A9&empty=&flag",
    )
    .unwrap();
    assert_eq!(
        form[2],
        ("Audience.member.1".into(), "https://api.example.com".into())
    );
    assert_eq!(form[4], ("Tags.member.1.Value".into(), "data engé".into()));
    assert_eq!(form[5], ("empty".into(), "".into()));
    assert_eq!(form[6], ("flag".into(), "".into()));
    let e = parse_form(b"a=%FF").unwrap_err();
    assert_eq!((e.status, e.code), (400, "MalformedQueryString"));
}

#[test]
fn a_minimal_request_gets_the_defaults() {
    let r = ok(&minimal());
    assert_eq!(r.audiences, vec!["rabbitmq"]);
    assert_eq!(r.algorithm, SigningAlgorithm::Es384);
    assert_eq!(r.duration_seconds, DEFAULT_DURATION_SECONDS);
    assert!(r.tags.is_empty());
}

#[test]
fn a_full_request() {
    let r = ok(&[
        ("Audience.member.2", "b"),
        ("Audience.member.1", "a"),
        ("SigningAlgorithm", "RS256"),
        ("DurationSeconds", "3600"),
        ("Tags.member.1.Key", "scope"),
        ("Tags.member.1.Value", "team-a"),
        ("Tags.member.2.Key", "empty"),
        ("Tags.member.2.Value", ""),
        ("Tags.member.3.Key", "unicode é 9"),
        ("Tags.member.3.Value", "ü: /=+-@_. \u{3000}"),
        ("SubjectMode", "AWSIdentity"),
    ]);
    assert_eq!(r.audiences, vec!["a", "b"], "ordered by member index");
    assert_eq!(r.algorithm, SigningAlgorithm::Rs256);
    assert_eq!(r.duration_seconds, 3600);
    assert_eq!(r.tags.len(), 3);
    assert_eq!(r.tags["scope"], "team-a");
    assert_eq!(r.tags["empty"], "");
    // Bounds that are allowed.
    ok(&with(&[("DurationSeconds", "60")]));
    let ten: Vec<(String, String)> = (1..=10)
        .map(|i| (format!("Audience.member.{i}"), format!("aud{i}")))
        .collect();
    let mut p = params(&[("SigningAlgorithm", "ES384")]);
    p.extend(ten);
    assert_eq!(parse_request(&p).unwrap().audiences.len(), 10);
}

#[test]
fn action_and_version() {
    let e = parse_request(&[]).unwrap_err();
    assert_eq!((e.status, e.code), (400, "MissingAction"));
    let e = parse_request(&[
        ("Action".into(), "AssumeRole".into()),
        ("Version".into(), "2011-06-15".into()),
    ])
    .unwrap_err();
    assert_eq!((e.status, e.code), (400, "InvalidAction"));
    assert_eq!(
        e.message,
        "Could not find operation AssumeRole for version 2011-06-15"
    );
    let e = parse_request(&[("Action".into(), "GetWebIdentityToken".into())]).unwrap_err();
    assert_eq!(e.code, "InvalidAction");
}

#[test]
fn missing_audience() {
    let e = refused(&[("SigningAlgorithm", "ES384")]);
    assert_eq!((e.status, e.code), (400, "ValidationError"));
    assert_eq!(
        e.message,
        "1 validation error detected: Value null at 'audience' failed to satisfy constraint: Member must not be null"
    );
    // botocore sends an empty list as `Audience=`.
    let e = refused(&[("Audience", ""), ("SigningAlgorithm", "ES384")]);
    assert_eq!(e.code, "ValidationError");
    // An empty audience string.
    let e = refused(&[("Audience.member.1", ""), ("SigningAlgorithm", "ES384")]);
    assert!(
        e.message.contains("Value '' at 'audience.1.member' failed to satisfy constraint: Member must have length greater than or equal to 1"),
        "{}",
        e.message
    );
}

#[test]
fn eleven_audiences() {
    let mut p = params(&[("SigningAlgorithm", "ES384")]);
    p.extend((1..=11).map(|i| (format!("Audience.member.{i}"), format!("aud{i}"))));
    let e = parse_request(&p).unwrap_err();
    assert_eq!((e.status, e.code), (400, "ValidationError"));
    assert!(
        e.message.ends_with("at 'audience' failed to satisfy constraint: Member must have length less than or equal to 10"),
        "{}",
        e.message
    );
    let long = "a".repeat(MAX_AUDIENCE_CHARS + 1);
    let e = refused(&[("Audience.member.1", &long), ("SigningAlgorithm", "ES384")]);
    assert!(e.message.contains(&format!(
        "Value '{long}' at 'audience.1.member' failed to satisfy constraint: Member must have length less than or equal to 1000"
    )));
}

#[test]
fn duration_bounds() {
    let e = refused(&with(&[("DurationSeconds", "59")]));
    assert_eq!((e.status, e.code), (400, "ValidationError"));
    assert_eq!(
        e.message,
        "1 validation error detected: Value '59' at 'durationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 60"
    );
    let e = refused(&with(&[("DurationSeconds", "3601")]));
    assert_eq!(
        e.message,
        "1 validation error detected: Value '3601' at 'durationSeconds' failed to satisfy constraint: Member must have value less than or equal to 3600"
    );
    let e = refused(&with(&[("DurationSeconds", "ten")]));
    assert_eq!(e.code, "ValidationError");
}

#[test]
fn signing_algorithm() {
    for bad in ["HS256", "RS384", "es384", "none", ""] {
        let e = refused(&[("Audience.member.1", "rabbitmq"), ("SigningAlgorithm", bad)]);
        assert_eq!((e.status, e.code), (400, "ValidationError"), "{bad}");
        assert!(
            e.message
                .contains("Member must satisfy enum value set: [RS256, ES384]")
        );
    }
    let e = refused(&[("Audience.member.1", "rabbitmq")]);
    assert!(e.message.contains("Value null at 'signingAlgorithm'"));
}

#[test]
fn tag_values_follow_the_sts_pattern() {
    for bad in [
        "a*b",
        "semi;colon",
        "quote\"",
        "tab\there",
        "new\nline",
        "emoji😀",
        "comma,",
        "bang!",
    ] {
        let e = refused(&with(&[
            ("Tags.member.1.Key", "k"),
            ("Tags.member.1.Value", bad),
        ]));
        assert_eq!((e.status, e.code), (400, "ValidationError"), "{bad:?}");
        assert!(
            e.message.contains(r"at 'tags.1.member.value' failed to satisfy constraint: Member must satisfy regular expression pattern: [\p{L}\p{Z}\p{N}_.:/=+\-@]*"),
            "{}",
            e.message
        );
    }
    let e = refused(&with(&[
        ("Tags.member.1.Key", "bad key*"),
        ("Tags.member.1.Value", "v"),
    ]));
    assert!(
        e.message.contains("at 'tags.1.member.key'"),
        "{}",
        e.message
    );
    let e = refused(&with(&[
        ("Tags.member.1.Key", ""),
        ("Tags.member.1.Value", "v"),
    ]));
    assert!(
        e.message.contains("greater than or equal to 1"),
        "{}",
        e.message
    );
    let long = "v".repeat(MAX_TAG_VALUE_CHARS + 1);
    let e = refused(&with(&[
        ("Tags.member.1.Key", "k"),
        ("Tags.member.1.Value", &long),
    ]));
    assert!(e.message.contains("less than or equal to 256"));
    let e = refused(&with(&[("Tags.member.1.Key", "k")]));
    assert!(e.message.contains("Value null at 'tags.1.member.value'"));
    // 256 characters (not bytes) are fine.
    let wide = "é".repeat(MAX_TAG_VALUE_CHARS);
    ok(&with(&[
        ("Tags.member.1.Key", "k"),
        ("Tags.member.1.Value", &wide),
    ]));
}

#[test]
fn tag_count_and_duplicates() {
    let tags = |n: usize| -> Vec<(String, String)> {
        let mut p = params(&minimal());
        for i in 1..=n {
            p.push((format!("Tags.member.{i}.Key"), format!("k{i}")));
            p.push((format!("Tags.member.{i}.Value"), format!("v{i}")));
        }
        p
    };
    assert_eq!(parse_request(&tags(50)).unwrap().tags.len(), 50);
    let e = parse_request(&tags(51)).unwrap_err();
    assert_eq!((e.status, e.code), (400, "ValidationError"));
    assert!(e.message.contains(
        "at 'tags' failed to satisfy constraint: Member must have length less than or equal to 50"
    ));
    let e = refused(&with(&[
        ("Tags.member.1.Key", "Team"),
        ("Tags.member.1.Value", "a"),
        ("Tags.member.2.Key", "team"),
        ("Tags.member.2.Value", "b"),
    ]));
    assert_eq!((e.status, e.code), (400, "InvalidParameterValue"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let e = refused(&[("SigningAlgorithm", "HS256"), ("DurationSeconds", "59")]);
    assert!(
        e.message.starts_with("3 validation errors detected: "),
        "{}",
        e.message
    );
}

#[test]
fn subject_mode_and_scope_are_not_emulated() {
    let e = refused(&with(&[("SubjectMode", "OriginIdentity")]));
    assert_eq!(e.code, "ValidationError");
    let e = refused(&with(&[("Scope", "read")]));
    assert_eq!(e.code, "ValidationError");
}

#[test]
fn tag_character_class() {
    for c in [
        'a', 'Z', 'é', '中', '٣', '7', ' ', '\u{3000}', '_', '.', ':', '/', '=', '+', '-', '@',
    ] {
        assert!(is_tag_char(c), "{c:?}");
    }
    for c in [
        '*', '!', ',', ';', '"', '\'', '\t', '\n', '#', '😀', '\u{0301}',
    ] {
        assert!(!is_tag_char(c), "{c:?}");
    }
}

#[test]
fn programmatic_requests_get_the_same_rules() {
    let mut r = TokenRequest::new("rabbitmq", SigningAlgorithm::Rs256);
    r.check().unwrap();
    r.duration_seconds = 59;
    assert_eq!(r.check().unwrap_err().code, "ValidationError");
    r.duration_seconds = 300;
    r.tags.insert("k".into(), "a*b".into());
    assert_eq!(r.check().unwrap_err().code, "ValidationError");
    r.tags.clear();
    r.audiences.clear();
    assert_eq!(r.check().unwrap_err().code, "ValidationError");
}
