use super::*;
use hyper::Method;

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", auth_cookie_value(user, pass))
}

fn headers(auth: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for a in auth {
        h.append(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
    }
    h
}

/// The path, the `Authorization` headers, the query, and what is read: user, secret, carrier.
type CredentialCase<'a> = (
    &'a str,
    Vec<&'a str>,
    Option<&'a str>,
    Result<Option<(&'a str, &'a str, Carrier)>, Malformed>,
);

#[test]
fn credentials_come_from_the_places_the_broker_reads() {
    let b = basic("", "tok.en.sig");
    let cases: Vec<CredentialCase<'_>> = vec![
        ("/api/overview", vec![], None, Ok(None)),
        (
            "/api/overview",
            vec![&b],
            None,
            Ok(Some(("", "tok.en.sig", Carrier::Basic))),
        ),
        (
            "/api/overview",
            vec!["Bearer abc.def.ghi"],
            None,
            Ok(Some(("", "abc.def.ghi", Carrier::Bearer))),
        ),
        (
            "/api/overview",
            vec!["bearer   abc"],
            None,
            Ok(Some(("", "abc", Carrier::Bearer))),
        ),
        // Unreadable: no credentials (the UI sends `null` where none are needed).
        ("/api/auth", vec!["null"], None, Ok(None)),
        ("/api/overview", vec!["Digest x"], None, Ok(None)),
        ("/api/overview", vec!["Basic !!!"], None, Ok(None)),
        ("/api/overview", vec!["Bearer "], None, Ok(None)),
        (
            "/api/overview",
            vec![&b, &b],
            None,
            Err(Malformed::TwoAuthorizations),
        ),
        // The query carries credentials on /api/definitions only, and wins there.
        ("/api/overview", vec![], Some("auth=dTpw"), Ok(None)),
        (
            "/api/definitions",
            vec![&b],
            Some("download=x&auth=dTpw"),
            Ok(Some(("u", "p", Carrier::QueryAuth))),
        ),
        (
            "/api/definitions/%2F",
            vec![],
            Some("token=a.b.c"),
            Ok(Some(("", "a.b.c", Carrier::QueryToken))),
        ),
        (
            "/api/definitions",
            vec![],
            Some("auth=dTpw&token=a.b.c"),
            Ok(Some(("u", "p", Carrier::QueryAuth))),
        ),
        // A value the broker cannot split: it answers 401 with the realm, as without one.
        (
            "/api/definitions",
            vec![&b],
            Some("auth=bm9jb2xvbg=="),
            Ok(None),
        ),
        (
            "/api//definitions/",
            vec![],
            Some("token=t"),
            Ok(Some(("", "t", Carrier::QueryToken))),
        ),
    ];
    for (path, auth, query, want) in cases {
        let got = credentials(&headers(&auth), path, query);
        let got = got.map(|o| o.map(|p| (p.username, p.secret, p.carrier)));
        let want = want.map(|o| o.map(|(u, s, c)| (u.to_owned(), s.to_owned(), c)));
        assert_eq!(got, want, "{path} {auth:?} {query:?}");
    }
}

#[test]
fn the_login_form_and_its_cookie() {
    let p = login_form(b"username=&password=a.b%2Bc+d").unwrap();
    assert_eq!((p.username.as_str(), p.secret.as_str()), ("", "a.b+c d"));
    assert_eq!(login_form(b"username=x"), None);
    let form = encode_login_form("me", "a+b/c");
    let back = login_form(form.as_bytes()).unwrap();
    assert_eq!(
        (back.username.as_str(), back.secret.as_str()),
        ("me", "a+b/c")
    );
    assert_eq!(
        replace_auth_cookie("auth=c2VjcmV0; Version=1", "bmV3").as_deref(),
        Some("auth=bmV3; Version=1")
    );
    assert_eq!(
        replace_auth_cookie("auth=x", "y").as_deref(),
        Some("auth=y")
    );
    assert_eq!(replace_auth_cookie("m=x; path=/", "y"), None);
}

