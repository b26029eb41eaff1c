//! Write respire plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`]: `init` reads the plugin's
//! configuration and says what it wants to see (commands, categories, hooks) and
//! what it records (metrics, token buckets); the hooks it does not override let
//! every command through. Hooks return a decision and may add [`Effects`] (tokens
//! to take, metric changes) that respire applies after the call, which is cheaper
//! than calling the [`host`] once per effect. [`export_plugin!`] turns it into the
//! component respire loads. Build it for `wasm32-wasip2` and drop the `.wasm`
//! file into respire's plugin folder.
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
    ClientRef, CacheFor, CacheSettings, Category, Client, Key, KeyAccess, Limiter, Manifest, Metric, MetricKind, MetricUpdate, RequestAction,
    ResponseAction, Take,
};

/// A command as a plugin sees it: the lower-case name, zero-copy views of the arguments,
/// its ACL categories and its keys.
pub struct Command {
    /// The command name in lower case.
    pub name: String,
    /// Its ACL categories (empty when respire does not know the command).
    pub categories: Category,
    data: Vec<u8>,
    ends: Vec<u32>,
    keys: Vec<Key>,
}

impl Command {
    #[doc(hidden)]
    pub fn from_wit(c: bindings::respire::plugin::types::Command) -> Command {
        let name_end = c.ends.first().map_or(0, |e| *e as usize);
        let name = String::from_utf8_lossy(c.data.get(..name_end).unwrap_or_default()).into_owned();
        Command { name, categories: c.categories, data: c.data, ends: c.ends, keys: c.keys }
    }

    /// Whether the command is in all of these categories (`Category::WRITE`, …).
    pub fn is(&self, categories: Category) -> bool {
        self.categories.contains(categories)
    }

    /// Its keys, with whether the command reads or writes each.
    pub fn keys(&self) -> impl Iterator<Item = (&[u8], KeyAccess)> {
        self.keys.iter().filter_map(|k| Some((self.arg(k.index as usize)?, k.access)))
    }

    /// Number of arguments after the name.
    pub fn len(&self) -> usize {
        self.ends.len().saturating_sub(1)
    }

    /// Whether the command has no arguments.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Argument `i` (0 is the first argument after the name).
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        let start = *self.ends.get(i)? as usize;
        let end = *self.ends.get(i + 1)? as usize;
        self.data.get(start..end)
    }

    /// Bytes of the name and all arguments together.
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// Every argument after the name.
    pub fn args(&self) -> impl Iterator<Item = &[u8]> {
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
    ALL.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, c)| *c)
}

