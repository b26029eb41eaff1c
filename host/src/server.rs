//! Listener, workers and shutdown.
//!
//! One acceptor thread takes connections and hands them to `workers` threads
//! (a client address's connections to one worker while that keeps the load
//! even, see `Placement`). Each worker runs a single-threaded tokio runtime and
//! owns its sessions and backend connections outright (`Rc`, no locks on the
//! request path). Process-wide state (configuration, the client list) is
//! shared read-mostly through [`Shared`].
//!
//! Shutdown (SIGINT, SIGTERM or [`Server::shutdown`]): stop accepting, let
//! every session deliver the replies it owes, then close; connections still
//! open after `shutdown_timeout` are closed.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use std::cell::RefCell;
use std::collections::HashMap;

use crate::backend::{self, ConnKey, NodeSettings, Pool};
use crate::clients::Clients;
use crate::commands::CommandTable;
use crate::config::Config;
use crate::protocol::{self, RequestLimits, Value};
use crate::session;
use crate::topology::{BackendKind, Discovery, NO_SHARD, SLOTS, Topology, TopologyState};

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A thread or runtime could not be created.
    #[error("cannot start: {0}")]
    Start(std::io::Error),
    /// The plugin folder could not be used.
    #[error("plugins: {0}")]
    Plugins(String),
    /// A TLS certificate, key or CA file could not be used.
    #[error("{0}")]
    Tls(String),
}

/// State shared by all workers.
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// All client connections.
    pub clients: Clients,
    /// Request limits derived from the configuration.
    pub limits: RequestLimits,
    /// Becomes `true` when shutdown starts.
    pub shutdown: watch::Receiver<bool>,
    /// Where keys live.
    pub topology: TopologyState,
    /// What respire knows about every command (built in, merged with the backend's `COMMAND`).
    /// Built once when the server starts and never freed, so that a command resolved when it
    /// is read keeps its entry (`Resolved<'static>`) on its way through the plugin stage.
    pub commands: &'static CommandTable,
    /// How to connect to backend nodes (the address is filled in per node).
    pub node_settings: NodeSettings,
    /// The node id respire reports in `CLUSTER` replies.
    pub node_id: String,
    /// The plugin chain (empty without `--plugins`), swapped whole on reload; workers keep
    /// their own reference while its version holds ([`Worker::plugin_set`]).
    pub plugins: crate::versioned::Versioned<crate::plugin::PluginSet>,
    /// The plugin engine, kept alive with its epoch thread.
    pub plugin_runtime: Option<crate::plugin::Runtime>,
    /// The response cache plugins drive.
    pub cache: Arc<crate::cache::Cache>,
    /// The command table's names by number (the `command` label of metrics).
    pub command_names: Arc<Vec<String>>,
    /// respire's slow log.
    pub slowlog: crate::stats::SlowLog,
    /// When respire started.
    pub started: std::time::Instant,
    /// Failed `AUTH` attempts per client address.
    pub auth_throttle: crate::guard::AuthThrottle,
    /// TLS towards clients, when configured.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// The counters' values at the last `CONFIG RESETSTAT` (see [`Counters`]).
    pub counters_base: std::sync::Mutex<Counters>,
    /// Error replies respire made itself (Redis never saw those commands).
    pub local_errors: std::sync::atomic::AtomicU64,
    /// Every worker's subscriptions, to correct Redis's subscriber counts.
    pub census: crate::pubsub::Census,
    /// `MONITOR` clients, shown the commands respire answers itself.
    pub monitors: crate::clients::Monitors,
    /// `CLIENT TRACKING` of respire's clients.
    pub tracking: crate::tracking::Tracking,
    /// The `CLIENT PAUSE` a client set through respire (see [`crate::pause`]).
    pub pause: crate::pause::Pause,
    /// Scripts and functions sent on the scripts' lane whose replies are owed: while there
    /// are any, `PING` goes to Redis (which answers `-BUSY` during a long script).
    pub scripts_in_flight: std::sync::atomic::AtomicUsize,
}

