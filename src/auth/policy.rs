//! Edge token policy, pure: rules a security team puts in front of the broker on top of the
//! claim checks (`[oauth2.policy]`, per issuer). Applied to verified claims after
//! [`super::jwt::check_claims`]; the first rule that refuses decides, with its own reason.
//!
//! Order: `max_lifetime_seconds`, `required_claims`, `jti_deny`, then `rules` in the
//! configured order.
//!
//! **Invariant:** no IO and no clock.

use std::collections::BTreeSet;

use serde_json::Value;

use super::jwt::AuthError;

/// `[oauth2.policy]`. The default policy allows everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Longest accepted `exp - iat`; a token without both is refused when set.
    pub max_lifetime_seconds: Option<i64>,
    /// Claim paths (the `additional_scopes_key` syntax: `.` descends, `\.` is a literal dot)
    /// that must be present.
    pub required_claims: Vec<String>,
    /// `jti` values refused.
    pub jti_deny: BTreeSet<String>,
    pub rules: Vec<ClaimRule>,
}

/// `[[oauth2.policy.rules]]`: a claim path and the test its value must pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRule {
    pub claim: String,
    pub test: ClaimTest,
}

/// What a claim's value must be. Only strings (and, compared as their JSON text, numbers
/// and booleans) can pass: a missing claim, an object or a list fails every test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimTest {
    Equals(String),
    OneOf(Vec<String>),
    Prefix(String),
}

impl std::fmt::Display for ClaimRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.test {
            ClaimTest::Equals(v) => write!(f, "{} equals {v:?}", self.claim),
            ClaimTest::OneOf(v) => write!(f, "{} one of {v:?}", self.claim),
            ClaimTest::Prefix(v) => write!(f, "{} has prefix {v:?}", self.claim),
        }
    }
}

impl Policy {
    /// Whether the policy has any rule at all.
    pub fn is_empty(&self) -> bool {
        self == &Policy::default()
    }

    /// Applies the policy to verified `claims`.
    pub fn check(&self, claims: &Value) -> Result<(), AuthError> {
        if let Some(max) = self.max_lifetime_seconds {
            let n = |k| {
                claims
                    .get(k)
                    .and_then(Value::as_f64)
                    .filter(|f| f.is_finite())
            };
            match (n("iat"), n("exp")) {
                (Some(iat), Some(exp)) if exp - iat <= max as f64 => {}
                (Some(iat), Some(exp)) => {
                    return Err(AuthError::PolicyLifetime(format!(
                        "exp - iat = {}s exceeds max_lifetime_seconds = {max}",
                        (exp - iat) as i64
                    )));
                }
                _ => {
                    return Err(AuthError::PolicyLifetime(format!(
                        "max_lifetime_seconds = {max} needs numeric iat and exp claims"
                    )));
                }
            }
        }
        for path in &self.required_claims {
            if lookup(claims, path).is_none_or(Value::is_null) {
                return Err(AuthError::PolicyRequiredClaim(path.clone()));
            }
        }
        if !self.jti_deny.is_empty()
            && let Some(jti) = claims.get("jti").and_then(Value::as_str)
            && self.jti_deny.contains(jti)
        {
            return Err(AuthError::PolicyJti(jti.to_owned()));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let value = lookup(claims, &rule.claim).and_then(scalar);
            let ok = value.as_deref().is_some_and(|v| match &rule.test {
                ClaimTest::Equals(e) => v == e,
                ClaimTest::OneOf(list) => list.iter().any(|e| e == v),
                ClaimTest::Prefix(p) => v.starts_with(p.as_str()),
            });
            if !ok {
                return Err(AuthError::PolicyClaim {
                    rule: i,
                    description: rule.to_string(),
                    found: value,
                });
            }
        }
        Ok(())
    }
}

