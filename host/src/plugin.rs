//! WebAssembly plugins: the wasmtime component host.
//!
//! One [`Engine`] for the process (component model, epoch interruption for the
//! per-call time budget, no concurrency support: measured ≈3× cheaper calls).
//! Plugins are compiled and checked once (`init` must return a manifest) and
//! kept as `PluginPre`s in a [`PluginSet`]; each worker instantiates its own
//! instance of every plugin on first use and reuses it for every call (never
//! one per request). A store carries a memory cap (`StoreLimits`) and an epoch
//! deadline set before each call; a thread advances the epoch every
//! millisecond. Plugins get only what Rust's std needs from WASI (random
//! numbers, clocks, an empty environment); files, sockets, stdout/stderr and
//! every other import trap.
//!
//! A trap (panic, time budget, memory cap) applies the plugin's `on_error`
//! policy — `open` lets the command through, `closed` refuses it — is counted,
//! logged, and the instance is dropped; the next call makes a fresh one.
//!
//! The plugin folder is watched ([`watch`]): changes are compiled and checked
//! off the request path and swapped in atomically. Compiled code is cached by
//! content hash in memory and on disk (`Runtime::compile`).
//!
//! Hooks return their effects with their decision — token takes and metric
//! updates — which the host applies after the call ([`PluginCtx`]); token
//! buckets and counters live in [`crate::state`], shared by all workers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use smallvec::SmallVec;
use thiserror::Error;
use tracing::{info, warn};
use wasmtime::component::{Component, ComponentType, Linker, Lower};
use wasmtime::{Config, Engine, ResourceLimiter, Store};

use crate::commands::CommandTable;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

mod traffic;

pub use bindings::respire::plugin::types::{
    Client, CounterChanges, Manifest, MetricKind as WitMetricKind, RequestAction, RequestBatch,
    RequestResults, ResponseBatch, ResponseResults, Update, Updates,
};
use bindings::{Plugin, PluginPre};

use crate::metrics::{PluginMetric, plugin_stats};
use crate::state::{Rule, SharedState};

/// Why a plugin could not be loaded.
#[derive(Debug, Error)]
pub enum PluginError {
    /// The file could not be read or is not a valid component.
    #[error("{path}: {message}")]
    Load {
        /// The plugin file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Its settings file is invalid.
    #[error("{path}: {message}")]
    Settings {
        /// The settings file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// `init` refused the configuration or trapped.
    #[error("{name}: init failed: {message}")]
    Init {
        /// The plugin's file name.
        name: String,
        /// What it said.
        message: String,
    },
}

/// What happens to a command when its plugin fails (trap, time budget, memory cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The command goes on as if the plugin had said continue.
    #[default]
    Open,
    /// The command is refused with an error.
    Closed,
}

/// `NAME.toml` beside `NAME.wasm`: how respire runs the plugin, and the plugin's own `[config]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginSettings {
    /// Position in the chain (lower runs first; ties by file name). Default: 100.
    pub order: i32,
    /// What a failure does to the command: "open" or "closed". Default: "open".
    pub on_error: OnError,
    /// CPU time a call may use per command (a batch of n commands gets n times it, at most 64
    /// times). Default: "1ms".
    #[serde(with = "humantime_serde")]
    pub time_budget: Duration,
    /// Memory cap of one instance. Default: "16MiB".
    pub max_memory: bytesize::ByteSize,
    /// The plugin's own configuration, passed to its `init` as TOML text. Default: empty.
    pub config: toml::Table,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            order: 100,
            on_error: OnError::Open,
            time_budget: Duration::from_millis(1),
            max_memory: bytesize::ByteSize::mib(16),
            config: toml::Table::new(),
        }
    }
}

/// Store data of one plugin instance.
pub struct StoreData {
    /// Memory cap of the instance in bytes.
    max_memory: usize,
    /// The cap refused a growth since the last call began.
    memory_denied: bool,
    name: Arc<str>,
    /// What the host imports work on (absent while the first instance's `init` runs, before
    /// the manifest is known).
    ctx: Option<Arc<PluginCtx>>,
    /// The time budget of a call.
    budget: Duration,
    /// Set when the current call ran past its budget in wall time: the thread's CPU time then,
    /// and how many times the deadline was extended since.
    overtime: Option<(Option<Duration>, u32)>,
    /// The clients of the current batch (for the `client-info` import).
    clients: Vec<Arc<Client>>,
}

/// A client as hooks get it: its details, and a generation that changes with them (hooks
/// receive only the id and generation; the SDK asks for the details when they changed).
#[derive(Clone)]
pub struct ClientHandle {
    /// The details.
    pub details: Arc<Client>,
    /// Changes whenever the details do.
    pub generation: u32,
}

impl ClientHandle {
    /// The client's id and generation as a batch carries them.
    fn words(&self) -> [u32; 3] {
        [
            self.details.id as u32,
            (self.details.id >> 32) as u32,
            self.generation,
        ]
    }
}

impl ResourceLimiter for StoreData {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        16
    }
}

/// What a loaded plugin's instances share: its declared metrics and limiters, the host
/// state, and respire's counters about it.
pub struct PluginCtx {
    name: Arc<str>,
    metrics: Vec<Arc<PluginMetric>>,
    /// Series numbers handed out by `host.series` (shared by every worker's instance).
    series: std::sync::Mutex<SeriesIds>,
    limiters: Vec<LimiterDef>,
    /// Some limiter is shared.
    has_shared: bool,
    state: Arc<SharedState>,
    stats: HookStats,
    /// The metrics respire records for it per reply.
    traffic: traffic::Traffic,
}

/// The series numbers of one loaded plugin: label values by number and back.
#[derive(Default)]
struct SeriesIds {
    by_labels: std::collections::HashMap<(u32, Vec<String>), u32>,
    all: Vec<(u32, Vec<String>)>,
}

/// Most series numbers one plugin gets (1000 per metric are kept; this bounds the rest).
const MAX_SERIES_IDS: usize = 1 << 16;

/// A worker's handle on one series, updated without atomics and flushed after each batch.
enum LocalSeries {
    Counter(prometheus::local::LocalCounter),
    Histogram(crate::metrics::LocalHistogram),
    Gauge(prometheus::Gauge),
    /// Cannot be updated (its labels did not fit, or its metric is full).
    Dropped,
}

/// A worker's series of one plugin, by number, and which were touched since the last flush.
#[derive(Default)]
struct LocalMetrics {
    series: Vec<Option<LocalSeries>>,
    /// The series updated since the last flush, each once (`dirty` says which are listed).
    touched: Vec<u32>,
    dirty: Vec<bool>,
}

/// respire's counters for one plugin, resolved once.
struct HookStats {
    request_seconds: prometheus::Histogram,
    response_seconds: prometheus::Histogram,
    request_ok: prometheus::IntCounter,
    request_err: prometheus::IntCounter,
    /// Commands decided again by a repeatable decision, without a call.
    request_repeated: prometheus::IntCounter,
    response_ok: prometheus::IntCounter,
    response_err: prometheus::IntCounter,
}

impl HookStats {
    fn new(plugin: &str) -> HookStats {
        let c = &plugin_stats().calls;
        let t = &plugin_stats().call_seconds;
        HookStats {
            request_seconds: t.with_label_values(&[plugin, "request"]),
            response_seconds: t.with_label_values(&[plugin, "response"]),
            request_ok: c.with_label_values(&[plugin, "request", "ok"]),
            request_err: c.with_label_values(&[plugin, "request", "error"]),
            request_repeated: c.with_label_values(&[plugin, "request", "repeated"]),
            response_ok: c.with_label_values(&[plugin, "response", "ok"]),
            response_err: c.with_label_values(&[plugin, "response", "error"]),
        }
    }
}

impl PluginCtx {
    /// The number of a series (`host.series`), made when new.
    fn series_id(&self, metric: u32, labels: Vec<String>) -> Option<u32> {
        let m = self.metrics.get(metric as usize)?;
        let mut ids = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let key = (metric, labels);
        if let Some(id) = ids.by_labels.get(&key) {
            return Some(*id);
        }
        // Check the labels (and the metric's cap) before numbering them.
        m.series(&key.1)?;
        if ids.all.len() >= MAX_SERIES_IDS {
            m.note_dropped();
            return None;
        }
        let id = ids.all.len() as u32;
        ids.all.push(key.clone());
        ids.by_labels.insert(key, id);
        Some(id)
    }

    /// The metric and labels of series `id`.
    fn series_labels(&self, id: u32) -> Option<(Arc<PluginMetric>, Vec<String>)> {
        let ids = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let (metric, labels) = ids.all.get(id as usize)?;
        Some((self.metrics.get(*metric as usize)?.clone(), labels.clone()))
    }

    /// Applies an update now, through the shared series (the `record-update` import).
    fn record_now(&self, u: &Update) {
        match self.series_labels(u.series) {
            Some((m, labels)) => m.record(&labels, u.value),
            None => plugin_stats()
                .dropped_updates
                .with_label_values(&[&*self.name])
                .inc(),
        }
    }

    /// Applies a hook's counter changes, in order.
    fn add_to_counters(&self, c: &CounterChanges) {
        let now = std::time::Instant::now();
        for (key, delta, ttl) in counter_changes(c) {
            self.state.counter_add_at(&self.name, &key, delta, ttl, now);
        }
    }

    /// Applies a hook's updates through this worker's series; [`LocalMetrics::flush`] makes
    /// them visible.
    fn apply(&self, local: &mut LocalMetrics, updates: &Updates) {
        for (&series, &value) in updates.series.iter().zip(&updates.values) {
            self.apply_one(local, series, value);
        }
    }

    /// Applies one update through this worker's series.
    #[inline]
    fn apply_one(&self, local: &mut LocalMetrics, series: u32, value: f64) {
        // The common case first: a known counter or histogram and a finite value.
        let i = series as usize;
        if let (Some(Some(entry)), Some(dirty)) = (local.series.get_mut(i), local.dirty.get_mut(i))
            && value.is_finite()
        {
            let done = match entry {
                LocalSeries::Counter(c) if value >= 0.0 => {
                    c.inc_by(value);
                    true
                }
                LocalSeries::Histogram(h) => {
                    h.observe(value);
                    true
                }
                _ => false,
            };
            if done {
                if !*dirty {
                    *dirty = true;
                    local.touched.push(series);
                }
                return;
            }
        }
        self.apply_slow(local, series, value);
    }

