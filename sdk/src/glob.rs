//! Redis's glob-style pattern matching (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`, `\x`.

/// Whether `s` matches `pattern`, as Redis's `KEYS`, `SCAN MATCH` and ACL patterns do.
pub fn matches(pattern: &[u8], s: &[u8]) -> bool {
    match_at(pattern, s, 0)
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
    use super::matches;

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
        let no = [("cache:*", "cach:x"), ("h?llo", "hllo"), ("h[ae]llo", "hillo"), ("h[^e]llo", "hello"), ("a\\*b", "axb"), ("abc", "abcd"), ("", "x")];
        for (p, s) in no {
            assert!(!matches(p.as_bytes(), s.as_bytes()), "{p} should not match {s}");
        }
    }
}