/// The counters `INFO stats` reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Client connections accepted.
    pub accepted: u64,
    /// Client connections refused (`maxclients`).
    pub rejected: u64,
    /// Commands clients sent.
    pub commands: u64,
    /// Error replies clients got.
    pub errors: u64,
    /// Bytes from clients.
    pub bytes_in: u64,
    /// Bytes to clients.
    pub bytes_out: u64,
    /// Connections closed over the query buffer limit.
    pub query_closed: u64,
    /// Connections closed over the output buffer limit.
    pub output_closed: u64,
    /// Replies from respire's cache.
    pub cache_hits: u64,
    /// Cache lookups that missed.
    pub cache_misses: u64,
    /// Error replies respire made itself.
    pub local_errors: u64,
}

impl Counters {
    /// What was counted since `base`.
    fn since(self, base: Counters) -> Counters {
        Counters {
            accepted: self.accepted.saturating_sub(base.accepted),
            rejected: self.rejected.saturating_sub(base.rejected),
            commands: self.commands.saturating_sub(base.commands),
            errors: self.errors.saturating_sub(base.errors),
            bytes_in: self.bytes_in.saturating_sub(base.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(base.bytes_out),
            query_closed: self.query_closed.saturating_sub(base.query_closed),
            output_closed: self.output_closed.saturating_sub(base.output_closed),
            cache_hits: self.cache_hits.saturating_sub(base.cache_hits),
            cache_misses: self.cache_misses.saturating_sub(base.cache_misses),
            local_errors: self.local_errors.saturating_sub(base.local_errors),
        }
    }
}

impl Shared {
    /// The counters since start or the last `CONFIG RESETSTAT`.
    pub fn counters(&self) -> Counters {
        let now = self.raw_counters();
        let base = self.counters_base.lock().map(|b| *b).unwrap_or_default();
        now.since(base)
    }

    /// `CONFIG RESETSTAT`: the counters start again from zero.
    pub fn reset_counters(&self) {
        let now = self.raw_counters();
        if let Ok(mut base) = self.counters_base.lock() {
            *base = now;
        }
    }