    /// This worker's handle on series `id`, made when first needed (`None` past the most
    /// series numbers a plugin gets).
    fn local_series<'l>(
        &self,
        local: &'l mut LocalMetrics,
        id: u32,
    ) -> Option<&'l mut LocalSeries> {
        let i = id as usize;
        if local.series.len() <= i {
            if i >= MAX_SERIES_IDS {
                return None;
            }
            local.series.resize_with(i + 1, || None);
            local.dirty.resize(i + 1, false);
        }
        let slot = local.series.get_mut(i)?;
        Some(slot.get_or_insert_with(|| match self.series_labels(id) {
            Some((m, labels)) => match m.series(&labels) {
                Some(crate::metrics::Series::Counter(c)) => LocalSeries::Counter(c.local()),
                Some(crate::metrics::Series::Histogram(h)) => LocalSeries::Histogram(h.local()),
                Some(crate::metrics::Series::Gauge(g)) => LocalSeries::Gauge(g),
                None => LocalSeries::Dropped,
            },
            None => LocalSeries::Dropped,
        }))
    }

    /// [`PluginCtx::apply_one`] for the rest: a series seen for the first time, a gauge, a
    /// value that cannot be applied.
    #[inline(never)]
    fn apply_slow(&self, local: &mut LocalMetrics, series: u32, value: f64) {
        let i = series as usize;
        if value.is_nan() {
            // A gauge set to NaN: the series goes (and is made again if set later).
            if let Some((m, labels)) = self.series_labels(series) {
                m.remove(&labels);
            }
            if let Some(s) = local.series.get_mut(i) {
                *s = None;
            }
            return;
        }
        let Some(entry) = self.local_series(local, series) else {
            plugin_stats()
                .dropped_updates
                .with_label_values(&[&*self.name])
                .inc();
            return;
        };
        let ok = value.is_finite();
        match entry {
            LocalSeries::Counter(c) if ok && value >= 0.0 => c.inc_by(value),
            LocalSeries::Histogram(h) if ok => h.observe(value),
            LocalSeries::Gauge(g) if ok => g.set(value),
            _ => {
                plugin_stats()
                    .dropped_updates
                    .with_label_values(&[&*self.name])
                    .inc();
                return;
            }
        }
        // Listed once per flush however often it changed (a batch updates the same few
        // series for most of its commands).
        if let Some(d) = local.dirty.get_mut(i)
            && !*d
        {
            *d = true;
            local.touched.push(series);
        }
    }

    fn take(&self, limiter: u32, key: &str, cost: u32) -> Result<u32, u64> {
        match self.limiters.get(limiter as usize) {
            Some(l) => self.state.take(&self.name, &l.name, l.rule, key, cost),
            None => Err(u64::MAX),
        }
    }

    /// The bucket (limiter, key) of a command's takes when it is one take from a bucket held in
    /// respire, by a plugin without shared limiters: such takes of consecutive commands may be
    /// summed.
    fn single_local_take<'t>(
        &self,
        takes: &[&'t bindings::respire::plugin::types::Take],
    ) -> Option<(u32, &'t str)> {
        match takes {
            [t] if !self.has_shared
                && self
                    .limiters
                    .get(t.limiter as usize)
                    .is_some_and(|l| !l.shared) =>
            {
                Some((t.limiter, t.key.as_str()))
            }
            _ => None,
        }
    }

    /// Takes every local bucket's tokens, or none: the error text when one bucket is short.
    /// Takes on shared limiters go to `gate` (respire asks Redis before the command goes on);
    /// the local takes of a plugin with shared limiters are noted there too, to be given back
    /// if Redis refuses.
    fn take_all(
        self: &Arc<Self>,
        takes: &[&bindings::respire::plugin::types::Take],
        gate: &mut Option<Box<Gate>>,
    ) -> Result<(), String> {
        for (i, t) in takes.iter().enumerate() {
            let Some(l) = self.limiters.get(t.limiter as usize) else {
                self.refund(&takes[..i]);
                return Err(format!(
                    "ERR rate limit #{} is not declared by plugin {}",
                    t.limiter, self.name
                ));
            };
            if l.shared {
                let g = gate.get_or_insert_default();
                g.shared.push(SharedTake {
                    ctx: self.clone(),
                    limiter: l.name.clone(),
                    rule: l.rule,
                    key: t.key.clone(),
                    cost: t.cost,
                });
                continue;
            }
            if let Err(wait) = self.state.take(&self.name, &l.name, l.rule, &t.key, t.cost) {
                self.refund(&takes[..i]);
                plugin_stats()
                    .rate_limited
                    .with_label_values(&[&*self.name, &l.name])
                    .inc();
                return Err(rate_limit_error(&l.name, wait));
            }
        }
        if self.has_shared {
            let g = gate.get_or_insert_default();
            for t in takes {
                if let Some(l) = self.limiters.get(t.limiter as usize).filter(|l| !l.shared) {
                    g.refunds
                        .push((self.clone(), l.name.clone(), t.key.clone(), t.cost));
                }
            }
        }
        Ok(())
    }

    /// Gives back the local tokens of these takes.
    fn refund(&self, takes: &[&bindings::respire::plugin::types::Take]) {
        for t in takes {
            if let Some(l) = self.limiters.get(t.limiter as usize).filter(|l| !l.shared) {
                self.state.refund(&self.name, &l.name, &t.key, t.cost);
            }
        }
    }
}

impl LocalMetrics {
    /// Adds `value` `n` times to a counter or histogram this worker already has a handle on
    /// (see [`PluginCtx::local_series`]); false for any other series.
    fn add_n(&mut self, series: u32, value: f64, n: u64) -> bool {
        let i = series as usize;
        match self.series.get_mut(i) {
            Some(Some(LocalSeries::Counter(c))) => c.inc_by(value * n as f64),
            Some(Some(LocalSeries::Histogram(h))) => h.observe_n(value, n),
            _ => return false,
        }
        if let Some(d) = self.dirty.get_mut(i)
            && !*d
        {
            *d = true;
            self.touched.push(series);
        }
        true
    }

    /// Moves what this worker counted since the last flush into the shared series.
    fn flush(&mut self) {
        for id in self.touched.drain(..) {
            if let Some(d) = self.dirty.get_mut(id as usize) {
                *d = false;
            }
            match self.series.get_mut(id as usize) {
                Some(Some(LocalSeries::Counter(c))) => c.flush(),
                Some(Some(LocalSeries::Histogram(h))) => h.flush(),
                _ => {}
            }
        }
    }
}

/// A hook's counter changes as (key, delta, time to live). A key that is not a range of the
/// keys' bytes is skipped; lists of different lengths are cut to the shortest.
fn counter_changes(
    c: &CounterChanges,
) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, i64, Duration)> {
    let mut start = 0;
    c.key_ends
        .iter()
        .zip(&c.deltas)
        .zip(&c.ttls_ms)
        .filter_map(move |((&end, &delta), &ttl)| {
            let end = end as usize;
            let key = c.keys.get(start..end);
            start = end;
            Some((
                String::from_utf8_lossy(key?),
                delta,
                Duration::from_millis(ttl),
            ))
        })
}

/// The error a client gets when a bucket is empty (`wait`: ms until it has enough tokens;
/// `u64::MAX`: never).
pub fn rate_limit_error(limiter: &str, wait: u64) -> String {
    if wait == u64::MAX {
        format!(
            "ERR rate limit '{limiter}' exceeded, and this command costs more than the limit allows"
        )
    } else {
        format!("ERR rate limit '{limiter}' exceeded, retry in {wait} ms")
    }
}

/// A limiter a plugin declared.
struct LimiterDef {
    name: String,
    rule: Rule,
    /// Its buckets live in the backend Redis.
    shared: bool,
}

/// Tokens to take from a bucket kept in the backend Redis.
pub struct SharedTake {
    ctx: Arc<PluginCtx>,
    /// The limiter's name.
    pub limiter: String,
    /// Its rate and burst.
    pub rule: Rule,
    /// The bucket.
    pub key: String,
    /// Tokens.
    pub cost: u32,
}

impl SharedTake {
    /// The Redis key of the bucket: one hash slot per bucket (the whole name is the hash tag).
    pub fn redis_key(&self) -> String {
        format!(
            "{{respire:ratelimit:{}:{}:{}}}",
            self.ctx.name, self.limiter, self.key
        )
    }

    /// Counts a refusal.
    pub fn note_refused(&self) {
        plugin_stats()
            .rate_limited
            .with_label_values(&[&*self.ctx.name, &self.limiter])
            .inc();
    }

    /// Counts a take Redis could not answer (the command was let through).
    pub fn note_error(&self, error: &str) {
        plugin_stats()
            .failures
            .with_label_values(&[&*self.ctx.name, "request", "shared-limiter"])
            .inc();
        tracing::debug!(plugin = %self.ctx.name, limiter = %self.limiter, error, "shared rate limit not checked; command let through");
    }
}

/// Takes on shared limiters that Redis must grant before a command goes on, and the local
/// tokens to give back if it does not.
#[derive(Default)]
pub struct Gate {
    /// The takes, in order.
    pub shared: Vec<SharedTake>,
    refunds: Vec<(Arc<PluginCtx>, String, String, u32)>,
}

impl Gate {
    /// Gives back the local tokens the command took.
    pub fn refund_local(&self) {
        for (ctx, limiter, key, cost) in &self.refunds {
            ctx.state.refund(&ctx.name, limiter, key, *cost);
        }
    }
}

/// `wasi:clocks/wall-clock.datetime`.
#[derive(ComponentType, Lower, Clone, Copy)]
#[component(record)]
struct Datetime {
    seconds: u64,
    nanoseconds: u32,
}

/// Up to 1 MiB of random bytes (seeded from the OS; for hash seeds, not for cryptography).
fn random_bytes(len: u64) -> Vec<u8> {
    (0..len.min(1 << 20)).map(|_| fastrand::u8(..)).collect()
}

/// Defines the few WASI functions Rust's std needs to run without any capability — random
/// numbers (hash map seeds), clocks, an empty environment — and makes every other import of
/// the component (files, sockets, stdout/stderr, exit) trap when called.
///
/// We do not link `wasmtime-wasi` here: its synchronous bindings block on a Tokio runtime,
/// which panics inside respire's workers (measured: a plugin's panic message on stderr took
/// the worker down). A plugin logs through the host's `log` import instead.
fn link_wasi_minimum(
    linker: &mut Linker<StoreData>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<()> {
    let names: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(n, _)| n.to_string())
        .collect();
    for name in names {
        let base = name.split('@').next().unwrap_or_default();
        match base {
            "wasi:random/random" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-random-bytes", |_, (len,): (u64,)| {
                    Ok((random_bytes(len),))
                })?;
                i.func_wrap("get-random-u64", |_, (): ()| Ok((fastrand::u64(..),)))?;
            }
            "wasi:random/insecure" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-insecure-random-bytes", |_, (len,): (u64,)| {
                    Ok((random_bytes(len),))
                })?;
                i.func_wrap("get-insecure-random-u64", |_, (): ()| {
                    Ok((fastrand::u64(..),))
                })?;
            }
            "wasi:random/insecure-seed" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("insecure-seed", |_, (): ()| {
                    Ok(((fastrand::u64(..), fastrand::u64(..)),))
                })?;
            }
            "wasi:cli/environment" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-environment", |_, (): ()| {
                    Ok((Vec::<(String, String)>::new(),))
                })?;
                i.func_wrap("get-arguments", |_, (): ()| Ok((Vec::<String>::new(),)))?;
                i.func_wrap("initial-cwd", |_, (): ()| Ok((None::<String>,)))?;
            }
            "wasi:clocks/monotonic-clock" => {
                let start = std::time::Instant::now();
                let mut i = linker.instance(&name)?;
                i.func_wrap("now", move |_, (): ()| {
                    Ok((start.elapsed().as_nanos() as u64,))
                })?;
                i.func_wrap("resolution", |_, (): ()| Ok((1u64,)))?;
            }
            "wasi:clocks/wall-clock" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("now", |_, (): ()| {
                    let d = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    Ok((Datetime {
                        seconds: d.as_secs(),
                        nanoseconds: d.subsec_nanos(),
                    },))
                })?;
                i.func_wrap("resolution", |_, (): ()| {
                    Ok((Datetime {
                        seconds: 0,
                        nanoseconds: 1,
                    },))
                })?;
            }
            _ => {}
        }
    }
    linker.define_unknown_imports_as_traps(component)
}

