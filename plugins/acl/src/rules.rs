//! Redis ACL rules: parsing `+@read -flushall ~cache:* %R~logs:* &events:*` and checking
//! commands, keys and channels against them.
use std::net::IpAddr;

use respire_sdk::{Category, KeyAccess};

use respire_sdk::glob;

/// Commands whose first argument is a subcommand that rules may name (`+config|get`).
pub fn container(name: &str) -> bool {
    // Most commands are not containers: the first letter rules most out without comparing names.
    if !matches!(
        name.as_bytes().first(),
        Some(b'a' | b'c' | b'f' | b'l' | b'm' | b'o' | b'p' | b's' | b'x')
    ) {
        return false;
    }
    matches!(
        name,
        "acl"
            | "client"
            | "cluster"
            | "command"
            | "config"
            | "function"
            | "latency"
            | "memory"
            | "module"
            | "object"
            | "pubsub"
            | "script"
            | "slowlog"
            | "xgroup"
            | "xinfo"
    )
}

#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    All,
    Category(Category),
    Command(String),
    Subcommand(String, String),
}

/// One user's compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    enabled: bool,
    /// In order; the last that matches a command decides.
    commands: Vec<(bool, Matcher)>,
    /// Key patterns with the access they grant (read, write).
    keys: Vec<(glob::Pattern, bool, bool)>,
    channels: Vec<Vec<u8>>,
}

impl Rules {
    /// Parses space-separated rules, as `ACL SETUSER` takes them (without passwords:
    /// identities and passwords are respire's `[[users]]`).
    pub fn parse(text: &str) -> Result<Rules, String> {
        let mut r = Rules {
            enabled: true,
            ..Rules::default()
        };
        for tok in text.split_whitespace() {
            let lower = tok.to_ascii_lowercase();
            match lower.as_str() {
                "on" => r.enabled = true,
                "off" => r.enabled = false,
                "reset" => {
                    r = Rules {
                        enabled: true,
                        ..Rules::default()
                    }
                }
                "allcommands" => r.commands.push((true, Matcher::All)),
                "nocommands" => r.commands.push((false, Matcher::All)),
                "allkeys" => r.keys.push((glob::Pattern::new(b"*"), true, true)),
                "resetkeys" => r.keys.clear(),
                "allchannels" => r.channels.push(b"*".to_vec()),
                "resetchannels" => r.channels.clear(),
                "nopass" | "resetpass" => {}
                _ => {
                    if let Some(rest) = tok.strip_prefix('~') {
                        r.keys
                            .push((glob::Pattern::new(rest.as_bytes()), true, true));
                    } else if let Some(rest) = tok.strip_prefix('%') {
                        let (perm, pat) = rest
                            .split_once('~')
                            .ok_or_else(|| format!("'{tok}': expected %R~, %W~ or %RW~"))?;
                        let perm = perm.to_ascii_uppercase();
                        if perm.is_empty() || perm.chars().any(|c| c != 'R' && c != 'W') {
                            return Err(format!("'{tok}': expected %R~, %W~ or %RW~"));
                        }
                        r.keys.push((
                            glob::Pattern::new(pat.as_bytes()),
                            perm.contains('R'),
                            perm.contains('W'),
                        ));
                    } else if let Some(rest) = tok.strip_prefix('&') {
                        r.channels.push(rest.as_bytes().to_vec());
                    } else if tok.starts_with('>')
                        || tok.starts_with('<')
                        || tok.starts_with('#')
                        || tok.starts_with('!')
                    {
                        return Err(format!(
                            "'{tok}': passwords belong in respire's [[users]], not in ACL rules"
                        ));
                    } else if let Some(rest) =
                        lower.strip_prefix('+').or_else(|| lower.strip_prefix('-'))
                    {
                        let allow = lower.starts_with('+');
                        let m = if let Some(cat) = rest.strip_prefix('@') {
                            if cat == "all" {
                                Matcher::All
                            } else {
                                Matcher::Category(
                                    respire_sdk::category(cat)
                                        .ok_or_else(|| format!("'{tok}': unknown category"))?,
                                )
                            }
                        } else if let Some((c, s)) = rest.split_once('|') {
                            Matcher::Subcommand(c.to_string(), s.to_string())
                        } else if rest.is_empty() {
                            return Err(format!("'{tok}': missing command name"));
                        } else {
                            Matcher::Command(rest.to_string())
                        };
                        r.commands.push((allow, m));
                    } else {
                        return Err(format!("'{tok}': unknown rule"));
                    }
                }
            }
        }
        Ok(r)
    }

    /// Whether the rules allow this command (`sub`: its subcommand, for containers).
    pub fn allows_command(&self, name: &str, sub: Option<&str>, categories: Category) -> bool {
        if !self.enabled {
            return false;
        }
        let mut allowed = false;
        for (allow, m) in &self.commands {
            let hit = match m {
                Matcher::All => true,
                Matcher::Category(c) => categories.intersects(*c),
                Matcher::Command(c) => c == name,
                Matcher::Subcommand(c, s) => c == name && sub == Some(s.as_str()),
            };
            if hit {
                allowed = *allow;
            }
        }
        allowed
    }

    /// Whether the rules allow this access to `key`: every kind of access it needs must be
    /// granted by some pattern that matches it.
    pub fn allows_key(&self, key: &[u8], access: KeyAccess) -> bool {
        let (read, write) = crate::needs(access);
        let granted = |want_read: bool| {
            self.keys
                .iter()
                .any(|(p, r, w)| (if want_read { *r } else { *w }) && p.matches(key))
        };
        (!read || granted(true)) && (!write || granted(false))
    }