    fn raw_counters(&self) -> Counters {
        let (accepted, rejected) = self.clients.totals();
        let (commands, errors, bytes_in, bytes_out) = crate::stats::totals();
        let (query_closed, output_closed) = self.clients.limit_closed();
        let (cache_hits, cache_misses, _, _) = crate::cache::counters();
        Counters {
            accepted,
            rejected,
            commands,
            errors,
            bytes_in,
            bytes_out,
            query_closed,
            output_closed,
            cache_hits,
            cache_misses,
            local_errors: self.local_errors.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// What one worker thread owns.
pub struct Worker {
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// This worker's backend connections, per node address.
    pools: RefCell<HashMap<Arc<str>, Rc<Pool>>>,
    /// The topology's node addresses as this worker's own `Rc`s, by node index, for the
    /// topology version `.0` (see [`Worker::node_addr`]).
    node_addrs: RefCell<(u64, Vec<Rc<str>>)>,
    /// Sessions running on this worker.
    pub sessions: Cell<usize>,
    /// This worker's shared subscriber connections.
    pub hub: crate::pubsub::Hub,
    /// This worker's plugin instances.
    pub plugins: RefCell<crate::plugin::WorkerPlugins>,
    /// This worker's request metrics.
    pub stats: Arc<crate::stats::WorkerStats>,
    /// The buffer sessions read into (one per worker, not one per client; a session keeps
    /// only the start of a command that has not fully arrived).
    pub read_buf: RefCell<bytes::BytesMut>,
    /// Where sessions hand commands and replies for the plugins' hooks (see [`crate::stage`]).
    pub stage: crate::stage::Stage,
    /// The plugin set this worker last saw (see [`Worker::plugin_set`]).
    plugin_set: RefCell<crate::plugin::WorkerSet>,
}

impl Worker {
    /// This worker's reference to the running plugin set, loaded again when its version
    /// changed (a reload).
    fn current_plugin_set(&self) -> std::cell::Ref<'_, crate::plugin::WorkerSet> {
        let version = self.shared.plugins.version();
        if self.plugin_set.borrow().version != version {
            *self.plugin_set.borrow_mut() = Rc::new(self.shared.plugins.load());
        }
        self.plugin_set.borrow()
    }

    /// The running plugin set.
    pub fn plugin_set(&self) -> crate::plugin::WorkerSet {
        self.current_plugin_set().clone()
    }

    /// Whether any plugin is running.
    pub fn has_plugins(&self) -> bool {
        self.shared.config.plugins.is_some() && !self.current_plugin_set().plugins.is_empty()
    }

    /// This worker's connections to the node at `addr`.
    pub fn pool(&self, addr: &str) -> Rc<Pool> {
        if let Some(p) = self.pools.borrow().get(addr) {
            return p.clone();
        }
        let addr: Arc<str> = Arc::from(addr);
        let b = &self.shared.config.backend;
        // READONLY (replica reads asked for) only on connections to a replica: one to a master
        // would keep it if a failover demoted that master, and be answered from its copy.
        let readonly = self.shared.node_settings.readonly && {
            let topo = self.shared.topology.load();
            topo.shards.iter().any(|s| {
                s.replicas
                    .iter()
                    .any(|&r| topo.nodes.get(r).is_some_and(|a| *a == addr))
            })
        };
        let node = Rc::new(NodeSettings {
            addr: addr.clone(),
            readonly,
            ..self.shared.node_settings.clone()
        });
        let pool = Rc::new(Pool::new(node, b.connections, b.idle_exclusive));
        self.pools.borrow_mut().insert(addr, pool.clone());
        pool
    }

    /// The address of node `node` of `topo`, as this worker's own `Rc`: a request's retry
    /// record holds one, and cloning the topology's `Arc<str>` instead would write, per
    /// request, to a cache line every worker shares.
    pub fn node_addr(&self, topo: &crate::topology::Topology, node: usize) -> Rc<str> {
        let mut known = self.node_addrs.borrow_mut();
        if known.0 != topo.version {
            if topo.version < known.0 {
                // A session still on an older map: its own copy (it catches up at its next batch).
                return Rc::from(topo.nodes.get(node).map_or("", |a| &**a));
            }
            *known = (
                topo.version,
                topo.nodes.iter().map(|a| Rc::from(&**a)).collect(),
            );
        }
        known.1.get(node).cloned().unwrap_or_else(|| Rc::from(""))
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Validates the configuration, binds the listener and starts the acceptor and worker threads.
    pub fn start(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        let mut threads = Vec::new();
        let server_tls = match &config.tls {
            Some(t) => Some(Arc::new(
                crate::tls::ServerTls::load(t)
                    .map_err(|e| ServerError::Tls(format!("tls: {e}")))?,
            )),
            None => None,
        };
        let client_tls = match &config.backend.tls {
            Some(t) => {
                Some(Arc::new(crate::tls::ClientTls::load(t).map_err(|e| {
                    ServerError::Tls(format!("backend.tls: {e}"))
                })?))
            }
            None => None,
        };
        // The plain listener (unless `listen` is empty) and the TLS one.
        let mut listeners = Vec::new();
        let tls_listen = config.tls.as_ref().map(|t| t.listen.as_str());
        for (addr, tls) in [
            (
                Some(config.listen.as_str()).filter(|a| !a.is_empty()),
                false,
            ),
            (tls_listen, true),
        ] {
            let Some(addr) = addr else { continue };
            let bad = |source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            };
            let parsed: SocketAddr = addr
                .parse()
                .map_err(|_| bad(std::io::ErrorKind::InvalidInput.into()))?;
            let l = bind(parsed).map_err(bad)?;
            let local = l.local_addr().map_err(ServerError::Start)?;
            listeners.push((l, local, tls));
        }
        let local = listeners
            .iter()
            .find(|l| !l.2)
            .or(listeners.first())
            .map(|l| l.1)
            .ok_or_else(|| ServerError::Start(std::io::ErrorKind::InvalidInput.into()))?;
        let tls_addr = listeners.iter().find(|l| l.2).map(|l| l.1);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let b = &config.backend;
        let node_settings = NodeSettings {
            addr: Arc::from(""),
            username: b.username.clone(),
            password: b.password.clone(),
            connect_timeout: b.connect_timeout,
            command_timeout: b.command_timeout,
            reconnect_min: b.reconnect_min,
            reconnect_max: b.reconnect_max,
            // Only when reads may go to replicas, and then only to replicas (see
            // `Worker::pool`): a connection in READONLY mode to a master that a failover turns
            // into a replica would answer reads for its old slots itself, from a copy that may
            // lag behind the new master, instead of MOVED.
            readonly: !b.cluster.is_empty() && b.read_from != crate::config::ReadFrom::Master,
            tls: client_tls.clone(),
        };
        let (topology, discovery) = initial_topology(&config, &node_settings)?;
        let learnt = !matches!(discovery, Discovery::Static);
        let topology = TopologyState::new(topology, discovery);
        if learnt {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ServerError::Start)?;
            if let Err(e) = rt.block_on(topology.refresh_once(&node_settings)) {
                warn!(error = %e, "the topology is not known yet; requests wait for it (up to failover_timeout)");
            }
        }
        let mut commands = startup_commands(&node_settings, &topology.load());
        let command_names = Arc::new(commands.number());
        let node_id = node_id_for(&local);
        let (plugins, plugin_runtime) = match &config.plugins {
            Some(dir) => {
                let rt = crate::plugin::Runtime::new(config.plugin_cache_dir())
                    .map_err(|e| ServerError::Plugins(e.to_string()))?;
                let (loaded, errors) = rt.load_dir(dir);
                if !errors.is_empty() && loaded.is_empty() && std::fs::read_dir(dir).is_err() {
                    return Err(ServerError::Plugins(
                        errors
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                    ));
                }
                (
                    crate::plugin::PluginSet {
                        version: 1,
                        plugins: loaded,
                    },
                    Some(rt),
                )
            }
            None => (crate::plugin::PluginSet::default(), None),
        };
        let shared = Arc::new(Shared {
            limits: RequestLimits {
                max_args: config.max_args,
                max_bulk: config.max_bulk.as_u64() as usize,
            },
            clients: Clients::default(),
            shutdown: shutdown_rx,
            topology,
            commands: Box::leak(Box::new(commands)),
            node_settings,
            node_id,
            plugins: {
                let version = plugins.version;
                crate::versioned::Versioned::new(plugins, version)
            },
            plugin_runtime,
            cache: Arc::default(),
            command_names,
            slowlog: crate::stats::SlowLog::new(
                config.slowlog_log_slower_than,
                config.slowlog_max_len,
            ),
            started: std::time::Instant::now(),
            auth_throttle: crate::guard::AuthThrottle::new(config.auth_failure_limit),
            tls: server_tls.clone(),
            counters_base: std::sync::Mutex::default(),
            local_errors: std::sync::atomic::AtomicU64::new(0),
            census: crate::pubsub::Census::default(),
            monitors: crate::clients::Monitors::default(),
            tracking: crate::tracking::Tracking::default(),
            pause: crate::pause::Pause::default(),
            scripts_in_flight: std::sync::atomic::AtomicUsize::new(0),
            config,
        });
        if server_tls.is_some() || client_tls.is_some() {
            let shutdown = shared.shutdown.clone();
            let t = std::thread::Builder::new()
                .name("respire-tls".into())
                .spawn(move || crate::tls::watch(server_tls, client_tls, shutdown))
                .map_err(ServerError::Start)?;
            threads.push(t);
        }
        if let Some(addr) = shared.config.metrics.clone() {
            let listener =
                std::net::TcpListener::bind(&addr).map_err(|source| ServerError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
            listener.set_nonblocking(true).map_err(ServerError::Start)?;
            let shutdown = shared.shutdown.clone();
            let admin = shared.clone();
            let t = std::thread::Builder::new()
                .name("respire-metrics".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => return error!(error = %e, "cannot start the metrics endpoint"),
                    };
                    rt.block_on(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => crate::metrics::serve(l, shutdown, admin).await,
                            Err(e) => error!(error = %e, "cannot start the metrics endpoint"),
                        }
                    });
                })
                .map_err(ServerError::Start)?;
            threads.push(t);
        }
        if let Some(dir) = shared.config.plugins.clone() {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("respire-plugins".into())
                .spawn(move || crate::plugin::watch(s, dir))
                .map_err(ServerError::Start)?;
        }
        {
            // The tracking connections of the response cache and of clients' `CLIENT TRACKING`.
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name("respire-tracking".into())
                .spawn(move || crate::invalidation::track(s))
                .map_err(ServerError::Start)?;
            threads.push(t);
        }
        if learnt {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name("respire-topology".into())
                .spawn(move || topology_main(s))
                .map_err(ServerError::Start)?;
            threads.push(t);
        }
        let mut senders = Vec::new();
        for i in 0..shared.config.worker_count() {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("respire-worker-{i}"))
                .spawn(move || worker_main(shared, rx))
                .map_err(ServerError::Start)?;
            threads.push(t);
        }
        let acceptor_shared = shared.clone();
        let bound: Vec<_> = listeners.into_iter().map(|(l, _, tls)| (l, tls)).collect();
        let t = std::thread::Builder::new()
            .name("respire-accept".into())
            .spawn(move || acceptor_main(acceptor_shared, bound, senders))
            .map_err(ServerError::Start)?;
        threads.push(t);
        let plain = (!shared.config.listen.is_empty()).then_some(local);
        info!(listen = ?plain, tls = ?tls_addr, workers = shared.config.worker_count(), "respire listening");
        Ok(Server {
            addr: local,
            tls_addr,
            shutdown: shutdown_tx,
            shared,
            threads,
        })
    }

    /// The address the plain listener is bound to (the TLS one's when there is no plain one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the TLS listener is bound to, if any.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        // Sessions that register from now on see the flag when they start.
        self.shared.clients.shut_down_all();
    }

    /// Waits until every thread has stopped.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub fn run_until_signal(self) -> Result<(), ServerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServerError::Start)?;
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("SIGINT received, shutting down"),
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
                    info!("SIGTERM received, shutting down");
                }
            }
        });
        self.shutdown();
        self.join();
        info!("respire stopped");
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(511)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// An accepted connection: the socket, the peer, whether it came to the TLS listener, and
/// its place in its worker's count.
type NewConn = (std::net::TcpStream, SocketAddr, bool, Seat);

