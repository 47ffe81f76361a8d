//! IAM's wildcards and policy variables.
//!
//! In `Action`, `Resource`, `Principal` and the `*Like` condition operators, `*` matches any
//! run of characters (the empty one too) and `?` exactly one character; everything else
//! matches itself. ARNs are matched segment by segment (IAM's `ArnLike`): the six parts
//! split at the first five colons are compared pairwise, so a wildcard never reaches across
//! a colon of the first five. Matching walks bytes, stepping over whole UTF-8 characters
//! for `?` and `*`, and backtracks only to the last `*` (no exponential cases).
//!
//! A policy variable (`${aws:PrincipalTag/team}`, `${aws:PrincipalTag/team, 'none'}`) is
//! replaced by its value as literal text: a `*` in a tag value is not a wildcard. `${*}`,
//! `${?}` and `${$}` are a literal `*`, `?` and `$`.

use super::keys::Key;

/// One element of a compiled pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum P {
    Byte(u8),
    One,
    Star,
}

/// A compiled wildcard pattern (no variables left). The literal bytes before the first
/// wildcard are kept apart: most subjects that do not match fail on them, with one
/// comparison.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Pattern(Vec<P>, Prefix);

#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Prefix {
    bytes: Vec<u8>,
    /// The whole pattern is literal.
    whole: bool,
}

impl Pattern {
    /// `*` and `?` are wildcards.
    pub fn wild(text: &str) -> Pattern {
        let mut p = Pattern::default();
        p.push_wild(text);
        p.seal()
    }

    /// Every character is itself.
    pub fn literal(text: &str) -> Pattern {
        let mut p = Pattern::default();
        p.push_literal(text);
        p.seal()
    }

    /// Computes the literal prefix, once the elements are final.
    fn seal(mut self) -> Pattern {
        let bytes: Vec<u8> = self
            .0
            .iter()
            .map_while(|e| match e {
                P::Byte(b) => Some(*b),
                _ => None,
            })
            .collect();
        let whole = bytes.len() == self.0.len();
        self.1 = Prefix { bytes, whole };
        self
    }

    fn push_wild(&mut self, text: &str) {
        for &b in text.as_bytes() {
            self.0.push(match b {
                b'*' => P::Star,
                b'?' => P::One,
                b => P::Byte(b),
            });
        }
    }

    fn push_literal(&mut self, text: &str) {
        self.0.extend(text.bytes().map(P::Byte));
    }

    /// The pattern's text when it has no wildcard.
    fn literal_text(&self) -> Option<&[u8]> {
        self.1.whole.then_some(self.1.bytes.as_slice())
    }

    /// Whether the pattern is a lone `*`.
    pub fn is_star(&self) -> bool {
        self.0.iter().all(|p| *p == P::Star) && !self.0.is_empty()
    }

    pub fn matches(&self, subject: &[u8]) -> bool {
        let prefix = &self.1;
        if prefix.whole {
            return subject == prefix.bytes.as_slice();
        }
        if !subject.starts_with(&prefix.bytes) {
            return false;
        }
        let pat = &self.0;
        let (mut p, mut i) = (prefix.bytes.len(), prefix.bytes.len());
        let mut resume: Option<(usize, usize)> = None;
        while i < subject.len() {
            if let Some(&pe) = pat.get(p) {
                match pe {
                    P::Star => {
                        p += 1;
                        resume = Some((p, i));
                        continue;
                    }
                    P::One => {
                        i += char_len(subject, i);
                        p += 1;
                        continue;
                    }
                    P::Byte(b) if b == subject[i] => {
                        i += 1;
                        p += 1;
                        continue;
                    }
                    P::Byte(_) => {}
                }
            }
            match resume {
                // The last `*` takes one more character, and matching resumes after it.
                Some((sp, si)) => {
                    let next = si + char_len(subject, si);
                    resume = Some((sp, next));
                    p = sp;
                    i = next;
                }
                None => return false,
            }
        }
        pat[p..].iter().all(|&pe| pe == P::Star)
    }
}

/// The length of the UTF-8 character at `i` (1 for a byte that starts none).
fn char_len(s: &[u8], i: usize) -> usize {
    let n = match s[i] {
        b if b < 0x80 => 1,
        b if b >> 5 == 0b110 => 2,
        b if b >> 4 == 0b1110 => 3,
        b if b >> 3 == 0b11110 => 4,
        _ => 1,
    };
    n.min(s.len() - i)
}

/// A policy variable reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var {
    pub key: Key,
    pub default: Option<String>,
}

