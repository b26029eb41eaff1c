//! A plugin for respire's tests. Its `[config]` (simple `key = value` lines):
//! - `tag = "a"`: its name in replies and counters;
//! - `commands = "get set"`, `categories = "read"`: what it asks for;
//! - `prefix = "a:"`: rewrites the key of `GET`/`SET` by prefixing it;
//! - `rate = 5`, `burst = 5`: takes a token per command from one bucket per client address
//!   (`limit_by = "all"`: one bucket for everyone);
//! - `responses = true`: appends `|tag` to bulk replies and records their latency.
//!
//! - `count = false`: a pure pass-through (no counting at all), for benchmarks;
//! - `protect = "secret:"`: refuses commands that write a key with this prefix;
//! - `refuse_dangerous = true`: refuses commands in the `dangerous` category;
//! - `key_prefixes = "a: b:"`: asks to see only commands with a key under these;
//! - `repeat = true`: marks its decisions repeatable where they depend on the client and the
//!   command alone (its continues, rate-limit takes and `dangerous` refusals), and records no
//!   `calls_total` metric (a request with metric changes is not repeated).
//!
//! - `observe = true` (with `responses`): the response hook only observes (its `|tag`
//!   replacements must then be ignored);
//! - `filter = "SAMPLE MIN_BYTES ERRORS"` (with `responses`): which replies the hook gets,
//!   e.g. `"0 100 false"`;
//! - `traffic = true`: traffic metrics respire records itself, `t_commands_total{command,
//!   prefix, result}`, `t_errors_total{code}`, and histograms `t_latency_seconds{command}`,
//!   `t_request_bytes{command}`, `t_reply_bytes{command}` (`max_key_prefixes = N`: the cap);
//! - `requests = false`: no request hook;
//! - `bad_traffic = true`: a traffic metric that does not fit its metric (a latency on a counter).
//!
//! Every request-hook call adds 1 to the shared counter `calls` (a host call), and, unless
//! `repeat`, to the metric `calls_total{command}` and the shared counter `requests` (effects,
//! applied after the call); every response-hook call adds 1 to the shared counter `replies`
//! (an effect). `ECHO probe:<tag>:calls` (`:requests`, `:replies`) answers the counter.
use respire_sdk::{
    Category, Client, Command, Effects, KeyAccess, LimiterId, Manifest, Metric, MetricId, Plugin,
    Reply, RequestAction, ResponseAction, TrafficLabel, TrafficValue, host, reply,
};

const CALLS: MetricId = MetricId(0);
const LATENCY: MetricId = MetricId(1);
const PER_CLIENT: LimiterId = LimiterId(0);

#[derive(Default)]
struct Probe {
    tag: String,
    prefix: Option<Vec<u8>>,
    limit: bool,
    limit_all: bool,
    responses: bool,
    count: bool,
    protect: Option<Vec<u8>>,
    refuse_dangerous: bool,
    repeat: bool,
}

fn setting<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