impl bindings::respire::plugin::types::Host for StoreData {}

impl bindings::respire::plugin::host::Host for StoreData {
    fn log(&mut self, level: bindings::respire::plugin::host::Level, message: String) {
        use bindings::respire::plugin::host::Level;
        let plugin = &*self.name;
        match level {
            Level::Error => tracing::error!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
        }
    }

    fn client_info(&mut self, id: u64) -> Option<Client> {
        self.clients
            .iter()
            .find(|c| c.id == id)
            .map(|c| Client::clone(c))
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn series(&mut self, metric: u32, labels: Vec<String>) -> Option<u32> {
        self.ctx.as_ref()?.series_id(metric, labels)
    }

    fn record_update(&mut self, update: Update) {
        if let Some(ctx) = &self.ctx {
            ctx.record_now(&update);
        }
    }

    fn take(&mut self, limiter: u32, key: String, cost: u32) -> Result<u32, u64> {
        match &self.ctx {
            Some(ctx) => ctx.take(limiter, &key, cost),
            None => Err(u64::MAX),
        }
    }

    fn counter_add(&mut self, key: String, delta: i64, ttl_ms: u64) -> i64 {
        match &self.ctx {
            Some(ctx) => {
                ctx.state
                    .counter_add(&self.name, &key, delta, Duration::from_millis(ttl_ms))
            }
            None => 0,
        }
    }

    fn counter_get(&mut self, key: String) -> i64 {
        match &self.ctx {
            Some(ctx) => ctx.state.counter_get(&self.name, &key),
            None => 0,
        }
    }

    fn counter_top(&mut self, prefix: String, count: u32) -> Vec<(String, i64)> {
        match &self.ctx {
            Some(ctx) => ctx
                .state
                .counter_top(&self.name, &prefix, count.min(10_000) as usize),
            None => Vec::new(),
        }
    }
}

/// The process-wide engine, with the epoch ticker started.
pub struct Runtime {
    engine: Engine,
    /// Where compiled plugins are kept across restarts (none: compile every time).
    cache_dir: Option<PathBuf>,
    /// Compiled plugins of this process by cache key, so that a settings-only change does not recompile.
    compiled: std::sync::Mutex<std::collections::HashMap<String, Component>>,
    /// Token buckets and counters of every plugin.
    state: Arc<SharedState>,
}

/// How a plugin's machine code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Compiled from the `.wasm` now.
    Fresh,
    /// Reused from this process (only the settings changed).
    Memory,
    /// Read from the artifact cache on disk.
    Disk,
}

impl std::fmt::Display for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compiled::Fresh => "compiled",
            Compiled::Memory => "reused",
            Compiled::Disk => "cached",
        })
    }
}

/// Milliseconds per epoch tick.
const TICK: Duration = Duration::from_millis(1);

/// The default artifact cache: `$XDG_CACHE_HOME/respire/plugins` or `~/.cache/respire/plugins`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("respire").join("plugins"))
}

/// Reads a compiled component written by [`Runtime::compile`].
#[allow(unsafe_code)]
fn deserialize_artifact(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: `Component::deserialize_file` trusts the file to be wasmtime's own output. The
    // artifact cache holds only files respire wrote itself (written to a temporary name, then
    // renamed, so a reader never sees half a file), named by the SHA-256 of the source and by
    // the engine's compatibility hash; wasmtime also checks its version and the engine settings
    // recorded in the artifact and refuses a mismatch. The cache folder must be as trusted as
    // the plugin folder (both amount to running code in respire).
    unsafe { Component::deserialize_file(engine, path) }
}

impl Runtime {
    /// Creates the engine and starts its epoch thread. `cache_dir` keeps compiled plugins
    /// across restarts (created when missing).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Runtime, String> {
        let mut cfg = Config::new();
        cfg.wasm_component_model(true);
        cfg.epoch_interruption(true);
        if std::env::var_os("RESPIRE_WASM_PERFMAP").is_some() {
            // Names plugin code for `perf` (/tmp/perf-PID.map); for profiling only.
            cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        cfg.concurrency_support(false);
        let engine = Engine::new(&cfg).map_err(|e| e.to_string())?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("respire-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Runtime {
            engine,
            cache_dir,
            compiled: std::sync::Mutex::default(),
            state: Arc::default(),
        })
    }

    /// The machine code of a plugin: from this process, from the artifact cache, or compiled
    /// now (and then cached). Keyed by the SHA-256 of the file and the engine's settings.
    fn compile(&self, path: &Path) -> Result<(Component, Compiled), PluginError> {
        use sha2::Digest;
        use std::hash::{Hash, Hasher};
        let err = |message: String| PluginError::Load {
            path: path.into(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let digest = sha2::Sha256::digest(&bytes);
        let mut key: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        key.push_str(&format!("-{:016x}", engine_hash.finish()));
        if let Some(c) = self.compiled.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok((c, Compiled::Memory));
        }
        let artifact = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{key}.cwasm")));
        let mut from_disk = None;
        if let Some(a) = artifact.as_ref().filter(|a| a.exists()) {
            match deserialize_artifact(&self.engine, a) {
                Ok(c) => from_disk = Some(c),
                Err(e) => {
                    warn!(file = %a.display(), error = %e, "unusable compiled plugin in the cache; recompiling");
                    let _ = std::fs::remove_file(a);
                }
            }
        }
        let (component, how) = match from_disk {
            Some(c) => (c, Compiled::Disk),
            None => {
                let c = Component::new(&self.engine, &bytes).map_err(|e| err(format!("{e:#}")))?;
                if let (Some(a), Some(dir)) = (artifact.as_ref(), self.cache_dir.as_ref()) {
                    let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
                    let written = std::fs::create_dir_all(dir)
                        .and_then(|_| c.serialize().map_err(std::io::Error::other))
                        .and_then(|data| std::fs::write(&tmp, data))
                        .and_then(|_| std::fs::rename(&tmp, a));
                    if let Err(e) = written {
                        let _ = std::fs::remove_file(&tmp);
                        warn!(dir = %dir.display(), error = %e, "cannot write the plugin artifact cache");
                    }
                }
                (c, Compiled::Fresh)
            }
        };
        if let Ok(mut m) = self.compiled.lock() {
            if m.len() >= 64 {
                m.clear();
            }
            m.insert(key, component.clone());
        }
        Ok((component, how))
    }

    /// Compiles a plugin file, reads its settings, and checks it by running `init` once.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin, PluginError> {
        let file_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Taken before reading, so that a change made while loading is seen by the next scan.
        let stamp = fingerprint(path);
        let settings_path = path.with_extension("toml");
        let settings = if settings_path.exists() {
            let text =
                std::fs::read_to_string(&settings_path).map_err(|e| PluginError::Settings {
                    path: settings_path.clone(),
                    message: e.to_string(),
                })?;
            toml::from_str::<PluginSettings>(&text).map_err(|e| PluginError::Settings {
                path: settings_path.clone(),
                message: e.to_string(),
            })?
        } else {
            PluginSettings::default()
        };
        let (component, compiled) = self.compile(path)?;
        if let Some(theirs) =
            contract_of(&self.engine, &component).filter(|v| v != CONTRACT_VERSION)
        {
            return Err(PluginError::Load {
                path: path.into(),
                message: format!(
                    "built for the plugin contract respire:plugin@{theirs}; this respire loads respire:plugin@{CONTRACT_VERSION} plugins (rebuild it with this release's respire-sdk)"
                ),
            });
        }
        let link = || -> wasmtime::Result<_> {
            let mut linker = Linker::new(&self.engine);
            Plugin::add_to_linker::<StoreData, wasmtime::component::HasSelf<StoreData>>(
                &mut linker,
                |d| d,
            )?;
            link_wasi_minimum(&mut linker, &self.engine, &component)?;
            linker.instantiate_pre(&component)
        };
        let pre = link().map_err(|e| PluginError::Load {
            path: path.into(),
            message: format!("{e:#}"),
        })?;
        let pre = PluginPre::new(pre).map_err(|e| PluginError::Load {
            path: path.into(),
            message: format!("{e:#}"),
        })?;
        let config = toml::to_string(&settings.config).unwrap_or_default();
        let name: Arc<str> = Arc::from(file_name.as_str());
        let init_err = |message: String| PluginError::Init {
            name: file_name.clone(),
            message,
        };
        // Check it: instantiate and init once, as every worker will.
        let (_, manifest) = new_instance(&self.engine, &pre, &name, &settings, &config, None)
            .map_err(|e| init_err(format!("{e:#}")))?;
        let manifest = manifest.map_err(init_err)?;
        let defs: Vec<crate::metrics::MetricDef> = manifest
            .metrics
            .iter()
            .map(|m| crate::metrics::MetricDef {
                name: m.name.clone(),
                help: m.help.clone(),
                kind: match m.kind {
                    WitMetricKind::Counter => crate::metrics::MetricKind::Counter,
                    WitMetricKind::Gauge => crate::metrics::MetricKind::Gauge,
                    WitMetricKind::Histogram => crate::metrics::MetricKind::Histogram,
                },
                labels: m.labels.clone(),
                buckets: m.buckets.clone(),
            })
            .collect();
        let metrics = crate::metrics::plugin_metrics(&file_name, &defs).map_err(init_err)?;
        let mut limiters = Vec::with_capacity(manifest.limiters.len());
        for l in &manifest.limiters {
            if !(l.rate.is_finite() && l.rate >= 0.0) || l.burst == 0 {
                return Err(init_err(format!(
                    "limiter {:?}: rate must be ≥ 0 and burst ≥ 1",
                    l.name
                )));
            }
            limiters.push(LimiterDef {
                name: l.name.clone(),
                rule: Rule {
                    rate: l.rate,
                    burst: l.burst,
                },
                shared: l.shared,
            });
        }
        let has_shared = limiters.iter().any(|l| l.shared);
        let traffic = traffic::Traffic::check(&manifest).map_err(init_err)?;
        let ctx = Arc::new(PluginCtx {
            name: name.clone(),
            metrics,
            series: std::sync::Mutex::default(),
            limiters,
            has_shared,
            state: self.state.clone(),
            stats: HookStats::new(&file_name),
            traffic,
        });
        let responds = manifest.on_response || !ctx.traffic.is_empty();
        let all = manifest.categories.iter().any(|c| c == "all");
        let unscoped =
            manifest.key_prefixes.is_empty() || manifest.key_prefixes.iter().any(String::is_empty);
        Ok(LoadedPlugin {
            responds,
            sees_every_command: all && unscoped && (manifest.on_request || responds),
            commands: manifest
                .commands
                .iter()
                .map(|c| c.to_ascii_lowercase())
                .collect(),
            named: (0..NAMED_IDS)
                .map(|_| std::sync::atomic::AtomicU8::new(0))
                .collect(),
            key_prefixes: (!unscoped)
                .then(|| crate::prefixes::Prefixes::new(&manifest.key_prefixes)),
            all,
            category_bits: manifest
                .categories
                .iter()
                .fold(0, |b, c| b | crate::commands::category_bit(c)),
            file_name,
            name,
            engine: self.engine.clone(),
            pre,
            config,
            settings,
            manifest,
            failures: AtomicU64::new(0),
            stamp,
            compiled,
            ctx,
        })
    }

    /// Loads every `*.wasm` in `dir`, in chain order. A plugin that fails to load is
    /// reported and left out; the others still load.
    pub fn load_dir(&self, dir: &Path) -> (Vec<Arc<LoadedPlugin>>, Vec<PluginError>) {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect(),
            Err(e) => {
                return (
                    Vec::new(),
                    vec![PluginError::Load {
                        path: dir.into(),
                        message: e.to_string(),
                    }],
                );
            }
        };
        files.sort();
        let mut loaded = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            match self.load(&f) {
                Ok(p) => {
                    info!(plugin = %p.manifest.name, version = %p.manifest.version, file = %f.display(), code = %p.compiled, "plugin loaded");
                    loaded.push(Arc::new(p));
                }
                Err(e) => {
                    warn!(error = %e, "plugin not loaded");
                    errors.push(e);
                }
            }
        }
        loaded.sort_by(|a, b| {
            a.settings
                .order
                .cmp(&b.settings.order)
                .then(a.file_name.cmp(&b.file_name))
        });
        (loaded, errors)
    }
}

