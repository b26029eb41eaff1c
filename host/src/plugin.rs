//! WebAssembly plugins: the wasmtime component host.
//!
//! One [`Engine`] for the process (component model, epoch interruption for the
//! per-call time budget, no concurrency support: measured ≈3× cheaper calls).
//! Plugins are compiled and checked once (`init` must return a manifest) and
//! kept as [`PluginPre`]s in a [`PluginSet`]; each worker instantiates its own
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
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

pub use bindings::respire::plugin::types::{
    Client, ClientRef, Command as WitCommand, Manifest, MetricKind as WitMetricKind, MetricUpdate, RequestAction, RequestResult, ResponseAction,
    ResponseResult,
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
    /// Time budget of one call. Default: "1ms".
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
    /// The client the current call is about (for the `client` import).
    client: Option<Arc<Client>>,
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
    fn wit(&self) -> ClientRef {
        ClientRef { id: self.details.id, generation: self.generation }
    }
}

impl ResourceLimiter for StoreData {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
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
    limiters: Vec<LimiterDef>,
    /// Some limiter is shared.
    has_shared: bool,
    state: Arc<SharedState>,
    stats: HookStats,
}

/// respire's counters for one plugin, resolved once.
struct HookStats {
    request_seconds: prometheus::Histogram,
    response_seconds: prometheus::Histogram,
    request_ok: prometheus::IntCounter,
    request_err: prometheus::IntCounter,
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
            response_ok: c.with_label_values(&[plugin, "response", "ok"]),
            response_err: c.with_label_values(&[plugin, "response", "error"]),
        }
    }
}

impl PluginCtx {
    fn record(&self, updates: &[MetricUpdate]) {
        for u in updates {
            match self.metrics.get(u.metric as usize) {
                Some(m) => m.record(&u.labels, u.value),
                None => plugin_stats().dropped_updates.with_label_values(&[&*self.name]).inc(),
            }
        }
    }

    fn take(&self, limiter: u32, key: &str, cost: u32) -> Result<u32, u64> {
        match self.limiters.get(limiter as usize) {
            Some(l) => self.state.take(&self.name, &l.name, l.rule, key, cost),
            None => Err(u64::MAX),
        }
    }

    /// Takes every local bucket's tokens, or none: the error text when one bucket is short.
    /// Takes on shared limiters go to `gate` (respire asks Redis before the command goes on);
    /// the local takes of a plugin with shared limiters are noted there too, to be given back
    /// if Redis refuses.
    fn take_all(self: &Arc<Self>, takes: &[bindings::respire::plugin::types::Take], gate: &mut Option<Box<Gate>>) -> Result<(), String> {
        for (i, t) in takes.iter().enumerate() {
            let Some(l) = self.limiters.get(t.limiter as usize) else {
                self.refund(&takes[..i]);
                return Err(format!("ERR rate limit #{} is not declared by plugin {}", t.limiter, self.name));
            };
            if l.shared {
                let g = gate.get_or_insert_default();
                g.shared.push(SharedTake { ctx: self.clone(), limiter: l.name.clone(), rule: l.rule, key: t.key.clone(), cost: t.cost });
                continue;
            }
            if let Err(wait) = self.state.take(&self.name, &l.name, l.rule, &t.key, t.cost) {
                self.refund(&takes[..i]);
                plugin_stats().rate_limited.with_label_values(&[&*self.name, &l.name]).inc();
                return Err(rate_limit_error(&l.name, wait));
            }
        }
        if self.has_shared {
            let g = gate.get_or_insert_default();
            for t in takes {
                if let Some(l) = self.limiters.get(t.limiter as usize).filter(|l| !l.shared) {
                    g.refunds.push((self.clone(), l.name.clone(), t.key.clone(), t.cost));
                }
            }
        }
        Ok(())
    }

    /// Gives back the local tokens of these takes.
    fn refund(&self, takes: &[bindings::respire::plugin::types::Take]) {
        for t in takes {
            if let Some(l) = self.limiters.get(t.limiter as usize).filter(|l| !l.shared) {
                self.state.refund(&self.name, &l.name, &t.key, t.cost);
            }
        }
    }
}

