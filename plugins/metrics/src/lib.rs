//! Prometheus metrics about the traffic itself, recorded from every reply: commands by
//! name, key prefix and result, their latency, reply sizes, and errors by code. Served on
//! respire's metrics endpoint as `respire_plugin_metrics_*`.
//!
//! ```toml
//! [config]
//! prefix_segments = 1     # the `prefix` label: first N `:`-separated segments of the first key (0: no label)
//! max_prefixes = 100      # distinct prefixes with a label of their own; the rest are `other`
//! ```
//!
//! Labels stay bounded: command names respire does not know are counted as `other`, and
//! respire keeps at most 1000 label combinations per metric.
use respire_sdk::{Client, Command, Effects, Manifest, Metric, MetricId, Plugin, Reply, ResponseAction};
use serde::Deserialize;

const COMMANDS: MetricId = MetricId(0);
const LATENCY: MetricId = MetricId(1);
const REPLY_BYTES: MetricId = MetricId(2);
const ERRORS: MetricId = MetricId(3);
const REQUEST_BYTES: MetricId = MetricId(4);
const PREFIX_LATENCY: MetricId = MetricId(5);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    prefix_segments: usize,
    #[serde(default = "hundred")]
    max_prefixes: usize,
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
    prefixes: std::collections::HashSet<String>,
}

impl Metrics {
    /// The `prefix` label of a key: its first segments, or `other` past the cap.
    fn prefix_label(&mut self, key: &[u8]) -> String {
        let p = prefix(key, self.prefix_segments);
        if self.prefixes.contains(&p) {
            return p;
        }
        if self.prefixes.len() < self.max_prefixes {
            self.prefixes.insert(p.clone());
            return p;
        }
        "other".into()
    }
}

/// The first `n` `:`-separated segments of `key` (lossy UTF-8).
pub fn prefix(key: &[u8], n: usize) -> String {
    let end = key.iter().enumerate().filter(|(_, b)| **b == b':').nth(n.saturating_sub(1)).map_or(key.len(), |(i, _)| i);
    String::from_utf8_lossy(&key[..end]).into_owned()
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
        Ok((Metrics { prefix_segments: c.prefix_segments, max_prefixes: c.max_prefixes, prefixes: Default::default() }, manifest))
    }

    fn on_response(&mut self, _client: &Client, cmd: &Command, reply: &Reply, fx: &mut Effects) -> ResponseAction {
        let name = if cmd.categories.is_empty() { "other" } else { cmd.name.as_str() };
        let code = error_code(reply.raw());
        let result = if code.is_some() { "error" } else { "ok" };
        let seconds = reply.elapsed_us() as f64 / 1e6;
        if self.prefix_segments > 0 {
            let p = match cmd.keys().next() {
                Some((k, _)) => self.prefix_label(k),
                None => String::new(),
            };
            fx.inc(COMMANDS, &[name, &p, result]);
            if !p.is_empty() {
                fx.record(PREFIX_LATENCY, &[&p], seconds);
            }
        } else {
            fx.inc(COMMANDS, &[name, result]);
        }
        fx.record(LATENCY, &[name], seconds);
        fx.record(REQUEST_BYTES, &[name], cmd.size() as f64);
        fx.record(REPLY_BYTES, &[name], reply.raw().len() as f64);
        if let Some(code) = code {
            fx.inc(ERRORS, &[&code]);
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
