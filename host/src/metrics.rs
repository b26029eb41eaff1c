//! Prometheus metrics: the process registry, metrics that plugins declare, and the HTTP
//! endpoint (`--metrics ADDR`) that serves `/metrics` and `/health`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
    core::Collector,
};
use tracing::{info, warn};

mod histogram;
pub use histogram::{HistogramFamily, LocalHistogram, SharedHistogram};

/// The process's registry.
pub fn registry() -> &'static Registry {
    static R: LazyLock<Registry> = LazyLock::new(Registry::new);
    &R
}

/// Most label combinations one plugin metric keeps.
pub const MAX_SERIES: usize = 1000;

/// Default histogram buckets: 10 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Registers a collector, or finds the one already registered under the same definition.
fn register<C: Collector + Clone + 'static>(c: C) -> C {
    if let Err(e) = registry().register(Box::new(c.clone())) {
        warn!(error = %e, "metric not registered");
    }
    c
}

/// A counter family of respire's own (constant, valid names and labels).
#[allow(clippy::expect_used)]
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Only fails for invalid names or labels, and these are constants of respire, covered by
    // the tests that scrape the endpoint.
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition"))
}

/// A counter of respire's own (constant, valid name).
#[allow(clippy::expect_used)]
pub fn int_counter(name: &str, help: &str) -> IntCounter {
    // As for `counter_vec`: constant definitions, covered by the scraping tests.
    register(IntCounter::new(name, help).expect("valid metric definition"))
}

/// A gauge of respire's own (constant, valid name).
#[allow(clippy::expect_used)]
pub fn int_gauge(name: &str, help: &str) -> prometheus::IntGauge {
    register(prometheus::IntGauge::new(name, help).expect("valid metric definition"))
}

/// A histogram family of respire's own (constant, valid names and labels).
#[allow(clippy::expect_used)]
fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    register(
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric definition"),
    )
}

/// A gauge family of respire's own (constant, valid names and labels).
#[allow(clippy::expect_used)]
fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    register(
        prometheus::IntGaugeVec::new(Opts::new(name, help), labels)
            .expect("valid metric definition"),
    )
}

/// Metrics about backend connections, routing and the topology.
pub struct BackendStats {
    /// Open connections, by node.
    pub connections: prometheus::IntGaugeVec,
    /// Connection attempts, by node and result (`ok`, `error`).
    pub connects: IntCounterVec,
    /// Connections lost, by node and reason (`closed`, `error`, `timeout`).
    pub lost: IntCounterVec,
    /// Redirections followed, by kind (`moved`, `ask`).
    pub redirections: IntCounterVec,
    /// Requests sent again, by reason (`tryagain`, `failover`, `single-flight`).
    pub retries: IntCounterVec,
    /// Topology changes published, by source (`refresh`, `moved`).
    pub topology_updates: IntCounterVec,
    /// Nodes that took over slots from another master in a refresh (failovers, resharding).
    pub failovers: IntCounter,
}

/// The backend metrics of the process.
pub fn backend_stats() -> &'static BackendStats {
    static S: LazyLock<BackendStats> = LazyLock::new(|| BackendStats {
        connections: gauge_vec(
            "respire_backend_connections",
            "Open connections to backend nodes, by node.",
            &["node"],
        ),
        connects: counter_vec(
            "respire_backend_connects_total",
            "Connection attempts to backend nodes, by node and result.",
            &["node", "result"],
        ),
        lost: counter_vec(
            "respire_backend_connections_lost_total",
            "Backend connections that broke, by node and reason (closed, error, timeout: no reply within command_timeout).",
            &["node", "reason"],
        ),
        redirections: counter_vec(
            "respire_redirections_total",
            "Cluster redirections respire followed, by kind (moved, ask).",
            &["kind"],
        ),
        retries: counter_vec(
            "respire_retries_total",
            "Requests respire sent again, by reason (tryagain, failover: waiting for a new master, single-flight).",
            &["reason"],
        ),
        topology_updates: counter_vec(
            "respire_topology_updates_total",
            "New topologies published, by source (refresh, moved).",
            &["source"],
        ),
        failovers: int_counter(
            "respire_failovers_total",
            "Nodes that took over slots from another master in a topology refresh (failovers, and resharding).",
        ),
    });
    &S
}