/// Text with wildcards, and maybe policy variables to fill in per principal.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `${*}`, `${?}`, `${$}`: one literal character.
    Char(char),
    Var(Var),
}

/// A pattern or value as written in a policy, variables not yet replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Reads `${...}` references when `variables` is set (policy version 2012-10-17);
    /// otherwise the text is taken as it is.
    pub fn parse(text: &str, variables: bool) -> Result<Template, String> {
        if !variables || !text.contains("${") {
            return Ok(Template(vec![Part::Text(text.to_owned())]));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated policy variable in {text:?}"))?;
            parts.push(parse_var(&after[..end])?);
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template(parts))
    }

    /// The variables it refers to.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.0.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            _ => None,
        })
    }

    pub fn has_vars(&self) -> bool {
        self.vars().next().is_some()
    }

    /// The text with every variable replaced; `None` when one has no value and no default
    /// (IAM: the element then matches nothing).
    pub fn text(&self, lookup: &dyn Fn(&Key) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Char(c) => out.push(*c),
                Part::Var(v) => out.push_str(&value_of(v, lookup)?),
            }
        }
        Some(out)
    }

    /// The wildcard pattern, variables replaced as literal text.
    pub fn pattern(&self, lookup: &dyn Fn(&Key) -> Option<String>) -> Option<Pattern> {
        self.pattern_or_wild(lookup, false)
    }

    /// [`Template::pattern`]; with `wild_if_missing`, a variable without a value (and
    /// without a default) becomes `*` instead of making the pattern match nothing.
    pub fn pattern_or_wild(
        &self,
        lookup: &dyn Fn(&Key) -> Option<String>,
        wild_if_missing: bool,
    ) -> Option<Pattern> {
        let mut p = Pattern::default();
        for part in &self.0 {
            match part {
                Part::Text(t) => p.push_wild(t),
                Part::Char(c) => p.push_literal(c.encode_utf8(&mut [0; 4])),
                Part::Var(v) => match value_of(v, lookup) {
                    Some(value) => p.push_literal(&value),
                    None if wild_if_missing => p.0.push(P::Star),
                    None => return None,
                },
            }
        }
        Some(p.seal())
    }

    /// Splits at the first five colons outside variables: the six segments of an ARN.
    fn segments(&self) -> Vec<Template> {
        let mut segs = vec![Vec::new()];
        for part in &self.0 {
            match part {
                Part::Text(t) => {
                    let mut rest = t.as_str();
                    while segs.len() < 6 {
                        match rest.find(':') {
                            Some(at) => {
                                if at > 0 {
                                    segs.last_mut().unwrap().push(Part::Text(rest[..at].into()));
                                }
                                segs.push(Vec::new());
                                rest = &rest[at + 1..];
                            }
                            None => break,
                        }
                    }
                    if !rest.is_empty() {
                        segs.last_mut().unwrap().push(Part::Text(rest.into()));
                    }
                }
                other => segs.last_mut().unwrap().push(other.clone()),
            }
        }
        segs.into_iter().map(Template).collect()
    }
}

fn value_of(v: &Var, lookup: &dyn Fn(&Key) -> Option<String>) -> Option<String> {
    lookup(&v.key).or_else(|| v.default.clone())
}

/// `aws:PrincipalArn`, `aws:PrincipalTag/team, 'none'`, `*`, `?`, `$`.
fn parse_var(inner: &str) -> Result<Part, String> {
    match inner {
        "*" => return Ok(Part::Char('*')),
        "?" => return Ok(Part::Char('?')),
        "$" => return Ok(Part::Char('$')),
        _ => {}
    }
    let (name, default) = match inner.split_once(',') {
        Some((name, d)) => {
            let d = d.trim();
            let d = d
                .strip_prefix('\'')
                .and_then(|d| d.strip_suffix('\''))
                .ok_or_else(|| {
                    format!(
                        "policy variable ${{{inner}}}: a default value is written in single quotes"
                    )
                })?;
            (name.trim(), Some(d.to_owned()))
        }
        None => (inner.trim(), None),
    };
    let key = Key::parse(name).map_err(|e| format!("policy variable ${{{inner}}}: {e}"))?;
    if key.multivalued() {
        return Err(format!(
            "policy variable ${{{inner}}}: {} has several values and cannot be a variable",
            key.name()
        ));
    }
    if key.per_request() {
        return Err(format!(
            "policy variable ${{{inner}}}: {} changes with every operation; use it in a condition instead",
            key.name()
        ));
    }
    Ok(Part::Var(Var { key, default }))
}

