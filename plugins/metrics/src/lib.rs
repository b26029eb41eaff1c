//! Prometheus metrics about the traffic itself, recorded from every reply: commands by
//! name, key prefix and result, their latency, reply sizes, and errors by code. Served on
//! respire's metrics endpoint as `respire_plugin_metrics_*`.
//!
//! Hot keys (the most used keys, by rate) and big keys (values over a size) are found
//! across all of respire's workers through respire's shared counters, published as gauges
//! (`hot_key_ops_per_second`, `big_key_bytes`) and answered by two commands the plugin
//! implements: `METRICS.HOTKEYS [count]` and `METRICS.BIGKEYS [count]`.
//!
//! ```toml
//! [config]
//! prefix_segments = 1     # the `prefix` label: first N `:`-separated segments of the first key (0: no label)
//! max_prefixes = 100      # distinct prefixes with a label of their own; the rest are `other`
//! hot_keys = 10           # how many hot keys to report (0: off)
//! hot_sample = 16         # count one keyed command in this many (each counts for 16)
//! hot_window = "10s"      # rates are over the last complete window of this length
//! big_keys = 10           # how many big keys to report (0: off)
//! big_key_bytes = 65536   # a value at least this large (a reply, or a written argument) is big
//! ```
//!
//! Labels stay bounded: command names respire does not know are counted as `other`, and
//! respire keeps at most 1000 label combinations per metric; the key gauges hold only the
//! current top keys (others are removed).
//!
//! The per-command metrics are *traffic metrics*: declared once in the manifest and recorded
//! by respire for every reply, without a call into the plugin. The response hook only observes
//! (replies are never held for it) and runs for a sample of replies (hot keys) and for big ones
//! (big keys).
use std::time::Duration;

use respire_sdk::{
    Client, Command, Effects, Manifest, Metric, MetricId, Plugin, Reply, RequestAction,
    ResponseAction, TrafficLabel, TrafficValue, host, reply,
};
use rustc_hash::FxHashMap;
use serde::Deserialize;

const COMMANDS: MetricId = MetricId(0);
const LATENCY: MetricId = MetricId(1);
const REPLY_BYTES: MetricId = MetricId(2);
const ERRORS: MetricId = MetricId(3);
const REQUEST_BYTES: MetricId = MetricId(4);
const PREFIX_LATENCY: MetricId = MetricId(5);
const HOT_KEYS: MetricId = MetricId(6);
const BIG_KEYS: MetricId = MetricId(7);

/// Shared counter prefixes: sampled uses per window, and sizes of big keys.
const HOT: &str = "hot:";
const BIG: &str = "big:";
/// How long a big key is remembered after it was last seen big.
const BIG_TTL_MS: u64 = 600_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    prefix_segments: usize,
    #[serde(default = "hundred")]
    max_prefixes: usize,
    #[serde(default = "ten")]
    hot_keys: u32,
    #[serde(default = "sixteen")]
    hot_sample: u32,
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    hot_window: Duration,
    #[serde(default = "ten")]
    big_keys: u32,
    #[serde(default = "sixty_four_kib")]
    big_key_bytes: u64,
}

fn ten() -> u32 {
    10
}

