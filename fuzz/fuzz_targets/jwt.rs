//! The JWS header reader on arbitrary text, and the claim rules and scope normalisation on
//! arbitrary JSON. Never panics.
#![no_main]
use amqp_iam_gateway::auth::jwt::{self, ClaimRules};
use amqp_iam_gateway::auth::scopes::{self, ScopeRules};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = jwt::read_header(text, &[jsonwebtoken::Algorithm::RS256]);
    let Ok(claims) = serde_json::from_str::<serde_json::Value>(text) else { return };
    let rules = ClaimRules {
        resource_server_id: "rabbitmq".into(),
        verify_aud: true,
        require_exp: true,
        issuer: Some("https://issuer.example".into()),
        check_nbf: true,
        check_iat: true,
        leeway_seconds: 60,
    };
    let _ = jwt::check_claims(&claims, &rules, 1_700_000_000);
    let mut s = ScopeRules::with_defaults("rabbitmq");
    s.additional_scopes_key = Some(r"sub https://sts\.amazonaws\.com/.request_tags.scope a.b".into());
    s.scope_aliases.insert("x".into(), vec!["rabbitmq.read:*/*".into()]);
    if let Ok(n) = scopes::normalise(&claims, &s) {
        assert!(n.scopes.len() <= scopes::MAX_SCOPES);
        let _ = scopes::username(&claims, &s.preferred_username_claims);
    }
});