/// An ARN pattern: `*` alone, or six segment patterns. When the first five are literal
/// (`arn:aws:rabbitmq:::`, the usual case), they are one string compared at once, and
/// only the resource segment is matched as a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArnPattern {
    Any,
    Segments(Vec<Pattern>),
    /// The literal text of the first five segments with their colons, then the sixth.
    Head(String, Pattern),
}

impl ArnPattern {
    fn from_segments(segs: Vec<Pattern>) -> ArnPattern {
        let head: Option<Vec<&[u8]>> = segs[..5].iter().map(Pattern::literal_text).collect();
        match head {
            Some(parts) => {
                let mut text = Vec::new();
                for p in parts {
                    text.extend_from_slice(p);
                    text.push(b':');
                }
                // Literal segments come from UTF-8 text and contain no colon.
                let head = String::from_utf8(text).unwrap_or_default();
                ArnPattern::Head(head, segs.into_iter().nth(5).unwrap_or_default())
            }
            None => ArnPattern::Segments(segs),
        }
    }

    pub fn matches(&self, arn: &str) -> bool {
        match self {
            ArnPattern::Any => true,
            ArnPattern::Head(head, tail) => {
                // The head has exactly five colons, so the rest is the sixth segment.
                arn.strip_prefix(head.as_str())
                    .is_some_and(|rest| tail.matches(rest.as_bytes()))
            }
            ArnPattern::Segments(pats) => {
                let arn = Split::new(arn);
                arn.n == pats.len()
                    && pats
                        .iter()
                        .zip(&arn.segs)
                        .all(|(p, s)| p.matches(s.as_bytes()))
            }
        }
    }
}

/// An ARN split at its first five colons.
struct Split<'a> {
    segs: [&'a str; 6],
    n: usize,
}

impl<'a> Split<'a> {
    fn new(arn: &'a str) -> Split<'a> {
        let mut segs = [""; 6];
        let mut n = 0;
        let mut rest = arn;
        while n < 5 {
            match rest.find(':') {
                Some(at) => {
                    segs[n] = &rest[..at];
                    rest = &rest[at + 1..];
                    n += 1;
                }
                None => break,
            }
        }
        segs[n] = rest;
        Split { segs, n: n + 1 }
    }
}

/// An ARN pattern as written, variables not yet replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArnTemplate {
    Any,
    Segments(Vec<Template>),
}

impl ArnTemplate {
    /// `*`, or `arn:partition:service:region:account:resource` (six segments).
    pub fn parse(text: &str, variables: bool) -> Result<ArnTemplate, String> {
        if text == "*" {
            return Ok(ArnTemplate::Any);
        }
        let t = Template::parse(text, variables)?;
        let segs = t.segments();
        if segs.len() != 6 {
            return Err(format!(
                "{text:?} is not an ARN: expected arn:partition:service:region:account:resource (six parts separated by colons)"
            ));
        }
        Ok(ArnTemplate::Segments(segs))
    }

    pub fn has_vars(&self) -> bool {
        match self {
            ArnTemplate::Any => false,
            ArnTemplate::Segments(s) => s.iter().any(Template::has_vars),
        }
    }

    pub fn vars(&self) -> Vec<&Var> {
        match self {
            ArnTemplate::Any => Vec::new(),
            ArnTemplate::Segments(s) => s.iter().flat_map(Template::vars).collect(),
        }
    }

    /// The segment `i` as plain text, when it has no wildcard and no variable.
    pub fn literal_segment(&self, i: usize) -> Option<String> {
        match self {
            ArnTemplate::Any => None,
            ArnTemplate::Segments(s) => {
                let text = s[i].text(&|_| None)?;
                (!s[i].has_vars() && !text.contains(['*', '?'])).then_some(text)
            }
        }
    }

    pub fn pattern(&self, lookup: &dyn Fn(&Key) -> Option<String>) -> Option<ArnPattern> {
        self.pattern_or_wild(lookup, false)
    }

    /// [`ArnTemplate::pattern`], with [`Template::pattern_or_wild`]'s choice.
    pub fn pattern_or_wild(
        &self,
        lookup: &dyn Fn(&Key) -> Option<String>,
        wild_if_missing: bool,
    ) -> Option<ArnPattern> {
        match self {
            ArnTemplate::Any => Some(ArnPattern::Any),
            ArnTemplate::Segments(s) => s
                .iter()
                .map(|t| t.pattern_or_wild(lookup, wild_if_missing))
                .collect::<Option<Vec<_>>>()
                .map(ArnPattern::from_segments),
        }
    }
}
