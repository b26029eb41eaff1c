//! respire: a Redis proxy programmable with WebAssembly plugins.
//!
//! Applications talk to one endpoint; respire hides what is behind it.
//!
//! # Layout
//! - [`config`]: the TOML configuration, with units in values.
//! - [`protocol`]: RESP framing — client requests parsed like Redis parses them
//!   (zero-copy arguments), backend replies measured and passed through.
//! - [`commands`]: the command table: what is answered locally, what needs an
//!   exclusive connection, what is forwarded unchanged.
//! - [`topology`]: hash slots, the slot map, cluster discovery and refresh.
//! - [`router`]: where a command goes over several shards; split and merge.
//! - [`backend`]: pipelined, multiplexed backend connections with batched
//!   writes and FIFO reply matching; the per-worker connection pool.
//! - [`session`]: one client connection: batches, in-order replies, local
//!   commands, transactions, blocking commands, subscriptions.
//! - [`io`]: socket reads and writes shared by both sides (plain TCP or TLS).
//! - [`tls`]: rustls configurations for clients and backends, reloaded when their files change.
//! - [`channel`]: request and reply channels between the tasks of one worker (no atomics).
//! - [`pubsub`]: shared subscriber connections with fan-out to sessions.
//! - [`glob`]: Redis's glob patterns (the SDK's own source, shared): `PUBLISH` counts pattern subscribers.
//! - [`cache`]: the response cache plugins drive, kept fresh by `CLIENT TRACKING`.
//! - [`tracking`]: `CLIENT TRACKING` for respire's clients (their client-side caches).
//! - [`invalidation`]: the tracking connections: Redis's reports of changed keys for both.
//! - [`plugin`]: the WebAssembly plugin host (wasmtime components) and the request chain.
//! - [`stage`]: a worker's plugin stage: every session's hooks of one event-loop turn in one call per plugin.
//! - [`stats`]: respire's own request metrics (per worker, added up when scraped) and slow log.
//! - [`clients`]: the process-wide client list (`CLIENT LIST`/`KILL`, limits).
//! - [`guard`]: failed `AUTH` attempts throttled per client address.
//! - [`server`]: the listener, worker threads and graceful shutdown.
//!
//! # Life of a command
//! ```text
//! socket → read batch → parse frames (arguments are slices of the read buffer)
//!   → table lookup → local? answer in the session
//!   → otherwise queue on the session's backend connection (one per db and RESP version,
//!     shared by all sessions of the worker; an exclusive one for MULTI/WATCH/blocking)
//!   → after the batch: one write per touched backend connection
//! backend reply → FIFO match → reply slot filled → replies written in request order
//! ```
//! Replies pass through as raw bytes.

pub mod backend;
pub mod cache;
pub mod channel;
pub mod clients;
pub mod commands;
pub mod config;
#[path = "../../sdk/src/glob.rs"]
pub mod glob;
pub mod guard;
pub mod invalidation;
pub mod io;
pub mod metrics;
pub mod pause;
pub mod plugin;
pub mod prefixes;
pub mod protocol;
pub mod pubsub;
pub mod router;
pub mod server;
pub mod session;
pub mod stage;
pub mod state;
pub mod stats;
pub mod tls;
pub mod topology;
pub mod tracking;
pub mod versioned;
