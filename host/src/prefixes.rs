//! Key prefixes, checked by a key's first byte before any comparison: most keys are ruled
//! out by it (a cache or a plugin about `user:` and `session:` keys, and a GET of `product:1`).

/// A set of key prefixes.
#[derive(Debug, Default)]
pub struct Prefixes {
    list: Vec<Vec<u8>>,
    /// Bit b: some prefix starts with byte b.
    first: [u64; 4],
    /// Some prefix is empty: every key starts with it.
    empty: bool,
}

impl Prefixes {
    pub fn new<P: AsRef<[u8]>>(prefixes: impl IntoIterator<Item = P>) -> Prefixes {
        let mut p = Prefixes::default();
        for prefix in prefixes {
            let prefix = prefix.as_ref();
            match prefix.first() {
                Some(&b) => p.first[usize::from(b >> 6)] |= 1 << (b & 63),
                None => p.empty = true,
            }
            p.list.push(prefix.to_vec());
        }
        p
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether `key` starts with one of them (never, when there are none).
    #[inline]
    pub fn covers(&self, key: &[u8]) -> bool {
        if self.empty {
            return true;
        }
        let Some(&b) = key.first() else {
            return false;
        };
        self.first[usize::from(b >> 6)] & (1 << (b & 63)) != 0
            && self.list.iter().any(|p| key.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::Prefixes;

    #[test]
    fn a_key_is_covered_when_it_starts_with_one_of_them() {
        let p = Prefixes::new(["user:", "u", "\u{e9}t\u{e9}:"]);
        for (key, covered) in [
            (&b"user:1"[..], true),
            (b"u", true),
            (b"x", false),
            (b"", false),
            (b"\xc3\xa9t\xc3\xa9:1", true),
            (b"\xc3\xa9", false),
            (b"\xff", false),
        ] {
            assert_eq!(p.covers(key), covered, "{key:?}");
        }
        assert!(!Prefixes::new::<&str>([]).covers(b"k"));
        assert!(Prefixes::new::<&str>([]).is_empty());
        assert!(Prefixes::new(["a", ""]).covers(b""));
    }
}