#[test]
fn the_debug_form_of_credentials_hides_the_secret() {
    let p = Presented {
        username: "u".into(),
        secret: "eyJhbGciOi.secret.sig".into(),
        carrier: Carrier::Basic,
    };
    assert!(!format!("{p:?}").contains("secret"));
}

#[test]
fn the_broker_reads_query_credentials_on_definitions_only() {
    for (path, want) in [
        ("/api/definitions", true),
        ("/api/definitions/%2F", true),
        ("/api//definitions/", true),
        ("/api/x/../definitions", true),
        ("/api/%FF", true),
        ("/api/overview", false),
        ("/api/definitions/a/b", false),
    ] {
        assert_eq!(query_carries_credentials(path), want, "{path}");
    }
}

#[test]
fn query_credentials_are_stripped_and_the_rest_kept() {
    let cases = [
        (Some("download=x.json&auth=dTpw"), Some("download=x.json")),
        (Some("auth=a&token=b"), None),
        (Some("a%75th=a&x=1&token=2&tok%65n=3"), Some("x=1")),
        (Some("authx=1"), Some("authx=1")),
        (None, None),
    ];
    for (q, want) in cases {
        assert_eq!(strip_query_credentials(q).as_deref(), want, "{q:?}");
    }
}

#[test]
fn forwarded_headers_are_the_gateways_own() {
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic x"));
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, X-Secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("te", HeaderValue::from_static("trailers"));
    h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
    h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
    h.insert(header::HOST, HeaderValue::from_static("gw.example:15671"));
    h.insert("x-vhost", HeaderValue::from_static("/"));
    forward_headers(
        &mut h,
        &Forwarding {
            client: "10.1.2.3".parse().unwrap(),
            host: Some("gw.example:15671"),
            authorization: Authorization::Replace(HeaderValue::from_static("Bearer minted")),
        },
    );
    assert_eq!(h["authorization"], "Bearer minted");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "gw.example:15671");
    assert_eq!(
        h["forwarded"],
        "for=10.1.2.3;proto=https;host=gw.example:15671"
    );
    assert_eq!(h["x-vhost"], "/");
    for gone in ["connection", "x-secret", "keep-alive", "te", "host"] {
        assert!(!h.contains_key(gone), "{gone}");
    }
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Basic internal"),
    );
    forward_headers(
        &mut h,
        &Forwarding {
            client: "::1".parse().unwrap(),
            host: Some("bad host\""),
            authorization: Authorization::Keep,
        },
    );
    assert_eq!(h["authorization"], "Basic internal");
    let mut h2 = h.clone();
    forward_headers(
        &mut h2,
        &Forwarding {
            client: "::1".parse().unwrap(),
            host: None,
            authorization: Authorization::Remove,
        },
    );
    assert!(!h2.contains_key("authorization"));
    assert_eq!(h["forwarded"], "for=\"[::1]\";proto=https");
    assert!(!h.contains_key("x-forwarded-host"));
}

#[test]
fn paths_are_named_by_their_route() {
    let cases = [
        ("/api/overview", "/api/overview"),
        ("/api/queues/%2F/orders", "/api/queues/{vhost}/{queue}"),
        (
            "/api/queues/%2F/orders/get",
            "/api/queues/{vhost}/{queue}/get",
        ),
        (
            "/api/exchanges/%2F/amq.direct/publish",
            "/api/exchanges/{vhost}/{exchange}/publish",
        ),
        ("/api/users/bulk-delete", "/api/users/bulk-delete"),
        ("/api/users/bob", "/api/users/{user}"),
        (
            "/api/connections/username/bob",
            "/api/connections/username/{username}",
        ),
        ("/api/shovels/%2F", "/api/{other}"),
        ("/api", "/api"),
        ("/", "{static}"),
        ("/js/main.js", "{static}"),
        ("/cli/rabbitmqadmin", "/cli/{file}"),
        ("/api/queues/%FF", "{undecodable}"),
    ];
    for (path, want) in cases {
        assert_eq!(path_template(path), want, "{path}");
    }
}