    /// Whether the rules allow every key, for reading and for writing: then what they allow
    /// depends on the command alone.
    pub fn allows_all_keys(&self) -> bool {
        let all = |read: bool| {
            self.keys
                .iter()
                .any(|(p, r, w)| (if read { *r } else { *w }) && p.matches_all())
        };
        all(true) && all(false)
    }

    /// Whether the rules allow every channel (`&*` or `allchannels`).
    pub fn allows_all_channels(&self) -> bool {
        self.channels.iter().any(|p| p == b"*")
    }

    /// Whether the rules allow this channel (`literal`: a `PSUBSCRIBE` pattern, which must
    /// be one of the allowed patterns exactly, as in Redis).
    pub fn allows_channel(&self, channel: &[u8], literal: bool) -> bool {
        self.channels.iter().any(|p| {
            p == b"*"
                || if literal {
                    p == channel
                } else {
                    glob::matches(p, channel)
                }
        })
    }
}

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is the one address).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `addr/bits` or `addr`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, b) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = if b.is_empty() {
            max
        } else {
            b.trim()
                .parse::<u8>()
                .map_err(|_| format!("'{s}': bad prefix length"))?
        };
        if bits > max {
            return Err(format!("'{s}': prefix longer than {max}"));
        }
        Ok(Cidr { net, bits })
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.bits))
                };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.bits))
                };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_matching_command_rule_decides() {
        let r = Rules::parse("+@all -@dangerous +keys -config|set").unwrap_or_default();
        assert!(r.allows_command(
            "get",
            None,
            Category::READ | Category::STRING | Category::FAST
        ));
        assert!(!r.allows_command(
            "flushall",
            None,
            Category::KEYSPACE | Category::WRITE | Category::DANGEROUS
        ));
        assert!(r.allows_command(
            "keys",
            None,
            Category::KEYSPACE | Category::READ | Category::DANGEROUS
        ));
        assert!(!r.allows_command("config", Some("set"), Category::ADMIN | Category::DANGEROUS));
        assert!(
            r.allows_command("unknowncmd", None, Category::empty()),
            "+@all includes commands respire does not know"
        );
        let none = Rules::parse("").unwrap_or_default();
        assert!(!none.allows_command("ping", None, Category::FAST | Category::CONNECTION));
        let off = Rules::parse("+@all off").unwrap_or_default();
        assert!(!off.allows_command("ping", None, Category::FAST | Category::CONNECTION));
    }

    #[test]
    fn key_patterns_grant_read_and_write_separately() {
        let r = Rules::parse("~cache:* %R~logs:* %W~inbox:*").unwrap_or_default();
        assert!(r.allows_key(b"cache:1", KeyAccess::READ | KeyAccess::WRITE));
        assert!(r.allows_key(b"logs:1", KeyAccess::READ));
        assert!(!r.allows_key(b"logs:1", KeyAccess::WRITE));
        assert!(!r.allows_key(b"logs:1", KeyAccess::READ | KeyAccess::WRITE));
        assert!(r.allows_key(b"inbox:1", KeyAccess::WRITE));
        assert!(!r.allows_key(b"inbox:1", KeyAccess::READ));
        assert!(!r.allows_key(b"other", KeyAccess::READ));
        let reset = Rules::parse("allkeys resetkeys ~a").unwrap_or_default();
        assert!(
            reset.allows_key(b"a", KeyAccess::READ) && !reset.allows_key(b"b", KeyAccess::READ)
        );
    }

    #[test]
    fn all_keys_means_every_key_for_reading_and_writing() {
        for (rules, all_keys, all_channels) in [
            ("+@all ~* &*", true, true),
            ("allkeys allchannels", true, true),
            ("%R~* %W~*", true, false),
            ("%R~* %W~app:*", false, false),
            ("~cache:* &news:*", false, false),
            ("~** &*", true, true),
            ("allkeys resetkeys", false, false),
            ("", false, false),
        ] {
            let r = Rules::parse(rules).unwrap_or_default();
            assert_eq!(
                (r.allows_all_keys(), r.allows_all_channels()),
                (all_keys, all_channels),
                "{rules}"
            );
        }
    }

    #[test]
    fn channels_and_literal_patterns() {
        let r = Rules::parse("&events:*").unwrap_or_default();
        assert!(r.allows_channel(b"events:login", false));
        assert!(!r.allows_channel(b"other", false));
        assert!(r.allows_channel(b"events:*", true));
        assert!(
            !r.allows_channel(b"events:l*", true),
            "PSUBSCRIBE patterns must be allowed literally"
        );
    }

    #[test]
    fn bad_rules_are_refused_with_the_token() {
        for bad in ["+@nosuch", ">secret", "%X~a", "bogus", "+"] {
            let e = Rules::parse(bad).err().unwrap_or_default();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn cidr_ranges() {
        let c = Cidr::parse("10.1.0.0/16").unwrap_or(Cidr {
            net: IpAddr::from([0, 0, 0, 0]),
            bits: 32,
        });
        assert!(c.contains("10.1.2.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(!c.contains("10.2.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
        assert!(
            c.contains(
                "::ffff:10.1.9.9"
                    .parse()
                    .unwrap_or(IpAddr::from([0, 0, 0, 0]))
            )
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("0.0.0.0/0").is_ok_and(|c| c.contains(IpAddr::from([8, 8, 8, 8]))));
    }
}