/// A compiled, checked plugin, shared by all workers.
pub struct LoadedPlugin {
    /// File name without `.wasm`.
    pub file_name: String,
    name: Arc<str>,
    engine: Engine,
    pre: PluginPre<StoreData>,
    config: String,
    /// How respire runs it.
    pub settings: PluginSettings,
    /// What it asked for.
    pub manifest: Manifest,
    commands: rustc_hash::FxHashSet<String>,
    /// Whether `commands` names a command of the table, by its number, once looked up (0: not
    /// yet, 1: no, 2: yes): a command's name is hashed once per plugin, not per command.
    named: Box<[std::sync::atomic::AtomicU8]>,
    /// Only commands with a key under one of these (none: no filter).
    key_prefixes: Option<crate::prefixes::Prefixes>,
    all: bool,
    /// The categories it asked for, as bits.
    category_bits: u32,
    /// Traps and time-outs so far.
    pub failures: AtomicU64,
    /// The files' fingerprint when they were read.
    stamp: Fingerprint,
    /// How its machine code was obtained.
    pub compiled: Compiled,
    ctx: Arc<PluginCtx>,
    /// It has a response side: a response hook or traffic metrics.
    responds: bool,
    /// It sees every command the table knows: all categories, no key prefixes, some hook.
    sees_every_command: bool,
}

/// Instantiates a plugin and runs its `init`: the instance and what `init` said.
fn new_instance(
    engine: &Engine,
    pre: &PluginPre<StoreData>,
    name: &Arc<str>,
    settings: &PluginSettings,
    config: &str,
    ctx: Option<Arc<PluginCtx>>,
) -> wasmtime::Result<(Instance, Result<Manifest, String>)> {
    let data = StoreData {
        max_memory: usize::try_from(settings.max_memory.as_u64()).unwrap_or(usize::MAX),
        memory_denied: false,
        name: name.clone(),
        ctx,
        budget: settings.time_budget,
        overtime: None,
        clients: Vec::new(),
    };
    let mut store = Store::new(engine, data);
    store.limiter(|d| d);
    // The budget is CPU time, measured without a clock read per call: the epoch (wall time)
    // deadline fires first; then the thread's CPU time decides. A plugin that was only
    // descheduled (a busy machine) gets more time; one that used at least half a budget of
    // CPU since its deadline is stopped (a trap, counted as a timeout). Extensions are
    // bounded, so even a starved thread stops within 50 budgets of wall time.
    store.epoch_deadline_callback(|mut ctx| {
        let d = ctx.data_mut();
        let extend = ticks(d.budget);
        match &mut d.overtime {
            None => {
                d.overtime = Some((thread_cpu(), 0));
                Ok(wasmtime::UpdateDeadline::Continue(extend))
            }
            Some((since, extensions)) => {
                *extensions += 1;
                let used = since
                    .zip(thread_cpu())
                    .map(|(s, now)| now.saturating_sub(s));
                if *extensions > 50 || used.is_none_or(|u| u >= d.budget / 2) {
                    Ok(wasmtime::UpdateDeadline::Interrupt)
                } else {
                    Ok(wasmtime::UpdateDeadline::Continue(extend))
                }
            }
        }
    });
    // Instantiation and init get a generous budget (they may build tables).
    store.set_epoch_deadline(ticks(settings.time_budget) * 100);
    let plugin = pre.instantiate(&mut store)?;
    let manifest = plugin.call_init(&mut store, config)?;
    Ok((Instance { store, plugin }, manifest))
}

/// Command numbers whose lookup in a plugin's command names is remembered (the table numbers
/// its commands from 0; beyond this, they are looked up each time).
const NAMED_IDS: usize = 1024;

impl LoadedPlugin {
    /// Whether the plugin asked for a command the table does not know (by its name; such a
    /// command has no categories).
    fn wants_unknown(&self, lower_name: &str) -> bool {
        self.all || self.commands.contains(lower_name)
    }

    /// Whether the plugin asked for this command of the table (by name or category): its name
    /// is looked up once per command number and remembered.
    fn wants_info(&self, info: &crate::commands::CommandInfo) -> bool {
        if self.all || info.category_bits & self.category_bits != 0 {
            return true;
        }
        if self.commands.is_empty() {
            return false;
        }
        let Some(memo) = self.named.get(usize::from(info.id)) else {
            return self.commands.contains(info.command_name());
        };
        match memo.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let named = self.commands.contains(info.command_name());
                memo.store(1 + u8::from(named), Ordering::Relaxed);
                named
            }
        }
    }

    /// A fresh instance with `init` run.
    pub fn instantiate(&self) -> Result<Instance, String> {
        match new_instance(
            &self.engine,
            &self.pre,
            &self.name,
            &self.settings,
            &self.config,
            Some(self.ctx.clone()),
        ) {
            Ok((inst, Ok(_))) => Ok(inst),
            Ok((_, Err(e))) => Err(e),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

/// CPU time used by this thread so far.
fn thread_cpu() -> Option<Duration> {
    cpu_time::ThreadTime::try_now()
        .ok()
        .map(|t| t.as_duration())
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

/// Most commands whose budgets add up for one call: a plugin that loops forever on a big
/// batch is stopped within this many budgets.
const MAX_BUDGETS_PER_CALL: usize = 64;

/// The time budget of a call on `n` commands: `n` budgets, at most [`MAX_BUDGETS_PER_CALL`].
fn batch_budget(budget: Duration, n: usize) -> Duration {
    budget.saturating_mul(n.clamp(1, MAX_BUDGETS_PER_CALL) as u32)
}

/// One live instance of a plugin, owned by a worker.
pub struct Instance {
    store: Store<StoreData>,
    plugin: Plugin,
}

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// It ran past its time budget.
    Timeout,
    /// It wanted more memory than its cap.
    Memory,
    /// It trapped (a panic, an out-of-bounds access …).
    Trap,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Memory => "memory",
            Failure::Trap => "trap",
        }
    }
}

impl Instance {
    fn prepare(&mut self, budget: Duration) {
        let d = self.store.data_mut();
        d.memory_denied = false;
        d.overtime = None;
        d.budget = budget;
        self.store.set_epoch_deadline(ticks(budget));
    }

    fn failure(&self, e: &wasmtime::Error) -> Failure {
        if self.store.data().memory_denied {
            Failure::Memory
        } else if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
            Failure::Timeout
        } else {
            Failure::Trap
        }
    }

    /// Readies the instance for a call on `n` commands of `clients`: their time budget, and the
    /// clients the plugin may ask about.
    fn start_call(&mut self, budget: Duration, n: usize, clients: &[Arc<Client>]) {
        self.prepare(batch_budget(budget, n));
        let d = &mut self.store.data_mut().clients;
        d.clear();
        d.extend(clients.iter().cloned());
    }

    /// Calls the request hook on a batch within the plugin's time budget (per command).
    fn on_requests(
        &mut self,
        budget: Duration,
        clients: &[Arc<Client>],
        batch: &RequestBatch,
    ) -> Result<RequestResults, (Failure, String)> {
        self.start_call(budget, batch.requests.len() / REQUEST_WORDS, clients);
        self.plugin
            .call_on_requests(&mut self.store, batch)
            .map_err(|e| (self.failure(&e), format!("{e:#}")))
    }

    /// Calls the response hook on a batch within the plugin's time budget (per reply).
    fn on_responses(
        &mut self,
        budget: Duration,
        clients: &[Arc<Client>],
        batch: &ResponseBatch,
    ) -> Result<ResponseResults, (Failure, String)> {
        self.start_call(budget, batch.responses.len() / RESPONSE_WORDS, clients);
        self.plugin
            .call_on_responses(&mut self.store, batch)
            .map_err(|e| (self.failure(&e), format!("{e:#}")))
    }
}

/// The plugins of the process, in chain order.
#[derive(Default)]
pub struct PluginSet {
    /// Increases with every reload that changed something.
    pub version: u64,
    /// Loaded plugins.
    pub plugins: Vec<Arc<LoadedPlugin>>,
}

/// A worker's instances of one plugin set.
struct Generation {
    version: u64,
    instances: Vec<PluginSlot>,
}

/// A worker's instance of one plugin, with its failure streak: after three failures in a
/// row the instance is remade only after a pause (10 ms, doubling up to 1 s), so a plugin
/// that fails on every call is not re-instantiated on every command; meanwhile its
/// `on_error` policy applies.
#[derive(Default)]
struct PluginSlot {
    inst: Option<Instance>,
    failing: u32,
    retry_at: Option<std::time::Instant>,
    /// This worker's view of the plugin's metric series.
    metrics: LocalMetrics,
    /// This worker's series of the plugin's traffic metrics.
    traffic: traffic::TrafficCache,
    /// Decisions the plugin said it would repeat, by client id and command
    /// ([`CommandInfo::display_id`](crate::commands::CommandInfo::display_id)); kept with the
    /// generation, so that a reload (a new slot) forgets them all.
    repeats: rustc_hash::FxHashMap<(u64, u32), std::rc::Rc<Repeat>>,
}

/// A request decision a plugin marked repeatable: applied again, takes included, to the
/// client's later commands of the same kind without a call, while its generation holds.
struct Repeat {
    generation: u32,
    action: RequestAction,
    takes: Vec<bindings::respire::plugin::types::Take>,
}

/// Most repeatable decisions a worker keeps per plugin (beyond, it starts over).
const MAX_REPEATS: usize = 1 << 14;

/// What a repeatable decision is remembered under: the client and the command's entry in the
/// command table, which gives the name and the categories a plugin sees (commands the table
/// does not know have no entry and are not repeated).
fn repeat_key(it: &InChain<'_>) -> Option<(u64, u32)> {
    Some((it.client.details.id, it.info?.display_id()))
}