fn sixteen() -> u32 {
    16
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn sixty_four_kib() -> u64 {
    65536
}

fn hundred() -> usize {
    100
}

fn one() -> usize {
    1
}

/// The plugin's state: only hot and big keys (respire records the per-command metrics).
pub struct Metrics {
    hot: KeyStats,
}

/// Hot- and big-key tracking of one instance (the counts themselves are respire's, shared).
pub struct KeyStats {
    hot_keys: u32,
    sample: u32,
    window_ms: u64,
    big_keys: u32,
    big_bytes: u64,
    /// The window this instance last published for, and the keys it published.
    window: u64,
    published_hot: Vec<String>,
    published_big: Vec<String>,
    /// Sampled uses seen in the batch of replies under way, added to the shared counters
    /// after it: the keys back to back in `keys`, each entry its end there and its weight.
    keys: Vec<u8>,
    uses: Vec<(usize, i64)>,
}

impl KeyStats {
    /// Counts `weight` uses of `key` (in the shared counters after the batch).
    fn count(&mut self, key: &[u8], weight: i64) {
        // A pipeline's replies mostly come in runs of one key.
        let last_start = self
            .uses
            .len()
            .checked_sub(1)
            .map(|i| start_of(&self.uses, i));
        // Keys that differ mostly differ at their end (`user:1041`, `user:1042`): that byte
        // first, before a whole comparison (a byte loop in wasm's `memcmp`).
        if let Some(start) = last_start
            && let Some(last_key) = self.keys.get(start..)
            && last_key.last() == key.last()
            && last_key == key
            && let Some(last) = self.uses.last_mut()
        {
            last.1 += weight;
            return;
        }
        self.keys.extend_from_slice(key);
        self.uses.push((self.keys.len(), weight));
    }

    /// Calls `f` with the batch's uses, once per key (in the order of their first use), and
    /// forgets them. Added up in a hash map: sorting the keys compared them byte by byte
    /// (wasm's `memcmp`), about 2,000 instructions per distinct key of a batch.
    fn drain_uses(&mut self, mut f: impl FnMut(&[u8], i64)) {
        let mut sums: Vec<(&[u8], i64)> = Vec::with_capacity(self.uses.len());
        let mut at: FxHashMap<&[u8], usize> =
            FxHashMap::with_capacity_and_hasher(self.uses.len(), Default::default());
        for (i, &(end, weight)) in self.uses.iter().enumerate() {
            let key = self
                .keys
                .get(start_of(&self.uses, i)..end)
                .unwrap_or_default();
            match at.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    if let Some(s) = sums.get_mut(*e.get()) {
                        s.1 += weight;
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(sums.len());
                    sums.push((key, weight));
                }
            }
        }
        for (key, n) in sums {
            f(key, n);
        }
        self.keys.clear();
        self.uses.clear();
    }

    /// Adds the batch's uses to the shared counters (effects of the call), one addition per
    /// key, then, at a window change, publishes the last window's tops.
    fn flush(&mut self, fx: &mut Effects) {
        if self.uses.is_empty() {
            return;
        }
        let window = host::now_ms() / self.window_ms;
        let mut name = format!("{HOT}{window}:");
        let prefix = name.len();
        let ttl = self.window_ms * 3;
        self.drain_uses(|key, uses| {
            name.truncate(prefix);
            // (`from_utf8` checks a word at a time; the lossy form goes by characters.)
            match std::str::from_utf8(key) {
                Ok(k) => name.push_str(k),
                Err(_) => name.push_str(&String::from_utf8_lossy(key)),
            }
            fx.counter_add(&name, uses, ttl);
        });
        if window != self.window {
            self.window = window;
            self.publish(window, fx);
        }
    }

    /// Hot keys of the last complete window before `window`: (key, operations per second).
    fn hot(&self, window: u64, count: u32) -> Vec<(String, i64)> {
        let prefix = format!("{HOT}{}:", window.saturating_sub(1));
        let secs = self.window_ms as f64 / 1000.0;
        host::counter_top(&prefix, count)
            .into_iter()
            .map(|(k, n)| {
                (
                    k[prefix.len()..].to_string(),
                    (n as f64 / secs).round() as i64,
                )
            })
            .collect()
    }

    /// Big keys: (key, bytes).
    fn big(&self, count: u32) -> Vec<(String, i64)> {
        host::counter_top(BIG, count)
            .into_iter()
            .map(|(k, n)| (k[BIG.len()..].to_string(), n))
            .collect()
    }

    /// Sets the key gauges to the current tops and removes keys that left them.
    fn publish(&mut self, window: u64, fx: &mut Effects) {
        let hot = self.hot(window, self.hot_keys);
        let big = if self.big_keys > 0 {
            self.big(self.big_keys)
        } else {
            Vec::new()
        };
        for (metric, now, before) in [
            (HOT_KEYS, &hot, &mut self.published_hot),
            (BIG_KEYS, &big, &mut self.published_big),
        ] {
            for old in before.iter() {
                if !now.iter().any(|(k, _)| k == old) {
                    fx.record(metric, &[old], f64::NAN);
                }
            }
            for (k, v) in now {
                fx.record(metric, &[k], *v as f64);
            }
            *before = now.iter().map(|(k, _)| k.clone()).collect();
        }
    }

    /// Remembers `key` as big, with its latest size.
    fn note_big(&self, key: &[u8], size: u64) {
        let k = format!("{BIG}{}", String::from_utf8_lossy(key));
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        let was = host::counter_get(&k);
        host::counter_add(&k, size - was, BIG_TTL_MS);
    }
}

