//! Write respire plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`]: `init` reads the plugin's
//! configuration and says what it wants to see (commands, categories, hooks) and
//! what it records (metrics, token buckets); the hooks it does not override let
//! every command through. Hooks return a decision and may add [`Effects`] (tokens
//! to take, metric changes, additions to shared counters) that respire applies after
//! the call, which is cheaper than calling the [`host`] once per effect; after a batch
//! of replies, [`Plugin::after_responses`] may add what the hook gathered in one go. [`export_plugin!`] turns it into the
//! component respire loads. Build it for `wasm32-wasip2` and drop the `.wasm`
//! file into respire's plugin folder.
//!
//! respire hands a plugin whole batches of commands (a pipeline, or what many clients
//! sent at once) in one call; the SDK calls the hooks once per command, in order, and
//! sends every decision and effect back together. Metric label values are turned into a
//! series number once per distinct combination (cached in the instance), so recording a
//! metric costs a hash lookup here rather than strings crossing into respire.
//!
//! ```ignore
//! use respire_sdk::{Client, Command, Effects, LimiterId, Manifest, Metric, MetricId, Plugin, RequestAction};
//!
//! const REFUSED: MetricId = MetricId(0);
//! const PER_CLIENT: LimiterId = LimiterId(0);
//!
//! struct NoFlush;
//!
//! impl Plugin for NoFlush {
//!     fn init(_config: &str) -> Result<(Self, Manifest), String> {
//!         let manifest = Manifest::new("no-flush", "0.1.0")
//!             .commands(&["flushall", "flushdb", "keys"])
//!             .metric(Metric::counter("refused_total", "Commands refused").labels(&["command"]))
//!             .limiter("keys", 10.0, 20); // KEYS: 10 per second per client, bursts of 20
//!         Ok((NoFlush, manifest))
//!     }
//!
//!     fn on_request(&mut self, client: &Client, cmd: &Command, fx: &mut Effects) -> RequestAction {
//!         if cmd.name == "keys" {
//!             fx.take(PER_CLIENT, client.addr.as_str(), 1);
//!             return RequestAction::Continue;
//!         }
//!         fx.inc(REFUSED, &[cmd.name.as_str()]);
//!         RequestAction::Deny(format!("NOPERM '{}' is disabled here", cmd.name))
//!     }
//! }
//!
//! respire_sdk::export_plugin!(NoFlush);
//! ```
#![warn(missing_docs)]

/// The bindings generated from respire's WIT contract (`wit/plugin.wit`).
#[doc(hidden)]
#[allow(clippy::too_many_arguments, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export_component",
        default_bindings_module: "respire_sdk::bindings",
    });
}

pub mod glob;

pub use bindings::respire::plugin::host::Level;
pub use bindings::respire::plugin::types::{
    CacheFor, CacheSettings, Category, Client, KeyAccess, Limiter, Manifest, Metric, MetricKind,
    RequestAction, ResponseFilter, TrafficLabel, TrafficMetric, TrafficValue,
};

/// Which client a command comes from, without its details: respire's id for the connection,
/// and a number that changes whenever the details (user, database, name, protocol) do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRef {
    /// respire's id for the connection (as `CLIENT ID`).
    pub id: u64,
    /// Changes whenever the client's details change.
    pub generation: u32,
}

/// What a response hook does with a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseAction {
    /// Pass it on unchanged.
    Continue,
    /// Send this complete RESP reply instead.
    Replace(Vec<u8>),
}

/// A command as a plugin sees it: the lower-case name, zero-copy views of the arguments,
/// its ACL categories and its keys (borrowed from the batch respire sent).
pub struct Command<'a> {
    /// The command name in lower case.
    pub name: &'a str,
    /// Its ACL categories (empty when respire does not know the command).
    pub categories: Category,
    data: &'a [u8],
    /// Where the name starts in `data`.
    start: usize,
    /// The end of the name, then of each argument.
    ends: &'a [u32],
    /// Its keys: argument index in the low 30 bits, bit 30 read, bit 31 write.
    keys: &'a [u32],
}

/// Numbers per command in a batch's `requests` (see the contract's `request-batch`).
#[doc(hidden)]
pub const REQUEST_WORDS: usize = 9;
/// Numbers per reply in a batch's `responses`.
#[doc(hidden)]
pub const RESPONSE_WORDS: usize = 13;

/// A command name as text (`""` when it is not UTF-8). Names are short and ASCII, which a byte
/// loop checks for less than the general UTF-8 check costs in a plugin (measured: 118
/// instructions per command and plugin, most of it that call's fixed cost).
#[allow(unsafe_code)]
fn name_str(bytes: &[u8]) -> &str {
    if bytes.len() <= 64 && bytes.iter().all(|b| *b < 0x80) {
        // SAFETY: every byte is ASCII, and ASCII is valid UTF-8.
        return unsafe { std::str::from_utf8_unchecked(bytes) };
    }
    std::str::from_utf8(bytes).unwrap_or_default()
}

