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
use std::collections::HashSet;
use std::time::Duration;

use respire_sdk::{Client, Command, Effects, Manifest, Metric, MetricId, Plugin, Reply, RequestAction, ResponseAction, Series, host, reply};
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

/// The plugin's state.
pub struct Metrics {
    prefix_segments: usize,
    max_prefixes: usize,
    /// Prefixes given a label of their own so far (by this instance); later ones are `other`.
    prefixes: HashSet<String>,
    hot: KeyStats,
    /// Series by command name, then key prefix.
    series: FxHashMap<String, NameSeries>,
    /// The last reply's command name and key prefix with their series: a batch is mostly runs
    /// of one command on one prefix, found again without hashing either.
    last: Option<Last>,
}

struct Last {
    name: String,
    prefix: Option<Vec<u8>>,
    command: [Option<Series>; 3],
    by_prefix: PrefixSeries,
}

/// Hot- and big-key tracking of one instance (the counts themselves are respire's, shared).
pub struct KeyStats {
    hot_keys: u32,
    sample: u32,
    window_ms: u64,
    big_keys: u32,
    big_bytes: u64,
    /// xorshift state for sampling.
    rng: u64,
    /// The window this instance last published for, and the keys it published.
    window: u64,
    published_hot: Vec<String>,
    published_big: Vec<String>,
}

impl KeyStats {
    fn sampled(&mut self) -> bool {
        if self.hot_keys == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng.is_multiple_of(u64::from(self.sample.max(1)))
    }

    /// Counts a sampled use of `key`; at a window change, publishes the last window's tops.
    fn count(&mut self, key: &[u8], fx: &mut Effects) {
        let window = host::now_ms() / self.window_ms;
        host::counter_add(&format!("{HOT}{window}:{}", String::from_utf8_lossy(key)), i64::from(self.sample.max(1)), self.window_ms * 3);
        if window != self.window {
            self.window = window;
            self.publish(window, fx);
        }
    }

    /// Hot keys of the last complete window before `window`: (key, operations per second).
    fn hot(&self, window: u64, count: u32) -> Vec<(String, i64)> {
        let prefix = format!("{HOT}{}:", window.saturating_sub(1));
        let secs = self.window_ms as f64 / 1000.0;
        host::counter_top(&prefix, count).into_iter().map(|(k, n)| (k[prefix.len()..].to_string(), (n as f64 / secs).round() as i64)).collect()
    }

    /// Big keys: (key, bytes).
    fn big(&self, count: u32) -> Vec<(String, i64)> {
        host::counter_top(BIG, count).into_iter().map(|(k, n)| (k[BIG.len()..].to_string(), n)).collect()
    }

