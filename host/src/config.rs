//! Configuration: a TOML file with units in values ("200ms", "16MiB"),
//! overridden by command-line flags. Every field's doc comment is its user
//! documentation and states its default; `examples/respire.toml` shows them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use thiserror::Error;

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the line and column.
        message: String,
    },
    /// A value is out of range or values contradict each other.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address clients connect to; `""` serves only the TLS listener (as Redis's `port 0`).
    /// Default: "127.0.0.1:6380".
    pub listen: String,
    /// TLS for clients, on a listener of its own (as Redis's `tls-port`). Default: none.
    pub tls: Option<Tls>,
    /// The address respire gives for itself in `CLUSTER SLOTS|SHARDS|NODES`, `"host:port"`
    /// (an IP address or a hostname), for cluster-aware clients that reach respire through
    /// NAT, a container's port mapping or a load balancer (Redis's `cluster-announce-ip`,
    /// `-port` and `-hostname`). Default: none (the address the client connected to).
    pub announce: Option<String>,
    /// Worker threads, each owning its client and backend connections. 0 means one per core. Default: 0.
    pub workers: usize,
    /// Connections from one client address go to one worker thread (picked by a hash of the
    /// address) while that worker serves fewer than this many connections, or no more than
    /// any other worker; past that, to the worker serving the fewest. A client process's
    /// connections then share a thread, so the commands it sends on several of them reach
    /// Redis in the order it sent them, as with one Redis (a `BLPOP` on one connection, then
    /// an `LPUSH` on another). 0 spreads every connection to the worker serving the fewest.
    /// Default: 16.
    pub worker_affinity: usize,
    /// Most client connections at once; more are answered `-ERR max number of clients reached`. Default: 10000.
    pub max_clients: usize,
    /// Password clients must give with `AUTH` (the `default` user). Default: none (no authentication).
    pub requirepass: Option<String>,
    /// Named users with passwords, for `AUTH user pass` and `HELLO 3 AUTH user pass`. Default: none.
    pub users: Vec<User>,
    /// Close client connections idle for this long; "0s" never closes them. Default: "0s".
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most arguments in one command. Default: 1048576.
    pub max_args: usize,
    /// Largest single argument (Redis's `proto-max-bulk-len`). Default: "512MiB".
    pub max_bulk: ByteSize,
    /// Number of databases clients may `SELECT` (as the backend's `databases`). Default: 16.
    pub databases: u32,
    /// How long a graceful shutdown waits for owed replies before closing connections. Default: "10s".
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Folder of WebAssembly plugins (`NAME.wasm`, optional `NAME.toml`). Default: none.
    pub plugins: Option<PathBuf>,
    /// Where compiled plugins are kept so that restarts do not recompile them; `""` turns the
    /// cache off. Default: `$XDG_CACHE_HOME/respire/plugins` (or `~/.cache/respire/plugins`).
    pub plugin_cache: Option<PathBuf>,
    /// How long the response cache (which plugins drive) stays on after a plugin last asked it
    /// to cache a read. Then its tracking connections close, so that Redis stops matching every
    /// write against the plugins' prefixes, and the cache empties; the next read a plugin asks
    /// to cache opens them again (that read and those sent before they are up go to Redis
    /// uncached). "0s": on from the start, while a plugin uses the cache. Default: "60s".
    #[serde(with = "humantime_serde")]
    pub response_cache_idle: Duration,
    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/health`. Default: none.
    pub metrics: Option<String>,
    /// Commands slower than this many microseconds (from respire reading them to their reply)
    /// go to respire's slow log (`SLOWLOG GET`); negative turns it off, 0 logs every command.
    /// Default: 10000 (as Redis).
    pub slowlog_log_slower_than: i64,
    /// Entries the slow log keeps. Default: 128.
    pub slowlog_max_len: usize,
    /// `SLOWLOG GET` entries carry a seventh field, the backend node that ran the command.
    /// Default: false (Redis's six fields).
    pub slowlog_show_node: bool,
    /// Refuse to start listening on an address other than loopback while clients need no
    /// password (as Redis's `protected-mode`): set `requirepass`, or turn this off explicitly.
    /// Default: true.
    pub protected_mode: bool,
    /// Commands of one client respire has sent on and still owes replies for; the client's
    /// further commands wait in its query buffer until replies come back, so that one client
    /// cannot flood the backend connections it shares with others. Default: 4096.
    pub max_pipeline: usize,
    /// Bytes of big requests (16 KiB or more each) of one client respire has sent on and still
    /// owes replies for; beyond it the client's further commands wait, as for `max_pipeline`.
    /// Default: "64MiB".
    pub max_pipeline_bytes: ByteSize,
    /// Most input respire holds for one client that it has not handled yet (Redis's
    /// `client-query-buffer-limit`); a client that sends more is disconnected. Default: "1GiB".
    pub client_query_buffer_limit: ByteSize,
    /// Limits of the output respire holds for a client that does not read its replies (Redis's
    /// `client-output-buffer-limit`, same syntax), per class of client.
    pub client_output_buffer_limit: OutputLimits,
    /// Failed `AUTH` attempts one client address may make in a burst; then one more per
    /// second, and attempts beyond are refused without checking the password. 0: no limit.
    /// Default: 10.
    pub auth_failure_limit: u32,
    /// The Redis servers behind respire.
    pub backend: Backend,
}

/// Output buffer limits by class of client, each `"<hard> <soft> <soft seconds>"` as in
/// Redis's `client-output-buffer-limit` (`0` turns a limit off; units `b`, `k`, `kb`, `m`,
/// `mb`, `g`, `gb` as Redis reads them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputLimits {
    /// Clients running commands. Default: "0 0 0" (none, as Redis).
    pub normal: OutputLimit,
    /// Subscribed clients. Default: "32mb 8mb 60" (as Redis).
    pub pubsub: OutputLimit,
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits {
            normal: OutputLimit::default(),
            pubsub: OutputLimit {
                hard: 32 * 1024 * 1024,
                soft: 8 * 1024 * 1024,
                soft_seconds: 60,
            },
        }
    }
}

/// One class's output buffer limit: a client whose pending output reaches `hard` bytes, or
/// stays at `soft` bytes or more for `soft_seconds`, is disconnected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OutputLimit {
    /// Bytes; 0: no hard limit.
    pub hard: u64,
    /// Bytes; 0: no soft limit.
    pub soft: u64,
    /// How long output may stay above `soft`.
    pub soft_seconds: u64,
}

impl OutputLimit {
    /// Whether any limit applies.
    pub fn is_set(&self) -> bool {
        self.hard > 0 || self.soft > 0
    }
}

impl TryFrom<String> for OutputLimit {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [hard, soft, secs] = parts[..] else {
            return Err(format!(
                "{s:?} is not \"<hard> <soft> <soft seconds>\", e.g. \"32mb 8mb 60\""
            ));
        };
        let secs = secs
            .parse::<u64>()
            .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
        Ok(OutputLimit {
            hard: redis_memory(hard)?,
            soft: redis_memory(soft)?,
            soft_seconds: secs,
        })
    }
}

/// A size as Redis's configuration reads it: `b`, `k` (1000), `kb` (1024), `m`, `mb`, `g`,
/// `gb`, any case.
fn redis_memory(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let mul: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1000 * 1000,
        "mb" => 1024 * 1024,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1024 * 1024 * 1024,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size"))
}

/// Where read-only commands are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadFrom {
    /// Always the master.
    Master,
    /// A replica when the shard has one, else the master.
    PreferReplica,
    /// Only replicas; an error when the shard has none.
    Replica,
}

/// One standalone shard.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ShardSpec {
    /// Just the master's address.
    Address(String),
    /// A master with replicas and, optionally, its slot ranges.
    Full {
        /// "host:port" of the master.
        master: String,
        /// "host:port" of its replicas.
        #[serde(default)]
        replicas: Vec<String>,
        /// Slot ranges such as "0-5460" or single slots such as "7000".
        #[serde(default)]
        slots: Vec<String>,
    },
}

impl ShardSpec {
    /// The master's address, replicas and parsed slot ranges.
    pub fn parts(&self) -> Result<crate::topology::ShardParts, ConfigError> {
        match self {
            ShardSpec::Address(a) => Ok((a.clone(), Vec::new(), Vec::new())),
            ShardSpec::Full {
                master,
                replicas,
                slots,
            } => {
                let mut ranges = Vec::new();
                for r in slots {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) else {
                        return Err(ConfigError::Invalid(format!(
                            "shards: {r:?} is not a slot range like \"0-5460\""
                        )));
                    };
                    if a > b || b >= 16384 {
                        return Err(ConfigError::Invalid(format!(
                            "shards: slot range {r:?} is outside 0-16383"
                        )));
                    }
                    ranges.push((a, b));
                }
                Ok((master.clone(), replicas.clone(), ranges))
            }
        }
    }
}

/// A named user at respire.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User name.
    pub name: String,
    /// Password.
    pub password: String,
}

/// TLS towards clients. The files are read again when they change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Address TLS clients connect to, e.g. "0.0.0.0:6390". Required.
    pub listen: String,
    /// respire's certificate chain (PEM). Required.
    pub cert_file: PathBuf,
    /// Its private key (PEM). Required.
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates are verified against. Default: none.
    pub ca_file: Option<PathBuf>,
    /// Client certificates, as Redis's `tls-auth-clients`: "yes" (required, the default, as
    /// Redis), "optional" (verified when given) or "no". "yes" and "optional" need `ca_file`.
    #[serde(default)]
    pub auth_clients: ClientAuth,
    /// How long a client may take to complete the TLS handshake. Default: "10s".
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Whether TLS clients must present a certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A certificate signed by `ca_file` is required.
    #[default]
    Yes,
    /// A certificate is verified when the client gives one.
    Optional,
    /// No certificate is asked for.
    No,
}

/// TLS towards the backends: every connection respire opens to a Redis node (and to the
/// sentinels) goes through TLS. The files are read again when they change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// CA certificates (PEM) the nodes' certificates are verified against. Required.
    pub ca_file: PathBuf,
    /// Client certificate chain (PEM) respire presents, for nodes with `tls-auth-clients yes`. Default: none.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM). Default: none.
    pub key_file: Option<PathBuf>,
    /// Name sent as SNI and checked against every node's certificate. Default: each node's
    /// host as addressed (a DNS name, or an IP address matched against the certificate's IP SANs).
    pub server_name: Option<String>,
}

/// The Redis servers behind respire.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backend {
    /// One standalone Redis, "host:port". Default: none.
    pub address: Option<String>,
    /// Redis Cluster seed nodes. Default: none.
    pub cluster: Vec<String>,
    /// Redis Sentinel addresses; respire follows the masters named in `master_names`. Default: none.
    pub sentinel: Vec<String>,
    /// Master names known to the sentinels: one name is one Redis, several are shards placed by
    /// hash slot (split evenly, in this order). Default: none.
    pub master_names: Vec<String>,
    /// Password for the sentinels themselves (not the masters). Default: none.
    pub sentinel_password: Option<String>,
    /// Standalone Redis shards, keys placed by hash slot: "host:port" strings, or tables
    /// `{ master = "host:port", replicas = ["host:port"], slots = ["0-8191"] }`.
    /// Shards without `slots` share the slots evenly. Default: none.
    pub shards: Vec<ShardSpec>,
    /// Where read-only commands go: "master", "prefer-replica" (a replica of the key's shard when
    /// there is one, else its master) or "replica" (only replicas). Replicas may lag behind. Default: "master".
    pub read_from: ReadFrom,
    /// How often the Redis Cluster topology is refreshed when nothing prompts it. Default: "10s".
    #[serde(with = "humantime_serde")]
    pub topology_refresh: Duration,
    /// ACL user respire authenticates as on the backends. Default: none (`default`).
    pub username: Option<String>,
    /// Password respire authenticates with on the backends. Default: none.
    pub password: Option<String>,
    /// Shared pipelined connections per worker, per backend node, database and protocol version. Default: 1.
    pub connections: usize,
    /// Idle exclusive connections (transactions, blocking commands) kept per worker for reuse.
    /// Once a database has used one, two of them are kept connected ahead of need, so a
    /// blocking command goes at once (0 keeps none). Default: 8.
    pub idle_exclusive: usize,
    /// How long to wait for a TCP connection and handshake. Default: "1s".
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a command may wait for its reply before respire asks the node, on another
    /// connection, whether the request is only held: the node is busy with a script (`-BUSY`)
    /// or still lists the connection (`CLIENT LIST ID`: a `CLIENT PAUSE WRITE`, a slow
    /// command); then it waits on. A node that does not answer that within this time, or no
    /// longer knows the connection, has it declared broken (not applied to blocking commands).
    /// Default: "10s".
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long a request waits for a new master when its master has failed (Redis Cluster,
    /// Sentinel) before the client gets an error. It should outlast the cluster's failover time
    /// (`cluster-node-timeout` plus the election). Default: "30s".
    #[serde(with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// First delay before reconnecting to a failed backend; doubles up to `reconnect_max`, with jitter. Default: "50ms".
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest delay between reconnection attempts. Default: "2s".
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// TLS to the backends. Default: none (plain TCP).
    pub tls: Option<BackendTls>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:6380".into(),
            tls: None,
            announce: None,
            workers: 0,
            worker_affinity: 16,
            max_clients: 10_000,
            requirepass: None,
            users: Vec::new(),
            timeout: Duration::ZERO,
            max_args: 1024 * 1024,
            max_bulk: ByteSize::mib(512),
            databases: 16,
            shutdown_timeout: Duration::from_secs(10),
            plugins: None,
            plugin_cache: None,
            response_cache_idle: Duration::from_secs(60),
            metrics: None,
            slowlog_log_slower_than: 10_000,
            slowlog_max_len: 128,
            slowlog_show_node: false,
            protected_mode: true,
            max_pipeline: 4096,
            max_pipeline_bytes: ByteSize::mib(64),
            client_query_buffer_limit: ByteSize::gib(1),
            client_output_buffer_limit: OutputLimits::default(),
            auth_failure_limit: 10,
            backend: Backend::default(),
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            address: None,
            cluster: Vec::new(),
            shards: Vec::new(),
            sentinel: Vec::new(),
            master_names: Vec::new(),
            sentinel_password: None,
            topology_refresh: Duration::from_secs(10),
            read_from: ReadFrom::Master,
            username: None,
            password: None,
            connections: 1,
            idle_exclusive: 8,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(10),
            failover_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            tls: None,
        }
    }
}

impl Config {
    /// Reads and parses a file (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text (not yet validated).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// The plugin artifact cache folder in effect (none: off).
    pub fn plugin_cache_dir(&self) -> Option<PathBuf> {
        match &self.plugin_cache {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => crate::plugin::default_cache_dir(),
        }
    }

    /// Checks values and their combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.is_empty() && self.tls.is_none() {
            return bad("listen: an address is needed unless tls.listen serves the clients".into());
        }
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "listen: {:?} is not an address like \"127.0.0.1:6380\"",
                self.listen
            ));
        }
        if let Some(t) = &self.tls {
            if t.listen.parse::<SocketAddr>().is_err() {
                return bad(format!(
                    "tls.listen: {:?} is not an address like \"127.0.0.1:6390\"",
                    t.listen
                ));
            }
            if t.auth_clients != ClientAuth::No && t.ca_file.is_none() {
                return bad("tls: auth_clients = \"yes\" (the default, as Redis) or \"optional\" needs ca_file to verify client \
                            certificates against; set auth_clients = \"no\" to accept clients without one"
                    .into());
            }
            if t.handshake_timeout.is_zero() {
                return bad("tls.handshake_timeout must be more than 0s".into());
            }
        }
        if let Some(a) = &self.announce
            && self.announced().is_none()
        {
            return bad(format!(
                "announce: {a:?} is not \"host:port\" (a port from 1 to 65535; an IPv6 address in brackets)"
            ));
        }
        if let Some(m) = &self.metrics {
            if m.parse::<SocketAddr>().is_err() {
                return bad(format!(
                    "metrics: {m:?} is not an address like \"127.0.0.1:9379\""
                ));
            }
        }
        if self.workers > 1024 {
            return bad(format!("workers: {} is more than 1024", self.workers));
        }
        if self.max_clients == 0 {
            return bad("max_clients must be at least 1".into());
        }
        if self.max_args == 0 {
            return bad("max_args must be at least 1".into());
        }
        if self.max_bulk.as_u64() == 0 || self.max_bulk.as_u64() > i64::MAX as u64 {
            return bad("max_bulk must be between 1B and 8EiB".into());
        }
        if self.databases == 0 {
            return bad("databases must be at least 1".into());
        }
        if self.max_pipeline == 0 || self.max_pipeline_bytes.as_u64() == 0 {
            return bad("max_pipeline and max_pipeline_bytes must be at least 1".into());
        }
        if self.client_query_buffer_limit.as_u64() < 1024 * 1024 {
            return bad("client_query_buffer_limit must be at least 1MiB".into());
        }
        if self.protected_mode && !self.auth_required() {
            // A TLS listener that requires client certificates lets no one in without one.
            let tls_open = self
                .tls
                .as_ref()
                .filter(|t| t.auth_clients != ClientAuth::Yes)
                .map(|t| t.listen.as_str());
            for addr in std::iter::once(self.listen.as_str())
                .filter(|a| !a.is_empty())
                .chain(tls_open)
            {
                let loopback = addr
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip().is_loopback());
                if !loopback {
                    return bad(format!(
                        "protected mode: {addr} is not a loopback address and clients need no password; set requirepass \
                         (--requirepass), or protected_mode = false (--protected-mode no) to accept anyone who can reach it"
                    ));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() || u.name.contains(char::is_whitespace) {
                return bad(format!("users: invalid user name {:?}", u.name));
            }
            if u.name == "default" && self.requirepass.is_some() {
                return bad(
                    "users: \"default\" is set by requirepass; use one or the other".into(),
                );
            }
            if !seen.insert(&u.name) {
                return bad(format!("users: {:?} is listed twice", u.name));
            }
        }
        let b = &self.backend;
        let modes = usize::from(b.address.is_some())
            + usize::from(!b.cluster.is_empty())
            + usize::from(!b.shards.is_empty())
            + usize::from(!b.sentinel.is_empty());
        if modes != 1 {
            return bad("backend: give exactly one of --backend, --cluster, --shards or --sentinel (backend.address, backend.cluster, backend.shards or backend.sentinel in the file)".into());
        }
        if b.sentinel.is_empty() != b.master_names.is_empty() {
            return bad("backend: --sentinel and --master-name go together (backend.sentinel and backend.master_names)".into());
        }
        for addr in b
            .address
            .iter()
            .chain(b.cluster.iter())
            .chain(b.sentinel.iter())
        {
            check_host_port(addr)?;
        }
        let mut with_slots = 0;
        for s in &b.shards {
            let (master, replicas, ranges) = s.parts()?;
            for a in std::iter::once(&master).chain(replicas.iter()) {
                check_host_port(a)?;
            }
            with_slots += usize::from(!ranges.is_empty());
        }
        if with_slots != 0 && with_slots != b.shards.len() {
            return bad("backend.shards: give slots for every shard or for none".into());
        }
        if with_slots > 0 {
            let specs: Vec<_> = b.shards.iter().filter_map(|s| s.parts().ok()).collect();
            crate::topology::Topology::shards(&specs)
                .map_err(|e| ConfigError::Invalid(format!("backend.shards: {e}")))?;
        }
        if b.topology_refresh.is_zero() {
            return bad("backend.topology_refresh must be more than 0s".into());
        }
        if b.connections == 0 || b.connections > 64 {
            return bad("backend.connections must be between 1 and 64".into());
        }
        if b.connect_timeout.is_zero() || b.command_timeout.is_zero() {
            return bad(
                "backend.connect_timeout and backend.command_timeout must be more than 0s".into(),
            );
        }
        if let Some(t) = &b.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                return bad("backend.tls: cert_file and key_file go together".into());
            }
        }
        if b.reconnect_min.is_zero() || b.reconnect_max < b.reconnect_min {
            return bad(
                "backend: reconnect_min must be more than 0s and at most reconnect_max".into(),
            );
        }
        Ok(())
    }

    /// The number of worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    /// Whether clients must authenticate. As in Redis, the `default` user needs a password
    /// only when `requirepass` is set; named users can always `AUTH` (and an ACL plugin can
    /// give unauthenticated clients as little as it likes).
    pub fn auth_required(&self) -> bool {
        self.requirepass.is_some()
    }
}

impl Config {
    /// `announce` as host and port (an IPv6 address without its brackets), when set and valid.
    pub fn announced(&self) -> Option<(&str, u16)> {
        let (host, port) = self.announce.as_deref()?.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|&p| p > 0)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())?,
            None if host.contains(':') => return None,
            None => host,
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
        (!host.is_empty() && host.chars().all(plain)).then_some((host, port))
    }
}

fn check_host_port(addr: &str) -> Result<(), ConfigError> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(ConfigError::Invalid(format!(
            "backend: {addr:?} is not \"host:port\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn units_and_defaults() {
        let c = Config::parse(
            "listen = \"127.0.0.1:7777\"\nmax_bulk = \"16MiB\"\n[backend]\naddress = \"127.0.0.1:6379\"\ncommand_timeout = \"250ms\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_bulk.as_u64(), 16 * 1024 * 1024);
        assert_eq!(c.backend.command_timeout, Duration::from_millis(250));
        assert_eq!(c.backend.connections, 1);
    }

    #[test]
    fn unknown_keys_are_rejected_with_location() {
        let e = Config::parse("listen = \"127.0.0.1:1\"\nlisten_adress = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen_adress"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn contradictions_are_rejected() {
        let c = Config::parse("[backend]\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("exactly one")
        );
        let c = Config::parse("[backend]\naddress = \"nohost\"\n").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn announce_is_host_and_port() {
        let base = "[backend]\naddress = \"127.0.0.1:6379\"\n";
        for (a, want) in [
            ("10.1.2.3:16380", Some(("10.1.2.3", 16380))),
            ("respire.internal:6380", Some(("respire.internal", 6380))),
            ("[2001:db8::7]:6380", Some(("2001:db8::7", 6380))),
        ] {
            let c = Config::parse(&format!("announce = \"{a}\"\n{base}")).unwrap();
            c.validate().unwrap();
            assert_eq!(c.announced(), want, "{a}");
        }
        for a in [
            "respire",
            "host:0",
            "host:70000",
            "2001:db8::7:6380",
            ":6380",
            "a b:1",
        ] {
            let c = Config::parse(&format!("announce = \"{a}\"\n{base}")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("announce"), "{a}: {e}");
        }
    }

    #[test]
    fn output_limits_read_redis_syntax() {
        let c = Config::parse("[client_output_buffer_limit]\nnormal = \"1gb 256MB 30\"\n").unwrap();
        assert_eq!(
            c.client_output_buffer_limit.normal,
            OutputLimit {
                hard: 1 << 30,
                soft: 256 << 20,
                soft_seconds: 30
            }
        );
        assert_eq!(
            c.client_output_buffer_limit.pubsub,
            OutputLimit {
                hard: 32 << 20,
                soft: 8 << 20,
                soft_seconds: 60
            }
        );
        let c = Config::parse("[client_output_buffer_limit]\npubsub = \"2k 1000 0\"\n").unwrap();
        assert_eq!(
            c.client_output_buffer_limit.pubsub,
            OutputLimit {
                hard: 2000,
                soft: 1000,
                soft_seconds: 0
            }
        );
        assert!(!c.client_output_buffer_limit.normal.is_set());
        for bad in ["32mb 8mb", "32xb 8mb 60", "-1 0 0", "1 2 x"] {
            let e = Config::parse(&format!(
                "[client_output_buffer_limit]\npubsub = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("pubsub"), "{bad}: {e}");
        }
    }

    #[test]
    fn protected_mode_refuses_an_open_address_without_a_password() {
        let base = "[backend]\naddress = \"127.0.0.1:6379\"\n";
        let c = Config::parse(&format!("listen = \"0.0.0.0:6380\"\n{base}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("protected mode") && e.contains("0.0.0.0:6380"),
            "{e}"
        );
        let c = Config::parse(&format!(
            "listen = \"0.0.0.0:6380\"\nrequirepass = \"s3cret\"\n{base}"
        ))
        .unwrap();
        c.validate().unwrap();
        let c = Config::parse(&format!(
            "listen = \"0.0.0.0:6380\"\nprotected_mode = false\n{base}"
        ))
        .unwrap();
        c.validate().unwrap();
        let c = Config::parse(&format!("listen = \"[::1]:6380\"\n{base}")).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn tls_settings_are_checked() {
        let base = "[backend]\naddress = \"127.0.0.1:6379\"\n";
        let tls = |extra: &str| {
            format!(
                "[tls]\nlisten = \"0.0.0.0:6390\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n{extra}{base}"
            )
        };
        // Client certificates are required by default (as Redis), which needs a CA.
        let e = Config::parse(&tls(""))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_file"), "{e}");
        let c = Config::parse(&tls("ca_file = \"ca.pem\"\n")).unwrap();
        assert_eq!(c.tls.as_ref().unwrap().auth_clients, ClientAuth::Yes);
        c.validate().unwrap();
        // Without client certificates, an open TLS address needs a password (protected mode).
        let e = Config::parse(&tls("auth_clients = \"no\"\n"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("protected mode") && e.contains("0.0.0.0:6390"),
            "{e}"
        );
        Config::parse(&format!(
            "requirepass = \"x\"\n{}",
            tls("auth_clients = \"optional\"\nca_file = \"ca.pem\"\n")
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert!(Config::parse(&tls("auth_clients = \"maybe\"\n")).is_err());
        // Only TLS: `listen = ""`.
        let c =
            Config::parse(&format!("listen = \"\"\n{}", tls("ca_file = \"ca.pem\"\n"))).unwrap();
        c.validate().unwrap();
        assert!(
            Config::parse(&format!("listen = \"\"\n{base}"))
                .unwrap()
                .validate()
                .is_err()
        );
        let e = Config::parse(&format!(
            "{base}[backend.tls]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
    }

    #[test]
    fn the_example_file_lists_the_defaults() {
        let c = Config::parse(include_str!("../../examples/respire.toml")).unwrap();
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(c.max_pipeline, d.max_pipeline);
        assert_eq!(c.max_pipeline_bytes, d.max_pipeline_bytes);
        assert_eq!(c.client_query_buffer_limit, d.client_query_buffer_limit);
        assert_eq!(
            c.client_output_buffer_limit.normal,
            d.client_output_buffer_limit.normal
        );
        assert_eq!(
            c.client_output_buffer_limit.pubsub,
            d.client_output_buffer_limit.pubsub
        );
        assert_eq!(
            (c.protected_mode, c.auth_failure_limit),
            (d.protected_mode, d.auth_failure_limit)
        );
    }
}