/// Metrics respire keeps about its plugins.
pub struct PluginStats {
    /// Hook calls, by plugin, hook and result (`ok`, `error`).
    pub calls: IntCounterVec,
    /// Failed calls, by plugin, hook and kind (`trap`, `timeout`, `memory`, `start`).
    pub failures: IntCounterVec,
    /// Reloads, by result (`loaded`, `unloaded`, `rejected`).
    pub reloads: IntCounterVec,
    /// Metric updates from plugins that were dropped (unknown metric, wrong labels, too many series).
    pub dropped_updates: IntCounterVec,
    /// Commands refused because a plugin's token bucket was empty, by plugin and limiter.
    pub rate_limited: IntCounterVec,
    /// Time spent in hook calls, by plugin and hook.
    pub call_seconds: HistogramVec,
}

/// The plugin metrics of the process.
pub fn plugin_stats() -> &'static PluginStats {
    static S: LazyLock<PluginStats> = LazyLock::new(|| PluginStats {
        calls: counter_vec(
            "respire_plugin_calls_total",
            "Plugin hook calls by plugin, hook and result.",
            &["plugin", "hook", "result"],
        ),
        failures: counter_vec(
            "respire_plugin_failures_total",
            "Plugin calls that failed (trap, timeout, memory, start), by plugin and hook.",
            &["plugin", "hook", "kind"],
        ),
        reloads: counter_vec(
            "respire_plugin_reloads_total",
            "Plugin folder changes applied, by result.",
            &["result"],
        ),
        dropped_updates: counter_vec(
            "respire_plugin_metric_updates_dropped_total",
            "Metric updates from plugins that were dropped (unknown metric, wrong labels, too many series).",
            &["plugin"],
        ),
        rate_limited: counter_vec(
            "respire_plugin_rate_limited_total",
            "Commands refused because a plugin's token bucket was empty.",
            &["plugin", "limiter"],
        ),
        call_seconds: histogram_vec(
            "respire_plugin_call_duration_seconds",
            "Time spent in plugin hook calls (wall time, effects included), by plugin and hook.",
            &["plugin", "hook"],
            &[
                0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
                0.001, 0.0025, 0.005, 0.01, 0.1,
            ],
        ),
    });
    &S
}

/// What a plugin declared for one of its metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricDef {
    /// The name within the plugin.
    pub name: String,
    /// Help text.
    pub help: String,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Label names.
    pub labels: Vec<String>,
    /// Histogram buckets (empty: [`LATENCY_BUCKETS`]).
    pub buckets: Vec<f64>,
}

/// The kind of a plugin metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Adds.
    Counter,
    /// Sets.
    Gauge,
    /// Observes.
    Histogram,
}

#[derive(Clone)]
enum Collectors {
    Counter(prometheus::CounterVec),
    Gauge(prometheus::GaugeVec),
    Histogram(HistogramFamily),
}

/// One registered plugin metric.
pub struct PluginMetric {
    collectors: Collectors,
    labels: usize,
    /// The series recorded so far, resolved once: an update is one map lookup.
    series: Mutex<HashMap<Vec<String>, Series>>,
    dropped: IntCounter,
}

/// One label combination of a plugin metric: the handle updates go to.
#[derive(Clone)]
pub enum Series {
    /// Adds.
    Counter(prometheus::Counter),
    /// Sets.
    Gauge(prometheus::Gauge),
    /// Observes.
    Histogram(Arc<SharedHistogram>),
}

impl PluginMetric {
    /// The series with these label values, made when new; `None` (and counted as dropped)
    /// when the labels do not fit or the metric has [`MAX_SERIES`] already.
    pub fn series(&self, labels: &[String]) -> Option<Series> {
        if labels.len() != self.labels {
            self.dropped.inc();
            return None;
        }
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = series.get(labels) {
            return Some(s.clone());
        }
        if series.len() >= MAX_SERIES {
            self.dropped.inc();
            return None;
        }
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        let made = match &self.collectors {
            Collectors::Counter(c) => c.get_metric_with_label_values(&l).map(Series::Counter),
            Collectors::Gauge(g) => g.get_metric_with_label_values(&l).map(Series::Gauge),
            Collectors::Histogram(h) => Ok(Series::Histogram(h.series(labels))),
        };
        let Ok(made) = made else {
            self.dropped.inc();
            return None;
        };
        series.insert(labels.to_vec(), made.clone());
        Some(made)
    }

