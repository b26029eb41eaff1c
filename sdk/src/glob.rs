//! Redis's glob-style pattern matching (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`, `\x`.

/// Whether `s` matches `pattern`, as Redis's `KEYS`, `SCAN MATCH` and ACL patterns do.
pub fn matches(pattern: &[u8], s: &[u8]) -> bool {
    match_at(pattern, s, 0)
}

/// A pattern prepared once for matching many strings: the common shapes (`*`, a literal,
/// `prefix*`) match without the general matcher, and any other pattern is checked against
/// its literal start first. Matches exactly what [`matches()`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pattern: Vec<u8>,
    shape: Shape,
    /// The bytes every matching string starts with.
    literal: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `*` (or `**`…): everything.
    Any,
    /// No special character: only itself.
    Exact,
    /// A literal then one or more `*`.
    Prefix,
    /// Anything else.
    General,
}

fn special(c: u8) -> bool {
    matches!(c, b'*' | b'?' | b'[' | b'\\')
}

impl Pattern {
    /// Prepares `pattern` (Redis glob syntax).
    pub fn new(pattern: &[u8]) -> Pattern {
        let literal = pattern
            .iter()
            .position(|&c| special(c))
            .unwrap_or(pattern.len());
        let rest = &pattern[literal..];
        let shape = if rest.is_empty() {
            Shape::Exact
        } else if rest.iter().all(|&c| c == b'*') {
            if literal == 0 {
                Shape::Any
            } else {
                Shape::Prefix
            }
        } else {
            Shape::General
        };
        Pattern {
            pattern: pattern.to_vec(),
            shape,
            literal,
        }
    }

    /// Whether `s` matches.
    pub fn matches(&self, s: &[u8]) -> bool {
        let lit = &self.pattern[..self.literal];
        match self.shape {
            Shape::Any => true,
            Shape::Exact => s == lit,
            Shape::Prefix => s.starts_with(lit),
            Shape::General => {
                s.starts_with(lit) && match_at(&self.pattern[self.literal..], &s[self.literal..], 0)
            }
        }
    }

    /// What every matching string starts with (`user:` for `user:*:profile`).
    pub fn literal_prefix(&self) -> &[u8] {
        &self.pattern[..self.literal]
    }

    /// Whether it matches every string (`*`, `**` …).
    pub fn matches_all(&self) -> bool {
        matches!(self.shape, Shape::Any)
    }
}

fn match_at(mut p: &[u8], mut s: &[u8], depth: usize) -> bool {
    if depth > 1000 {
        return false;
    }
    while let Some(&c) = p.first() {
        match c {
            b'*' => {
                while p.len() > 1 && p[1] == b'*' {
                    p = &p[1..];
                }
                if p.len() == 1 {
                    return true;
                }
                for i in 0..=s.len() {
                    if match_at(&p[1..], &s[i..], depth + 1) {
                        return true;
                    }
                }
                return false;
            }
            b'?' => {
                if s.is_empty() {
                    return false;
                }
                s = &s[1..];
            }
            b'[' => {
                let Some(&ch) = s.first() else { return false };
                p = &p[1..];
                let not = p.first() == Some(&b'^');
                if not {
                    p = &p[1..];
                }
                let mut matched = false;
                loop {
                    match p.first() {
                        None => {
                            // Unterminated class: Redis treats the end as closing it.
                            break;
                        }
                        Some(b'\\') if p.len() >= 2 => {
                            if p[1] == ch {
                                matched = true;
                            }
                            p = &p[2..];
                        }
                        Some(b']') => break,
                        Some(&a) if p.len() >= 3 && p[1] == b'-' => {
                            let (lo, hi) = if a <= p[2] { (a, p[2]) } else { (p[2], a) };
                            if (lo..=hi).contains(&ch) {
                                matched = true;
                            }
                            p = &p[3..];
                        }
                        Some(&a) => {
                            if a == ch {
                                matched = true;
                            }
                            p = &p[1..];
                        }
                    }
                }
                if not {
                    matched = !matched;
                }
                if !matched {
                    return false;
                }
                s = &s[1..];
                if p.is_empty() {
                    return s.is_empty();
                }
            }
            b'\\' if p.len() >= 2 => {
                if s.first() != Some(&p[1]) {
                    return false;
                }
                p = &p[1..];
                s = &s[1..];
            }
            _ => {
                if s.first() != Some(&c) {
                    return false;
                }
                s = &s[1..];
            }
        }
        p = &p[1..];
    }
    s.is_empty()
}

#[cfg(test)]
mod tests {
    use super::{Pattern, matches};

    #[test]
    fn redis_glob_semantics() {
        let yes = [
            ("*", ""),
            ("*", "anything"),
            ("cache:*", "cache:user:1"),
            ("h?llo", "hello"),
            ("h[ae]llo", "hallo"),
            ("h[^e]llo", "hallo"),
            ("h[a-b]llo", "hbllo"),
            ("h[b-a]llo", "hallo"),
            ("a\\*b", "a*b"),
            ("*:*:id", "svc:user:id"),
            ("**x", "abx"),
        ];
        for (p, s) in yes {
            assert!(matches(p.as_bytes(), s.as_bytes()), "{p} should match {s}");
        }
        let no = [
            ("cache:*", "cach:x"),
            ("h?llo", "hllo"),
            ("h[ae]llo", "hillo"),
            ("h[^e]llo", "hello"),
            ("a\\*b", "axb"),
            ("abc", "abcd"),
            ("", "x"),
        ];
        for (p, s) in no {
            assert!(
                !matches(p.as_bytes(), s.as_bytes()),
                "{p} should not match {s}"
            );
        }
    }

    #[test]
    fn prepared_patterns_match_as_the_general_matcher_does() {
        let patterns = [
            "*",
            "**",
            "",
            "abc",
            "cache:*",
            "cache:**",
            "user:*:profile",
            "h?llo",
            "h[ae]llo",
            "a\\*b",
            "*:id",
            "ab[",
            "x*y*z",
        ];
        let strings = [
            "",
            "abc",
            "abcd",
            "cache:",
            "cache:user:1",
            "cach:x",
            "user:7:profile",
            "user:7:profiles",
            "hello",
            "hallo",
            "a*b",
            "axb",
            "svc:id",
            "ab[",
            "abx",
            "xyz",
            "x_y_z_",
        ];
        for p in patterns {
            let prepared = Pattern::new(p.as_bytes());
            for s in strings {
                assert_eq!(
                    prepared.matches(s.as_bytes()),
                    matches(p.as_bytes(), s.as_bytes()),
                    "{p:?} against {s:?}"
                );
            }
        }
    }

    #[test]
    fn literal_prefixes_stop_at_the_first_pattern_character() {
        let lit = |p: &str| Pattern::new(p.as_bytes()).literal_prefix().to_vec();
        assert_eq!(lit("user:*:profile"), b"user:");
        assert_eq!(lit("cfg:site"), b"cfg:site");
        assert_eq!(lit("*"), b"");
        assert_eq!(lit("a?b"), b"a");
        assert_eq!(lit("[ab]x"), b"");
        assert_eq!(lit("a\\*b"), b"a");
    }
}