/// Where entry `i` of `uses` starts in the keys (where the one before ends).
fn start_of(uses: &[(usize, i64)], i: usize) -> usize {
    match i.checked_sub(1) {
        Some(before) => uses.get(before).map_or(0, |u| u.0),
        None => 0,
    }
}

/// A reply listing keys with a number each: an array of `[key, number]` pairs.
fn key_list(items: &[(String, i64)]) -> Vec<u8> {
    reply::array(
        &items
            .iter()
            .map(|(k, v)| reply::array(&[reply::bulk(k.as_bytes()), reply::int(*v)]))
            .collect::<Vec<_>>(),
    )
}

impl Plugin for Metrics {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        let c: Config = respire_sdk::config(config)?;
        if c.hot_window.as_millis() == 0 || c.hot_sample == 0 {
            return Err("hot_window and hot_sample must be above zero".into());
        }
        let size_buckets = [
            16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
        ];
        let mut commands = Metric::counter(
            "commands_total",
            "Commands answered, by command, key prefix and result (ok, error).",
        );
        commands = if c.prefix_segments > 0 {
            commands.labels(&["command", "prefix", "result"])
        } else {
            commands.labels(&["command", "result"])
        };
        let mut manifest = Manifest::new("metrics", env!("CARGO_PKG_VERSION"))
            .categories(&["all"])
            .without_requests()
            .metric(commands)
            .metric(Metric::histogram("latency_seconds", "Time from respire reading a command to its reply, by command.").labels(&["command"]))
            .metric(Metric::histogram("reply_bytes", "Size of replies, by command.").labels(&["command"]).buckets(&size_buckets))
            .metric(Metric::counter("errors_total", "Error replies, by error code.").labels(&["code"]))
            .metric(Metric::histogram("request_bytes", "Size of commands (name and arguments), by command.").labels(&["command"]).buckets(&size_buckets))
            .metric(Metric::histogram("prefix_latency_seconds", "Time from respire reading a command to its reply, by key prefix.").labels(&["prefix"]))
            .metric(
                Metric::gauge("hot_key_ops_per_second", "The most used keys over the last complete window (estimated from samples), in operations per second.")
                    .labels(&["key"]),
            )
            .metric(Metric::gauge("big_key_bytes", "The largest values seen (replies or written arguments over big_key_bytes), by key.").labels(&["key"]))
            .serves(&["metrics.hotkeys", "metrics.bigkeys"])
            .max_key_prefixes(u32::try_from(c.max_prefixes).unwrap_or(u32::MAX));
        // Recorded by respire for every reply, without a call.
        let segments = u32::try_from(c.prefix_segments).unwrap_or(u32::MAX);
        manifest = if segments > 0 {
            manifest
                .traffic(
                    COMMANDS,
                    TrafficValue::Count,
                    &[
                        TrafficLabel::Command,
                        TrafficLabel::KeyPrefix(segments),
                        TrafficLabel::Result,
                    ],
                )
                .traffic(
                    PREFIX_LATENCY,
                    TrafficValue::Latency,
                    &[TrafficLabel::KeyPrefix(segments)],
                )
        } else {
            manifest.traffic(
                COMMANDS,
                TrafficValue::Count,
                &[TrafficLabel::Command, TrafficLabel::Result],
            )
        };
        manifest = manifest
            .traffic(LATENCY, TrafficValue::Latency, &[TrafficLabel::Command])
            .traffic(
                REPLY_BYTES,
                TrafficValue::ReplyBytes,
                &[TrafficLabel::Command],
            )
            .traffic(
                REQUEST_BYTES,
                TrafficValue::RequestBytes,
                &[TrafficLabel::Command],
            )
            .traffic(ERRORS, TrafficValue::Count, &[TrafficLabel::ErrorCode]);
        // The hook sees a sample of replies (hot keys) and the big ones (big keys), only to look.
        if c.hot_keys > 0 || c.big_keys > 0 {
            let sample = if c.hot_keys > 0 { c.hot_sample } else { 0 };
            let min_bytes = if c.big_keys > 0 {
                c.big_key_bytes.max(1)
            } else {
                0
            };
            manifest = manifest
                .observing_responses()
                .response_filter(sample, min_bytes, false);
        }
        let hot = KeyStats {
            hot_keys: c.hot_keys,
            sample: c.hot_sample,
            window_ms: u64::try_from(c.hot_window.as_millis()).unwrap_or(u64::MAX),
            big_keys: c.big_keys,
            big_bytes: c.big_key_bytes.max(1),
            window: 0,
            published_hot: Vec::new(),
            published_big: Vec::new(),
            keys: Vec::new(),
            uses: Vec::new(),
        };
        Ok((Metrics { hot }, manifest))
    }

    fn on_request(&mut self, _client: &Client, cmd: &Command, _fx: &mut Effects) -> RequestAction {
        let count = match cmd.arg(0) {
            None => 10,
            Some(n) => match std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse::<u32>().ok())
            {
                Some(n) if cmd.len() == 1 => n.min(1000),
                _ if cmd.len() > 1 => {
                    return RequestAction::Deny(format!(
                        "ERR wrong number of arguments for '{}' command",
                        cmd.name
                    ));
                }
                _ => {
                    return RequestAction::Deny(
                        "ERR value is not an integer or out of range".into(),
                    );
                }
            },
        };
        let items = match cmd.name {
            "metrics.hotkeys" => self.hot.hot(host::now_ms() / self.hot.window_ms, count),
            _ => self.hot.big(count),
        };
        RequestAction::Respond(key_list(&items))
    }

    fn on_response(
        &mut self,
        _client: &Client,
        cmd: &Command,
        reply: &Reply,
        _fx: &mut Effects,
    ) -> ResponseAction {
        let Some((key, access)) = cmd.keys().next() else {
            return ResponseAction::Continue;
        };
        // respire passes every reply (or command) of at least big_key_bytes, and one in
        // hot_sample of the others: a big one counts once, a sampled one for the sample.
        let big = self.hot.big_keys > 0
            && (reply.raw().len() as u64 >= self.hot.big_bytes
                || cmd.size() as u64 >= self.hot.big_bytes);
        if self.hot.hot_keys > 0 {
            self.hot
                .count(key, if big { 1 } else { i64::from(self.hot.sample) });
        }
        if big && !reply.is_error() {
            // A read's reply, or what a write sends (its arguments), tells the value's size.
            let size = if access.contains(respire_sdk::KeyAccess::WRITE) {
                cmd.size().saturating_sub(cmd.name.len() + key.len())
            } else {
                reply.raw().len()
            };
            if size as u64 >= self.hot.big_bytes {
                self.hot.note_big(key, size as u64);
            }
        }
        ResponseAction::Continue
    }

    fn after_responses(&mut self, fx: &mut Effects) {
        self.hot.flush(fx);
    }
}

