//! Caching policy: which reads respire answers from its response cache, and for how long.
//!
//! Rules pair a key pattern (Redis glob) with read commands and a time to live; the first
//! rule that matches a command (its name, and every key it reads) decides. respire does the
//! caching: hits are served without Redis, a write through respire or directly on Redis to
//! a cached key drops it at once (`CLIENT TRACKING`), concurrent misses make one request,
//! and memory stays under `max_memory`.
//!
//! ```toml
//! [config]
//! max_memory = "64MiB"
//!
//! [[config.rules]]
//! keys = "user:*:profile"
//! commands = ["get", "hgetall"]   # default: the common reads (GET, MGET, HGET, SMEMBERS, ZRANGE …)
//! ttl = "30s"
//! empty_ttl = "5s"                # also keep "not found" (nil, empty) replies; default: no
//!
//! [[config.rules]]
//! keys = "session:*"
//! ttl = "0s"                      # 0: never cached (an exception before a broader rule)
//! ```
use std::time::Duration;

use respire_sdk::{CacheFor, Client, Command, Effects, Manifest, Plugin, RequestAction, glob};
use rustc_hash::FxHashMap as HashMap;
use serde::Deserialize;

/// Reads cached when a rule names no commands: common reads whose reply depends only on
/// their keys and arguments.
pub const DEFAULT_COMMANDS: &[&str] = &[
    "get",
    "mget",
    "getrange",
    "strlen",
    "exists",
    "type",
    "hget",
    "hmget",
    "hgetall",
    "hkeys",
    "hvals",
    "hlen",
    "hexists",
    "hstrlen",
    "smembers",
    "sismember",
    "smismember",
    "scard",
    "zrange",
    "zrangebyscore",
    "zrevrange",
    "zrevrangebyscore",
    "zscore",
    "zmscore",
    "zcard",
    "zcount",
    "zrank",
    "zrevrank",
    "lrange",
    "llen",
    "lindex",
    "pfcount",
    "getbit",
    "bitcount",
    "xlen",
    "xrange",
    "xrevrange",
    "geopos",
    "geodist",
    "geosearch",
    "json.get",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_memory")]
    max_memory: bytesize::ByteSize,
    #[serde(default)]
    rules: Vec<RuleConfig>,
}

fn default_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(64)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    keys: String,
    #[serde(default)]
    commands: Vec<String>,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
    #[serde(default, with = "humantime_serde")]
    empty_ttl: Duration,
}

/// One rule.
pub struct Rule {
    pattern: glob::Pattern,
    how: CacheFor,
}

impl Rule {
    /// Whether every key of this command matches the rule's pattern (and it has keys).
    fn matches(&self, cmd: &Command) -> bool {
        let mut any = false;
        for (key, _) in cmd.keys() {
            if !self.pattern.matches(key) {
                return false;
            }
            any = true;
        }
        any
    }
}

/// The plugin: its rules in order.
pub struct CachePolicy {
    rules: Vec<Rule>,
    /// For each command name, the rules that name it, in order.
    by_command: HashMap<String, Vec<usize>>,
}