/// The error a client gets when a bucket is empty (`wait`: ms until it has enough tokens;
/// `u64::MAX`: never).
pub fn rate_limit_error(limiter: &str, wait: u64) -> String {
    if wait == u64::MAX {
        format!("ERR rate limit '{limiter}' exceeded, and this command costs more than the limit allows")
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
        format!("{{respire:ratelimit:{}:{}:{}}}", self.ctx.name, self.limiter, self.key)
    }

    /// Counts a refusal.
    pub fn note_refused(&self) {
        plugin_stats().rate_limited.with_label_values(&[&*self.ctx.name, &self.limiter]).inc();
    }

    /// Counts a take Redis could not answer (the command was let through).
    pub fn note_error(&self, error: &str) {
        plugin_stats().failures.with_label_values(&[&*self.ctx.name, "request", "shared-limiter"]).inc();
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
fn link_wasi_minimum(linker: &mut Linker<StoreData>, engine: &Engine, component: &Component) -> wasmtime::Result<()> {
    let names: Vec<String> = component.component_type().imports(engine).map(|(n, _)| n.to_string()).collect();
    for name in names {
        let base = name.split('@').next().unwrap_or_default();
        match base {
            "wasi:random/random" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-random-bytes", |_, (len,): (u64,)| Ok((random_bytes(len),)))?;
                i.func_wrap("get-random-u64", |_, (): ()| Ok((fastrand::u64(..),)))?;
            }
            "wasi:random/insecure" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-insecure-random-bytes", |_, (len,): (u64,)| Ok((random_bytes(len),)))?;
                i.func_wrap("get-insecure-random-u64", |_, (): ()| Ok((fastrand::u64(..),)))?;
            }
            "wasi:random/insecure-seed" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("insecure-seed", |_, (): ()| Ok(((fastrand::u64(..), fastrand::u64(..)),)))?;
            }
            "wasi:cli/environment" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("get-environment", |_, (): ()| Ok((Vec::<(String, String)>::new(),)))?;
                i.func_wrap("get-arguments", |_, (): ()| Ok((Vec::<String>::new(),)))?;
                i.func_wrap("initial-cwd", |_, (): ()| Ok((None::<String>,)))?;
            }
            "wasi:clocks/monotonic-clock" => {
                let start = std::time::Instant::now();
                let mut i = linker.instance(&name)?;
                i.func_wrap("now", move |_, (): ()| Ok((start.elapsed().as_nanos() as u64,)))?;
                i.func_wrap("resolution", |_, (): ()| Ok((1u64,)))?;
            }
            "wasi:clocks/wall-clock" => {
                let mut i = linker.instance(&name)?;
                i.func_wrap("now", |_, (): ()| {
                    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    Ok((Datetime { seconds: d.as_secs(), nanoseconds: d.subsec_nanos() },))
                })?;
                i.func_wrap("resolution", |_, (): ()| Ok((Datetime { seconds: 0, nanoseconds: 1 },)))?;
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

    fn client_info(&mut self) -> Client {
        match &self.client {
            Some(c) => Client::clone(c),
            None => Client { id: 0, addr: String::new(), user: String::new(), db: 0, name: String::new(), protocol: 2 },
        }
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }

    fn record_metric(&mut self, update: MetricUpdate) {
        if let Some(ctx) = &self.ctx {
            ctx.record(std::slice::from_ref(&update));
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
            Some(ctx) => ctx.state.counter_add(&self.name, &key, delta, Duration::from_millis(ttl_ms)),
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
            Some(ctx) => ctx.state.counter_top(&self.name, &prefix, count.min(10_000) as usize),
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
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
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
        Ok(Runtime { engine, cache_dir, compiled: std::sync::Mutex::default(), state: Arc::default() })
    }

    /// The machine code of a plugin: from this process, from the artifact cache, or compiled
    /// now (and then cached). Keyed by the SHA-256 of the file and the engine's settings.
    fn compile(&self, path: &Path) -> Result<(Component, Compiled), PluginError> {
        use sha2::Digest;
        use std::hash::{Hash, Hasher};
        let err = |message: String| PluginError::Load { path: path.into(), message };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let digest = sha2::Sha256::digest(&bytes);
        let mut key: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        key.push_str(&format!("-{:016x}", engine_hash.finish()));
        if let Some(c) = self.compiled.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok((c, Compiled::Memory));
        }
        let artifact = self.cache_dir.as_ref().map(|d| d.join(format!("{key}.cwasm")));
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
        let file_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        // Taken before reading, so that a change made while loading is seen by the next scan.
        let stamp = fingerprint(path);
        let settings_path = path.with_extension("toml");
        let settings = if settings_path.exists() {
            let text = std::fs::read_to_string(&settings_path)
                .map_err(|e| PluginError::Settings { path: settings_path.clone(), message: e.to_string() })?;
            toml::from_str::<PluginSettings>(&text).map_err(|e| PluginError::Settings { path: settings_path.clone(), message: e.to_string() })?
        } else {
            PluginSettings::default()
        };
        let (component, compiled) = self.compile(path)?;
        let link = || -> wasmtime::Result<_> {
            let mut linker = Linker::new(&self.engine);
            Plugin::add_to_linker::<StoreData, wasmtime::component::HasSelf<StoreData>>(&mut linker, |d| d)?;
            link_wasi_minimum(&mut linker, &self.engine, &component)?;
            linker.instantiate_pre(&component)
        };
        let pre = link().map_err(|e| PluginError::Load { path: path.into(), message: format!("{e:#}") })?;
        let pre = PluginPre::new(pre).map_err(|e| PluginError::Load { path: path.into(), message: format!("{e:#}") })?;
        let config = toml::to_string(&settings.config).unwrap_or_default();
        let name: Arc<str> = Arc::from(file_name.as_str());
        let init_err = |message: String| PluginError::Init { name: file_name.clone(), message };
        // Check it: instantiate and init once, as every worker will.
        let (_, manifest) =
            new_instance(&self.engine, &pre, &name, &settings, &config, None).map_err(|e| init_err(format!("{e:#}")))?;
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
                return Err(init_err(format!("limiter {:?}: rate must be ≥ 0 and burst ≥ 1", l.name)));
            }
            limiters.push(LimiterDef { name: l.name.clone(), rule: Rule { rate: l.rate, burst: l.burst }, shared: l.shared });
        }
        let has_shared = limiters.iter().any(|l| l.shared);
        let ctx = Arc::new(PluginCtx {
            name: name.clone(),
            metrics,
            limiters,
            has_shared,
            state: self.state.clone(),
            stats: HookStats::new(&file_name),
        });
        Ok(LoadedPlugin {
            commands: manifest.commands.iter().map(|c| c.to_ascii_lowercase()).collect(),
            all: manifest.categories.iter().any(|c| c == "all"),
            category_bits: manifest.categories.iter().fold(0, |b, c| b | crate::commands::category_bit(c)),
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
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "wasm")).collect(),
            Err(e) => return (Vec::new(), vec![PluginError::Load { path: dir.into(), message: e.to_string() }]),
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
        loaded.sort_by(|a, b| a.settings.order.cmp(&b.settings.order).then(a.file_name.cmp(&b.file_name)));
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
    commands: HashSet<String>,
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
        client: None,
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
                let used = since.zip(thread_cpu()).map(|(s, now)| now.saturating_sub(s));
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

impl LoadedPlugin {
    /// Whether the plugin asked for this command (by name or category bits).
    pub fn wants(&self, lower_name: &str, category_bits: u32) -> bool {
        self.all || category_bits & self.category_bits != 0 || self.commands.contains(lower_name)
    }

    /// A fresh instance with `init` run.
    pub fn instantiate(&self) -> Result<Instance, String> {
        match new_instance(&self.engine, &self.pre, &self.name, &self.settings, &self.config, Some(self.ctx.clone())) {
            Ok((inst, Ok(_))) => Ok(inst),
            Ok((_, Err(e))) => Err(e),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

/// CPU time used by this thread so far.
fn thread_cpu() -> Option<Duration> {
    cpu_time::ThreadTime::try_now().ok().map(|t| t.as_duration())
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_micros() / TICK.as_micros()).max(1) as u64 + 1
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

    /// Calls the request hook within the plugin's time budget.
    fn on_request(&mut self, budget: Duration, client: &ClientHandle, command: &WitCommand) -> Result<RequestResult, (Failure, String)> {
        self.prepare(budget);
        self.store.data_mut().client = Some(client.details.clone());
        self.plugin.call_on_request(&mut self.store, client.wit(), command).map_err(|e| (self.failure(&e), format!("{e:#}")))
    }

    /// Calls the response hook within the plugin's time budget.
    fn on_response(
        &mut self,
        budget: Duration,
        client: &ClientHandle,
        command: &WitCommand,
        reply: &[u8],
        elapsed_us: u64,
    ) -> Result<ResponseResult, (Failure, String)> {
        self.prepare(budget);
        self.store.data_mut().client = Some(client.details.clone());
        self.plugin.call_on_response(&mut self.store, client.wit(), command, reply, elapsed_us).map_err(|e| (self.failure(&e), format!("{e:#}")))
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
}

/// Size and modification time of a file.
type FileStamp = (u64, std::time::SystemTime);

/// What identifies a plugin's files for reloading: `NAME.wasm`'s stamp and `NAME.toml`'s, if any.
type Fingerprint = Option<(u64, std::time::SystemTime, Option<FileStamp>)>;


/// The fingerprint of a plugin file and its settings.
fn fingerprint(wasm: &Path) -> Fingerprint {
    let m = std::fs::metadata(wasm).ok()?;
    let s = std::fs::metadata(wasm.with_extension("toml")).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
    Some((m.len(), m.modified().ok()?, s))
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
    let Some(rt) = shared.plugin_runtime.as_ref() else { return };
    let (tx, rx) = std::sync::mpsc::channel();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, notify::RecursiveMode::NonRecursive).map(|_| w));
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
        .map(|p| (dir.join(format!("{}.wasm", p.file_name)), (p.stamp, p.clone())))
        .collect();
    // Files that failed to load, so that they are not retried (and logged) until they change.
    let mut rejected: std::collections::HashMap<PathBuf, Fingerprint> = std::collections::HashMap::new();
    // Changes seen by polling, loaded when still the same at the next poll.
    let mut pending: std::collections::HashMap<PathBuf, Fingerprint> = std::collections::HashMap::new();
    let mut settled = false;
    loop {
        if *shared.shutdown.borrow() {
            return;
        }
        let polled = match rx.recv_timeout(POLL) {
            Ok(()) => {
                // Quiet period: wait until events stop for a moment (a copy in progress, an editor's save).
                while rx.recv_timeout(QUIET).is_ok() {}
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
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "wasm")).collect(),
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
            let unchanged = old.as_ref().is_some_and(|(old_fp, _)| *old_fp == fp) || rejected.get(&f) == Some(&fp);
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
                    plugin_stats().reloads.with_label_values(&["rejected"]).inc();
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
                plugin_stats().reloads.with_label_values(&["unloaded"]).inc();
            }
            keep
        });
        rejected.retain(|path, _| seen.contains(path));
        pending.retain(|path, _| seen.contains(path));
        changed |= known.len() != before;
        if changed {
            next.sort_by(|a, b| a.settings.order.cmp(&b.settings.order).then(a.file_name.cmp(&b.file_name)));
            let version = shared.plugins.load().version + 1;
            shared.plugins.store(Arc::new(PluginSet { version, plugins: next }));
        }
    }
}