impl PluginSlot {
    /// The live instance, made when needed; `None` when there is none to call now.
    fn get(&mut self, plugin: &LoadedPlugin, hook: &str) -> Option<&mut Instance> {
        if self.inst.is_none() {
            if self.retry_at.is_some_and(|t| std::time::Instant::now() < t) {
                return None;
            }
            match plugin.instantiate() {
                Ok(i) => self.inst = Some(i),
                Err(e) => {
                    note_failure(plugin, hook, "start", &e);
                    self.failed();
                    return None;
                }
            }
        }
        self.inst.as_mut()
    }

    fn failed(&mut self) {
        self.inst = None;
        self.failing = self.failing.saturating_add(1);
        if self.failing >= 3 {
            let ms = (10u64 << (self.failing - 3).min(7)).min(1000);
            self.retry_at = Some(std::time::Instant::now() + Duration::from_millis(ms));
        }
    }

    fn succeeded(&mut self) {
        self.failing = 0;
        self.retry_at = None;
    }
}

/// A worker's instances of the plugin set (made on first use, remade after a failure or a
/// reload). The previous set's instances are kept too, so that replies to commands that
/// started before a reload finish on the version they started with.
#[derive(Default)]
pub struct WorkerPlugins {
    current: Option<Generation>,
    previous: Option<Generation>,
    /// Traffic metrics were recorded since the last [`WorkerPlugins::flush_metrics`].
    dirty: bool,
}

/// What a reply owes the plugins once its traffic metrics are recorded (see
/// [`WorkerPlugins::on_reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRoute {
    /// Nothing: write it.
    Done,
    /// Write it, and hand it to the plugin stage for hooks that only observe.
    Observe,
    /// Hold it (and the replies after it) until hooks that may replace it have run.
    Hold,
}

impl LoadedPlugin {
    /// Its response hook in words: `replace` or `observe`, and which replies it gets
    /// (`None` without a response hook).
    pub fn response_summary(&self) -> Option<String> {
        let m = &self.manifest;
        if !m.on_response {
            return None;
        }
        let mode = if m.observe_responses {
            "observe"
        } else {
            "replace"
        };
        let Some(f) = &m.response_filter else {
            return Some(format!("{mode}, every reply"));
        };
        let mut which = Vec::new();
        if f.sample > 0 {
            which.push(format!("1 in {}", f.sample));
        }
        if f.min_bytes > 0 {
            which.push(format!("≥ {} bytes", f.min_bytes));
        }
        if f.errors {
            which.push("errors".to_string());
        }
        if which.is_empty() {
            which.push("none".to_string());
        }
        Some(format!("{mode}, replies: {}", which.join(", ")))
    }

    /// Its traffic metrics in words: `commands_total = count by command, key-prefix(1), result`.
    pub fn traffic_summary(&self) -> Vec<String> {
        let m = &self.manifest;
        m.traffic
            .iter()
            .map(|t| {
                let name = m
                    .metrics
                    .get(t.metric as usize)
                    .map_or("?", |m| m.name.as_str());
                let value = traffic::value_name(t.value);
                let labels: Vec<String> = t.labels.iter().map(traffic::label_name).collect();
                if labels.is_empty() {
                    format!("{name} = {value}")
                } else {
                    format!("{name} = {value} by {}", labels.join(", "))
                }
            })
            .collect()
    }

    /// Whether its response hook is called for this reply (its filter: a sample, the size of
    /// the reply or of the command, errors). `cmd_bytes` is asked for only when needed.
    fn takes_reply(&self, reply: &[u8], cmd_bytes: impl FnOnce() -> usize) -> bool {
        let Some(f) = &self.manifest.response_filter else {
            return true;
        };
        if f.errors && matches!(reply.first(), Some(b'-' | b'!')) {
            return true;
        }
        if f.min_bytes > 0
            && (reply.len() as u64 >= f.min_bytes || cmd_bytes() as u64 >= f.min_bytes)
        {
            return true;
        }
        f.sample == 1 || f.sample > 1 && fastrand::u32(..f.sample) == 0
    }
}

/// Size and modification time of a file.
type FileStamp = (u64, std::time::SystemTime);

/// What identifies a plugin's files for reloading: `NAME.wasm`'s stamp and `NAME.toml`'s, if any.
type Fingerprint = Option<(u64, std::time::SystemTime, Option<FileStamp>)>;

/// The fingerprint of a plugin file and its settings.
fn fingerprint(wasm: &Path) -> Fingerprint {
    let m = std::fs::metadata(wasm).ok()?;
    let s = std::fs::metadata(wasm.with_extension("toml"))
        .ok()
        .and_then(|m| Some((m.len(), m.modified().ok()?)));
    Some((m.len(), m.modified().ok()?, s))
}

/// Whether a file-system event may have changed a file (reads, which respire's own loading
/// makes too, do not count).
pub fn changes(ev: &notify::Event) -> bool {
    !matches!(ev.kind, notify::EventKind::Access(_))
}

/// Waits until no event came for `quiet`, for at most ten times that (a folder that never
/// goes quiet is still looked at).
pub fn settle(rx: &std::sync::mpsc::Receiver<()>, quiet: Duration) {
    let until = std::time::Instant::now() + quiet * 10;
    while std::time::Instant::now() < until && rx.recv_timeout(quiet).is_ok() {}
}

/// Watches the plugin folder and swaps the chain when files change.
///
/// Changes are picked up after a quiet period (`QUIET`) when the folder reports events, and by
/// a rescan every `POLL` in any case (a folder on a file system without events, a lost event,
/// or no inotify instance left); a polled change is loaded once it has stayed the same for one
/// interval. New and changed plugins are compiled and checked (instantiate + init) off the
/// request path; a plugin that fails keeps its running version (or stays out if it is new),
/// with the reason logged; removed files are unloaded. The new set is published atomically;
/// each worker switches between two batches, so a command never sees half a chain, and no
/// client connection is touched.
pub fn watch(shared: Arc<crate::server::Shared>, dir: PathBuf) {
    use notify::Watcher;
    const QUIET: Duration = Duration::from_millis(200);
    const POLL: Duration = Duration::from_secs(1);
    let Some(rt) = shared.plugin_runtime.as_ref() else {
        return;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| changes(&e)) {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|_| w)
    });
    if let Err(e) = &watcher {
        warn!(error = %e, dir = %dir.display(), "cannot watch the plugin folder for events; polling it every second");
    }
    // What is running, with the fingerprint of the files each was read from: a change made
    // between that read and now is found by the first scan below.
    let mut known: std::collections::HashMap<PathBuf, (Fingerprint, Arc<LoadedPlugin>)> = shared
        .plugins
        .load()
        .plugins
        .iter()
        .map(|p| {
            (
                dir.join(format!("{}.wasm", p.file_name)),
                (p.stamp, p.clone()),
            )
        })
        .collect();
    // Files that failed to load, so that they are not retried (and logged) until they change.
    let mut rejected: std::collections::HashMap<PathBuf, Fingerprint> =
        std::collections::HashMap::new();
    // Changes seen by polling, loaded when still the same at the next poll.
    let mut pending: std::collections::HashMap<PathBuf, Fingerprint> =
        std::collections::HashMap::new();
    let mut settled = false;
    loop {
        if *shared.shutdown.borrow() {
            return;
        }
        let polled = match rx.recv_timeout(POLL) {
            Ok(()) => {
                // Quiet period: wait until events stop for a moment (a copy in progress, an editor's save).
                settle(&rx, QUIET);
                false
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(POLL);
                true
            }
        };
        if *shared.shutdown.borrow() {
            return;
        }
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect(),
            Err(_) => continue,
        };
        files.sort();
        let mut next: Vec<Arc<LoadedPlugin>> = Vec::new();
        let mut changed = false;
        let mut seen = HashSet::new();
        for f in files {
            seen.insert(f.clone());
            let fp = fingerprint(&f);
            let old = known.get(&f).cloned();
            let unchanged = old.as_ref().is_some_and(|(old_fp, _)| *old_fp == fp)
                || rejected.get(&f) == Some(&fp);
            // The first scan after start is trusted like an event: it closes the gap between
            // loading and watching.
            let wait = polled && settled && pending.insert(f.clone(), fp) != Some(fp);
            if unchanged || wait {
                if let Some((_, p)) = old {
                    next.push(p);
                }
                if unchanged {
                    pending.remove(&f);
                }
                continue;
            }
            pending.remove(&f);
            match rt.load(&f) {
                Ok(p) => {
                    info!(plugin = %p.manifest.name, version = %p.manifest.version, file = %f.display(), code = %p.compiled, "plugin (re)loaded");
                    let p = Arc::new(p);
                    plugin_stats().reloads.with_label_values(&["loaded"]).inc();
                    rejected.remove(&f);
                    known.insert(f.clone(), (p.stamp, p.clone()));
                    next.push(p);
                    changed = true;
                }
                Err(e) => {
                    warn!(error = %e, "plugin change rejected; the running version stays");
                    plugin_stats()
                        .reloads
                        .with_label_values(&["rejected"])
                        .inc();
                    rejected.insert(f.clone(), fp);
                    if let Some((_, p)) = old {
                        next.push(p);
                    }
                }
            }
        }
        settled = true;
        let before = known.len();
        known.retain(|path, (_, p)| {
            let keep = seen.contains(path);
            if !keep {
                info!(plugin = %p.manifest.name, "plugin unloaded");
                plugin_stats()
                    .reloads
                    .with_label_values(&["unloaded"])
                    .inc();
            }
            keep
        });
        rejected.retain(|path, _| seen.contains(path));
        pending.retain(|path, _| seen.contains(path));
        changed |= known.len() != before;
        if changed {
            next.sort_by(|a, b| {
                a.settings
                    .order
                    .cmp(&b.settings.order)
                    .then(a.file_name.cmp(&b.file_name))
            });
            let version = shared.plugins.load().version + 1;
            shared.plugins.store(
                PluginSet {
                    version,
                    plugins: next,
                },
                version,
            );
        }
    }
}

/// What the request chain decided.
pub enum Decision {
    /// Go on with this command (possibly rewritten).
    Continue {
        /// The new command, when a plugin rewrote it (boxed: rare, and decisions move in
        /// batches, so their size is copied for every command).
        rewritten: Option<Box<crate::protocol::Command>>,
        /// A plugin asked for the reply to be cached (the shortest times when several did).
        cache: Option<crate::cache::CacheFor>,
        /// Tokens Redis must grant first (shared limiters).
        gate: Option<Box<Gate>>,
    },
    /// Reply with this error text.
    Deny(String),
    /// Reply with these RESP bytes.
    Respond(Vec<u8>),
}

/// One command for the request chain: who sent it, the command, and what Redis says of it.
pub struct ChainRequest<'a> {
    /// The client it comes from.
    pub client: &'a ClientHandle,
    /// The command.
    pub cmd: &'a crate::protocol::Command,
    /// Its description in the command table.
    pub info: Option<&'a crate::commands::CommandInfo>,
}

/// A worker's reference to a plugin set. Commands' response chains each hold one, and an
/// `Rc` is counted without atomic operations: a clone of the `Arc` per command wrote to a
/// cache line every worker shares.
pub type WorkerSet = Rc<Arc<PluginSet>>;