    /// Sets the key gauges to the current tops and removes keys that left them.
    fn publish(&mut self, window: u64, fx: &mut Effects) {
        let hot = self.hot(window, self.hot_keys);
        let big = if self.big_keys > 0 { self.big(self.big_keys) } else { Vec::new() };
        for (metric, now, before) in [(HOT_KEYS, &hot, &mut self.published_hot), (BIG_KEYS, &big, &mut self.published_big)] {
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

/// A reply listing keys with a number each: an array of `[key, number]` pairs.
fn key_list(items: &[(String, i64)]) -> Vec<u8> {
    reply::array(&items.iter().map(|(k, v)| reply::array(&[reply::bulk(k.as_bytes()), reply::int(*v)])).collect::<Vec<_>>())
}

/// The series a reply to one command name updates, found once per name: matching labels for
/// every reply was most of the plugin's cost.
struct NameSeries {
    latency: Option<Series>,
    request_bytes: Option<Series>,
    reply_bytes: Option<Series>,
    /// Commands without a key, and every command with `prefix_segments = 0`.
    keyless: PrefixSeries,
    /// By key prefix as taken from the first key (before the cap turns it into `other`), as
    /// raw bytes: looking up needs no UTF-8 check.
    by_prefix: FxHashMap<Vec<u8>, PrefixSeries>,
}

/// The series of one command name and key prefix.
#[derive(Clone, Copy)]
struct PrefixSeries {
    ok: Option<Series>,
    error: Option<Series>,
    /// `prefix_latency_seconds` (none for keyless commands and with `prefix_segments = 0`).
    latency: Option<Series>,
}

/// Most key prefixes remembered per command name (the labels themselves are capped by
/// `max_prefixes`; this bounds the raw prefixes that map to `other`).
const MAX_REMEMBERED_PREFIXES: usize = 4096;

/// The series found before for command `name` with key prefix `prefix` (see [`Metrics::learn`]).
fn known<'a>(all: &'a FxHashMap<String, NameSeries>, name: &str, prefix: Option<&[u8]>) -> Option<(&'a NameSeries, &'a PrefixSeries)> {
    let ns = all.get(name)?;
    let ps = match prefix {
        None => &ns.keyless,
        Some(p) => ns.by_prefix.get(p)?,
    };
    Some((ns, ps))
}

/// Records one reply's metrics on series found before (`command`: the name's latency, request
/// and reply size series).
fn emit(fx: &mut Effects, command: [Option<Series>; 3], ps: &PrefixSeries, error: bool, seconds: f64, request_bytes: usize, reply_bytes: usize) {
    let [latency, request_size, reply_size] = command;
    let updates = [
        (if error { ps.error } else { ps.ok }, 1.0),
        (ps.latency, seconds),
        (latency, seconds),
        (request_size, request_bytes as f64),
        (reply_size, reply_bytes as f64),
    ];
    for (series, value) in updates {
        if let Some(s) = series {
            fx.update(s, value);
        }
    }
}

impl Metrics {
    /// The series of command `name` with label `label` (`None`: no prefix label).
    fn prefix_series(&self, name: &str, label: Option<&str>) -> PrefixSeries {
        match label {
            None => PrefixSeries { ok: COMMANDS.series(&[name, "ok"]), error: COMMANDS.series(&[name, "error"]), latency: None },
            Some(l) => PrefixSeries {
                ok: COMMANDS.series(&[name, l, "ok"]),
                error: COMMANDS.series(&[name, l, "error"]),
                latency: if l.is_empty() { None } else { PREFIX_LATENCY.series(&[l]) },
            },
        }
    }

    /// Finds the series of command `name` with key prefix `raw` (as taken from its first key;
    /// `None` for a keyless command or without prefix labels).
    fn learn(&mut self, name: &str, raw: Option<&[u8]>) {
        if !self.series.contains_key(name) {
            let keyless = self.prefix_series(name, (self.prefix_segments > 0).then_some(""));
            let ns = NameSeries {
                latency: LATENCY.series(&[name]),
                request_bytes: REQUEST_BYTES.series(&[name]),
                reply_bytes: REPLY_BYTES.series(&[name]),
                keyless,
                by_prefix: FxHashMap::default(),
            };
            self.series.insert(name.to_string(), ns);
        }
        let Some(raw) = raw else { return };
        let text = String::from_utf8_lossy(raw);
        let label = self.prefix_label(&text);
        let ps = self.prefix_series(name, Some(label));
        if let Some(ns) = self.series.get_mut(name) {
            if ns.by_prefix.len() >= MAX_REMEMBERED_PREFIXES {
                ns.by_prefix.clear();
            }
            ns.by_prefix.insert(raw.to_vec(), ps);
        }
    }

    /// The `prefix` label of a key prefix: itself, or `other` past the cap.
    fn prefix_label<'k>(&mut self, p: &'k str) -> &'k str {
        if self.prefixes.contains(p) {
            return p;
        }
        if self.prefixes.len() < self.max_prefixes {
            self.prefixes.insert(p.to_string());
            return p;
        }
        "other"
    }
}

/// The first `n` `:`-separated segments of `key`.
fn prefix_of(key: &[u8], n: usize) -> &[u8] {
    let end = key.iter().enumerate().filter(|(_, b)| **b == b':').nth(n.saturating_sub(1)).map_or(key.len(), |(i, _)| i);
    &key[..end]
}

/// The first `n` `:`-separated segments of `key` (lossy UTF-8).
pub fn prefix(key: &[u8], n: usize) -> String {
    String::from_utf8_lossy(prefix_of(key, n)).into_owned()
}

/// The error code of an error reply (`WRONGTYPE`, `NOPERM`, `ERR` …).
pub fn error_code(reply: &[u8]) -> Option<String> {
    let text = match reply.first()? {
        b'-' => reply.get(1..)?,
        b'!' => {
            let start = reply.windows(2).position(|w| w == b"\r\n")? + 2;
            reply.get(start..)?
        }
        _ => return None,
    };
    let end = text.iter().position(|b| *b == b' ' || *b == b'\r').unwrap_or(text.len());
    Some(String::from_utf8_lossy(&text[..end]).into_owned())
}

