//! Token-bucket rate limits in front of Redis. Each rule is a bucket per client address,
//! user, command, category or key prefix (or a combination); the buckets live in respire,
//! so a limit holds across all of respire's worker threads and across reloads of the
//! plugin. The first rule whose bucket is empty refuses the command with
//! `-ERR rate limit '<rule>' exceeded, retry in <n> ms`.
//!
//! ```toml
//! [[config.rules]]
//! name = "per-client"
//! rate = 1000          # tokens per second
//! burst = 2000         # bucket size (default: rate)
//! by = ["client"]      # client, user, command, category, prefix (combine several)
//!
//! [[config.rules]]
//! name = "writes-per-tenant"
//! rate = 200
//! categories = ["write"]
//! by = ["prefix"]
//! prefix_segments = 2  # "tenant:42:orders" → "tenant:42"
//!
//! [[config.rules]]
//! name = "api-quota"
//! rate = 5000
//! by = ["user"]
//! shared = true        # buckets in the backend Redis: one quota for every respire in front of it
//! ```
//!
//! A `shared` rule keeps its buckets in Redis (a GCRA script on Redis's clock, one key per
//! bucket, `{respire:ratelimit:<plugin>:<rule>:<bucket>}`), so several respire processes
//! behind a load balancer enforce one quota together. It costs one round trip to Redis per
//! command it applies to; if Redis cannot answer, the command is let through.
use respire_sdk::{Category, Client, Command, Effects, LimiterId, Manifest, Plugin, RequestAction};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<RuleConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    name: String,
    rate: f64,
    burst: Option<u32>,
    #[serde(default)]
    by: Vec<By>,
    #[serde(default)]
    commands: Vec<String>,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default = "one")]
    prefix_segments: usize,
    #[serde(default = "one_u32")]
    cost: u32,
    #[serde(default)]
    shared: bool,
}

fn one() -> usize {
    1
}

fn one_u32() -> u32 {
    1
}

/// What a rule keeps one bucket per.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// The client's IP address.
    Client,
    /// The authenticated user.
    User,
    /// The command name.
    Command,
    /// The first of the rule's categories the command is in.
    Category,
    /// The first `prefix_segments` `:`-separated segments of the command's first key.
    Prefix,
}

/// One compiled rule.
pub struct Rule {
    by: Vec<By>,
    commands: Vec<String>,
    categories: Vec<(String, Category)>,
    prefix_segments: usize,
    cost: u32,
}

/// The client's address without the port.
fn ip(addr: &str) -> &str {
    // A byte loop: addresses are short, and `rsplit_once` costs a general `memrchr` call.
    match addr.bytes().rposition(|b| b == b':') {
        Some(i) if addr.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => {
            addr[..i].trim_start_matches('[').trim_end_matches(']')
        }
        _ => addr,
    }
}

impl Rule {
    /// Whether the rule applies to this command (by its name and categories), with the first
    /// of the rule's categories it is in (`None` inside when the rule names none).
    fn applies(&self, cmd: &Command) -> Option<Option<&str>> {
        if !self.commands.is_empty() && !self.commands.iter().any(|c| c == cmd.name) {
            return None;
        }
        let matched = self
            .categories
            .iter()
            .find(|(_, c)| cmd.categories.intersects(*c))
            .map(|(n, _)| n.as_str());
        if !self.categories.is_empty() && matched.is_none() {
            return None;
        }
        Some(matched)
    }

    /// The bucket this command takes from, or `None` when the rule does not apply to it.
    pub fn bucket(&self, client: &Client, cmd: &Command) -> Option<String> {
        self.key(client, cmd, self.applies(cmd)?)
    }

    /// The bucket of a command the rule applies to (`matched`: its category, see `applies`).
    fn key(&self, client: &Client, cmd: &Command, matched: Option<&str>) -> Option<String> {
        // Sized once: most keys are an address, a user or a prefix (growing costs a reallocation).
        let mut key = String::with_capacity(48);
        for (i, by) in self.by.iter().enumerate() {
            if i > 0 {
                key.push('|');
            }
            match by {
                By::Client => key.push_str(ip(&client.addr)),
                By::User => key.push_str(&client.user),
                By::Command => key.push_str(cmd.name),
                By::Category => key.push_str(matched.unwrap_or("other")),
                By::Prefix => {
                    // Keyless commands are not limited by a prefix rule.
                    let (k, _) = cmd.keys().next()?;
                    let k = String::from_utf8_lossy(k);
                    let end = k
                        .match_indices(':')
                        .nth(self.prefix_segments.saturating_sub(1))
                        .map_or(k.len(), |(i, _)| i);
                    key.push_str(&k[..end]);
                }
            }
        }
        Some(key)
    }
}