/// What the plugins owe one command's reply: response hooks (in reverse chain order) and
/// traffic metrics.
pub struct ResponseChain {
    set: WorkerSet,
    /// The plugins with a response side that see the command.
    plugins: SmallVec<[u16; 4]>,
    /// Those whose response hook is called for this reply (its filter let it through; set
    /// when the reply arrives, see [`WorkerPlugins::on_reply`]).
    due: SmallVec<[u16; 4]>,
    /// The command's number for metrics labels ([`crate::stats::OTHER`]: unknown).
    name_id: u16,
    /// The command as it was sent (after rewrites), with its categories and keys.
    cmd: crate::protocol::Command,
    categories: u32,
    keys: SmallVec<[(u32, u8); 2]>,
    start: std::time::Instant,
}

/// One reply for the response hooks: the client, the chain owed, and the reply.
pub struct ChainResponse<'a> {
    /// The client it goes to.
    pub client: &'a ClientHandle,
    /// The hooks owed.
    pub chain: &'a ResponseChain,
    /// The complete RESP reply.
    pub reply: &'a [u8],
}

/// Logs a failed call (once per burst: at the 1st, 2nd, 4th, 8th … failure) and counts it.
fn note_failure(plugin: &LoadedPlugin, hook: &str, kind: &str, error: &str) {
    let n = plugin.failures.fetch_add(1, Ordering::Relaxed) + 1;
    plugin_stats()
        .failures
        .with_label_values(&[&plugin.file_name, hook, kind])
        .inc();
    if n.is_power_of_two() {
        warn!(plugin = %plugin.file_name, hook, kind, failures = n, error = %error, "plugin call failed; instance recycled");
    }
}

/// The version of the plugin contract this respire implements (`package respire:plugin@…` in
/// `wit/plugin.wit`).
const CONTRACT_VERSION: &str = "0.5.0";

/// The contract version a component was built for, from the `respire:plugin/…@version`
/// interfaces it imports (none when it imports none of them).
fn contract_of(engine: &Engine, component: &Component) -> Option<String> {
    let ty = component.component_type();
    ty.imports(engine).find_map(|(name, _)| {
        name.strip_prefix("respire:plugin/")
            .and_then(|n| n.split_once('@'))
            .map(|(_, v)| v.to_string())
    })
}

/// Numbers per command in a batch's `requests`, per reply in `responses` (the contract's
/// `request-words` and `response-words`).
const REQUEST_WORDS: usize = 9;
const RESPONSE_WORDS: usize = 13;

/// The buffers of a batch for the contract: commands' bytes, their ends and keys, and the
/// numbers that describe each command.
struct BatchBuilder {
    data: Vec<u8>,
    ends: Vec<u32>,
    keys: Vec<u32>,
    words: Vec<u32>,
}

impl BatchBuilder {
    fn new(commands: usize, words: usize) -> BatchBuilder {
        BatchBuilder {
            data: Vec::with_capacity(commands * 32),
            ends: Vec::with_capacity(commands * 3),
            keys: Vec::with_capacity(commands),
            words: Vec::with_capacity(commands * words),
        }
    }

    /// Adds a command (its name in lower case) and its `REQUEST_WORDS` numbers.
    fn push(
        &mut self,
        client: &ClientHandle,
        cmd: &crate::protocol::Command,
        categories: u32,
        keys: &[(u32, u8)],
    ) {
        let start = self.data.len() as u32;
        let first_end = self.ends.len() as u32;
        let first_key = self.keys.len() as u32;
        for (i, a) in cmd.iter().enumerate() {
            if i == 0 {
                self.data.extend(a.iter().map(u8::to_ascii_lowercase));
            } else {
                self.data.extend_from_slice(a);
            }
            self.ends.push(self.data.len() as u32);
        }
        for &(index, how) in keys {
            let mut k = index & 0x3fff_ffff;
            if how & crate::commands::access::READ != 0 {
                k |= 1 << 30;
            }
            if how & crate::commands::access::WRITE != 0 {
                k |= 1 << 31;
            }
            self.keys.push(k);
        }
        self.words.extend_from_slice(&client.words());
        self.words.extend_from_slice(&[
            start,
            first_end,
            cmd.len() as u32,
            categories,
            first_key,
            keys.len() as u32,
        ]);
    }
}

/// A command's keys as the contract numbers them (0 is the first argument after the name).
fn key_list(
    cmd: &crate::protocol::Command,
    info: Option<&crate::commands::CommandInfo>,
) -> SmallVec<[(u32, u8); 2]> {
    let mut keys = SmallVec::new();
    if let Some(info) = info {
        info.for_each_key(cmd, |i, how| keys.push(((i - 1) as u32, how)));
    }
    keys
}

/// A command on its way through the request chain.
struct InChain<'a> {
    client: &'a ClientHandle,
    /// Its lower-case name, once needed.
    name: Option<std::borrow::Cow<'a, str>>,
    /// Boxed: rare, and an item of every batch carries the field.
    rewritten: Option<Box<crate::protocol::Command>>,
    original: &'a crate::protocol::Command,
    info: Option<&'a crate::commands::CommandInfo>,
    /// A plugin refused or answered it.
    stopped: Option<Decision>,
    cache: Option<crate::cache::CacheFor>,
    gate: Option<Box<Gate>>,
    responses: SmallVec<[u16; 4]>,
    /// Its keys as the contract numbers them, found when first needed.
    keys: Option<SmallVec<[(u32, u8); 2]>>,
}

impl<'a> InChain<'a> {
    /// Its lower-case name, found when first needed (once per run of like commands).
    fn name(&mut self) -> &str {
        let (cmd, info) = (self.original, self.info);
        self.name.get_or_insert_with(|| lower_name(cmd, info))
    }

    fn cmd(&self) -> &crate::protocol::Command {
        self.rewritten.as_deref().unwrap_or(self.original)
    }

    fn keys(&mut self) -> &[(u32, u8)] {
        if self.keys.is_none() {
            self.keys = Some(key_list(self.cmd(), self.info));
        }
        self.keys.as_deref().unwrap_or_default()
    }

    /// Whether the plugin is to see it for its keys: it has one under the plugin's prefixes,
    /// or the plugin has none.
    fn in_scope(&mut self, plugin: &LoadedPlugin) -> bool {
        let Some(prefixes) = &plugin.key_prefixes else {
            return true;
        };
        self.keys();
        let cmd = self.rewritten.as_deref().unwrap_or(self.original);
        keys_under(prefixes, cmd, self.keys.as_deref().unwrap_or_default())
    }
}

/// Whether one of a command's keys (as [`key_list`] numbers them) starts with one of `prefixes`.
fn keys_under(
    prefixes: &crate::prefixes::Prefixes,
    cmd: &crate::protocol::Command,
    keys: &[(u32, u8)],
) -> bool {
    keys.iter()
        .any(|&(i, _)| cmd.arg(i as usize + 1).is_some_and(|k| prefixes.covers(k)))
}

impl PluginSet {
    /// Calls `f` with each plugin that sees a command the table knows, as the client sent it
    /// (by its index, and whether it has a request hook for it or serves it), in chain order
    /// until `f` says to stop: the request chain's own test. Gives back the command's keys when
    /// they were needed (for key prefixes).
    fn for_each_seeing(
        &self,
        cmd: &crate::protocol::Command,
        info: &crate::commands::CommandInfo,
        mut f: impl FnMut(usize, bool) -> bool,
    ) -> Option<SmallVec<[(u32, u8); 2]>> {
        let name = lower_name(cmd, Some(info));
        let mut keys: Option<SmallVec<[(u32, u8); 2]>> = None;
        for (pi, p) in self.plugins.iter().enumerate() {
            if !p.manifest.serves.is_empty() && p.manifest.serves.iter().any(|v| *v == *name) {
                if f(pi, true) {
                    break;
                }
                continue;
            }
            if !(p.manifest.on_request || p.responds) || !p.wants_info(info) {
                continue;
            }
            let in_scope = match &p.key_prefixes {
                None => true,
                Some(prefixes) => keys_under(
                    prefixes,
                    cmd,
                    keys.get_or_insert_with(|| key_list(cmd, Some(info))),
                ),
            };
            if in_scope && f(pi, p.manifest.on_request) {
                break;
            }
        }
        keys
    }

    /// Whether some plugin of the set would run a hook for this command as the client sent
    /// it, or record its traffic. Commands the table does not know always count as seen.
    pub fn any_sees(
        &self,
        cmd: &crate::protocol::Command,
        info: Option<&crate::commands::CommandInfo>,
    ) -> bool {
        let Some(info) = info else {
            return !self.plugins.is_empty();
        };
        if self.plugins.iter().any(|p| p.sees_every_command) {
            return true;
        }
        let mut seen = false;
        self.for_each_seeing(cmd, info, |_, _| {
            seen = true;
            true
        });
        seen
    }

    /// What the chain would decide for a command as the client sent it, when that needs no
    /// request hook: `Some` with "continue" and the response side owed (none when no plugin
    /// sees the command), `None` when a request hook (or a command a plugin serves) applies
    /// and the command must go through the plugin stage. Made before handing a command over,
    /// so that a batch no request hook asked for — commands no plugin wants, or only plugins
    /// with a response side — skips the stage. Commands the table does not know always go
    /// through. `start`: when respire read the command.
    pub fn decide_without_chain(
        set: &WorkerSet,
        cmd: &crate::protocol::Command,
        info: Option<&crate::commands::CommandInfo>,
        start: std::time::Instant,
    ) -> Option<(Decision, Option<Box<ResponseChain>>)> {
        let continue_ = || Decision::Continue {
            rewritten: None,
            cache: None,
            gate: None,
        };
        let Some(info) = info else {
            return set.plugins.is_empty().then(|| (continue_(), None));
        };
        let mut responses: SmallVec<[u16; 4]> = SmallVec::new();
        let mut request = false;
        let keys = set.for_each_seeing(cmd, info, |pi, has_request| {
            request |= has_request;
            responses.push(pi as u16);
            has_request
        });
        if request {
            return None;
        }
        if responses.is_empty() {
            return Some((continue_(), None));
        }
        let keys = keys.unwrap_or_else(|| key_list(cmd, Some(info)));
        Some((
            continue_(),
            Some(Box::new(ResponseChain::new(
                set,
                responses,
                cmd.clone(),
                Some(info),
                keys,
                start,
            ))),
        ))
    }
}

impl ResponseChain {
    fn new(
        set: &WorkerSet,
        plugins: SmallVec<[u16; 4]>,
        cmd: crate::protocol::Command,
        info: Option<&crate::commands::CommandInfo>,
        keys: SmallVec<[(u32, u8); 2]>,
        start: std::time::Instant,
    ) -> ResponseChain {
        ResponseChain {
            set: set.clone(),
            plugins,
            due: SmallVec::new(),
            name_id: info.map_or(crate::stats::OTHER, |i| i.id),
            categories: info.map_or(0, |i| i.category_bits),
            keys,
            cmd,
            start,
        }
    }
}

/// A command's name in lower case: the table's (no allocation) when it knows the command.
fn lower_name<'a>(
    cmd: &crate::protocol::Command,
    info: Option<&'a crate::commands::CommandInfo>,
) -> std::borrow::Cow<'a, str> {
    match info {
        Some(i) => std::borrow::Cow::Borrowed(i.command_name()),
        None => std::borrow::Cow::Owned(String::from_utf8_lossy(cmd.name()).to_ascii_lowercase()),
    }
}