/// Where new connections go: to the worker a hash of the client address picks (its "home")
/// while that worker serves fewer than `affinity` connections or no more than any other,
/// else to the worker serving the fewest. One worker reads a client process's connections in
/// the order their data arrived and sends on to Redis in that order; spread over threads,
/// commands sent on two connections one after the other (a blocking pop, then another
/// client's pop or push) could reach Redis in either order.
struct Placement {
    /// Connections each worker serves (taken when placed, given back when the connection
    /// ends, see [`Seat`]).
    loads: Vec<Arc<AtomicUsize>>,
    affinity: usize,
}

/// A connection's place in its worker's count; dropped with the connection.
pub(crate) struct Seat(Arc<AtomicUsize>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Placement {
    fn new(workers: usize, affinity: usize) -> Placement {
        Placement {
            loads: (0..workers.max(1)).map(|_| Arc::default()).collect(),
            affinity,
        }
    }

    /// The worker for a connection from `ip`, and its seat there.
    fn place(&self, ip: std::net::IpAddr) -> (usize, Seat) {
        let loads: Vec<usize> = self
            .loads
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        let home = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            ip.hash(&mut h);
            (h.finish() % loads.len() as u64) as usize
        };
        let w = pick(&loads, home, self.affinity);
        let load = &self.loads[w];
        load.fetch_add(1, Ordering::Relaxed);
        (w, Seat(load.clone()))
    }
}

