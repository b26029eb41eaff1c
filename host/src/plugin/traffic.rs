//! Traffic metrics: metrics a plugin declares once in its manifest (`traffic`) and respire
//! records itself for every reply to the commands the plugin sees, without a call.
//!
//! Per reply the cost is one lookup — the command's number, its result (and error code) and
//! its key prefix, packed into a few bytes, usually equal to the last reply's — and one update
//! per metric, applied to this worker's series ([`LocalMetrics`]) and flushed once per turn of
//! the event loop. Labels are made (and series numbered) only the first time a combination is
//! seen.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Instant;

use rustc_hash::FxHashMap;

use super::bindings::respire::plugin::types::{
    Manifest, MetricKind, TrafficLabel, TrafficMetric, TrafficValue,
};
use super::{LocalMetrics, LocalSeries, PluginCtx};

/// The label of key prefixes past the plugin's `max-key-prefixes`, and of commands respire
/// does not know.
const OTHER: &str = "other";

/// Most label combinations a worker remembers per plugin (beyond, it starts over).
const MAX_REMEMBERED: usize = 4096;

/// A plugin's traffic metrics, checked against its declared metrics.
pub(super) struct Traffic {
    defs: Vec<TrafficMetric>,
    /// The most key segments a `key-prefix` label takes (0: no such label).
    segments: usize,
    /// Some metric is labelled by error code.
    by_code: bool,
    max_prefixes: usize,
    /// Key prefixes given a label of their own so far (by every worker).
    labelled: Mutex<HashSet<String>>,
}

impl Traffic {
    /// Checks the manifest's traffic metrics: each names a declared metric of the right kind
    /// (a counter for `count`, a histogram for the rest) and gives each of its labels a source.
    pub(super) fn check(manifest: &Manifest) -> Result<Traffic, String> {
        let mut segments = 0;
        let mut by_code = false;
        for (i, t) in manifest.traffic.iter().enumerate() {
            let Some(m) = manifest.metrics.get(t.metric as usize) else {
                return Err(format!(
                    "traffic metric #{i} names metric #{}, which is not declared",
                    t.metric
                ));
            };
            let kind_ok = match t.value {
                TrafficValue::Count => matches!(m.kind, MetricKind::Counter),
                _ => matches!(m.kind, MetricKind::Histogram),
            };
            if !kind_ok {
                let want = if matches!(t.value, TrafficValue::Count) {
                    "a counter"
                } else {
                    "a histogram"
                };
                return Err(format!(
                    "traffic metric #{i} ({}): {} needs {want}",
                    m.name,
                    value_name(t.value)
                ));
            }
            if t.labels.len() != m.labels.len() {
                return Err(format!(
                    "traffic metric #{i} ({}): {} label sources for {} labels",
                    m.name,
                    t.labels.len(),
                    m.labels.len()
                ));
            }
            for l in &t.labels {
                match l {
                    TrafficLabel::KeyPrefix(0) => {
                        return Err(format!(
                            "traffic metric #{i} ({}): a key prefix needs at least one segment",
                            m.name
                        ));
                    }
                    TrafficLabel::KeyPrefix(n) => segments = segments.max(*n as usize),
                    TrafficLabel::ErrorCode => by_code = true,
                    TrafficLabel::Command | TrafficLabel::Result => {}
                }
            }
        }
        Ok(Traffic {
            defs: manifest.traffic.clone(),
            segments,
            by_code,
            max_prefixes: manifest.max_key_prefixes as usize,
            labelled: Mutex::default(),
        })
    }

    /// Whether the plugin declared any.
    pub(super) fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// The label of a key prefix: itself, or `other` past the cap.
    fn prefix_label(&self, prefix: &str) -> String {
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        if labelled.contains(prefix) {
            return prefix.to_string();
        }
        if labelled.len() < self.max_prefixes {
            labelled.insert(prefix.to_string());
            return prefix.to_string();
        }
        OTHER.to_string()
    }
}

/// A traffic value as the contract names it.
pub(super) fn value_name(v: TrafficValue) -> &'static str {
    match v {
        TrafficValue::Count => "count",
        TrafficValue::Latency => "latency",
        TrafficValue::RequestBytes => "request-bytes",
        TrafficValue::ReplyBytes => "reply-bytes",
    }
}

/// A traffic label as the contract names it.
pub(super) fn label_name(l: &TrafficLabel) -> String {
    match l {
        TrafficLabel::Command => "command".to_string(),
        TrafficLabel::KeyPrefix(n) => format!("key-prefix({n})"),
        TrafficLabel::Result => "result".to_string(),
        TrafficLabel::ErrorCode => "error-code".to_string(),
    }
}

/// What the traffic metrics of one reply are made of.
pub(super) struct ReplyFacts<'a> {
    /// The command's number for metrics labels ([`crate::stats::OTHER`]: unknown).
    pub name_id: u16,
    pub cmd: &'a crate::protocol::Command,
    /// Its first key.
    pub first_key: Option<&'a [u8]>,
    /// The reply the client gets.
    pub reply: &'a [u8],
    /// When respire read the command (its latency starts there) and when the reply came.
    pub start: Instant,
    pub end: Instant,
}

