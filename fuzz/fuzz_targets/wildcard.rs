//! The wildcard matcher against a direct transcription of the spec's pseudo-code
//! (rabbitmq-oauth2.md §4.2). Input: pattern, a NUL byte, subject.
#![no_main]
use amqp_iam_gateway::authz::wildcard;

/// `cow_qs:urldecode/1`: `+` is a space, `%XX` a byte (either case), any other `%` fails.
fn urldecode(part: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < part.len() {
        match part[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(part.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    (from..=hay.len().checked_sub(needle.len())?).find(|&i| hay[i..].starts_with(needle))
}

fn reference(subject: &[u8], pattern: &[u8]) -> bool {
    let Some(parts) = pattern.split(|&b| b == b'*').map(urldecode).collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    if !subject.starts_with(&parts[0]) {
        return false;
    }
    let (mut pos, mut rest) = (parts[0].len(), &parts[1..]);
    loop {
        if rest.len() == 1 && rest[0].is_empty() {
            return true;
        }
        if rest.is_empty() {
            return pos == subject.len();
        }
        if pos == subject.len() {
            return false;
        }
        if rest[0].is_empty() {
            rest = &rest[1..];
            continue;
        }
        let Some(i) = find(subject, &rest[0], pos) else { return false };
        pos = i + rest[0].len();
        rest = &rest[1..];
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some(nul) = data.iter().position(|&b| b == 0) else { return };
    let (Ok(pattern), subject) = (std::str::from_utf8(&data[..nul]), &data[nul + 1..]) else {
        return;
    };
    assert_eq!(
        wildcard::compile(pattern).matches(subject),
        reference(subject, pattern.as_bytes()),
        "pattern {pattern:?} subject {subject:?}"
    );
});