/// The value at `path` (segments split as `additional_scopes_key` paths are).
pub fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    let segments = super::scopes::split_paths(path).into_iter().next()?;
    let mut at = claims;
    for s in &segments {
        at = at.as_object()?.get(s)?;
    }
    Some(at)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ACCOUNT: &str = r"https://sts\.amazonaws\.com/.aws_account";

    fn claims() -> Value {
        json!({
            "iat": 1000, "exp": 1900, "jti": "j-1", "sub": "arn:aws:iam::111122223333:role/R",
            "org_id": "o-abc",
            "https://sts.amazonaws.com/": {"aws_account": "111122223333", "n": 7},
        })
    }

    fn rule(claim: &str, test: ClaimTest) -> Policy {
        Policy {
            rules: vec![ClaimRule {
                claim: claim.into(),
                test,
            }],
            ..Policy::default()
        }
    }

    #[test]
    fn policy_table() {
        use ClaimTest::*;
        let s = |v: &str| v.to_owned();
        let lifetime = |max| Policy {
            max_lifetime_seconds: Some(max),
            ..Policy::default()
        };
        let required = |paths: &[&str]| Policy {
            required_claims: paths.iter().map(|p| s(p)).collect(),
            ..Policy::default()
        };
        let deny = |jtis: &[&str]| Policy {
            jti_deny: jtis.iter().map(|p| s(p)).collect(),
            ..Policy::default()
        };
        let mut no_iat = claims();
        no_iat.as_object_mut().unwrap().remove("iat");
        let cases: Vec<(Policy, Value, Result<(), &str>)> = vec![
            (Policy::default(), json!({}), Ok(())),
            (lifetime(900), claims(), Ok(())),
            (lifetime(899), claims(), Err("policy_lifetime")),
            (lifetime(3600), no_iat.clone(), Err("policy_lifetime")),
            (
                lifetime(3600),
                json!({"iat": 1, "exp": "x"}),
                Err("policy_lifetime"),
            ),
            (required(&["jti", ACCOUNT]), claims(), Ok(())),
            (
                required(&["org_id", "nope"]),
                claims(),
                Err("policy_required_claim"),
            ),
            (
                required(&[r"https://sts\.amazonaws\.com/.region"]),
                claims(),
                Err("policy_required_claim"),
            ),
            (
                required(&["https://sts.amazonaws.com/.aws_account"]),
                claims(),
                Err("policy_required_claim"),
            ),
            (
                required(&["x"]),
                json!({"x": null}),
                Err("policy_required_claim"),
            ),
            (deny(&["j-2"]), claims(), Ok(())),
            (deny(&["j-2", "j-1"]), claims(), Err("policy_jti")),
            (deny(&["j-1"]), no_iat.clone(), Err("policy_jti")),
            (deny(&["j-1"]), json!({"sub": "x"}), Ok(())),
            (rule(ACCOUNT, Equals(s("111122223333"))), claims(), Ok(())),
            (
                rule(ACCOUNT, Equals(s("444455556666"))),
                claims(),
                Err("policy_claim"),
            ),
            (
                rule("missing", Equals(s(""))),
                claims(),
                Err("policy_claim"),
            ),
            (
                rule("org_id", OneOf(vec![s("o-x"), s("o-abc")])),
                claims(),
                Ok(()),
            ),
            (
                rule("org_id", OneOf(vec![s("o-x")])),
                claims(),
                Err("policy_claim"),
            ),
            (rule("org_id", OneOf(vec![])), claims(), Err("policy_claim")),
            (
                rule("sub", Prefix(s("arn:aws:iam::111122223333:"))),
                claims(),
                Ok(()),
            ),
            (
                rule("sub", Prefix(s("arn:aws:iam::444455556666:"))),
                claims(),
                Err("policy_claim"),
            ),
            (
                rule(r"https://sts\.amazonaws\.com/.n", OneOf(vec![s("7")])),
                claims(),
                Ok(()),
            ),
            (
                rule(r"https://sts\.amazonaws\.com/", Prefix(s(""))),
                claims(),
                Err("policy_claim"),
            ),
        ];
        for (i, (policy, claims, expected)) in cases.into_iter().enumerate() {
            let got = policy.check(&claims).map_err(|e| e.reason());
            assert_eq!(got, expected, "case {i}: {policy:?} on {claims}");
        }
    }

    #[test]
    fn first_refusing_rule_decides() {
        let p = Policy {
            rules: vec![
                ClaimRule {
                    claim: "org_id".into(),
                    test: ClaimTest::Prefix("o-".into()),
                },
                ClaimRule {
                    claim: ACCOUNT.into(),
                    test: ClaimTest::Equals("1".into()),
                },
            ],
            ..Policy::default()
        };
        let err = p.check(&claims()).unwrap_err();
        assert_eq!(
            err,
            AuthError::PolicyClaim {
                rule: 1,
                description: format!("{ACCOUNT} equals \"1\""),
                found: Some("111122223333".into()),
            }
        );
        assert!(err.to_string().contains("rules[1]"), "{err}");
    }
}