    /// Removes a gauge's series (a gauge set to NaN); other kinds keep theirs.
    pub fn remove(&self, labels: &[String]) {
        if let Collectors::Gauge(g) = &self.collectors {
            let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
            if series.remove(labels).is_some() {
                let l: Vec<&str> = labels.iter().map(String::as_str).collect();
                let _ = g.remove_label_values(&l);
            }
        }
    }

    /// Counts an update that could not be applied.
    pub fn note_dropped(&self) {
        self.dropped.inc();
    }

    /// Applies an update now (outside the per-worker batching of hooks).
    pub fn record(&self, labels: &[String], value: f64) {
        if value.is_nan() {
            return self.remove(labels);
        }
        if !value.is_finite() {
            return self.note_dropped();
        }
        match self.series(labels) {
            Some(Series::Counter(c)) if value >= 0.0 => c.inc_by(value),
            Some(Series::Counter(_)) => self.note_dropped(),
            Some(Series::Gauge(g)) => g.set(value),
            Some(Series::Histogram(h)) => h.observe(value),
            None => {}
        }
    }
}

/// Plugin metrics by full name, so that a reload keeps counting into the same series.
type Registered = HashMap<String, (MetricDef, Arc<PluginMetric>)>;
static PLUGIN_METRICS: LazyLock<Mutex<Registered>> = LazyLock::new(Mutex::default);

/// `respire_plugin_<plugin>_<name>` with every character Prometheus does not allow made `_`.
pub fn plugin_metric_name(plugin: &str, name: &str) -> String {
    let mut s = String::from("respire_plugin_");
    for c in plugin
        .chars()
        .chain(std::iter::once('_'))
        .chain(name.chars())
    {
        s.push(if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        });
    }
    s
}

/// Registers (or finds, when unchanged since a previous load) the metrics a plugin declared.
pub fn plugin_metrics(plugin: &str, defs: &[MetricDef]) -> Result<Vec<Arc<PluginMetric>>, String> {
    let mut known = PLUGIN_METRICS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(defs.len());
    let mut seen = HashSet::new();
    for d in defs {
        let full = plugin_metric_name(plugin, &d.name);
        if !seen.insert(full.clone()) {
            return Err(format!("metric {:?} is declared twice", d.name));
        }
        if let Some((old, m)) = known.get(&full) {
            if old == d {
                out.push(m.clone());
                continue;
            }
        }
        let labels: Vec<&str> = d.labels.iter().map(String::as_str).collect();
        let help = if d.help.trim().is_empty() {
            format!("{} (plugin {plugin})", d.name)
        } else {
            d.help.clone()
        };
        let opts = Opts::new(full.clone(), help.clone());
        let made = match d.kind {
            MetricKind::Counter => {
                prometheus::CounterVec::new(opts, &labels).map(Collectors::Counter)
            }
            MetricKind::Gauge => prometheus::GaugeVec::new(opts, &labels).map(Collectors::Gauge),
            MetricKind::Histogram => {
                HistogramFamily::new(&full, &help, &d.labels, &d.buckets, LATENCY_BUCKETS)
                    .map(Collectors::Histogram)
                    .map_err(prometheus::Error::Msg)
            }
        }
        .map_err(|e| format!("metric {:?}: {e}", d.name))?;
        // The definition changed: the old series go.
        if let Some((_, old)) = known.remove(&full) {
            let _ = match &old.collectors {
                Collectors::Counter(c) => registry().unregister(Box::new(c.clone())),
                Collectors::Gauge(c) => registry().unregister(Box::new(c.clone())),
                Collectors::Histogram(c) => registry().unregister(Box::new(c.clone())),
            };
        }
        let reg = match &made {
            Collectors::Counter(c) => registry().register(Box::new(c.clone())),
            Collectors::Gauge(c) => registry().register(Box::new(c.clone())),
            Collectors::Histogram(c) => registry().register(Box::new(c.clone())),
        };
        reg.map_err(|e| format!("metric {:?}: {e}", d.name))?;
        let m = Arc::new(PluginMetric {
            collectors: made,
            labels: d.labels.len(),
            series: Mutex::default(),
            dropped: plugin_stats().dropped_updates.with_label_values(&[plugin]),
        });
        known.insert(full, (d.clone(), m.clone()));
        out.push(m);
    }
    Ok(out)
}