/// What the request chain decided.
pub enum Decision {
    /// Go on with this command (possibly rewritten).
    Continue {
        /// The new command, when a plugin rewrote it.
        rewritten: Option<crate::protocol::Command>,
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

/// The response hooks owed for one command: run on its reply, in reverse chain order.
pub struct ResponseChain {
    set: Arc<PluginSet>,
    plugins: Vec<usize>,
    command: WitCommand,
    start: std::time::Instant,
}

/// Logs a failed call (once per burst: at the 1st, 2nd, 4th, 8th … failure) and counts it.
fn note_failure(plugin: &LoadedPlugin, hook: &str, kind: &str, error: &str) {
    let n = plugin.failures.fetch_add(1, Ordering::Relaxed) + 1;
    plugin_stats().failures.with_label_values(&[&plugin.file_name, hook, kind]).inc();
    if n.is_power_of_two() {
        warn!(plugin = %plugin.file_name, hook, kind, failures = n, error = %error, "plugin call failed; instance recycled");
    }
}

impl WorkerPlugins {
    /// The instances of `set`: the current generation, the previous one, or a new current one
    /// when `set` is newer (the old current becomes the previous). `None` for an older set.
    fn generation(&mut self, set: &PluginSet) -> Option<&mut Generation> {
        let fresh = || Generation { version: set.version, instances: (0..set.plugins.len()).map(|_| PluginSlot::default()).collect() };
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

    /// Runs the request hooks of every plugin that wants this command, in order, applies
    /// their effects, and gathers the response hooks owed for its reply.
    pub fn on_request(
        &mut self,
        set: &Arc<PluginSet>,
        table: &CommandTable,
        client: &ClientHandle,
        cmd: &crate::protocol::Command,
        info: Option<&crate::commands::CommandInfo>,
    ) -> (Decision, Option<Box<ResponseChain>>) {
        // Read the clock only when some plugin will want the elapsed time.
        let mut start = None;
        let continue_ = || (Decision::Continue { rewritten: None, cache: None, gate: None }, None);
        if cmd.is_empty() {
            return continue_();
        }
        let Some(generation) = self.generation(set) else { return continue_() };
        let mut name = String::from_utf8_lossy(cmd.name()).to_ascii_lowercase();
        let mut info = info;
        let mut rewritten: Option<crate::protocol::Command> = None;
        let mut cache: Option<crate::cache::CacheFor> = None;
        let mut gate: Option<Box<Gate>> = None;
        let mut command: Option<WitCommand> = None;
        let mut responses = Vec::new();
        let mut decision = None;
        for (i, plugin) in set.plugins.iter().enumerate() {
            let serves = !plugin.manifest.serves.is_empty() && plugin.manifest.serves.contains(&name);
            let wants = plugin.wants(&name, info.map_or(0, |i| i.category_bits));
            if !wants && !serves {
                continue;
            }
            if plugin.manifest.on_response && wants {
                start.get_or_insert_with(std::time::Instant::now);
                responses.push(i);
            }
            if !plugin.manifest.on_request && !serves {
                continue;
            }
            let wit = command.get_or_insert_with(|| wit_command(&name, rewritten.as_ref().unwrap_or(cmd), info));
            let Some(slot) = generation.instances.get_mut(i) else { continue };
            let Some(inst) = slot.get(plugin, "request") else {
                if plugin.settings.on_error == OnError::Closed {
                    decision = Some(Decision::Deny(format!("ERR respire: plugin {} is failing", plugin.file_name)));
                    break;
                }
                continue;
            };
            let started = std::time::Instant::now();
            let result = inst.on_request(plugin.settings.time_budget, client, wit);
            plugin.ctx.stats.request_seconds.observe(started.elapsed().as_secs_f64());
            let result = match result {
                Ok(r) => {
                    slot.succeeded();
                    r
                }
                Err((kind, e)) => {
                    plugin.ctx.stats.request_err.inc();
                    note_failure(plugin, "request", kind.as_str(), &e);
                    slot.failed();
                    if plugin.settings.on_error == OnError::Closed {
                        decision = Some(Decision::Deny(format!("ERR respire: plugin {} failed", plugin.file_name)));
                        break;
                    }
                    continue;
                }
            };
            plugin.ctx.stats.request_ok.inc();
            plugin.ctx.record(&result.metrics);
            if let Err(msg) = plugin.ctx.take_all(&result.takes, &mut gate) {
                decision = Some(Decision::Deny(msg));
                break;
            }
            match result.action {
                RequestAction::Continue => {}
                RequestAction::Deny(msg) => {
                    decision = Some(Decision::Deny(msg));
                    break;
                }
                RequestAction::Respond(bytes) => {
                    decision = Some(Decision::Respond(bytes));
                    break;
                }
                RequestAction::Cache(c) => {
                    let asked = crate::cache::CacheFor { ttl: Duration::from_millis(c.ttl_ms), empty_ttl: Duration::from_millis(c.empty_ttl_ms) };
                    cache = Some(match cache {
                        None => asked,
                        Some(prev) => crate::cache::CacheFor { ttl: prev.ttl.min(asked.ttl), empty_ttl: prev.empty_ttl.min(asked.empty_ttl) },
                    });
                }
                RequestAction::Rewrite(new_args) => {
                    if let Some(n) = new_args.first() {
                        name = String::from_utf8_lossy(n).to_ascii_lowercase();
                        let new = crate::protocol::Command::from_args(&new_args);
                        info = table.get(&new);
                        rewritten = Some(new);
                        command = None;
                    }
                }
            }
        }
        let chain = (!responses.is_empty()).then(|| {
            let command = command.unwrap_or_else(|| wit_command(&name, rewritten.as_ref().unwrap_or(cmd), info));
            Box::new(ResponseChain { set: set.clone(), plugins: responses, command, start: start.unwrap_or_else(std::time::Instant::now) })
        });
        // Refused or answered by a plugin: shared buckets are not asked; local tokens stay
        // taken, as for any refusal by a later plugin.
        (decision.unwrap_or(Decision::Continue { rewritten, cache, gate }), chain)
    }

    /// Runs the response hooks owed for a command on its reply (reverse chain order) and
    /// applies their effects: the reply to send, when a plugin replaced it.
    pub fn on_response(&mut self, chain: &ResponseChain, client: &ClientHandle, reply: &[u8]) -> Option<Vec<u8>> {
        let elapsed_us = chain.start.elapsed().as_micros() as u64;
        let generation = self.generation(&chain.set)?;
        let mut replaced: Option<Vec<u8>> = None;
        for &i in chain.plugins.iter().rev() {
            let Some(plugin) = chain.set.plugins.get(i) else { continue };
            let Some(slot) = generation.instances.get_mut(i) else { continue };
            let Some(inst) = slot.get(plugin, "response") else { continue };
            let current = replaced.as_deref().unwrap_or(reply);
            let started = std::time::Instant::now();
            let result = inst.on_response(plugin.settings.time_budget, client, &chain.command, current, elapsed_us);
            plugin.ctx.stats.response_seconds.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(r) => {
                    slot.succeeded();
                    plugin.ctx.stats.response_ok.inc();
                    plugin.ctx.record(&r.metrics);
                    if let ResponseAction::Replace(bytes) = r.action {
                        if crate::protocol::reply_len(&bytes).ok().flatten() == Some(bytes.len()) {
                            replaced = Some(bytes);
                        } else {
                            note_failure(plugin, "response", "invalid-reply", "the replacement is not one complete RESP reply");
                        }
                    }
                }
                Err((kind, e)) => {
                    plugin.ctx.stats.response_err.inc();
                    note_failure(plugin, "response", kind.as_str(), &e);
                    slot.failed();
                    if plugin.settings.on_error == OnError::Closed {
                        let mut b = Vec::new();
                        let text = format!("ERR respire: plugin {} failed", plugin.file_name);
                        b.push(b'-');
                        b.extend_from_slice(text.as_bytes());
                        b.extend_from_slice(b"\r\n");
                        replaced = Some(b);
                        break;
                    }
                }
            }
        }
        replaced
    }
}

/// The contract's view of a command: name, arguments after it in one buffer, categories, keys.
fn wit_command(name: &str, args: &crate::protocol::Command, info: Option<&crate::commands::CommandInfo>) -> WitCommand {
    use bindings::respire::plugin::types::{Key, KeyAccess};
    let mut data = Vec::with_capacity(name.len() + args.iter().skip(1).map(|a| a.len()).sum::<usize>());
    let mut ends = Vec::with_capacity(args.len());
    data.extend_from_slice(name.as_bytes());
    ends.push(data.len() as u32);
    for a in args.iter().skip(1) {
        data.extend_from_slice(a);
        ends.push(data.len() as u32);
    }
    let mut keys = Vec::new();
    if let Some(info) = info {
        info.for_each_key(args, |i, how| {
            let mut access = KeyAccess::empty();
            if how & crate::commands::access::READ != 0 {
                access |= KeyAccess::READ;
            }
            if how & crate::commands::access::WRITE != 0 {
                access |= KeyAccess::WRITE;
            }
            keys.push(Key { index: (i - 1) as u32, access });
        });
    }
    WitCommand {
        data,
        ends,
        categories: categories(info.map_or(0, |i| i.category_bits)),
        keys,
    }
}

/// Category bits (in the order of [`crate::commands::CATEGORIES`]) as the contract's flags.
fn categories(bits: u32) -> bindings::respire::plugin::types::Category {
    use bindings::respire::plugin::types::Category as C;
    const ORDER: [C; 21] = [
        C::KEYSPACE, C::READ, C::WRITE, C::SET, C::SORTEDSET, C::LIST, C::HASH, C::STRING, C::BITMAP, C::HYPERLOGLOG, C::GEO,
        C::STREAM, C::PUBSUB, C::ADMIN, C::FAST, C::SLOW, C::BLOCKING, C::DANGEROUS, C::CONNECTION, C::TRANSACTION,
        C::SCRIPTING,
    ];
    ORDER.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).fold(C::empty(), |acc, (_, c)| acc | *c)
}
