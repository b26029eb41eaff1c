//! Prometheus metrics about the traffic itself, recorded from every reply: commands by
//! name, key prefix and result, their latency, reply sizes, and errors by code. Served on
//! respire's metrics endpoint as `respire_plugin_metrics_*`.
//!
//! ```toml
//! [config]
//! prefix_segments = 1     # the `prefix` label: first N `:`-separated segments of the first key (0: no label)
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    prefix_segments: usize,
}

fn one() -> usize {
    1
}

/// The plugin's state.
pub struct Metrics {
    prefix_segments: usize,
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
            .metric(Metric::counter("errors_total", "Error replies, by error code.").labels(&["code"]));
        Ok((Metrics { prefix_segments: c.prefix_segments }, manifest))
    }

    fn on_response(&mut self, _client: &Client, cmd: &Command, reply: &Reply, fx: &mut Effects) -> ResponseAction {
        let name = if cmd.categories.is_empty() { "other" } else { cmd.name.as_str() };
        let code = error_code(reply.raw());
        let result = if code.is_some() { "error" } else { "ok" };
        if self.prefix_segments > 0 {
            let p = cmd.keys().next().map(|(k, _)| prefix(k, self.prefix_segments)).unwrap_or_default();
            fx.inc(COMMANDS, &[name, &p, result]);
        } else {
            fx.inc(COMMANDS, &[name, result]);
        }
        fx.record(LATENCY, &[name], reply.elapsed_us() as f64 / 1e6);
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