fn range(from: u32, n: u32) -> std::ops::Range<usize> {
    from as usize..(from as usize).saturating_add(n as usize)
}

impl<'a> Command<'a> {
    /// The command described by `words` (its `REQUEST_WORDS` numbers) and the client it came from.
    #[doc(hidden)]
    pub fn from_batch(
        data: &'a [u8],
        ends: &'a [u32],
        keys: &'a [u32],
        words: &[u32],
    ) -> (ClientRef, Command<'a>) {
        let [
            id_low,
            id_high,
            generation,
            start,
            first_end,
            n_ends,
            categories,
            first_key,
            n_keys,
        ] = match words.get(..REQUEST_WORDS) {
            Some(&[a, b, c, d, e, f, g, h, i]) => [a, b, c, d, e, f, g, h, i],
            _ => [0; REQUEST_WORDS],
        };
        let client = ClientRef {
            id: u64::from(id_low) | (u64::from(id_high) << 32),
            generation,
        };
        let start = start as usize;
        let ends = ends.get(range(first_end, n_ends)).unwrap_or_default();
        let keys = keys.get(range(first_key, n_keys)).unwrap_or_default();
        let name_end = ends.first().map_or(start, |e| *e as usize);
        let name = data.get(start..name_end).map(name_str).unwrap_or_default();
        (
            client,
            Command {
                name,
                categories: Category::from_bits_retain(categories),
                data,
                start,
                ends,
                keys,
            },
        )
    }

    /// Whether the command is in all of these categories (`Category::WRITE`, …).
    #[inline]
    pub fn is(&self, categories: Category) -> bool {
        self.categories.contains(categories)
    }

    /// Its keys, with whether the command reads or writes each.
    #[inline]
    pub fn keys(&self) -> impl Iterator<Item = (&'a [u8], KeyAccess)> + '_ {
        self.keys.iter().filter_map(|&k| {
            let mut access = KeyAccess::empty();
            if k & (1 << 30) != 0 {
                access |= KeyAccess::READ;
            }
            if k & (1 << 31) != 0 {
                access |= KeyAccess::WRITE;
            }
            Some((self.arg((k & 0x3fff_ffff) as usize)?, access))
        })
    }

    /// Number of arguments after the name.
    #[inline]
    pub fn len(&self) -> usize {
        self.ends.len().saturating_sub(1)
    }

    /// Whether the command has no arguments.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Argument `i` (0 is the first argument after the name).
    #[inline]
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        let start = *self.ends.get(i)? as usize;
        let end = *self.ends.get(i + 1)? as usize;
        self.data.get(start..end)
    }

    /// Bytes of the name and all arguments together.
    #[inline]
    pub fn size(&self) -> usize {
        self.ends
            .last()
            .map_or(0, |e| (*e as usize).saturating_sub(self.start))
    }

    /// Every argument after the name.
    pub fn args(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).filter_map(|i| self.arg(i))
    }
}

/// A Redis ACL category by name (`read`, `@write`, … case-insensitive), as in `COMMAND INFO`.
pub fn category(name: &str) -> Option<Category> {
    const ALL: [(&str, Category); 21] = [
        ("keyspace", Category::KEYSPACE),
        ("read", Category::READ),
        ("write", Category::WRITE),
        ("set", Category::SET),
        ("sortedset", Category::SORTEDSET),
        ("list", Category::LIST),
        ("hash", Category::HASH),
        ("string", Category::STRING),
        ("bitmap", Category::BITMAP),
        ("hyperloglog", Category::HYPERLOGLOG),
        ("geo", Category::GEO),
        ("stream", Category::STREAM),
        ("pubsub", Category::PUBSUB),
        ("admin", Category::ADMIN),
        ("fast", Category::FAST),
        ("slow", Category::SLOW),
        ("blocking", Category::BLOCKING),
        ("dangerous", Category::DANGEROUS),
        ("connection", Category::CONNECTION),
        ("transaction", Category::TRANSACTION),
        ("scripting", Category::SCRIPTING),
    ];
    let name = name.trim_start_matches('@');
    ALL.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, c)| *c)
}

/// Names a metric by its position among the manifest's metrics (the first declared is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricId(pub u32);

impl MetricId {
    /// The series of this metric with these label values (in the order of its label names),
    /// to keep and pass to [`Effects::update`]; `None` when respire drops updates to it (labels
    /// that do not fit the metric, or a metric that has 1000 series already).
    pub fn series(self, labels: &[&str]) -> Option<Series> {
        series::of(self, labels).map(Series)
    }
}

/// One series of a metric: a metric with its label values (see [`MetricId::series`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Series(u32);

/// Names a limiter by its position among the manifest's limiters (the first declared is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterId(pub u32);