impl Plugin for Probe {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        let tag = setting(config, "tag").unwrap_or("probe").to_string();
        let mut manifest = Manifest::new(&format!("probe-{tag}"), "0.1.0")
            .metric(Metric::counter("calls_total", "Request hook calls").labels(&["command"]))
            .metric(
                Metric::histogram("reply_seconds", "Time to the reply")
                    .buckets(&[0.0001, 0.001, 0.01, 0.1, 1.0]),
            );
        let commands: Vec<&str> = setting(config, "commands")
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let categories: Vec<&str> = setting(config, "categories")
            .unwrap_or("")
            .split_whitespace()
            .collect();
        manifest = manifest
            .commands(&commands)
            .categories(&categories)
            .commands(&["echo"]);
        let key_prefixes: Vec<&str> = setting(config, "key_prefixes")
            .unwrap_or("")
            .split_whitespace()
            .collect();
        manifest = manifest.key_prefixes(&key_prefixes);
        let rate = match setting(config, "rate") {
            Some(r) => Some(r.parse::<f64>().map_err(|e| format!("rate: {e}"))?),
            None => None,
        };
        let burst = setting(config, "burst")
            .and_then(|b| b.parse().ok())
            .unwrap_or(1);
        manifest = manifest.limiter("per-client", rate.unwrap_or(1.0), burst);
        let responses = setting(config, "responses") == Some("true");
        if responses {
            manifest = if setting(config, "observe") == Some("true") {
                manifest.observing_responses()
            } else {
                manifest.with_responses()
            };
        }
        if let Some(f) = setting(config, "filter") {
            let f: Vec<&str> = f.split_whitespace().collect();
            let [sample, min_bytes, errors] = f[..] else {
                return Err("filter: SAMPLE MIN_BYTES ERRORS".into());
            };
            manifest = manifest.response_filter(
                sample.parse().map_err(|_| "filter: sample")?,
                min_bytes.parse().map_err(|_| "filter: min_bytes")?,
                errors == "true",
            );
        }
        if setting(config, "traffic") == Some("true") {
            let (c, e, l, q, r) = (
                MetricId(2),
                MetricId(3),
                MetricId(4),
                MetricId(5),
                MetricId(6),
            );
            manifest = manifest
                .metric(
                    Metric::counter("t_commands_total", "Commands")
                        .labels(&["command", "prefix", "result"]),
                )
                .metric(Metric::counter("t_errors_total", "Errors").labels(&["code"]))
                .metric(Metric::histogram("t_latency_seconds", "Latency").labels(&["command"]))
                .metric(
                    Metric::histogram("t_request_bytes", "Command sizes")
                        .labels(&["command"])
                        .buckets(&[10.0, 100.0]),
                )
                .metric(
                    Metric::histogram("t_reply_bytes", "Reply sizes")
                        .labels(&["command"])
                        .buckets(&[10.0, 100.0]),
                )
                .traffic(
                    c,
                    TrafficValue::Count,
                    &[
                        TrafficLabel::Command,
                        TrafficLabel::KeyPrefix(1),
                        TrafficLabel::Result,
                    ],
                )
                .traffic(e, TrafficValue::Count, &[TrafficLabel::ErrorCode])
                .traffic(l, TrafficValue::Latency, &[TrafficLabel::Command])
                .traffic(q, TrafficValue::RequestBytes, &[TrafficLabel::Command])
                .traffic(r, TrafficValue::ReplyBytes, &[TrafficLabel::Command]);
            if let Some(n) = setting(config, "max_key_prefixes") {
                manifest = manifest.max_key_prefixes(n.parse().map_err(|_| "max_key_prefixes")?);
            }
        }
        if setting(config, "requests") == Some("false") {
            manifest = manifest.without_requests();
        }
        if setting(config, "bad_traffic") == Some("true") {
            manifest = manifest.traffic(CALLS, TrafficValue::Latency, &[TrafficLabel::Command]);
        }
        let prefix = setting(config, "prefix").map(|p| p.as_bytes().to_vec());
        let limit_all = setting(config, "limit_by") == Some("all");
        let count = setting(config, "count") != Some("false");
        let protect = setting(config, "protect").map(|p| p.as_bytes().to_vec());
        let refuse_dangerous = setting(config, "refuse_dangerous") == Some("true");
        let repeat = setting(config, "repeat") == Some("true");
        let probe = Probe {
            tag,
            prefix,
            limit: rate.is_some(),
            limit_all,
            responses,
            count,
            protect,
            refuse_dangerous,
            repeat,
        };
        Ok((probe, manifest))
    }

    fn on_request(&mut self, client: &Client, cmd: &Command, fx: &mut Effects) -> RequestAction {
        if !self.count {
            return RequestAction::Continue;
        }
        host::counter_add("calls", 1, 0);
        if !self.repeat {
            fx.inc(CALLS, &[cmd.name]);
            fx.counter_add("requests", 1, 0);
        }
        if cmd.name == "echo" {
            for counter in ["calls", "requests", "replies"] {
                if cmd.arg(0) == Some(format!("probe:{}:{counter}", self.tag).as_bytes()) {
                    return RequestAction::Respond(reply::int(host::counter_get(counter)));
                }
            }
        }
        if self.refuse_dangerous && cmd.is(Category::DANGEROUS) {
            if self.repeat {
                fx.repeatable();
            }
            return RequestAction::Deny(format!("NOPERM '{}' is dangerous", cmd.name));
        }
        if let Some(p) = &self.protect
            && cmd
                .keys()
                .any(|(k, how)| how.contains(KeyAccess::WRITE) && k.starts_with(p))
        {
            return RequestAction::Deny("NOPERM No permissions to access a key".into());
        }
        if cmd.arg(0) == Some(b"probe:deny") {
            return RequestAction::Deny(format!("NOPERM denied by probe {}", self.tag));
        }
        if self.limit {
            fx.take(
                PER_CLIENT,
                if self.limit_all {
                    "all"
                } else {
                    client.addr.as_str()
                },
                1,
            );
        }
        if let (Some(prefix), "get" | "set") = (&self.prefix, cmd.name) {
            let mut args: Vec<Vec<u8>> = vec![cmd.name.as_bytes().to_vec()];
            for (i, a) in cmd.args().enumerate() {
                args.push(if i == 0 {
                    [prefix.as_slice(), a].concat()
                } else {
                    a.to_vec()
                });
            }
            return RequestAction::Rewrite(args);
        }
        if self.repeat && self.protect.is_none() {
            fx.repeatable();
        }
        RequestAction::Continue
    }

    fn on_response(
        &mut self,
        _client: &Client,
        _cmd: &Command,
        r: &Reply,
        fx: &mut Effects,
    ) -> ResponseAction {
        if !self.responses {
            return ResponseAction::Continue;
        }
        fx.record(LATENCY, &[], r.elapsed_us() as f64 / 1e6);
        fx.counter_add("replies", 1, 0);
        match r.value() {
            Some(reply::Value::Bulk(data)) => {
                ResponseAction::Replace(reply::bulk(&[data, b"|", self.tag.as_bytes()].concat()))
            }
            _ => ResponseAction::Continue,
        }
    }
}

respire_sdk::export_plugin!(Probe);