impl CachePolicy {
    /// Reads the settings: the plugin and its manifest.
    pub fn from_config(text: &str) -> Result<(CachePolicy, Manifest), String> {
        let config: Config = respire_sdk::config(text)?;
        let mut rules = Vec::new();
        let mut by_command: HashMap<String, Vec<usize>> = HashMap::default();
        let mut commands: Vec<String> = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        for (i, r) in config.rules.iter().enumerate() {
            if r.keys.is_empty() {
                return Err(format!(
                    "rules[{i}]: keys must be a pattern (\"*\" for every key)"
                ));
            }
            let names: Vec<String> = if r.commands.is_empty() {
                DEFAULT_COMMANDS.iter().map(|c| c.to_string()).collect()
            } else {
                r.commands.iter().map(|c| c.to_ascii_lowercase()).collect()
            };
            for n in &names {
                if !commands.contains(n) {
                    commands.push(n.clone());
                }
                by_command.entry(n.clone()).or_default().push(rules.len());
            }
            let pattern = glob::Pattern::new(r.keys.as_bytes());
            if !r.ttl.is_zero() {
                // Cut before an ASCII pattern character of a `String`: still UTF-8, nothing lost.
                prefixes.push(String::from_utf8_lossy(pattern.literal_prefix()).into_owned());
            }
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            rules.push(Rule {
                pattern,
                how: CacheFor {
                    ttl_ms: ms(r.ttl),
                    empty_ttl_ms: ms(r.empty_ttl),
                },
            });
        }
        let prefix_refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let command_refs: Vec<&str> = commands.iter().map(String::as_str).collect();
        let mut manifest =
            Manifest::new("cache-policy", env!("CARGO_PKG_VERSION")).commands(&command_refs);
        if !prefixes.is_empty() {
            manifest = manifest.cache(&prefix_refs, config.max_memory.as_u64());
        }
        // A rule matches only commands whose every key matches its pattern, so only commands
        // with a key under a caching rule's literal start can be cached: respire need not pass
        // the others, and none at all without a caching rule. (A pattern that starts with a
        // pattern character has an empty start, which passes everything.)
        manifest = if prefixes.is_empty() {
            manifest.without_requests()
        } else {
            manifest.key_prefixes(&prefix_refs)
        };
        Ok((CachePolicy { rules, by_command }, manifest))
    }

    /// The caching decision for a command.
    pub fn decide(&self, cmd: &Command) -> RequestAction {
        let Some(candidates) = self.by_command.get(cmd.name) else {
            return RequestAction::Continue;
        };
        match candidates
            .iter()
            .filter_map(|&i| self.rules.get(i))
            .find(|r| r.matches(cmd))
        {
            Some(r) if r.how.ttl_ms > 0 => RequestAction::Cache(r.how),
            _ => RequestAction::Continue,
        }
    }
}

impl Plugin for CachePolicy {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        CachePolicy::from_config(config)
    }

    fn on_request(&mut self, _client: &Client, cmd: &Command, _fx: &mut Effects) -> RequestAction {
        self.decide(cmd)
    }
}

respire_sdk::export_plugin!(CachePolicy);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn settings_give_the_manifest_commands_and_prefixes() {
        let text = r#"
max_memory = "1MiB"
[[rules]]
keys = "session:*"
ttl = "0s"
[[rules]]
keys = "user:*"
commands = ["GET", "hgetall"]
ttl = "30s"
empty_ttl = "1s"
"#;
        let (p, m) = CachePolicy::from_config(text).unwrap();
        let cache = m.cache.unwrap();
        assert_eq!(
            cache.prefixes,
            vec!["user:".to_string()],
            "a 0s rule caches nothing, so it needs no tracking"
        );
        assert_eq!(
            m.key_prefixes,
            vec!["user:".to_string()],
            "only commands with a key under a caching rule are passed"
        );
        assert_eq!(cache.max_memory, 1 << 20);
        assert!(
            m.commands.contains(&"get".to_string()) && m.commands.contains(&"hgetall".to_string())
        );
        assert_eq!(
            (p.rules[1].how.ttl_ms, p.rules[1].how.empty_ttl_ms),
            (30_000, 1000)
        );
        let (_, every) =
            CachePolicy::from_config("[[rules]]\nkeys = \"*:profile\"\nttl = \"1s\"\n").unwrap();
        assert_eq!(
            every.key_prefixes,
            vec![String::new()],
            "a pattern with no literal start passes every command"
        );
        let (_, none) =
            CachePolicy::from_config("[[rules]]\nkeys = \"s:*\"\nttl = \"0s\"\n").unwrap();
        assert!(
            !none.on_request,
            "without a caching rule there is nothing to decide"
        );
        assert!(
            CachePolicy::from_config("[[rules]]\nkeys = \"x\"\n").is_err(),
            "ttl is required"
        );
        assert!(CachePolicy::from_config("bogus = 1").is_err());
    }
}