/// The distinct clients of a batch, for the `client-info` import. A batch holds each session's
/// commands together, so the last client is checked first (a search of all of them for every
/// command was quadratic in the clients of a batch).
fn clients_of<'a>(handles: impl Iterator<Item = &'a ClientHandle>) -> Vec<Arc<Client>> {
    let mut out: Vec<Arc<Client>> = Vec::new();
    for h in handles {
        if out.last().is_some_and(|c| Arc::ptr_eq(c, &h.details)) {
            continue;
        }
        if !out.iter().any(|c| Arc::ptr_eq(c, &h.details)) {
            out.push(h.details.clone());
        }
    }
    out
}

/// Applies a plugin's decision about one command of the chain (nothing once it is stopped).
fn apply_action<'a, B>(
    it: &mut InChain<'a>,
    action: RequestAction,
    table: &'a CommandTable,
    built: &mut Option<B>,
) {
    if it.stopped.is_some() {
        return;
    }
    match action {
        RequestAction::Continue => {}
        RequestAction::Deny(msg) => it.stopped = Some(Decision::Deny(msg)),
        RequestAction::Respond(bytes) => it.stopped = Some(Decision::Respond(bytes)),
        RequestAction::Cache(c) => {
            let asked = crate::cache::CacheFor {
                ttl: Duration::from_millis(c.ttl_ms),
                empty_ttl: Duration::from_millis(c.empty_ttl_ms),
            };
            it.cache = Some(match it.cache {
                None => asked,
                Some(prev) => crate::cache::CacheFor {
                    ttl: prev.ttl.min(asked.ttl),
                    empty_ttl: prev.empty_ttl.min(asked.empty_ttl),
                },
            });
        }
        RequestAction::Rewrite(new_args) => {
            // The batch built for the next plugin no longer holds this command.
            *built = None;
            if let Some(n) = new_args.first() {
                let new = crate::protocol::Command::from_args(&new_args);
                // The table outlives the batch: look the new command up there.
                it.info = table.get(&new);
                it.name = Some(std::borrow::Cow::Owned(
                    String::from_utf8_lossy(n).to_ascii_lowercase(),
                ));
                it.rewritten = Some(Box::new(new));
                it.keys = None;
            }
        }
    }
}

impl WorkerPlugins {
    /// The instances of `set`: the current generation, the previous one, or a new current one
    /// when `set` is newer (the old current becomes the previous). `None` for an older set.
    fn generation(&mut self, set: &PluginSet) -> Option<&mut Generation> {
        let fresh = || Generation {
            version: set.version,
            instances: (0..set.plugins.len())
                .map(|_| PluginSlot::default())
                .collect(),
        };
        match (&self.current, &self.previous) {
            (Some(c), _) if c.version == set.version => self.current.as_mut(),
            (_, Some(p)) if p.version == set.version => self.previous.as_mut(),
            (Some(c), _) if c.version > set.version => None,
            _ => {
                self.previous = self.current.replace(fresh());
                self.current.as_mut()
            }
        }
    }