/// Names a metric by its position among the manifest's metrics (the first declared is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricId(pub u32);

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
            metrics: Vec::new(),
            limiters: Vec::new(),
            cache: None,
            serves: Vec::new(),
        }
    }

    /// Run the hooks for these commands (lower case).
    pub fn commands(mut self, names: &[&str]) -> Manifest {
        self.commands.extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Run the hooks for commands in these ACL categories (`read`, `write`, …, or `all`).
    pub fn categories(mut self, names: &[&str]) -> Manifest {
        self.categories.extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Also call `on_response`.
    pub fn with_responses(mut self) -> Manifest {
        self.on_response = true;
        self
    }

    /// Commands this plugin implements (`metrics.hotkeys`): `on_request` is called for them
    /// whatever else the manifest says, and should answer them with `Respond` or `Deny`.
    pub fn serves(mut self, names: &[&str]) -> Manifest {
        self.serves.extend(names.iter().map(|n| n.to_ascii_lowercase()));
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
        self.limiters.push(Limiter { name: name.to_string(), rate: rate_per_second, burst, shared: false });
        self
    }

    /// Declares a token bucket kept in the backend Redis, so that every respire process in
    /// front of it enforces one quota (a round trip to Redis per take); the next id is
    /// `LimiterId(number declared before)`.
    pub fn shared_limiter(mut self, name: &str, rate_per_second: f64, burst: u32) -> Manifest {
        self.limiters.push(Limiter { name: name.to_string(), rate: rate_per_second, burst, shared: true });
        self
    }

    /// Uses respire's response cache for keys under these prefixes (empty: every key), holding
    /// at most `max_memory` bytes. Hooks then answer [`RequestAction::Cache`] for what to cache.
    pub fn cache(mut self, prefixes: &[&str], max_memory: u64) -> Manifest {
        self.cache = Some(CacheSettings { prefixes: prefixes.iter().map(|p| p.to_string()).collect(), max_memory });
        self
    }
}

impl Metric {
    fn of(kind: MetricKind, name: &str, help: &str) -> Metric {
        Metric { name: name.to_string(), help: help.to_string(), kind, labels: Vec::new(), buckets: Vec::new() }
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

/// Effects a hook asks respire to apply after it returns: token takes and metric changes.
/// Returning them costs nothing extra; calling the host for each would cost a call each.
#[derive(Default)]
pub struct Effects {
    takes: Vec<Take>,
    metrics: Vec<MetricUpdate>,
}

impl Effects {
    /// Take `cost` tokens from bucket `key` of `limiter` before the command goes on; if the
    /// bucket has too few, respire refuses the command with
    /// `ERR rate limit '<limiter>' exceeded, retry in <n> ms` and takes nothing.
    /// Only request hooks may take tokens.
    pub fn take(&mut self, limiter: LimiterId, key: impl Into<String>, cost: u32) {
        self.takes.push(Take { limiter: limiter.0, key: key.into(), cost });
    }

    /// Changes a metric: a counter adds `value`, a gauge is set to it, a histogram observes it.
    pub fn record(&mut self, metric: MetricId, labels: &[&str], value: f64) {
        self.metrics.push(MetricUpdate { metric: metric.0, labels: labels.iter().map(|l| l.to_string()).collect(), value });
    }

    /// Adds 1 to a counter.
    pub fn inc(&mut self, metric: MetricId, labels: &[&str]) {
        self.record(metric, labels, 1.0);
    }

    #[doc(hidden)]
    pub fn into_parts(self) -> (Vec<Take>, Vec<MetricUpdate>) {
        (self.takes, self.metrics)
    }
}

/// A reply as a response hook sees it: the complete RESP bytes and how long it took.
pub struct Reply {
    raw: Vec<u8>,
    elapsed_us: u64,
}

impl Reply {
    #[doc(hidden)]
    pub fn new(raw: Vec<u8>, elapsed_us: u64) -> Reply {
        Reply { raw, elapsed_us }
    }

    /// The reply exactly as Redis (or respire) sent it.
    pub fn raw(&self) -> &[u8] {
        &self.raw
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
    pub fn value(&self) -> Option<reply::Value<'_>> {
        reply::parse(&self.raw).map(|(v, _)| v)
    }
}

/// A respire plugin. Only `init` is required; every hook lets the command through by default.
pub trait Plugin: Sized + 'static {
    /// Reads the plugin's configuration (TOML text, possibly empty) and says what the plugin
    /// wants to see. An error keeps the plugin from loading, with this reason.
    fn init(config: &str) -> Result<(Self, Manifest), String>;

    /// Runs before a matching command goes to Redis. Default: continue.
    fn on_request(&mut self, _client: &Client, _command: &Command, _effects: &mut Effects) -> RequestAction {
        RequestAction::Continue
    }

    /// Runs with the reply to a matching command, before the client gets it. Default: continue.
    fn on_response(&mut self, _client: &Client, _command: &Command, _reply: &Reply, _effects: &mut Effects) -> ResponseAction {
        ResponseAction::Continue
    }
}

/// The details of clients, cached by id and generation, so that hooks receive only a
/// [`ClientRef`] and the strings cross from respire only when a client changes.
#[doc(hidden)]
pub mod clients {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use crate::{Client, ClientRef};

    /// Most clients remembered at once (the cache starts over beyond it).
    const MAX: usize = 4096;

    thread_local! {
        static CACHE: RefCell<HashMap<u64, (u32, Client)>> = RefCell::new(HashMap::new());
    }

    /// Runs `f` with the details of `r`, fetching them from respire when they changed.
    pub fn with<T>(r: ClientRef, f: impl FnOnce(&Client) -> T) -> T {
        CACHE.with(|c| {
            let fresh = c.borrow().get(&r.id).is_some_and(|(g, _)| *g == r.generation);
            if !fresh {
                let details = crate::bindings::respire::plugin::host::client_info();
                let mut c = c.borrow_mut();
                if c.len() >= MAX {
                    c.clear();
                }
                c.insert(r.id, (r.generation, details));
            }
            let c = c.borrow();
            match c.get(&r.id) {
                Some((_, client)) => f(client),
                None => f(&crate::bindings::respire::plugin::host::client_info()),
            }
        })
    }
}

/// Calls into respire. Each costs about as much as a hook call: prefer [`Effects`] in hooks.
pub mod host {
    use crate::bindings::respire::plugin::host as h;
    use crate::{Level, LimiterId, MetricId, MetricUpdate};

    /// Writes a line to respire's log, tagged with the plugin's name.
    pub fn log(level: Level, message: &str) {
        h::log(level, message);
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms() -> u64 {
        h::now_ms()
    }

    /// Changes a metric now (a counter adds, a gauge is set, a histogram observes).
    pub fn record(metric: MetricId, labels: &[&str], value: f64) {
        h::record_metric(&MetricUpdate { metric: metric.0, labels: labels.iter().map(|l| l.to_string()).collect(), value });
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
            b',' => (Value::Double(std::str::from_utf8(text).ok()?.replace("inf", "Infinity").parse().ok()?), used),
            b'(' => (Value::Bulk(text), used),
            b'$' | b'=' | b'!' => {
                let n = number(text)?;
                if n < 0 {
                    return Some((Value::Nil, used));
                }
                let (data, u) = blob(n)?;
                (if t == b'!' { Value::Error(data) } else { Value::Bulk(data) }, u)
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
                let (state, manifest) = <$plugin as $crate::Plugin>::init(&config)?;
                __RESPIRE_STATE.with(|s| *s.borrow_mut() = Some(state));
                Ok(manifest)
            }

            fn on_request(
                client: $crate::ClientRef,
                command: $crate::bindings::respire::plugin::types::Command,
            ) -> $crate::bindings::respire::plugin::types::RequestResult {
                let command = $crate::Command::from_wit(command);
                let mut effects = $crate::Effects::default();
                let action = $crate::clients::with(client, |client| {
                    __RESPIRE_STATE.with(|s| match s.borrow_mut().as_mut() {
                        Some(p) => <$plugin as $crate::Plugin>::on_request(p, client, &command, &mut effects),
                        None => $crate::RequestAction::Continue,
                    })
                });
                let (takes, metrics) = effects.into_parts();
                $crate::bindings::respire::plugin::types::RequestResult { action, takes, metrics }
            }

            fn on_response(
                client: $crate::ClientRef,
                command: $crate::bindings::respire::plugin::types::Command,
                reply: Vec<u8>,
                elapsed_us: u64,
            ) -> $crate::bindings::respire::plugin::types::ResponseResult {
                let command = $crate::Command::from_wit(command);
                let reply = $crate::Reply::new(reply, elapsed_us);
                let mut effects = $crate::Effects::default();
                let action = $crate::clients::with(client, |client| {
                    __RESPIRE_STATE.with(|s| match s.borrow_mut().as_mut() {
                        Some(p) => <$plugin as $crate::Plugin>::on_response(p, client, &command, &reply, &mut effects),
                        None => $crate::ResponseAction::Continue,
                    })
                });
                let (_, metrics) = effects.into_parts();
                $crate::bindings::respire::plugin::types::ResponseResult { action, metrics }
            }
        }

        $crate::bindings::export_component!(__RespireExport with_types_in $crate::bindings);
    };
}