impl Manifest {
    /// A manifest that asks for the request hook and nothing else yet.
    pub fn new(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.to_string(),
            version: version.to_string(),
            commands: Vec::new(),
            categories: Vec::new(),
            on_request: true,
            on_response: false,
            observe_responses: false,
            response_filter: None,
            traffic: Vec::new(),
            max_key_prefixes: 100,
            metrics: Vec::new(),
            limiters: Vec::new(),
            cache: None,
            serves: Vec::new(),
            key_prefixes: Vec::new(),
        }
    }

    /// Run the hooks only for commands (of those asked for) with a key under one of these
    /// prefixes: respire checks the keys itself, so the plugin is not called for the others
    /// (nor for keyless commands). An empty prefix stands for every command: no filter.
    pub fn key_prefixes(mut self, prefixes: &[&str]) -> Manifest {
        self.key_prefixes
            .extend(prefixes.iter().map(|p| p.to_string()));
        self
    }

    /// Run the hooks for these commands (lower case).
    pub fn commands(mut self, names: &[&str]) -> Manifest {
        self.commands
            .extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Run the hooks for commands in these ACL categories (`read`, `write`, …, or `all`).
    pub fn categories(mut self, names: &[&str]) -> Manifest {
        self.categories
            .extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Also call `on_response`.
    pub fn with_responses(mut self) -> Manifest {
        self.on_response = true;
        self
    }

    /// Calls `on_response` for matching commands, only to look: the replies it returns are
    /// ignored, and respire writes each reply at once and runs the hook on a copy afterwards
    /// (a hook that may replace replies holds them back until it has run).
    pub fn observing_responses(mut self) -> Manifest {
        self.on_response = true;
        self.observe_responses = true;
        self
    }

    /// Calls `on_response` only for some replies: one in `sample` at random (0: none for this
    /// reason), those of at least `min_bytes` or answering a command of at least `min_bytes`
    /// (0: none for this reason), and error replies when `errors`.
    pub fn response_filter(mut self, sample: u32, min_bytes: u64, errors: bool) -> Manifest {
        self.response_filter = Some(ResponseFilter {
            sample,
            min_bytes,
            errors,
        });
        self
    }

    /// A metric respire records itself for every matching reply, without calling the plugin:
    /// `metric` (declared with [`Manifest::metric`]) gets `value`, with label values taken
    /// from `labels` (one per label name of the metric, in order).
    ///
    /// ```ignore
    /// const COMMANDS: MetricId = MetricId(0);
    /// Manifest::new("traffic", "0.1.0")
    ///     .categories(&["all"])
    ///     .without_requests()
    ///     .metric(Metric::counter("commands_total", "Commands").labels(&["command", "result"]))
    ///     .traffic(COMMANDS, TrafficValue::Count, &[TrafficLabel::Command, TrafficLabel::Result]);
    /// ```
    pub fn traffic(
        mut self,
        metric: MetricId,
        value: TrafficValue,
        labels: &[TrafficLabel],
    ) -> Manifest {
        self.traffic.push(TrafficMetric {
            metric: metric.0,
            value,
            labels: labels.to_vec(),
        });
        self
    }

    /// How many distinct key prefixes get a label of their own in traffic metrics (100 unless
    /// set); the rest are counted as `other`.
    pub fn max_key_prefixes(mut self, n: u32) -> Manifest {
        self.max_key_prefixes = n;
        self
    }

    /// Commands this plugin implements (`metrics.hotkeys`): `on_request` is called for them
    /// whatever else the manifest says, and should answer them with `Respond` or `Deny`.
    pub fn serves(mut self, names: &[&str]) -> Manifest {
        self.serves
            .extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Do not call `on_request` (a plugin that only looks at replies).
    pub fn without_requests(mut self) -> Manifest {
        self.on_request = false;
        self
    }

    /// Declares a metric; the next id is `MetricId(number declared before)`.
    pub fn metric(mut self, metric: Metric) -> Manifest {
        self.metrics.push(metric);
        self
    }

    /// Declares a token bucket; the next id is `LimiterId(number declared before)`.
    pub fn limiter(mut self, name: &str, rate_per_second: f64, burst: u32) -> Manifest {
        self.limiters.push(Limiter {
            name: name.to_string(),
            rate: rate_per_second,
            burst,
            shared: false,
        });
        self
    }

    /// Declares a token bucket kept in the backend Redis, so that every respire process in
    /// front of it enforces one quota (a round trip to Redis per take); the next id is
    /// `LimiterId(number declared before)`.
    pub fn shared_limiter(mut self, name: &str, rate_per_second: f64, burst: u32) -> Manifest {
        self.limiters.push(Limiter {
            name: name.to_string(),
            rate: rate_per_second,
            burst,
            shared: true,
        });
        self
    }

    /// Uses respire's response cache for keys under these prefixes (empty: every key), holding
    /// at most `max_memory` bytes. Hooks then answer [`RequestAction::Cache`] for what to cache.
    pub fn cache(mut self, prefixes: &[&str], max_memory: u64) -> Manifest {
        self.cache = Some(CacheSettings {
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            max_memory,
        });
        self
    }
}

impl Metric {
    fn of(kind: MetricKind, name: &str, help: &str) -> Metric {
        Metric {
            name: name.to_string(),
            help: help.to_string(),
            kind,
            labels: Vec::new(),
            buckets: Vec::new(),
        }
    }

    /// A counter (updates add to it).
    pub fn counter(name: &str, help: &str) -> Metric {
        Self::of(MetricKind::Counter, name, help)
    }

    /// A gauge (updates set it).
    pub fn gauge(name: &str, help: &str) -> Metric {
        Self::of(MetricKind::Gauge, name, help)
    }

    /// A histogram (updates are observations), with respire's default buckets.
    pub fn histogram(name: &str, help: &str) -> Metric {
        Self::of(MetricKind::Histogram, name, help)
    }

    /// Label names (updates give the values in this order).
    pub fn labels(mut self, names: &[&str]) -> Metric {
        self.labels = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Histogram bucket upper bounds.
    pub fn buckets(mut self, bounds: &[f64]) -> Metric {
        self.buckets = bounds.to_vec();
        self
    }
}

/// Effects a hook asks respire to apply after it returns: token takes, metric changes and
/// counter additions.
/// Returning them costs nothing extra; calling the host for each would cost a call each.
#[derive(Default)]
pub struct Effects {
    /// The request or response of the batch the hook is running for.
    current: u32,
    /// How many metric changes there were when the current request began.
    updates_before: usize,
    takes: Vec<Take>,
    series: Vec<u32>,
    values: Vec<f64>,
    repeatable: Vec<u32>,
    /// How many counter changes there were when the current request began.
    counters_before: usize,
    /// Counter changes, as [`CounterChanges`] has them.
    counter_keys: Vec<u8>,
    counter_ends: Vec<u32>,
    counter_deltas: Vec<i64>,
    counter_ttls: Vec<u64>,
}

use bindings::respire::plugin::types::{CounterChanges, Take, Updates};

impl Effects {
    /// Take `cost` tokens from bucket `key` of `limiter` before the command goes on; if the
    /// bucket has too few, respire refuses the command with
    /// `ERR rate limit '<limiter>' exceeded, retry in <n> ms` and takes nothing.
    /// Only request hooks may take tokens.
    #[inline]
    pub fn take(&mut self, limiter: LimiterId, key: impl Into<String>, cost: u32) {
        self.takes.push(Take {
            request: self.current,
            limiter: limiter.0,
            key: key.into(),
            cost,
        });
    }

    /// Changes a metric: a counter adds `value`, a gauge is set to it, a histogram observes it.
    /// Labels that do not fit the metric, or a metric over 1000 series, are dropped.
    pub fn record(&mut self, metric: MetricId, labels: &[&str], value: f64) {
        if let Some(series) = metric.series(labels) {
            self.update(series, value);
        }
    }

    /// Adds 1 to a counter.
    pub fn inc(&mut self, metric: MetricId, labels: &[&str]) {
        self.record(metric, labels, 1.0);
    }

    /// Changes one series found before with [`MetricId::series`]: no label matching, for
    /// plugins that update the same series for many commands.
    #[inline]
    pub fn update(&mut self, series: Series, value: f64) {
        self.series.push(series.0);
        self.values.push(value);
    }

    /// Adds `delta` to respire's shared counter `key` after the hook returns (what
    /// [`host::counter_add`] does at once, for the cost of a call each); the counter is forgotten
    /// `ttl_ms` after its last change (0: never). Changes apply in order once the call returns.
    pub fn counter_add(&mut self, key: &str, delta: i64, ttl_ms: u64) {
        self.counter_keys.extend_from_slice(key.as_bytes());
        self.counter_ends
            .push(u32::try_from(self.counter_keys.len()).unwrap_or(u32::MAX));
        self.counter_deltas.push(delta);
        self.counter_ttls.push(ttl_ms);
    }

    /// Says that this request's decision and takes depend only on the client (its details:
    /// address, user, database, name, protocol) and on the command's name and categories —
    /// not on its arguments (a container's subcommand is one), its keys, or anything that came
    /// before: respire may then apply them again, taking the tokens each time, to the client's
    /// later commands with the same name and categories without calling the hook, until the
    /// client's details change or the plugins reload. Ignored for a request whose handling
    /// recorded a metric or counter change or that is rewritten. Only request hooks can mark
    /// requests.
    ///
    /// For example an ACL verdict when the user's rules allow every key and channel, or a rate
    /// limit whose bucket is the client's address.
    #[inline]
    pub fn repeatable(&mut self) {
        if self.repeatable.last() != Some(&self.current) {
            self.repeatable.push(self.current);
        }
    }

    #[doc(hidden)]
    #[inline]
    pub fn at(&mut self, index: u32) {
        self.current = index;
        self.updates_before = self.series.len();
        self.counters_before = self.counter_deltas.len();
    }

    /// Ends the current request: its repeatable mark is dropped when it changed metrics or
    /// counters, or the hook rewrote it.
    #[doc(hidden)]
    #[inline]
    pub fn done(&mut self, action: &RequestAction) {
        if self.repeatable.last() == Some(&self.current)
            && (self.series.len() != self.updates_before
                || self.counter_deltas.len() != self.counters_before
                || matches!(action, RequestAction::Rewrite(_)))
        {
            self.repeatable.pop();
        }
    }

    #[doc(hidden)]
    pub fn into_parts(self) -> (Vec<Take>, Updates, Vec<u32>, CounterChanges) {
        (
            self.takes,
            Updates {
                series: self.series,
                values: self.values,
            },
            self.repeatable,
            CounterChanges {
                keys: self.counter_keys,
                key_ends: self.counter_ends,
                deltas: self.counter_deltas,
                ttls_ms: self.counter_ttls,
            },
        )
    }
}

/// Series numbers of metric label values, asked of respire once per combination.
#[doc(hidden)]
pub mod series {
    use std::cell::RefCell;

    use rustc_hash::FxHashMap;

    use crate::MetricId;

    /// Most combinations remembered per metric (respire keeps at most 1000 anyway).
    const MAX: usize = 4096;

    #[derive(Default)]
    struct PerMetric {
        /// The last labels asked for and their series: most updates repeat the last ones.
        last: Option<(Vec<String>, Option<u32>)>,
        known: FxHashMap<String, Option<u32>>,
    }

    thread_local! {
        static CACHE: RefCell<(String, Vec<PerMetric>)> = const { RefCell::new((String::new(), Vec::new())) };
    }

    /// The series of `metric` with these labels (`None`: respire drops updates to it).
    pub fn of(metric: MetricId, labels: &[&str]) -> Option<u32> {
        CACHE.with(|c| {
            let (key, all) = &mut *c.borrow_mut();
            let i = metric.0 as usize;
            if all.len() <= i {
                all.resize_with(i + 1, PerMetric::default);
            }
            let per = &mut all[i];
            if let Some((l, s)) = &per.last
                && l.len() == labels.len()
                && l.iter().zip(labels).all(|(a, b)| a == b)
            {
                return *s;
            }
            key.clear();
            for l in labels {
                key.push_str(l);
                key.push('\u{1f}');
            }
            let s = match per.known.get(key.as_str()) {
                Some(s) => *s,
                None => {
                    let owned: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
                    let s = crate::bindings::respire::plugin::host::series(metric.0, &owned);
                    if per.known.len() >= MAX {
                        per.known.clear();
                    }
                    per.known.insert(key.clone(), s);
                    s
                }
            };
            match &mut per.last {
                Some((l, ls)) => {
                    l.clear();
                    l.extend(labels.iter().map(|x| x.to_string()));
                    *ls = s;
                }
                None => per.last = Some((labels.iter().map(|x| x.to_string()).collect(), s)),
            }
            s
        })
    }
}

/// A reply as a response hook sees it: the complete RESP bytes and how long it took.
pub struct Reply<'a> {
    raw: &'a [u8],
    elapsed_us: u64,
}

impl<'a> Reply<'a> {
    #[doc(hidden)]
    pub fn new(raw: &'a [u8], elapsed_us: u64) -> Reply<'a> {
        Reply { raw, elapsed_us }
    }

    /// The reply exactly as Redis (or respire) sent it.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Microseconds from respire reading the command to this reply.
    pub fn elapsed_us(&self) -> u64 {
        self.elapsed_us
    }

    /// Whether the reply is an error (`-…` or a RESP3 blob error `!…`).
    pub fn is_error(&self) -> bool {
        matches!(self.raw.first(), Some(b'-') | Some(b'!'))
    }

    /// The reply parsed into a [`reply::Value`] (None if it is not valid RESP).
    pub fn value(&self) -> Option<reply::Value<'a>> {
        reply::parse(self.raw).map(|(v, _)| v)
    }
}

/// A respire plugin. Only `init` is required; every hook lets the command through by default.
pub trait Plugin: Sized + 'static {
    /// Reads the plugin's configuration (TOML text, possibly empty) and says what the plugin
    /// wants to see. An error keeps the plugin from loading, with this reason.
    fn init(config: &str) -> Result<(Self, Manifest), String>;

    /// Runs before a matching command goes to Redis. Default: continue.
    fn on_request(
        &mut self,
        _client: &Client,
        _command: &Command<'_>,
        _effects: &mut Effects,
    ) -> RequestAction {
        RequestAction::Continue
    }

    /// Runs with the reply to a matching command, before the client gets it. Default: continue.
    fn on_response(
        &mut self,
        _client: &Client,
        _command: &Command<'_>,
        _reply: &Reply<'_>,
        _effects: &mut Effects,
    ) -> ResponseAction {
        ResponseAction::Continue
    }

    /// Runs once after each batch of `on_response` calls (the replies of one turn of a
    /// respire worker), e.g. to apply in one go what the hook gathered over the batch, such as
    /// one [`host::counter_add`] per key rather than per reply. Default: nothing.
    fn after_responses(&mut self, _effects: &mut Effects) {}
}

/// The details of clients, cached by id and generation, so that hooks receive only a
/// [`ClientRef`] and the strings cross from respire only when a client changes.
#[doc(hidden)]
pub mod clients {
    use std::cell::RefCell;
    use std::rc::Rc;

    use rustc_hash::FxHashMap as HashMap;

    use crate::{Client, ClientRef};

    /// Most clients remembered at once (the cache starts over beyond it).
    const MAX: usize = 4096;

    /// A client respire did not describe (not in the batch: cannot happen with a sound host).
    fn unknown(id: u64) -> Client {
        Client {
            id,
            addr: String::new(),
            user: "default".into(),
            db: 0,
            name: String::new(),
            protocol: 2,
        }
    }

    thread_local! {
        static CACHE: RefCell<HashMap<u64, (u32, Rc<Client>)>> = RefCell::new(HashMap::default());
        /// The last client asked about (a batch is mostly one client's pipeline).
        static LAST: RefCell<Option<(u64, u32, Rc<Client>)>> = const { RefCell::new(None) };
    }

    /// Runs `f` with the details of `r`, fetching them from respire when they changed. The
    /// details are shared, not copied, and nothing is borrowed while `f` runs.
    pub fn with<T>(r: ClientRef, f: impl FnOnce(&Client) -> T) -> T {
        let client = LAST.with(|l| {
            if let Some((id, generation, client)) = &*l.borrow()
                && *id == r.id
                && *generation == r.generation
            {
                return client.clone();
            }
            let client = lookup(r);
            *l.borrow_mut() = Some((r.id, r.generation, client.clone()));
            client
        });
        f(&client)
    }

    fn lookup(r: ClientRef) -> Rc<Client> {
        CACHE.with(|c| {
            if let Some((generation, client)) = c.borrow().get(&r.id)
                && *generation == r.generation
            {
                return client.clone();
            }
            let details = Rc::new(
                crate::bindings::respire::plugin::host::client_info(r.id)
                    .unwrap_or_else(|| unknown(r.id)),
            );
            let mut c = c.borrow_mut();
            if c.len() >= MAX {
                c.clear();
            }
            c.insert(r.id, (r.generation, details.clone()));
            details
        })
    }
}

/// Calls into respire. Each costs about as much as a hook call: prefer [`Effects`] in hooks.
pub mod host {
    use crate::bindings::respire::plugin::host as h;
    use crate::bindings::respire::plugin::types::Update;
    use crate::{Level, LimiterId, MetricId};

    /// Writes a line to respire's log, tagged with the plugin's name.
    pub fn log(level: Level, message: &str) {
        h::log(level, message);
    }

    thread_local! {
        /// The time of the hook call under way, once asked (0: not yet).
        static NOW_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Milliseconds since the Unix epoch. Within a hook call it is the time of the first ask:
    /// one call covers a batch of commands (or replies) that arrived together, and asking
    /// respire costs about as much as a call.
    pub fn now_ms() -> u64 {
        NOW_MS.with(|n| match n.get() {
            0 => {
                let now = h::now_ms();
                n.set(now);
                now
            }
            now => now,
        })
    }

    /// Forgets the time of the last hook call (at the start of each).
    #[doc(hidden)]
    pub fn new_call() {
        NOW_MS.with(|n| n.set(0));
    }

    /// Changes a metric now (a counter adds, a gauge is set, a histogram observes).
    pub fn record(metric: MetricId, labels: &[&str], value: f64) {
        if let Some(series) = crate::series::of(metric, labels) {
            h::record_update(Update { series, value });
        }
    }

    /// Takes `cost` tokens from bucket `key` of `limiter`: `Ok(tokens left)`, or
    /// `Err(milliseconds until there are enough)` with nothing taken.
    pub fn take(limiter: LimiterId, key: &str, cost: u32) -> Result<u32, u64> {
        h::take(limiter.0, key, cost)
    }

    /// Adds `delta` to a counter shared by every instance of this plugin and returns the new
    /// value; the counter is forgotten `ttl_ms` after its last change (0: never).
    pub fn counter_add(key: &str, delta: i64, ttl_ms: u64) -> i64 {
        h::counter_add(key, delta, ttl_ms)
    }

    /// A shared counter's value (0 when unknown or expired).
    pub fn counter_get(key: &str) -> i64 {
        h::counter_get(key)
    }

    /// The `count` live counters under `prefix` with the largest values, largest first. Walks
    /// all of the plugin's counters: for reports and window rollovers, not for every command.
    pub fn counter_top(prefix: &str, count: u32) -> Vec<(String, i64)> {
        h::counter_top(prefix, count)
    }
}

/// Reads the plugin's configuration (the TOML text `init` gets) into `T`, with a message
/// that names the offending field when it does not fit. Needs the `config` feature.
#[cfg(feature = "config")]
pub fn config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
}

/// Writes a line to respire's log (same as [`host::log`]).
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

/// Milliseconds since the Unix epoch (same as [`host::now_ms`]).
pub fn now_ms() -> u64 {
    host::now_ms()
}

/// Encoders for replies a plugin answers with, and a reader for replies it sees.
pub mod reply {
    /// `+text`
    pub fn simple(text: &str) -> Vec<u8> {
        format!("+{text}\r\n").into_bytes()
    }

    /// `-text` (text starts with the error code, e.g. `ERR …`).
    pub fn error(text: &str) -> Vec<u8> {
        format!("-{text}\r\n").into_bytes()
    }

    /// `:n`
    pub fn int(n: i64) -> Vec<u8> {
        format!(":{n}\r\n").into_bytes()
    }

    /// `$len\r\ndata`
    pub fn bulk(data: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The RESP2 null bulk string `$-1`.
    pub fn null() -> Vec<u8> {
        b"$-1\r\n".to_vec()
    }

    /// An array of already encoded replies.
    pub fn array(items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", items.len()).into_bytes();
        for i in items {
            out.extend_from_slice(i);
        }
        out
    }

    /// A parsed reply, borrowing from the bytes.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value<'a> {
        /// `+text`
        Simple(&'a [u8]),
        /// `-text` or `!blob`
        Error(&'a [u8]),
        /// `:n`
        Int(i64),
        /// `$data`, `=verbatim` (with its `txt:` prefix) or `(big number` text
        Bulk(&'a [u8]),
        /// `$-1`, `*-1` or `_`
        Nil,
        /// `,d`
        Double(f64),
        /// `#t` / `#f`
        Bool(bool),
        /// `*`, `~` (set) or `>` (push) elements
        Array(Vec<Value<'a>>),
        /// `%` pairs (and `|` attributes, which precede a reply)
        Map(Vec<(Value<'a>, Value<'a>)>),
    }

    fn line(b: &[u8]) -> Option<(&[u8], usize)> {
        let end = b.windows(2).position(|w| w == b"\r\n")?;
        Some((&b[..end], end + 2))
    }

    fn number(b: &[u8]) -> Option<i64> {
        std::str::from_utf8(b).ok()?.parse().ok()
    }

    /// Parses one reply at the start of `b`: the value and the bytes it took.
    pub fn parse(b: &[u8]) -> Option<(Value<'_>, usize)> {
        parse_depth(b, 0)
    }

    fn parse_depth(b: &[u8], depth: usize) -> Option<(Value<'_>, usize)> {
        if depth > 64 {
            return None;
        }
        let (&t, rest) = b.split_first()?;
        let (text, used) = line(rest)?;
        let used = used + 1;
        let blob = |len: i64| -> Option<(&[u8], usize)> {
            let end = used.checked_add(usize::try_from(len).ok()?)?;
            let data = b.get(used..end)?;
            (b.get(end..end.checked_add(2)?)? == b"\r\n").then_some((data, end + 2))
        };
        let items = |n: usize, mut at: usize| -> Option<(Vec<Value<'_>>, usize)> {
            let mut v = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let (x, u) = parse_depth(b.get(at..)?, depth + 1)?;
                v.push(x);
                at += u;
            }
            Some((v, at))
        };
        Some(match t {
            b'+' => (Value::Simple(text), used),
            b'-' => (Value::Error(text), used),
            b':' => (Value::Int(number(text)?), used),
            b'_' => (Value::Nil, used),
            b'#' => (Value::Bool(text == b"t"), used),
            b',' => (
                Value::Double(
                    std::str::from_utf8(text)
                        .ok()?
                        .replace("inf", "Infinity")
                        .parse()
                        .ok()?,
                ),
                used,
            ),
            b'(' => (Value::Bulk(text), used),
            b'$' | b'=' | b'!' => {
                let n = number(text)?;
                if n < 0 {
                    return Some((Value::Nil, used));
                }
                let (data, u) = blob(n)?;
                (
                    if t == b'!' {
                        Value::Error(data)
                    } else {
                        Value::Bulk(data)
                    },
                    u,
                )
            }
            b'*' | b'~' | b'>' => {
                let n = number(text)?;
                if n < 0 {
                    return Some((Value::Nil, used));
                }
                let (v, u) = items(usize::try_from(n).ok()?, used)?;
                (Value::Array(v), u)
            }
            b'%' | b'|' => {
                let n = usize::try_from(number(text)?).ok()?;
                let (v, u) = items(n.checked_mul(2)?, used)?;
                let mut pairs = Vec::with_capacity(n);
                let mut it = v.into_iter();
                while let (Some(k), Some(x)) = (it.next(), it.next()) {
                    pairs.push((k, x));
                }
                if t == b'|' {
                    // Attributes annotate the reply that follows: return that reply.
                    let (next, u2) = parse_depth(b.get(u..)?, depth + 1)?;
                    return Some((next, u + u2));
                }
                (Value::Map(pairs), u)
            }
            _ => return None,
        })
    }
}

/// Exports a [`Plugin`] type as the component's implementation. Use once per plugin crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        thread_local! {
            static __RESPIRE_STATE: ::std::cell::RefCell<Option<$plugin>> = const { ::std::cell::RefCell::new(None) };
        }

        struct __RespireExport;

        impl $crate::bindings::Guest for __RespireExport {
            fn init(config: String) -> Result<$crate::Manifest, String> {
                $crate::host::new_call();
                let (state, manifest) = <$plugin as $crate::Plugin>::init(&config)?;
                __RESPIRE_STATE.with(|s| *s.borrow_mut() = Some(state));
                Ok(manifest)
            }

            fn on_requests(
                batch: $crate::bindings::respire::plugin::types::RequestBatch,
            ) -> $crate::bindings::respire::plugin::types::RequestResults {
                let mut effects = $crate::Effects::default();
                let mut decisions = Vec::new();
                $crate::host::new_call();
                __RESPIRE_STATE.with(|s| {
                    let mut state = s.borrow_mut();
                    let Some(p) = state.as_mut() else { return };
                    for (i, words) in batch.requests.chunks_exact($crate::REQUEST_WORDS).enumerate() {
                        let (client, command) = $crate::Command::from_batch(&batch.data, &batch.ends, &batch.keys, words);
                        effects.at(i as u32);
                        let action =
                            $crate::clients::with(client, |client| <$plugin as $crate::Plugin>::on_request(p, client, &command, &mut effects));
                        effects.done(&action);
                        if !matches!(action, $crate::RequestAction::Continue) {
                            decisions.push($crate::bindings::respire::plugin::types::Decision { request: i as u32, action });
                        }
                    }
                });
                let (takes, updates, repeatable, counters) = effects.into_parts();
                $crate::bindings::respire::plugin::types::RequestResults { decisions, takes, updates, counters, repeatable }
            }

            fn on_responses(
                batch: $crate::bindings::respire::plugin::types::ResponseBatch,
            ) -> $crate::bindings::respire::plugin::types::ResponseResults {
                let mut effects = $crate::Effects::default();
                let mut replacements = Vec::new();
                $crate::host::new_call();
                __RESPIRE_STATE.with(|s| {
                    let mut state = s.borrow_mut();
                    let Some(p) = state.as_mut() else { return };
                    for (i, words) in batch.responses.chunks_exact($crate::RESPONSE_WORDS).enumerate() {
                        let (client, command) = $crate::Command::from_batch(&batch.data, &batch.ends, &batch.keys, words);
                        let raw = batch.replies.get(words[9] as usize..words[10] as usize).unwrap_or_default();
                        let reply = $crate::Reply::new(raw, u64::from(words[11]) | (u64::from(words[12]) << 32));
                        effects.at(i as u32);
                        let action = $crate::clients::with(client, |client| {
                            <$plugin as $crate::Plugin>::on_response(p, client, &command, &reply, &mut effects)
                        });
                        if let $crate::ResponseAction::Replace(reply) = action {
                            replacements.push($crate::bindings::respire::plugin::types::Replacement { response: i as u32, reply });
                        }
                    }
                    <$plugin as $crate::Plugin>::after_responses(p, &mut effects);
                });
                let (_, updates, _, counters) = effects.into_parts();
                $crate::bindings::respire::plugin::types::ResponseResults { replacements, updates, counters }
            }
        }

        $crate::bindings::export_component!(__RespireExport with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_metric_changes_or_a_rewrite_is_not_repeatable() {
        let mut fx = Effects::default();
        // 0: marked, nothing else — kept.
        fx.at(0);
        fx.repeatable();
        fx.repeatable();
        fx.done(&RequestAction::Continue);
        // 1: marked, but it changed a metric — dropped.
        fx.at(1);
        fx.repeatable();
        fx.update(Series(3), 1.0);
        fx.done(&RequestAction::Continue);
        // 2: marked and rewritten — dropped.
        fx.at(2);
        fx.repeatable();
        fx.done(&RequestAction::Rewrite(vec![
            b"get".to_vec(),
            b"k".to_vec(),
        ]));
        // 3: not marked; 4: marked, with a take and a refusal — kept.
        fx.at(3);
        fx.done(&RequestAction::Continue);
        fx.at(4);
        fx.take(LimiterId(0), "10.0.0.1", 1);
        fx.repeatable();
        fx.done(&RequestAction::Deny("NOPERM no".into()));
        // 5: marked, but it added to a counter — dropped.
        fx.at(5);
        fx.repeatable();
        fx.counter_add("hits:x", 2, 1000);
        fx.done(&RequestAction::Continue);
        fx.at(6);
        fx.counter_add("", -1, 0);
        fx.done(&RequestAction::Continue);
        let (takes, updates, repeatable, counters) = fx.into_parts();
        assert_eq!(counters.keys, b"hits:x");
        assert_eq!(counters.key_ends, vec![6, 6]);
        assert_eq!(counters.deltas, vec![2, -1]);
        assert_eq!(counters.ttls_ms, vec![1000, 0]);
        assert_eq!(repeatable, vec![0, 4]);
        assert_eq!(updates.series, vec![3]);
        assert_eq!(takes.len(), 1);
        assert_eq!(takes[0].request, 4);
    }
}