impl Plugin for Metrics {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        let c: Config = respire_sdk::config(config)?;
        let mut commands = Metric::counter("commands_total", "Commands answered, by command, key prefix and result (ok, error).");
        commands = if c.prefix_segments > 0 { commands.labels(&["command", "prefix", "result"]) } else { commands.labels(&["command", "result"]) };
        let manifest = Manifest::new("metrics", env!("CARGO_PKG_VERSION"))
            .categories(&["all"])
            .without_requests()
            .with_responses()
            .metric(commands)
            .metric(Metric::histogram("latency_seconds", "Time from respire reading a command to its reply, by command.").labels(&["command"]))
            .metric(
                Metric::histogram("reply_bytes", "Size of replies, by command.")
                    .labels(&["command"])
                    .buckets(&[16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0]),
            )
            .metric(Metric::counter("errors_total", "Error replies, by error code.").labels(&["code"]))
            .metric(
                Metric::histogram("request_bytes", "Size of commands (name and arguments), by command.")
                    .labels(&["command"])
                    .buckets(&[16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0]),
            )
            .metric(Metric::histogram("prefix_latency_seconds", "Time from respire reading a command to its reply, by key prefix.").labels(&["prefix"]));
        let manifest = manifest
            .metric(Metric::gauge("hot_key_ops_per_second", "The most used keys over the last complete window (estimated from samples), in operations per second.").labels(&["key"]))
            .metric(Metric::gauge("big_key_bytes", "The largest values seen (replies or written arguments over big_key_bytes), by key.").labels(&["key"]))
            .serves(&["metrics.hotkeys", "metrics.bigkeys"]);
        if c.hot_window.as_millis() == 0 || c.hot_sample == 0 {
            return Err("hot_window and hot_sample must be above zero".into());
        }
        let hot = KeyStats {
            hot_keys: c.hot_keys,
            sample: c.hot_sample,
            window_ms: u64::try_from(c.hot_window.as_millis()).unwrap_or(u64::MAX),
            big_keys: c.big_keys,
            big_bytes: c.big_key_bytes.max(1),
            rng: host::now_ms() | 1,
            window: 0,
            published_hot: Vec::new(),
            published_big: Vec::new(),
        };
        Ok((Metrics { prefix_segments: c.prefix_segments, max_prefixes: c.max_prefixes, prefixes: Default::default(), hot, series: FxHashMap::default(), last: None }, manifest))
    }

    fn on_request(&mut self, _client: &Client, cmd: &Command, _fx: &mut Effects) -> RequestAction {
        let count = match cmd.arg(0) {
            None => 10,
            Some(n) => match std::str::from_utf8(n).ok().and_then(|n| n.parse::<u32>().ok()) {
                Some(n) if cmd.len() == 1 => n.min(1000),
                _ if cmd.len() > 1 => return RequestAction::Deny(format!("ERR wrong number of arguments for '{}' command", cmd.name)),
                _ => return RequestAction::Deny("ERR value is not an integer or out of range".into()),
            },
        };
        let items = match cmd.name {
            "metrics.hotkeys" => self.hot.hot(host::now_ms() / self.hot.window_ms, count),
            _ => self.hot.big(count),
        };
        RequestAction::Respond(key_list(&items))
    }

    fn on_response(&mut self, _client: &Client, cmd: &Command, reply: &Reply, fx: &mut Effects) -> ResponseAction {
        let name = if cmd.categories.is_empty() { "other" } else { cmd.name };
        let code = error_code(reply.raw());
        let error = code.is_some();
        let seconds = reply.elapsed_us() as f64 / 1e6;
        let raw_prefix = match (self.prefix_segments, cmd.keys().next()) {
            (0, _) | (_, None) => None,
            (n, Some((k, _))) => Some(prefix_of(k, n)),
        };
        let found = match &self.last {
            Some(l) if l.name == name && l.prefix.as_deref() == raw_prefix => Some((l.command, l.by_prefix)),
            _ => {
                if known(&self.series, name, raw_prefix).is_none() {
                    self.learn(name, raw_prefix);
                }
                let found = known(&self.series, name, raw_prefix).map(|(ns, ps)| ([ns.latency, ns.request_bytes, ns.reply_bytes], *ps));
                if let Some((command, by_prefix)) = found {
                    let l = self.last.get_or_insert_with(|| Last { name: String::new(), prefix: None, command, by_prefix });
                    l.name.clear();
                    l.name.push_str(name);
                    match (&mut l.prefix, raw_prefix) {
                        (Some(p), Some(raw)) => {
                            p.clear();
                            p.extend_from_slice(raw);
                        }
                        (p, raw) => *p = raw.map(<[u8]>::to_vec),
                    }
                    (l.command, l.by_prefix) = (command, by_prefix);
                }
                found
            }
        };
        if let Some((command, by_prefix)) = found {
            emit(fx, command, &by_prefix, error, seconds, cmd.size(), reply.raw().len());
        }
        if let Some(code) = &code {
            fx.inc(ERRORS, &[code]);
        }
        if let Some((key, access)) = cmd.keys().next() {
            if self.hot.sampled() {
                self.hot.count(key, fx);
            }
            if self.hot.big_keys > 0 {
                // A read's reply, or what a write sends (its arguments), tells the value's size.
                let size = if access.contains(respire_sdk::KeyAccess::WRITE) { cmd.size().saturating_sub(cmd.name.len() + key.len()) } else { reply.raw().len() };
                if size as u64 >= self.hot.big_bytes && code.is_none() {
                    self.hot.note_big(key, size as u64);
                }
            }
        }
        ResponseAction::Continue
    }
}

#[cfg(target_arch = "wasm32")]
respire_sdk::export_plugin!(Metrics);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_error_codes() {
        assert_eq!(prefix(b"svc:user:42", 1), "svc");
        assert_eq!(prefix(b"svc:user:42", 2), "svc:user");
        assert_eq!(prefix(b"plain", 2), "plain");
        assert_eq!(error_code(b"-WRONGTYPE Operation against a key\r\n").as_deref(), Some("WRONGTYPE"));
        assert_eq!(error_code(b"-ERR\r\n").as_deref(), Some("ERR"));
        assert_eq!(error_code(b"!21\r\nSYNTAX invalid syntax\r\n").as_deref(), Some("SYNTAX"));
        assert_eq!(error_code(b"+OK\r\n"), None);
    }
}