/// A worker's series of one plugin's traffic metrics, by what labels them.
#[derive(Default)]
pub(super) struct TrafficCache {
    /// Per packed key (see [`TrafficCache::pack`]): the series of each traffic metric (none
    /// where it does not apply, as a metric by error code to a reply that is not an error).
    known: FxHashMap<Box<[u8]>, Rc<[Option<u32>]>>,
    scratch: Vec<u8>,
    /// What labelled the last reply, and its series: a batch is mostly runs of one command on
    /// one prefix, so a reply is compared with the last one field by field before anything is
    /// packed or looked up.
    last: Option<LastLabels>,
    last_series: Rc<[Option<u32>]>,
    /// `last_series` as the updates a reply makes: each series with what it records.
    plan: Vec<(u32, TrafficValue)>,
    /// The plan records a command's size (which is then worked out for each reply).
    plan_sizes_request: bool,
    /// Updates of the plan that cannot be applied (series past a cap), per reply, and where
    /// they are counted.
    plan_dropped: u64,
    dropped: Option<prometheus::IntCounter>,
    /// The last replies, not applied yet: they have the plan's labels and the same values.
    pending: Option<Pending>,
}

/// Replies recorded and not applied yet, all alike: the replies of one pipeline mostly have
/// the same labels, latency and sizes, so they are applied once, `n` times over.
struct Pending {
    start: Instant,
    end: Instant,
    reply_len: usize,
    request_len: usize,
    n: u64,
}

/// What labelled a reply (see [`TrafficCache::pack`]), kept to compare the next one with.
struct LastLabels {
    name_id: u16,
    error: bool,
    /// The error code, when a metric is labelled by it.
    code: Vec<u8>,
    /// The first key's prefix, when a metric is labelled by it and the command has a key.
    prefix: Option<Vec<u8>>,
}

/// The error code of an error reply (`ERR`, `WRONGTYPE` …): `-CODE text` or RESP3's `!len` blob.
fn error_code(reply: &[u8]) -> Option<&[u8]> {
    let text = match reply.first()? {
        b'-' => reply.get(1..)?,
        b'!' => {
            let start = memchr::memchr(b'\n', reply)? + 1;
            reply.get(start..)?
        }
        _ => return None,
    };
    let end = text
        .iter()
        .position(|b| *b == b' ' || *b == b'\r')
        .unwrap_or(text.len());
    Some(&text[..end])
}

/// The first `n` `:`-separated segments of `key`.
fn prefix_of(key: &[u8], n: usize) -> &[u8] {
    let mut seen = 0;
    for (i, b) in key.iter().enumerate() {
        if *b == b':' {
            seen += 1;
            if seen == n {
                return &key[..i];
            }
        }
    }
    key
}

impl TrafficCache {
    /// Packs what labels a reply into `scratch`: the command number, whether it is an error, the
    /// error code when a metric is labelled by it, and the first key's prefix.
    fn pack(&mut self, t: &Traffic, f: &ReplyFacts<'_>, code: Option<&[u8]>) {
        let s = &mut self.scratch;
        s.clear();
        s.extend_from_slice(&f.name_id.to_le_bytes());
        s.push(u8::from(code.is_some()));
        let code = if t.by_code {
            code.unwrap_or_default()
        } else {
            &[]
        };
        let code = &code[..code.len().min(255)];
        s.push(code.len() as u8);
        s.extend_from_slice(code);
        if t.segments > 0 {
            match f.first_key {
                Some(k) => {
                    s.push(1);
                    s.extend_from_slice(prefix_of(k, t.segments));
                }
                None => s.push(0),
            }
        }
    }

    /// Records one reply's traffic metrics: kept with the last replies when it is like them,
    /// otherwise those are applied to the worker's series and it starts a new run.
    pub(super) fn record(&mut self, ctx: &PluginCtx, local: &mut LocalMetrics, f: &ReplyFacts<'_>) {
        let t = &ctx.traffic;
        let code = error_code(f.reply);
        let code_label = if t.by_code {
            code.map(|c| &c[..c.len().min(255)])
        } else {
            None
        };
        let prefix = if t.segments > 0 {
            f.first_key.map(|k| prefix_of(k, t.segments))
        } else {
            None
        };
        let same = self.last_series.len() == t.defs.len()
            && self.last.as_ref().is_some_and(|l| {
                l.name_id == f.name_id
                    && l.error == code.is_some()
                    && l.code.as_slice() == code_label.unwrap_or_default()
                    && l.prefix.as_deref() == prefix
            });
        if !same {
            self.settle(local);
            self.pack(t, f, code);
            let series = match self.known.get(self.scratch.as_slice()) {
                Some(s) => s.clone(),
                None => {
                    let s = series_of(ctx, f, code);
                    if self.known.len() >= MAX_REMEMBERED {
                        self.known.clear();
                    }
                    self.known
                        .insert(self.scratch.clone().into_boxed_slice(), s.clone());
                    s
                }
            };
            let last = self.last.get_or_insert_with(|| LastLabels {
                name_id: 0,
                error: false,
                code: Vec::new(),
                prefix: None,
            });
            last.name_id = f.name_id;
            last.error = code.is_some();
            last.code.clear();
            last.code.extend_from_slice(code_label.unwrap_or_default());
            match (prefix, &mut last.prefix) {
                (Some(p), Some(kept)) => {
                    kept.clear();
                    kept.extend_from_slice(p);
                }
                (p, kept) => *kept = p.map(<[u8]>::to_vec),
            }
            self.make_plan(ctx, local, &series);
            self.last_series = series;
        }
        let request_len = if self.plan_sizes_request {
            command_bytes(f.cmd)
        } else {
            0
        };
        if let Some(p) = &mut self.pending
            && p.start == f.start
            && p.end == f.end
            && p.reply_len == f.reply.len()
            && p.request_len == request_len
        {
            p.n += 1;
            return;
        }
        self.settle(local);
        self.pending = Some(Pending {
            start: f.start,
            end: f.end,
            reply_len: f.reply.len(),
            request_len,
            n: 1,
        });
    }