#[cfg(target_arch = "wasm32")]
respire_sdk::export_plugin!(Metrics);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_uses_adds_up_per_key() {
        let mut k = KeyStats {
            hot_keys: 10,
            sample: 16,
            window_ms: 10_000,
            big_keys: 0,
            big_bytes: 1,
            window: 0,
            published_hot: Vec::new(),
            published_big: Vec::new(),
            keys: Vec::new(),
            uses: Vec::new(),
        };
        for (key, weight) in [
            ("a", 16),
            ("a", 16),
            ("b", 1),
            ("a", 16),
            ("ab", 16),
            ("", 2),
        ] {
            k.count(key.as_bytes(), weight);
        }
        let drained = |k: &mut KeyStats| {
            let mut out = Vec::new();
            k.drain_uses(|key, n| out.push((String::from_utf8_lossy(key).into_owned(), n)));
            out
        };
        assert_eq!(
            drained(&mut k),
            vec![
                ("a".to_string(), 48),
                ("b".to_string(), 1),
                ("ab".to_string(), 16),
                (String::new(), 2)
            ]
        );
        assert!(drained(&mut k).is_empty(), "a batch is counted once");
        k.count(b"c", 3);
        assert_eq!(drained(&mut k), vec![("c".to_string(), 3)]);
    }
}
