//! Broker policies (`authz::iam`): any document compiles or is refused without a panic; a
//! compiled one binds to a principal and decides requests without a panic; the glob
//! matcher agrees with a dynamic-programming transcription of IAM's `*`/`?` rules.
//! Input: a policy document, a NUL byte, then request lines `action resource [routing key]`;
//! a document that starts with `glob:` is instead `glob:<pattern>` NUL `<subject>`.
#![no_main]
use amqp_iam_gateway::authz::iam::{
    Action, ActionSet, Binding, Facts, Mode, Pattern, PolicySet, Request,
};

/// IAM's wildcards over characters: `*` any run (the empty one too), `?` one character.
fn reference(pattern: &[char], subject: &[char]) -> bool {
    let mut m = vec![vec![false; subject.len() + 1]; pattern.len() + 1];
    m[0][0] = true;
    for i in 1..=pattern.len() {
        m[i][0] = m[i - 1][0] && pattern[i - 1] == '*';
        for j in 1..=subject.len() {
            m[i][j] = match pattern[i - 1] {
                '*' => m[i - 1][j] || m[i][j - 1],
                '?' => m[i - 1][j - 1],
                c => m[i - 1][j - 1] && c == subject[j - 1],
            };
        }
    }
    m[pattern.len()][subject.len()]
}

fn facts() -> Facts {
    let mut f = Facts {
        principal_arn: Some("arn:aws:iam::111122223333:role/App".into()),
        account: Some("111122223333".into()),
        org_id: Some("o-abc1234567".into()),
        org_paths: vec!["o-abc1234567/r-ab12/".into()],
        region: Some("us-east-1".into()),
        issued_at: Some(1_750_000_000),
        source_ip: Some("10.1.2.3".parse().unwrap()),
        secure_transport: true,
        ..Facts::default()
    };
    f.principal_tag("team", "orders");
    f.request_tag("job", "nightly");
    f
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(nul) = data.iter().position(|&b| b == 0) else { return };
    let (Ok(head), rest) = (std::str::from_utf8(&data[..nul]), &data[nul + 1..]) else {
        return;
    };
    if let Some(pattern) = head.strip_prefix("glob:") {
        let Ok(subject) = std::str::from_utf8(rest) else { return };
        if pattern.len() > 64 || subject.len() > 256 {
            return;
        }
        let p: Vec<char> = pattern.chars().collect();
        let s: Vec<char> = subject.chars().collect();
        assert_eq!(
            Pattern::wild(pattern).matches(subject.as_bytes()),
            reference(&p, &s),
            "pattern {pattern:?} subject {subject:?}"
        );
        return;
    }
    let Ok(set) = PolicySet::compile(&[("p.json".into(), head.to_owned())]) else { return };
    let facts = facts();
    let bindings = [Mode::Scopes, Mode::Policies, Mode::Both].map(|m| Binding::new(&set, m, &facts));
    for line in String::from_utf8_lossy(rest).lines().take(16) {
        let mut words = line.split(' ');
        let action = Action::matching(words.next().unwrap_or(""));
        let resource = words.next().unwrap_or("");
        let routing_key = words.next().map(str::as_bytes);
        let req = Request {
            actions: if action.is_empty() { ActionSet::EMPTY.with(Action::Read) } else { action },
            resource,
            vhost: "/",
            routing_key,
            now: 1_750_000_000,
        };
        let decisions = bindings.each_ref().map(|b| b.evaluate(&req));
        // The mode changes how a decision is used, never the decision.
        assert!(decisions.iter().all(|d| *d == decisions[0]));
        let _ = bindings.each_ref().map(|b| b.permits(&req));
    }
});