/// [`Placement::place`] over the workers' `loads`: `home` while it serves fewer than
/// `affinity` or no more than any other, else the least loaded (the first after `home` on a
/// tie, so that ties do not all fall on worker 0).
fn pick(loads: &[usize], home: usize, affinity: usize) -> usize {
    let n = loads.len();
    let min = loads.iter().copied().min().unwrap_or(0);
    if loads[home] < affinity || loads[home] <= min {
        return home;
    }
    (1..n)
        .map(|i| (home + i) % n)
        .find(|&w| loads[w] == min)
        .unwrap_or(home)
}

fn acceptor_main(
    shared: Arc<Shared>,
    listeners: Vec<(std::net::TcpListener, bool)>,
    workers: Vec<mpsc::UnboundedSender<NewConn>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the acceptor");
            return;
        }
    };
    let placement = Rc::new(Placement::new(workers.len(), shared.config.worker_affinity));
    let workers = Rc::new(workers);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut tasks = Vec::new();
        for (listener, tls) in listeners {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    error!(error = %e, "cannot use the listener");
                    return;
                }
            };
            tasks.push(tokio::task::spawn_local(accept_loop(
                shared.clone(),
                listener,
                tls,
                workers.clone(),
                placement.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: bool,
    workers: Rc<Vec<mpsc::UnboundedSender<NewConn>>>,
    placement: Rc<Placement>,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    if !shared.clients.try_reserve(shared.config.max_clients) {
                        shared.clients.note_rejected();
                        // (A TLS client cannot read this before its handshake; it sees the close.)
                        if !tls {
                            let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    match stream.into_std() {
                        Ok(s) => {
                            let (w, seat) = placement.place(peer.ip());
                            let sent = workers.get(w).map(|tx| tx.send((s, peer, tls, seat)));
                            if !matches!(sent, Some(Ok(()))) {
                                shared.clients.release();
                            }
                        }
                        Err(_) => shared.clients.release(),
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn worker_main(shared: Arc<Shared>, mut conns: mpsc::UnboundedReceiver<NewConn>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start a worker");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let worker = Rc::new(Worker {
            shared: shared.clone(),
            pools: RefCell::default(),
            node_addrs: RefCell::default(),
            sessions: Cell::new(0),
            hub: crate::pubsub::Hub::new(shared.clone()),
            plugins: RefCell::default(),
            stats: crate::stats::register_worker(&shared.command_names),
            read_buf: RefCell::default(),
            stage: crate::stage::Stage::default(),
            plugin_set: RefCell::new(Rc::new(shared.plugins.load())),
        });
        tokio::task::spawn_local(crate::stage::run(worker.clone()));
        let mut shutdown = shared.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                c = conns.recv() => match c {
                    Some((std_stream, peer, tls, seat)) => {
                        start_session(&worker, std_stream, peer, tls, seat)
                    }
                    None => break,
                }
            }
        }
        let deadline = Instant::now() + shared.config.shutdown_timeout;
        while worker.sessions.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if worker.sessions.get() > 0 {
            warn!(
                open = worker.sessions.get(),
                "closing connections still open after the shutdown timeout"
            );
        }
    });
}

