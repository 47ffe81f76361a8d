//! RabbitMQ's `wildcard:match/2`, reproduced exactly (spec §4.2).
//!
//! A pattern is split on `*`, each part is URL-decoded (`%XX` → byte, `+` → space), and the
//! parts are then found left to right at their **first** occurrence, with no backtracking.
//! That is not glob semantics: `a*b` does not match `abab`. The quirks are deliberate,
//! because a scope must grant exactly what it grants on the broker.
//!
//! Invariant: this module does no IO and never allocates while matching; a pattern is
//! compiled once (when the token's scopes are parsed) and matched many times.

use std::fmt;

/// A compiled wildcard pattern.
///
/// `parts` is `None` when the pattern contains a malformed `%` sequence: RabbitMQ logs
/// "Invalid pattern" and the pattern matches nothing, so we keep that as a state rather
/// than an error (a bad scope must not fail the whole login).
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    parts: Option<Vec<Vec<u8>>>,
}

/// Compiles `pattern`; see [`Pattern`].
pub fn compile(pattern: &str) -> Pattern {
    Pattern::compile(pattern)
}

/// Convenience: compiles `pattern` and matches `subject` against it.
pub fn matches(subject: &str, pattern: &str) -> bool {
    Pattern::compile(pattern).matches(subject.as_bytes())
}

impl Pattern {
    /// Splits on every `*` first and decodes afterwards, so `%2A` stays a literal `*`.
    pub fn compile(pattern: &str) -> Pattern {
        let parts = pattern
            .as_bytes()
            .split(|&b| b == b'*')
            .map(urldecode)
            .collect::<Option<Vec<_>>>();
        Pattern {
            source: pattern.to_owned(),
            parts,
        }
    }

    /// The pattern as written in the scope.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// False if the pattern had a malformed `%` sequence (it then matches nothing).
    pub fn is_valid(&self) -> bool {
        self.parts.is_some()
    }

    /// Transliteration of `wildcard:match/2` + `scan/4` (v3.10.8 = HEAD).
    pub fn matches(&self, subject: &[u8]) -> bool {
        let Some(parts) = self.parts.as_deref() else {
            return false;
        };
        match parts {
            // The common scopes first: `*` matches anything, a pattern without `*` only
            // itself (what the general loop below concludes too, with more steps).
            [all, tail] if all.is_empty() && tail.is_empty() => return true,
            [only] => return subject == only.as_slice(),
            _ => {}
        }
        // `split` always yields at least one part, but stay total anyway.
        let Some((first, mut rest)) = parts.split_first() else {
            return false;
        };
        if !subject.starts_with(first) {
            return false;
        }
        let mut pos = first.len();
        loop {
            match rest {
                // The clause order below is RabbitMQ's; it is what produces the `**` quirks.
                [] => return pos == subject.len(),
                [last] if last.is_empty() => return true,
                _ if pos == subject.len() => return false,
                [part, tail @ ..] if part.is_empty() => rest = tail,
                [part, tail @ ..] => match find(&subject[pos..], part) {
                    Some(i) => {
                        pos += i + part.len();
                        rest = tail;
                    }
                    None => return false,
                },
            }
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.source).finish()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// First occurrence of a non-empty `needle` in `haystack` (`binary:match/3`).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// `cow_qs:urldecode/1`: `%XX` (either case) → byte, `+` → space, anything else as is.
/// `None` for a `%` not followed by two hex digits.
fn urldecode(part: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(part.len());
    let mut i = 0;
    while let Some(&b) = part.get(i) {
        match b {
            b'%' => {
                let hi = hex(*part.get(i + 1)?)?;
                let lo = hex(*part.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vectors {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        subject: String,
        pattern: String,
        matches: bool,
    }

    /// Asserts that `matches(subject, pattern)` is as expected in every row, listing every
    /// row that is not.
    fn assert_rows<'a>(rows: impl Iterator<Item = (&'a str, &'a str, bool)>) {
        let failed: Vec<String> = rows
            .filter(|&(s, p, want)| matches(s, p) != want)
            .map(|(s, p, want)| format!("subject {s:?} pattern {p:?}: expected {want}"))
            .collect();
        assert!(
            failed.is_empty(),
            "{} rows failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }

    #[test]
    fn every_vector_in_wildcard_json() {
        let v: Vectors = serde_json::from_str(include_str!("../../tests/vectors/wildcard.json"))
            .expect("wildcard.json parses");
        assert_eq!(v.cases.len(), 71, "vector file changed size");
        let rows = v
            .cases
            .iter()
            .map(|c| (c.subject.as_str(), c.pattern.as_str(), c.matches));
        assert_rows(rows);
    }

    /// The §4.2 table, including the no-backtracking (⚠) rows.
    #[test]
    fn spec_table() {
        let rows: &[(&str, &str, bool)] = &[
            ("value", "value", true),
            ("foo", "*oo", true),
            ("foo", "fo*", true),
            ("foo", "*r", false),
            ("foo", "b*", false),
            ("some string", "*+*+*", false),
            ("some long string", "*+*+*", true),
            ("some long string", "s*e*str*", true),
            ("some long string", "s*z*str*", false),
            ("abab", "a*b", false),
            ("aXbYb", "a*b", false),
            ("abcabc", "*bc", false),
            ("abcab", "*ab", false),
            ("ab", "a*b", true),
            ("aa", "a*a", true),
            ("a", "a*a", false),
            ("xbxb", "*b*b", true),
            ("bb", "*b*b", true),
            ("a", "a**", false),
            ("ab", "a**", true),
            ("", "*", true),
            ("", "", true),
            ("", "**", false),
            ("x", "", false),
            ("/", "%2F", true),
            ("/", "%2f", true),
            ("a b", "a+b", true),
            ("a+b", "a+b", false),
            ("a+b", "a%2Bb", true),
            ("100%", "100%", false),
            ("100%", "100%25", true),
            ("a%zz", "a%zz", false),
            ("x*y", "x%2Ay", true),
            ("xzy", "x%2Ay", false),
            ("a.b", "a?b", false),
            ("a?b", "a?b", true),
            ("foo.bar.baz", "foo.*.baz", true),
            ("foo.bar", "foo.*.baz", false),
            ("amq.gen-abc", "amq.gen-*", true),
            ("#/foo", "%23%2Ffoo", true),
            ("юникод", "юникод", true),
            ("юникод", "%D1%8E%D0%BD%D0%B8%D0%BA%D0%BE%D0%B4", true),
        ];
        assert_rows(rows.iter().copied());
    }

    #[test]
    fn malformed_percent_invalidates_every_part() {
        for p in ["a%zz", "*%", "%4", "ok*%g0*", "%%"] {
            let pat = compile(p);
            assert!(!pat.is_valid(), "{p}");
            assert!(!pat.matches(p.as_bytes()), "{p}");
            assert!(!pat.matches(b""), "{p}");
        }
    }

    #[test]
    fn compiled_pattern_is_reusable_and_displays_its_source() {
        let p = compile("amq.gen-*");
        assert!(p.matches(b"amq.gen-1"));
        assert!(p.matches(b"amq.gen-2"));
        assert!(!p.matches(b"amq.other"));
        assert_eq!(p.to_string(), "amq.gen-*");
        assert_eq!(p.as_str(), "amq.gen-*");
    }
}