#[test]
fn protected_users_cannot_be_changed_by_any_route() {
    let p = vec!["monitor".to_owned()];
    let refuse = || Protection::Refuse("monitor".into());
    let cases = [
        (Method::PUT, "/api/users/monitor", refuse()),
        (Method::DELETE, "/api/users/monitor", refuse()),
        (Method::DELETE, "/api/users/mon%69tor/", refuse()),
        (Method::DELETE, "//api//users/monitor", refuse()),
        (Method::DELETE, "/api/users/x/../monitor", refuse()),
        (
            Method::DELETE,
            "/api/queues/%2E%2E/users/./monitor",
            refuse(),
        ),
        (Method::GET, "/api/users/monitor", Protection::Clear),
        (Method::PUT, "/api/users/other", Protection::Clear),
        (Method::PUT, "/api/permissions/%2F/monitor", refuse()),
        (
            Method::DELETE,
            "/api/topic-permissions/%2F/monitor",
            refuse(),
        ),
        (
            Method::DELETE,
            "/api/topic-permissions/%2F/monitor/amq.topic",
            refuse(),
        ),
        (
            Method::PUT,
            "/api/user-limits/monitor/max-connections",
            refuse(),
        ),
        (
            Method::POST,
            "/api/users/bulk-delete",
            Protection::ReadBody(BodyKind::BulkDelete),
        ),
        (
            Method::POST,
            "/api/definitions",
            Protection::ReadBody(BodyKind::Definitions),
        ),
        (
            Method::POST,
            "/api/definitions/%2F",
            Protection::ReadBody(BodyKind::Definitions),
        ),
        (Method::GET, "/api/definitions", Protection::Clear),
        (Method::PUT, "/api/queues/%2F/monitor", Protection::Clear),
    ];
    for (m, path, want) in cases {
        assert_eq!(protection(&m, path, &p), want, "{m} {path}");
    }
    assert_eq!(
        protection(&Method::DELETE, "/api/users/monitor", &[]),
        Protection::Clear
    );
}

#[test]
fn bodies_that_name_protected_users_are_found() {
    let p = vec!["monitor".to_owned()];
    let json = Some("application/json");
    let bulk = br#"{"users":["a","monitor"]}"#;
    assert_eq!(
        check_body(BodyKind::BulkDelete, json, bulk, &p),
        Ok(Some("monitor".into()))
    );
    assert_eq!(
        check_body(BodyKind::BulkDelete, json, br#"{"users":["a"]}"#, &p),
        Ok(None)
    );
    // An escaped name is the same name.
    let defs = br#"{"users":[{"name":"mon\u0069tor","password_hash":"x","tags":""}]}"#;
    assert_eq!(
        check_body(BodyKind::Definitions, json, defs, &p),
        Ok(Some("monitor".into()))
    );
    let perms = br#"{"permissions":[{"user":"monitor","vhost":"/","configure":".*","write":".*","read":".*"}]}"#;
    assert_eq!(
        check_body(BodyKind::Definitions, json, perms, &p),
        Ok(Some("monitor".into()))
    );
    assert_eq!(
        check_body(BodyKind::Definitions, json, br#"{"queues":[]}"#, &p),
        Ok(None)
    );
    assert_eq!(check_body(BodyKind::Definitions, json, b"", &p), Ok(None));
    assert!(check_body(BodyKind::Definitions, json, b"{not json", &p).is_err());
    // The UI's upload: a multipart form with the file in a part.
    let form = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.json\"\r\nContent-Type: application/json\r\n\r\n{\"users\":[{\"name\":\"monitor\"}]}\r\n--XyZ--\r\n";
    let ct = Some("multipart/form-data; boundary=XyZ");
    assert_eq!(
        check_body(BodyKind::Definitions, ct, form, &p),
        Ok(Some("monitor".into()))
    );
    assert!(check_body(BodyKind::Definitions, Some("multipart/form-data"), form, &p).is_err());
}