fn start_session(
    worker: &Rc<Worker>,
    std_stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: bool,
    seat: Seat,
) {
    use std::os::fd::AsRawFd;
    let shared = &worker.shared;
    let stream = match TcpStream::from_std(std_stream) {
        Ok(s) => s,
        Err(_) => {
            shared.clients.release();
            return;
        }
    };
    let laddr = stream.local_addr().unwrap_or(peer);
    let fd = stream.as_raw_fd();
    worker.sessions.set(worker.sessions.get() + 1);
    let w = worker.clone();
    tokio::task::spawn_local(async move {
        let shared = &w.shared;
        let stream = match (tls, &shared.tls, &shared.config.tls) {
            (false, _, _) => Some(crate::io::Stream::Tcp(stream)),
            (true, Some(acceptor), Some(settings)) => {
                match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => Some(crate::io::Stream::TlsServer(Box::new(s))),
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake with a client failed");
                        None
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake with a client timed out");
                        None
                    }
                }
            }
            (true, _, _) => None,
        };
        match stream {
            Some(stream) => {
                let info = shared.clients.register(peer, laddr, fd);
                session::run(w.clone(), stream, info).await;
            }
            None => {
                shared.clients.note_tls_failed();
                shared.clients.release();
            }
        }
        w.sessions.set(w.sessions.get().saturating_sub(1));
        drop(seat);
    });
}