/// The text exposition of every metric.
pub fn render(shared: &crate::server::Shared) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry().gather(), &mut buf) {
        warn!(error = %e, "metrics encoding failed");
    }
    let mut more = String::new();
    crate::stats::render(&mut more);
    let (accepted, rejected) = shared.clients.totals();
    let topo = shared.topology.load();
    let (query_closed, output_closed) = shared.clients.limit_closed();
    let (auth_failed, auth_refused) = shared.auth_throttle.totals();
    let lines: [(&str, &str, &str, String); 11] = [
        (
            "respire_build_info",
            "gauge",
            "respire's version (always 1).",
            format!("{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        ),
        (
            "respire_uptime_seconds",
            "gauge",
            "Seconds since respire started.",
            format!(" {}", shared.started.elapsed().as_secs_f64()),
        ),
        (
            "respire_client_connections",
            "gauge",
            "Client connections open now.",
            format!(" {}", shared.clients.count()),
        ),
        (
            "respire_client_connections_total",
            "counter",
            "Client connections accepted since start.",
            format!(" {accepted}"),
        ),
        (
            "respire_client_connections_rejected_total",
            "counter",
            "Client connections refused because max_clients were open.",
            format!(" {rejected}"),
        ),
        (
            "respire_client_limit_disconnections_total",
            "counter",
            "Client connections closed for going over a buffer limit.",
            format!(
                "{{limit=\"query_buffer\"}} {query_closed}\nrespire_client_limit_disconnections_total{{limit=\"output_buffer\"}} {output_closed}"
            ),
        ),
        (
            "respire_auth_failures_total",
            "counter",
            "Failed AUTH attempts (wrong user or password).",
            format!(" {auth_failed}"),
        ),
        (
            "respire_auth_throttled_total",
            "counter",
            "AUTH attempts refused unchecked because their address failed too often.",
            format!(" {auth_refused}"),
        ),
        (
            "respire_tls_handshake_failures_total",
            "counter",
            "TLS handshakes with clients that failed (no or a wrong certificate, not TLS) or timed out.",
            format!(" {}", shared.clients.tls_failed()),
        ),
        (
            "respire_topology_masters",
            "gauge",
            "Masters in the current topology.",
            format!(" {}", topo.shards.len()),
        ),
        (
            "respire_topology_nodes",
            "gauge",
            "Nodes (masters and replicas) in the current topology.",
            format!(" {}", topo.nodes.len()),
        ),
    ];
    for (name, kind, help, value) in lines {
        more.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{value}\n"
        ));
    }
    crate::stats::render_process(&mut more);
    buf.extend_from_slice(more.as_bytes());
    buf
}