    /// The updates a reply with these series makes, each series with a handle in `local`.
    fn make_plan(&mut self, ctx: &PluginCtx, local: &mut LocalMetrics, series: &[Option<u32>]) {
        self.plan.clear();
        self.plan_dropped = 0;
        for (def, s) in ctx.traffic.defs.iter().zip(series) {
            let Some(s) = *s else {
                continue;
            };
            match ctx.local_series(local, s) {
                Some(LocalSeries::Counter(_) | LocalSeries::Histogram(_)) => {
                    self.plan.push((s, def.value));
                }
                _ => self.plan_dropped += 1,
            }
        }
        self.plan_sizes_request = self
            .plan
            .iter()
            .any(|(_, v)| matches!(v, TrafficValue::RequestBytes));
        if self.plan_dropped > 0 && self.dropped.is_none() {
            self.dropped = Some(
                super::plugin_stats()
                    .dropped_updates
                    .with_label_values(&[&*ctx.name]),
            );
        }
    }

    /// Applies the replies recorded and not applied yet to the worker's series.
    pub(super) fn settle(&mut self, local: &mut LocalMetrics) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let seconds = p.end.saturating_duration_since(p.start).as_secs_f64();
        for &(series, what) in &self.plan {
            let value = match what {
                TrafficValue::Count => 1.0,
                TrafficValue::Latency => seconds,
                TrafficValue::ReplyBytes => p.reply_len as f64,
                TrafficValue::RequestBytes => p.request_len as f64,
            };
            local.add_n(series, value, p.n);
        }
        if let Some(d) = self.dropped.as_ref().filter(|_| self.plan_dropped > 0) {
            d.inc_by(self.plan_dropped * p.n);
        }
    }
}

/// Bytes of a command's name and arguments.
pub(super) fn command_bytes(cmd: &crate::protocol::Command) -> usize {
    cmd.iter().map(<[u8]>::len).sum()
}

/// The series of every traffic metric for a reply (made when new).
fn series_of(ctx: &PluginCtx, f: &ReplyFacts<'_>, code: Option<&[u8]>) -> Rc<[Option<u32>]> {
    let t = &ctx.traffic;
    let command = if f.name_id == crate::stats::OTHER {
        OTHER.to_string()
    } else {
        String::from_utf8_lossy(f.cmd.name()).to_ascii_lowercase()
    };
    t.defs
        .iter()
        .map(|def| {
            let mut labels = Vec::with_capacity(def.labels.len());
            for l in &def.labels {
                labels.push(match l {
                    TrafficLabel::Command => command.clone(),
                    TrafficLabel::Result => if code.is_some() { "error" } else { "ok" }.to_string(),
                    TrafficLabel::ErrorCode => String::from_utf8_lossy(code?).into_owned(),
                    TrafficLabel::KeyPrefix(n) => match f.first_key {
                        Some(k) => {
                            t.prefix_label(&String::from_utf8_lossy(prefix_of(k, *n as usize)))
                        }
                        None => String::new(),
                    },
                });
            }
            ctx.series_id(def.metric, labels)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_error_codes() {
        assert_eq!(prefix_of(b"svc:user:42", 1), b"svc");
        assert_eq!(prefix_of(b"svc:user:42", 2), b"svc:user");
        assert_eq!(prefix_of(b"plain", 2), b"plain");
        assert_eq!(prefix_of(b":lead", 1), b"");
        assert_eq!(
            error_code(b"-WRONGTYPE Operation against a key\r\n"),
            Some(&b"WRONGTYPE"[..])
        );
        assert_eq!(error_code(b"-ERR\r\n"), Some(&b"ERR"[..]));
        assert_eq!(
            error_code(b"!21\r\nSYNTAX invalid syntax\r\n"),
            Some(&b"SYNTAX"[..])
        );
        assert_eq!(error_code(b"+OK\r\n"), None);
        assert_eq!(error_code(b"$5\r\n-ERR \r\n"), None);
    }
}