fn initial_topology(
    config: &Config,
    settings: &NodeSettings,
) -> Result<(Topology, Discovery), ServerError> {
    let b = &config.backend;
    if let Some(addr) = &b.address {
        return Ok((Topology::standalone(addr), Discovery::Static));
    }
    if !b.shards.is_empty() {
        let specs: Vec<_> = b
            .shards
            .iter()
            .map(|s| s.parts())
            .collect::<Result<_, _>>()?;
        let t = Topology::shards(&specs)
            .map_err(|e| crate::config::ConfigError::Invalid(format!("backend.shards: {e}")))?;
        return Ok((t, Discovery::Static));
    }
    // Learnt from the cluster or the sentinels: a placeholder until discovery answers
    // (tried once at start, then kept fresh by the manager thread).
    let (kind, discovery) = if b.sentinel.is_empty() {
        (
            BackendKind::Cluster,
            Discovery::Cluster {
                seeds: b.cluster.clone(),
            },
        )
    } else {
        let sentinel_settings = NodeSettings {
            username: None,
            password: b.sentinel_password.clone(),
            readonly: false,
            ..settings.clone()
        };
        let kind = if b.master_names.len() == 1 {
            BackendKind::Standalone
        } else {
            BackendKind::Shards
        };
        (
            kind,
            Discovery::Sentinel {
                sentinels: b.sentinel.clone(),
                names: b.master_names.clone(),
                settings: sentinel_settings,
            },
        )
    };
    let empty = Topology {
        version: 1,
        kind,
        nodes: Vec::new(),
        shards: Vec::new(),
        slots: vec![NO_SHARD; SLOTS],
        managed: true,
    };
    Ok((empty, discovery))
}