/// `/plugins`: the loaded plugins as JSON.
fn plugins_json(shared: &crate::server::Shared) -> Vec<u8> {
    let set = shared.plugins.load();
    let list: Vec<serde_json::Value> = set
        .plugins
        .iter()
        .map(|p| {
            let m = &p.manifest;
            serde_json::json!({
                "file": format!("{}.wasm", p.file_name),
                "name": m.name,
                "version": m.version,
                "order": p.settings.order,
                "on_error": match p.settings.on_error { crate::plugin::OnError::Open => "open", crate::plugin::OnError::Closed => "closed" },
                "time_budget_us": p.settings.time_budget.as_micros() as u64,
                "max_memory": p.settings.max_memory.as_u64(),
                "commands": m.commands,
                "categories": m.categories,
                "key_prefixes": m.key_prefixes,
                "on_request": m.on_request,
                "on_response": m.on_response,
                "responses": p.response_summary(),
                "traffic": p.traffic_summary(),
                "serves": m.serves,
                "cache": m.cache.as_ref().map(|c| serde_json::json!({ "prefixes": c.prefixes, "max_memory": c.max_memory })),
                "limiters": m.limiters.iter().map(|l| serde_json::json!({ "name": l.name, "rate": l.rate, "burst": l.burst, "shared": l.shared })).collect::<Vec<_>>(),
                "failures": p.failures.load(std::sync::atomic::Ordering::Relaxed),
                "code": p.compiled.to_string(),
            })
        })
        .collect();
    let body = serde_json::json!({ "version": set.version, "plugins": list });
    let mut out = serde_json::to_vec_pretty(&body).unwrap_or_default();
    out.push(b'\n');
    out
}

/// `/topology`: the slot map respire routes by, as JSON.
fn topology_json(shared: &crate::server::Shared) -> Vec<u8> {
    let t = shared.topology.load();
    let node = |n: usize| t.nodes.get(n).map(|a| a.to_string()).unwrap_or_default();
    let shards: Vec<serde_json::Value> = t
        .shards
        .iter()
        .zip(t.ranges())
        .map(|(s, ranges)| {
            serde_json::json!({
                "master": node(s.master),
                "replicas": s.replicas.iter().map(|&r| node(r)).collect::<Vec<_>>(),
                "slots": ranges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
            })
        })
        .collect();
    let body = serde_json::json!({
        "version": t.version,
        "kind": format!("{:?}", t.kind).to_ascii_lowercase(),
        "complete": t.complete(),
        "nodes": t.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "shards": shards,
    });
    let mut out = serde_json::to_vec_pretty(&body).unwrap_or_default();
    out.push(b'\n');
    out
}

/// `/ready`: every slot has a master and every master answers (any reply counts, an
/// authentication error included) within the connect timeout. The reason when not.
async fn ready(shared: &crate::server::Shared) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let topo = shared.topology.load();
    if !topo.complete() {
        return Err("the topology is not known yet (some slots have no master)".into());
    }
    let timeout = shared.config.backend.connect_timeout;
    for m in topo.masters() {
        let Some(addr) = topo.nodes.get(m).cloned() else {
            continue;
        };
        let node = crate::backend::NodeSettings {
            addr: addr.clone(),
            ..shared.node_settings.clone()
        };
        let probe = async {
            let mut s = crate::backend::open(&node)
                .await
                .map_err(std::io::Error::other)?;
            s.send(b"PING\r\n").await?;
            let mut b = [0u8; 64];
            match s.read(&mut b).await? {
                0 => Err(std::io::Error::other("closed the connection")),
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("backend {addr} is unreachable: {e}")),
            Err(_) => return Err(format!("backend {addr} did not answer within {timeout:?}")),
        }
    }
    Ok(())
}

/// Serves `/metrics`, `/health`, `/ready`, `/plugins` and `/topology` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    shared: Arc<crate::server::Shared>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    const TEXT: &str = "text/plain; charset=utf-8";
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => (
                            StatusCode::OK,
                            "text/plain; version=0.0.4; charset=utf-8",
                            Bytes::from(render(&shared)),
                        ),
                        "/health" => (StatusCode::OK, TEXT, Bytes::from_static(b"ok\n")),
                        "/ready" => match ready(&shared).await {
                            Ok(()) => (StatusCode::OK, TEXT, Bytes::from_static(b"ready\n")),
                            Err(why) => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                TEXT,
                                Bytes::from(format!("not ready: {why}\n")),
                            ),
                        },
                        "/plugins" => (
                            StatusCode::OK,
                            "application/json",
                            Bytes::from(plugins_json(&shared)),
                        ),
                        "/topology" => (
                            StatusCode::OK,
                            "application/json",
                            Bytes::from(topology_json(&shared)),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            TEXT,
                            Bytes::from_static(b"not found\n"),
                        ),
                    };
                    let mut resp = Response::new(Full::new(body));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(ctype),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