/// The plugin's state: its rules, in order (rule i is limiter i).
pub struct RateLimit {
    rules: Vec<Rule>,
}

impl RateLimit {
    /// Compiles the configuration: the rules and the manifest that declares their buckets.
    pub fn from_config(text: &str) -> Result<(RateLimit, Manifest), String> {
        let c: Config = respire_sdk::config(text)?;
        let mut manifest =
            Manifest::new("rate-limit", env!("CARGO_PKG_VERSION")).categories(&["all"]);
        let mut rules = Vec::new();
        for r in c.rules {
            if !(r.rate.is_finite() && r.rate > 0.0) {
                return Err(format!(
                    "rule {:?}: rate must be a positive number of commands per second",
                    r.name
                ));
            }
            let burst = r.burst.unwrap_or(r.rate.ceil() as u32).max(1);
            if r.cost > burst {
                return Err(format!(
                    "rule {:?}: cost {} is above the burst {burst}: no command could pass",
                    r.name, r.cost
                ));
            }
            let mut categories = Vec::new();
            for name in &r.categories {
                let cat = respire_sdk::category(name)
                    .ok_or_else(|| format!("rule {:?}: unknown category {name:?}", r.name))?;
                categories.push((name.trim_start_matches('@').to_ascii_lowercase(), cat));
            }
            if r.prefix_segments == 0 {
                return Err(format!(
                    "rule {:?}: prefix_segments must be at least 1",
                    r.name
                ));
            }
            manifest = if r.shared {
                manifest.shared_limiter(&r.name, r.rate, burst)
            } else {
                manifest.limiter(&r.name, r.rate, burst)
            };
            rules.push(Rule {
                by: r.by,
                commands: r.commands.iter().map(|c| c.to_ascii_lowercase()).collect(),
                categories,
                prefix_segments: r.prefix_segments,
                cost: r.cost,
            });
        }
        Ok((RateLimit { rules }, manifest))
    }
}

impl Plugin for RateLimit {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        RateLimit::from_config(config)
    }

    fn on_request(&mut self, client: &Client, cmd: &Command, fx: &mut Effects) -> RequestAction {
        // Buckets by client, user, command or category are the same for every command of this
        // client with this name: respire may take them again without asking. A prefix is a key's.
        let mut repeatable = true;
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(matched) = rule.applies(cmd) else {
                continue;
            };
            if rule.by.contains(&By::Prefix) {
                repeatable = false;
            }
            if let Some(bucket) = rule.key(client, cmd, matched) {
                fx.take(LimiterId(i as u32), bucket, rule.cost);
            }
        }
        if repeatable {
            fx.repeatable();
        }
        RequestAction::Continue
    }
}

#[cfg(target_arch = "wasm32")]
respire_sdk::export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_lose_their_port() {
        assert_eq!(ip("10.0.0.7:51234"), "10.0.0.7");
        assert_eq!(ip("[::1]:6379"), "::1");
        assert_eq!(ip("unix"), "unix");
    }

    #[test]
    fn bad_rules_are_refused() {
        for (bad, says) in [
            ("[[rules]]\nname = \"r\"\nrate = 0\n", "rate must be"),
            (
                "[[rules]]\nname = \"r\"\nrate = 10\nburst = 2\ncost = 3\n",
                "above the burst",
            ),
            (
                "[[rules]]\nname = \"r\"\nrate = 10\ncategories = [\"nosuch\"]\n",
                "unknown category",
            ),
            (
                "[[rules]]\nname = \"r\"\nrate = 10\nby = [\"planet\"]\n",
                "planet",
            ),
        ] {
            let e = RateLimit::from_config(bad).err().unwrap_or_default();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