    /// Runs the request hooks of the chain on a batch of commands: each plugin is called
    /// once with every command of the batch it wants (that no plugin before it refused or
    /// answered), its effects are applied, and the decision for each command comes back
    /// with the response hooks owed for its reply.
    pub fn on_requests<'a>(
        &mut self,
        set: &WorkerSet,
        table: &'a CommandTable,
        batch: &[ChainRequest<'a>],
    ) -> Vec<(Decision, Option<Box<ResponseChain>>)> {
        let continue_ = || {
            (
                Decision::Continue {
                    rewritten: None,
                    cache: None,
                    gate: None,
                },
                None,
            )
        };
        let Some(generation) = self.generation(set) else {
            return batch.iter().map(|_| continue_()).collect();
        };
        let mut items: Vec<InChain<'a>> = batch
            .iter()
            .map(|r| InChain {
                client: r.client,
                name: None,
                rewritten: None,
                original: r.cmd,
                info: r.info,
                stopped: None,
                cache: None,
                gate: None,
                responses: SmallVec::new(),
                keys: None,
            })
            .collect();
        let mut members: Vec<usize> = Vec::with_capacity(items.len());
        // The batch of the last call, for the next plugin that sees the same commands: built
        // again only when the members differ or a plugin rewrote a command since.
        let mut built: Option<(Vec<usize>, RequestBatch, Vec<Arc<Client>>)> = None;
        let mut hits: Vec<(usize, std::rc::Rc<Repeat>)> = Vec::with_capacity(items.len());
        for (pi, plugin) in set.plugins.iter().enumerate() {
            let Some(slot) = generation.instances.get_mut(pi) else {
                continue;
            };
            members.clear();
            hits.clear();
            // What the last command decided for this plugin — whether it asks for it by name or
            // category, serves it, and its remembered decision — holds for the next one from the
            // same client with the same table entry (name and categories): a pipeline is mostly
            // such a run. Its keys are checked for each.
            let mut last: Option<(&ClientHandle, &crate::commands::CommandInfo, bool, bool)> = None;
            // The run's remembered decision, once looked up (`Some(None)`: there is none).
            let mut last_repeat: Option<Option<std::rc::Rc<Repeat>>> = None;
            for (i, it) in items.iter_mut().enumerate() {
                if it.stopped.is_some() {
                    continue;
                }
                let same = match (last, it.info) {
                    (Some((c, info, _, _)), Some(now)) => {
                        std::ptr::eq(c, it.client) && std::ptr::eq(info, now)
                    }
                    _ => false,
                };
                let (asks, serves) = match last {
                    Some((_, _, asks, serves)) if same => (asks, serves),
                    _ => {
                        let asks = match it.info {
                            Some(info) => plugin.wants_info(info),
                            None => plugin.wants_unknown(it.name()),
                        };
                        let serves = !plugin.manifest.serves.is_empty() && {
                            let name = it.name();
                            plugin.manifest.serves.iter().any(|v| *v == *name)
                        };
                        (asks, serves)
                    }
                };
                let wants = asks && it.in_scope(plugin);
                if plugin.responds && wants {
                    it.responses.push(pi as u16);
                }
                if !same {
                    last_repeat = None;
                }
                if (wants && plugin.manifest.on_request) || serves {
                    let repeat = match &last_repeat {
                        Some(r) => r,
                        None => last_repeat.insert(if slot.repeats.is_empty() {
                            None
                        } else {
                            repeat_key(it)
                                .and_then(|k| slot.repeats.get(&k))
                                .filter(|r| r.generation == it.client.generation)
                                .cloned()
                        }),
                    };
                    match repeat {
                        Some(r) => hits.push((i, r.clone())),
                        None => members.push(i),
                    }
                }
                last = it.info.map(|info| (it.client, info, asks, serves));
            }
            if members.is_empty() && hits.is_empty() {
                continue;
            }
            let result = 'call: {
                if members.is_empty() {
                    break 'call None;
                }
                let Some(inst) = slot.get(plugin, "request") else {
                    if plugin.settings.on_error == OnError::Closed {
                        for &i in &members {
                            items[i].stopped = Some(Decision::Deny(format!(
                                "ERR respire: plugin {} is failing",
                                plugin.file_name
                            )));
                        }
                    }
                    break 'call None;
                };
                if built.as_ref().is_none_or(|(m, _, _)| *m != members) {
                    let mut b = BatchBuilder::new(members.len(), REQUEST_WORDS);
                    for &i in &members {
                        let it = &mut items[i];
                        it.keys();
                        b.push(
                            it.client,
                            it.cmd(),
                            it.info.map_or(0, |i| i.category_bits),
                            it.keys.as_deref().unwrap_or_default(),
                        );
                    }
                    let clients = clients_of(members.iter().map(|&i| items[i].client));
                    built = Some((
                        members.clone(),
                        RequestBatch {
                            data: b.data,
                            ends: b.ends,
                            keys: b.keys,
                            requests: b.words,
                        },
                        clients,
                    ));
                }
                let Some((_, wit, clients)) = &built else {
                    break 'call None;
                };
                let started = std::time::Instant::now();
                let result = inst.on_requests(plugin.settings.time_budget, clients, wit);
                plugin
                    .ctx
                    .stats
                    .request_seconds
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(r) => {
                        slot.succeeded();
                        plugin.ctx.stats.request_ok.inc_by(members.len() as u64);
                        Some(r)
                    }
                    Err((kind, e)) => {
                        plugin.ctx.stats.request_err.inc();
                        note_failure(plugin, "request", kind.as_str(), &e);
                        slot.failed();
                        if plugin.settings.on_error == OnError::Closed {
                            for &i in &members {
                                items[i].stopped = Some(Decision::Deny(format!(
                                    "ERR respire: plugin {} failed",
                                    plugin.file_name
                                )));
                            }
                        }
                        None
                    }
                }
            };
            if !hits.is_empty() {
                plugin.ctx.stats.request_repeated.inc_by(hits.len() as u64);
            }
            let (decisions, takes, repeatable) = match result {
                Some(r) => {
                    plugin.ctx.apply(&mut slot.metrics, &r.updates);
                    slot.metrics.flush();
                    plugin.ctx.add_to_counters(&r.counters);
                    (r.decisions, r.takes, r.repeatable)
                }
                None => (Vec::new(), Vec::new(), Vec::new()),
            };
            // The call's takes, grouped by request in one sort (they usually come in request
            // order already; a filter per command would be quadratic in the batch).
            let mut order: Vec<&bindings::respire::plugin::types::Take> = takes.iter().collect();
            order.sort_by_key(|t| t.request);
            if !repeatable.is_empty() {
                if slot.repeats.len() + repeatable.len() > MAX_REPEATS {
                    slot.repeats.clear();
                }
                let mut action_of: Vec<Option<&RequestAction>> = vec![None; members.len()];
                for d in &decisions {
                    if let Some(a) = action_of.get_mut(d.request as usize) {
                        *a = Some(&d.action);
                    }
                }
                for &r in &repeatable {
                    let Some(&i) = members.get(r as usize) else {
                        continue;
                    };
                    let action = action_of[r as usize].unwrap_or(&RequestAction::Continue);
                    if matches!(action, RequestAction::Rewrite(_)) {
                        continue;
                    }
                    let Some(key) = repeat_key(&items[i]) else {
                        continue;
                    };
                    let from = order.partition_point(|t| t.request < r);
                    let to = order.partition_point(|t| t.request <= r);
                    let takes = order[from..to].iter().map(|t| (*t).clone()).collect();
                    let repeat = Repeat {
                        generation: items[i].client.generation,
                        action: action.clone(),
                        takes,
                    };
                    slot.repeats.insert(key, std::rc::Rc::new(repeat));
                }
            }
            // Tokens first, per command and in the batch's order, all or nothing: a refusal
            // stops that command. The repeated decisions' takes are taken again with the call's.
            // (Sized up front: these are built for every batch, and growing them was a
            // reallocation or two each.)
            let mut hit_takes: Vec<&bindings::respire::plugin::types::Take> =
                Vec::with_capacity(hits.iter().map(|(_, r)| r.takes.len()).sum());
            hit_takes.extend(hits.iter().flat_map(|(_, r)| r.takes.iter()));
            let mut groups: Vec<(usize, &[&bindings::respire::plugin::types::Take])> =
                Vec::with_capacity(order.len() + hits.len());
            groups.extend(
                order
                    .chunk_by(|a, b| a.request == b.request)
                    .filter_map(|g| Some((*members.get(g[0].request as usize)?, g))),
            );
            if !hit_takes.is_empty() {
                let mut at = 0;
                for (i, r) in &hits {
                    if !r.takes.is_empty() {
                        groups.push((*i, &hit_takes[at..at + r.takes.len()]));
                        at += r.takes.len();
                    }
                }
                groups.sort_by_key(|g| g.0);
            }
            // A run of commands that each take once from the same local bucket takes the sum
            // at once — what taking one by one does when the bucket holds enough, for one lock
            // and lookup instead of one per command (a pipeline mostly is such a run). When
            // the bucket is short, they take one by one, so the first ones still pass.
            let single = |g| plugin.ctx.single_local_take(g);
            let mut k = 0;
            while k < groups.len() {
                let mut end = k + 1;
                if let Some(bucket) = single(groups[k].1) {
                    while end < groups.len() && single(groups[end].1) == Some(bucket) {
                        end += 1;
                    }
                    if end > k + 1 {
                        let sum: u64 = groups[k..end].iter().map(|g| u64::from(g.1[0].cost)).sum();
                        if let Ok(sum) = u32::try_from(sum)
                            && plugin.ctx.take(bucket.0, bucket.1, sum).is_ok()
                        {
                            k = end;
                            continue;
                        }
                    }
                }
                for &(i, mine) in &groups[k..end] {
                    let it = &mut items[i];
                    if let Err(msg) = plugin.ctx.take_all(mine, &mut it.gate) {
                        it.stopped = Some(Decision::Deny(msg));
                    }
                }
                k = end;
            }
            drop(groups);
            drop(order);
            for (i, r) in hits.drain(..) {
                if !matches!(r.action, RequestAction::Continue) {
                    apply_action(&mut items[i], r.action.clone(), table, &mut built);
                }
            }
            for d in decisions {
                let Some(&i) = members.get(d.request as usize) else {
                    continue;
                };
                apply_action(&mut items[i], d.action, table, &mut built);
            }
        }
        let now = std::time::Instant::now();
        items
            .into_iter()
            .map(|mut it| {
                let chain = if it.responses.is_empty() {
                    None
                } else {
                    it.keys();
                    let keys = it.keys.take().unwrap_or_default();
                    let cmd = it.cmd().clone();
                    Some(Box::new(ResponseChain::new(
                        set,
                        it.responses,
                        cmd,
                        it.info,
                        keys,
                        now,
                    )))
                };
                // Refused or answered by a plugin: shared buckets are not asked; local tokens stay
                // taken, as for any refusal by a later plugin.
                let decision = it.stopped.unwrap_or(Decision::Continue {
                    rewritten: it.rewritten,
                    cache: it.cache,
                    gate: it.gate,
                });
                (decision, chain)
            })
            .collect()
    }

    /// Runs the response hooks owed on a batch of replies (each plugin once, in reverse chain
    /// order, with every reply that owes it a hook) and applies their effects: for each
    /// reply, the one to send instead, when a plugin replaced it.
    pub fn on_responses(
        &mut self,
        batch: &[ChainResponse<'_>],
        record_traffic: bool,
    ) -> Vec<Option<Vec<u8>>> {
        let mut replaced: Vec<Option<Vec<u8>>> = batch.iter().map(|_| None).collect();
        let Some(first) = batch.first() else {
            return replaced;
        };
        // Chains of one plugin set go together (a reload may leave replies of the old one).
        let sets: Vec<WorkerSet> = {
            let mut v: Vec<WorkerSet> = vec![first.chain.set.clone()];
            for r in batch {
                if !v.iter().any(|s| Rc::ptr_eq(s, &r.chain.set)) {
                    v.push(r.chain.set.clone());
                }
            }
            v
        };
        for set in sets {
            let Some(generation) = self.generation(&set) else {
                continue;
            };
            for pi in (0..set.plugins.len()).rev() {
                let members: Vec<usize> = (0..batch.len())
                    .filter(|&i| {
                        Rc::ptr_eq(&batch[i].chain.set, &set)
                            && batch[i].chain.due.contains(&(pi as u16))
                    })
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let Some(plugin) = set.plugins.get(pi) else {
                    continue;
                };
                let Some(slot) = generation.instances.get_mut(pi) else {
                    continue;
                };
                let Some(inst) = slot.get(plugin, "response") else {
                    continue;
                };
                let mut b = BatchBuilder::new(members.len(), RESPONSE_WORDS);
                let mut replies = Vec::with_capacity(
                    members
                        .iter()
                        .map(|&i| replaced[i].as_deref().unwrap_or(batch[i].reply).len())
                        .sum(),
                );
                let now = std::time::Instant::now();
                for &i in &members {
                    let r = &batch[i];
                    b.push(r.client, &r.chain.cmd, r.chain.categories, &r.chain.keys);
                    let reply = replaced[i].as_deref().unwrap_or(r.reply);
                    let reply_start = replies.len() as u32;
                    replies.extend_from_slice(reply);
                    let us = now.saturating_duration_since(r.chain.start).as_micros() as u64;
                    b.words.extend_from_slice(&[
                        reply_start,
                        replies.len() as u32,
                        us as u32,
                        (us >> 32) as u32,
                    ]);
                }
                let clients = clients_of(members.iter().map(|&i| batch[i].client));
                let wit = ResponseBatch {
                    data: b.data,
                    ends: b.ends,
                    keys: b.keys,
                    responses: b.words,
                    replies,
                };
                let started = std::time::Instant::now();
                let result = inst.on_responses(plugin.settings.time_budget, &clients, &wit);
                plugin
                    .ctx
                    .stats
                    .response_seconds
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(r) => {
                        slot.succeeded();
                        plugin.ctx.stats.response_ok.inc_by(members.len() as u64);
                        plugin.ctx.apply(&mut slot.metrics, &r.updates);
                        slot.metrics.flush();
                        plugin.ctx.add_to_counters(&r.counters);
                        // An observing hook's replacements are ignored (its replies went out already).
                        let replacements = if plugin.manifest.observe_responses {
                            Vec::new()
                        } else {
                            r.replacements
                        };
                        for rep in replacements {
                            let Some(&i) = members.get(rep.response as usize) else {
                                continue;
                            };
                            if crate::protocol::reply_len(&rep.reply).ok().flatten()
                                == Some(rep.reply.len())
                            {
                                replaced[i] = Some(rep.reply);
                            } else {
                                note_failure(
                                    plugin,
                                    "response",
                                    "invalid-reply",
                                    "the replacement is not one complete RESP reply",
                                );
                            }
                        }
                    }
                    Err((kind, e)) => {
                        plugin.ctx.stats.response_err.inc();
                        note_failure(plugin, "response", kind.as_str(), &e);
                        slot.failed();
                        if plugin.settings.on_error == OnError::Closed
                            && !plugin.manifest.observe_responses
                        {
                            let text =
                                format!("-ERR respire: plugin {} failed\r\n", plugin.file_name);
                            for &i in &members {
                                replaced[i] = Some(text.clone().into_bytes());
                            }
                        }
                    }
                }
            }
        }
        if record_traffic {
            let now = std::time::Instant::now();
            for (r, replaced) in batch.iter().zip(&replaced) {
                self.record_traffic(r.chain, replaced.as_deref().unwrap_or(r.reply), now);
            }
        }
        replaced
    }

    /// Decides what a reply owes the plugins when it arrives: which response hooks are due
    /// (their filters), and whether it must be held for hooks that may replace it. Unless it
    /// is held, its traffic metrics are recorded now (a held reply's are recorded by
    /// [`WorkerPlugins::on_responses`], on the reply the client gets).
    /// `now`: when the reply arrived (its latency ends there).
    pub fn on_reply(
        &mut self,
        chain: &mut ResponseChain,
        reply: &[u8],
        now: std::time::Instant,
    ) -> ReplyRoute {
        let mut hold = false;
        chain.due.clear();
        let mut cmd_bytes = None;
        for &pi in &chain.plugins {
            let Some(p) = chain.set.plugins.get(pi as usize) else {
                continue;
            };
            if p.manifest.on_response
                && p.takes_reply(reply, || {
                    *cmd_bytes.get_or_insert_with(|| traffic::command_bytes(&chain.cmd))
                })
            {
                chain.due.push(pi);
                hold |= !p.manifest.observe_responses;
            }
        }
        if hold {
            return ReplyRoute::Hold;
        }
        self.record_traffic(chain, reply, now);
        if chain.due.is_empty() {
            ReplyRoute::Done
        } else {
            ReplyRoute::Observe
        }
    }

    /// Records a reply's traffic metrics, for every plugin of its chain that has some.
    fn record_traffic(&mut self, chain: &ResponseChain, reply: &[u8], now: std::time::Instant) {
        let mut facts = None;
        for &pi in &chain.plugins {
            let Some(p) = chain.set.plugins.get(pi as usize) else {
                continue;
            };
            if p.ctx.traffic.is_empty() {
                continue;
            }
            let f = facts.get_or_insert_with(|| traffic::ReplyFacts {
                name_id: chain.name_id,
                cmd: &chain.cmd,
                first_key: chain
                    .keys
                    .first()
                    .and_then(|&(i, _)| chain.cmd.arg(i as usize + 1)),
                reply,
                start: chain.start,
                end: now,
            });
            let Some(generation) = self.generation(&chain.set) else {
                return;
            };
            let Some(slot) = generation.instances.get_mut(pi as usize) else {
                continue;
            };
            slot.traffic.record(&p.ctx, &mut slot.metrics, f);
            self.dirty = true;
        }
    }

    /// Makes the traffic metrics recorded since the last call visible (once per turn of the
    /// worker's event loop, from its plugin stage).
    pub fn flush_metrics(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        for generation in [&mut self.current, &mut self.previous]
            .into_iter()
            .flatten()
        {
            for slot in &mut generation.instances {
                slot.traffic.settle(&mut slot.metrics);
                slot.metrics.flush();
            }
        }
    }

    /// Whether traffic metrics wait for [`WorkerPlugins::flush_metrics`].
    pub fn dirty(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counter_changes_skip_what_does_not_fit() {
        let c = super::CounterChanges {
            keys: b"hits:ahits:b".to_vec(),
            key_ends: vec![6, 3, 12, 99, 12],
            deltas: vec![1, 2, 3, 4, 5, 6],
            ttls_ms: vec![10, 20, 30, 40, 50],
        };
        let got: Vec<(String, i64, u128)> = super::counter_changes(&c)
            .map(|(k, d, t)| (k.into_owned(), d, t.as_millis()))
            .collect();
        // 6..3 runs backwards and 12..99 past the end: skipped, and each next key starts where
        // the skipped one said it ended (3..12, then 99..12: skipped); the sixth delta has no end.
        assert_eq!(
            got,
            vec![
                ("hits:a".to_string(), 1, 10),
                ("s:ahits:b".to_string(), 3, 30)
            ]
        );
    }

    #[test]
    fn the_contract_version_is_the_wit_package_version() {
        let wit = include_str!("../../wit/plugin.wit");
        let package = wit
            .lines()
            .find(|l| l.starts_with("package "))
            .unwrap_or_default();
        assert_eq!(
            package,
            format!("package respire:plugin@{};", super::CONTRACT_VERSION)
        );
    }
}