/// Fetches `COMMAND` from the first reachable master and merges it into the built-in table,
/// so newer and module commands are routed by their own key specs.
fn startup_commands(settings: &NodeSettings, topo: &Topology) -> CommandTable {
    let mut table = CommandTable::builtin();
    let addrs: Vec<Arc<str>> = topo.masters().map(|m| topo.nodes[m].clone()).collect();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return table;
    };
    let fetched = rt.block_on(async {
        for addr in addrs {
            let node = NodeSettings {
                addr: addr.clone(),
                ..settings.clone()
            };
            let Ok(mut stream) = backend::connect_internal(&node, ConnKey::new(0, 2)).await else {
                continue;
            };
            let mut out = bytes::BytesMut::new();
            protocol::encode_args(&mut out, &["COMMAND"]);
            let io = async {
                stream.send(&out).await.map_err(|e| e.to_string())?;
                let mut buf = bytes::BytesMut::new();
                backend::read_frame(&mut stream, &mut buf).await
            };
            if let Ok(Ok(frame)) = tokio::time::timeout(settings.command_timeout, io).await {
                if !matches!(Value::parse(&frame), Ok(Value::Error(_))) {
                    return CommandTable::from_reply(&frame);
                }
            }
        }
        None
    });
    match fetched {
        Some(live) => {
            info!(
                commands = live.len(),
                "command table merged from the backend"
            );
            table.merge(live);
        }
        None => info!(commands = table.len(), "using the built-in command table"),
    }
    table
}

fn topology_main(shared: Arc<Shared>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        error!("cannot start the topology manager");
        return;
    };
    rt.block_on(async {
        let mut shutdown = shared.shutdown.clone();
        let settings = shared.node_settings.clone();
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = shared.topology.manage(settings, shared.config.backend.topology_refresh, Duration::from_millis(100)) => {}
        }
    });
}

/// A stable 40-hex-digit node id for respire's own `CLUSTER` replies, derived from its address.
fn node_id_for(addr: &SocketAddr) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut id = String::with_capacity(40);
    for round in 0..3u8 {
        for b in addr.to_string().bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x1000_0000_01b3);
        }
        id.push_str(&format!("{h:016x}"));
    }
    id.truncate(40);
    id
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Places `n` connections from addresses whose home is `homes[i % homes.len()]`, and
    /// returns each worker's count.
    fn fill(workers: usize, affinity: usize, homes: &[usize], n: usize) -> Vec<usize> {
        let mut loads = vec![0; workers];
        for i in 0..n {
            let w = pick(&loads, homes[i % homes.len()], affinity);
            loads[w] += 1;
        }
        loads
    }

    #[test]
    fn a_few_connections_from_one_address_share_its_worker() {
        assert_eq!(fill(2, 16, &[1], 16), [0, 16]);
        assert_eq!(fill(4, 16, &[2], 3), [0, 0, 3, 0]);
    }

    #[test]
    fn many_connections_from_one_address_are_spread_evenly() {
        assert_eq!(fill(2, 16, &[0], 50), [25, 25]);
        assert_eq!(fill(2, 16, &[1], 51), [25, 26]);
        assert_eq!(fill(4, 16, &[3], 200), [50, 50, 50, 50]);
    }

    #[test]
    fn without_affinity_every_connection_goes_to_the_least_loaded() {
        assert_eq!(fill(2, 0, &[0], 2), [1, 1]);
        assert_eq!(fill(3, 0, &[1], 7), [2, 3, 2]);
    }

    #[test]
    fn addresses_with_other_homes_keep_to_theirs_while_the_load_allows() {
        // Two addresses, two workers: each keeps its connections on its own worker.
        assert_eq!(fill(2, 16, &[0, 1], 20), [10, 10]);
        // A worker full of one address's connections sends another address's elsewhere.
        let mut loads = vec![16, 0];
        assert_eq!(pick(&loads, 0, 16), 1);
        loads[1] = 16;
        assert_eq!(pick(&loads, 0, 16), 0);
    }

    #[test]
    fn a_seat_is_given_back_when_the_connection_ends() {
        let p = Placement::new(2, 16);
        let ip = "127.0.0.1".parse().unwrap();
        let (w, seat) = p.place(ip);
        let (w2, seat2) = p.place(ip);
        assert_eq!(w, w2);
        assert_eq!(p.loads[w].load(Ordering::Relaxed), 2);
        drop(seat);
        assert_eq!(p.loads[w].load(Ordering::Relaxed), 1);
        drop(seat2);
        assert_eq!(p.loads[w].load(Ordering::Relaxed), 0);
    }
}
